"""Evaluation behind validate.py: sets, corruptions, calibration, attacks, the per-batch loop and reporting."""
from .attacks import autoattack_status, fgsm_correct
from .calibration import (
    bin_sums,
    ece_from_sums,
    expected_calibration_error,
    maximum_calibration_error,
    negative_log_likelihood,
)
from .corruptions import CorruptedDataset, corrupt_image, mean_corruption_error, summarize_corruption_errors
from .loop import AttackConfig, NormalizedModel, create_eval_loader, evaluate_part, summarize_records
from .report import format_table, load_results, reliability_diagram, write_results
from .sets import SET_SPECS, EvalPart, View, build_parts, discover_sets

__all__ = [
    'autoattack_status', 'fgsm_correct', 'bin_sums', 'ece_from_sums', 'expected_calibration_error',
    'maximum_calibration_error', 'negative_log_likelihood', 'CorruptedDataset', 'corrupt_image',
    'mean_corruption_error', 'summarize_corruption_errors', 'AttackConfig', 'NormalizedModel', 'create_eval_loader',
    'evaluate_part', 'summarize_records', 'format_table', 'load_results', 'reliability_diagram', 'write_results',
    'SET_SPECS', 'EvalPart', 'View', 'build_parts', 'discover_sets',
]
