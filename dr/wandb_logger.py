"""Optional Weights & Biases logging with a resume-safe run id (never imported unless --log-wandb)."""
import logging
import os
import secrets
from typing import Any, Dict, Optional, Sequence

from .io import atomic_write

_logger = logging.getLogger(__name__)

RUN_ID_FILE = 'wandb_run_id.txt'


def init_wandb(
        output_dir: str,
        project: Optional[str],
        config: Dict[str, Any],
        name: Optional[str] = None,
        tags: Optional[Sequence[str]] = None,
        run_id: Optional[str] = None,
) -> Any:
    """Start (or resume) a wandb run whose id is kept in ``output_dir/wandb_run_id.txt``.

    A rerun or ``--resume`` into the same output dir continues the same run instead of creating a new one.
    Honours ``WANDB_MODE=offline``.
    """
    try:
        import wandb
    except ImportError as e:  # pragma: no cover - wandb is a declared dependency
        raise RuntimeError('--log-wandb needs the wandb package (pip install wandb)') from e
    id_path = os.path.join(output_dir, RUN_ID_FILE)
    if run_id is None and os.path.isfile(id_path):
        with open(id_path) as f:
            run_id = f.read().strip() or None
    if run_id is None:
        run_id = secrets.token_hex(4)  # 8 lowercase hex chars: a valid wandb run id
        with atomic_write(id_path, 'w') as f:
            f.write(run_id)
    run = wandb.init(
        project=project,
        name=name,
        id=run_id,
        resume='allow',
        config=config,
        tags=list(tags) if tags else None,
        dir=output_dir,
    )
    _logger.info(f'wandb run {run_id} ({os.environ.get("WANDB_MODE", "online")}) in {output_dir}')
    return run


def log_metrics(metrics: Dict[str, Any], step: Optional[int] = None) -> None:
    """Log a dict to the active wandb run (no-op without one)."""
    import wandb
    if wandb.run is not None:
        wandb.log(dict(metrics), step=step)


def log_epoch(epoch: int, train_metrics: Dict[str, Any], eval_metrics: Optional[Dict[str, Any]],
              lr: Optional[float] = None) -> None:
    """Log one ``summary.csv`` row (``epoch``, ``train_*``, ``eval_*``, ``lr``) at wandb step ``epoch``.

    The step is the epoch itself, not wandb's own counter, so the segments of a resumed run line up: a run resumed
    at epoch 2 logs its first row at step 2 (wandb ignores, with a warning, a step it has already seen, e.g. an
    epoch repeated after a kill between its log and its checkpoint).
    """
    row: Dict[str, Any] = {'epoch': epoch}
    row.update((f'train_{k}', v) for k, v in train_metrics.items())
    row.update((f'eval_{k}', v) for k, v in (eval_metrics or {}).items())
    if lr is not None:
        row['lr'] = lr
    log_metrics(row, step=epoch)
