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
import contextlib
import copy
import dataclasses
import datetime
import hashlib
import io
import json
import logging
import math
import os
import tarfile
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .augment import (
    AugmentSpec,
    apply_record,
    augment_uint8,
    erase_mask,
    normalize_uint8,
    sample_records,
)
from .data import create_dataset, dataset_classes, is_digits
from .io import atomic_write, sha256_file, software_versions
from .rd_format import (
    FLAG_ERASE,
    IMAGE_EXTS,
    META_NAME,
    SCHEMA_VERSION,
    build_shard,
    check_records,
    decode_records,
    dtype_from_descr,
    encode_records,
    iter_shard,
    load_meta,
    record_dtype,
    sanitize_key,
    shard_name,
    split_member_name,
)

_logger = logging.getLogger(__name__)

CRASH_ENV = 'DR_REINFORCE_CRASH_AFTER_SHARDS'  # test hook: die (os._exit) while writing the shard after k shards
FP16_RTOL = 2.0 ** -10  # float16 keeps 11 significant bits: stored probabilities are within 2**-11 relative
DEFAULT_VERIFY_ATOL = 1e-4


# ----------------------------------------------------------------------------------------------------------------
# image sources: (key, extension, original bytes, label) by global index
# ----------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class SourceImage:
    key: str
    ext: str
    data: bytes
    label: int


class ImageSource:
    """Random access to a dataset's original encoded images."""
    stores_png: bool = False  # True when images only exist decoded and are stored re-encoded as PNG

    def __init__(self, dataset, name: str):
        self.ds = dataset
        self.name = name
        self.classes: Optional[List[str]] = dataset_classes(dataset)

    def __len__(self) -> int:
        return len(self.ds)

    def get(self, index: int) -> SourceImage:
        raise NotImplementedError


class DigitsSource(ImageSource):
    """The embedded digits (PNG bytes from ``DigitsDataset.image_bytes``)."""

    def __init__(self, dataset):
        super().__init__(dataset, 'digits')

    def get(self, index: int) -> SourceImage:
        return SourceImage(self.ds.key(index), 'png', self.ds.image_bytes(index), int(self.ds.targets[index]))


def _ext_of(filename: str, where: str) -> str:
    ext = os.path.splitext(filename)[1].lstrip('.').lower()
    if ext not in IMAGE_EXTS:
        raise ValueError(f'{where}: file {filename!r} has extension {ext!r}, expected one of {", ".join(IMAGE_EXTS)}')
    return ext


class FolderSource(ImageSource):
    """timm folder / tar readers: raw file bytes with the file's own extension."""

    def get(self, index: int) -> SourceImage:
        filename = self.ds.reader._filename(index)
        f, target = self.ds.reader[index]
        try:
            data = f.read()
        finally:
            f.close()
        stem = os.path.splitext(filename)[0]
        key = f'{index:08d}_{sanitize_key(stem)}'
        return SourceImage(key, _ext_of(filename, f'image {index}'), data, int(target))


class PILSource(ImageSource):
    """Datasets that only yield decoded PIL images (``torch/``, ``hfds/``): stored as lossless PNG."""
    stores_png = True

    def get(self, index: int) -> SourceImage:
        img, target = self.ds[index][:2]
        if not isinstance(img, Image.Image):
            raise TypeError(f'image {index} of {self.name}: expected a PIL image, got {type(img).__name__}')
        buf = io.BytesIO()
        img.convert('RGB').save(buf, format='PNG')
        return SourceImage(f'{index:08d}', 'png', buf.getvalue(), int(target))


class WdsSource(ImageSource):
    """Existing WebDataset shards (``wds/`` through timm's split info): a header index of the local tar files gives
    random access to the original image bytes and ``.cls`` labels."""

    def __init__(self, files: Sequence[str], name: str, classes: Optional[List[str]] = None,
                 image_exts: Sequence[str] = ('jpg', 'png', 'webp')):
        self.name = name
        self.classes = classes
        self.samples: List[Tuple[str, str, str, int, int, int, int]] = []
        preferred = [e.lower() for e in image_exts] + [e for e in IMAGE_EXTS if e not in image_exts]
        for path in files:
            if not os.path.isfile(path):
                raise FileNotFoundError(f'{name}: shard {path} is not a local file (reinforce.py needs random access)')
            entries: Dict[str, Dict[str, Tuple[int, int]]] = {}
            order: List[str] = []
            try:
                with tarfile.open(path, 'r:') as tar:
                    for info in tar:
                        if not info.isfile():
                            continue
                        key, ext = split_member_name(info.name)
                        if key not in entries:
                            entries[key] = {}
                            order.append(key)
                        entries[key][ext.lower()] = (info.offset_data, info.size)
            except tarfile.TarError as e:
                raise ValueError(f'{name}: cannot index shard {path}: {e}') from e
            for key in order:
                members = entries[key]
                img_ext = next((e for e in preferred if e in members), None)
                if img_ext is None:
                    continue
                if 'cls' not in members:
                    raise ValueError(f'{name}: sample {key} in {path} has no .cls label member')
                (io_off, io_size), (co, cs) = members[img_ext], members['cls']
                self.samples.append((path, key, img_ext, io_off, io_size, co, cs))

    def __len__(self) -> int:
        return len(self.samples)

    def get(self, index: int) -> SourceImage:
        path, key, ext, off, size, cls_off, cls_size = self.samples[index]
        with open(path, 'rb') as f:
            f.seek(off)
            data = f.read(size)
            f.seek(cls_off)
            label = int(f.read(cls_size).decode('ascii').strip())
        return SourceImage(f'{index:08d}_{sanitize_key(key)}', ext, data, label)


class LimitedSource(ImageSource):
    """The first ``n`` images of another source."""

    def __init__(self, source: ImageSource, n: int):
        self.source = source
        self.n = min(n, len(source))
        self.name, self.classes, self.stores_png = source.name, source.classes, source.stores_png

    def __len__(self) -> int:
        return self.n

    def get(self, index: int) -> SourceImage:
        if index >= self.n:
            raise IndexError(index)
        return self.source.get(index)


def create_source(
        name: str,
        root: Optional[str] = None,
        split: str = 'train',
        digits_size: int = 32,
        max_images: int = 0,
) -> ImageSource:
    """An ``ImageSource`` for any dataset train.py accepts (digits, folders, ``wds/``, ``torch/``, ``hfds/``).

    Raises:
        ValueError: for streaming-only datasets (``tfds/``) and unusable inputs, naming ``--dataset``.
    """
    from timm.data.readers.reader_image_folder import ReaderImageFolder
    from timm.data.readers.reader_image_in_tar import ReaderImageInTar
    from timm.data.readers.reader_image_tar import ReaderImageTar

    if is_digits(name):
        source: ImageSource = DigitsSource(create_dataset(name, split=split, digits_size=digits_size))
    elif name.lower().startswith('wds/'):
        ds = create_dataset(name, root=root, split=split)
        reader = ds.reader
        files = [os.path.join(reader.root, f) for f in reader.split_info.filenames]
        classes = [k for k, _ in sorted(reader.class_to_idx.items(), key=lambda kv: kv[1])] or None
        image_exts = [e for e in str(reader.input_key).split(';') if e]
        source = WdsSource(files, name, classes, image_exts=image_exts)
    else:
        ds = create_dataset(name, root=root, split=split)
        if isinstance(ds, torch.utils.data.IterableDataset) or not hasattr(ds, '__getitem__'):
            raise ValueError(f'--dataset {name}: streaming datasets are not supported by reinforce.py '
                             f'(use an image folder, wds/ shards or a torch/ dataset)')
        reader = getattr(ds, 'reader', None)
        if isinstance(reader, (ReaderImageFolder, ReaderImageInTar, ReaderImageTar)):
            source = FolderSource(ds, name or (root or ''))
        else:
            _logger.warning(f'--dataset {name}: images are only available decoded; storing them as lossless PNG')
            source = PILSource(ds, name)
    if len(source) == 0:
        raise ValueError(f'--dataset {name or root}: no images found (split {split})')
    if max_images and max_images > 0:
        source = LimitedSource(source, max_images)
    return source


def image_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of image ``index``'s augmentations (independent of rank, worker and resume)."""
    return np.random.default_rng([int(seed), int(index)])


def decode_image(data: bytes) -> Image.Image:
    """Original bytes -> RGB PIL image (how the writer and ``replay`` decode)."""
    img = Image.open(io.BytesIO(data))
    img.load()
    return img.convert('RGB')


# ----------------------------------------------------------------------------------------------------------------
# replay
# ----------------------------------------------------------------------------------------------------------------

def replay(image: Union[Image.Image, bytes], record: np.void, meta: Dict[str, Any], member: int = 0) -> torch.Tensor:
    """Exactly the normalised ``[3, h, w]`` tensor teacher ``member`` saw for a stored augmentation.

    Args:
        image: the original image (PIL or the shard's encoded bytes).
        record: one row of the sample's ``.rd.npy`` records.
        meta: ``reinforce.json`` as a dict (``load_meta``).
        member: ensemble member index (its mean/std/input_size/interpolation come from ``meta['teachers']``).
    """
    if isinstance(image, (bytes, bytearray)):
        image = decode_image(bytes(image))
    spec = AugmentSpec.from_dict(meta['augmentation'])
    t = meta['teachers'][member]
    size = (int(t['input_size'][1]), int(t['input_size'][2]))
    return apply_record(image, record, spec, size, t['mean'], t['std'], interpolation=t['interpolation'])


# ----------------------------------------------------------------------------------------------------------------
# writer
# ----------------------------------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------------------------------
# verify / stats
# ----------------------------------------------------------------------------------------------------------------

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
        for where, data, rec, _ in replays:
            img = decode_image(data)
            inputs = [replay(img, rec, meta, m).unsqueeze(0).to(device) for m in range(len(names))]
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
