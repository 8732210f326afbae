"""benchmarks/gpu.py: the smoke run on CPU writes every section's figures, and the time boxes hold."""
import importlib.util
import json
import math
import os
import subprocess
import sys
import time

import pytest

from tests.helpers import REPO, subprocess_env

SECTIONS = ('bake', 'bake_compile', 'reinforce', 'loader', 'validate', 'cuda_checks')


def _load_gpu():
    spec = importlib.util.spec_from_file_location('gpu_bench', os.path.join(REPO, 'benchmarks', 'gpu.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope='module')
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp('gpu_smoke')
    cmd = [sys.executable, os.path.join(REPO, 'benchmarks', 'gpu.py'), '--smoke', '--output', str(out)]
    proc = subprocess.run(cmd, cwd=str(out), env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(os.listdir(out))
    assert len(files) == 2 and files[0].endswith('-smoke.json') and files[1].endswith('-smoke.md'), files
    with open(out / files[0]) as f:
        result = json.load(f)
    with open(out / files[1]) as f:
        md = f.read()
    return result, md


def _cells(row):
    return [c.strip() for c in row.strip().strip('|').split('|')]


def _positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.slow
def test_smoke_records_every_section_with_numbers(smoke):
    result, _ = smoke
    assert result['mode'].startswith('smoke')
    assert result['command'] == f'python benchmarks/gpu.py --smoke --output {result["argv"][-1]}'
    v = result['versions']
    assert v['torch'] and v['timm'] and 'cuda' in v and result['environment']['torch_cuda'] == v['cuda']
    assert result['wall_s'] < result['budget_s']
    sections = result['sections']
    assert set(sections) == {'environment', *SECTIONS}
    for name in SECTIONS:
        sec = sections[name]
        assert sec['status'] == 'ok', (name, sec.get('error'), [x.get('error') for x in sec['variants']])
        assert sec['command'].startswith('python benchmarks/gpu.py --sections ' + name)
        assert 0 < sec['seconds'] <= sec['timeout_s']
        assert sec['variants'], name

    def variant(section, name):
        return next(x for x in sections[section]['variants'] if x['name'] == name)

    for name in ('float32', 'bf16', 'bf16_channels_last'):
        m = variant('bake', name)['metrics']
        assert _positive(m['plain']['median_ms']) and _positive(m['bake']['median_ms'])
        assert _positive(m['ratio_paired_median'])
        assert variant('bake', name)['command'].startswith('python benchmarks/bake_overhead.py --model test_resnet')
        # the CPU memory figure is a process RSS peak: more than the libraries' hundreds of MiB
        assert m['memory']['bake']['peak_bytes'] > 100 * 2 ** 20 and 'RSS' in m['memory']['bake']['kind']
    compiled = sections['bake_compile']['variants'][0]
    assert compiled['name'].endswith('compile_eager') and '--torchcompile eager' in compiled['command']
    r = variant('reinforce', 'bf16_channels_last')['metrics']
    assert _positive(r['writer_augmentations_per_s']) and _positive(r['bare_forward_augmentations_per_s'])
    assert r['num_images'] == result['sizes']['reinforce_images'] and r['teacher'] == 'test_resnet'
    prep = variant('loader', 'reinforce_images')['metrics']
    assert prep['images'] == result['data']['images']['num_images']
    for name in ('feeding_train_step', 'loaders_alone'):
        m = variant('loader', name)['metrics']
        assert set(m['samples_per_s']) >= {'timm', 'reinforced_pil', 'reinforced_device'}
        assert all(_positive(x) for x in m['samples_per_s'].values())
        assert _positive(m['ratios']['reinforced_pil_over_timm'])
        # every timed epoch delivered the whole dataset in full batches
        for runs in m['runs'].values():
            assert all(run['samples'] == m['num_images'] for run in runs)
    assert 'step_only' in variant('loader', 'feeding_train_step')['metrics']['samples_per_s']
    for name in ('float32', 'bf16_channels_last'):
        m = variant('validate', name)['metrics']
        assert _positive(m['median']['bare']) and _positive(m['median']['validate']) and _positive(m['ratio'])
    checks = {x['name']: x for x in sections['cuda_checks']['variants']}
    assert checks['baseline']['status'] == 'ok' and math.isfinite(checks['baseline']['metrics']['train_loss'])
    for name in ('sync_bn_nccl_torchrun', 'amp_float16_grad_scaler', 'torchcompile'):
        assert checks[name]['status'] == 'skipped'
        assert checks[name]['reason'] == ('skipped: --smoke runs on CPU' if result['environment']['cuda_available']
                                          else 'skipped: no CUDA')
    assert 'torch.distributed.run --nproc_per_node=1' in checks['sync_bn_nccl_torchrun']['command']
    assert '--sync-bn' in checks['sync_bn_nccl_torchrun']['command']
    assert '--amp --amp-dtype float16' in checks['amp_float16_grad_scaler']['command']
    assert checks['torchcompile']['command'].endswith('--torchcompile')


@pytest.mark.slow
def test_smoke_markdown_table_has_a_row_per_measurement(smoke):
    result, md = smoke
    assert md.startswith(f'# GPU figures: {result["device"]}')
    assert f'torch {result["versions"]["torch"]}' in md and f'timm {result["versions"]["timm"]}' in md
    assert result['command'] in md
    rows = [line for line in md.splitlines() if line.startswith('| ') and not line.startswith('| section')]
    expected = sum(len(s.get('variants', [])) for n, s in result['sections'].items() if n != 'environment')
    assert len(rows) == expected
    bake_row = next(r for r in rows if r.startswith('| bake | bf16_channels_last |'))
    ratio = result['sections']['bake']['variants'][2]['summary']['ratio']
    assert _cells(bake_row)[3] == f'{ratio:.3f}' and _cells(bake_row)[-1] == 'ok'
    assert sum(_cells(r)[-1].startswith('skipped: ') for r in rows) == 3


def test_a_section_past_its_time_box_is_killed_and_keeps_its_finished_variants(tmp_path):
    gpu = _load_gpu()

    def slow(ctx, rec):
        rec.variant('quick', lambda: {'metrics': {'x': 1}})
        time.sleep(60)

    gpu.SECTIONS['slow_test_section'] = slow
    ctx = gpu.Context(sizes=gpu.SMOKE, device='cpu', smoke=True, workers=0, work=str(tmp_path), images_root='',
                      tiny_root='', deadline=time.time() + 2, cuda=False)
    t0 = time.time()
    rec = gpu.run_section('slow_test_section', ctx, timeout=2.0, command='cmd')
    assert time.time() - t0 < 20
    assert rec['status'] == 'timeout' and 'time box of 2 s' in rec['error']
    assert [v['name'] for v in rec['variants']] == ['quick'] and rec['variants'][0]['metrics'] == {'x': 1}


def test_a_failing_variant_is_recorded_and_the_section_goes_on(tmp_path):
    gpu = _load_gpu()

    def mixed(ctx, rec):
        rec.variant('breaks', lambda: {'metrics': {'x': 1 / 0}})
        rec.variant('works', lambda: {'metrics': {'x': 2}, 'summary': {'figure': '2 img/s', 'ratio': 0.5}})

    def crashes(ctx, rec):
        raise RuntimeError('out of luck')

    gpu.SECTIONS.update(mixed_test_section=mixed, crash_test_section=crashes)
    ctx = gpu.Context(sizes=gpu.SMOKE, device='cpu', smoke=True, workers=0, work=str(tmp_path), images_root='',
                      tiny_root='', deadline=time.time() + 30, cuda=False)
    rec = gpu.run_section('mixed_test_section', ctx, timeout=30.0, command='cmd')
    assert rec['status'] == 'partial'
    broken, works = rec['variants']
    assert broken['status'] == 'fail' and broken['error'] == 'ZeroDivisionError: division by zero'
    assert works['status'] == 'ok' and works['metrics'] == {'x': 2}
    crash = gpu.run_section('crash_test_section', ctx, timeout=30.0, command='cmd')
    assert crash['status'] == 'fail' and crash['error'] == 'RuntimeError: out of luck'
    md = gpu.markdown({'device': 'x', 'mode': 'test', 'command': 'c', 'started_utc': 't', 'wall_s': 1,
                       'budget_s': 2, 'workers': 0, 'versions': {}, 'environment': {},
                       'data': {'images': {'num_images': 1, 'size_hw': [1, 1], 'mean_kb': 1, 'num_classes': 1}},
                       'sections': {'mixed': rec, 'crash': crash}})
    rows = [_cells(line) for line in md.splitlines() if line.startswith('| ')]
    assert ['mixed', 'breaks', '', '', '', '', 'fail: ZeroDivisionError: division by zero'] in rows
    assert ['mixed', 'works', '2 img/s', '0.500', '', '', 'ok'] in rows
    assert ['crash', '(section)', '', '', '', '', 'fail: RuntimeError: out of luck'] in rows


def test_full_mode_without_cuda_refuses(tmp_path):
    if subprocess.run([sys.executable, '-c', 'import torch, sys; sys.exit(torch.cuda.is_available())'],
                      env=subprocess_env()).returncode:
        pytest.skip('a CUDA device is present')
    proc = subprocess.run([sys.executable, os.path.join(REPO, 'benchmarks', 'gpu.py'), '--output', str(tmp_path)],
                          env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and 'error: benchmarks/gpu.py: no CUDA device' in proc.stderr
    assert os.listdir(tmp_path) == []


_FAKE_TRAIN = '''
import os, sys
out, name, key, code = sys.argv[sys.argv.index('--experiment') - 1], sys.argv[-3], sys.argv[-2], int(sys.argv[-1])
run = os.path.join(out, name)
os.makedirs(run, exist_ok=True)
open(os.path.join(run, 'results.json'), 'w').write('{}')
open(os.path.join(run, 'summary.csv'), 'w').write('epoch,train_loss\\n0,1.5\\n')
if key != '-':  # a checkpoint holding a scaler state under ``key``
    import torch
    torch.save({'state_dict': {}, key: {'scale': 65536.0}}, os.path.join(run, 'last.pth.tar'))
print('Distributed training: process 0 of 1' if code == 0 else 'single process')
sys.exit(max(code - 1, 0))
'''


def test_train_checks_pass_only_with_their_evidence(tmp_path):
    gpu = _load_gpu()
    out = str(tmp_path)

    def check(name, key, code, **extra):
        return {'name': name, 'argv': [sys.executable, '-c', _FAKE_TRAIN, out, '--experiment', name, key, str(code)],
                **extra}

    scaler = dict(expect_checkpoint_key='amp')
    res = gpu._check_run(check('amp_ok', 'amp', 0, **scaler), out, timeout=60)
    assert res['returncode'] == 0 and res['checkpoint_has_amp'] is True and res['train_loss'] == 1.5
    with pytest.raises(RuntimeError, match="the checkpoint has no 'amp' state"):
        gpu._check_run(check('amp_missing', 'other', 0, **scaler), out, timeout=60)
    group = dict(expect='Distributed training: process 0 of 1', expect_why='no process group was started')
    gpu._check_run(check('ddp_ok', '-', 0, **group), out, timeout=60)
    with pytest.raises(RuntimeError, match='no process group was started'):
        gpu._check_run(check('ddp_missing', '-', 1, **group), out, timeout=60)
    with pytest.raises(RuntimeError, match='exit status 2'):
        gpu._check_run(check('crash', '-', 3), out, timeout=60)
    sleeper = {'name': 'hangs', 'argv': [sys.executable, '-c', 'import time; print("started", flush=True); '
                                         'time.sleep(60)', '--experiment', 'hangs']}
    t0 = time.time()
    with pytest.raises(TimeoutError, match='no result within 3 s'):
        gpu._check_run(sleeper, out, timeout=3)
    assert time.time() - t0 < 20
