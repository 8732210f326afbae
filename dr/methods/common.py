"""Pieces the competing methods' tasks share: the plain model inside wrappers, a softened KL term, an optimizer view."""
import math
from typing import Dict, Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.task import TrainingTask
from timm.utils.model_ema import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel as DDP


def unwrap(module: nn.Module) -> nn.Module:
    """Strip DDP (``.module``), ``torch.compile`` (``._orig_mod``) and EMA (``.module``) wrappers."""
    for _ in range(16):
        if hasattr(module, '_orig_mod'):
            module = module._orig_mod
        elif isinstance(getattr(module, 'module', None), nn.Module):
            module = module.module
        else:
            break
    return module


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 KL(softmax(t / T) || softmax(s / T))``, batch mean (Hinton et al.'s scaling); the teacher side detached."""
    t = float(temperature)
    log_p = F.log_softmax(student_logits.float() / t, dim=1)
    log_q = F.log_softmax(teacher_logits.detach().float() / t, dim=1)
    return F.kl_div(log_p, log_q, reduction='batchmean', log_target=True) * t * t


class OptimizerView(nn.Module):
    """The modules whose parameters one optimizer updates (train.py builds the optimizer on ``task.optimizer_module``).

    ``modules`` maps a name to a module; parameter names are ``<name>.<param>`` and a module's ``no_weight_decay()``
    names are kept (prefixed), so timm's weight-decay filter treats each model as it would alone.
    """

    def __init__(self, modules: Dict[str, nn.Module]):
        super().__init__()
        self.parts = nn.ModuleDict(modules)

    def no_weight_decay(self) -> set:
        names = set()
        for prefix, module in self.parts.items():
            inner = unwrap(module)
            if hasattr(inner, 'no_weight_decay'):
                names |= {f'parts.{prefix}.{n}' for n in inner.no_weight_decay()}
        return names

    def forward(self, *args, **kwargs):
        raise RuntimeError('OptimizerView only lists parameters; it has no forward')


def check_positive(value: float, flag: str, allow_zero: bool = False) -> float:
    """``value`` as float, or ValueError naming ``flag``."""
    value = float(value)
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f'{flag} must be {">= 0" if allow_zero else "> 0"}, got {value}')
    return value


def module_state(module: Optional[nn.Module]) -> Dict[str, torch.Tensor]:
    """The state_dict of a possibly wrapped module (empty for None)."""
    return {} if module is None else unwrap(module).state_dict()


def parameters_of(modules: Iterable[nn.Module]):
    """All parameters of several modules, in order."""
    for m in modules:
        yield from m.parameters()


class PlainModelTask(TrainingTask):
    """A task that trains a wrapper (``trainable_module``, whose ``.model`` is the timm model) with training-only
    parts, while evaluation, EMA and the checkpoint's ``state_dict`` see the plain timm model alone."""

    @property
    def model(self) -> nn.Module:
        """The plain timm model being trained."""
        return unwrap(unwrap(self.trainable_module).model)

    def prepare_distributed(self, device_ids: Optional[list] = None, **ddp_kwargs) -> 'PlainModelTask':
        """DDP around the whole wrapper (``device_ids=None`` on CPU / gloo)."""
        self.trainable_module = DDP(self.trainable_module, device_ids=device_ids, **ddp_kwargs)
        return self

    def compile(self, backend: str = 'inductor', mode: Optional[str] = None, **compile_kwargs) -> nn.Module:
        """Compile the wrapper (training) and the plain model (eval) before DDP wrapping; returns the eval model."""
        self.eval_model = torch.compile(self.model, backend=backend, mode=mode, **compile_kwargs)
        self.trainable_module = torch.compile(self.trainable_module, backend=backend, mode=mode, **compile_kwargs)
        return self.eval_model

    def setup_ema(self, decay: float = 0.9999, use_warmup: bool = False, device: Optional[torch.device] = None,
                  **kwargs) -> nn.Module:
        """EMA of the plain model (``state_dict_ema`` keys are the plain model's)."""
        self.trainable_module_ema = ModelEmaV3(self.model, decay=decay, use_warmup=use_warmup, device=device, **kwargs)
        return self.trainable_module_ema

    def update_ema(self, step: Optional[int] = None) -> None:
        if self.has_ema():
            self.trainable_module_ema.update(self.model, step=step)

    def get_eval_model(self, module: Optional[nn.Module] = None, ema: bool = False) -> Optional[nn.Module]:
        """The plain timm model (compiled if ``compile`` ran) or its EMA copy."""
        if module is None:
            attr = 'eval_model_ema' if ema else 'eval_model'
            if hasattr(self, attr):
                return getattr(self, attr)
            if ema:
                return unwrap(self.trainable_module_ema) if self.has_ema() else None
            return self.model
        return unwrap(module)
