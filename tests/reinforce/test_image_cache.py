"""The decoded-image cache of the +mix training loader: bounded, LRU, and invisible in the batches."""
import torch
from PIL import Image

from dr.reinforce.image_cache import DecodedImages
from tests.reinforce.test_mixing import _loader, make_mixing


def _img(w: int, h: int) -> Image.Image:
    return Image.new('RGB', (w, h))


def test_cache_is_lru_and_bounded_in_bytes():
    cache = DecodedImages(max_bytes=3 * 10 * 10 * 3)  # three 10x10 RGB images
    for position in range(3):
        cache.put(position, f'k{position}', _img(10, 10))
    assert len(cache) == 3 and cache.bytes == 900
    assert cache.get(0)[0] == 'k0'  # 0 is now the most recently used
    cache.put(3, 'k3', _img(10, 10))  # evicts 1, the least recently used
    assert cache.get(1) is None and cache.get(0) is not None and cache.get(3) is not None
    cache.put(4, 'k4', _img(40, 40))  # larger than the whole bound: not cached, nothing evicted
    assert cache.get(4) is None and len(cache) == 3
    cache.put(3, 'k3', _img(5, 5))  # replacing an entry updates the byte count
    assert cache.bytes == 600 + 75
    cache.clear()
    assert len(cache) == 0 and cache.bytes == 0
    assert DecodedImages(0).get(0) is None


def _batches(loader, epoch):
    loader.set_epoch(epoch)
    return list(loader)


def test_mixing_loader_decodes_each_image_once_per_epoch_and_batches_do_not_change(tmp_path):
    rd = make_mixing(str(tmp_path / 'rd'), aug='rrc+ra_re+mix')
    cached, plain = _loader(rd['dir']), _loader(rd['dir'])
    plain.dataset._decoded = DecodedImages(0)  # no caching: every stream sample and partner decoded anew
    decodes = []
    for epoch in range(2):
        a, b = _batches(cached, epoch), _batches(plain, epoch)
        assert len(a) == len(b) > 0
        for x, y in zip(a, b):
            assert all(torch.equal(u, v) for u, v in zip(x, y))
        cache = cached.dataset._decoded
        decodes.append(cache.misses)
        assert cache.hits > 0 and len(cache) == 24  # every image of the dataset decoded, none twice
        cache.hits = cache.misses = 0
    # a miss is a decode: each of the 24 images exactly once per epoch; emptied at each epoch start, the second epoch
    # decodes them all again (no reuse across epochs)
    assert decodes == [24, 24]
