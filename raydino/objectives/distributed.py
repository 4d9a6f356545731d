"""Reductions over training workers, each the identity without a process group.

The one place that talks to ``torch.distributed``: centering statistics, the loss that
every worker must agree on, and the Sinkhorn normalisation all reduce through here.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def all_reduce_sum(x: Tensor) -> Tensor:
    """Sum over workers (on a copy)."""
    if is_distributed():
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def all_reduce_max(x: Tensor) -> Tensor:
    """Elementwise maximum over workers (on a copy)."""
    if is_distributed():
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


def global_mean(x: Tensor) -> Tensor:
    """Mean over workers of a tensor every worker holds (a scalar loss, say), in float32."""
    return all_reduce_sum(x.float()) / world_size()


def global_batch_mean(x: Tensor) -> Tensor:
    """Mean over the rows of x across all workers, weighting every sample equally."""
    total = all_reduce_sum(torch.cat([x.sum(dim=0), x.new_tensor([x.shape[0]])]))
    return total[:-1] / total[-1]
