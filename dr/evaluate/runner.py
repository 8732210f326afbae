"""The steps of a validate.py run: process setup, results store, per-model evaluation, summaries, shutdown.

``validate.py`` calls them in order (timm style): plan the sets (``dr.evaluate.plan``), build the models
(``dr.evaluate.models``), open the results (``open_results``), evaluate each model (``evaluate_model``), then print
the report (``dr.evaluate.report.print_report``) and ``finish``.
"""
import argparse
import contextlib
import functools
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from timm.layers import set_fast_norm
from timm.utils import set_jit_fuser, setup_default_logging
from timm.utils.distributed import init_distributed_device_so

from ..config import save_args_yaml
from ..io import software_versions
from .attacks import AUTOATTACK_PACKAGE, autoattack_status, describe_autoattack
from .corruptions import (
    ALEXNET_CLEAN_ERR,
    DIGITS_C_VERSION,
    IMAGENET_C_CORRUPTIONS,
    IMAGENET_C_EXTRA,
    SEVERITIES,
    summarize_corruption_errors,
)
from .loop import (
    AttackConfig,
    all_reduce_int,
    create_eval_loader,
    evaluate_part,
    fgsm_column,
    gather_records,
    pooled_calibration,
    summarize_real,
    summarize_records,
)
from .models import EvalModel, param_count_m, prepare_model, resolve_eval_data_config
from .plan import EvalPlan, PartsCache, ValidateError
from .report import (
    config_key,
    load_results,
    log_wandb,
    merge_rows,
    print_report,
    reliability_diagram_from_sums,
    results_paths,
    write_results,
    write_timm_results,
)
from .sets import IMAGENET_C_PROTOCOL_TEXT, SET_SPECS, BadImageError, EvalPart, View

_logger = logging.getLogger(__name__)


@dataclass
class EvalEnv:
    """Where this process evaluates: device, distributed rank / world size, AMP context, attack settings."""
    device: torch.device
    rank: int
    world: int
    autocast: Callable[[], contextlib.AbstractContextManager]
    attack: AttackConfig
    autoattack_status: str = ''

    @property
    def primary(self) -> bool:
        return self.rank == 0


def setup_process(args: argparse.Namespace) -> EvalEnv:
    """Logging, device (and the process group under torchrun), seeds, AMP and the attack configuration."""
    if not logging.getLogger().handlers:  # in-process callers (the demo, tests) keep their logging setup
        setup_default_logging()
    device, rank, world = _init_device(args)
    if args.amp_impl != 'native':
        raise ValidateError(f'--amp-impl {args.amp_impl}: only native torch AMP is supported')
    if args.fuser:
        set_jit_fuser(args.fuser)
    if args.fast_norm:
        set_fast_norm()
    if rank != 0:
        logging.getLogger().setLevel(logging.WARNING)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    amp_dtype = torch.bfloat16 if args.amp_dtype == 'bfloat16' else torch.float16
    autocast = (functools.partial(torch.autocast, device_type=device.type, dtype=amp_dtype) if args.amp
                else contextlib.nullcontext)
    aa_ok, aa_status = autoattack_status() if args.autoattack else (False, '')
    if args.autoattack and not aa_ok:
        _logger.warning(f'AutoAttack {aa_status}; its column says so in the results')
    attack = AttackConfig(fgsm_eps=list(args.fgsm_eps or []), fgsm_n=args.fgsm_n, autoattack=args.autoattack and aa_ok,
                          autoattack_n=args.autoattack_n, autoattack_eps=args.autoattack_eps, seed=args.seed)
    return EvalEnv(device, rank, world, autocast, attack, aa_status)


def _init_device(args: argparse.Namespace) -> Tuple[torch.device, int, int]:
    """(device, rank, world size): timm's process-group setup (torchrun or SLURM environment; nccl on CUDA, gloo on
    CPU), as train.py uses it."""
    device_name = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    if device_name.startswith('cuda') and not torch.cuda.is_available():
        raise ValidateError(f'--device {device_name}: CUDA is not available')
    info = init_distributed_device_so(device=device_name)
    return torch.device(info['device']), info['global_rank'], info['world_size']


# --------------------------------------------------------------------------------------------------------------------
# results store

class ResultsStore:
    """The results file of a run: rows kept from earlier runs, rows of this run, metadata, reliability diagrams.

    Rows are written (atomically) after every pass, so an interrupted run keeps what it finished; a row whose
    ``config_key`` matches the current settings is reused instead of recomputed (unless ``--no-resume``).
    """

    def __init__(self, results_file: str, reliability_dir: Optional[str], existing: Dict[str, Any],
                 meta: Dict[str, Any], primary: bool, resume: bool, results_format: str = 'dr'):
        self.results_file = results_file
        self.results_format = results_format
        self.reliability_dir = reliability_dir
        self.existing_rows: List[Dict[str, Any]] = existing['results']
        self.meta = meta
        self.primary = primary
        self.resume = resume
        self.new_rows: List[Dict[str, Any]] = []

    @property
    def json_path(self) -> Optional[str]:
        return results_paths(self.results_file)[0] if self.results_file else None

    @property
    def csv_path(self) -> Optional[str]:
        return results_paths(self.results_file)[1] if self.results_file else None

    def find(self, tag: str, set_name: str, key: str) -> Optional[Dict[str, Any]]:
        """A row of an earlier run with the same tag, set and settings, if resuming."""
        if not self.resume:
            return None
        for r in self.existing_rows:
            if r.get('tag') == tag and r.get('set') == set_name and r.get('config_key') == key:
                return r
        return None

    def add(self, row: Dict[str, Any]) -> None:
        self.new_rows.append(row)

    def flush(self) -> None:
        if self.primary and self.results_file:
            rows = merge_rows(self.existing_rows, self.new_rows)
            write_results(self.results_file, rows, self.meta)
            if self.results_format == 'timm':
                write_timm_results(self.results_file, rows)

    def diagram(self, tag: str, row: Dict[str, Any]) -> None:
        """Write the row's reliability diagram (primary rank, rows with calibration bins) and record its path."""
        if not (self.primary and self.reliability_dir and row.get('calibration_bins')):
            return
        b = row['calibration_bins']
        name = f'{tag}_{row["set"]}'.replace('/', '_').replace(os.sep, '_')
        path = os.path.join(self.reliability_dir, f'{name}.png')
        reliability_diagram_from_sums(b['count'], b['conf_sum'], b['correct_sum'], path,
                                      title=f'{tag} on {row["set"]}: top-1 {row["top1"]:.2f}%')
        row['reliability_png'] = path


def open_results(args: argparse.Namespace, args_text: str, plan: EvalPlan, env: EvalEnv) -> ResultsStore:
    """Load an existing results file (rows to keep or reuse), save the resolved args and the conventions metadata."""
    results_file = args.results_file
    try:
        existing = load_results(results_file) if results_file else {'meta': {}, 'results': []}
    except ValueError as e:
        raise ValidateError(str(e)) from None
    reliability_dir = args.reliability_dir
    if reliability_dir is None and results_file:
        reliability_dir = os.path.join(os.path.dirname(os.path.abspath(results_file)), 'reliability')
    if env.primary and results_file:
        json_path, _ = results_paths(results_file)
        save_args_yaml(args_text, os.path.dirname(os.path.abspath(json_path)),
                       filename=os.path.splitext(os.path.basename(json_path))[0] + '.args.yaml')
    meta = existing.get('meta') or {}
    meta.update({'software': software_versions(), 'conventions': _conventions(args, plan)})
    if plan.missing:
        meta['missing_sets'] = {'root': args.suite, 'sets': plan.missing}
    return ResultsStore(results_file, reliability_dir, existing, meta, env.primary, resume=not args.no_resume,
                        results_format=args.results_format)


def _conventions(args: argparse.Namespace, plan: EvalPlan) -> Dict[str, Any]:
    return {
        'calibration': f'top-1 confidence, {args.n_bins} equal-width bins (lo, hi] (0 in the first, 1.0 in the '
                       f'last), ECE = sum |bin|/N |acc - conf| (Guo et al. 2017); ece/mce columns in percent, '
                       f'nll in nats (mean -log p(target))',
        'accuracy': 'top1/top5 and errors in percent; count = images scored; expected_count = the official size of '
                    'the set (per corruption and severity for ImageNet-C); complete = count matches it and no image '
                    'was skipped; skipped = unreadable images left out (--skip-bad-images)',
        'fgsm': 'L-inf FGSM in [0,1] pixel space, normalisation inside the model, eps in 1/255 units, one '
                'gradient of the cross-entropy per image, model in eval mode; attacks the clean sets',
        'autoattack': f'AutoAttack reference implementation ({AUTOATTACK_PACKAGE}, fra31/auto-attack), version '
                      f'standard: APGD-CE, APGD-T (9 targets), FAB-T (9 targets), Square (5000 queries), 100 '
                      f'iterations, L-inf, eps {args.autoattack_eps:g}/255, seed {args.seed}, model in eval mode, '
                      f'float32; autoattack_top1 = robust accuracy (%) over autoattack_count attacked images; the '
                      f'full configuration read from the attack object is in each row\'s "autoattack"',
        'imagenet-c': f'images fed {IMAGENET_C_PROTOCOL_TEXT[args.imagenet_c_protocol]}; mCE = mean over the 15 '
                      f'corruptions of (mean top-1 error over severities / AlexNet mean error), relative mCE = mean '
                      f'of (mean error - clean error) / (AlexNet mean error - AlexNet clean error '
                      f'{ALEXNET_CLEAN_ERR:.5f}), in percent, AlexNet constants in dr/evaluate/corruptions.py; '
                      f'c_mean_err = unnormalised mean error; c_100_minus_mce as in the DR paper; extras in '
                      f'c_extra_mean_err',
        'digits-c': f'ImageNet-C corruption recipes (make_imagenet_c.py) on the digits val split, pixel lengths scaled '
                    f'by side/224, quantised with np.uint8 and re-saved as JPEG quality 85, seeded per sample; '
                    f'recipe version {DIGITS_C_VERSION}',
        'sets': {name: SET_SPECS[name].convention for name in plan.set_names if name in SET_SPECS},
    }


# --------------------------------------------------------------------------------------------------------------------
# evaluation

def evaluate_model(em: EvalModel, plan: EvalPlan, parts: PartsCache, store: ResultsStore, args: argparse.Namespace,
                   env: EvalEnv) -> Dict[str, Dict[str, Any]]:
    """Every planned set on one model; returns its rows by set name (also stored in ``em.rows``)."""
    data_config, digits_size = resolve_eval_data_config(args, em, plan.has_digits)
    net = prepare_model(em, data_config, args, env.device, valid_labels=plan.valid_labels)
    base_row = _base_row(em, data_config, plan, args)
    key_base = _key_base(em, data_config, digits_size, plan, args, env)
    if env.primary:
        _logger.info(f'{em.tag}: {em.arch} ({base_row["param_count"]}M params), data config {data_config}')
    em.rows = {}
    for set_name, path in plan.sets:
        convention = SET_SPECS[set_name].convention if set_name in SET_SPECS else f'ImageFolder {path}'
        set_parts = parts.parts(set_name, path, digits_size)
        for part in set_parts:
            key = config_key({**key_base, 'set': set_name, 'part': part.name, 'protocol': part.protocol,
                              'path': os.path.abspath(path) if path else '', 'fingerprint': part.fingerprint})
            rows = _reused_rows(em.tag, part, key, store)
            if rows is None:
                row0 = {**base_row, 'config_key': key, 'convention': convention, 'data_fingerprint': part.fingerprint}
                rows = _evaluate_part(net, part, data_config, row0, args, env)
                if part.corruption is None:
                    for row in rows:
                        store.diagram(em.tag, row)
            for row in rows:
                em.rows[row['set']] = row
                store.add(row)
            store.flush()
        if set_name in ('digits-c', 'imagenet-c'):
            row = corruption_summary(set_name, set_parts, em.rows, {**base_row, 'convention': convention})
            store.diagram(em.tag, row)
            em.rows[set_name] = row
            store.add(row)
            store.flush()
    if env.device.type == 'cuda':
        em.model.cpu()
    return em.rows


def _base_row(em: EvalModel, data_config: Dict[str, Any], plan: EvalPlan, args: argparse.Namespace
              ) -> Dict[str, Any]:
    return {
        'tag': em.tag, 'model': em.arch, 'checkpoint_sha256': em.checkpoint['sha256'],
        'param_count': param_count_m(em.model), 'img_size': data_config['input_size'][-1],
        'crop_pct': data_config['crop_pct'], 'interpolation': data_config['interpolation'],
        'checkpoint': em.checkpoint['path'], 'use_ema': args.use_ema, 'amp': args.amp_dtype if args.amp else '',
        'num_classes': plan.num_classes,
    }


def _key_base(em: EvalModel, data_config: Dict[str, Any], digits_size: int, plan: EvalPlan,
              args: argparse.Namespace, env: EvalEnv) -> Dict[str, Any]:
    """Everything besides the set that determines a row's numbers (hashed into ``config_key``)."""
    return {
        'arch': em.arch, 'sha256': em.checkpoint['sha256'], 'pretrained': args.pretrained, 'use_ema': args.use_ema,
        'model_kwargs': plan.model_kwargs, 'data_config': data_config, 'amp': args.amp_dtype if args.amp else '',
        'fgsm_eps': env.attack.fgsm_eps, 'fgsm_n': args.fgsm_n, 'autoattack': args.autoattack,
        'autoattack_n': args.autoattack_n, 'autoattack_eps': args.autoattack_eps,
        'autoattack_impl': env.autoattack_status, 'seed': args.seed, 'n_bins': args.n_bins,
        'skip_bad_images': args.skip_bad_images, 'digits_size': digits_size,
        **{k: getattr(args, k) for k in ('model_dtype', 'test_pool', 'reparam', 'valid_labels', 'real_labels',
                                         'crop_border_pixels') if getattr(args, k)},  # timm's flags, when set
    }


def _reused_rows(tag: str, part: EvalPart, key: str, store: ResultsStore) -> Optional[List[Dict[str, Any]]]:
    """The rows of a pass from an earlier run with identical settings and data, if all of them are there."""
    expected = [v.name for v in part.views] + (['imagenet-real'] if any(v.real for v in part.views) else [])
    reused = [store.find(tag, n, key) for n in expected]
    if not all(r is not None for r in reused):
        return None
    if store.primary:
        _logger.info(f'{tag} / {part.name}: reusing rows from {store.results_file}')
    return reused


def _evaluate_part(net: torch.nn.Module, part: EvalPart, data_config: Dict[str, Any], base_row: Dict[str, Any],
                   args: argparse.Namespace, env: EvalEnv) -> List[Dict[str, Any]]:
    """One pass over a dataset: its rows (one per view, plus ImageNet ReaL)."""
    border = part.crop_border_pixels if part.crop_border_pixels is not None else args.crop_border_pixels
    batch_size = args.batch_size
    try:
        while True:
            pin = args.pin_mem and env.device.type == 'cuda'
            loader = create_eval_loader(part.dataset, data_config, batch_size, args.workers, env.rank, env.world,
                                        crop_border_pixels=border, pin_memory=pin,
                                        center_crop_only=part.center_crop_only)
            try:
                records, skipped = evaluate_part(net, part, loader, env.device, autocast=env.autocast,
                                                 attack=env.attack, progress=env.primary and not args.no_progress,
                                                 desc=f'{base_row["tag"]} {part.name}')
                break
            except torch.cuda.OutOfMemoryError:
                if not args.retry or batch_size == 1:
                    raise
                batch_size = max(1, batch_size // 2)  # --retry, as timm's check_batch_size_retry
                torch.cuda.empty_cache()
                _logger.warning(f'{part.name}: out of memory, retrying with batch size {batch_size}')
    except BadImageError as e:
        raise ValidateError(str(e).strip().splitlines()[-1]) from None
    except RuntimeError as e:  # DataLoader workers re-raise with the worker traceback in the message
        if 'BadImageError' in str(e) or 'Unreadable image' in str(e):
            lines = [ln for ln in str(e).splitlines() if 'Unreadable image' in ln]
            raise ValidateError(lines[-1].split('BadImageError: ')[-1] if lines else str(e)) from None
        raise
    skipped = all_reduce_int(skipped, env.device)
    complete = None if part.complete is None else bool(part.complete and skipped == 0)
    part_row = {**base_row, 'skipped': skipped, 'complete': complete, 'protocol': part.protocol}
    rows = []
    for view in part.views:
        rec = gather_records(records[view.name], env.device)
        rows.append(_view_row(view, part, rec, part_row, args, env))
        if view.real and part.real_labels is not None:
            bundled = 'timm bundled imagenet_real_labels.json'
            source = args.real_labels if args.real_labels and part.name != 'imagenet' else bundled
            rows.append({**part_row, 'set': 'imagenet-real',
                         'convention': f'ImageNet val with ReaL labels ({source}); images without ReaL labels left out',
                         **summarize_real(rec, part.real_labels)})
    if complete is False and env.primary:
        _logger.warning(f'{part.name}: {part.num_samples - skipped} of {part.expected_size} images scored '
                        f'({skipped} skipped): rows marked complete = false')
    return rows


def _view_row(view: View, part: EvalPart, rec: Dict[str, torch.Tensor], part_row: Dict[str, Any],
              args: argparse.Namespace, env: EvalEnv) -> Dict[str, Any]:
    """The results row of one view of a pass."""
    eps = env.attack.fgsm_eps if view.attack else ()
    row = {**part_row, 'set': view.name, 'num_classes': view.num_classes or part_row['num_classes'],
           'corruption': part.corruption or '', 'severity': part.severity or '',
           **summarize_records(rec, args.n_bins, fgsm_eps=eps)}
    if view.name == part.name:
        row['expected_count'] = part.expected_size
    if view.attack and eps:
        row['fgsm'] = {f'{e:g}': row.get(fgsm_column(e)) for e in eps}
    if view.attack and args.autoattack:
        row['autoattack_status'] = env.autoattack_status  # 'pyautoattack <version>' or 'unavailable: <why>'
        row['autoattack_eps'] = args.autoattack_eps
        if env.attack.autoattack:
            row['autoattack'] = describe_autoattack(view.num_classes or part_row['num_classes'], args.autoattack_eps,
                                                    args.seed)
        else:
            row['autoattack_top1'] = None
    return row


def corruption_summary(set_name: str, parts: List[EvalPart], rows_by_set: Dict[str, Dict[str, Any]],
                       base_row: Dict[str, Any]) -> Dict[str, Any]:
    """The summary row of a -C set from its per-corruption/severity rows."""
    part_rows = [rows_by_set[p.name] for p in parts if p.corruption is not None and p.name in rows_by_set]
    errors: Dict[str, List[float]] = {}
    for r in sorted(part_rows, key=lambda r: (r['corruption'], int(r['severity']))):
        errors.setdefault(r['corruption'], []).append(r['top1_err'] / 100.0)
    clean = rows_by_set.get('digits-c/clean' if set_name == 'digits-c' else 'imagenet')
    clean_err = clean['top1_err'] / 100.0 if clean and clean.get('top1_err') is not None else None
    s = summarize_corruption_errors(errors, clean_error=clean_err, imagenet=set_name == 'imagenet-c')
    bench = [r for r in part_rows if r['corruption'] not in IMAGENET_C_EXTRA
             and (set_name == 'digits-c' or r['corruption'] in IMAGENET_C_CORRUPTIONS)]
    top5 = [r['top5'] for r in bench if r.get('top5') is not None]
    missing = _missing_benchmark_parts(set_name, parts)
    row = {**base_row, 'set': set_name, 'top1': 100.0 - s['mean_err'], 'top1_err': s['mean_err'],
           'top5': sum(top5) / len(top5) if top5 else float('nan'),
           'count': sum(r['count'] for r in part_rows), 'skipped': sum(r.get('skipped') or 0 for r in part_rows),
           'complete': all(r.get('complete') is not False for r in part_rows) and not missing,
           'c_missing': missing, 'protocol': part_rows[0].get('protocol', '') if part_rows else '',
           'corruption': 'mean', 'severity': '',
           'c_mean_err': s['mean_err'], 'c_extra_mean_err': s['extra_mean_err'], 'c_mce': s['mce'],
           'c_100_minus_mce': s['100_minus_mce'], 'c_rel_mce': s['rel_mce'], 'c_rel_mean_err': s['rel_mean_err'],
           'c_corruptions': sorted(errors), 'config_key': '', **pooled_calibration(bench)}
    row['top5_err'] = 100.0 - row['top5']
    return row


def _missing_benchmark_parts(set_name: str, parts: List[EvalPart]) -> List[str]:
    """ImageNet-C corruption/severity folders of the 15-corruption benchmark that were not found."""
    if set_name != 'imagenet-c':
        return []
    have = {(p.corruption, p.severity) for p in parts}
    return [f'{c}/{s}' for c in IMAGENET_C_CORRUPTIONS for s in SEVERITIES if (c, s) not in have]


def report_run(models: List[EvalModel], plan: EvalPlan, store: ResultsStore, args: argparse.Namespace,
               env: EvalEnv) -> None:
    """On the primary rank: the tables, where the files went, and the optional wandb run."""
    if not env.primary:
        return
    print_report(models, plan.set_names, env.attack.fgsm_eps, args.autoattack, env.autoattack_status,
                 missing=plan.missing, suite=args.suite)
    if store.results_file:
        print(f'\nResults: {store.json_path} and {store.csv_path}')
    if store.reliability_dir:
        print(f'Reliability diagrams: {store.reliability_dir}')
    if args.log_wandb:
        log_wandb(args, [r for em in models for r in em.rows.values()])


def finish(env: EvalEnv) -> None:
    """Wait for every rank and tear the process group down."""
    if env.world > 1:
        dist.barrier()
        dist.destroy_process_group()
