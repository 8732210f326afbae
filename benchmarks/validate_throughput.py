#!/usr/bin/env python3
"""Images/s of validate.py's evaluation loop vs a bare forward loop over the same loader (target ratio >= 0.95).

Both loops read the same DataLoader (timm eval transform, uint8 batches) and run the same ``NormalizedModel``; the
evaluation loop additionally computes per-sample top-5, confidence, NLL and the per-view bookkeeping, gathers the
records and summarises them (accuracy, ECE/MCE, NLL), exactly as validate.py does for one pass. The two are timed
interleaved (A B B A ...) in one process over many short passes; the reported ratio is the median of the ratios of
adjacent pairs, which cancels slow drifts in machine load.

    python benchmarks/validate_throughput.py                      # CPU, resnet10t on digits at 32 px
    python benchmarks/validate_throughput.py --device cuda --amp --batch-size 256 --img-size 224
"""
import argparse
import contextlib
import functools
import json
import os
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import timm
import torch
from timm.data import resolve_data_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from dr.data import DigitsDataset  # noqa: E402
from dr.evaluate.loop import (  # noqa: E402
    NormalizedModel,
    create_eval_loader,
    evaluate_part,
    gather_records,
    summarize_records,
    to_unit_range,
)
from dr.evaluate.sets import EvalPart, IndexedDataset, View  # noqa: E402


def create_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--model', default='resnet10t')
    parser.add_argument('--img-size', type=int, default=32)
    parser.add_argument('--num-classes', type=int, default=10)
    parser.add_argument('--batch-size', type=int, default=128)
    parser.add_argument('--workers', type=int, default=0)
    parser.add_argument('--rounds', type=int, default=12, help='timed passes per loop (interleaved)')
    parser.add_argument('--images', type=int, default=512, help='images per pass (from the digits train split)')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--amp', action='store_true')
    parser.add_argument('--amp-dtype', default='', choices=('', 'float16', 'bfloat16'),
                        help='autocast dtype (default: bfloat16 on CPU, float16 on CUDA)')
    parser.add_argument('--channels-last', action='store_true')
    parser.add_argument('--threads', type=int, default=0, help='torch intra-op threads (0: torch default)')
    parser.add_argument('--json', default='', help='also write the numbers here')
    return parser


def build_loops(args: argparse.Namespace, device: torch.device) -> Tuple[Callable[[], None], Callable[[], None], int]:
    """The bare forward loop and validate.py's evaluation loop over one loader; returns (bare, full, images)."""
    torch.manual_seed(0)
    model = timm.create_model(args.model, num_classes=args.num_classes)
    cfg = resolve_data_config({'img_size': args.img_size, 'crop_pct': 1.0}, model=model)
    model.eval().to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    net = NormalizedModel(model, cfg['mean'], cfg['std'], channels_last=args.channels_last).eval().to(device)
    amp_dtype = getattr(args, 'amp_dtype', '') or ('bfloat16' if device.type == 'cpu' else 'float16')
    autocast = (functools.partial(torch.autocast, device_type=device.type, dtype=getattr(torch, amp_dtype))
                if args.amp else contextlib.nullcontext)
    # the digits train split as the image source (1438 images), classes 0-9
    digits = DigitsDataset('train', img_size=args.img_size)
    digits.images, digits.targets = digits.images[:args.images], digits.targets[:args.images]
    ds = IndexedDataset(digits)
    part = EvalPart('bench', ds, [View('bench')])
    loader = create_eval_loader(ds, cfg, args.batch_size, num_workers=args.workers)

    def bare() -> None:
        for images, _, _, _ in loader:
            x = to_unit_range(images.to(device, non_blocking=True))
            with torch.no_grad(), autocast():
                net(x)

    def full() -> None:
        records, _ = evaluate_part(net, part, loader, device, autocast=autocast, progress=False)
        summarize_records(gather_records(records['bench'], device))

    return bare, full, len(ds)


def time_interleaved(loops: Dict[str, Callable[[], None]], images: int, rounds: int,
                     device: torch.device) -> Tuple[Dict[str, List[float]], Dict[str, List[float]]]:
    """Images per wall-clock second and per CPU second of this process, loops alternating A B B A ..."""
    def timed(fn: Callable[[], None]) -> Tuple[float, float]:
        if device.type == 'cuda':
            torch.cuda.synchronize()
        t, c = time.perf_counter(), time.process_time()
        fn()
        if device.type == 'cuda':
            torch.cuda.synchronize()
        return images / (time.perf_counter() - t), images / (time.process_time() - c)

    for fn in loops.values():  # warm-up (allocator, first-call overheads)
        timed(fn)
    rates: Dict[str, List[float]] = {k: [] for k in loops}
    cpu_rates: Dict[str, List[float]] = {k: [] for k in loops}
    names = list(loops)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            wall, cpu = timed(loops[name])
            rates[name].append(wall)
            cpu_rates[name].append(cpu)
    return rates, cpu_rates


def report(args: argparse.Namespace, device: torch.device, images: int, rates: Dict[str, List[float]],
           cpu_rates: Dict[str, List[float]]) -> Dict[str, Any]:
    """Print the medians and the validate / bare ratio; returns the numbers (also written to ``--json``)."""
    med = {k: statistics.median(v) for k, v in rates.items()}
    pair_ratios = [v / b for v, b in zip(rates['validate'], rates['bare'])]
    ratio = statistics.median(pair_ratios)
    cpu_ratio = statistics.median(v / b for v, b in zip(cpu_rates['validate'], cpu_rates['bare']))
    print(f'model {args.model} @ {args.img_size}px, batch {args.batch_size}, workers {args.workers}, device '
          f'{device}, amp {args.amp}, {images} images x {args.rounds} interleaved rounds, torch threads '
          f'{torch.get_num_threads()}')
    print(f'{"loop":<24}{"median img/s":>14}   all rounds (img/s, wall clock)')
    for key, label in (('bare', 'bare forward'), ('validate', 'validate.py eval loop')):
        print(f'{label:<24}{med[key]:>14.1f}   {" ".join(f"{v:.0f}" for v in rates[key])}')
    print(f'ratio validate / bare = {ratio:.3f} (median of {len(pair_ratios)} adjacent-pair ratios; ratio of the '
          f'medians {med["validate"] / med["bare"]:.3f}; target >= 0.95)')
    print(f'per CPU-second of this process (insensitive to other load): bare '
          f'{statistics.median(cpu_rates["bare"]):.1f} img/s, validate {statistics.median(cpu_rates["validate"]):.1f}'
          f' img/s, ratio {cpu_ratio:.3f}')
    result = {'args': vars(args), 'rates': rates, 'cpu_rates': cpu_rates, 'median': med, 'pair_ratios': pair_ratios,
              'ratio': ratio, 'cpu_ratio': cpu_ratio}
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(result, f, indent=2)
    return result


def main(argv: Optional[Sequence[str]] = None) -> float:
    args = create_parser().parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    bare, full, images = build_loops(args, device)
    rates, cpu_rates = time_interleaved({'bare': bare, 'validate': full}, images, args.rounds, device)
    return report(args, device, images, rates, cpu_rates)['ratio']


if __name__ == '__main__':
    main()
