#!/usr/bin/env python3
"""Dataset reinforcement (Faghri et al., "Reinforce Data, Multiply Impact", ICCV 2023).

Writes self-contained WebDataset shards: every image's original bytes, its label and, per image, ``--num-samples``
stored augmentations (explicit parameters) with the teacher ensemble's top-``--topk`` probabilities.

    python reinforce.py --teacher resnet18=teacher.pth.tar --num-samples 50 --output out/rd   # the embedded digits
    torchrun --nproc_per_node=8 reinforce.py /imagenet -c hparams/dr/reinforce/imagenet_plus.yaml
    python reinforce.py --verify out/rd [--teacher resnet18=teacher.pth.tar --verify-samples 32]
    python reinforce.py --stats out/rd
    python reinforce.py --label-maps --teacher resnet18=teacher.pth.tar --topk 5 --output out/lm   # ReLabel maps
    python reinforce.py --import-ml-dr imagenet_plus_randaug.tar.gz --data-dir /imagenet/training --output out/inp
    python reinforce.py --show out/rd --images 0 1 --samples 0 1 2 --save-png show.png --save-npz show.npz
"""
import argparse
import datetime
import json
import logging
import os
import sys
from typing import Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from dr import storage
from dr.config import create_config_parser, resolve_dataset_name, save_args_yaml
from dr.config import parse_args as dr_parse_args
from dr.reinforce.augment import create_augment_spec
from dr.reinforce.format import AUG_NAMES, AUG_RRC, AUG_RRC_RA_RE, load_meta
from dr.reinforce.importers.mldr_job import import_mldr
from dr.reinforce.label_maps import LabelMapWriter
from dr.reinforce.show import save_npz, save_png, show_samples
from dr.reinforce.sources import create_source
from dr.reinforce.teachers import create_teacher
from dr.reinforce.verify import DEFAULT_VERIFY_ATOL, FP16_RTOL, compute_stats, incomplete_run, verify_dir, write_stats
from dr.reinforce.writer import Reinforcer

_logger = logging.getLogger('reinforce')


def create_parser() -> Tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """(config parser, main parser)."""
    config_parser = create_config_parser()
    parser = argparse.ArgumentParser(description='Dataset reinforcement: write reinforced WebDataset shards')

    group = parser.add_argument_group('Dataset')
    group.add_argument('data_dir', nargs='?', default=None, metavar='DIR',
                       help='dataset root (image folder, wds shard dir, torch/ root), read as timm reads it; '
                            'without DIR the embedded digits are reinforced')
    group.add_argument('--dataset', default='', metavar='NAME',
                       help="'' for an image folder at DIR (the default), a timm prefix (wds/NAME, torch/NAME, "
                            "hfds/NAME), or 'digits' (embedded; the default without DIR)")
    group.add_argument('--split', default='train', metavar='NAME', help='dataset split (default: train)')
    group.add_argument('--digits-size', type=int, default=32, metavar='N', help='digits image side (default: 32)')
    group.add_argument('--max-images', type=int, default=0, metavar='N',
                       help='only the first N images of the dataset order (0: all)')
    group.add_argument('--num-classes', type=int, default=None, metavar='N',
                       help='number of classes (default: from the dataset)')

    group = parser.add_argument_group('Teacher')
    group.add_argument('--teacher', nargs='+', default=None, metavar='NAME[=CKPT]',
                       help='timm model(s), optionally name=checkpoint; several = ensemble (mean of softmaxes)')
    group.add_argument('--pretrained', action='store_true', default=False,
                       help='hub weights for teachers given without a checkpoint')
    group.add_argument('--teacher-img-size', type=int, default=None, metavar='N',
                       help="override every member's input resolution (default: each member's pretrained cfg); "
                            "--verify with --teacher needs the value the shards were written with")
    group.add_argument('--amp', action='store_true', default=False, help='run the teacher under autocast')
    group.add_argument('--amp-dtype', default='bfloat16', choices=('bfloat16', 'float16'),
                       help='autocast dtype (default: bfloat16)')
    group.add_argument('--channels-last', action='store_true', default=False,
                       help='channels-last memory format for the teacher')
    group.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
                       help='teacher device (default: cuda if available; cuda:LOCAL_RANK under torchrun)')

    group = parser.add_argument_group('Reinforcement')
    group.add_argument('--aug', default=AUG_RRC_RA_RE, choices=AUG_NAMES,
                       help='stored augmentations: rrc (crop+flip), rrc+ra_re (+RandAugment, random erasing), or '
                            'either +mix (mixup/cutmix with a partner image of the same group, the paper\'s +M*)')
    group.add_argument('--scale', type=float, nargs=2, default=None, metavar=('MIN', 'MAX'),
                       help='random-resized-crop area range (default: 0.08 1.0)')
    group.add_argument('--ratio', type=float, nargs=2, default=None, metavar=('MIN', 'MAX'),
                       help='random-resized-crop aspect range (default: 3/4 4/3)')
    group.add_argument('--hflip', type=float, default=None, metavar='P', help='flip probability (default: 0.5)')
    group.add_argument('--ra-num-ops', type=int, default=None, metavar='N', help='RandAugment ops (default: 2)')
    group.add_argument('--ra-magnitude', type=int, default=None, metavar='M',
                       help='RandAugment magnitude of 31 bins (default: 9)')
    group.add_argument('--re-prob', type=float, default=None, metavar='P',
                       help='random erasing probability (default: 0.25)')
    group.add_argument('--re-fill', default=None, choices=('mean', 'black'),
                       help='erased pixels: mean (0 after normalisation, the mean colour; default) or black '
                            '(0 before normalisation, as ml-dr)')
    group.add_argument('--mixup-p', type=float, default=None, metavar='P', help='+mix: mixup probability (0.5)')
    group.add_argument('--cutmix-p', type=float, default=None, metavar='P', help='+mix: cutmix probability (0.5)')
    group.add_argument('--mix-group', type=int, default=None, metavar='N',
                       help='+mix: partners are other images of the same group of N consecutive images of a shard '
                            '(default: 8)')
    group.add_argument('--num-samples', type=int, default=400, metavar='N',
                       help='stored augmentations per image (default: 400)')
    group.add_argument('--topk', type=int, default=10, metavar='K',
                       help='stored classes per augmentation (default: 10)')
    group.add_argument('--seed', type=int, default=0, metavar='S', help='augmentation seed (default: 0)')
    group.add_argument('--label-maps', action='store_true', default=False,
                       help='ReLabel-style label maps instead of stored augmentations: one teacher pass per whole '
                            'image, the top-k logits of every location of its last feature map (schema 3); training '
                            'draws a fresh crop (--scale/--ratio/--hflip) and pools the map over it (--aug and '
                            '--num-samples do not apply)')

    group = parser.add_argument_group('Output')
    group.add_argument('--output', default='', metavar='DIR', help='output directory of the shards')
    group.add_argument('--shard-size', type=int, default=1000, metavar='N', help='images per shard (default: 1000)')
    group.add_argument('-b', '--batch-size', type=int, default=256, metavar='N',
                       help='augmentations per teacher batch (default: 256)')
    group.add_argument('-j', '--workers', type=int, default=4, metavar='N', help='data-loader workers (default: 4)')
    group.add_argument('--no-progress', action='store_true', default=False, help='no tqdm progress bar')

    group = parser.add_argument_group('Verify / stats')
    group.add_argument('--verify', default='', metavar='DIR',
                       help='check the shards in DIR against reinforce.json (with --teacher: also replay samples)')
    group.add_argument('--verify-samples', type=int, default=16, metavar='N',
                       help='stored augmentations replayed through --teacher by --verify (default: 16)')
    group.add_argument('--verify-atol', type=float, default=DEFAULT_VERIFY_ATOL, metavar='A',
                       help=f'absolute tolerance of replayed probabilities (default: {DEFAULT_VERIFY_ATOL})')
    group.add_argument('--verify-rtol', type=float, default=FP16_RTOL, metavar='R',
                       help='relative tolerance of replayed probabilities (default: 2**-10, float16)')
    group.add_argument('--stats', default='', metavar='DIR', help='print and write DIR/stats.json')

    group = parser.add_argument_group('Import published reinforcements (apple/ml-dr)')
    group.add_argument('--import-ml-dr', default='', metavar='RDATA',
                       help='an ml-dr rdata archive (.tar.gz, streamed) or its extracted directory: convert it to '
                            'shards in --output (with --data-dir; --shard-size, --seed (shard order), -j apply)')
    group.add_argument('--data-dir', dest='import_data_dir', default='', metavar='IMAGEFOLDER',
                       help='the image folder the rdata was made from (torchvision ImageFolder order = ml-dr index)')

    group = parser.add_argument_group('Show stored augmentations')
    group.add_argument('--show', default='', metavar='DIR',
                       help='replay stored augmentations of DIR exactly as the training loader does')
    group.add_argument('--images', type=int, nargs='+', default=[0], metavar='I',
                       help='source dataset indices of the images to show (default: 0)')
    group.add_argument('--samples', type=int, nargs='+', default=[0], metavar='K',
                       help='stored augmentations to show per image (default: 0)')
    group.add_argument('--save-npz', default='', metavar='FILE',
                       help='write the replays (float32 CHW, normalised; keys "<image>_<sample>")')
    group.add_argument('--save-png', default='', metavar='FILE',
                       help='write a grid of the replays with each sample\'s top-3 teacher classes')
    return config_parser, parser


def parse_args(argv: Optional[Sequence[str]] = None):
    """(args, resolved args as YAML); ``-c/--config`` YAML gives defaults."""
    config_parser, parser = create_parser()
    return dr_parse_args(parser, config_parser, argv=argv)


def _init_distributed() -> Tuple[int, int, int]:
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    if world_size > 1:
        # gloo only synchronises the ranks (barrier before the merge); teacher work never crosses ranks
        dist.init_process_group('gloo', timeout=datetime.timedelta(hours=48))
        return dist.get_rank(), world_size, int(os.environ.get('LOCAL_RANK', '0'))
    return 0, 1, 0


def _amp_dtype(args) -> Optional[torch.dtype]:
    return {'bfloat16': torch.bfloat16, 'float16': torch.float16}[args.amp_dtype] if args.amp else None


def run_verify(args) -> int:
    message = incomplete_run(args.verify)
    if message:
        raise FileNotFoundError(message)
    meta = load_meta(args.verify)
    teacher = None
    if args.teacher:
        teacher = create_teacher(args.teacher, int(meta['num_classes']), pretrained=args.pretrained,
                                 img_size=args.teacher_img_size, device=args.device)
    report = verify_dir(args.verify, teacher=teacher, num_replays=args.verify_samples if teacher else 0,
                        seed=args.seed, atol=args.verify_atol, rtol=args.verify_rtol, device=args.device,
                        amp_dtype=_amp_dtype(args))
    for p in report['problems']:
        print(f'BAD {p["shard"]}: {p["problem"]}')
    bad = sorted({p['shard'] for p in report['problems']})
    replays = f', {report["replays"]} replays' if teacher is not None else ''
    if report['ok']:
        print(f'OK {args.verify}: {report["shards"]} shards, {report["images"]} images{replays}')
        return 0
    print(f'FAILED {args.verify}: {len(bad)} bad shard(s): {", ".join(bad)}{replays}')
    return 1


def run_stats(args) -> int:
    stats = compute_stats(args.stats)
    width = max(len(k) for k in stats)
    for k, v in stats.items():
        print(f'{k:<{width}}  {v:.6g}' if isinstance(v, float) else f'{k:<{width}}  {v}')
    path = _stats_destination(args)
    if path is None:
        _logger.warning(f'--stats {args.stats}: stats.json not written (an http(s):// folder cannot be written; pass '
                        f'--output DIR to write DIR/stats.json)')
        return 0
    if storage.is_remote(path):
        storage.put_bytes(f'{path}/stats.json', json.dumps(stats, indent=1).encode())  # appears when complete
        path = f'{path}/stats.json'
    else:
        os.makedirs(path, exist_ok=True)
        path = write_stats(path, stats)
    print(f'wrote {path}')
    return 0


def _stats_destination(args) -> Optional[str]:
    """Where ``--stats`` writes stats.json: ``--output`` when given, else next to the shards (a local folder or
    ``s3://``); None for an ``http(s)://`` folder without ``--output``."""
    if args.output:
        return args.output.rstrip('/') if storage.is_remote(args.output) else args.output
    if storage.is_remote(args.stats):
        return args.stats.rstrip('/') if args.stats.startswith('s3://') else None
    return args.stats


def run_import(args, args_text: str) -> int:
    if not args.output or not args.import_data_dir:
        raise ValueError('--import-ml-dr needs --data-dir (the image folder) and --output (the shard directory)')
    _check_remote_output(args.output, '--import-ml-dr')
    os.makedirs(args.output, exist_ok=True)
    save_args_yaml(args_text, args.output)
    # an http(s):// or s3:// archive (how ml-dr publishes them) is downloaded when pass 1 needs it
    meta = import_mldr(args.import_ml_dr, args.import_data_dir, args.output, num_classes=args.num_classes,
                       shard_size=args.shard_size, seed=args.seed, workers=args.workers,
                       progress=not args.no_progress)
    print(f'{args.output}: imported {meta["num_images"]} images x {meta["num_samples"]} augmentations '
          f'({meta["augmentation"]["name"]}, top-{meta["topk"]}) in {len(meta["shards"])} shards, '
          f'{meta["bytes_per_augmentation"]:.2f} bytes/augmentation')
    return 0


def run_show(args) -> int:
    meta = load_meta(args.show)
    if meta.get('kind') == 'label_maps':
        raise ValueError(f'--show {args.show}: the directory holds label maps, not stored augmentations (nothing to '
                         f'replay; --stats summarises them)')
    shown = show_samples(args.show, args.images, args.samples)
    for key, item in shown.items():
        names = meta.get('class_names') or []
        top = ', '.join(f'{names[int(i)] if int(i) < len(names) else int(i)} {float(p):.3f}'
                        for i, p in zip(item['ids'][:3], item['probs'][:3]))
        print(f'{key}: label {item["label"]}, top-3 {top}')
    if args.save_npz:
        print(f'wrote {save_npz(args.save_npz, shown)}')
    if args.save_png:
        print(f'wrote {save_png(args.save_png, shown, meta.get("class_names"))}')
    return 0


def _check_remote_output(output: str, mode: str = '') -> None:
    """Stored augmentations may go to ``s3://``; HTTP cannot be written, and ``mode`` (label maps, imports) writes
    local folders only."""
    if not storage.is_remote(output):
        return
    if not output.startswith('s3://'):
        raise ValueError(f'--output {output}: only local folders and s3:// prefixes can be written (HTTP is read-only)')
    if mode:
        raise ValueError(f'--output {output}: {mode} writes a local folder; upload it afterwards (e.g. aws s3 sync) '
                         f'or reinforce with --output s3://... directly')


def run_reinforce(args, args_text: str) -> int:
    if not args.output:
        raise ValueError('--output is required (directory for the shards)')
    _check_remote_output(args.output, '--label-maps' if args.label_maps else '')
    if not args.teacher:
        raise ValueError('--teacher is required (one or more timm model names, optionally name=checkpoint)')
    if args.seed < 0:
        raise ValueError(f'--seed must be >= 0, got {args.seed}')
    args.dataset = resolve_dataset_name(args.dataset, args.data_dir)
    source = create_source(args.dataset, root=args.data_dir, split=args.split, digits_size=args.digits_size,
                           max_images=args.max_images)
    num_classes = args.num_classes or (len(source.classes) if source.classes else None)
    if not num_classes:
        raise ValueError(f'--num-classes is required: dataset {args.dataset!r} does not list its classes')
    if args.topk > num_classes:
        raise ValueError(f'--topk {args.topk} is larger than the number of classes ({num_classes})')
    spec = create_augment_spec(args.aug, scale=args.scale, ratio=args.ratio, hflip=args.hflip,
                               ra_num_ops=args.ra_num_ops, ra_magnitude=args.ra_magnitude, re_prob=args.re_prob,
                               re_fill=args.re_fill, mixup_p=args.mixup_p, cutmix_p=args.cutmix_p,
                               mix_group=args.mix_group)
    if args.label_maps:
        return run_label_maps(args, args_text, source, num_classes)
    rank, world_size, local_rank = _init_distributed()
    device = args.device
    if world_size > 1 and device == 'cuda':
        device = f'cuda:{local_rank}'
    if str(device).startswith('cuda'):
        torch.cuda.set_device(torch.device(device))
    torch.manual_seed(args.seed)  # random-weight teachers (tests, demos) are identical on every rank and rerun
    teacher = create_teacher(args.teacher, num_classes, pretrained=args.pretrained,
                             img_size=args.teacher_img_size, device=device)
    if args.channels_last:
        teacher = teacher.to(memory_format=torch.channels_last)
    dataset_info = _dataset_info(args)
    writer = Reinforcer(
        source, teacher, spec, args.output, num_samples=args.num_samples, topk=args.topk, seed=args.seed,
        shard_size=args.shard_size, num_classes=num_classes, batch_size=args.batch_size, workers=args.workers,
        amp_dtype=_amp_dtype(args), channels_last=args.channels_last, device=device, rank=rank,
        world_size=world_size, dataset_info=dataset_info, progress=not args.no_progress)
    writer.check_output()
    if rank == 0 and storage.is_remote(args.output):
        storage.put_bytes(args.output.rstrip('/') + '/args.yaml', args_text.encode())
    elif rank == 0:
        os.makedirs(args.output, exist_ok=True)
        save_args_yaml(args_text, args.output)
    result = writer.run()
    _logger.info(f'rank {rank}: wrote {result["shards_written"]} shards ({result["images"]} images, '
                 f'{result["images_per_second"]:.2f} img/s), skipped {result["shards_skipped"]} complete shards')
    if world_size > 1:
        dist.barrier()
    if rank == 0:
        meta = writer.merge(class_names=source.classes)
        print(f'{args.output}: {meta["num_images"]} images in {len(meta["shards"])} shards, '
              f'{meta["num_samples"]} augmentations each, {meta["bytes_per_augmentation"]:.2f} bytes/augmentation, '
              f'teacher top-1 agreement with labels {meta["teacher_label_agreement"]:.4f}')
    if world_size > 1:
        dist.destroy_process_group()
    return 0


def _dataset_info(args) -> dict:
    info = {'name': args.dataset, 'root': os.path.abspath(args.data_dir) if args.data_dir else None,
            'split': args.split}
    if args.dataset.lower() == 'digits':
        info['digits_size'] = args.digits_size
    if args.max_images:
        info['max_images'] = args.max_images
    return info


def run_label_maps(args, args_text: str, source, num_classes: int) -> int:
    """``--label-maps``: one process writes the label-map shards (``dr.reinforce.label_maps``)."""
    if int(os.environ.get('WORLD_SIZE', '1')) > 1:
        raise ValueError('--label-maps runs in one process (one teacher pass per image); run it without torchrun')
    if args.amp or args.channels_last:
        raise ValueError('--label-maps runs the teacher in float32, contiguous: drop --amp / --channels-last')
    torch.manual_seed(args.seed)
    teacher = create_teacher(args.teacher, num_classes, pretrained=args.pretrained,
                             img_size=args.teacher_img_size, device=args.device)
    spec = create_augment_spec(AUG_RRC, scale=args.scale, ratio=args.ratio, hflip=args.hflip)
    writer = LabelMapWriter(source, teacher, args.output, topk=args.topk, seed=args.seed,
                            shard_size=args.shard_size, num_classes=num_classes, batch_size=args.batch_size,
                            device=args.device, train_spec=spec, dataset_info=_dataset_info(args),
                            progress=not args.no_progress)
    writer.store.check_config()
    os.makedirs(args.output, exist_ok=True)
    save_args_yaml(args_text, args.output)
    meta = writer.run()
    lm = meta['label_map']
    print(f'{args.output}: {meta["num_images"]} images in {len(meta["shards"])} shards, label maps '
          f'{lm["height"]}x{lm["width"]} top-{meta["topk"]}, teacher top-1 agreement with labels per location '
          f'{meta["teacher_label_agreement"]:.4f}')
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(name)s: %(message)s')
    args, args_text = parse_args(argv)
    try:
        if args.verify:
            return run_verify(args)
        if args.stats:
            return run_stats(args)
        if args.import_ml_dr:
            return run_import(args, args_text)
        if args.show:
            return run_show(args)
        return run_reinforce(args, args_text)
    except (ValueError, FileNotFoundError) as e:  # bad input: one argparse-style line on stderr, no traceback
        print(f'reinforce.py: error: {e}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
