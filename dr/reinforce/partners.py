"""Random access to the samples of a reinforced dataset by position: the partners of ``+mix`` stored augmentations
(and ``reinforce.py --show``).

A ``+mix`` record names its partner by ``mix_ref``, the partner's position in the dataset: the shards of
``reinforce.json`` in name order, samples in tar order. The training loader streams shards, but a partner may sit
anywhere (an imported ml-dr reinforcement mixes images of the whole dataset; this project's writer keeps partners in
the same shard, in groups of ``mix_group`` consecutive images). :class:`PartnerImages` reads a partner's image bytes
with one ``pread`` from the local shard file; a shard's member offsets come from its tar headers, indexed on first use
(headers only) and kept for the most recently used shards. Nothing holds the dataset in memory.

The position of a sample is its index in the concatenation of the shards in name order; which source-dataset image
sits at each position is :func:`dr.reinforce.format.meta_image_order`. Members whose name starts with ``__`` (the
schema-2 checksum table ``__rd__/checksums.npy``) are not samples.
"""
import collections
import os
import tarfile
from bisect import bisect_right
from typing import Any, Dict, List, Optional, Tuple

from .format import IMAGE_EXTS, META_NAME, split_member_name

Entry = Tuple[str, Dict[str, Tuple[int, int]]]  # (key, {member extension: (data offset, size)})


def local_dir(meta: Dict[str, Any]) -> Optional[str]:
    """The local directory of a reinforced dataset (``reinforce.json``'s), or None when it is remote."""
    path = str(meta.get('_path', ''))
    if path.startswith('file://'):
        path = path[len('file://'):]
    if not path or ('://' in path) or path.startswith('pipe:'):
        return None
    return os.path.dirname(os.path.abspath(path))


class PartnerImages:
    """Samples and image bytes by dataset position, read from the local shard files of ``meta`` (``load_meta``).

    Args:
        meta: the dataset's ``reinforce.json`` (with ``_path``).
        where_flag: the flag named in errors.
        max_indexed: shards whose member index is kept (least recently used ones are dropped).
        max_open: shard files kept open.

    Raises:
        ValueError: the dataset is not on a local filesystem (partners need random access).
    """

    def __init__(self, meta: Dict[str, Any], where_flag: str = '--reinforced', max_indexed: int = 64,
                 max_open: int = 8):
        self.where_flag = where_flag
        self.directory = local_dir(meta)
        if self.directory is None:
            raise ValueError(f'{where_flag}: {meta.get("_path", META_NAME)}: mixing reinforcements (+mix) read '
                             f'their partner images by random access and need the shards on a local filesystem')
        entries = sorted((str(s['name']), int(s['count'])) for s in meta['shards'])
        self.names = [n for n, _ in entries]
        self.counts = [c for _, c in entries]
        self.starts = [0]
        for c in self.counts:
            self.starts.append(self.starts[-1] + c)
        self.max_indexed, self.max_open = int(max_indexed), int(max_open)
        self._index: collections.OrderedDict[int, List[Entry]] = collections.OrderedDict()
        self._files: collections.OrderedDict[int, int] = collections.OrderedDict()
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
        return os.path.join(self.directory, self.names[shard])

    def _entries(self, shard: int) -> List[Entry]:
        if shard in self._index:
            self._index.move_to_end(shard)
            return self._index[shard]
        path = self.path(shard)
        samples: List[Entry] = []
        keys: Dict[str, int] = {}
        try:
            with tarfile.open(path, mode='r:') as tar:
                for info in tar:  # headers only: tarfile seeks over the data of a seekable file
                    if not info.isfile() or info.name.startswith('__'):
                        continue
                    key, ext = split_member_name(info.name)
                    if key not in keys:
                        keys[key] = len(samples)
                        samples.append((key, {}))
                    samples[keys[key]][1][ext] = (info.offset_data, info.size)
        except (tarfile.TarError, OSError) as e:
            raise ValueError(f'{self.where_flag}: cannot index shard {path} for partner images ({e})') from e
        if len(samples) != self.counts[shard]:
            raise ValueError(f'{self.where_flag}: shard {path} holds {len(samples)} samples but {META_NAME} lists '
                             f'{self.counts[shard]} (modified shard?)')
        self._index[shard] = samples
        while len(self._index) > self.max_indexed:
            self._index.popitem(last=False)
        return samples

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
        return state
