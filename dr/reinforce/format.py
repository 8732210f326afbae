"""On-disk format of reinforced datasets (schema_version 2; 1 still reads): WebDataset tar shards + ``reinforce.json``.

A reinforced dataset is a directory of ``NNNNNN.tar`` shards (6-digit global shard index) and ``reinforce.json``.
Each tar sample is consecutive members sharing a key (the WebDataset convention):

* ``<key>.<imgext>``: the original encoded image bytes, untouched (``jpg``, ``png``, ``webp``, ...);
* ``<key>.cls``: the label as an ASCII decimal integer;
* ``<key>.rd.npy``: a ``.npy`` structured array (no pickle) with one row per stored augmentation, fields
  ``ids`` (top-k class ids, descending probability), ``probs`` (float16 ensemble-mean probabilities),
  ``crop`` (x, y, w, h in original-image pixels), ``flags`` (bit 0 hflip, bit 1 random erasing, bits 2-3 sign of
  RandAugment op 1/2), and for ``rrc+ra_re`` also ``ra_ops`` (indices into the op-name table) and ``re_box``
  (top, left, h, w of the erased box in 1/255 of the output size). The ``+mix`` variants (schema 2) add the partner's
  ``mix_ref`` (its position in the dataset), ``mix_crop``/``mix_flags``/``mix_ra_ops``/``mix_re_box``, the mixup
  ``mix_lam`` and the cutmix ``mix_box`` (flags bits 4/5 say whether mixup/cutmix apply).

Schema 2 shards start with one more member, ``__rd__/checksums.npy`` (WebDataset's readers skip ``__*__/`` names): a
``.npy`` structured array with, per sample in shard order, its ``index`` in the source dataset and its ``xxh3``
checksum (:func:`sample_checksum`, bound to the shard's name and the sample's position). They hold the images in a
seeded permutation of the dataset order (``reinforce.json`` ``image_order``, :func:`image_order`). Schema 1 shards
hold them in dataset order and have no checksum table.

Nothing here unpickles: records load with ``np.load(..., allow_pickle=False)``.
"""
import contextlib
import io
import json
import logging
import os
import re
import tarfile
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

import numpy as np
import torch
import webdataset as wds
import xxhash

from .. import storage

_logger = logging.getLogger(__name__)

SCHEMA_VERSION = 2  # DR records (per-augmentation top-k); label maps are written as LABEL_MAP_SCHEMA_VERSION
LABEL_MAP_SCHEMA_VERSION = 3  # ReLabel-style label maps (``kind: label_maps``, dr.reinforce.label_maps)
LABEL_MAP_KIND = 'label_maps'
# version 1: no per-sample checksums, images in dataset order, no mixing; version 3: label maps
READABLE_SCHEMA_VERSIONS = (1, 2, 3)
META_NAME = 'reinforce.json'
RECORDS_EXT = 'rd.npy'
CHECKSUMS_MEMBER = '__rd__/checksums.npy'  # schema 2: first member of a shard, per sample (index, xxh3)
CHECKSUMS_DTYPE = np.dtype([('index', '<u8'), ('xxh3', '<u8')])
IMAGE_ORDER_TAG = 0x4F524452  # mixed into the seed of the image permutation (b'ORDR')
LABEL_EXT = 'cls'
IMAGE_EXTS = ('jpg', 'jpeg', 'png', 'webp', 'ppm', 'pgm', 'pbm', 'pnm', 'bmp', 'gif', 'tif', 'tiff')
AUG_RRC = 'rrc'
AUG_RRC_RA_RE = 'rrc+ra_re'
AUG_RRC_MIX = 'rrc+mix'
AUG_RRC_RA_RE_MIX = 'rrc+ra_re+mix'
AUG_NAMES = (AUG_RRC, AUG_RRC_RA_RE, AUG_RRC_MIX, AUG_RRC_RA_RE_MIX)
SHARD_RE = re.compile(r'^(\d{6})\.tar$')

# flag bits of the ``flags`` field
FLAG_HFLIP = 1
FLAG_ERASE = 2
FLAG_RA_NEG = (4, 8)  # sign of RandAugment op 1 / op 2 (set = negative magnitude)
FLAG_MIXUP = 16  # (+mix variants) the sample is mixed up with its partner (``mix_lam``)
FLAG_CUTMIX = 32  # (+mix variants) a box of the partner (``mix_box``) is pasted into the sample

# A float16 probability carries a relative rounding error <= 2**-11, so a row's stored sum can exceed 1 by that much.
PROB_SUM_TOL = 1e-3


def aug_has_ra_re(aug_name: str) -> bool:
    """Whether augmentation ``aug_name`` stores RandAugment ops and a random-erasing box."""
    return aug_name in (AUG_RRC_RA_RE, AUG_RRC_RA_RE_MIX)


def aug_has_mix(aug_name: str) -> bool:
    """Whether augmentation ``aug_name`` mixes each stored augmentation with a partner image (+M* variants)."""
    return aug_name in (AUG_RRC_MIX, AUG_RRC_RA_RE_MIX)


def shard_name(index: int) -> str:
    """File name of global shard ``index``: ``000042.tar``."""
    return f'{int(index):06d}.tar'


def record_dtype(topk: int, num_classes: int, aug_name: str, max_side: int = 65535) -> np.dtype:
    """The structured dtype of one stored augmentation.

    Args:
        topk: number of stored class ids / probabilities per augmentation.
        num_classes: ids are ``<u2`` up to 65535 classes, ``<u4`` above.
        aug_name: ``rrc`` (crop + flip fields only), ``rrc+ra_re`` (adds ``ra_ops`` and ``re_box``); the ``+mix``
            variants add the partner's fields (``mix_ref``, ``mix_crop``, ``mix_flags``, ``mix_ra_ops``,
            ``mix_re_box``), the mixup ``mix_lam`` and the cutmix ``mix_box``.
        max_side: largest image side of the dataset; crop boxes are ``<u4`` when it exceeds 65535.
    """
    if aug_name not in AUG_NAMES:
        raise ValueError(f'Unknown augmentation {aug_name!r}; expected one of {", ".join(AUG_NAMES)}')
    if topk < 1:
        raise ValueError(f'topk must be >= 1, got {topk}')
    id_type = '<u2' if num_classes <= 65535 else '<u4'
    crop_type = '<u2' if max_side <= 65535 else '<u4'
    fields: List[Any] = [
        ('ids', id_type, (topk,)),
        ('probs', '<f2', (topk,)),
        ('crop', crop_type, (4,)),
        ('flags', 'u1'),
    ]
    if aug_has_ra_re(aug_name):
        fields += [('ra_ops', 'u1', (2,)), ('re_box', 'u1', (4,))]
    if aug_has_mix(aug_name):
        fields += [('mix_ref', '<u4'), ('mix_crop', crop_type, (4,)), ('mix_flags', 'u1')]
        if aug_has_ra_re(aug_name):
            fields += [('mix_ra_ops', 'u1', (2,)), ('mix_re_box', 'u1', (4,))]
        fields += [('mix_lam', '<f4'), ('mix_box', 'u1', (4,))]
    return np.dtype(fields)


def dtype_from_descr(descr: Sequence[Sequence[Any]]) -> np.dtype:
    """Rebuild a record dtype from its ``dtype.descr`` as stored (JSON lists) in reinforce.json's ``record_dtype``."""
    fields = []
    for f in descr:
        fields.append((str(f[0]), str(f[1])) if len(f) == 2 else (str(f[0]), str(f[1]), tuple(f[2])))
    return np.dtype(fields)


def encode_records(arr: np.ndarray) -> bytes:
    """Serialise a record array as ``.npy`` bytes (``allow_pickle=False``)."""
    names = arr.dtype.names or ()
    if 'ids' not in names or ('probs' not in names and 'logits' not in names):
        raise ValueError(f'encode_records expects a structured array with ids/probs (label maps: ids/logits) '
                         f'fields, got dtype {arr.dtype}')
    if arr.dtype.hasobject:
        raise ValueError('encode_records: object fields cannot be stored without pickle')
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


RECORD_FIELDS = ('ids', 'probs', 'crop', 'flags')  # required fields of stored augmentations
LABEL_MAP_FIELDS = ('ids', 'logits')  # required fields of a label map (schema 3)


def decode_records(data: bytes, where: str, fields: Sequence[str] = RECORD_FIELDS) -> np.ndarray:
    """Parse ``.npy`` record bytes without unpickling.

    Args:
        data: the ``<key>.rd.npy`` member's bytes.
        where: names the source in errors, e.g. ``"shard 000003.tar key abc"``.
        fields: the fields that must be there (``LABEL_MAP_FIELDS`` for a label map).

    Raises:
        ValueError: naming ``where`` when the bytes are not a 1-D structured array with ``ids`` and ``probs``.
    """
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:  # truncated/garbled npy raises ValueError/EOFError/OSError depending on where it breaks
        raise ValueError(f'{where}: undecodable reinforcement records ({type(e).__name__}: {e})') from e
    if not isinstance(arr, np.ndarray) or arr.dtype.names is None:
        dtype = getattr(arr, 'dtype', None)
        raise ValueError(f'{where}: reinforcement records are not a structured array (dtype {dtype})')
    missing = [f for f in fields if f not in arr.dtype.names]
    if missing:
        raise ValueError(f'{where}: reinforcement records lack field(s) {", ".join(missing)}')
    if arr.ndim != 1:
        raise ValueError(f'{where}: reinforcement records must be 1-D (one row per augmentation), shape {arr.shape}')
    return arr


def check_records(
        arr: np.ndarray,
        where: str,
        num_classes: int,
        num_samples: Optional[int] = None,
        topk: Optional[int] = None,
        sum_tol: float = PROB_SUM_TOL,
) -> None:
    """Validate decoded records: counts, finite non-negative probabilities summing to <= 1, ids < num_classes.

    Raises:
        ValueError: naming ``where`` and the first problem found.
    """
    if num_samples is not None and arr.shape[0] != num_samples:
        raise ValueError(f'{where}: {arr.shape[0]} stored augmentations, reinforce.json says num_samples={num_samples}')
    k = arr.dtype['ids'].shape[0] if arr.dtype['ids'].shape else 1
    if topk is not None and k != topk:
        raise ValueError(f'{where}: records hold top-{k}, reinforce.json says topk={topk}')
    probs = arr['probs'].astype(np.float32)
    if not np.isfinite(probs).all():
        raise ValueError(f'{where}: non-finite probabilities')
    if (probs < 0).any():
        raise ValueError(f'{where}: negative probabilities')
    sums = probs.reshape(len(arr), -1).sum(axis=1)
    if len(sums) and float(sums.max()) > 1.0 + sum_tol:
        raise ValueError(f'{where}: probabilities sum to {float(sums.max()):.6f} > 1')
    ids = arr['ids']
    if ids.size and int(ids.max()) >= num_classes:
        raise ValueError(f'{where}: class id {int(ids.max())} >= num_classes={num_classes}')
    unsorted = np.flatnonzero((np.diff(probs.reshape(len(arr), -1), axis=1) > 0).any(axis=1))
    if len(unsorted):
        raise ValueError(f'{where}: stored augmentation {int(unsorted[0])}: probabilities not sorted descending')
    flat = ids.reshape(len(arr), -1)
    sorted_ids = np.sort(flat, axis=1)
    repeated = np.flatnonzero((sorted_ids[:, 1:] == sorted_ids[:, :-1]).any(axis=1))
    if len(repeated):
        raise ValueError(f'{where}: stored augmentation {int(repeated[0])}: repeated class ids {flat[repeated[0]]}')


def densify(
        ids: Union[np.ndarray, torch.Tensor],
        probs: Union[np.ndarray, torch.Tensor],
        num_classes: int,
        mode: str = 'smooth',
) -> torch.Tensor:
    """Dense float32 target distribution(s) from stored top-k ids/probs (rows sum to 1).

    Args:
        ids: ``[..., k]`` class ids.
        probs: ``[..., k]`` probabilities of those ids.
        num_classes: size of the dense distribution.
        mode: ``smooth`` spreads ``1 - sum(probs)`` uniformly over the other ``num_classes - k`` classes;
            ``renorm`` divides the top-k by their sum.
    """
    if mode not in ('smooth', 'renorm'):
        raise ValueError(f"densify: mode must be 'smooth' or 'renorm', got {mode!r}")
    if isinstance(ids, np.ndarray):
        ids = torch.from_numpy(ids.astype(np.int64))
    if isinstance(probs, np.ndarray):
        probs = torch.from_numpy(probs.astype(np.float32))
    ids = ids.long()
    probs = probs.float().clamp_min(0)
    k = ids.shape[-1]
    if k > num_classes:
        raise ValueError(f'densify: {k} stored ids but num_classes={num_classes}')
    total = probs.sum(-1, keepdim=True)
    out = probs.new_zeros(*probs.shape[:-1], num_classes)
    if mode == 'smooth' and num_classes > k:
        residual = (1.0 - total).clamp_min(0) / (num_classes - k)
        out += residual
        out.scatter_(-1, ids, probs)
    else:
        out.scatter_(-1, ids, probs)
    norm = out.sum(-1, keepdim=True)
    # an all-zero row (cannot come from a softmax) falls back to uniform rather than dividing by zero
    out = torch.where(norm > 0, out / norm.clamp_min(1e-30), torch.full_like(out, 1.0 / num_classes))
    return out


def _meta_path(dir_or_url: Union[str, Sequence[str]]) -> str:
    if isinstance(dir_or_url, (list, tuple)):
        if not dir_or_url:
            raise ValueError('load_meta: empty list of shard URLs')
        dir_or_url = dir_or_url[0]
    s = str(dir_or_url)
    if os.path.isdir(s):
        return os.path.join(s, META_NAME)
    if s.endswith('.json'):
        return s
    if storage.is_remote(s) and not s.endswith('.tar') and '{' not in s:  # a remote output folder
        return s.rstrip('/') + '/' + META_NAME
    if s.startswith('pipe:'):
        raise ValueError(f'Cannot locate {META_NAME} for {s!r}: pass the directory (or the URL of {META_NAME})')
    # a shard file, brace pattern or URL: reinforce.json sits next to the shards
    base = s.rsplit('/', 1)[0] if '/' in s else '.'
    if '{' in base:
        raise ValueError(f'Cannot locate {META_NAME} for {s!r}: the brace pattern spans directories')
    return base + '/' + META_NAME


def load_meta(dir_or_url: Union[str, Sequence[str]]) -> Dict[str, Any]:
    """Read ``reinforce.json`` of a reinforced dataset (a directory, a shard path/pattern/URL, or the json itself).

    Raises:
        FileNotFoundError: no ``reinforce.json``.
        ValueError: naming the file for unparsable JSON, an unknown ``schema_version`` or missing keys.
    """
    path = _meta_path(dir_or_url)
    try:
        if storage.is_remote(path):
            text = storage.read_bytes(path).decode('utf-8')
        elif '://' in path and not path.startswith('file://'):
            with wds.gopen(path) as f:
                text = f.read().decode('utf-8')
        else:
            local = path[len('file://'):] if path.startswith('file://') else path
            if not os.path.isfile(local):
                raise FileNotFoundError(f'No {META_NAME} at {local} (is this a reinforce.py output directory?)')
            with open(local, encoding='utf-8') as f:
                text = f.read()
        meta = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f'{path}: not valid JSON ({e})') from e
    if not isinstance(meta, dict):
        raise ValueError(f'{path}: expected a JSON object')
    version = meta.get('schema_version')
    if version not in READABLE_SCHEMA_VERSIONS:
        raise ValueError(f'{path}: unsupported schema_version {version!r} (this code reads '
                         f'{", ".join(map(str, READABLE_SCHEMA_VERSIONS))})')
    if (version == LABEL_MAP_SCHEMA_VERSION) != (meta.get('kind') == LABEL_MAP_KIND):
        raise ValueError(f'{path}: schema_version {version} with kind {meta.get("kind")!r} (label maps are schema '
                         f'{LABEL_MAP_SCHEMA_VERSION} with kind {LABEL_MAP_KIND!r}, and only they)')
    required = ('teachers', 'augmentation', 'topk', 'num_samples', 'num_classes', 'shards')
    if version == LABEL_MAP_SCHEMA_VERSION:
        required += ('label_map', 'record_dtype')
    missing = [k for k in required if k not in meta]
    if missing:
        raise ValueError(f'{path}: missing key(s) {", ".join(missing)}')
    meta['_path'] = path
    return meta


def image_order(num_images: int, seed: int) -> np.ndarray:
    """The seeded permutation in which reinforce.py writes the images: position ``p`` holds dataset index
    ``order[p]``.

    ``argsort`` of the raw 64-bit output of ``PCG64(SeedSequence([seed, IMAGE_ORDER_TAG]))``: numpy keeps bit generator
    streams stable across versions (unlike ``Generator.permutation``), so a resumed run places every image where the
    first run did. Each schema-2 shard also stores its samples' dataset indices (``CHECKSUMS_MEMBER``).
    """
    bits = np.random.PCG64(np.random.SeedSequence([int(seed), IMAGE_ORDER_TAG])).random_raw(int(num_images))
    return np.argsort(bits, kind='stable').astype(np.int64)


def meta_image_order(meta: Dict[str, Any]) -> np.ndarray:
    """Dataset index per position of a reinforced dataset (``reinforce.json`` ``image_order``; identity before
    schema 2)."""
    order = meta.get('image_order') or {'kind': 'dataset'}
    n = int(meta['num_images'])
    if order.get('kind') == 'dataset':
        return np.arange(n, dtype=np.int64)
    if order.get('kind') == 'permutation':
        return image_order(n, int(order['seed']))
    raise ValueError(f'{meta.get("_path", META_NAME)}: unknown image_order {order!r}')


def sample_checksum(shard: str, position: int, key: str, index: int, members: Dict[str, bytes]) -> int:
    """XXH3-64 (as an unsigned int) of a sample's members bound to its place: ``shard`` (file name), ``position`` in
    the shard, key and dataset index, then every member in sorted order of its lower-cased extension as
    ``ext NUL len NUL data``. A flipped byte, a label or id edit, or a sample (or a whole shard) copied elsewhere
    changes it. Entries of ``members`` whose name starts with ``__`` (WebDataset's ``__key__``, ...) are ignored.

    XXH3 (the ``xxhash`` package) hashes ~20 GB/s, ~10x zlib's CRC-32 here: checking 22 KB of records per sample
    costs the training loader ~1 us instead of ~13 us."""
    h = xxhash.xxh3_64(f'{shard}\0{int(position)}\0{key}\0{int(index)}\0'.encode())
    for name in sorted(members, key=str.lower):
        if name[:2] == '__':
            continue
        data = members[name]
        h.update(b'%s\0%d\0' % (name.lower().encode(), len(data)))
        h.update(data)
    return h.intdigest()


def encode_checksums(table: np.ndarray) -> bytes:
    """The ``CHECKSUMS_MEMBER`` bytes: a ``.npy`` of ``CHECKSUMS_DTYPE`` rows (``allow_pickle=False``)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(table, dtype=CHECKSUMS_DTYPE), allow_pickle=False)
    return buf.getvalue()


def decode_checksums(data: bytes, where: str) -> np.ndarray:
    """Parse a shard's checksum table (no pickle).

    Raises:
        ValueError: naming ``where`` when it is not a 1-D array of ``CHECKSUMS_DTYPE``.
    """
    try:
        table = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:
        raise ValueError(f'{where}: undecodable checksum table {CHECKSUMS_MEMBER} ({type(e).__name__}: {e})') from e
    if not isinstance(table, np.ndarray) or table.dtype != CHECKSUMS_DTYPE or table.ndim != 1:
        raise ValueError(f'{where}: checksum table {CHECKSUMS_MEMBER} is not a 1-D array of {CHECKSUMS_DTYPE.descr}')
    return table


def list_shards(directory: str) -> List[str]:
    """Sorted ``NNNNNN.tar`` file names in ``directory``."""
    return sorted(n for n in os.listdir(directory) if SHARD_RE.match(n))


def sanitize_key(text: str, max_len: int = 64) -> str:
    """A WebDataset-safe key fragment: no dots (the key ends at the first dot), slashes or odd characters."""
    s = re.sub(r'[^A-Za-z0-9_-]+', '_', text).strip('_')
    return s[-max_len:] if len(s) > max_len else s


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = 0  # fixed so identical content gives identical bytes
    info.uid = info.gid = 0
    info.uname = info.gname = ''
    return info


def build_shard(samples: Sequence[Dict[str, Any]], shard: Optional[str] = None) -> bytes:
    """The bytes of one tar shard (deterministic: fixed mtime/owner, members in sample order).

    Args:
        samples: dicts with ``key``, ``image_ext``, ``image`` (bytes), ``label`` (int), ``records`` (npy bytes) and,
            with ``shard``, ``index`` (the dataset index).
        shard: the shard's file name: the shard starts with the checksum table (schema 2); None writes schema 1.
    """
    members = [{s['image_ext']: s['image'], LABEL_EXT: str(int(s['label'])).encode('ascii'),
                RECORDS_EXT: s['records']} for s in samples]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode='w', format=tarfile.USTAR_FORMAT) as tar:
        if shard is not None:
            table = np.array([(int(s['index']), sample_checksum(shard, p, s['key'], s['index'], m))
                              for p, (s, m) in enumerate(zip(samples, members))], dtype=CHECKSUMS_DTYPE)
            data = encode_checksums(table)
            tar.addfile(_tarinfo(CHECKSUMS_MEMBER, len(data)), io.BytesIO(data))
        for s, m in zip(samples, members):
            for ext, data in m.items():
                tar.addfile(_tarinfo(f'{s["key"]}.{ext}', len(data)), io.BytesIO(data))
    return buf.getvalue()


def split_member_name(name: str) -> tuple:
    """``dir/key.ext.more`` -> (``dir/key``, ``ext.more``): the key ends at the basename's first dot."""
    head, _, base = name.rpartition('/')
    stem, dot, ext = base.partition('.')
    key = f'{head}/{stem}' if head else stem
    return key, ext if dot else ''


def iter_shard(fileobj_or_path: Union[str, io.IOBase], where: str) -> Iterator[Dict[str, Any]]:
    """Iterate the samples of a shard with ``tarfile`` (no decoding of images or records).

    Yields dicts with ``key``, ``image_ext``, ``image``, ``label`` (int), ``records`` (bytes), ``members`` (ext ->
    raw bytes, every member) and ``info``: ``{'index', 'xxh3'}`` from the shard's checksum table (schema 2; None
    without one, or for samples beyond it).

    Raises:
        ValueError: naming ``where`` for a truncated/garbled tar or an incomplete sample.
    """
    def finish(sample):
        if sample is None:
            return None
        need = [n for n in ('image', 'label', 'records') if n not in sample]
        if need:
            raise ValueError(f'{where} key {sample["key"]}: incomplete sample, missing {", ".join(need)}')
        return sample

    try:
        if isinstance(fileobj_or_path, str):
            tar = tarfile.open(fileobj_or_path, mode='r:')
        else:
            tar = tarfile.open(fileobj=fileobj_or_path, mode='r:')
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ValueError(f'{where}: not a readable tar ({e})') from e
    current: Optional[Dict[str, Any]] = None
    table: Optional[np.ndarray] = None
    position = 0
    try:
        with tar:
            while True:
                try:
                    info = tar.next()
                except (tarfile.TarError, OSError, EOFError) as e:
                    raise ValueError(f'{where}: corrupt or truncated tar ({e})') from e
                if info is None:
                    break
                if not info.isfile():
                    continue
                key, ext = split_member_name(info.name)
                f = tar.extractfile(info)
                data = f.read() if f is not None else b''
                if len(data) != info.size:
                    raise ValueError(f'{where} key {key}: truncated member {info.name}')
                if info.name == CHECKSUMS_MEMBER:
                    table = decode_checksums(data, where)
                    continue
                if current is None or current['key'] != key:
                    done = finish(current)
                    if done is not None:
                        yield done
                    row = table[position] if table is not None and position < len(table) else None
                    current = {'key': key, 'members': {}, 'position': position,
                               'info': None if row is None else {'index': int(row['index']), 'xxh3': int(row['xxh3'])}}
                    position += 1
                current['members'][ext] = data
                if ext == LABEL_EXT:
                    try:
                        current['label'] = int(data.decode('ascii').strip())
                    except ValueError as e:
                        raise ValueError(f'{where} key {key}: bad label {data[:20]!r}') from e
                elif ext == RECORDS_EXT:
                    current['records'] = data
                elif ext.lower() in IMAGE_EXTS:
                    current['image'] = data
                    current['image_ext'] = ext
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ValueError(f'{where}: corrupt or truncated tar ({e})') from e
    done = finish(current)
    if done is not None:
        yield done


def iter_listed_samples(directory: str, meta: Dict[str, Any]) -> Iterator[tuple]:
    """``(shard entry, sample, where)`` of every sample of the shards ``reinforce.json`` lists, in order (``sample`` as
    :func:`iter_shard` yields it, its label checked against ``num_classes``). A remote folder (``s3://``,
    ``http(s)://``) is read through :mod:`dr.storage`: each shard fetched to a temporary file, one at a time.

    Raises:
        FileNotFoundError: a listed shard is missing.
        ValueError: naming shard and key of an unreadable sample or a label out of range (``StorageError`` naming
            the URL of a remote shard that cannot be read).
    """
    num_classes = int(meta['num_classes'])
    remote = storage.is_remote(directory)
    for entry in meta['shards']:
        if remote:
            shard = storage.fetched(storage.join(directory, entry['name']))
        else:
            path = os.path.join(directory, entry['name'])
            if not os.path.isfile(path):
                raise FileNotFoundError(f'{directory}: shard {entry["name"]} listed in {META_NAME} is missing')
            shard = contextlib.nullcontext(path)
        with shard as path:
            for sample in iter_shard(path, f'shard {entry["name"]}'):
                where = f'shard {entry["name"]} key {sample["key"]}'
                if not 0 <= sample['label'] < num_classes:
                    raise ValueError(f'{where}: label {sample["label"]} outside 0..{num_classes - 1} '
                                     f'(member .{LABEL_EXT})')
                yield entry, sample, where


def listed_shard_bytes(directory: str, meta: Dict[str, Any]) -> int:
    """Total size of the shards ``reinforce.json`` lists (those present; a remote folder: their object sizes)."""
    if storage.is_remote(directory):
        return sum(storage.size(storage.join(directory, e['name'])) for e in meta['shards'])
    paths = (os.path.join(directory, e['name']) for e in meta['shards'])
    return sum(os.path.getsize(p) for p in paths if os.path.isfile(p))
