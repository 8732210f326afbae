"""``train.py --method NAME``: the flags of the papers' competing methods, torch-free (parsed before torch loads).

Each method adds its own argument function to ``_ARG_FUNCS`` and its check to ``_CHECK_FUNCS``; ``METHODS`` maps the
``--method`` name to the module whose ``create_task(args, model, criterion, device)`` builds its training task.
docs/methods.md has one section per method.
"""
import argparse
from typing import Callable, Dict, List

# --method name -> module (imported only when the method is used) with create_task(args, model, criterion, device)
METHODS: Dict[str, str] = {}
# --- self-distillation methods: Tf-KD_reg, CS-KD, PS-KD, DDGSD (begin) ---
METHODS.update({
    'cskd': 'dr.methods.cskd',
    'ddgsd': 'dr.methods.ddgsd',
    'pskd': 'dr.methods.pskd',
    'tfkd': 'dr.methods.tfkd',
})
# --- self-distillation methods (end) ---

_ARG_FUNCS: List[Callable[[argparse.ArgumentParser], None]] = []
_CHECK_FUNCS: List[Callable[[argparse.ArgumentParser, argparse.Namespace], None]] = []


# --- self-distillation methods: Tf-KD_reg, CS-KD, PS-KD, DDGSD (begin) ---
def _add_self_distillation_args(parser: argparse.ArgumentParser) -> None:
    """Flags of ``--method tfkd / cskd / pskd / ddgsd`` (defaults and their sources: docs/methods.md)."""
    group = parser.add_argument_group('Tf-KD_reg (--method tfkd)')
    group.add_argument('--tfkd-alpha', type=float, default=0.1, metavar='ALPHA',
                       help='weight of the virtual-teacher KL; the CE gets 1 - ALPHA (default: 0.1)')
    group.add_argument('--tfkd-temp', type=float, default=20.0, metavar='T',
                       help='temperature that softens the virtual teacher (default: 20)')
    group.add_argument('--tfkd-correct-prob', type=float, default=0.9, metavar='A',
                       help='the virtual teacher\'s probability of the correct class (default: 0.9)')
    group = parser.add_argument_group('CS-KD (--method cskd, with --class-aware-intra 1)')
    group.add_argument('--cskd-temp', type=float, default=4.0, metavar='T', help='temperature (default: 4)')
    group.add_argument('--cskd-weight', type=float, default=1.0, metavar='LAMBDA',
                       help='weight lambda_cls of the class-wise KL (default: 1)')
    group = parser.add_argument_group('PS-KD (--method pskd)')
    group.add_argument('--pskd-alpha', type=float, default=0.8, metavar='ALPHA_T',
                       help='alpha_T, the weight of the last epoch\'s predictions in the final epoch (default: 0.8)')
    group = parser.add_argument_group('DDGSD (--method ddgsd)')
    group.add_argument('--ddgsd-weight', type=float, default=1.0, metavar='LAMBDA',
                       help='weight of the symmetric KL between the two views\' predictions (default: 1)')
    group.add_argument('--ddgsd-temp', type=float, default=1.0, metavar='T', help='temperature of the KL (default: 1)')
    group.add_argument('--ddgsd-mmd-weight', type=float, default=0.0, metavar='MU',
                       help='weight of the linear-kernel MMD between the two views\' pooled features (default: 0, off)')


def _check_self_distillation_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for flag, value, low in (('--tfkd-temp', args.tfkd_temp, 0.0), ('--cskd-temp', args.cskd_temp, 0.0),
                             ('--ddgsd-temp', args.ddgsd_temp, 0.0)):
        if value <= low:
            parser.error(f'{flag} must be > 0, got {value}')
    for flag, value in (('--tfkd-alpha', args.tfkd_alpha), ('--tfkd-correct-prob', args.tfkd_correct_prob),
                        ('--pskd-alpha', args.pskd_alpha)):
        if not 0.0 <= value <= 1.0:
            parser.error(f'{flag} must lie in [0, 1], got {value}')
    for flag, value in (('--cskd-weight', args.cskd_weight), ('--ddgsd-weight', args.ddgsd_weight),
                        ('--ddgsd-mmd-weight', args.ddgsd_mmd_weight)):
        if value < 0:
            parser.error(f'{flag} must be >= 0, got {value}')
    method = args.method
    if method == 'cskd' and args.class_aware_intra != 1:
        parser.error('--method cskd pairs every image with one image of its class: add --class-aware-intra 1 '
                     f'(got {args.class_aware_intra})')
    if method in ('pskd', 'ddgsd'):
        what = 'sample indices' if method == 'pskd' else 'two views of every image'
        for flag, on in (('--mixup/--cutmix', args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None),
                         ('--aug-splits', args.aug_splits), ('--train-img-sizes', args.train_img_sizes),
                         ('--naflex-loader', args.naflex_loader), ('--kd-teacher', args.kd_teacher),
                         ('--class-aware-intra', args.class_aware_intra)):
            if on:
                parser.error(f'--method {method} cannot be combined with {flag}: its loader yields {what}')
    if method == 'ddgsd':
        for flag, on in (('--channels-last', args.channels_last), ('--save-images', args.save_images)):
            if on:
                parser.error(f'--method ddgsd cannot be combined with {flag}: its batches stack two views (N, 2, C, '
                             f'H, W)')


_ARG_FUNCS.append(_add_self_distillation_args)
_CHECK_FUNCS.append(_check_self_distillation_args)
# --- self-distillation methods (end) ---


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
