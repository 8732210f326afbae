#!/usr/bin/env python3
"""Evaluate timm models on ImageNet, its distribution shifts, ImageNet-C, digits / digits-C: accuracy, calibration
(ECE, MCE, NLL, reliability diagrams) and adversarial robustness (FGSM sweep, AutoAttack).

Examples::

    # embedded digits + digits-C + FGSM sweep, two checkpoints in one table
    python validate.py --dataset digits --sets digits digits-c --checkpoint output/ce output/bake \\
        --fgsm-eps 0 1 2 4 8 16 --results-file output/validate/results.json

    # every ImageNet-family set found under a root, one model load
    python validate.py --suite /data --model resnet50 --checkpoint r50.pth.tar --amp --results-file r50.json

    # distributed: each rank evaluates a disjoint shard, results gathered once per sample
    torchrun --nproc_per_node=8 validate.py --suite /data --model resnet50 --checkpoint r50.pth.tar

Set names, folder names and conventions: ``dr/evaluate/sets.py`` (``SET_SPECS``) and docs/validate.md. The steps
(plan the sets, build the models, evaluate, report) live in ``dr/evaluate/``.
"""
import argparse
import logging
import sys
from typing import Any, Dict, Optional, Sequence, Tuple

from dr.config import ParseKwargs, create_config_parser
from dr.config import parse_args as _parse_config_args

_logger = logging.getLogger('validate')

SET_CHOICES_HELP = ('digits, digits-c, imagenet, imagenetv2-matched-frequency, imagenetv2-threshold0.7, '
                    'imagenetv2-top-images, imagenet-a, imagenet-r, imagenet-sketch, objectnet, imagenet-c')


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: X)`` once: only where the help text does not state the default itself and the default
    says something (not None, False, '' or an empty list)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ''
        default = action.default
        if ('default' in text or default is None or default is False or default == '' or default == []
                or default is argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


def create_parser() -> Tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """(config parser, main parser) in timm's two-stage style."""
    config_parser = create_config_parser()
    parser = argparse.ArgumentParser(
        description='Evaluate a timm model: accuracy, distribution shifts, corruptions, calibration, attacks',
        formatter_class=HelpFormatter)

    group = parser.add_argument_group('Data')
    group.add_argument('data', nargs='?', default=None, metavar='DIR',
                       help='ImageFolder root (or timm dataset root with --dataset) for a generic set (as --data-dir)')
    group.add_argument('--data-dir', default=None, metavar='DIR', help='the dataset root (timm\'s name of DIR)')
    group.add_argument('--dataset', default='', metavar='NAME',
                       help="'digits' (embedded val split), a timm dataset prefix (torch/..., hfds/...) used with "
                            "DIR, or empty for an ImageFolder DIR")
    group.add_argument('--split', default='validation', metavar='NAME', help='split of a timm --dataset')
    group.add_argument('--num-samples', default=None, type=int, metavar='N',
                       help='number of samples in the split (timm datasets that need it)')
    group.add_argument('--dataset-download', action='store_true', default=False,
                       help='allow download of torch/ and tfds/ datasets that support it')
    group.add_argument('--class-map', default='', type=str, metavar='FILENAME',
                       help='class to index mapping file (read through timm\'s dataset)')
    group.add_argument('--input-key', default=None, type=str, help='dataset key for input images (hfds/, wds/)')
    group.add_argument('--input-img-mode', default=None, type=str, help='dataset image conversion mode')
    group.add_argument('--target-key', default=None, type=str, help='dataset key for target labels (hfds/, wds/)')
    group.add_argument('--dataset-trust-remote-code', action='store_true', default=False,
                       help='allow Hugging Face dataset import to execute code from the dataset repository')
    group.add_argument('--real-labels', default='', type=str, metavar='FILENAME',
                       help='ReaL labels JSON (timm RealLabelsImagenet format) for the generic set DIR: adds an '
                            'imagenet-real row (the ImageNet set of --suite uses timm\'s bundled file)')
    group.add_argument('--valid-labels', default='', type=str, metavar='FILENAME',
                       help='text file of valid class indices (one per line): the logits are restricted to them, '
                            'for a dataset covering part of the model\'s label space')
    group.add_argument('--suite', default=None, metavar='ROOT',
                       help='root holding the ImageNet-family sets under their documented folder names; without '
                            '--sets every set found is evaluated and missing ones are listed; a set named in --sets '
                            'must be there')
    group.add_argument('--sets', nargs='+', default=None, metavar='NAME',
                       help=f'sets to evaluate (default: all found under --suite, else the --dataset). One of: '
                            f'{SET_CHOICES_HELP}')
    group.add_argument('--corruptions', nargs='+', default=None, metavar='NAME',
                       help='restrict ImageNet-C / digits-C to these corruptions')
    group.add_argument('--imagenet-c-protocol', default='center-crop', choices=('center-crop', 'resize'),
                       help="how ImageNet-C's 224-px images are fed: center-crop to the input size without resizing "
                            "(the authors' protocol behind the AlexNet-normalised mCE) or resize (the model's eval "
                            "transform, as some papers do)")
    group.add_argument('--strict', action='store_true',
                       help='stop with an error when a set does not have its official number of images (default: '
                            'a warning and complete: false in its rows)')
    group.add_argument('--digits-size', type=int, default=None, metavar='N',
                       help='digits image side (default: from the checkpoint args, else 32)')
    group.add_argument('--skip-bad-images', action='store_true',
                       help='skip and count unreadable images instead of stopping with an error naming the file')
    group.add_argument('-j', '--workers', type=int, default=2, metavar='N', help='data loading workers per process')
    group.add_argument('--pin-mem', action='store_true', help='pin CPU memory in the loader (CUDA)')

    group = parser.add_argument_group('Model')
    group.add_argument('-m', '--model', default=None, metavar='NAME',
                       help="timm model name (default: the 'arch' stored in the checkpoint)")
    group.add_argument('--checkpoint', nargs='*', default=[], metavar='PATH',
                       help='checkpoint file(s) or training output dir(s) (model_best.pth.tar, else last.pth.tar); '
                            'several give one table')
    group.add_argument('--tags', nargs='*', default=None, metavar='NAME',
                       help='names of the checkpoints in tables and results (default: their folder names)')
    group.add_argument('--use-ema', action='store_true', help='evaluate the EMA weights of the checkpoint')
    group.add_argument('--pretrained', action='store_true', help="timm pretrained weights (no --checkpoint)")
    group.add_argument('--num-classes', type=int, default=None, metavar='N',
                       help='classifier size (default: what the sets need, 10 for digits, 1000 for ImageNet)')
    group.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs, metavar='KEY=VALUE',
                       help='extra timm.create_model kwargs, e.g. drop_rate=0.0')
    group.add_argument('--in-chans', type=int, default=None, metavar='N', help='image input channels')
    group.add_argument('--gp', default=None, type=str, metavar='POOL', help='global pool type override')
    group.add_argument('--use-train-size', action='store_true', default=False,
                       help='use the train input size even where the pretrained cfg has a test size')
    group.add_argument('--crop-border-pixels', type=int, default=None, help='crop pixels from the image border')
    group.add_argument('--test-pool', action='store_true', help="timm's test-time pooling (apply_test_time_pool)")
    group.add_argument('--reparam', action='store_true', default=False,
                       help='reparameterize the model (timm reparameterize_model) before evaluating')
    group.add_argument('--model-dtype', default=None, type=str,
                       help='model dtype without AMP: float32, float16 or bfloat16 (default: float32)')
    group.add_argument('--fuser', default='', type=str, help="select jit fuser: '', 'te', 'old' or 'nvfuser'")
    group.add_argument('--fast-norm', action='store_true', default=False, help="timm's experimental fast-norm")
    group.add_argument('--img-size', type=int, default=None, metavar='N', help='input image size')
    group.add_argument('--input-size', type=int, nargs=3, default=None, metavar=('C', 'H', 'W'),
                       help='input size (overrides --img-size)')
    group.add_argument('--crop-pct', type=float, default=None, metavar='PCT',
                       help='center crop fraction (default: the model\'s; digits: 1.0)')
    group.add_argument('--crop-mode', default=None, metavar='MODE', help='center | squash | border')
    group.add_argument('--interpolation', default='', metavar='NAME', help='resize interpolation (model default)')
    group.add_argument('--mean', type=float, nargs='+', default=None, metavar='MEAN', help='normalisation mean')
    group.add_argument('--std', type=float, nargs='+', default=None, metavar='STD', help='normalisation std')

    group = parser.add_argument_group('Evaluation')
    group.add_argument('-b', '--batch-size', type=int, default=256, metavar='N', help='batch size per process')
    group.add_argument('--amp', action='store_true', help='mixed precision forward passes')
    group.add_argument('--amp-dtype', default='float16', choices=('float16', 'bfloat16'), help='AMP dtype')
    group.add_argument('--channels-last', action='store_true', help='channels-last memory layout')
    scripting = group.add_mutually_exclusive_group()
    scripting.add_argument('--torchscript', action='store_true', default=False, help='torch.jit.script the model')
    scripting.add_argument('--torchcompile', nargs='?', type=str, const='inductor', default=None, metavar='BACKEND',
                           help='torch.compile the model (default backend inductor)')
    scripting.add_argument('--aot-autograd', action='store_true', default=False,
                           help="functorch's memory-efficient fusion (AOT autograd)")
    group.add_argument('--torchcompile-mode', type=str, default=None, help='torch.compile mode')
    group.add_argument('--amp-impl', default='native', type=str, choices=('native',),
                       help='AMP implementation: native (torch.autocast)')
    group.add_argument('--num-gpu', type=int, default=1, help='GPUs of this process (nn.DataParallel when > 1)')
    group.add_argument('--no-prefetcher', action='store_true', default=False,
                       help="timm's prefetcher flag; this loader has none (it yields uint8 tensors that the model "
                            'normalises), so it changes nothing')
    group.add_argument('--tf-preprocessing', action='store_true', default=False,
                       help="timm's TensorFlow preprocessing (needs TensorFlow): rejected, see docs/validate.md")
    group.add_argument('--retry', action='store_true', default=False,
                       help='on CUDA out-of-memory, halve the batch size and retry the pass')
    group.add_argument('--log-freq', default=10, type=int, metavar='N',
                       help='batches between progress log lines when no progress bar is shown')
    group.add_argument('--naflex-loader', action='store_true', default=False,
                       help="timm's NaFlex loader: rejected, see docs/validate.md")
    group.add_argument('--naflex-max-seq-len', type=int, default=576,
                       help='NaFlex maximum sequence length (with --naflex-loader)')
    group.add_argument('--device', default=None, metavar='DEV', help="'cuda' or 'cpu' (default: cuda if available)")
    group.add_argument('--seed', type=int, default=42, metavar='S', help='seed (digits-C noise, AutoAttack)')
    group.add_argument('--n-bins', type=int, default=15, metavar='N', help='calibration bins (ECE/MCE/diagrams)')
    group.add_argument('--fgsm-eps', type=float, nargs='*', default=[], metavar='EPS',
                       help='FGSM epsilons in 1/255 units, e.g. 0 1 2 4 8 16 (attacks the clean sets)')
    group.add_argument('--fgsm-n', type=int, default=None, metavar='N',
                       help='FGSM on the first N images (by dataset index) only')
    group.add_argument('--autoattack', action='store_true',
                       help="AutoAttack on the clean sets: the reference implementation (pyautoattack, pip install "
                            "'dr[robust]'), version standard (APGD-CE, APGD-T, FAB-T, Square), L-inf")
    group.add_argument('--autoattack-eps', type=float, default=4.0, metavar='EPS',
                       help='AutoAttack L-inf budget in 1/255 units (RobustBench ImageNet: 4)')
    group.add_argument('--autoattack-n', type=int, default=None, metavar='N',
                       help='AutoAttack on the first N images (by dataset index) only')

    group = parser.add_argument_group('Output')
    group.add_argument('--results-file', default='', metavar='FILE',
                       help='write FILE.json and FILE.csv (rows of other models/sets already there are kept; '
                            'rows with identical settings are reused on reruns)')
    group.add_argument('--results-format', default='dr', choices=('dr', 'timm'),
                       help="timm: also write one FILE-<set>.csv/.json per set in timm validate.py's shape (model, "
                            'top1, top1_err, top5, top5_err, param_count, img_size, crop_pct, interpolation)')
    group.add_argument('--no-resume', action='store_true', help='recompute rows even if the results file has them')
    group.add_argument('--reliability-dir', default=None, metavar='DIR',
                       help='reliability diagram PNGs (default: <results dir>/reliability; none without a results '
                            'file)')
    group.add_argument('--log-wandb', action='store_true', help='log the results table to Weights & Biases')
    group.add_argument('--wandb-project', default=None, metavar='NAME', help='wandb project')
    group.add_argument('--wandb-tags', nargs='*', default=None, metavar='TAG', help='wandb run tags')
    group.add_argument('--no-progress', action='store_true', help='no tqdm progress bars')
    return config_parser, parser


def parse_args(argv: Optional[Sequence[str]] = None) -> Tuple[argparse.Namespace, str]:
    """Parse the command line (with ``-c/--config`` YAML defaults)."""
    config_parser, parser = create_parser()
    args, args_text = _parse_config_args(parser, config_parser, argv)
    if args.data and args.data_dir and args.data != args.data_dir:
        if args.data_dir != parser.get_default('data_dir'):
            parser.error(f'DIR {args.data} and --data-dir {args.data_dir} name different dataset roots; pass one')
        args.data_dir = args.data  # DIR on the command line overrides a config file's data_dir
    args.data_dir = args.data_dir or args.data
    for flag, on, why in (
            ('--tf-preprocessing', args.tf_preprocessing, 'needs TensorFlow, which this project does not install, and '
                                                          "the attacks and corruptions work on timm's PIL transform"),
            ('--naflex-loader', args.naflex_loader, 'the evaluation loop (calibration, FGSM, AutoAttack, corruptions) '
                                                    'works on image tensors, NaFlex batches are patch sequences')):
        if on:
            parser.error(f'{flag} is not supported by this validate.py: it {why}')
    return args, args_text


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Run validate.py with ``argv``; returns the results (what the results file holds).

    Returns:
        ``{'models': {tag: {set: row}}, 'sets': {set: row} (first model), 'missing': [...], 'results_file': path}``.

    Raises:
        SystemExit(2): on bad input (message on stderr naming the file/flag/set at fault), like argparse.
    """
    args, args_text = parse_args(argv)
    # the one deliberate lazy import: torch and timm load only after the flags parsed, so --help stays instant
    from dr import evaluate as ev
    try:
        env = ev.setup_process(args)
        plan = ev.plan_evaluation(args)
        parts = ev.prepare_sets(args, plan)
        models = ev.create_eval_models(args, plan)
        store = ev.open_results(args, args_text, plan, env)
        for em in models:
            ev.evaluate_model(em, plan, parts, store, args, env)
        ev.report_run(models, plan, store, args, env)
        ev.finish(env)
    except ev.ValidateError as e:
        _logger.error(str(e))
        print(f'validate.py: error: {e}', file=sys.stderr)
        raise SystemExit(2) from None
    return {
        'models': {em.tag: em.rows for em in models},
        'sets': models[0].rows,
        'missing': plan.missing,
        'results_file': store.json_path,
    }


if __name__ == '__main__':
    main()
