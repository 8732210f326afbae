"""A 1-epoch ``train.py`` run on the tiny digits for the methods' end-to-end tests."""
import os
import subprocess
import sys

from tests.helpers import REPO, subprocess_env

DIGITS = ['--dataset', 'digits', '--model', 'test_resnet', '--workers', '0', '--warmup-epochs', '0', '--lr', '0.2',
          '--log-interval', '1000', '--smoothing', '0', '-b', '32']


def run_train(out: str, name: str, *argv: str, epochs: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    """``train.py`` on the digits into ``out/name``; asserts it succeeded."""
    cmd = [sys.executable, os.path.join(REPO, 'train.py'), *DIGITS, '--epochs', str(epochs), '--output', out,
           '--experiment', name, *argv]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc
