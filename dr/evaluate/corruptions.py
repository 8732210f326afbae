"""Common corruptions: ImageNet-C constants and mCE arithmetic, and the on-the-fly digits-C set.

ImageNet-C (Hendrycks & Dietterich, ICLR 2019, "Benchmarking Neural Network Robustness to Common Corruptions and
Perturbations") has 15 benchmark corruptions at 5 severities plus 4 extra ones (``speckle_noise``, ``gaussian_blur``,
``spatter``, ``saturate``) that are not part of the mCE. The corruption error of model ``f`` on corruption ``c`` is

    CE_c = sum_s E^f_{s,c} / sum_s E^AlexNet_{s,c}

(``E`` = top-1 error at severity ``s``) and mCE = mean over the 15 corruptions of CE_c, in percent.
Since every corruption has all 5 severities, ``CE_c = mean_s E^f_{s,c} / mean_s E^AlexNet_{s,c}``, which is how the
constants below are stored (AlexNet's top-1 error averaged over the 5 severities, as a fraction).

digits-C applies a few cheap, seeded corruptions to the embedded digits val split (see ``DIGITS_C_CORRUPTIONS``).
There is no AlexNet baseline for digits, so only the unnormalised mean error is reported there.
"""
import io
import logging
import math
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np
from PIL import Image, ImageFilter
from torch.utils.data import Dataset

_logger = logging.getLogger(__name__)

SEVERITIES = (1, 2, 3, 4, 5)

IMAGENET_C_CORRUPTIONS = (
    'gaussian_noise', 'shot_noise', 'impulse_noise',
    'defocus_blur', 'glass_blur', 'motion_blur', 'zoom_blur',
    'snow', 'frost', 'fog', 'brightness',
    'contrast', 'elastic_transform', 'pixelate', 'jpeg_compression',
)
IMAGENET_C_EXTRA = ('speckle_noise', 'gaussian_blur', 'spatter', 'saturate')

# AlexNet top-1 error on ImageNet-C, averaged over severities 1-5, per corruption (fractions). Source: the ImageNet-C
# authors' AlexNet evaluation (https://github.com/hendrycks/robustness, paper arXiv:1903.12261, Table/appendix of
# per-corruption errors), as published in the AugMix reference code (google-research/augmix, imagenet.py,
# "Raw AlexNet errors taken from https://github.com/hendrycks/robustness") and used unchanged by later evaluation
# code (e.g. mmpretrain's ImageNet-C metric). The 4 extra corruptions have no published AlexNet baseline, so they are
# reported unnormalised only.
ALEXNET_ERR: Dict[str, float] = {
    'gaussian_noise': 0.886428,
    'shot_noise': 0.894468,
    'impulse_noise': 0.922640,
    'defocus_blur': 0.819880,
    'glass_blur': 0.826268,
    'motion_blur': 0.785948,
    'zoom_blur': 0.798360,
    'snow': 0.866816,
    'frost': 0.826572,
    'fog': 0.819324,
    'brightness': 0.564592,
    'contrast': 0.853204,
    'elastic_transform': 0.646056,
    'pixelate': 0.717840,
    'jpeg_compression': 0.606500,
}


def corruption_error(errors: Sequence[float], baseline: float) -> float:
    """CE of one corruption: mean error over severities divided by the baseline's mean error (a ratio)."""
    if len(errors) == 0:
        raise ValueError('corruption_error: no severities given')
    if baseline <= 0:
        raise ValueError(f'corruption_error: baseline error must be > 0, got {baseline}')
    return float(np.mean(errors)) / baseline


def mean_corruption_error(
        errors: Mapping[str, Sequence[float]],
        baseline: Optional[Mapping[str, float]] = None,
        corruptions: Sequence[str] = IMAGENET_C_CORRUPTIONS,
) -> float:
    """mCE in percent: ``100 * mean_c [mean_s E_{s,c} / baseline_c]``.

    Args:
        errors: per corruption, the top-1 errors (fractions) at each of the 5 severities.
        baseline: per-corruption baseline errors (fractions, averaged over severities); AlexNet by default.
        corruptions: the corruptions that make up the benchmark (the 15 ImageNet-C ones).

    Raises:
        ValueError: when a corruption of the benchmark is missing or has not all 5 severities.
    """
    baseline = ALEXNET_ERR if baseline is None else baseline
    missing = [c for c in corruptions if c not in errors]
    if missing:
        raise ValueError(f'mCE needs all {len(corruptions)} corruptions; missing: {", ".join(missing)}')
    partial = [c for c in corruptions if len(errors[c]) != len(SEVERITIES)]
    if partial:
        raise ValueError(f'mCE needs all {len(SEVERITIES)} severities; incomplete: {", ".join(partial)}')
    return 100.0 * float(np.mean([corruption_error(errors[c], baseline[c]) for c in corruptions]))


def mean_error(errors: Mapping[str, Sequence[float]], corruptions: Optional[Sequence[str]] = None) -> float:
    """Unnormalised mean top-1 error in percent over corruptions and severities (each corruption weighs the same)."""
    names = list(corruptions) if corruptions is not None else list(errors)
    names = [c for c in names if c in errors and len(errors[c])]
    if not names:
        return float('nan')
    return 100.0 * float(np.mean([np.mean(errors[c]) for c in names]))


# --------------------------------------------------------------------------------------------------------------------
# digits-C: corruptions of uint8 RGB arrays, deterministic given (seed, sample index, corruption, severity).
# Parameters follow ImageNet-C's where the operation is resolution-free (noise levels, contrast factors, pixelate
# factors, JPEG qualities); the blur radii are scaled for 16-64 pixel digits.

def _gaussian_noise(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    sigma = (0.08, 0.12, 0.18, 0.26, 0.38)[severity - 1]
    y = x.astype(np.float32) / 255.0 + rng.normal(0.0, sigma, size=x.shape).astype(np.float32)
    return _to_uint8(y)


def _shot_noise(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    lam = (60, 25, 12, 5, 3)[severity - 1]
    y = rng.poisson(x.astype(np.float64) / 255.0 * lam) / lam
    return _to_uint8(y)


def _impulse_noise(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    amount = (0.03, 0.06, 0.09, 0.17, 0.27)[severity - 1]
    y = x.copy()
    u = rng.random(x.shape[:2])
    salt = rng.random(x.shape[:2]) < 0.5
    hit = u < amount
    y[hit & salt] = 255
    y[hit & ~salt] = 0
    return y


def _gaussian_blur(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    radius = (0.5, 0.75, 1.0, 1.5, 2.0)[severity - 1] * x.shape[0] / 32.0
    return np.asarray(Image.fromarray(x).filter(ImageFilter.GaussianBlur(radius=radius)))


def _contrast(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    c = (0.4, 0.3, 0.2, 0.1, 0.05)[severity - 1]
    y = x.astype(np.float32) / 255.0
    mean = y.mean(axis=(0, 1), keepdims=True)
    return _to_uint8((y - mean) * c + mean)


def _pixelate(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    factor = (0.6, 0.5, 0.4, 0.3, 0.25)[severity - 1]
    h, w = x.shape[:2]
    small = Image.fromarray(x).resize((max(1, int(w * factor)), max(1, int(h * factor))), Image.BOX)
    return np.asarray(small.resize((w, h), Image.NEAREST))


def _jpeg_compression(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    quality = (25, 18, 15, 10, 7)[severity - 1]
    buf = io.BytesIO()
    Image.fromarray(x).save(buf, format='JPEG', quality=quality)
    buf.seek(0)
    return np.asarray(Image.open(buf).convert('RGB'))


def _to_uint8(y: np.ndarray) -> np.ndarray:
    return np.clip(np.round(np.asarray(y) * 255.0), 0, 255).astype(np.uint8)


DIGITS_C_FUNCS: Dict[str, Callable[[np.ndarray, int, np.random.Generator], np.ndarray]] = {
    'gaussian_noise': _gaussian_noise,
    'shot_noise': _shot_noise,
    'impulse_noise': _impulse_noise,
    'gaussian_blur': _gaussian_blur,
    'contrast': _contrast,
    'pixelate': _pixelate,
    'jpeg_compression': _jpeg_compression,
}
DIGITS_C_CORRUPTIONS = tuple(DIGITS_C_FUNCS)


def corrupt_image(image: np.ndarray, corruption: str, severity: int, seed: int = 0, index: int = 0) -> np.ndarray:
    """Apply a digits-C corruption to a uint8 HxWx3 array; the same (seed, index) always gives the same result."""
    if corruption not in DIGITS_C_FUNCS:
        raise ValueError(f'Unknown corruption {corruption!r}; choose from {", ".join(DIGITS_C_CORRUPTIONS)}')
    if severity not in SEVERITIES:
        raise ValueError(f'severity must be one of {SEVERITIES}, got {severity}')
    c_idx = DIGITS_C_CORRUPTIONS.index(corruption)
    rng = np.random.default_rng([int(seed), int(index), c_idx, int(severity)])
    return DIGITS_C_FUNCS[corruption](np.ascontiguousarray(image), severity, rng)


class CorruptedDataset(Dataset):
    """A map-style image dataset whose images are corrupted on the fly (used for digits-C).

    Args:
        base: dataset with ``image(i) -> PIL.Image`` and ``targets`` (e.g. ``dr.data.DigitsDataset``).
        corruption: one of ``DIGITS_C_CORRUPTIONS``.
        severity: 1..5.
        seed: corruption seed (noise draws depend on ``seed`` and the sample index only).
    """

    def __init__(self, base: Any, corruption: str, severity: int, seed: int = 0, transform: Optional[Any] = None):
        corrupt_image(np.zeros((8, 8, 3), np.uint8), corruption, severity)  # validates the arguments
        self.base = base
        self.corruption = corruption
        self.severity = severity
        self.seed = seed
        self.targets: List[int] = [int(t) for t in base.targets]
        self.classes = getattr(base, 'classes', None)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def image(self, index: int) -> Image.Image:
        arr = np.asarray(self.base.image(index).convert('RGB'))
        return Image.fromarray(corrupt_image(arr, self.corruption, self.severity, self.seed, index))

    def __getitem__(self, index: int):
        img = self.image(index)
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[index]


def summarize_corruption_errors(
        errors: Mapping[str, Sequence[float]],
        clean_error: Optional[float] = None,
        imagenet: bool = False,
) -> Dict[str, float]:
    """Summary numbers (percent) for a -C set from per-corruption errors (fractions, one per severity).

    Returns:
        ``mean_err`` over the benchmark corruptions, ``extra_mean_err`` over the extra ones (ImageNet-C), ``mce`` and
        ``100_minus_mce`` (ImageNet-C with all 15 corruptions x 5 severities, else NaN), and ``rel_mean_err`` = mean
        error minus the clean error when ``clean_error`` (a fraction) is known.
    """
    nan = float('nan')
    if imagenet:
        bench = [c for c in IMAGENET_C_CORRUPTIONS if c in errors]
        extra = [c for c in IMAGENET_C_EXTRA if c in errors]
    else:
        bench, extra = list(errors), []
    out = {
        'mean_err': mean_error(errors, bench),
        'extra_mean_err': mean_error(errors, extra) if extra else nan,
        'mce': nan,
        '100_minus_mce': nan,
        'rel_mean_err': nan,
    }
    if imagenet:
        try:
            out['mce'] = mean_corruption_error(errors)
            out['100_minus_mce'] = 100.0 - out['mce']
        except ValueError as e:
            _logger.warning(f'ImageNet-C mCE not computed: {e}')
    if clean_error is not None and not math.isnan(out['mean_err']):
        out['rel_mean_err'] = out['mean_err'] - 100.0 * clean_error
    return out
