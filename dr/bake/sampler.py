"""Class-aware sampling for BAKE: every anchor image is followed by ``M`` other images of its class.

Per epoch every dataset index appears once as an *anchor* (padded/truncated to split evenly over the ranks, as
``DistributedSampler`` does), so one epoch yields ``(1 + M) x len(dataset)`` images in groups of ``1 + M``
consecutive indices. ``-b/--batch-size`` counts all images of a batch, so it must be a multiple of ``1 + M``
(:func:`check_batch_size`); a batch of ``b`` images holds ``b / (1 + M)`` anchors.
"""
import logging
from typing import Any, Dict, Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

from ..distributed import get_rank, get_world_size

_logger = logging.getLogger(__name__)


def check_batch_size(batch_size: int, num_intra: int, flag: str = '--bake-intra') -> None:
    """Raise ``ValueError`` unless ``batch_size`` is a positive multiple of ``1 + num_intra``.

    Groups (anchor + ``num_intra`` images of the same class) must not straddle batches. ``flag`` names the option
    that set ``num_intra`` in the message (``--bake-intra`` or ``--class-aware-intra``).
    """
    if num_intra < 0:
        raise ValueError(f'{flag} must be >= 0, got {num_intra}')
    group = 1 + num_intra
    if batch_size <= 0 or batch_size % group != 0:
        lower = max(group, batch_size // group * group)
        raise ValueError(
            f'-b/--batch-size {batch_size} must be a multiple of 1 + {flag} = {group} (each anchor image comes '
            f'with {flag} {num_intra} image(s) of its class and a group must not be split across batches); '
            f'use e.g. -b {lower} or -b {lower + group}')


class ClassAwareSampler(Sampler[int]):
    """Yields groups of ``1 + num_intra`` indices of one class: an anchor, then ``num_intra`` of its class mates.

    Args:
        labels: integer class label of every dataset index.
        num_intra: ``M``, other images of the anchor's class per anchor (``--bake-intra``).
        num_replicas: number of ranks (default: torch.distributed world size, else 1).
        rank: this rank (default: torch.distributed rank, else 0).
        shuffle: permute the anchors each epoch (``torch.randperm`` seeded with ``seed + epoch``); else natural order.
        seed: base seed, the same on every rank.
        drop_last: truncate the anchors to a multiple of ``num_replicas`` instead of padding by repeating the first
            anchors of the epoch's order.

    Anchors: rank ``r`` takes positions ``r, r + R, r + 2R, ...`` of the epoch's (padded) anchor order, so the
    ranks' anchors are disjoint and their union is the dataset (plus at most ``R - 1`` repeats when padding).

    Class mates: drawn without replacement from the anchor's class minus the anchor; with replacement only when
    the class has fewer than ``M + 1`` images; a singleton class repeats the anchor. The draws for the anchor at
    position ``p`` of the epoch's order use row ``p`` of a uniform table generated from ``(seed, epoch)``
    (numpy PCG64), so they are identical on every rank and after resuming (``state_dict`` holds seed and epoch).
    """

    def __init__(
            self,
            labels: Sequence[int],
            num_intra: int = 1,
            num_replicas: Optional[int] = None,
            rank: Optional[int] = None,
            shuffle: bool = True,
            seed: int = 0,
            drop_last: bool = False,
    ):
        labels = np.asarray(labels)
        if labels.ndim != 1 or labels.size == 0:
            raise ValueError(f'ClassAwareSampler needs a non-empty 1-D list of labels, got shape {labels.shape}')
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f'ClassAwareSampler labels must be integers, got dtype {labels.dtype}')
        if num_intra < 0:
            raise ValueError(f'--bake-intra (num_intra) must be >= 0, got {num_intra}')
        num_replicas = get_world_size() if num_replicas is None else int(num_replicas)
        rank = get_rank() if rank is None else int(rank)
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f'ClassAwareSampler: invalid rank {rank} for num_replicas {num_replicas}')
        self.num_intra = int(num_intra)
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.seed = int(seed)
        self.drop_last = drop_last
        self.epoch = 0

        n = labels.size
        if drop_last and n < num_replicas:
            raise ValueError(f'ClassAwareSampler: {n} images cannot be split over {num_replicas} ranks with drop_last')
        self.num_anchors = n // num_replicas if drop_last else -(-n // num_replicas)  # per rank
        self.total_anchors = self.num_anchors * num_replicas

        # Group indices by class: members of class c are order[start[i]:start[i] + count[i]] (ascending indices).
        self._labels = labels.astype(np.int64)
        self._order = np.argsort(self._labels, kind='stable')
        classes, first, counts = np.unique(self._labels[self._order], return_index=True, return_counts=True)
        class_pos = np.searchsorted(classes, self._labels)
        self._class_start = first[class_pos]  # per index: where its class starts in _order
        self._class_count = counts[class_pos]  # per index: size of its class
        rank_in_class = np.empty(n, dtype=np.int64)
        rank_in_class[self._order] = np.arange(n) - np.repeat(first, counts)
        self._rank_in_class = rank_in_class
        self.num_classes = len(classes)
        small = int((counts < self.num_intra + 1).sum())
        if small and self.num_intra:
            _logger.info(
                f'ClassAwareSampler: {small} of {len(classes)} classes have fewer than {self.num_intra + 1} images; '
                f'their class mates are drawn with replacement (singletons repeat the anchor)')

    def __len__(self) -> int:
        return self.num_anchors * (1 + self.num_intra)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def state_dict(self) -> Dict[str, Any]:
        return {'epoch': self.epoch, 'seed': self.seed}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        missing = {'epoch', 'seed'} - set(state)
        if missing:
            raise KeyError(f'ClassAwareSampler state is missing {sorted(missing)}')
        self.epoch = int(state['epoch'])
        self.seed = int(state['seed'])

    def anchor_order(self) -> np.ndarray:
        """The epoch's anchor order over all ranks (padded or truncated to ``total_anchors``)."""
        n = self._labels.size
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=g).numpy()
        else:
            order = np.arange(n)
        if self.total_anchors > n:
            order = np.resize(order, self.total_anchors)  # repeats the order cyclically
        return order[:self.total_anchors]

    def _pal_uniforms(self) -> np.ndarray:
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, self.epoch, 0x6BA4E])))
        return rng.random((self.total_anchors, self.num_intra))

    def _draw_pals(self, anchors: np.ndarray, u: np.ndarray) -> np.ndarray:
        """Class mates ``(len(anchors), M)`` for ``anchors`` from uniforms ``u`` of the same shape."""
        m = self.num_intra
        count = self._class_count[anchors]
        others = count - 1
        r_anchor = self._rank_in_class[anchors]
        picks = np.zeros((len(anchors), m), dtype=np.int64)  # ranks within the class, anchor excluded (0..others-1)
        replace = others < m
        for j in range(m):
            # Without replacement: pick uniformly among the (others - j) ranks not chosen yet, then skip the earlier
            # picks in ascending order ("j-th unused" mapping). With replacement: uniform over all others.
            pool = np.where(replace, others, others - j)
            v = np.minimum((u[:, j] * np.maximum(pool, 1)).astype(np.int64), np.maximum(pool - 1, 0))
            if j:
                prev = np.sort(picks[:, :j], axis=1)
                for k in range(j):
                    v = np.where(~replace & (v >= prev[:, k]), v + 1, v)
            picks[:, j] = v
        # Map "rank among the others" to the class rank (skip the anchor), then to the dataset index.
        # A singleton class has no other member: its "class mate" is the anchor itself.
        ranks = np.where(others[:, None] > 0, picks + (picks >= r_anchor[:, None]), r_anchor[:, None])
        return self._order[self._class_start[anchors][:, None] + ranks]

    def __iter__(self) -> Iterator[int]:
        order = self.anchor_order()
        positions = np.arange(self.rank, self.total_anchors, self.num_replicas)
        anchors = order[positions]
        if self.num_intra == 0:
            return iter(anchors.tolist())
        u = self._pal_uniforms()[positions]
        pals = self._draw_pals(anchors, u)
        groups = np.concatenate([anchors[:, None], pals], axis=1)
        return iter(groups.reshape(-1).tolist())
