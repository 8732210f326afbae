"""PS-KD (Kim et al., "Self-Knowledge Distillation with Progressive Refinement of Targets", ICCV 2021): the target
of a sample is its label mixed with the model's own prediction for it in the previous epoch,

    ``y_t(x) = (1 - alpha_t) * onehot(y) + alpha_t * p_{t-1}(x)``,  ``alpha_t = alpha_T * t / T``,

trained with the soft-target cross-entropy. ``t = epoch + 1`` counts the epochs from 1 and ``T`` is the number of
epochs, as the authors' code (github.com/lgcnsai/PS-KD-Pytorch ``main.py``: ``alpha_T * ((epoch + 1) / end_epoch)``);
a sample without a stored prediction yet (the first epoch) is trained on its label.

The predictions live in a :class:`PredictionStore`: the softmax output of every training step; each rank
contributes only the rows of the samples it trained (all-gathered every step, with the contributing rank recorded in
``owner``), so every rank holds the full table. Reads come from the copy taken at the start of the epoch (so a sample
that the distributed sampler repeats within an epoch still sees the previous epoch's prediction). When the
checkpoint saver asks for the task state (every checkpoint), rank 0 (the run folder lives on rank 0 only) writes the
table atomically to ``pskd-predictions-<epoch>.pt`` and the checkpoint records that name, so ``--resume`` continues
from exactly the predictions that belong to its checkpoint (the previous file is kept: a kill between the two writes
resumes from the older checkpoint and its file).
"""
import argparse
import logging
import os
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.task import ClassificationTask
from torch.utils.data import Dataset, IterableDataset

from ..distributed import all_gather_cat, get_rank
from ..io import atomic_write

_logger = logging.getLogger(__name__)

STORE_PREFIX = 'pskd-predictions-'


def pskd_alpha(alpha_T: float, epoch: int, num_epochs: int) -> float:
    """``alpha_t = alpha_T * (epoch + 1) / num_epochs`` for the 0-based ``epoch``."""
    return float(alpha_T) * (epoch + 1) / num_epochs


def pskd_targets(labels: torch.Tensor, previous: torch.Tensor, seen: torch.Tensor, alpha: float) -> torch.Tensor:
    """``(1 - alpha) * onehot + alpha * previous`` where ``seen``, the one-hot label elsewhere; (N, K)."""
    onehot = F.one_hot(labels.long(), previous.shape[1]).to(previous.dtype)
    mixed = (1.0 - alpha) * onehot + alpha * previous
    return torch.where(seen.view(-1, 1), mixed, onehot)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``-sum_k targets_k log softmax(logits)_k``, mean over the batch."""
    return -(targets * F.log_softmax(logits.float(), dim=1)).sum(dim=1).mean()


class IndexedDataset(Dataset):
    """A map-style dataset whose items are ``(image, target, index)``; ``transform`` and ``targets`` pass through."""

    def __init__(self, dataset: Dataset):
        if isinstance(dataset, IterableDataset) or not hasattr(dataset, '__len__'):
            raise ValueError(f'--method pskd stores a prediction per sample and needs a map-style dataset with '
                             f'indices; {type(dataset).__name__} streams (use an ImageFolder, digits or torch/)')
        self.dataset = dataset

    @property
    def transform(self):
        return getattr(self.dataset, 'transform', None)

    @transform.setter
    def transform(self, value) -> None:
        self.dataset.transform = value

    def __getattr__(self, name: str) -> Any:  # targets, classes, reader, ... of the wrapped dataset
        if name == 'dataset':
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, target = self.dataset[index]
        return image, target, index


class PredictionStore:
    """Every training sample's latest prediction: ``table`` (N, K) float32, ``seen`` (N,) and ``owner`` (N,), the rank
    that trained the sample and wrote its row (-1: none yet), on the CPU.

    ``begin_epoch`` freezes the current table as the one :meth:`lookup` reads during the epoch; :meth:`update`
    all-gathers every rank's (indices, probabilities) and writes them in rank order, so every rank holds the same
    table and each row was written by the rank that trained that sample. The table grows to the largest sample
    index seen (the same on every rank, since every rank applies the same gathered rows).
    """

    def __init__(self, num_classes: int):
        self.num_classes = int(num_classes)
        self.table = torch.zeros(0, self.num_classes, dtype=torch.float32)
        self.seen = torch.zeros(0, dtype=torch.bool)
        self.owner = torch.zeros(0, dtype=torch.int32)
        self._prev_table, self._prev_seen = self.table, self.seen
        self.epoch: Optional[int] = None  # the last epoch whose predictions the table holds

    def begin_epoch(self, epoch: int) -> None:
        self._prev_table, self._prev_seen = self.table.clone(), self.seen.clone()
        self.epoch = epoch

    def lookup(self, indices: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The previous epoch's ``(probabilities, seen)`` of ``indices`` (on the indices' device); rows beyond the
        table are unseen."""
        idx = indices.long().cpu()
        known = idx < self._prev_table.shape[0]
        probs = torch.zeros(idx.shape[0], self.num_classes)
        seen = torch.zeros(idx.shape[0], dtype=torch.bool)
        probs[known] = self._prev_table[idx[known]]
        seen[known] = self._prev_seen[idx[known]]
        return probs.to(indices.device), seen.to(indices.device)

    @torch.no_grad()
    def update(self, indices: torch.Tensor, probs: torch.Tensor) -> None:
        """Store ``probs`` (N, K) for ``indices`` (N,) of every rank."""
        if probs.shape != (indices.shape[0], self.num_classes):
            raise ValueError(f'PS-KD: {tuple(probs.shape)} predictions for {indices.shape[0]} indices and '
                             f'{self.num_classes} classes')
        gathered_idx = all_gather_cat(indices.long().view(-1)).cpu()
        gathered = all_gather_cat(probs.detach().float()).cpu()
        ranks = all_gather_cat(torch.full((indices.shape[0],), get_rank(), dtype=torch.int32,
                                          device=indices.device)).cpu()
        if gathered_idx.numel() and gathered_idx.min() < 0:
            raise ValueError('PS-KD: negative sample index in the batch')
        need = int(gathered_idx.max()) + 1 if gathered_idx.numel() else 0
        if need > self.table.shape[0]:
            grow = need - self.table.shape[0]
            self.table = torch.cat([self.table, torch.zeros(grow, self.num_classes)])
            self.seen = torch.cat([self.seen, torch.zeros(grow, dtype=torch.bool)])
            self.owner = torch.cat([self.owner, torch.full((grow,), -1, dtype=torch.int32)])
        self.table[gathered_idx] = gathered
        self.seen[gathered_idx] = True
        self.owner[gathered_idx] = ranks

    def state_dict(self) -> Dict[str, Any]:
        return {'epoch': self.epoch, 'table': self.table, 'seen': self.seen, 'owner': self.owner}

    def load_state_dict(self, state: Dict[str, Any], source: str = 'state') -> None:
        table, seen = state.get('table'), state.get('seen')
        if (not torch.is_tensor(table) or table.ndim != 2 or table.shape[1] != self.num_classes
                or not torch.is_tensor(seen) or seen.shape != table.shape[:1]):
            shape = tuple(table.shape) if torch.is_tensor(table) else None
            raise ValueError(f'{source}: PS-KD predictions of shape {shape}, expected (samples, {self.num_classes}) '
                             f'with a matching seen mask')
        self.table = table.float().clone()
        self.seen = seen.bool().clone()
        owner = state.get('owner')
        self.owner = (owner.int().clone() if torch.is_tensor(owner) and owner.shape == seen.shape
                      else torch.where(self.seen, 0, -1).int())
        self._prev_table, self._prev_seen = self.table, self.seen
        self.epoch = None if state.get('epoch') is None else int(state['epoch'])

    def save(self, path: str) -> None:
        """Write the state atomically (a temporary file renamed over ``path``)."""
        with atomic_write(path, 'wb') as f:
            torch.save(self.state_dict(), f)

    def load(self, path: str) -> None:
        self.load_state_dict(torch.load(path, map_location='cpu', weights_only=True), source=path)


class PsKdTask(ClassificationTask):
    """PS-KD: soft-target cross-entropy on ``pskd_targets``; ``target`` is ``(labels, sample indices)``.

    Returns ``loss``, ``output``, ``loss_ce`` (the hard-label cross-entropy, for monitoring). train.py calls
    ``start_epoch(epoch, num_epochs, output_dir)`` before every epoch (``output_dir`` only on rank 0, which writes the
    store when the checkpoint saver calls :meth:`get_task_state`); ``--resume`` reloads the store named in the
    checkpoint's task state from ``resume_dir``.
    """

    def __init__(self, model: nn.Module, num_classes: int, alpha_T: float = 0.8,
                 resume_dir: str = '', device: Optional[torch.device] = None, verbose: bool = True):
        super().__init__(model, criterion=nn.CrossEntropyLoss(), device=device, verbose=verbose)
        if not 0.0 <= alpha_T <= 1.0:
            raise ValueError(f'PS-KD: alpha_T (--pskd-alpha) must lie in [0, 1], got {alpha_T}')
        self.alpha_T = float(alpha_T)
        self.alpha = 0.0
        self.store = PredictionStore(num_classes)
        self.resume_dir = resume_dir
        self.output_dir: Optional[str] = None
        self._saved: Optional[str] = None
        if verbose:
            _logger.info(f'PsKdTask: alpha_T={alpha_T}; two float32 tables of (training samples x {num_classes}) '
                         f'predictions in memory')

    def start_epoch(self, epoch: int, num_epochs: int, output_dir: Optional[str] = None) -> None:
        if self.store.epoch is not None and self.store.epoch != epoch - 1:
            _logger.warning(f'PS-KD: epoch {epoch} starts from the predictions of epoch {self.store.epoch}')
        elif self.store.epoch is None and epoch > 0:
            _logger.warning(f'PS-KD: epoch {epoch} starts without stored predictions (no --resume of a PS-KD run): '
                            f'samples are trained on their labels until they have a prediction')
        self.alpha = pskd_alpha(self.alpha_T, epoch, num_epochs)
        self.output_dir = output_dir
        self.store.begin_epoch(epoch)

    def forward(self, input: torch.Tensor, target) -> Dict[str, torch.Tensor]:
        if not isinstance(target, (tuple, list)) or len(target) != 2:
            raise ValueError('--method pskd needs (labels, sample indices) targets: its dataset wrapper '
                             '(dr.methods.pskd.IndexedDataset) was not applied')
        labels, indices = target
        logits = self.trainable_module(input)
        previous, seen = self.store.lookup(indices)
        soft = pskd_targets(labels, previous.to(logits.device), seen.to(logits.device), self.alpha)
        loss = soft_cross_entropy(logits, soft)
        self.store.update(indices, F.softmax(logits.detach().float(), dim=1))
        return {'loss': loss, 'output': logits, 'loss_ce': F.cross_entropy(logits.detach().float(), labels.long())}

    # --- the store travels with the checkpoints ---------------------------------------------------------------
    def get_task_state(self, module: Optional[nn.Module] = None, ema: bool = False) -> Dict[str, Any]:
        if ema or self.output_dir is None or self.store.epoch is None:
            return {}
        name = f'{STORE_PREFIX}{self.store.epoch}.pt'
        self.store.save(os.path.join(self.output_dir, name))
        for old in os.listdir(self.output_dir):  # keep this epoch's and the previous epoch's file
            if old.startswith(STORE_PREFIX) and old.endswith('.pt') and old not in (
                    name, f'{STORE_PREFIX}{self.store.epoch - 1}.pt'):
                os.remove(os.path.join(self.output_dir, old))
        return {'pskd_store': name, 'pskd_epoch': self.store.epoch}

    def load_task_state(self, state: Optional[Dict[str, Any]], strict: bool = True, module: Optional[nn.Module] = None,
                        ema: bool = False) -> None:
        if ema:
            return
        if not state or 'pskd_store' not in state:
            _logger.warning('PS-KD: the resumed checkpoint holds no PS-KD predictions; they start afresh')
            return
        path = os.path.join(self.resume_dir, os.path.basename(str(state['pskd_store'])))
        if not os.path.isfile(path):
            raise FileNotFoundError(f'--resume: the PS-KD predictions {path} of this checkpoint are missing')
        self.store.load(path)
        _logger.info(f'PS-KD: loaded the predictions of epoch {self.store.epoch} from {path}')


def wrap_train_data(args: argparse.Namespace, dataset: Dataset, transform):
    """The training dataset returns sample indices."""
    return IndexedDataset(dataset), transform


def create_task(args: argparse.Namespace, model: nn.Module, criterion: nn.Module, device: torch.device) -> PsKdTask:
    """``--method pskd`` (``criterion`` is unused: PS-KD's loss is the soft-target cross-entropy)."""
    resume_dir = os.path.dirname(os.path.abspath(args.resume)) if args.resume else ''
    return PsKdTask(model, num_classes=args.num_classes, alpha_T=args.pskd_alpha,
                    resume_dir=resume_dir, device=device, verbose=args.rank == 0)
