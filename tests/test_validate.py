"""validate.py end to end on a digits model trained inside the tests (a timm-style checkpoint)."""
import argparse
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
SIZE = 16
ARCH = 'test_efficientnet'
EPS = ['0', '2', '8', '16']


@pytest.fixture(scope='module')
def checkpoint_dir(tmp_path_factory):
    """test_efficientnet trained for 2 epochs on digits at 16 px, saved like timm's CheckpointSaver does."""
    import timm

    from dr.data import DigitsDataset
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = timm.create_model(ARCH, num_classes=10)
        cfg = timm.data.resolve_data_config({}, model=model)
        mean = torch.tensor(cfg['mean']).view(1, 3, 1, 1)
        std = torch.tensor(cfg['std']).view(1, 3, 1, 1)
        ds = DigitsDataset('train', img_size=SIZE)
        x = torch.tensor(np.stack(ds.images)).permute(0, 3, 1, 2).float() / 255.0
        y = torch.tensor(ds.targets)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
        g = torch.Generator().manual_seed(0)
        model.train()
        for _ in range(2):
            perm = torch.randperm(len(x), generator=g)
            for i in range(0, len(x), 64):
                idx = perm[i:i + 64]
                loss = F.cross_entropy(model((x[idx] - mean) / std), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    out = tmp_path_factory.mktemp('ckpt') / 'digits-run'
    out.mkdir()
    torch.save({'state_dict': model.state_dict(), 'arch': ARCH, 'epoch': 2,
                'args': argparse.Namespace(model=ARCH, digits_size=SIZE, dataset='digits')},
               out / 'model_best.pth.tar')
    return str(out)


def _env(extra_path=None):
    paths = [p for p in (extra_path, ROOT, os.environ.get('PYTHONPATH')) if p]
    return dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=os.pathsep.join(paths), WANDB_MODE='offline')


def _validate(args, extra_path=None, torchrun=False):
    cmd = [sys.executable]
    if torchrun:
        cmd += ['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']
    cmd += ['validate.py', *args]
    return subprocess.run(cmd, cwd=ROOT, env=_env(extra_path), capture_output=True, text=True, timeout=600)


def _png(path, value):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((16, 16, 3), value, np.uint8)).save(path)


def _digits_args(checkpoint_dir, results):
    return ['--dataset', 'digits', '--sets', 'digits', 'digits-c', '--corruptions', 'gaussian_noise', 'contrast',
            '--checkpoint', checkpoint_dir, '--fgsm-eps', *EPS, '-j', '0', '-b', '128', '--results-file', results,
            '--no-progress']


def test_help_is_quick_and_imports_no_torch():
    code = ('import sys, validate; validate.create_parser()[1].format_help(); '
            "print(sorted(m for m in ('torch', 'timm', 'numpy') if m in sys.modules))")
    proc = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == '[]'
    proc = subprocess.run([sys.executable, 'validate.py', '--help'], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and '--suite' in proc.stdout and '--fgsm-eps' in proc.stdout


def test_yaml_config_defaults_and_unknown_key(tmp_path, capsys):
    import validate
    cfg = tmp_path / 'v.yaml'
    cfg.write_text('sets: [digits, digits-c]\nfgsm_eps: [0, 2]\nbatch_size: 32\nresults_file: r.json\n')
    args, text = validate.parse_args(['-c', str(cfg), '--batch-size', '64'])
    assert args.sets == ['digits', 'digits-c'] and args.fgsm_eps == [0, 2] and args.batch_size == 64
    assert 'batch_size: 64' in text
    cfg.write_text('sets: [digits]\nbogus_flag: 1\n')
    with pytest.raises(SystemExit):
        validate.parse_args(['-c', str(cfg)])
    assert 'bogus_flag' in capsys.readouterr().err


@pytest.fixture(scope='module')
def single_run(checkpoint_dir, tmp_path_factory):
    """One validate.py run on digits + digits-C with FGSM and AutoAttack made unimportable."""
    tmp = tmp_path_factory.mktemp('validate')
    fake = tmp / 'fake_site' / 'torchattacks'
    fake.mkdir(parents=True)
    (fake / '__init__.py').write_text("raise ImportError('torchattacks deliberately broken for this test')\n")
    results = str(tmp / 'out' / 'results.json')
    args = _digits_args(checkpoint_dir, results) + ['--autoattack', '--autoattack-n', '4']
    proc = _validate(args, extra_path=str(tmp / 'fake_site'))
    return proc, results, args, str(tmp / 'fake_site')


def _rows(path):
    with open(path) as f:
        return {r['set']: r for r in json.load(f)['results']}


@pytest.mark.slow
def test_end_to_end_results_files(single_run):
    proc, results, args, fake_site = single_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _rows(results)
    parts = [f'digits-c/{c}/{s}' for c in ('gaussian_noise', 'contrast') for s in range(1, 6)]
    assert set(rows) == {'digits', 'digits-c/clean', 'digits-c', *parts}

    d = rows['digits']
    assert d['count'] == 359 and d['skipped'] == 0 and d['model'] == ARCH and d['tag'] == 'digits-run'
    assert d['img_size'] == SIZE and d['crop_pct'] == 1.0  # from the checkpoint's args / digits convention
    assert d['top1'] > 80.0 and d['top1'] + d['top1_err'] == pytest.approx(100.0)
    assert 0.0 <= d['ece'] <= 100.0 and d['ece'] <= d['mce'] and d['nll'] > 0
    fgsm = [d[f'fgsm_top1_eps{e}'] for e in EPS]
    assert fgsm[0] == pytest.approx(d['top1'])
    assert all(a >= b for a, b in zip(fgsm, fgsm[1:])), fgsm
    assert fgsm[-1] < d['top1']
    assert d['fgsm'] == {e: d[f'fgsm_top1_eps{e}'] for e in EPS}
    assert d['autoattack_status'].startswith('unavailable') and 'deliberately broken' in d['autoattack_status']
    assert d['autoattack_top1'] is None
    assert sum(d['calibration_bins']['count']) == 359

    c = rows['digits-c']
    part_err = [rows[p]['top1_err'] for p in parts]
    assert c['c_mean_err'] == pytest.approx(np.mean(part_err))
    assert c['top1'] == pytest.approx(100.0 - c['c_mean_err'])
    assert c['c_rel_mean_err'] == pytest.approx(c['c_mean_err'] - rows['digits-c/clean']['top1_err'])
    assert c['count'] == 10 * 359 and c['c_mce'] is None  # no AlexNet normalisation for digits
    assert rows['digits-c/clean']['top1'] == pytest.approx(d['top1'])
    assert rows['digits-c/contrast/5']['severity'] == 5 and rows['digits-c/contrast/5']['corruption'] == 'contrast'

    csv_path = results[:-len('.json')] + '.csv'
    with open(csv_path) as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames
        csv_rows = list(reader)
    timm_cols = ['model', 'top1', 'top1_err', 'top5', 'top5_err', 'param_count', 'img_size', 'crop_pct',
                 'interpolation']
    assert header[:len(timm_cols)] == timm_cols
    for col in ('set', 'ece', 'mce', 'nll', 'count', 'skipped', 'c_mean_err', 'c_mce', 'autoattack_status',
                *[f'fgsm_top1_eps{e}' for e in EPS]):
        assert col in header
    assert 'calibration_bins' not in header
    assert len(csv_rows) == len(rows)
    by_set = {r['set']: r for r in csv_rows}
    assert float(by_set['digits']['top1']) == pytest.approx(d['top1'], abs=1e-3)

    rel = os.path.join(os.path.dirname(results), 'reliability')
    for name in ('digits-run_digits.png', 'digits-run_digits-c.png'):
        with open(os.path.join(rel, name), 'rb') as f:
            assert f.read(4) == b'\x89PNG'
    assert 'digits-C' in proc.stdout and 'FGSM 16' in proc.stdout and 'ECE digits' in proc.stdout

    meta = json.load(open(results))['meta']
    assert 'calibration' in meta['conventions'] and meta['software']['timm']
    args_yaml = os.path.join(os.path.dirname(results), 'results.args.yaml')
    import validate
    again, _ = validate.parse_args(['-c', args_yaml])
    assert again.sets == ['digits', 'digits-c'] and again.fgsm_eps == [float(e) for e in EPS]



@pytest.mark.slow
def test_rerun_reuses_rows_and_keeps_other_rows(single_run, caplog):
    """In-process rerun (as the demo calls it): identical settings reuse every row; other rows are kept."""
    proc, results, args, _ = single_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    import validate
    before = _rows(results)
    with open(results) as f:
        doc = json.load(f)
    doc['results'].append({**doc['results'][0], 'tag': 'another-model', 'top1': 12.5})
    with open(results, 'w') as f:
        json.dump(doc, f)
    with caplog.at_level('INFO', logger='dr.evaluate'):
        out = validate.main(args)
    reused = [r for r in caplog.messages if 'reusing rows' in r]
    assert len(reused) == 12  # digits, digits-c/clean and the 10 corruption parts: nothing recomputed
    after = json.load(open(results))['results']
    assert {r['set']: r['top1'] for r in after if r['tag'] == 'digits-run'} == {k: v['top1'] for k, v in
                                                                               before.items()}
    assert [r['top1'] for r in after if r['tag'] == 'another-model'] == [12.5]
    assert out['sets']['digits']['top1'] == before['digits']['top1']
    assert out['models']['digits-run']['digits-c']['c_mean_err'] == pytest.approx(before['digits-c']['c_mean_err'])


@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_two_processes_match_single_process(single_run, checkpoint_dir, tmp_path):
    proc, results, _, _ = single_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    dist_results = str(tmp_path / 'dist.json')
    proc2 = _validate(_digits_args(checkpoint_dir, dist_results), torchrun=True)
    assert proc2.returncode == 0, proc2.stderr[-3000:]
    single, multi = _rows(results), _rows(dist_results)
    assert set(single) == set(multi)
    for name, r in single.items():
        m = multi[name]
        assert m['count'] == r['count'], name
        for key in ('top1', 'top5', 'ece', 'nll', 'c_mean_err', *[f'fgsm_top1_eps{e}' for e in EPS]):
            if r.get(key) is not None:
                assert m[key] == pytest.approx(r[key], abs=1e-6), (name, key)


def test_class_count_mismatch_is_an_error_before_any_work(checkpoint_dir, tmp_path, capsys):
    import validate
    from dr.evaluate.sets import imagenet_synsets, subset_indices
    wnid = imagenet_synsets()[subset_indices('a')[0]]
    _png(str(tmp_path / 'suite' / 'imagenet-a' / wnid / 'x.png'), 3)
    results = tmp_path / 'out' / 'r.json'
    with pytest.raises(SystemExit) as exc:
        validate.main(['--suite', str(tmp_path / 'suite'), '--checkpoint', checkpoint_dir, '--results-file',
                       str(results), '-j', '0'])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert 'has 10 classes' in err and 'imagenet-a (1000 classes)' in err and 'model_best.pth.tar' in err
    assert not (tmp_path / 'out').exists()  # nothing written, nothing evaluated
    with pytest.raises(SystemExit):
        validate.main(['--suite', str(tmp_path / 'suite'), '--sets', 'digits', 'imagenet-a', '--checkpoint',
                       checkpoint_dir])
    assert 'different class counts' in capsys.readouterr().err


def test_unreadable_image_is_reported_with_its_path(checkpoint_dir, tmp_path, capsys):
    import validate
    root = tmp_path / 'folder'
    for k in range(10):
        _png(str(root / str(k) / 'ok.png'), 20 * k)
    bad = root / '7' / 'broken.png'
    bad.write_bytes(b'\x89PNG but truncated')
    args = [str(root), '--checkpoint', checkpoint_dir, '-j', '0', '--img-size', str(SIZE), '--crop-pct', '1.0',
            '--no-progress']
    with pytest.raises(SystemExit) as exc:
        validate.main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert str(bad) in err and '--skip-bad-images' in err
    out = validate.main(args + ['--skip-bad-images'])
    row = out['sets']['folder']
    assert row['skipped'] == 1 and row['count'] == 10


def test_results_file_helpers(tmp_path):
    from dr.evaluate.loop import gather_records
    from dr.evaluate.report import csv_columns, load_results, merge_rows, write_results
    rows = [{'tag': 'a', 'set': 'digits', 'top1': 90.0, 'fgsm_top1_eps16': 1.0, 'fgsm_top1_eps2': 50.0,
             'calibration_bins': {'count': [1]}, 'ece': float('nan')}]
    cols = csv_columns(rows)
    assert cols[:2] == ['model', 'top1'] and cols.index('fgsm_top1_eps2') < cols.index('fgsm_top1_eps16')
    assert 'calibration_bins' not in cols
    json_path, csv_path = write_results(str(tmp_path / 'r.csv'), rows, {'x': 1})
    assert json_path.endswith('r.json') and csv_path.endswith('r.csv')
    doc = load_results(str(tmp_path / 'r'))
    assert doc['results'][0]['ece'] is None and doc['meta'] == {'x': 1}  # NaN stored as null
    merged = merge_rows(doc['results'] + [{'tag': 'b', 'set': 'digits', 'top1': 1.0}],
                        [{'tag': 'a', 'set': 'digits', 'top1': 91.0}])
    assert [(r['tag'], r['top1']) for r in merged] == [('b', 1.0), ('a', 91.0)]
    (tmp_path / 'bad.json').write_text('{"results": [')
    with pytest.raises(ValueError, match='bad.json'):
        load_results(str(tmp_path / 'bad.json'))
    rec = {'index': torch.tensor([2, 0, 1]), 'target': torch.tensor([5, 3, 4])}
    out = gather_records(rec)
    assert out['index'].tolist() == [0, 1, 2] and out['target'].tolist() == [3, 4, 5]
    with pytest.raises(RuntimeError, match='duplicate'):
        gather_records({'index': torch.tensor([0, 0]), 'target': torch.tensor([1, 1])})
