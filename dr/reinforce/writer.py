"""Writing, verifying and inspecting reinforced datasets (the library behind ``reinforce.py``).

Writer design:

* Images are assigned to global shards by index (shard ``s`` holds images ``[s * shard_size, (s + 1) * shard_size)``
  of the dataset order); rank ``r`` of ``W`` writes shards ``r, r + W, ...``. Augmentation parameters of image ``i``
  come from ``numpy.random.default_rng([seed, i])`` and teacher batches never span shards, so a shard's bytes depend
  only on the configuration and its index: not on world size, worker count or resumption.
* Data-loader workers decode each image once, sample its records and run the PIL stages of the augmentations
  (uint8 tensors, one per distinct member resolution); the main process normalises, erases, batches augmentations of
  several images together and runs the teacher ensemble (AMP / channels-last optional).
* A finished shard is written to a temporary name, fsynced and renamed, then its ``.NNNNNN.json`` sidecar (count,
  sha256, sizes, configuration) is written the same way. A rerun skips shards whose sidecar matches the
  configuration and whose sha256 verifies, and redoes the others. Rank 0 merges the sidecars into ``reinforce.json``.
"""
import concurrent.futures
import datetime
import hashlib
import json
import logging
import math
import os
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..io import atomic_write, sha256_file, software_versions
from .augment import (
    AugmentSpec,
    augment_uint8,
    decode_image,
    erase_mask,
    normalize_uint8,
    sample_records,
)
from .format import (
    FLAG_ERASE,
    META_NAME,
    SCHEMA_VERSION,
    build_shard,
    encode_records,
    record_dtype,
    shard_name,
)
from .sources import ImageSource

_logger = logging.getLogger(__name__)


CRASH_ENV = 'DR_REINFORCE_CRASH_AFTER_SHARDS'  # test hook: die (os._exit) while writing the shard after k shards


# ----------------------------------------------------------------------------------------------------------------
# image sources: (key, extension, original bytes, label) by global index
# ----------------------------------------------------------------------------------------------------------------

def image_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of image ``index``'s augmentations (independent of rank, worker and resume)."""
    return np.random.default_rng([int(seed), int(index)])



def rank_shards(num_shards: int, rank: int, world_size: int) -> List[int]:
    """Shards written by ``rank``: ``rank, rank + world_size, ...`` (disjoint, together all shards)."""
    return list(range(rank, num_shards, world_size))


def sidecar_name(index: int) -> str:
    return f'.{int(index):06d}.json'


def _identity(x):
    return x


def _worker_init(_):
    torch.set_num_threads(1)


class _AugmentedImages(Dataset):
    """Worker side: chunk ``pos`` = (image, range of its stored samples) -> uint8 augmentations of that range.

    Every chunk re-derives the image's full record array from ``image_rng(seed, index)`` (cheap) and augments only its
    range, so a chunk's content does not depend on the chunking; the first chunk of an image also carries the
    original bytes, label and records. Chunks bound the memory in flight (``num_samples`` may be thousands).
    """

    def __init__(self, source: ImageSource, indices: Sequence[int], spec: AugmentSpec, dtype: np.dtype, seed: int,
                 num_samples: int, views: Sequence[Tuple[Tuple[int, int], str]], num_classes: int,
                 samples_per_item: int = 0):
        self.source, self.spec, self.dtype = source, spec, dtype
        self.seed, self.num_samples, self.views, self.num_classes = seed, num_samples, list(views), num_classes
        step = samples_per_item if samples_per_item > 0 else num_samples
        self.chunks = [(int(i), a, min(step, num_samples - a)) for i in indices for a in range(0, num_samples, step)]

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, pos: int) -> Dict[str, Any]:
        index, start, count = self.chunks[pos]
        src = self.source.get(index)
        if not 0 <= src.label < self.num_classes:
            raise ValueError(f'image {index} (key {src.key}): label {src.label} outside 0..{self.num_classes - 1} '
                             f'(check --num-classes)')
        try:
            img = decode_image(src.data)
        except Exception as e:
            raise ValueError(f'image {index} (key {src.key}): cannot decode ({e})') from e
        records = sample_records(image_rng(self.seed, index), img.width, img.height, self.spec, self.num_samples,
                                 self.dtype)
        part = records[start:start + count]
        out = {'index': index, 'start': start, 'count': count,
               'views': [augment_uint8(img, part, self.spec, size, interp) for size, interp in self.views]}
        if start == 0:
            out.update(key=src.key, ext=src.ext, image=src.data, label=src.label, records=records)
        return out


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


class Reinforcer:
    """Writes this rank's shards of a reinforced dataset and (rank 0) merges ``reinforce.json``.

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
        self.shard_size, self.num_classes = int(shard_size), int(num_classes)
        self.batch_size, self.workers = int(batch_size), int(workers)
        self.amp_dtype, self.channels_last = amp_dtype, channels_last
        self.device = torch.device(device)
        self.rank, self.world_size = rank, world_size
        self.dataset_info = dict(dataset_info or {'name': source.name})
        self.progress = progress
        self.samples_per_item = int(samples_per_item)
        self.dtype = record_dtype(self.topk, self.num_classes, spec.name)
        self.num_images = len(source)
        self.num_shards = math.ceil(self.num_images / self.shard_size)
        # members sharing (size, interpolation) share one uint8 augmentation tensor
        self.views: List[Tuple[Tuple[int, int], str]] = []
        self.member_view: List[int] = []
        for cfg in teacher.member_cfgs:
            view = ((int(cfg['input_size'][1]), int(cfg['input_size'][2])), cfg['interpolation'])
            if view not in self.views:
                self.views.append(view)
            self.member_view.append(self.views.index(view))
        self.captured: Optional[List[List[torch.Tensor]]] = None  # benchmarks: keep the teacher inputs
        self._written = 0
        self.teacher_seconds = 0.0  # main-process time in teacher batches (input prep, forward, top-k)

    # -- configuration ----------------------------------------------------------------------------------------
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
            'shard_size': self.shard_size,
            'record_dtype': self.dtype.descr,
        }

    def shard_range(self, index: int) -> Tuple[int, int]:
        return index * self.shard_size, min((index + 1) * self.shard_size, self.num_images)

    def _normalised_config(self) -> Dict[str, Any]:
        return json.loads(json.dumps(self.content_config()))

    def check_output(self) -> None:
        """Refuse an output directory holding shards of another configuration.

        Raises:
            ValueError: naming ``--output`` and the sidecar/reinforce.json whose configuration differs.
        """
        if not os.path.isdir(self.output):
            return
        mine = self._normalised_config()
        candidates = [n for n in os.listdir(self.output) if n.startswith('.') and n.endswith('.json')
                      and n[1:7].isdigit() and len(n) == len('.000000.json')]
        paths = [os.path.join(self.output, n) for n in sorted(candidates)]
        meta_path = os.path.join(self.output, META_NAME)
        if os.path.isfile(meta_path):
            paths.insert(0, meta_path)
        for path in paths:
            try:
                with open(path) as f:
                    other = json.load(f).get('config')
            except (OSError, ValueError, AttributeError):
                _logger.warning(f'Ignoring unreadable {path}')
                continue
            if other is None:
                raise ValueError(f'--output {self.output}: {path} was not written by this version of reinforce.py; '
                                 f'use another --output')
            diffs = config_differences(other, mine)
            if diffs:
                raise ValueError(
                    f'--output {self.output} holds shards from a different configuration ({path}): '
                    + '; '.join(diffs[:8]) + ('; ...' if len(diffs) > 8 else '')
                    + '. Use another --output or delete the old shards.')

    def _known_info(self, index: int) -> Optional[Dict[str, Any]]:
        path = os.path.join(self.output, sidecar_name(index))
        try:
            with open(path) as f:
                info = json.load(f)
        except (OSError, ValueError):
            return None
        return info if info.get('config') == self._normalised_config() else None

    def is_complete(self, index: int) -> Tuple[bool, str]:
        """Whether shard ``index`` exists with a matching sidecar and verified sha256 (and why not)."""
        path = os.path.join(self.output, shard_name(index))
        if not os.path.isfile(path):
            return False, 'missing'
        info = self._known_info(index)
        if info is None:
            return False, 'no matching sidecar (interrupted write?)'
        lo, hi = self.shard_range(index)
        if info.get('count') != hi - lo:
            return False, 'image count differs'
        if os.path.getsize(path) != info.get('bytes'):
            return False, 'size differs from its sidecar'
        if sha256_file(path) != info.get('sha256'):
            return False, 'sha256 differs from its sidecar'
        return True, 'complete'

    def _clean_stale(self, indices: Sequence[int]) -> None:
        names = {shard_name(i) for i in indices} | {sidecar_name(i).lstrip('.') for i in indices}
        for n in os.listdir(self.output):
            if n.startswith('.') and n.endswith('.tmp') and n[1:].split('.tar.')[0] + '.tar' in names:
                os.unlink(os.path.join(self.output, n))
            elif n.startswith('..') and n.endswith('.tmp') and n[2:].split('.json.')[0] + '.json' in names:
                os.unlink(os.path.join(self.output, n))

    # -- teacher ------------------------------------------------------------------------------------------------
    def teacher_inputs(self, views_u8: Sequence[torch.Tensor], records: np.ndarray) -> List[torch.Tensor]:
        """Normalised (and erased) teacher inputs, one per member, from the uint8 views of ``records``."""
        erase = None
        if self.spec.has_ra_re:
            erase = (records['flags'] & FLAG_ERASE) > 0
        on_device = [v.to(self.device, non_blocking=True) for v in views_u8]
        out = []
        for m, cfg in enumerate(self.teacher.member_cfgs):
            x = normalize_uint8(on_device[self.member_view[m]], cfg['mean'], cfg['std'])
            if erase is not None and erase.any():
                x.masked_fill_(erase_mask(records['re_box'], erase, x.shape[-2], x.shape[-1], device=x.device), 0)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            out.append(x)
        return out

    @torch.inference_mode()
    def _run_batch(self, slices: List[Tuple[Dict[str, Any], Dict[str, Any], int, int]]) -> None:
        """Teacher top-k for a batch of augmentation slices ``(image entry, loader chunk, offset, count)``."""
        t0 = time.perf_counter()
        views = [torch.cat([ch['views'][v][o:o + c] for _, ch, o, c in slices]) for v in range(len(self.views))]
        records = np.concatenate([e['records'][ch['start'] + o:ch['start'] + o + c] for e, ch, o, c in slices])
        inputs = self.teacher_inputs(views, records)
        if self.captured is not None:
            self.captured.append(inputs)
        if self.amp_dtype is not None:
            with torch.autocast(device_type=self.device.type, dtype=self.amp_dtype):
                probs = self.teacher.forward_members(inputs)
        else:
            probs = self.teacher.forward_members(inputs)
        top_p, top_i = probs.float().topk(self.topk, dim=-1)
        top_p = top_p.half().cpu().numpy()
        top_i = top_i.cpu().numpy().astype(self.dtype['ids'].base)
        n = 0
        for e, ch, o, c in slices:
            a = ch['start'] + o
            e['records']['ids'][a:a + c] = top_i[n:n + c]
            e['records']['probs'][a:a + c] = top_p[n:n + c]
            n += c
            if o + c == ch['count']:
                ch['views'] = None  # this chunk is done: free its pixels
        self.teacher_seconds += time.perf_counter() - t0  # .cpu() above synchronised the device

    def _add_to_batches(self, entry: Dict[str, Any], chunk: Dict[str, Any],
                        pending: List[Tuple[Dict[str, Any], Dict[str, Any], int, int]], filled: int) -> int:
        """Queue a chunk's augmentations; run the teacher on every full batch of ``batch_size`` at once (so the
        loader workers keep augmenting meanwhile). Returns the new fill level of ``pending``.

        Batches are a fixed greedy partition of the shard's augmentations in (image, sample) order, flushed at the
        shard end by ``_flush_batches``: their composition depends only on the shard, not on the chunking.
        """
        offset = 0
        while offset < chunk['count']:
            c = min(chunk['count'] - offset, self.batch_size - filled)
            pending.append((entry, chunk, offset, c))
            offset += c
            filled += c
            if filled == self.batch_size:
                self._run_batch(pending)
                pending.clear()
                filled = 0
        return filled

    def _flush_batches(self, pending: List[Tuple[Dict[str, Any], Dict[str, Any], int, int]]) -> None:
        if pending:
            self._run_batch(pending)
            pending.clear()

    # -- shard output -----------------------------------------------------------------------------------------
    def _write_shard(self, index: int, items: List[Dict[str, Any]]) -> Dict[str, Any]:
        samples = [{'key': it['key'], 'image_ext': it['ext'], 'image': it['image'], 'label': it['label'],
                    'records': encode_records(it['records'])} for it in items]
        data = build_shard(samples)
        path = os.path.join(self.output, shard_name(index))
        crash_after = os.environ.get(CRASH_ENV)
        with atomic_write(path, 'wb') as f:
            f.write(data)
        if crash_after is not None and self._written >= int(crash_after):
            # test hook: the shard file is in place but its sidecar is not, and a stray temp file is left behind
            with open(os.path.join(self.output, f'.{shard_name(index)}.crash.tmp'), 'wb') as f:
                f.write(data[:len(data) // 2])
            os._exit(17)
        info = {
            'name': shard_name(index),
            'index': index,
            'count': len(items),
            'sha256': hashlib.sha256(data).hexdigest(),
            'bytes': len(data),
            'image_bytes': sum(len(it['image']) for it in items),
            'first_image': items[0]['index'],
            'label_correct': int(sum(int((it['records']['ids'][:, 0] == it['label']).sum()) for it in items)),
            'augmentations': len(items) * self.num_samples,
            'config': self._normalised_config(),
        }
        with atomic_write(os.path.join(self.output, sidecar_name(index)), 'w') as f:
            json.dump(info, f, indent=1)
        self._written += 1
        return info

    def run(self) -> Dict[str, Any]:
        """Write every incomplete shard of this rank. Returns counts and timing of this rank's work."""
        from tqdm import tqdm

        os.makedirs(self.output, exist_ok=True)
        self.check_output()
        mine = rank_shards(self.num_shards, self.rank, self.world_size)
        todo = []
        for s in mine:
            done, why = self.is_complete(s)
            if done:
                continue
            if why != 'missing':
                _logger.info(f'Redoing shard {shard_name(s)}: {why}')
            todo.append(s)
        self._clean_stale(todo)
        skipped = len(mine) - len(todo)
        if skipped:
            _logger.info(f'rank {self.rank}: {skipped} of {len(mine)} shards already complete')
        indices = [i for s in todo for i in range(*self.shard_range(s))]
        dataset = _AugmentedImages(self.source, indices, self.spec, self.dtype, self.seed, self.num_samples,
                                   self.views, self.num_classes, self.samples_per_item)
        loader = DataLoader(
            dataset, batch_size=None, shuffle=False, num_workers=self.workers, collate_fn=_identity,
            worker_init_fn=_worker_init if self.workers else None, prefetch_factor=2 if self.workers else None,
            pin_memory=self.device.type == 'cuda', persistent_workers=False)
        pbar = tqdm(total=len(indices), unit='img', dynamic_ncols=True, smoothing=0.1,
                    disable=not self.progress or self.rank != 0, desc=f'reinforce rank {self.rank}')
        t0 = time.perf_counter()
        self.teacher_seconds = 0.0
        futures = []
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as writer:
            current, items, pending, filled = None, [], [], 0
            for chunk in loader:
                s = chunk['index'] // self.shard_size
                if current is not None and s != current:
                    self._flush_batches(pending)
                    filled = 0
                    futures.append(writer.submit(self._write_shard, current, items))
                    items = []
                current = s
                if chunk['start'] == 0:
                    items.append({k: chunk.pop(k) for k in ('index', 'key', 'ext', 'image', 'label', 'records')})
                filled = self._add_to_batches(items[-1], chunk, pending, filled)
                if chunk['start'] + chunk['count'] == self.num_samples:
                    pbar.update(1)
            if items:
                self._flush_batches(pending)
                futures.append(writer.submit(self._write_shard, current, items))
            infos = [f.result() for f in futures]
        seconds = time.perf_counter() - t0
        pbar.close()
        return {'rank': self.rank, 'shards_written': len(infos), 'shards_skipped': skipped,
                'images': len(indices), 'seconds': seconds, 'teacher_seconds': self.teacher_seconds,
                'images_per_second': len(indices) / seconds if seconds > 0 else 0.0}

    def merge(self, class_names: Optional[Sequence[str]] = None) -> Dict[str, Any]:
        """Rank 0, after all ranks finished: gather the sidecars into ``reinforce.json`` (atomically).

        Raises:
            RuntimeError: naming the first shard without a matching sidecar.
        """
        shards, label_correct = [], 0
        for s in range(self.num_shards):
            info = self._known_info(s)
            path = os.path.join(self.output, shard_name(s))
            if info is None or not os.path.isfile(path) or os.path.getsize(path) != info['bytes']:
                raise RuntimeError(f'shard {shard_name(s)} in {self.output} is not complete; rerun reinforce.py with '
                                   f'the same arguments to finish it')
            shards.append({k: info[k] for k in ('name', 'count', 'sha256', 'bytes', 'image_bytes')})
            label_correct += info['label_correct']
        total = sum(s['bytes'] for s in shards)
        image_bytes = sum(s['image_bytes'] for s in shards)
        augs = self.num_images * self.num_samples
        ds = dict(self.dataset_info)
        meta = {
            'schema_version': SCHEMA_VERSION,
            'teachers': self.teacher.info(),
            'augmentation': self.spec.to_dict(),
            'topk': self.topk,
            'num_samples': self.num_samples,
            'num_classes': self.num_classes,
            'class_names': list(class_names) if class_names else None,
            'seed': self.seed,
            'dataset': ds,
            'num_images': self.num_images,
            'shard_size': self.shard_size,
            'record_dtype': self.dtype.descr,
            'images_stored_as_png': bool(self.source.stores_png),
            'shards': shards,
            'teacher_label_agreement': label_correct / augs if augs else 0.0,
            'total_bytes': total,
            'bytes_per_augmentation': (total - image_bytes) / augs if augs else 0.0,
            'versions': software_versions(),
            'created': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
            'config': self._normalised_config(),
        }
        with atomic_write(os.path.join(self.output, META_NAME), 'w') as f:
            json.dump(meta, f, indent=1)
        return meta
