"""What a validate.py run evaluates: the sets (and where they live), the class count they need, the passes per set.

Everything here is decided from the flags and the folders on disk, before any model is built or image read, so that
bad input (unknown or missing sets, sets needing different class counts, bad flag values) stops the run early.
"""
import argparse
import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch.utils.data as tud

from ..data import DigitsDataset, create_dataset, dataset_classes, is_digits
from .attacks import AUTOATTACK_MIN_CLASSES
from .corruptions import IMAGENET_C_CORRUPTIONS, SEVERITIES
from .sets import SET_SPECS, SUITE_ORDER, EvalPart, IndexedDataset, View, build_parts, discover_sets, folder_parts

_logger = logging.getLogger(__name__)


class ValidateError(Exception):
    """A user-facing error of validate.py: printed without a traceback, exit status 2."""


@dataclass
class EvalPlan:
    """The sets of one run and what they need.

    Attributes:
        sets: ``(set name, path)`` in evaluation order (``path`` is '' for the built-in digits sets; the set name is
            ``folder`` for a generic ImageFolder / timm dataset).
        missing: sets looked for under ``--suite`` and not found.
        needs: class count each set needs.
        num_classes: the one class count of the run.
        model_kwargs: parsed ``--model-kwargs`` (with ``--in-chans``, ``--gp``).
        valid_labels: ``--valid-labels``: the model's class indices the sets' labels 0..N-1 stand for.
        generic_parts: the parts of a ``folder`` set (built while planning: its class count comes from its folders).
    """
    sets: List[Tuple[str, str]]
    missing: List[str]
    needs: Dict[str, int]
    num_classes: int
    model_kwargs: Dict[str, Any] = field(default_factory=dict)
    generic_parts: Optional[List[EvalPart]] = None
    valid_labels: Optional[List[int]] = None

    @property
    def set_names(self) -> List[str]:
        return [name for name, _ in self.sets]

    @property
    def has_imagenet(self) -> bool:
        return any(name.startswith('imagenet') or name == 'objectnet' for name in self.set_names)

    @property
    def has_digits(self) -> bool:
        return any(name.startswith('digits') for name in self.set_names)

    def describe_needs(self) -> str:
        """``set (N classes), ...`` for error messages."""
        return describe_class_needs(self.needs)


def describe_class_needs(needs: Dict[str, int]) -> str:
    return ', '.join(f'{s} ({n} classes)' for s, n in needs.items())


def plan_sets(args: argparse.Namespace) -> Tuple[List[Tuple[str, str]], List[str]]:
    """[(set name, path)] to evaluate and the names of requested sets that were not found."""
    if args.sets:
        unknown = [s for s in args.sets if s not in SET_SPECS]
        if unknown:
            raise ValidateError(f'--sets: unknown set(s) {", ".join(unknown)}; known: {", ".join(SET_SPECS)}')
        names = list(dict.fromkeys(args.sets))
    elif args.suite:
        names = list(SUITE_ORDER)
    elif is_digits(args.dataset):
        names = ['digits']
    elif args.data_dir:
        return [('folder', args.data_dir)], []
    else:
        raise ValidateError('Nothing to evaluate: pass --suite ROOT, --sets, --dataset digits or a data DIR')
    plan, missing = [], []
    needs_root = [n for n in names if not SET_SPECS[n].builtin]
    if needs_root and not args.suite:
        raise ValidateError(f'Set(s) {", ".join(needs_root)} are read from disk: pass --suite ROOT')
    found = {}
    if needs_root:
        try:
            found, missing = discover_sets(args.suite, needs_root)
        except FileNotFoundError as e:
            raise ValidateError(str(e)) from None
    if missing and args.sets:
        looked = '; '.join(f'{n} (looked for {" or ".join(SET_SPECS[n].folders)})' for n in missing)
        raise ValidateError(f'--sets: not found under {args.suite}: {looked}')
    for n in names:
        if SET_SPECS[n].builtin:
            plan.append((n, ''))
        elif n in found:
            plan.append((n, found[n]))
    if not plan:
        raise ValidateError(f'None of the suite sets were found under {args.suite}: {", ".join(missing)}')
    return plan, missing


def generic_parts(args: argparse.Namespace, num_classes_hint: Optional[int]) -> Tuple[List[EvalPart], int]:
    """Parts and class count of a generic dataset (ImageFolder DIR or a map-style timm dataset)."""
    timm_kwargs = {k: getattr(args, k) for k in ('class_map', 'input_key', 'target_key', 'input_img_mode')
                   if getattr(args, k)}
    if not args.dataset and not timm_kwargs:
        parts, classes = folder_parts(args.data_dir, name='folder', skip_bad_images=args.skip_bad_images)
        if args.real_labels:
            _add_real_labels(parts[0], args.real_labels, [p for p, _ in parts[0].dataset.samples])
        return parts, len(classes)
    if args.dataset_trust_remote_code:
        timm_kwargs['trust_remote_code'] = True
    ds = create_dataset(args.dataset, root=args.data_dir, split=args.split, is_training=False,
                        num_samples=args.num_samples, download=args.dataset_download, **timm_kwargs)
    if isinstance(ds, tud.IterableDataset):
        raise ValidateError(f'--dataset {args.dataset}: iterable datasets are not supported by validate.py '
                            f'(use an ImageFolder or a map-style timm dataset)')
    classes = dataset_classes(ds)
    n = len(classes) if classes else num_classes_hint
    if not n:
        raise ValidateError(f'--dataset {args.dataset}: cannot tell the number of classes; pass --num-classes')
    part = EvalPart(args.dataset or 'folder', IndexedDataset(ds), [View(args.dataset or 'folder', attack=True)])
    if args.real_labels:
        reader = getattr(ds, 'reader', None)
        files = [reader._filename(i, absolute=True) for i in range(len(ds))] if reader is not None else []
        _add_real_labels(part, args.real_labels, files)
    return [part], n


def _add_real_labels(part: EvalPart, path: str, files: List[str]) -> None:
    """``--real-labels FILE``: ReaL accuracy on the part's images, labels looked up by file name as timm's
    ``RealLabelsImagenet`` does (entry i is ``ILSVRC2012_val_{i + 1:08d}.JPEG``)."""
    try:
        with open(path) as f:
            table = json.load(f)
    except (OSError, ValueError) as e:
        raise ValidateError(f'--real-labels {path}: cannot read a ReaL labels JSON ({e})') from None
    by_name = {f'ILSVRC2012_val_{i + 1:08d}.JPEG': tuple(labels) for i, labels in enumerate(table)}
    part.real_labels = [by_name.get(os.path.basename(p)) for p in files]
    if not any(lab is not None for lab in part.real_labels):
        raise ValidateError(f'--real-labels {path}: none of the {len(files)} images is named like an ImageNet val '
                            f'file (ILSVRC2012_val_NNNNNNNN.JPEG)')
    part.views = [dataclasses.replace(v, real=True) for v in part.views]


def plan_evaluation(args: argparse.Namespace) -> EvalPlan:
    """Sets, class count and checked flags of a run (no model built, no image read).

    Raises:
        ValidateError: naming the flag or set at fault.
    """
    sets, missing = plan_sets(args)
    if missing:
        _logger.info(f'Sets not found under {args.suite}: {", ".join(missing)}')
    parts, classes = None, None
    if any(name == 'folder' for name, _ in sets):
        try:
            parts, classes = generic_parts(args, args.num_classes)
        except (ValueError, FileNotFoundError) as e:
            raise ValidateError(str(e)) from None
    needs = {name: (classes if name == 'folder' else SET_SPECS[name].num_classes) for name, _ in sets}
    valid_labels = _read_valid_labels(args.valid_labels) if args.valid_labels else None
    if valid_labels is not None and classes is not None and len(valid_labels) != classes:
        raise ValidateError(f'--valid-labels {args.valid_labels}: {len(valid_labels)} indices for a dataset of '
                                f'{classes} classes')
    if len(set(needs.values())) > 1:
        raise ValidateError(f'The selected sets need different class counts: {describe_class_needs(needs)}; '
                            f'evaluate them in separate runs')
    num_classes = next(iter(needs.values()))
    if valid_labels is not None:
        if args.num_classes is None or args.num_classes <= max(valid_labels):
            raise ValidateError('--valid-labels needs --num-classes: the size of the model\'s label space, larger '
                                'than every valid index')
    elif args.num_classes is not None and args.num_classes != num_classes:
        raise ValidateError(f'--num-classes {args.num_classes} does not fit set(s) {describe_class_needs(needs)}')
    if args.tags and len(args.tags) != max(1, len(args.checkpoint)):
        raise ValidateError(f'--tags: {len(args.tags)} names for {max(1, len(args.checkpoint))} model(s)')
    if args.fgsm_n is not None and args.fgsm_n < 1 or args.autoattack_n is not None and args.autoattack_n < 1:
        raise ValidateError('--fgsm-n / --autoattack-n must be >= 1')
    if args.autoattack and num_classes < AUTOATTACK_MIN_CLASSES:
        raise ValidateError(f'--autoattack: AutoAttack standard needs >= {AUTOATTACK_MIN_CLASSES} classes (targeted '
                            f'DLR loss); set(s) {describe_class_needs(needs)}')
    if args.autoattack_eps <= 0:
        raise ValidateError(f'--autoattack-eps must be > 0 (1/255 units), got {args.autoattack_eps:g}')
    model_kwargs = dict(args.model_kwargs or {})
    if args.in_chans is not None:
        model_kwargs['in_chans'] = args.in_chans
    if args.gp is not None:
        model_kwargs['global_pool'] = args.gp
    return EvalPlan(sets, missing, needs, num_classes, model_kwargs, parts, valid_labels)


def _read_valid_labels(path: str) -> List[int]:
    """timm's ``--valid-labels`` file: one class index per line."""
    try:
        with open(path) as f:
            labels = [int(line.strip()) for line in f if line.strip()]
    except (OSError, ValueError) as e:
        raise ValidateError(f'--valid-labels {path}: expected one class index per line ({e})') from None
    if not labels:
        raise ValidateError(f'--valid-labels {path}: no class indices')
    return labels


def prepare_sets(args: argparse.Namespace, plan: EvalPlan) -> 'PartsCache':
    """Build the passes of every set read from disk and check them against the official sizes.

    A set with the wrong number of images (or ImageNet-C without all 15 x 5 benchmark folders) is a warning and
    its rows say ``complete: false``; with ``--strict`` it is an error, raised before any model runs.

    Raises:
        ValidateError: a set that cannot be read, or (``--strict``) an incomplete one.
    """
    parts = PartsCache(args, plan)
    problems = []
    for name, path in plan.sets:
        if name == 'folder' or SET_SPECS[name].builtin:
            continue
        set_parts = parts.parts(name, path, 0)
        wrong = [p for p in set_parts if p.complete is False]
        if wrong:
            sizes = ', '.join(f'{p.name}: {p.num_samples}' for p in wrong[:5]) + (' ...' if len(wrong) > 5 else '')
            problems.append(f'{name} at {path} has {sizes} images, the official set {wrong[0].expected_size}'
                            + (' per corruption and severity' if name == 'imagenet-c' else ''))
        if name == 'imagenet-c' and not args.corruptions:
            have = {(p.corruption, p.severity) for p in set_parts}
            absent = [f'{c}/{s}' for c in IMAGENET_C_CORRUPTIONS for s in SEVERITIES if (c, s) not in have]
            if absent:
                problems.append(f'imagenet-c at {path} lacks {len(absent)} of the 75 benchmark folders '
                                f'({", ".join(absent[:5])}{" ..." if len(absent) > 5 else ""}): no mCE')
    if problems and args.strict:
        raise ValidateError('--strict: incomplete set(s): ' + '; '.join(problems))
    for problem in problems:
        _logger.warning(f'Incomplete set (rows say complete: false; --strict makes this an error): {problem}')
    return parts


class PartsCache:
    """The passes of each planned set, built once per (set, digits size) and shared by all models of a run."""

    def __init__(self, args: argparse.Namespace, plan: EvalPlan):
        self.args = args
        self.plan = plan
        self._parts: Dict[Tuple[str, int], List[EvalPart]] = {}
        self._digits: Dict[int, DigitsDataset] = {}

    def parts(self, set_name: str, path: str, digits_size: int) -> List[EvalPart]:
        key = (set_name, digits_size if set_name.startswith('digits') else 0)
        if key not in self._parts:
            self._parts[key] = self._build(set_name, path, digits_size)
        return self._parts[key]

    def _build(self, set_name: str, path: str, digits_size: int) -> List[EvalPart]:
        if set_name == 'folder':
            return self.plan.generic_parts
        if set_name.startswith('digits') and digits_size not in self._digits:
            self._digits[digits_size] = DigitsDataset('val', img_size=digits_size)
        try:
            return build_parts(set_name, path, skip_bad_images=self.args.skip_bad_images, seed=self.args.seed,
                               digits_size=digits_size, corruptions=self.args.corruptions,
                               digits_val=self._digits.get(digits_size),
                               imagenet_c_protocol=self.args.imagenet_c_protocol,
                               search=[self.args.suite] if self.args.suite else [])
        except (ValueError, FileNotFoundError) as e:
            raise ValidateError(str(e)) from None
