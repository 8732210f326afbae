"""A bounded cache of decoded images by dataset position, for the ``+mix`` variants of the training loader.

Each ``+mix`` stored augmentation that mixes replays a second image, its partner: another image of the same group of
consecutive images of the shard (this project's writer) or of the dataset (imported ml-dr reinforcements). Without a
cache every such partner is decoded once more, and the partner itself is decoded again when the stream reaches it, so
an epoch decodes ~1.75 images per sample at the paper's mixing probabilities. The loader keeps the decoded images of
the samples it streams and the partners it reads in a least-recently-used cache bounded in bytes, so an image the
stream or a partner read decoded recently in the same epoch is not decoded again (the cache is emptied at every
epoch start, so a small dataset is not simply held decoded in memory; ``benchmarks/train_epoch_cost.py --aug
rrc+mix``).
The cached images are the ones a fresh decode gives (the same bytes through the same decoder), so replays do not
change; replays never modify their input image.
"""
import collections
from typing import Optional, Tuple

from PIL import Image

DEFAULT_MAX_BYTES = 128 << 20  # per loader worker


class DecodedImages:
    """``position -> (key, decoded RGB image)``, least recently used first out, at most ``max_bytes`` of pixels.

    Args:
        max_bytes: bound on the summed ``width * height * channels`` of the cached images (<= 0: no caching).
    """

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES):
        self.max_bytes = int(max_bytes)
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._items: collections.OrderedDict[int, Tuple[str, Image.Image, int]] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        self._items.clear()
        self.bytes = 0

    def get(self, position: int) -> Optional[Tuple[str, Image.Image]]:
        item = self._items.get(position)
        if item is None:
            self.misses += 1
            return None
        self._items.move_to_end(position)
        self.hits += 1
        return item[0], item[1]

    def put(self, position: int, key: str, image: Image.Image) -> None:
        size = image.width * image.height * len(image.getbands())
        if size > self.max_bytes:
            return
        old = self._items.pop(position, None)
        if old is not None:
            self.bytes -= old[2]
        self._items[position] = (key, image, size)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (_, _, dropped) = self._items.popitem(last=False)
            self.bytes -= dropped
