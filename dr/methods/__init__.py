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


# --- self-distillation methods' hooks (PS-KD's sample indices and epochs, DDGSD's two views) (begin) ---
def wrap_method_train_data(args: argparse.Namespace, dataset, transform):
    """``(dataset, transform)`` for the training loader: the method module's ``wrap_train_data`` when it has one."""
    if not getattr(args, 'method', ''):
        return dataset, transform
    wrap = getattr(importlib.import_module(METHODS[args.method]), 'wrap_train_data', None)
    return wrap(args, dataset, transform) if wrap is not None else (dataset, transform)


def start_method_epoch(task, epoch: int, num_epochs: int, output_dir) -> None:
    """Tell a task that keeps per-epoch state (PS-KD) that ``epoch`` begins (``output_dir``: rank 0's run folder)."""
    start = getattr(task, 'start_epoch', None)
    if callable(start):
        start(epoch, num_epochs, output_dir)
# --- self-distillation methods' hooks (end) ---
