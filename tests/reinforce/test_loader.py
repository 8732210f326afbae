"""The reinforced training loader: epoch semantics, determinism, errors naming shard and key, the tar reader,
and a student trained end to end on reinforce.py output."""
import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
from collections import Counter
from typing import Dict, List, Optional, Sequence

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from dr.reinforce.augment import AugmentSpec, apply_record, create_augment_spec, sample_records
from dr.reinforce.format import (
    CHECKSUMS_DTYPE,
    CHECKSUMS_MEMBER,
    SCHEMA_VERSION,
    densify,
    encode_checksums,
    encode_records,
    record_dtype,
    sample_checksum,
)
from dr.reinforce.loader import (
    ReinforcedDataError,
    check_reinforced,
    create_reinforced_loader,
    interleave_pieces,
    replay_interpolation,
    resolve_reinforced,
    tar_members,
    webdataset_tar_members,
    worker_pieces,
)
from dr.reinforce.tar_reader import TarFormatError
from tests.helpers import REPO as ROOT

MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)
SIZE = 12


def _image_bytes(rng: np.random.Generator, size: int, fmt: str) -> bytes:
    arr = rng.integers(0, 256, size=(size, size + 2, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def _fake_records(rng: np.random.Generator, width: int, height: int, spec: AugmentSpec, num_samples: int,
                  topk: int, num_classes: int) -> np.ndarray:
    rec = sample_records(rng, width, height, spec, num_samples, record_dtype(topk, num_classes, spec.name))
    for r in range(num_samples):
        p = rng.dirichlet(np.full(num_classes, 0.3))
        order = np.argsort(-p)[:topk]
        rec['ids'][r] = order
        rec['probs'][r] = p[order].astype(np.float16)
    return rec


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_reinforced(
        out_dir: str,
        shard_sizes: Sequence[int],
        num_classes: Optional[int] = None,
        topk: int = 3,
        num_samples: int = 4,
        aug: str = 'rrc+ra_re',
        img_size: int = 16,
        seed: int = 0,
        drop_member: Optional[Dict[int, str]] = None,
        schema: int = SCHEMA_VERSION,
) -> Dict[str, object]:
    """Shards ``000000.tar``... + reinforce.json. Image i has label i (unique) unless num_classes is smaller.
    ``schema=1`` writes the version-1 layout (no checksum table)."""
    os.makedirs(out_dir, exist_ok=True)
    num_images = int(sum(shard_sizes))
    num_classes = num_classes or num_images
    spec = create_augment_spec(aug)
    rng = np.random.default_rng(seed)
    shards, index = [], 0
    records_by_key = {}
    for s, size in enumerate(shard_sizes):
        name = f'{s:06d}.tar'
        path = os.path.join(out_dir, name)
        image_total = 0
        samples = []
        for position in range(size):
            key = f'img{index:05d}'
            fmt, ext = ('PNG', 'png') if index % 2 == 0 else ('JPEG', 'jpg')
            img = _image_bytes(rng, img_size, fmt)
            rec = _fake_records(rng, img_size + 2, img_size, spec, num_samples, topk, num_classes)
            records_by_key[key] = (rec, img, index % num_classes)
            image_total += len(img)
            members = {ext: img, 'cls': str(index % num_classes).encode(), 'rd.npy': encode_records(rec)}
            if drop_member and index in drop_member:  # a sample written without that member (consistent checksum)
                del members[drop_member[index]]
            samples.append((key, index, members, sample_checksum(name, position, key, index, members)))
            index += 1
        with tarfile.open(path, 'w', format=tarfile.USTAR_FORMAT) as tar:
            if schema >= 2:
                table = np.array([(i, c) for _, i, _, c in samples], dtype=CHECKSUMS_DTYPE)
                _add(tar, CHECKSUMS_MEMBER, encode_checksums(table))
            for key, _, members, _ in samples:
                for member, data in members.items():
                    _add(tar, f'{key}.{member}', data)
        with open(path, 'rb') as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        shards.append({'name': name, 'count': size, 'sha256': digest, 'bytes': os.path.getsize(path),
                       'image_bytes': image_total})
    meta = {
        'schema_version': schema,
        'teachers': [{'name': 'fake', 'weights': 'none', 'mean': list(MEAN), 'std': list(STD),
                      'input_size': [3, SIZE, SIZE], 'interpolation': 'bilinear'}],
        'augmentation': spec.to_dict(),
        'topk': topk,
        'num_samples': num_samples,
        'num_classes': num_classes,
        'class_names': [str(i) for i in range(num_classes)],
        'seed': seed,
        'dataset': {'name': 'fake', 'root': None, 'split': 'train'},
        'num_images': num_images,
        'shards': shards,
    }
    with open(os.path.join(out_dir, 'reinforce.json'), 'w') as f:
        json.dump(meta, f)
    return {'dir': out_dir, 'meta': meta, 'records': records_by_key, 'spec': spec}


@pytest.fixture(scope='module')
def rd48(tmp_path_factory):
    """48 images (labels 0..47) in 4 uneven shards."""
    return make_reinforced(str(tmp_path_factory.mktemp('rd48')), [10, 7, 13, 18], num_classes=64)


def _loader(path, meta=None, **kw):
    args = dict(batch_size=8, num_workers=0, input_size=(3, SIZE, SIZE), mean=MEAN, std=STD, interpolation='bilinear',
                rd_p=1.0, rd_densify='smooth', fallback_transform=None, num_classes=None, seed=3, rank=0,
                world_size=1, shuffle_buffer=16, device='cpu', pin_memory=False)
    args.update(kw)
    return create_reinforced_loader(path, meta, **args)


def _epoch(loader, epoch: int) -> List[tuple]:
    loader.set_epoch(epoch)
    return list(loader)


def _labels(batches) -> List[int]:
    return [int(v) for b in batches for v in b[2]]


@pytest.mark.parametrize('world_size', [1, 2, 3])
@pytest.mark.parametrize('num_workers', [1, 2, 5])
def test_worker_pieces_cover_every_image(world_size, num_workers):
    shards = [('a', 10), ('b', 0), ('c', 7), ('d', 13), ('e', 18)]
    n, batch = 48, 4
    for epoch in (0, 1):
        seen = Counter()
        per_rank = []
        for rank in range(world_size):
            total = 0
            for w in range(num_workers):
                for url, start, stop, count, pass_index in worker_pieces(shards, 5, epoch, rank, world_size, w,
                                                                         num_workers, batch):
                    assert 0 <= start < stop <= count == dict(shards)[url]
                    for i in range(start, stop):
                        seen[(url, i, pass_index)] += 1
                    total += stop - start
            per_rank.append(total)
        nb = -(-n // (world_size * batch))
        assert per_rank == [nb * batch] * world_size  # equal, full batches on every rank
        assert all(v == 1 for v in seen.values())
        first_pass = {(u, i) for (u, i, p) in seen if p == 0}
        assert len(first_pass) == n  # every image once; the rest is wrap-around padding (pass 1)
        assert sum(seen.values()) - n == world_size * nb * batch - n


def test_loader_every_image_once_across_ranks_and_workers(rd48):
    meta = check_reinforced(rd48['dir'], 64)
    for num_workers in (0, 2):
        labels = []
        for rank in range(2):
            loader = _loader(rd48['dir'], meta, rank=rank, world_size=2, num_workers=num_workers)
            assert len(loader) == 3  # 48 images / (2 ranks x 8)
            batches = _epoch(loader, 1)
            assert len(batches) == len(loader)
            assert all(b[0].shape == (8, 3, SIZE, SIZE) and b[1].shape == (8, 64) and b[2].shape == (8,)
                       for b in batches)
            labels += _labels(batches)
        assert sorted(labels) == list(range(48)), f'num_workers={num_workers}'


def test_loader_pads_uneven_epochs_with_full_batches(tmp_path):
    rd = make_reinforced(str(tmp_path / 'rd'), [6, 5], num_classes=11)  # 11 images, 2 ranks x 4 -> 2 batches each
    labels = []
    for rank in range(2):
        loader = _loader(rd['dir'], rank=rank, world_size=2, batch_size=4)
        batches = _epoch(loader, 0)
        assert len(batches) == len(loader) == 2
        assert all(len(b[2]) == 4 for b in batches)
        labels += _labels(batches)
    counts = Counter(labels)
    assert set(counts) == set(range(11)) and sum(counts.values()) == 16


def test_loader_drop_last_has_timm_epoch_length(tmp_path):
    # 11 images, 2 ranks x 4: floor -> 1 full batch per rank (timm's drop_last); ceil (padding) would give 2
    rd = make_reinforced(str(tmp_path / 'rd'), [6, 5], num_classes=11)
    meta = check_reinforced(rd['dir'], 11)
    per_epoch = []
    for epoch in range(4):
        labels = []
        for rank in range(2):
            loader = _loader(rd['dir'], meta, batch_size=4, rank=rank, world_size=2, drop_last=True)
            batches = _epoch(loader, epoch)
            assert len(batches) == len(loader) == 1 and len(batches[0][2]) == 4
            labels += _labels(batches)
        assert len(labels) == len(set(labels)) == 8  # no image twice, no padding
        per_epoch.append(frozenset(labels))
    assert len(set(per_epoch)) > 1  # the left-out images change with the epoch's order
    # a dataset smaller than one global batch still gives one full batch per rank (wrapped around)
    loader = _loader(rd['dir'], meta, batch_size=8, rank=0, world_size=2, drop_last=True)
    assert len(loader) == 1 and len(_epoch(loader, 0)[0][2]) == 8


def test_loader_deterministic_per_seed_and_epoch(rd48):
    meta = check_reinforced(rd48['dir'], None)
    a = _epoch(_loader(rd48['dir'], meta, num_workers=2), 0)
    b = _epoch(_loader(rd48['dir'], meta, num_workers=2), 0)
    assert len(a) == len(b) == 6
    for x, y in zip(a, b):
        for u, v in zip(x, y):
            assert torch.equal(u, v)
    c = _epoch(_loader(rd48['dir'], meta, num_workers=2), 1)
    assert _labels(c) != _labels(a)  # shards and samples reshuffled
    # set_epoch reaches persistent workers: the next epoch of a used loader equals a fresh loader's
    reused = _loader(rd48['dir'], meta, num_workers=2)
    _epoch(reused, 0)
    assert all(torch.equal(u, v) for x, y in zip(_epoch(reused, 1), c) for u, v in zip(x, y))
    assert sorted(_labels(c)) == sorted(_labels(a)) == list(range(48))
    # the stored augmentation drawn per image changes across epochs (4 stored, so most images change)
    def by_label(batches):
        return {int(lbl): (x, t) for b in batches for x, t, lbl in zip(*b)}
    ea, ec = by_label(a), by_label(c)
    changed = sum(not torch.equal(ea[i][1], ec[i][1]) for i in range(48))
    assert changed > 24
    # the same epoch with another seed differs
    d = _epoch(_loader(rd48['dir'], meta, num_workers=0, seed=4), 0)
    assert _labels(d) != _labels(a)
    # worker count changes the order, never the per-image augmentation choice
    e = by_label(_epoch(_loader(rd48['dir'], meta, num_workers=0), 0))
    assert all(torch.equal(e[i][0], ea[i][0]) and torch.equal(e[i][1], ea[i][1]) for i in range(48))


def test_loader_replays_the_stored_record_matching_its_target(rd48):
    batches = _epoch(_loader(rd48['dir'], rd_densify='renorm'), 2)
    spec = rd48['spec']
    keys = {lbl: key for key, (_, _, lbl) in rd48['records'].items()}
    for x, target, labels in batches:
        for i in range(len(labels)):
            rec, img_bytes, _ = rd48['records'][keys[int(labels[i])]]
            dense = densify(rec['ids'], rec['probs'], 64, mode='renorm')
            match = [j for j in range(len(rec)) if torch.allclose(dense[j], target[i])]
            assert match, 'target is not the densified top-k of a stored augmentation'
            img = Image.open(io.BytesIO(img_bytes)).convert('RGB')
            expected = apply_record(img, rec[match[0]], spec, (SIZE, SIZE), MEAN, STD, 'bilinear')
            assert torch.equal(x[i], expected)


def test_rd_p_zero_gives_one_hot_targets(rd48):
    from timm.data import create_transform
    transform = create_transform(SIZE, is_training=True, mean=MEAN, std=STD, scale=(0.5, 1.0))
    batches = _epoch(_loader(rd48['dir'], rd_p=0.0, fallback_transform=transform), 0)
    for _, target, labels in batches:
        assert torch.equal(target, torch.nn.functional.one_hot(labels, 64).float())
    again = _epoch(_loader(rd48['dir'], rd_p=0.0, fallback_transform=transform), 0)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))  # the fallback transform is seeded too
    mixed = _epoch(_loader(rd48['dir'], rd_p=0.5, fallback_transform=transform), 0)
    one_hot = sum(int(torch.equal(t, torch.nn.functional.one_hot(lbl, 64).float()))
                  for b in mixed for t, lbl in zip(b[1], b[2]))
    assert 5 < one_hot < 43
    with pytest.raises(ValueError, match='fallback'):
        _loader(rd48['dir'], rd_p=0.5)


def test_resolve_dir_brace_pattern_and_json(rd48):
    d = rd48['dir']
    by_dir, meta = resolve_reinforced(d)
    by_brace, _ = resolve_reinforced(os.path.join(d, '{000000..000003}.tar'))
    by_json, _ = resolve_reinforced(os.path.join(d, 'reinforce.json'))
    subset, _ = resolve_reinforced([os.path.join(d, '000002.tar'), os.path.join(d, '000000.tar')])
    assert by_dir == by_brace == by_json == [os.path.join(d, f'{i:06d}.tar') for i in range(4)]
    assert subset == [os.path.join(d, '000000.tar'), os.path.join(d, '000002.tar')]
    assert meta['num_classes'] == 64
    sub = check_reinforced(os.path.join(d, '{000000..000001}.tar'), 64)
    assert sub['_num_images'] == 17
    assert len(_loader(os.path.join(d, '{000000..000001}.tar'), sub)) == 3
    # a URL WebDataset opens (file://), metadata from the same "directory"
    url_meta = check_reinforced(f'file://{d}/{{000000..000003}}.tar', 64)
    assert url_meta['_urls'][0] == f'file://{d}/000000.tar'
    assert sorted(_labels(_epoch(_loader(None, url_meta), 0))) == list(range(48))


def test_check_reinforced_rejects_mismatches(rd48, tmp_path):
    with pytest.raises(ValueError, match=r'--reinforced.*reinforce\.json.*num_classes=64.*10'):
        check_reinforced(rd48['dir'], 10)
    bad = str(tmp_path / 'bad')
    shutil.copytree(rd48['dir'], bad)
    with open(os.path.join(bad, 'reinforce.json')) as f:
        meta = json.load(f)
    meta['schema_version'] = 99
    with open(os.path.join(bad, 'reinforce.json'), 'w') as f:
        json.dump(meta, f)
    with pytest.raises(ValueError, match=r'--reinforced.*bad/reinforce\.json.*schema_version'):
        check_reinforced(bad, 64)
    with pytest.raises(ValueError, match=r'--train-rd.*schema_version'):
        check_reinforced(bad, 64, where_flag='--train-rd')
    other = str(tmp_path / 'other')
    shutil.copytree(rd48['dir'], other)
    shutil.copy(os.path.join(other, '000003.tar'), os.path.join(other, '000009.tar'))
    with pytest.raises(ValueError, match=r'000009\.tar is not listed'):
        check_reinforced(other, 64)
    os.remove(os.path.join(other, '000009.tar'))
    os.rename(os.path.join(other, '000002.tar'), os.path.join(other, '.000002.tar.tmp'))
    with pytest.raises(ValueError, match=r'1 shard\(s\) listed in \S*reinforce\.json are missing.*000002'):
        check_reinforced(other, 64)
    assert check_reinforced(os.path.join(other, '{000000..000001}.tar'), 64)['_num_images'] == 17  # a chosen subset
    os.remove(os.path.join(other, 'reinforce.json'))
    with pytest.raises(ValueError, match=r'--reinforced.*reinforce\.json'):
        check_reinforced(other, 64)


def test_check_reinforced_rejects_records_that_do_not_fit(tmp_path):
    rd = make_reinforced(str(tmp_path / 'rd'), [3], num_classes=5)
    meta_path = os.path.join(rd['dir'], 'reinforce.json')
    with open(meta_path) as f:
        meta = json.load(f)
    meta['topk'] = 4  # records hold top-3
    with open(meta_path, 'w') as f:
        json.dump(meta, f)
    with pytest.raises(ValueError, match=r'000000\.tar key img00000.*topk'):
        check_reinforced(rd['dir'], 5)
    meta['topk'] = 3
    meta['num_samples'] = 8
    with open(meta_path, 'w') as f:
        json.dump(meta, f)
    with pytest.raises(ValueError, match=r'000000\.tar key img00000.*num_samples'):
        check_reinforced(rd['dir'], 5)


def _member_offset(path: str, member: str) -> int:
    with tarfile.open(path) as tar:
        info = tar.getmember(member)
        return info.offset_data


def test_truncated_shard_raises_naming_it(rd48, tmp_path):
    bad = str(tmp_path / 'trunc')
    shutil.copytree(rd48['dir'], bad)
    meta = check_reinforced(bad, 64)  # checked before it breaks: the loader itself must notice
    shard = os.path.join(bad, '000002.tar')
    with open(shard, 'r+b') as f:
        f.truncate(_member_offset(shard, 'img00020.rd.npy') + 10)  # inside sample 3 of the shard
    with pytest.raises(ValueError, match=r'000002\.tar has \d+ bytes'):
        check_reinforced(bad, 64)
    for workers in (0, 1):
        with pytest.raises(ReinforcedDataError, match=r'shard \S*000002\.tar'):
            _epoch(_loader(bad, meta, num_workers=workers), 0)


def test_shard_cut_at_a_sample_boundary_raises(rd48, tmp_path):
    bad = str(tmp_path / 'cut')
    shutil.copytree(rd48['dir'], bad)
    meta = check_reinforced(bad, 64)
    shard = os.path.join(bad, '000003.tar')
    with open(shard, 'r+b') as f:
        f.truncate(_member_offset(shard, 'img00040.png') - 512)  # drop samples 10.. and the end-of-archive blocks
    with pytest.raises(ReinforcedDataError, match=r'shard \S*000003\.tar ended after 10 samples.*lists 18'):
        _epoch(_loader(bad, meta), 0)


def test_tampered_records_and_header_raise_naming_shard_and_key(rd48, tmp_path):
    bad = str(tmp_path / 'tamper')
    shutil.copytree(rd48['dir'], bad)
    meta = check_reinforced(bad, 64)
    shard = os.path.join(bad, '000001.tar')
    with open(shard, 'r+b') as f:  # garble the .npy magic/header of sample img00012
        f.seek(_member_offset(shard, 'img00012.rd.npy'))
        f.write(b'\x00' * 16)
    with pytest.raises(ReinforcedDataError, match=r'shard \S*000001\.tar key img00012'):
        _epoch(_loader(bad, meta), 0)
    bad2 = str(tmp_path / 'tamper2')
    shutil.copytree(rd48['dir'], bad2)
    meta = check_reinforced(bad2, 64)
    shard = os.path.join(bad2, '000000.tar')
    with open(shard, 'r+b') as f:  # garble a tar header (checksum mismatch)
        f.seek(_member_offset(shard, 'img00002.png') - 512 + 100)
        f.write(b'\xff' * 8)
    # the tar reader verifies header checksums (tarfile's stream mode would end the archive there quietly)
    with pytest.raises(ReinforcedDataError, match=r'shard \S*000000\.tar .*header checksum mismatch at byte'):
        _epoch(_loader(bad2, meta), 0)
    with open(shard, 'rb') as f:  # WebDataset's tarfile reader stops at that header: the sample count catches it
        assert len({n.split('.')[0] for n, _ in webdataset_tar_members(f) if not n.startswith('__')}) == 2


def test_missing_member_raises_naming_key(tmp_path):
    rd = make_reinforced(str(tmp_path / 'rd'), [4, 4], num_classes=8, drop_member={5: 'cls'})
    meta = check_reinforced(rd['dir'], 8)
    with pytest.raises(ReinforcedDataError, match=r'shard \S*000001\.tar key img00005.*missing member.*cls'):
        _epoch(_loader(rd['dir'], meta, batch_size=4), 0)


@pytest.mark.parametrize('fmt', [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_reader_matches_tarfile(tmp_path, fmt):
    path = str(tmp_path / 'a.tar')
    rng = np.random.default_rng(0)
    members = [(f'{"d" * 120}/k{i // 2}.{"png" if i % 2 else "cls"}', rng.bytes(int(rng.integers(0, 2000))))
               for i in range(8)]
    with tarfile.open(path, 'w', format=fmt) as tar:
        folder = tarfile.TarInfo('somedir')
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)  # a directory entry is skipped
        for name, data in members:
            _add(tar, name, data)
    for reader in (tar_members, webdataset_tar_members):  # this project's reader and WebDataset's agree
        with open(path, 'rb') as f:
            assert list(reader(f)) == members
        with open(path, 'rb') as f:  # the first two samples (keys k0, k1) are passed over
            assert list(reader(f, skip_samples=2)) == members[4:]
        with open(path, 'rb') as f:  # the same from a stream that cannot seek
            assert list(reader(io.BytesIO(f.read()), skip_samples=3)) == members[6:]
    data = open(path, 'rb').read()
    with pytest.raises(tarfile.ReadError):  # 'unexpected end of data' or 'empty header', by format
        list(webdataset_tar_members(io.BytesIO(data[:len(data) // 2 + 7])))
    with pytest.raises(TarFormatError, match=r'cut short at byte \d+'):
        list(tar_members(io.BytesIO(data[:len(data) // 2 + 7])))
    headers = [o for o in range(0, len(data), 512) if data[o + 257:o + 262] == b'ustar']
    garbled = bytearray(data)
    garbled[headers[2] + 10] ^= 0x01  # one bit of the third header's name
    with pytest.raises(TarFormatError, match=rf'header checksum mismatch at byte {headers[2]}'):
        list(tar_members(io.BytesIO(bytes(garbled))))


def _train_py_has_reinforced() -> bool:
    path = os.path.join(ROOT, 'train.py')
    return os.path.isfile(path) and '--reinforced' in open(path).read()


def _run(cmd: List[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, WANDB_MODE='offline', PYTHONPATH=ROOT, OMP_NUM_THREADS='1')
    res = subprocess.run([sys.executable] + cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f'{cmd} failed:\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}'
    return res


def _train_digits_teacher(path: str, epochs: int = 3) -> float:
    """A tiny timm teacher fitted on digits (16 px, plain loop); saves a checkpoint, returns its val top-1."""
    import timm
    import torchvision

    from dr.data import DigitsDataset

    torch.manual_seed(0)
    model = timm.create_model('test_resnet', num_classes=10)
    mean = torch.tensor(model.pretrained_cfg['mean']).view(1, 3, 1, 1)  # what reinforce.py normalises with
    std = torch.tensor(model.pretrained_cfg['std']).view(1, 3, 1, 1)

    def tensors(split):
        ds = DigitsDataset(split, img_size=16)
        x = torch.stack([torch.from_numpy(np.array(ds.image(i))).permute(2, 0, 1) for i in range(len(ds))])
        return (x.float() / 255 - mean) / std, torch.tensor(ds.targets)

    x, y = tensors('train')
    crop = torchvision.transforms.RandomResizedCrop(16, scale=(0.5, 1.0), antialias=True)  # one crop per batch
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9, weight_decay=1e-4)
    batches = torch.randperm(len(y)).split(64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 0.2, total_steps=epochs * len(batches), pct_start=0.2)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(y)).split(64):
            xb = crop(x[idx]) if torch.rand(()) < 0.5 else x[idx]
            loss = nn.functional.cross_entropy(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    torch.save({'state_dict': model.state_dict(), 'arch': 'test_resnet'}, path)
    xv, yv = tensors('val')
    with torch.no_grad():
        return float((model.eval()(xv).argmax(1) == yv).float().mean()) * 100


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isfile(os.path.join(ROOT, 'reinforce.py')) or not _train_py_has_reinforced(),
                    reason='needs reinforce.py and train.py with --reinforced')
def test_reinforce_then_train_student_learns(tmp_path):
    import csv

    teacher = str(tmp_path / 'teacher.pth')
    teacher_top1 = _train_digits_teacher(teacher)
    assert teacher_top1 > 80.0, f'teacher top-1 {teacher_top1}'
    rd_dir = str(tmp_path / 'rd')
    # mild crops (digits are 16 px): the teacher's top-k stays informative, so two epochs suffice
    _run(['reinforce.py', '--dataset', 'digits', '--digits-size', '16', '--teacher', f'test_resnet={teacher}',
          '--teacher-img-size', '16', '--aug', 'rrc', '--scale', '0.5', '1.0', '--hflip', '0', '--num-samples', '2',
          '--topk', '3', '--shard-size', '500', '-b', '128', '-j', '0', '--device', 'cpu', '--no-progress',
          '--output', rd_dir])
    meta = check_reinforced(rd_dir, 10)
    assert meta['num_images'] == 1438 and len(meta['_urls']) == 3
    out = str(tmp_path / 'out')
    res = _run(['train.py', '--dataset', 'digits', '--digits-size', '16', '--img-size', '16', '--model', 'test_resnet',
                '--reinforced', rd_dir, '--epochs', '2', '-b', '64', '--lr', '0.1', '--warmup-epochs', '0', '-j', '1',
                '--seed', '0', '--log-interval', '100', '--output', out, '--experiment', 'student'])
    with open(os.path.join(out, 'student', 'summary.csv')) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2, res.stdout[-2000:]
    top1_key = next(k for k in rows[-1] if k.endswith('top1'))
    top1 = float(rows[-1][top1_key])
    assert top1 > 50.0, f'student top-1 {top1} after 2 epochs on reinforced digits (chance is 10)'
    log = res.stdout + res.stderr
    assert '22 updates per epoch' in log  # timm's epoch: floor(1438 / 64) full batches, as plain training
    res = _run(['train.py', '--dataset', 'digits', '--digits-size', '16', '--img-size', '16', '--model', 'test_resnet',
                '--reinforced', rd_dir, '--epochs', '1', '-b', '64', '-j', '0', '--rd-pad-last', '--val-split', '',
                '--output', out, '--experiment', 'padded'])
    assert '23 updates per epoch' in res.stdout + res.stderr  # ceil: every image every epoch, padded by wrapping


def test_interleave_pieces_mixes_open_pieces_and_keeps_each_order():
    pieces = [(f'{s:06d}.tar', 0, n, n, 0) for s, n in enumerate([5, 9, 1, 7, 6, 0, 4])]

    def open_piece(piece):
        return iter([(piece[0], i) for i in range(piece[1], piece[2])])

    out = list(interleave_pieces(pieces, open_piece, 3, random.Random(0)))
    assert sorted(out) == sorted(x for p in pieces for x in open_piece(p))  # every sample once
    for url, _, n, _, _ in pieces:
        assert [i for u, i in out if u == url] == list(range(n))  # each piece in its own order
    assert [u for u, _ in out[:6]] != ['000000.tar'] * 5 + ['000001.tar']  # not one piece after the other
    assert {u for u, _ in out[:10]} <= {'000000.tar', '000001.tar', '000002.tar', '000003.tar'}  # 3 open at once
    assert out == list(interleave_pieces(pieces, open_piece, 3, random.Random(0)))  # seeded
    assert out != list(interleave_pieces(pieces, open_piece, 3, random.Random(1)))
    sequential = list(interleave_pieces(pieces, open_piece, 1, random.Random(0)))
    assert sequential == [x for p in pieces for x in open_piece(p)]


def test_loader_replays_with_the_teachers_interpolation(tmp_path):
    """interpolation=None (train.py's default) replays with the interpolation the teacher resized with, not the
    augmentation spec's; an explicit one wins."""
    rd = make_reinforced(str(tmp_path / 'rd'), [6], num_classes=6)
    meta_path = os.path.join(rd['dir'], 'reinforce.json')
    meta = json.load(open(meta_path))
    meta['teachers'][0]['interpolation'] = 'bicubic'
    assert meta['augmentation']['interpolation'] == 'bilinear'
    json.dump(meta, open(meta_path, 'w'))
    keys = {lbl: key for key, (_, _, lbl) in rd['records'].items()}
    for interpolation, expected in ((None, 'bicubic'), ('bilinear', 'bilinear')):
        loader = _loader(rd['dir'], interpolation=interpolation, batch_size=6, shuffle_buffer=0, rd_densify='renorm')
        assert loader.dataset.interpolation == expected
        for x, target, labels in _epoch(loader, 0):
            for i in range(len(labels)):
                rec, img_bytes, _ = rd['records'][keys[int(labels[i])]]
                j = next(j for j in range(len(rec))
                         if torch.allclose(densify(rec['ids'], rec['probs'], 6, mode='renorm')[j], target[i]))
                img = Image.open(io.BytesIO(img_bytes)).convert('RGB')
                assert torch.equal(x[i], apply_record(img, rec[j], rd['spec'], (SIZE, SIZE), MEAN, STD, expected))
    meta['teachers'].append(dict(meta['teachers'][0], interpolation='bilinear'))  # members disagree: the spec's
    assert replay_interpolation(None, meta) == 'bilinear' and replay_interpolation('random', meta) == 'bilinear'
