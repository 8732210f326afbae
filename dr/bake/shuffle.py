"""Shuffling BN (BAKE Table 15; MoCo's shuffle BN, He et al. 2020) for DistributedDataParallel.

The class-aware sampler puts an anchor and its class mates into the same per-process batch, so per-process BatchNorm
statistics come from few classes. Shuffling BN gathers the batches of all processes, permutes the global batch with
one permutation shared by every rank (drawn on rank 0 and broadcast, as MoCo does), lets each rank forward its slice
of the permuted batch (so its BatchNorm sees samples from every process), and restores the original order of
anything gathered afterwards (:meth:`BatchShuffle.unshuffle`). Nothing here carries a gradient: the inputs need none,
and BAKE's targets are constants.
"""
from dataclasses import dataclass
from typing import Tuple

import torch
import torch.distributed as dist

from ..distributed import all_gather_cat, get_rank, get_world_size


@dataclass
class BatchShuffle:
    """One step's permutation of the global batch (``world_size`` slices of ``local_size`` rows, rank order).

    ``perm[k]`` is the original global row placed at shuffled position ``k``; rank ``r`` forwards shuffled positions
    ``r * local_size ... (r + 1) * local_size - 1``.
    """
    perm: torch.Tensor
    rank: int
    world_size: int
    local_size: int

    @property
    def local_rows(self) -> torch.Tensor:
        """Original global rows this rank forwards."""
        return self.perm[self.rank * self.local_size:(self.rank + 1) * self.local_size]

    def unshuffle(self, gathered: torch.Tensor) -> torch.Tensor:
        """Rows gathered from all ranks after the forward (shuffled order) back in the original global order."""
        out = torch.empty_like(gathered)
        out[self.perm.to(gathered.device)] = gathered
        return out

    def shuffle(self, original: torch.Tensor) -> torch.Tensor:
        """Global rows in the original order -> the shuffled order (inverse of :meth:`unshuffle`)."""
        return original[self.perm.to(original.device)]


@torch.no_grad()
def shuffle_batch(input: torch.Tensor, target: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, BatchShuffle]:
    """This rank's slice of the randomly permuted global batch: ``(input, target, shuffle)``.

    Every rank must pass the same number of rows (the training loaders drop incomplete batches). The permutation is
    drawn from rank 0's torch RNG and broadcast. In a single process the batch is returned unchanged with the
    identity permutation.
    """
    n = input.shape[0]
    world_size = get_world_size()
    rank = get_rank()
    if world_size == 1:
        return input, target, BatchShuffle(torch.arange(n, device=input.device), 0, 1, n)
    x_all = all_gather_cat(input, check=True)
    y_all = all_gather_cat(target)
    perm = torch.randperm(x_all.shape[0]).to(input.device)
    dist.broadcast(perm, src=0)
    shuffle = BatchShuffle(perm, rank, world_size, n)
    rows = shuffle.local_rows
    return x_all[rows], y_all[rows], shuffle
