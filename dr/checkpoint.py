"""Loading model weights from our (and timm's) checkpoints, always with ``weights_only=True``."""
import argparse
import logging
import os
import re
from typing import Any, Dict, Optional

import torch
import torch.nn as nn
from safetensors.torch import load_file as load_safetensors

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


class CheckpointError(ValueError):
    """A file that is not a loadable checkpoint (garbage, truncated, or holding objects that would run code)."""


def load_checkpoint_file(path: str, mmap: bool = False) -> Any:
    """``torch.load`` with ``weights_only=True`` (argparse.Namespace allowed, as timm stores args).

    Args:
        path: a checkpoint file or a training output dir (see ``resolve_checkpoint_path``).
        mmap: map the tensor data instead of reading it (cheap checks of large checkpoints; zip format only, older
            files are read in full).

    Raises:
        CheckpointError: naming the file, when it is not a loadable checkpoint. Torch's advice to retry with
            ``weights_only=False`` is never passed on: such a file is refused for safety, not loaded.
    """
    path = resolve_checkpoint_path(path)
    if path.endswith('.safetensors'):
        return load_safetensors(path)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            try:
                return torch.load(path, map_location='cpu', weights_only=True, mmap=mmap)
            except RuntimeError as e:
                if not mmap or 'zip' not in str(e):
                    raise
                return torch.load(path, map_location='cpu', weights_only=True)  # legacy format cannot be mapped
    except OSError:
        raise
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, KeyError, ... for bad content
        raise CheckpointError(unloadable_checkpoint_message(path, e)) from None


def unloadable_checkpoint_message(path: str, error: BaseException) -> str:
    """What went wrong loading ``path``, without torch's suggestion to retry with ``weights_only=False``."""
    text = str(error)
    if text.startswith('Weights only load failed'):
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        detail = [ln for ln in lines[1:] if not ln.startswith(('Please file an issue', 'Check the documentation'))]
        reason = re.sub(r'^WeightsUnpickler error:\s*', '', ' '.join(detail)).rstrip('.')
        reason = reason or 'it holds objects other than tensors and plain containers'
        return (f'{path} is not a loadable checkpoint ({reason}). It was NOT loaded, for safety: checkpoints are read '
                f'with weights_only=True, which refuses anything but tensors and plain containers (loading such a '
                f'file any other way can run code stored in it)')
    reason = f'{type(error).__name__}: {text}' if text else type(error).__name__
    if len(reason) > 300:
        reason = reason[:300] + '...'
    return f'{path} is not a loadable checkpoint (garbage or truncated: {reason}); it was not loaded'


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
