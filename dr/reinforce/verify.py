"""Checking a reinforced dataset against its ``reinforce.json`` (``--verify``) and summarising it (``--stats``)."""
import contextlib
import copy
import json
import logging
import math
import os
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import torch

from ..io import atomic_write, sha256_file
from .augment import decode_image, needs_partner, replay
from .format import (
    META_NAME,
    aug_has_mix,
    check_records,
    decode_records,
    dtype_from_descr,
    iter_shard,
    load_meta,
)
from .partners import PartnerImages

_logger = logging.getLogger(__name__)


FP16_RTOL = 2.0 ** -10  # float16 keeps 11 significant bits: stored probabilities are within 2**-11 relative
DEFAULT_VERIFY_ATOL = 1e-4


def compare_topk(fresh: torch.Tensor, ids: np.ndarray, probs: np.ndarray, atol: float = DEFAULT_VERIFY_ATOL,
                 rtol: float = FP16_RTOL) -> Optional[str]:
    """Compare a fresh probability vector with a stored top-k (ids may swap where probabilities tie).

    Returns:
        None when the stored probabilities match the fresh ones at the stored ids and the fresh top-k values match
        the stored values, within ``atol + rtol * p``; otherwise a description of the first mismatch.
    """
    fresh = fresh.float().cpu()
    stored = torch.from_numpy(probs.astype(np.float32))
    at_ids = fresh[torch.from_numpy(ids.astype(np.int64))]
    tol = atol + rtol * stored.abs()
    bad = (at_ids - stored).abs() > tol
    if bad.any():
        j = int(bad.nonzero()[0])
        return f'class {int(ids[j])}: stored p={float(stored[j]):.6f}, fresh p={float(at_ids[j]):.6f}'
    top = fresh.topk(len(ids)).values
    bad = (top - stored).abs() > tol
    if bad.any():
        j = int(bad.nonzero()[0])
        return f'rank {j} of top-{len(ids)}: stored p={float(stored[j]):.6f}, fresh p={float(top[j]):.6f}'
    return None


def verify_dir(
        directory: str,
        teacher=None,
        num_replays: int = 0,
        seed: int = 0,
        atol: float = DEFAULT_VERIFY_ATOL,
        rtol: float = FP16_RTOL,
        device: Union[str, torch.device] = 'cpu',
        amp_dtype: Optional[torch.dtype] = None,
) -> Dict[str, Any]:
    """Check every shard against ``reinforce.json`` and optionally replay stored augmentations through a teacher.

    Checks: shard present, size and sha256, sample count, complete samples with an image member, labels and ids
    ``< num_classes``, decodable records with ``num_samples`` rows of top-``topk``, finite non-negative probabilities
    summing to <= 1 (+ float16 tolerance), unique keys, total image count. With ``teacher``: ``num_replays`` random
    stored augmentations are replayed (``replay``) and the teacher's fresh top-k compared with the stored one.

    Returns:
        ``{'ok', 'shards', 'images', 'problems': [{'shard', 'problem'}], 'replays', 'replay_failures'}``.
    """
    meta = load_meta(directory)
    problems: List[Dict[str, str]] = []
    num_classes, num_samples, topk = int(meta['num_classes']), int(meta['num_samples']), int(meta['topk'])
    total_images = sum(int(s['count']) for s in meta['shards'])
    rng = np.random.default_rng(seed)
    picks: Dict[int, int] = {}
    if teacher is not None and num_replays > 0 and total_images:
        chosen = rng.choice(total_images, size=min(num_replays, total_images), replace=False)
        picks = {int(p): int(rng.integers(num_samples)) for p in chosen}
    replays: List[Tuple[str, bytes, np.void, int]] = []
    keys, position, images = set(), 0, 0
    listed = {s['name'] for s in meta['shards']}
    for name in sorted(os.listdir(directory)):
        if name.endswith('.tar') and name not in listed:
            problems.append({'shard': name, 'problem': f'not listed in {META_NAME}'})
    for entry in meta['shards']:
        name = entry['name']
        path = os.path.join(directory, name)
        start = position
        position += int(entry['count'])
        if not os.path.isfile(path):
            problems.append({'shard': name, 'problem': 'missing'})
            continue
        size = os.path.getsize(path)
        if size != entry['bytes']:
            problems.append({'shard': name, 'problem': f'{size} bytes, {META_NAME} says {entry["bytes"]} (truncated?)'})
        elif sha256_file(path) != entry['sha256']:
            problems.append({'shard': name, 'problem': f'sha256 differs from {META_NAME} (modified?)'})
        count = 0
        try:
            for sample in iter_shard(path, f'shard {name}'):
                where = f'shard {name} key {sample["key"]}'
                if sample['key'] in keys:
                    raise ValueError(f'{where}: duplicate key')
                keys.add(sample['key'])
                if not 0 <= sample['label'] < num_classes:
                    raise ValueError(f'{where}: label {sample["label"]} outside 0..{num_classes - 1}')
                arr = decode_records(sample['records'], where)
                check_records(arr, where, num_classes, num_samples, topk)
                if start + count in picks:
                    replays.append((where, sample['image'], arr[picks[start + count]], sample['label']))
                count += 1
        except ValueError as e:
            problems.append({'shard': name, 'problem': str(e)})
            images += count
            continue
        images += count
        if count != int(entry['count']):
            problems.append({'shard': name, 'problem': f'{count} samples, {META_NAME} says {entry["count"]}'})
    if images != int(meta.get('num_images', images)) and not problems:
        problems.append({'shard': '*', 'problem': f'{images} images, {META_NAME} says {meta["num_images"]}'})

    failures = []
    if teacher is not None and replays:
        device = torch.device(device)
        names = [t['name'] for t in meta['teachers']]
        if list(teacher.names) != names:
            raise ValueError(f'--teacher {" ".join(teacher.names)} does not match the shards\' teachers '
                             f'{" ".join(names)} ({meta["_path"]})')
        partners = PartnerImages(meta) if aug_has_mix(meta['augmentation'].get('name')) else None
        for where, data, rec, _ in replays:
            img = decode_image(data)
            partner = partners.get(int(rec['mix_ref']))[2] if partners and needs_partner(rec) else None  # +mix
            inputs = [replay(img, rec, meta, m, partner=partner).unsqueeze(0).to(device) for m in range(len(names))]
            amp = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
            with torch.inference_mode(), amp:
                fresh = teacher.forward_members(inputs)[0]
            msg = compare_topk(fresh, rec['ids'], rec['probs'], atol=atol, rtol=rtol)
            if msg:
                failures.append(f'{where}: replay mismatch: {msg}')
                problems.append({'shard': where.split()[1], 'problem': f'replay mismatch at {where}: {msg}'})
    return {'ok': not problems, 'shards': len(meta['shards']), 'images': images, 'problems': problems,
            'replays': len(replays), 'replay_failures': failures}


def smooth_entropy(ids_probs: np.ndarray, num_classes: int) -> np.ndarray:
    """Entropy (nats) of ``densify(ids, probs, num_classes, 'smooth')`` per record, in closed form."""
    p = ids_probs.astype(np.float64)
    k = p.shape[-1]
    total = p.sum(-1)
    scale = np.where(total > 1, 1.0 / np.maximum(total, 1e-30), 1.0)
    p = p * scale[:, None]
    resid = np.clip(1.0 - p.sum(-1), 0, None)
    with np.errstate(divide='ignore', invalid='ignore'):
        h = -np.where(p > 0, p * np.log(p), 0.0).sum(-1)
        other = num_classes - k
        if other > 0:
            h += np.where(resid > 0, -resid * np.log(resid / other), 0.0)
        else:  # densify renormalises the top-k when there is no other class
            h = -np.where(p > 0, (p / p.sum(-1, keepdims=True)) * np.log(p / p.sum(-1, keepdims=True)), 0.0).sum(-1)
    return h


def compute_stats(directory: str) -> Dict[str, Any]:
    """Teacher accuracy on the stored augmentations (top-1 id == label), mean top-k mass, mean entropy of the
    densified (smooth) target, image-level label agreement (argmax of the mean densified target over an image's
    augmentations == label), and bytes per augmentation = (shard bytes - original image bytes) / (images x
    num_samples)."""
    meta = load_meta(directory)
    num_classes, num_samples = int(meta['num_classes']), int(meta['num_samples'])
    n_aug = correct = images = agree = 0
    mass_sum = ent_sum = 0.0
    total_bytes = image_bytes = 0
    for entry in meta['shards']:
        path = os.path.join(directory, entry['name'])
        total_bytes += os.path.getsize(path)
        for sample in iter_shard(path, f'shard {entry["name"]}'):
            arr = decode_records(sample['records'], f'shard {entry["name"]} key {sample["key"]}')
            image_bytes += len(sample['image'])
            probs = arr['probs'].astype(np.float64)
            ids = arr['ids'].astype(np.int64)
            label = sample['label']
            correct += int((ids[:, 0] == label).sum())
            mass_sum += float(probs.sum())
            ent_sum += float(smooth_entropy(probs, num_classes).sum())
            n_aug += len(arr)
            images += 1
            # mean of the densified targets without building them: uniform residual everywhere, then top-k
            k = ids.shape[1]
            scale = np.where(probs.sum(1) > 1, 1.0 / probs.sum(1), 1.0)
            p = probs * scale[:, None]
            share = np.clip(1.0 - p.sum(1), 0, None) / max(num_classes - k, 1)
            dense = np.full(num_classes, share.sum())
            np.add.at(dense, ids.ravel(), (p - share[:, None]).ravel())
            agree += int(int(dense.argmax()) == label)
    stats = {
        'directory': os.path.abspath(directory),
        'num_images': images,
        'num_samples': num_samples,
        'topk': int(meta['topk']),
        'num_classes': num_classes,
        'augmentations': n_aug,
        'teacher_accuracy': correct / n_aug if n_aug else 0.0,
        'mean_topk_mass': mass_sum / n_aug if n_aug else 0.0,
        'mean_entropy': ent_sum / n_aug if n_aug else 0.0,
        'max_entropy': math.log(num_classes),
        'label_agreement': agree / images if images else 0.0,
        'total_bytes': total_bytes,
        'image_bytes': image_bytes,
        'bytes_per_augmentation': (total_bytes - image_bytes) / (images * num_samples) if images else 0.0,
        'record_bytes_per_augmentation':
            dtype_from_descr(meta['record_dtype']).itemsize if meta.get('record_dtype') else None,
    }
    return stats


def write_stats(directory: str, stats: Dict[str, Any], filename: str = 'stats.json') -> str:
    path = os.path.join(directory, filename)
    with atomic_write(path, 'w') as f:
        json.dump(stats, f, indent=1)
    return path


def copy_meta_without_private(meta: Dict[str, Any]) -> Dict[str, Any]:
    """``meta`` without loader-private keys (``_path``)."""
    out = copy.deepcopy(meta)
    out.pop('_path', None)
    return out
