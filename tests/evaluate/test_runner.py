"""Pieces of the per-model evaluation: -C summary rows and the results store's reuse rule."""
import math

import pytest

from dr.evaluate.corruptions import ALEXNET_CLEAN_ERR, ALEXNET_ERR, IMAGENET_C_CORRUPTIONS
from dr.evaluate.runner import ResultsStore, corruption_summary
from dr.evaluate.sets import EvalPart, View


def _part(name, corruption=None, severity=None):
    return EvalPart(name, dataset=[], views=[View(name)], corruption=corruption, severity=severity)


def _row(name, err, corruption='', severity='', complete=True):
    return {'set': name, 'top1_err': err, 'top1': 100 - err, 'top5': 100.0, 'count': 10, 'skipped': 0, 'nll': 1.0,
            'corruption': corruption, 'severity': severity, 'complete': complete, 'protocol': 'center-crop',
            'calibration_bins': {'count': [10], 'conf_sum': [5.0], 'correct_sum': [5.0]}}


def test_imagenet_c_summary_row():
    parts, rows = [], {'imagenet': _row('imagenet', 20.0)}
    for c in IMAGENET_C_CORRUPTIONS + ('spatter',):
        for s in range(1, 6):
            name = f'imagenet-c/{c}/{s}'
            parts.append(_part(name, c, s))
            rows[name] = _row(name, 100 * ALEXNET_ERR.get(c, 0.9) / 2, c, s)  # half of AlexNet's error
    row = corruption_summary('imagenet-c', parts, rows, {'tag': 't'})
    assert row['c_mce'] == pytest.approx(50.0) and row['c_100_minus_mce'] == pytest.approx(50.0)
    expected_rel = 100 * sum((ALEXNET_ERR[c] / 2 - 0.2) / (ALEXNET_ERR[c] - ALEXNET_CLEAN_ERR)
                             for c in IMAGENET_C_CORRUPTIONS) / 15
    assert row['c_rel_mce'] == pytest.approx(expected_rel)
    assert row['c_extra_mean_err'] == pytest.approx(45.0) and row['count'] == 16 * 5 * 10
    assert row['complete'] is True and row['c_missing'] == [] and row['protocol'] == 'center-crop'
    rows['imagenet-c/fog/2']['complete'] = False
    del rows['imagenet-c/snow/5']
    row = corruption_summary('imagenet-c', [p for p in parts if p.name != 'imagenet-c/snow/5'], rows, {})
    assert row['complete'] is False and row['c_missing'] == ['snow/5'] and math.isnan(row['c_mce'])


def test_results_store_reuses_only_identical_settings(tmp_path):
    old = {'tag': 'a', 'set': 'digits', 'config_key': 'k1', 'top1': 90.0}
    store = ResultsStore(str(tmp_path / 'r.json'), None, {'results': [old]}, {}, primary=True, resume=True)
    assert store.find('a', 'digits', 'k1') is old
    assert store.find('a', 'digits', 'k2') is None and store.find('b', 'digits', 'k1') is None
    no_resume = ResultsStore('', None, {'results': [old]}, {}, primary=True, resume=False)
    assert no_resume.find('a', 'digits', 'k1') is None
    store.add({**old, 'config_key': 'k2', 'top1': 91.0})
    store.flush()
    assert (tmp_path / 'r.json').exists() and (tmp_path / 'r.csv').exists()
    assert not any(p.name.startswith('r-') for p in tmp_path.iterdir())  # timm files only with --results-format timm
