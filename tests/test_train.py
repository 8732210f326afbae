"""End-to-end behaviour of train.py on the embedded digits dataset (CPU)."""
import csv
import glob
import json
import os
import struct
import subprocess
import sys

import pytest
import timm
import torch
import yaml

import train
from dr.checkpoint import load_checkpoint_file
from tests.helpers import free_port, subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A tiny timm ResNet at the digits' native 32 px keeps each epoch to a few seconds on 2 cores.
# (--smoothing 0 --weight-decay 1e-4: the settings these tests were written for; timm's defaults are 0.1 and 2e-5)
BASE = ['--dataset', 'digits', '--model', 'test_resnet', '--workers', '0', '--warmup-epochs', '0',
        '--lr', '0.2', '--log-interval', '1000', '--smoothing', '0', '--weight-decay', '1e-4']


def _run(tmp_path, name, *extra):
    return train.main(BASE + ['--output', str(tmp_path), '--experiment', name, *extra])


def _read_summary(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_bake_run_learns_and_logs_components(tmp_path):
    result = _run(tmp_path, 'bake', '--bake', '-b', '64', '--epochs', '3')
    out = result['output_dir']
    assert result['last_eval']['top1'] > 60.0, result  # chance is 10%
    rows = _read_summary(os.path.join(out, 'summary.csv'))
    assert len(rows) == 3
    for row in rows:
        total, ce, bake = (float(row[k]) for k in ('train_loss', 'train_loss_ce', 'train_loss_bake'))
        assert bake > 0
        assert total == pytest.approx(ce + bake, rel=1e-4)  # lambda = 1
    # checkpoints hold the plain model (no wrapper prefix) and load with weights_only
    ckpt = load_checkpoint_file(os.path.join(out, 'last.pth.tar'))
    plain_keys = set(timm.create_model('test_resnet', num_classes=10).state_dict())
    assert set(ckpt['state_dict']) == plain_keys
    # resolved args reload through the real parser and reproduce the run's settings
    args, _ = train.parse_args(['--config', os.path.join(out, 'args.yaml')])
    assert args.bake and args.batch_size == 64 and args.lr == pytest.approx(0.2) and args.epochs == 3
    with open(os.path.join(out, 'versions.json')) as f:
        assert json.load(f)['timm']


def _state(path):
    ckpt = load_checkpoint_file(path)
    return ckpt


@pytest.mark.slow
def test_resume_continues_bit_for_bit(tmp_path):
    common = ['--bake', '-b', '32', '--epochs', '3', '--model-ema', '--model-ema-decay', '0.9', '--sched', 'cosine',
              '--digits-size', '16',  # bit-for-bit does not need the full size: a quarter of the pixels
              '--hflip', '0.5', '--reprob', '0.25']
    _run(tmp_path, 'straight', *common)
    _run(tmp_path, 'interrupted', *common, '--stop-epoch', '2')
    first = _state(os.path.join(tmp_path, 'interrupted', 'last.pth.tar'))
    assert first['epoch'] == 1
    _run(tmp_path, 'interrupted', *common, '--resume', os.path.join(tmp_path, 'interrupted', 'last.pth.tar'))
    a = _state(os.path.join(tmp_path, 'straight', 'last.pth.tar'))
    b = _state(os.path.join(tmp_path, 'interrupted', 'last.pth.tar'))
    assert a['epoch'] == b['epoch'] == 2
    for key in ('state_dict', 'state_dict_ema'):
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), f'{key}.{k} differs after resume'
    for sa, sb in zip(a['optimizer']['state'].values(), b['optimizer']['state'].values()):
        assert torch.equal(sa['momentum_buffer'], sb['momentum_buffer'])
    rows_a = _read_summary(os.path.join(tmp_path, 'straight', 'summary.csv'))
    rows_b = _read_summary(os.path.join(tmp_path, 'interrupted', 'summary.csv'))
    assert [r['train_loss'] for r in rows_a] == [r['train_loss'] for r in rows_b]


@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_two_process_bake_global(tmp_path):
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={free_port()}',
           os.path.join(ROOT, 'train.py'), *BASE, '--bake', '--bake-global', '-b', '32', '--epochs', '2',
           '--output', str(tmp_path), '--experiment', 'ddp']
    env = dict(os.environ, OMP_NUM_THREADS='1')
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(os.path.join(tmp_path, 'ddp', 'results.json')) as f:
        result = json.load(f)
    assert result['last_eval']['top1'] > 20.0
    rows = _read_summary(os.path.join(tmp_path, 'ddp', 'summary.csv'))
    assert len(rows) == 2 and float(rows[-1]['train_loss_bake']) > 0
    assert 'Distributed training: process 0 of 2' in proc.stdout + proc.stderr


@pytest.mark.slow
def test_torchrun_one_process_starts_a_group_and_matches_a_plain_run(tmp_path):
    """torchrun --nproc_per_node=1 runs the DDP path (a group of one, gloo here) and trains exactly as without it."""
    argv = [*BASE, '-b', '64', '--epochs', '1', '--seed', '3', '--digits-size', '16', '--output', str(tmp_path)]
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=1', f'--master_port={free_port()}',
           os.path.join(ROOT, 'train.py'), *argv, '--experiment', 'ddp1']
    env = dict(os.environ, OMP_NUM_THREADS='1')
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert 'Distributed training: process 0 of 1' in proc.stdout + proc.stderr
    plain = subprocess.run([sys.executable, os.path.join(ROOT, 'train.py'), *argv, '--experiment', 'plain'],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert 'Distributed training' not in plain.stdout + plain.stderr
    rows = [_read_summary(os.path.join(tmp_path, name, 'summary.csv'))[-1] for name in ('ddp1', 'plain')]
    assert float(rows[0]['train_loss']) == pytest.approx(float(rows[1]['train_loss']), rel=1e-5)
    assert rows[0]['eval_top1'] == rows[1]['eval_top1']


@pytest.mark.slow
def test_wandb_offline_run_has_metrics(tmp_path, monkeypatch):
    monkeypatch.setenv('WANDB_MODE', 'offline')
    monkeypatch.setenv('WANDB_SILENT', 'true')
    result = _run(tmp_path, 'wb', '--bake', '-b', '64', '--epochs', '1', '--log-wandb', '--wandb-project', 'dr-test',
                  '--wandb-tags', 'ci', 'bake')
    out = result['output_dir']
    with open(os.path.join(out, 'wandb_run_id.txt')) as f:
        run_id = f.read().strip()
    runs = glob.glob(os.path.join(out, 'wandb', f'offline-run-*-{run_id}', f'run-{run_id}.wandb'))
    assert runs, os.listdir(os.path.join(out, 'wandb'))
    with open(runs[0], 'rb') as f:
        blob = f.read()
    for metric in (b'train_loss_bake', b'train_loss_ce', b'eval_top1'):
        assert metric in blob


def _wandb_history(path):
    """(step, epoch) of every history record in an offline ``run-ID.wandb`` file (W&B's record-log format:
    a 7-byte header, then 32 KiB blocks of records framed as crc32 (4) | length (2, LE) | type (1) | data)."""
    from wandb.proto import wandb_internal_pb2
    data = open(path, 'rb').read()
    assert data[:4] == b':W&B'
    pos, block, out, buf = 7, 32768, [], b''
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack('<IHB', data[pos:pos + 7])
        if kind == 0 and length == 0:  # zero padding at the end of a block
            pos += block - pos % block
            continue
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last fragment of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            buf = b''
            if record.WhichOneof('record_type') == 'history':
                items = {item.key or '/'.join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item}
                out.append((record.history.step.num, items['epoch']))
    return out


@pytest.mark.slow
def test_resume_drops_repeated_summary_rows_and_wandb_steps_line_up(tmp_path, monkeypatch):
    monkeypatch.setenv('WANDB_MODE', 'offline')
    monkeypatch.setenv('WANDB_SILENT', 'true')
    common = ['-b', '64', '--epochs', '3', '--log-wandb', '--wandb-project', 'dr-test']
    _run(tmp_path, 'run', *common, '--stop-epoch', '2')
    run = tmp_path / 'run'
    summary = run / 'summary.csv'
    rows = summary.read_text().splitlines()
    # killed after writing epoch 2's row but before saving its checkpoint: last.pth.tar still holds epoch 1
    summary.write_text('\n'.join(rows + ['2' + rows[-1][1:]]) + '\n')
    # a run folder resumes from its last.pth.tar, and the run continues in that folder
    result = train.main(BASE + [*common, '--resume', str(run)])
    assert result['output_dir'] == str(run)
    assert result['best_epoch'] == 2
    assert [r['epoch'] for r in _read_summary(summary)] == ['0', '1', '2']
    segments = sorted(glob.glob(str(run / 'wandb' / 'offline-run-*' / '*.wandb')))
    assert len(segments) == 2
    assert [_wandb_history(p) for p in segments] == [[(0, 0), (1, 1)], [(2, 2)]]  # step == epoch in both


@pytest.mark.slow
def test_overwrite_starts_over_and_refusal_keeps_the_run(tmp_path, capsys):
    _run(tmp_path, 'x', '-b', '64', '--epochs', '2', '--checkpoint-hist', '2')
    run = tmp_path / 'x'
    before = {name: (run / name).stat().st_mtime_ns for name in os.listdir(run)}
    assert 'checkpoint-1.pth.tar' in before
    with pytest.raises(SystemExit) as info:
        _run(tmp_path, 'x', '-b', '64', '--epochs', '1')
    assert info.value.code == 2 and str(run) in capsys.readouterr().err
    assert {name: (run / name).stat().st_mtime_ns for name in os.listdir(run)} == before  # untouched
    result = _run(tmp_path, 'x', '-b', '64', '--epochs', '1', '--overwrite')
    assert result['best_epoch'] == 0
    assert sorted(os.listdir(run)) == ['args.yaml', 'checkpoint-0.pth.tar', 'last.pth.tar', 'model_best.pth.tar',
                                       'results.json', 'summary.csv', 'versions.json']
    assert len(_read_summary(run / 'summary.csv')) == 1
    assert 'overwrite' not in yaml.safe_load((run / 'args.yaml').read_text())  # never replayed from args.yaml


@pytest.mark.slow
def test_progress_bar_on_a_terminal_and_final_summary(tmp_path):
    """Under a pseudo-terminal the epoch shows a tqdm bar; the last line names the best metric and the folder."""
    import fcntl
    import pty
    import termios
    cmd = [sys.executable, os.path.join(ROOT, 'train.py'), *BASE, '-b', '64', '--epochs', '1', '--output',
           str(tmp_path), '--experiment', 'tty']
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack('HHHH', 40, 120, 0, 0))  # a 120-column terminal
    proc = subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(), stdout=follower, stderr=follower)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert proc.wait(timeout=600) == 0
    out = b''.join(chunks).decode(errors='replace')
    assert 'Epoch 0:' in out and 'batch/s' in out and '%|' in out, out[-3000:]
    last = [line for line in out.splitlines() if line.strip()][-1]
    assert 'Done: best top1' in last and '(epoch 0)' in last and str(tmp_path / 'tty') in last, last


def test_progress_bar_only_on_a_terminal_and_without_no_progress(monkeypatch):
    class Stream:
        def __init__(self, tty):
            self.tty = tty

        def isatty(self):
            return self.tty
    args, _ = train.parse_args([])
    monkeypatch.setattr(sys, 'stderr', Stream(True))
    assert train.show_progress(args)
    args.no_progress = True
    assert not train.show_progress(args)
    args.no_progress, args.rank = False, 1
    assert not train.show_progress(args)
    args.rank = 0
    monkeypatch.setattr(sys, 'stderr', Stream(False))
    assert not train.show_progress(args)


def test_unknown_yaml_key_is_named(tmp_path, capsys):
    cfg = tmp_path / 'bad.yaml'
    cfg.write_text(yaml.safe_dump({'model': 'test_resnet', 'bake_omegaa': 0.3}))
    with pytest.raises(SystemExit):
        train.parse_args(['--config', str(cfg)])
    err = capsys.readouterr().err
    assert 'bake_omegaa' in err and str(cfg) in err


def test_yaml_config_gives_defaults_and_cli_overrides(tmp_path):
    cfg = tmp_path / 'ok.yaml'
    cfg.write_text('bake: true\nbake-omega: 0.3\nbatch_size: 64\nlr_base: 0.2\n')
    args, text = train.parse_args(['--config', str(cfg), '--bake-omega', '0.7'])
    assert args.bake and args.batch_size == 64 and args.lr_base == 0.2
    assert args.bake_omega == 0.7
    assert yaml.safe_load(text)['bake_omega'] == 0.7


def test_indivisible_batch_size_is_rejected(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(['--bake', '-b', '63', '--bake-intra', '1'])
    err = capsys.readouterr().err
    assert '--batch-size' in err and '--bake-intra' in err and '63' in err
    # 64 is fine with M=1 but not with M=2 (groups of 3)
    train.parse_args(['--bake', '-b', '64', '--bake-intra', '1'])
    with pytest.raises(SystemExit):
        train.parse_args(['--bake', '-b', '64', '--bake-intra', '2'])


def test_conflicting_modes_are_rejected(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(['--bake', '--reinforced', '/nonexistent'])
    assert '--bake' in capsys.readouterr().err
