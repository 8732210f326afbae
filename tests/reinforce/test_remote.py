"""Reinforced shards read from real servers on 127.0.0.1 (moto's S3 server, Python's http.server): the same epochs
as local shards, and bounded, named errors for bad remote input."""
import os
import subprocess
import sys
import time

import pytest
import torch

from dr import storage
from tests.helpers import free_port, subprocess_env
from tests.reinforce.test_loader import _epoch, _loader, make_reinforced
from tests.servers import http_server, moto_server

BUCKET = 'rd-bucket'
PREFIX = 'imagenet-plus/rd'
SECRET = 'dummy-secret-DR-7f3a9c'  # recognisable: must never be written anywhere
ENV = {'AWS_ACCESS_KEY_ID': 'dummykey', 'AWS_SECRET_ACCESS_KEY': SECRET, 'AWS_DEFAULT_REGION': 'us-east-1',
       'AWS_EC2_METADATA_DISABLED': 'true', 'NO_PROXY': '127.0.0.1,localhost', 'no_proxy': '127.0.0.1,localhost',
       'DR_STORAGE_TIMEOUT': '3', 'DR_STORAGE_RETRIES': '3'}


@pytest.fixture(scope='module')
def rd(tmp_path_factory):
    """A small reinforced dataset (48 images, labels 0..47, 4 uneven shards), on disk."""
    return make_reinforced(str(tmp_path_factory.mktemp('rd_remote')), [10, 7, 13, 18], num_classes=64)


@pytest.fixture(scope='module')
def s3(rd):
    """moto's S3 server with ``rd`` uploaded under s3://BUCKET/PREFIX; yields the endpoint URL."""
    saved = {k: os.environ.get(k) for k in (*ENV, 'AWS_ENDPOINT_URL_S3')}
    os.environ.update(ENV)
    try:
        with moto_server() as endpoint:
            os.environ['AWS_ENDPOINT_URL_S3'] = endpoint
            client = storage.s3_client()
            client.create_bucket(Bucket=BUCKET)
            for name in sorted(os.listdir(rd['dir'])):
                client.upload_file(os.path.join(rd['dir'], name), BUCKET, f'{PREFIX}/{name}')
            yield endpoint
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


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
