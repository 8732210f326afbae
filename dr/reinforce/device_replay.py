"""Replay of stored augmentations on a torch device (``train.py --replay-device cpu|cuda``).

The PIL replay (``augment.apply_record``, run per sample in the loader's workers) is the reference. Here the workers
only read shards and pick the stored augmentation (same epoch order, ``sample_draws``, integrity checks and targets
as the PIL path) and hand a :class:`RawBatch` (encoded image bytes + the chosen record rows) to the main process,
where :func:`replay_batch` runs the same pipeline with tensors on ``device``:

* decode: ``torchvision.io.decode_jpeg`` on a list of JPEGs on the target device (nvJPEG on CUDA), PNG and other
  formats with ``torchvision.io.decode_image`` on the CPU (PIL for anything torchvision cannot read), then moved;
* crop box + resize per sample (``transforms.v2.functional.resized_crop``, ``antialias=True``);
* hflip, the RandAugment ops (grouped by op slot, op and sign, so each group runs as one batched call with
  torchvision's tensor implementation of the op at the magnitude of ``augment._ra_table``), normalisation
  (``augment.normalize_uint8``), random erasing (``augment.erase_batch``) and mixup/cutmix (``augment.mix_batch``)
  batched over the samples (the partners of ``+mix`` samples ride in the same batch).

Crop, flip, erase and mixing parameters are read from the same record fields with the same integer arithmetic as the
PIL path, so they are identical; pixels differ only where PIL's and torch's implementations of a resampling or colour
operation round differently (bounds in ``tests/reinforce/test_device_replay.py`` and docs/reinforce.md).
"""
import dataclasses
import io
import logging
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torchvision.io import ImageReadMode, decode_image, decode_jpeg
from torchvision.transforms import InterpolationMode

from .augment import (
    RA_INTERPOLATION,
    AugmentSpec,
    _interp,
    _ra_table,
    erase_batch,
    erase_fill,
    mix_batch,
    normalize_uint8,
)
from .format import FLAG_CUTMIX, FLAG_ERASE, FLAG_HFLIP, FLAG_MIXUP, FLAG_RA_NEG, densify

_logger = logging.getLogger(__name__)

REPLAY_DEVICES = ('', 'cpu', 'cuda')
JPEG_EXTS = ('jpg', 'jpeg')


@dataclasses.dataclass
class RawBatch:
    """What a worker hands to the main process for a device replay (a plain object: the DataLoader passes it as is).

    Attributes:
        images: encoded bytes of each replayed sample's image.
        exts: the image member's extension per sample (``jpg``, ``png``, ...).
        records: the chosen stored augmentation of each replayed sample (record array rows).
        partners: ``(ext, bytes)`` of the partner image of each mixing sample, None for the others.
        rows: batch positions of the replayed samples.
        where: ``shard ... key ...`` of each replayed sample (for errors).
        target: ``[B, K]`` densified targets of the whole batch (one-hot for fallback rows).
        labels: ``[B]`` labels.
        fallback: ``[B, C, H, W]`` float32 inputs with the fallback rows filled (None when there are none).
    """
    images: List[bytes]
    exts: List[str]
    records: np.ndarray
    partners: List[Optional[Tuple[str, bytes]]]
    rows: List[int]
    where: List[str]
    target: torch.Tensor
    labels: torch.Tensor
    fallback: Optional[torch.Tensor] = None


def check_replay_device(replay_device: Optional[str], flag: str = '--replay-device') -> str:
    """Normalise a replay device ('' / None: PIL workers); CUDA is only touched when it is asked for."""
    name = (replay_device or '').strip()
    if name not in REPLAY_DEVICES:
        raise ValueError(f'{flag}: expected one of cpu, cuda (or empty for the PIL workers), got {replay_device!r}')
    if name == 'cuda' and not torch.cuda.is_available():
        raise ValueError(f'{flag} cuda: CUDA is not available on this machine (use {flag} cpu or leave it out)')
    return name


# ----------------------------------------------------------------------------------------------------------------------
# decoding


def _pil_decode(data: bytes) -> torch.Tensor:
    img = Image.open(io.BytesIO(data))
    img.load()
    if img.mode != 'RGB':
        img = img.convert('RGB')
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).contiguous()


def decode_images(images: Sequence[bytes], exts: Sequence[str], device: Union[str, torch.device],
                  where: Optional[Sequence[str]] = None) -> List[torch.Tensor]:
    """Encoded images -> uint8 RGB ``[3, h, w]`` tensors on ``device``.

    JPEGs are decoded together with ``torchvision.io.decode_jpeg`` on ``device`` (nvJPEG on CUDA); PNG and the other
    formats with ``decode_image`` on the CPU, or PIL for what torchvision cannot read (CMYK JPEGs, WebP builds
    without libwebp, ...), then moved. ``where`` names each image in errors.
    """
    device = torch.device(device)
    out: List[Optional[torch.Tensor]] = [None] * len(images)
    buffers = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in images]
    jpeg = [i for i, e in enumerate(exts) if str(e).lower() in JPEG_EXTS]
    if jpeg:
        try:
            decoded = decode_jpeg([buffers[i] for i in jpeg], mode=ImageReadMode.RGB, device=device)
            for i, t in zip(jpeg, decoded):
                out[i] = t
        except RuntimeError:  # one bad or unusual JPEG fails the list: decode them one by one below
            pass
    for i in range(len(images)):
        if out[i] is not None:
            continue
        try:
            try:
                t = decode_image(buffers[i], mode=ImageReadMode.RGB)
            except RuntimeError:
                t = _pil_decode(images[i])
        except Exception as e:
            name = where[i] if where else f'image {i}'
            raise ValueError(f'{name}: undecodable image member .{exts[i]} ({type(e).__name__}: {e})') from e
        out[i] = t.to(device)
    return out  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------------------------------
# the tensor stages


def _resize_mode(interpolation: InterpolationMode) -> InterpolationMode:
    # PIL's nearest samples pixel centres, as torch's 'nearest-exact' (torch's 'nearest' floors)
    return InterpolationMode.NEAREST_EXACT if interpolation == InterpolationMode.NEAREST else interpolation


def crop_resize(images: Sequence[torch.Tensor], crops: np.ndarray, out_size: Tuple[int, int],
                interpolation: InterpolationMode) -> torch.Tensor:
    """uint8 ``[n, 3, h, w]``: crop box ``(x, y, w, h)`` of each image resized to ``out_size`` with antialias
    (per sample; crops of one source image and size share nothing else to batch)."""
    h, w = int(out_size[0]), int(out_size[1])
    mode = _resize_mode(interpolation)
    out = []
    for img, (x, y, cw, ch) in zip(images, np.asarray(crops, dtype=np.int64).tolist()):
        out.append(TF.resized_crop(img, y, x, ch, cw, [h, w], interpolation=mode, antialias=True))
    return torch.stack(out)


def apply_ra_op(x: torch.Tensor, op: str, magnitude: float) -> torch.Tensor:
    """One RandAugment op on a uint8 batch ``[n, 3, h, w]`` with ``transforms.v2.functional`` (the op definitions of
    ``torchvision.transforms.autoaugment._apply_op``: nearest interpolation, black fill)."""
    mode = RA_INTERPOLATION
    if op == 'Identity':
        return x
    if op == 'ShearX':
        return TF.affine(x, angle=0.0, translate=[0, 0], scale=1.0, shear=[math.degrees(math.atan(magnitude)), 0.0],
                         interpolation=mode, fill=None, center=[0, 0])
    if op == 'ShearY':
        return TF.affine(x, angle=0.0, translate=[0, 0], scale=1.0, shear=[0.0, math.degrees(math.atan(magnitude))],
                         interpolation=mode, fill=None, center=[0, 0])
    if op == 'TranslateX':
        return TF.affine(x, angle=0.0, translate=[int(magnitude), 0], scale=1.0, shear=[0.0, 0.0],
                         interpolation=mode, fill=None)
    if op == 'TranslateY':
        return TF.affine(x, angle=0.0, translate=[0, int(magnitude)], scale=1.0, shear=[0.0, 0.0],
                         interpolation=mode, fill=None)
    if op == 'Rotate':
        return TF.rotate(x, magnitude, interpolation=mode, fill=None)
    if op == 'Brightness':
        return TF.adjust_brightness(x, 1.0 + magnitude)
    if op == 'Color':
        return TF.adjust_saturation(x, 1.0 + magnitude)
    if op == 'Contrast':
        return TF.adjust_contrast(x, 1.0 + magnitude)
    if op == 'Sharpness':
        return TF.adjust_sharpness(x, 1.0 + magnitude)
    if op == 'Posterize':
        return TF.posterize(x, int(magnitude))
    if op == 'Solarize':
        return TF.solarize(x, magnitude)
    if op == 'AutoContrast':
        return TF.autocontrast(x)
    if op == 'Equalize':
        return TF.equalize(x)
    if op == 'Invert':
        return TF.invert(x)
    raise ValueError(f'unknown RandAugment op {op!r}')


def apply_ra_batch(x: torch.Tensor, ra_ops: np.ndarray, flags: np.ndarray, spec: AugmentSpec) -> torch.Tensor:
    """The stored RandAugment ops of each row of a uint8 batch, slot by slot; rows sharing (op, sign) in a slot run
    as one batched call."""
    if not (spec.has_ra_re and spec.ra_num_ops) or len(x) == 0:
        return x
    table = _ra_table(spec.ra_num_bins, spec.ra_magnitude, x.shape[-2], x.shape[-1])
    ra_ops = np.asarray(ra_ops, dtype=np.int64).reshape(len(x), -1)
    flags = np.asarray(flags, dtype=np.int64)
    x = x.clone()
    for j in range(spec.ra_num_ops):
        neg = (flags & FLAG_RA_NEG[j]) > 0
        for op_index in np.unique(ra_ops[:, j]).tolist():
            op = spec.ra_ops[op_index]
            magnitude, signed = table[op]
            for sign in ((False, True) if signed else (None,)):
                rows = ra_ops[:, j] == op_index
                if sign is not None:
                    rows &= neg == sign
                if not rows.any() or op == 'Identity':
                    continue
                idx = torch.from_numpy(np.flatnonzero(rows)).to(x.device)
                x[idx] = apply_ra_op(x[idx], op, -magnitude if sign else magnitude)
    return x


def replay_uint8(images: Sequence[torch.Tensor], crops: np.ndarray, flags: np.ndarray,
                 ra_ops: Optional[np.ndarray], spec: AugmentSpec, out_size: Tuple[int, int],
                 interpolation: Any) -> torch.Tensor:
    """The stages before ``to_tensor`` (``augment.apply_record_pil``) for a batch: uint8 ``[n, 3, h, w]``."""
    x = crop_resize(images, crops, out_size, _interp(interpolation or spec.interpolation))
    flip = torch.from_numpy((np.asarray(flags, dtype=np.int64) & FLAG_HFLIP) > 0).to(x.device)
    if bool(flip.any()):
        x = torch.where(flip.view(-1, 1, 1, 1), TF.horizontal_flip(x), x)
    if ra_ops is not None:
        x = apply_ra_batch(x, ra_ops, flags, spec)
    return x


def _fields(records: np.ndarray, partner: bool) -> Dict[str, Optional[np.ndarray]]:
    p = 'mix_' if partner else ''
    names = records.dtype.names
    return {'crop': records[p + 'crop'], 'flags': records[p + 'flags'],
            'ra_ops': records[p + 'ra_ops'] if p + 'ra_ops' in names else None,
            're_box': records[p + 're_box'] if p + 're_box' in names else None}


def replay_records(
        images: Sequence[torch.Tensor],
        records: np.ndarray,
        spec: AugmentSpec,
        out_size: Tuple[int, int],
        mean: Sequence[float],
        std: Sequence[float],
        interpolation: Optional[Any] = None,
        partners: Optional[Sequence[Optional[torch.Tensor]]] = None,
) -> torch.Tensor:
    """``augment.apply_record`` for a batch of decoded images (uint8 ``[3, h, w]`` on one device) and their stored
    records: normalised float32 ``[n, 3, H, W]`` on that device.

    ``partners[i]`` is the decoded partner image of a mixing record (``+mix``), None for the others. The partners are
    replayed in the same batch as the samples (one resize per crop, the other stages batched)."""
    records = np.asarray(records)
    n = len(records)
    mixing = np.zeros(n, dtype=bool)
    if spec.has_mix:
        mixing = (records['flags'].astype(np.int64) & (FLAG_MIXUP | FLAG_CUTMIX)) > 0
        missing = [i for i in np.flatnonzero(mixing) if partners is None or partners[i] is None]
        if missing:
            raise ValueError(f'stored augmentation {missing[0]} mixes with partner '
                             f'{int(records[missing[0]]["mix_ref"])}: pass its image')
    mix_rows = np.flatnonzero(mixing)
    cat = _fields(records, False)
    if len(mix_rows):  # the partner halves ride behind the samples
        other = _fields(records[mix_rows], True)
        cat = {k: (None if cat[k] is None else np.concatenate([cat[k], other[k]])) for k in cat}
    srcs = list(images) + [partners[i] for i in mix_rows] if len(mix_rows) else list(images)
    u8 = replay_uint8(srcs, cat['crop'], cat['flags'], cat['ra_ops'] if spec.has_ra_re else None, spec, out_size,
                      interpolation)
    x = normalize_uint8(u8, mean, std)
    if spec.has_ra_re and cat['re_box'] is not None:
        erase = (cat['flags'].astype(np.int64) & FLAG_ERASE) > 0
        x = erase_batch(x, cat['re_box'], erase, erase_fill(spec, mean, std, device=x.device))
    out, x2 = x[:n], x[n:]
    if len(mix_rows):
        full = torch.zeros_like(out)
        full[torch.from_numpy(mix_rows).to(out.device)] = x2
        out = mix_batch(out, full, records)
    return out


def replay_batch(raw: RawBatch, spec: AugmentSpec, input_size: Sequence[int], mean: Sequence[float],
                 std: Sequence[float], interpolation: Optional[Any], device: Union[str, torch.device]
                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A worker's :class:`RawBatch` -> ``(input float32 [B, C, H, W], target [B, K], labels [B])`` on ``device``, the
    batch the PIL path's ``ReinforcedShards.collate`` gives (within the per-operation bounds)."""
    device = torch.device(device)
    c, h, w = (int(v) for v in input_size)
    n = len(raw.labels)
    exts = list(raw.exts) + [p[0] for p in raw.partners if p is not None]
    data = list(raw.images) + [p[1] for p in raw.partners if p is not None]
    where = list(raw.where) + [f'{raw.where[i]} (partner {int(raw.records[i]["mix_ref"])})'
                               for i, p in enumerate(raw.partners) if p is not None]
    decoded = decode_images(data, exts, device, where) if data else []
    m = len(raw.images)
    it = iter(decoded[m:])
    partners = [next(it) if p is not None else None for p in raw.partners]
    non_blocking = device.type == 'cuda'
    if raw.fallback is not None:
        x = raw.fallback.to(device, non_blocking=non_blocking)
    else:
        x = torch.empty((n, c, h, w), dtype=torch.float32, device=device)
    if m:
        rd = replay_records(decoded[:m], raw.records, spec, (h, w), mean, std, interpolation, partners)
        if m == n:
            x = rd
        else:
            x[torch.as_tensor(raw.rows, device=device)] = rd
    return x, raw.target.to(device, non_blocking=non_blocking), raw.labels.to(device, non_blocking=non_blocking)


def replay_bytes(images: Sequence[bytes], exts: Sequence[str], records: np.ndarray, spec: AugmentSpec,
                 out_size: Tuple[int, int], mean: Sequence[float], std: Sequence[float],
                 interpolation: Optional[Any] = None, partners: Optional[Sequence[Optional[Tuple[str, bytes]]]] = None,
                 device: Union[str, torch.device] = 'cpu') -> torch.Tensor:
    """Decode and replay on ``device`` (tests and benchmarks): ``partners[i]`` = ``(ext, bytes)`` or None."""
    decoded = decode_images(images, exts, device)
    dec_partners = None
    if partners is not None:
        dec_partners = [None if p is None else decode_images([p[1]], [p[0]], device)[0] for p in partners]
    return replay_records(decoded, records, spec, out_size, mean, std, interpolation, dec_partners)


# ----------------------------------------------------------------------------------------------------------------------
# the loader's side (``ReinforcedShards`` with ``replay_device``)


def image_header(data: bytes) -> Optional[Image.Image]:
    """A lazily opened image (size read from the header, pixels not decoded): the worker's crop-box checks; None when
    PIL cannot identify it (the loader's decoder then names the member)."""
    try:
        return Image.open(io.BytesIO(data))
    except Exception:
        return None


def collate_raw(samples: Sequence[Tuple[Any, ...]], input_size: Sequence[int], num_classes: int,
                rd_densify: str) -> RawBatch:
    """A worker's batch for the device replay: ``('raw', ext, bytes, label, record, partner or None, where)`` rows
    (stored reinforcement) and ``('fb', tensor, label)`` rows (the fallback transform, already applied); targets are
    densified as ``ReinforcedShards.collate`` does."""
    n = len(samples)
    c, h, w = (int(v) for v in input_size)
    labels = torch.tensor([s[3] if s[0] == 'raw' else s[2] for s in samples], dtype=torch.int64)
    target = torch.zeros((n, int(num_classes)), dtype=torch.float32)
    target.scatter_(1, labels[:, None], 1.0)
    rows = [i for i, s in enumerate(samples) if s[0] == 'raw']
    fallback = None
    if len(rows) < n:
        fallback = torch.zeros((n, c, h, w), dtype=torch.float32)
        for i, s in enumerate(samples):
            if s[0] == 'fb':
                fallback[i] = s[1]
    records = np.stack([samples[i][4] for i in rows]) if rows else np.zeros(0)
    if rows:
        target[rows] = densify(records['ids'], records['probs'], int(num_classes), mode=rd_densify)
    return RawBatch(images=[samples[i][2] for i in rows], exts=[samples[i][1] for i in rows], records=records,
                    partners=[samples[i][5] for i in rows], rows=rows, where=[samples[i][6] for i in rows],
                    target=target, labels=labels, fallback=fallback)
