#!/usr/bin/env python3
"""Training-loader throughput: reinforced shards vs timm's standard loader, measured side by side in one run.

Both loaders produce the same kind of batch from the same images with the same work per sample:
random-resized crop + flip + RandAugment (2 ops, magnitude 9) + random erasing (p=0.25) at the same input size,
batch size and worker count.

* ``reinforced``: ``dr.reinforce.create_reinforced_loader`` over tar shards (original PNG bytes + stored records);
  each sample decodes its image and records, replays one stored augmentation and densifies its top-k target.
* ``timm``: ``timm.data.create_loader`` over the same images as an ImageFolder of PNG files with the shards'
  augmentation family: ``auto_augment='rand-m9-n2-mstd0'``, ``re_prob=0.25``, ``re_mode='const'`` for
  ``rrc+ra_re`` (RRC + flip only for ``rrc``); its random draws happen per sample.

Epochs alternate (timm, reinforced, timm, ...) after one untimed warm-up epoch each, so drifting machine load hits
both alike. Prints samples/s for each and the ratio reinforced / timm (target >= 1.0), and writes JSON with --output.

The shards are written here from the embedded digits with fake teacher records of the requested size
(``--num-samples``/``--topk``; record bytes, not their values, matter for speed) unless ``--reinforced`` names a
``reinforce.py`` output of the digits (then ``--digits-size`` must match it).

Examples::

    python benchmarks/loader_throughput.py                          # digits 32 px, batch 64, 2 workers, CPU
    python benchmarks/loader_throughput.py -j 8 --img-size 64 --num-samples 400 --epochs 5
"""
import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Dict, Iterable, List

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dr.data import DigitsDataset  # noqa: E402
from dr.io import atomic_write, sha256_file, software_versions  # noqa: E402
from dr.reinforce.augment import AugmentSpec, create_augment_spec, sample_records  # noqa: E402
from dr.reinforce.format import SCHEMA_VERSION, build_shard, encode_records, record_dtype, shard_name  # noqa: E402
from dr.reinforce.loader import check_reinforced, create_reinforced_loader  # noqa: E402

_logger = logging.getLogger('loader_throughput')

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def create_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description='Reinforced-shard loader vs timm loader throughput')
    parser.add_argument('--reinforced', default='', help='existing reinforce.py output of the digits (default: write '
                                                         'shards with fake teacher records)')
    parser.add_argument('--digits-size', type=int, default=32, help='side of the stored digits images')
    parser.add_argument('--img-size', type=int, default=32, help='student input size of both loaders')
    parser.add_argument('--num-samples', type=int, default=400, help='stored augmentations per image (fake shards)')
    parser.add_argument('--topk', type=int, default=10, help='stored classes per augmentation (fake shards)')
    parser.add_argument('--shard-size', type=int, default=256, help='images per shard (fake shards)')
    parser.add_argument('-b', '--batch-size', type=int, default=64)
    parser.add_argument('-j', '--workers', type=int, default=2)
    parser.add_argument('--epochs', type=int, default=3, help='timed epochs per loader (after one warm-up epoch)')
    parser.add_argument('--shuffle-buffer', type=int, default=1000)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--work-dir', default='', help='where to write the image folder and shards (default: tmp)')
    parser.add_argument('--output', default='', help='JSON result file')
    return parser


def write_image_folder(ds: DigitsDataset, root: str) -> str:
    """The digits as PNG files in an ImageFolder layout (``root/<class>/<key>.png``)."""
    for i in range(len(ds)):
        folder = os.path.join(root, ds.classes[ds.targets[i]])
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, ds.key(i) + '.png'), 'wb') as f:
            f.write(ds.image_bytes(i))
    return root


def write_fake_shards(ds: DigitsDataset, out_dir: str, num_samples: int, topk: int, shard_size: int,
                      seed: int) -> str:
    """Shards in the reinforce.py format with real augmentation parameters and random teacher top-k records."""
    os.makedirs(out_dir, exist_ok=True)
    spec = create_augment_spec('rrc+ra_re')
    num_classes = len(ds.classes)
    dtype = record_dtype(topk, num_classes, spec.name)
    rng = np.random.default_rng(seed)
    shards = []
    for s, start in enumerate(range(0, len(ds), shard_size)):
        samples = []
        image_bytes = 0
        for i in range(start, min(start + shard_size, len(ds))):
            img = ds.image(i)
            rec = sample_records(rng, img.width, img.height, spec, num_samples, dtype)
            logits = rng.normal(size=(num_samples, num_classes))
            logits[:, ds.targets[i]] += 4.0
            probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
            order = np.argsort(-probs, axis=1)[:, :topk]
            rec['ids'] = order
            rec['probs'] = np.take_along_axis(probs, order, axis=1).astype(np.float16)
            data = ds.image_bytes(i)
            image_bytes += len(data)
            samples.append({'key': ds.key(i), 'image_ext': 'png', 'image': data, 'label': ds.targets[i],
                            'records': encode_records(rec)})
        path = os.path.join(out_dir, shard_name(s))
        with atomic_write(path) as f:
            f.write(build_shard(samples))
        shards.append({'name': shard_name(s), 'count': len(samples), 'sha256': sha256_file(path),
                       'bytes': os.path.getsize(path), 'image_bytes': image_bytes})
    meta = {
        'schema_version': SCHEMA_VERSION,
        'teachers': [{'name': 'fake', 'weights': 'random top-k (benchmark)', 'mean': list(MEAN), 'std': list(STD),
                      'input_size': [3, ds.img_size, ds.img_size], 'interpolation': 'bilinear'}],
        'augmentation': spec.to_dict(), 'topk': topk, 'num_samples': num_samples, 'num_classes': num_classes,
        'class_names': list(ds.classes), 'seed': seed, 'dataset': {'name': 'digits', 'root': None, 'split': 'train'},
        'num_images': len(ds), 'shards': shards, 'versions': software_versions(),
    }
    with atomic_write(os.path.join(out_dir, 'reinforce.json'), 'w') as f:
        json.dump(meta, f, indent=1)
    return out_dir


def timed_epoch(loader: Iterable, set_epoch: Any, epoch: int) -> Dict[str, float]:
    if set_epoch is not None:
        set_epoch(epoch)
    n = 0
    t0 = time.perf_counter()
    for batch in loader:
        n += int(batch[0].shape[0])
    dt = time.perf_counter() - t0
    return {'samples': n, 'seconds': dt, 'samples_per_s': n / dt}


def main(argv: List[str] = None) -> Dict[str, Any]:
    args = create_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    from timm.data import ImageDataset, create_loader

    ds = DigitsDataset('train', img_size=args.digits_size)
    work = args.work_dir or tempfile.mkdtemp(prefix='loader_throughput_')
    folder = write_image_folder(ds, os.path.join(work, 'images'))
    rd_dir = args.reinforced or write_fake_shards(ds, os.path.join(work, 'shards'), args.num_samples, args.topk,
                                                  args.shard_size, args.seed)
    meta = check_reinforced(rd_dir, len(ds.classes))
    input_size = (3, args.img_size, args.img_size)

    rd_loader = create_reinforced_loader(
        rd_dir, meta, batch_size=args.batch_size, num_workers=args.workers, input_size=input_size, mean=MEAN,
        std=STD, interpolation='bilinear', rd_p=1.0, rd_densify='smooth', fallback_transform=None,
        num_classes=len(ds.classes), seed=args.seed, rank=0, world_size=1, shuffle_buffer=args.shuffle_buffer,
        device='cpu', pin_memory=False)
    timm_ds = ImageDataset(folder)
    if len(timm_ds) != len(ds):
        raise RuntimeError(f'image folder {folder} holds {len(timm_ds)} images, expected {len(ds)}')
    # timm does the same augmentation family the shards store (rrc+ra_re: RRC, flip, RandAugment n2 m9, RE 0.25)
    spec = AugmentSpec.from_dict(meta['augmentation'])
    auto_augment = f'rand-m{spec.ra_magnitude}-n{spec.ra_num_ops}-mstd0' if spec.ra_num_ops else None
    timm_loader = create_loader(
        timm_ds, input_size=input_size, batch_size=args.batch_size, is_training=True, scale=tuple(spec.scale),
        ratio=tuple(spec.ratio), hflip=spec.hflip, color_jitter=0.0, auto_augment=auto_augment,
        re_prob=spec.re_prob, re_mode='const', interpolation='bilinear', mean=MEAN, std=STD,
        num_workers=args.workers, use_prefetcher=False, device=torch.device('cpu'),
        persistent_workers=args.workers > 0)
    loaders = {'timm': (timm_loader, getattr(timm_loader.sampler, 'set_epoch', None)),
               'reinforced': (rd_loader, rd_loader.set_epoch)}
    runs: Dict[str, List[Dict[str, float]]] = {k: [] for k in loaders}
    for epoch in range(args.epochs + 1):
        for name, (loader, set_epoch) in loaders.items():
            r = timed_epoch(loader, set_epoch, epoch)
            tag = 'warm-up' if epoch == 0 else f'epoch {epoch}'
            _logger.info(f'{tag:>8} {name:>10}: {r["samples"]} samples in {r["seconds"]:.2f} s = '
                         f'{r["samples_per_s"]:.0f} samples/s')
            if epoch > 0:
                runs[name].append(r)
    summary = {}
    for name, rs in runs.items():
        total_n = sum(r['samples'] for r in rs)
        total_t = sum(r['seconds'] for r in rs)
        summary[name] = {'samples_per_s': total_n / total_t,
                         'median_samples_per_s': statistics.median(r['samples_per_s'] for r in rs)}
    ratio = summary['reinforced']['samples_per_s'] / summary['timm']['samples_per_s']
    result = {
        'config': {k: v for k, v in vars(args).items()},
        'num_images': len(ds),
        'shard_bytes': sum(s['bytes'] for s in meta['shards']),
        'device': 'cpu', 'cpu_count': os.cpu_count(), 'torch_threads': torch.get_num_threads(),
        'summary': summary, 'ratio_reinforced_over_timm': ratio, 'runs': runs, 'versions': software_versions(),
    }
    print(f'\nimages {len(ds)} at {args.img_size}px, batch {args.batch_size}, workers {args.workers}, '
          f'augmentation {spec.name} (timm: auto_augment={auto_augment}, re_prob={spec.re_prob}), '
          f'stored augmentations {meta["num_samples"]} x top-{meta["topk"]}')
    for name in ('timm', 'reinforced'):
        print(f'{name:>10}: {summary[name]["samples_per_s"]:8.0f} samples/s '
              f'(median epoch {summary[name]["median_samples_per_s"]:.0f})')
    print(f'ratio reinforced / timm: {ratio:.2f} (target >= 1.0)')
    if args.output:
        with atomic_write(args.output, 'w') as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == '__main__':
    main()
