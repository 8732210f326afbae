"""benchmarks/train_epoch_cost.py runs end to end at tiny sizes and records what docs/benchmarks.md reports (the
speed itself is measured by running the benchmark, never asserted here)."""
import json
import subprocess
import sys

import pytest

from tests.helpers import REPO, subprocess_env


@pytest.mark.slow
def test_train_epoch_cost_records_paired_ratios(tmp_path):
    out = tmp_path / 'cost.json'
    cmd = [sys.executable, 'benchmarks/train_epoch_cost.py', '--data', 'photos', '--aug', 'rrc', 'rrc+mix',
           '--num-photos', '24', '--photo-classes', '3', '--photo-size', '32', '-b', '8', '--epochs', '2',
           '--num-samples', '2', '--topk', '2', '--profile', '--profile-top', '5', '--work-dir', str(tmp_path / 'w'),
           '--output', str(out)]
    res = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    result = json.loads(out.read_text())
    assert [(r['data'], r['aug']) for r in result['results']] == [('photos', 'rrc'), ('photos', 'rrc+mix')]
    for r in result['results']:
        plain, rd = r['plain'], r['reinforced']
        assert len(plain['epochs']) == len(rd['epochs']) == 2
        # the same epoch: 24 images, batch 8 -> 3 full steps each (the reinforced loader drops no image here)
        assert plain['steps'] == rd['steps'] == 3 and plain['images'] == rd['images'] == 24
        for key in ('wall_per_epoch', 'cpu_per_epoch', 'wall_per_image'):
            q = rd['ratio'][key]
            assert len(q['values']) == 2 and q['min'] <= q['median'] <= q['max'] and q['median'] > 0
        assert 0 <= rd['data_wait_share'] < 1 and 'function calls' in r['profiles']['reinforced']
    assert '--mixup' in result['results'][1]['plain']['argv']  # the plain run of the +mix family mixes too
    assert 'summary (median paired ratio' in res.stdout


@pytest.mark.slow
def test_methods_cost_times_every_selected_method_against_plain(tmp_path):
    """benchmarks/methods_cost.py: make compare's flags per method, paired rounds, BAN timed as its KD generation."""
    out = tmp_path / 'methods.json'
    cmd = [sys.executable, 'benchmarks/methods_cost.py', '--methods', 'cs_kd', 'ban', '--epochs', '1', '-b', '32',
           '--work-dir', str(tmp_path / 'w'), '--output', str(out)]
    res = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    rows = {r['method']: r for r in json.loads(out.read_text())['results']}
    assert list(rows) == ['plain', 'cs_kd', 'ban']
    assert rows['plain']['ratio']['wall_per_step']['median'] == 1.0
    assert rows['cs_kd']['steps'] == rows['plain']['steps'] and rows['cs_kd']['images'] == 2 * rows['plain']['images']
    assert '--class-aware-intra' in rows['cs_kd']['argv'] and '64' in rows['cs_kd']['argv']  # 32 anchors + 32 mates
    assert '--kd-teacher' in rows['ban']['argv'] and '--ban-generations' not in rows['ban']['argv']
    for r in rows.values():
        q = r['ratio']['wall_per_step']
        assert q['min'] <= q['median'] <= q['max'] and q['median'] > 0
