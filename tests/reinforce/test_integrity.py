"""Integrity of reinforced data: tampered shards stop training (naming shard and sample), version-1 shards still
load, interrupted runs and leftovers are handled by reruns, and --verify/--stats/train.py name what is wrong."""
import glob
import os
import shutil
import subprocess
import sys
import tarfile
from typing import List

import numpy as np
import pytest

import reinforce
from dr.reinforce.format import RECORDS_EXT, iter_shard, load_meta, meta_image_order, record_dtype
from dr.reinforce.loader import ReinforcedDataError, check_reinforced
from dr.reinforce.verify import verify_dir
from tests.helpers import REPO
from tests.reinforce.common import reinforce_args, shard_bytes, subprocess_env
from tests.reinforce.test_loader import _epoch, _loader, make_reinforced
from tests.reinforce.test_verify import _rewrite_shard

pytestmark = pytest.mark.usefixtures('one_thread')


def _member(path: str, suffix: str, index: int = 0) -> tarfile.TarInfo:
    """The ``index``-th member of a shard whose name ends with ``suffix``."""
    with tarfile.open(path) as tar:
        return [m for m in tar.getmembers() if m.name.endswith(suffix)][index]


def _patch(path: str, offset: int, data: bytes) -> None:
    with open(path, 'r+b') as f:
        f.seek(offset)
        f.write(data)


def _npy_row_offset(path: str, sample: int, field: str, topk: int, num_classes: int, aug: str) -> int:
    """Byte offset in the shard of field ``field`` of stored augmentation 0 of the ``sample``-th sample."""
    m = _member(path, '.' + RECORDS_EXT, sample)
    with tarfile.open(path) as tar:
        data = tar.extractfile(m).read()
    header = 10 + int.from_bytes(data[8:10], 'little')  # npy format 1.0
    return m.offset_data + header + record_dtype(topk, num_classes, aug).fields[field][1]


def tamper(directory: str, how: str) -> str:
    """Tamper shard 000002.tar of a reinforce.py output in one of the ways of issue 11; return its name."""
    path = os.path.join(directory, '000002.tar')
    if how == 'copied':  # another shard of the same size copied over it
        other = os.path.join(directory, '000001.tar')
        assert os.path.getsize(other) == os.path.getsize(path)
        shutil.copyfile(other, path)
    elif how in ('prob', 'class_id'):
        field = 'probs' if how == 'prob' else 'ids'
        offset = _npy_row_offset(path, 3, field, 3, 10, 'rrc+ra_re')
        with open(path, 'rb') as f:
            f.seek(offset)
            byte = f.read(1)[0]
        _patch(path, offset, bytes([byte ^ (0x04 if how == 'prob' else 0x01)]))
    elif how == 'label':
        m = _member(path, '.cls', 3)
        with open(path, 'rb') as f:
            f.seek(m.offset_data)
            label = int(f.read(m.size))
        _patch(path, m.offset_data, str((label + 1) % 10).encode())
    else:
        raise ValueError(how)
    return '000002.tar'


def _train(rd_dir: str, out: str, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, os.path.join(REPO, 'train.py'), '--dataset', 'digits', '--model', 'test_resnet',
           '--reinforced', rd_dir, '--epochs', '1', '-b', '8', '--lr', '0.05', '--warmup-epochs', '0',
           '--log-interval', '1000', '--output', out, '--experiment', 'student', *extra]
    return subprocess.run(cmd, env=subprocess_env(), cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize('how,workers', [('copied', '0'), ('prob', '1'), ('class_id', '0'), ('label', '0')])
def test_train_stops_on_a_tampered_shard(ref, tmp_path, how, workers):
    """Fault injection through train.py: each tampering of issue 11 stops training with the shard and sample."""
    d = str(tmp_path / 'rd')
    shutil.copytree(ref, d)
    name = tamper(d, how)
    res = _train(d, str(tmp_path / 'out'), '-j', workers)
    out = res.stdout + res.stderr
    assert res.returncode != 0, out[-3000:]
    assert f'{name} key digits_train_' in out and 'checksum' in out, out[-3000:]


@pytest.mark.parametrize('how', ['copied', 'prob', 'class_id', 'label'])
def test_loader_names_shard_and_sample_of_each_tampering(ref, tmp_path, how):
    d = str(tmp_path / 'rd')
    shutil.copytree(ref, d)
    meta = check_reinforced(d, 10)  # sizes still match: only the per-sample checksums can tell
    name = tamper(d, how)
    assert check_reinforced(d, 10)['_num_images'] == 24
    position = 0 if how == 'copied' else 3
    with pytest.raises(ReinforcedDataError, match=rf'shard \S*{name} key \S+: sample {position} of the shard does '
                                                  rf'not match its checksum'):
        _epoch(_loader(d, meta, num_classes=10, input_size=(3, 16, 16), batch_size=4), 0)
    # --verify names the same shard (and only it)
    report = verify_dir(d)
    assert {p['shard'] for p in report['problems']} == {name}


def test_version_1_shards_still_load(tmp_path):
    rd = make_reinforced(str(tmp_path / 'v1'), [10, 7, 13], num_classes=40, schema=1)
    meta = check_reinforced(rd['dir'], 40)
    assert meta['schema_version'] == 1
    with tarfile.open(os.path.join(rd['dir'], '000000.tar')) as tar:
        assert not any(n.startswith('__') for n in tar.getnames())  # no checksum table
    for workers in (0, 2):
        labels = [int(v) for b in _epoch(_loader(rd['dir'], meta, num_workers=workers), 0) for v in b[2]]
        assert set(labels) == set(range(30)) and len(labels) == 32  # every image, 2 wrap-around padding samples
    assert verify_dir(rd['dir'])['ok']


def test_version_1_copied_shard_is_caught_as_duplicate_keys(tmp_path):
    rd = make_reinforced(str(tmp_path / 'v1'), [8, 8, 8], num_classes=24, schema=1)
    shutil.copyfile(os.path.join(rd['dir'], '000000.tar'), os.path.join(rd['dir'], '000002.tar'))
    meta = check_reinforced(rd['dir'], 24)  # equal sizes: not caught before training
    with pytest.raises(ReinforcedDataError, match=r'key seen twice in this epoch \(also in shard \S*000'):
        _epoch(_loader(rd['dir'], meta, batch_size=4, num_workers=0), 0)


def test_missing_folder_is_named(tmp_path):
    missing = str(tmp_path / 'nothing_here')
    with pytest.raises(ValueError, match=rf'--reinforced: {missing} does not exist'):
        check_reinforced(missing, 10)
    with pytest.raises(ValueError, match=rf'--reinforced: folder {tmp_path}/gone of shard'):
        check_reinforced(str(tmp_path / 'gone' / '{000000..000003}.tar'), 10)


@pytest.mark.slow
def test_train_py_names_a_missing_reinforced_folder(tmp_path):
    missing = str(tmp_path / 'nothing_here')
    res = _train(missing, str(tmp_path / 'out'), '-j', '0')
    assert res.returncode != 0
    assert f'{missing} does not exist' in res.stderr and 'reinforce.json at' not in res.stderr


def _interrupted(ref: str, tmp_path) -> str:
    d = str(tmp_path / 'interrupted')
    shutil.copytree(ref, d)
    os.remove(os.path.join(d, 'reinforce.json'))  # killed before rank 0 merged the sidecars
    os.remove(os.path.join(d, '000003.tar'))
    return d


def test_interrupted_folder_says_rerun(ref, tmp_path, capsys):
    d = _interrupted(ref, tmp_path)
    assert reinforce.main(['--verify', d]) == 2
    assert 'incomplete run: rerun the same command to finish' in capsys.readouterr().err
    assert reinforce.main(['--stats', d]) == 2
    assert 'incomplete run: rerun the same command to finish' in capsys.readouterr().err
    with pytest.raises(ValueError, match=r'--reinforced: \S*interrupted: incomplete run: rerun the same command'):
        check_reinforced(d, 10)


def test_rerun_cleans_leftovers_and_reports_stray_shards(ref, ckpts, tmp_path, capsys):
    d = str(tmp_path / 'rd')
    shutil.copytree(ref, d)
    # what a kill while writing reinforce.json / args.yaml / stats.json / a shard leaves behind (atomic_write names)
    leftovers = ['.reinforce.json.k2j3h4.tmp', '.args.yaml.x8a1z0.tmp', '.stats.json.0qq1w2.tmp',
                 '.000001.tar.abc123.tmp', '..000002.json.def456.tmp']
    for name in leftovers:
        with open(os.path.join(d, name), 'w') as f:
            f.write('partial')
    before = shard_bytes(d)
    assert reinforce.main(reinforce_args(d, ckpts)) == 0
    assert not glob.glob(os.path.join(d, '.*.tmp'))
    assert shard_bytes(d) == before
    # a stray extra shard: the rerun refuses it by name (training would refuse the folder), touching nothing
    shutil.copyfile(os.path.join(d, '000003.tar'), os.path.join(d, '000007.tar'))
    assert reinforce.main(reinforce_args(d, ckpts)) == 2
    err = capsys.readouterr().err
    assert '000007.tar not part of this reinforcement (4 shards: 000000.tar .. 000003.tar)' in err
    assert shard_bytes(d) == dict(before, **{'000007.tar': before['000003.tar']})
    os.remove(os.path.join(d, '000007.tar'))
    # --stats cleans its own leftovers
    with open(os.path.join(d, '.stats.json.zz9.tmp'), 'w') as f:
        f.write('partial')
    assert reinforce.main(['--stats', d]) == 0
    assert not glob.glob(os.path.join(d, '.*.tmp')) and os.path.isfile(os.path.join(d, 'stats.json'))


def _shard_names(directory: str) -> List[str]:
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(directory, '*.tar')))


def test_shards_hold_a_random_class_mix(ref):
    """Written in a seeded permutation: the first shard is not the first images of the dataset."""
    meta = load_meta(ref)
    order = meta_image_order(meta)
    first = [x['info']['index'] for x in iter_shard(os.path.join(ref, _shard_names(ref)[0]), 'x')]
    assert first == order[:len(first)].tolist() and first != list(range(len(first)))
    labels = [x['label'] for x in iter_shard(os.path.join(ref, _shard_names(ref)[0]), 'x')]
    assert len(set(labels)) > 1 and np.array_equal(np.sort(order), np.arange(meta['num_images']))


def test_schema_2_shard_without_its_checksum_table_is_refused(ref, tmp_path):
    """A schema-2 shard rewritten without its checksum table (sizes and sha256 made consistent) cannot train."""
    d = str(tmp_path / 'rd')
    shutil.copytree(ref, d)
    _rewrite_shard(d, '000001.tar', lambda rec: None, checksums=False)
    meta = check_reinforced(d, 10)
    with pytest.raises(ReinforcedDataError, match=r'shard \S*000001\.tar key \S+: no checksum for this sample: the '
                                                  r'shard lacks its __rd__/checksums\.npy table'):
        _epoch(_loader(d, meta, num_classes=10, input_size=(3, 16, 16), batch_size=4), 0)
    assert {p['shard'] for p in verify_dir(d)['problems']} == {'000001.tar'}
