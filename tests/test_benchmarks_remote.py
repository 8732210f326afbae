"""benchmarks/loader_throughput.py --remote runs end to end at tiny sizes against the loopback servers and records what
docs/benchmarks.md reports (the speed itself is measured by running the benchmark, never asserted here)."""
import json
import subprocess
import sys

import pytest

from tests.helpers import REPO, subprocess_env


@pytest.mark.slow
@pytest.mark.parametrize('aug', ['rrc+ra_re', 'rrc+mix'])
def test_remote_throughput_times_the_same_epochs_from_local_s3_and_http(tmp_path, aug):
    out = tmp_path / 'remote.json'
    cmd = [sys.executable, 'benchmarks/loader_throughput.py', '--remote', '--aug', aug, '--max-images', '40',
           '--shard-size', '16', '--num-samples', '2', '--topk', '2', '-b', '8', '-j', '1', '--epochs', '2',
           '--work-dir', str(tmp_path / 'w'), '--output', str(out)]
    res = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    result = json.loads(out.read_text())
    assert set(result['runs']) == {'local', 's3', 'http'}
    for runs in result['runs'].values():
        assert [r['samples'] for r in runs] == [40, 40]  # every image of the three stores, each timed epoch
    for name in ('s3', 'http'):
        ratio = result[f'ratio_{name}_over_local']
        assert ratio == pytest.approx(result['samples_per_s'][name] / result['samples_per_s']['local']) and ratio > 0
    assert result['shard_bytes'] > 0 and f'{aug}, batch 8' in result['setting']
    assert 'ratio s3 / local' in res.stdout and 'ratio http / local' in res.stdout
