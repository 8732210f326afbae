"""Evaluation behind validate.py: sets, corruptions, calibration, attacks, the per-batch loop and reporting.

The steps of a run, in the order validate.py calls them: ``setup_process``, ``plan_evaluation``,
``create_eval_models``, ``prepare_sets``, ``open_results``, ``evaluate_model`` (per model), ``report_run``, ``finish``.
"""
from .attacks import autoattack_status, create_autoattack, describe_autoattack, fgsm_correct, preserved_model_state
from .calibration import (
    bin_sums,
    ece_from_sums,
    expected_calibration_error,
    maximum_calibration_error,
    negative_log_likelihood,
)
from .corruptions import (
    CorruptedDataset,
    corrupt_image,
    mean_corruption_error,
    relative_mean_corruption_error,
    summarize_corruption_errors,
)
from .loop import AttackConfig, NormalizedModel, create_eval_loader, evaluate_part, summarize_records
from .models import EvalModel, create_eval_models
from .plan import EvalPlan, PartsCache, ValidateError, plan_evaluation, prepare_sets
from .report import (
    format_table,
    load_results,
    log_wandb,
    print_report,
    reliability_diagram,
    write_results,
    write_timm_results,
)
from .runner import EvalEnv, ResultsStore, evaluate_model, finish, open_results, report_run, setup_process
from .sets import SET_SPECS, EvalPart, View, build_parts, discover_sets

__all__ = [
    'autoattack_status', 'create_autoattack', 'describe_autoattack', 'fgsm_correct', 'preserved_model_state',
    'bin_sums', 'ece_from_sums', 'expected_calibration_error', 'maximum_calibration_error', 'negative_log_likelihood',
    'CorruptedDataset', 'corrupt_image', 'mean_corruption_error', 'relative_mean_corruption_error',
    'summarize_corruption_errors', 'AttackConfig', 'NormalizedModel', 'create_eval_loader', 'evaluate_part',
    'summarize_records', 'EvalModel', 'create_eval_models', 'EvalPlan', 'PartsCache', 'ValidateError',
    'plan_evaluation', 'prepare_sets', 'format_table', 'load_results', 'log_wandb', 'print_report',
    'reliability_diagram', 'write_results', 'write_timm_results', 'EvalEnv', 'ResultsStore', 'evaluate_model',
    'finish', 'open_results', 'report_run', 'setup_process', 'SET_SPECS', 'EvalPart', 'View', 'build_parts',
    'discover_sets',
]
