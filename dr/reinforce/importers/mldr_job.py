"""The ml-dr import job: stream an rdata archive, convert every image's samples in parallel, spool the records by
output shard, then write this project's shards (``reinforce.py --import-ml-dr``).

Pass 1 (:func:`spool_rdata`) reads the archive once, in its own order, without extracting it: worker processes
unpickle (restricted) and convert each ``<index>.pth.tar`` and check its crops against the image's size in
``--data-dir``; the main process appends the fixed-size record bytes to one spool file per output shard under
``OUTPUT/.mldr_import/`` (about the size of the final records, deleted at the end). Every image index of the folder
must appear exactly once. A finished pass leaves ``done.json``, so a rerun after an interruption in pass 2 does not
read the archive again.
"""
import collections
import concurrent.futures
import json
import logging
import os
import shutil
from typing import Any, Callable, Deque, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from tqdm import tqdm

from ... import storage
from ...io import atomic_write
from ..format import (
    FLAG_CUTMIX,
    FLAG_MIXUP,
    IMAGE_EXTS,
    SCHEMA_VERSION,
    image_order,
    record_dtype,
    sanitize_key,
)
from ..writer import ShardPlan, ShardStore
from .mldr import (
    CONFIG_NAME,
    SAMPLE_SUFFIX,
    MldrConfig,
    MldrFormatError,
    convert_image,
    imagefolder_index,
    iter_rdata,
    load_torch_save,
    parse_config,
)

_logger = logging.getLogger(__name__)

SPOOL_DIR = '.mldr_import'
TASK_FILES = 32  # rdata files per worker task
FLUSH_BYTES = 64 << 20  # spool bytes buffered in memory before they are appended to the files

_STATE: Dict[str, Any] = {}


def _init_worker(cfg: MldrConfig, dtype: np.dtype, num_classes: int, num_images: int) -> None:
    _STATE.update(cfg=cfg, dtype=dtype, num_classes=num_classes, num_images=num_images)


def _image_size(path: str) -> Tuple[int, int]:
    with Image.open(path) as img:  # reads the header only
        return img.size


def _convert_task(items: Sequence[Tuple[str, int, str, bytes]]) -> List[Tuple[int, int, int, bytes]]:
    """(where, index from the file name, image path, file bytes) -> (index, width, height, record bytes)."""
    cfg, dtype = _STATE['cfg'], _STATE['dtype']
    out = []
    for where, name_index, path, data in items:
        index, rec = convert_image(load_torch_save(data, where), where, cfg, dtype, _STATE['num_classes'],
                                   _STATE['num_images'], lambda j: j)
        if index != name_index:
            raise MldrFormatError(f'{where}: holds image index {index}, its file name says {name_index}')
        try:
            width, height = _image_size(path)
        except OSError as e:
            raise MldrFormatError(f'{where}: cannot read image {index} ({path}): {e}') from e
        check_crops(rec['crop'], width, height, f'{where}: image {index} ({path})')
        out.append((index, width, height, rec.tobytes()))
    return out


def check_crops(crops: np.ndarray, width: int, height: int, what: str) -> None:
    """Crop boxes (x, y, w, h) must lie inside a ``width`` x ``height`` image."""
    x, y, w, h = (crops[:, i].astype(np.int64) for i in range(4))
    bad = (x + w > width) | (y + h > height)
    if bad.any():
        k = int(np.argmax(bad))
        raise MldrFormatError(f'{what}: stored crop {crops[k].tolist()} does not fit the image of size '
                              f'{width}x{height} (is --data-dir the image folder these reinforcements were made '
                              f'from, unresized?)')


def _tasks(rdata: str, paths: Sequence[str], first: Callable[[str, bytes], None]) -> Iterator[List[Tuple]]:
    it = iter_rdata(rdata)
    kind, where, data = next(it)
    first(where, data)
    batch: List[Tuple[str, int, str, bytes]] = []
    for _, where, data in it:
        name_index = int(where.rsplit('/', 1)[-1].rsplit(':', 1)[-1][:-len(SAMPLE_SUFFIX)])
        if not 0 <= name_index < len(paths):
            raise MldrFormatError(f'{where}: image index {name_index} outside the image folder '
                                  f'(0..{len(paths) - 1}): --data-dir holds {len(paths)} images')
        batch.append((where, name_index, paths[name_index], data))
        if len(batch) == TASK_FILES:
            yield batch
            batch = []
    if batch:
        yield batch


class _Spool:
    """Per-shard append-only files of (image index ``<u8``, record bytes)."""

    def __init__(self, directory: str, record_bytes: int, clear: bool = True):
        self.directory = directory
        self.record_bytes = record_bytes
        self.buffers: Dict[int, bytearray] = collections.defaultdict(bytearray)
        self.buffered = 0
        os.makedirs(directory, exist_ok=True)
        if clear:  # spool files of a previous unfinished pass
            for name in os.listdir(directory):
                if name.endswith('.spool'):
                    os.unlink(os.path.join(directory, name))

    def path(self, shard: int) -> str:
        return os.path.join(self.directory, f'{shard:06d}.spool')

    def add(self, shard: int, index: int, data: bytes) -> None:
        buf = self.buffers[shard]
        buf += int(index).to_bytes(8, 'little')
        buf += data
        self.buffered += 8 + len(data)
        if self.buffered >= FLUSH_BYTES:
            self.flush()

    def flush(self) -> None:
        for shard, buf in self.buffers.items():
            with open(self.path(shard), 'ab') as f:
                f.write(buf)
        self.buffers.clear()
        self.buffered = 0

    def read(self, shard: int) -> Dict[int, bytes]:
        """image index -> record bytes of one shard."""
        with open(self.path(shard), 'rb') as f:
            data = f.read()
        step = 8 + self.record_bytes
        if len(data) % step:
            raise ValueError(f'{self.path(shard)}: truncated spool file (rerun the import)')
        return {int.from_bytes(data[o:o + 8], 'little'): data[o + 8:o + step] for o in range(0, len(data), step)}


def spool_rdata(
        rdata: str,
        paths: Sequence[str],
        parse: Callable[[str, bytes], Tuple[MldrConfig, np.dtype]],
        num_classes: int,
        positions: np.ndarray,
        shard_size: int,
        spool_dir: str,
        workers: int = 4,
        progress: bool = True,
) -> Tuple[MldrConfig, np.ndarray]:
    """Pass 1: every image's records spooled by output shard (``positions[index] // shard_size``).

    Args:
        rdata: the archive or directory.
        paths: image file of each ml-dr image index (torchvision ImageFolder order of --data-dir).
        parse: (where, config bytes) -> (config, record dtype); called once, before any conversion.
        num_classes: class ids must be below it.
        positions: output position of each image index (``mix_ref`` of partners is mapped through it).
        shard_size: images per output shard.
        spool_dir: where the spool files go.
        workers: converter processes (0: in this process).
        progress: tqdm bar.

    Returns:
        (config, ``[num_images, 2]`` image sizes (width, height)).

    Raises:
        MldrFormatError: naming the file at fault; a size mismatch between the archive and the folder.
    """
    num_images = len(paths)
    state: Dict[str, Any] = {}

    def first(where: str, data: bytes) -> None:
        state['cfg'], state['dtype'] = parse(where, data)

    seen = np.zeros(num_images, dtype=bool)
    sizes = np.zeros((num_images, 2), dtype=np.int64)
    tasks = _tasks(rdata, paths, first)
    first_task = next(tasks, None)
    cfg, dtype = state['cfg'], state['dtype']
    spool = _Spool(spool_dir, dtype.itemsize * cfg.num_samples)
    pbar = tqdm(total=num_images, unit='img', dynamic_ncols=True, disable=not progress, desc='import ml-dr')

    def consume(results: List[Tuple[int, int, int, bytes]]) -> None:
        for index, width, height, data in results:
            if seen[index]:
                raise MldrFormatError(f'{rdata}: image index {index} appears twice')
            seen[index] = True
            sizes[index] = (width, height)
            if cfg.spec.has_mix:
                rec = np.frombuffer(data, dtype=dtype).copy()
                mixed = rec['flags'] & (FLAG_MIXUP | FLAG_CUTMIX) > 0
                rec['mix_ref'][mixed] = positions[rec['mix_ref'][mixed].astype(np.int64)]
                data = rec.tobytes()
            spool.add(int(positions[index]) // shard_size, index, data)
        pbar.update(len(results))

    if first_task is not None:
        _run_tasks(first_task, tasks, consume, workers, (cfg, dtype, num_classes, num_images))
    spool.flush()
    pbar.close()
    missing = np.flatnonzero(~seen)
    if len(missing):
        raise MldrFormatError(f'{rdata}: holds {num_images - len(missing)} images but --data-dir holds '
                              f'{num_images}; missing indices {missing[:5].tolist()}'
                              f'{" ..." if len(missing) > 5 else ""} (a different or partial dataset?)')
    return cfg, sizes


def _run_tasks(first_task: List[Tuple], tasks: Iterator[List[Tuple]], consume: Callable, workers: int,
               init_args: Tuple) -> None:
    """Convert tasks in ``workers`` processes with a bounded number in flight (the archive is read as needed)."""
    if workers <= 0:
        _init_worker(*init_args)
        consume(_convert_task(first_task))
        for task in tasks:
            consume(_convert_task(task))
        return
    pending: Deque[concurrent.futures.Future] = collections.deque()
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers, initializer=_init_worker,
                                                initargs=init_args) as pool:
        try:
            pending.append(pool.submit(_convert_task, first_task))
            for task in tasks:
                pending.append(pool.submit(_convert_task, task))
                if len(pending) >= 2 * workers:
                    consume(pending.popleft().result())
            while pending:
                consume(pending.popleft().result())
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)  # the first error wins; queued conversions are dropped
            raise


def write_done(spool_dir: str, info: Dict[str, Any], sizes: np.ndarray) -> None:
    """Mark pass 1 complete (sizes saved for pass 2's partner checks)."""
    with atomic_write(os.path.join(spool_dir, 'sizes.npy')) as f:
        np.save(f, sizes, allow_pickle=False)
    with atomic_write(os.path.join(spool_dir, 'done.json'), 'w') as f:
        json.dump(info, f, indent=1)


def read_done(spool_dir: str, info: Dict[str, Any]) -> Optional[np.ndarray]:
    """The sizes of a complete pass 1 with the same ``info``, else None."""
    try:
        with open(os.path.join(spool_dir, 'done.json')) as f:
            done = json.load(f)
        if done != json.loads(json.dumps(info)):
            return None
        return np.load(os.path.join(spool_dir, 'sizes.npy'), allow_pickle=False)
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------------------------------------------------
# pass 2: shards


def import_order(num_images: int, seed: int) -> np.ndarray:
    """The output order of an import (position -> ml-dr image index): a seeded permutation, so that shards mix
    classes (ImageFolder order is sorted by class): ``format.image_order``, as reinforce.py writes its shards, recorded
    as reinforce.json's ``image_order``."""
    return image_order(num_images, seed)


class _ShardBuilder:
    """Pass 2 for one shard: spooled records + the folder's original image bytes -> ``ShardStore.write`` items."""

    def __init__(self, spool: _Spool, plan: ShardPlan, paths: Sequence[str], labels: Sequence[int], root: str,
                 dtype: np.dtype, sizes: np.ndarray, mixing: bool):
        self.spool, self.plan, self.paths, self.labels, self.root = spool, plan, paths, labels, root
        self.dtype, self.sizes, self.mixing = dtype, sizes, mixing

    def items(self, shard: int) -> List[Dict[str, Any]]:
        spooled = self.spool.read(shard)
        lo, hi = self.plan.shard_range(shard)
        out = []
        for position in range(lo, hi):
            index = int(self.plan.order[position])
            if index not in spooled:
                raise ValueError(f'{self.spool.path(shard)}: image {index} missing (interrupted import? rerun it)')
            rec = np.frombuffer(spooled[index], dtype=self.dtype).copy()
            path = self.paths[index]
            if self.mixing:
                self._check_partners(rec, index, path)
            rel = os.path.splitext(os.path.relpath(path, self.root))[0]
            ext = os.path.splitext(path)[1].lstrip('.').lower()
            if ext not in IMAGE_EXTS:
                raise ValueError(f'--data-dir: {path}: extension {ext!r} cannot be stored (expected one of '
                                 f'{", ".join(IMAGE_EXTS)})')
            with open(path, 'rb') as f:
                data = f.read()
            out.append({'index': index, 'key': f'{index:08d}_{sanitize_key(rel)}', 'ext': ext, 'image': data,
                        'label': int(self.labels[index]), 'records': rec})
        return out

    def _check_partners(self, rec: np.ndarray, index: int, path: str) -> None:
        mixed = np.flatnonzero(rec['flags'] & (FLAG_MIXUP | FLAG_CUTMIX))
        for k in mixed:
            partner = int(self.plan.order[int(rec['mix_ref'][k])])
            width, height = (int(v) for v in self.sizes[partner])
            check_crops(rec['mix_crop'][k:k + 1], width, height,
                        f'image {index} ({path}) sample {k}: partner image {partner} ({self.paths[partner]})')


def _teacher(cfg: MldrConfig) -> Dict[str, Any]:
    """The pseudo-teacher entry of an import: the normalisation and output size the authors' teacher saw."""
    h, w = cfg.out_size
    return {'name': 'ml-dr', 'mean': list(cfg.mean), 'std': list(cfg.std), 'input_size': [3, h, w],
            'interpolation': cfg.spec.interpolation}


def _content_config(cfg: MldrConfig, rdata: str, num_images: int, num_classes: int, shard_size: int, seed: int,
                    dtype: np.dtype) -> Dict[str, Any]:
    return json.loads(json.dumps({
        'schema_version': SCHEMA_VERSION,
        'teachers': [_teacher(cfg)],
        'imported_from': {'format': 'ml-dr', 'rdata': os.path.basename(os.path.normpath(rdata)),
                          'reinforce': cfg.raw, 'teacher': cfg.teacher},
        'dataset': {'name': 'imagefolder', 'num_images': num_images},
        'augmentation': cfg.spec.to_dict(),
        'num_samples': cfg.num_samples,
        'topk': cfg.topk,
        'num_classes': num_classes,
        'seed': seed,
        'image_order': {'kind': 'permutation', 'seed': seed},
        'shard_size': shard_size,
        'record_dtype': dtype.descr,
    }))


def import_mldr(
        rdata: str,
        data_dir: str,
        output: str,
        *,
        num_classes: Optional[int] = None,
        shard_size: int = 1000,
        seed: int = 0,
        workers: int = 4,
        progress: bool = True,
) -> Dict[str, Any]:
    """Convert an ml-dr rdata archive (or its directory) + the ImageFolder it was made from into this project's
    reinforced shards in ``output``; returns the merged ``reinforce.json``.

    Images go to shards in :func:`import_order`; each shard is written (temporary name, renamed) with a sidecar by
    ``writer.ShardStore``, so a rerun skips finished shards (and, once pass 1 finished, the archive).

    Raises:
        MldrFormatError / ValueError: naming the file, flag or image at fault (nothing already written is lost).
    """
    samples, classes = imagefolder_index(data_dir)
    if not samples:
        raise ValueError(f'--data-dir {data_dir}: no images')
    paths, labels = [p for p, _ in samples], [c for _, c in samples]
    num_classes = int(num_classes or len(classes))
    order = import_order(len(paths), seed)
    positions = np.argsort(order)
    plan = ShardPlan(order, int(shard_size))
    spool_dir = os.path.join(output, SPOOL_DIR)
    if storage.is_remote(rdata):  # an s3:// or http(s):// archive (how ml-dr publishes them): its size, no mtime
        info = {'rdata': rdata, 'rdata_bytes': storage.size(rdata), 'rdata_mtime': None}
    else:
        stat = os.stat(rdata)
        info = {'rdata': os.path.abspath(rdata), 'rdata_bytes': stat.st_size, 'rdata_mtime': stat.st_mtime}
    info.update(data_dir=os.path.abspath(data_dir), num_images=len(paths), num_classes=num_classes,
                shard_size=plan.shard_size, seed=seed)

    def parse(where: str, data: bytes) -> Tuple[MldrConfig, np.dtype]:
        cfg = parse_config(load_torch_save(data, where), where)
        if cfg.topk > num_classes:
            raise MldrFormatError(f'{where}: topk={cfg.topk} but --data-dir has {num_classes} classes')
        dtype = record_dtype(cfg.topk, num_classes, cfg.spec.name)
        # an --output of another configuration is refused before anything is converted or spooled
        ShardStore(output, _content_config(cfg, rdata, len(paths), num_classes, plan.shard_size, seed,
                                           dtype)).check_config()
        with atomic_write(os.path.join(spool_dir, CONFIG_NAME)) as f:
            f.write(data)
        return cfg, dtype

    os.makedirs(output, exist_ok=True)
    sizes = read_done(spool_dir, info)
    if sizes is None:
        cfg, sizes = _spool_from(rdata, info['rdata_bytes'], paths, parse, num_classes, positions, plan.shard_size,
                                 spool_dir, workers, progress)
        write_done(spool_dir, info, sizes)
    else:
        with open(os.path.join(spool_dir, CONFIG_NAME), 'rb') as f:
            cfg, _ = parse(f'{spool_dir}/{CONFIG_NAME}', f.read())
        _logger.info(f'{output}: the archive was already read (pass 1 complete); writing the remaining shards')
    dtype = record_dtype(cfg.topk, num_classes, cfg.spec.name)
    store = ShardStore(output, _content_config(cfg, rdata, len(paths), num_classes, plan.shard_size, seed, dtype))
    store.check_config()
    builder = _ShardBuilder(_Spool(spool_dir, dtype.itemsize * cfg.num_samples, clear=False), plan, paths, labels,
                            data_dir, dtype, sizes, cfg.spec.has_mix)
    _write_shards(store, builder, plan, cfg.num_samples, workers, progress)
    meta = store.merge(plan.num_shards, _meta_fields(cfg, rdata, data_dir, classes, num_classes, plan, seed, dtype),
                       len(paths) * cfg.num_samples)
    shutil.rmtree(spool_dir, ignore_errors=True)
    return meta


def _spool_from(rdata: str, rdata_bytes: int, *args: Any) -> Tuple[MldrConfig, np.ndarray]:
    """Pass 1 over a local archive or directory, or over a remote archive downloaded first (bounded, retried, by
    :func:`dr.storage.fetched`); errors name the URL, not the temporary file."""
    if not storage.is_remote(rdata):
        return spool_rdata(rdata, *args)
    _logger.info(f'--import-ml-dr: downloading {rdata} ({rdata_bytes / 2 ** 20:.1f} MiB)')
    with storage.fetched(rdata) as local:
        try:
            return spool_rdata(local, *args)
        except ValueError as e:  # MldrFormatError too
            raise type(e)(str(e).replace(local, rdata)) from e


def _write_shards(store: ShardStore, builder: _ShardBuilder, plan: ShardPlan, num_samples: int, workers: int,
                  progress: bool) -> None:
    todo = []
    for s in range(plan.num_shards):
        lo, hi = plan.shard_range(s)
        done, why = store.is_complete(s, hi - lo)
        if not done:
            if why != 'missing':
                _logger.info(f'Redoing shard {s:06d}: {why}')
            todo.append(s)
    store.clean_stale(todo)

    def one(s: int) -> int:
        store.write(s, builder.items(s), num_samples)
        return s

    with tqdm(total=len(todo), unit='shard', disable=not progress, desc='write shards') as pbar:
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for _ in pool.map(one, todo):
                pbar.update(1)


def _meta_fields(cfg: MldrConfig, rdata: str, data_dir: str, classes: Sequence[str], num_classes: int,
                 plan: ShardPlan, seed: int, dtype: np.dtype) -> Dict[str, Any]:
    teacher = dict(_teacher(cfg), weights=f'imported: {storage.absolute(rdata)}')
    return {
        'teachers': [teacher],
        'augmentation': cfg.spec.to_dict(),
        'topk': cfg.topk,
        'num_samples': cfg.num_samples,
        'num_classes': num_classes,
        'class_names': list(classes) if len(classes) == num_classes else None,
        'seed': seed,
        'dataset': {'name': 'imagefolder', 'root': os.path.abspath(data_dir), 'split': 'train'},
        'num_images': plan.num_images,
        'shard_size': plan.shard_size,
        'record_dtype': dtype.descr,
        'images_stored_as_png': False,
        'image_order': {'kind': 'permutation', 'seed': seed},  # dataset index = ml-dr's (ImageFolder order)
        'imported_from': {'format': 'ml-dr', 'rdata': storage.absolute(rdata), 'reinforce': cfg.raw,
                          'teacher': cfg.teacher},
    }
