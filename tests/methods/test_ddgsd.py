"""DDGSD (--method ddgsd): the symmetric KL and the linear MMD against the formulas, the two-view transform, the task's
loss, and a 1-epoch digits run."""
import math

import pytest
import torch
import torch.nn as nn

from dr.methods.ddgsd import DdgsdTask, TwoViewTransform, linear_mmd, symmetric_kl
from tests.methods.runs import run_train


def _softmax(z, t):
    e = [math.exp(v / t) for v in z]
    return [v / sum(e) for v in e]


def _kl(q, p):
    return sum(a * (math.log(a) - math.log(b)) for a, b in zip(q, p))


def _reference_sym(z1, z2, t):
    total = 0.0
    for a, b in zip(z1.tolist(), z2.tolist()):
        p1, p2 = _softmax(a, t), _softmax(b, t)
        total += _kl(p2, p1) + _kl(p1, p2)
    return t * t * total / len(z1)


@pytest.mark.parametrize('t', [1.0, 3.0])
def test_symmetric_kl_matches_the_formula(t):
    g = torch.Generator().manual_seed(2)
    z1, z2 = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    assert abs(symmetric_kl(z1, z2, t).item() - _reference_sym(z1, z2, t)) < 1e-6 * t * t


def test_each_view_is_the_others_detached_target():
    z1, z2 = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True)
    symmetric_kl(z1, z2, 1.0).backward()
    g1 = z1.grad.clone()
    z1.grad = None
    ref = nn.functional.kl_div(torch.log_softmax(z1, 1), torch.softmax(z2, 1).detach(), reduction='batchmean')
    ref.backward()  # z1's gradient comes only from KL(sg(p2) || p1)
    torch.testing.assert_close(g1, z1.grad)


def test_linear_mmd_is_the_squared_distance_of_the_means():
    f1, f2 = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[0.0, 0.0], [2.0, 2.0]])
    assert linear_mmd(f1, f2).item() == pytest.approx((2 - 1) ** 2 + (3 - 1) ** 2)


def test_two_view_transform_draws_twice():
    calls = iter([torch.zeros(1, 2, 2), torch.ones(1, 2, 2)])
    views = TwoViewTransform(lambda img: next(calls))('img')
    assert views.shape == (2, 1, 2, 2) and views[0].sum() == 0 and views[1].sum() == 4


def test_task_loss_is_ce_on_both_views_plus_the_weighted_terms():
    import timm
    torch.manual_seed(0)
    model = timm.create_model('test_resnet', num_classes=3)
    task = DdgsdTask(model, weight=0.5, temperature=2.0, mmd_weight=0.3, verbose=False)
    x, y = torch.randn(4, 2, 3, 16, 16), torch.tensor([0, 1, 2, 0])
    model.eval()  # same BN statistics for the reference forward passes
    task.eval()
    out = task(x, y)
    z1, z2 = model(x[:, 0]), model(x[:, 1])
    f1 = model.forward_head(model.forward_features(x[:, 0]), pre_logits=True)
    f2 = model.forward_head(model.forward_features(x[:, 1]), pre_logits=True)
    ce = nn.functional.cross_entropy(z1, y) + nn.functional.cross_entropy(z2, y)
    expected = ce + 0.5 * symmetric_kl(z1, z2, 2.0) + 0.3 * linear_mmd(f1, f2)
    assert abs(out['loss'].item() - expected.item()) < 1e-5
    torch.testing.assert_close(out['output'], z1)


def test_single_view_batches_are_rejected():
    import timm
    task = DdgsdTask(timm.create_model('test_resnet', num_classes=3), verbose=False)
    with pytest.raises(ValueError, match='two-view'):
        task(torch.randn(2, 3, 16, 16), torch.tensor([0, 1]))


@pytest.mark.slow
def test_train_ddgsd_one_epoch(tmp_path):
    proc = run_train(str(tmp_path), 'ddgsd', '--method', 'ddgsd', '--ddgsd-mmd-weight', '1')
    assert 'DdgsdTask: weight=1.0 temperature=1.0 mmd_weight=1.0' in proc.stdout + proc.stderr
    with open(tmp_path / 'ddgsd' / 'summary.csv') as f:
        header = f.readline()
    assert 'train_loss_ddgsd' in header and 'train_loss_mmd' in header
