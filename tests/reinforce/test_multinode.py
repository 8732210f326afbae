"""Two nodes on one machine: ``torchrun --nnodes=2 --node-rank=0/1`` over loopback (gloo, static rendezvous on
127.0.0.1), with the data on moto's S3 server, for ``reinforce.py --output s3://`` and ``train.py --reinforced
s3://``. Each node is its own torchrun launcher (as on two hosts); nothing is shared between them but the S3 store
and the rendezvous port."""
import glob
import json
import os
import re
import subprocess
import sys
from typing import Dict, List, Sequence

import pytest
import torch

from dr import storage
from dr.checkpoint import load_checkpoint_file
from dr.reinforce.format import iter_shard
from tests.helpers import REPO, free_port
from tests.reinforce.common import N_IMAGES, reinforce_args, shard_bytes
from tests.reinforce.common import subprocess_env as rd_env
from tests.reinforce.test_remote import ENV, SECRET
from tests.servers import moto_s3

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

BUCKET = 'multinode'
TIMEOUT = 300

# train.py, with each training step's batch recorded per rank: labels and digests of the replayed pixels and targets
RECORDER = '''
import hashlib, json, sys
import train
out, argv = sys.argv[1], sys.argv[2:]
seen = []

class Recorded:
    def __init__(self, loader):
        self.loader = loader
    def __getattr__(self, name):
        return getattr(self.loader, name)
    def __len__(self):
        return len(self.loader)
    def __iter__(self):
        for batch in self.loader:
            x, target, label = batch
            for i in range(x.shape[0]):
                seen.append([int(label[i]), hashlib.sha256(x[i].contiguous().numpy().tobytes()).hexdigest(),
                             hashlib.sha256(target[i].contiguous().numpy().tobytes()).hexdigest()])
            yield batch

one_epoch = train.train_one_epoch
def recording(epoch, task, loader, *args, **kwargs):
    return one_epoch(epoch, task, Recorded(loader), *args, **kwargs)
train.train_one_epoch = recording
train.main(argv)
import os
with open(f'{out}.{os.environ.get("RANK", "0")}.json', 'w') as f:
    json.dump(seen, f)
'''


@pytest.fixture(scope='module')
def s3():
    """moto's S3 server with an empty bucket; yields the child-process environment that reaches it."""
    with moto_s3(ENV) as endpoint:
        storage.s3_client().create_bucket(Bucket=BUCKET)
        yield dict(rd_env(), **ENV, AWS_ENDPOINT_URL_S3=endpoint, GLOO_SOCKET_IFNAME='lo')


def _launcher(nnodes: int, node_rank: int, nproc: int, port: int) -> List[str]:
    return [sys.executable, '-m', 'torch.distributed.run', f'--nnodes={nnodes}', f'--node-rank={node_rank}',
            f'--nproc-per-node={nproc}', '--master-addr=127.0.0.1', f'--master-port={port}']


def _two_nodes(script: Sequence[str], env: Dict[str, str]) -> List[subprocess.CompletedProcess]:
    """``script`` on two torchrun nodes of one process each, started together; both must finish in TIMEOUT s."""
    port = free_port()
    procs = [subprocess.Popen([*_launcher(2, r, 1, port), *script], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=TIMEOUT)
            results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    for r in results:
        assert r.returncode == 0, r.stderr[-3000:]
    return results


def _one_node(script: Sequence[str], env: Dict[str, str], nproc: int = 2) -> subprocess.CompletedProcess:
    r = subprocess.run([*_launcher(1, 0, nproc, free_port()), *script], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _objects(url: str) -> Dict[str, bytes]:
    return {n: storage.read_bytes(f'{url}/{n}') for n in storage.list_sizes(url)}


def _written_shards(stderr: str) -> List[str]:
    found = re.findall(r'rank (\d) of 2 writes shards ([0-9., tar]+)', stderr)
    assert len(found) == 1, stderr[-3000:]
    return [s.strip() for s in found[0][1].split(',')]


@pytest.fixture(scope='module')
def two_node_reinforcement(s3, ref, ckpts):
    """reinforce.py on two nodes writing to s3://BUCKET/rd: (url, per-node results)."""
    url = f's3://{BUCKET}/rd'
    nodes = _two_nodes([os.path.join(REPO, 'reinforce.py'), *reinforce_args(url, ckpts)], s3)
    return url, nodes


def test_two_node_reinforce_to_s3_is_the_single_process_run(two_node_reinforcement, ref, s3):
    url, nodes = two_node_reinforcement
    shards = [_written_shards(n.stderr) for n in nodes]
    assert not set(shards[0]) & set(shards[1])  # disjoint shards, hence disjoint images
    objects = _objects(url)
    tars = {n: b for n, b in objects.items() if n.endswith('.tar')}
    assert sorted(shards[0] + shards[1]) == sorted(tars)
    assert tars == shard_bytes(ref)  # the union, byte for byte, is the single-process output
    with open(os.path.join(ref, 'reinforce.json')) as f:
        local_meta = json.load(f)
    remote_meta = json.loads(objects['reinforce.json'])
    assert [s['sha256'] for s in remote_meta['shards']] == [s['sha256'] for s in local_meta['shards']]
    assert remote_meta['num_images'] == N_IMAGES
    for n in nodes:
        assert SECRET not in n.stdout + n.stderr
    assert SECRET.encode() not in objects['args.yaml']
    v = subprocess.run([sys.executable, 'reinforce.py', '--verify', url], cwd=REPO, env=s3, capture_output=True,
                       text=True, timeout=120)
    assert v.returncode == 0 and f'OK {url}: 4 shards, {N_IMAGES} images' in v.stdout, v.stdout + v.stderr


def _train_argv(url: str, out: str) -> List[str]:
    return ['--reinforced', url, '--model', 'test_resnet', '--epochs', '2', '-b', '4', '-j', '1', '--lr', '0.1',
            '--warmup-epochs', '0', '--sched', 'cosine', '--val-split', '', '--seed', '3', '--device', 'cpu',
            '--no-progress', '--log-interval', '1000', '--output', out, '--experiment', 'run']


def _records(prefix: str) -> List[list]:
    out = []
    for r in range(2):
        with open(f'{prefix}.{r}.json') as f:
            out.append(json.load(f))
    return out


def _weights(folder: str) -> Dict[str, torch.Tensor]:
    return load_checkpoint_file(os.path.join(folder, 'run', 'last.pth.tar'))['state_dict']


def test_two_node_training_from_s3_is_the_single_node_run(two_node_reinforcement, ref, s3, tmp_path):
    url, _ = two_node_reinforcement
    recorder = tmp_path / 'recorder.py'
    recorder.write_text(RECORDER)
    _two_nodes([str(recorder), str(tmp_path / 'nodes'), *_train_argv(url, str(tmp_path / 'out_nodes'))], s3)
    _one_node([str(recorder), str(tmp_path / 'single'), *_train_argv(url, str(tmp_path / 'out_single'))], s3)
    nodes, single = _records(str(tmp_path / 'nodes')), _records(str(tmp_path / 'single'))
    assert nodes == single  # every rank: the same samples, pixels and targets, in the same order
    per_epoch = N_IMAGES // 2  # 24 images, batch 4, world 2: 3 full batches per rank and epoch, nothing padded
    stored = sorted(x['label'] for p in sorted(glob.glob(os.path.join(ref, '*.tar'))) for x in iter_shard(p, p))
    for epoch in range(2):
        parts = [rank[epoch * per_epoch:(epoch + 1) * per_epoch] for rank in nodes]
        assert all(len(p) == per_epoch for p in parts)
        assert not {p[1] for p in parts[0]} & {p[1] for p in parts[1]}  # the ranks' samples are disjoint
        labels = sorted(p[0] for part in parts for p in part)
        assert labels == stored  # together, every stored image once
    assert nodes[0][:per_epoch] != nodes[0][per_epoch:]  # epoch 1 is another order and other stored augmentations
    a, b = _weights(str(tmp_path / 'out_nodes')), _weights(str(tmp_path / 'out_single'))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the same training, bit for bit
    for folder in ('out_nodes', 'out_single'):
        with open(tmp_path / folder / 'run' / 'args.yaml') as f:
            text = f.read()
        assert url in text and SECRET not in text
