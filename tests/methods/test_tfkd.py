"""Tf-KD_reg (--method tfkd) against the formula, and Tf-KD_self through --kd-teacher with a checkpoint of the same
architecture."""
import json
import math
import os

import pytest
import torch
import torch.nn as nn

from dr.methods.tfkd import TfKdRegTask, tfkd_reg_loss, virtual_teacher
from tests.methods.runs import run_train


def _reference_kl(logits, labels, temperature, a):
    """sum_k q_k (log q_k - log p_k), q = softmax(p^d / T), averaged over samples, in plain Python."""
    total = 0.0
    for z, y in zip(logits.tolist(), labels.tolist()):
        k = len(z)
        pd = [a if j == y else (1 - a) / (k - 1) for j in range(k)]
        e = [math.exp(v / temperature) for v in pd]
        q = [v / sum(e) for v in e]
        ez = [math.exp(v) for v in z]
        p = [v / sum(ez) for v in ez]
        total += sum(qj * (math.log(qj) - math.log(pj)) for qj, pj in zip(q, p))
    return total / len(labels)


def test_virtual_teacher_puts_a_on_the_label_and_spreads_the_rest():
    p = virtual_teacher(torch.tensor([2, 0]), 4, 0.9)
    expected = torch.tensor([[0.1 / 3, 0.1 / 3, 0.9, 0.1 / 3], [0.9, 0.1 / 3, 0.1 / 3, 0.1 / 3]])
    torch.testing.assert_close(p, expected, rtol=0, atol=1e-7)


@pytest.mark.parametrize('temperature, a', [(20.0, 0.9), (1.0, 0.6)])
def test_tfkd_reg_loss_matches_the_formula(temperature, a):
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(5, 4, generator=g, dtype=torch.float64), torch.tensor([0, 3, 1, 1, 2])
    got = tfkd_reg_loss(logits.float(), labels, temperature, a)
    assert abs(got.item() - _reference_kl(logits, labels, temperature, a)) < 1e-6


def test_task_mixes_ce_and_the_regularizer_with_alpha():
    torch.manual_seed(0)
    model = nn.Linear(3, 4)
    x, y = torch.randn(6, 3), torch.tensor([0, 1, 2, 3, 0, 1])
    task = TfKdRegTask(model, alpha=0.25, temperature=5.0, correct_prob=0.8, verbose=False)
    out = task(x, y)
    logits = model(x)
    ce = nn.functional.cross_entropy(logits, y)
    reg = _reference_kl(logits.detach().double(), y, 5.0, 0.8)
    assert abs(out['loss'].item() - (0.75 * ce.item() + 0.25 * reg)) < 1e-6
    out['loss'].backward()
    assert model.weight.grad is not None and model.weight.grad.abs().sum() > 0


def test_task_rejects_soft_targets():
    task = TfKdRegTask(nn.Linear(3, 4), verbose=False)
    with pytest.raises(ValueError, match='class-index targets'):
        task(torch.randn(2, 3), torch.full((2, 4), 0.25))


@pytest.mark.slow
def test_train_tfkd_reg_and_tf_kd_self_with_a_checkpoint_of_the_same_architecture(tmp_path):
    out = str(tmp_path)
    small = ('--digits-size', '16')  # wiring, not accuracy: a quarter of the pixels
    proc = run_train(out, 'reg', '--method', 'tfkd', *small)
    assert 'TfKdRegTask: alpha=0.1 temperature=20.0 correct_prob=0.9' in proc.stdout + proc.stderr
    # Tf-KD_self: the trained plain student (same architecture) is the teacher of a fresh student
    run_train(out, 'plain', *small)
    ckpt = os.path.join(out, 'plain', 'last.pth.tar')
    proc = run_train(out, 'self', '--kd-teacher', f'test_resnet={ckpt}', '--kd-temp', '20', '--task-loss-weight',
                     '0.9', '--kd-weight', '0.1', *small)
    log = proc.stdout + proc.stderr
    assert 'task_weight=0.9, distill_weight=0.1' in log and 'temperature=20.0' in log, log[-2000:]
    with open(os.path.join(out, 'self', 'summary.csv')) as f:
        assert 'train_kd_loss' in f.readline()  # the loss against the checkpoint's predictions was trained
    for name in ('reg', 'self'):
        with open(os.path.join(out, name, 'results.json')) as f:
            assert json.load(f)['last_eval']['top1'] > 0
