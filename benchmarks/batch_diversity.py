#!/usr/bin/env python3
"""Classes per training batch on reinforced shards, simulated for the ImageNet layout (no images needed).

The question: does a batch of the reinforced loader hold as many distinct classes as a uniformly sampled batch? An
ImageFolder lists images sorted by class, so shards written in dataset order hold one or two classes each, and no
shuffle buffer of practical size mixes them back. reinforce.py therefore writes the images in a seeded permutation
(``dr.reinforce.format.image_order``) and the loader reads several shard pieces per worker at once.

The simulation runs the project's own code: the shard layout of ``dr.reinforce.writer.ShardPlan`` with the image
order reinforce.py writes, and the epoch plan of the training loader (``ReinforcedShards.sample_stream``:
``worker_pieces`` per rank and worker, ``interleave_pieces`` over ``mix_shards`` pieces, the seeded shuffle buffer),
with a stand-in shard reader that yields each position's label instead of reading a tar. Batches are the consecutive
``batch_size`` samples of each worker's stream (what ``wds.batched`` forms in the loader).

Defaults are the recipes': 1000 classes, 1,281,167 images (ImageNet-1k train, ImageFolder order), shards of 1000
(``hparams/dr/reinforce/imagenet_plus.yaml``), 8 processes x batch 128, 10 workers, shuffle buffer 5000, seed 0
(``hparams/dr/train/resnet50_e300_imagenet_plus.yaml``). Prints the median number of distinct classes per batch for
each layout and the ratio to uniform sampling (target >= 0.9 for the layout reinforce.py writes); ``--output`` writes
JSON.

    python benchmarks/batch_diversity.py
    python benchmarks/batch_diversity.py --layouts dataset permuted --mix-shards 1 4 --shuffle-buffer 1000
"""
import argparse
import json
import os
import statistics
import sys
import time
from typing import Any, Dict, Iterator, List, Sequence

import numpy as np
import yaml

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dr.io import atomic_write, software_versions  # noqa: E402
from dr.reinforce.augment import create_augment_spec  # noqa: E402
from dr.reinforce.format import image_order, shard_name  # noqa: E402
from dr.reinforce.loader import DEFAULT_MIX_SHARDS, Piece, ReinforcedShards  # noqa: E402
from dr.reinforce.writer import ShardPlan  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_RECIPE = os.path.join(ROOT, 'hparams', 'dr', 'train', 'resnet50_e300_imagenet_plus.yaml')
REINFORCE_RECIPE = os.path.join(ROOT, 'hparams', 'dr', 'reinforce', 'imagenet_plus.yaml')
IMAGENET_TRAIN_IMAGES = 1281167


def _recipe(path: str) -> Dict[str, Any]:
    with open(path) as f:
        return yaml.safe_load(f)


def create_parser() -> argparse.ArgumentParser:
    train, rd = _recipe(TRAIN_RECIPE), _recipe(REINFORCE_RECIPE)
    parser = argparse.ArgumentParser(description='Distinct classes per batch of the reinforced loader (simulated)')
    parser.add_argument('--num-classes', type=int, default=1000)
    parser.add_argument('--num-images', type=int, default=IMAGENET_TRAIN_IMAGES)
    parser.add_argument('--shard-size', type=int, default=int(rd['shard_size']))
    parser.add_argument('--write-seed', type=int, default=int(rd['seed']), help='reinforce.py --seed')
    parser.add_argument('--world-size', type=int, default=8)
    parser.add_argument('-b', '--batch-size', type=int, default=int(train['batch_size']), help='per process')
    parser.add_argument('-j', '--workers', type=int, default=int(train['workers']))
    parser.add_argument('--shuffle-buffer', type=int, default=int(train['rd_shuffle_buffer']))
    parser.add_argument('--mix-shards', type=int, nargs='+', default=[DEFAULT_MIX_SHARDS],
                        help='shard pieces each worker reads at once (several values: one row each)')
    parser.add_argument('--seed', type=int, default=int(train['seed']), help='train.py --seed')
    parser.add_argument('--epoch', type=int, default=0)
    parser.add_argument('--layouts', nargs='+', default=['dataset', 'permuted'], choices=('dataset', 'permuted'),
                        help='dataset: shards in ImageFolder order (before); permuted: what reinforce.py writes')
    parser.add_argument('--output', default='', help='JSON result file')
    return parser


def dataset_labels(num_images: int, num_classes: int) -> np.ndarray:
    """Labels in ImageFolder order (sorted by class; class sizes differ by at most one image)."""
    counts = np.full(num_classes, num_images // num_classes)
    counts[:num_images % num_classes] += 1
    return np.repeat(np.arange(num_classes), counts)


def shard_plan(num_images: int, layout: str, shard_size: int, write_seed: int) -> ShardPlan:
    """The shards reinforce.py writes (``layout='permuted'``), or shards in dataset order (before)."""
    order = image_order(num_images, write_seed) if layout == 'permuted' else np.arange(num_images)
    return ShardPlan(order, shard_size)


def simulated_loader(args, plan: ShardPlan, mix_shards: int, rank: int) -> ReinforcedShards:
    """The training loader's dataset for one rank, over the plan's shard list."""
    shards = [(shard_name(s), plan.shard_range(s)[1] - plan.shard_range(s)[0]) for s in range(plan.num_shards)]
    meta = {'num_classes': args.num_classes, 'topk': 1, 'num_samples': 1, 'teachers': [],
            'augmentation': create_augment_spec('rrc').to_dict()}
    return ReinforcedShards(
        shards, meta, batch_size=args.batch_size, input_size=(3, 8, 8), mean=(0, 0, 0), std=(1, 1, 1),
        interpolation=None, rd_p=1.0, rd_densify='smooth', fallback_transform=None, num_classes=args.num_classes,
        seed=args.seed, rank=rank, world_size=args.world_size, num_workers=args.workers,
        shuffle_buffer=args.shuffle_buffer, mix_shards=mix_shards)


def batch_classes(args, labels: np.ndarray, plan: ShardPlan, mix_shards: int) -> List[int]:
    """Distinct classes of every batch of one epoch, all ranks and workers."""
    def open_piece(piece: Piece) -> Iterator[Dict[str, Any]]:
        url, start, stop, _, pass_index = piece
        first = plan.shard_range(int(url.split('.')[0]))[0]
        for p in range(first + start, first + stop):
            yield {'__key__': str(p), '__pass__': pass_index, '__url__': url, 'label': labels[plan.order[p]]}

    out = []
    for rank in range(args.world_size):
        dataset = simulated_loader(args, plan, mix_shards, rank)
        for worker in range(args.workers):
            stream = [s['label'] for s in dataset.sample_stream(args.epoch, worker, open_piece)]
            for b in range(0, len(stream), args.batch_size):
                out.append(len(set(stream[b:b + args.batch_size])))
    return out


def uniform_classes(labels: np.ndarray, batch_size: int, num_batches: int, seed: int) -> List[int]:
    """Distinct classes of batches drawn uniformly without replacement (what a random sampler gives)."""
    rng = np.random.default_rng(seed)
    return [len(set(labels[rng.choice(len(labels), batch_size, replace=False)].tolist()))
            for _ in range(num_batches)]


def main(argv: Sequence[str] = None) -> Dict[str, Any]:
    args = create_parser().parse_args(argv)
    labels = dataset_labels(args.num_images, args.num_classes)
    uniform = statistics.median(uniform_classes(labels, args.batch_size, 2000, args.seed))
    rows = []
    for layout in args.layouts:
        plan = shard_plan(args.num_images, layout, args.shard_size, args.write_seed)
        for mix in args.mix_shards:
            t0 = time.perf_counter()
            classes = batch_classes(args, labels, plan, mix)
            median = statistics.median(classes)
            rows.append({'layout': layout, 'mix_shards': mix, 'batches': len(classes), 'median_classes': median,
                         'p10_classes': float(np.percentile(classes, 10)), 'ratio_to_uniform': median / uniform,
                         'seconds': time.perf_counter() - t0})
    print(f'{args.num_images} images, {args.num_classes} classes, shards of {args.shard_size}; {args.world_size} '
          f'processes x batch {args.batch_size}, {args.workers} workers, shuffle buffer {args.shuffle_buffer}, '
          f'epoch {args.epoch}')
    print(f'uniform sampling: median {uniform:g} distinct classes per batch')
    print(f'{"layout":>10} {"mix_shards":>10} {"batches":>8} {"median":>7} {"p10":>6} {"ratio":>6}')
    for r in rows:
        print(f'{r["layout"]:>10} {r["mix_shards"]:>10} {r["batches"]:>8} {r["median_classes"]:>7g} '
              f'{r["p10_classes"]:>6g} {r["ratio_to_uniform"]:>6.3f}')
    permuted = [r['ratio_to_uniform'] for r in rows if r['layout'] == 'permuted']
    if permuted:
        print(f'ratio (layout reinforce.py writes) / uniform: {min(permuted):.3f} (target >= 0.9)')
    result = {'config': dict(vars(args)), 'uniform_median_classes': uniform, 'rows': rows,
              'versions': software_versions()}
    if args.output:
        with atomic_write(args.output, 'w') as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == '__main__':
    main()
