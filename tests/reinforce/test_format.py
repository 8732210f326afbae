"""The reinforced-shard format: record dtype, npy encoding without pickle, densify, tar layout, reinforce.json."""
import io
import json
import tarfile

import numpy as np
import pytest
import torch

from dr.reinforce.format import (
    IMAGE_EXTS,
    SCHEMA_VERSION,
    build_shard,
    check_records,
    decode_checksums,
    decode_records,
    densify,
    dtype_from_descr,
    encode_records,
    image_order,
    iter_shard,
    load_meta,
    meta_image_order,
    record_dtype,
    sample_checksum,
    sanitize_key,
    shard_name,
    split_member_name,
)


def _records(n=6, k=3, num_classes=10, seed=0, aug='rrc+ra_re'):
    rng = np.random.default_rng(seed)
    rec = np.zeros(n, dtype=record_dtype(k, num_classes, aug))
    for i in range(n):
        p = rng.dirichlet(np.ones(num_classes))
        order = np.argsort(-p)[:k]
        rec['ids'][i] = order
        rec['probs'][i] = p[order].astype(np.float16)
    rec['crop'] = rng.integers(0, 30, size=(n, 4))
    rec['flags'] = rng.integers(0, 16, size=n)
    return rec


def test_record_dtype_fields_and_sizes():
    dt = record_dtype(10, 1000, 'rrc+ra_re')
    assert dt.names == ('ids', 'probs', 'crop', 'flags', 'ra_ops', 're_box')
    assert dt['ids'].base == np.dtype('<u2') and dt['ids'].shape == (10,)
    assert dt['probs'].base == np.dtype('<f2')
    assert dt['crop'].base == np.dtype('<u2') and dt['crop'].shape == (4,)
    assert dt.itemsize == 10 * 2 + 10 * 2 + 8 + 1 + 2 + 4  # 55 bytes per stored augmentation
    rrc = record_dtype(5, 10, 'rrc')
    assert rrc.names == ('ids', 'probs', 'crop', 'flags') and rrc.itemsize == 5 * 4 + 9
    assert record_dtype(5, 70000, 'rrc')['ids'].base == np.dtype('<u4')
    assert record_dtype(5, 10, 'rrc', max_side=70000)['crop'].base == np.dtype('<u4')
    assert dtype_from_descr(json.loads(json.dumps(dt.descr))) == dt
    with pytest.raises(ValueError, match='Unknown augmentation'):
        record_dtype(5, 10, 'mixup')


def test_encode_decode_roundtrip_without_pickle():
    rec = _records()
    data = encode_records(rec)
    assert data[:6] == b'\x93NUMPY'
    out = decode_records(data, 'shard 000001.tar key a')
    assert out.dtype == rec.dtype and out.tobytes() == rec.tobytes()


def test_decode_rejects_garbage_and_pickles():
    with pytest.raises(ValueError, match='shard 000007.tar key k1'):
        decode_records(b'not an npy file', 'shard 000007.tar key k1')
    with pytest.raises(ValueError, match='key k2'):
        decode_records(encode_records(_records())[:100], 'shard 000007.tar key k2')
    buf = io.BytesIO()
    np.save(buf, np.array([{'evil': 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match='key k3'):
        decode_records(buf.getvalue(), 'shard 000007.tar key k3')
    buf = io.BytesIO()
    np.save(buf, np.zeros(3, dtype=[('x', 'u1')]))
    with pytest.raises(ValueError, match='lack field'):
        decode_records(buf.getvalue(), 'k4')


def test_check_records():
    rec = _records()
    check_records(rec, 'w', num_classes=10, num_samples=6, topk=3)
    with pytest.raises(ValueError, match='num_samples=7'):
        check_records(rec, 'w', num_classes=10, num_samples=7)
    with pytest.raises(ValueError, match='topk=4'):
        check_records(rec, 'w', num_classes=10, topk=4)
    bad = rec.copy()
    bad['probs'][2, 1] = np.nan
    with pytest.raises(ValueError, match='non-finite'):
        check_records(bad, 'w', num_classes=10)
    bad = rec.copy()
    bad['probs'][1] = [0.6, 0.5, 0.1]
    with pytest.raises(ValueError, match='sum to'):
        check_records(bad, 'w', num_classes=10)
    bad = rec.copy()
    bad['ids'][0, 0] = 10
    with pytest.raises(ValueError, match='class id 10'):
        check_records(bad, 'w', num_classes=10)
    bad = rec.copy()
    bad['probs'][3] = bad['probs'][3][::-1].copy()  # ascending (ml-dr's order) is not this format
    with pytest.raises(ValueError, match='stored augmentation 3: probabilities not sorted descending'):
        check_records(bad, 'w', num_classes=10)
    bad = rec.copy()
    bad['ids'][5, 2] = bad['ids'][5, 0]
    with pytest.raises(ValueError, match='stored augmentation 5: repeated class ids'):
        check_records(bad, 'w', num_classes=10)
    tie = rec.copy()
    tie['probs'][0] = np.array([0.25, 0.25, 0.25], dtype=np.float16)  # ties are sorted
    check_records(tie, 'w', num_classes=10)
    # float16 rounding of a full distribution may exceed 1 by a few ulps: accepted
    ok = rec.copy()
    ok['probs'][0] = np.array([0.3334, 0.3334, 0.3334], dtype=np.float16)
    check_records(ok, 'w', num_classes=10)


def test_densify_smooth_and_renorm():
    ids = torch.tensor([[2, 0], [1, 3]])
    probs = torch.tensor([[0.5, 0.3], [0.9, 0.1]])
    s = densify(ids, probs, 5, 'smooth')
    assert s.dtype == torch.float32 and s.shape == (2, 5)
    assert torch.allclose(s.sum(1), torch.ones(2))
    assert torch.allclose(s[0], torch.tensor([0.3, 0.2 / 3, 0.5, 0.2 / 3, 0.2 / 3]))
    assert torch.allclose(s[1], torch.tensor([0.0, 0.9, 0.0, 0.1, 0.0]))
    r = densify(ids, probs, 5, 'renorm')
    assert torch.allclose(r[0], torch.tensor([0.375, 0.0, 0.625, 0.0, 0.0]))
    assert torch.allclose(r.sum(1), torch.ones(2))
    # numpy float16 input (as stored), batch dims, and k == num_classes
    rec = _records(n=4, k=3, num_classes=3)
    d = densify(rec['ids'], rec['probs'], 3, 'smooth')
    assert torch.allclose(d.sum(1), torch.ones(4), atol=1e-6)
    over = densify(np.array([[0, 1]], dtype=np.uint16), np.array([[0.75, 0.2505]], dtype=np.float16), 4)
    assert torch.allclose(over.sum(1), torch.ones(1)) and (over[0, 2:] == 0).all()
    with pytest.raises(ValueError, match='mode'):
        densify(ids, probs, 5, 'sharpen')


def _samples(n=3):
    return [{'key': f'img_{i:03d}', 'image_ext': 'png' if i % 2 else 'jpg', 'image': bytes([i]) * (100 + i),
             'label': i % 10, 'records': encode_records(_records(seed=i))} for i in range(n)]


def test_shard_layout_and_iteration(tmp_path):
    samples = _samples()
    data = build_shard(samples)
    assert data == build_shard(samples)  # deterministic bytes
    path = tmp_path / shard_name(3)
    assert path.name == '000003.tar'
    path.write_bytes(data)
    with tarfile.open(path) as tar:
        names = tar.getnames()
        assert all(m.mtime == 0 for m in tar.getmembers())
    assert names[:3] == ['img_000.jpg', 'img_000.cls', 'img_000.rd.npy']
    got = list(iter_shard(str(path), 'shard 000003.tar'))
    assert [g['key'] for g in got] == [s['key'] for s in samples]
    for g, s in zip(got, samples):
        assert g['image'] == s['image'] and g['image_ext'] == s['image_ext'] and g['label'] == s['label']
        assert g['records'] == s['records']


def test_shard_readable_by_webdataset(tmp_path):
    import webdataset as wds
    path = tmp_path / '000000.tar'
    samples = _samples()
    path.write_bytes(build_shard(samples))
    got = list(wds.WebDataset(str(path), shardshuffle=False))
    assert [g['__key__'] for g in got] == [s['key'] for s in samples]
    assert got[1]['png'] == samples[1]['image'] and int(got[1]['cls']) == samples[1]['label']
    assert decode_records(got[2]['rd.npy'], 'x').tobytes() == _records(seed=2).tobytes()


def test_readme_example_reads_with_tarfile_and_numpy(tmp_path, monkeypatch):
    """docs/format.md's reader (tarfile + json + numpy only) works on a shard."""
    samples = [dict(x, index=10 + i) for i, x in enumerate(_samples())]
    (tmp_path / '000000.tar').write_bytes(build_shard(samples, shard='000000.tar'))
    monkeypatch.chdir(tmp_path)
    seen, indices = [], []
    # --- docs/format.md example ---
    with tarfile.open('000000.tar') as tar:
        for member in tar:
            key, ext = member.name.split('.', 1)
            data = tar.extractfile(member).read()
            if ext == 'cls':
                label = int(data)
            elif ext == 'rd.npy':
                rec = np.load(io.BytesIO(data), allow_pickle=False)
                seen.append((key, label, rec['ids'][0].tolist(), rec['probs'][0].tolist()))
            elif key == '__rd__/checksums':             # schema 2: per sample (dataset index, checksum)
                table = np.load(io.BytesIO(data), allow_pickle=False)
                indices = table['index'].tolist()
            else:
                image_bytes = data  # the original encoded image, ext = jpg / png / ...
    # --- end ---
    assert image_bytes == _samples()[2]['image']
    assert [s[0] for s in seen] == ['img_000', 'img_001', 'img_002'] and indices == [10, 11, 12]
    assert seen[1][2] == _records(seed=1)['ids'][0].tolist()


def test_sample_checksum_binds_content_shard_and_position(tmp_path):
    samples = [dict(x, index=100 + i) for i, x in enumerate(_samples())]
    data = build_shard(samples, shard='000003.tar')
    path = tmp_path / '000003.tar'
    path.write_bytes(data)
    with tarfile.open(path) as tar:
        assert tar.getnames()[:4] == ['__rd__/checksums.npy', 'img_000.jpg', 'img_000.cls', 'img_000.rd.npy']
        table = decode_checksums(tar.extractfile('__rd__/checksums.npy').read(), 'x')
    got = list(iter_shard(str(path), 'shard 000003.tar'))
    assert table['index'].tolist() == [100, 101, 102]
    for position, (g, x) in enumerate(zip(got, samples)):
        members = {x['image_ext']: x['image'], 'cls': str(x['label']).encode(), 'rd.npy': x['records']}
        crc = sample_checksum('000003.tar', position, x['key'], x['index'], members)
        assert g['info'] == {'index': x['index'], 'xxh3': crc} and crc == int(table['xxh3'][position])
        assert g['members'] == members and 0 <= crc < 2 ** 64
        # anything else gives another checksum: shard, position, key, index, any byte of any member
        assert crc != sample_checksum('000004.tar', position, x['key'], x['index'], members)
        assert crc != sample_checksum('000003.tar', position + 1, x['key'], x['index'], members)
        assert crc != sample_checksum('000003.tar', position, x['key'] + 'x', x['index'], members)
        assert crc != sample_checksum('000003.tar', position, x['key'], x['index'] + 1, members)
        assert crc != sample_checksum('000003.tar', position, x['key'], x['index'], dict(members, cls=b'7'))
        flipped = bytearray(x['records'])
        flipped[-1] ^= 1
        assert crc != sample_checksum('000003.tar', position, x['key'], x['index'],
                                      dict(members, **{'rd.npy': bytes(flipped)}))
        upper = {k.upper() if k in IMAGE_EXTS else k: v for k, v in members.items()}  # extension case is ignored
        assert crc == sample_checksum('000003.tar', position, x['key'], x['index'], upper)
    assert build_shard(samples) != data and next(iter_shard(io.BytesIO(build_shard(samples)), 'x'))['info'] is None


def test_image_order_is_a_seeded_permutation():
    a = image_order(1000, 0)
    assert sorted(a.tolist()) == list(range(1000)) and a.tolist() != list(range(1000))
    assert np.array_equal(a, image_order(1000, 0)) and not np.array_equal(a, image_order(1000, 1))
    assert np.array_equal(image_order(1000, 0)[:10], a[:10])
    # classes in dataset (ImageFolder) order come out mixed: 10 classes x 100 images, first 50 positions
    assert len(set((a[:50] // 100).tolist())) >= 8
    assert np.array_equal(meta_image_order({'num_images': 5, 'image_order': {'kind': 'permutation', 'seed': 3}}),
                          image_order(5, 3))
    assert meta_image_order({'num_images': 4}).tolist() == [0, 1, 2, 3]  # schema 1: dataset order
    with pytest.raises(ValueError, match='unknown image_order'):
        meta_image_order({'num_images': 4, 'image_order': {'kind': 'sorted'}})


def test_truncated_shard_names_the_shard(tmp_path):
    data = build_shard(_samples())
    path = tmp_path / '000005.tar'
    path.write_bytes(data[:len(data) // 2 + 100])
    with pytest.raises(ValueError, match='000005.tar'):
        list(iter_shard(str(path), 'shard 000005.tar'))


def test_incomplete_sample_is_reported(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode='w') as tar:
        info = tarfile.TarInfo('lonely.cls')
        info.size = 1
        tar.addfile(info, io.BytesIO(b'3'))
    path = tmp_path / '000000.tar'
    path.write_bytes(buf.getvalue())
    with pytest.raises(ValueError, match='key lonely: incomplete sample'):
        list(iter_shard(str(path), 'shard 000000.tar'))


def test_keys_and_member_names():
    assert split_member_name('dir/abc.rd.npy') == ('dir/abc', 'rd.npy')
    assert split_member_name('abc.jpg') == ('abc', 'jpg')
    assert sanitize_key('n01440764/n01440764_10026.JPEG') == 'n01440764_n01440764_10026_JPEG'
    assert '.' not in sanitize_key('a.b.c') and 'jpg' in IMAGE_EXTS


def _meta(**kw):
    meta = {'schema_version': SCHEMA_VERSION, 'teachers': [], 'augmentation': {}, 'topk': 3, 'num_samples': 4,
            'num_classes': 10, 'shards': []}
    meta.update(kw)
    return meta


def test_load_meta_locations_and_errors(tmp_path):
    d = tmp_path / 'rd'
    d.mkdir()
    with pytest.raises(FileNotFoundError, match='reinforce.json'):
        load_meta(str(d))
    (d / 'reinforce.json').write_text(json.dumps(_meta()))
    for where in (str(d), str(d / 'reinforce.json'), str(d / '000000.tar'), str(d / '{000000..000003}.tar'),
                  [str(d / '000001.tar')], 'file://' + str(d / 'reinforce.json')):
        assert load_meta(where)['topk'] == 3
    (d / 'reinforce.json').write_text(json.dumps(_meta(schema_version=1)))  # version 1 still reads
    assert load_meta(str(d))['schema_version'] == 1
    (d / 'reinforce.json').write_text(json.dumps(_meta(schema_version=99)))
    with pytest.raises(ValueError, match=r'reinforce.json: unsupported schema_version 99'):
        load_meta(str(d))
    (d / 'reinforce.json').write_text(json.dumps({'schema_version': SCHEMA_VERSION}))
    with pytest.raises(ValueError, match='missing key'):
        load_meta(str(d))
    (d / 'reinforce.json').write_text('{oops')
    with pytest.raises(ValueError, match='not valid JSON'):
        load_meta(str(d))


def test_densify_keeps_the_stored_topk_largest():
    ids = np.array([[7, 2, 4], [0, 1, 9]], dtype=np.uint16)
    probs = np.array([[0.5, 0.2, 0.1], [0.9, 0.05, 0.01]], dtype=np.float16)
    k = 10
    smooth = densify(ids, probs, k, mode='smooth')
    renorm = densify(ids, probs, k, mode='renorm')
    p32 = probs.astype(np.float32)
    for dense in (smooth, renorm):
        assert dense.dtype == torch.float32 and dense.shape == (2, k)
        torch.testing.assert_close(dense.sum(1), torch.ones(2))
        for r in range(2):  # the stored top-k keep their order and stay the largest entries
            top = dense[r].argsort(descending=True)[:3].tolist()
            assert top == ids[r].astype(int).tolist()
    for r in range(2):
        others = [c for c in range(k) if c not in ids[r]]
        residual = (1.0 - p32[r].sum()) / (k - 3)
        torch.testing.assert_close(smooth[r, others], torch.full((len(others),), float(residual)))
        torch.testing.assert_close(smooth[r, ids[r].astype(int)], torch.from_numpy(p32[r]))
        assert (renorm[r, others] == 0).all()
        torch.testing.assert_close(renorm[r, ids[r].astype(int)], torch.from_numpy(p32[r] / p32[r].sum()))
