"""BAKE: self-distillation with BAtch Knowledge Ensembling (Ge et al., 2021).

For a batch of ``N`` samples with pooled pre-logit features ``f`` and logits ``z`` the soft target of each sample is
an ensemble of the predictions of the *other* samples of the batch, weighted by feature affinity:

* ``A = rowsoftmax(f_n f_n^T)`` with ``f_n = f / ||f||`` and the diagonal excluded (``-inf`` before the softmax);
* ``P = softmax(z / tau)`` (or one-hot / soft labels for the ``labels`` ablation);
* propagation ``Q_{t+1} = omega A Q_t + (1 - omega) P`` (Eq. 7), whose limit (infinite propagation) is
  ``Q = (1 - omega) (I - omega A)^{-1} P``, solved here with one ``torch.linalg.solve`` in float32;
* ``one_step=True`` gives ``Q = omega A P + (1 - omega) P`` (Eq. 6, the Fig. 4 ablation).

The loss (Eq. 2) is ``CE(z, y) + lambda * tau^2 * KL(Q || softmax(z / tau))``; ``Q`` never carries a gradient.
Targets are computed with autocast disabled, so they are float32 (and computed in float32) under AMP.

:func:`random_walk_log_probs` is the Table 16 baseline: the same propagation, differentiable, whose result is
supervised with the hard labels instead of serving as a distillation target.

:class:`BakeTask` packages this as a ``timm.task.TrainingTask``: its trainable module (:class:`BakeModel`) returns
logits and pre-logits from one forward pass, while evaluation, EMA and checkpoints see the plain timm model.
"""
import contextlib
import logging
from typing import Iterator, Optional

import torch
import torch.nn.functional as F

_logger = logging.getLogger(__name__)

KNOWLEDGE_TYPES = ('preds', 'labels')


def _check_omega(omega: float, one_step: bool) -> float:
    omega = float(omega)
    if not 0.0 <= omega <= 1.0:
        raise ValueError(f'BAKE omega (--bake-omega) must lie in [0, 1], got {omega}')
    if omega == 1.0 and not one_step:
        raise ValueError(
            'BAKE omega (--bake-omega) = 1 makes (I - omega A) singular and drops the sample\'s own prediction; '
            'the paper uses the one-step form for omega = 1: add --bake-one-step (one_step=True)')
    return omega


_SINGLE_THREAD_MAX_N = 256


@contextlib.contextmanager
def _single_thread_if_small(device: torch.device, n: int) -> Iterator[None]:
    """Run tiny CPU linear algebra on one intra-op thread.

    For a batch of a few hundred samples every op here takes microseconds; OpenMP/MKL fork-join costs more than it
    saves and, on a shared machine, waiting for a second busy core can stall each op for a scheduler time slice.
    """
    threads = torch.get_num_threads()
    if device.type != 'cpu' or n > _SINGLE_THREAD_MAX_N or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def bake_targets(
        features: torch.Tensor,
        logits: torch.Tensor,
        omega: float = 0.5,
        temperature: float = 4.0,
        one_step: bool = False,
        knowledge: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Batch-knowledge-ensembled soft targets ``Q`` (float32, detached, rows sum to 1).

    Args:
        features: pooled pre-logit features ``(N, D)``; L2-normalised here.
        logits: class logits ``(N, K)``; ``P = softmax(logits / temperature)`` unless ``knowledge`` is given.
        omega: propagation/ensembling weight in ``[0, 1]``; ``0`` returns ``P``.
        temperature: softmax temperature ``tau`` (> 0).
        one_step: use the one-step form ``omega A P + (1 - omega) P`` instead of the closed form.
            Required when ``omega == 1`` (a ``ValueError`` is raised otherwise, nothing is switched silently).
        knowledge: optional ``(N, K)`` distributions used as ``P`` instead of the predictions
            (one-hot or mixup/cutmix soft labels for the ``labels`` ablation); rows should sum to 1.

    Returns:
        ``(N, K)`` float32 tensor. With ``N == 1`` there is no other sample to ensemble and ``Q = P``.
    """
    omega = _check_omega(omega, one_step)
    if temperature <= 0:
        raise ValueError(f'BAKE temperature (--bake-temp) must be > 0, got {temperature}')
    if features.ndim != 2 or logits.ndim != 2:
        raise ValueError(
            f'bake_targets expects features (N, D) and logits (N, K), got {tuple(features.shape)} and '
            f'{tuple(logits.shape)}')
    n = features.shape[0]
    if logits.shape[0] != n:
        raise ValueError(f'bake_targets: {n} feature rows but {logits.shape[0]} logit rows')
    if knowledge is not None and tuple(knowledge.shape) != tuple(logits.shape):
        raise ValueError(
            f'bake_targets: knowledge must have the logits\' shape {tuple(logits.shape)}, got {tuple(knowledge.shape)}')

    with torch.no_grad(), _no_autocast(features.device), _single_thread_if_small(features.device, n):
        if knowledge is not None:
            p = knowledge.detach().float()
        else:
            p = torch.softmax(logits.detach().float() / temperature, dim=1)
        if n == 1 or omega == 0.0:
            return p.clone() if knowledge is not None else p
        affinity = _affinity(features.detach())
        if one_step:
            q = torch.addmm(p, affinity, p, beta=1.0 - omega, alpha=omega)
        else:
            # (I - omega A) Q' = P, Q = (1 - omega) Q'. The matrix is strictly diagonally dominant for omega < 1
            # (A is row-stochastic with zero diagonal), so the solve is well conditioned.
            system = affinity.mul_(-omega)
            system.diagonal().add_(1.0)
            q = torch.linalg.solve(system, p).mul_(1.0 - omega)
    return q


def _no_autocast(device: torch.device):
    """Autocast off for ``device``'s type: the matmuls and the solve run in float32 even inside ``torch.autocast``."""
    return torch.autocast(device_type=device.type, enabled=False)


def _affinity(features: torch.Tensor) -> torch.Tensor:
    """Row-softmax of the cosine similarities with the diagonal excluded (Eq. 3-4), float32."""
    f = F.normalize(features.float(), p=2.0, dim=1)
    affinity = f @ f.t()
    affinity = affinity.masked_fill(torch.eye(f.shape[0], dtype=torch.bool, device=f.device), float('-inf'))
    return torch.softmax(affinity, dim=1)


def random_walk_log_probs(
        features: torch.Tensor,
        logits: torch.Tensor,
        omega: float = 0.5,
        temperature: float = 4.0,
        eps: float = 1e-12,
) -> torch.Tensor:
    """``log Q`` of the random-walk propagation ``Q = (1 - omega) (I - omega A)^-1 softmax(z / tau)``, with gradient.

    BAKE Table 16 compares with random-walk aggregation of predictions ([2, 61] there), which "use the original hard
    labels for supervision": the propagated predictions are the output that a hard-label loss trains, so the gradient
    flows through both the affinities ``A`` and the predictions ``P`` (unlike BAKE, whose targets are constants).
    ``omega < 1`` is required. Computed in float32 with autocast disabled; rows of ``Q`` sum to 1.
    """
    omega = _check_omega(omega, one_step=False)
    if temperature <= 0:
        raise ValueError(f'random walk temperature (--bake-temp) must be > 0, got {temperature}')
    n = features.shape[0]
    with _no_autocast(features.device):
        p = torch.softmax(logits.float() / temperature, dim=1)
        if n == 1 or omega == 0.0:
            return torch.log(p.clamp_min(eps))
        system = torch.eye(n, device=p.device) - omega * _affinity(features)
        q = torch.linalg.solve(system, p) * (1.0 - omega)
        return torch.log(q.clamp_min(eps))


def bake_loss(logits: torch.Tensor, q: torch.Tensor, temperature: float) -> torch.Tensor:
    """``tau^2 * KL(Q || softmax(logits / tau))``, batch mean, computed in float32.

    The gradient reaches ``logits`` only through the student's log-softmax; ``q`` is treated as a constant.
    """
    with _no_autocast(logits.device):
        log_p = F.log_softmax(logits.float() / temperature, dim=1)
        return F.kl_div(log_p, q.detach().float(), reduction='batchmean') * (temperature ** 2)


