#!/usr/bin/env python3
"""Training-loader throughput with mixing (+M*) vs the same loader without it, measured side by side in one run.

Two shard sets are written from the same images (``loader_throughput.write_fake_shards``): ``rrc+ra_re`` (baseline)
and ``rrc+ra_re+mix`` (candidate: a partner from the image's group of ``--mix-group`` images of the shard, mixup
p=0.5 and cutmix p=0.5, so about 75% of the samples mix). The reinforced training loader
(``create_reinforced_loader``, as train.py builds it) reads both; a mixing sample additionally reads its partner's
image from the local shard (``dr.reinforce.partners``: one ``pread``), decodes it, replays the partner's stored
crop/flip/RandAugment/erase and mixes the two normalised tensors. Epochs alternate in ABBA order after one untimed
warm-up epoch each; prints samples/s and the ratio mixing / plain (target >= 0.8), JSON with --output.

Examples::

    python benchmarks/mixing_throughput.py                          # digits 32 px PNG, batch 64, 2 workers, CPU
    python benchmarks/mixing_throughput.py -j 0 --digits-size 384 --img-size 224 --image-format jpg \
        --max-images 512 --epochs 4                                 # ImageNet-like decode cost per sample
"""
import argparse
import json
import logging
import os
import sys
import tempfile
from typing import Any, Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from loader_throughput import (  # noqa: E402
    BenchImages,
    add_bench_args,
    build_rd_loader,
    run_rounds,
    summarise,
    write_fake_shards,
)

from dr.io import atomic_write, software_versions  # noqa: E402
from dr.reinforce.loader import check_reinforced  # noqa: E402

_logger = logging.getLogger('mixing_throughput')


def create_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description='Reinforced loader with mixing (+M*) vs without')
    parser.add_argument('--aug', default='rrc+ra_re', choices=('rrc', 'rrc+ra_re'),
                        help='the baseline family; the candidate is the same with +mix')
    parser.add_argument('--mix-group', type=int, default=8, help='partners: images per group of a shard')
    return add_bench_args(parser)


def main(argv: List[str] = None) -> Dict[str, Any]:
    args = create_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    images = BenchImages(args.digits_size, args.image_format, args.max_images)
    num_classes = len(images.classes)
    work = args.work_dir or tempfile.mkdtemp(prefix='mixing_throughput_')
    plain, mixing = args.aug, args.aug + '+mix'
    loaders = {}
    for name in (plain, mixing):
        rd_dir = write_fake_shards(images, os.path.join(work, name.replace('+', '_')), args.num_samples, args.topk,
                                   args.shard_size, args.seed, aug=name, mix_group=args.mix_group)
        loader = build_rd_loader(rd_dir, check_reinforced(rd_dir, num_classes), num_classes, args)
        loaders[name] = (loader, loader.set_epoch)
    runs = run_rounds(loaders, args.epochs)
    summary = summarise(runs, plain, mixing)
    setting = (f'{len(images)} images ({args.image_format}, {args.digits_size} px) at {args.img_size} px, batch '
               f'{args.batch_size}, workers {args.workers}, {args.num_samples} x top-{args.topk}, mix group '
               f'{args.mix_group}')
    result = {'config': dict(vars(args)), 'setting': setting, 'device': 'cpu', 'cpu_count': os.cpu_count(),
              'torch_threads': torch.get_num_threads(), 'summary': summary,
              'ratio_mixing_over_plain': summary['ratio'], 'runs': runs, 'versions': software_versions()}
    print(f'\n{setting}')
    for name in (plain, mixing):
        print(f'{name:>14}: {summary[name]["samples_per_s"]:8.0f} samples/s '
              f'(median epoch {summary[name]["median_samples_per_s"]:.0f})')
    print(f'ratio {mixing} / {plain}: {summary["ratio"]:.3f} (paired median {summary["paired_median_ratio"]:.3f}'
          + (f', per-sample CPU time {summary["cpu_ratio"]:.3f}' if args.workers == 0 else '') + '; target >= 0.8)')
    if args.output:
        with atomic_write(args.output, 'w') as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == '__main__':
    main()
