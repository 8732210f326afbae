"""The reinforcement job behind ``reinforce.py``: plan the shards, build the pieces, run the teacher, merge.

The job is three named pieces wired by :class:`Reinforcer`:

* :class:`ShardPlan` (what goes where): the images are written in a seeded permutation of the dataset order
  (``format.image_order``, recorded in reinforce.json as ``image_order``), so every shard is a random mix of classes;
  shard ``s`` holds positions ``[s * shard_size, (s + 1) * shard_size)`` of that order and each sample stores its
  dataset index. Rank ``r`` of ``W`` writes shards ``r, r + W, ...``. Augmentation parameters of image ``i`` come from
  ``numpy.random.default_rng([seed, i])`` and teacher batches never span shards, so a shard's bytes depend only on the
  configuration and its index: not on world size, worker count or resumption.
* :class:`ShardStore` (the output directory): a finished shard is written to a temporary name, fsynced and renamed,
  then its ``.NNNNNN.json`` sidecar (count, sha256, sizes, configuration) is written the same way. A rerun skips shards
  whose sidecar matches the configuration and whose sha256 verifies, and redoes the others; an output directory of
  another configuration is refused. Rank 0 merges the sidecars into ``reinforce.json``.
* :class:`TeacherBatcher` (the main process's work): data-loader workers (:class:`AugmentedImages`) decode each image
  once, sample its records and run the PIL stages of the augmentations (uint8 tensors, one per distinct member
  resolution); the batcher normalises, erases, batches augmentations of several images together and runs the teacher
  ensemble (AMP / channels-last optional) as soon as a batch is full.
"""
import collections
import concurrent.futures
import dataclasses
import datetime
import functools
import hashlib
import json
import logging
import math
import os
import time
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .. import storage
from ..io import atomic_write, sha256_file, software_versions
from .augment import (
    AugmentSpec,
    augment_partners_uint8,
    augment_uint8,
    decode_image,
    erase_batch,
    erase_fill,
    mix_batch,
    normalize_uint8,
    sample_mix_records,
    sample_records,
)
from .format import (
    FLAG_ERASE,
    META_NAME,
    SCHEMA_VERSION,
    SHARD_RE,
    build_shard,
    encode_records,
    image_order,
    record_dtype,
    shard_name,
)
from .sources import ImageSource

_logger = logging.getLogger(__name__)


CRASH_ENV = 'DR_REINFORCE_CRASH_AFTER_SHARDS'  # test hook: die (os._exit) while writing the shard after k shards
RUN_FILES = (META_NAME, 'args.yaml', 'stats.json')  # written atomically: a kill leaves '.<name>.*.tmp' behind

View = Tuple[Tuple[int, int], str]  # (output (h, w), interpolation) of one uint8 augmentation tensor
Slice = Tuple[Dict[str, Any], Dict[str, Any], int, int]  # (image entry, loader chunk, offset, count) in a batch


def image_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of image ``index``'s augmentations (independent of rank, worker and resume)."""
    return np.random.default_rng([int(seed), int(index)])


def rank_shards(num_shards: int, rank: int, world_size: int) -> List[int]:
    """Shards written by ``rank``: ``rank, rank + world_size, ...`` (disjoint, together all shards)."""
    return list(range(rank, num_shards, world_size))


def _read_text(path: str) -> str:
    with open(path) as f:
        return f.read()


def sidecar_name(index: int) -> str:
    return f'.{int(index):06d}.json'


def teacher_views(member_cfgs: Sequence[Dict[str, Any]]) -> Tuple[List[View], List[int]]:
    """Distinct (size, interpolation) views of the ensemble members and each member's view index: members sharing
    a view share one uint8 augmentation tensor."""
    views: List[View] = []
    member_view: List[int] = []
    for cfg in member_cfgs:
        view = ((int(cfg['input_size'][1]), int(cfg['input_size'][2])), cfg['interpolation'])
        if view not in views:
            views.append(view)
        member_view.append(views.index(view))
    return views, member_view


def _flatten(d: Any, prefix: str = '') -> Dict[str, Any]:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flatten(v, f'{prefix}.{k}' if prefix else str(k)))
        return out
    return {prefix: d}


def config_differences(a: Dict[str, Any], b: Dict[str, Any]) -> List[str]:
    """Human-readable ``key: old != new`` lines between two configuration dicts."""
    fa, fb = _flatten(a), _flatten(b)
    return [f'{k}: {fa.get(k)!r} != {fb.get(k)!r}' for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)]


# ----------------------------------------------------------------------------------------------------------------
# plan: which images go into which shard
# ----------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class ShardPlan:
    """Images -> shards: shard ``s`` holds positions ``[s * shard_size, (s + 1) * shard_size)`` of ``order`` (the
    source dataset index stored at each position)."""
    order: np.ndarray
    shard_size: int

    @property
    def num_images(self) -> int:
        return len(self.order)

    @property
    def num_shards(self) -> int:
        return math.ceil(self.num_images / self.shard_size)

    def shard_range(self, index: int) -> Tuple[int, int]:
        """Positions ``[lo, hi)`` of shard ``index``."""
        return index * self.shard_size, min((index + 1) * self.shard_size, self.num_images)

    def shard_of(self, position: int) -> int:
        return position // self.shard_size

    def indices(self, shards: Sequence[int]) -> List[Tuple[int, int]]:
        """(position, source index) of every image of ``shards``, in writing order."""
        return [(p, int(self.order[p])) for s in shards for p in range(*self.shard_range(s))]

    def mix_partners(self, position: int, group: int) -> List[int]:
        """Positions a ``+mix`` augmentation at ``position`` may mix with: the other images of its group of ``group``
        consecutive positions of its shard (the image itself when it is alone in its group)."""
        lo, hi = self.shard_range(self.shard_of(position))
        start = lo + (position - lo) // group * group
        mates = [q for q in range(start, min(start + group, hi)) if q != position]
        return mates or [position]


# ----------------------------------------------------------------------------------------------------------------
# workers: augmentations of each image
# ----------------------------------------------------------------------------------------------------------------

def _identity(x):
    return x


def _worker_init(_):
    torch.set_num_threads(1)


class AugmentedImages(Dataset):
    """Worker side: chunk ``pos`` = (image, range of its stored samples) -> uint8 augmentations of that range.

    Every chunk re-derives the image's full record array from ``image_rng(seed, index)`` (cheap) and augments only its
    range, so a chunk's content does not depend on the chunking; the first chunk of an image also carries the
    original bytes, label and records. Chunks bound the memory in flight (``num_samples`` may be thousands).

    ``+mix`` augmentations draw their partner among the other images of the image's group (``ShardPlan.mix_partners``
    with ``spec.mix_group``) after the image's own draws, from the same generator; the chunk then also carries the
    partners' uint8 augmentations (``mix_views``). Decoded images are kept in a small per-worker cache, as the
    images of a group are each other's partners.

    Args:
        items: (position, source index) per image, in writing order.
        plan: the shard plan (``+mix`` variants: partner groups and the source index at each position).
    """

    def __init__(self, source: ImageSource, items: Sequence[Tuple[int, int]], spec: AugmentSpec, dtype: np.dtype,
                 seed: int, num_samples: int, views: Sequence[View], num_classes: int, samples_per_item: int = 0,
                 plan: Optional[ShardPlan] = None):
        self.source, self.spec, self.dtype = source, spec, dtype
        self.seed, self.num_samples, self.views, self.num_classes = seed, num_samples, list(views), num_classes
        step = samples_per_item if samples_per_item > 0 else num_samples
        self.chunks = [(int(p), int(i), a, min(step, num_samples - a))
                       for p, i in items for a in range(0, num_samples, step)]
        if spec.has_mix and (plan is None or spec.mix_group < 1):
            raise ValueError(f'augmentation {spec.name} needs the shard plan and mix_group >= 1 to draw partners')
        self.plan = plan
        self._decoded: collections.OrderedDict[int, Any] = collections.OrderedDict()

    def _decode(self, index: int, src: Any = None) -> Any:
        """Source image ``index`` decoded (RGB PIL), through a small LRU cache."""
        if index in self._decoded:
            self._decoded.move_to_end(index)
            return self._decoded[index]
        src = src or self.source.get(index)
        try:
            img = decode_image(src.data)
        except Exception as e:
            raise ValueError(f'image {index} (key {src.key}): cannot decode ({e})') from e
        self._decoded[index] = img
        while len(self._decoded) > 2 * max(1, self.spec.mix_group) + 1:
            self._decoded.popitem(last=False)
        return img

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, pos: int) -> Dict[str, Any]:
        position, index, start, count = self.chunks[pos]
        src = self.source.get(index)
        if not 0 <= src.label < self.num_classes:
            raise ValueError(f'image {index} (key {src.key}): label {src.label} outside 0..{self.num_classes - 1} '
                             f'(check --num-classes)')
        img = self._decode(index, src)
        rng = image_rng(self.seed, index)
        records = sample_records(rng, img.width, img.height, self.spec, self.num_samples, self.dtype)
        partners = {}
        if self.spec.has_mix:
            mates = self.plan.mix_partners(position, self.spec.mix_group)
            partners = {q: self._decode(int(self.plan.order[q])) for q in mates}
            sample_mix_records(rng, records, mates, [partners[q].size for q in mates], self.spec)
        part = records[start:start + count]
        out = {'position': position, 'index': index, 'start': start, 'count': count,
               'views': [augment_uint8(img, part, self.spec, size, interp) for size, interp in self.views]}
        if self.spec.has_mix:
            out['mix_views'] = [augment_partners_uint8(partners, part, self.spec, size, interp)
                                for size, interp in self.views]
        if start == 0:
            out.update(key=src.key, ext=src.ext, image=src.data, label=src.label, records=records)
        return out


def create_augment_loader(dataset: AugmentedImages, workers: int, pin_memory: bool) -> DataLoader:
    """The data loader producing ``dataset``'s chunks in order (one item at a time, no collation)."""
    return DataLoader(
        dataset, batch_size=None, shuffle=False, num_workers=workers, collate_fn=_identity,
        worker_init_fn=_worker_init if workers else None, prefetch_factor=2 if workers else None,
        pin_memory=pin_memory, persistent_workers=False)


# ----------------------------------------------------------------------------------------------------------------
# main process: teacher batches
# ----------------------------------------------------------------------------------------------------------------

class TeacherBatcher:
    """Batches augmentations of several images and fills their records' ``ids``/``probs`` with the teacher's top-k.

    Batches are a fixed greedy partition of a shard's augmentations in (image, sample) order, flushed at the shard end
    by :meth:`flush`: their composition depends only on the shard, not on the chunking.
    """

    def __init__(self, teacher, spec: AugmentSpec, *, batch_size: int, topk: int, ids_dtype: np.dtype,
                 device: torch.device, amp_dtype: Optional[torch.dtype] = None, channels_last: bool = False):
        self.teacher, self.spec = teacher, spec
        self.batch_size, self.topk, self.ids_dtype = int(batch_size), int(topk), ids_dtype
        self.device, self.amp_dtype, self.channels_last = device, amp_dtype, channels_last
        self.views, self.member_view = teacher_views(teacher.member_cfgs)
        self.captured: Optional[List[List[torch.Tensor]]] = None  # benchmarks/tests: keep the teacher inputs
        self.seconds = 0.0  # main-process time in teacher batches (input prep, forward, top-k)
        self._pending: List[Slice] = []
        self._filled = 0

    def teacher_inputs(self, views_u8: Sequence[torch.Tensor], records: np.ndarray,
                       mix_views_u8: Optional[Sequence[torch.Tensor]] = None) -> List[torch.Tensor]:
        """Normalised (erased, and for ``+mix`` mixed with the partners' ``mix_views_u8``) teacher inputs, one per
        member, from the uint8 views of ``records``: the float32 operations of ``augment.apply_record``."""
        on_device = [v.to(self.device, non_blocking=True) for v in views_u8]
        partners = None
        if self.spec.has_mix and mix_views_u8 is not None:
            partners = [v.to(self.device, non_blocking=True) for v in mix_views_u8]
        out = []
        for m, cfg in enumerate(self.teacher.member_cfgs):
            fill = erase_fill(self.spec, cfg['mean'], cfg['std'])
            x = normalize_uint8(on_device[self.member_view[m]], cfg['mean'], cfg['std'])
            if self.spec.has_ra_re:
                x = erase_batch(x, records['re_box'], (records['flags'] & FLAG_ERASE) > 0, fill)
            if partners is not None:
                x2 = normalize_uint8(partners[self.member_view[m]], cfg['mean'], cfg['std'])
                if self.spec.has_ra_re:
                    x2 = erase_batch(x2, records['mix_re_box'], (records['mix_flags'] & FLAG_ERASE) > 0, fill)
                x = mix_batch(x, x2, records)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            out.append(x)
        return out

    @torch.inference_mode()
    def run_batch(self, slices: List[Slice]) -> None:
        """Teacher top-k for a batch of augmentation slices ``(image entry, loader chunk, offset, count)``."""
        t0 = time.perf_counter()
        views = [torch.cat([ch['views'][v][o:o + c] for _, ch, o, c in slices]) for v in range(len(self.views))]
        records = np.concatenate([e['records'][ch['start'] + o:ch['start'] + o + c] for e, ch, o, c in slices])
        mix_views = None
        if self.spec.has_mix:
            mix_views = [torch.cat([ch['mix_views'][v][o:o + c] for _, ch, o, c in slices])
                         for v in range(len(self.views))]
        inputs = self.teacher_inputs(views, records, mix_views)
        if self.captured is not None:
            self.captured.append(inputs)
        if self.amp_dtype is not None:
            with torch.autocast(device_type=self.device.type, dtype=self.amp_dtype):
                probs = self.teacher.forward_members(inputs)
        else:
            probs = self.teacher.forward_members(inputs)
        top_p, top_i = probs.float().topk(self.topk, dim=-1)
        top_p = top_p.half().cpu().numpy()
        top_i = top_i.cpu().numpy().astype(self.ids_dtype)
        n = 0
        for e, ch, o, c in slices:
            a = ch['start'] + o
            e['records']['ids'][a:a + c] = top_i[n:n + c]
            e['records']['probs'][a:a + c] = top_p[n:n + c]
            n += c
            if o + c == ch['count']:
                ch['views'] = ch['mix_views'] = None  # this chunk is done: free its pixels
        self.seconds += time.perf_counter() - t0  # .cpu() above synchronised the device

    def add(self, entry: Dict[str, Any], chunk: Dict[str, Any]) -> None:
        """Queue a chunk's augmentations; run the teacher on every full batch at once (so the loader workers keep
        augmenting meanwhile)."""
        offset = 0
        while offset < chunk['count']:
            c = min(chunk['count'] - offset, self.batch_size - self._filled)
            self._pending.append((entry, chunk, offset, c))
            offset += c
            self._filled += c
            if self._filled == self.batch_size:
                self.flush()

    def flush(self) -> None:
        """Run the teacher on the queued augmentations (the end of a shard)."""
        if self._pending:
            self.run_batch(self._pending)
        self._pending, self._filled = [], 0


# ----------------------------------------------------------------------------------------------------------------
# the output directory
# ----------------------------------------------------------------------------------------------------------------

class ShardStore:
    """The output directory: shards, their sidecars, resume checks and the merged ``reinforce.json``.

    Args:
        output: the directory.
        config: everything that determines shard contents (JSON-normalised); compared on resume.
    """

    def __init__(self, output: str, config: Dict[str, Any]):
        self.output = output
        self.config = config
        self.written = 0  # shards written by this process (crash test hook)

    def path(self, index: int) -> str:
        return os.path.join(self.output, shard_name(index))

    def sidecar_path(self, index: int) -> str:
        return os.path.join(self.output, sidecar_name(index))

    def check_config(self) -> None:
        """Refuse an output directory holding shards of another configuration.

        Raises:
            ValueError: naming ``--output`` and the sidecar/reinforce.json whose configuration differs.
        """
        for path, read in self.stored_configs():
            try:
                other = json.loads(read()).get('config')
            except (OSError, ValueError, AttributeError):
                _logger.warning(f'Ignoring unreadable {path}')
                continue
            if other is None:
                raise ValueError(f'--output {self.output}: {path} was not written by this version of reinforce.py; '
                                 f'use another --output')
            diffs = config_differences(other, self.config)
            if diffs:
                raise ValueError(
                    f'--output {self.output} holds shards from a different configuration ({path}): '
                    + '; '.join(diffs[:8]) + ('; ...' if len(diffs) > 8 else '')
                    + '. Use another --output or delete the old shards.')

    def stored_configs(self) -> List[Tuple[str, Any]]:
        """(path, read() -> text) of reinforce.json and the sidecars already in the output."""
        if not os.path.isdir(self.output):
            return []
        candidates = [n for n in os.listdir(self.output) if n.startswith('.') and n.endswith('.json')
                      and n[1:7].isdigit() and len(n) == len('.000000.json')]
        paths = [os.path.join(self.output, n) for n in sorted(candidates)]
        meta_path = os.path.join(self.output, META_NAME)
        if os.path.isfile(meta_path):
            paths.insert(0, meta_path)
        return [(p, functools.partial(_read_text, p)) for p in paths]

    def size_of(self, index: int) -> Optional[int]:
        """Bytes of shard ``index`` in the output, None when absent."""
        path = self.path(index)
        return os.path.getsize(path) if os.path.isfile(path) else None

    def put_meta(self, meta: Dict[str, Any]) -> None:
        with atomic_write(os.path.join(self.output, META_NAME), 'w') as f:
            json.dump(meta, f, indent=1)

    def store(self, index: int, data: bytes, info_of: Any) -> Dict[str, Any]:
        """Write shard ``index``'s bytes, then its sidecar ``info_of()`` (crash test hook in between)."""
        crash_after = os.environ.get(CRASH_ENV)
        with atomic_write(self.path(index), 'wb') as f:
            f.write(data)
        if crash_after is not None and self.written >= int(crash_after):
            # test hook: the shard file is in place but its sidecar is not, and a stray temp file is left behind
            with open(os.path.join(self.output, f'.{shard_name(index)}.crash.tmp'), 'wb') as f:
                f.write(data[:len(data) // 2])
            os._exit(17)
        info = info_of()
        with atomic_write(self.sidecar_path(index), 'w') as f:
            json.dump(info, f, indent=1)
        return info

    def known_info(self, index: int) -> Optional[Dict[str, Any]]:
        """Shard ``index``'s sidecar when it was written for this configuration."""
        try:
            with open(self.sidecar_path(index)) as f:
                info = json.load(f)
        except (OSError, ValueError):
            return None
        return info if info.get('config') == self.config else None

    def is_complete(self, index: int, count: int) -> Tuple[bool, str]:
        """Whether shard ``index`` exists with a matching sidecar, ``count`` images and verified sha256 (and why
        not)."""
        path = self.path(index)
        if not os.path.isfile(path):
            return False, 'missing'
        info = self.known_info(index)
        if info is None:
            return False, 'no matching sidecar (interrupted write?)'
        if info.get('count') != count:
            return False, 'image count differs'
        if os.path.getsize(path) != info.get('bytes'):
            return False, 'size differs from its sidecar'
        if sha256_file(path) != info.get('sha256'):
            return False, 'sha256 differs from its sidecar'
        return True, 'complete'

    def check_strays(self, num_shards: int) -> None:
        """Refuse shard files beyond this reinforcement's ``num_shards`` (training would refuse the folder).

        Raises:
            ValueError: naming ``--output`` and the stray files.
        """
        if not os.path.isdir(self.output):
            return
        stray = sorted(n for n in os.listdir(self.output) if SHARD_RE.match(n) and int(n[:6]) >= num_shards)
        if stray:
            raise ValueError(
                f'--output {self.output}: {", ".join(stray[:5])}{" ..." if len(stray) > 5 else ""} not part of this '
                f'reinforcement ({num_shards} shards: {shard_name(0)} .. {shard_name(num_shards - 1)}); delete or '
                f'move {"it" if len(stray) == 1 else "them"} away, then rerun')

    def clean_stale(self, indices: Sequence[int], run_files: bool = False) -> None:
        """Remove temporary files of interrupted writes of shards ``indices`` and their sidecars, and with
        ``run_files`` those of reinforce.json, args.yaml and stats.json (rank 0 only: no other rank writes them)."""
        names = {shard_name(i) for i in indices} | {sidecar_name(i).lstrip('.') for i in indices}
        if run_files:
            names |= set(RUN_FILES)
        for n in os.listdir(self.output):
            if not (n.startswith('.') and n.endswith('.tmp')):
                continue
            stem = n[2:] if n.startswith('..') else n[1:]
            if any(stem.startswith(name + '.') for name in names):
                _logger.info(f'Removing {os.path.join(self.output, n)} (left by an interrupted run)')
                os.unlink(os.path.join(self.output, n))

    def write(self, index: int, items: List[Dict[str, Any]], num_samples: int) -> Dict[str, Any]:
        """Write shard ``index`` (its images' entries, in order) and then its sidecar; return the sidecar."""
        samples = [{'key': it['key'], 'image_ext': it['ext'], 'image': it['image'], 'label': it['label'],
                    'records': encode_records(it['records']), 'index': it['index']} for it in items]
        data = build_shard(samples, shard=shard_name(index))
        info = self.store(index, data, lambda: {
            'name': shard_name(index),
            'index': index,
            'count': len(items),
            'sha256': hashlib.sha256(data).hexdigest(),
            'bytes': len(data),
            'image_bytes': sum(len(it['image']) for it in items),
            'first_image': items[0]['index'],
            'label_correct': int(sum(int((it['records']['ids'][:, 0] == it['label']).sum()) for it in items)),
            'augmentations': len(items) * num_samples,
            'config': self.config,
        })
        self.written += 1
        return info

    def merge(self, num_shards: int, fields: Dict[str, Any], num_augmentations: int) -> Dict[str, Any]:
        """Gather the sidecars of shards ``0 .. num_shards - 1`` into ``reinforce.json`` (atomically).

        Args:
            fields: the dataset-level entries of reinforce.json (teachers, augmentation, ...).
            num_augmentations: images x stored augmentations (for the per-augmentation figures).

        Raises:
            RuntimeError: naming the first shard without a matching sidecar.
        """
        shards, label_correct = [], 0
        for s in range(num_shards):
            info = self.known_info(s)
            if info is None or self.size_of(s) != info['bytes']:
                raise RuntimeError(f'shard {shard_name(s)} in {self.output} is not complete; rerun reinforce.py with '
                                   f'the same arguments to finish it')
            shards.append({k: info[k] for k in ('name', 'count', 'sha256', 'bytes', 'image_bytes')})
            label_correct += info['label_correct']
        total = sum(s['bytes'] for s in shards)
        image_bytes = sum(s['image_bytes'] for s in shards)
        augs = num_augmentations
        meta = {
            'schema_version': SCHEMA_VERSION,
            **fields,
            'shards': shards,
            'teacher_label_agreement': label_correct / augs if augs else 0.0,
            'total_bytes': total,
            'bytes_per_augmentation': (total - image_bytes) / augs if augs else 0.0,
            'versions': software_versions(),
            'created': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
            'config': self.config,
        }
        self.put_meta(meta)
        return meta


def create_shard_store(output: str, config: Dict[str, Any]) -> ShardStore:
    """The store of ``--output``: a local directory, or an ``s3://`` prefix (:mod:`dr.reinforce.remote_store`)."""
    if storage.is_remote(output):
        from .remote_store import RemoteShardStore
        return RemoteShardStore(output, config)
    return ShardStore(output, config)


# ----------------------------------------------------------------------------------------------------------------
# the job
# ----------------------------------------------------------------------------------------------------------------

class Reinforcer:
    """Writes this rank's shards of a reinforced dataset and (rank 0) merges ``reinforce.json``.

    ``run()`` reads plan -> build -> stream: :meth:`plan_shards` (this rank's incomplete shards),
    :meth:`build_loader` (the augmenting data loader over their images), :meth:`stream` (teacher batches, shards
    written by a background thread as they complete).

    Args:
        source: the images.
        teacher: a ``TeacherEnsemble`` (eval mode, on ``device``).
        spec: augmentation family.
        output: output directory.
        num_samples: stored augmentations per image.
        topk: stored classes per augmentation.
        seed: base seed (augmentations of image i use ``default_rng([seed, i])``).
        shard_size: images per shard.
        num_classes: classifier size.
        batch_size: augmentations per teacher batch (batches never span shards).
        workers: data-loader processes producing augmentations.
        amp_dtype: autocast dtype for the teacher, or None for float32.
        channels_last: run the teacher in channels-last memory format.
        device: teacher device.
        rank, world_size: this process among the writers.
        dataset_info: ``{name, root, split, ...}`` for reinforce.json.
        progress: tqdm bar (rank 0 only).
        samples_per_item: augmentations per data-loader item (an image's samples are split into chunks of this many
            to bound the memory in flight; does not change the output).
    """

    def __init__(
            self,
            source: ImageSource,
            teacher,
            spec: AugmentSpec,
            output: str,
            *,
            num_samples: int,
            topk: int,
            seed: int,
            shard_size: int,
            num_classes: int,
            batch_size: int = 256,
            workers: int = 4,
            amp_dtype: Optional[torch.dtype] = None,
            channels_last: bool = False,
            device: Union[str, torch.device] = 'cpu',
            rank: int = 0,
            world_size: int = 1,
            dataset_info: Optional[Dict[str, Any]] = None,
            progress: bool = True,
            samples_per_item: int = 64,
    ):
        if topk > num_classes:
            raise ValueError(f'--topk {topk} is larger than the number of classes ({num_classes})')
        if num_samples < 1 or shard_size < 1 or batch_size < 1:
            raise ValueError('--num-samples, --shard-size and --batch-size must be >= 1')
        self.source, self.teacher, self.spec, self.output = source, teacher, spec, output
        self.num_samples, self.topk, self.seed = int(num_samples), int(topk), int(seed)
        self.num_classes, self.workers = int(num_classes), int(workers)
        self.device = torch.device(device)
        self.rank, self.world_size = rank, world_size
        self.dataset_info = dict(dataset_info or {'name': source.name})
        self.progress = progress
        self.samples_per_item = int(samples_per_item)
        self.dtype = record_dtype(self.topk, self.num_classes, spec.name)
        self.plan = ShardPlan(image_order(len(source), self.seed), int(shard_size))
        self.batcher = TeacherBatcher(teacher, spec, batch_size=batch_size, topk=self.topk,
                                      ids_dtype=self.dtype['ids'].base, device=self.device, amp_dtype=amp_dtype,
                                      channels_last=channels_last)
        self.store = create_shard_store(output, json.loads(json.dumps(self.content_config())))

    @property
    def num_images(self) -> int:
        return self.plan.num_images

    @property
    def num_shards(self) -> int:
        return self.plan.num_shards

    def shard_range(self, index: int) -> Tuple[int, int]:
        return self.plan.shard_range(index)

    def content_config(self) -> Dict[str, Any]:
        """Everything that determines shard contents (compared on resume)."""
        teachers = []
        for t in self.teacher.info():
            t = dict(t)
            if t.get('weights_sha256'):
                t.pop('weights')  # the same file at another path is the same teacher
            teachers.append(t)
        ds = {k: v for k, v in self.dataset_info.items() if k != 'root'}
        ds['num_images'] = self.num_images
        return {
            'schema_version': SCHEMA_VERSION,
            'dataset': ds,
            'teachers': teachers,
            'augmentation': self.spec.to_dict(),
            'num_samples': self.num_samples,
            'topk': self.topk,
            'num_classes': self.num_classes,
            'seed': self.seed,
            'image_order': self.image_order_info(),
            'shard_size': self.plan.shard_size,
            'record_dtype': self.dtype.descr,
        }

    def image_order_info(self) -> Dict[str, Any]:
        """reinforce.json's ``image_order``: the permutation of the dataset the shards hold (``format.image_order``)."""
        return {'kind': 'permutation', 'seed': self.seed}

    def check_output(self) -> None:
        """Refuse an output directory holding shards of another configuration or stray shards (see ``ShardStore``)."""
        self.store.check_config()
        self.store.check_strays(self.num_shards)

    # -- plan -> build -> stream --------------------------------------------------------------------------------
    def plan_shards(self) -> Tuple[List[int], int]:
        """(this rank's shards still to write, number already complete); temporary files of interrupted writes of this
        rank's shards (and, on rank 0, of reinforce.json, args.yaml, stats.json) are removed."""
        mine = rank_shards(self.num_shards, self.rank, self.world_size)
        if self.world_size > 1:
            _logger.info(f'rank {self.rank} of {self.world_size} writes shards {", ".join(map(shard_name, mine))}')
        todo = []
        for s in mine:
            lo, hi = self.plan.shard_range(s)
            done, why = self.store.is_complete(s, hi - lo)
            if done:
                continue
            if why != 'missing':
                _logger.info(f'Redoing shard {shard_name(s)}: {why}')
            todo.append(s)
        self.store.clean_stale(mine, run_files=self.rank == 0)
        skipped = len(mine) - len(todo)
        if skipped:
            _logger.info(f'rank {self.rank}: {skipped} of {len(mine)} shards already complete')
        return todo, skipped

    def build_loader(self, items: Sequence[Tuple[int, int]]) -> DataLoader:
        """The data loader augmenting ``items`` ((position, source index) per image) in order."""
        dataset = AugmentedImages(self.source, items, self.spec, self.dtype, self.seed, self.num_samples,
                                  self.batcher.views, self.num_classes, self.samples_per_item, plan=self.plan)
        return create_augment_loader(dataset, self.workers, pin_memory=self.device.type == 'cuda')

    def stream(self, chunks: Iterator[Dict[str, Any]], pbar: Optional[tqdm] = None) -> List[Dict[str, Any]]:
        """Feed the loader's chunks to the teacher batcher and write each shard as soon as its last image is done
        (by a background thread). Returns the written shards' sidecars."""
        futures = []
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            current, items = None, []
            for chunk in chunks:
                s = self.plan.shard_of(chunk['position'])
                if current is not None and s != current:
                    self.batcher.flush()
                    futures.append(pool.submit(self.store.write, current, items, self.num_samples))
                    items = []
                current = s
                if chunk['start'] == 0:
                    items.append({k: chunk.pop(k) for k in ('index', 'key', 'ext', 'image', 'label', 'records')})
                self.batcher.add(items[-1], chunk)
                if pbar is not None and chunk['start'] + chunk['count'] == self.num_samples:
                    pbar.update(1)
            if items:
                self.batcher.flush()
                futures.append(pool.submit(self.store.write, current, items, self.num_samples))
            return [f.result() for f in futures]

    def run(self) -> Dict[str, Any]:
        """Write every incomplete shard of this rank. Returns counts and timing of this rank's work."""
        if not storage.is_remote(self.output):
            os.makedirs(self.output, exist_ok=True)
        self.check_output()
        todo, skipped = self.plan_shards()
        items = self.plan.indices(todo)
        loader = self.build_loader(items)
        pbar = tqdm(total=len(items), unit='img', dynamic_ncols=True, smoothing=0.1,
                    disable=not self.progress or self.rank != 0, desc=f'reinforce rank {self.rank}')
        t0 = time.perf_counter()
        self.batcher.seconds = 0.0
        infos = self.stream(iter(loader), pbar)
        seconds = time.perf_counter() - t0
        pbar.close()
        return {'rank': self.rank, 'shards_written': len(infos), 'shards_skipped': skipped,
                'images': len(items), 'seconds': seconds, 'teacher_seconds': self.batcher.seconds,
                'images_per_second': len(items) / seconds if seconds > 0 else 0.0}

    def merge(self, class_names: Optional[Sequence[str]] = None) -> Dict[str, Any]:
        """Rank 0, after all ranks finished: gather the sidecars into ``reinforce.json`` (atomically).

        Raises:
            RuntimeError: naming the first shard without a matching sidecar.
        """
        fields = {
            'teachers': self.teacher.info(),
            'augmentation': self.spec.to_dict(),
            'topk': self.topk,
            'num_samples': self.num_samples,
            'num_classes': self.num_classes,
            'class_names': list(class_names) if class_names else None,
            'seed': self.seed,
            'image_order': self.image_order_info(),
            'dataset': dict(self.dataset_info),
            'num_images': self.num_images,
            'shard_size': self.plan.shard_size,
            'record_dtype': self.dtype.descr,
            'images_stored_as_png': bool(self.source.stores_png),
        }
        return self.store.merge(self.num_shards, fields, self.num_images * self.num_samples)
