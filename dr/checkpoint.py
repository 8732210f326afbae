"""Loading model weights from our (and timm's) checkpoints, always with ``weights_only=True``."""
import argparse
import logging
import os
from typing import Any, Dict, Optional

import torch
import torch.nn as nn

_logger = logging.getLogger(__name__)

CHECKPOINT_NAMES = ('model_best.pth.tar', 'last.pth.tar')


def resolve_checkpoint_path(path: str) -> str:
    """A checkpoint file, or a training output dir (``model_best.pth.tar`` preferred, then ``last.pth.tar``)."""
    if os.path.isdir(path):
        for name in CHECKPOINT_NAMES:
            candidate = os.path.join(path, name)
            if os.path.isfile(candidate):
                return candidate
        raise FileNotFoundError(f'No checkpoint ({" or ".join(CHECKPOINT_NAMES)}) in directory {path}')
    if not os.path.isfile(path):
        raise FileNotFoundError(f'Checkpoint not found: {path}')
    return path


def load_checkpoint_file(path: str) -> Any:
    """``torch.load`` with ``weights_only=True`` (argparse.Namespace allowed, as timm stores args)."""
    path = resolve_checkpoint_path(path)
    if path.endswith('.safetensors'):
        from safetensors.torch import load_file
        return load_file(path)
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location='cpu', weights_only=True)


def extract_state_dict(checkpoint: Any, use_ema: bool = False, path: str = '') -> Dict[str, torch.Tensor]:
    """The model state dict inside a checkpoint (EMA weights when asked), with DDP/compile prefixes removed."""
    if isinstance(checkpoint, dict):
        keys = ('state_dict_ema', 'model_ema') if use_ema else ('state_dict', 'model')
        for key in keys:
            if checkpoint.get(key) is not None:
                checkpoint = checkpoint[key]
                break
        else:
            if use_ema:
                raise KeyError(f'--use-ema: checkpoint {path} has no EMA weights (state_dict_ema)')
    cleaned = {}
    for k, v in checkpoint.items():
        for prefix in ('module.', '_orig_mod.'):
            while k.startswith(prefix):
                k = k[len(prefix):]
        cleaned[k] = v
    return cleaned


def checkpoint_num_classes(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Optional[int]:
    """Number of classes stored for the model's classifier, if that layer is in the state dict."""
    classifier = model.get_classifier() if hasattr(model, 'get_classifier') else None
    if classifier is None or not isinstance(classifier, nn.Module):
        return None
    for name, module in model.named_modules():
        if module is classifier:
            weight = state_dict.get(f'{name}.weight')
            return None if weight is None else int(weight.shape[0])
    return None


def load_model_weights(model: nn.Module, path: str, use_ema: bool = False, strict: bool = True) -> str:
    """Load weights into ``model``; a classifier size mismatch is reported before anything else.

    Returns:
        The resolved checkpoint file path.
    """
    resolved = resolve_checkpoint_path(path)
    apply_checkpoint(model, load_checkpoint_file(resolved), resolved, use_ema=use_ema, strict=strict)
    return resolved


def apply_checkpoint(model: nn.Module, checkpoint: Any, path: str, use_ema: bool = False, strict: bool = True) -> None:
    """Load an already read checkpoint into ``model`` (class-count mismatch reported first, naming ``path``)."""
    state_dict = extract_state_dict(checkpoint, use_ema=use_ema, path=path)
    stored = checkpoint_num_classes(state_dict, model)
    expected = getattr(model, 'num_classes', None)
    if stored is not None and expected is not None and stored != expected:
        raise ValueError(f'Checkpoint {path} has {stored} classes but the model has {expected}')
    model.load_state_dict(state_dict, strict=strict)
    _logger.info(f'Loaded {"EMA " if use_ema else ""}weights from {path}')


def checkpoint_data_config(checkpoint: Any) -> Optional[Dict[str, Any]]:
    """The data config (input_size, mean, std, interpolation, crop_pct) a train.py run stored in a loaded checkpoint.

    ``train.py`` saves its resolved args (including ``data_config``) with every checkpoint; other checkpoints give
    None, and the caller falls back to the model's pretrained config.
    """
    args = checkpoint.get('args') if isinstance(checkpoint, dict) else None
    data_config = getattr(args, 'data_config', None) if args is not None else None
    return dict(data_config) if isinstance(data_config, dict) else None
