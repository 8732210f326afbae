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
