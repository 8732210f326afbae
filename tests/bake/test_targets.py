"""BAKE targets and loss: closed form vs iterated propagation, one-step form, diagonal, knowledge types."""
import contextlib

import pytest
import torch
import torch.nn.functional as F

from dr.bake.targets import bake_loss, bake_targets, random_walk_log_probs


def _batch(n=12, d=16, k=7, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, d, generator=g).to(dtype)
    logits = (3 * torch.randn(n, k, generator=g)).to(dtype)
    return feats, logits


def _reference_affinity(feats: torch.Tensor) -> torch.Tensor:
    """Eq. 4 written out per row with Python loops: exp(cos) over the other samples, normalised."""
    f = feats.double()
    n = f.shape[0]
    a = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        fi = f[i] / f[i].norm()
        w = {j: torch.exp(fi @ (f[j] / f[j].norm())) for j in range(n) if j != i}
        total = sum(w.values())
        for j, v in w.items():
            a[i, j] = v / total
    return a


def _reference_p(logits, temperature):
    return torch.softmax(logits.double() / temperature, dim=1)


# --- bake_targets ------------------------------------------------------------------------------------------
def test_rows_are_distributions():
    feats, logits = _batch()
    for one_step in (False, True):
        q = bake_targets(feats, logits, omega=0.7, temperature=4.0, one_step=one_step)
        assert q.dtype == torch.float32 and q.shape == logits.shape
        assert (q >= 0).all()
        torch.testing.assert_close(q.sum(1), torch.ones(q.shape[0]), atol=1e-5, rtol=0)


@pytest.mark.parametrize('omega', [0.2, 0.5, 0.9])
def test_closed_form_equals_iterated_propagation(omega):
    # Eq. 7: Q_{t+1} = omega A Q_t + (1 - omega) P, Q_0 = P; its fixed point is Eq. 8.
    feats, logits = _batch(n=10, seed=3)
    a = _reference_affinity(feats)
    p = _reference_p(logits, 4.0)
    q_iter = p.clone()
    for _ in range(400):
        q_iter = omega * a @ q_iter + (1 - omega) * p
    q = bake_targets(feats, logits, omega=omega, temperature=4.0)
    torch.testing.assert_close(q.double(), q_iter, atol=2e-6, rtol=0)
    # and the ensemble really moved the targets away from the sample's own prediction
    assert (q.double() - p).abs().max() > 1e-3


def test_omega_zero_gives_p():
    feats, logits = _batch()
    q = bake_targets(feats, logits, omega=0.0, temperature=2.0)
    torch.testing.assert_close(q, torch.softmax(logits / 2.0, dim=1))
    q1 = bake_targets(feats, logits, omega=0.0, temperature=2.0, one_step=True)
    torch.testing.assert_close(q1, torch.softmax(logits / 2.0, dim=1))


def test_one_step_form():
    feats, logits = _batch(seed=5)
    omega, tau = 0.6, 3.0
    a = _reference_affinity(feats)
    p = _reference_p(logits, tau)
    expected = omega * a @ p + (1 - omega) * p
    q = bake_targets(feats, logits, omega=omega, temperature=tau, one_step=True)
    torch.testing.assert_close(q.double(), expected, atol=1e-6, rtol=0)
    q_closed = bake_targets(feats, logits, omega=omega, temperature=tau)
    assert (q - q_closed).abs().max() > 1e-4


def test_diagonal_excluded():
    # With omega = 1 (one step) Q_i = sum_{j != i} A_ij P_j: sample i's own prediction must not matter.
    feats, logits = _batch(n=8, seed=7)
    q = bake_targets(feats, logits, omega=1.0, temperature=4.0, one_step=True)
    changed = logits.clone()
    changed[2] = torch.tensor([20.0, -5, -5, -5, -5, -5, -5])
    q2 = bake_targets(feats, changed, omega=1.0, temperature=4.0, one_step=True)
    torch.testing.assert_close(q[2], q2[2])
    assert (q2[torch.arange(8) != 2] - q[torch.arange(8) != 2]).abs().max() > 1e-3  # the others do see it
    # The project's Q equals Eq. 5 with the diagonal excluded and differs from the same sum with it kept: a sample's
    # own feature (cos = 1, the largest affinity) would otherwise carry the most weight.
    p = _reference_p(logits, 4.0)
    f = F.normalize(feats.double(), dim=1)
    kept = torch.softmax(f @ f.t(), dim=1)
    excluded = _reference_affinity(feats)
    torch.testing.assert_close(q.double(), excluded @ p, atol=1e-6, rtol=0)
    assert (q.double() - kept @ p).abs().max() > 1e-3
    # the closed form too: Q = (1 - w)(I - w A)^-1 P with the zero-diagonal A, not the kept one
    qc = bake_targets(feats, logits, omega=0.5, temperature=4.0)
    eye = torch.eye(8, dtype=torch.float64)
    torch.testing.assert_close(qc.double(), 0.5 * torch.linalg.solve(eye - 0.5 * excluded, p), atol=1e-6, rtol=0)
    assert (qc.double() - 0.5 * torch.linalg.solve(eye - 0.5 * kept, p)).abs().max() > 1e-3


def test_omega_one_needs_one_step_and_validation():
    feats, logits = _batch()
    with pytest.raises(ValueError, match='--bake-one-step'):
        bake_targets(feats, logits, omega=1.0)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match='--bake-omega'):
            bake_targets(feats, logits, omega=bad, one_step=True)
    with pytest.raises(ValueError, match='--bake-temp'):
        bake_targets(feats, logits, temperature=0.0)
    with pytest.raises(ValueError, match='rows'):
        bake_targets(feats[:5], logits)


def test_thread_count_is_restored():
    feats, logits = _batch()
    before = torch.get_num_threads()
    bake_targets(feats, logits)
    with pytest.raises(ValueError):
        bake_targets(feats, logits[:3])
    assert torch.get_num_threads() == before


def test_single_sample_returns_p():
    feats, logits = _batch(n=1)
    for one_step in (False, True):
        q = bake_targets(feats, logits, omega=0.5, temperature=4.0, one_step=one_step)
        torch.testing.assert_close(q, torch.softmax(logits / 4.0, dim=1))
        assert torch.isfinite(q).all()


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_low_precision_inputs(dtype):
    # Half-precision features/logits (as an AMP forward returns them) give float32 targets equal to the float32
    # computation on the same (rounded) values.
    # ... also when called inside the autocast region that produced them.
    feats, logits = _batch(n=16, seed=11)
    q32 = bake_targets(feats.to(dtype).float(), logits.to(dtype).float())
    for ctx in (contextlib.nullcontext(), torch.autocast('cpu', dtype=dtype)):
        with ctx:
            q = bake_targets(feats.to(dtype), logits.to(dtype))
            loss = bake_loss(logits.to(dtype), q, 4.0)
        assert q.dtype == torch.float32 and torch.isfinite(q).all()
        torch.testing.assert_close(q, q32, atol=1e-6, rtol=0)
        assert loss.dtype == torch.float32 and torch.isfinite(loss)


@pytest.mark.parametrize('one_step', [False, True])
def test_targets_under_autocast_are_float32(one_step):
    # Inside torch.autocast the matmuls would run (and return) bfloat16; bake_targets disables autocast, so its
    # targets equal the float32 computation to float32 precision, in the closed and the one-step form.
    feats, logits = _batch(n=32, d=64, k=10, seed=12)
    feats = feats.to(torch.bfloat16).float()
    logits = logits.to(torch.bfloat16).float()
    q32 = bake_targets(feats, logits, omega=0.5, temperature=4.0, one_step=one_step)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert torch.is_autocast_enabled('cpu') and (feats @ feats.t()).dtype == torch.bfloat16  # autocast is on
        q = bake_targets(feats, logits, omega=0.5, temperature=4.0, one_step=one_step)
        loss = bake_loss(logits, q, 4.0)
        log_q = random_walk_log_probs(feats, logits, omega=0.5, temperature=4.0)
    assert q.dtype == torch.float32 and loss.dtype == torch.float32 and log_q.dtype == torch.float32
    torch.testing.assert_close(q, q32, atol=1e-6, rtol=0)
    torch.testing.assert_close(loss, bake_loss(logits, q32, 4.0), atol=1e-6, rtol=0)
    torch.testing.assert_close(log_q, random_walk_log_probs(feats, logits, omega=0.5, temperature=4.0),
                               atol=1e-5, rtol=0)


def test_labels_knowledge():
    feats, logits = _batch(n=9, k=4, seed=2)
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 0])
    y = F.one_hot(labels, 4).float()
    omega = 0.5
    q = bake_targets(feats, logits, omega=omega, knowledge=y)
    a = _reference_affinity(feats)
    expected = (1 - omega) * torch.linalg.inv(torch.eye(9, dtype=torch.float64) - omega * a) @ y.double()
    torch.testing.assert_close(q.double(), expected, atol=1e-6, rtol=0)
    # logits play no role with label knowledge
    torch.testing.assert_close(q, bake_targets(feats, -logits, omega=omega, knowledge=y))


def test_no_gradient_reaches_targets():
    feats, logits = _batch(n=10, seed=4)
    feats.requires_grad_(True)
    logits.requires_grad_(True)
    tau = 4.0
    q = bake_targets(feats, logits, omega=0.5, temperature=tau)
    assert not q.requires_grad and q.grad_fn is None
    loss = bake_loss(logits, q, tau)
    loss.backward()
    # d/dz tau^2 KL(Q || softmax(z / tau)) / N = tau (softmax(z / tau) - Q) / N with Q constant
    expected = tau * (torch.softmax(logits.detach() / tau, dim=1) - q) / logits.shape[0]
    torch.testing.assert_close(logits.grad, expected, atol=1e-6, rtol=0)
    assert feats.grad is None


def test_bake_loss_value():
    _, logits = _batch(n=6, seed=8)
    g = torch.Generator().manual_seed(1)
    q = torch.softmax(torch.randn(6, 7, generator=g), dim=1)
    tau = 2.5
    s = torch.softmax(logits.double() / tau, dim=1)
    expected = tau ** 2 * (q.double() * (q.double().log() - s.log())).sum(1).mean()
    torch.testing.assert_close(bake_loss(logits, q, tau).double(), expected, atol=1e-6, rtol=0)
    assert bake_loss(logits, torch.softmax(logits / tau, dim=1), tau).abs() < 1e-6


# --- random walk (Table 16 baseline) ---------------------------------------------------------------------------------
def test_random_walk_matches_closed_form_and_is_differentiable():
    feats, logits = _batch(n=10, seed=9)
    omega, tau = 0.5, 4.0
    a = _reference_affinity(feats)
    p = _reference_p(logits, tau)
    expected = (1 - omega) * torch.linalg.solve(torch.eye(10, dtype=torch.float64) - omega * a, p)
    feats.requires_grad_(True)
    logits.requires_grad_(True)
    log_q = random_walk_log_probs(feats, logits, omega=omega, temperature=tau)
    torch.testing.assert_close(log_q.exp().double(), expected, atol=1e-6, rtol=0)
    # the same values as BAKE's targets, but the gradient reaches the logits through Q and the features through A
    torch.testing.assert_close(log_q.exp(), bake_targets(feats, logits, omega=omega, temperature=tau),
                               atol=1e-6, rtol=0)
    F.nll_loss(log_q, torch.arange(10) % 7).backward()
    assert feats.grad is not None and feats.grad.abs().max() > 0
    assert logits.grad is not None and logits.grad.abs().max() > 0
    with pytest.raises(ValueError, match='--bake-one-step'):
        random_walk_log_probs(feats, logits, omega=1.0)
