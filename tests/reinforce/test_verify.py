"""reinforce.py --verify and --stats on a digits reinforcement: tolerances, tampered shards, teacher replay, bytes."""
import glob
import hashlib
import io
import json
import os
import re
import shutil
import tarfile

import numpy as np
import pytest
import torch

import reinforce
from dr.reinforce.format import build_shard, densify, encode_records, iter_shard, load_meta, record_dtype
from dr.reinforce.loader import check_reinforced
from dr.reinforce.verify import compare_topk, smooth_entropy
from tests.reinforce.common import N_IMAGES, N_SAMPLES, SHARD, TOPK

pytestmark = pytest.mark.usefixtures('one_thread')


def test_compare_topk_tolerance():
    fresh = torch.tensor([0.5, 0.3, 0.15, 0.05])
    ids, probs = np.array([0, 1], dtype=np.uint16), np.array([0.5, 0.3], dtype=np.float16)
    assert compare_topk(fresh, ids, probs) is None
    assert 'class 1' in compare_topk(fresh, ids, np.array([0.5, 0.25], dtype=np.float16))
    tie = torch.tensor([0.4, 0.4, 0.2])  # swapped ids of tied classes are fine
    assert compare_topk(tie, np.array([1, 0]), np.array([0.4, 0.4], dtype=np.float16)) is None


def _rewrite_shard(d, name, mutate, checksums=True):
    """Rewrite a shard with mutated records and make reinforce.json and the sidecar agree (sha256 and, with
    ``checksums``, the per-sample checksums consistent: only the content checks can see the change)."""
    path = os.path.join(d, name)
    samples = []
    for x in iter_shard(path, name):
        rec = np.load(io.BytesIO(x['records']), allow_pickle=False)
        mutate(rec)
        samples.append({'key': x['key'], 'image_ext': x['image_ext'], 'image': x['image'], 'label': x['label'],
                        'records': encode_records(rec), 'index': x['info']['index']})
    data = build_shard(samples, shard=name if checksums else None)
    with open(path, 'wb') as f:
        f.write(data)
    digest = hashlib.sha256(data).hexdigest()
    meta_path = os.path.join(d, 'reinforce.json')
    meta = json.load(open(meta_path))
    for s in meta['shards']:
        if s['name'] == name:
            s['sha256'], s['bytes'] = digest, len(data)
    json.dump(meta, open(meta_path, 'w'))
    sidecar = os.path.join(d, '.' + name.replace('.tar', '.json'))
    info = json.load(open(sidecar))
    info['sha256'], info['bytes'] = digest, len(data)
    json.dump(info, open(sidecar, 'w'))


def test_verify_reports_bad_shards_by_name(ref, tmp_path, capsys):
    d = str(tmp_path / 'rd')
    shutil.copytree(ref, d)
    assert reinforce.main(['--verify', d]) == 0
    assert 'OK' in capsys.readouterr().out
    data = open(os.path.join(d, '000001.tar'), 'rb').read()
    open(os.path.join(d, '000001.tar'), 'wb').write(data[:len(data) // 3])  # truncated
    data = bytearray(open(os.path.join(d, '000002.tar'), 'rb').read())
    data[700] ^= 0x01  # tampered
    open(os.path.join(d, '000002.tar'), 'wb').write(bytes(data))

    def nan(rec):
        rec['probs'][2, 0] = np.nan

    _rewrite_shard(d, '000003.tar', nan)  # consistent checksum, invalid content
    assert reinforce.main(['--verify', d]) == 1
    out = capsys.readouterr().out
    bad = {line.split()[1].rstrip(':') for line in out.splitlines() if line.startswith('BAD')}
    assert bad == {'000001.tar', '000002.tar', '000003.tar'}
    assert 'non-finite' in out and 'sha256' in out and 'truncated' in out
    assert 'FAILED' in out and '000000.tar' not in out.split('FAILED')[1]


def test_verify_replays_through_the_teacher(ref, ckpts, tmp_path, capsys):
    # the shards were written with --teacher-img-size 16: --verify builds the teacher the same way, or says why not
    assert reinforce.main(['--verify', ref, '--teacher', *ckpts, '--verify-samples', '10']) == 2
    err = capsys.readouterr().err
    assert 'input_size [3, 160, 160]' in err and '[3, 16, 16]' in err and '--teacher-img-size' in err
    assert reinforce.main(['--verify', ref, '--teacher', *ckpts, '--teacher-img-size', '16',
                           '--verify-samples', '10']) == 0
    assert '10 replays' in capsys.readouterr().out
    d = str(tmp_path / 'rd')
    shutil.copytree(ref, d)

    def halve(rec):  # still a valid record, but not what the teacher said
        rec['probs'] = (rec['probs'].astype(np.float32) * 0.5).astype(np.float16)

    for n in ('000000.tar', '000001.tar', '000002.tar', '000003.tar'):
        _rewrite_shard(d, n, halve)
    assert reinforce.main(['--verify', d]) == 0  # integrity alone cannot see it
    capsys.readouterr()
    assert reinforce.main(['--verify', d, '--teacher', *ckpts, '--teacher-img-size', '16',
                           '--verify-samples', '4']) == 1
    assert 'replay mismatch' in capsys.readouterr().out
    assert reinforce.main(['--verify', ref, '--teacher', *ckpts[::-1], '--teacher-img-size', '16']) == 2
    assert 'does not match' in capsys.readouterr().err


def test_stats_and_bytes_per_augmentation(ref, capsys):
    assert reinforce.main(['--stats', ref]) == 0
    printed = capsys.readouterr().out
    stats = json.load(open(os.path.join(ref, 'stats.json')))
    assert 'bytes_per_augmentation' in printed
    correct = images = agree = 0
    mass, ent, image_bytes = [], [], 0
    for p in sorted(glob.glob(os.path.join(ref, '*.tar'))):
        with tarfile.open(p) as tar:
            members = tar.getmembers()
            for m in members:
                if m.name.endswith('.png'):
                    image_bytes += m.size
        for x in iter_shard(p, p):
            rec = np.load(io.BytesIO(x['records']), allow_pickle=False)
            correct += int((rec['ids'][:, 0] == x['label']).sum())
            mass += rec['probs'].astype(np.float64).sum(1).tolist()
            dense = densify(rec['ids'], rec['probs'], 10, 'smooth').double()
            ent += (-(dense * dense.clamp_min(1e-300).log()).sum(1)).tolist()
            agree += int(dense.mean(0).argmax()) == x['label']
            images += 1
    n_aug = images * N_SAMPLES
    total = sum(os.path.getsize(p) for p in glob.glob(os.path.join(ref, '*.tar')))
    assert stats['augmentations'] == n_aug and stats['num_images'] == N_IMAGES
    assert stats['teacher_accuracy'] == pytest.approx(correct / n_aug)
    assert stats['mean_topk_mass'] == pytest.approx(np.mean(mass))
    assert stats['mean_entropy'] == pytest.approx(np.mean(ent), rel=1e-5)
    assert stats['label_agreement'] == pytest.approx(agree / images)
    bpa = (total - image_bytes) / (N_IMAGES * N_SAMPLES)
    assert stats['bytes_per_augmentation'] == pytest.approx(bpa)
    assert load_meta(ref)['bytes_per_augmentation'] == pytest.approx(bpa)
    # the figure is the record payload plus the per-image tar/npy overhead amortised over the stored samples:
    # 3 member headers + padding of the cls/npy members + the npy header, and the end-of-archive blocks per shard
    item = record_dtype(TOPK, 10, 'rrc+ra_re').itemsize
    assert stats['record_bytes_per_augmentation'] == item
    per_image_max = 3 * 512 + 2 * 511 + 512 + 511  # headers, cls + npy padding, npy header, image padding
    per_shard_max = 10240 + 1024
    assert item < bpa <= item + (per_image_max + per_shard_max / SHARD) / N_SAMPLES


def test_smooth_entropy_matches_densify():
    rng = np.random.default_rng(0)
    p = np.sort(rng.dirichlet(np.ones(7), size=20)[:, :3], axis=1)[:, ::-1].astype(np.float16)
    ids = np.tile(np.arange(3), (20, 1))
    dense = densify(ids, p, 7).double()
    ref = -(dense * dense.clamp_min(1e-300).log()).sum(1)
    assert np.allclose(smooth_entropy(p, 7), ref.numpy(), rtol=1e-5)


def test_verify_rejects_reordered_and_repeated_top_k(ref, tmp_path, capsys):
    """A copy whose top-k is reordered (ascending, as ml-dr stores it) or has a repeated id fails, even with every
    checksum made consistent."""
    d = str(tmp_path / 'rd')
    shutil.copytree(ref, d)

    def ascending(rec):
        rec['ids'] = rec['ids'][:, ::-1].copy()
        rec['probs'] = rec['probs'][:, ::-1].copy()

    def repeated(rec):
        rec['ids'][4, 1] = rec['ids'][4, 0]

    _rewrite_shard(d, '000001.tar', ascending)
    _rewrite_shard(d, '000003.tar', repeated)
    assert reinforce.main(['--verify', d]) == 1
    out = capsys.readouterr().out
    assert 'BAD 000001.tar' in out and 'probabilities not sorted descending' in out
    assert 'BAD 000003.tar' in out and 'stored augmentation 4: repeated class ids' in out
    assert 'BAD 000000.tar' not in out and 'BAD 000002.tar' not in out


def test_stats_validates_what_it_reads(ref, tmp_path, capsys):
    d = str(tmp_path / 'rd')
    shutil.copytree(ref, d)

    def inf(rec):
        rec['probs'][2, 0] = np.inf

    if os.path.exists(os.path.join(d, 'stats.json')):  # written into the shared reference by another test
        os.remove(os.path.join(d, 'stats.json'))
    _rewrite_shard(d, '000002.tar', inf)
    assert reinforce.main(['--stats', d]) == 2
    err = capsys.readouterr().err
    assert 'shard 000002.tar key' in err and 'non-finite probabilities' in err
    assert not os.path.exists(os.path.join(d, 'stats.json'))


@pytest.mark.parametrize('edit,key', [
    (lambda m: m['augmentation'].update(ra_magnitude=12), 'augmentation'),
    (lambda m: m['teachers'][1]['mean'].__setitem__(0, 0.5), 'teachers[1].mean'),
    (lambda m: m.update(num_classes=12), 'num_classes'),
])
def test_reinforce_json_edits_are_caught(ref, tmp_path, capsys, edit, key):
    """reinforce.json is cross-checked against the config copy it carries: --verify and training name the file."""
    d = str(tmp_path / 'rd')
    shutil.copytree(ref, d)
    path = os.path.join(d, 'reinforce.json')
    meta = json.load(open(path))
    edit(meta)
    json.dump(meta, open(path, 'w'))
    assert reinforce.main(['--verify', d]) == 1
    out = capsys.readouterr().out
    assert f'BAD reinforce.json: {path}: {key} is' in out and 'config copy' in out
    with pytest.raises(ValueError, match=rf'--reinforced: {path}: {re.escape(key)} is'):
        check_reinforced(d, None)


def test_sidecars_and_shard_headers_are_cross_checked(ref, tmp_path, capsys):
    d = str(tmp_path / 'rd')
    shutil.copytree(ref, d)
    sidecar = os.path.join(d, '.000002.json')
    info = json.load(open(sidecar))
    info['config']['seed'] = 7
    json.dump(info, open(sidecar, 'w'))
    assert reinforce.main(['--verify', d]) == 1
    assert f'BAD 000002.tar: sidecar {sidecar} was written with another configuration' in capsys.readouterr().out
    # reinforce.json (and its config copy) consistently edited to another record layout: the shards' own .npy
    # headers disagree
    d2 = str(tmp_path / 'rd2')
    shutil.copytree(ref, d2)
    path = os.path.join(d2, 'reinforce.json')
    meta = json.load(open(path))
    for m in (meta, meta['config']):
        assert m['record_dtype'][2][0] == 'crop'
        m['record_dtype'][2][1] = '<u4'  # a valid layout (images over 65535 px), not the one the shards hold
    json.dump(meta, open(path, 'w'))
    for n in glob.glob(os.path.join(d2, '.0*.json')):
        os.remove(n)
    assert reinforce.main(['--verify', d2]) == 1
    out = capsys.readouterr().out
    assert out.count('reinforce.json says record_dtype') == 4  # every shard
    with pytest.raises(ValueError, match=r'000000\.tar key .*reinforce\.json says record_dtype'):
        check_reinforced(d2, None)
