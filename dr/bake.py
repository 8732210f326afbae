"""BAKE: self-distillation with BAtch Knowledge Ensembling (Ge et al., 2021).

For a batch of ``N`` samples with pooled pre-logit features ``f`` and logits ``z`` the soft target of each sample is
an ensemble of the predictions of the *other* samples of the batch, weighted by feature affinity:

* ``A = rowsoftmax(f_n f_n^T)`` with ``f_n = f / ||f||`` and the diagonal excluded (``-inf`` before the softmax);
* ``P = softmax(z / tau)`` (or one-hot / soft labels for the ``labels`` ablation);
* propagation ``Q_{t+1} = omega A Q_t + (1 - omega) P`` (Eq. 7), whose limit (infinite propagation) is
  ``Q = (1 - omega) (I - omega A)^{-1} P``, solved here with one ``torch.linalg.solve`` in float32;
* ``one_step=True`` gives ``Q = omega A P + (1 - omega) P`` (Eq. 6, the Fig. 4 ablation).

The loss (Eq. 2) is ``CE(z, y) + lambda * tau^2 * KL(Q || softmax(z / tau))``; ``Q`` never carries a gradient.

:class:`BakeTask` packages this as a ``timm.task.TrainingTask``: its trainable module (:class:`BakeModel`) returns
logits and pre-logits from one forward pass, while evaluation, EMA and checkpoints see the plain timm model.
"""
import contextlib
import logging
from typing import Any, Callable, Dict, Iterator, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import group_parameters
from timm.task import TrainingTask
from timm.utils.model_ema import ModelEmaV3

from .distributed import all_gather_cat, get_rank, get_world_size

_logger = logging.getLogger(__name__)

KNOWLEDGE_TYPES = ('preds', 'labels')
HEAD_MODES = ('auto', 'split', 'double')


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

    with torch.no_grad(), _single_thread_if_small(features.device, n):
        if knowledge is not None:
            p = knowledge.detach().float()
        else:
            p = torch.softmax(logits.detach().float() / temperature, dim=1)
        if n == 1 or omega == 0.0:
            return p.clone() if knowledge is not None else p
        f = F.normalize(features.detach().float(), p=2.0, dim=1)
        affinity = f @ f.t()
        affinity.fill_diagonal_(float('-inf'))
        affinity = torch.softmax(affinity, dim=1)
        if one_step:
            q = torch.addmm(p, affinity, p, beta=1.0 - omega, alpha=omega)
        else:
            # (I - omega A) Q' = P, Q = (1 - omega) Q'. The matrix is strictly diagonally dominant for omega < 1
            # (A is row-stochastic with zero diagonal), so the solve is well conditioned.
            system = affinity.mul_(-omega)
            system.diagonal().add_(1.0)
            q = torch.linalg.solve(system, p).mul_(1.0 - omega)
    return q


def bake_loss(logits: torch.Tensor, q: torch.Tensor, temperature: float) -> torch.Tensor:
    """``tau^2 * KL(Q || softmax(logits / tau))``, batch mean, computed in float32.

    The gradient reaches ``logits`` only through the student's log-softmax; ``q`` is treated as a constant.
    """
    log_p = F.log_softmax(logits.float() / temperature, dim=1)
    return F.kl_div(log_p, q.detach().float(), reduction='batchmean') * (temperature ** 2)


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
                f'head_mode={self.trainable_module.head_mode} criterion={type(self.criterion).__name__}')

    # --- model plumbing -------------------------------------------------------------------------------------
    @property
    def model(self) -> nn.Module:
        """The plain timm model being trained."""
        return _plain(self.trainable_module)

    def prepare_distributed(self, device_ids: Optional[list] = None, **ddp_kwargs) -> 'BakeTask':
        """Wrap the :class:`BakeModel` in DistributedDataParallel (``device_ids=None`` on CPU / gloo)."""
        from torch.nn.parallel import DistributedDataParallel as DDP
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
    ) -> torch.Tensor:
        n, d = pre_logits.shape
        world_size = get_world_size()
        if not self.global_ensemble or world_size == 1:
            return bake_targets(pre_logits, logits, self.omega, self.temperature, self.one_step, knowledge)
        # One collective for features and logits (or labels): pack (N, D + K) in float32.
        second = knowledge if knowledge is not None else logits
        packed = torch.cat([pre_logits.detach().float(), second.detach().float()], dim=1)
        # Equal per-rank batch sizes are required; the shapes are checked on the first step only (extra collective).
        gathered = all_gather_cat(packed, check=not self._checked_gather)
        self._checked_gather = True
        feats_all, second_all = gathered[:, :d], gathered[:, d:]
        if knowledge is not None:
            q = bake_targets(feats_all, second_all, self.omega, self.temperature, self.one_step, knowledge=second_all)
        else:
            q = bake_targets(feats_all, second_all, self.omega, self.temperature, self.one_step)
        rank = get_rank()
        return q[rank * n:(rank + 1) * n]

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        logits, pre_logits = self.trainable_module(input)
        if self.num_classes is not None and logits.shape[1] != self.num_classes:
            raise ValueError(f'BakeTask: model returned {logits.shape[1]} logits, expected {self.num_classes} classes')
        knowledge = self._knowledge(logits, target)  # validates the target shape for --bake-knowledge labels
        loss_ce = self.criterion(logits, target)
        q = self._targets(pre_logits, logits, knowledge)
        loss_bake = bake_loss(logits, q, self.temperature)
        loss = loss_ce + self.weight * loss_bake
        return {
            'loss': loss,
            'output': logits,
            'loss_ce': loss_ce.detach(),
            'loss_bake': loss_bake.detach(),
        }
