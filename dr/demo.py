"""``make demo``: the whole product on the embedded digits dataset, in a few minutes on 2 CPU cores.

1. BAKE: the same small timm model trained with plain cross-entropy and with BAKE (same seed and epochs).
2. Dataset reinforcement: a teacher ensemble trained on digits, ``reinforce.py`` writes shards, and the student is
   trained plain vs on the reinforced shards vs with online knowledge distillation from the same ensemble.
3. ``validate.py`` on every student: top-1, calibration (ECE), digits-C corruptions and FGSM, with reliability
   diagrams.

Each step calls the real scripts' ``main(argv)`` in-process (the same code paths as the command lines).
"""
import argparse
import json
import logging
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

_logger = logging.getLogger(__name__)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _scripts():
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    import reinforce
    import train
    import validate
    return train, reinforce, validate


def _train_args(output: str, name: str, model: str, epochs: int, seed: int, extra: Sequence[str]) -> List[str]:
    return ['--dataset', 'digits', '--model', model, '--epochs', str(epochs), '--warmup-epochs', '1',
            '--lr', '0.2', '--weight-decay', '5e-4', '-b', '64', '--workers', '0', '--seed', str(seed),
            '--log-interval', '1000', '--checkpoint-hist', '1', '--output', output, '--experiment', name,
            '--overwrite', *extra]  # a rerun of the demo starts its runs over


def _fmt(value: Optional[float], digits: int = 2) -> str:
    return '-' if value is None else f'{value:.{digits}f}'


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Print a fixed-width text table and return it."""
    cells = [list(map(str, header))] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = [title, '  '.join(h.ljust(w) for h, w in zip(cells[0], widths)), '  '.join('-' * w for w in widths)]
    lines += ['  '.join(c.ljust(w) for c, w in zip(r, widths)) for r in cells[1:]]
    text = '\n'.join(lines)
    print('\n' + text + '\n', flush=True)
    return text


def run_demo(output: str, epochs: int = 5, teacher_epochs: int = 6, seed: int = 0, num_samples: int = 8,
             model: str = 'test_resnet', teachers: Sequence[str] = ('test_resnet', 'test_efficientnet'),
             skip_validate: bool = False) -> Dict[str, Any]:
    """Run the three demo stages; returns everything printed, also saved as ``demo_results.json``."""
    train, reinforce, validate = _scripts()
    os.makedirs(output, exist_ok=True)
    runs = os.path.join(output, 'runs')
    t0 = time.time()
    results: Dict[str, Any] = {'output': os.path.abspath(output), 'model': model, 'epochs': epochs, 'seed': seed}

    # 1. plain vs BAKE
    trained = {}
    for name, extra in (('plain', []), ('bake', ['--bake'])):
        trained[name] = train.main(_train_args(runs, name, model, epochs, seed, extra))

    # 2. dataset reinforcement: teachers, shards, students
    teacher_specs = []
    for i, t in enumerate(teachers):
        r = train.main(_train_args(runs, f'teacher{i}-{t}', t, teacher_epochs, seed + 100 + i, []))
        teacher_specs.append(f'{t}={os.path.join(r["output_dir"], "model_best.pth.tar")}')
    shards = os.path.join(output, 'reinforced')
    reinforce.main(['--dataset', 'digits', '--teacher', *teacher_specs, '--num-samples', str(num_samples),
                    '--topk', '5', '--aug', 'rrc+ra_re', '--shard-size', '512', '--batch-size', '128',
                    '--workers', '0', '--seed', str(seed), '--output', shards])
    stats = reinforce.main(['--stats', shards])
    results['reinforce_stats'] = stats
    trained['reinforced'] = train.main(_train_args(runs, 'reinforced', model, epochs, seed,
                                                   ['--reinforced', shards, '--val-split', 'val']))
    trained['online_kd'] = train.main(_train_args(runs, 'online_kd', model, epochs, seed,
                                                  ['--kd-teacher', *teacher_specs]))
    results['train'] = {k: {'top1': v['last_eval']['top1'], 'loss': v['last_eval']['loss'],
                            'output_dir': v['output_dir']} for k, v in trained.items()}
    print_table(f'Training on digits ({model}, {epochs} epochs, seed {seed}): last-epoch validation',
                ['run', 'top1 %', 'val loss', 'output'],
                [[k, _fmt(v['top1']), _fmt(v['loss'], 4), v['output_dir']] for k, v in results['train'].items()])

    # 3. validate.py: top-1, ECE, digits-C, FGSM (one model load per checkpoint, one table)
    if not skip_validate:
        names = list(trained)
        res_file = os.path.join(output, 'validate', 'digits.json')
        ev = validate.main(['--dataset', 'digits', '--checkpoint', *[trained[n]['output_dir'] for n in names],
                            '--tags', *names, '--sets', 'digits', 'digits-c', '--fgsm-eps', '0', '2', '4', '8',
                            '--workers', '0', '--no-progress', '--no-resume', '--results-file', res_file])
        if not isinstance(ev, dict):
            raise RuntimeError(f'validate.py failed (exit status {ev})')
        results['validate'] = {n: demo_row(ev['models'][n]) for n in names}
        rows = [[n, _fmt(r['top1']), _fmt(r['ece']), _fmt(r['digits_c_top1']), *[_fmt(v) for v in r['fgsm']]]
                for n, r in results['validate'].items()]
        print_table('validate.py on the demo models (best checkpoints)',
                    ['run', 'top1 %', 'ECE %', 'digits-C 100-err %', 'FGSM 2/255', 'FGSM 4/255', 'FGSM 8/255'], rows)
        print(f'Results: {res_file} (+ .csv); reliability diagrams: {os.path.join(output, "validate", "reliability")}')
    results['seconds'] = time.time() - t0
    with open(os.path.join(output, 'demo_results.json'), 'w') as f:
        json.dump(results, f, indent=2, default=str)
    print(f'Demo finished in {results["seconds"]:.0f}s; runs in {runs}, shards in {shards}, '
          f'summary in {os.path.join(output, "demo_results.json")}')
    return results


def demo_row(sets: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """Pick the demo table's numbers out of one model's ``{set: row}`` from ``validate.main``."""
    clean = sets['digits']
    fgsm = {float(k): v for k, v in (clean.get('fgsm') or {}).items()}
    return {
        'top1': clean['top1'],
        'ece': clean.get('ece'),
        'digits_c_top1': sets.get('digits-c', {}).get('top1'),
        'fgsm': [fgsm.get(e) for e in (2.0, 4.0, 8.0)],
    }


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description='End-to-end demo on the embedded digits dataset')
    parser.add_argument('--output', default='output/demo', help='where runs, shards and results go')
    parser.add_argument('--epochs', type=int, default=5, help='student epochs')
    parser.add_argument('--teacher-epochs', type=int, default=6, help='teacher epochs')
    parser.add_argument('--num-samples', type=int, default=8, help='stored augmentations per image')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--skip-validate', action='store_true')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    run_demo(args.output, epochs=args.epochs, teacher_epochs=args.teacher_epochs, seed=args.seed,
             num_samples=args.num_samples, skip_validate=args.skip_validate)


if __name__ == '__main__':
    main()
