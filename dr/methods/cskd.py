"""CS-KD (Yun et al., "Regularizing Class-wise Predictions via Self-knowledge Distillation", CVPR 2020): every image
is paired with another image of its class, and its temperature-softened prediction is pulled towards the (detached)
prediction of that class mate.

``loss = CE(z(x), y) + lambda_cls * T^2 * KL(softmax(z(x') / T) || softmax(z(x) / T))``, as the authors' code
(github.com/alinlab/cs-kd ``train.py``: ``KDLoss``, summed KL / N times T^2): the cross-entropy is taken on the
anchors only, and the class mates go through the network in a second forward pass without gradient (train mode, so
their batch still updates the BN statistics). The pairs come from this project's class-aware sampler
(``--class-aware-intra 1``: every batch is ``[anchor, mate, anchor, mate, ...]``, each image an anchor once per
epoch), as the authors' ``PairBatchSampler`` gives every sampled image one random image of its class.
"""
import argparse
import logging
from typing import Callable, Dict, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.task import ClassificationTask

_logger = logging.getLogger(__name__)


def cskd_loss(logits: torch.Tensor, mate_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(softmax(mate / T) || softmax(logits / T))``, summed over classes, mean over the pairs."""
    log_p = F.log_softmax(logits.float() / temperature, dim=1)
    q = F.softmax(mate_logits.detach().float() / temperature, dim=1)
    return F.kl_div(log_p, q, reduction='batchmean') * temperature ** 2


def split_pairs(input: torch.Tensor, target: torch.Tensor):
    """``(anchors, mates, anchor targets, mate targets)`` from a class-aware batch ``[a0, m0, a1, m1, ...]``."""
    if input.shape[0] % 2:
        raise ValueError(f'CS-KD needs batches of (anchor, class mate) pairs, got {input.shape[0]} images')
    return input[0::2], input[1::2], target[0::2], target[1::2]


class CsKdTask(ClassificationTask):
    """CS-KD on (anchor, class mate) pairs; returns ``loss``, ``output`` (the anchors' logits), ``loss_ce``,
    ``loss_cskd``.

    Args:
        model: the timm model.
        criterion: the anchors' hard-label loss (``nn.CrossEntropyLoss()`` when None).
        temperature: ``T`` (``--cskd-temp``).
        weight: ``lambda_cls`` (``--cskd-weight``).
    """

    def __init__(self, model: nn.Module, criterion: Optional[Union[nn.Module, Callable]] = None,
                 temperature: float = 4.0, weight: float = 1.0, device: Optional[torch.device] = None,
                 verbose: bool = True):
        super().__init__(model, criterion=criterion or nn.CrossEntropyLoss(), device=device, verbose=verbose)
        if temperature <= 0 or weight < 0:
            raise ValueError(f'CS-KD: temperature must be > 0 and weight >= 0, got {temperature}, {weight}')
        self.temperature, self.weight = float(temperature), float(weight)
        self._checked = False
        if verbose:
            _logger.info(f'CsKdTask: temperature={temperature} weight={weight}')

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        anchors, mates, y, y_mates = split_pairs(input, target)
        if not self._checked and target.ndim == 1:  # the sampler's layout, checked on the first batch
            if not torch.equal(y, y_mates):
                raise ValueError('CS-KD: the batch is not made of (anchor, same-class mate) pairs; train with '
                                 '--class-aware-intra 1 and without mixup/cutmix')
            self._checked = True
        logits = self.trainable_module(anchors)
        with torch.no_grad():
            mate_logits = self.trainable_module(mates)
        loss_ce = self.criterion(logits, y)
        loss_cskd = cskd_loss(logits, mate_logits, self.temperature)
        loss = loss_ce + self.weight * loss_cskd
        return {'loss': loss, 'output': logits, 'loss_ce': loss_ce.detach(), 'loss_cskd': loss_cskd.detach()}


def create_task(args: argparse.Namespace, model: nn.Module, criterion: nn.Module, device: torch.device) -> CsKdTask:
    """``--method cskd``."""
    return CsKdTask(model, criterion=criterion, temperature=args.cskd_temp, weight=args.cskd_weight, device=device,
                    verbose=args.rank == 0)
