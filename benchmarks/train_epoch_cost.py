#!/usr/bin/env python3
"""End-to-end cost of a reinforced training epoch vs a plain one, measured side by side in one run.

Both runs are built by ``train.py``'s own setup code (``parse_args`` -> data -> model -> task/optimizer -> loaders ->
schedule; no outputs are written) and trained with ``train.train_one_epoch``, so the timed work is exactly what a
``train.py`` epoch does: loading, augmentation, forward, loss, backward and optimizer step. Same student, batch,
workers, images and augmentation family:

* ``plain``: the images through timm's train transform (``--scale/--hflip``, plus ``--aa rand-m9-n2-mstd0
  --reprob 0.25 --remode const`` for ``rrc+ra_re``, plus timm's Mixup/CutMix (``--mixup 1 --cutmix 1``) for
  ``rrc+mix``), hard labels (timm's ``SoftTargetCrossEntropy`` under mixing);
* ``reinforced``: ``--reinforced`` shards of the same images written here by ``reinforce.py``'s library code with a
  random-weight teacher (values do not matter for speed, their bytes do), the stored augmentation replayed per
  sample, KL to the stored top-k.

Two data sizes (``--data``): ``digits`` (the embedded digits at 32 px, PNG originals in the shards, the demo's data)
and ``photos`` (``--num-photos`` ImageNet-like 375x500 JPEGs with texture generated in the run, an ImageFolder for
plain and the same JPEG bytes in the shards, trained at 224 px).

Epochs alternate (plain, reinforced, plain, ...) after one untimed warm-up epoch each; every round gives a paired
ratio reinforced / plain of the wall time and of the process CPU time per epoch, per step and per image (the
reinforced loader pads its last batch to full size, timm's drops the partial one, so an epoch can differ by one
step). Prints the median and the spread of the paired ratios and the share of each epoch spent waiting for data, and
writes JSON with ``--output``.

``--profile`` runs one more epoch of each under cProfile and prints where the time goes (top functions by own time).
``--replay-device cpu`` adds a third run: the reinforced shards replayed by the batched tensor path
(``dr.reinforce.device_replay``) instead of the PIL path in the workers.

Examples::

    python benchmarks/train_epoch_cost.py                                  # digits 32 px, rrc rrc+ra_re rrc+mix
    python benchmarks/train_epoch_cost.py --data photos --model test_resnet --epochs 3
    python benchmarks/train_epoch_cost.py --data digits --aug rrc --profile
    python benchmarks/train_epoch_cost.py --data photos --replay-device cpu -j 2
"""
import argparse
import contextlib
import cProfile
import io
import json
import logging
import os
import pstats
import statistics
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import reinforce  # noqa: E402
import train  # noqa: E402
from dr.io import atomic_write, software_versions  # noqa: E402

_logger = logging.getLogger('train_epoch_cost')

AUGS = ('rrc', 'rrc+ra_re', 'rrc+mix')
PLAIN_AUG_FLAGS = {  # timm's train transform / Mixup of the same family as each stored augmentation
    'rrc': [],
    'rrc+ra_re': ['--aa', 'rand-m9-n2-mstd0', '--reprob', '0.25', '--remode', 'const'],
    'rrc+mix': ['--mixup', '1.0', '--cutmix', '1.0'],
    'rrc+ra_re+mix': ['--aa', 'rand-m9-n2-mstd0', '--reprob', '0.25', '--remode', 'const', '--mixup', '1.0',
                      '--cutmix', '1.0'],
}


def create_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description='Reinforced training epoch / plain training epoch, side by side')
    parser.add_argument('--data', nargs='+', default=['digits'], choices=('digits', 'photos'),
                        help='data sizes: the 32 px digits and/or generated 375x500 JPEGs trained at 224 px')
    parser.add_argument('--aug', nargs='+', default=list(AUGS), choices=tuple(PLAIN_AUG_FLAGS),
                        help='stored augmentation families (and the matching plain timm augmentation)')
    parser.add_argument('--model', default='test_resnet', help='student (a timm model name)')
    parser.add_argument('-b', '--batch-size', type=int, default=64)
    parser.add_argument('-j', '--workers', type=int, default=0, help='loader workers of both runs')
    parser.add_argument('--epochs', type=int, default=3, help='timed epochs per run (after one warm-up epoch)')
    parser.add_argument('--num-samples', type=int, default=24, help='stored augmentations per image')
    parser.add_argument('--topk', type=int, default=5, help='stored classes per augmentation')
    parser.add_argument('--num-photos', type=int, default=320, help='generated JPEGs (photos data)')
    parser.add_argument('--photo-classes', type=int, default=8, help='classes of the generated JPEGs')
    parser.add_argument('--photo-size', type=int, default=224, help='student input size on the photos')
    parser.add_argument('--scale', type=float, nargs=2, default=[0.35, 1.0], help='RRC scale (both runs)')
    parser.add_argument('--hflip', type=float, default=0.5, help='flip probability (both runs)')
    parser.add_argument('--replay-device', default='', choices=('', 'cpu', 'cuda'),
                        help='also time the reinforced run replayed on this device (batched tensor path)')
    parser.add_argument('--device', default='cpu', help='training device of every run')
    parser.add_argument('--profile', action='store_true', help='profile one extra epoch of each run (cProfile)')
    parser.add_argument('--profile-top', type=int, default=25, help='functions listed per profile')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--work-dir', default='', help='where images and shards go (default: a temporary folder)')
    parser.add_argument('--output', default='', help='JSON result file')
    return parser


# ----------------------------------------------------------------------------------------------------------------
# data


def write_photos(folder: str, num_images: int, num_classes: int, seed: int = 0) -> str:
    """An ImageFolder of ImageNet-like 375x500 JPEGs (quality 90) with texture: a per-class colour, smooth
    gradients, random blobs and pixel noise, so JPEG decode and resampling cost what real photographs cost."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:375, 0:500].astype(np.float32)
    for i in range(num_images):
        c = i % num_classes
        os.makedirs(os.path.join(folder, f'class{c:02d}'), exist_ok=True)
        path = os.path.join(folder, f'class{c:02d}', f'img{i:05d}.jpg')
        if os.path.exists(path):
            continue
        base = np.array([(37 * c) % 256, (91 * c + 40) % 256, (143 * c + 80) % 256], dtype=np.float32)
        fx, fy = rng.uniform(0.005, 0.05, size=2)
        wave = 60 * np.sin(fx * xx + rng.uniform(0, 6)) * np.cos(fy * yy + rng.uniform(0, 6))
        img = base[None, None, :] + wave[..., None]
        for _ in range(6):
            cy, cx, r = rng.uniform(0, 375), rng.uniform(0, 500), rng.uniform(20, 90)
            blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
            img += blob[..., None] * rng.uniform(-120, 120, size=3)[None, None, :]
        img += rng.normal(0, 18, size=img.shape)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=90)
    return folder


def reinforce_shards(out: str, aug: str, data: str, photo_dir: str, args: argparse.Namespace) -> str:
    """``reinforce.py`` over the benchmark's images (random-weight ``test_resnet`` teacher, resumes if present)."""
    if os.path.exists(os.path.join(out, 'reinforce.json')):
        return out
    src = ['--dataset', 'digits'] if data == 'digits' else [photo_dir, '--dataset', '']
    argv = [*src, '--teacher', 'test_resnet', '--teacher-img-size', '32' if data == 'digits' else '64',
            '--num-samples', str(args.num_samples), '--topk', str(args.topk), '--aug', aug,
            '--scale', *map(str, args.scale), '--hflip', str(args.hflip), '--shard-size', '256',
            '--batch-size', '256', '--workers', '0', '--seed', str(args.seed), '--no-progress', '--output', out]
    status = reinforce.main(argv)
    if status:
        raise RuntimeError(f'reinforce.py {" ".join(argv)} failed with exit status {status}')
    return out


# ----------------------------------------------------------------------------------------------------------------
# runs


class TimedLoader:
    """Wraps a training loader and adds up the wall time spent waiting for its batches."""

    def __init__(self, loader: Any):
        self.loader = loader
        self.wait = 0.0
        self.batches = 0
        self.images = 0

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def __iter__(self):
        iterator = iter(self.loader)
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                self.wait += time.perf_counter() - t0
                return
            self.wait += time.perf_counter() - t0
            self.batches += 1
            self.images += int(batch[0].shape[0])
            yield batch


class EpochRun:
    """One ``train.py`` configuration set up by train.py's own code, trained one epoch at a time."""

    def __init__(self, name: str, argv: Sequence[str]):
        self.name = name
        self.argv = list(argv)
        args, _ = train.parse_args(self.argv)
        vars(args).pop('_parser')
        train._import_training_libraries()
        t0 = time.perf_counter()
        device = train._setup_process(args)
        rd_meta, train_ds, val_ds = train._prepare_data(args)
        model, data_config = train.create_train_model(args, device)
        run = train._setup_training(args, model, device, rd_meta)
        run.train_loader, _ = train.create_train_eval_loaders(args, train_ds, None, data_config, rd_meta, device)
        train._setup_schedule(args, run)
        self.setup_seconds = time.perf_counter() - t0
        self.args, self.run, self.device = args, run, device
        self.loader = TimedLoader(run.train_loader)
        self.epoch = 0
        self.records: List[Dict[str, float]] = []

    def train_epoch(self, record: bool = True) -> Dict[str, float]:
        args, run = self.args, self.run
        train.seed_everything_for_epoch(args.seed, self.epoch, args.rank)
        self.loader.set_epoch(self.epoch)
        self.loader.wait, self.loader.batches, self.loader.images = 0.0, 0, 0
        t0, c0 = time.perf_counter(), time.process_time()
        train.train_one_epoch(self.epoch, run.task, self.loader, run.optimizer, args, self.device, run.lr_scheduler,
                              run.amp_autocast, run.loss_scaler, run.mixup_fn, None, run.updates_per_epoch)
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        self.epoch += 1
        row = {'wall': wall, 'cpu': cpu, 'steps': self.loader.batches, 'images': self.loader.images,
               'data_wait': self.loader.wait}
        if record:
            self.records.append(row)
        return row


def _quiet() -> contextlib.AbstractContextManager:
    return contextlib.redirect_stdout(io.StringIO())


def common_argv(data: str, photo_dir: str, args: argparse.Namespace) -> List[str]:
    src = ['--dataset', 'digits'] if data == 'digits' else [photo_dir, '--dataset', '', '--img-size',
                                                             str(args.photo_size)]
    return [*src, '--val-split', '', '--model', args.model, '-b', str(args.batch_size), '--workers',
            str(args.workers), '--epochs', '100', '--warmup-epochs', '0', '--lr', '0.05', '--weight-decay', '1e-4',
            '--smoothing', '0', '--scale', *map(str, args.scale), '--hflip', str(args.hflip), '--color-jitter', '0',
            '--seed', str(args.seed), '--log-interval', '100000', '--no-progress', '--device', args.device]


def profile_epoch(run: EpochRun, top: int) -> str:
    """One more epoch of ``run`` under cProfile: the top functions by own time (and the loader's share)."""
    prof = cProfile.Profile()
    prof.enable()
    run.train_epoch(record=False)
    prof.disable()
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out).strip_dirs().sort_stats('tottime')
    stats.print_stats(top)
    return out.getvalue()


def ratios(base: List[Dict[str, float]], other: List[Dict[str, float]]) -> Dict[str, Any]:
    """Paired per-round ratios other / base: wall and CPU per epoch, per step and per image; median and spread."""
    out: Dict[str, Any] = {}
    for key in ('wall', 'cpu'):
        for unit, div in (('epoch', None), ('step', 'steps'), ('image', 'images')):
            values = [(o[key] / (o[div] if div else 1)) / (b[key] / (b[div] if div else 1))
                      for b, o in zip(base, other)]
            out[f'{key}_per_{unit}'] = {'median': statistics.median(values), 'min': min(values), 'max': max(values),
                                        'values': values}
    return out


def measure(data: str, aug: str, photo_dir: str, work: str, args: argparse.Namespace) -> Dict[str, Any]:
    """Plain vs reinforced (and the device replay) for one data size and augmentation family."""
    shards = reinforce_shards(os.path.join(work, f'{data}_{aug.replace("+", "_")}'), aug, data, photo_dir, args)
    base = common_argv(data, photo_dir, args)
    runs = [EpochRun('plain', base + PLAIN_AUG_FLAGS[aug]), EpochRun('reinforced', base + ['--reinforced', shards])]
    if args.replay_device:
        runs.append(EpochRun(f'reinforced_{args.replay_device}', base + ['--reinforced', shards, '--replay-device',
                                                                          args.replay_device]))
    for run in runs:  # warm-up: worker start, caches, allocator
        run.train_epoch(record=False)
    for _ in range(args.epochs):
        for run in runs:
            run.train_epoch()
    result: Dict[str, Any] = {'data': data, 'aug': aug, 'shards': shards}
    for run in runs:
        rec = run.records
        result[run.name] = {'argv': run.argv, 'setup_seconds': run.setup_seconds, 'epochs': rec,
                            'median_wall': statistics.median(r['wall'] for r in rec),
                            'median_cpu': statistics.median(r['cpu'] for r in rec),
                            'data_wait_share': sum(r['data_wait'] for r in rec) / sum(r['wall'] for r in rec),
                            'steps': rec[0]['steps'], 'images': rec[0]['images']}
        if run.name != 'plain':
            result[run.name]['ratio'] = ratios(runs[0].records, rec)
    if args.profile:
        result['profiles'] = {run.name: profile_epoch(run, args.profile_top) for run in runs}
    return result


def print_result(r: Dict[str, Any]) -> None:
    plain = r['plain']
    print(f'\n== {r["data"]} / {r["aug"]}: plain {plain["median_wall"]:.2f} s/epoch ({plain["steps"]} steps, '
          f'data wait {100 * plain["data_wait_share"]:.1f}%)')
    for name, v in r.items():
        if not isinstance(v, dict) or 'ratio' not in v:
            continue
        q = v['ratio']
        print(f'   {name}: {v["median_wall"]:.2f} s/epoch ({v["steps"]} steps, data wait '
              f'{100 * v["data_wait_share"]:.1f}%); x plain: wall/epoch {q["wall_per_epoch"]["median"]:.3f} '
              f'[{q["wall_per_epoch"]["min"]:.3f}-{q["wall_per_epoch"]["max"]:.3f}], '
              f'cpu/epoch {q["cpu_per_epoch"]["median"]:.3f}, wall/image {q["wall_per_image"]["median"]:.3f}, '
              f'cpu/image {q["cpu_per_image"]["median"]:.3f}')
    for name, text in (r.get('profiles') or {}).items():
        print(f'\n-- profile of one {name} epoch ({r["data"]} / {r["aug"]}) --\n{text}')


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = create_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(args.seed)
    with contextlib.ExitStack() as stack:
        work = args.work_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix='epoch_cost_'))
        photo_dir = ''
        if 'photos' in args.data:
            photo_dir = write_photos(os.path.join(work, 'photos'), args.num_photos, args.photo_classes, args.seed)
        results = []
        for data in args.data:
            for aug in args.aug:
                r = measure(data, aug, photo_dir, work, args)
                print_result(r)
                results.append(r)
    summary = {'config': vars(args), 'versions': software_versions(), 'cpus': os.cpu_count(),
               'load_average': list(os.getloadavg()), 'results': results}
    print('\nsummary (median paired ratio reinforced / plain, wall per epoch | per image; CPU per epoch):')
    for r in results:
        for name, v in r.items():
            if isinstance(v, dict) and 'ratio' in v:
                q = v['ratio']
                print(f'  {r["data"]:>6} {r["aug"]:<14} {name:<18} {q["wall_per_epoch"]["median"]:.3f} | '
                      f'{q["wall_per_image"]["median"]:.3f}; cpu {q["cpu_per_epoch"]["median"]:.3f}')
    if args.output:
        with atomic_write(args.output, 'w') as f:
            json.dump(summary, f, indent=2)
    return summary


if __name__ == '__main__':
    main()
