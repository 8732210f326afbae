"""Small torch.distributed helpers that also work (as no-ops) in a single process."""
import logging
from typing import Any, List, Optional

import torch
import torch.distributed as dist

_logger = logging.getLogger(__name__)


def is_distributed() -> bool:
    """True when torch.distributed is available and a process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Rank of this process (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


@torch.no_grad()
def all_gather_cat(t: torch.Tensor, check: bool = False) -> torch.Tensor:
    """Concatenate ``t`` from all ranks along dim 0 (rank order). No gradient flows through the result.

    Every rank must pass a tensor of the same shape and dtype. With one process, ``t`` itself is returned
    (detached).

    Args:
        t: the local tensor.
        check: first gather the shapes and raise a clear error when they differ (one extra small collective and
            a host sync, so callers check once rather than every step).

    Raises:
        ValueError: with ``check=True``, when the shapes differ across ranks.
    """
    t = t.detach()
    world_size = get_world_size()
    if world_size == 1:
        return t
    t = t.contiguous()
    if check:
        shape = torch.tensor([t.ndim] + list(t.shape) + [0] * (8 - t.ndim), device=t.device, dtype=torch.long)
        shapes = [torch.zeros_like(shape) for _ in range(world_size)]
        dist.all_gather(shapes, shape)
        if any(not torch.equal(s, shape) for s in shapes):
            found = [tuple(s[1:1 + int(s[0])].tolist()) for s in shapes]
            raise ValueError(
                f'all_gather_cat needs the same tensor shape on every rank, got {found} (rank order); '
                f'use all_gather_varlen for differing row counts')
    out = [torch.empty_like(t) for _ in range(world_size)]
    dist.all_gather(out, t)
    return torch.cat(out, dim=0)


@torch.no_grad()
def all_gather_varlen(t: torch.Tensor, device: Optional[torch.device] = None) -> torch.Tensor:
    """Like :func:`all_gather_cat` but the number of rows (dim 0) may differ across ranks.

    Rows are padded to the largest count for the collective and the padding is removed again. Boolean tensors
    travel as uint8. ``device`` moves ``t`` first (e.g. to the CUDA device NCCL needs); the result stays there.
    """
    t = t.detach()
    world_size = get_world_size()
    if world_size == 1:
        return t
    if device is not None:
        t = t.to(device)
    if t.dtype == torch.bool:
        return all_gather_varlen(t.to(torch.uint8)).to(torch.bool)
    t = t.contiguous()
    n = torch.tensor([t.shape[0]], device=t.device, dtype=torch.long)
    counts = [torch.zeros_like(n) for _ in range(world_size)]
    dist.all_gather(counts, n)
    sizes: List[int] = [int(c.item()) for c in counts]
    max_n = max(sizes)
    if t.shape[0] < max_n:
        pad = torch.zeros((max_n - t.shape[0],) + tuple(t.shape[1:]), device=t.device, dtype=t.dtype)
        t = torch.cat([t, pad], dim=0)
    out = [torch.empty_like(t) for _ in range(world_size)]
    dist.all_gather(out, t)
    return torch.cat([o[:s] for o, s in zip(out, sizes)], dim=0)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Broadcast a picklable Python object from rank ``src`` (returns ``obj`` unchanged in one process)."""
    if get_world_size() == 1:
        return obj
    holder = [obj if get_rank() == src else None]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]
