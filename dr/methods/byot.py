"""BYOT (Zhang et al., "Be Your Own Teacher: Improve the Performance of Convolutional Neural Networks via Self
Distillation", ICCV 2019) as ``train.py --method byot``.

The network is cut into its stages (timm's ``feature_info`` / ``forward_intermediates``); each intermediate stage gets
a shallow classifier: a bottleneck (stride-2 3x3 conv-BN-ReLU blocks down to the deepest stage's resolution and
channels, or a 1x1 conv-BN-ReLU where the resolution already matches), global average pooling (the shallow feature
``F_i``, projected to the deepest classifier's pre-logit width where that differs) and a linear classifier. With
the deepest classifier's logits ``z_C`` and pre-logit features ``F_C`` the loss is (BYOT's three sources of
supervision):

    loss = CE(z_C, y) + sum_i [ (1 - alpha) CE(z_i, y) + alpha T^2 KL(softmax(z_C / T) || softmax(z_i / T))
                                + lambda ||F_i - F_C||_2^2 ]

``z_C`` and ``F_C`` are targets (detached): the deepest classifier learns from the labels only, as in the paper.
CE is train.py's criterion (label smoothing / mixup soft targets apply to every classifier). The T^2 factor is
Hinton et al.'s gradient scaling (this project's choice). The shallow classifiers are training-only: evaluation,
EMA and the checkpoint's ``state_dict`` are the plain timm model; the heads travel in ``task_state`` for resume.
"""
import argparse
import logging
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from .common import OptimizerView, PlainModelTask, check_positive, soft_kl, unwrap

_logger = logging.getLogger(__name__)


def default_stages(feature_info: Sequence[Dict[str, Any]]) -> List[int]:
    """Every stage but the deepest, skipping a stride-2 stem: ResNet -> layer1-3 (BYOT's 3 classifiers)."""
    return [i for i, f in enumerate(feature_info[:-1]) if int(f['reduction']) > 2 or len(feature_info) <= 2]


class ShallowClassifier(nn.Module):
    """Bottleneck + pooling + linear classifier on one intermediate stage; ``forward`` returns (logits, feature)."""

    def __init__(self, in_chs: int, reduction: int, out_chs: int, out_reduction: int, feature_dim: int,
                 num_classes: int):
        super().__init__()
        steps = max(0, (int(out_reduction) // max(1, int(reduction))).bit_length() - 1)
        layers: List[nn.Module] = []
        chs = in_chs
        if steps == 0:
            layers += [nn.Conv2d(chs, out_chs, 1, bias=False), nn.BatchNorm2d(out_chs), nn.ReLU(inplace=True)]
        for step in range(steps):
            nxt = out_chs if step == steps - 1 else min(out_chs, chs * 2)
            layers += [nn.Conv2d(chs, nxt, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(nxt),
                       nn.ReLU(inplace=True)]
            chs = nxt
        self.bottleneck = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.proj = nn.Identity() if feature_dim == out_chs else nn.Linear(out_chs, feature_dim)
        self.fc = nn.Linear(feature_dim, num_classes)

    def forward(self, x: torch.Tensor):
        feat = self.proj(self.pool(self.bottleneck(x)).flatten(1))
        return self.fc(feat), feat


class ByotModel(nn.Module):
    """A timm model plus its shallow classifiers; ``forward`` -> (logits, pre_logits, [shallow logits], [features])."""

    def __init__(self, model: nn.Module, num_classes: int, stages: Optional[Sequence[int]] = None):
        super().__init__()
        inner = unwrap(model)
        info = getattr(inner, 'feature_info', None)
        if not info or not callable(getattr(inner, 'forward_intermediates', None)):
            raise ValueError(f'--method byot needs a timm model with feature_info and forward_intermediates(); '
                             f'{type(inner).__name__} has neither')
        info = [dict(f) for f in info]
        stages = default_stages(info) if stages is None else [int(s) for s in stages]
        if not stages or any(s < 0 or s >= len(info) - 1 for s in stages) or len(set(stages)) != len(stages):
            raise ValueError(f'--byot-stages {list(stages)}: give distinct stage indices in 0..{len(info) - 2} '
                             f'(the model has {len(info)} stages; the last one is the deepest classifier\'s)')
        last = info[-1]
        feature_dim = int(getattr(inner, 'head_hidden_size', None) or inner.num_features)
        self.model = model
        self.stages = sorted(stages)
        self.heads = nn.ModuleList([
            ShallowClassifier(int(info[s]['num_chs']), int(info[s]['reduction']), int(last['num_chs']),
                              int(last['reduction']), feature_dim, num_classes) for s in self.stages])

    def forward(self, x: torch.Tensor):
        inner = unwrap(self.model)
        final, inter = inner.forward_intermediates(x, indices=self.stages)
        logits = inner.forward_head(final)
        pre = inner.forward_head(final, pre_logits=True).flatten(1)
        outs = [head(t) for head, t in zip(self.heads, inter)]
        return logits, pre, [o[0] for o in outs], [o[1] for o in outs]


def byot_loss(criterion, logits: torch.Tensor, pre: torch.Tensor, shallow_logits: Sequence[torch.Tensor],
              shallow_feats: Sequence[torch.Tensor], target: torch.Tensor, alpha: float, temperature: float,
              feature_weight: float) -> Dict[str, torch.Tensor]:
    """BYOT's loss (module docstring) and its parts: ``loss_ce`` (deepest), ``loss_shallow_ce``, ``loss_kd``,
    ``loss_feat`` (sums over the shallow classifiers)."""
    loss_ce = criterion(logits, target)
    zero = logits.new_zeros(())
    ce_s, kd, feat = zero, zero, zero
    for z, f in zip(shallow_logits, shallow_feats):
        ce_s = ce_s + criterion(z, target)
        kd = kd + soft_kl(z, logits, temperature)
        feat = feat + (f.float() - pre.detach().float()).pow(2).sum(dim=1).mean()
    loss = loss_ce + (1 - alpha) * ce_s + alpha * kd + feature_weight * feat
    return {'loss': loss, 'loss_ce': loss_ce.detach(), 'loss_shallow_ce': ce_s.detach(), 'loss_kd': kd.detach(),
            'loss_feat': feat.detach()}


class ByotTask(PlainModelTask):
    """``timm.task`` task for BYOT; ``forward`` returns ``{'loss', 'output', 'loss_ce', 'loss_shallow_ce', 'loss_kd',
    'loss_feat'}``. ``optimizer_module`` holds the model and the shallow classifiers."""

    def __init__(self, model: nn.Module, criterion: nn.Module, num_classes: int, alpha: float = 0.3,
                 temperature: float = 3.0, feature_weight: float = 0.03, stages: Optional[Sequence[int]] = None,
                 device: Optional[torch.device] = None, verbose: bool = True):
        super().__init__(device=device, verbose=verbose)
        if not 0 <= float(alpha) <= 1:
            raise ValueError(f'--byot-alpha must be in [0, 1], got {alpha}')
        self.alpha = float(alpha)
        self.temperature = check_positive(temperature, '--byot-temp')
        self.feature_weight = check_positive(feature_weight, '--byot-feature-weight', allow_zero=True)
        self.trainable_module = ByotModel(model, num_classes, stages)
        self.optimizer_module = OptimizerView({'model': model, 'heads': self.trainable_module.heads})
        self.criterion = criterion.to(self.device) if isinstance(criterion, nn.Module) else criterion
        if verbose:
            _logger.info(f'ByotTask: {len(self.trainable_module.stages)} shallow classifiers on stages '
                         f'{self.trainable_module.stages}, alpha={self.alpha} T={self.temperature} '
                         f'lambda={self.feature_weight}')

    @property
    def byot_model(self) -> ByotModel:
        return unwrap(self.trainable_module)

    def get_task_state(self, module: Optional[nn.Module] = None, ema: bool = False) -> Dict[str, Any]:
        """The shallow classifiers (training-only, so outside ``state_dict``)."""
        return {} if ema else {'byot_heads': self.byot_model.heads.state_dict()}

    def load_task_state(self, state: Optional[Dict[str, Any]], strict: bool = True,
                        module: Optional[nn.Module] = None, ema: bool = False) -> None:
        if ema:
            return
        if not state or 'byot_heads' not in state:
            _logger.warning('BYOT: the checkpoint holds no shallow classifiers (task_state byot_heads); they start '
                            'from a fresh initialisation')
            return
        self.byot_model.heads.load_state_dict(state['byot_heads'], strict=strict)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        logits, pre, shallow_logits, shallow_feats = self.trainable_module(input)
        out = byot_loss(self.criterion, logits, pre, shallow_logits, shallow_feats, target, self.alpha,
                        self.temperature, self.feature_weight)
        out['output'] = logits
        return out


def create_task(args: argparse.Namespace, model: nn.Module, criterion: nn.Module, device: torch.device) -> ByotTask:
    """``train.py --method byot``."""
    return ByotTask(model, criterion, num_classes=args.num_classes, alpha=args.byot_alpha,
                    temperature=args.byot_temp, feature_weight=args.byot_feature_weight, stages=args.byot_stages,
                    device=device, verbose=args.rank == 0)
