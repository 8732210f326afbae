"""Training tasks on teacher targets: the KL task on reinforced data and online KD from a teacher ensemble."""

import numpy as np
import pytest
import torch
import torch.nn as nn

from dr.reinforce.task import ReinforcedTask

MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)
SIZE = 12


def test_reinforced_task_loss_matches_hand_computation():
    torch.manual_seed(0)
    model = nn.Linear(6, 5)
    x = torch.randn(4, 6)
    probs = torch.softmax(torch.randn(4, 5), dim=1)
    probs[0] = torch.tensor([1.0, 0, 0, 0, 0])  # a one-hot row (0 log 0 = 0)
    labels = torch.tensor([0, 3, 1, 4])
    logits = model(x).detach()
    log_q = torch.log_softmax(logits, dim=1)
    kl = 0.0
    for i in range(4):
        for c in range(5):
            p = float(probs[i, c])
            if p > 0:
                kl += p * (np.log(p) - float(log_q[i, c]))
    kl /= 4
    ce = float(-log_q[torch.arange(4), labels].mean())

    out = ReinforcedTask(model, loss='kl', gt_weight=0.0, verbose=False)(x, (probs, labels))
    assert out['loss_rd'].item() == pytest.approx(kl, rel=1e-5)
    assert out['loss'].item() == pytest.approx(kl, rel=1e-5)
    assert out['loss_ce'].item() == pytest.approx(ce, rel=1e-5)
    assert torch.equal(out['output'], model(x))

    out = ReinforcedTask(model, gt_weight=0.5, verbose=False)(x, (probs, labels))
    assert out['loss'].item() == pytest.approx(kl + 0.5 * ce, rel=1e-5)
    out['loss'].backward()
    assert model.weight.grad is not None and torch.isfinite(model.weight.grad).all()

    with pytest.raises(ValueError, match='--rd-loss'):
        ReinforcedTask(model, loss='mse', verbose=False)
    with pytest.raises(ValueError, match='num-classes'):
        ReinforcedTask(model, verbose=False)(x, (probs[:, :4], labels))


def _have_teachers() -> bool:
    try:
        import dr.reinforce.teachers  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _have_teachers(), reason='dr.reinforce.teachers not available')
def test_online_kd_with_teacher_ensemble(tmp_path):
    import timm
    from timm.task import LogitDistillationTask

    from dr.reinforce.teachers import create_teacher

    torch.manual_seed(0)
    teacher_model = timm.create_model('test_resnet', num_classes=10)
    ckpt = str(tmp_path / 'teacher.pth')
    torch.save({'state_dict': teacher_model.state_dict()}, ckpt)
    teacher = create_teacher([f'test_resnet={ckpt}', f'test_resnet={ckpt}'], num_classes=10, img_size=32)
    student = timm.create_model('test_resnet', num_classes=10)
    cfg = student.pretrained_cfg
    teacher.set_input_norm(cfg['mean'], cfg['std'], (3, 32, 32))
    task = LogitDistillationTask(student, teacher, criterion=nn.CrossEntropyLoss(), distill_loss_weight=1.0,
                                 task_loss_weight=0.5, temperature=2.0, verbose=False)
    task.train()
    assert not task.teacher.training
    before = {k: v.clone() for k, v in task.teacher.state_dict().items()}
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    for _ in range(2):
        out = task(x, y)
        assert torch.isfinite(out['loss']) and out['kd_loss'].item() >= 0
        opt.zero_grad()
        out['loss'].backward()
        opt.step()
    after = task.teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in task.teacher.parameters())
    # the distilled distribution is the ensemble mean: both members are the same model, so it equals that model
    with torch.no_grad():
        ref = torch.log_softmax(teacher_model.eval()(x), dim=1)
        got = task.teacher(x)
    torch.testing.assert_close(torch.log_softmax(got, dim=1), ref, atol=1e-4, rtol=1e-4)
