"""Teacher ensembles for dataset reinforcement and online distillation.

A teacher spec is a timm model name, optionally ``name=path/to/checkpoint`` for local weights (loaded with
``weights_only=True``). The ensemble output is the mean of the members' softmax probabilities (the DR paper's choice);
each member keeps its own input normalisation and resolution from its pretrained config.
"""
import logging
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import resolve_data_config

from ..checkpoint import apply_checkpoint, checkpoint_data_config, load_checkpoint_file, resolve_checkpoint_path
from ..io import sha256_file

_logger = logging.getLogger(__name__)

_HUB_PREFIXES = ('hf-hub:', 'hf_hub:', 'local-dir:')

# The DR paper's teacher ensemble is the four IG-1B weakly supervised ResNeXt-101 32x{8,16,32,48}d. timm keeps the
# pretrained cfg of ``resnext101_32x48d.fb_wsl_ig1b_ft_in1k`` but (as of timm 1.0.31) registers no
# ``resnext101_32x48d`` entrypoint, and the old ``ig_resnext101_32x*d`` names are deprecated aliases that all map to
# the 32x8d model. Register the missing architecture (ResNeXt-101: layers 3-4-23-3, cardinality 32, base width 48)
# with timm's own builder so the pretrained tag resolves; a timm that has it already is left alone.
if not timm.is_model('resnext101_32x48d'):
    import timm.models.resnet as _timm_resnet
    from timm.models import register_model

    if 'resnext101_32x48d' in _timm_resnet.default_cfgs:
        default_cfgs = {'resnext101_32x48d': _timm_resnet.default_cfgs['resnext101_32x48d']}

    def resnext101_32x48d(pretrained: bool = False, **kwargs) -> nn.Module:
        """ResNeXt-101 32x48d (the largest IG-1B WSL teacher of the DR paper's ensemble)."""
        model_args = dict(block=_timm_resnet.Bottleneck, layers=(3, 4, 23, 3), cardinality=32, base_width=48)
        return _timm_resnet._create_resnet('resnext101_32x48d', pretrained, **dict(model_args, **kwargs))

    register_model(resnext101_32x48d)


def parse_teacher_spec(spec: str, flag: str = '--teacher') -> Tuple[str, Optional[str]]:
    """``name`` or ``name=path`` -> (timm model name, checkpoint path or None).

    Raises:
        ValueError: naming ``flag`` for an empty name/path or a name timm does not know.
    """
    name, sep, path = str(spec).partition('=')
    name, path = name.strip(), path.strip()
    if not name:
        raise ValueError(f'{flag}: empty model name in {spec!r}')
    if sep and not path:
        raise ValueError(f'{flag} {spec}: empty checkpoint path after "="')
    if not name.startswith(_HUB_PREFIXES) and not timm.is_model(name):
        raise ValueError(f'{flag}: unknown timm model {name!r} (see timm.list_models())')
    return name, path or None


def _member_cfg(model: nn.Module, img_size: Optional[int], stored: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Input config of a member: its training run's stored data config if any, else its pretrained cfg."""
    cfg = dict(resolve_data_config({}, model=model))
    if stored:
        cfg.update({k: stored[k] for k in ('input_size', 'mean', 'std', 'interpolation') if stored.get(k)})
    input_size = tuple(int(v) for v in cfg['input_size'])
    if img_size:
        input_size = (input_size[0], int(img_size), int(img_size))
    return {
        'mean': [float(v) for v in cfg['mean']],
        'std': [float(v) for v in cfg['std']],
        'input_size': list(input_size),
        'interpolation': str(cfg.get('interpolation', 'bilinear')),
    }


class TeacherEnsemble(nn.Module):
    """Mean of member softmax probabilities.

    Attributes:
        member_cfgs: per member ``{mean, std, input_size, interpolation}``.
        origins: per member where its weights came from (checkpoint path, ``hub:<model>.<tag>`` or ``random``).
        names: per member timm model name.
        pretrained_cfg: the student's mean/std after ``set_input_norm`` (so timm's ``DistillationTeacher``
            passes inputs through unchanged and ``forward`` does the per-member re-normalisation).
    """

    def __init__(
            self,
            members: Sequence[nn.Module],
            names: Sequence[str],
            member_cfgs: Sequence[Dict[str, Any]],
            origins: Sequence[str],
            weights_sha256: Optional[Sequence[Optional[str]]] = None,
    ):
        super().__init__()
        if not members:
            raise ValueError('TeacherEnsemble needs at least one member')
        self.members = nn.ModuleList(members)
        self.names = list(names)
        self.member_cfgs = [dict(c) for c in member_cfgs]
        self.origins = list(origins)
        self.weights_sha256 = list(weights_sha256 or [None] * len(members))
        self.num_classes = int(getattr(members[0], 'num_classes', 0))
        first = self.member_cfgs[0]
        self.set_input_norm(first['mean'], first['std'], first['input_size'])
        for m in self.members:
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)

    def set_input_norm(self, mean: Sequence[float], std: Sequence[float],
                       input_size: Optional[Sequence[int]] = None) -> None:
        """Declare how ``forward``'s inputs are normalised (the student's mean/std and size)."""
        device = next(self.parameters()).device
        self.register_buffer('student_mean', torch.tensor(list(mean), device=device).view(1, -1, 1, 1),
                             persistent=False)
        self.register_buffer('student_std', torch.tensor(list(std), device=device).view(1, -1, 1, 1),
                             persistent=False)
        size = tuple(input_size) if input_size is not None else tuple(self.member_cfgs[0]['input_size'])
        self.pretrained_cfg = {'mean': tuple(mean), 'std': tuple(std), 'input_size': size,
                               'num_classes': self.num_classes}

    def info(self) -> List[Dict[str, Any]]:
        """Per-member metadata for reinforce.json."""
        out = []
        for name, cfg, origin, sha in zip(self.names, self.member_cfgs, self.origins, self.weights_sha256):
            d = {'name': name, 'weights': origin, **cfg}
            if sha:
                d['weights_sha256'] = sha
            out.append(d)
        return out

    def forward_members(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """Ensemble probabilities (float32) from one already-normalised input per member."""
        if len(inputs) != len(self.members):
            raise ValueError(f'forward_members: {len(inputs)} inputs for {len(self.members)} members')
        probs = None
        for member, x in zip(self.members, inputs):
            p = member(x).float().softmax(dim=-1)
            probs = p if probs is None else probs + p
        return probs / len(self.members)

    def member_inputs(self, x: torch.Tensor) -> List[torch.Tensor]:
        """Re-normalise and resize a student-normalised batch for each member."""
        raw = x.float() * self.student_std + self.student_mean
        out = []
        for cfg in self.member_cfgs:
            h, w = int(cfg['input_size'][1]), int(cfg['input_size'][2])
            y = raw
            if tuple(y.shape[-2:]) != (h, w):
                mode = cfg['interpolation'] if cfg['interpolation'] in ('bilinear', 'bicubic') else 'bilinear'
                y = F.interpolate(y, size=(h, w), mode=mode, align_corners=False, antialias=True)
            mean = torch.tensor(cfg['mean'], device=y.device).view(1, -1, 1, 1)
            std = torch.tensor(cfg['std'], device=y.device).view(1, -1, 1, 1)
            out.append(((y - mean) / std).to(x.dtype))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Log of the ensemble-mean probabilities for a student-normalised batch (logits for timm's KD tasks:
        softmax(log p) = p, so temperature-1 logit distillation distils the ensemble distribution)."""
        return self.forward_members(self.member_inputs(x)).clamp_min(1e-12).log()


def create_teacher(
        specs: Union[str, Sequence[str]],
        num_classes: int,
        pretrained: bool = False,
        img_size: Optional[int] = None,
        device: Union[str, torch.device] = 'cpu',
        flag: str = '--teacher',
) -> TeacherEnsemble:
    """Build a teacher ensemble from specs (``name`` or ``name=checkpoint``).

    Args:
        specs: one spec or a list; each member's input cfg comes from its timm pretrained cfg.
        num_classes: classifier size of every member (a checkpoint with another size is an error).
        pretrained: hub weights for members without a checkpoint (their head must already have ``num_classes``).
        img_size: override every member's input resolution.
        device: where the members live.
        flag: the command-line flag named in errors.

    Raises:
        ValueError: naming ``flag`` (and the checkpoint file) for unknown models, unreachable hub weights,
            or a class-count mismatch.
    """
    if isinstance(specs, str):
        specs = [specs]
    if not specs:
        raise ValueError(f'{flag}: at least one teacher model is required')
    members, names, cfgs, origins, shas = [], [], [], [], []
    for spec in specs:
        name, path = parse_teacher_spec(spec, flag)
        use_hub = pretrained and path is None
        stored = None
        try:
            model = timm.create_model(name, pretrained=use_hub, num_classes=num_classes)
            if img_size and model.pretrained_cfg.get('fixed_input_size'):
                # ViT-style models build position embeddings for one size (hub weights are resampled by timm)
                model = timm.create_model(name, pretrained=use_hub, num_classes=num_classes, img_size=img_size)
        except Exception as e:  # timm raises RuntimeError/ValueError/OSError for tags, hub access, ...
            hint = ' (no network? pass NAME=CHECKPOINT for local weights)' if use_hub else ''
            raise ValueError(f'{flag} {spec}: cannot create the model: {e}{hint}') from e
        if use_hub:
            hub_classes = model.pretrained_cfg.get('num_classes')
            if hub_classes is not None and int(hub_classes) != num_classes:
                raise ValueError(
                    f'{flag} {name} --pretrained: the hub weights have {hub_classes} classes but --num-classes is '
                    f'{num_classes}; fine-tune the teacher on this dataset and pass {name}=CHECKPOINT')
            tag = model.pretrained_cfg.get('tag')
            arch = model.pretrained_cfg.get('architecture', name)
            origins.append(f'hub:{arch}.{tag}' if tag else f'hub:{arch}')
            shas.append(None)
        elif path is not None:
            try:
                resolved = resolve_checkpoint_path(path)
                checkpoint = load_checkpoint_file(resolved)
                apply_checkpoint(model, checkpoint, resolved)
            except (ValueError, FileNotFoundError, RuntimeError, KeyError) as e:
                raise ValueError(f'{flag} {spec}: {e}') from e
            origins.append(os.path.abspath(resolved))
            shas.append(sha256_file(resolved))
            stored = checkpoint_data_config(checkpoint)
        else:
            _logger.warning(f'{flag} {name}: no checkpoint and no --pretrained, using RANDOM weights')
            origins.append('random')
            shas.append(None)
        members.append(model.to(device))
        names.append(name)
        cfgs.append(_member_cfg(model, img_size, stored))
    return TeacherEnsemble(members, names, cfgs, origins, shas)
