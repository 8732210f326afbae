"""Image sources of the reinforcement job: folders keep original bytes, wds/ shards, decoded datasets as PNG."""
import glob
import io
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

import reinforce
from dr.reinforce.format import iter_shard
from dr.reinforce.sources import PILSource, create_source
from tests.reinforce.common import reinforce_args

pytestmark = pytest.mark.usefixtures('one_thread')


def _folder_dataset(root):
    rng = np.random.default_rng(0)
    files = []
    for c, cls in enumerate(('cat', 'dog')):
        os.makedirs(os.path.join(root, cls))
        for j, ext in enumerate(('png', 'JPEG')):
            arr = rng.integers(0, 255, size=(20 + 3 * j, 24, 3), dtype=np.uint8)
            path = os.path.join(root, cls, f'img.{j}.{ext}')
            Image.fromarray(arr).save(path, format='PNG' if ext == 'png' else 'JPEG')
            files.append((path, c))
    return files


def test_folder_source_keeps_original_bytes(ckpts, tmp_path):
    root = str(tmp_path / 'folder')
    files = _folder_dataset(root)
    source = create_source('', root=root)
    assert source.classes == ['cat', 'dog'] and len(source) == 4 and not source.stores_png
    got = {source.get(i).data: source.get(i) for i in range(4)}
    for path, label in files:
        item = got[open(path, 'rb').read()]
        assert item.label == label and item.ext == os.path.splitext(path)[1][1:].lower()
        assert '.' not in item.key
    out = tmp_path / 'rd'
    args = ['' if a == 'digits' else a
            for a in reinforce_args(out, ckpts, '--num-samples', '2', '--max-images', '0', '--num-classes', '10')]
    assert reinforce.main([root, *args]) == 0
    stored = [x for p in sorted(glob.glob(str(out / '*.tar'))) for x in iter_shard(p, p)]
    assert sorted(x['image'] for x in stored) == sorted(open(p, 'rb').read() for p, _ in files)
    assert sorted(x['image_ext'] for x in stored) == ['jpeg', 'jpeg', 'png', 'png']


def test_wds_source_reads_existing_shards(tmp_path):
    root = tmp_path / 'wds'
    root.mkdir()
    expected = []
    for s in range(2):
        with tarfile.open(root / f'data-{s:04d}.tar', 'w') as tar:
            for j in range(3):
                img = io.BytesIO()
                Image.new('RGB', (9 + j, 7), (s * 40, j * 30, 5)).save(img, format='PNG')
                for ext, payload in (('png', img.getvalue()), ('cls', str(s + j).encode())):
                    info = tarfile.TarInfo(f'k{s}_{j}.{ext}')
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
                expected.append((img.getvalue(), s + j))
    source = create_source('wds/mine', root=str(root), split='data-{0000..0001}.tar|6')
    assert len(source) == 6
    got = [source.get(i) for i in range(6)]
    assert [(g.data, g.label) for g in got] == expected and all(g.ext == 'png' for g in got)


def test_pil_source_encodes_png():
    class Tiny(torch.utils.data.Dataset):
        classes = ['a', 'b']

        def __len__(self):
            return 2

        def __getitem__(self, i):
            return Image.new('RGB', (5, 4), (i * 100, 3, 7)), i

    source = PILSource(Tiny(), 'torch/tiny')
    item = source.get(1)
    assert item.ext == 'png' and item.label == 1 and source.stores_png
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(item.data))), np.asarray(Tiny()[1][0]))
