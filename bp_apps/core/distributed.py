"""Data-parallel training for the hand-written engine.

DDP averages gradients through autograd hooks, and refuses a model none of whose parameters requires a gradient,
which is what an engine-backend model is. ``EngineDDPStrategy`` (in :mod:`bp_apps.core.internals`, registered as
``ddp_engine``) sets up the process group and samplers exactly as DDP does and leaves such a model unwrapped; the
engine's training step then averages its own gradients with :func:`data_parallel_mean`.
Models with autograd parameters are wrapped in DDP as usual.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from bp_apps.core.internals import EngineDDPStrategy, disable_distributed_sampler

__all__ = ["EngineDDPStrategy", "data_parallel_mean", "shard_by_process"]


def data_parallel_mean() -> Callable[[list[Tensor]], None] | None:
    """Under data parallel training (``torch.distributed`` with more than one process), a function that replaces
    each engine gradient by its mean over the processes, which is what DDP does for autograd models; else None.
    Without it each process would train its own copy of the hand-written MLP."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    world = dist.get_world_size()

    def mean(grads: list[Tensor]) -> None:
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= world
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    return mean


def shard_by_process(trainer: object | None) -> tuple[int, int]:
    """``(num_replicas, rank)`` for a batch sampler that shards the data across processes itself.

    Lightning would otherwise try to inject its ``DistributedSampler`` into the custom batch sampler (and raise), so
    under several processes it is told not to: the same as ``Trainer(use_distributed_sampler=False)``, for the
    loaders of this data module only."""
    if trainer is None or getattr(trainer, "world_size", 1) <= 1:
        return 1, 0
    disable_distributed_sampler(trainer)
    return trainer.world_size, trainer.global_rank  # type: ignore[attr-defined]
