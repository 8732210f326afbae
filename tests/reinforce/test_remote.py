"""Reinforced shards read from real servers on 127.0.0.1 (moto's S3 server, Python's http.server): the same epochs
as local shards, and bounded, named errors for bad remote input."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from dr import storage
from tests.helpers import free_port, subprocess_env
from tests.reinforce.test_import_mldr import FIXTURE, needs_fixture
from tests.reinforce.test_loader import _epoch, _loader, make_reinforced
from tests.servers import LOOPBACK_S3_ENV, http_server, moto_s3, upload_folder

BUCKET = 'rd-bucket'
PREFIX = 'imagenet-plus/rd'
SECRET = 'dummy-secret-DR-7f3a9c'  # recognisable: must never be written anywhere
ENV = {**LOOPBACK_S3_ENV, 'AWS_ACCESS_KEY_ID': 'dummykey', 'AWS_SECRET_ACCESS_KEY': SECRET,
       'DR_STORAGE_TIMEOUT': '3', 'DR_STORAGE_RETRIES': '3'}


@pytest.fixture(scope='module')
def rd(tmp_path_factory):
    """A small reinforced dataset (48 images, labels 0..47, 4 uneven shards), on disk."""
    return make_reinforced(str(tmp_path_factory.mktemp('rd_remote')), [10, 7, 13, 18], num_classes=64)


@pytest.fixture(scope='module')
def s3(rd):
    """moto's S3 server with ``rd`` uploaded under s3://BUCKET/PREFIX; yields the endpoint URL."""
    with moto_s3(ENV) as endpoint:
        storage.s3_client().create_bucket(Bucket=BUCKET)
        upload_folder(rd['dir'], f's3://{BUCKET}/{PREFIX}')
        yield endpoint


@pytest.fixture(scope='module')
def web(rd):
    with http_server(os.path.dirname(rd['dir'])) as base:
        yield base


def _same_epochs(a, b) -> None:
    assert len(a) == len(b) > 0
    for (xa, ta, la), (xb, tb, lb) in zip(a, b):
        assert torch.equal(la, lb)  # label i = image i: the same samples in the same order
        assert torch.equal(ta, tb)
        assert torch.equal(xa, xb)  # replayed pixels, bit for bit


@pytest.mark.parametrize('form', ['folder', 'json', 'braces'])
def test_s3_epochs_equal_local_epochs(rd, s3, form):
    url = {'folder': f's3://{BUCKET}/{PREFIX}', 'json': f's3://{BUCKET}/{PREFIX}/reinforce.json',
           'braces': f's3://{BUCKET}/{PREFIX}/{{000000..000003}}.tar'}[form]
    for epoch in (0, 1):
        _same_epochs(_epoch(_loader(rd['dir']), epoch), _epoch(_loader(url), epoch))


def test_s3_epochs_equal_local_with_workers_and_two_ranks(rd, s3):
    url = f's3://{BUCKET}/{PREFIX}'
    for rank in (0, 1):
        local = _epoch(_loader(rd['dir'], rank=rank, world_size=2, num_workers=1), 2)
        remote = _epoch(_loader(url, rank=rank, world_size=2, num_workers=1), 2)
        _same_epochs(local, remote)


def test_http_epochs_equal_local_epochs(rd, web):
    url = f'{web}/{os.path.basename(rd["dir"])}'
    _same_epochs(_epoch(_loader(rd['dir']), 0), _epoch(_loader(url), 0))


def _error(url: str) -> str:
    with pytest.raises(ValueError) as info:
        _epoch(_loader(url), 0)
    return str(info.value)


def test_unreachable_endpoint_fails_in_bounded_time(rd, monkeypatch):
    closed = f'http://127.0.0.1:{free_port()}'
    monkeypatch.setenv('DR_STORAGE_RETRIES', '3')
    t0 = time.monotonic()
    message = _error(f'{closed}/rd')
    assert time.monotonic() - t0 < 15
    assert f'{closed}/rd/reinforce.json' in message and 'after 3 tries' in message


def test_missing_bucket_key_and_403_are_named(rd, s3, web):
    assert f's3://no-such-bucket/{PREFIX}/reinforce.json' in _error(f's3://no-such-bucket/{PREFIX}')
    assert 'NoSuchBucket' in _error(f's3://no-such-bucket/{PREFIX}')
    missing = _error(f's3://{BUCKET}/no/such/prefix')
    assert f's3://{BUCKET}/no/such/prefix/reinforce.json' in missing and 'NoSuchKey' in missing
    forbidden = _error(f'{web}/forbidden/{os.path.basename(rd["dir"])}')
    assert 'HTTP 403' in forbidden and '/forbidden/' in forbidden


def test_missing_shard_object_is_named(rd, s3):
    url = f's3://{BUCKET}/{PREFIX}/{{000000..000004}}.tar'  # 000004 does not exist
    message = _error(url)
    assert '000004.tar' in message


def test_shard_cut_short_in_transit_is_named(rd, web, caplog):
    name = os.path.basename(rd['dir'])
    from dr.reinforce.loader import check_reinforced
    meta = check_reinforced(f'{web}/{name}', None)
    meta['_urls'] = [u.replace(f'{web}/{name}', f'{web}/cut/{name}') for u in meta['_urls']]
    t0 = time.monotonic()
    with pytest.raises(ValueError) as info:
        _epoch(_loader(None, meta), 0)
    assert time.monotonic() - t0 < 15
    assert f'{web}/cut/{name}/0000' in str(info.value) and 'cut short' in str(info.value)
    assert any('resuming (retry 1/' in r.getMessage() for r in caplog.records)  # the retry is logged


@pytest.mark.slow
def test_train_py_bad_remote_url_exits_2_and_no_secret_is_written(tmp_path, s3):
    out = tmp_path / 'out'
    env = subprocess_env(**ENV, AWS_ENDPOINT_URL_S3=s3)
    cmd = [sys.executable, 'train.py', '--reinforced', f's3://{BUCKET}/missing', '--model', 'resnet10t',
           '--epochs', '1', '-b', '8', '-j', '0', '--output', str(out), '--device', 'cpu']
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120,
                       cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert r.returncode == 2, r.stderr[-2000:]
    assert 'error:' in r.stderr and f's3://{BUCKET}/missing/reinforce.json' in r.stderr
    assert SECRET not in r.stdout + r.stderr
    for root, _, files in os.walk(tmp_path):
        for f in files:
            with open(os.path.join(root, f), 'rb') as fh:
                assert SECRET.encode() not in fh.read()


def _reinforce(out: str, ckpts, endpoint: str, timeout: int = 180, **env) -> subprocess.CompletedProcess:
    from tests.reinforce.common import reinforce_args
    from tests.reinforce.common import subprocess_env as rd_env
    cmd = [sys.executable, 'reinforce.py', *reinforce_args(out, ckpts)]
    full_env = dict(rd_env(), **ENV, AWS_ENDPOINT_URL_S3=endpoint, **env)
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def _remote_objects(url: str) -> dict:
    return {n: storage.read_bytes(f'{url}/{n}') for n in storage.list_sizes(url)}


@pytest.mark.slow
def test_reinforce_to_s3_killed_mid_upload_resumes_to_the_local_bytes(ref, ckpts, s3):
    from tests.reinforce.common import shard_bytes
    out = f's3://{BUCKET}/written/rd'
    r = _reinforce(out, ckpts, s3, **{storage.UPLOAD_CRASH_ENV: '10000'})  # dies inside the first shard upload
    assert r.returncode == 17, r.stderr[-2000:]
    visible = _remote_objects(out)
    local = shard_bytes(ref)
    # killed while sending the first shard's body: nothing half-uploaded is visible under a final name
    assert 'args.yaml' in visible and not [n for n in visible if n.endswith('.tar')]
    assert 'reinforce.json' not in visible and '.000000.json' not in visible
    r = _reinforce(out, ckpts, s3)
    assert r.returncode == 0, r.stderr[-2000:]
    objects = _remote_objects(out)
    assert {n: b for n, b in objects.items() if n.endswith('.tar')} == local  # byte-identical to the local run
    assert SECRET.encode() not in objects['args.yaml'] and SECRET not in r.stdout + r.stderr
    r = _reinforce(out, ckpts, s3)  # a rerun lists what is uploaded and redoes nothing
    assert r.returncode == 0 and '4 of 4 shards already complete' in r.stderr, r.stderr[-2000:]
    env = dict(os.environ, **ENV, AWS_ENDPOINT_URL_S3=s3)
    v = subprocess.run([sys.executable, 'reinforce.py', '--verify', out], env=subprocess_env(**env),
                       capture_output=True, text=True, timeout=120,
                       cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert v.returncode == 0 and f'OK {out}: 4 shards, 24 images' in v.stdout, v.stdout + v.stderr


def test_verify_remote_finds_a_modified_shard(rd, s3):
    from dr.reinforce.verify import verify_dir
    url = f's3://{BUCKET}/tampered/rd'
    client = storage.s3_client()
    for name in sorted(os.listdir(rd['dir'])):
        with open(os.path.join(rd['dir'], name), 'rb') as f:
            data = f.read()
        if name == '000002.tar':
            data = data[:-2000] + bytes(2000)  # the end-of-archive padding region stays zero: flip a data byte
            data = data[:3000] + bytes([data[3000] ^ 1]) + data[3001:]
        client.put_object(Bucket=BUCKET, Key=f'tampered/rd/{name}', Body=data)
    assert verify_dir(f's3://{BUCKET}/{PREFIX}')['ok']
    report = verify_dir(url)
    assert not report['ok'] and {p['shard'] for p in report['problems']} == {'000002.tar'}


@pytest.mark.parametrize('argv, message', [
    (['--output', 'http://127.0.0.1:9/rd'], 'only local folders and s3:// prefixes can be written'),
    (['--label-maps', '--output', 's3://b/rd'], '--label-maps writes a local folder'),
])
def test_unwritable_remote_outputs_are_refused_before_any_work(tmp_path, capsys, argv, message):
    import reinforce
    status = reinforce.main(['--dataset', 'digits', '--max-images', '4', '--teacher', 'test_resnet', '--device', 'cpu',
                             '--no-progress', *argv])
    err = capsys.readouterr().err
    assert status == 2 and message in err and argv[-1] in err


# ----------------------------------------------------------------------------------------------------------------------
# random access (+mix partners), --stats, --show and --import-ml-dr on remote folders


def test_read_range_equals_the_local_bytes_and_a_server_without_range_is_named(rd, s3, web):
    name = os.path.basename(rd['dir'])
    with open(os.path.join(rd['dir'], '000001.tar'), 'rb') as f:
        local = f.read()
    for url in (f's3://{BUCKET}/{PREFIX}/000001.tar', f'{web}/{name}/000001.tar'):
        assert storage.read_range(url, 1234, 777) == local[1234:2011]
        assert storage.read_range(url, len(local) - 5, 5) == local[-5:]
        assert storage.read_range(url, 10, 0) == b''
    with pytest.raises(storage.StorageError, match=r'/norange/.*000001\.tar.*ignores Range requests \(HTTP 200\)'):
        storage.read_range(f'{web}/norange/{name}/000001.tar', 0, 10)


def test_mixing_epochs_from_s3_and_http_equal_local(s3, tmp_path, monkeypatch):
    from dr.reinforce.format import load_meta
    from dr.reinforce.partners import PartnerImages
    from tests.reinforce.test_mixing import _loader as mix_loader
    from tests.reinforce.test_mixing import make_mixing
    mixed = make_mixing(str(tmp_path / 'mix'), num_images=30, shard_size=8)
    urls = [upload_folder(mixed['dir'], f's3://{BUCKET}/mixing/rd')]
    ranged = []
    read_range = storage.read_range
    monkeypatch.setattr(storage, 'read_range', lambda *a: ranged.append(a) or read_range(*a))
    with http_server(str(tmp_path)) as base:
        urls.append(f'{base}/mix')
        for epoch in (0, 1):
            local = _epoch(mix_loader(mixed['dir']), epoch)
            for url in urls:
                _same_epochs(local, _epoch(mix_loader(url), epoch))
        # the writer's partners sit in the sample's own shard: its indexing read kept their bytes, no ranged read
        assert ranged == []
        for url in urls:
            cached, uncached = PartnerImages(load_meta(url)), PartnerImages(load_meta(url), remote_cache_bytes=0)
            for p in (0, 7, 8, 29, 3):
                assert cached.get(p) == uncached.get(p) == (f'img{p:04d}', 'png', mixed['images'][p])
        assert len(ranged) == 10  # without the cache: one ranged read per partner


def _strip(stats: dict) -> dict:
    return {k: v for k, v in stats.items() if k != 'directory'}


def test_stats_of_s3_and_http_folders_equal_local_stats(rd, s3, web, tmp_path, caplog):
    import reinforce
    assert reinforce.main(['--stats', rd['dir']]) == 0
    with open(os.path.join(rd['dir'], 'stats.json')) as f:
        local = json.load(f)
    os.unlink(os.path.join(rd['dir'], 'stats.json'))  # the folder the servers serve stays as it was
    url = f's3://{BUCKET}/{PREFIX}'
    assert reinforce.main(['--stats', url]) == 0  # written next to the shards, in the bucket
    remote = json.loads(storage.read_bytes(f'{url}/stats.json'))
    assert remote['directory'] == url and _strip(remote) == _strip(local)
    http_url = f'{web}/{os.path.basename(rd["dir"])}'
    assert reinforce.main(['--stats', http_url]) == 0  # read-only: printed, not written, and said so
    assert any('stats.json not written' in r.getMessage() for r in caplog.records)
    assert reinforce.main(['--stats', http_url, '--output', str(tmp_path / 'st')]) == 0
    with open(tmp_path / 'st' / 'stats.json') as f:
        assert _strip(json.load(f)) == _strip(local)


def _show_npz(path: str, out) -> dict:
    import numpy as np

    import reinforce
    assert reinforce.main(['--show', path, '--images', *map(str, range(30)), '--samples', '0', '3', '5',
                           '--save-npz', str(out)]) == 0
    with np.load(out) as z:
        return {k: z[k] for k in z.files}


@needs_fixture
def test_import_from_http_then_show_and_train_from_s3_and_http_equal_local(s3, tmp_path):
    """The authors' mixing reinforcement (partners anywhere in the dataset): imported from an HTTP URL it gives the
    local import's shards; served from S3 and HTTP, --show and the training loader read partners by Range."""
    import numpy as np

    from tests.reinforce.test_import_mldr import _import
    variant = 'rrc_ra_re_mix'
    assert _import(os.path.join(FIXTURE, variant, 'reinforced_data.tar.gz'), tmp_path / 'local') == 0
    with http_server(FIXTURE) as fixture_base:
        archive = f'{fixture_base}/{variant}/reinforced_data.tar.gz'
        assert _import(archive, tmp_path / 'web' / 'rd') == 0
    shards = sorted(p.name for p in (tmp_path / 'local').glob('*.tar'))
    assert len(shards) == 4
    for name in shards:
        assert (tmp_path / 'local' / name).read_bytes() == (tmp_path / 'web' / 'rd' / name).read_bytes()
    with open(tmp_path / 'web' / 'rd' / 'reinforce.json') as f:
        assert json.load(f)['imported_from']['rdata'] == archive  # the URL, not a temporary download
    local = _show_npz(str(tmp_path / 'local'), tmp_path / 'local.npz')
    s3_url = upload_folder(str(tmp_path / 'local'), f's3://{BUCKET}/imported/rd')
    with http_server(str(tmp_path / 'web')) as base:
        for url in (s3_url, f'{base}/rd'):
            remote = _show_npz(url, tmp_path / 'remote.npz')
            assert remote.keys() == local.keys() and all(np.array_equal(remote[k], local[k]) for k in local)
            kw = dict(input_size=(3, 32, 32), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                      shuffle_buffer=0)
            _same_epochs(_epoch(_loader(str(tmp_path / 'local'), **kw), 1), _epoch(_loader(url, **kw), 1))


@needs_fixture
def test_import_of_a_missing_remote_archive_names_the_url(tmp_path, capsys):
    import reinforce
    with http_server(FIXTURE) as base:
        url = f'{base}/no_such/reinforced_data.tar.gz'
        status = reinforce.main(['--import-ml-dr', url, '--data-dir', os.path.join(FIXTURE, 'images'),
                                 '--output', str(tmp_path / 'rd'), '-j', '0', '--no-progress'])
    err = capsys.readouterr().err
    assert status == 2 and url in err and '404' in err
