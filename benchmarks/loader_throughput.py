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

``--compare-tar-readers`` instead times the reinforced loader twice over the same shards: with WebDataset's
``tariterators`` (Python's ``tarfile`` in stream mode; ``dr.reinforce.loader.webdataset_tar_members``) and with the
loader's own reader (``dr.reinforce.tar_reader``), both with the per-shard sample-count checks; epochs alternate in
ABBA order and the
ratio is also given as the median of the per-round ratios (with ``-j 0`` also of the process CPU time per sample,
which other jobs on the machine disturb less).

``--compare-checks`` times the reinforced loader with its tamper checks (schema-2 per-sample checksums, duplicate-key
detection) against the same loader with them switched off reading the same images and records written in the
version-1 layout (no checksum members), the same way: the whole cost, reading the extra member included. It also
times the checks alone on the shards' samples (robust to the machine's load).

Examples::

    python benchmarks/loader_throughput.py                          # digits 32 px, batch 64, 2 workers, CPU
    python benchmarks/loader_throughput.py -j 8 --img-size 64 --num-samples 400 --epochs 5
    python benchmarks/loader_throughput.py --compare-tar-readers -j 0 --epochs 8
    python benchmarks/loader_throughput.py --compare-tar-readers -j 0 --digits-size 384 --img-size 224 \
        --image-format jpg --max-images 512                         # ImageNet-like decode cost per sample
    python benchmarks/loader_throughput.py --compare-checks -j 0 --epochs 8
    python benchmarks/loader_throughput.py --remote --aug rrc+ra_re+mix     # local vs S3 vs HTTP on 127.0.0.1

``--remote`` times the reinforced loader over the same shards from a local folder, moto's S3 server and
``http.server`` on loopback (``benchmarks/loader_remote.py``).
"""
import argparse
import io
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import numpy as np
import torch
from timm.data import ImageDataset, create_loader

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dr.data import DigitsDataset  # noqa: E402
from dr.io import atomic_write, sha256_file, software_versions  # noqa: E402
from dr.reinforce.augment import AugmentSpec, create_augment_spec, sample_mix_records, sample_records  # noqa: E402
from dr.reinforce.format import SCHEMA_VERSION, build_shard, encode_records, record_dtype, shard_name  # noqa: E402
from dr.reinforce.loader import (  # noqa: E402
    SampleDecoder,
    _ShardReader,
    check_reinforced,
    create_reinforced_loader,
    webdataset_tar_members,
)
from dr.reinforce.writer import ShardPlan  # noqa: E402

_logger = logging.getLogger('loader_throughput')

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def add_bench_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags the loader benchmarks share (images, fake shards, loader settings, rounds, output)."""
    parser.add_argument('--digits-size', type=int, default=32, help='side of the stored digits images')
    parser.add_argument('--img-size', type=int, default=32, help='student input size of the loaders')
    parser.add_argument('--num-samples', type=int, default=400, help='stored augmentations per image (fake shards)')
    parser.add_argument('--topk', type=int, default=10, help='stored classes per augmentation (fake shards)')
    parser.add_argument('--shard-size', type=int, default=256, help='images per shard (fake shards)')
    parser.add_argument('-b', '--batch-size', type=int, default=64)
    parser.add_argument('-j', '--workers', type=int, default=2)
    parser.add_argument('--epochs', type=int, default=3, help='timed epochs per loader (after one warm-up epoch)')
    parser.add_argument('--shuffle-buffer', type=int, default=1000)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--image-format', default='png', choices=('png', 'jpg'),
                        help='how the images are stored (folder and shards alike)')
    parser.add_argument('--max-images', type=int, default=0, help='only the first N digits (0: all 1438)')
    parser.add_argument('--work-dir', default='', help='where to write the image folder and shards (default: tmp)')
    parser.add_argument('--output', default='', help='JSON result file')
    return parser


def create_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description='Reinforced-shard loader vs timm loader throughput')
    parser.add_argument('--reinforced', default='', help='existing reinforce.py output of the digits (default: write '
                                                         'shards with fake teacher records)')
    add_bench_args(parser)
    parser.add_argument('--compare-checks', action='store_true',
                        help='time the reinforced loader with and without its tamper checks (per-sample checksums '
                             'and duplicate keys)')
    parser.add_argument('--compare-tar-readers', action='store_true',
                        help='time the reinforced loader with WebDataset\'s tar reader vs a hand-written one')
    parser.add_argument('--remote', action='store_true',
                        help='time the reinforced loader over the same shards from a local folder, an S3 server and '
                             'an HTTP server on 127.0.0.1 (benchmarks/loader_remote.py)')
    parser.add_argument('--aug', default='rrc+ra_re', choices=('rrc', 'rrc+ra_re', 'rrc+mix', 'rrc+ra_re+mix'),
                        help='augmentation of the fake shards, with --remote (+mix: partner reads)')
    return parser


# ----------------------------------------------------------------------------------------------------------------

class BenchImages:
    """The first ``max_images`` digits train images at ``size`` px, encoded as PNG (lossless) or JPEG (quality 90)."""

    def __init__(self, size: int, fmt: str = 'png', max_images: int = 0):
        self.ds = DigitsDataset('train', img_size=size)
        self.size, self.ext = size, fmt
        self.classes = self.ds.classes
        self.n = min(max_images, len(self.ds)) if max_images > 0 else len(self.ds)

    def __len__(self) -> int:
        return self.n

    def encoded(self, i: int) -> bytes:
        if self.ext == 'png':
            return self.ds.image_bytes(i)
        buf = io.BytesIO()
        self.ds.image(i).save(buf, format='JPEG', quality=90)
        return buf.getvalue()

    def label(self, i: int) -> int:
        return int(self.ds.targets[i])

    def key(self, i: int) -> str:
        return self.ds.key(i)


def write_image_folder(images: BenchImages, root: str) -> str:
    """The images as files in an ImageFolder layout (``root/<class>/<key>.<ext>``)."""
    for i in range(len(images)):
        folder = os.path.join(root, images.classes[images.label(i)])
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f'{images.key(i)}.{images.ext}'), 'wb') as f:
            f.write(images.encoded(i))
    return root


def write_fake_shards(images: BenchImages, out_dir: str, num_samples: int, topk: int, shard_size: int,
                      seed: int, schema: int = SCHEMA_VERSION, aug: str = 'rrc+ra_re', mix_group: int = 8) -> str:
    """Shards in the reinforce.py format with real augmentation parameters and random teacher top-k records
    (``schema=1``: the version-1 layout, without the per-sample checksum members; ``+mix`` augmentations: partners
    within groups of ``mix_group`` images of a shard, as reinforce.py draws them)."""
    os.makedirs(out_dir, exist_ok=True)
    spec = create_augment_spec(aug, **({'mix_group': mix_group} if aug.endswith('+mix') else {}))
    num_classes = len(images.classes)
    dtype = record_dtype(topk, num_classes, spec.name)
    rng = np.random.default_rng(seed)
    plan = ShardPlan(np.arange(len(images)), shard_size)
    shards = []
    for s, start in enumerate(range(0, len(images), shard_size)):
        samples = []
        image_bytes = 0
        for i in range(start, min(start + shard_size, len(images))):
            rec = sample_records(rng, images.size, images.size, spec, num_samples, dtype)
            if spec.has_mix:
                mates = plan.mix_partners(i, spec.mix_group)
                sample_mix_records(rng, rec, mates, [(images.size, images.size)] * len(mates), spec)
            logits = rng.normal(size=(num_samples, num_classes))
            logits[:, images.label(i)] += 4.0
            probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
            order = np.argsort(-probs, axis=1)[:, :topk]
            rec['ids'] = order
            rec['probs'] = np.take_along_axis(probs, order, axis=1).astype(np.float16)
            data = images.encoded(i)
            image_bytes += len(data)
            samples.append({'key': images.key(i), 'image_ext': images.ext, 'image': data, 'label': images.label(i),
                            'records': encode_records(rec), 'index': i})
        path = os.path.join(out_dir, shard_name(s))
        with atomic_write(path) as f:
            f.write(build_shard(samples, shard=shard_name(s) if schema >= 2 else None))
        shards.append({'name': shard_name(s), 'count': len(samples), 'sha256': sha256_file(path),
                       'bytes': os.path.getsize(path), 'image_bytes': image_bytes})
    meta = {
        'schema_version': schema,
        'teachers': [{'name': 'fake', 'weights': 'random top-k (benchmark)', 'mean': list(MEAN), 'std': list(STD),
                      'input_size': [3, images.size, images.size], 'interpolation': 'bilinear'}],
        'augmentation': spec.to_dict(), 'topk': topk, 'num_samples': num_samples, 'num_classes': num_classes,
        'class_names': list(images.classes), 'seed': seed,
        'dataset': {'name': 'digits', 'root': None, 'split': 'train'},
        'num_images': len(images), 'shards': shards, 'versions': software_versions(),
    }
    with atomic_write(os.path.join(out_dir, 'reinforce.json'), 'w') as f:
        json.dump(meta, f, indent=1)
    return out_dir


def timed_epoch(loader: Iterable, set_epoch: Any, epoch: int, consume: Optional[Callable[[Any], None]] = None,
                finish: Optional[Callable[[], None]] = None) -> Dict[str, float]:
    """One epoch of ``loader``; ``consume(batch)`` (e.g. a training step) runs on every batch and ``finish()`` (e.g.
    a device sync) after the last one, inside the timing."""
    if set_epoch is not None:
        set_epoch(epoch)
    n = 0
    t0, c0 = time.perf_counter(), time.process_time()
    for batch in loader:
        if consume is not None:
            consume(batch)
        n += int(batch[0].shape[0])
    if finish is not None:
        finish()
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {'samples': n, 'seconds': dt, 'samples_per_s': n / dt, 'cpu_seconds': cpu}


def run_rounds(loaders: Dict[str, Tuple[Iterable, Any]], epochs: int, consume: Optional[Callable[[Any], None]] = None,
               finish: Optional[Callable[[], None]] = None) -> Dict[str, List[Dict[str, float]]]:
    """One untimed warm-up epoch per loader, then ``epochs`` timed rounds, the loaders' order alternating (ABBA);
    ``consume`` and ``finish`` are passed to :func:`timed_epoch`."""
    runs: Dict[str, List[Dict[str, float]]] = {k: [] for k in loaders}
    names = list(loaders)
    for epoch in range(epochs + 1):
        for name in (names if epoch % 2 == 0 else names[::-1]):
            loader, set_epoch = loaders[name]
            r = timed_epoch(loader, set_epoch, epoch, consume, finish)
            tag = 'warm-up' if epoch == 0 else f'epoch {epoch}'
            _logger.info(f'{tag:>8} {name:>10}: {r["samples"]} samples in {r["seconds"]:.2f} s = '
                         f'{r["samples_per_s"]:.0f} samples/s (process CPU {r["cpu_seconds"]:.2f} s)')
            if epoch > 0:
                runs[name].append(r)
    return runs


def summarise(runs: Dict[str, List[Dict[str, float]]], baseline: str, candidate: str) -> Dict[str, Any]:
    """Samples/s per loader and the candidate / baseline ratios: of the totals and the median of per-round ratios."""
    summary: Dict[str, Any] = {}
    for name, rs in runs.items():
        summary[name] = {'samples_per_s': sum(r['samples'] for r in rs) / sum(r['seconds'] for r in rs),
                         'median_samples_per_s': statistics.median(r['samples_per_s'] for r in rs)}
    pairs = list(zip(runs[baseline], runs[candidate]))
    summary['ratio'] = summary[candidate]['samples_per_s'] / summary[baseline]['samples_per_s']
    summary['paired_median_ratio'] = statistics.median(c['samples_per_s'] / b['samples_per_s'] for b, c in pairs)
    # per-sample CPU time of the main process (meaningful with -j 0, where it does all the work)
    summary['cpu_ratio'] = statistics.median((b['cpu_seconds'] / b['samples']) / (c['cpu_seconds'] / c['samples'])
                                             for b, c in pairs)
    return summary


def checks_alone(meta: Dict[str, Any], repeats: int = 5) -> float:
    """Seconds per sample of the tamper checks alone (checksum + duplicate-key lookup) on the shards' samples, the
    best of ``repeats`` passes: the loader's cost of them, free of the run-to-run noise of whole epochs."""
    decoder = SampleDecoder(meta)
    samples = []
    counts = {str(e['name']): int(e['count']) for e in meta['shards']}
    for url in meta['_urls']:
        count = counts[os.path.basename(url)]
        samples += list(_ShardReader(url).samples(0, count, count))
    best = float('inf')
    for _ in range(repeats):
        seen: Dict[Any, Any] = {}
        t0 = time.process_time()
        for sample in samples:
            decoder.check_sum(sample)
            key = (sample['__key__'], 0)
            if key in seen:
                raise RuntimeError(f'duplicate key {key}')
            seen[key] = sample['__url__']
        best = min(best, (time.process_time() - t0) / len(samples))
    return best


def build_timm_loader(folder: str, num_images: int, spec: AugmentSpec, args,
                      device: str = 'cpu') -> Tuple[Any, str]:
    """timm's loader over the image folder with the shards' augmentation family; (loader, auto_augment string).
    On a CUDA ``device`` it is timm's standard fast path: pinned uint8 batches, normalised and erased on the device
    by timm's prefetcher."""
    timm_ds = ImageDataset(folder)
    if len(timm_ds) != num_images:
        raise RuntimeError(f'image folder {folder} holds {len(timm_ds)} images, expected {num_images}')
    # timm does the same augmentation family the shards store (rrc+ra_re: RRC, flip, RandAugment n2 m9, RE 0.25)
    auto_augment = f'rand-m{spec.ra_magnitude}-n{spec.ra_num_ops}-mstd0' if spec.ra_num_ops else None
    loader = create_loader(
        timm_ds, input_size=(3, args.img_size, args.img_size), batch_size=args.batch_size, is_training=True,
        scale=tuple(spec.scale), ratio=tuple(spec.ratio), hflip=spec.hflip, color_jitter=0.0,
        auto_augment=auto_augment, re_prob=spec.re_prob, re_mode='const', interpolation='bilinear', mean=MEAN,
        std=STD, num_workers=args.workers, use_prefetcher=torch.device(device).type == 'cuda',
        device=torch.device(device), pin_memory=torch.device(device).type == 'cuda',
        persistent_workers=args.workers > 0)
    return loader, auto_augment


def build_rd_loader(rd_dir: str, meta: Dict[str, Any], num_classes: int, args, device: str = 'cpu',
                    replay_device: Optional[str] = None, **variant) -> Any:
    """The reinforced loader as train.py builds it (batches moved to ``device``, pinned on CUDA; ``replay_device``:
    ``train.py --replay-device``); ``variant`` sets attributes of its dataset (``tar_members``,
    ``integrity_checks``: the benchmark switches)."""
    loader = create_reinforced_loader(
        rd_dir, meta, batch_size=args.batch_size, num_workers=args.workers,
        input_size=(3, args.img_size, args.img_size), mean=MEAN, std=STD, interpolation='bilinear', rd_p=1.0,
        rd_densify='smooth', fallback_transform=None, num_classes=num_classes, seed=args.seed, rank=0,
        world_size=1, shuffle_buffer=args.shuffle_buffer, device=device,
        pin_memory=torch.device(device).type == 'cuda', replay_device=replay_device)
    for k, v in variant.items():
        setattr(loader.dataset, k, v)
    return loader


def main(argv: List[str] = None) -> Dict[str, Any]:
    parser = create_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    if args.aug != 'rrc+ra_re' and not args.remote:
        parser.error('--aug is a --remote setting (the timm comparison uses rrc+ra_re)')
    if args.remote:
        if args.reinforced or args.compare_checks or args.compare_tar_readers:
            parser.error('--remote writes its own shards and compares stores: not with --reinforced or --compare-*')
        from loader_remote import run_remote
        return run_remote(args)
    images = BenchImages(args.digits_size, args.image_format, args.max_images)
    num_classes = len(images.classes)
    work = args.work_dir or tempfile.mkdtemp(prefix='loader_throughput_')
    rd_dir = args.reinforced or write_fake_shards(images, os.path.join(work, 'shards'), args.num_samples, args.topk,
                                                  args.shard_size, args.seed)
    meta = check_reinforced(rd_dir, num_classes)
    spec = AugmentSpec.from_dict(meta['augmentation'])
    setting = (f'{meta["num_images"]} images ({args.image_format}, {args.digits_size} px) at {args.img_size} px, '
               f'batch {args.batch_size}, workers {args.workers}, stored augmentations {meta["num_samples"]} x '
               f'top-{meta["topk"]}')
    if args.compare_checks:
        # baseline: the same images and records in the version-1 layout (no checksum members), checks off
        v1_dir = write_fake_shards(images, os.path.join(work, 'shards_v1'), args.num_samples, args.topk,
                                   args.shard_size, args.seed, schema=1)
        v1_meta = check_reinforced(v1_dir, num_classes)
        baseline, candidate, target = 'unchecked', 'checked', '>= 0.98 (the checks cost <= 2%)'
        loaders = {baseline: build_rd_loader(v1_dir, v1_meta, num_classes, args, integrity_checks=False),
                   candidate: build_rd_loader(rd_dir, meta, num_classes, args)}
        loaders = {k: (v, v.set_epoch) for k, v in loaders.items()}
    elif args.compare_tar_readers:
        baseline, candidate, target = 'webdataset', 'dr', '>= 1.10 justifies dr.reinforce.tar_reader'
        loaders = {baseline: build_rd_loader(rd_dir, meta, num_classes, args, tar_members=webdataset_tar_members),
                   candidate: build_rd_loader(rd_dir, meta, num_classes, args)}
        loaders = {k: (v, v.set_epoch) for k, v in loaders.items()}
    else:
        baseline, candidate, target = 'timm', 'reinforced', '>= 1.0'
        timm_loader, auto_augment = build_timm_loader(
            write_image_folder(images, os.path.join(work, 'images')), meta['num_images'], spec, args)
        rd_loader = build_rd_loader(rd_dir, meta, num_classes, args)
        loaders = {baseline: (timm_loader, getattr(timm_loader.sampler, 'set_epoch', None)),
                   candidate: (rd_loader, rd_loader.set_epoch)}
        setting += f', augmentation {spec.name} (timm: auto_augment={auto_augment}, re_prob={spec.re_prob})'
    runs = run_rounds(loaders, args.epochs)
    summary = summarise(runs, baseline, candidate)
    if args.compare_checks:
        alone = checks_alone(meta)
        loader_cpu = statistics.median(r['cpu_seconds'] / r['samples'] for r in runs[baseline])
        summary['checks_alone_us_per_sample'] = alone * 1e6
        summary['loader_cpu_us_per_sample'] = loader_cpu * 1e6
        summary['checks_share_of_loader_cpu'] = alone / loader_cpu
    result = {
        'config': dict(vars(args)), 'setting': setting, 'num_images': meta['num_images'],
        'shard_bytes': sum(s['bytes'] for s in meta['shards']),
        'device': 'cpu', 'cpu_count': os.cpu_count(), 'torch_threads': torch.get_num_threads(),
        'summary': summary, f'ratio_{candidate}_over_{baseline}': summary['ratio'], 'runs': runs,
        'versions': software_versions(),
    }
    print(f'\n{setting}')
    for name in (baseline, candidate):
        print(f'{name:>10}: {summary[name]["samples_per_s"]:8.0f} samples/s '
              f'(median epoch {summary[name]["median_samples_per_s"]:.0f})')
    print(f'ratio {candidate} / {baseline}: {summary["ratio"]:.3f} (paired median {summary["paired_median_ratio"]:.3f}'
          + (f', per-sample CPU time {summary["cpu_ratio"]:.3f}' if args.workers == 0 else '')
          + f'; target {target})')
    if args.compare_checks:
        print(f'checks alone: {summary["checks_alone_us_per_sample"]:.1f} us per sample'
              + (f' = {100 * summary["checks_share_of_loader_cpu"]:.2f}% of the loader\'s '
                 f'{summary["loader_cpu_us_per_sample"]:.0f} us CPU per sample' if args.workers == 0 else ''))
    if args.output:
        with atomic_write(args.output, 'w') as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == '__main__':
    main()
