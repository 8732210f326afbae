"""Tf-KD_reg (Yuan et al., "Revisiting Knowledge Distillation via Label Smoothing Regularization", CVPR 2020): a
teacher-free regularizer, the KL to a manually designed *virtual teacher* that puts probability ``a`` on the correct
class and spreads ``1 - a`` uniformly over the others.

``loss = (1 - alpha) * CE(z, y) + alpha * KL(p^d_T || softmax(z))`` with ``p^d_T = softmax(p^d / T)``: the authors'
code (github.com/yuanli2333/Teacher-free-Knowledge-Distillation, ``my_loss_function.py``,
``loss_kd_regularization``) softens the virtual teacher's *probabilities* with ``T`` and leaves the student at
temperature 1. Their KL is ``nn.KLDivLoss()``'s mean over all N x K entries times a ``multiplier`` of 100 on
CIFAR-100's 100 classes, i.e. the per-sample KL (summed over classes) averaged over the batch, which is what
:func:`tfkd_reg_loss` computes. Tf-KD_self (a trained copy of the student as teacher) needs no method of its own:
``train.py --kd-teacher MODEL=CKPT`` (docs/methods.md).
"""
import argparse
import logging
from typing import Callable, Dict, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.task import ClassificationTask

_logger = logging.getLogger(__name__)


def virtual_teacher(target: torch.Tensor, num_classes: int, correct_prob: float) -> torch.Tensor:
    """``p^d``: ``correct_prob`` on the label, ``(1 - correct_prob) / (K - 1)`` on every other class; (N, K)."""
    if num_classes < 2:
        raise ValueError(f'Tf-KD_reg needs at least 2 classes, got {num_classes}')
    rest = (1.0 - correct_prob) / (num_classes - 1)
    p = torch.full((target.shape[0], num_classes), rest, device=target.device)
    return p.scatter_(1, target.long().view(-1, 1), correct_prob)


def tfkd_reg_loss(logits: torch.Tensor, target: torch.Tensor, temperature: float, correct_prob: float) -> torch.Tensor:
    """``KL(softmax(p^d / T) || softmax(logits))``, summed over classes, mean over the batch."""
    teacher = F.softmax(virtual_teacher(target, logits.shape[1], correct_prob) / temperature, dim=1)
    return F.kl_div(F.log_softmax(logits.float(), dim=1), teacher, reduction='batchmean')


class TfKdRegTask(ClassificationTask):
    """``loss = (1 - alpha) * criterion(z, y) + alpha * tfkd_reg_loss``; returns ``loss_ce`` and ``loss_tfkd`` too.

    Args:
        model: the timm model.
        criterion: the hard-label loss (``nn.CrossEntropyLoss()`` when None).
        alpha: weight of the virtual-teacher term (``--tfkd-alpha``).
        temperature: softening of the virtual teacher (``--tfkd-temp``).
        correct_prob: ``a``, the virtual teacher's correct-class probability (``--tfkd-correct-prob``).
    """

    def __init__(self, model: nn.Module, criterion: Optional[Union[nn.Module, Callable]] = None, alpha: float = 0.1,
                 temperature: float = 20.0, correct_prob: float = 0.9, device: Optional[torch.device] = None,
                 verbose: bool = True):
        super().__init__(model, criterion=criterion or nn.CrossEntropyLoss(), device=device, verbose=verbose)
        if not 0.0 <= alpha <= 1.0 or not 0.0 <= correct_prob <= 1.0 or temperature <= 0:
            raise ValueError(f'Tf-KD_reg: alpha and correct_prob must lie in [0, 1] and the temperature be > 0, got '
                             f'alpha={alpha} correct_prob={correct_prob} temperature={temperature}')
        self.alpha, self.temperature, self.correct_prob = float(alpha), float(temperature), float(correct_prob)
        if verbose:
            _logger.info(f'TfKdRegTask: alpha={alpha} temperature={temperature} correct_prob={correct_prob}')

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        if target.ndim != 1:
            raise ValueError(f'--method tfkd needs class-index targets (N,), got shape {tuple(target.shape)} '
                             f'(mixup/cutmix soft targets have no correct class)')
        logits = self.trainable_module(input)
        loss_ce = self.criterion(logits, target)
        loss_tfkd = tfkd_reg_loss(logits, target, self.temperature, self.correct_prob)
        loss = (1.0 - self.alpha) * loss_ce + self.alpha * loss_tfkd
        return {'loss': loss, 'output': logits, 'loss_ce': loss_ce.detach(), 'loss_tfkd': loss_tfkd.detach()}


def create_task(args: argparse.Namespace, model: nn.Module, criterion: nn.Module, device: torch.device) -> TfKdRegTask:
    """``--method tfkd``."""
    return TfKdRegTask(model, criterion=criterion, alpha=args.tfkd_alpha, temperature=args.tfkd_temp,
                       correct_prob=args.tfkd_correct_prob, device=device, verbose=args.rank == 0)
