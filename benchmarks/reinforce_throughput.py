#!/usr/bin/env python3
"""reinforce.py writer throughput vs the teacher's bare forward throughput on the same batches, side by side.

The writer path is the real one (``dr.reinforce.Reinforcer.run``: data-loader workers decode and augment, the main
process normalises/erases, batches augmentations across images, runs the teacher, writes and checksums shards).
While it runs, the teacher input batches it builds are kept; afterwards the bare teacher forward (same AMP /
channels-last settings, no data loading, no writing) is timed on exactly those batches. Both are reported as images/s
(an image = ``--num-samples`` augmentations) with the ratio writer / bare (target >= 0.9 on GPU, where enough loader
workers hide the augmentation cost behind the teacher). Repeats alternate writer and bare runs; the best of each
is reported, plus the fraction of the writer's wall time its main process spends in teacher batches. On a CPU-only
machine the loader workers compete with the teacher for the same cores, so the ratio there also measures that
contention (the teacher forward itself runs slower while workers augment).

Examples::

    python benchmarks/reinforce_throughput.py                       # CPU: resnet18 teacher at 64 px, 1 worker
    python benchmarks/reinforce_throughput.py --device cuda --amp --channels-last --teacher resnet50 \\
        --img-size 224 --digits-size 224 --num-images 256 --num-samples 64 --batch-size 256 --workers 12
"""
import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from contextlib import nullcontext
from typing import Any, Dict, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_utils import peak_memory, reset_peak_memory, sync  # noqa: E402

from dr.io import atomic_write, software_versions  # noqa: E402
from dr.reinforce.augment import AugmentSpec, create_augment_spec  # noqa: E402
from dr.reinforce.sources import ImageSource, create_source  # noqa: E402
from dr.reinforce.teachers import create_teacher  # noqa: E402
from dr.reinforce.writer import AugmentedImages, Reinforcer  # noqa: E402

_logger = logging.getLogger('reinforce_throughput')


def create_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description='reinforce.py throughput vs bare teacher forward')
    parser.add_argument('--teacher', nargs='+', default=['resnet18'], help='teacher spec(s) (random weights if no =)')
    parser.add_argument('--img-size', type=int, default=64, help='teacher input resolution')
    parser.add_argument('--digits-size', type=int, default=64, help='side of the digits images (the originals)')
    parser.add_argument('--num-images', type=int, default=48)
    parser.add_argument('--num-samples', type=int, default=32, help='stored augmentations per image')
    parser.add_argument('--topk', type=int, default=10)
    parser.add_argument('--aug', default='rrc+ra_re')
    parser.add_argument('--shard-size', type=int, default=16)
    parser.add_argument('-b', '--batch-size', type=int, default=128)
    parser.add_argument('-j', '--workers', type=int, default=1)
    parser.add_argument('--threads', type=int, default=1, help='torch intra-op threads of the main process (CPU)')
    parser.add_argument('--repeats', type=int, default=2)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--amp', action='store_true')
    parser.add_argument('--amp-dtype', default='bfloat16', choices=('bfloat16', 'float16'))
    parser.add_argument('--channels-last', action='store_true')
    parser.add_argument('--output', default='', help='write the result as JSON here')
    return parser


def measure(source: ImageSource, teacher, spec: AugmentSpec, device: torch.device, *, num_samples: int, topk: int,
            batch_size: int, workers: int, repeats: int = 2, shard_size: int = 16, num_classes: int = 10,
            amp_dtype: Optional[torch.dtype] = None, channels_last: bool = False) -> Dict[str, Any]:
    """Writer vs bare teacher forward on ``source``'s images (repeats alternate, the best of each counts).

    Returns images/s and augmentations/s of both, their ratio, the writer's teacher-busy fraction, the raw seconds and
    the memory peaks of each side (``bench_utils.peak_memory``; the writer's includes the teacher inputs it keeps for
    the bare run, given as ``captured_input_bytes``).
    """
    amp = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else nullcontext

    def bare(batches) -> float:
        sync(device)
        t0 = time.perf_counter()
        with torch.inference_mode(), amp():
            for inputs in batches:
                probs = teacher.forward_members(inputs)
                probs.float().topk(topk, dim=-1)
        sync(device)
        return time.perf_counter() - t0

    writer_s, bare_s, busy, batches = [], [], [], None
    writer_mem, bare_mem = None, None
    for r in range(repeats):
        out = tempfile.mkdtemp(prefix='rd_bench_')
        try:
            writer = Reinforcer(source, teacher, spec, out, num_samples=num_samples, topk=topk, seed=r,
                                shard_size=shard_size, num_classes=num_classes, batch_size=batch_size,
                                workers=workers, amp_dtype=amp_dtype, channels_last=channels_last,
                                device=device, progress=False)
            writer.batcher.captured = []
            if batches is None:  # warm up kernels / allocator on one batch so neither side pays for it
                probe = _probe_item(writer)
                writer.batcher.run_batch([(probe, probe, 0, 1)])
                writer.batcher.captured = []
            batches = None  # free the previous repeat's inputs before this writer run's peak window
            reset_peak_memory(device)
            result = writer.run()
            writer_mem = peak_memory(device)
            writer_s.append(result['seconds'])
            busy.append(result['teacher_seconds'] / result['seconds'])
            batches = writer.batcher.captured
        finally:
            shutil.rmtree(out, ignore_errors=True)
        reset_peak_memory(device)
        bare_s.append(bare(batches))
        bare_mem = peak_memory(device)
    n = len(source)
    writer_ips, bare_ips = n / min(writer_s), n / min(bare_s)
    return {
        'num_images': n, 'num_samples': num_samples, 'batch_size': batch_size, 'workers': workers,
        'amp_dtype': str(amp_dtype).replace('torch.', '') if amp_dtype else None, 'channels_last': channels_last,
        'writer_images_per_s': writer_ips, 'bare_forward_images_per_s': bare_ips,
        'writer_augmentations_per_s': writer_ips * num_samples,
        'bare_forward_augmentations_per_s': bare_ips * num_samples,
        'ratio_writer_over_bare': writer_ips / bare_ips,
        'writer_teacher_busy_fraction': busy[writer_s.index(min(writer_s))],
        'writer_seconds': writer_s, 'bare_seconds': bare_s,
        'memory': {'writer': writer_mem, 'bare_forward': bare_mem},
        'captured_input_bytes': int(sum(t.numel() * t.element_size() for inputs in batches for t in inputs)),
    }


def main(argv=None) -> dict:
    logging.basicConfig(level=logging.WARNING)
    args = create_parser().parse_args(argv)
    if args.device == 'cpu':
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    amp_dtype = {'bfloat16': torch.bfloat16, 'float16': torch.float16}[args.amp_dtype] if args.amp else None
    torch.manual_seed(0)
    teacher = create_teacher(args.teacher, num_classes=10, img_size=args.img_size, device=device)
    if args.channels_last:
        teacher = teacher.to(memory_format=torch.channels_last)
    source = create_source('digits', digits_size=args.digits_size, max_images=args.num_images)
    spec = create_augment_spec(args.aug)
    m = measure(source, teacher, spec, device, num_samples=args.num_samples, topk=args.topk,
                batch_size=args.batch_size, workers=args.workers, repeats=args.repeats, shard_size=args.shard_size,
                num_classes=10, amp_dtype=amp_dtype, channels_last=args.channels_last)
    n, writer_ips, bare_ips = m['num_images'], m['writer_images_per_s'], m['bare_forward_images_per_s']
    res = {
        'device': str(device) if device.type == 'cpu' else torch.cuda.get_device_name(device),
        'teacher': args.teacher, 'img_size': args.img_size, 'digits_size': args.digits_size,
        'amp': args.amp, **m, 'versions': software_versions(),
    }
    print(f'device {res["device"]}: teacher {" ".join(args.teacher)} @ {args.img_size}px, {n} images x '
          f'{args.num_samples} augmentations, batch {args.batch_size}, {args.workers} workers')
    print(f'  reinforce.py writer : {writer_ips:8.2f} images/s ({writer_ips * args.num_samples:9.1f} aug/s)')
    print(f'  bare teacher forward: {bare_ips:8.2f} images/s ({bare_ips * args.num_samples:9.1f} aug/s)')
    print(f'  ratio writer / bare : {res["ratio_writer_over_bare"]:.3f}')
    print(f'  writer time in teacher batches: {100 * res["writer_teacher_busy_fraction"]:.1f}% (the rest: waiting for '
          f'augmentations, shard output, start-up)')
    if args.output:
        with atomic_write(args.output, 'w') as f:
            json.dump(res, f, indent=1)
    return res


def _probe_item(writer: Reinforcer) -> dict:
    """One augmented image through the worker-side code (for the warm-up batch)."""
    ds = AugmentedImages(writer.source, [(0, 0)], writer.spec, writer.dtype, writer.seed, writer.num_samples,
                         writer.batcher.views, writer.num_classes)
    return ds[0]


if __name__ == '__main__':
    main()
