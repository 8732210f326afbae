"""Settings and helpers of the reinforce.py tests (the fixtures live in conftest.py)."""
import glob
import os
from typing import Dict, List, Sequence

from dr.reinforce.writer import CRASH_ENV
from tests import helpers

N_IMAGES, N_SAMPLES, TOPK, SHARD = 24, 6, 3, 6


def reinforce_args(out, ckpts: Sequence[str], *extra: str) -> List[str]:
    """reinforce.py arguments for a small digits run with the given teacher checkpoints."""
    return ['--dataset', 'digits', '--max-images', str(N_IMAGES), '--num-samples', str(N_SAMPLES),
            '--topk', str(TOPK), '--shard-size', str(SHARD), '--teacher', *ckpts, '--teacher-img-size', '16',
            '-b', '16', '-j', '0', '--device', 'cpu', '--no-progress', '--output', str(out), *extra]


def shard_bytes(directory) -> Dict[str, bytes]:
    """Shard file name -> contents."""
    out = {}
    for p in sorted(glob.glob(os.path.join(str(directory), '*.tar'))):
        with open(p, 'rb') as f:
            out[os.path.basename(p)] = f.read()
    return out


def subprocess_env() -> Dict[str, str]:
    """Child-process environment without the crash test hook."""
    env = helpers.subprocess_env()
    env.pop(CRASH_ENV, None)
    return env
