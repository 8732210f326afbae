"""Corruption metrics (CE, mCE, relative mCE) and the deterministic digits-C corruptions."""
import io
import zlib

import numpy as np
import pytest
from PIL import Image

from dr.evaluate.corruptions import (
    ALEXNET_CLEAN_ERR,
    ALEXNET_ERR,
    DIGITS_C_DEFAULT,
    DIGITS_C_EXTRA,
    DIGITS_C_FUNCS,
    IMAGENET_C_CORRUPTIONS,
    corrupt_image,
    mean_corruption_error,
    relative_mean_corruption_error,
    summarize_corruption_errors,
)
from dr.evaluate.sets import (
    build_parts,
)

DATA_CONFIG = {'input_size': (3, 16, 16), 'interpolation': 'bilinear', 'mean': (0.0, 0.0, 0.0),
               'std': (1.0, 1.0, 1.0), 'crop_pct': 1.0, 'crop_mode': 'center'}


pytestmark = pytest.mark.usefixtures('one_thread')


def test_mce_arithmetic():
    # errors that are a known multiple of AlexNet's per corruption give mCE = 100 * mean(multiple)
    factors = {c: 0.3 + 0.04 * i for i, c in enumerate(IMAGENET_C_CORRUPTIONS)}
    errors = {}
    for c, f in factors.items():
        mean = ALEXNET_ERR[c] * f
        errors[c] = [mean - 0.02, mean - 0.01, mean, mean + 0.01, mean + 0.02]  # severities average to `mean`
    expected = 100.0 * sum(factors.values()) / 15
    assert mean_corruption_error(errors) == pytest.approx(expected, rel=1e-12)
    # by hand on a two-corruption benchmark
    errs = {'a': [0.1, 0.2, 0.3, 0.4, 0.5], 'b': [0.4] * 5}
    assert mean_corruption_error(errs, baseline={'a': 0.5, 'b': 0.8}, corruptions=('a', 'b')) == pytest.approx(55.0)
    with pytest.raises(ValueError, match='missing: fog'):
        mean_corruption_error({c: v for c, v in errors.items() if c != 'fog'})
    with pytest.raises(ValueError, match='incomplete: snow'):
        mean_corruption_error({**errors, 'snow': errors['snow'][:4]})
    s = summarize_corruption_errors({**errors, 'spatter': [0.5] * 5}, clean_error=0.2, imagenet=True)
    mean_err = 100.0 * np.mean([np.mean(v) for v in errors.values()])
    assert s['mce'] == pytest.approx(expected) and s['100_minus_mce'] == pytest.approx(100.0 - expected)
    assert s['mean_err'] == pytest.approx(mean_err) and s['extra_mean_err'] == pytest.approx(50.0)
    assert s['rel_mean_err'] == pytest.approx(mean_err - 20.0)
    partial = summarize_corruption_errors({'fog': [0.5] * 5}, imagenet=True)
    assert np.isnan(partial['mce']) and partial['mean_err'] == pytest.approx(50.0)


def test_digits_c_corruptions_deterministic_and_distinct():
    rng = np.random.default_rng(0)
    img = (rng.random((16, 16, 3)) * 255).astype(np.uint8)
    a = corrupt_image(img, 'gaussian_noise', 3, seed=1, index=5)
    assert np.array_equal(a, corrupt_image(img, 'gaussian_noise', 3, seed=1, index=5))
    assert not np.array_equal(a, corrupt_image(img, 'gaussian_noise', 3, seed=2, index=5))
    assert not np.array_equal(a, corrupt_image(img, 'gaussian_noise', 3, seed=1, index=6))
    diffs = [np.abs(corrupt_image(img, 'contrast', s).astype(int) - img).mean() for s in range(1, 6)]
    assert diffs == sorted(diffs) and diffs[0] > 0
    parts = build_parts('digits-c', corruptions=['contrast', 'pixelate'], digits_size=16)
    assert [p.name for p in parts][:3] == ['digits-c/clean', 'digits-c/contrast/1', 'digits-c/contrast/2']
    assert len(parts) == 11
    with pytest.raises(ValueError, match='unknown fog'):
        build_parts('digits-c', corruptions=['fog'])


# --------------------------------------------------------------------------------------------------------------------
# relative mCE (Hendrycks & Dietterich 2019) with AlexNet's clean error

def test_relative_mce_arithmetic_and_alexnet_clean_error():
    from torchvision.models import AlexNet_Weights
    # the model behind the corruption constants is torchvision's AlexNet: its published top-1 gives the clean error
    acc1 = AlexNet_Weights.IMAGENET1K_V1.meta['_metrics']['ImageNet-1K']['acc@1']
    assert ALEXNET_CLEAN_ERR == pytest.approx(1.0 - acc1 / 100.0)
    clean = 0.25
    k = {c: 0.2 + 0.03 * i for i, c in enumerate(IMAGENET_C_CORRUPTIONS)}
    # mean error over severities chosen so that (mean - clean) = k_c * (AlexNet_c - AlexNet_clean)
    errors = {}
    for c in IMAGENET_C_CORRUPTIONS:
        mean = clean + k[c] * (ALEXNET_ERR[c] - ALEXNET_CLEAN_ERR)
        errors[c] = [mean - 0.01, mean + 0.01, mean, mean - 0.02, mean + 0.02]
    expected = 100.0 * np.mean(list(k.values()))
    assert relative_mean_corruption_error(errors, clean) == pytest.approx(expected, rel=1e-12)
    s = summarize_corruption_errors(errors, clean_error=clean, imagenet=True)
    assert s['rel_mce'] == pytest.approx(expected)
    assert np.isnan(summarize_corruption_errors(errors, imagenet=True)['rel_mce'])  # no clean error, no relative mCE
    with pytest.raises(ValueError, match='missing: fog'):
        relative_mean_corruption_error({c: v for c, v in errors.items() if c != 'fog'}, clean)


# --------------------------------------------------------------------------------------------------------------------
# digits-C follows the ImageNet-C corruption code (hendrycks/robustness, ImageNet-C/create_c/make_imagenet_c.py)

def _impulse_response(fn, side, severity):
    x = np.zeros((side, side, 3), np.uint8)
    x[side // 2, side // 2] = 255
    y = fn(x, severity, np.random.default_rng(0))[..., 0].astype(np.float64)
    yy, xx = np.mgrid[:side, :side]
    w = y / y.sum()
    return float((w * ((yy - side // 2) ** 2 + (xx - side // 2) ** 2)).sum()), y


def test_impulse_noise_flips_channels_independently():
    img = np.full((32, 32, 3), 128, np.uint8)
    y = DIGITS_C_FUNCS['impulse_noise'](img, 5, np.random.default_rng(0))
    hit = (y == 0) | (y == 255)
    partly = hit.any(axis=2) & ~hit.all(axis=2)  # some channels flipped, others kept
    assert partly.sum() > 50
    assert abs(hit.mean() - 0.27) < 0.03  # severity 5 flips 27% of the values


def test_pixelate_uses_box_both_ways():
    img = (np.random.default_rng(1).random((32, 32, 3)) * 255).astype(np.uint8)
    for s, c in zip(range(1, 6), (0.6, 0.5, 0.4, 0.3, 0.25)):
        small = Image.fromarray(img).resize((int(32 * c), int(32 * c)), Image.BOX)
        expected = np.asarray(small.resize((32, 32), Image.BOX))
        assert np.array_equal(DIGITS_C_FUNCS['pixelate'](img, s, None), expected)


@pytest.mark.parametrize('side', [32, 224])
def test_blurs_scale_with_image_size_as_in_imagenet_c(side):
    # ImageNet-C at 224 px: gaussian_blur sigma 1, 2, 3, 4, 6; defocus_blur disk radius 3, 4, 6, 8, 10
    for s, sigma in zip(range(1, 6), (1, 2, 3, 4, 6)):
        moment, _ = _impulse_response(DIGITS_C_FUNCS['gaussian_blur'], side, s)
        expected = 2 * (sigma * side / 224) ** 2  # E[dx^2 + dy^2] of a 2-D Gaussian
        if expected > 0.5:  # below that the 8-bit response is dominated by rounding
            assert moment == pytest.approx(expected, rel=0.1), (side, s)
    moments = []
    for s, radius in zip(range(1, 6), (3, 4, 6, 8, 10)):
        moment, y = _impulse_response(DIGITS_C_FUNCS['defocus_blur'], side, s)
        r = radius * side / 224
        if r >= 2:  # uniform disk: E[rho^2] = r^2 / 2 (pixels add a little)
            assert moment == pytest.approx(r ** 2 / 2, rel=0.1), (side, s)
        assert not y[side // 2 + int(np.ceil(r)) + 1:].any()  # nothing beyond the disk
        moments.append(moment)
    assert moments == sorted(moments) and moments[-1] > moments[0]


def test_brightness_matches_the_hsv_round_trip():
    import colorsys
    img = (np.random.default_rng(2).random((6, 6, 3)) * 255).astype(np.uint8)
    img[0, 0] = 0  # black: becomes grey
    got = DIGITS_C_FUNCS['brightness'](img, 3, None)
    for i in range(6):
        for j in range(6):
            h, s, v = colorsys.rgb_to_hsv(*(img[i, j] / 255.0))
            expected = np.array(colorsys.hsv_to_rgb(h, s, min(v + 0.3, 1.0))) * 255
            assert np.allclose(got[i, j], expected, atol=1e-6)


def test_corrupted_images_are_saved_as_jpeg_85():
    img = (np.random.default_rng(3).random((32, 32, 3)) * 255).astype(np.uint8)
    seed, index = 5, 7
    for corruption in ('contrast', 'gaussian_noise', 'pixelate'):
        out = corrupt_image(img, corruption, 2, seed=seed, index=index)
        rng = np.random.default_rng([seed, index, zlib.crc32(corruption.encode()), 2])
        raw = np.uint8(DIGITS_C_FUNCS[corruption](img, 2, rng))  # np.uint8 floors, as ImageNet-C's save does
        buf = io.BytesIO()
        Image.fromarray(raw).save(buf, format='JPEG', quality=85, optimize=True)
        assert np.array_equal(out, np.asarray(Image.open(buf).convert('RGB'))), corruption
        assert not np.array_equal(out, raw)


def test_gaussian_blur_is_an_extra_not_a_benchmark_corruption():
    assert 'gaussian_blur' not in DIGITS_C_DEFAULT and 'gaussian_blur' in DIGITS_C_EXTRA
    assert set(DIGITS_C_DEFAULT) <= set(IMAGENET_C_CORRUPTIONS)
    parts = build_parts('digits-c', digits_size=16)
    assert sorted({p.corruption for p in parts if p.corruption}) == sorted(DIGITS_C_DEFAULT)
    s = summarize_corruption_errors({'contrast': [0.1] * 5, 'gaussian_blur': [0.9] * 5})
    assert s['mean_err'] == pytest.approx(10.0) and s['extra_mean_err'] == pytest.approx(90.0)
