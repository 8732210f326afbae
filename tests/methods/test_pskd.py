"""PS-KD (--method pskd): alpha_t and the targets against the formula, the per-sample prediction store (stored,
reused the next epoch, resumed), the sample indices from the dataset wrapper, and a 2-process run in which every
rank contributes only its own samples' predictions."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DistributedSampler

from dr.methods.pskd import IndexedDataset, PredictionStore, PsKdTask, pskd_alpha, pskd_targets
from tests.helpers import REPO, free_port, subprocess_env
from tests.methods.runs import DIGITS, run_train


def test_alpha_grows_linearly_to_alpha_T_in_the_last_epoch():
    assert pskd_alpha(0.8, 0, 4) == pytest.approx(0.2)
    assert pskd_alpha(0.8, 1, 4) == pytest.approx(0.4)
    assert pskd_alpha(0.8, 3, 4) == pytest.approx(0.8)


def test_targets_mix_the_label_and_the_previous_prediction():
    prev = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    got = pskd_targets(torch.tensor([1, 0]), prev, torch.tensor([True, False]), 0.4)
    expected = torch.tensor([[0.4 * 0.5, 0.6 + 0.4 * 0.3, 0.4 * 0.2], [1.0, 0.0, 0.0]])  # unseen: the label
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-7)


def test_indexed_dataset_returns_the_sample_index():
    ds = IndexedDataset([('a', 0), ('b', 1)])
    assert ds[1] == ('b', 1, 1) and len(ds) == 2


def test_task_trains_on_labels_first_then_on_last_epochs_predictions():
    torch.manual_seed(0)
    model = nn.Linear(3, 4)
    x, y, idx = torch.randn(4, 3), torch.tensor([0, 1, 2, 3]), torch.tensor([3, 1, 0, 2])
    task = PsKdTask(model, num_classes=4, alpha_T=0.8, verbose=False)
    task.start_epoch(0, 2, None)
    out = task((x), (y, idx))
    logits = model(x)
    assert abs(out['loss'].item() - nn.functional.cross_entropy(logits, y).item()) < 1e-6  # nothing stored yet
    p0 = torch.softmax(logits.detach(), dim=1)
    torch.testing.assert_close(task.store.table[idx], p0)
    with torch.no_grad():
        model.weight.add_(0.5)  # the model changes; the targets must come from the stored epoch-0 predictions
    task.start_epoch(1, 2, None)
    out = task(x, (y, idx))
    soft = 0.2 * nn.functional.one_hot(y, 4).float() + 0.8 * p0  # alpha_1 = 0.8 * 2 / 2
    ref = -(soft * torch.log_softmax(model(x), dim=1)).sum(1).mean()
    assert abs(out['loss'].item() - ref.item()) < 1e-6
    # within the epoch a sample repeated later still reads the previous epoch's prediction
    prev, seen = task.store.lookup(idx)
    torch.testing.assert_close(prev, p0)
    assert bool(seen.all())


def test_store_round_trip_and_bad_file(tmp_path):
    store = PredictionStore(3)
    store.update(torch.tensor([2, 0]), torch.tensor([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]]))
    store.begin_epoch(0)
    path = str(tmp_path / 's.pt')
    store.save(path)
    other = PredictionStore(3)
    other.load(path)
    torch.testing.assert_close(other.table, store.table)
    assert other.seen.tolist() == [True, False, True] and other.owner.tolist() == [0, -1, 0]
    with pytest.raises(ValueError, match='s.pt'):
        PredictionStore(5).load(path)


@pytest.mark.slow
def test_resume_continues_with_the_same_stored_predictions(tmp_path):
    out = str(tmp_path)
    flags = ['--method', 'pskd', '--seed', '3', '--digits-size', '16']  # equality needs no full-size images
    run_train(out, 'full', *flags, epochs=2)
    run_train(out, 'split', *flags, '--stop-epoch', '1', epochs=2)
    assert os.path.isfile(os.path.join(out, 'split', 'pskd-predictions-0.pt'))
    run_train(out, 'split', *flags, '--resume', os.path.join(out, 'split', 'last.pth.tar'), epochs=2)
    full = torch.load(os.path.join(out, 'full', 'pskd-predictions-1.pt'), weights_only=True)
    split = torch.load(os.path.join(out, 'split', 'pskd-predictions-1.pt'), weights_only=True)
    assert bool(full['seen'].sum() > 0) and full['epoch'] == split['epoch'] == 1
    assert torch.equal(full['seen'], split['seen'])
    torch.testing.assert_close(split['table'], full['table'], rtol=0, atol=1e-5)
    assert not os.path.exists(os.path.join(out, 'split', 'pskd-predictions-0.pt.tmp'))


@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_each_rank_stores_only_its_own_samples(tmp_path):
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={free_port()}',
           os.path.join(REPO, 'train.py'), *DIGITS, '--method', 'pskd', '--epochs', '1', '--seed', '5',
           '--output', str(tmp_path), '--experiment', 'ddp']
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    state = torch.load(os.path.join(tmp_path, 'ddp', 'pskd-predictions-0.pt'), weights_only=True)
    import train
    from dr import data as dr_data
    train._import_training_libraries()
    args, _ = train.parse_args([*DIGITS, '--seed', '5'])
    _, train_ds, _ = train._prepare_data(args)
    n, b = len(train_ds), 32
    mine = []
    for rank in (0, 1):  # the samples each rank trained in epoch 0 (train.py's DistributedSampler, drop_last)
        sampler = DistributedSampler(train_ds, num_replicas=2, rank=rank, shuffle=True, seed=5)
        sampler.set_epoch(0)
        order = list(iter(sampler))
        mine.append(set(order[:len(order) // b * b]))
    trained = mine[0] | mine[1]
    owner, seen = state['owner'], state['seen']
    assert seen.sum().item() == len(trained) and set(torch.nonzero(seen).view(-1).tolist()) == trained
    for i in trained:  # each stored row came from a rank that trained that sample, every sample once
        assert owner[i].item() in (r for r in (0, 1) if i in mine[r])
    assert bool((owner[~seen] == -1).all()) and seen.shape[0] <= n
    assert torch.allclose(state['table'][seen].sum(1), torch.ones(int(seen.sum())), atol=1e-5)
    assert len(dr_data.dataset_targets(train_ds)) == n
