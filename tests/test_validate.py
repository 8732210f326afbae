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
    """One validate.py run on digits + digits-C with FGSM and the reference AutoAttack on 3 images (a large budget,
    so that APGD-CE breaks them and the slow attacks after it have nothing left: tests/evaluate/test_attacks.py runs
    all four)."""
    tmp = tmp_path_factory.mktemp('validate')
    results = str(tmp / 'out' / 'results.json')
    args = _digits_args(checkpoint_dir, results) + ['--autoattack', '--autoattack-n', '3', '--autoattack-eps', '16']
    proc = _validate(args)
    return proc, results, args


def _rows(path):
    with open(path) as f:
        return {r['set']: r for r in json.load(f)['results']}


@pytest.mark.slow
def test_end_to_end_results_files(single_run):
    proc, results, args = single_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _rows(results)
    parts = [f'digits-c/{c}/{s}' for c in ('gaussian_noise', 'contrast') for s in range(1, 6)]
    assert set(rows) == {'digits', 'digits-c/clean', 'digits-c', *parts}

    d = rows['digits']
    assert d['count'] == 359 and d['skipped'] == 0 and d['model'] == ARCH and d['tag'] == 'digits-run'
    assert d['expected_count'] == 359 and d['complete'] is True and len(d['data_fingerprint']) == 16
    assert d['img_size'] == SIZE and d['crop_pct'] == 1.0  # from the checkpoint's args / digits convention
    assert d['top1'] > 80.0 and d['top1'] + d['top1_err'] == pytest.approx(100.0)
    assert 0.0 <= d['ece'] <= 100.0 and d['ece'] <= d['mce'] and d['nll'] > 0
    fgsm = [d[f'fgsm_top1_eps{e}'] for e in EPS]
    assert fgsm[0] == pytest.approx(d['top1'])
    assert all(a >= b for a, b in zip(fgsm, fgsm[1:])), fgsm
    assert fgsm[-1] < d['top1']
    assert d['fgsm'] == {e: d[f'fgsm_top1_eps{e}'] for e in EPS}
    from dr.evaluate.attacks import autoattack_status
    if autoattack_status()[0]:  # the 'robust' extra (installed in CI): the configuration is in the results file
        aa = d['autoattack']
        assert d['autoattack_status'].startswith('pyautoattack ') and aa['package'] == d['autoattack_status']
        assert aa['version'] == 'standard' and aa['norm'] == 'Linf' and aa['eps_255'] == pytest.approx(16.0)
        assert aa['attacks'] == ['apgd-ce', 'apgd-t', 'fab-t', 'square'] and aa['seed'] == 42
        assert aa['apgd_ce']['n_iter'] == aa['apgd_t']['n_iter'] == aa['fab_t']['n_iter'] == 100
        assert aa['apgd_t']['n_target_classes'] == aa['fab_t']['n_target_classes'] == 9
        assert aa['square']['n_queries'] == 5000
        assert d['autoattack_count'] == 3 and 0.0 <= d['autoattack_top1'] <= 100.0 and d['autoattack_eps'] == 16
    else:
        assert d['autoattack_status'].startswith('unavailable') and d['autoattack_top1'] is None
    assert sum(d['calibration_bins']['count']) == 359

    c = rows['digits-c']
    part_err = [rows[p]['top1_err'] for p in parts]
    assert c['c_mean_err'] == pytest.approx(np.mean(part_err))
    assert c['top1'] == pytest.approx(100.0 - c['c_mean_err'])
    assert c['c_rel_mean_err'] == pytest.approx(c['c_mean_err'] - rows['digits-c/clean']['top1_err'])
    assert c['count'] == 10 * 359 and c['c_mce'] is None  # no AlexNet normalisation for digits
    # evaluated after the attacks: identical to the first pass (the attacks left the model as it was)
    assert rows['digits-c/clean']['top1'] == d['top1'] and rows['digits-c/clean']['nll'] == d['nll']
    assert c['complete'] is True and c['c_corruptions'] == ['contrast', 'gaussian_noise']
    assert rows['digits-c/contrast/5']['severity'] == 5 and rows['digits-c/contrast/5']['corruption'] == 'contrast'

    csv_path = results[:-len('.json')] + '.csv'
    with open(csv_path) as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames
        csv_rows = list(reader)
    # identity first (the model column alone is not unique across checkpoints), then timm's metric columns
    assert header[:12] == ['tag', 'set', 'model', 'checkpoint_sha256', 'top1', 'top1_err', 'top5', 'top5_err',
                           'param_count', 'img_size', 'crop_pct', 'interpolation']
    for col in ('ece', 'mce', 'nll', 'count', 'expected_count', 'complete', 'skipped', 'c_mean_err', 'c_mce',
                'c_rel_mce', 'autoattack_status', 'autoattack_eps', *[f'fgsm_top1_eps{e}' for e in EPS]):
        assert col in header
    assert 'calibration_bins' not in header and 'autoattack' not in header
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
    proc, results, args = single_run
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
    proc, results, _ = single_run
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
    assert cols[:5] == ['tag', 'set', 'model', 'checkpoint_sha256', 'top1']
    assert cols.index('fgsm_top1_eps2') < cols.index('fgsm_top1_eps16')
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


# --------------------------------------------------------------------------------------------------------------------
# bad input and results a reviewer can trust

def _exit_code(argv, capsys):
    import validate
    with pytest.raises(SystemExit) as exc:
        validate.main(argv)
    return exc.value.code, capsys.readouterr().err


def test_help_prints_each_default_once():
    import validate
    parser = validate.create_parser()[1]
    text = parser.format_help()
    assert '(default: None)' not in text and '(default: False)' not in text and '(default: [])' not in text
    formatter = parser._get_formatter()
    for action in parser._actions:
        help_text = formatter._expand_help(action) if action.help else ''  # the text --help prints for the flag
        assert help_text.count('default') <= 1, (action.option_strings, help_text)
    assert '(default: 256)' in text  # plain defaults are still shown
    assert 'digits image side (default: from the checkpoint args, else 32)' in ' '.join(text.split())


def test_bad_flag_values_are_errors_naming_the_flag(checkpoint_dir, tmp_path, capsys):
    base = ['--dataset', 'digits', '--checkpoint', checkpoint_dir, '-j', '0', '--no-progress']
    code, err = _exit_code(base + ['--imagenet-c-protocol', 'squash'], capsys)
    assert code == 2 and '--imagenet-c-protocol' in err
    code, err = _exit_code(base + ['--results-format', 'xlsx'], capsys)
    assert code == 2 and '--results-format' in err
    code, err = _exit_code(base + ['--autoattack', '--autoattack-eps', '0'], capsys)
    assert code == 2 and '--autoattack-eps must be > 0' in err
    code, err = _exit_code(base + ['--fgsm-eps', '2', '--fgsm-n', '0'], capsys)
    assert code == 2 and '--fgsm-n' in err
    code, err = _exit_code(base + ['--sets', 'digits', 'imagenet-x'], capsys)
    assert code == 2 and 'unknown set(s) imagenet-x' in err
    code, err = _exit_code(base + ['--sets', 'digits', 'imagenet'], capsys)
    assert code == 2 and 'pass --suite ROOT' in err
    folder = tmp_path / 'three'
    for k in range(3):
        _png(str(folder / str(k) / 'a.png'), 10 * k)
    code, err = _exit_code([str(folder), '--model', ARCH, '--autoattack', '-j', '0'], capsys)
    assert code == 2 and '--autoattack' in err and 'folder (3 classes)' in err


def test_class_count_error_for_a_plain_folder_names_the_folder_not_imagenet(checkpoint_dir, tmp_path, capsys):
    folder = tmp_path / 'three'
    for k in range(3):
        _png(str(folder / f'class{k}' / 'a.png'), 10 * k)
    code, err = _exit_code([str(folder), '--checkpoint', checkpoint_dir, '-j', '0'], capsys)
    assert code == 2 and 'has 10 classes' in err and 'folder (3 classes)' in err
    assert 'ImageNet' not in err and 'ObjectNet' not in err


def _tiny_suite(root, with_c=False):
    """imagenet-a with one image per listed class; optionally imagenet val + the full 15 x 5 ImageNet-C tree."""
    from dr.evaluate.corruptions import IMAGENET_C_CORRUPTIONS
    from dr.evaluate.sets import imagenet_synsets, subset_indices
    syn = imagenet_synsets()
    a = subset_indices('a')
    for k in range(3):
        _png(str(root / 'imagenet-a' / syn[a[k]] / 'x.png'), 40 + k)
    if with_c:
        for k in range(2):
            _png(str(root / 'imagenet' / 'val' / syn[k] / f'ILSVRC2012_val_0000000{k + 1}.png'), 20 + k)
        for c in IMAGENET_C_CORRUPTIONS:
            for s in range(1, 6):
                _png(str(root / 'ImageNet-C' / c / str(s) / syn[s] / 'x.png'), 5 * s)


def test_missing_requested_set_is_an_error_and_listed_in_discovery(tmp_path, capsys):
    _tiny_suite(tmp_path / 'suite')
    common = ['--suite', str(tmp_path / 'suite'), '--model', ARCH, '--img-size', '16', '-j', '0', '--no-progress']
    code, err = _exit_code(common + ['--sets', 'imagenet-a', 'imagenet-r', 'objectnet'], capsys)
    assert code == 2 and 'not found under' in err
    assert 'imagenet-r (looked for imagenet-r)' in err and 'objectnet (looked for objectnet or objectnet-1.0' in err
    import validate
    out = validate.main(common + ['--results-file', str(tmp_path / 'r.json')])  # discovery: missing sets listed
    assert list(out['sets']) == ['imagenet-a'] and 'imagenet-r' in out['missing']
    assert 'Missing under' in capsys.readouterr().out


def test_wrong_set_sizes_warn_and_mark_rows_or_stop_with_strict(tmp_path, capsys, caplog):
    _tiny_suite(tmp_path / 'suite')
    results = tmp_path / 'out' / 'r.json'
    common = ['--suite', str(tmp_path / 'suite'), '--model', ARCH, '--img-size', '16', '-j', '0', '--no-progress',
              '--results-file', str(results)]
    code, err = _exit_code(common + ['--strict'], capsys)
    assert code == 2 and '--strict' in err and 'imagenet-a at' in err and '3 images, the official set 7500' in err
    assert not results.exists()  # stopped before any evaluation
    import validate
    with caplog.at_level('WARNING'):
        out = validate.main(common)
    row = out['sets']['imagenet-a']
    assert row['count'] == 3 and row['expected_count'] == 7500 and row['complete'] is False
    assert any('Incomplete set' in m and 'imagenet-a' in m for m in caplog.messages)
    with open(str(results)[:-5] + '.csv') as f:
        assert next(csv.DictReader(f))['complete'] == 'False'


@pytest.mark.slow
def test_imagenet_c_protocol_relative_mce_and_completeness(tmp_path, capsys):
    import validate
    _tiny_suite(tmp_path / 'suite', with_c=True)
    common = ['--suite', str(tmp_path / 'suite'), '--sets', 'imagenet', 'imagenet-c', '--model', ARCH,
              '--img-size', '16', '-j', '0', '--no-progress', '-b', '64']
    out = validate.main(common)
    rows = out['sets']
    c = rows['imagenet-c']
    assert c['protocol'] == 'center-crop' and rows['imagenet-c/fog/3']['protocol'] == 'center-crop'
    assert c['c_missing'] == [] and c['complete'] is False  # all 75 folders, but 1 image each, not 50,000
    from dr.evaluate.corruptions import ALEXNET_CLEAN_ERR, ALEXNET_ERR, IMAGENET_C_CORRUPTIONS
    clean = rows['imagenet']['top1_err'] / 100
    mean_err = {k: np.mean([rows[f'imagenet-c/{k}/{s}']['top1_err'] / 100 for s in range(1, 6)])
                for k in IMAGENET_C_CORRUPTIONS}
    expected_rel = 100 * np.mean([(mean_err[k] - clean) / (ALEXNET_ERR[k] - ALEXNET_CLEAN_ERR) for k in mean_err])
    assert c['c_rel_mce'] == pytest.approx(expected_rel)
    assert c['c_mce'] == pytest.approx(100 * np.mean([mean_err[k] / ALEXNET_ERR[k] for k in mean_err]))
    assert 'mCE' in capsys.readouterr().out
    resized = validate.main(common + ['--imagenet-c-protocol', 'resize', '--sets', 'imagenet-c', '--corruptions',
                                      'fog'])
    assert resized['sets']['imagenet-c']['protocol'] == 'resize'
    assert len(resized['sets']['imagenet-c']['c_missing']) == 70  # 14 corruptions x 5 not evaluated: no mCE


def test_stale_rows_are_recomputed_when_the_set_changes(checkpoint_dir, tmp_path, caplog):
    import validate
    root = tmp_path / 'folder'
    for k in range(10):
        _png(str(root / str(k) / 'a.png'), 20 * k)
    args = [str(root), '--checkpoint', checkpoint_dir, '-j', '0', '--img-size', str(SIZE), '--crop-pct', '1.0',
            '--no-progress', '--results-file', str(tmp_path / 'r.json')]
    assert validate.main(args)['sets']['folder']['count'] == 10
    with caplog.at_level('INFO', logger='dr.evaluate'):
        assert validate.main(args)['sets']['folder']['count'] == 10
    assert any('reusing rows' in m for m in caplog.messages)  # unchanged set: reused
    caplog.clear()
    _png(str(root / '3' / 'b.png'), 61)
    with caplog.at_level('INFO', logger='dr.evaluate'):
        assert validate.main(args)['sets']['folder']['count'] == 11  # an added image is counted, not reused
    assert not any('reusing rows' in m for m in caplog.messages)


def test_autoattack_missing_is_reported_end_to_end(checkpoint_dir, monkeypatch, capsys):
    import builtins

    import validate
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == 'pyautoattack' or name.startswith('pyautoattack.'):
            raise ImportError('deliberately missing for this test')
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, '__import__', fake_import)
    out = validate.main(['--dataset', 'digits', '--checkpoint', checkpoint_dir, '--autoattack', '--autoattack-n', '2',
                         '-j', '0', '--no-progress'])
    d = out['sets']['digits']
    assert d['autoattack_top1'] is None and 'autoattack' not in d
    assert d['autoattack_status'].startswith('unavailable') and 'deliberately missing' in d['autoattack_status']
    assert 'unavailable' in capsys.readouterr().out  # the table says so instead of a number


def test_results_identify_checkpoints_and_timm_format(checkpoint_dir, tmp_path):
    """Two checkpoints of the same architecture: distinct tags and sha256 in our CSV; --results-format timm writes
    timm validate.py's CSV/JSON per set."""
    import validate
    other = tmp_path / 'other-run'
    other.mkdir()
    ckpt = torch.load(os.path.join(checkpoint_dir, 'model_best.pth.tar'), weights_only=False)
    ckpt['state_dict'] = {k: v * 0.5 if v.is_floating_point() else v for k, v in ckpt['state_dict'].items()}
    torch.save(ckpt, other / 'model_best.pth.tar')
    results = tmp_path / 'out' / 'r.json'
    out = validate.main(['--dataset', 'digits', '--checkpoint', checkpoint_dir, str(other), '-j', '0',
                         '--no-progress', '--results-file', str(results), '--results-format', 'timm'])
    with open(tmp_path / 'out' / 'r.csv') as f:
        rows = list(csv.DictReader(f))
    assert [(r['tag'], r['model']) for r in rows] == [('digits-run', ARCH), ('other-run', ARCH)]
    assert len({r['checkpoint_sha256'] for r in rows}) == 2 and all(len(r['checkpoint_sha256']) == 64 for r in rows)
    with open(tmp_path / 'out' / 'r-digits.csv') as f:
        reader = csv.DictReader(f)
        timm_rows = list(reader)
    assert reader.fieldnames == ['model', 'top1', 'top1_err', 'top5', 'top5_err', 'param_count', 'img_size',
                                 'crop_pct', 'interpolation', 'checkpoint']
    tops = [out['models'][t]['digits']['top1'] for t in ('digits-run', 'other-run')]
    assert [float(r['top1']) for r in timm_rows] == [round(t, 4) for t in sorted(tops, reverse=True)]
    text = (tmp_path / 'out' / 'r-digits.json').read_text()
    doc = json.loads(text)
    assert isinstance(doc, list) and len(doc) == 2 and text.startswith('[\n    {')  # indent=4, like timm
    assert {r['checkpoint'] for r in doc} == {r['checkpoint'] for r in rows}
