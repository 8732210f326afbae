"""Common corruptions: ImageNet-C constants, mCE and relative mCE, and the on-the-fly digits-C set.

ImageNet-C (Hendrycks & Dietterich, ICLR 2019, "Benchmarking Neural Network Robustness to Common Corruptions and
Perturbations") has 15 benchmark corruptions at 5 severities plus 4 extra ones (``speckle_noise``, ``gaussian_blur``,
``spatter``, ``saturate``) that are not part of the mCE. With ``E_{s,c}`` the top-1 error of model ``f`` at severity
``s`` of corruption ``c`` and ``E_clean`` its error on clean ImageNet val:

    CE_c = sum_s E_{s,c} / sum_s E^AlexNet_{s,c},          mCE = mean_c CE_c (percent)
    relative CE_c = sum_s (E_{s,c} - E_clean) / sum_s (E^AlexNet_{s,c} - E^AlexNet_clean),   relative mCE = mean_c

Since every corruption has all 5 severities, sums over severities are 5 x means, which is how the AlexNet constants
are stored (mean top-1 error over the 5 severities, as a fraction).

digits-C applies the ImageNet-C corruption recipes to the embedded digits val split (see ``DIGITS_C_CORRUPTIONS``).
There is no AlexNet baseline for digits, so only the unnormalised mean error is reported there.
"""
import io
import logging
import math
import zlib
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np
import scipy.ndimage
from PIL import Image
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
# AlexNet's clean top-1 error on ImageNet val, for the relative mCE: the model behind ALEXNET_ERR is torchvision's
# pretrained AlexNet (the ImageNet-C authors' ImageNet-C/test.py loads alexnet-owt-4df8aa71.pth), whose published
# ImageNet-1k top-1 accuracy is 56.522% (torchvision AlexNet_Weights.IMAGENET1K_V1, same weights re-saved as
# alexnet-owt-7be5be79.pth); the paper's tables print it as 43.5.
ALEXNET_CLEAN_ERR = 1.0 - 0.56522


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
    _check_complete(errors, corruptions)
    return 100.0 * float(np.mean([corruption_error(errors[c], baseline[c]) for c in corruptions]))


def relative_mean_corruption_error(
        errors: Mapping[str, Sequence[float]],
        clean_error: float,
        baseline: Optional[Mapping[str, float]] = None,
        baseline_clean: float = ALEXNET_CLEAN_ERR,
        corruptions: Sequence[str] = IMAGENET_C_CORRUPTIONS,
) -> float:
    """Relative mCE in percent: ``100 * mean_c [(mean_s E_{s,c} - E_clean) / (baseline_c - baseline_clean)]``.

    Args:
        errors: per corruption, the top-1 errors (fractions) at each of the 5 severities.
        clean_error: the model's clean top-1 error (fraction), measured in the same run.
        baseline / baseline_clean: AlexNet's per-corruption mean errors and clean error by default.

    Raises:
        ValueError: when a corruption of the benchmark is missing or has not all 5 severities.
    """
    baseline = ALEXNET_ERR if baseline is None else baseline
    _check_complete(errors, corruptions)
    return 100.0 * float(np.mean([(np.mean(errors[c]) - clean_error) / (baseline[c] - baseline_clean)
                                  for c in corruptions]))


def _check_complete(errors: Mapping[str, Sequence[float]], corruptions: Sequence[str]) -> None:
    missing = [c for c in corruptions if c not in errors]
    if missing:
        raise ValueError(f'mCE needs all {len(corruptions)} corruptions; missing: {", ".join(missing)}')
    partial = [c for c in corruptions if len(errors[c]) != len(SEVERITIES)]
    if partial:
        raise ValueError(f'mCE needs all {len(SEVERITIES)} severities; incomplete: {", ".join(partial)}')


def mean_error(errors: Mapping[str, Sequence[float]], corruptions: Optional[Sequence[str]] = None) -> float:
    """Unnormalised mean top-1 error in percent over corruptions and severities (each corruption weighs the same)."""
    names = list(corruptions) if corruptions is not None else list(errors)
    names = [c for c in names if c in errors and len(errors[c])]
    if not names:
        return float('nan')
    return 100.0 * float(np.mean([np.mean(errors[c]) for c in names]))


# --------------------------------------------------------------------------------------------------------------------
# digits-C: the ImageNet-C corruption recipes (hendrycks/robustness, ImageNet-C/create_c/make_imagenet_c.py) applied to
# the digits val images, deterministic given (seed, sample index, corruption, severity). Parameters are ImageNet-C's;
# the ones in pixels (blur sigmas and radii) were set for 224-px images and are scaled by side / 224. As in the
# published ImageNet-C files, every corrupted image is quantised with np.uint8 (floor) and saved as JPEG quality 85.

DIGITS_C_VERSION = 2  # bump when a corruption changes: stored results of an older recipe are then not reused
IMAGENET_C_SIDE = 224
IMAGENET_C_JPEG_QUALITY = 85


def _unit(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float64) / 255.0


def _gaussian_noise(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    c = (0.08, 0.12, 0.18, 0.26, 0.38)[severity - 1]
    return np.clip(_unit(x) + rng.normal(size=x.shape, scale=c), 0, 1) * 255


def _shot_noise(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    c = (60, 25, 12, 5, 3)[severity - 1]
    return np.clip(rng.poisson(_unit(x) * c) / c, 0, 1) * 255


def _impulse_noise(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Salt and pepper on every value independently (each channel of each pixel), half salt, half pepper."""
    c = (0.03, 0.06, 0.09, 0.17, 0.27)[severity - 1]
    y = _unit(x)
    flipped = rng.random(x.shape) < c
    salt = rng.random(x.shape) < 0.5
    y[flipped & salt] = 1.0
    y[flipped & ~salt] = 0.0
    return y * 255


def _speckle_noise(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    c = (0.15, 0.2, 0.35, 0.45, 0.6)[severity - 1]
    y = _unit(x)
    return np.clip(y + y * rng.normal(size=x.shape, scale=c), 0, 1) * 255


def scaled(value: float, side: int) -> float:
    """A length in pixels of a 224-px ImageNet-C image, at image side ``side``."""
    return value * side / IMAGENET_C_SIDE


def _gaussian_blur(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    sigma = scaled((1, 2, 3, 4, 6)[severity - 1], x.shape[0])
    return np.clip(scipy.ndimage.gaussian_filter(_unit(x), sigma=(sigma, sigma, 0), mode='nearest', truncate=4.0),
                   0, 1) * 255


def disk_kernel(radius: float, supersample: int = 16) -> np.ndarray:
    """Normalised disk of ``radius`` pixels, each weight the fraction of its pixel the disk covers.

    ImageNet-C rasterises integer disks of radius 3-10 px (then smooths them slightly); at digits sizes the scaled
    radius is below 2 px, where an integer disk would be a single pixel, so coverage is computed by supersampling.
    """
    half = int(np.ceil(radius)) + 1
    n = (2 * half + 1) * supersample
    coords = (np.arange(n) + 0.5) / supersample - (half + 0.5)
    yy, xx = np.meshgrid(coords, coords, indexing='ij')
    inside = (xx ** 2 + yy ** 2 <= radius ** 2).astype(np.float64)
    kernel = inside.reshape(2 * half + 1, supersample, 2 * half + 1, supersample).sum(axis=(1, 3))
    if kernel.sum() == 0:  # radius ~ 0: identity
        kernel[half, half] = 1.0
    return kernel / kernel.sum()


def _defocus_blur(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    radius = scaled((3, 4, 6, 8, 10)[severity - 1], x.shape[0])
    kernel = disk_kernel(radius)
    y = _unit(x)
    out = np.stack([scipy.ndimage.convolve(y[..., d], kernel, mode='mirror') for d in range(y.shape[2])], axis=2)
    return np.clip(out, 0, 1) * 255


def _brightness(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """HSV value + c. For fixed hue and saturation every RGB channel is proportional to V = max(R, G, B), so the
    HSV round trip is a per-pixel scale by V' / V (black pixels, V = 0, become grey V')."""
    c = (0.1, 0.2, 0.3, 0.4, 0.5)[severity - 1]
    y = _unit(x)
    v = y.max(axis=2, keepdims=True)
    v_new = np.clip(v + c, 0, 1)
    scale = np.divide(v_new, v, out=np.zeros_like(v), where=v > 0)
    return np.clip(np.where(v > 0, y * scale, v_new), 0, 1) * 255


def _contrast(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    c = (0.4, 0.3, 0.2, 0.1, 0.05)[severity - 1]
    y = _unit(x)
    means = y.mean(axis=(0, 1), keepdims=True)
    return np.clip((y - means) * c + means, 0, 1) * 255


def _pixelate(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    c = (0.6, 0.5, 0.4, 0.3, 0.25)[severity - 1]
    h, w = x.shape[:2]
    small = Image.fromarray(x).resize((max(1, int(w * c)), max(1, int(h * c))), Image.BOX)
    return np.asarray(small.resize((w, h), Image.BOX))


def _jpeg_compression(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    c = (25, 18, 15, 10, 7)[severity - 1]
    return jpeg_roundtrip(x, c)


def jpeg_roundtrip(x: np.ndarray, quality: int) -> np.ndarray:
    """Encode a uint8 HxWx3 array as JPEG at ``quality`` (PIL, ``optimize=True``) and decode it again."""
    buf = io.BytesIO()
    Image.fromarray(x).save(buf, format='JPEG', quality=quality, optimize=True)
    buf.seek(0)
    return np.asarray(Image.open(buf).convert('RGB'))


DIGITS_C_FUNCS: Dict[str, Callable[[np.ndarray, int, np.random.Generator], np.ndarray]] = {
    'gaussian_noise': _gaussian_noise,
    'shot_noise': _shot_noise,
    'impulse_noise': _impulse_noise,
    'defocus_blur': _defocus_blur,
    'brightness': _brightness,
    'contrast': _contrast,
    'pixelate': _pixelate,
    'jpeg_compression': _jpeg_compression,
    'speckle_noise': _speckle_noise,
    'gaussian_blur': _gaussian_blur,
}
DIGITS_C_CORRUPTIONS = tuple(DIGITS_C_FUNCS)
DIGITS_C_EXTRA = tuple(c for c in DIGITS_C_CORRUPTIONS if c in IMAGENET_C_EXTRA)  # reported apart, as in ImageNet-C
DIGITS_C_DEFAULT = ('gaussian_noise', 'impulse_noise', 'defocus_blur', 'contrast', 'pixelate')


def corrupt_image(image: np.ndarray, corruption: str, severity: int, seed: int = 0, index: int = 0) -> np.ndarray:
    """Apply a digits-C corruption to a uint8 HxWx3 array and re-save it as JPEG quality 85, like the ImageNet-C
    files; the same (seed, index, corruption, severity) always gives the same result."""
    if corruption not in DIGITS_C_FUNCS:
        raise ValueError(f'Unknown corruption {corruption!r}; choose from {", ".join(DIGITS_C_CORRUPTIONS)}')
    if severity not in SEVERITIES:
        raise ValueError(f'severity must be one of {SEVERITIES}, got {severity}')
    rng = np.random.default_rng([int(seed), int(index), zlib.crc32(corruption.encode()), int(severity)])
    out = DIGITS_C_FUNCS[corruption](np.ascontiguousarray(image), severity, rng)
    return jpeg_roundtrip(np.uint8(out), IMAGENET_C_JPEG_QUALITY)


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
        ``mean_err`` over the benchmark corruptions, ``extra_mean_err`` over the extra ones, ``mce`` and
        ``100_minus_mce`` (ImageNet-C with all 15 corruptions x 5 severities, else NaN), ``rel_mce`` (the same, and
        ``clean_error`` known), and ``rel_mean_err`` = mean error minus the clean error when ``clean_error`` (a
        fraction) is known.
    """
    nan = float('nan')
    extras = IMAGENET_C_EXTRA
    bench = [c for c in errors if c not in extras and (not imagenet or c in IMAGENET_C_CORRUPTIONS)]
    extra = [c for c in errors if c in extras]
    out = {
        'mean_err': mean_error(errors, bench),
        'extra_mean_err': mean_error(errors, extra) if extra else nan,
        'mce': nan,
        '100_minus_mce': nan,
        'rel_mce': nan,
        'rel_mean_err': nan,
    }
    if imagenet:
        try:
            out['mce'] = mean_corruption_error(errors)
            out['100_minus_mce'] = 100.0 - out['mce']
            if clean_error is not None:
                out['rel_mce'] = relative_mean_corruption_error(errors, clean_error)
        except ValueError as e:
            _logger.warning(f'ImageNet-C mCE not computed: {e}')
    if clean_error is not None and not math.isnan(out['mean_err']):
        out['rel_mean_err'] = out['mean_err'] - 100.0 * clean_error
    return out
