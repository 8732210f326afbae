"""FGSM and AutoAttack in [0, 1] pixel space with the normalisation inside the model; attacks never change the
model."""
import copy
import logging

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dr.data import DigitsDataset
from dr.evaluate.attacks import (
    autoattack_correct,
    autoattack_status,
    create_autoattack,
    describe_autoattack,
    fgsm_correct,
    preserved_model_state,
)
from dr.evaluate.loop import AttackConfig, NormalizedModel, create_eval_loader, evaluate_part, summarize_records
from dr.evaluate.sets import View, build_parts

SIZE = 16
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _tiny_cnn():
    """BatchNorm and dropout included: both behave differently in training mode, which is what an attack must not
    switch on."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.3), nn.Linear(32, 10))


pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(scope='module')
def digits_model(one_thread):
    """A small CNN trained for a few seconds on the digits train split (normalisation inside)."""
    torch.manual_seed(0)
    ds = DigitsDataset('train', img_size=SIZE)
    x = torch.tensor(np.stack(ds.images)).permute(0, 3, 1, 2).float() / 255.0
    y = torch.tensor(ds.targets)
    model = NormalizedModel(_tiny_cnn(), MEAN, STD)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(12):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 128):
            idx = perm[i:i + 128]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def test_fgsm_matches_hand_computation_on_linear_model():
    torch.manual_seed(1)
    lin = nn.Linear(3 * 4 * 4, 5)
    model = nn.Sequential(nn.Flatten(), lin)
    x = torch.rand(16, 3, 4, 4)
    y = torch.randint(0, 5, (16,))
    eps = [0.0, 3.0, 50.0]
    got = fgsm_correct(model, x, y, eps)
    # d CE / d x = W^T (softmax - onehot), per sample
    p = F.softmax(model(x), dim=1)
    grad = (p - F.one_hot(y, 5).float()) @ lin.weight
    for j, e in enumerate(eps):
        x_adv = (x.flatten(1) + e / 255.0 * grad.sign()).clamp(0, 1)
        expected = lin(x_adv).argmax(1).eq(y)
        assert torch.equal(got[:, j], expected)
    assert torch.equal(got[:, 0], model(x).argmax(1).eq(y))
    with pytest.raises(ValueError):
        fgsm_correct(model, x, y, [-1.0])


def test_fgsm_sweep_non_increasing_on_trained_digits_model(digits_model):
    part, = build_parts('digits', digits_size=SIZE)
    cfg = {'input_size': (3, SIZE, SIZE), 'interpolation': 'bicubic', 'mean': MEAN, 'std': STD, 'crop_pct': 1.0,
           'crop_mode': 'center'}
    eps = [0, 1, 2, 4, 8, 16]
    loader = create_eval_loader(part.dataset, cfg, batch_size=128)
    records, _ = evaluate_part(digits_model, part, loader, torch.device('cpu'), attack=AttackConfig(fgsm_eps=eps),
                               progress=False)
    s = summarize_records(records['digits'], fgsm_eps=eps)
    accs = [s[f'fgsm_top1_eps{e}'] for e in eps]
    assert s['top1'] > 80.0, s['top1']  # the model learned
    assert accs[0] == pytest.approx(s['top1'])  # eps 0 is the clean accuracy
    assert all(a >= b for a, b in zip(accs, accs[1:])), accs
    assert accs[-1] < s['top1'] - 20.0, accs
    assert s['fgsm_count'] == s['count'] == 359


def test_fgsm_on_restricted_view_uses_view_logits():
    # a view that keeps 2 of 5 columns: the attack must use the restricted cross-entropy
    torch.manual_seed(2)
    lin = nn.Linear(12, 5)
    model = nn.Sequential(nn.Flatten(), lin)
    x = torch.rand(32, 3, 2, 2)
    view = View('sub', columns=[1, 3], target_map={1: 0, 3: 1})
    y = torch.randint(0, 2, (32,))
    got = fgsm_correct(model, x, y, [8.0], head=view.logits)
    w = lin.weight[[1, 3]]
    b = lin.bias[[1, 3]]
    p = F.softmax(x.flatten(1) @ w.T + b, dim=1)
    grad = (p - F.one_hot(y, 2).float()) @ w
    x_adv = (x.flatten(1) + 8 / 255.0 * grad.sign()).clamp(0, 1)
    assert torch.equal(got[:, 0], (x_adv @ w.T + b).argmax(1).eq(y))


def _require_autoattack():
    ok, status = autoattack_status()
    if not ok:  # the package is the optional 'robust' extra (installed in CI); say so instead of passing silently
        pytest.skip(status)
    assert status.startswith('pyautoattack ')


def _val_batch(n):
    ds = DigitsDataset('val', img_size=SIZE)
    x = torch.tensor(np.stack(ds.images[:n])).permute(0, 3, 1, 2).float() / 255.0
    return x, torch.tensor(ds.targets[:n])


def test_autoattack_runs_and_breaks_a_plain_model(digits_model):
    _require_autoattack()
    x, y = _val_batch(8)
    # a large budget lets APGD-CE break every image, so the later (expensive) attacks have nothing left to do
    attack = create_autoattack(digits_model, n_classes=10, eps_255=32.0, seed=0)
    correct = autoattack_correct(attack, digits_model, x, y)
    clean = digits_model(x).argmax(1).eq(y)
    assert correct.shape == (8,) and correct.dtype == torch.bool
    assert not (correct & ~clean).any()  # an image wrong when clean stays wrong
    assert int(correct.sum()) < int(clean.sum())


def test_autoattack_is_the_reference_standard_version():
    """The configuration is read from the attack object the package builds (issue: the previous package ran 10
    iterations and n_classes - 1 targets)."""
    _require_autoattack()
    cfg = describe_autoattack(1000, eps_255=4.0, seed=3)
    assert cfg['package'].startswith('pyautoattack') and cfg['version'] == 'standard' and cfg['norm'] == 'Linf'
    assert cfg['attacks'] == ['apgd-ce', 'apgd-t', 'fab-t', 'square']
    assert cfg['eps'] == pytest.approx(4 / 255) and cfg['eps_255'] == pytest.approx(4.0) and cfg['seed'] == 3
    assert cfg['apgd_ce'] == {'n_iter': 100, 'n_restarts': 1}
    assert cfg['apgd_t'] == {'n_iter': 100, 'n_restarts': 1, 'n_target_classes': 9}  # 9 targets, not 999
    assert cfg['fab_t'] == {'n_iter': 100, 'n_restarts': 1, 'n_target_classes': 9}
    assert cfg['square'] == {'n_queries': 5000, 'n_restarts': 1}
    assert describe_autoattack(10)['apgd_t']['n_target_classes'] == 9
    assert describe_autoattack(5)['fab_t']['n_target_classes'] == 4  # every other class when there are fewer
    with pytest.raises(RuntimeError, match='>= 4 classes'):
        describe_autoattack(3)


def test_every_attack_leaves_model_predictions_and_rng_unchanged(digits_model, caplog):
    """FGSM and all four AutoAttack attacks through the evaluation loop: BatchNorm buffers, dropout/BN modes and the
    predictions of later batches are exactly those of a model that was never attacked."""
    _require_autoattack()
    model = digits_model
    untouched = copy.deepcopy(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert any('running_mean' in k for k in state)
    part, = build_parts('digits', digits_size=SIZE)
    cfg = {'input_size': (3, SIZE, SIZE), 'interpolation': 'bicubic', 'mean': MEAN, 'std': STD, 'crop_pct': 1.0,
           'crop_mode': 'center'}
    loader = create_eval_loader(part.dataset, cfg, batch_size=128)  # 3 batches: later ones run after attacks
    # a tiny budget keeps most images robust, so APGD-T, FAB-T and Square all run on them
    attack = AttackConfig(fgsm_eps=[0, 8], autoattack=True, autoattack_n=3, autoattack_eps=0.5, seed=0)
    with caplog.at_level(logging.DEBUG, logger='auto-attack'):
        records, _ = evaluate_part(model, part, loader, torch.device('cpu'), attack=attack, progress=False)
    ran = {m.split()[-1] for m in caplog.messages if m.startswith('running ')}
    assert ran == {'apgd-ce', 'apgd-t', 'fab-t', 'square'}, caplog.messages
    after = model.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state), [k for k in state if not torch.equal(state[k],
                                                                                                     after[k])]
    assert not any(m.training for m in model.modules())
    rec = records['digits']
    x = torch.tensor(np.stack(DigitsDataset('val', img_size=SIZE).images)).permute(0, 3, 1, 2).float() / 255.0
    with torch.no_grad():
        expected = untouched(x).argmax(1)
    assert torch.equal(rec['top5'][:, 0][torch.argsort(rec['index'])], expected)
    s = summarize_records(rec, fgsm_eps=[0, 8])
    assert s['autoattack_count'] == 3 and s['fgsm_count'] == 359
    clean_first3 = expected[:3].eq(torch.tensor(DigitsDataset('val', img_size=SIZE).targets[:3]))
    aa = rec['aa_correct'][torch.argsort(rec['aa_index'])]
    assert not (aa & ~clean_first3).any()


def test_preserved_model_state_undoes_an_attack_that_trains_the_model(caplog):
    """What the previous attack package did (switch the wrapper to training mode and run forwards) is undone and
    reported; the global RNG an attack reseeds is restored too."""
    torch.manual_seed(0)
    model = NormalizedModel(_tiny_cnn(), MEAN, STD).eval()
    x = torch.rand(6, 3, SIZE, SIZE)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = model(x)
    rng = torch.get_rng_state()
    with caplog.at_level(logging.WARNING, logger='dr.evaluate.attacks'):
        with preserved_model_state(model, 'misbehaving attack'):
            model.train()
            model(x * 0.5 + 0.7)  # updates BatchNorm running statistics
            torch.manual_seed(123)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert not any(m.training for m in model.modules())
    assert torch.equal(model(x), before)
    assert any('misbehaving attack changed the model' in m and 'running_mean' in m for m in caplog.messages)


def test_autoattack_unavailable_is_reported(monkeypatch):
    import builtins
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == 'pyautoattack' or name.startswith('pyautoattack.'):
            raise ImportError('simulated missing package')
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, '__import__', fake_import)
    ok, status = autoattack_status()
    assert not ok and status.startswith('unavailable:') and 'simulated missing package' in status
    assert 'dr[robust]' in status  # says how to install it
    with pytest.raises(RuntimeError, match='unavailable'):
        create_autoattack(nn.Linear(2, 2), n_classes=10)
