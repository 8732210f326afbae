"""The competing methods of the BAKE and DR papers' comparison tables, as ``train.py --method NAME`` tasks."""
import argparse
import importlib

from dr.methods.options import METHODS


def create_method_task(args: argparse.Namespace, model, criterion, device):
    """The training task of ``args.method`` (its module's ``create_task``)."""
    if args.method not in METHODS:
        raise ValueError(f'--method {args.method!r}: unknown method (choose from {sorted(METHODS)})')
    module = importlib.import_module(METHODS[args.method])
    return module.create_task(args, model, criterion, device)
