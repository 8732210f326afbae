"""Corruption metrics (CE, mCE, relative CE) and the deterministic digits-C corruptions."""
import numpy as np
import pytest

from dr.evaluate.corruptions import (
    ALEXNET_ERR,
    IMAGENET_C_CORRUPTIONS,
    corrupt_image,
    mean_corruption_error,
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
