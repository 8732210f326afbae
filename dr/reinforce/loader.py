"""Streaming training loader for reinforced shards (``reinforce.py`` output) built on WebDataset.

Epoch semantics (``create_reinforced_loader``):

* An epoch is one pass over the reinforced images. The shard order is permuted with a generator seeded from
  (seed, epoch); the images, concatenated in that order, are cut into ``world_size`` equal contiguous ranges (one per
  rank) and each rank's range into per-worker ranges made of whole batches. Every rank therefore runs the same number
  of full batches. With ``drop_last`` (train.py's default, as timm's training loaders) that is
  ``len(loader) = floor(num_images / (world_size * batch_size))``: the images past the last full batch of the epoch
  order are not used in that epoch (the order changes every epoch). Without it (``--rd-pad-last``),
  ``len(loader) = ceil(...)`` and every image is used at least once per epoch; the
  ``world_size * len(loader) * batch_size - num_images`` padding positions wrap around to the start of the epoch
  order (those few images are seen twice, with a different stored augmentation). Rank and worker
  boundaries may fall inside a shard: the shard is then read by both (the second skips the first part) so no image is
  lost or duplicated; each shard is otherwise streamed once, sequentially.
* Each worker reads ``mix_shards`` of its shard pieces at once, drawing every next sample from one of them at random
  (:func:`interleave_pieces`), and the samples pass a seeded shuffle buffer (``shuffle_buffer``); both are seeded from
  (seed, epoch, rank, worker). reinforce.py writes the images in a seeded permutation of the dataset, so every shard
  is already a random mix of classes (``benchmarks/batch_diversity.py``).
* For each image, one stored augmentation is drawn uniformly by a counter-based generator keyed on
  (seed, epoch, pass, key) (:func:`sample_draws`; pass > 0 only for wrapped padding), as are the ``rd_p`` coin and,
  for samples that do not use their stored reinforcement, the seed of the global RNGs the fallback transform draws
  from. Batches are thus a function of (seed, epoch, world_size, num_workers, batch_size, shuffle_buffer) only, and
  each image's augmentation and target of (seed, epoch, key) only: a resumed run replays the same epochs.
* Records are decoded with ``dr.reinforce.format.decode_records`` (no pickle; repeated identical ``.npy`` headers are
  cached, see :class:`SampleDecoder`) and replayed at the student's input size and normalisation with the stages of
  ``augment.apply_record``: ``apply_record_pil`` per sample in the worker, then the same float32 normalisation as
  ``normalize_uint8`` and the stored erase box per batch (bit-identical to ``apply_record``, tested). Targets are
  ``dr.reinforce.format.densify`` of the stored top-k; samples that do not use a stored reinforcement get their one-hot
  label.
* With ``replay_device`` ('cpu'/'cuda', ``train.py --replay-device``) the workers do all of the above except the
  pixel replay and hand encoded images + the chosen records to the main process, which replays each batch with
  tensors on that device (``dr.reinforce.device_replay``): the same samples, targets and order, pixels within the
  bounds of ``tests/reinforce/test_device_replay.py``.

A shard that cannot be read (truncated, tampered header, undecodable record or image, missing member, fewer or more
samples than ``reinforce.json`` lists), a schema-2 sample whose checksum fails (a modified byte, label or class id; a
shard copied over another) and a key seen twice in a worker's epoch raise :class:`ReinforcedDataError` naming the
shard URL and the key.
"""
import contextlib
import hashlib
import io
import logging
import math
import multiprocessing as mp
import os
import random
import struct
import tarfile
from bisect import bisect_right
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, get_worker_info
from webdataset.shardlists import expand_urls
from webdataset.tariterators import group_by_keys, tar_file_iterator

from .. import storage
from ..io import sha256_file
from . import device_replay
from .augment import AugmentSpec, apply_record_pil, erase_fill, mix_, needs_partner, partner_fields, re_pixel_box
from .format import (
    CHECKSUMS_MEMBER,
    FLAG_ERASE,
    IMAGE_EXTS,
    LABEL_EXT,
    LABEL_MAP_KIND,
    META_NAME,
    PROB_SUM_TOL,
    READABLE_SCHEMA_VERSIONS,
    RECORDS_EXT,
    aug_has_mix,
    aug_has_ra_re,
    check_records,
    decode_checksums,
    decode_records,
    densify,
    dtype_from_descr,
    load_meta,
    sample_checksum,
)
from .image_cache import DEFAULT_MAX_BYTES as DEFAULT_DECODED_CACHE_BYTES
from .image_cache import DecodedImages
from .partners import PartnerImages
from .tar_reader import TarFormatError, iter_tar_members
from .verify import incomplete_run, meta_problems

_logger = logging.getLogger(__name__)

Urls = Union[str, Sequence[str]]
DEFAULT_MIX_SHARDS = 4  # shard pieces a worker reads at once


class ReinforcedDataError(ValueError):
    """A reinforced shard (or its reinforce.json) does not hold what it should; the message names shard and key."""

    def __str__(self) -> str:
        # WebDataset's tar iterators append (stream, url) to the args of exceptions passing through them
        return str(self.args[0]) if self.args else ''


# ----------------------------------------------------------------------------------------------------------------------
# shard list and metadata


def _is_remote(url: str) -> bool:
    return '://' in url and not url.startswith('file://')


def _local_path(url: str) -> Optional[str]:
    if url.startswith('file://'):
        return url[len('file://'):]
    if _is_remote(url) or url.startswith('pipe:'):
        return None
    return url


def _shard_basename(url: str) -> str:
    return url.rstrip('/').rsplit('/', 1)[-1]


def resolve_reinforced(urls: Urls, where_flag: str = '--reinforced') -> Tuple[List[str], Dict[str, Any]]:
    """Expand ``--reinforced`` into shard URLs and load the dataset's ``reinforce.json``.

    Accepted forms (a list, or a string whose parts are separated by ``::`` as in WebDataset):

    * a local directory: every ``*.tar`` in it, metadata from its ``reinforce.json``;
    * a path/URL of a ``reinforce.json``: the shards it lists, next to it; it is also the metadata of any other part;
    * a shard path, brace pattern (``/data/{000000..000099}.tar``) or any URL WebDataset opens: metadata from
      ``reinforce.json`` in the same directory unless a json part is given.

    Returns:
        (shard URLs in canonical sorted order, metadata dict).

    Raises:
        ValueError: naming ``where_flag`` and the offending path when nothing is found or metadata is missing.
    """
    parts = [str(u) for u in urls] if isinstance(urls, (list, tuple)) else str(urls).split('::')
    parts = [p for p in (p.strip() for p in parts) if p]
    if not parts:
        raise ValueError(f'{where_flag}: no shards given')
    shard_urls: List[str] = []
    json_parts = [p for p in parts if p.endswith('.json')]
    if len(json_parts) > 1:
        raise ValueError(f'{where_flag}: more than one metadata file given ({", ".join(json_parts)})')
    meta_source: Optional[str] = json_parts[0] if json_parts else None
    meta: Optional[Dict[str, Any]] = None
    directories: List[Tuple[str, List[str]]] = []
    for part in parts:
        if part.endswith('.json'):
            meta = _load_meta(part, where_flag)
            base = part.rsplit('/', 1)[0] if '/' in part else '.'
            shard_urls.extend(f'{base}/{s["name"]}' for s in meta['shards'])
        elif storage.is_remote(part) and not part.endswith('.tar') and '{' not in part:  # a remote output folder
            meta = _load_meta(part.rstrip('/') + '/' + META_NAME, where_flag)
            shard_urls.extend(storage.join(part, s['name']) for s in meta['shards'])
        elif _local_path(part) is not None and os.path.isdir(_local_path(part)):
            directory = _local_path(part)
            tars = sorted(n for n in os.listdir(directory) if n.endswith('.tar') and not n.startswith('.'))
            if not tars:
                raise ValueError(f'{where_flag}: no .tar shards in directory {directory}')
            shard_urls.extend(os.path.join(directory, n) for n in tars)
            directories.append((directory, tars))
            meta_source = meta_source or directory
        else:
            expanded = expand_urls(part)
            _check_local_parts(expanded, where_flag)
            shard_urls.extend(expanded)
            meta_source = meta_source or expanded[0]
    if meta is None:
        meta = _load_meta(meta_source, where_flag)
    for directory, tars in directories:  # a directory stands for the whole dataset: a missing shard is an error
        missing = sorted({str(e.get('name')) for e in meta.get('shards', []) if isinstance(e, dict)} - set(tars))
        if missing:
            raise ValueError(f'{where_flag}: {len(missing)} shard(s) listed in {meta.get("_path", META_NAME)} are '
                             f'missing from {directory}: {", ".join(missing[:5])}{" ..." if len(missing) > 5 else ""}')
    # canonical order (by shard name) so the epoch permutation does not depend on how the shards were listed
    seen = {}
    for url in shard_urls:
        name = _shard_basename(url)
        if name in seen and seen[name] != url:
            raise ValueError(f'{where_flag}: two shards named {name} ({seen[name]} and {url})')
        seen[name] = url
    return sorted(seen.values(), key=_shard_basename), meta


def _check_local_parts(paths: Sequence[str], where_flag: str) -> None:
    """A local shard path (or its folder) that does not exist is named as such, not as a missing reinforce.json."""
    for url in paths:
        local = _local_path(url)
        if local is None or os.path.exists(local):
            continue
        folder = os.path.dirname(local) or '.'
        if not local.endswith('.tar'):
            raise ValueError(f'{where_flag}: {local} does not exist (expected a reinforce.py output folder, its '
                             f'{META_NAME} or .tar shards)')
        if not os.path.isdir(folder):
            raise ValueError(f'{where_flag}: folder {folder} of shard {local} does not exist')


def _load_meta(source: str, where_flag: str) -> Dict[str, Any]:
    local = _local_path(source)
    message = incomplete_run(local) if local is not None else None
    if message:
        raise ValueError(f'{where_flag}: {message}')
    try:
        return load_meta(source)
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f'{where_flag}: {e}') from e


def _shard_table(urls: Sequence[str], meta: Dict[str, Any], where_flag: str) -> List[Tuple[str, int]]:
    """(url, count) per shard from reinforce.json's shard list; a shard it does not list is an error."""
    meta_path = meta.get('_path', META_NAME)
    entries = {}
    for s in meta.get('shards', []):
        if not isinstance(s, dict) or 'name' not in s or 'count' not in s:
            raise ValueError(f'{where_flag}: {meta_path}: malformed shard entry {s!r}')
        entries[str(s['name'])] = s
    table = []
    for url in urls:
        name = _shard_basename(url)
        if name not in entries:
            raise ValueError(f'{where_flag}: shard {url} is not listed in {meta_path} (not part of this reinforced '
                             f'dataset, or an unfinished shard)')
        table.append((url, int(entries[name]['count'])))
    return table


def check_reinforced(
        urls: Urls,
        num_classes: Optional[int],
        where_flag: str = '--reinforced',
        verify_checksums: bool = False,
) -> Dict[str, Any]:
    """Check reinforced shards against the run before training; return their metadata.

    Checks: ``schema_version`` (via ``format.load_meta``), ``num_classes``, the augmentation spec, that every
    shard is listed in ``reinforce.json`` (all of them unless a subset of shards was named), local shard sizes
    (and sha256 with ``verify_checksums``) against the listed ones, and the first sample of the first shard: its
    members, record fields, top-k, number of stored augmentations, class ids and crop boxes inside the image.

    Returns:
        The metadata dict (``reinforce.json`` plus ``_path``, ``_urls`` (resolved shard URLs) and ``_num_images``
        (images in those shards)).

    Raises:
        ValueError: naming ``where_flag`` and the file/shard at fault.
    """
    shard_urls, meta = resolve_reinforced(urls, where_flag)
    meta_path = meta.get('_path', META_NAME)
    if meta.get('schema_version') not in READABLE_SCHEMA_VERSIONS:  # load_meta checks too (metadata passed around)
        raise ValueError(f'{where_flag}: {meta_path}: unsupported schema_version {meta.get("schema_version")!r} '
                         f'(this code reads {", ".join(map(str, READABLE_SCHEMA_VERSIONS))})')
    problems = meta_problems(meta)
    if problems:
        raise ValueError(f'{where_flag}: ' + '; '.join(problems[:3]) + ' (edited after writing? '
                         '`reinforce.py --verify` lists every problem)')
    meta_classes = int(meta['num_classes'])
    if num_classes is not None and int(num_classes) != meta_classes:
        raise ValueError(f'{where_flag}: {meta_path} has num_classes={meta_classes} but the model is built with '
                         f'{num_classes} classes (--num-classes)')
    try:
        AugmentSpec.from_dict(meta['augmentation'])
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f'{where_flag}: {meta_path}: bad augmentation entry ({e})') from e
    table = _shard_table(shard_urls, meta, where_flag)
    listed = {str(s['name']): s for s in meta['shards']}
    for url, _ in table:
        local = _local_path(url)
        entry = listed[_shard_basename(url)]
        if local is None:
            if storage.is_remote(url) and 'bytes' in entry and storage.size(url) != int(entry['bytes']):
                raise ValueError(f'{where_flag}: shard {url} has {storage.size(url)} bytes but {meta_path} lists '
                                 f'{entry["bytes"]} (truncated or modified)')
            continue
        if not os.path.isfile(local):
            raise ValueError(f'{where_flag}: shard {url} listed in {meta_path} does not exist')
        size = os.path.getsize(local)
        if 'bytes' in entry and size != int(entry['bytes']):
            raise ValueError(f'{where_flag}: shard {url} has {size} bytes but {meta_path} lists {entry["bytes"]} '
                             f'(truncated or modified; rerun reinforce.py to redo it)')
        if verify_checksums and entry.get('sha256') and sha256_file(local) != entry['sha256']:
            raise ValueError(f'{where_flag}: shard {url} does not match its sha256 in {meta_path} (modified)')
    num_images = sum(c for _, c in table)
    if num_images == 0:
        raise ValueError(f'{where_flag}: the shards hold no images ({meta_path})')
    first = next(((u, c) for u, c in table if c > 0))
    reader = _ShardReader(first[0], where_flag)
    if meta.get('kind') == LABEL_MAP_KIND:  # ReLabel-style label maps: dr.reinforce.label_map_loader
        from .label_map_loader import LabelMapDecoder as decoder_class
    else:
        decoder_class = SampleDecoder
    decoder = decoder_class(meta, where_flag)
    try:
        for sample in reader.samples(0, 1, first[1], check_count=False):
            decoder.verify(sample)
            img, _, records = decoder(sample)
            decoder.check_all(records, img, sample)
    finally:
        reader.close()
    meta['_urls'] = shard_urls
    meta['_num_images'] = num_images
    return meta


# ----------------------------------------------------------------------------------------------------------------------
# reading shards


def tar_members(stream: Any, skip_samples: int = 0) -> Iterator[Tuple[str, bytes]]:
    """``(name, data)`` of the regular files of a tar stream, in order
    (:func:`dr.reinforce.tar_reader.iter_tar_members`: header checksums verified, a member cut short is an error); the
    members of the first ``skip_samples`` samples
    (WebDataset keys: the basename up to its first dot) are passed over; members whose name starts with ``__`` (shard
    metadata such as the checksum table) are always passed on.

    A shard that ends early (no end-of-archive blocks) ends the stream: :class:`_ShardReader` checks every shard's
    sample count against ``reinforce.json``, and (schema 2) every sample's digest, so that cannot go unnoticed.
    """
    return iter_tar_members(stream, skip_samples)


def webdataset_tar_members(stream: Any, skip_samples: int = 0) -> Iterator[Tuple[str, bytes]]:
    """:func:`tar_members` through WebDataset's ``tariterators.tar_file_iterator`` (Python's ``tarfile`` in stream
    mode): the reader before :mod:`dr.reinforce.tar_reader`, kept as the baseline of
    ``benchmarks/loader_throughput.py --compare-tar-readers`` and as a cross-check in the tests."""
    key, samples_seen = None, 0
    for member in tar_file_iterator(stream, skip_meta=None):
        name = member['fname']
        if name.startswith('__'):  # shard metadata (the schema-2 checksum table): not a sample
            yield name, member['data']
            continue
        member_key = name.rsplit('/', 1)[-1].split('.', 1)[0]
        if member_key != key:
            if key is not None:
                samples_seen += 1
            key = member_key
        if samples_seen >= skip_samples:
            yield name, member['data']


class _ShardReader:
    """Streams the samples of one shard (WebDataset's ``gopen`` + :func:`tar_members` + WebDataset's
    ``group_by_keys``), naming the shard in every error."""

    def __init__(self, url: str, where_flag: str = '--reinforced', members: Callable = tar_members):
        self.url = url
        self.members = members
        self.where_flag = where_flag
        self.member: Optional[str] = None
        self.stream = None
        self.checksums: Optional[np.ndarray] = None  # the schema-2 checksum table, once read

    def _error(self, exn: BaseException) -> ReinforcedDataError:
        at = f' (at or after member {self.member})' if self.member else ''
        msg = str(exn.args[0]).split(' @ <')[0] if exn.args else ''  # drop WebDataset's "@ <stream repr>"
        return ReinforcedDataError(
            f'{self.where_flag}: cannot read shard {self.url}{at}: {type(exn).__name__}: {msg} '
            f'(truncated or corrupted shard? `reinforce.py --verify` checks all shards)')

    def _handler(self, exn: Exception) -> bool:
        # WebDataset's default handler re-raises; this one re-raises with the shard named (once).
        if isinstance(exn, ReinforcedDataError):
            raise exn
        raise self._error(exn) from exn

    def _files(self, skip: int) -> Iterator[Dict[str, Any]]:
        try:
            for name, data in self.members(self.stream, skip):
                self.member = name
                if name == CHECKSUMS_MEMBER:
                    self.checksums = decode_checksums(data, f'{self.where_flag}: shard {self.url}')
                elif not name.startswith('__'):
                    yield {'fname': name, 'data': data, '__url__': self.url}
        except (tarfile.TarError, TarFormatError, storage.StorageError, OSError, EOFError) as e:
            raise self._error(e) from e

    def samples(self, start: int, stop: int, count: int, check_count: bool = True) -> Iterator[Dict[str, Any]]:
        """Samples ``start`` .. ``stop - 1`` of the shard (raw member bytes, ``__key__``, ``__url__``, ``__index__``).

        With ``check_count``, a shard with fewer samples than ``stop`` or (when read to ``count``) more than ``count``
        is an error.
        """
        try:
            self.stream = wds.gopen(self.url)
        except Exception as e:
            raise self._error(e) from e
        grouped = group_by_keys(self._files(start), handler=self._handler)
        index = start
        try:
            for sample in grouped:
                if index >= stop:
                    if check_count and stop == count:
                        raise ReinforcedDataError(
                            f'{self.where_flag}: shard {self.url} holds more than the {count} samples listed in '
                            f'{META_NAME} (sample key {sample.get("__key__")}: modified shard?)')
                    break
                sample['__index__'] = index
                if self.checksums is not None and index < len(self.checksums):
                    sample['__checksum__'] = self.checksums[index]
                yield sample
                index += 1
                if index == stop and not (check_count and stop == count):
                    break
            else:
                if check_count and index < stop:
                    read = f'after {index} samples' if index > start else f'before sample {start}'
                    raise ReinforcedDataError(
                        f'{self.where_flag}: shard {self.url} ended {read} but {META_NAME} lists {count} '
                        f'(truncated or corrupted tar; last member read: {self.member})')
        finally:
            grouped.close()
            self.close()

    def close(self) -> None:
        if self.stream is not None:
            try:
                self.stream.close()
            except Exception:  # a pipe closed early may report a status; reading already finished
                pass
            self.stream = None


def _open_image(data: bytes, ext: str) -> Image.Image:
    """Decode image bytes as RGB, trying the PIL plugin of the member's extension first (skips format probing)."""
    Image.init()
    fmt = Image.registered_extensions().get('.' + ext)
    try:
        img = Image.open(io.BytesIO(data), formats=[fmt] if fmt else None)
    except Exception:  # e.g. PNG bytes in a .jpg member: let PIL identify it
        img = Image.open(io.BytesIO(data))
    img.load()
    return img if img.mode == 'RGB' else img.convert('RGB')


def _npy_header_length(data: bytes) -> Optional[int]:
    """Bytes before the array data of an ``.npy`` file (format versions 1-3), None if it is not one."""
    if len(data) < 12 or data[:6] != b'\x93NUMPY':
        return None
    if data[6] == 1:
        return 10 + int.from_bytes(data[8:10], 'little')
    if data[6] in (2, 3):
        return 12 + int.from_bytes(data[8:12], 'little')
    return None


class SampleDecoder:
    """Raw WebDataset sample -> (RGB image, label, records), every error naming the shard and key.

    Records go through ``dr.reinforce.format.decode_records`` (``allow_pickle=False``) and their layout (fields, top-k,
    number of stored augmentations) is checked against reinforce.json. The ``.npy`` header is the same for every
    sample of a dataset, and numpy parses it with ``ast.literal_eval`` (~1 ms): once a header has been decoded and
    checked, samples with byte-identical header and length are read with ``np.frombuffer`` on the same dtype
    (a structured dtype without object fields, so nothing can be unpickled).
    """

    def __init__(self, meta: Dict[str, Any], where_flag: str = '--reinforced'):
        self.where_flag = where_flag
        self.num_classes = int(meta['num_classes'])
        self.num_samples = int(meta['num_samples'])
        self.topk = int(meta['topk'])
        self.checksums = int(meta.get('schema_version', 1)) >= 2
        self.dtype = dtype_from_descr(meta['record_dtype']) if meta.get('record_dtype') else None
        aug = meta['augmentation']
        self.needs_ra = aug_has_ra_re(aug.get('name'))
        self.needs_mix = aug_has_mix(aug.get('name'))
        self.num_ops = len(aug.get('ra_ops', ())) if self.needs_ra else 0
        self._header: Optional[bytes] = None
        self._dtype: Optional[np.dtype] = None
        self._size = -1

    def where(self, sample: Dict[str, Any]) -> str:
        return f'{self.where_flag}: shard {sample.get("__url__")} key {sample.get("__key__")}'

    def error(self, sample: Dict[str, Any], exn: BaseException) -> ReinforcedDataError:
        msg = str(exn)
        prefix = f'shard {sample.get("__url__")} key {sample.get("__key__")}: '
        if msg.startswith(prefix):  # decode_records/check_records already name the shard
            msg = msg[len(prefix):]
        return ReinforcedDataError(f'{self.where(sample)}: {msg}')

    def records(self, data: bytes, sample: Dict[str, Any]) -> np.ndarray:
        if self._header is not None and len(data) == self._size and data.startswith(self._header):
            return np.frombuffer(data, dtype=self._dtype, count=self.num_samples, offset=len(self._header))
        url, key = sample.get('__url__'), sample.get('__key__')
        records = decode_records(data, where=f'shard {url} key {key}')
        if self.needs_ra and 'ra_ops' not in records.dtype.names:
            raise ValueError('records lack the ra_ops/re_box fields of RandAugment + random erasing')
        if self.needs_mix and ('mix_ref' not in records.dtype.names or (self.needs_ra and 'mix_ra_ops' not in
                                                                        records.dtype.names)):
            raise ValueError('records lack the partner fields (mix_ref, ...) of a mixing (+mix) augmentation')
        k = records.dtype['ids'].shape[0] if records.dtype['ids'].shape else 1
        if k != self.topk or records.dtype['probs'].shape != records.dtype['ids'].shape:
            raise ValueError(f'records hold top-{k}, reinforce.json says topk={self.topk}')
        if records.shape[0] != self.num_samples:
            raise ValueError(f'{records.shape[0]} stored augmentations, reinforce.json says '
                             f'num_samples={self.num_samples}')
        if self.dtype is not None and records.dtype != self.dtype:
            raise ValueError(f'records have dtype {records.dtype.descr}, reinforce.json says record_dtype '
                             f'{self.dtype.descr}')
        offset = _npy_header_length(data)
        if (offset is not None and not records.dtype.hasobject and len(data) == offset + records.nbytes
                and records.flags.c_contiguous and data[offset:] == records.tobytes()):
            self._header, self._dtype, self._size = bytes(data[:offset]), records.dtype, len(data)
        return records

    def __call__(self, sample: Dict[str, Any],
                 image: Optional[Image.Image] = None) -> Tuple[Image.Image, int, np.ndarray]:
        """(image, label, records) of a raw sample; ``image``: its image decoded before (not decoded again; the
        members are still checked)."""
        try:
            image_exts = [k for k in sample if k in IMAGE_EXTS]
            missing = [m for m, ok in (('image', bool(image_exts)), (LABEL_EXT, LABEL_EXT in sample),
                                       (RECORDS_EXT, RECORDS_EXT in sample)) if not ok]
            if missing:
                present = sorted(k for k in sample if not k.startswith('__'))
                raise ValueError(f'missing member(s) {", ".join(missing)} (has {", ".join(present) or "nothing"})')
            if len(image_exts) > 1:
                raise ValueError(f'more than one image member ({", ".join(image_exts)})')
            try:
                label = int(sample[LABEL_EXT].decode('ascii').strip())
            except (UnicodeDecodeError, ValueError) as e:
                raise ValueError(f'bad label {sample[LABEL_EXT][:20]!r}') from e
            if not 0 <= label < self.num_classes:
                raise ValueError(f'label {label} outside 0..{self.num_classes - 1}')
            records = self.records(sample[RECORDS_EXT], sample)
            try:
                img = image if image is not None else _open_image(sample[image_exts[0]], image_exts[0])
            except Exception as e:
                raise ValueError(f'undecodable image member .{image_exts[0]} ({type(e).__name__}: {e})') from e
        except ReinforcedDataError:
            raise
        except Exception as e:
            raise self.error(sample, e) from e
        return img, label, records

    def verify(self, sample: Dict[str, Any]) -> None:
        """:meth:`check_sum` when checksums are on (schema 2), raising :class:`ReinforcedDataError`."""
        if self.checksums:
            try:
                self.check_sum(sample)
            except ValueError as e:
                raise self.error(sample, e) from e

    def check_sum(self, sample: Dict[str, Any]) -> None:
        """A schema-2 sample's checksum (``format.sample_checksum``): bound to the shard's name and the sample's
        position, so a modified byte, label or id, and a shard copied over another, all fail it."""
        row = sample.get('__checksum__')
        if row is None:
            raise ValueError(f'no checksum for this sample: the shard lacks its {CHECKSUMS_MEMBER} table (schema 2) '
                             f'or it has fewer rows than samples')
        shard = _shard_basename(str(sample.get('__url__')))
        position = sample.get('__index__', 0)
        if sample_checksum(shard, position, sample['__key__'], int(row['index']), sample) != int(row['xxh3']):
            raise ValueError(f'sample {position} of the shard does not match its checksum (modified shard, or a '
                             f'shard copied over another; `reinforce.py --verify` checks all shards)')

    def check_record(self, record: np.void, img: Image.Image, sample: Dict[str, Any], index: int) -> None:
        """Values of the stored augmentation a sample uses: class ids, probabilities, crop box, op indices."""
        ids = record['ids'].tolist()
        probs = record['probs'].tolist()
        x, y, w, h = record['crop'].tolist()
        problem = None
        if max(ids) >= self.num_classes:
            problem = f'class id {max(ids)} >= num_classes={self.num_classes}'
        elif not all(0.0 <= p <= 1.0 for p in probs) or sum(probs) > 1.0 + PROB_SUM_TOL:  # NaN fails both
            problem = f'invalid probabilities {probs}'
        elif any(a < b for a, b in zip(probs, probs[1:])):
            problem = f'probabilities {probs} not sorted descending'
        elif len(set(ids)) != len(ids):
            problem = f'repeated class ids {ids}'
        elif w < 1 or h < 1 or x + w > img.width or y + h > img.height:
            problem = (f'stored crop box {[x, y, w, h]} does not fit the image of size {img.width}x{img.height} '
                       f'(images re-encoded or resized after reinforcement?)')
        elif self.num_ops and max(record['ra_ops'].tolist()) >= self.num_ops:
            problem = f'RandAugment op index {max(record["ra_ops"].tolist())} outside the op table'
        if problem:
            raise ReinforcedDataError(f'{self.where(sample)}: stored augmentation {index}: {problem}')

    def check_partner(self, record: np.void, img: Image.Image, sample: Dict[str, Any], index: int, key: str) -> None:
        """The partner half of a mixing stored augmentation: its crop box and op indices against the partner."""
        x, y, w, h = record['mix_crop'].tolist()
        problem = None
        if w < 1 or h < 1 or x + w > img.width or y + h > img.height:
            problem = f'partner crop box {[x, y, w, h]} does not fit the image of size {img.width}x{img.height}'
        elif self.num_ops and max(record['mix_ra_ops'].tolist()) >= self.num_ops:
            problem = f'partner RandAugment op index {max(record["mix_ra_ops"].tolist())} outside the op table'
        if problem:
            raise ReinforcedDataError(f'{self.where(sample)}: stored augmentation {index} (partner '
                                      f'{int(record["mix_ref"])}, key {key}): {problem}')

    def check_all(self, records: np.ndarray, img: Image.Image, sample: Dict[str, Any]) -> None:
        """Every stored augmentation of a sample (``check_reinforced`` on the first sample)."""
        try:
            check_records(records, f'shard {sample.get("__url__")} key {sample.get("__key__")}', self.num_classes,
                          num_samples=self.num_samples, topk=self.topk)
        except ValueError as e:
            raise self.error(sample, e) from e
        for i in range(len(records)):
            self.check_record(records[i], img, sample, i)


# ----------------------------------------------------------------------------------------------------------------------
# epoch plan


def derive_seed(*values: int) -> int:
    """A 63-bit seed from integers (SeedSequence mixing: nearby inputs give unrelated seeds)."""
    ss = np.random.SeedSequence([int(v) & 0xFFFFFFFFFFFFFFFF for v in values])
    return int(ss.generate_state(2, dtype=np.uint32).astype(np.uint64).dot([1 << 31, 1]))


def sample_draws(seed: int, epoch: int, pass_index: int, key: str, num_records: int) -> Tuple[float, int, int]:
    """The per-image random draws of an epoch: (u for the rd_p coin, stored-augmentation index, fallback seed).

    A counter-based generator: blake2b of (seed, epoch, pass, key), so the draws depend on nothing else (not on the
    rank, worker, shard order or what other samples drew) and cost one hash per image.
    """
    digest = hashlib.blake2b(f'{int(seed)}/{int(epoch)}/{int(pass_index)}/{key}'.encode(),
                             digest_size=24).digest()
    a, b, c = struct.unpack('<QQQ', digest)
    return (a >> 11) * (1.0 / (1 << 53)), b % num_records, c >> 2


def batches_per_rank(num_images: int, world_size: int, batch_size: int, drop_last: bool = False) -> int:
    """Full batches each rank runs per epoch: ``ceil(num_images / (world_size * batch_size))`` (the last batch padded
    by wrapping around), or with ``drop_last`` ``floor`` of it as timm's training loaders (the images past the last
    full batch wait for a later epoch); at least one."""
    per_step = world_size * batch_size
    return max(1, num_images // per_step if drop_last else math.ceil(num_images / per_step))


def epoch_shard_order(num_shards: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of shard indices used in ``epoch``."""
    return np.random.default_rng(derive_seed(seed, epoch, 0x5A4D)).permutation(num_shards)


def worker_pieces(
        shards: Sequence[Tuple[str, int]],
        seed: int,
        epoch: int,
        rank: int,
        world_size: int,
        worker: int,
        num_workers: int,
        batch_size: int,
        drop_last: bool = False,
) -> List[Tuple[str, int, int, int, int]]:
    """The shard pieces one (rank, worker) reads in ``epoch``: (url, start, stop, count, pass) in reading order.

    Positions ``p`` of the epoch's virtual stream map to image ``p % num_images`` of the shard-permuted order with
    pass ``p // num_images`` (pass > 0 only for the padding that fills the last batches).
    """
    counts = [c for _, c in shards]
    num_images = sum(counts)
    if num_images <= 0:
        return []
    nb = batches_per_rank(num_images, world_size, batch_size, drop_last)
    order = [i for i in epoch_shard_order(len(shards), seed, epoch) if counts[i] > 0]
    starts = np.cumsum([0] + [counts[i] for i in order]).tolist()
    # worker w runs the rank's batches w, w + K, w + 2K, ... (the DataLoader's round-robin order)
    worker_batches = [len(range(w, nb, num_workers)) for w in range(num_workers)]
    begin = rank * nb * batch_size + sum(worker_batches[:worker]) * batch_size
    end = begin + worker_batches[worker] * batch_size
    pieces = []
    p = begin
    while p < end:
        pass_index, q = divmod(p, num_images)
        j = bisect_right(starts, q) - 1
        shard = order[j]
        start = q - starts[j]
        take = min(counts[shard] - start, end - p)
        pieces.append((shards[shard][0], start, start + take, counts[shard], pass_index))
        p += take
    return pieces


Piece = Tuple[str, int, int, int, int]  # (url, start, stop, count, pass) of a shard, see worker_pieces


def interleave_pieces(pieces: Sequence[Piece], open_piece: Callable[[Piece], Iterator[Any]], width: int,
                      rng: random.Random) -> Iterator[Any]:
    """The samples of ``pieces`` read ``width`` at a time: each next sample comes from one of the open pieces, drawn
    with probability proportional to its samples left (so the open pieces run out together); when one is done (and
    its reader has checked the shard's end), the next piece opens. Each piece keeps its own order.

    Args:
        pieces: a worker's shard pieces in reading order (:func:`worker_pieces`).
        open_piece: piece -> iterator over exactly its ``stop - start`` samples.
        width: pieces open at once (<= 1: one after the other).
        rng: the generator of the draws.
    """
    pending = iter(pieces)
    open_: List[List[Any]] = []  # [iterator, samples left]

    def refill() -> None:
        while len(open_) < max(1, width):
            piece = next(pending, None)
            if piece is None:
                return
            if piece[2] > piece[1]:
                open_.append([open_piece(piece), piece[2] - piece[1]])

    refill()
    while open_:
        u = rng.randrange(sum(left for _, left in open_))
        j = 0
        while u >= open_[j][1]:
            u -= open_[j][1]
            j += 1
        entry = open_[j]
        yield next(entry[0])
        entry[1] -= 1
        if entry[1] == 0:
            for _ in entry[0]:  # let the reader finish (its end-of-shard checks), then close it
                pass
            open_.pop(j)
            refill()


def replay_interpolation(interpolation: Optional[str], meta: Dict[str, Any]) -> str:
    """The resize interpolation of the student's replays: ``interpolation`` when given, else the one the teacher
    saw (the interpolation every ensemble member shares in ``reinforce.json``), else (members disagree, or none
    recorded) the augmentation spec's ``interpolation``."""
    if interpolation not in (None, '', 'random'):
        return str(interpolation)
    members = {t.get('interpolation') for t in meta.get('teachers') or [] if isinstance(t, dict)}
    if len(members) == 1 and None not in members:
        return str(members.pop())
    spec_interpolation = str(meta['augmentation'].get('interpolation', 'bilinear'))
    if members:
        _logger.info(f'Reinforced data: the teacher members resized with {sorted(map(str, members))}; the student '
                     f'replays with the augmentation\'s {spec_interpolation!r}')
    return spec_interpolation


@contextlib.contextmanager
def _seeded_global_rngs(seed: int) -> Iterator[None]:
    """Seed python's, numpy's and torch's CPU global RNGs (what timm transforms draw from); restore them afterwards,
    so the main process's training randomness is untouched when the loader runs without workers."""
    py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)


# ----------------------------------------------------------------------------------------------------------------------
# the dataset


class ReinforcedShards(torch.utils.data.IterableDataset):
    """Batches of one epoch for one rank (split further by DataLoader worker); see the module docstring.

    Yields collated batches ``(input [B, C, H, W] float32, target_probs [B, K] float32, labels [B] int64)``.
    """

    def __init__(
            self,
            shards: Sequence[Tuple[str, int]],
            meta: Dict[str, Any],
            batch_size: int,
            input_size: Sequence[int],
            mean: Sequence[float],
            std: Sequence[float],
            interpolation: Optional[str],
            rd_p: float,
            rd_densify: str,
            fallback_transform: Optional[Callable],
            num_classes: int,
            seed: int,
            rank: int,
            world_size: int,
            num_workers: int,
            shuffle_buffer: int,
            mix_shards: int = DEFAULT_MIX_SHARDS,
            where_flag: str = '--reinforced',
            drop_last: bool = False,
            decoded_cache_bytes: int = DEFAULT_DECODED_CACHE_BYTES,
            replay_device: Optional[str] = None,
    ):
        super().__init__()
        self.shards = list(shards)
        self.meta = {k: v for k, v in meta.items() if k in ('num_classes', 'topk', 'num_samples', 'augmentation',
                                                            '_path', 'schema_version', 'record_dtype')}
        self.spec = AugmentSpec.from_dict(meta['augmentation'])
        self.batch_size = int(batch_size)
        self.input_size = tuple(int(v) for v in input_size)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.interpolation = replay_interpolation(interpolation, meta)
        self.rd_p = float(rd_p)
        self.rd_densify = rd_densify
        self.fallback_transform = fallback_transform
        self.num_classes = int(num_classes)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.num_workers = max(1, int(num_workers))
        self.shuffle_buffer = int(shuffle_buffer)
        self.mix_shards = int(mix_shards)
        self.where_flag = where_flag
        self.drop_last = bool(drop_last)
        self.tar_members: Callable = tar_members  # the tar reader (benchmarks/loader_throughput.py swaps it)
        self.integrity_checks = True  # schema-2 checksums and duplicate keys (off: only to measure their cost)
        self._seen: Dict[Tuple[str, int], Optional[str]] = {}  # keys of this worker's epoch
        self.num_images = sum(c for _, c in self.shards)
        self._epoch = mp.Value('i', 0)  # shared with (persistent) workers, as timm's SharedCount
        self._decoder = SampleDecoder(self.meta, where_flag)
        self._mean_np = np.asarray(self.mean, dtype=np.float32).reshape(-1, 1, 1)
        self._std_np = np.asarray(self.std, dtype=np.float32).reshape(-1, 1, 1)
        self._fill = erase_fill(self.spec, self.mean, self.std).numpy()
        # +mix: partners are read by dataset position from the shard files, local or remote
        # (``dr.reinforce.partners``); the images decoded for the stream and for partners are kept by position
        # (``dr.reinforce.image_cache``)
        self._partners = PartnerImages(meta, where_flag) if self.spec.has_mix else None
        self._decoded = DecodedImages(decoded_cache_bytes) if self.spec.has_mix else None
        self._shard_starts = dict(zip(self._partners.names, self._partners.starts)) if self._partners else {}
        # 'cpu'/'cuda': the workers hand encoded images + records to the main process (``dr.reinforce.device_replay``)
        self.replay_device = device_replay.check_replay_device(replay_device)
        if self.replay_device:
            self._decoded = None

    def set_epoch(self, epoch: int) -> None:
        self._epoch.value = int(epoch)

    @property
    def epoch(self) -> int:
        return int(self._epoch.value)

    def __len__(self) -> int:
        return batches_per_rank(self.num_images, self.world_size, self.batch_size, self.drop_last)

    def _worker(self) -> int:
        info = get_worker_info()
        if info is None:
            return 0
        if info.num_workers != self.num_workers:
            raise RuntimeError(f'ReinforcedShards was built for {self.num_workers} workers but runs in '
                               f'{info.num_workers}')
        return info.id

    def _open_piece(self, piece: Piece) -> Iterator[Dict[str, Any]]:
        """The samples of a piece, each checked as it is read (its bytes are still in the CPU caches, which makes the
        checksum ~5x cheaper than after the shuffle buffer): checksum, then duplicate key."""
        url, start, stop, count, pass_index = piece
        for sample in _ShardReader(url, self.where_flag, self.tar_members).samples(start, stop, count):
            sample['__pass__'] = pass_index
            if self.integrity_checks:
                self._decoder.verify(sample)
                self._check_unique(sample)
            yield sample

    def _check_unique(self, sample: Dict[str, Any]) -> None:
        """Stop at a key seen before in this worker's epoch (a shard copied over another, schema 1 included)."""
        key = (sample['__key__'], sample['__pass__'])
        if key in self._seen:
            raise ReinforcedDataError(
                f'{self._decoder.where(sample)}: key seen twice in this epoch (also in shard {self._seen[key]}): a '
                f'shard copied over another? `reinforce.py --verify` checks all shards')
        self._seen[key] = sample.get('__url__')

    def sample_stream(self, epoch: int, worker: int,
                      open_piece: Optional[Callable[[Piece], Iterator[Dict[str, Any]]]] = None) -> Iterator[Any]:
        """One worker's samples of ``epoch`` in the order they are batched: its pieces (:func:`worker_pieces`) read
        ``mix_shards`` at a time (:func:`interleave_pieces`), then the seeded shuffle buffer. ``open_piece`` replaces
        the shard reader (``benchmarks/batch_diversity.py`` simulates shards with it)."""
        pieces = worker_pieces(self.shards, self.seed, epoch, self.rank, self.world_size, worker, self.num_workers,
                               self.batch_size, self.drop_last)
        mix_rng = random.Random(derive_seed(self.seed, epoch, self.rank, worker, 0x4D49))
        samples = interleave_pieces(pieces, open_piece or self._open_piece, self.mix_shards, mix_rng)
        self._decoder.checksums = self.integrity_checks and int(self.meta.get('schema_version', 1)) >= 2
        self._seen = {}
        if self._decoded is not None:  # decoded images are reused within an epoch, not across epochs
            self._decoded.clear()
        stages: List[Any] = [lambda: samples]
        if self.shuffle_buffer > 1:
            rng = random.Random(derive_seed(self.seed, epoch, self.rank, worker, 0x5B))
            stages.append(wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng))
        return iter(wds.DataPipeline(*stages))

    def _partner(self, record: np.void, sample: Dict[str, Any], index: int, size: Tuple[int, int]) -> Tuple[Any, ...]:
        """The partner half of a mixing stored augmentation: (uint8 HxWx3 replay, erase box or None, record)."""
        position = int(record['mix_ref'])
        try:
            cached = self._decoded.get(position)
            if cached is None:
                key, ext, data = self._partners.get(position)
                img = _open_image(data, ext)
                self._decoded.put(position, key, img)
            else:
                key, img = cached
        except Exception as e:
            raise ReinforcedDataError(f'{self._decoder.where(sample)}: stored augmentation {index}: cannot read '
                                      f'its partner image {position} ({type(e).__name__}: {e})') from e
        self._decoder.check_partner(record, img, sample, index, key)
        fields = partner_fields(record)
        out = apply_record_pil(img, fields, self.spec, size, self.interpolation)
        erase = fields['re_box'] if self.spec.has_ra_re and int(fields['flags']) & FLAG_ERASE else None
        return np.asarray(out), erase, record

    def replay(self, sample: Dict[str, Any], index: Optional[int] = None) -> Tuple[Any, ...]:
        """Stored augmentation ``index`` of a raw sample, as :meth:`_process` prepares it for :meth:`collate`
        (``reinforce.py --show`` uses this to show exactly what training sees)."""
        img, label, records = self._decoder(sample)
        if not 0 <= int(index) < len(records):
            raise ValueError(f'{self._decoder.where(sample)}: no stored augmentation {index} '
                             f'(it has {len(records)})')
        return self._replay(sample, img, label, records, int(index))

    def _replay(self, sample: Dict[str, Any], img: Image.Image, label: int, records: np.ndarray,
                index: int) -> Tuple[Any, ...]:
        _, h, w = self.input_size
        record = records[index]
        self._decoder.check_record(record, img, sample, index)
        try:
            out = apply_record_pil(img, record, self.spec, (h, w), self.interpolation)
        except Exception as e:
            raise ReinforcedDataError(f'{self._decoder.where(sample)}: cannot replay stored augmentation {index} '
                                      f'({type(e).__name__}: {e})') from e
        erase = record['re_box'] if self.spec.has_ra_re and int(record['flags']) & FLAG_ERASE else None
        partner = None
        if self._partners is not None and needs_partner(record):
            partner = self._partner(record, sample, index, (h, w))
        return 'rd', np.asarray(out), label, record['ids'], record['probs'], erase, partner

    def _process_raw(self, sample: Dict[str, Any]) -> Tuple[Any, ...]:
        """:meth:`_process` for the device replay: the same checks and draws, but the stored augmentation is not
        replayed: ('raw', ext, image bytes, label, record, partner (ext, bytes) or None, where) or the fallback row."""
        ext = next((k for k in sample if k in IMAGE_EXTS), None)
        header = device_replay.image_header(sample[ext]) if ext else None
        img, label, records = self._decoder(sample, image=header)
        u, index, fallback_seed = sample_draws(self.seed, self.epoch, sample['__pass__'], sample['__key__'],
                                               len(records))
        if u >= self.rd_p:
            return self._fallback(_open_image(sample[ext], ext), label, fallback_seed)
        record = records[index]
        self._decoder.check_record(record, img, sample, index)
        partner = None
        if self._partners is not None and needs_partner(record):
            position = int(record['mix_ref'])
            try:
                key, p_ext, data = self._partners.get(position)
                p_header = device_replay.image_header(data) or _open_image(data, p_ext)
            except Exception as e:
                raise ReinforcedDataError(f'{self._decoder.where(sample)}: stored augmentation {index}: cannot read '
                                          f'its partner image {position} ({type(e).__name__}: {e})') from e
            self._decoder.check_partner(record, p_header, sample, index, key)
            partner = (p_ext, data)
        return 'raw', ext, sample[ext], label, record.copy(), partner, self._decoder.where(sample)

    def _process(self, sample: Dict[str, Any]) -> Tuple[Any, ...]:
        """One sample: ('rd', uint8 HxWx3 replay, label, ids, probs, erase box, partner or None) or ('fb', tensor,
        label); the partner of a mixing augmentation is (uint8 replay, erase box, record)."""
        if self.replay_device:
            return self._process_raw(sample)
        if self._decoded is None:
            img, label, records = self._decoder(sample)
        else:  # +mix: the image may have been decoded as a partner already, and may be one soon
            start = self._shard_starts.get(_shard_basename(str(sample.get('__url__'))))
            position = None if start is None else start + int(sample['__index__'])
            cached = self._decoded.get(position) if position is not None else None
            img, label, records = self._decoder(sample, image=cached[1] if cached else None)
            if cached is None and position is not None:
                self._decoded.put(position, sample['__key__'], img)
        u, index, fallback_seed = sample_draws(self.seed, self.epoch, sample['__pass__'], sample['__key__'],
                                               len(records))
        if u < self.rd_p:
            return self._replay(sample, img, label, records, index)
        return self._fallback(img, label, fallback_seed)

    def _fallback(self, img: Image.Image, label: int, fallback_seed: int) -> Tuple[Any, ...]:
        # the fallback transform draws from the global RNGs: seeded per (seed, epoch, key) for reproducibility
        with _seeded_global_rngs(fallback_seed):
            x = self.fallback_transform(img)
        if tuple(x.shape) != self.input_size:
            raise ValueError(f'reinforced loader: the fallback train transform gives shape {tuple(x.shape)}, '
                             f'expected {self.input_size}')
        return 'fb', x, label

    def _normalize(self, pixels: List[np.ndarray]) -> np.ndarray:
        """uint8 HxWx3 replays -> float32 [n, 3, H, W]: ``augment.normalize_uint8``'s float32 ops (x / 255 - mean) /
        std, in numpy: single-threaded, so a loader without workers does not contend with the training step's threads
        (bit-identical, see the tests); erasing and mixing stay in numpy for the same reason."""
        x = np.stack(pixels).transpose(0, 3, 1, 2).astype(np.float32, order='C')
        x /= np.float32(255)
        x -= self._mean_np
        x /= self._std_np
        return x

    def _erase(self, x: np.ndarray, box: Optional[np.ndarray]) -> None:
        if box is not None:
            t, left, eh, ew = re_pixel_box(box, x.shape[-2], x.shape[-1])
            x[:, t:t + eh, left:left + ew] = self._fill

    def collate(self, samples: List[Tuple[Any, ...]]) -> Tuple[torch.Tensor, ...]:
        """Stack a batch; replays are normalised batch-wise (the same float ops as ``augment.apply_record``, then the
        stored erase box is filled and a mixing sample is mixed with its partner) and their targets densified in one
        call: the target of a mixed sample is the teacher output stored for the mixed image, not a mix of labels.
        With ``replay_device``: a :class:`device_replay.RawBatch` (replayed by :class:`ReinforcedLoader`)."""
        if self.replay_device:
            return device_replay.collate_raw(samples, self.input_size, self.num_classes, self.rd_densify)
        n = len(samples)
        c, h, w = self.input_size
        labels = torch.tensor([s[2] for s in samples], dtype=torch.int64)
        target = torch.zeros((n, self.num_classes), dtype=torch.float32)
        target.scatter_(1, labels[:, None], 1.0)
        rd_rows = [i for i, s in enumerate(samples) if s[0] == 'rd']
        if len(rd_rows) < n:
            x = torch.empty((n, c, h, w), dtype=torch.float32)
        if rd_rows:
            pixels = self._normalize([samples[i][1] for i in rd_rows])
            for j, i in enumerate(rd_rows):
                self._erase(pixels[j], samples[i][5])
            mixed = [j for j, i in enumerate(rd_rows) if samples[i][6] is not None]
            if mixed:
                partners = self._normalize([samples[rd_rows[j]][6][0] for j in mixed])
                for x2, j in zip(partners, mixed):
                    _, box, record = samples[rd_rows[j]][6]
                    self._erase(x2, box)
                    pixels[j] = mix_(pixels[j], x2, record)  # the same float32 ops on numpy arrays
            normalized = torch.from_numpy(pixels)
            if len(rd_rows) == n:
                x = normalized
            else:
                x[rd_rows] = normalized
            ids = np.stack([samples[i][3] for i in rd_rows])
            probs = np.stack([samples[i][4] for i in rd_rows])
            target[rd_rows] = densify(ids, probs, self.num_classes, mode=self.rd_densify)
        for i, s in enumerate(samples):
            if s[0] == 'fb':
                x[i] = s[1]
        return x, target, labels

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, ...]]:
        samples = self.sample_stream(self.epoch, self._worker())
        return iter(wds.DataPipeline(lambda: samples, wds.map(self._process),
                                     wds.batched(self.batch_size, collation_fn=self.collate, partial=True)))


class ReinforcedLoader:
    """Iterates ``(input, target_probs, labels)`` on ``device``; ``set_epoch`` selects the epoch; ``len`` = batches."""

    def __init__(self, dataset: ReinforcedShards, num_workers: int, device: Union[str, torch.device],
                 pin_memory: bool = False, prefetch_factor: Optional[int] = None):
        self.dataset = dataset
        self.device = torch.device(device)
        self.pin_memory = bool(pin_memory) and self.device.type == 'cuda'
        self.num_workers = int(num_workers)
        kwargs: Dict[str, Any] = {}
        if self.num_workers > 0:
            kwargs.update(persistent_workers=True, prefetch_factor=prefetch_factor or 2)
        self.loader = DataLoader(dataset, batch_size=None, shuffle=False, num_workers=self.num_workers,
                                 pin_memory=self.pin_memory, **kwargs)

    @property
    def batch_size(self) -> int:
        return self.dataset.batch_size

    @property
    def num_images(self) -> int:
        return self.dataset.num_images

    @property
    def sampler(self) -> None:
        return None

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        non_blocking = self.pin_memory
        iterator = iter(self.loader)
        ds = self.dataset
        try:
            for batch in iterator:
                if ds.replay_device:  # the pixels of the stored augmentations are replayed here, on the device
                    on = self.device if self.device.type == ds.replay_device else torch.device(ds.replay_device)
                    out = device_replay.replay_batch(batch, ds.spec, ds.input_size, ds.mean, ds.std,
                                                     ds.interpolation, on)
                    yield tuple(t.to(self.device) for t in out)
                    continue
                x, target, labels = batch
                yield (x.to(self.device, non_blocking=non_blocking),
                       target.to(self.device, non_blocking=non_blocking),
                       labels.to(self.device, non_blocking=non_blocking))
        except Exception:
            # a shard error in a worker: stop the (persistent) workers now rather than at garbage collection, which
            # waits MP_STATUS_CHECK_INTERVAL (5 s) per worker
            shutdown = getattr(iterator, '_shutdown_workers', None)
            if shutdown is not None:
                shutdown()
                self.loader._iterator = None
            raise


def create_reinforced_loader(
        urls: Urls,
        meta: Optional[Dict[str, Any]] = None,
        *,
        batch_size: int,
        num_workers: int,
        input_size: Sequence[int],
        mean: Sequence[float],
        std: Sequence[float],
        interpolation: Optional[str] = None,
        rd_p: float = 1.0,
        rd_densify: str = 'smooth',
        fallback_transform: Optional[Callable] = None,
        num_classes: Optional[int] = None,
        seed: int = 42,
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer: int = 1000,
        mix_shards: int = DEFAULT_MIX_SHARDS,
        device: Union[str, torch.device] = 'cpu',
        pin_memory: bool = False,
        where_flag: str = '--reinforced',
        drop_last: bool = False,
        replay_device: Optional[str] = None,
) -> ReinforcedLoader:
    """The training loader over reinforced shards (see the module docstring for the epoch semantics).

    Args:
        urls: ``--reinforced`` value (directory, brace pattern, URL(s), reinforce.json).
        meta: metadata from :func:`check_reinforced` (loaded and checked here when None).
        batch_size: per-rank batch size; every batch is full.
        num_workers: DataLoader workers (0 reads in the main process).
        input_size: student (C, H, W).
        mean: student normalisation mean.
        std: student normalisation std.
        interpolation: resize interpolation of the replays (None/'random': the one the teacher saw, see
            :func:`replay_interpolation`).
        rd_p: probability a sample uses its stored reinforcement; otherwise ``fallback_transform`` + one-hot target.
        rd_densify: ``smooth`` or ``renorm`` (``dr.reinforce.format.densify``).
        fallback_transform: timm train transform (PIL -> normalised tensor), required when ``rd_p < 1``.
        num_classes: classes of the student (default: the shards').
        seed: run seed.
        rank: this process's rank.
        world_size: number of processes.
        shuffle_buffer: samples in the shuffle buffer of each worker (<= 1: no sample shuffling).
        mix_shards: shard pieces each worker reads at once, interleaved at random (<= 1: one after the other).
        device: where batches are moved.
        pin_memory: pin host batches (and copy with ``non_blocking``) when ``device`` is CUDA.
        where_flag: the flag named in errors.
        drop_last: timm's epoch length, ``floor(num_images / (world_size * batch_size))`` full batches (train.py's
            default); False: ``ceil`` of it, the last batches padded by wrapping around so every image is seen
            every epoch (``--rd-pad-last``).
        replay_device: None/'': the stored augmentations are replayed with PIL in the workers; 'cpu'/'cuda': the
            workers read and check, the main process replays each batch with tensors on that device
            (``dr.reinforce.device_replay``; ``--replay-device``).
    """
    if not 0.0 <= rd_p <= 1.0:
        raise ValueError(f'--rd-p must be in [0, 1], got {rd_p}')
    if rd_densify not in ('smooth', 'renorm'):
        raise ValueError(f'--rd-densify must be smooth or renorm, got {rd_densify!r}')
    if rd_p < 1.0 and fallback_transform is None:
        raise ValueError('--rd-p < 1 needs a fallback train transform')
    if batch_size < 1:
        raise ValueError(f'batch size must be >= 1, got {batch_size}')
    if not 0 <= rank < world_size:
        raise ValueError(f'rank {rank} outside world size {world_size}')
    if meta is None or '_urls' not in meta:
        meta = check_reinforced(urls, num_classes, where_flag=where_flag)
    elif num_classes is not None and int(meta['num_classes']) != int(num_classes):
        raise ValueError(f'{where_flag}: {meta.get("_path", META_NAME)} has num_classes={meta["num_classes"]} but '
                         f'the model is built with {num_classes} classes (--num-classes)')
    shards = _shard_table(meta['_urls'], meta, where_flag)
    if meta.get('kind') == LABEL_MAP_KIND:
        from .label_map_loader import LabelMapShards as dataset_class
    else:
        dataset_class = ReinforcedShards
    dataset = dataset_class(
        shards, meta, batch_size=batch_size, input_size=input_size, mean=mean, std=std, interpolation=interpolation,
        rd_p=rd_p, rd_densify=rd_densify, fallback_transform=fallback_transform,
        num_classes=int(num_classes if num_classes is not None else meta['num_classes']), seed=seed, rank=rank,
        world_size=world_size, num_workers=num_workers, shuffle_buffer=shuffle_buffer, mix_shards=mix_shards,
        where_flag=where_flag, drop_last=drop_last, replay_device=replay_device)
    n = dataset.num_images
    used = world_size * len(dataset) * batch_size
    rest = f'{used - n} padding samples' if used >= n else f'{n - used} images past the last full batch'
    _logger.info(f'Reinforced data: {n} images in {len(shards)} shards, {len(dataset)} batches of {batch_size} per '
                 f'rank x {world_size} rank(s) per epoch ({rest})')
    return ReinforcedLoader(dataset, num_workers=num_workers, device=device, pin_memory=pin_memory)
