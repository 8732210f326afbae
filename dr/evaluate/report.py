"""Reporting evaluation results: results files (JSON/CSV), printed tables and reliability diagrams."""
import contextlib
import csv
import hashlib
import json
import logging
import math
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from matplotlib.figure import Figure

from ..io import atomic_write
from ..wandb_logger import init_wandb
from .calibration import (
    DEFAULT_BINS,
    ArrayLike,
    bin_sums,
    bins_from_sums,
    confidences_and_correct,
    ece_from_sums,
)
from .corruptions import IMAGENET_C_EXTRA
from .sets import SET_SPECS

_logger = logging.getLogger(__name__)

TIMM_COLUMNS = ('model', 'top1', 'top1_err', 'top5', 'top5_err', 'param_count', 'img_size', 'crop_pct',
                'interpolation')  # timm validate.py's results row, in its order
ID_COLUMNS = ('tag', 'set', 'model', 'checkpoint_sha256')  # (tag, set) is unique in a results file
OUR_COLUMNS = ('count', 'expected_count', 'complete', 'skipped', 'ece', 'mce', 'nll', 'num_classes', 'corruption',
               'severity', 'protocol', 'c_mean_err', 'c_extra_mean_err', 'c_mce', 'c_100_minus_mce', 'c_rel_mce',
               'c_rel_mean_err', 'fgsm_count', 'autoattack_top1', 'autoattack_count', 'autoattack_eps',
               'autoattack_status', 'checkpoint', 'use_ema', 'amp', 'config_key', 'data_fingerprint', 'convention')
JSON_ONLY = ('calibration_bins', 'fgsm', 'c_corruptions', 'c_missing', 'autoattack')
RESULTS_FORMATS = ('dr', 'timm')
HEADLINE_KEYS = ('top1', 'top5', 'ece', 'mce', 'nll', 'c_mce', 'c_mean_err', 'autoattack_top1')


# --------------------------------------------------------------------------------------------------------------------
# results files

def config_key(values: Dict[str, Any]) -> str:
    """Short hash of everything that determines a row's numbers (rows with the same key are reused on reruns)."""
    text = json.dumps(values, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def results_paths(results_file: str) -> Tuple[str, str]:
    """(json path, csv path) for ``--results-file`` (``x``, ``x.json`` or ``x.csv`` all give ``x.json`` + ``x.csv``)."""
    stem, ext = os.path.splitext(results_file)
    if ext.lower() not in ('.json', '.csv'):
        stem = results_file
    return stem + '.json', stem + '.csv'


def load_results(results_file: str) -> Dict[str, Any]:
    """Existing results (``{'meta': ..., 'results': [...]}``) or an empty document.

    Raises:
        ValueError: naming the file when it exists but is not a results document (it is never overwritten then).
    """
    path, _ = results_paths(results_file)
    if not os.path.isfile(path):
        return {'meta': {}, 'results': []}
    try:
        with open(path) as f:
            doc = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f'Results file {path} exists but is not valid JSON ({e}); move it away or pick another '
                         f'--results-file') from None
    if not isinstance(doc, dict) or not isinstance(doc.get('results'), list):
        raise ValueError(f'Results file {path} is not a validate.py results document')
    return doc


def merge_rows(existing: Sequence[Dict[str, Any]], new: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Existing rows with the (tag, set) of a new row are replaced; all other rows are kept in order.

    A replaced row that came from a different checkpoint (another sha256 under the same tag) is logged.
    """
    new_by_key = {(r.get('tag'), r.get('set')): r for r in new}
    kept, warned = [], set()
    for r in existing:
        replacement = new_by_key.get((r.get('tag'), r.get('set')))
        if replacement is None:
            kept.append(r)
        elif r.get('checkpoint_sha256') != replacement.get('checkpoint_sha256') and r.get('tag') not in warned:
            warned.add(r.get('tag'))
            _logger.warning(f'Results: tag {r.get("tag")!r} held checkpoint {r.get("checkpoint_sha256") or "(none)"}'
                            f' and now {replacement.get("checkpoint_sha256") or "(none)"}; its rows are replaced '
                            f'(use --tags to keep both)')
    return kept + list(new)


def csv_columns(rows: Sequence[Dict[str, Any]]) -> List[str]:
    """Identity (tag, set, model, checkpoint sha256), timm's metric columns, ours, then FGSM and any other keys
    (JSON-only keys excluded)."""
    cols = list(ID_COLUMNS) + [c for c in TIMM_COLUMNS if c not in ID_COLUMNS] + list(OUR_COLUMNS)
    extra = sorted({k for r in rows for k in r if k not in cols and k not in JSON_ONLY},
                   key=lambda k: (not k.startswith('fgsm_top1_eps'), _eps_of(k), k))
    return cols + extra


def _eps_of(key: str) -> float:
    if key.startswith('fgsm_top1_eps'):
        with contextlib.suppress(ValueError):
            return float(key[len('fgsm_top1_eps'):])
    return 0.0


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return _json_safe(value.item())
    return value


def write_results(results_file: str, rows: Sequence[Dict[str, Any]], meta: Dict[str, Any]) -> Tuple[str, str]:
    """Write the JSON document and the CSV table atomically (non-finite numbers become null / empty)."""
    json_path, csv_path = results_paths(results_file)
    doc = {'meta': _json_safe(meta), 'results': [_json_safe(r) for r in rows]}
    with atomic_write(json_path, 'w') as f:
        json.dump(doc, f, indent=2)
        f.write('\n')
    cols = csv_columns(rows)
    with atomic_write(csv_path, 'w') as f:
        writer = csv.DictWriter(f, fieldnames=cols, extrasaction='ignore', lineterminator='\n')
        writer.writeheader()
        for r in rows:
            writer.writerow({k: _csv_value(r.get(k)) for k in cols})
    return json_path, csv_path


def timm_results_paths(results_file: str, set_name: str) -> Tuple[str, str]:
    """(csv, json) paths of the timm-shaped results of one set: ``<stem>-<set>.csv`` / ``.json``."""
    json_path, _ = results_paths(results_file)
    stem = json_path[:-len('.json')] + '-' + set_name.replace('/', '_')
    return stem + '.csv', stem + '.json'


def timm_rows(rows: Sequence[Dict[str, Any]]) -> Dict[str, List[Dict[str, Any]]]:
    """Per set, rows in timm validate.py's shape: ``model, top1, top1_err, top5, top5_err, param_count, img_size,
    crop_pct, interpolation`` (rounded to 4 decimals like timm), plus ``checkpoint`` when a row came from one (as
    timm writes in its multi-checkpoint mode); sorted by top-1, best first, as timm sorts bulk results."""
    out: Dict[str, List[Dict[str, Any]]] = {}
    for r in rows:
        if r.get('corruption') not in ('', None, 'mean'):
            continue
        row = {}
        for k in TIMM_COLUMNS:
            v = r.get(k)
            row[k] = round(v, 4) if isinstance(v, float) and math.isfinite(v) and k != 'crop_pct' else v
        if r.get('checkpoint'):
            row['checkpoint'] = r['checkpoint']
        out.setdefault(r['set'], []).append(row)
    for set_rows in out.values():
        set_rows.sort(key=lambda x: -(x['top1'] if isinstance(x['top1'], (int, float)) else float('-inf')))
    return out


def write_timm_results(results_file: str, rows: Sequence[Dict[str, Any]]) -> List[str]:
    """Write ``timm_rows`` as timm's validate.py writes its results file: CSV via ``csv.DictWriter`` and JSON with
    ``indent=4`` (an object for one model, a list for several); one pair of files per set."""
    written = []
    for set_name, set_rows in timm_rows(rows).items():
        csv_path, json_path = timm_results_paths(results_file, set_name)
        fields = list(TIMM_COLUMNS) + (['checkpoint'] if any('checkpoint' in r for r in set_rows) else [])
        with atomic_write(csv_path, 'w') as f:
            writer = csv.DictWriter(f, fieldnames=fields, lineterminator='\n')
            writer.writeheader()
            for r in set_rows:
                writer.writerow({k: '' if r.get(k) is None else r.get(k) for k in fields})
        with atomic_write(json_path, 'w') as f:
            json.dump(_json_safe(set_rows[0] if len(set_rows) == 1 else set_rows), f, indent=4)
        written += [csv_path, json_path]
    return written


def _csv_value(v: Any) -> Any:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ''
    if isinstance(v, float):
        return f'{v:.4f}'.rstrip('0').rstrip('.') if abs(v) < 1e6 else v
    return v


# --------------------------------------------------------------------------------------------------------------------
# printing

def format_number(v: Any, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return 'n/a'
    if isinstance(v, float):
        return f'{v:.{digits}f}'
    return str(v)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 2) -> str:
    """Plain-text table with right-aligned numbers."""
    cells = [[format_number(c, digits) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    line = '  '.join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths)))
    out = [line, '-' * len(line)]
    for r in cells:
        out.append('  '.join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    return '\n'.join(out)


def headline(row: Dict[str, Any]) -> float:
    """The number a set contributes to the suite table: top-1 (%), or for -C sets 100 - mCE (ImageNet-C) /
    100 - mean error (digits-C)."""
    if row.get('set') == 'imagenet-c':
        return row.get('c_100_minus_mce', float('nan'))
    if row.get('set') == 'digits-c':
        v = row.get('c_mean_err')
        return 100.0 - v if v is not None else float('nan')
    v = row.get('top1')
    return float('nan') if v is None else v


def _table_name(set_name: str) -> str:
    return SET_SPECS[set_name].table_name if set_name in SET_SPECS else set_name


def print_report(models: Sequence[Any], set_names: Sequence[str], fgsm_eps: Sequence[float], autoattack: bool,
                 autoattack_status: str, missing: Sequence[str] = (), suite: Optional[str] = None) -> None:
    """Print the suite table (one line per model), the per-set details and the -C error matrices.

    Args:
        models: objects with ``tag`` and ``rows`` (``{set: row}``), e.g. ``dr.evaluate.models.EvalModel``.
        set_names: the evaluated sets in table order.
        fgsm_eps: FGSM epsilons (1/255) of the run.
        autoattack: whether AutoAttack was asked for.
        autoattack_status: what to print when it could not run.
        missing: sets looked for under ``suite`` and not found.
    """
    print_suite_table(models, set_names, fgsm_eps, autoattack, autoattack_status)
    detail = []
    for m in models:
        for name, r in m.rows.items():
            if r.get('corruption') not in ('', None, 'mean'):
                continue
            detail.append([m.tag, name, r.get('top1'), r.get('top5'), r.get('ece'), r.get('mce'), r.get('nll'),
                           r.get('count'), r.get('skipped')])
    print('\nPer set: top-1/top-5 (%), ECE/MCE (%), NLL, images, skipped:')
    print(format_table(['model', 'set', 'top1', 'top5', 'ECE', 'MCE', 'NLL', 'count', 'skipped'], detail))
    for m in models:
        for c_set in ('digits-c', 'imagenet-c'):
            if m.rows.get(c_set):
                print_corruption_matrix(m.tag, c_set, m.rows)
    if missing:
        folders = {n: ' or '.join(SET_SPECS[n].folders) for n in missing}
        print(f'\nMissing under {suite} (not evaluated): ' + '; '.join(f'{n} ({f})' for n, f in folders.items()))


def print_suite_table(models: Sequence[Any], set_names: Sequence[str], fgsm_eps: Sequence[float], autoattack: bool,
                      autoattack_status: str) -> None:
    """One line per model: headline per set, mean over the shift sets, ECE and attacks on the clean set."""
    shift = [n for n in set_names if n in SET_SPECS and SET_SPECS[n].kind in ('shift', 'corruption')]
    clean = [n for n in set_names if n not in shift]
    headers = ['model'] + [_table_name(n) for n in set_names]
    if shift:
        headers.append('avg')
    if clean:
        headers.append(f'ECE {_table_name(clean[0])}')
    headers += [f'FGSM {e:g}' for e in fgsm_eps]
    if autoattack:
        headers.append('AutoAttack')
    table = []
    for m in models:
        rows = m.rows
        line = [m.tag] + [headline(rows[n]) if n in rows else float('nan') for n in set_names]
        if shift:
            sv = [v for v in (headline(rows[n]) for n in shift if n in rows) if v is not None and v == v]
            line.append(sum(sv) / len(sv) if sv else float('nan'))
        attacked = rows.get(clean[0]) if clean else None
        if clean:
            line.append(attacked.get('ece') if attacked else float('nan'))
        line += [attacked.get(f'fgsm_top1_eps{e:g}') if attacked else float('nan') for e in fgsm_eps]
        if autoattack:
            line.append(attacked.get('autoattack_top1') if attacked and attacked.get('autoattack_top1') is not None
                        else autoattack_status)
        table.append(line)
    print('\nTop-1 (%) per set (ImageNet-C: 100 - mCE; digits-C: 100 - mean error), avg = mean over the '
          'shift/corruption columns that have a value, ECE (%) and attacked top-1 (%) on the clean set:')
    print(format_table(headers, table))


def print_corruption_matrix(tag: str, c_set: str, rows: Dict[str, Dict[str, Any]]) -> None:
    """Top-1 error per corruption (rows) and severity (columns) of one model on a -C set."""
    summary = rows[c_set]
    per: Dict[str, Dict[int, float]] = {}
    for r in rows.values():
        if r['set'].startswith(c_set + '/') and r.get('severity') not in ('', None):
            per.setdefault(r['corruption'], {})[int(r['severity'])] = r['top1_err']
    lines = [[c + (' (extra)' if c in IMAGENET_C_EXTRA else '')] + [per[c].get(s, float('nan')) for s in range(1, 6)]
             + [sum(per[c].values()) / len(per[c])] for c in per]
    text = (f'\n{tag} {c_set}: top-1 error (%) per corruption and severity; mean error {summary["c_mean_err"]:.2f}'
            + (' (extras apart)' if any(c in IMAGENET_C_EXTRA for c in per) else ''))
    if c_set == 'imagenet-c' and _finite(summary.get('c_mce')):
        text += f', mCE {summary["c_mce"]:.2f}'
    if c_set == 'imagenet-c' and _finite(summary.get('c_rel_mce')):
        text += f', relative mCE {summary["c_rel_mce"]:.2f}'
    if _finite(summary.get('c_rel_mean_err')):
        text += f', mean error - clean error {summary["c_rel_mean_err"]:.2f}'
    print(text)
    print(format_table(['corruption', 's1', 's2', 's3', 's4', 's5', 'mean'], lines))


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def log_wandb(args: Any, rows: List[Dict[str, Any]]) -> None:
    """Log the results table and the headline metrics to one wandb run (offline mode honoured)."""
    out_dir = (os.path.dirname(os.path.abspath(results_paths(args.results_file)[0])) if args.results_file
               else os.path.abspath(os.path.join('output', 'validate')))
    os.makedirs(out_dir, exist_ok=True)
    try:
        run = init_wandb(out_dir, args.wandb_project, config=vars(args), name='validate', tags=args.wandb_tags)
    except Exception as e:  # logging must never lose the evaluation that was just written
        _logger.warning(f'--log-wandb: could not start a wandb run ({e}); results are in the results file')
        return
    import wandb  # optional dependency, present once init_wandb succeeded
    cols = csv_columns(rows)
    table = wandb.Table(columns=cols, data=[[_wandb_value(r.get(c)) for c in cols] for r in rows])
    metrics = {}
    for r in rows:
        for k in HEADLINE_KEYS:
            v = r.get(k)
            if isinstance(v, (int, float)) and v == v:
                metrics[f'{r["tag"]}/{r["set"]}/{k}'] = v
    run.log({'results': table, **metrics})
    run.summary.update(metrics)
    run.finish()


def _wandb_value(v: Any) -> Any:
    return str(v) if isinstance(v, (list, dict)) else v


def reliability_diagram_from_confidences(
        confidences: ArrayLike,
        correct: ArrayLike,
        path: str,
        n_bins: int = DEFAULT_BINS,
        title: Optional[str] = None,
) -> str:
    """Write a reliability diagram (accuracy per confidence bin vs the diagonal, plus a histogram) as PNG."""
    return reliability_diagram_from_sums(*bin_sums(confidences, correct, n_bins), path=path, title=title)


def reliability_diagram_from_sums(
        count: ArrayLike,
        conf_sum: ArrayLike,
        correct_sum: ArrayLike,
        path: str,
        title: Optional[str] = None,
) -> str:
    """Reliability diagram PNG from per-bin sums (``bin_sums``), written atomically to ``path``."""
    fig = Figure(figsize=(4.5, 5.5))
    ax, ax_hist = fig.subplots(2, 1, gridspec_kw={'height_ratios': [3, 1]}, sharex=True)
    draw_reliability(ax, ax_hist, count, conf_sum, correct_sum, title=title)
    fig.tight_layout()
    with atomic_write(path, 'wb') as f:
        fig.savefig(f, format='png', dpi=100)
    return path


def draw_reliability(ax: Any, ax_hist: Optional[Any], count: ArrayLike, conf_sum: ArrayLike, correct_sum: ArrayLike,
                     title: Optional[str] = None, color: str = 'tab:blue') -> Dict[str, Any]:
    """Draw a reliability diagram on matplotlib axes: accuracy per bin (filled bars in ``color``), the gap to the
    bin's mean confidence as an outline (red, hatched, above the bar: over-confident; purple, inside the bar:
    under-confident), the diagonal, and (on ``ax_hist``, unless None) the share of samples per bin.

    Returns:
        the bar containers ``accuracy``, ``over`` and ``under`` (for tests and callers that restyle them).
    """
    bins = bins_from_sums(count, conf_sum, correct_sum)
    n_bins = len(bins['count'])
    ece = ece_from_sums(count, conf_sum, correct_sum)
    total = max(int(bins['count'].sum()), 1)
    centers = (bins['lower'] + bins['upper']) / 2
    width = 1.0 / n_bins
    filled = bins['count'] > 0
    acc = np.where(filled, np.nan_to_num(bins['accuracy'], nan=0.0), 0.0)
    conf = np.where(filled, bins['confidence'], 0.0)
    over, under = filled & (conf > acc), filled & (acc > conf)
    bars = {'accuracy': ax.bar(centers, acc, width=width, edgecolor='black', linewidth=0.5, color=color,
                               label='accuracy')}
    bars['over'] = ax.bar(centers[over], (conf - acc)[over], bottom=acc[over], width=width, fill=False,
                          edgecolor='tab:red', hatch='//', linewidth=1.2, label='over-confident: gap to confidence')
    bars['under'] = ax.bar(centers[under], (acc - conf)[under], bottom=conf[under], width=width, fill=False,
                           edgecolor='tab:purple', linewidth=1.8, label='under-confident: gap to confidence')
    ax.plot([0, 1], [0, 1], '--', color='gray', label='perfect calibration')
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel('accuracy')
    ax.legend(loc='upper left', fontsize=7)
    ax.text(0.97, 0.05, f'ECE {100 * ece:.2f}%\nN {int(bins["count"].sum())}', ha='right', va='bottom',
            transform=ax.transAxes, fontsize=9, bbox=dict(facecolor='white', alpha=0.8))
    ax.set_title(title or 'Reliability diagram', fontsize=10)
    if ax_hist is None:
        ax.set_xlabel(f'top-1 confidence ({n_bins} bins)')
        return bars
    ax_hist.bar(centers, bins['count'] / total, width=width, edgecolor='black', color='tab:gray')
    ax_hist.set_xlabel(f'top-1 confidence ({n_bins} bins)')
    ax_hist.set_ylabel('fraction')
    return bars


def reliability_diagram(
        probs: ArrayLike,
        targets: ArrayLike,
        path: str,
        n_bins: int = DEFAULT_BINS,
        title: Optional[str] = None,
) -> str:
    """Reliability diagram PNG for class probabilities ``probs`` [N, K] and labels ``targets`` [N]."""
    conf, correct = confidences_and_correct(probs, targets)
    return reliability_diagram_from_confidences(conf, correct, path, n_bins=n_bins, title=title)
