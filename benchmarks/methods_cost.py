#!/usr/bin/env python3
"""Per-step cost of every competing method vs plain training, measured side by side in one run.

The methods and their ``train.py`` flags are ``make compare``'s (``dr.compare.COMPARE_METHODS``), so the benchmark
times exactly what the comparison trains. Every run is set up by train.py's own code and trained one epoch at a time
with ``train.train_one_epoch`` (``train_epoch_cost.EpochRun``); epochs alternate over all methods after one untimed
warm-up epoch each, and every round gives a paired ratio method / plain of the wall and CPU time per optimiser step
and per training image (BAKE and CS-KD add class mates to each step: per step they process ``1 + M`` x the images).

Teachers are random-weight checkpoints written here (their values do not change the cost), reinforcements come from
``reinforce.py`` with a random-weight teacher, the self-training teacher is a random-weight copy of the student.
Printed next to each ratio: the cost the method's paper (or the BAKE/DR paper) claims, where it claims one.

    python benchmarks/methods_cost.py --output benchmarks/results/methods_cost_digits_cpu.json
    python benchmarks/methods_cost.py --methods plain bake cs_kd --epochs 5
"""
import argparse
import contextlib
import json
import logging
import os
import statistics
import sys
import tempfile
from typing import Any, Dict, List, Optional, Sequence

import timm
import torch
from timm.data import resolve_data_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from train_epoch_cost import EpochRun, common_argv, ratios, reinforce_shards  # noqa: E402

import reinforce  # noqa: E402
from dr import compare  # noqa: E402
from dr.io import atomic_write, software_versions  # noqa: E402

_logger = logging.getLogger('methods_cost')


def create_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description='Per-step cost of each competing method / plain, side by side')
    parser.add_argument('--methods', nargs='+', default=None, help='a subset (default: all of make compare\'s)')
    parser.add_argument('--model', default='test_resnet', help='student (a timm model name)')
    parser.add_argument('--teacher-model', default='resnet10t', help='architecture of the random-weight teachers')
    parser.add_argument('-b', '--batch-size', type=int, default=64, help='plain batch (anchors for class-aware)')
    parser.add_argument('-j', '--workers', type=int, default=0)
    parser.add_argument('--epochs', type=int, default=3, help='timed epochs per method (after one warm-up epoch)')
    parser.add_argument('--num-samples', type=int, default=8, help='stored augmentations per image (shards)')
    parser.add_argument('--topk', type=int, default=5)
    parser.add_argument('--scale', type=float, nargs=2, default=[0.35, 1.0])
    parser.add_argument('--hflip', type=float, default=0.0)
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--work-dir', default='', help='where checkpoints and shards go (default: a temp folder)')
    parser.add_argument('--output', default='', help='JSON result file')
    return parser


def random_checkpoint(path: str, model_name: str, num_classes: int = 10, img_size: int = 32) -> str:
    """A train.py-style checkpoint of a random-weight timm model at the digits' input size (stored in its args, as
    train.py stores it, so a teacher runs at the student's resolution); returns ``NAME=PATH`` (a teacher spec)."""
    model = timm.create_model(model_name, num_classes=num_classes)
    data_config = resolve_data_config({'input_size': (3, img_size, img_size)}, model=model)
    torch.save({'state_dict': model.state_dict(), 'arch': model_name,
                'args': argparse.Namespace(data_config=data_config)}, path)
    return f'{model_name}={path}'


def prepare_inputs(methods: Sequence[compare.CompareMethod], work: str, args: argparse.Namespace) -> Dict[str, Any]:
    """The placeholder values of the methods' flags: teachers, plain checkpoint and reinforcements."""
    needs = {n for m in methods for n in m.needs}
    values: Dict[str, Any] = {
        'teachers': [random_checkpoint(os.path.join(work, f'teacher{i}.pth'), args.teacher_model) for i in range(2)],
        'plain_checkpoint': random_checkpoint(os.path.join(work, 'student.pth'), args.model)}
    if 'shards' in needs:
        values['shards'] = reinforce_shards(os.path.join(work, 'shards_rrc'), 'rrc', 'digits', '', args)
    if 'label_maps' in needs:  # ReLabel: a random 64 px annotator's maps (2x2 locations), as make compare's
        size = str(compare.LABEL_MAP_SIZE)
        spec = random_checkpoint(os.path.join(work, 'annotator.pth'), args.teacher_model,
                                 img_size=compare.LABEL_MAP_SIZE)
        maps = os.path.join(work, 'label_maps')
        status = reinforce.main(['--label-maps', '--dataset', 'digits', '--digits-size', size, '--topk', str(args.topk),
                                 '--teacher', spec, '-b', '64', '--workers', '0', '--no-progress', '--output', maps])
        if status:
            raise RuntimeError(f'reinforce.py --label-maps failed with exit status {status}')
        values['label_maps'] = maps
    return values


# BAN's generation loop runs whole trainings (train.main); per step, a generation k >= 1 is online KD from a copy of
# the student, which is what is timed (its total cost is that x (N + 1) trainings)
STEP_FLAGS = {'ban': ('--kd-teacher', '{plain_checkpoint}')}


def method_argv(m: compare.CompareMethod, values: Dict[str, Any], args: argparse.Namespace) -> List[str]:
    base = common_argv('digits', '', args)
    extra = compare.expand_flags(STEP_FLAGS.get(m.name, m.flags), values)
    return base + ['-b', str(m.group * args.batch_size), *extra]


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = create_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(args.seed)
    methods = compare.method_table(args.methods)
    with contextlib.ExitStack() as stack:
        work = args.work_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix='methods_cost_'))
        os.makedirs(work, exist_ok=True)
        values = prepare_inputs(methods, work, args)
        runs = [EpochRun(m.name, method_argv(m, values, args)) for m in methods]
        for run in runs:  # warm-up: caches, allocator, first-epoch work (e.g. PS-KD has no stored predictions yet)
            run.train_epoch(record=False)
        for _ in range(args.epochs):
            for run in runs:
                run.train_epoch()
    plain = runs[0].records
    results = []
    for m, run in zip(methods, runs):
        rec = run.records
        row = {'method': m.name, 'label': m.label, 'argv': run.argv, 'paper_cost': m.cost_note,
               'steps': rec[0]['steps'], 'images': rec[0]['images'],
               'median_wall_per_step': statistics.median(r['wall'] / r['steps'] for r in rec),
               'ratio': ratios(plain, rec)}
        results.append(row)
    print(f'\n{"method":<22} {"wall/step":>10} {"x plain":>8} {"[min-max]":>15} {"cpu/step":>9} '
          f'{"wall/image":>11}  paper\'s cost')
    for r in results:
        q = r['ratio']
        print(f'{r["label"]:<22} {1000 * r["median_wall_per_step"]:>8.1f}ms {q["wall_per_step"]["median"]:>8.3f} '
              f'[{q["wall_per_step"]["min"]:.2f}-{q["wall_per_step"]["max"]:.2f}] {q["cpu_per_step"]["median"]:>9.3f} '
              f'{q["wall_per_image"]["median"]:>11.3f}  {r["paper_cost"] or "-"}')
    summary = {'config': vars(args), 'versions': software_versions(), 'cpus': os.cpu_count(),
               'load_average': list(os.getloadavg()), 'results': results}
    if args.output:
        with atomic_write(args.output, 'w') as f:
            json.dump(summary, f, indent=2)
    return summary


if __name__ == '__main__':
    main()
