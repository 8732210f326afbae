"""Calibration metrics on the top-1 confidence: ECE, MCE, NLL and reliability diagrams.

Conventions (Guo et al. 2017, "On Calibration of Modern Neural Networks"):

* the confidence of a sample is its largest class probability, the prediction its arg-max;
* ``n_bins`` (15) equal-width bins over [0, 1]; bin ``b`` holds confidences in ``(b / n, (b + 1) / n]``, a confidence of
  exactly 0 goes to the first bin and exactly 1.0 to the last one;
* ECE = sum over bins of ``|bin| / N * |accuracy(bin) - mean confidence(bin)|``; empty bins contribute nothing;
* MCE = the largest ``|accuracy(bin) - mean confidence(bin)|`` over non-empty bins;
* NLL = mean of ``-log p(target)``.

All three are returned as plain fractions / nats (ECE 0.05 means 5%).
"""
import logging
from typing import Dict, Optional, Tuple, Union

import numpy as np
import torch

_logger = logging.getLogger(__name__)

ArrayLike = Union[torch.Tensor, np.ndarray]
DEFAULT_BINS = 15
NLL_EPS = 1e-12  # probabilities are clamped to this before the log in negative_log_likelihood


def _as_tensor(x: ArrayLike, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    t = t.detach().cpu()
    return t.to(dtype) if dtype is not None else t


def _check_probs(probs: torch.Tensor, targets: torch.Tensor) -> None:
    if probs.ndim != 2:
        raise ValueError(f'probs must be 2-D [N, K], got shape {tuple(probs.shape)}')
    if targets.ndim != 1 or targets.shape[0] != probs.shape[0]:
        raise ValueError(f'targets must be 1-D with {probs.shape[0]} entries, got shape {tuple(targets.shape)}')
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= probs.shape[1]):
        raise ValueError(f'targets must lie in [0, {probs.shape[1] - 1}]')


def confidences_and_correct(probs: ArrayLike, targets: ArrayLike) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-1 confidence (float64) and whether the top-1 prediction is right (bool) per sample."""
    p = _as_tensor(probs, torch.float64)
    t = _as_tensor(targets, torch.long)
    _check_probs(p, t)
    conf, pred = p.max(dim=1)
    return conf, pred.eq(t)


def bin_indices(confidences: ArrayLike, n_bins: int = DEFAULT_BINS) -> torch.Tensor:
    """Bin of each confidence: ``(lo, hi]`` intervals, 0 in the first bin, 1.0 in the last."""
    if n_bins < 1:
        raise ValueError(f'n_bins must be >= 1, got {n_bins}')
    conf = _as_tensor(confidences, torch.float64)
    inner = torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64)[1:-1]
    # searchsorted(side='left') counts the inner edges strictly below each value: an edge value stays in the bin
    # it closes, which is exactly the (lo, hi] convention.
    return torch.searchsorted(inner, conf.contiguous(), right=False).clamp_(0, n_bins - 1)


def bin_sums(confidences: ArrayLike, correct: ArrayLike, n_bins: int = DEFAULT_BINS
             ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-bin (count, sum of confidences, number correct); sums of several sets can be added and pooled."""
    conf = _as_tensor(confidences, torch.float64).reshape(-1)
    corr = _as_tensor(correct, torch.float64).reshape(-1)
    if conf.shape != corr.shape:
        raise ValueError(f'confidences ({conf.numel()}) and correct ({corr.numel()}) differ in length')
    idx = bin_indices(conf, n_bins)
    count = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, torch.ones_like(conf))
    conf_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, conf)
    corr_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, corr)
    return count.numpy().astype(np.int64), conf_sum.numpy(), corr_sum.numpy()


def calibration_bins(confidences: ArrayLike, correct: ArrayLike, n_bins: int = DEFAULT_BINS
                     ) -> Dict[str, np.ndarray]:
    """Per-bin statistics.

    Returns:
        dict with ``count`` (int), ``confidence`` (mean confidence, NaN when empty), ``accuracy`` (NaN when empty),
        ``lower`` and ``upper`` bin edges.
    """
    return bins_from_sums(*bin_sums(confidences, correct, n_bins))


def bins_from_sums(count: ArrayLike, conf_sum: ArrayLike, correct_sum: ArrayLike) -> Dict[str, np.ndarray]:
    """``calibration_bins`` from per-bin sums (``bin_sums``, possibly pooled over sets)."""
    count = np.asarray(count, dtype=np.int64)
    with np.errstate(invalid='ignore', divide='ignore'):
        mean_conf = np.asarray(conf_sum, dtype=np.float64) / count
        acc = np.asarray(correct_sum, dtype=np.float64) / count
    edges = np.linspace(0.0, 1.0, len(count) + 1)
    return {'count': count, 'confidence': mean_conf, 'accuracy': acc, 'lower': edges[:-1], 'upper': edges[1:]}


def ece_from_sums(count: ArrayLike, conf_sum: ArrayLike, correct_sum: ArrayLike) -> float:
    """ECE from per-bin sums (NaN for no samples)."""
    bins = bins_from_sums(count, conf_sum, correct_sum)
    total = bins['count'].sum()
    if total == 0:
        return float('nan')
    nz = bins['count'] > 0
    gaps = np.abs(bins['accuracy'][nz] - bins['confidence'][nz])
    return float(np.sum(bins['count'][nz] / total * gaps))


def mce_from_sums(count: ArrayLike, conf_sum: ArrayLike, correct_sum: ArrayLike) -> float:
    """MCE from per-bin sums (NaN for no samples)."""
    bins = bins_from_sums(count, conf_sum, correct_sum)
    nz = bins['count'] > 0
    if not nz.any():
        return float('nan')
    return float(np.max(np.abs(bins['accuracy'][nz] - bins['confidence'][nz])))


def ece_from_confidences(confidences: ArrayLike, correct: ArrayLike, n_bins: int = DEFAULT_BINS) -> float:
    """ECE from per-sample top-1 confidences and correctness (NaN for no samples)."""
    return ece_from_sums(*bin_sums(confidences, correct, n_bins))


def mce_from_confidences(confidences: ArrayLike, correct: ArrayLike, n_bins: int = DEFAULT_BINS) -> float:
    """MCE from per-sample top-1 confidences and correctness (NaN for no samples)."""
    return mce_from_sums(*bin_sums(confidences, correct, n_bins))


def expected_calibration_error(probs: ArrayLike, targets: ArrayLike, n_bins: int = DEFAULT_BINS) -> float:
    """Expected calibration error of class probabilities, a fraction in [0, 1].

    Args:
        probs: [N, K] class probabilities (rows sum to 1).
        targets: [N] integer labels.
        n_bins: number of equal-width confidence bins (15 as in Guo et al. 2017).
    """
    conf, correct = confidences_and_correct(probs, targets)
    return ece_from_confidences(conf, correct, n_bins)


def maximum_calibration_error(probs: ArrayLike, targets: ArrayLike, n_bins: int = DEFAULT_BINS) -> float:
    """Maximum calibration error (largest gap over non-empty bins), a fraction in [0, 1]."""
    conf, correct = confidences_and_correct(probs, targets)
    return mce_from_confidences(conf, correct, n_bins)


def negative_log_likelihood(probs: ArrayLike, targets: ArrayLike) -> float:
    """Mean ``-log p(target)`` in nats; probabilities are clamped to ``NLL_EPS`` first.

    The evaluation loop computes NLL from logits (``log_softmax``), which needs no clamp.
    """
    p = _as_tensor(probs, torch.float64)
    t = _as_tensor(targets, torch.long)
    _check_probs(p, t)
    if t.numel() == 0:
        return float('nan')
    picked = p.gather(1, t[:, None]).squeeze(1).clamp_min(NLL_EPS)
    return float(-picked.log().mean())
