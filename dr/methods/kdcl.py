"""KDCL (Guo et al., "Online Knowledge Distillation via Collaborative Learning", CVPR 2020) as ``train.py --method
kdcl``.

Two students (``--model`` and ``--kdcl-model``) are trained together from scratch; on every batch their logits are
ensembled into a soft target ``z_e`` that is distilled into each of them:

    loss = sum_m [ CE(z_m, y) + w T^2 KL(softmax(z_e / T) || softmax(z_m / T)) ]     (z_e detached)

Ensembles (``--kdcl-ensemble``):

* ``minlogit`` (KDCL-MinLogit, default): each student's logits minus its own ground-truth logit, ``z_m - z_m[y]``
  (so the ground-truth class sits at 0 for every student), then the element-wise minimum over the students.
* ``naive`` (KDCL-Naive): per sample, the logits of the student with the lowest cross-entropy.

With soft targets (mixup / cutmix) the ground truth of both ensembles is the target's arg-max. Both students share
one optimizer (train.py builds it on ``task.optimizer_module``) and see the same augmented batch (the paper gives
each student its own augmentation of the image; this project does not). The main student is the run's model (eval,
EMA, checkpoint ``state_dict``); the second one travels in ``task_state`` (resume) and is written to
``kdcl_peer.pth.tar`` in the output folder when the run ends (loads into ``timm.create_model(--kdcl-model)``).
"""
import argparse
import logging
import os
from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm import create_model

from dr.io import atomic_write

from .common import OptimizerView, PlainModelTask, check_positive, soft_kl, unwrap

_logger = logging.getLogger(__name__)

ENSEMBLES = ('minlogit', 'naive')
PEER_FILE = 'kdcl_peer.pth.tar'


def hard_labels(target: torch.Tensor) -> torch.Tensor:
    """Class indices of hard or soft (mixup) targets."""
    return target.argmax(dim=1) if target.ndim == 2 else target


def ensemble_logits(logits: Sequence[torch.Tensor], target: torch.Tensor, ensemble: str = 'minlogit') -> torch.Tensor:
    """KDCL's ensembled soft target (module docstring) of the students' ``logits``; detached."""
    y = hard_labels(target)
    stacked = torch.stack([z.detach().float() for z in logits])  # (M, B, C)
    if ensemble == 'minlogit':
        gt = stacked.gather(2, y.view(1, -1, 1).expand(stacked.shape[0], -1, 1))
        return (stacked - gt).min(dim=0).values
    if ensemble == 'naive':
        ce = torch.stack([F.cross_entropy(z, y, reduction='none') for z in stacked])  # (M, B)
        best = ce.argmin(dim=0)
        return stacked[best, torch.arange(stacked.shape[1], device=stacked.device)]
    raise ValueError(f'--kdcl-ensemble {ensemble!r}: choose from {ENSEMBLES}')


def kdcl_loss(criterion, logits: Sequence[torch.Tensor], target: torch.Tensor, ensemble: str, temperature: float,
              weight: float) -> Dict[str, torch.Tensor]:
    """KDCL's loss (module docstring) and its parts ``loss_ce`` / ``loss_kd`` (sums over the students) and
    ``loss_ce_peer`` (the second student's CE)."""
    z_e = ensemble_logits(logits, target, ensemble)
    ces = [criterion(z, target) for z in logits]
    kd = sum(soft_kl(z, z_e, temperature) for z in logits)
    ce = sum(ces)
    return {'loss': ce + weight * kd, 'loss_ce': ce.detach(), 'loss_kd': kd.detach(), 'loss_ce_peer': ces[1].detach()}


class KdclModel(nn.Module):
    """The two students; ``forward`` returns both students' logits."""

    def __init__(self, model: nn.Module, peer: nn.Module):
        super().__init__()
        self.model = model
        self.peer = peer

    def forward(self, x: torch.Tensor):
        return self.model(x), self.peer(x)


class KdclTask(PlainModelTask):
    """``timm.task`` task for KDCL; ``forward`` returns ``{'loss', 'output', 'loss_ce', 'loss_kd',
    'loss_ce_peer'}`` (``output``: the main student's logits)."""

    def __init__(self, model: nn.Module, peer: nn.Module, criterion: nn.Module, ensemble: str = 'minlogit',
                 temperature: float = 1.0, weight: float = 1.0, peer_arch: str = '',
                 device: Optional[torch.device] = None, verbose: bool = True):
        super().__init__(device=device, verbose=verbose)
        if ensemble not in ENSEMBLES:
            raise ValueError(f'--kdcl-ensemble {ensemble!r}: choose from {ENSEMBLES}')
        self.ensemble = ensemble
        self.temperature = check_positive(temperature, '--kdcl-temp')
        self.weight = check_positive(weight, '--kdcl-weight', allow_zero=True)
        self.peer_arch = peer_arch
        self.trainable_module = KdclModel(model, peer)
        self.optimizer_module = OptimizerView({'model': model, 'peer': peer})
        self.criterion = criterion.to(self.device) if isinstance(criterion, nn.Module) else criterion
        if verbose:
            _logger.info(f'KdclTask: second student {peer_arch or type(peer).__name__}, ensemble {ensemble}, '
                         f'T={self.temperature} weight={self.weight}')

    @property
    def peer(self) -> nn.Module:
        return unwrap(unwrap(self.trainable_module).peer)

    def get_task_state(self, module: Optional[nn.Module] = None, ema: bool = False) -> Dict[str, Any]:
        """The second student (outside ``state_dict``, which is the main student's)."""
        return {} if ema else {'kdcl_peer': self.peer.state_dict(), 'kdcl_peer_arch': self.peer_arch}

    def load_task_state(self, state: Optional[Dict[str, Any]], strict: bool = True,
                        module: Optional[nn.Module] = None, ema: bool = False) -> None:
        if ema:
            return
        if not state or 'kdcl_peer' not in state:
            _logger.warning('KDCL: the checkpoint holds no second student (task_state kdcl_peer); it starts afresh')
            return
        self.peer.load_state_dict(state['kdcl_peer'], strict=strict)

    def save_outputs(self, output_dir: str) -> str:
        """Write the second student as a plain timm checkpoint (``arch``, ``state_dict``) next to the run's."""
        path = os.path.join(output_dir, PEER_FILE)
        with atomic_write(path) as f:
            torch.save({'arch': self.peer_arch, 'state_dict': self.peer.state_dict()}, f)
        _logger.info(f'KDCL: second student ({self.peer_arch}) written to {path}')
        return path

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        logits = self.trainable_module(input)
        out = kdcl_loss(self.criterion, logits, target, self.ensemble, self.temperature, self.weight)
        out['output'] = logits[0]
        return out


def create_peer(args: argparse.Namespace, device: torch.device) -> nn.Module:
    """The second student ``--kdcl-model`` (fresh weights, the run's classes and input channels)."""
    kwargs = {'in_chans': args.in_chans} if args.in_chans is not None else {}
    try:
        peer = create_model(args.kdcl_model, num_classes=args.num_classes, **kwargs)
    except RuntimeError as e:
        raise ValueError(f'--kdcl-model {args.kdcl_model!r}: {e}') from None
    peer.to(device)
    if getattr(args, 'channels_last', False):
        peer.to(memory_format=torch.channels_last)
    return peer


def create_task(args: argparse.Namespace, model: nn.Module, criterion: nn.Module, device: torch.device) -> KdclTask:
    """``train.py --method kdcl``."""
    return KdclTask(model, create_peer(args, device), criterion, ensemble=args.kdcl_ensemble,
                    temperature=args.kdcl_temp, weight=args.kdcl_weight, peer_arch=args.kdcl_model, device=device,
                    verbose=args.rank == 0)
