"""Checking a reinforced dataset against its ``reinforce.json`` (``--verify``) and summarising it (``--stats``)."""
import contextlib
import copy
import glob
import json
import logging
import math
import os
import re
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch

from .. import storage
from ..io import atomic_write, sha256_file
from .augment import decode_image, needs_partner, replay
from .format import (
    CHECKSUMS_MEMBER,
    LABEL_MAP_FIELDS,
    LABEL_MAP_KIND,
    META_NAME,
    RECORD_FIELDS,
    SHARD_RE,
    aug_has_mix,
    check_records,
    decode_records,
    dtype_from_descr,
    iter_listed_samples,
    iter_shard,
    listed_shard_bytes,
    load_meta,
    meta_image_order,
    sample_checksum,
)
from .label_maps import check_label_map_records, label_map_stats, storage_comparison
from .partners import PartnerImages

_logger = logging.getLogger(__name__)


FP16_RTOL = 2.0 ** -10  # float16 keeps 11 significant bits: stored probabilities are within 2**-11 relative
DEFAULT_VERIFY_ATOL = 1e-4
INCOMPLETE_RUN = 'incomplete run: rerun the same command to finish'
SIDECAR_RE = re.compile(r'^\.(\d{6})\.json$')


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


# ----------------------------------------------------------------------------------------------------------------
# reinforce.json against itself, its sidecars and an interrupted run
# ----------------------------------------------------------------------------------------------------------------

def incomplete_run(directory: str) -> Optional[str]:
    """A message when ``directory`` is an interrupted reinforce.py output (shards or sidecars but no reinforce.json),
    else None."""
    if not os.path.isdir(directory) or os.path.isfile(os.path.join(directory, META_NAME)):
        return None
    names = os.listdir(directory)
    shards = [n for n in names if SHARD_RE.match(n)]
    sidecars = [n for n in names if SIDECAR_RE.match(n)]
    if not shards and not sidecars and 'args.yaml' not in names:
        return None
    return (f'{directory}: {INCOMPLETE_RUN} (no {META_NAME} yet; {len(sidecars)} finished shard(s), '
            f'{len(shards)} shard file(s))')


def _json_normal(value: Any) -> Any:
    return json.loads(json.dumps(value))


def meta_problems(meta: Dict[str, Any]) -> List[str]:
    """Entries of reinforce.json that disagree with the configuration copy it carries (``config``, what the shards
    were written with) or with its own record layout; each line names the file and the key.

    An edit of e.g. ``augmentation.ra_magnitude``, a teacher's ``mean`` or ``num_classes`` shows up here.
    """
    path = meta.get('_path', META_NAME)
    problems = []
    config = meta.get('config')
    if isinstance(config, dict):
        pairs: List[Tuple[str, Any, Any]] = [
            (k, meta.get(k), config.get(k)) for k in ('schema_version', 'augmentation', 'num_samples', 'topk',
                                                       'num_classes', 'seed', 'shard_size', 'record_dtype')]
        if 'image_order' in config:
            pairs.append(('image_order', meta.get('image_order'), config['image_order']))
        if isinstance(config.get('dataset'), dict):
            pairs.append(('num_images', meta.get('num_images'), config['dataset'].get('num_images')))
        teachers, copies = meta.get('teachers') or [], config.get('teachers') or []
        if len(teachers) != len(copies):
            pairs.append(('teachers', len(teachers), len(copies)))
        for m, (t, c) in enumerate(zip(teachers, copies)):
            pairs += [(f'teachers[{m}].{k}', t.get(k) if isinstance(t, dict) else None, v) for k, v in c.items()]
        for key, value, copy_value in pairs:
            if _json_normal(value) != _json_normal(copy_value):
                problems.append(f'{path}: {key} is {value!r} but its config copy (what the shards were written '
                                f'with) says {copy_value!r}')
    if meta.get('record_dtype'):
        dtype = dtype_from_descr(meta['record_dtype'])
        k = dtype['ids'].shape[0] if dtype['ids'].shape else 1
        if k != int(meta['topk']):
            problems.append(f'{path}: topk is {meta["topk"]} but record_dtype holds top-{k}')
        if (int(meta['num_classes']) > 65535) != (dtype['ids'].base.itemsize > 2):
            problems.append(f'{path}: num_classes {meta["num_classes"]} does not fit record_dtype ids '
                            f'({dtype["ids"].base})')
    return problems


def sidecar_problems(directory: str, meta: Dict[str, Any]) -> List[Dict[str, str]]:
    """Per-shard sidecars (``.NNNNNN.json``) whose configuration or checksum differs from reinforce.json."""
    config, problems = meta.get('config'), []
    listed = {s['name']: s for s in meta.get('shards', [])}
    for path in sorted(glob.glob(os.path.join(glob.escape(directory), '.[0-9]*.json'))):
        m = SIDECAR_RE.match(os.path.basename(path))
        if not m:
            continue
        name = f'{m.group(1)}.tar'
        try:
            with open(path) as f:
                info = json.load(f)
        except (OSError, ValueError) as e:
            problems.append({'shard': name, 'problem': f'unreadable sidecar {path} ({e})'})
            continue
        if config is not None and info.get('config') != config:
            problems.append({'shard': name, 'problem': f'sidecar {path} was written with another configuration '
                                                       f'than {meta.get("_path", META_NAME)} says'})
        elif name in listed and info.get('sha256') != listed[name].get('sha256'):
            problems.append({'shard': name, 'problem': f'sidecar {path} and {META_NAME} disagree on the sha256'})
    return problems


# ----------------------------------------------------------------------------------------------------------------
# --verify
# ----------------------------------------------------------------------------------------------------------------

class _ShardChecker:
    """Checks the samples of every shard in dataset order (keys, labels, records, schema-2 checksums and indices)."""

    def __init__(self, meta: Dict[str, Any], picks: Dict[int, int], record_check: Optional[Callable] = None):
        self.meta = meta
        self.record_check = record_check  # label maps: label_maps.check_label_map_records instead of check_records
        self.num_classes, self.num_samples = int(meta['num_classes']), int(meta['num_samples'])
        self.topk = int(meta['topk'])
        self.dtype = dtype_from_descr(meta['record_dtype']) if meta.get('record_dtype') else None
        self.checksums = int(meta['schema_version']) >= 2
        self.order = meta_image_order(meta) if self.checksums else None
        self.picks = picks
        self.keys: Dict[str, str] = {}
        self.replays: List[Tuple[str, bytes, np.void, int]] = []

    def sample(self, name: str, position: int, start: int, sample: Dict[str, Any]) -> None:
        """Check one sample (``position`` in shard ``name``, whose first image is global position ``start``)."""
        where = f'shard {name} key {sample["key"]}'
        if sample['key'] in self.keys:
            raise ValueError(f'{where}: duplicate key (also in shard {self.keys[sample["key"]]})')
        self.keys[sample['key']] = name
        if not 0 <= sample['label'] < self.num_classes:
            raise ValueError(f'{where}: label {sample["label"]} outside 0..{self.num_classes - 1}')
        arr = decode_records(sample['records'], where, LABEL_MAP_FIELDS if self.record_check else RECORD_FIELDS)
        if self.dtype is not None and arr.dtype != self.dtype:
            raise ValueError(f'{where}: records have dtype {arr.dtype.descr}, {META_NAME} says record_dtype '
                             f'{self.dtype.descr}')
        if self.record_check is not None:
            self.record_check(arr, where, self.meta)
        else:
            check_records(arr, where, self.num_classes, self.num_samples, self.topk)
        if self.checksums:
            self._check_info(name, position, start, sample, where)
        if start + position in self.picks:
            self.replays.append((where, sample['image'], arr[self.picks[start + position]], sample['label']))

    def _check_info(self, name: str, position: int, start: int, sample: Dict[str, Any], where: str) -> None:
        info = sample['info']
        if info is None:
            raise ValueError(f'{where}: no checksum (the shard lacks its {CHECKSUMS_MEMBER} table, schema 2, or it '
                             f'has fewer rows than samples)')
        if sample_checksum(name, position, sample['key'], info['index'], sample['members']) != info['xxh3']:
            raise ValueError(f'{where} (sample {position}): checksum mismatch: the sample was modified or moved')
        if start + position < len(self.order) and int(self.order[start + position]) != info['index']:
            raise ValueError(f'{where}: dataset index {info["index"]} is not the one image_order places at '
                             f'position {start + position} ({int(self.order[start + position])})')

    def shard(self, entry: Dict[str, Any], path: str, start: int) -> Tuple[int, Optional[str]]:
        """(samples read, problem or None) of one shard."""
        name, count = entry['name'], 0
        try:
            for sample in iter_shard(path, f'shard {name}'):
                self.sample(name, count, start, sample)
                count += 1
        except ValueError as e:
            return count, str(e)
        if count != int(entry['count']):
            return count, f'{count} samples, {META_NAME} says {entry["count"]}'
        return count, None


def _check_files(directory: str, meta: Dict[str, Any]) -> List[Dict[str, str]]:
    """Shards present, listed, of the listed size and sha256."""
    problems = []
    listed = {s['name'] for s in meta['shards']}
    for name in sorted(os.listdir(directory)):
        if name.endswith('.tar') and not name.startswith('.') and name not in listed:
            problems.append({'shard': name, 'problem': f'not listed in {META_NAME}'})
    for entry in meta['shards']:
        path = os.path.join(directory, entry['name'])
        if not os.path.isfile(path):
            problems.append({'shard': entry['name'], 'problem': 'missing'})
            continue
        size = os.path.getsize(path)
        if size != entry['bytes']:
            problems.append({'shard': entry['name'],
                             'problem': f'{size} bytes, {META_NAME} says {entry["bytes"]} (truncated?)'})
        elif sha256_file(path) != entry['sha256']:
            problems.append({'shard': entry['name'], 'problem': f'sha256 differs from {META_NAME} (modified?)'})
    return problems


def _verify_remote_shards(url: str, meta: Dict[str, Any], checker: '_ShardChecker') -> Tuple[List[Dict[str, str]], int]:
    """(problems, images read) of the shards under a remote folder: listed (S3 listing), then each shard fetched to
    a temporary file (one at a time) and checked as a local one: size, sha256 and every sample."""
    base, problems, position, images = url.rstrip('/'), [], 0, 0
    listed = {s['name'] for s in meta['shards']}
    if base.startswith('s3://'):
        for name in sorted(storage.list_sizes(base)):
            if SHARD_RE.match(name) and name not in listed:
                problems.append({'shard': name, 'problem': f'not listed in {META_NAME}'})
    for entry in meta['shards']:
        try:
            with storage.fetched(f'{base}/{entry["name"]}') as path:
                size = os.path.getsize(path)
                if size != entry['bytes']:
                    problems.append({'shard': entry['name'],
                                     'problem': f'{size} bytes, {META_NAME} says {entry["bytes"]} (truncated?)'})
                elif sha256_file(path) != entry['sha256']:
                    problems.append({'shard': entry['name'], 'problem': f'sha256 differs from {META_NAME} (modified?)'})
                count, problem = checker.shard(entry, path, position)
                images += count
                if problem:
                    problems.append({'shard': entry['name'], 'problem': problem})
        except storage.StorageError as e:
            problems.append({'shard': entry['name'], 'problem': f'missing or unreadable ({e})'})
        position += int(entry['count'])
    return problems, images


def check_teacher_matches(teacher, meta: Dict[str, Any], where_flag: str = '--teacher') -> None:
    """The teacher given to ``--verify`` must be the one the shards were written with: names, and each member's
    input size, mean, std and interpolation (``--teacher-img-size`` included).

    Raises:
        ValueError: naming the flag, the member and ``reinforce.json``.
    """
    names = [t['name'] for t in meta['teachers']]
    if list(teacher.names) != names:
        raise ValueError(f'{where_flag} {" ".join(teacher.names)} does not match the shards\' teachers '
                         f'{" ".join(names)} ({meta["_path"]})')
    for m, (cfg, stored) in enumerate(zip(teacher.member_cfgs, meta['teachers'])):
        for key in ('input_size', 'mean', 'std', 'interpolation'):
            if key in stored and _json_normal(cfg[key]) != _json_normal(stored[key]):
                hint = ' (pass the --teacher-img-size the shards were written with)' if key == 'input_size' else ''
                raise ValueError(f'{where_flag} {names[m]}: {key} {cfg[key]} but {meta["_path"]} says '
                                 f'{stored[key]}{hint}')


def _replay_problems(meta: Dict[str, Any], replays: List[Tuple[str, bytes, np.void, int]], teacher,
                     device: torch.device, amp_dtype: Optional[torch.dtype], atol: float,
                     rtol: float) -> List[str]:
    """Replay stored augmentations through ``teacher``; one line per mismatch."""
    failures = []
    partners = PartnerImages(meta) if aug_has_mix(meta['augmentation'].get('name')) else None
    for where, data, rec, _ in replays:
        img = decode_image(data)
        partner = partners.get(int(rec['mix_ref']))[2] if partners and needs_partner(rec) else None  # +mix
        inputs = [replay(img, rec, meta, m, partner=partner).unsqueeze(0).to(device)
                  for m in range(len(meta['teachers']))]
        amp = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
        with torch.inference_mode(), amp:
            fresh = teacher.forward_members(inputs)[0]
        msg = compare_topk(fresh, rec['ids'], rec['probs'], atol=atol, rtol=rtol)
        if msg:
            failures.append(f'{where}: replay mismatch: {msg}')
    return failures


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

    Checks: reinforce.json against its config copy and the sidecars; shard present, listed, size and sha256, sample
    count, complete samples with an image member, labels and ids ``< num_classes``, decodable records of the listed
    dtype with ``num_samples`` rows of top-``topk``, finite non-negative probabilities sorted descending and summing
    to <= 1 (+ float16 tolerance), distinct ids, unique keys, (schema 2) each sample's checksum and dataset index,
    the total image count. With ``teacher``: ``num_replays`` random stored augmentations are replayed (``replay``)
    and the teacher's fresh top-k compared with the stored one.

    Returns:
        ``{'ok', 'shards', 'images', 'problems': [{'shard', 'problem'}], 'replays', 'replay_failures'}``.

    Raises:
        FileNotFoundError: no reinforce.json (``INCOMPLETE_RUN`` when the directory is an interrupted run).
        ValueError: a ``teacher`` other than the shards'.
    """
    message = incomplete_run(directory)
    if message:
        raise FileNotFoundError(message)
    meta = load_meta(directory)
    if teacher is not None:
        check_teacher_matches(teacher, meta)
    record_check = None
    if meta.get('kind') == LABEL_MAP_KIND:  # label maps: every map checked, no stored augmentation to replay
        record_check = check_label_map_records
        num_replays = 0
    problems = [{'shard': META_NAME, 'problem': p} for p in meta_problems(meta)]
    remote = storage.is_remote(directory)
    if not remote:
        problems += sidecar_problems(directory, meta) + _check_files(directory, meta)
    total_images = sum(int(s['count']) for s in meta['shards'])
    rng = np.random.default_rng(seed)
    picks: Dict[int, int] = {}
    if teacher is not None and num_replays > 0 and total_images:
        chosen = rng.choice(total_images, size=min(num_replays, total_images), replace=False)
        picks = {int(p): int(rng.integers(int(meta['num_samples']))) for p in chosen}
    checker = _ShardChecker(meta, picks, record_check)
    position = images = 0
    if remote:
        remote_problems, images = _verify_remote_shards(directory, meta, checker)
        problems += remote_problems
    for entry in [] if remote else meta['shards']:
        path = os.path.join(directory, entry['name'])
        if os.path.isfile(path):
            count, problem = checker.shard(entry, path, position)
            images += count
            if problem:
                problems.append({'shard': entry['name'], 'problem': problem})
        position += int(entry['count'])
    if images != int(meta.get('num_images', images)) and not problems:
        problems.append({'shard': '*', 'problem': f'{images} images, {META_NAME} says {meta["num_images"]}'})
    failures = []
    if teacher is not None and checker.replays:
        failures = _replay_problems(meta, checker.replays, teacher, torch.device(device), amp_dtype, atol, rtol)
        problems += [{'shard': f.split()[1], 'problem': f} for f in failures]
    return {'ok': not problems, 'shards': len(meta['shards']), 'images': images, 'problems': problems,
            'replays': len(checker.replays), 'replay_failures': failures}


# ----------------------------------------------------------------------------------------------------------------
# --stats
# ----------------------------------------------------------------------------------------------------------------

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


class _StatsAccumulator:
    """Running sums of ``compute_stats`` over validated samples."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.n_aug = self.correct = self.images = self.agree = self.image_bytes = 0
        self.mass_sum = self.ent_sum = 0.0

    def add(self, arr: np.ndarray, label: int, image_bytes: int) -> None:
        probs = arr['probs'].astype(np.float64)
        ids = arr['ids'].astype(np.int64)
        self.image_bytes += image_bytes
        self.correct += int((ids[:, 0] == label).sum())
        self.mass_sum += float(probs.sum())
        self.ent_sum += float(smooth_entropy(probs, self.num_classes).sum())
        self.n_aug += len(arr)
        self.images += 1
        # mean of the densified targets without building them: uniform residual everywhere, then top-k
        k = ids.shape[1]
        scale = np.where(probs.sum(1) > 1, 1.0 / probs.sum(1), 1.0)
        p = probs * scale[:, None]
        share = np.clip(1.0 - p.sum(1), 0, None) / max(self.num_classes - k, 1)
        dense = np.full(self.num_classes, share.sum())
        np.add.at(dense, ids.ravel(), (p - share[:, None]).ravel())
        self.agree += int(int(dense.argmax()) == label)


def compute_stats(directory: str) -> Dict[str, Any]:
    """Teacher accuracy on the stored augmentations (top-1 id == label), mean top-k mass, mean entropy of the
    densified (smooth) target, image-level label agreement (argmax of the mean densified target over an image's
    augmentations == label), and bytes per augmentation = (shard bytes - original image bytes) / (images x
    num_samples).

    Every sample is validated first (labels, records as ``--verify`` checks them).

    Raises:
        FileNotFoundError: no reinforce.json or a listed shard is missing (``INCOMPLETE_RUN`` for an interrupted run).
        ValueError: naming the shard and key of the first invalid sample.
    """
    message = incomplete_run(directory)
    if message:
        raise FileNotFoundError(message)
    meta = load_meta(directory)
    if meta.get('kind') == LABEL_MAP_KIND:
        return label_map_stats(directory, meta)
    num_classes, num_samples, topk = int(meta['num_classes']), int(meta['num_samples']), int(meta['topk'])
    acc = _StatsAccumulator(num_classes)
    for _, sample, where in iter_listed_samples(directory, meta):
        arr = decode_records(sample['records'], where)
        check_records(arr, where, num_classes, num_samples, topk)
        acc.add(arr, sample['label'], len(sample['image']))
    total_bytes = listed_shard_bytes(directory, meta)
    images, n_aug = acc.images, acc.n_aug
    stats = {
        'directory': storage.absolute(directory),
        'num_images': images,
        'num_samples': num_samples,
        'topk': topk,
        'num_classes': num_classes,
        'augmentations': n_aug,
        'teacher_accuracy': acc.correct / n_aug if n_aug else 0.0,
        'mean_topk_mass': acc.mass_sum / n_aug if n_aug else 0.0,
        'mean_entropy': acc.ent_sum / n_aug if n_aug else 0.0,
        'max_entropy': math.log(num_classes),
        'label_agreement': acc.agree / images if images else 0.0,
        'total_bytes': total_bytes,
        'image_bytes': acc.image_bytes,
        'bytes_per_augmentation': (total_bytes - acc.image_bytes) / (images * num_samples) if images else 0.0,
        'record_bytes_per_augmentation':
            dtype_from_descr(meta['record_dtype']).itemsize if meta.get('record_dtype') else None,
        'bytes_per_image': (total_bytes - acc.image_bytes) / images if images else 0.0,
        'teacher_forwards_per_image': num_samples,
        **storage_comparison(num_classes),  # DR Table 9's methods in this format, for the same classes
    }
    bad = [k for k, v in stats.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise ValueError(f'{directory}: statistics {", ".join(bad)} are not finite')
    return stats


def write_stats(directory: str, stats: Dict[str, Any], filename: str = 'stats.json') -> str:
    """Write ``stats`` to ``directory/filename`` atomically (temporary files of an interrupted write are removed)."""
    for leftover in glob.glob(os.path.join(glob.escape(directory), f'.{filename}.*.tmp')):
        _logger.info(f'Removing {leftover} (left by an interrupted run)')
        os.unlink(leftover)
    path = os.path.join(directory, filename)
    with atomic_write(path, 'w') as f:
        json.dump(stats, f, indent=1)
    return path


def copy_meta_without_private(meta: Dict[str, Any]) -> Dict[str, Any]:
    """``meta`` without loader-private keys (``_path``)."""
    out = copy.deepcopy(meta)
    out.pop('_path', None)
    return out
