"""BAKE as a ``timm.task.TrainingTask``: :class:`BakeTask` trains a :class:`BakeModel` (logits and pre-logits
from one forward pass) while evaluation, EMA and checkpoints see the plain timm model."""
import logging
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import group_parameters
from timm.task import TrainingTask
from timm.utils.model_ema import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel as DDP

from ..distributed import all_gather_cat, get_rank, get_world_size
from .shuffle import BatchShuffle, shuffle_batch
from .targets import KNOWLEDGE_TYPES, _check_omega, bake_loss, bake_targets, random_walk_log_probs

_logger = logging.getLogger(__name__)

HEAD_MODES = ('auto', 'split', 'double')

def _unwrap(module: nn.Module) -> nn.Module:
    """Strip DDP (``.module``), ``torch.compile`` (``._orig_mod``) and EMA (``.module``) wrappers down to a BakeModel
    or the innermost model."""
    seen = 0
    while seen < 16:
        if isinstance(module, BakeModel):
            return module
        if hasattr(module, '_orig_mod'):
            module = module._orig_mod
        elif isinstance(getattr(module, 'module', None), nn.Module):
            module = module.module
        else:
            return module
        seen += 1
    return module


def _plain(module: Optional[nn.Module]) -> Optional[nn.Module]:
    """The plain timm model inside any wrapper stack (DDP / compile / EMA / BakeModel)."""
    if module is None:
        return None
    module = _unwrap(module)
    if isinstance(module, BakeModel):
        return _unwrap(module.model)
    return module


class BakeModel(nn.Module):
    """Wraps a timm model so one forward pass returns ``(logits, pre_logits)``.

    The forward runs ``forward_features`` once. ``head_mode``:

    * ``split``: ``pre = forward_head(feats, pre_logits=True)`` then ``logits = get_classifier()(pre)``. Exact for
      timm heads whose dropout (if any) sits before the pre-logits return (ResNet, EfficientNet, DenseNet, ViT, Swin,
      ConvNeXt, ...); the head runs once.
    * ``double``: ``logits = forward_head(feats)`` and ``pre = forward_head(feats, pre_logits=True)``: always equals
      ``model(x)`` (the logits call comes first, so it consumes the RNG exactly as ``model(x)`` does); the pooling /
      head layers before the classifier run twice.
    * ``auto`` (default): ``split`` when the classifier is a module and the model's ``drop_rate`` is 0, else
      ``double`` (e.g. MobileNetV3 applies its dropout between the pre-logits and the classifier).

    Parameters are exactly the inner model's (same order), so an optimizer built on either sees the same tensors.
    """

    def __init__(self, model: nn.Module, head_mode: str = 'auto'):
        super().__init__()
        if head_mode not in HEAD_MODES:
            raise ValueError(f'BakeModel: head_mode must be one of {HEAD_MODES}, got {head_mode!r}')
        inner = _unwrap(model)
        for attr in ('forward_features', 'forward_head'):
            if not callable(getattr(inner, attr, None)):
                raise TypeError(
                    f'BAKE needs a timm-style model with forward_features() and forward_head(pre_logits=True); '
                    f'{type(inner).__name__} has no {attr}()')
        self.model = model
        self.head_mode = self._resolve_head_mode(inner, head_mode)

    @staticmethod
    def _resolve_head_mode(inner: nn.Module, head_mode: str) -> str:
        classifier = inner.get_classifier() if callable(getattr(inner, 'get_classifier', None)) else None
        if head_mode == 'split' and not isinstance(classifier, nn.Module):
            raise ValueError(
                f'BakeModel head_mode=split needs get_classifier() to return a module, got {type(classifier).__name__}')
        if head_mode != 'auto':
            return head_mode
        drop_rate = float(getattr(inner, 'drop_rate', 0.0) or 0.0)
        if isinstance(classifier, nn.Module) and drop_rate == 0.0:
            return 'split'
        return 'double'

    @property
    def num_classes(self) -> int:
        return _unwrap(self.model).num_classes

    @property
    def pretrained_cfg(self) -> Dict[str, Any]:
        return getattr(_unwrap(self.model), 'pretrained_cfg', {})

    def no_weight_decay(self):
        inner = _unwrap(self.model)
        if not hasattr(inner, 'no_weight_decay'):
            return set()
        return {'model.' + name for name in inner.no_weight_decay()}

    def group_matcher(self, coarse: bool = False) -> Callable[[str], int]:
        """Layer ids for ``--layer-decay``: the inner model's grouping, names prefixed with ``model.``."""
        inner = _unwrap(self.model)
        if not hasattr(inner, 'group_matcher'):
            return lambda name: 0
        layer_map = group_parameters(inner, inner.group_matcher(coarse=coarse), reverse=True)
        last = max(layer_map.values(), default=0)

        def _matcher(name: str) -> int:
            if name.startswith('model.'):
                return layer_map.get(name[len('model.'):], last)
            return last

        return _matcher

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        inner = _unwrap(self.model)
        if hasattr(inner, 'set_grad_checkpointing'):
            inner.set_grad_checkpointing(enable)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        feats = self.model.forward_features(x)
        if self.head_mode == 'split':
            pre = self.model.forward_head(feats, pre_logits=True)
            logits = self.model.get_classifier()(pre)
        else:
            logits = self.model.forward_head(feats)
            pre = self.model.forward_head(feats, pre_logits=True)
        return logits, pre.flatten(1)


class BakeTask(TrainingTask):
    """``timm.task`` training task for BAKE: ``loss = criterion(z, y) + weight * tau^2 KL(Q || softmax(z / tau))``.

    Args:
        model: a timm model (``forward_features`` / ``forward_head(pre_logits=True)`` / ``get_classifier``).
        criterion: hard/soft-target classification loss; ``torch.nn.CrossEntropyLoss()`` when None.
        omega: ensembling weight (``--bake-omega``).
        temperature: distillation temperature tau (``--bake-temp``).
        weight: lambda, weight of the BAKE term (``--bake-weight``).
        knowledge: ``preds`` (the paper) or ``labels`` (Table 14 ablation: propagate one-hot / mixup soft labels).
        one_step: one-step propagation (``--bake-one-step``); required for ``omega == 1``.
        global_ensemble: under torch.distributed, ensemble over the global batch (all ranks' features and
            predictions are gathered; each rank keeps its own rows). Needs the same per-rank batch size everywhere
            (timm drops the last incomplete batch). Ignored in a single process.
        num_classes: number of classes (checked against the logits; defaults to ``model.num_classes``).
        head_mode: see :class:`BakeModel`.
        random_walk: Table 16 baseline instead of BAKE: the second loss term is the hard-label cross-entropy of the
            random-walk propagated predictions (:func:`random_walk_log_probs`, differentiable, within this process's
            batch) instead of the distillation from ``Q``.
        shuffle_bn: under torch.distributed, shuffle the global batch across processes before the forward pass and
            restore the order afterwards (Table 15, :mod:`dr.bake.shuffle`); a no-op in one process.

    ``forward`` returns ``{'loss', 'output', 'loss_ce', 'loss_bake'}`` (the two components detached, for logging).
    Eval model, EMA and checkpoint ``state_dict`` are the plain timm model (keys like ``conv1.weight``).
    """

    def __init__(
            self,
            model: nn.Module,
            criterion: Optional[Union[nn.Module, Callable]] = None,
            omega: float = 0.5,
            temperature: float = 4.0,
            weight: float = 1.0,
            knowledge: str = 'preds',
            one_step: bool = False,
            global_ensemble: bool = True,
            num_classes: Optional[int] = None,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
            verbose: bool = True,
            head_mode: str = 'auto',
            random_walk: bool = False,
            shuffle_bn: bool = False,
    ):
        super().__init__(device=device, dtype=dtype, verbose=verbose)
        self.omega = _check_omega(omega, one_step)
        if temperature <= 0:
            raise ValueError(f'BAKE temperature (--bake-temp) must be > 0, got {temperature}')
        if weight < 0:
            raise ValueError(f'BAKE weight (--bake-weight) must be >= 0, got {weight}')
        if knowledge not in KNOWLEDGE_TYPES:
            raise ValueError(f'BAKE knowledge (--bake-knowledge) must be one of {KNOWLEDGE_TYPES}, got {knowledge!r}')
        self.temperature = float(temperature)
        self.weight = float(weight)
        self.knowledge = knowledge
        self.one_step = bool(one_step)
        self.global_ensemble = bool(global_ensemble)
        self.random_walk = bool(random_walk)
        self.shuffle_bn = bool(shuffle_bn)
        if self.random_walk and (self.knowledge != 'preds' or self.one_step or self.shuffle_bn):
            raise ValueError('BAKE random walk (--bake-random-walk) propagates the predictions in closed form within '
                             'each process: it excludes --bake-knowledge labels, --bake-one-step and --shuffle-bn')
        self.trainable_module = BakeModel(model, head_mode=head_mode)
        self.num_classes = int(num_classes) if num_classes is not None else getattr(_plain(model), 'num_classes', None)
        if criterion is None:
            criterion = nn.CrossEntropyLoss()
        if isinstance(criterion, nn.Module):
            criterion = criterion.to(device=self.device)
        self.criterion = criterion
        self._checked_gather = False
        if self.verbose:
            _logger.info(
                f'BakeTask: omega={self.omega} temperature={self.temperature} weight={self.weight} '
                f'knowledge={self.knowledge} one_step={self.one_step} global_ensemble={self.global_ensemble} '
                f'random_walk={self.random_walk} shuffle_bn={self.shuffle_bn} '
                f'head_mode={self.trainable_module.head_mode} criterion={type(self.criterion).__name__}')

    # --- model plumbing -------------------------------------------------------------------------------------
    @property
    def model(self) -> nn.Module:
        """The plain timm model being trained."""
        return _plain(self.trainable_module)

    def prepare_distributed(self, device_ids: Optional[list] = None, **ddp_kwargs) -> 'BakeTask':
        """Wrap the :class:`BakeModel` in DistributedDataParallel (``device_ids=None`` on CPU / gloo)."""
        self.trainable_module = DDP(self.trainable_module, device_ids=device_ids, **ddp_kwargs)
        return self

    def compile(self, backend: str = 'inductor', mode: Optional[str] = None, **compile_kwargs) -> nn.Module:
        """Compile the BakeModel (training) and the plain model (eval) before DDP wrapping; returns the eval model."""
        self.eval_model = torch.compile(self.model, backend=backend, mode=mode, **compile_kwargs)
        self.trainable_module = torch.compile(self.trainable_module, backend=backend, mode=mode, **compile_kwargs)
        return self.eval_model

    def setup_ema(
            self,
            decay: float = 0.9999,
            use_warmup: bool = False,
            device: Optional[torch.device] = None,
            **kwargs,
    ) -> nn.Module:
        """EMA of the plain model (so ``state_dict_ema`` keys are the plain model's)."""
        self.trainable_module_ema = ModelEmaV3(self.model, decay=decay, use_warmup=use_warmup, device=device, **kwargs)
        return self.trainable_module_ema

    def update_ema(self, step: Optional[int] = None) -> None:
        if self.has_ema():
            self.get_trainable_module(ema=True).update(self.model, step=step)

    def get_eval_model(self, module: Optional[nn.Module] = None, ema: bool = False) -> Optional[nn.Module]:
        """The plain timm model (or its compiled version / its EMA copy) for validation and checkpoints."""
        if module is None:
            attr = 'eval_model_ema' if ema else 'eval_model'
            if hasattr(self, attr):
                return getattr(self, attr)
            module = self.get_trainable_module(ema=ema)
            if module is None:
                return None
        return _plain(module)

    # --- BAKE ---------------------------------------------------------------------------------------------
    def _knowledge(self, logits: torch.Tensor, target: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if self.knowledge != 'labels':
            return None
        if target is None:
            raise ValueError('BAKE --bake-knowledge labels needs the targets')
        num_classes = logits.shape[1]
        if target.ndim == 1:
            return F.one_hot(target.long(), num_classes).float()
        if target.ndim == 2 and target.shape[1] == num_classes:
            return target.float()
        raise ValueError(
            f'BAKE --bake-knowledge labels needs class indices (N,) or soft targets (N, {num_classes}), '
            f'got target of shape {tuple(target.shape)}')

    @torch.no_grad()
    def compute_targets(
            self,
            pre_logits: torch.Tensor,
            logits: torch.Tensor,
            target: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """This rank's rows of ``Q`` (over the global batch under torch.distributed when ``global_ensemble``)."""
        return self._targets(pre_logits, logits, self._knowledge(logits, target))

    @torch.no_grad()
    def _targets(
            self,
            pre_logits: torch.Tensor,
            logits: torch.Tensor,
            knowledge: Optional[torch.Tensor],
            shuffle: Optional[BatchShuffle] = None,
    ) -> torch.Tensor:
        n, d = pre_logits.shape
        world_size = get_world_size()
        if world_size == 1 or (not self.global_ensemble and shuffle is None):
            return bake_targets(pre_logits, logits, self.omega, self.temperature, self.one_step, knowledge)
        # One collective for features and logits (or labels): pack (N, D + K) in float32.
        second = knowledge if knowledge is not None else logits
        packed = torch.cat([pre_logits.detach().float(), second.detach().float()], dim=1)
        # Equal per-rank batch sizes are required; the shapes are checked on the first step only (extra collective).
        gathered = all_gather_cat(packed, check=not self._checked_gather)
        self._checked_gather = True
        if shuffle is not None:
            gathered = shuffle.unshuffle(gathered)  # the original global order: rank r's loader batch is block r
        blocks = [gathered] if self.global_ensemble else list(gathered.split(n))
        q = torch.cat([self._ensemble(b[:, :d], b[:, d:], knowledge is not None) for b in blocks])
        if shuffle is not None:
            q = shuffle.shuffle(q)
        rank = get_rank()
        return q[rank * n:(rank + 1) * n]

    def _ensemble(self, feats: torch.Tensor, second: torch.Tensor, is_knowledge: bool) -> torch.Tensor:
        return bake_targets(feats, second, self.omega, self.temperature, self.one_step,
                            knowledge=second if is_knowledge else None)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        shuffle = None
        if self.shuffle_bn and get_world_size() > 1:
            input, target, shuffle = shuffle_batch(input, target)
        logits, pre_logits = self.trainable_module(input)
        if self.num_classes is not None and logits.shape[1] != self.num_classes:
            raise ValueError(f'BakeTask: model returned {logits.shape[1]} logits, expected {self.num_classes} classes')
        knowledge = self._knowledge(logits, target)  # validates the target shape for --bake-knowledge labels
        loss_ce = self.criterion(logits, target)
        if self.random_walk:
            loss_bake = _hard_label_nll(random_walk_log_probs(pre_logits, logits, self.omega, self.temperature), target)
        else:
            q = self._targets(pre_logits, logits, knowledge, shuffle)
            loss_bake = bake_loss(logits, q, self.temperature)
        loss = loss_ce + self.weight * loss_bake
        output = logits
        if shuffle is not None:  # this rank's loader batch, in its order (detached)
            output = shuffle.unshuffle(all_gather_cat(logits))[shuffle.rank * shuffle.local_size:
                                                                (shuffle.rank + 1) * shuffle.local_size]
        return {
            'loss': loss,
            'output': output,
            'loss_ce': loss_ce.detach(),
            'loss_bake': loss_bake.detach(),
        }


def _hard_label_nll(log_q: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of log-probabilities with class indices or (mixup/cutmix) soft targets, batch mean."""
    if target.ndim == 1:
        return F.nll_loss(log_q, target.long())
    return -(target.float() * log_q).sum(dim=1).mean()
