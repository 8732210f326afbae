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
