"""The models of a validate.py run: timm models with checkpoint weights, their data config and identity."""
import argparse
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from timm.data import resolve_data_config
from timm.layers import apply_test_time_pool
from timm.models import create_model
from timm.utils import reparameterize_model

from ..checkpoint import CHECKPOINT_NAMES, apply_checkpoint, load_checkpoint_file, resolve_checkpoint_path
from ..data import DIGITS_DEFAULT_SIZE
from ..io import sha256_file
from .loop import NormalizedModel
from .plan import EvalPlan, ValidateError

_logger = logging.getLogger(__name__)

DATA_CONFIG_KEYS = ('input_size', 'img_size', 'mean', 'std', 'interpolation', 'crop_pct', 'crop_mode')


@dataclass
class EvalModel:
    """One model of the run.

    Attributes:
        model: the timm model (on the CPU until evaluated).
        arch: timm model name.
        tag: name in tables and results.
        checkpoint: ``path``, ``sha256``, stored ``arch`` and training ``train_args`` of its checkpoint ('' / {}
            without one).
        rows: results rows by set name, filled by the evaluation.
    """
    model: nn.Module
    arch: str
    tag: str
    checkpoint: Dict[str, Any]
    rows: Dict[str, Dict[str, Any]] = field(default_factory=dict)

    @property
    def train_args(self) -> Dict[str, Any]:
        return self.checkpoint['train_args']


def checkpoint_info(path: str) -> Dict[str, Any]:
    """Resolved path, sha256, stored arch and training args of a checkpoint (read with weights_only)."""
    return read_checkpoint(path)[0]


def read_checkpoint(path: str) -> Tuple[Dict[str, Any], Any]:
    """(``checkpoint_info``, the loaded checkpoint): the file is read once for both."""
    resolved = resolve_checkpoint_path(path)
    ckpt = load_checkpoint_file(resolved)
    train_args = ckpt.get('args') if isinstance(ckpt, dict) else None
    if train_args is not None and not isinstance(train_args, dict):
        train_args = vars(train_args)
    info = {
        'path': resolved,
        'sha256': sha256_file(resolved),
        'arch': ckpt.get('arch') if isinstance(ckpt, dict) else None,
        'train_args': train_args or {},
    }
    return info, ckpt


def default_tag(path: str, used: set) -> str:
    """A checkpoint's name in tables: its run folder (or file stem), made unique within the run."""
    p = os.path.normpath(path)
    if os.path.isdir(p):
        tag = os.path.basename(p)
    elif os.path.basename(p) in CHECKPOINT_NAMES:
        tag = os.path.basename(os.path.dirname(p)) or os.path.basename(p)
    else:
        tag = os.path.basename(p).split('.')[0]
    base, i = tag, 2
    while tag in used:
        tag, i = f'{base}-{i}', i + 1
    used.add(tag)
    return tag


def create_eval_models(args: argparse.Namespace, plan: EvalPlan) -> List[EvalModel]:
    """One model per ``--checkpoint`` (or one ``--model`` without), with class counts checked against the sets.

    Raises:
        ValidateError: unknown model, missing checkpoint, or a classifier that does not fit the sets.
    """
    models = []
    used_tags: set = set()
    for i, ckpt_path in enumerate(args.checkpoint or [None]):
        info, ckpt = {'path': '', 'sha256': '', 'arch': None, 'train_args': {}}, None
        if ckpt_path:
            try:
                info, ckpt = read_checkpoint(ckpt_path)
            except FileNotFoundError as e:
                raise ValidateError(str(e)) from None
        arch = args.model or info['arch'] or info['train_args'].get('model')
        if not arch:
            raise ValidateError(f'--model not given and checkpoint {info["path"] or "(none)"} stores no arch')
        if not ckpt_path and not args.pretrained:
            _logger.warning('No --checkpoint and no --pretrained: evaluating randomly initialised weights')
        model = _create_model(args, plan, arch, info, ckpt)
        tag = (args.tags[i] if args.tags else
               default_tag(ckpt_path, used_tags) if ckpt_path else f'{arch}{"-pretrained" if args.pretrained else ""}')
        models.append(EvalModel(model, arch, tag, info))
    return models


def _create_model(args: argparse.Namespace, plan: EvalPlan, arch: str, info: Dict[str, Any], ckpt: Any
                  ) -> nn.Module:
    try:
        num_classes = args.num_classes if plan.valid_labels is not None else plan.num_classes
        model = create_model(arch, pretrained=args.pretrained, num_classes=num_classes, **plan.model_kwargs)
    except RuntimeError as e:  # unknown model name, unavailable pretrained weights, ...
        raise ValidateError(f'Cannot create model {arch!r}: {e}') from None
    if info['path']:
        try:
            apply_checkpoint(model, ckpt, info['path'], use_ema=args.use_ema)
        except ValueError as e:
            why = (' (ImageNet-family sets need ImageNet-1k logits for the A/R masks and the ObjectNet mapping)'
                   if plan.has_imagenet else '')
            raise ValidateError(f'{e}: set(s) {plan.describe_needs()} need {plan.num_classes}-class logits{why}'
                                ) from None
        except (KeyError, RuntimeError) as e:
            raise ValidateError(f'Cannot load {info["path"]} into {arch}: {e}') from None
    if args.reparam:
        model = reparameterize_model(model)
    elif args.pretrained:
        stored = (getattr(model, 'pretrained_cfg', None) or {}).get('num_classes')
        if stored and stored != plan.num_classes:
            raise ValidateError(f'--pretrained {arch} weights have {stored} classes but set(s) '
                                f'{plan.describe_needs()} need {plan.num_classes}')
    return model


def resolve_eval_data_config(args: argparse.Namespace, em: EvalModel, digits_sets: bool
                             ) -> Tuple[Dict[str, Any], int]:
    """(timm data config, digits image side) of a model: flags first, then what the checkpoint stored, then timm.

    train.py stores the eval data config it resolved (``args.data_config``), so validate.py reproduces the
    training-time evaluation unless flags say otherwise. The digits sets default to ``crop_pct`` 1.0 at
    ``--digits-size`` (default: the checkpoint's, else 32).
    """
    targs = em.train_args
    digits_size = args.digits_size or targs.get('digits_size') or DIGITS_DEFAULT_SIZE
    cfg_args: Dict[str, Optional[Any]] = {k: getattr(args, k) for k in DATA_CONFIG_KEYS}
    train_cfg = targs.get('data_config') or {}
    user_size = cfg_args['img_size'] is not None or cfg_args['input_size'] is not None
    for k in DATA_CONFIG_KEYS:
        if k in ('input_size', 'img_size') and user_size:
            continue
        for source in (train_cfg, targs):
            if cfg_args.get(k) in (None, '') and source.get(k) not in (None, ''):
                cfg_args[k] = source[k]
    if cfg_args['input_size'] is not None:
        cfg_args['input_size'] = tuple(cfg_args['input_size'])
    if digits_sets:
        if cfg_args['img_size'] is None and cfg_args['input_size'] is None:
            cfg_args['img_size'] = digits_size
        if cfg_args['crop_pct'] is None:
            cfg_args['crop_pct'] = 1.0
    return resolve_data_config(cfg_args, model=em.model, use_test_size=not args.use_train_size), digits_size


def prepare_model(em: EvalModel, data_config: Dict[str, Any], args: argparse.Namespace, device: torch.device,
                  valid_labels: Optional[List[int]] = None) -> nn.Module:
    """The network the loop runs: eval mode, on ``device``, normalisation inside (attacks work on [0, 1] pixels)."""
    model = em.model.eval()
    if args.test_pool:
        model, _ = apply_test_time_pool(model, data_config)
    dtype = model_dtype(args)
    model.to(device=device, dtype=dtype)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    net = NormalizedModel(model, data_config['mean'], data_config['std'], channels_last=args.channels_last,
                          dtype=dtype, valid_labels=valid_labels)
    net.eval().to(device)
    if args.torchscript:
        net = torch.jit.script(net)
    elif args.torchcompile:
        net = torch.compile(net, backend=args.torchcompile, mode=args.torchcompile_mode)
    elif args.aot_autograd:
        from functorch.compile import memory_efficient_fusion  # optional, as in timm's validate.py
        net = memory_efficient_fusion(net)
    if args.num_gpu > 1:
        net = nn.DataParallel(net, device_ids=list(range(args.num_gpu)))
    return net


def model_dtype(args: argparse.Namespace) -> Optional[torch.dtype]:
    """``--model-dtype`` (float32, float16 or bfloat16, as timm's validate.py allows); None without it."""
    if not args.model_dtype:
        return None
    if args.model_dtype not in ('float32', 'float16', 'bfloat16'):
        raise ValidateError(f'--model-dtype {args.model_dtype}: expected float32, float16 or bfloat16')
    if args.amp and args.model_dtype != 'float32':
        raise ValidateError(f'--model-dtype {args.model_dtype} and --amp are alternatives: AMP runs a float32 model')
    return getattr(torch, args.model_dtype)



def param_count_m(model: nn.Module) -> float:
    """Parameters in millions, rounded like timm's validate.py."""
    return round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
