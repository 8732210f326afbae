"""The evaluation loop behind validate.py: loaders, per-sample records, distributed gathering, summaries, results.

Each pass (``dr.evaluate.sets.EvalPart``) runs the model once per image. Under ``torchrun`` every rank reads a disjoint
strided shard of the dataset (no padding, no duplicates); per-sample records (dataset index, target, top-5, top-1
confidence, NLL, attack outcomes) are all-gathered with the padding removed, so every sample counts exactly once.
Inputs go through the loader as uint8 (timm's eval transform without normalisation) and are scaled to [0, 1] on the
device; the mean/std normalisation lives in ``NormalizedModel`` so that attacks work in pixel space.
"""
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from timm.data import create_transform
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms
from tqdm import tqdm

from ..distributed import all_gather_varlen, get_world_size
from .attacks import AUTOATTACK_EPS, autoattack_correct, create_autoattack, fgsm_correct
from .calibration import DEFAULT_BINS, bin_sums, ece_from_sums, mce_from_sums
from .sets import EvalPart, View

_logger = logging.getLogger(__name__)

TOPK = 5


# --------------------------------------------------------------------------------------------------------------------
# model and data

class NormalizedModel(nn.Module):
    """``model((x - mean) / std)`` for images ``x`` in [0, 1]; optional channels-last input."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float], channels_last: bool = False,
                 dtype: Optional[torch.dtype] = None, valid_labels: Optional[Sequence[int]] = None):
        super().__init__()
        self.model = model
        self.dtype = dtype  # --model-dtype: inputs cast to it, logits returned as float32
        self.valid_labels = list(valid_labels) if valid_labels is not None else None  # --valid-labels
        self.register_buffer('mean', torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer('std', torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.channels_last = channels_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.dtype is not None:
            x = x.to(self.dtype)
        out = self.model(x)
        if self.dtype is not None:
            out = out.float()
        if self.valid_labels is not None:
            out = out[:, self.valid_labels]
        return out


class ShardSampler(Sampler):
    """Indices ``rank, rank + world_size, ...``: disjoint shards that together cover the dataset exactly once."""

    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f'rank {rank} out of range for world size {world_size}')
        self.num_samples = num_samples
        self.rank = rank
        self.world_size = world_size

    def __iter__(self):
        return iter(range(self.rank, self.num_samples, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.num_samples, self.world_size))


def create_eval_transform(data_config: Dict[str, Any], crop_border_pixels: Optional[int] = None,
                          center_crop_only: bool = False):
    """timm's eval transform (resize, center crop) ending in a uint8 CHW tensor, without normalisation.

    With ``center_crop_only`` the image is center-cropped to the input size without any resize (ImageNet-C's
    protocol for its 224-px images; a larger input size pads with zeros).
    """
    if center_crop_only:
        return transforms.Compose([transforms.CenterCrop(tuple(data_config['input_size'][1:])),
                                   transforms.PILToTensor()])
    return create_transform(
        data_config['input_size'],
        is_training=False,
        interpolation=data_config['interpolation'],
        mean=data_config['mean'],
        std=data_config['std'],
        crop_pct=data_config['crop_pct'],
        crop_mode=data_config.get('crop_mode'),
        crop_border_pixels=crop_border_pixels,
        use_prefetcher=True,  # timm: "do not convert to float or normalize" -> uint8 tensor
    )


def create_eval_loader(
        dataset: Dataset,
        data_config: Dict[str, Any],
        batch_size: int,
        num_workers: int = 0,
        rank: int = 0,
        world_size: int = 1,
        crop_border_pixels: Optional[int] = None,
        pin_memory: bool = False,
        center_crop_only: bool = False,
) -> DataLoader:
    """DataLoader over this rank's shard; the dataset must yield ``(image, target, index, ok)``."""
    dataset.transform = create_eval_transform(data_config, crop_border_pixels, center_crop_only)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=ShardSampler(len(dataset), rank, world_size),
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=False,
        persistent_workers=False,
    )


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [0, 1] (float inputs are assumed to be in [0, 1] already)."""
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    return images.float()


# --------------------------------------------------------------------------------------------------------------------
# the loop

@dataclass
class AttackConfig:
    """Adversarial evaluation of views with ``attack=True``.

    Attributes:
        fgsm_eps: epsilons in 1/255 units (empty: no FGSM).
        fgsm_n: attack only samples with dataset index < fgsm_n (None: all).
        autoattack: run AutoAttack (reference implementation, standard version, L-inf).
        autoattack_n: attack only samples with dataset index < autoattack_n (None: all).
        autoattack_eps: AutoAttack's L-inf budget in 1/255 units.
        seed: AutoAttack seed.
    """
    fgsm_eps: List[float] = field(default_factory=list)
    fgsm_n: Optional[int] = None
    autoattack: bool = False
    autoattack_n: Optional[int] = None
    autoattack_eps: float = AUTOATTACK_EPS
    seed: int = 0

    @property
    def active(self) -> bool:
        return bool(self.fgsm_eps) or self.autoattack


class _Records:
    """Per-sample tensors of one view, accumulated on the device."""

    def __init__(self):
        self.parts: Dict[str, List[torch.Tensor]] = {}

    def add(self, **tensors: torch.Tensor) -> None:
        for k, v in tensors.items():
            self.parts.setdefault(k, []).append(v.detach())

    def cat(self, empty: Dict[str, Tuple[Tuple[int, ...], torch.dtype]], device: torch.device
            ) -> Dict[str, torch.Tensor]:
        out = {}
        for k, (shape, dtype) in empty.items():
            vals = self.parts.get(k)
            out[k] = torch.cat(vals) if vals else torch.zeros((0,) + shape, dtype=dtype, device=device)
        return out


def _record_schema(n_eps: int) -> Dict[str, Tuple[Tuple[int, ...], torch.dtype]]:
    return {
        'index': ((), torch.long), 'target': ((), torch.long), 'top5': ((TOPK,), torch.long),
        'conf': ((), torch.float32), 'nll': ((), torch.float32),
        'fgsm_index': ((), torch.long), 'fgsm_correct': ((n_eps,), torch.bool),
        'aa_index': ((), torch.long), 'aa_correct': ((), torch.bool),
    }


def evaluate_part(
        model: nn.Module,
        part: EvalPart,
        loader: Iterable,
        device: torch.device,
        autocast: Optional[Callable[[], contextlib.AbstractContextManager]] = None,
        attack: Optional[AttackConfig] = None,
        progress: bool = True,
        desc: Optional[str] = None,
) -> Tuple[Dict[str, Dict[str, torch.Tensor]], int]:
    """Run one pass and return this rank's per-view records and its number of skipped (unreadable) images.

    Args:
        model: maps [0, 1] images to logits (``NormalizedModel``), in eval mode, on ``device``.
        part: what is evaluated and how it is scored.
        loader: yields ``(uint8 images, targets, dataset indices, ok flags)``.
        device: compute device.
        autocast: factory of the AMP context.
        attack: adversarial evaluation of the part's ``attack`` views.
        progress: show a tqdm bar.
        desc: tqdm label.
    """
    autocast = autocast or contextlib.nullcontext
    attack = attack or AttackConfig()
    n_eps = len(attack.fgsm_eps)
    records = {v.name: _Records() for v in part.views}
    skipped = torch.zeros((), dtype=torch.long, device=device)
    aa_attacks: Dict[str, Any] = {}
    non_blocking = device.type == 'cuda'
    for images, targets, indices, ok in tqdm(loader, desc=desc or part.name, disable=not progress, leave=False,
                                            dynamic_ncols=True):
        images = images.to(device, non_blocking=non_blocking)
        targets = targets.to(device, non_blocking=non_blocking)
        indices = indices.to(device, non_blocking=non_blocking)
        ok = ok.to(device, non_blocking=non_blocking).bool()
        x = to_unit_range(images)
        with torch.no_grad(), autocast():
            logits = model(x)
        logits = logits.float()
        skipped += (~ok).sum()
        for view in part.views:
            keep, vtargets = view.select(targets)
            keep = keep & ok
            if not bool(keep.all()):
                vlogits, vtargets, vidx, vx = view.logits(logits[keep]), vtargets[keep], indices[keep], x[keep]
            else:
                vlogits, vidx, vx = view.logits(logits), indices, x
            logp = F.log_softmax(vlogits, dim=1)
            k = min(TOPK, vlogits.shape[1])
            top = vlogits.topk(k, dim=1).indices
            if k < TOPK:
                top = torch.cat([top, top.new_full((top.shape[0], TOPK - k), -1)], dim=1)
            records[view.name].add(
                index=vidx, target=vtargets, top5=top, conf=logp.max(dim=1).values.exp(),
                nll=-logp.gather(1, vtargets[:, None]).squeeze(1))
            if view.attack and attack.active and vidx.numel():
                _attack_batch(model, view, vx, vtargets, vidx, attack, autocast, records[view.name], aa_attacks,
                              n_classes=int(vlogits.shape[1]))
    schema = _record_schema(n_eps)
    return {name: r.cat(schema, device) for name, r in records.items()}, int(skipped)


def _attack_batch(model, view: View, x, targets, indices, attack: AttackConfig, autocast, rec: _Records,
                  aa_attacks: Dict[str, Any], n_classes: int) -> None:
    if attack.fgsm_eps:
        sel = indices < attack.fgsm_n if attack.fgsm_n is not None else torch.ones_like(indices, dtype=torch.bool)
        if bool(sel.any()):
            correct = fgsm_correct(model, x[sel], targets[sel], attack.fgsm_eps, head=view.logits, autocast=autocast)
            rec.add(fgsm_index=indices[sel], fgsm_correct=correct)
    if attack.autoattack:
        sel = (indices < attack.autoattack_n if attack.autoattack_n is not None
               else torch.ones_like(indices, dtype=torch.bool))
        if bool(sel.any()):
            if view.name not in aa_attacks:
                aa_attacks[view.name] = create_autoattack(model, n_classes=n_classes, eps_255=attack.autoattack_eps,
                                                          seed=attack.seed, head=view.logits, device=x.device)
            correct = autoattack_correct(aa_attacks[view.name], model, x[sel], targets[sel], head=view.logits)
            rec.add(aa_index=indices[sel], aa_correct=correct)


# --------------------------------------------------------------------------------------------------------------------
# distributed

def gather_records(records: Dict[str, torch.Tensor], device: Optional[torch.device] = None
                   ) -> Dict[str, torch.Tensor]:
    """All-gather per-sample tensors from every rank (padding removed) and sort them by dataset index.

    Tensors sharing a prefix (``fgsm_*``, ``aa_*``, the rest) have the same length; each group is sorted by its
    ``*index`` tensor, which must hold every sample at most once (checked).
    """
    if get_world_size() > 1:
        records = {key: all_gather_varlen(t, device or t.device) for key, t in records.items()}
    out = {}
    for prefix, index_key in (('', 'index'), ('fgsm_', 'fgsm_index'), ('aa_', 'aa_index')):
        keys = [k for k in records if _group(k) == prefix]
        if index_key not in records:
            continue
        idx = records[index_key]
        order = torch.argsort(idx)
        if idx.numel() and torch.unique(idx).numel() != idx.numel():
            raise RuntimeError(f'gather_records: duplicate sample indices in {index_key}')
        for k in keys:
            out[k] = records[k][order]
    return out


def _group(key: str) -> str:
    if key.startswith('fgsm_'):
        return 'fgsm_'
    if key.startswith('aa_'):
        return 'aa_'
    return ''


def all_reduce_int(value: int, device: torch.device) -> int:
    """Sum of an integer over ranks."""
    if get_world_size() == 1:
        return int(value)
    if dist.get_backend() == 'nccl':
        device = torch.device('cuda', torch.cuda.current_device())
    t = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(t)
    return int(t.item())


# --------------------------------------------------------------------------------------------------------------------
# summaries

def summarize_records(rec: Dict[str, torch.Tensor], n_bins: int = DEFAULT_BINS,
                      fgsm_eps: Sequence[float] = ()) -> Dict[str, Any]:
    """Metrics (percent, except NLL in nats) of one view from its gathered records."""
    rec = {k: v.cpu() for k, v in rec.items()}
    n = int(rec['index'].numel())
    nan = float('nan')
    out: Dict[str, Any] = {'count': n}
    if n:
        correct = rec['top5'][:, 0].eq(rec['target'])
        in_top5 = rec['top5'].eq(rec['target'][:, None]).any(dim=1)
        count, conf_sum, corr_sum = bin_sums(rec['conf'].double(), correct, n_bins)
        out.update(
            top1=100.0 * float(correct.double().mean()), top5=100.0 * float(in_top5.double().mean()),
            nll=float(rec['nll'].double().mean()),
            calibration_bins={'count': count.tolist(), 'conf_sum': conf_sum.tolist(), 'correct_sum': corr_sum.tolist()})
        out['ece'] = 100.0 * ece_from_sums(count, conf_sum, corr_sum)
        out['mce'] = 100.0 * mce_from_sums(count, conf_sum, corr_sum)
    else:
        out.update(top1=nan, top5=nan, nll=nan, ece=nan, mce=nan)
    out['top1_err'] = 100.0 - out['top1']
    out['top5_err'] = 100.0 - out['top5']
    if fgsm_eps:
        fc = rec.get('fgsm_correct')
        m = 0 if fc is None else int(fc.shape[0])
        out['fgsm_count'] = m
        for j, e in enumerate(fgsm_eps):
            out[fgsm_column(e)] = 100.0 * float(fc[:, j].double().mean()) if m else nan
    if 'aa_correct' in rec and rec['aa_correct'].numel():
        out['autoattack_top1'] = 100.0 * float(rec['aa_correct'].double().mean())
        out['autoattack_count'] = int(rec['aa_correct'].numel())
    return out


def fgsm_column(eps: float) -> str:
    """Results column of FGSM top-1 at ``eps`` (1/255 units), e.g. ``fgsm_top1_eps4``."""
    return f'fgsm_top1_eps{eps:g}'


def summarize_real(rec: Dict[str, torch.Tensor], labels: Sequence[Optional[Sequence[int]]]) -> Dict[str, Any]:
    """ImageNet ReaL top-1/top-5 (a prediction is right when it is one of the image's ReaL labels); images without
    ReaL labels (empty entry, or a file not named like the val set) are left out."""
    idx = rec['index'].cpu().tolist()
    top5 = rec['top5'].cpu().tolist()
    hit1 = hit5 = n = 0
    for i, preds in zip(idx, top5):
        lab = labels[i]
        if not lab:
            continue
        n += 1
        hit1 += preds[0] in lab
        hit5 += any(p in lab for p in preds)
    top1 = 100.0 * hit1 / n if n else float('nan')
    top5 = 100.0 * hit5 / n if n else float('nan')
    return {'count': n, 'top1': top1, 'top5': top5, 'top1_err': 100.0 - top1, 'top5_err': 100.0 - top5}


def pooled_calibration(rows: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """ECE/MCE/NLL pooled over several rows (all samples of a -C set) from their stored per-bin sums."""
    with_bins = [r for r in rows if r.get('calibration_bins')]
    if not with_bins:
        return {'ece': float('nan'), 'mce': float('nan'), 'nll': float('nan')}
    count = np.sum([r['calibration_bins']['count'] for r in with_bins], axis=0)
    conf_sum = np.sum([r['calibration_bins']['conf_sum'] for r in with_bins], axis=0)
    corr_sum = np.sum([r['calibration_bins']['correct_sum'] for r in with_bins], axis=0)
    total = sum(r['count'] for r in with_bins)
    nll = sum(r['nll'] * r['count'] for r in with_bins) / total if total else float('nan')
    return {'ece': 100.0 * ece_from_sums(count, conf_sum, corr_sum), 'mce': 100.0 * mce_from_sums(count, conf_sum,
            corr_sum), 'nll': nll, 'calibration_bins': {'count': count.tolist(), 'conf_sum': conf_sum.tolist(),
                                                       'correct_sum': corr_sum.tolist()}}


