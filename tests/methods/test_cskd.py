"""CS-KD (--method cskd): the class-wise KL against the formula, the (anchor, class mate) pairs from the class-aware
sampler, and a 1-epoch digits run."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from dr.bake.sampler import ClassAwareSampler
from dr.methods.cskd import CsKdTask, cskd_loss, split_pairs
from tests.methods.runs import run_train


def _softmax(z, t):
    e = [math.exp(v / t) for v in z]
    return [v / sum(e) for v in e]


def _reference(logits, mates, t):
    """T^2 * mean_i sum_k q_k log(q_k / p_k), q = softmax(mate / T), p = softmax(z / T), in plain Python."""
    total = 0.0
    for z, m in zip(logits.tolist(), mates.tolist()):
        p, q = _softmax(z, t), _softmax(m, t)
        total += sum(qk * (math.log(qk) - math.log(pk)) for qk, pk in zip(q, p))
    return t * t * total / len(logits)


@pytest.mark.parametrize('t', [4.0, 1.0])
def test_cskd_loss_matches_the_formula(t):
    g = torch.Generator().manual_seed(1)
    z, m = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    assert abs(cskd_loss(z, m, t).item() - _reference(z, m, t)) < 1e-6 * t * t  # float32 KL, scaled by T^2


def test_the_mates_prediction_is_detached_and_only_anchors_get_the_ce():
    torch.manual_seed(0)
    model = nn.Linear(3, 4)
    x, y = torch.randn(8, 3), torch.tensor([0, 0, 2, 2, 1, 1, 3, 3])
    task = CsKdTask(model, temperature=4.0, weight=1.0, verbose=False)
    out = task(x, y)
    logits, mates = model(x[0::2]), model(x[1::2])
    expected = nn.functional.cross_entropy(logits, y[0::2]).item() + _reference(logits.detach(), mates.detach(), 4.0)
    assert abs(out['loss'].item() - expected) < 1e-5
    assert out['output'].shape == (4, 4)
    # gradient flows through the anchors only: the loss with the mates' logits as constants has the same gradient
    out['loss'].backward()
    grad = model.weight.grad.clone()
    model.zero_grad()
    ref = nn.functional.cross_entropy(model(x[0::2]), y[0::2]) + cskd_loss(model(x[0::2]), mates.detach(), 4.0)
    ref.backward()
    torch.testing.assert_close(grad, model.weight.grad)


def test_a_batch_without_same_class_pairs_is_rejected():
    task = CsKdTask(nn.Linear(3, 4), verbose=False)
    with pytest.raises(ValueError, match='--class-aware-intra 1'):
        task(torch.randn(4, 3), torch.tensor([0, 1, 2, 3]))


def test_the_class_aware_sampler_pairs_every_anchor_with_another_image_of_its_class():
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2])
    sampler = ClassAwareSampler(labels.tolist(), num_intra=1, num_replicas=1, rank=0, shuffle=True, seed=3)
    sampler.set_epoch(2)
    order = torch.tensor(list(iter(sampler)))
    anchors, mates, ya, ym = split_pairs(order, torch.from_numpy(labels)[order])
    assert torch.equal(ya, ym) and bool((anchors != mates).all())
    assert sorted(anchors.tolist()) == list(range(len(labels)))  # every image is an anchor once per epoch


@pytest.mark.slow
def test_train_cskd_one_epoch(tmp_path):
    proc = run_train(str(tmp_path), 'cskd', '--method', 'cskd', '--class-aware-intra', '1')
    assert 'CsKdTask: temperature=4.0 weight=1.0' in proc.stdout + proc.stderr
    with open(tmp_path / 'cskd' / 'summary.csv') as f:
        assert 'train_loss_cskd' in f.readline()


def test_cskd_without_the_class_aware_sampler_is_an_error(capsys):
    import train
    with pytest.raises(SystemExit):
        train.parse_args(['--dataset', 'digits', '--model', 'test_resnet', '--method', 'cskd'])
    assert '--class-aware-intra 1' in capsys.readouterr().err
