#!/usr/bin/env python3
"""Training-step time with and without BAKE, measured side by side in one run.

Both variants share the model, the optimizer and the very same class-aware batches (anchor + ``--intra`` class mates
from :class:`dr.bake.sampler.ClassAwareSampler` over synthetic labels). Steps are interleaved (plain, BAKE, BAKE, plain,
... so that drift in machine load hits both alike); each timed step is forward + loss + backward + optimizer step.
Prints mean/median step times, the ratio BAKE / plain and writes a JSON result with ``--output``.

Examples::

    python benchmarks/bake_overhead.py                                   # resnet18, 64 px, batch 64, CPU
    python benchmarks/bake_overhead.py --device cuda --amp --img-size 224 --batch-size 256 --model resnet50
"""
import argparse
import json
import logging
import os
import statistics
import sys
import time
from contextlib import nullcontext
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import timm
import torch
from timm.task import ClassificationTask

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_utils import peak_memory, reset_peak_memory, sync  # noqa: E402

from dr.bake.sampler import ClassAwareSampler, check_batch_size  # noqa: E402
from dr.bake.targets import bake_loss, bake_targets  # noqa: E402
from dr.bake.task import BakeTask  # noqa: E402
from dr.io import atomic_write, software_versions  # noqa: E402

_logger = logging.getLogger('bake_overhead')


def create_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description='BAKE training-step overhead benchmark')
    parser.add_argument('--model', default='resnet18', help='timm model name')
    parser.add_argument('--num-classes', type=int, default=100)
    parser.add_argument('-b', '--batch-size', type=int, default=64, help='images per step (anchors + class mates)')
    parser.add_argument('--img-size', type=int, default=64)
    parser.add_argument('--intra', type=int, default=1, help='M, class mates per anchor (--bake-intra)')
    parser.add_argument('--omega', type=float, default=0.5)
    parser.add_argument('--temp', type=float, default=4.0)
    parser.add_argument('--one-step', action='store_true')
    parser.add_argument('--steps', type=int, default=20, help='timed steps per variant')
    parser.add_argument('--warmup', type=int, default=3, help='untimed steps per variant first')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--amp', action='store_true', help='mixed precision (autocast)')
    parser.add_argument('--amp-dtype', default='bfloat16', choices=['float16', 'bfloat16'])
    parser.add_argument('--channels-last', action='store_true')
    parser.add_argument('--torchcompile', nargs='?', default=None, const='inductor',
                        help='torch.compile both tasks with this backend (default when given: inductor)')
    parser.add_argument('--threads', type=int, default=0, help='torch.set_num_threads (0: leave the default)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--output', default='', help='JSON result file')
    return parser


def _stats(times: List[float]) -> Dict[str, float]:
    return {
        'mean_ms': 1000 * statistics.fmean(times),
        'median_ms': 1000 * statistics.median(times),
        'min_ms': 1000 * min(times),
        'std_ms': 1000 * (statistics.stdev(times) if len(times) > 1 else 0.0),
    }


def class_aware_batches(args: argparse.Namespace, device: torch.device,
                        num_batches: int = 4) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Random images in class-aware batches: synthetic labels, 8 images per class, groups of 1 + M indices."""
    labels = np.repeat(np.arange(args.num_classes), 8)
    sampler = ClassAwareSampler(labels, num_intra=args.intra, num_replicas=1, rank=0, seed=args.seed)
    order = np.array(list(sampler))
    g = torch.Generator().manual_seed(args.seed)
    batches = []
    for i in range(num_batches):
        idx = order[i * args.batch_size:(i + 1) * args.batch_size]
        x = torch.randn(len(idx), 3, args.img_size, args.img_size, generator=g).to(device)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        batches.append((x, torch.as_tensor(labels[idx], device=device)))
    return batches


def create_step(args: argparse.Namespace, device: torch.device, optimizer: torch.optim.Optimizer) -> Callable:
    """``step(task, batch) -> (wall s, process CPU s)``: forward + loss + backward + optimizer step."""
    amp_dtype = torch.float16 if args.amp_dtype == 'float16' else torch.bfloat16
    use_scaler = args.amp and device.type == 'cuda' and amp_dtype == torch.float16
    scaler = torch.amp.GradScaler(device.type) if use_scaler else None

    def step(task: Callable, batch: Tuple[torch.Tensor, torch.Tensor]) -> Tuple[float, float]:
        x, y = batch
        sync(device)
        start, start_cpu = time.perf_counter(), time.process_time()
        with torch.autocast(device.type, dtype=amp_dtype) if args.amp else nullcontext():
            out = task(x, y)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(out['loss']).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            out['loss'].backward()
            optimizer.step()
        sync(device)
        return time.perf_counter() - start, time.process_time() - start_cpu

    return step


def time_interleaved(step: Callable, tasks: Dict[str, Callable], batches: List, warmup: int,
                     steps: int) -> Tuple[Dict[str, List[float]], Dict[str, List[float]]]:
    """Wall and CPU seconds per step of each task, steps interleaved (A B, B A, ...) on the same batches."""
    times: Dict[str, List[float]] = {k: [] for k in tasks}
    cpu_times: Dict[str, List[float]] = {k: [] for k in tasks}
    names, total = list(tasks), warmup + steps
    for i in range(total):
        batch = batches[i % len(batches)]
        for name in (names if i % 2 == 0 else names[::-1]):
            wall, cpu = step(tasks[name], batch)
            if i >= warmup:
                times[name].append(wall)
                cpu_times[name].append(cpu)
        if (i + 1) % 5 == 0 or i + 1 == total:
            _logger.info(f'step {i + 1}/{total}: ' + ', '.join(
                f'{k} {1000 * v[-1] if v else 0:.1f} ms' for k, v in times.items()))
    return times, cpu_times


def time_extra_work(bake: BakeTask, x: torch.Tensor, args: argparse.Namespace,
                    device: torch.device) -> Tuple[List[float], List[float]]:
    """The extra work of a BAKE step on its own (same shapes): targets, then the KL term forward and backward to the
    logits. Timed in isolation it is robust to other jobs on the machine, unlike the end-to-end ratios."""
    module = getattr(bake.trainable_module, '_orig_mod', bake.trainable_module)  # compiled: no no-grad recompile
    with torch.no_grad():
        logits, pre = module(x)
    logits = logits.detach().float().requires_grad_(True)
    solve_times, extra_times = [], []
    for _ in range(max(10, args.steps)):
        sync(device)
        start = time.perf_counter()
        q = bake_targets(pre, logits, args.omega, args.temp, args.one_step)
        sync(device)
        mid = time.perf_counter()
        bake_loss(logits, q, args.temp).backward()
        sync(device)
        end = time.perf_counter()
        logits.grad = None
        solve_times.append(mid - start)
        extra_times.append(end - start)
    return solve_times, extra_times


def summarise(args: argparse.Namespace, device: torch.device, times: Dict[str, List[float]],
              cpu_times: Dict[str, List[float]], solve_times: List[float], extra_times: List[float]) -> Dict:
    plain_s, bake_s = _stats(times['plain']), _stats(times['bake'])
    plain_cpu, bake_cpu = _stats(cpu_times['plain']), _stats(cpu_times['bake'])
    pair_ratios = [b / p for b, p in zip(times['bake'], times['plain'])]
    device_name = (torch.cuda.get_device_name(device) if device.type == 'cuda'
                   else f'cpu ({torch.get_num_threads()} threads)')
    return {
        'args': vars(args),
        'device': device_name,
        'plain': plain_s,
        'bake': bake_s,
        'bake_targets_ms': _stats(solve_times)['median_ms'],
        'bake_extra_ms': _stats(extra_times)['median_ms'],
        'ratio_median': bake_s['median_ms'] / plain_s['median_ms'],
        'ratio_mean': bake_s['mean_ms'] / plain_s['mean_ms'],
        'ratio_paired_median': statistics.median(pair_ratios),
        'ratio_min': bake_s['min_ms'] / plain_s['min_ms'],
        # process CPU time per step: robust to other jobs on a shared machine (exact with --threads 1 on CPU)
        'plain_cpu': plain_cpu,
        'bake_cpu': bake_cpu,
        'ratio_cpu_median': bake_cpu['median_ms'] / plain_cpu['median_ms'],
        # load-robust estimate: the extra BAKE work timed on its own, relative to a plain step
        'extra_share_of_plain_step': _stats(extra_times)['median_ms'] / plain_s['median_ms'],
        'versions': software_versions(),
    }


def print_result(args: argparse.Namespace, device: torch.device, result: Dict) -> None:
    plain_s, bake_s = result['plain'], result['bake']
    print(f'\nmodel {args.model}, {args.batch_size} images of {args.img_size}px ({args.batch_size // (1 + args.intra)} '
          f'anchors x {1 + args.intra}), {args.steps} interleaved steps each, {result["device"]}, amp={args.amp}')
    print(f'{"":8s} {"mean ms":>10s} {"median ms":>10s} {"min ms":>10s} {"std ms":>10s}')
    for name, s in (('plain', plain_s), ('bake', bake_s)):
        print(f'{name:8s} {s["mean_ms"]:10.2f} {s["median_ms"]:10.2f} {s["min_ms"]:10.2f} {s["std_ms"]:10.2f}')
    print(f'BAKE extra work alone (targets {result["bake_targets_ms"]:.3f} ms + KL forward/backward): '
          f'{result["bake_extra_ms"]:.3f} ms (median) = {100 * result["extra_share_of_plain_step"]:.2f}% '
          f'of a plain step')
    if device.type == 'cpu':
        for name, s in (('plain cpu', result['plain_cpu']), ('bake cpu', result['bake_cpu'])):
            print(f'{name:9s}{s["mean_ms"]:10.2f} {s["median_ms"]:10.2f} {s["min_ms"]:10.2f} {s["std_ms"]:10.2f}'
                  '  (process CPU time)')
    print(f'ratio BAKE/plain wall: median {result["ratio_median"]:.4f}, mean {result["ratio_mean"]:.4f}, '
          f'paired median {result["ratio_paired_median"]:.4f}, min {result["ratio_min"]:.4f}')
    print(f'BAKE overhead: {100 * (result["ratio_paired_median"] - 1):+.2f}% end to end (paired median wall time), '
          f'{100 * result["extra_share_of_plain_step"]:.2f}% from the extra work timed alone')
    if 'memory' in result:
        print('memory peak of one step: ' + ', '.join(
            f'{k} {v["peak_bytes"] / 2 ** 20:.0f} MiB' for k, v in result['memory'].items())
            + f' ({result["memory"]["plain"]["kind"]})')


def step_memory(step: Callable, tasks: Dict[str, Callable], batch: Tuple[torch.Tensor, torch.Tensor],
                device: torch.device) -> Dict[str, Dict[str, Any]]:
    """The memory peak of one training step of each task (peak window reset before each; see ``bench_utils``)."""
    out = {}
    for name, task in tasks.items():
        reset_peak_memory(device)
        step(task, batch)
        out[name] = peak_memory(device)
    return out


def run(args: argparse.Namespace) -> Dict:
    """Build the model, both tasks and the batches, time them interleaved; the result dict (nothing printed)."""
    check_batch_size(args.batch_size, args.intra)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)

    model = timm.create_model(args.model, num_classes=args.num_classes).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    plain = ClassificationTask(model, criterion=torch.nn.CrossEntropyLoss(), device=device, verbose=False)
    bake = BakeTask(model, omega=args.omega, temperature=args.temp, one_step=args.one_step, device=device,
                    verbose=False)
    if getattr(args, 'torchcompile', None):
        plain.compile(backend=args.torchcompile)
        bake.compile(backend=args.torchcompile)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    batches = class_aware_batches(args, device)
    step = create_step(args, device, optimizer)
    tasks = {'plain': plain, 'bake': bake}
    times, cpu_times = time_interleaved(step, tasks, batches, args.warmup, args.steps)
    solve_times, extra_times = time_extra_work(bake, batches[0][0], args, device)
    result = summarise(args, device, times, cpu_times, solve_times, extra_times)
    result['memory'] = step_memory(step, tasks, batches[0], device)
    return result


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    args = create_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    device = torch.device(args.device)
    result = run(args)
    print_result(args, device, result)
    if args.output:
        with atomic_write(args.output, 'w') as f:
            json.dump(result, f, indent=2)
        print(f'wrote {args.output}')
    return result


if __name__ == '__main__':
    main()
