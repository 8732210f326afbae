"""Calibration metrics against straightforward independent computations."""
import math
import os

import numpy as np
import pytest
import torch

from dr.evaluate.calibration import (
    bin_indices,
    bin_sums,
    ece_from_sums,
    expected_calibration_error,
    maximum_calibration_error,
    negative_log_likelihood,
)
from dr.evaluate.report import reliability_diagram

pytestmark = pytest.mark.usefixtures('one_thread')


def _reference_bins(conf, correct, n_bins):
    """Plain-Python binning: bin b holds (b/n, (b+1)/n], 0 goes to the first bin."""
    bins = [[] for _ in range(n_bins)]
    for c, ok in zip(conf, correct):
        placed = False
        for b in range(n_bins):
            lo, hi = b / n_bins, (b + 1) / n_bins
            if (lo < c <= hi) or (b == 0 and c == 0.0):
                bins[b].append((c, ok))
                placed = True
                break
        assert placed, c
    return bins


def _reference_ece_mce(probs, targets, n_bins=15):
    conf, correct = [], []
    for row, t in zip(probs.tolist(), targets.tolist()):
        best = max(range(len(row)), key=lambda k: row[k])
        conf.append(row[best])
        correct.append(1.0 if best == t else 0.0)
    n = len(conf)
    ece, mce = 0.0, 0.0
    for items in _reference_bins(conf, correct, n_bins):
        if not items:
            continue
        acc = sum(ok for _, ok in items) / len(items)
        avg = sum(c for c, _ in items) / len(items)
        ece += len(items) / n * abs(acc - avg)
        mce = max(mce, abs(acc - avg))
    return ece, mce


def _random_probs(n, k, seed, sharp=1.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, generator=g, dtype=torch.float64) * sharp
    return logits.softmax(dim=1), torch.randint(0, k, (n,), generator=g)


@pytest.mark.parametrize('seed,n,k,sharp', [(0, 500, 10, 1.0), (1, 300, 5, 4.0), (2, 57, 100, 0.3), (3, 1000, 3, 8.0)])
def test_ece_matches_reference_loop(seed, n, k, sharp):
    probs, targets = _random_probs(n, k, seed, sharp)
    ref_ece, ref_mce = _reference_ece_mce(probs, targets)
    assert expected_calibration_error(probs, targets) == pytest.approx(ref_ece, abs=1e-12)
    assert maximum_calibration_error(probs, targets) == pytest.approx(ref_mce, abs=1e-12)
    assert 0.0 <= expected_calibration_error(probs, targets) <= 1.0


def test_confidence_one_and_empty_bins():
    # one-hot rows: confidence exactly 1.0 (last bin), plus a few mid-range ones; most bins stay empty
    k = 4
    probs = torch.zeros(10, k, dtype=torch.float64)
    targets = torch.zeros(10, dtype=torch.long)
    probs[:6, 0] = 1.0  # 6 confident and right
    probs[6:8, 1] = 1.0  # 2 confident and wrong
    probs[8] = torch.tensor([0.5, 0.3, 0.1, 0.1], dtype=torch.float64)  # conf 0.5, right
    probs[9] = torch.tensor([0.2, 0.4, 0.2, 0.2], dtype=torch.float64)  # conf 0.4, wrong
    ref_ece, ref_mce = _reference_ece_mce(probs, targets)
    ece = expected_calibration_error(probs, targets)
    assert ece == pytest.approx(ref_ece, abs=1e-12)
    # by hand: last bin 8 samples, acc 6/8, conf 1 -> 8/10*0.25; conf-0.5 bin: |1-0.5|/10; conf-0.4 bin: 0.4/10
    assert ece == pytest.approx(0.8 * 0.25 + 0.1 * 0.5 + 0.1 * 0.4, abs=1e-12)
    assert maximum_calibration_error(probs, targets) == pytest.approx(0.5, abs=1e-12)
    count, _, _ = bin_sums(probs.max(1).values, torch.ones(10), 15)
    assert count[-1] == 8 and count.sum() == 10 and (count == 0).sum() == 12


def test_bin_edges_are_lo_open_hi_closed():
    n_bins = 15
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    conf = torch.cat([torch.tensor([0.0, 1.0]), edges[1:-1], edges[1:-1] + 1e-9])
    idx = bin_indices(conf, n_bins).tolist()
    assert idx[0] == 0 and idx[1] == n_bins - 1
    inner = idx[2:2 + n_bins - 1]
    above = idx[2 + n_bins - 1:]
    assert inner == list(range(n_bins - 1))  # an edge value belongs to the bin it closes
    assert above == list(range(1, n_bins))


def test_perfectly_calibrated_bins_give_zero_ece():
    # in each bin the accuracy equals the (constant) confidence
    conf = np.repeat([0.3, 0.6, 0.9], 10)
    correct = np.concatenate([[1] * 3 + [0] * 7, [1] * 6 + [0] * 4, [1] * 9 + [0] * 1])
    assert ece_from_sums(*bin_sums(conf, correct)) == pytest.approx(0.0, abs=1e-12)


def test_pooled_bin_sums_equal_ece_of_concatenation():
    p1, t1 = _random_probs(200, 7, 5)
    p2, t2 = _random_probs(300, 7, 6, sharp=3.0)
    s1 = bin_sums(p1.max(1).values, p1.argmax(1).eq(t1))
    s2 = bin_sums(p2.max(1).values, p2.argmax(1).eq(t2))
    pooled = ece_from_sums(*(a + b for a, b in zip(s1, s2)))
    assert pooled == pytest.approx(expected_calibration_error(torch.cat([p1, p2]), torch.cat([t1, t2])), abs=1e-12)


def test_nll_and_input_checks():
    probs, targets = _random_probs(50, 6, 9)
    ref = -sum(math.log(probs[i, targets[i]].item()) for i in range(50)) / 50
    assert negative_log_likelihood(probs, targets) == pytest.approx(ref, rel=1e-12)
    assert negative_log_likelihood(probs.numpy(), targets.numpy()) == pytest.approx(ref, rel=1e-12)
    with pytest.raises(ValueError, match='targets must lie'):
        expected_calibration_error(probs, targets + 6)
    with pytest.raises(ValueError, match='2-D'):
        expected_calibration_error(probs[0], targets[:1])
    assert math.isnan(expected_calibration_error(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)))


def test_reliability_diagram_png(tmp_path):
    probs, targets = _random_probs(100, 5, 3, sharp=2.0)
    path = reliability_diagram(probs, targets, str(tmp_path / 'sub' / 'rel.png'), title='test')
    with open(path, 'rb') as f:
        assert f.read(8) == b'\x89PNG\r\n\x1a\n'
    assert os.path.getsize(path) > 1000
    assert not [p for p in os.listdir(tmp_path / 'sub') if p.endswith('.tmp')]


def test_reliability_gaps_are_outlines_coloured_by_direction():
    """Over-confident bins (confidence above accuracy) and under-confident ones (below) draw their gap as an unfilled
    outline in different colours, so the accuracy bar under an under-confident gap stays visible."""
    from matplotlib.colors import to_rgba
    from matplotlib.figure import Figure

    from dr.evaluate.report import draw_reliability
    # 3 bins: over-confident (confidence 0.3, accuracy 0.1), empty, under-confident (confidence 0.85, accuracy 0.95)
    count = np.array([10, 0, 20])
    conf_sum = np.array([3.0, 0.0, 17.0])  # mean confidence 0.3 and 0.85
    correct_sum = np.array([1.0, 0.0, 19.0])  # accuracy 0.1 and 0.95
    fig = Figure()
    ax, ax_hist = fig.subplots(2, 1)
    bars = draw_reliability(ax, ax_hist, count, conf_sum, correct_sum)
    acc = [p.get_height() for p in bars['accuracy'].patches]
    assert acc == pytest.approx([0.1, 0.0, 0.95])
    over, = bars['over'].patches
    under, = bars['under'].patches
    assert (over.get_y(), over.get_height()) == pytest.approx((0.1, 0.2))  # from accuracy up to confidence
    assert (under.get_y(), under.get_height()) == pytest.approx((0.85, 0.1))  # inside the accuracy bar
    for p in (over, under):
        assert not p.get_fill() and p.get_facecolor()[3] == 0  # outline only: the accuracy bar shows through
    assert to_rgba(over.get_edgecolor()) != to_rgba(under.get_edgecolor())
    labels = ax.get_legend_handles_labels()[1]
    assert any('over-confident' in t for t in labels) and any('under-confident' in t for t in labels)
