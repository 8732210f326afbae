"""Augmentations with explicit, stored parameters that replay exactly (dataset reinforcement).

Pipeline (teacher and student alike): crop box on the original image -> resize to the output size -> hflip ->
RandAugment ops (torchvision's op implementations and magnitude table, applied with fixed parameters) -> to tensor ->
normalise -> random-erasing box filled with 0.

``sample_records`` draws the parameters with a numpy Generator and quantises them to the stored integer fields;
``apply_record`` only reads a record (no RNG), so a stored augmentation is reproduced bit for bit.
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

from .format import AUG_NAMES, AUG_RRC, AUG_RRC_RA_RE, FLAG_ERASE, FLAG_HFLIP, FLAG_RA_NEG

_logger = logging.getLogger(__name__)

# torchvision RandAugment's op table, in its order (Identity, ShearX, ..., Equalize); stored ra_ops index into it.
RA_OPS: Tuple[str, ...] = tuple(RandAugment()._augmentation_space(31, (32, 32)).keys())
# RandAugment ops run with torchvision's defaults: nearest interpolation, black fill
RA_INTERPOLATION = InterpolationMode.NEAREST
RE_MAX_ATTEMPTS = 10
RRC_MAX_ATTEMPTS = 10
MAX_RA_OPS = 2  # slots in the record's ra_ops field


@dataclasses.dataclass
class AugmentSpec:
    """Parameters of a stored-augmentation family (saved in reinforce.json under ``augmentation``).

    Attributes:
        name: ``rrc`` (random-resized-crop + hflip) or ``rrc+ra_re`` (+ RandAugment + random erasing).
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
        if self.name == AUG_RRC and (self.ra_num_ops or self.re_prob):
            raise ValueError('augmentation rrc stores crop and flip only: ra_num_ops and re_prob must be 0')
        str_to_interp_mode(self.interpolation)  # KeyError for unknown names

    @property
    def has_ra_re(self) -> bool:
        return self.name == AUG_RRC_RA_RE

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> 'AugmentSpec':
        """Inverse of ``to_dict``; unknown keys (added by later schema versions) are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names})


def create_augment_spec(name: str, **overrides) -> AugmentSpec:
    """The paper's settings for ``rrc`` (crop + flip) or ``rrc+ra_re`` (RandAugment 2 ops at magnitude 9 of 31 with
    random sign, random erasing p=0.25), with keyword overrides of any ``AugmentSpec`` field."""
    if name not in AUG_NAMES:
        raise ValueError(f'--aug: unknown augmentation {name!r}; expected one of {", ".join(AUG_NAMES)}')
    fields = {f.name for f in dataclasses.fields(AugmentSpec)}
    bad = sorted(set(overrides) - fields)
    if bad:
        raise ValueError(f'Unknown augmentation parameter(s): {", ".join(bad)}')
    base: Dict[str, Any] = {'name': name}
    if name == AUG_RRC:
        base.update(ra_num_ops=0, re_prob=0.0)
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


def sample_crops(rng: np.random.Generator, width: int, height: int, n: int,
                 scale: Sequence[float], ratio: Sequence[float]) -> np.ndarray:
    """``n`` random-resized-crop boxes (x, y, w, h) in pixels, torchvision's RandomResizedCrop sampling rule
    (10 attempts, then a centre crop clamped to the ratio range), vectorised over samples."""
    area = float(width * height)
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    target = area * rng.uniform(scale[0], scale[1], size=(n, RRC_MAX_ATTEMPTS))
    aspect = np.exp(rng.uniform(log_ratio[0], log_ratio[1], size=(n, RRC_MAX_ATTEMPTS)))
    cw = np.round(np.sqrt(target * aspect)).astype(np.int64)
    ch = np.round(np.sqrt(target / aspect)).astype(np.int64)
    ok = (cw > 0) & (cw <= width) & (ch > 0) & (ch <= height)
    first = ok.argmax(axis=1)
    rows = np.arange(n)
    cw, ch = cw[rows, first], ch[rows, first]
    u = rng.random((n, 2))
    x = np.floor(u[:, 0] * (width - cw + 1)).astype(np.int64)
    y = np.floor(u[:, 1] * (height - ch + 1)).astype(np.int64)
    fallback = ~ok.any(axis=1)
    if fallback.any():
        in_ratio = width / height
        if in_ratio < min(ratio):
            fw, fh = width, int(round(width / min(ratio)))
        elif in_ratio > max(ratio):
            fh, fw = height, int(round(height * max(ratio)))
        else:
            fw, fh = width, height
        cw[fallback], ch[fallback] = fw, fh
        x[fallback], y[fallback] = (width - fw) // 2, (height - fh) // 2
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


def sample_records(
        rng: np.random.Generator,
        width: int,
        height: int,
        spec: AugmentSpec,
        n: int,
        dtype: np.dtype,
) -> np.ndarray:
    """Draw ``n`` augmentations for a ``width`` x ``height`` image into a record array of ``dtype``.

    Fills ``crop``, ``flags`` and (``rrc+ra_re``) ``ra_ops``/``re_box``; ``ids``/``probs`` stay zero for the teacher.
    The draws are a fixed sequence from ``rng``, so a Generator seeded from (seed, image index) gives the same records
    on any rank, worker or resume.
    """
    if spec.has_ra_re and 'ra_ops' not in dtype.names:
        raise ValueError(f'record dtype lacks ra_ops/re_box fields needed by augmentation {spec.name}')
    rec = np.zeros(n, dtype=dtype)
    crops = sample_crops(rng, width, height, n, spec.scale, spec.ratio)
    if crops.max(initial=0) > np.iinfo(dtype['crop'].base).max:
        raise ValueError(f'image side {max(width, height)} does not fit the crop field ({dtype["crop"].base})')
    rec['crop'] = crops
    flags = np.where(rng.random(n) < spec.hflip, FLAG_HFLIP, 0).astype(np.uint8)
    if spec.has_ra_re:
        ops = np.zeros((n, MAX_RA_OPS), dtype=np.int64)
        if spec.ra_num_ops:
            ops[:, :spec.ra_num_ops] = rng.integers(0, len(spec.ra_ops), size=(n, spec.ra_num_ops))
            if spec.ra_num_ops < MAX_RA_OPS:  # unused slots hold Identity
                ops[:, spec.ra_num_ops:] = spec.ra_ops.index('Identity')
            neg = (rng.random((n, spec.ra_num_ops)) < 0.5) & _signed_ops(spec)[ops[:, :spec.ra_num_ops]]
            for j in range(spec.ra_num_ops):
                flags |= np.where(neg[:, j], FLAG_RA_NEG[j], 0).astype(np.uint8)
        else:
            ops[:] = spec.ra_ops.index('Identity')
        rec['ra_ops'] = ops.astype(np.uint8)
        boxes, erase = sample_erase_boxes(rng, n, spec.re_prob, spec.re_scale, spec.re_ratio)
        rec['re_box'] = boxes
        flags |= np.where(erase, FLAG_ERASE, 0).astype(np.uint8)
    rec['flags'] = flags
    return rec


def re_pixel_boxes(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """Stored erase boxes ``[n, 4]`` (top, left, h, w in 1/255 units) in pixels (top, left, h, w) of an output size.

    Integer arithmetic (round half up; at least one pixel, shifted inside the image), so the writer, any replay and
    any output size agree exactly.
    """
    q = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
    h = np.clip((q[:, 2] * height + 127) // 255, 1, height)
    w = np.clip((q[:, 3] * width + 127) // 255, 1, width)
    top = np.minimum((q[:, 0] * height + 127) // 255, height - h)
    left = np.minimum((q[:, 1] * width + 127) // 255, width - w)
    return np.stack([top, left, h, w], axis=1)


def re_pixel_box(box: Sequence[int], height: int, width: int) -> Tuple[int, int, int, int]:
    """One stored erase box in pixels (see ``re_pixel_boxes``)."""
    top, left, h, w = (int(v) for v in re_pixel_boxes(np.asarray(box), height, width)[0])
    return top, left, h, w


def _interp(interpolation: Any) -> InterpolationMode:
    if isinstance(interpolation, InterpolationMode):
        return interpolation
    try:
        return str_to_interp_mode(interpolation)
    except KeyError:
        raise ValueError(f'Unknown interpolation {interpolation!r}') from None


def apply_record_pil(
        img: Image.Image,
        record: np.void,
        spec: AugmentSpec,
        out_size: Tuple[int, int],
        interpolation: Optional[Any] = None,
) -> Image.Image:
    """The PIL stages of the pipeline: crop + resize, hflip, RandAugment ops (everything before ``to_tensor``)."""
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
        records: np.ndarray,
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


def erase_mask(re_boxes: np.ndarray, erase: np.ndarray, height: int, width: int,
               device: Optional[torch.device] = None) -> torch.Tensor:
    """bool ``[n, 1, h, w]``, True where the stored erase boxes zero the normalised input (rows with ``erase``
    False are all False)."""
    px = torch.from_numpy(re_pixel_boxes(re_boxes, height, width)).to(device).view(-1, 4, 1, 1)
    on = torch.from_numpy(np.asarray(erase, dtype=bool)).to(device).view(-1, 1, 1)
    ys = torch.arange(height, device=device).view(1, -1, 1)
    xs = torch.arange(width, device=device).view(1, 1, -1)
    top, left, h, w = px[:, 0], px[:, 1], px[:, 2], px[:, 3]
    mask = (ys >= top) & (ys < top + h) & (xs >= left) & (xs < left + w) & on
    return mask.unsqueeze(1)


def apply_record(
        img: Image.Image,
        record: np.void,
        spec: AugmentSpec,
        out_size: Tuple[int, int],
        mean: Sequence[float],
        std: Sequence[float],
        interpolation: Optional[Any] = None,
) -> torch.Tensor:
    """The whole pipeline for one stored augmentation: normalised float32 ``[3, h, w]``; deterministic, no RNG.

    Args:
        img: the original image (converted to RGB if needed).
        record: one row of a record array (``crop``, ``flags``, and ``ra_ops``/``re_box`` for ``rrc+ra_re``).
        spec: the augmentation family (``AugmentSpec.from_dict(meta['augmentation'])``).
        out_size: (h, w) of the output.
        mean: normalisation mean.
        std: normalisation std.
        interpolation: resize interpolation (default ``spec.interpolation``).
    """
    if img.mode != 'RGB':
        img = img.convert('RGB')
    x = normalize_uint8(F.pil_to_tensor(apply_record_pil(img, record, spec, out_size, interpolation)), mean, std)
    if spec.has_ra_re and int(record['flags']) & FLAG_ERASE:
        top, left, h, w = re_pixel_box(record['re_box'], x.shape[-2], x.shape[-1])
        x[:, top:top + h, left:left + w] = 0
    return x


def decode_image(data: bytes) -> Image.Image:
    """Original bytes -> RGB PIL image (how the writer and ``replay`` decode)."""
    img = Image.open(io.BytesIO(data))
    img.load()
    return img.convert('RGB')


def replay(image: Union[Image.Image, bytes], record: np.void, meta: Dict[str, Any], member: int = 0) -> torch.Tensor:
    """Exactly the normalised ``[3, h, w]`` tensor teacher ``member`` saw for a stored augmentation.

    Args:
        image: the original image (PIL or the shard's encoded bytes).
        record: one row of the sample's ``.rd.npy`` records.
        meta: ``reinforce.json`` as a dict (``load_meta``).
        member: ensemble member index (its mean/std/input_size/interpolation come from ``meta['teachers']``).
    """
    if isinstance(image, (bytes, bytearray)):
        image = decode_image(bytes(image))
    spec = AugmentSpec.from_dict(meta['augmentation'])
    t = meta['teachers'][member]
    size = (int(t['input_size'][1]), int(t['input_size'][2]))
    return apply_record(image, record, spec, size, t['mean'], t['std'], interpolation=t['interpolation'])
