#!/usr/bin/env python3
"""Evaluate timm models on ImageNet, its distribution shifts, ImageNet-C, digits / digits-C: accuracy, calibration
(ECE, MCE, NLL, reliability diagrams) and adversarial robustness (FGSM sweep, AutoAttack).

Examples::

    # embedded digits + digits-C + FGSM sweep, two checkpoints in one table
    python validate.py --dataset digits --sets digits digits-c --checkpoint output/ce output/bake \\
        --fgsm-eps 0 1 2 4 8 16 --results-file output/validate/results.json

    # every ImageNet-family set found under a root, one model load
    python validate.py --suite /data --model resnet50 --checkpoint r50.pth.tar --amp --results-file r50.json

    # distributed: each rank evaluates a disjoint shard, results gathered once per sample
    torchrun --nproc_per_node=8 validate.py --suite /data --model resnet50 --checkpoint r50.pth.tar

Set names, folder names and conventions: ``dr/evaluate/sets.py`` (``SET_SPECS``) and the README.
"""
import argparse
import logging
import os
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

from dr.config import create_config_parser, parse_key_values
from dr.config import parse_args as _parse_config_args

_logger = logging.getLogger('validate')

SET_CHOICES_HELP = ('digits, digits-c, imagenet, imagenetv2-matched-frequency, imagenetv2-threshold0.7, '
                    'imagenetv2-top-images, imagenet-a, imagenet-r, imagenet-sketch, objectnet, imagenet-c')


class ValidateError(Exception):
    """A user-facing error: printed without a traceback, exit status 2."""


def create_parser() -> Tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """(config parser, main parser) in timm's two-stage style."""
    config_parser = create_config_parser()
    parser = argparse.ArgumentParser(
        description='Evaluate a timm model: accuracy, distribution shifts, corruptions, calibration, attacks',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    group = parser.add_argument_group('Data')
    group.add_argument('data_dir', nargs='?', default=None, metavar='DIR',
                       help='ImageFolder root (or timm dataset root with --dataset) for a generic set')
    group.add_argument('--dataset', default='', metavar='NAME',
                       help="'digits' (embedded val split), a timm dataset prefix (torch/..., hfds/...) used with "
                            "DIR, or empty for an ImageFolder DIR")
    group.add_argument('--split', default='validation', metavar='NAME', help='split of a timm --dataset')
    group.add_argument('--suite', default=None, metavar='ROOT',
                       help='root holding the ImageNet-family sets under their documented folder names; every set '
                            'found is evaluated (missing ones are listed, not errors)')
    group.add_argument('--sets', nargs='+', default=None, metavar='NAME',
                       help=f'sets to evaluate (default: all found under --suite, else the --dataset). One of: '
                            f'{SET_CHOICES_HELP}')
    group.add_argument('--corruptions', nargs='+', default=None, metavar='NAME',
                       help='restrict ImageNet-C / digits-C to these corruptions')
    group.add_argument('--digits-size', type=int, default=None, metavar='N',
                       help='digits image side (default: from the checkpoint args, else 32)')
    group.add_argument('--skip-bad-images', action='store_true',
                       help='skip and count unreadable images instead of stopping with an error naming the file')
    group.add_argument('-j', '--workers', type=int, default=2, metavar='N', help='data loading workers per process')
    group.add_argument('--pin-mem', action='store_true', help='pin CPU memory in the loader (CUDA)')

    group = parser.add_argument_group('Model')
    group.add_argument('-m', '--model', default=None, metavar='NAME',
                       help="timm model name (default: the 'arch' stored in the checkpoint)")
    group.add_argument('--checkpoint', nargs='*', default=[], metavar='PATH',
                       help='checkpoint file(s) or training output dir(s) (model_best.pth.tar, else last.pth.tar); '
                            'several give one table')
    group.add_argument('--tags', nargs='*', default=None, metavar='NAME',
                       help='names of the checkpoints in tables and results (default: their folder names)')
    group.add_argument('--use-ema', action='store_true', help='evaluate the EMA weights of the checkpoint')
    group.add_argument('--pretrained', action='store_true', help="timm pretrained weights (no --checkpoint)")
    group.add_argument('--num-classes', type=int, default=None, metavar='N',
                       help='classifier size (default: what the sets need, 10 for digits, 1000 for ImageNet)')
    group.add_argument('--model-kwargs', nargs='*', default=None, metavar='KEY=VALUE',
                       help='extra timm.create_model kwargs, e.g. drop_rate=0.0')
    group.add_argument('--img-size', type=int, default=None, metavar='N', help='input image size')
    group.add_argument('--input-size', type=int, nargs=3, default=None, metavar=('C', 'H', 'W'),
                       help='input size (overrides --img-size)')
    group.add_argument('--crop-pct', type=float, default=None, metavar='PCT',
                       help='center crop fraction (default: the model\'s; digits: 1.0)')
    group.add_argument('--crop-mode', default=None, metavar='MODE', help='center | squash | border')
    group.add_argument('--interpolation', default='', metavar='NAME', help='resize interpolation (model default)')
    group.add_argument('--mean', type=float, nargs='+', default=None, metavar='MEAN', help='normalisation mean')
    group.add_argument('--std', type=float, nargs='+', default=None, metavar='STD', help='normalisation std')

    group = parser.add_argument_group('Evaluation')
    group.add_argument('-b', '--batch-size', type=int, default=256, metavar='N', help='batch size per process')
    group.add_argument('--amp', action='store_true', help='mixed precision forward passes')
    group.add_argument('--amp-dtype', default='float16', choices=('float16', 'bfloat16'), help='AMP dtype')
    group.add_argument('--channels-last', action='store_true', help='channels-last memory layout')
    group.add_argument('--torchcompile', nargs='?', const='inductor', default=None, metavar='BACKEND',
                       help='torch.compile the model (default backend inductor)')
    group.add_argument('--device', default=None, metavar='DEV', help="'cuda' or 'cpu' (default: cuda if available)")
    group.add_argument('--seed', type=int, default=42, metavar='S', help='seed (digits-C noise, AutoAttack)')
    group.add_argument('--n-bins', type=int, default=15, metavar='N', help='calibration bins (ECE/MCE/diagrams)')
    group.add_argument('--fgsm-eps', type=float, nargs='*', default=[], metavar='EPS',
                       help='FGSM epsilons in 1/255 units, e.g. 0 1 2 4 8 16 (attacks the clean sets)')
    group.add_argument('--fgsm-n', type=int, default=None, metavar='N',
                       help='FGSM on the first N images (by dataset index) only')
    group.add_argument('--autoattack', action='store_true',
                       help='AutoAttack (standard, Linf, eps 4/255) via torchattacks on the clean sets')
    group.add_argument('--autoattack-n', type=int, default=None, metavar='N',
                       help='AutoAttack on the first N images (by dataset index) only')

    group = parser.add_argument_group('Output')
    group.add_argument('--results-file', default='', metavar='FILE',
                       help='write FILE.json and FILE.csv (rows of other models/sets already there are kept; '
                            'rows with identical settings are reused on reruns)')
    group.add_argument('--no-resume', action='store_true', help='recompute rows even if the results file has them')
    group.add_argument('--reliability-dir', default=None, metavar='DIR',
                       help='reliability diagram PNGs (default: <results dir>/reliability; none without a results '
                            'file)')
    group.add_argument('--log-wandb', action='store_true', help='log the results table to Weights & Biases')
    group.add_argument('--wandb-project', default=None, metavar='NAME', help='wandb project')
    group.add_argument('--wandb-tags', nargs='*', default=None, metavar='TAG', help='wandb run tags')
    group.add_argument('--no-progress', action='store_true', help='no tqdm progress bars')
    return config_parser, parser


def parse_args(argv: Optional[Sequence[str]] = None) -> Tuple[argparse.Namespace, str]:
    """Parse the command line (with ``-c/--config`` YAML defaults)."""
    config_parser, parser = create_parser()
    return _parse_config_args(parser, config_parser, argv)


# --------------------------------------------------------------------------------------------------------------------

def _init_device(args):
    import torch
    import torch.distributed as dist
    world = int(os.environ.get('WORLD_SIZE', '1'))
    rank = int(os.environ.get('RANK', '0'))
    local_rank = int(os.environ.get('LOCAL_RANK', '0'))
    device_name = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    if device_name.startswith('cuda') and not torch.cuda.is_available():
        raise ValidateError(f'--device {device_name}: CUDA is not available')
    if world > 1:
        if device_name.startswith('cuda'):
            torch.cuda.set_device(local_rank)
            device = torch.device('cuda', local_rank)
            backend = 'nccl'
        else:
            device = torch.device(device_name)
            backend = 'gloo'
        dist.init_process_group(backend=backend)
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        device = torch.device(device_name)
    return device, rank, world


def _checkpoint_info(path: str) -> Dict[str, Any]:
    """Resolved path, sha256, stored arch and training args of a checkpoint (read once, weights_only)."""
    from dr.checkpoint import load_checkpoint_file, resolve_checkpoint_path
    from dr.io import sha256_file
    resolved = resolve_checkpoint_path(path)
    ckpt = load_checkpoint_file(resolved)
    train_args = ckpt.get('args') if isinstance(ckpt, dict) else None
    if train_args is not None and not isinstance(train_args, dict):
        train_args = vars(train_args)
    return {
        'path': resolved,
        'sha256': sha256_file(resolved),
        'arch': ckpt.get('arch') if isinstance(ckpt, dict) else None,
        'train_args': train_args or {},
    }


def _default_tag(path: str, used: set) -> str:
    from dr.checkpoint import CHECKPOINT_NAMES
    p = os.path.normpath(path)
    if os.path.isdir(p):
        tag = os.path.basename(p)
    elif os.path.basename(p) in CHECKPOINT_NAMES:
        tag = os.path.basename(os.path.dirname(p)) or os.path.basename(p)
    else:
        tag = os.path.basename(p).split('.')[0]
    base, i = tag, 2
    while tag in used:
        tag, i = f'{base}-{i}', i + 1
    used.add(tag)
    return tag


def _plan_sets(args) -> Tuple[List[Tuple[str, str]], List[str]]:
    """[(set name, path)] to evaluate and the names of requested sets that were not found."""
    from dr.data import is_digits
    from dr.evaluate.sets import SET_SPECS, SUITE_ORDER, discover_sets
    if args.sets:
        unknown = [s for s in args.sets if s not in SET_SPECS]
        if unknown:
            raise ValidateError(f'--sets: unknown set(s) {", ".join(unknown)}; known: {", ".join(SET_SPECS)}')
        names = list(dict.fromkeys(args.sets))
    elif args.suite:
        names = list(SUITE_ORDER)
    elif is_digits(args.dataset):
        names = ['digits']
    elif args.data_dir:
        return [('folder', args.data_dir)], []
    else:
        raise ValidateError('Nothing to evaluate: pass --suite ROOT, --sets, --dataset digits or a data DIR')
    plan, missing = [], []
    needs_root = [n for n in names if not SET_SPECS[n].builtin]
    if needs_root and not args.suite:
        raise ValidateError(f'Set(s) {", ".join(needs_root)} are read from disk: pass --suite ROOT')
    found = {}
    if needs_root:
        try:
            found, missing = discover_sets(args.suite, needs_root)
        except FileNotFoundError as e:
            raise ValidateError(str(e)) from None
    for n in names:
        if SET_SPECS[n].builtin:
            plan.append((n, ''))
        elif n in found:
            plan.append((n, found[n]))
    if not plan:
        raise ValidateError(f'None of the requested sets were found under {args.suite}: {", ".join(missing)}')
    return plan, missing


def _generic_parts(args, num_classes_hint: Optional[int]):
    """Parts and class count of a generic dataset (ImageFolder DIR or a timm dataset)."""
    from dr.data import create_dataset, dataset_classes
    from dr.evaluate.sets import EvalPart, IndexedDataset, View, folder_parts
    if not args.dataset:
        parts, classes = folder_parts(args.data_dir, name='folder', skip_bad_images=args.skip_bad_images)
        return parts, len(classes)
    import torch.utils.data as tud
    ds = create_dataset(args.dataset, root=args.data_dir, split=args.split, is_training=False)
    if isinstance(ds, tud.IterableDataset):
        raise ValidateError(f'--dataset {args.dataset}: iterable datasets are not supported by validate.py '
                            f'(use an ImageFolder or a map-style timm dataset)')
    classes = dataset_classes(ds)
    n = len(classes) if classes else num_classes_hint
    if not n:
        raise ValidateError(f'--dataset {args.dataset}: cannot tell the number of classes; pass --num-classes')
    return [EvalPart(args.dataset, IndexedDataset(ds), [View(args.dataset, attack=True)])], n


def _fail_classes(sets_needing: Dict[str, int]) -> str:
    return ', '.join(f'{s} ({n} classes)' for s, n in sets_needing.items())


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Run validate.py with ``argv``; returns the results (what the results file holds).

    Returns:
        ``{'models': {tag: {set: row}}, 'sets': {set: row} (first model), 'missing': [...], 'results_file': path}``.

    Raises:
        SystemExit(2): on bad input (message on stderr naming the file/flag/set at fault), like argparse.
    """
    args, args_text = parse_args(argv)
    try:
        return _run(args, args_text)
    except ValidateError as e:
        _logger.error(str(e))
        print(f'validate.py: error: {e}', file=sys.stderr)
        raise SystemExit(2) from None


def _run(args, args_text: str) -> Dict[str, Any]:
    import contextlib
    import functools

    import numpy as np
    import torch
    from timm.data import resolve_data_config
    from timm.models import create_model
    from timm.utils import setup_default_logging

    from dr.checkpoint import load_model_weights
    from dr.config import save_args_yaml
    from dr.data import DIGITS_DEFAULT_SIZE, DigitsDataset
    from dr.evaluate.attacks import AUTOATTACK_EPS, autoattack_status
    from dr.evaluate.corruptions import IMAGENET_C_CORRUPTIONS, summarize_corruption_errors
    from dr.evaluate.loop import (
        AttackConfig,
        NormalizedModel,
        all_reduce_int,
        create_eval_loader,
        evaluate_part,
        fgsm_column,
        gather_records,
        pooled_calibration,
        summarize_real,
        summarize_records,
    )
    from dr.evaluate.report import (
        config_key,
        format_table,
        headline,
        load_results,
        merge_rows,
        reliability_diagram_from_sums,
        results_paths,
        write_results,
    )
    from dr.evaluate.sets import SET_SPECS, BadImageError, build_parts
    from dr.io import software_versions

    if not logging.getLogger().handlers:  # in-process callers (the demo, tests) keep their logging setup
        setup_default_logging()
    device, rank, world = _init_device(args)
    primary = rank == 0
    if not primary:
        logging.getLogger().setLevel(logging.WARNING)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)

    # ---------------------------------------------------------------- what to evaluate, and with how many classes
    plan, missing = _plan_sets(args)
    if missing:
        _logger.info(f'Sets not found under {args.suite}: {", ".join(missing)}')
    generic_parts, generic_classes = None, None
    if any(name == 'folder' for name, _ in plan):
        try:
            generic_parts, generic_classes = _generic_parts(args, args.num_classes)
        except (ValueError, FileNotFoundError) as e:
            raise ValidateError(str(e)) from None
    needs = {name: (generic_classes if name == 'folder' else SET_SPECS[name].num_classes) for name, _ in plan}
    if len(set(needs.values())) > 1:
        raise ValidateError(f'The selected sets need different class counts: {_fail_classes(needs)}; evaluate them '
                            f'in separate runs')
    num_classes = next(iter(needs.values()))
    if args.num_classes is not None and args.num_classes != num_classes:
        raise ValidateError(f'--num-classes {args.num_classes} does not fit set(s) {_fail_classes(needs)}')
    if args.tags and len(args.tags) != max(1, len(args.checkpoint)):
        raise ValidateError(f'--tags: {len(args.tags)} names for {max(1, len(args.checkpoint))} model(s)')
    if args.fgsm_n is not None and args.fgsm_n < 1 or args.autoattack_n is not None and args.autoattack_n < 1:
        raise ValidateError('--fgsm-n / --autoattack-n must be >= 1')
    if args.model_kwargs:
        try:
            model_kwargs = parse_key_values(args.model_kwargs, '--model-kwargs')
        except ValueError as e:
            raise ValidateError(str(e)) from None
    else:
        model_kwargs = {}

    # ---------------------------------------------------------------- models (class counts checked before any data)
    specs = []
    used_tags: set = set()
    for i, ckpt_path in enumerate(args.checkpoint or [None]):
        info = {'path': '', 'sha256': '', 'arch': None, 'train_args': {}}
        if ckpt_path:
            try:
                info = _checkpoint_info(ckpt_path)
            except FileNotFoundError as e:
                raise ValidateError(str(e)) from None
        arch = args.model or info['arch'] or info['train_args'].get('model')
        if not arch:
            raise ValidateError(f'--model not given and checkpoint {info["path"] or "(none)"} stores no arch')
        if not ckpt_path and not args.pretrained:
            _logger.warning('No --checkpoint and no --pretrained: evaluating randomly initialised weights')
        try:
            model = create_model(arch, pretrained=args.pretrained, num_classes=num_classes, **model_kwargs)
        except RuntimeError as e:  # unknown model name, unavailable pretrained weights, ...
            raise ValidateError(f'Cannot create model {arch!r}: {e}') from None
        if ckpt_path:
            try:
                load_model_weights(model, info['path'], use_ema=args.use_ema)
            except ValueError as e:
                raise ValidateError(f'{e}: set(s) {_fail_classes(needs)} need {num_classes}-class logits '
                                    f'(ImageNet-family sets need ImageNet-1k logits for the A/R masks and the '
                                    f'ObjectNet mapping)') from None
            except (KeyError, RuntimeError) as e:
                raise ValidateError(f'Cannot load {info["path"]} into {arch}: {e}') from None
        elif args.pretrained:
            stored = (getattr(model, 'pretrained_cfg', None) or {}).get('num_classes')
            if stored and stored != num_classes:
                raise ValidateError(f'--pretrained {arch} weights have {stored} classes but set(s) '
                                    f'{_fail_classes(needs)} need {num_classes}')
        tag = (args.tags[i] if args.tags else
               _default_tag(ckpt_path, used_tags) if ckpt_path else f'{arch}{"-pretrained" if args.pretrained else ""}')
        specs.append({'model': model, 'arch': arch, 'info': info, 'tag': tag})

    # ---------------------------------------------------------------- outputs
    results_file = args.results_file
    try:
        existing_doc = load_results(results_file) if results_file else {'meta': {}, 'results': []}
    except ValueError as e:
        raise ValidateError(str(e)) from None
    existing_rows = existing_doc['results']
    reliability_dir = args.reliability_dir
    if reliability_dir is None and results_file:
        reliability_dir = os.path.join(os.path.dirname(os.path.abspath(results_file)), 'reliability')
    if primary and results_file:
        json_path, _ = results_paths(results_file)
        save_args_yaml(args_text, os.path.dirname(os.path.abspath(json_path)),
                       filename=os.path.splitext(os.path.basename(json_path))[0] + '.args.yaml')
    aa_ok, aa_status = autoattack_status() if args.autoattack else (False, '')
    if args.autoattack and not aa_ok:
        _logger.warning(f'AutoAttack {aa_status}; its column says so in the results')
    attack_cfg = AttackConfig(fgsm_eps=list(args.fgsm_eps or []), fgsm_n=args.fgsm_n,
                              autoattack=args.autoattack and aa_ok, autoattack_n=args.autoattack_n, seed=args.seed)
    amp_dtype = torch.bfloat16 if args.amp_dtype == 'bfloat16' else torch.float16
    autocast = (functools.partial(torch.autocast, device_type=device.type, dtype=amp_dtype) if args.amp
                else contextlib.nullcontext)
    meta = existing_doc.get('meta') or {}
    meta.update({
        'software': software_versions(),
        'conventions': {
            'calibration': f'top-1 confidence, {args.n_bins} equal-width bins (lo, hi] (0 in the first, 1.0 in the '
                           f'last), ECE = sum |bin|/N |acc - conf| (Guo et al. 2017); ece/mce columns in percent, '
                           f'nll in nats (mean -log p(target))',
            'accuracy': 'top1/top5 and errors in percent; skipped = unreadable images left out (--skip-bad-images)',
            'fgsm': 'L-inf FGSM in [0,1] pixel space, normalisation inside the model, eps in 1/255 units, one '
                    'gradient of the cross-entropy per image, model in eval mode; attacks the clean sets',
            'autoattack': f'torchattacks AutoAttack standard (APGD-CE, APGD-T, FAB-T, Square), Linf, eps '
                          f'{AUTOATTACK_EPS:g}/255',
            'imagenet-c': 'mCE = mean over the 15 corruptions of (mean top-1 error over severities / AlexNet mean '
                          'error) in percent, AlexNet constants in dr/corruptions.py; c_mean_err = unnormalised mean '
                          'error; c_100_minus_mce as in the DR paper; extras in c_extra_mean_err',
            'sets': {name: SET_SPECS[name].convention for name, _ in plan if name in SET_SPECS},
        },
    })
    if missing:
        meta['missing_sets'] = {'root': args.suite, 'sets': missing}
    new_rows: List[Dict[str, Any]] = []

    def flush():
        if primary and results_file:
            write_results(results_file, merge_rows(existing_rows, new_rows), meta)

    def find_existing(tag: str, set_name: str, key: str) -> Optional[Dict[str, Any]]:
        if args.no_resume:
            return None
        for r in existing_rows:
            if r.get('tag') == tag and r.get('set') == set_name and r.get('config_key') == key:
                return r
        return None

    def diagram(tag: str, row: Dict[str, Any]) -> None:
        if not (primary and reliability_dir and row.get('calibration_bins')):
            return
        b = row['calibration_bins']
        name = f'{tag}_{row["set"]}'.replace('/', '_').replace(os.sep, '_')
        path = os.path.join(reliability_dir, f'{name}.png')
        reliability_diagram_from_sums(b['count'], b['conf_sum'], b['correct_sum'], path,
                                      title=f'{tag} on {row["set"]}: top-1 {row["top1"]:.2f}%')
        row['reliability_png'] = path

    parts_cache: Dict[Tuple[str, int], list] = {}
    digits_cache: Dict[int, Any] = {}

    def parts_for(set_name: str, path: str, digits_size: int):
        key = (set_name, digits_size if set_name.startswith('digits') else 0)
        if key not in parts_cache:
            if set_name == 'folder':
                parts_cache[key] = generic_parts
            else:
                if set_name.startswith('digits') and digits_size not in digits_cache:
                    digits_cache[digits_size] = DigitsDataset('val', img_size=digits_size)
                try:
                    parts_cache[key] = build_parts(set_name, path, skip_bad_images=args.skip_bad_images,
                                                   seed=args.seed, digits_size=digits_size,
                                                   corruptions=args.corruptions,
                                                   digits_val=digits_cache.get(digits_size))
                except (ValueError, FileNotFoundError) as e:
                    raise ValidateError(str(e)) from None
        return parts_cache[key]

    # ---------------------------------------------------------------- evaluate
    for spec in specs:
        model, info, tag = spec['model'], spec['info'], spec['tag']
        targs = info['train_args']
        digits_size = args.digits_size or targs.get('digits_size') or DIGITS_DEFAULT_SIZE
        digits_sets = any(n.startswith('digits') for n, _ in plan)
        cfg_args = {k: getattr(args, k) for k in ('img_size', 'input_size', 'crop_pct', 'crop_mode', 'interpolation',
                                                  'mean', 'std')}
        # defaults from the checkpoint: train.py stores the eval data config it resolved, so validate.py reproduces
        # the training-time evaluation unless flags say otherwise
        train_cfg = targs.get('data_config') or {}
        user_size = cfg_args['img_size'] is not None or cfg_args['input_size'] is not None
        for k in ('input_size', 'img_size', 'mean', 'std', 'interpolation', 'crop_pct', 'crop_mode'):
            if k in ('input_size', 'img_size') and user_size:
                continue
            for source in (train_cfg, targs):
                if cfg_args.get(k) in (None, '') and source.get(k) not in (None, ''):
                    cfg_args[k] = source[k]
        if cfg_args['input_size'] is not None:
            cfg_args['input_size'] = tuple(cfg_args['input_size'])
        if digits_sets:
            if cfg_args['img_size'] is None and cfg_args['input_size'] is None:
                cfg_args['img_size'] = digits_size
            if cfg_args['crop_pct'] is None:
                cfg_args['crop_pct'] = 1.0
        data_config = resolve_data_config(cfg_args, model=model)
        param_count = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
        model.eval().to(device)
        if args.channels_last:
            model.to(memory_format=torch.channels_last)
        net = NormalizedModel(model, data_config['mean'], data_config['std'], channels_last=args.channels_last)
        net.eval().to(device)
        if args.torchcompile:
            net = torch.compile(net, backend=args.torchcompile)
        if primary:
            _logger.info(f'{tag}: {spec["arch"]} ({param_count}M params), data config {data_config}')
        base_row = {
            'model': spec['arch'], 'tag': tag, 'param_count': param_count, 'img_size': data_config['input_size'][-1],
            'crop_pct': data_config['crop_pct'], 'interpolation': data_config['interpolation'],
            'checkpoint': info['path'], 'checkpoint_sha256': info['sha256'], 'use_ema': args.use_ema,
            'amp': args.amp_dtype if args.amp else '',
        }
        key_base = {
            'arch': spec['arch'], 'sha256': info['sha256'], 'pretrained': args.pretrained, 'use_ema': args.use_ema,
            'model_kwargs': model_kwargs, 'data_config': data_config, 'amp': base_row['amp'],
            'fgsm_eps': attack_cfg.fgsm_eps, 'fgsm_n': args.fgsm_n, 'autoattack': args.autoattack,
            'autoattack_n': args.autoattack_n, 'seed': args.seed, 'n_bins': args.n_bins,
            'skip_bad_images': args.skip_bad_images, 'digits_size': digits_size,
        }
        rows_by_set: Dict[str, Dict[str, Any]] = {}
        for set_name, path in plan:
            convention = SET_SPECS[set_name].convention if set_name in SET_SPECS else f'ImageFolder {path}'
            parts = parts_for(set_name, path, digits_size)
            for part in parts:
                key = config_key({**key_base, 'set': set_name, 'part': part.name, 'path': os.path.abspath(path)
                                  if path else ''})
                expected = [v.name for v in part.views] + (['imagenet-real'] if any(v.real for v in part.views)
                                                           else [])
                reused = [find_existing(tag, n, key) for n in expected]
                if all(r is not None for r in reused):
                    if primary:
                        _logger.info(f'{tag} / {part.name}: reusing rows from {results_file}')
                    for r in reused:
                        rows_by_set[r['set']] = r
                        new_rows.append(r)
                    continue
                loader = create_eval_loader(part.dataset, data_config, args.batch_size, args.workers, rank, world,
                                            crop_border_pixels=part.crop_border_pixels,
                                            pin_memory=args.pin_mem and device.type == 'cuda')
                try:
                    records, skipped = evaluate_part(net, part, loader, device, autocast=autocast, attack=attack_cfg,
                                                     progress=primary and not args.no_progress,
                                                     desc=f'{tag} {part.name}')
                except BadImageError as e:
                    raise ValidateError(str(e).strip().splitlines()[-1]) from None
                except RuntimeError as e:  # DataLoader workers re-raise with the worker traceback in the message
                    if 'BadImageError' in str(e) or 'Unreadable image' in str(e):
                        lines = [ln for ln in str(e).splitlines() if 'Unreadable image' in ln]
                        raise ValidateError(lines[-1].split('BadImageError: ')[-1] if lines else str(e)) from None
                    raise
                skipped = all_reduce_int(skipped, device)
                for view in part.views:
                    rec = gather_records(records[view.name], device)
                    summary = summarize_records(rec, args.n_bins, fgsm_eps=attack_cfg.fgsm_eps if view.attack else ())
                    row = {**base_row, 'set': view.name, 'skipped': skipped, 'num_classes': view.num_classes or
                           num_classes, 'corruption': part.corruption or '', 'severity': part.severity or '',
                           'config_key': key, 'convention': convention, **summary}
                    if view.attack and attack_cfg.fgsm_eps:
                        row['fgsm'] = {f'{e:g}': row.get(fgsm_column(e)) for e in attack_cfg.fgsm_eps}
                    if view.attack and args.autoattack:
                        row['autoattack_status'] = aa_status  # 'torchattacks <version>' or 'unavailable: <why>'
                        if not aa_ok:
                            row['autoattack_top1'] = None
                    if part.corruption is None:
                        diagram(tag, row)
                    rows_by_set[row['set']] = row
                    new_rows.append(row)
                    if view.real and part.real_labels is not None:
                        real = {**base_row, 'set': 'imagenet-real', 'skipped': skipped, 'num_classes': num_classes,
                                'config_key': key, 'convention': 'ImageNet val with ReaL labels (timm bundled '
                                'imagenet_real_labels.json); images without ReaL labels left out',
                                **summarize_real(rec, part.real_labels)}
                        rows_by_set['imagenet-real'] = real
                        new_rows.append(real)
                flush()
            if set_name in ('digits-c', 'imagenet-c'):
                row = _corruption_summary(set_name, parts, rows_by_set, base_row, convention, num_classes,
                                          summarize_corruption_errors, pooled_calibration, IMAGENET_C_CORRUPTIONS)
                diagram(tag, row)
                rows_by_set[set_name] = row
                new_rows.append(row)
                flush()
        spec['rows'] = rows_by_set
        if device.type == 'cuda':
            model.cpu()

    # ---------------------------------------------------------------- report
    if primary:
        _print_report(specs, plan, missing, args, attack_cfg, aa_status, format_table, headline, fgsm_column)
        if results_file:
            json_path, csv_path = results_paths(results_file)
            print(f'\nResults: {json_path} and {csv_path}')
        if reliability_dir:
            print(f'Reliability diagrams: {reliability_dir}')
        if args.log_wandb:
            _log_wandb(args, [r for s in specs for r in s['rows'].values()])
    if world > 1:
        import torch.distributed as dist
        dist.barrier()
        dist.destroy_process_group()
    models = {spec['tag']: spec['rows'] for spec in specs}
    return {
        'models': models,
        'sets': specs[0]['rows'],
        'missing': missing,
        'results_file': results_paths(results_file)[0] if results_file else None,
    }


def _corruption_summary(set_name, parts, rows_by_set, base_row, convention, num_classes, summarize, pooled,
                        imagenet_corruptions) -> Dict[str, Any]:
    """The summary row of a -C set from its per-corruption/severity rows."""
    part_rows = [rows_by_set[p.name] for p in parts if p.corruption is not None and p.name in rows_by_set]
    errors: Dict[str, List[float]] = {}
    for r in sorted(part_rows, key=lambda r: (r['corruption'], int(r['severity']))):
        errors.setdefault(r['corruption'], []).append(r['top1_err'] / 100.0)
    clean = rows_by_set.get('digits-c/clean' if set_name == 'digits-c' else 'imagenet')
    clean_err = clean['top1_err'] / 100.0 if clean and clean.get('top1_err') is not None else None
    s = summarize(errors, clean_error=clean_err, imagenet=set_name == 'imagenet-c')
    bench = [r for r in part_rows if set_name == 'digits-c' or r['corruption'] in imagenet_corruptions]
    calib = pooled(bench)
    top5 = [r['top5'] for r in bench if r.get('top5') is not None]
    row = {**base_row, 'set': set_name, 'top1': 100.0 - s['mean_err'], 'top1_err': s['mean_err'],
           'top5': sum(top5) / len(top5) if top5 else float('nan'),
           'count': sum(r['count'] for r in part_rows), 'skipped': sum(r.get('skipped') or 0 for r in part_rows),
           'num_classes': num_classes, 'corruption': 'mean', 'severity': '',
           'c_mean_err': s['mean_err'], 'c_extra_mean_err': s['extra_mean_err'], 'c_mce': s['mce'],
           'c_100_minus_mce': s['100_minus_mce'], 'c_rel_mean_err': s['rel_mean_err'],
           'c_corruptions': sorted(errors), 'config_key': '', 'convention': convention, **calib}
    row['top5_err'] = 100.0 - row['top5']
    return row


def _print_report(specs, plan, missing, args, attack_cfg, aa_status, format_table, headline, fgsm_column) -> None:
    from dr.evaluate.sets import SET_SPECS
    set_names = [n for n, _ in plan]
    shift = [n for n in set_names if n in SET_SPECS and SET_SPECS[n].kind in ('shift', 'corruption')]
    clean = [n for n in set_names if n not in shift]
    headers = ['model'] + [SET_SPECS[n].table_name if n in SET_SPECS else n for n in set_names]
    if shift:
        headers.append('avg')
    if clean:
        headers.append(f'ECE {SET_SPECS[clean[0]].table_name if clean[0] in SET_SPECS else clean[0]}')
    eps = attack_cfg.fgsm_eps
    headers += [f'FGSM {e:g}' for e in eps]
    if args.autoattack:
        headers.append('AutoAttack')
    table = []
    for spec in specs:
        rows = spec['rows']
        vals = [headline(rows[n]) if n in rows else float('nan') for n in set_names]
        line = [spec['tag']] + vals
        if shift:
            sv = [v for v in (headline(rows[n]) for n in shift if n in rows) if v is not None and v == v]
            line.append(sum(sv) / len(sv) if sv else float('nan'))
        attacked = rows.get(clean[0]) if clean else None
        if clean:
            line.append(attacked.get('ece') if attacked else float('nan'))
        line += [attacked.get(fgsm_column(e)) if attacked else float('nan') for e in eps]
        if args.autoattack:
            line.append(attacked.get('autoattack_top1') if attacked and attacked.get('autoattack_top1') is not None
                        else aa_status)
        table.append(line)
    print('\nTop-1 (%) per set (ImageNet-C: 100 - mCE; digits-C: 100 - mean error), avg = mean over the '
          'shift/corruption columns that have a value, ECE (%) and attacked top-1 (%) on the clean set:')
    print(format_table(headers, table))

    detail = []
    for spec in specs:
        for name, r in spec['rows'].items():
            if r.get('corruption') not in ('', None, 'mean'):
                continue
            detail.append([spec['tag'], name, r.get('top1'), r.get('top5'), r.get('ece'), r.get('mce'), r.get('nll'),
                           r.get('count'), r.get('skipped')])
    print('\nPer set: top-1/top-5 (%), ECE/MCE (%), NLL, images, skipped:')
    print(format_table(['model', 'set', 'top1', 'top5', 'ECE', 'MCE', 'NLL', 'count', 'skipped'], detail))

    for spec in specs:
        for c_set in ('digits-c', 'imagenet-c'):
            summary = spec['rows'].get(c_set)
            if not summary:
                continue
            per = {}
            for r in spec['rows'].values():
                if r['set'].startswith(c_set + '/') and r.get('severity') not in ('', None):
                    per.setdefault(r['corruption'], {})[int(r['severity'])] = r['top1_err']
            lines = [[c] + [per[c].get(s, float('nan')) for s in range(1, 6)]
                     + [sum(per[c].values()) / len(per[c])] for c in per]
            print(f'\n{spec["tag"]} {c_set}: top-1 error (%) per corruption and severity; mean error '
                  f'{summary["c_mean_err"]:.2f}' + (f', mCE {summary["c_mce"]:.2f}' if c_set == 'imagenet-c' and
                                                  summary.get('c_mce') == summary.get('c_mce') else '')
                  + (f', mean error - clean error {summary["c_rel_mean_err"]:.2f}'
                     if summary.get('c_rel_mean_err') == summary.get('c_rel_mean_err') else ''))
            print(format_table(['corruption', 's1', 's2', 's3', 's4', 's5', 'mean'], lines))
    if missing:
        folders = {n: ' or '.join(SET_SPECS[n].folders) for n in missing}
        print(f'\nMissing under {args.suite} (not evaluated): '
              + '; '.join(f'{n} ({f})' for n, f in folders.items()))


def _log_wandb(args, rows: List[Dict[str, Any]]) -> None:
    """Log the results table and the headline metrics to one wandb run (offline mode honoured)."""
    from dr.evaluate.report import csv_columns, results_paths
    from dr.wandb_logger import init_wandb
    out_dir = (os.path.dirname(os.path.abspath(results_paths(args.results_file)[0])) if args.results_file
               else os.path.abspath(os.path.join('output', 'validate')))
    os.makedirs(out_dir, exist_ok=True)
    try:
        run = init_wandb(out_dir, args.wandb_project, config=vars(args), name='validate', tags=args.wandb_tags)
    except Exception as e:  # logging must never lose the evaluation that was just written
        _logger.warning(f'--log-wandb: could not start a wandb run ({e}); results are in the results file')
        return
    import wandb
    cols = csv_columns(rows)
    table = wandb.Table(columns=cols, data=[[_wandb_value(r.get(c)) for c in cols] for r in rows])
    metrics = {}
    for r in rows:
        for k in ('top1', 'top5', 'ece', 'mce', 'nll', 'c_mce', 'c_mean_err', 'autoattack_top1'):
            v = r.get(k)
            if isinstance(v, (int, float)) and v == v:
                metrics[f'{r["tag"]}/{r["set"]}/{k}'] = v
    run.log({'results': table, **metrics})
    run.summary.update(metrics)
    run.finish()


def _wandb_value(v: Any) -> Any:
    if isinstance(v, (list, dict)):
        return str(v)
    return v


if __name__ == '__main__':
    main()
