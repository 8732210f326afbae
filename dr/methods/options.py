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


# ---- kdcl (KDCL, Guo et al. 2020; dr/methods/kdcl.py) ----
METHODS['kdcl'] = 'dr.methods.kdcl'


def _kdcl_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('KDCL (--method kdcl, docs/methods.md)')
    group.add_argument('--kdcl-model', default='resnet18', metavar='MODEL',
                       help='the second student, trained beside --model (default: resnet18, BAKE Table 5\'s KDCL row)')
    group.add_argument('--kdcl-ensemble', default='minlogit', choices=('minlogit', 'naive'),
                       help='how the students\' logits are ensembled into the soft target (default: minlogit)')
    group.add_argument('--kdcl-temp', type=float, default=1.0, metavar='T',
                       help='softmax temperature of the distillation term (default: 1.0)')
    group.add_argument('--kdcl-weight', type=float, default=1.0, metavar='W',
                       help='weight of each student\'s distillation term beside its CE (default: 1.0)')


def _kdcl_check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.method != 'kdcl':
        return
    if args.kd_teacher:
        parser.error('--method kdcl trains its own second student (--kdcl-model); it takes no --kd-teacher')
    if not args.kdcl_model:
        parser.error('--method kdcl needs --kdcl-model (the second student)')
    if args.kdcl_temp <= 0:
        parser.error(f'--kdcl-temp must be > 0, got {args.kdcl_temp}')
    if args.kdcl_weight < 0:
        parser.error(f'--kdcl-weight must be >= 0, got {args.kdcl_weight}')


_ARG_FUNCS.append(_kdcl_args)
_CHECK_FUNCS.append(_kdcl_check)
# ---- end kdcl ----


# ---- ban (born-again networks, Furlanello et al. 2018; dr/methods/ban.py) ----
def _ban_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('BAN (--ban-generations, docs/methods.md)')
    group.add_argument('--ban-generations', type=int, default=0, metavar='N',
                       help='born-again networks: a plain generation 0, then N generations of the same model, each '
                            'distilled (--kd-* settings) from the one before, in <output>/<experiment>/gen<k> '
                            '(default: 0 = off)')


def _ban_check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not args.ban_generations:
        return
    if args.ban_generations < 0:
        parser.error(f'--ban-generations must be >= 0, got {args.ban_generations}')
    for flag, value in (('--method', args.method), ('--bake', args.bake), ('--reinforced', args.reinforced),
                        ('--kd-teacher/--kd-model-name', args.kd_teacher), ('--resume', args.resume),
                        ('--stop-epoch', args.stop_epoch)):
        if value:
            parser.error(f'--ban-generations cannot be combined with {flag}: each generation is a plain run '
                         f'distilled from the previous one (a rerun resumes by itself)')


_ARG_FUNCS.append(_ban_args)
_CHECK_FUNCS.append(_ban_check)
# ---- end ban ----
