"""train.py's sampling flags (--class-aware-intra, --batch-anchors, --no-bake, --shuffle-bn, SyncBN default) and the
class-aware batches that reach the training loop through train.py's own loader path."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import train
from dr import data as dr_data
from dr.bake.sampler import ClassAwareSampler
from tests.helpers import REPO, free_port

train._import_training_libraries()  # train.main() does this once the flags are parsed

BASE = ['--dataset', 'digits', '--model', 'test_resnet', '--workers', '0', '--warmup-epochs', '0', '--lr', '0.2',
        '--log-interval', '1000', '--smoothing', '0', '--weight-decay', '1e-4']


def _parse(*argv):
    return train.parse_args(BASE + list(argv))[0]


def test_sampling_flags_resolve_batch_and_sampler():
    a = _parse('--bake', '--batch-anchors', '16')
    assert a.batch_size == 32 and a.sampler_intra == 1
    a = _parse('--bake', '--bake-intra', '3', '--batch-anchors', '16')
    assert a.batch_size == 64 and a.sampler_intra == 3
    a = _parse('--no-bake', '--batch-anchors', '16')
    assert a.batch_size == 16 and a.sampler_intra == 0 and not a.bake
    a = _parse('--class-aware-intra', '1', '--batch-anchors', '16')  # Table 10's vanilla rows with M > 0
    assert a.batch_size == 32 and a.sampler_intra == 1 and not a.bake
    a = _parse('--bake', '--class-aware-intra', '0', '--batch-anchors', '16')  # Table 10's BAKE row with M = 0
    assert a.batch_size == 16 and a.sampler_intra == 0 and a.bake
    a = _parse('--bake', '-b', '64')  # without --batch-anchors, -b counts all images as before
    assert a.batch_size == 64 and a.sampler_intra == 1
    a = _parse('--bake', '--batch-anchors', '16', '-b', '32')  # consistent: fine (a run's args.yaml has both)
    assert a.batch_size == 32
    assert a.sync_bn is None  # resolved when the model is built


@pytest.mark.parametrize('argv, words', [
    (['--bake', '--batch-anchors', '16', '-b', '40'], ['-b/--batch-size 40', '--batch-anchors 16', '32']),
    (['--class-aware-intra', '1', '-b', '33'], ['--class-aware-intra', '33']),
    (['--class-aware-intra', '-1'], ['--class-aware-intra must be >= 0']),
    (['--batch-anchors', '0'], ['--batch-anchors must be >= 1']),
    (['--shuffle-bn'], ['--shuffle-bn', '--bake']),
    (['--bake-random-walk'], ['--bake-random-walk', '--bake']),
    (['--bake', '--shuffle-bn', '--sync-bn'], ['--shuffle-bn and --sync-bn']),
    (['--class-aware-intra', '1', '--reinforced', '/nonexistent'], ['class-aware sampling', '--reinforced']),
])
def test_bad_sampling_flags_are_rejected(argv, words, capsys):
    with pytest.raises(SystemExit):
        _parse(*argv)
    err = capsys.readouterr().err
    for w in words:
        assert w in err, (w, err)


def test_sync_bn_default_follows_the_sampler():
    # On CPU the automatic default never converts (torch SyncBatchNorm needs CUDA); an explicit --sync-bn under
    # torch.distributed on CPU is an error naming the flag.
    for argv in (['--bake'], ['--class-aware-intra', '1'], ['--no-bake']):
        args = _parse(*argv, '-b', '32')
        args.distributed, args.rank, args.world_size = True, 0, 2
        model, _ = train.create_train_model(args, torch.device('cpu'))
        assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
    args = _parse('--bake', '--sync-bn', '-b', '32')
    args.distributed, args.rank, args.world_size = True, 0, 2
    with pytest.raises(ValueError, match='--sync-bn needs CUDA'):
        train.create_train_model(args, torch.device('cpu'))


def _train_loader(*argv):
    """The training loader exactly as train.main builds it (process setup, data, model, loaders)."""
    args, _ = train.parse_args(BASE + list(argv))
    device = train._setup_process(args)
    rd_meta, train_ds, _ = train._prepare_data(args)
    _, data_config = train.create_train_model(args, device)
    loader, _ = train.create_train_eval_loaders(args, train_ds, None, data_config, rd_meta, device)
    return args, train_ds, loader


@pytest.mark.parametrize('argv, m', [
    (['--bake', '--bake-intra', '3', '--batch-anchors', '8'], 3),
    (['--no-bake', '--class-aware-intra', '1', '--batch-anchors', '16'], 1),
])
def test_anchor_and_class_mates_arrive_in_the_same_training_batch(argv, m, one_thread):
    args, train_ds, loader = _train_loader(*argv, '--no-aug')
    assert isinstance(loader.sampler, ClassAwareSampler) and loader.sampler.num_intra == m
    labels = np.asarray(dr_data.dataset_targets(train_ds))
    loader.set_epoch(1)
    order = np.array(list(iter(loader.sampler)))  # the epoch's indices: anchor, its m mates, next anchor, ...
    groups = order.reshape(-1, 1 + m)
    assert (labels[groups] == labels[groups[:, :1]]).all()  # mates share the anchor's class
    assert (groups[:, 1:] != groups[:, :1]).all()  # and are other images
    b = args.batch_size
    seen = 0
    for k, (x, y) in enumerate(loader):
        assert x.shape[0] == y.shape[0] == b
        # the batch is the sampler's indices k*b ... (k+1)*b: whole groups, never split across batches
        np.testing.assert_array_equal(y.numpy(), labels[order[k * b:(k + 1) * b]])
        batch_groups = y.view(-1, 1 + m)
        assert bool((batch_groups == batch_groups[:, :1]).all())
        seen += b
    assert seen == len(order) // b * b and seen >= len(order) - b + 1


def test_plain_runs_keep_random_sampling(one_thread):
    _, _, loader = _train_loader('--no-bake', '-b', '32')
    assert not isinstance(loader.sampler, ClassAwareSampler)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize('name, argv', [
    ('shuffle', ['--bake', '--shuffle-bn', '--batch-anchors', '16']),
    ('classaware', ['--no-bake', '--class-aware-intra', '1', '--batch-anchors', '16']),
])
def test_torchrun_two_process_sampling_modes(tmp_path, name, argv):
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={free_port()}',
           os.path.join(REPO, 'train.py'), *BASE, *argv, '--epochs', '1', '--output', str(tmp_path),
           '--experiment', name]
    env = dict(os.environ, OMP_NUM_THREADS='1')
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    with open(os.path.join(tmp_path, name, 'results.json')) as f:
        assert json.load(f)['last_eval']['top1'] > 0
    assert 'Distributed training: process 0 of 2' in log
    if name == 'shuffle':
        assert 'shuffle_bn=True' in log
