"""``reinforce.py --output s3://bucket/prefix``: the shard store of :mod:`dr.reinforce.writer` on S3.

Every object goes through :mod:`dr.storage`: each shard is built in memory, written to a local temporary file and
uploaded when complete (an S3 object is visible under its name only once its upload completed, so a killed upload
leaves nothing there), then its sidecar; rank 0 uploads ``reinforce.json`` last. A rerun lists the prefix: a shard
whose object and sidecar (for this configuration) are there, with the sidecar's size, is complete (sidecars are
uploaded only after their shard); the others are redone, with the same bytes (shards depend only on the
configuration). ``reinforce.py --verify s3://...`` checks every shard's sha256.
"""
import functools
import json
import logging
from typing import Any, Dict, List, Optional, Tuple

from .. import storage
from .format import META_NAME, SHARD_RE, shard_name
from .writer import ShardStore, sidecar_name

_logger = logging.getLogger(__name__)


class RemoteShardStore(ShardStore):
    """:class:`writer.ShardStore` on an ``s3://`` prefix (the listing is read once per plan, refreshed on merge)."""

    def __init__(self, output: str, config: Dict[str, Any]):
        super().__init__(output.rstrip('/'), config)
        self._sizes: Optional[Dict[str, int]] = None

    def sizes(self, refresh: bool = False) -> Dict[str, int]:
        if self._sizes is None or refresh:
            self._sizes = storage.list_sizes(self.output)
        return self._sizes

    def path(self, index: int) -> str:
        return f'{self.output}/{shard_name(index)}'

    def sidecar_path(self, index: int) -> str:
        return f'{self.output}/{sidecar_name(index)}'

    def stored_configs(self) -> List[Tuple[str, Any]]:
        names = self.sizes()
        chosen = [n for n in sorted(names) if n.startswith('.') and n.endswith('.json') and n[1:7].isdigit()
                  and len(n) == len('.000000.json')]
        if META_NAME in names:
            chosen.insert(0, META_NAME)
        return [(f'{self.output}/{n}', functools.partial(_read_text, f'{self.output}/{n}')) for n in chosen]

    def size_of(self, index: int) -> Optional[int]:
        return self.sizes().get(shard_name(index))

    def known_info(self, index: int) -> Optional[Dict[str, Any]]:
        if sidecar_name(index) not in self.sizes():
            return None
        try:
            info = json.loads(_read_text(self.sidecar_path(index)))
        except ValueError:
            return None
        return info if info.get('config') == self.config else None

    def is_complete(self, index: int, count: int) -> Tuple[bool, str]:
        size = self.size_of(index)
        if size is None:
            return False, 'missing'
        info = self.known_info(index)
        if info is None:
            return False, 'no matching sidecar (interrupted upload?)'
        if info.get('count') != count:
            return False, 'image count differs'
        if size != info.get('bytes'):
            return False, 'size differs from its sidecar'
        return True, 'complete'

    def check_strays(self, num_shards: int) -> None:
        stray = sorted(n for n in self.sizes() if SHARD_RE.match(n) and int(n[:6]) >= num_shards)
        if stray:
            raise ValueError(f'--output {self.output}: {", ".join(stray[:5])} not part of this reinforcement '
                             f'({num_shards} shards); delete them, then rerun')

    def clean_stale(self, indices: Any, run_files: bool = False) -> None:
        """Nothing to clean: an interrupted upload leaves no object behind."""

    def store(self, index: int, data: bytes, info_of: Any) -> Dict[str, Any]:
        storage.put_bytes(self.path(index), data)
        info = info_of()
        storage.put_bytes(self.sidecar_path(index), json.dumps(info, indent=1).encode())
        _logger.info(f'uploaded {self.path(index)} ({len(data)} bytes)')
        return info

    def put_meta(self, meta: Dict[str, Any]) -> None:
        storage.put_bytes(f'{self.output}/{META_NAME}', json.dumps(meta, indent=1).encode())

    def merge(self, num_shards: int, fields: Dict[str, Any], num_augmentations: int) -> Dict[str, Any]:
        self.sizes(refresh=True)  # the other ranks' uploads
        return super().merge(num_shards, fields, num_augmentations)


def _read_text(url: str) -> str:
    return storage.read_bytes(url).decode('utf-8')
