"""Training/eval loader factories that keep every epoch reproducible from (seed, epoch, rank)."""
import logging
import random
from typing import Any, Callable, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

_logger = logging.getLogger(__name__)


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """A 63-bit seed derived from (seed, epoch, rank); the same triple always gives the same value."""
    ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch) & 0xFFFFFFFF, int(rank) & 0xFFFFFFFF])
    return int(ss.generate_state(2, dtype=np.uint32).astype(np.uint64).dot([1 << 31, 1]))


def seed_everything_for_epoch(seed: int, epoch: int, rank: int = 0) -> int:
    """Seed python, numpy and torch RNGs at the start of an epoch so a resumed run replays the same epoch."""
    s = epoch_seed(seed, epoch, rank)
    random.seed(s)
    np.random.seed(s % (1 << 32))
    torch.manual_seed(s)
    return s


class EpochLoader:
    """A DataLoader whose sampler and worker seeds are set from (seed, epoch, rank) by ``set_epoch``.

    Workers are not persistent, so each epoch's workers start from the generator's fresh base seed; with
    ``num_workers=0`` the transforms draw from the global RNGs, which ``seed_everything_for_epoch`` sets.
    """

    def __init__(self, loader: DataLoader, seed: int, rank: int = 0):
        self.loader = loader
        self.seed = seed
        self.rank = rank
        self.epoch = 0

    @property
    def sampler(self) -> Optional[Sampler]:
        return self.loader.sampler

    @property
    def dataset(self) -> Dataset:
        return self.loader.dataset

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        sampler = self.loader.sampler
        if hasattr(sampler, 'set_epoch'):
            sampler.set_epoch(epoch)
        self.loader.generator = torch.Generator().manual_seed(epoch_seed(self.seed, epoch, self.rank + 1000))

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        return iter(self.loader)


def set_loader_epoch(loader: Any, epoch: int) -> None:
    """Start epoch ``epoch`` of a loader: its own ``set_epoch``, else its sampler's / batch sampler's (timm's
    loaders: ``DistributedSampler``, ``RepeatAugSampler``, ``ScheduledBatchSampler``)."""
    if hasattr(loader, 'set_epoch'):
        loader.set_epoch(epoch)
        return
    for attr in ('batch_sampler', 'sampler'):
        sampler = getattr(loader, attr, None)
        if hasattr(sampler, 'set_epoch'):
            sampler.set_epoch(epoch)  # a ScheduledBatchSampler passes it on to its sampler
            return


class DeviceLoader:
    """Moves (input, target) batches to a device and optionally to channels-last memory format."""

    def __init__(self, loader: Any, device: torch.device, channels_last: bool = False):
        self.loader = loader
        self.device = device
        self.channels_last = channels_last

    def set_epoch(self, epoch: int) -> None:
        set_loader_epoch(self.loader, epoch)

    @property
    def sampler(self):
        return getattr(self.loader, 'sampler', None)

    @property
    def batch_sampler(self):
        return getattr(self.loader, 'batch_sampler', None)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        non_blocking = self.device.type == 'cuda'
        for batch in self.loader:
            x = batch[0].to(self.device, non_blocking=non_blocking)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            rest = [b.to(self.device, non_blocking=non_blocking) if torch.is_tensor(b) else b for b in batch[1:]]
            yield (x, *rest)


def create_train_loader(
        dataset: Dataset,
        transform: Callable,
        batch_size: int,
        sampler: Optional[Sampler] = None,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 42,
        num_workers: int = 2,
        pin_memory: bool = False,
        collate_fn: Optional[Callable] = None,
) -> EpochLoader:
    """Map-style training loader: seeded per-epoch shuffling (DistributedSampler unless ``sampler`` is given).

    Drops the last incomplete batch (as timm does) so every step has the full batch on every rank.
    """
    dataset.transform = transform
    if sampler is None:
        sampler = DistributedSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
    if len(sampler) < batch_size:
        raise ValueError(
            f'-b/--batch-size {batch_size} is larger than the {len(sampler)} training images this rank sees per epoch')
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=True,
        collate_fn=collate_fn,
        persistent_workers=False,
    )
    return EpochLoader(loader, seed=seed, rank=rank)


def resolve_input_size(data_config: dict) -> Tuple[int, int, int]:
    """(C, H, W) from a timm data config."""
    size: Sequence[int] = data_config['input_size']
    return int(size[0]), int(size[1]), int(size[2])
