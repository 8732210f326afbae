"""DDGSD (Xu & Liu, "Data-Distortion Guided Self-Distillation for Deep Neural Networks", AAAI 2019): two differently
distorted views of every training image go through the same network; each view is trained with the cross-entropy
and the two predictions are pulled together by a symmetric KL, optionally with a maximum mean discrepancy (MMD)
between the two views' feature batches.

``loss = CE(z1, y) + CE(z2, y) + lambda * T^2 * [KL(sg(p2) || p1) + KL(sg(p1) || p2)] + mu * MMD(f1, f2)``

with ``p_v = softmax(z_v / T)``, ``sg`` a stop-gradient (each view is the other's target) and the linear-kernel MMD
``||mean(f1) - mean(f2)||^2`` of the pooled pre-logit features. The two views are the training transform applied
twice with independent random draws (crop, flip, colour, ... as configured). The paper itself is not available
here; the defaults (lambda 1, T 1, mu 0 = MMD off) are neutral choices, not the paper's numbers (docs/methods.md).
"""
import argparse
import logging
from typing import Callable, Dict, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..bake.task import BakeTask

_logger = logging.getLogger(__name__)


class TwoViewTransform:
    """``transform`` applied twice to one image, stacked: (2, C, H, W)."""

    def __init__(self, transform: Callable):
        self.transform = transform

    def __call__(self, img) -> torch.Tensor:
        return torch.stack([self.transform(img), self.transform(img)])

    def __repr__(self) -> str:
        return f'TwoViewTransform({self.transform!r})'


def symmetric_kl(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * [KL(sg(p2) || p1) + KL(sg(p1) || p2)]``, summed over classes, mean over the batch."""
    t = temperature
    log1, log2 = F.log_softmax(z1.float() / t, dim=1), F.log_softmax(z2.float() / t, dim=1)
    kl12 = F.kl_div(log1, log2.detach(), reduction='batchmean', log_target=True)
    kl21 = F.kl_div(log2, log1.detach(), reduction='batchmean', log_target=True)
    return (kl12 + kl21) * t ** 2


def linear_mmd(f1: torch.Tensor, f2: torch.Tensor) -> torch.Tensor:
    """Linear-kernel MMD ``||mean(f1) - mean(f2)||^2`` of two (N, D) feature batches."""
    return (f1.float().mean(dim=0) - f2.float().mean(dim=0)).pow(2).sum()


class DdgsdTask(BakeTask):
    """DDGSD on two-view batches ``(N, 2, C, H, W)``; returns ``loss``, ``output`` (the first view's logits),
    ``loss_ce`` (both views), ``loss_ddgsd`` (the symmetric KL) and ``loss_mmd``.

    Reuses :class:`BakeTask`'s model plumbing (a :class:`~dr.bake.task.BakeModel` gives logits and pre-logit
    features from one forward pass; eval, EMA and checkpoints see the plain timm model).

    Args:
        model: the timm model.
        criterion: the per-view hard-label loss (``nn.CrossEntropyLoss()`` when None).
        weight: lambda, weight of the symmetric KL (``--ddgsd-weight``).
        temperature: T (``--ddgsd-temp``).
        mmd_weight: mu, weight of the linear MMD (``--ddgsd-mmd-weight``).
    """

    def __init__(self, model: nn.Module, criterion: Optional[Union[nn.Module, Callable]] = None, weight: float = 1.0,
                 temperature: float = 1.0, mmd_weight: float = 0.0, device: Optional[torch.device] = None,
                 verbose: bool = True):
        super().__init__(model, criterion=criterion, device=device, verbose=False)
        if weight < 0 or temperature <= 0 or mmd_weight < 0:
            raise ValueError(f'DDGSD: weight and mmd_weight must be >= 0 and temperature > 0, got {weight}, '
                             f'{mmd_weight}, {temperature}')
        self.weight, self.temperature, self.mmd_weight = float(weight), float(temperature), float(mmd_weight)
        self.verbose = verbose
        if verbose:
            _logger.info(f'DdgsdTask: weight={weight} temperature={temperature} mmd_weight={mmd_weight} '
                         f'criterion={type(self.criterion).__name__}')

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        if input.ndim != 5 or input.shape[1] != 2:
            raise ValueError(f'--method ddgsd needs two-view batches (N, 2, C, H, W), got {tuple(input.shape)}: its '
                             f'transform (dr.methods.ddgsd.TwoViewTransform) was not applied')
        n = input.shape[0]
        logits, feats = self.trainable_module(torch.cat([input[:, 0], input[:, 1]]))
        z1, z2 = logits[:n], logits[n:]
        loss_ce = self.criterion(z1, target) + self.criterion(z2, target)
        loss_kl = symmetric_kl(z1, z2, self.temperature)
        loss_mmd = linear_mmd(feats[:n], feats[n:])
        loss = loss_ce + self.weight * loss_kl + self.mmd_weight * loss_mmd
        return {'loss': loss, 'output': z1, 'loss_ce': loss_ce.detach(), 'loss_ddgsd': loss_kl.detach(),
                'loss_mmd': loss_mmd.detach()}


def wrap_train_data(args: argparse.Namespace, dataset: Dataset, transform: Callable):
    """Every training image becomes two independently augmented views."""
    return dataset, TwoViewTransform(transform)


def create_task(args: argparse.Namespace, model: nn.Module, criterion: nn.Module, device: torch.device) -> DdgsdTask:
    """``--method ddgsd``."""
    return DdgsdTask(model, criterion=criterion, weight=args.ddgsd_weight, temperature=args.ddgsd_temp,
                     mmd_weight=args.ddgsd_mmd_weight, device=device, verbose=args.rank == 0)
