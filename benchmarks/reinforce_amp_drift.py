#!/usr/bin/env python3
"""How far a bfloat16-autocast teacher moves the stored reinforcements from the float32 teacher.

Runs ``reinforce.py`` twice over the same images with the same seed (so every stored augmentation is the same crop /
flip / RandAugment / erasing) and the same teacher, once in float32 (the recipes' default, as the DR authors' code)
and once with ``--amp --amp-dtype bfloat16``, then compares the stored records augmentation by augmentation:

* max and mean ``|p_bf16 - p_fp32|`` over the stored top-k probabilities, densified (a class outside one run's
  top-k counts as 0 there; with top-k >= the class count this is the full distribution), and for the fp32 top-1 class;
* the share of augmentations whose stored top-1 class id differs.

Without ``--teacher`` a small teacher is trained on the embedded digits first (``train.py``, a few epochs).

    python benchmarks/reinforce_amp_drift.py                               # digits, test_resnet teacher, 20 samples
    python benchmarks/reinforce_amp_drift.py --teacher resnet18=output/train/teacher --num-samples 50
"""
import argparse
import glob
import json
import logging
import os
import sys
import tempfile
from typing import Dict, List

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import reinforce  # noqa: E402
import train  # noqa: E402
from dr.io import atomic_write, software_versions  # noqa: E402
from dr.reinforce.format import decode_records, iter_shard  # noqa: E402

_logger = logging.getLogger('reinforce_amp_drift')


def _records(out_dir: str) -> Dict[str, np.ndarray]:
    """key -> stored records of every sample of a reinforce.py output."""
    recs = {}
    for shard in sorted(glob.glob(os.path.join(out_dir, '*.tar'))):
        for sample in iter_shard(shard, shard):
            recs[sample['key']] = decode_records(sample['records'], f'{shard} key {sample["key"]}')
    return recs


def _dense(arr: np.ndarray, num_classes: int) -> np.ndarray:
    dense = np.zeros((len(arr), num_classes), dtype=np.float64)
    np.put_along_axis(dense, arr['ids'].astype(np.int64), arr['probs'].astype(np.float64), axis=1)
    return dense


def compare(fp32_dir: str, amp_dir: str, num_classes: int) -> Dict[str, float]:
    """Drift of the ``amp_dir`` records against the ``fp32_dir`` ones (same keys, same augmentations)."""
    a, b = _records(fp32_dir), _records(amp_dir)
    if set(a) != set(b):
        raise ValueError(f'{fp32_dir} and {amp_dir} hold different samples')
    diffs: List[np.ndarray] = []
    top1_diffs: List[np.ndarray] = []
    flips = total = 0
    for key in sorted(a):
        ra, rb = a[key], b[key]
        for field in ('crop', 'flags'):  # the same augmentations were stored
            if not np.array_equal(ra[field], rb[field]):
                raise ValueError(f'{key}: the two runs stored different augmentations ({field})')
        da, db = _dense(ra, num_classes), _dense(rb, num_classes)
        diffs.append(np.abs(da - db).max(axis=1))
        top = ra['ids'][:, 0].astype(np.int64)
        top1_diffs.append(np.abs(da[np.arange(len(ra)), top] - db[np.arange(len(ra)), top]))
        flips += int((ra['ids'][:, 0] != rb['ids'][:, 0]).sum())
        total += len(ra)
    d, t = np.concatenate(diffs), np.concatenate(top1_diffs)
    return {'augmentations': total, 'max_abs_dp': float(d.max()), 'mean_max_abs_dp': float(d.mean()),
            'max_abs_dp_top1': float(t.max()), 'mean_abs_dp_top1': float(t.mean()),
            'top1_flip_pct': 100.0 * flips / total}


def main(argv=None) -> Dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--teacher', default=None, help='NAME=CKPT teacher (default: train test_resnet on digits)')
    parser.add_argument('--teacher-epochs', type=int, default=8, help='epochs of the default digits teacher')
    parser.add_argument('--num-samples', type=int, default=20, help='stored augmentations per image')
    parser.add_argument('--topk', type=int, default=10, help='stored classes (10 = all digits classes)')
    parser.add_argument('--aug', default='rrc+ra_re')
    parser.add_argument('--workdir', default=None, help='keep outputs here (default: a temporary folder)')
    parser.add_argument('--results-file', default='', help='write the numbers as JSON')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    work = args.workdir or tempfile.mkdtemp(prefix='amp_drift_')
    teacher = args.teacher
    if teacher is None:
        train.main(['--dataset', 'digits', '--model', 'test_resnet', '--epochs', str(args.teacher_epochs),
                    '--workers', '0', '--warmup-epochs', '0', '--lr', '0.2', '--output', work,
                    '--experiment', 'teacher', '--log-interval', '1000'])
        teacher = f'test_resnet={os.path.join(work, "teacher")}'
    common = ['--dataset', 'digits', '--teacher', teacher, '--num-samples', str(args.num_samples), '--topk',
              str(args.topk), '--aug', args.aug, '--seed', '0', '--workers', '1', '--no-progress', '--device', 'cpu']
    fp32_dir, amp_dir = os.path.join(work, 'rd_fp32'), os.path.join(work, 'rd_bf16')
    reinforce.main(common + ['--output', fp32_dir])
    reinforce.main(common + ['--amp', '--amp-dtype', 'bfloat16', '--output', amp_dir])
    result = compare(fp32_dir, amp_dir, num_classes=10)
    result.update(teacher=teacher, num_samples=args.num_samples, topk=args.topk, aug=args.aug,
                  versions=software_versions())
    print(json.dumps({k: v for k, v in result.items() if k != 'versions'}, indent=2))
    if args.results_file:
        with atomic_write(args.results_file, 'w') as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == '__main__':
    main()
