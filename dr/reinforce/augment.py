"""Augmentations with explicit, stored parameters that replay exactly (dataset reinforcement).

Pipeline (teacher and student alike): crop box on the original image -> resize to the output size -> hflip ->
RandAugment ops (torchvision's op implementations and magnitude table, applied with fixed parameters) -> to tensor ->
normalise -> random-erasing box (``AugmentSpec.re_fill``: ``mean`` = 0 in the normalised input, i.e. the mean colour,
this project's default; ``black`` = 0 before normalisation, as ml-dr and torchvision's RandomErasing placed before
Normalize). The ``+mix`` variants run the same pipeline on a partner image with the partner's own stored parameters,
then mix the two normalised tensors: mixup ``lam * x + (1 - lam) * x2`` and/or cutmix (a box of ``x2`` pasted into
``x``), in that order, as ml-dr does.

``sample_records`` (and ``sample_mix_records`` for the partner fields) draw the parameters with a numpy Generator and
quantise them to the stored fields; ``apply_record`` only reads a record (no RNG), so a stored augmentation is
reproduced bit for bit.
"""
import dataclasses
import functools
import io
import logging
import math
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torchvision.transforms.functional as F
from PIL import Image
from timm.data.transforms import str_to_interp_mode
from torchvision.transforms import InterpolationMode
from torchvision.transforms.autoaugment import RandAugment, _apply_op

from .format import (
    AUG_NAMES,
    AUG_RRC_RA_RE,
    FLAG_CUTMIX,
    FLAG_ERASE,
    FLAG_HFLIP,
    FLAG_MIXUP,
    FLAG_RA_NEG,
    aug_has_mix,
    aug_has_ra_re,
)

_logger = logging.getLogger(__name__)

# torchvision RandAugment's op table, in its order (Identity, ShearX, ..., Equalize); stored ra_ops index into it.
RA_OPS: Tuple[str, ...] = tuple(RandAugment()._augmentation_space(31, (32, 32)).keys())
# RandAugment ops run with torchvision's defaults: nearest interpolation, black fill
RA_INTERPOLATION = InterpolationMode.NEAREST
RE_MAX_ATTEMPTS = 10
RRC_MAX_ATTEMPTS = 10
MAX_RA_OPS = 2  # slots in the record's ra_ops field
RE_FILLS = ('mean', 'black')
MIX_GROUP = 8  # default images per mixing group of the writer (partners are drawn within a group)


@dataclasses.dataclass
class AugmentSpec:
    """Parameters of a stored-augmentation family (saved in reinforce.json under ``augmentation``).

    Attributes:
        name: ``rrc`` (random-resized-crop + hflip), ``rrc+ra_re`` (+ RandAugment + random erasing), or either with
            ``+mix`` (mixup / cutmix with a partner image, the paper's +M* variants).
        scale: RRC area fraction range.
        ratio: RRC aspect ratio range.
        hflip: horizontal flip probability.
        ra_num_ops: RandAugment ops per sample (0 for ``rrc``; at most 2).
        ra_magnitude: RandAugment magnitude bin.
        ra_num_bins: RandAugment magnitude bins.
        re_prob: random erasing probability (0 for ``rrc``).
        interpolation: resize interpolation when the caller gives none.
        re_scale: random erasing area fraction range (torchvision default).
        re_ratio: random erasing aspect ratio range (torchvision default).
        ra_ops: the op-name table ``ra_ops`` indices refer to.
        re_fill: what erased pixels become: ``mean`` (0 after normalisation: the mean colour; this project's
            default, as timm's RandomErasing ``const`` mode) or ``black`` (0 before normalisation: ml-dr).
        mixup_p: probability a stored augmentation is mixed up with its partner (``+mix``; the paper: 0.5).
        mixup_alpha: mixup lambda ~ Beta(alpha, alpha) / ``mixup_div_by``.
        mixup_div_by: ml-dr's ``div_by`` (2: lambda <= 0.5 weights the sample's own image by lambda).
        cutmix_p: probability a box of the partner is pasted in (``+mix``; both mixings may apply; the paper: 0.5).
        cutmix_alpha: cutmix lambda ~ Beta(alpha, alpha); the box side is ``sqrt(1 - lambda)`` of the image side.
        mix_group: partners of the writer's ``+mix`` augmentations are other images of the same group of this many
            consecutive images of a shard (0: anywhere in the dataset, e.g. imported ml-dr reinforcements).
    """
    name: str = AUG_RRC_RA_RE
    scale: Tuple[float, float] = (0.08, 1.0)
    ratio: Tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    hflip: float = 0.5
    ra_num_ops: int = 2
    ra_magnitude: int = 9
    ra_num_bins: int = 31
    re_prob: float = 0.25
    interpolation: str = 'bilinear'
    re_scale: Tuple[float, float] = (0.02, 0.33)
    re_ratio: Tuple[float, float] = (0.3, 3.3)
    ra_ops: Tuple[str, ...] = RA_OPS
    re_fill: str = 'mean'
    mixup_p: float = 0.0
    mixup_alpha: float = 1.0
    mixup_div_by: float = 2.0
    cutmix_p: float = 0.0
    cutmix_alpha: float = 1.0
    mix_group: int = 0

    def __post_init__(self):
        if self.name not in AUG_NAMES:
            raise ValueError(f'Unknown augmentation {self.name!r}; expected one of {", ".join(AUG_NAMES)}')
        self.scale = tuple(float(v) for v in self.scale)
        self.ratio = tuple(float(v) for v in self.ratio)
        self.re_scale = tuple(float(v) for v in self.re_scale)
        self.re_ratio = tuple(float(v) for v in self.re_ratio)
        self.ra_ops = tuple(str(v) for v in self.ra_ops)
        unknown = [op for op in self.ra_ops if op not in RA_OPS]
        if unknown:
            raise ValueError(f'augmentation ra_ops: unknown RandAugment op(s) {", ".join(unknown)}')
        if not 0 <= self.ra_num_ops <= MAX_RA_OPS:
            raise ValueError(f'ra_num_ops must be between 0 and {MAX_RA_OPS}, got {self.ra_num_ops}')
        if not 0 <= self.ra_magnitude < self.ra_num_bins:
            raise ValueError(f'ra_magnitude {self.ra_magnitude} outside 0..{self.ra_num_bins - 1}')
        if not aug_has_ra_re(self.name) and (self.ra_num_ops or self.re_prob):
            raise ValueError(f'augmentation {self.name} stores crop and flip only: ra_num_ops and re_prob must be 0')
        if self.re_fill not in RE_FILLS:
            raise ValueError(f're_fill must be one of {", ".join(RE_FILLS)}, got {self.re_fill!r}')
        if not aug_has_mix(self.name) and (self.mixup_p or self.cutmix_p):
            raise ValueError(f'augmentation {self.name} does not mix: mixup_p and cutmix_p must be 0 '
                             f'(use {self.name}+mix)')
        for field in ('mixup_p', 'cutmix_p'):
            if not 0.0 <= getattr(self, field) <= 1.0:
                raise ValueError(f'{field} must be in [0, 1], got {getattr(self, field)}')
        if self.mixup_alpha < 0 or self.cutmix_alpha < 0 or self.mixup_div_by < 1:
            raise ValueError('mixup_alpha and cutmix_alpha must be >= 0 and mixup_div_by >= 1')
        if self.mix_group < 0:
            raise ValueError(f'mix_group must be >= 0, got {self.mix_group}')
        str_to_interp_mode(self.interpolation)  # KeyError for unknown names

    @property
    def has_ra_re(self) -> bool:
        return aug_has_ra_re(self.name)

    @property
    def has_mix(self) -> bool:
        return aug_has_mix(self.name)

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> 'AugmentSpec':
        """Inverse of ``to_dict``; unknown keys (added by later schema versions) are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names})


def create_augment_spec(name: str, **overrides) -> AugmentSpec:
    """The paper's settings for ``rrc`` (crop + flip), ``rrc+ra_re`` (RandAugment 2 ops at magnitude 9 of 31 with
    random sign, random erasing p=0.25) and their ``+mix`` variants (mixup p=0.5 with ``div_by`` 2, cutmix p=0.5,
    alpha 1, partners within groups of ``MIX_GROUP`` images), with keyword overrides of any ``AugmentSpec`` field."""
    if name not in AUG_NAMES:
        raise ValueError(f'--aug: unknown augmentation {name!r}; expected one of {", ".join(AUG_NAMES)}')
    fields = {f.name for f in dataclasses.fields(AugmentSpec)}
    bad = sorted(set(overrides) - fields)
    if bad:
        raise ValueError(f'Unknown augmentation parameter(s): {", ".join(bad)}')
    base: Dict[str, Any] = {'name': name}
    if not aug_has_ra_re(name):
        base.update(ra_num_ops=0, re_prob=0.0)
    if aug_has_mix(name):
        base.update(mixup_p=0.5, cutmix_p=0.5, mix_group=MIX_GROUP)
    base.update({k: v for k, v in overrides.items() if v is not None})
    return AugmentSpec(**base)


@functools.lru_cache(maxsize=256)
def _ra_table(num_bins: int, magnitude: int, height: int, width: int) -> Dict[str, Tuple[float, bool]]:
    """torchvision RandAugment magnitudes at ``magnitude`` for an image of this size: op -> (magnitude, signed)."""
    space = RandAugment()._augmentation_space(num_bins, (height, width))
    out = {}
    for op, (mags, signed) in space.items():
        out[op] = (float(mags[magnitude].item()) if mags.ndim > 0 else 0.0, bool(signed))
    return out


def _signed_ops(spec: AugmentSpec) -> np.ndarray:
    table = _ra_table(spec.ra_num_bins, spec.ra_magnitude, 32, 32)
    return np.array([table[op][1] for op in spec.ra_ops], dtype=bool)


def sample_crops(rng: np.random.Generator, width: Union[int, np.ndarray], height: Union[int, np.ndarray], n: int,
                 scale: Sequence[float], ratio: Sequence[float]) -> np.ndarray:
    """``n`` random-resized-crop boxes (x, y, w, h) in pixels, torchvision's RandomResizedCrop sampling rule
    (10 attempts, then a centre crop clamped to the ratio range), vectorised over samples.

    ``width``/``height`` are one image size or one size per sample (``[n]`` arrays: partners of ``+mix`` samples).
    """
    width = np.broadcast_to(np.asarray(width, dtype=np.int64), (n,))
    height = np.broadcast_to(np.asarray(height, dtype=np.int64), (n,))
    area = (width * height).astype(np.float64)[:, None]
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    target = area * rng.uniform(scale[0], scale[1], size=(n, RRC_MAX_ATTEMPTS))
    aspect = np.exp(rng.uniform(log_ratio[0], log_ratio[1], size=(n, RRC_MAX_ATTEMPTS)))
    cw = np.round(np.sqrt(target * aspect)).astype(np.int64)
    ch = np.round(np.sqrt(target / aspect)).astype(np.int64)
    ok = (cw > 0) & (cw <= width[:, None]) & (ch > 0) & (ch <= height[:, None])
    first = ok.argmax(axis=1)
    rows = np.arange(n)
    cw, ch = cw[rows, first], ch[rows, first]
    u = rng.random((n, 2))
    x = np.floor(u[:, 0] * (width - cw + 1)).astype(np.int64)
    y = np.floor(u[:, 1] * (height - ch + 1)).astype(np.int64)
    fallback = ~ok.any(axis=1)
    if fallback.any():
        w, h = width[fallback], height[fallback]
        in_ratio = w / h
        narrow, wide = in_ratio < min(ratio), in_ratio > max(ratio)
        fw = np.where(wide, np.round(h * max(ratio)).astype(np.int64), w)
        fh = np.where(narrow, np.round(w / min(ratio)).astype(np.int64), h)
        cw[fallback], ch[fallback] = fw, fh
        x[fallback], y[fallback] = (w - fw) // 2, (h - fh) // 2
    return np.stack([x, y, cw, ch], axis=1)


def sample_erase_boxes(rng: np.random.Generator, n: int, prob: float, scale: Sequence[float],
                       ratio: Sequence[float]) -> Tuple[np.ndarray, np.ndarray]:
    """Random-erasing boxes as (top, left, h, w) in 1/255 of the output size, and whether each sample erases.

    torchvision's RandomErasing rule in size-free fractions: area fraction in ``scale``, log-uniform aspect in
    ``ratio``, 10 attempts for a box inside the image; a sample whose attempts all fail is not erased.
    """
    apply = rng.random(n) < prob
    s = rng.uniform(scale[0], scale[1], size=(n, RE_MAX_ATTEMPTS))
    r = np.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1]), size=(n, RE_MAX_ATTEMPTS)))
    qh = np.round(np.sqrt(s * r) * 255).astype(np.int64)
    qw = np.round(np.sqrt(s / r) * 255).astype(np.int64)
    ok = (qh >= 1) & (qh < 255) & (qw >= 1) & (qw < 255)
    first = ok.argmax(axis=1)
    rows = np.arange(n)
    qh, qw = qh[rows, first], qw[rows, first]
    u = rng.random((n, 2))
    qt = np.floor(u[:, 0] * (255 - qh + 1)).astype(np.int64)
    ql = np.floor(u[:, 1] * (255 - qw + 1)).astype(np.int64)
    apply &= ok.any(axis=1)
    boxes = np.stack([qt, ql, qh, qw], axis=1)
    boxes[~apply] = 0
    return boxes.astype(np.uint8), apply


def _sample_flags_ops(rng: np.random.Generator, spec: AugmentSpec, n: int) -> Tuple[np.ndarray, ...]:
    """The size-free draws after the crop: flags (hflip, RandAugment signs, erase), ``ra_ops`` and ``re_box``."""
    flags = np.where(rng.random(n) < spec.hflip, FLAG_HFLIP, 0).astype(np.uint8)
    ops = np.zeros((n, MAX_RA_OPS), dtype=np.int64)
    boxes = np.zeros((n, 4), dtype=np.uint8)
    if spec.has_ra_re:
        if spec.ra_num_ops:
            ops[:, :spec.ra_num_ops] = rng.integers(0, len(spec.ra_ops), size=(n, spec.ra_num_ops))
            if spec.ra_num_ops < MAX_RA_OPS:  # unused slots hold Identity
                ops[:, spec.ra_num_ops:] = spec.ra_ops.index('Identity')
            neg = (rng.random((n, spec.ra_num_ops)) < 0.5) & _signed_ops(spec)[ops[:, :spec.ra_num_ops]]
            for j in range(spec.ra_num_ops):
                flags |= np.where(neg[:, j], FLAG_RA_NEG[j], 0).astype(np.uint8)
        else:
            ops[:] = spec.ra_ops.index('Identity')
        boxes, erase = sample_erase_boxes(rng, n, spec.re_prob, spec.re_scale, spec.re_ratio)
        flags |= np.where(erase, FLAG_ERASE, 0).astype(np.uint8)
    return flags, ops.astype(np.uint8), boxes


def _check_crop_field(crops: np.ndarray, dtype: np.dtype, field: str) -> None:
    if crops.max(initial=0) > np.iinfo(dtype[field].base).max:
        raise ValueError(f'image side {int(crops.max())} does not fit the {field} field ({dtype[field].base})')


def sample_records(
        rng: np.random.Generator,
        width: int,
        height: int,
        spec: AugmentSpec,
        n: int,
        dtype: np.dtype,
) -> np.ndarray:
    """Draw ``n`` augmentations for a ``width`` x ``height`` image into a record array of ``dtype``.

    Fills ``crop``, ``flags`` and (``rrc+ra_re``) ``ra_ops``/``re_box``; ``ids``/``probs`` stay zero for the teacher
    and the partner fields of ``+mix`` variants for :func:`sample_mix_records`. The draws are a fixed sequence from
    ``rng``, so a Generator seeded from (seed, image index) gives the same records on any rank, worker or resume.
    """
    if spec.has_ra_re and 'ra_ops' not in dtype.names:
        raise ValueError(f'record dtype lacks ra_ops/re_box fields needed by augmentation {spec.name}')
    rec = np.zeros(n, dtype=dtype)
    crops = sample_crops(rng, width, height, n, spec.scale, spec.ratio)
    _check_crop_field(crops, dtype, 'crop')
    rec['crop'] = crops
    flags, ops, boxes = _sample_flags_ops(rng, spec, n)
    if spec.has_ra_re:
        rec['ra_ops'] = ops
        rec['re_box'] = boxes
    rec['flags'] = flags
    return rec


def cutmix_boxes(rng: np.random.Generator, lam: np.ndarray) -> np.ndarray:
    """CutMix boxes (top, left, bottom, right) in 1/255 of the output size for lambdas ``lam``: ml-dr's rule (side
    ``int(255 * sqrt(1 - lam))``, a uniformly drawn centre, edges ``centre -/+ side // 2`` clipped to the image)
    on a 255-unit image, so any output size replays it (:func:`q255_to_px`)."""
    n = len(lam)
    side = np.floor(255 * np.sqrt(1.0 - lam)).astype(np.int64)
    centre = rng.integers(0, 255, size=(n, 2))
    top = np.clip(centre[:, 0] - side // 2, 0, 255)
    left = np.clip(centre[:, 1] - side // 2, 0, 255)
    bottom = np.clip(centre[:, 0] + side // 2, 0, 255)
    right = np.clip(centre[:, 1] + side // 2, 0, 255)
    return np.stack([top, left, bottom, right], axis=1).astype(np.uint8)


def sample_mix_records(
        rng: np.random.Generator,
        rec: np.ndarray,
        candidates: Sequence[int],
        sizes: Sequence[Tuple[int, int]],
        spec: AugmentSpec,
) -> None:
    """Fill the partner fields of ``+mix`` records in place (after :func:`sample_records`, from the same ``rng``).

    For every stored augmentation: a partner drawn uniformly from ``candidates`` (references, e.g. dataset
    positions, stored in ``mix_ref``; ``sizes[k]`` = (width, height) of candidate ``k``), the partner's own crop,
    flip, RandAugment ops and erase box (the same rules as the sample's), mixup with probability ``mixup_p``
    (lambda = Beta(alpha, alpha) / div_by, float32) and cutmix with probability ``cutmix_p`` (box from
    :func:`cutmix_boxes`). Rows that neither mixup nor cutmix keep all partner fields zero.
    """
    if not spec.has_mix:
        raise ValueError(f'augmentation {spec.name} has no partner fields')
    missing = [f for f in ('mix_ref', 'mix_crop', 'mix_flags', 'mix_lam', 'mix_box') if f not in rec.dtype.names]
    if missing:
        raise ValueError(f'record dtype lacks the mixing field(s) {", ".join(missing)}')
    if len(candidates) == 0 or len(candidates) != len(sizes):
        raise ValueError('sample_mix_records: candidates and their sizes must be non-empty and of equal length')
    n = len(rec)
    sizes = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)
    pick = rng.integers(0, len(candidates), size=n)
    crops = sample_crops(rng, sizes[pick, 0], sizes[pick, 1], n, spec.scale, spec.ratio)
    _check_crop_field(crops, rec.dtype, 'mix_crop')
    flags, ops, boxes = _sample_flags_ops(rng, spec, n)
    mixup = rng.random(n) < spec.mixup_p if spec.mixup_alpha > 0 else np.zeros(n, dtype=bool)
    lam = rng.beta(max(spec.mixup_alpha, 1e-6), max(spec.mixup_alpha, 1e-6), size=n) / spec.mixup_div_by
    cutmix = rng.random(n) < spec.cutmix_p if spec.cutmix_alpha > 0 else np.zeros(n, dtype=bool)
    cut_lam = rng.beta(max(spec.cutmix_alpha, 1e-6), max(spec.cutmix_alpha, 1e-6), size=n)
    cut_boxes = cutmix_boxes(rng, cut_lam)
    mixed = mixup | cutmix
    rec['mix_ref'] = np.where(mixed, np.asarray(candidates, dtype=np.int64)[pick], 0)
    rec['mix_crop'] = np.where(mixed[:, None], crops, 0)
    rec['mix_flags'] = np.where(mixed, flags, 0)
    if spec.has_ra_re:
        rec['mix_ra_ops'] = np.where(mixed[:, None], ops, 0)
        rec['mix_re_box'] = np.where(mixed[:, None], boxes, 0)
    rec['mix_lam'] = np.where(mixup, lam, 0.0).astype(np.float32)
    rec['mix_box'] = np.where(cutmix[:, None], cut_boxes, 0)
    rec['flags'] |= (np.where(mixup, FLAG_MIXUP, 0) | np.where(cutmix, FLAG_CUTMIX, 0)).astype(np.uint8)


def q255_to_px(q: Union[int, np.ndarray], size: int) -> np.ndarray:
    """Stored 1/255-unit coordinates in pixels of an output side ``size`` (integer round half up)."""
    return (np.asarray(q, dtype=np.int64) * int(size) + 127) // 255


def px_to_q255(px: Union[int, np.ndarray], size: int) -> np.ndarray:
    """The smallest 1/255-unit coordinates that :func:`q255_to_px` maps back to ``px`` at side ``size``.

    Exact for every pixel coordinate when ``size <= 255`` (each unit step moves at most one pixel); for larger sides
    some coordinates have no exact code and the nearest one below is returned.
    """
    px = np.asarray(px, dtype=np.int64)
    q = np.clip((px * 255 - 127 + int(size) - 1) // int(size), 0, 255)
    return q


def re_pixel_boxes(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """Stored erase boxes ``[n, 4]`` (top, left, h, w in 1/255 units) in pixels (top, left, h, w) of an output size.

    Integer arithmetic (round half up; at least one pixel, shifted inside the image), so the writer, any replay and
    any output size agree exactly.
    """
    q = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
    h = np.clip(q255_to_px(q[:, 2], height), 1, height)
    w = np.clip(q255_to_px(q[:, 3], width), 1, width)
    top = np.minimum(q255_to_px(q[:, 0], height), height - h)
    left = np.minimum(q255_to_px(q[:, 1], width), width - w)
    return np.stack([top, left, h, w], axis=1)


def re_pixel_box(box: Sequence[int], height: int, width: int) -> Tuple[int, int, int, int]:
    """One stored erase box in pixels (see ``re_pixel_boxes``)."""
    top, left, h, w = (int(v) for v in re_pixel_boxes(np.asarray(box), height, width)[0])
    return top, left, h, w


def cutmix_pixel_box(box: Sequence[int], height: int, width: int) -> Tuple[int, int, int, int]:
    """A stored cutmix box (top, left, bottom, right in 1/255 units) in pixels of an output size (may be empty)."""
    q = np.asarray(box, dtype=np.int64).reshape(4)
    top, bottom = (int(v) for v in q255_to_px(q[[0, 2]], height))
    left, right = (int(v) for v in q255_to_px(q[[1, 3]], width))
    return top, left, bottom, right


def partner_fields(record: np.void) -> Dict[str, Any]:
    """The partner's stored parameters of a ``+mix`` record, under the base field names (``crop``, ``flags``,
    ``ra_ops``, ``re_box``) so they replay with the same functions."""
    names = record.dtype.names
    out = {'crop': record['mix_crop'], 'flags': record['mix_flags']}
    if 'mix_ra_ops' in names:
        out.update(ra_ops=record['mix_ra_ops'], re_box=record['mix_re_box'])
    return out


def needs_partner(record: np.void) -> bool:
    """Whether a stored augmentation mixes with its partner (``+mix`` records with mixup or cutmix applied)."""
    return bool(int(record['flags']) & (FLAG_MIXUP | FLAG_CUTMIX))


def _interp(interpolation: Any) -> InterpolationMode:
    if isinstance(interpolation, InterpolationMode):
        return interpolation
    try:
        return str_to_interp_mode(interpolation)
    except KeyError:
        raise ValueError(f'Unknown interpolation {interpolation!r}') from None


def apply_record_pil(
        img: Image.Image,
        record: Union[np.void, Dict[str, Any]],
        spec: AugmentSpec,
        out_size: Tuple[int, int],
        interpolation: Optional[Any] = None,
) -> Image.Image:
    """The PIL stages of the pipeline: crop + resize, hflip, RandAugment ops (everything before ``to_tensor``).

    ``record`` is a record row or :func:`partner_fields` of one (the partner of a ``+mix`` sample)."""
    h, w = int(out_size[0]), int(out_size[1])
    x, y, cw, ch = (int(v) for v in record['crop'])
    flags = int(record['flags'])
    out = F.resized_crop(img, y, x, ch, cw, [h, w], interpolation=_interp(interpolation or spec.interpolation))
    if flags & FLAG_HFLIP:
        out = F.hflip(out)
    if spec.has_ra_re and spec.ra_num_ops:
        table = _ra_table(spec.ra_num_bins, spec.ra_magnitude, h, w)
        for j, op_index in enumerate(record['ra_ops'][:spec.ra_num_ops]):
            op = spec.ra_ops[int(op_index)]
            magnitude, signed = table[op]
            if signed and flags & FLAG_RA_NEG[j]:
                magnitude = -magnitude
            out = _apply_op(out, op, magnitude, interpolation=RA_INTERPOLATION, fill=None)
    return out


def augment_uint8(
        img: Image.Image,
        records: Union[np.ndarray, Sequence[Dict[str, Any]]],
        spec: AugmentSpec,
        out_size: Tuple[int, int],
        interpolation: Optional[Any] = None,
) -> torch.Tensor:
    """uint8 ``[n, 3, h, w]`` tensors of the PIL stages for every record (what data-loader workers produce)."""
    if img.mode != 'RGB':
        img = img.convert('RGB')
    out = np.empty((len(records), int(out_size[0]), int(out_size[1]), 3), dtype=np.uint8)
    for i, rec in enumerate(records):
        out[i] = np.asarray(apply_record_pil(img, rec, spec, out_size, interpolation))
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def normalize_uint8(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``to_tensor`` + ``normalize`` on uint8 ``[..., 3, h, w]`` (same float32 ops as torchvision, any device)."""
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    return x.float().div_(255).sub_(mean_t).div_(std_t)


def erase_fill(spec: AugmentSpec, mean: Sequence[float], std: Sequence[float],
               device: Optional[torch.device] = None) -> torch.Tensor:
    """float32 ``[3, 1, 1]``: the normalised value of erased pixels (``re_fill``): 0 for ``mean``, and for ``black``
    ``(0 - mean) / std`` computed as torchvision's Normalize would on a zeroed pixel."""
    zero = torch.zeros(len(mean), 1, 1, dtype=torch.float32, device=device)
    if spec.re_fill == 'mean':
        return zero
    return normalize_uint8(zero.to(torch.uint8), mean, std)


def erase_mask(re_boxes: np.ndarray, erase: np.ndarray, height: int, width: int,
               device: Optional[torch.device] = None) -> torch.Tensor:
    """bool ``[n, 1, h, w]``, True where the stored erase boxes cover the input (rows with ``erase`` False are all
    False)."""
    px = torch.from_numpy(re_pixel_boxes(re_boxes, height, width)).to(device).view(-1, 4, 1, 1)
    on = torch.from_numpy(np.asarray(erase, dtype=bool)).to(device).view(-1, 1, 1)
    ys = torch.arange(height, device=device).view(1, -1, 1)
    xs = torch.arange(width, device=device).view(1, 1, -1)
    top, left, h, w = px[:, 0], px[:, 1], px[:, 2], px[:, 3]
    mask = (ys >= top) & (ys < top + h) & (xs >= left) & (xs < left + w) & on
    return mask.unsqueeze(1)


def erase_(x: torch.Tensor, record: Union[np.void, Dict[str, Any]], spec: AugmentSpec, fill: torch.Tensor) -> None:
    """Apply a record's stored erase box (if any) to a normalised ``[3, h, w]`` tensor in place."""
    if spec.has_ra_re and int(record['flags']) & FLAG_ERASE:
        top, left, h, w = re_pixel_box(record['re_box'], x.shape[-2], x.shape[-1])
        x[:, top:top + h, left:left + w] = fill


def mix_(x: Any, x2: Any, record: np.void) -> Any:
    """Mix a normalised sample ``x`` with its normalised partner ``x2`` as the record says (ml-dr's order: mixup
    ``lam * x + (1 - lam) * x2``, then the cutmix box of ``x2`` pasted into ``x``). Returns the mixed tensor.

    ``x``/``x2`` are float32 torch tensors or numpy arrays (the training loader): both compute in float32 with the
    Python scalars rounded to float32, so the results are bit-identical."""
    flags = int(record['flags'])
    if flags & FLAG_MIXUP:
        lam = float(record['mix_lam'])
        x = x * lam + x2 * (1.0 - lam)  # torch computes in float32 with both scalars rounded to float32
    if flags & FLAG_CUTMIX:
        top, left, bottom, right = cutmix_pixel_box(record['mix_box'], x.shape[-2], x.shape[-1])
        x[:, top:bottom, left:right] = x2[:, top:bottom, left:right]
    return x


def augment_partners_uint8(
        partners: Dict[int, Image.Image],
        records: np.ndarray,
        spec: AugmentSpec,
        out_size: Tuple[int, int],
        interpolation: Optional[Any] = None,
) -> torch.Tensor:
    """uint8 ``[n, 3, h, w]`` PIL stages of the partner half of ``+mix`` records (``partners``: ``mix_ref`` -> image);
    rows that do not mix stay zero."""
    out = np.zeros((len(records), int(out_size[0]), int(out_size[1]), 3), dtype=np.uint8)
    for i, rec in enumerate(records):
        if needs_partner(rec):
            img = partners[int(rec['mix_ref'])]
            out[i] = np.asarray(apply_record_pil(img, partner_fields(rec), spec, out_size, interpolation))
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def erase_batch(x: torch.Tensor, boxes: np.ndarray, erase: np.ndarray, fill: torch.Tensor) -> torch.Tensor:
    """A batch ``[n, 3, h, w]`` with the stored erase boxes of rows ``erase`` set to ``fill`` (``erase_fill``)."""
    if not np.asarray(erase).any():
        return x
    mask = erase_mask(boxes, erase, x.shape[-2], x.shape[-1], device=x.device)
    return torch.where(mask, fill.to(x.device).view(1, -1, 1, 1), x)


def mix_batch(x: torch.Tensor, x2: torch.Tensor, records: np.ndarray) -> torch.Tensor:
    """:func:`mix_` for a batch (the writer's teacher inputs): the same float32 operations row by row."""
    flags = records['flags']
    mixup = (flags & FLAG_MIXUP) > 0
    if mixup.any():
        lam = np.where(mixup, records['mix_lam'], 0).astype(np.float32)
        rest = (1.0 - lam.astype(np.float64)).astype(np.float32)  # as torch rounds ``1.0 - lam`` to a float32 scalar
        lam_t = torch.from_numpy(lam).to(x.device).view(-1, 1, 1, 1)
        rest_t = torch.from_numpy(rest).to(x.device).view(-1, 1, 1, 1)
        on = torch.from_numpy(mixup).to(x.device).view(-1, 1, 1, 1)
        x = torch.where(on, x * lam_t + x2 * rest_t, x)
    cutmix = (flags & FLAG_CUTMIX) > 0
    if cutmix.any():
        h, w = x.shape[-2], x.shape[-1]
        q = np.asarray(records['mix_box'], dtype=np.int64).reshape(-1, 4)
        edges = np.stack([q255_to_px(q[:, 0], h), q255_to_px(q[:, 1], w), q255_to_px(q[:, 2], h),
                          q255_to_px(q[:, 3], w)], axis=1)
        e = torch.from_numpy(edges).to(x.device).view(-1, 4, 1, 1)
        ys = torch.arange(h, device=x.device).view(1, -1, 1)
        xs = torch.arange(w, device=x.device).view(1, 1, -1)
        on = torch.from_numpy(cutmix).to(x.device).view(-1, 1, 1)
        mask = (ys >= e[:, 0]) & (ys < e[:, 2]) & (xs >= e[:, 1]) & (xs < e[:, 3]) & on
        x = torch.where(mask.unsqueeze(1), x2, x)
    return x


def apply_record(
        img: Image.Image,
        record: np.void,
        spec: AugmentSpec,
        out_size: Tuple[int, int],
        mean: Sequence[float],
        std: Sequence[float],
        interpolation: Optional[Any] = None,
        partner: Optional[Image.Image] = None,
) -> torch.Tensor:
    """The whole pipeline for one stored augmentation: normalised float32 ``[3, h, w]``; deterministic, no RNG.

    Args:
        img: the original image (converted to RGB if needed).
        record: one row of a record array (``crop``, ``flags``, ``ra_ops``/``re_box`` for ``rrc+ra_re``, the
            partner fields for ``+mix``).
        spec: the augmentation family (``AugmentSpec.from_dict(meta['augmentation'])``).
        out_size: (h, w) of the output.
        mean: normalisation mean.
        std: normalisation std.
        interpolation: resize interpolation (default ``spec.interpolation``).
        partner: the partner's original image (``+mix`` records that mix; ``record['mix_ref']`` names it).
    """
    fill = erase_fill(spec, mean, std)

    def one(image, fields):
        if image.mode != 'RGB':
            image = image.convert('RGB')
        x = normalize_uint8(F.pil_to_tensor(apply_record_pil(image, fields, spec, out_size, interpolation)), mean, std)
        erase_(x, fields, spec, fill)
        return x

    x = one(img, record)
    if spec.has_mix and needs_partner(record):
        if partner is None:
            raise ValueError(f'stored augmentation mixes with partner {int(record["mix_ref"])}: pass its image')
        x = mix_(x, one(partner, partner_fields(record)), record)
    return x


def decode_image(data: bytes) -> Image.Image:
    """Original bytes -> RGB PIL image (how the writer and ``replay`` decode)."""
    img = Image.open(io.BytesIO(data))
    img.load()
    return img.convert('RGB')


def replay(image: Union[Image.Image, bytes], record: np.void, meta: Dict[str, Any], member: int = 0,
           partner: Optional[Union[Image.Image, bytes]] = None) -> torch.Tensor:
    """Exactly the normalised ``[3, h, w]`` tensor teacher ``member`` saw for a stored augmentation.

    Args:
        image: the original image (PIL or the shard's encoded bytes).
        record: one row of the sample's ``.rd.npy`` records.
        meta: ``reinforce.json`` as a dict (``load_meta``).
        member: ensemble member index (its mean/std/input_size/interpolation come from ``meta['teachers']``).
        partner: the partner image of a mixing record (``+mix`` variants; PIL or encoded bytes).
    """
    if isinstance(image, (bytes, bytearray)):
        image = decode_image(bytes(image))
    if isinstance(partner, (bytes, bytearray)):
        partner = decode_image(bytes(partner))
    spec = AugmentSpec.from_dict(meta['augmentation'])
    t = meta['teachers'][member]
    size = (int(t['input_size'][1]), int(t['input_size'][2]))
    return apply_record(image, record, spec, size, t['mean'], t['std'], interpolation=t['interpolation'],
                        partner=partner)
