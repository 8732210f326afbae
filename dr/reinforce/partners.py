"""Random access to the samples of a reinforced dataset by position: the partners of ``+mix`` stored augmentations
(and ``reinforce.py --show``).

A ``+mix`` record names its partner by ``mix_ref``, the partner's position in the dataset: the shards of
``reinforce.json`` in name order, samples in tar order. The training loader streams shards, but a partner may sit
anywhere (an imported ml-dr reinforcement mixes images of the whole dataset; this project's writer keeps partners in
the same shard, in groups of ``mix_group`` consecutive images). :class:`PartnerImages` reads a partner's image bytes
with one ``pread`` from the local shard file, or one ranged read (S3 ``Range`` GET, HTTP ``Range``,
:func:`dr.storage.read_range`) from a remote one; a shard's member offsets come from its tar headers, indexed on first
use (local: headers only; remote: one streamed read of the shard) and kept for the most recently used shards. That
streamed read also keeps the image bytes of the most recently indexed remote shards, up to ``remote_cache_bytes`` per
process, so partners in the shards a worker streams (this project's writer draws them within groups of a shard) cost
no further request; other partners (imported ml-dr data mixes the whole dataset) are one ranged read each. Nothing
holds the dataset in memory.

The position of a sample is its index in the concatenation of the shards in name order; which source-dataset image
sits at each position is :func:`dr.reinforce.format.meta_image_order`. Members whose name starts with ``__`` (the
schema-2 checksum table ``__rd__/checksums.npy``) are not samples.
"""
import collections
import contextlib
import os
import tarfile
from bisect import bisect_right
from typing import Any, Dict, Iterator, List, Optional, Tuple

from .. import storage
from .format import IMAGE_EXTS, META_NAME, split_member_name

REMOTE_CACHE_BYTES = 256 << 20  # per process: about two ImageNet shards of 1000 JPEGs
Entry = Tuple[str, Dict[str, Tuple[int, int]]]  # (key, {member extension: (data offset, size)})


def shard_dir(meta: Dict[str, Any]) -> Optional[str]:
    """The folder (local directory or ``s3://``/``http(s)://`` URL) of the shards next to ``reinforce.json``, or None
    when it cannot be read by random access (``pipe:`` and other schemes)."""
    path = str(meta.get('_path', ''))
    if storage.is_remote(path):
        return path.rsplit('/', 1)[0]
    if path.startswith('file://'):
        path = path[len('file://'):]
    if not path or ('://' in path) or path.startswith('pipe:'):
        return None
    return os.path.dirname(os.path.abspath(path))


class PartnerImages:
    """Samples and image bytes by dataset position, read from the shard files of ``meta`` (``load_meta``), local or
    remote (``s3://``, ``http(s)://`` with ``Range`` support).

    Args:
        meta: the dataset's ``reinforce.json`` (with ``_path``).
        where_flag: the flag named in errors.
        max_indexed: shards whose member index is kept (least recently used ones are dropped).
        max_open: shard files kept open.
        remote_cache_bytes: image bytes of remote shards kept from their indexing reads, per process (whole shards,
            least recently used dropped first; 0: none).

    Raises:
        ValueError: the shards cannot be read by random access (``pipe:`` URLs).
    """

    def __init__(self, meta: Dict[str, Any], where_flag: str = '--reinforced', max_indexed: int = 64,
                 max_open: int = 8,
                 remote_cache_bytes: int = REMOTE_CACHE_BYTES):
        self.where_flag = where_flag
        self.directory = shard_dir(meta)
        if self.directory is None:
            raise ValueError(f'{where_flag}: {meta.get("_path", META_NAME)}: mixing reinforcements (+mix) read '
                             f'their partner images by random access and need the shards on a local filesystem, '
                             f's3:// or http(s)://')
        self.remote = storage.is_remote(self.directory)
        entries = sorted((str(s['name']), int(s['count'])) for s in meta['shards'])
        self.names = [n for n, _ in entries]
        self.counts = [c for _, c in entries]
        self.starts = [0]
        for c in self.counts:
            self.starts.append(self.starts[-1] + c)
        self.max_indexed, self.max_open = int(max_indexed), int(max_open)
        self._index: collections.OrderedDict[int, List[Entry]] = collections.OrderedDict()
        self._files: collections.OrderedDict[int, int] = collections.OrderedDict()
        self.remote_cache_bytes = int(remote_cache_bytes)
        # remote shards: (image bytes by key, their total), least recently used first
        self._images: collections.OrderedDict[int, Tuple[Dict[str, bytes], int]] = collections.OrderedDict()
        self._pid = os.getpid()

    @property
    def num_images(self) -> int:
        return self.starts[-1]

    def locate(self, position: int) -> Tuple[int, int]:
        """(shard number in name order, sample ordinal in the shard) of a dataset position."""
        if not 0 <= position < self.num_images:
            raise IndexError(f'{self.where_flag}: partner position {position} outside the dataset '
                             f'(0..{self.num_images - 1})')
        s = bisect_right(self.starts, position) - 1
        return s, position - self.starts[s]

    def path(self, shard: int) -> str:
        return (storage.join if self.remote else os.path.join)(self.directory, self.names[shard])

    def _entries(self, shard: int) -> List[Entry]:
        if shard in self._index:
            self._index.move_to_end(shard)
            return self._index[shard]
        path = self.path(shard)
        samples: List[Entry] = []
        keys: Dict[str, int] = {}
        images: Dict[str, bytes] = {}
        try:
            with self._open_tar(path) as tar:
                for info in tar:  # local: headers only, tarfile seeks over the data of a seekable file
                    if not info.isfile() or info.name.startswith('__'):
                        continue
                    key, ext = split_member_name(info.name)
                    if key not in keys:
                        keys[key] = len(samples)
                        samples.append((key, {}))
                    samples[keys[key]][1][ext] = (info.offset_data, info.size)
                    if self.remote and self.remote_cache_bytes > 0 and ext.lower() in IMAGE_EXTS:
                        member = tar.extractfile(info)  # the stream passes over these bytes anyway
                        images[key] = member.read() if member is not None else b''
        except (tarfile.TarError, OSError, storage.StorageError) as e:
            raise ValueError(f'{self.where_flag}: cannot index shard {path} for partner images ({e})') from e
        if len(samples) != self.counts[shard]:
            raise ValueError(f'{self.where_flag}: shard {path} holds {len(samples)} samples but {META_NAME} lists '
                             f'{self.counts[shard]} (modified shard?)')
        self._index[shard] = samples
        while len(self._index) > self.max_indexed:
            self._index.popitem(last=False)
        held = sum(len(b) for b in images.values())
        if images and held <= self.remote_cache_bytes:
            self._images[shard] = images, held
            while sum(n for _, n in self._images.values()) > self.remote_cache_bytes:
                self._images.popitem(last=False)
        return samples

    @contextlib.contextmanager
    def _open_tar(self, path: str) -> Iterator[tarfile.TarFile]:
        """A local shard opened for seeking over member data; a remote one streamed once (headers and data)."""
        if not self.remote:
            with tarfile.open(path, mode='r:') as tar:
                yield tar
            return
        with storage.open_read(path) as stream, tarfile.open(fileobj=stream, mode='r|') as tar:
            yield tar

    def _fd(self, shard: int) -> int:
        if os.getpid() != self._pid:  # a forked worker: the parent's descriptors are not ours to share
            self._files.clear()
            self._pid = os.getpid()
        if shard in self._files:
            self._files.move_to_end(shard)
            return self._files[shard]
        fd = os.open(self.path(shard), os.O_RDONLY)
        self._files[shard] = fd
        while len(self._files) > self.max_open:
            os.close(self._files.popitem(last=False)[1])
        return fd

    def _read(self, shard: int, key: str, ext: str, offset: int, size: int) -> bytes:
        if self.remote:
            cached = self._images.get(shard, ({}, 0))[0].get(key) if ext.lower() in IMAGE_EXTS else None
            if cached is not None and len(cached) == size:
                self._images.move_to_end(shard)
                return cached
            return storage.read_range(self.path(shard), offset, size)
        data = os.pread(self._fd(shard), size, offset)
        if len(data) != size:
            raise ValueError(f'{self.where_flag}: shard {self.path(shard)} key {key}: member .{ext} truncated')
        return data

    def get(self, position: int) -> Tuple[str, str, bytes]:
        """(key, image extension, original image bytes) of the image at ``position``."""
        shard, ordinal = self.locate(position)
        key, members = self._entries(shard)[ordinal]
        images = [e for e in members if e.lower() in IMAGE_EXTS]
        if len(images) != 1:
            raise ValueError(f'{self.where_flag}: shard {self.path(shard)} key {key}: expected one image member, '
                             f'found {len(images)}')
        return key, images[0], self._read(shard, key, images[0], *members[images[0]])

    def sample(self, position: int) -> Dict[str, Any]:
        """The WebDataset sample at ``position``: ``{ext: bytes, ..., '__key__', '__url__'}`` (what the training
        loader's reader yields)."""
        shard, ordinal = self.locate(position)
        key, members = self._entries(shard)[ordinal]
        out: Dict[str, Any] = {'__key__': key, '__url__': self.path(shard)}
        for ext, (offset, size) in members.items():
            out[ext] = self._read(shard, key, ext, offset, size)
        return out

    def close(self) -> None:
        for fd in self._files.values():
            os.close(fd)
        self._files.clear()

    def __getstate__(self) -> Dict[str, Any]:  # sent to DataLoader workers without open files
        state = dict(self.__dict__)
        state['_files'] = collections.OrderedDict()
        state['_images'] = collections.OrderedDict()
        return state
