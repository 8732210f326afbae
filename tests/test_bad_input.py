"""Bad input through the real command lines: exit status 2 and one message naming the flag, file, key or folder.

Every case runs the script in a child process, as a user would. Cases that fail before torch is imported take a
fraction of a second; the checkpoint and model-name cases import torch and timm (a few seconds each).
"""
import argparse
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import REPO, subprocess_env

TRAIN = ['--dataset', 'digits', '--model', 'test_resnet', '--workers', '0', '--epochs', '1', '--no-progress']
UNSAFE_ADVICE = ('will likely succeed', 'weights_only` set to `False', 'weights_only=False')


def _run(script, *args, importtime=False, cwd=None):
    cmd = [sys.executable, *(['-X', 'importtime'] if importtime else []), os.path.join(REPO, script), *map(str, args)]
    return subprocess.run(cmd, cwd=cwd or REPO, env=subprocess_env(WANDB_MODE='offline'), capture_output=True,
                          text=True, timeout=600)


def _imported(stderr):
    """Top-level package names that ``python -X importtime`` reports as imported."""
    lines = [line for line in stderr.splitlines() if line.startswith('import time:')]
    return {line.split('|')[-1].strip().split('.')[0] for line in lines}


def _error(proc, *names):
    """The process failed with status 2 and one argparse-style error line naming every one of ``names``."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert 'Traceback' not in out, out[-3000:]
    for name in names:
        assert str(name) in proc.stderr, (name, proc.stderr[-3000:])
    return proc.stderr


@pytest.fixture
def evil_checkpoint(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, (f'touch {tmp_path / "pwned"}',))
    path = tmp_path / 'evil.pth.tar'
    torch.save({'state_dict': {}, 'x': Evil()}, path)
    return path


# ----------------------------------------------------------------------------------------------------- --help

@pytest.mark.parametrize('script', ['train.py', 'reinforce.py', 'validate.py'])
def test_help_lists_config_flag(script):
    proc = _run(script, '--help')
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert '-c FILE, --config FILE' in proc.stdout


def test_train_help_and_flag_errors_do_not_import_torch(tmp_path):
    proc = _run('train.py', '--help', importtime=True)
    assert proc.returncode == 0
    assert not {'torch', 'timm'} & _imported(proc.stderr)
    # a bad value is reported before data and model are built: torch is never imported
    proc = _run('train.py', *TRAIN, '--bake', '--bake-omega', '2', '--output', tmp_path, '--experiment', 'x',
                importtime=True)
    _error(proc, '--bake-omega', '2')
    assert not {'torch', 'timm'} & _imported(proc.stderr)
    assert not os.path.exists(tmp_path / 'x')


# ----------------------------------------------------------------------------------------- YAML config values

@pytest.mark.parametrize('text, key, problem', [
    ('bake: "no"\n', 'bake', 'expected true or false'),
    ('amp_dtype: float8\n', 'amp_dtype', "'float8' is not one of the choices"),
    ('bake_knowledge: foo\n', 'bake_knowledge', "'foo' is not one of the choices"),
    ('epochs: 1.5\n', 'epochs', 'expected an integer'),
    ('lr: [0.1, 0.2]\n', 'lr', 'expected a number, got a list'),
    ('input_size: [3, 32]\n', 'input_size', 'a list of 3 value(s)'),
    ('bake_omegaa: 0.3\n', 'bake_omegaa', 'unknown key; did you mean bake_omega?'),
    ('overwrite: true\n', 'overwrite', 'command-line-only'),
])
def test_train_yaml_values_checked_like_flags(tmp_path, text, key, problem):
    cfg = tmp_path / 'recipe.yaml'
    cfg.write_text(text)
    err = _error(_run('train.py', *TRAIN, '-c', cfg, '--output', tmp_path / 'out', '--experiment', 'x'),
                 f'{cfg}: {key}: ')
    assert problem in err
    assert not os.path.exists(tmp_path / 'out')  # nothing written


def test_train_malformed_or_missing_yaml(tmp_path):
    cfg = tmp_path / 'broken.yaml'
    cfg.write_text('model: test_resnet\nscale: [0.5, 1.0\n')
    _error(_run('train.py', '-c', cfg), f'{cfg}:3:1: not valid YAML')
    cfg.write_text('- model\n- test_resnet\n')
    _error(_run('train.py', '-c', cfg), f'{cfg}: must hold a mapping')
    _error(_run('train.py', '-c', tmp_path / 'missing.yaml'), f'{tmp_path / "missing.yaml"}: config file not found')


def test_reinforce_yaml_values_checked_like_flags(tmp_path):
    cfg = tmp_path / 'rd.yaml'
    cfg.write_text('topk: 2.5\naug: foo\nno_progress: "yes"\n')
    err = _error(_run('reinforce.py', '-c', cfg, '--output', tmp_path / 'out'),
                 f'{cfg}: topk: expected an integer', f'{cfg}: aug: ', f'{cfg}: no_progress: expected true or false')
    assert "'foo' is not one of the choices" in err
    assert not os.path.exists(tmp_path / 'out')


def test_validate_yaml_values_checked_like_flags(tmp_path):
    cfg = tmp_path / 'val.yaml'
    cfg.write_text('batch_size: big\namp: 1\nfgsm_eps: [0, a]\namp_dtype: float8\n')
    _error(_run('validate.py', '-c', cfg), f'{cfg}: batch_size: expected an integer', f'{cfg}: amp: expected true',
           f"{cfg}: fgsm_eps: item 2: expected a number, got the string 'a'", f'{cfg}: amp_dtype: ')


# ----------------------------------------------------------------------------------------- train.py run folder

def test_existing_run_folder_is_refused(tmp_path):
    run = tmp_path / 'out' / 'x'
    run.mkdir(parents=True)
    (run / 'args.yaml').write_text('model: test_resnet\n')
    (run / 'checkpoint-3.pth.tar').write_bytes(b'old')
    before = sorted(os.listdir(run))
    err = _error(_run('train.py', *TRAIN, '--output', tmp_path / 'out', '--experiment', 'x'), run)
    assert '--resume' in err and '--overwrite' in err
    # --resume from a checkpoint of another folder does not continue this one
    other = tmp_path / 'other.pth.tar'
    other.write_bytes(b'x')
    _error(_run('train.py', *TRAIN, '--output', tmp_path / 'out', '--experiment', 'x', '--resume', other), run, other)
    # --overwrite refuses a folder holding files train.py did not write, and resuming from the folder it would clear
    (run / 'notes.txt').write_text('mine')
    _error(_run('train.py', *TRAIN, '--output', tmp_path / 'out', '--experiment', 'x', '--overwrite'), run,
           'notes.txt')
    (run / 'last.pth.tar').write_bytes(b'x')
    _error(_run('train.py', *TRAIN, '--output', tmp_path / 'out', '--experiment', 'x', '--overwrite', '--resume', run),
           '--overwrite', run)
    assert sorted(os.listdir(run)) == sorted(before + ['notes.txt', 'last.pth.tar'])  # nothing touched


def test_resume_missing_file_or_folder(tmp_path):
    _error(_run('train.py', *TRAIN, '--resume', tmp_path / 'missing.pth.tar'), '--resume', tmp_path / 'missing.pth.tar')
    (tmp_path / 'run').mkdir()
    (tmp_path / 'run' / 'recovery-0-5.pth.tar').write_bytes(b'x')
    _error(_run('train.py', *TRAIN, '--resume', tmp_path / 'run'), f'--resume {tmp_path / "run"}', 'no last.pth.tar',
           'recovery-0-5.pth.tar')
    _error(_run('train.py', *TRAIN, '--initial-checkpoint', tmp_path / 'nope.pth'), '--initial-checkpoint',
           tmp_path / 'nope.pth')
    _error(_run('train.py', '--dataset', '', tmp_path / 'no_such_images'), tmp_path / 'no_such_images')


@pytest.mark.slow
def test_unknown_model_is_named_before_anything_is_built(tmp_path):
    err = _error(_run('train.py', *TRAIN, '--model', 'resnet5', '--output', tmp_path, '--experiment', 'x'),
                 'train.py: error: --model resnet5: unknown timm model', 'resnet50')
    assert 'Model ' not in err and not os.path.exists(tmp_path / 'x')


# ----------------------------------------------------------------------------------------- checkpoints

@pytest.mark.slow
@pytest.mark.parametrize('flag', ['--resume', '--initial-checkpoint'])
def test_train_refuses_malicious_checkpoint_without_unsafe_advice(tmp_path, evil_checkpoint, flag):
    err = _error(_run('train.py', *TRAIN, flag, evil_checkpoint, '--output', tmp_path / 'out', '--experiment', 'x'),
                 evil_checkpoint, 'not a loadable checkpoint', 'NOT loaded, for safety')
    assert not any(advice in err for advice in UNSAFE_ADVICE), err
    assert not os.path.exists(tmp_path / 'pwned') and not os.path.exists(tmp_path / 'out')


@pytest.mark.slow
def test_train_refuses_garbage_or_other_model_resume_checkpoint(tmp_path):
    garbage = tmp_path / 'last.pth.tar'
    garbage.write_bytes(os.urandom(4096))
    _error(_run('train.py', *TRAIN, '--resume', tmp_path), garbage, 'not a loadable checkpoint')
    other = tmp_path / 'other.pth.tar'
    torch.save({'state_dict': {}, 'epoch': 3, 'args': argparse.Namespace(model='resnet18')}, other)
    _error(_run('train.py', *TRAIN, '--resume', other), f'--resume {other} holds a resnet18 run',
           '--model is test_resnet')


@pytest.mark.slow
def test_reinforce_teacher_checkpoint_refused_and_error_printed_once(tmp_path, evil_checkpoint):
    err = _error(_run('reinforce.py', '--teacher', f'test_resnet={evil_checkpoint}', '--output', tmp_path / 'rd',
                      '--num-samples', '2'), '--teacher', evil_checkpoint, 'not a loadable checkpoint')
    assert not any(advice in err for advice in UNSAFE_ADVICE) and not os.path.exists(tmp_path / 'pwned')
    assert err.count('not a loadable checkpoint') == 1, err
    err = _error(_run('reinforce.py', '--teacher', 'test_resnet'), 'reinforce.py: error: --output is required')
    assert err.count('--output is required') == 1, err


@pytest.mark.slow
def test_validate_checkpoint_message_names_file_without_unsafe_advice(tmp_path, evil_checkpoint):
    proc = _run('validate.py', '--dataset', 'digits', '--checkpoint', evil_checkpoint, '--workers', '0')
    assert proc.returncode != 0
    assert f'{evil_checkpoint} is not a loadable checkpoint' in proc.stderr, proc.stderr[-3000:]
    assert not any(advice in proc.stderr for advice in UNSAFE_ADVICE) and not os.path.exists(tmp_path / 'pwned')
