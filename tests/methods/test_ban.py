"""BAN (dr/methods/ban.py): the generation chain, resuming after a kill, real train.py runs (one process, torchrun)."""
import json
import os
import subprocess
import sys

import pytest
import timm

import train
from dr.checkpoint import load_checkpoint_file
from dr.methods.ban import run_generations
from tests.helpers import REPO, free_port
from tests.methods.test_byot import BASE


class Killed(Exception):
    pass


def _fake_main(calls, kill_at=None):
    """Stands in for train.main: records argv, writes the generation's files (last checkpoint, then results)."""
    def main(argv):
        calls.append(list(argv))
        out = os.path.join(_flag(argv, '--output'), _flag(argv, '--experiment'))  # the last one wins
        os.makedirs(out, exist_ok=True)
        open(os.path.join(out, 'last.pth.tar'), 'w').close()
        if kill_at is not None and out.endswith(f'gen{kill_at}'):
            raise Killed(out)
        result = {'output_dir': out, 'last_eval': {'top1': 50.0 + len(calls)}}
        with open(os.path.join(out, 'results.json'), 'w') as f:
            json.dump(result, f)
        return result
    return main


def _flag(argv, name):
    return argv[len(argv) - 1 - argv[::-1].index(name) + 1] if name in argv else None


def test_chain_and_resume_after_a_kill(tmp_path):
    argv = ['--model', 'test_resnet', '--ban-generations', '2', '--output', str(tmp_path), '--experiment', 'ban']
    args, _ = train.parse_args(argv)
    root = os.path.join(str(tmp_path), 'ban')
    calls = []
    with pytest.raises(Killed):
        run_generations(argv, args, _fake_main(calls, kill_at=1))
    assert [_flag(c, '--experiment') for c in calls] == ['gen0', 'gen1']
    assert _flag(calls[0], '--kd-teacher') is None and _flag(calls[0], '--ban-generations') == '0'
    assert _flag(calls[1], '--kd-teacher') == f'test_resnet={root}/gen0/last.pth.tar'
    assert '--resume' not in calls[0] + calls[1]
    calls.clear()
    result = run_generations(argv, args, _fake_main(calls))  # the rerun: gen0 skipped, gen1 resumed, gen2 fresh
    assert [_flag(c, '--experiment') for c in calls] == ['gen1', 'gen2']
    assert _flag(calls[0], '--resume') == f'{root}/gen1/last.pth.tar' and '--resume' not in calls[1]
    assert _flag(calls[1], '--kd-teacher') == f'test_resnet={root}/gen1/last.pth.tar'
    assert [g['output_dir'] for g in result['generations']] == [f'{root}/gen{k}' for k in range(3)]
    assert result['output_dir'] == f'{root}/gen2'
    calls.clear()
    overwrite = argv + ['--overwrite']
    run_generations(overwrite, train.parse_args(overwrite)[0], _fake_main(calls))  # --overwrite: all start over
    assert [_flag(c, '--experiment') for c in calls] == ['gen0', 'gen1', 'gen2']
    assert not any('--resume' in c for c in calls)


def test_bad_flag_combinations_exit_2():
    for extra in (['--bake'], ['--kd-teacher', 'resnet10t'], ['--method', 'byot'], ['--stop-epoch', '1'],
                  ['--ban-generations', '-1']):
        with pytest.raises(SystemExit) as e:
            train.parse_args(['--model', 'test_resnet', '--ban-generations', '1', *extra])
        assert e.value.code == 2


@pytest.mark.slow
def test_train_two_generations_then_rerun_skips_them(tmp_path):
    argv = BASE + ['--output', str(tmp_path), '--experiment', 'ban', '--epochs', '1', '--ban-generations', '1']
    result = train.main(argv)
    root = os.path.join(str(tmp_path), 'ban')
    assert result['output_dir'] == os.path.join(root, 'gen1') and len(result['generations']) == 2
    with open(os.path.join(root, 'gen1', 'args.yaml')) as f:
        assert 'gen0/last.pth.tar' in f.read()  # generation 1's teacher is generation 0
    for k in (0, 1):
        ckpt = load_checkpoint_file(os.path.join(root, f'gen{k}', 'last.pth.tar'))
        timm.create_model('test_resnet', num_classes=10).load_state_dict(ckpt['state_dict'])
    mtime = os.path.getmtime(os.path.join(root, 'gen1', 'last.pth.tar'))
    again = train.main(argv)
    assert again['last_eval'] == result['last_eval']
    assert os.path.getmtime(os.path.join(root, 'gen1', 'last.pth.tar')) == mtime  # nothing retrained


@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_two_process_two_generations(tmp_path):
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={free_port()}',
           os.path.join(REPO, 'train.py'), *BASE, '-b', '32', '--epochs', '1', '--ban-generations', '1',
           '--output', str(tmp_path), '--experiment', 'ban']
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=REPO)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for k in (0, 1):  # both generations ran to the end (one epoch on 2 x 32 images: accuracy is not the point)
        with open(os.path.join(tmp_path, 'ban', f'gen{k}', 'results.json')) as f:
            assert json.load(f)['last_eval']['top1'] >= 0.0
    with open(os.path.join(tmp_path, 'ban', 'gen1', 'args.yaml')) as f:
        assert 'gen0/last.pth.tar' in f.read()
    assert 'Distributed training: process 0 of 2' in proc.stdout + proc.stderr
