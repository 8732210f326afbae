"""Born-again networks (Furlanello et al., "Born Again Neural Networks", ICML 2018) as ``train.py --ban-generations N``.

Generation 0 is a plain run of ``--model``; generation ``k`` (1..N) is the same architecture trained from scratch
with the same flags, distilled from generation ``k - 1``'s last checkpoint through train.py's online-KD path
(``--kd-teacher MODEL=<gen k-1>/last.pth.tar``, with the run's ``--kd-*`` settings). Each generation has its own
folder ``<output>/<experiment>/gen<k>``; the run's model is the last generation's. As in BAKE Table 4 there is no
test-time ensemble of the generations.

Reruns resume: a generation whose folder holds ``results.json`` (written when its run ends) is skipped, an
interrupted one resumes from its ``last.pth.tar`` (``--overwrite`` retrains every generation). Under torchrun every
process runs the same loop.
"""
import argparse
import json
import logging
import os
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

_logger = logging.getLogger(__name__)

RESULTS_FILE = 'results.json'
LAST_FILE = 'last.pth.tar'


def generation_dir(root: str, k: int) -> str:
    return os.path.join(root, f'gen{k}')


def generation_argv(argv: Sequence[str], args: argparse.Namespace, root: str, k: int) -> List[str]:
    """train.py's arguments for generation ``k``: the run's own, one generation, its folder, its teacher, resume."""
    out = list(argv) + ['--ban-generations', '0', '--output', root, '--experiment', f'gen{k}']
    if k > 0:
        out += ['--kd-teacher', f'{args.model}={os.path.join(generation_dir(root, k - 1), LAST_FILE)}']
    last = os.path.join(generation_dir(root, k), LAST_FILE)
    if os.path.isfile(last) and not args.overwrite:  # --overwrite: every generation starts over
        _logger.info(f'BAN generation {k}: resuming from {last}')
        out += ['--resume', last]
    return out


def _wait_for(path: str, timeout_s: float = 600.0) -> None:
    """Wait until rank 0 has finished the previous generation (its results file exists)."""
    deadline = time.monotonic() + timeout_s
    while not os.path.isfile(path):
        if time.monotonic() > deadline:
            raise RuntimeError(f'BAN: {path} did not appear within {timeout_s:.0f} s (rank 0 failed?)')
        time.sleep(0.2)


def _fresh_rendezvous(k: int) -> None:
    """Under torchrun, a later generation's process group gets a store of its own (rank 0 hosts it on MASTER_PORT
    + k): re-initialising on the agent's store would meet the previous group's keys."""
    base = int(os.environ.setdefault('BAN_MASTER_PORT', os.environ['MASTER_PORT']))
    os.environ['MASTER_PORT'] = str(base + k)
    os.environ['TORCHELASTIC_USE_AGENT_STORE'] = 'False'


def run_generations(argv: Sequence[str], args: argparse.Namespace,
                    train_main: Optional[Callable[[List[str]], Dict[str, Any]]] = None) -> Dict[str, Any]:
    """Train generations 0..``args.ban_generations`` one after another (module docstring); returns the last
    generation's summary with ``generations``: every generation's summary."""
    if train_main is None:
        import train
        train_main = train.main
    if not args.output:
        args.output = os.path.join('output', 'train')
    root = os.path.join(args.output, args.experiment or f'ban-{args.model}')
    rank = int(os.environ.get('RANK', '0'))
    summaries = []
    for k in range(args.ban_generations + 1):
        results = os.path.join(generation_dir(root, k), RESULTS_FILE)
        if k > 0 and rank != 0:
            _wait_for(os.path.join(generation_dir(root, k - 1), RESULTS_FILE))
        if os.path.isfile(results) and not args.overwrite:
            _logger.info(f'BAN generation {k}: finished earlier ({results}), skipped')
            with open(results) as f:
                summaries.append(json.load(f))
            continue
        if k > 0 and int(os.environ.get('WORLD_SIZE', '1')) > 1:
            _fresh_rendezvous(k)
        _logger.info(f'BAN generation {k} of {args.ban_generations}' + (' (plain)' if k == 0 else
                     f', distilled from generation {k - 1}'))
        summaries.append(dict(train_main(generation_argv(argv, args, root, k))))
    result = dict(summaries[-1])
    result['generations'] = summaries
    result['ban_dir'] = root
    return result
