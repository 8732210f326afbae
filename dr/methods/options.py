"""``train.py --method NAME``: the flags of the papers' competing methods, torch-free (parsed before torch loads).

Each method adds its own argument function to ``_ARG_FUNCS`` and its check to ``_CHECK_FUNCS``; ``METHODS`` maps the
``--method`` name to the module whose ``create_task(args, model, criterion, device)`` builds its training task.
docs/methods.md has one section per method.
"""
import argparse
from typing import Callable, Dict, List

# --method name -> module (imported only when the method is used) with create_task(args, model, criterion, device)
METHODS: Dict[str, str] = {}

_ARG_FUNCS: List[Callable[[argparse.ArgumentParser], None]] = []
_CHECK_FUNCS: List[Callable[[argparse.ArgumentParser, argparse.Namespace], None]] = []


def add_method_args(parser: argparse.ArgumentParser) -> None:
    """The ``--method`` flag and each method's own argument group."""
    group = parser.add_argument_group('Competing methods (docs/methods.md)')
    group.add_argument('--method', default='', choices=('',) + tuple(sorted(METHODS)),
                       help='train with one of the papers\' competing methods instead of plain training '
                            '(default: "" = plain, or the mode that --bake/--reinforced/--kd-teacher choose)')
    for add in _ARG_FUNCS:
        add(parser)


def check_method_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Flag combinations a method cannot work with, as ``parser.error`` naming the flags."""
    if args.method and (args.bake or args.reinforced):
        parser.error(f'--method {args.method} cannot be combined with --bake or --reinforced')
    for check in _CHECK_FUNCS:
        check(parser, args)


# ---- byot (BYOT, Zhang et al. 2019; dr/methods/byot.py) ----
METHODS['byot'] = 'dr.methods.byot'


def _byot_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('BYOT (--method byot, docs/methods.md)')
    group.add_argument('--byot-alpha', type=float, default=0.3, metavar='A',
                       help='shallow classifiers: weight of the KL to the deepest classifier, (1 - A) on their CE '
                            '(default: 0.3)')
    group.add_argument('--byot-temp', type=float, default=3.0, metavar='T',
                       help='softmax temperature of the shallow classifiers\' KL term (default: 3.0)')
    group.add_argument('--byot-feature-weight', type=float, default=0.03, metavar='LAMBDA',
                       help='weight of the L2 hint from each shallow feature to the deepest one (default: 0.03)')
    group.add_argument('--byot-stages', type=int, nargs='+', default=None, metavar='I',
                       help='feature_info stage indices that get a shallow classifier (default: all but the stem '
                            'and the deepest stage; ResNet: layer1-3)')


def _byot_check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.method != 'byot':
        return
    if args.kd_teacher:
        parser.error('--method byot is self-distillation: it takes no --kd-teacher/--kd-model-name')
    if not 0 <= args.byot_alpha <= 1:
        parser.error(f'--byot-alpha must be in [0, 1], got {args.byot_alpha}')
    if args.byot_temp <= 0:
        parser.error(f'--byot-temp must be > 0, got {args.byot_temp}')
    if args.byot_feature_weight < 0:
        parser.error(f'--byot-feature-weight must be >= 0, got {args.byot_feature_weight}')


_ARG_FUNCS.append(_byot_args)
_CHECK_FUNCS.append(_byot_check)
# ---- end byot ----
