"""Every reach into private Lightning and torch API, in one place (Lightning 2.6.x, torch 2.11).

Each piece says why no public route exists. Check them on a Lightning or torch upgrade: ``tests/test_resume.py``,
``tests/test_resume_tasks.py`` and ``tests/test_ddp.py`` exercise all of them.
"""

from __future__ import annotations

import functools
import itertools
import os
from collections.abc import Iterator
from typing import Any

import lightning as L
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from torch import nn
from torch.utils.data import DataLoader

__all__ = ["EngineDDPStrategy", "SkippingIndexSampler", "disable_distributed_sampler", "reload_loader_states",
           "unique_file_tensorboard_logger"]


class _SkipFirst:
    """An index sampler without its first ``skip()`` batches."""

    def __init__(self, inner: Any, skip: Any) -> None:
        self.inner, self.skip = inner, skip

    def __iter__(self) -> Iterator[Any]:
        return itertools.islice(iter(self.inner), self.skip(), None)

    def __len__(self) -> int:
        return len(self.inner)


class SkippingIndexSampler(DataLoader):
    """A DataLoader that leaves out the first ``_skip`` batches by index, before anything is loaded.

    torch 2.11: ``DataLoader`` iterates the private ``_index_sampler`` property for indices. Wrapping the sampler
    or batch sampler given to ``__init__`` instead would break Lightning's re-instantiation of loaders (distributed
    sampler injection re-creates a custom batch sampler from its constructor arguments)."""

    _skip = 0

    @property
    def _index_sampler(self) -> Any:
        return _SkipFirst(super()._index_sampler, lambda: self._skip)


def reload_loader_states(trainer: L.Trainer) -> None:
    """Give the training loaders their position from the checkpoint of a resumed fit.

    Lightning 2.6 restores loader states when it sets up the training data; a module whose
    ``configure_optimizers`` reads ``trainer.estimated_stepping_batches`` (the schedule's length) makes that happen
    before the checkpoint's loop state is loaded, and the positions are dropped. ``_load_combined_loader_states``
    is the fit loop's own (private) way to apply them; there is no public one."""
    fit_loop = trainer.fit_loop
    if fit_loop.restarting:
        fit_loop._load_combined_loader_states()


def disable_distributed_sampler(trainer: Any) -> None:
    """Tell Lightning not to inject its ``DistributedSampler`` into this data module's loaders, which shard the
    data themselves: the effect of ``Trainer(use_distributed_sampler=False)``, for one data module. Lightning 2.6
    keeps that setting only on the private accelerator connector."""
    trainer._accelerator_connector.use_distributed_sampler = False


class EngineDDPStrategy(DDPStrategy):
    """DDP that leaves a model without trainable autograd parameters (the engine backend) unwrapped.

    ``DistributedDataParallel`` refuses a module none of whose parameters requires a gradient, which is what an
    engine network is; Lightning 2.6 wraps the model in the private ``_setup_model``. The engine averages its own
    gradients (``bp_apps.core.distributed.data_parallel_mean``). Models with autograd parameters are wrapped as
    usual."""

    strategy_name = "ddp_engine"

    def _setup_model(self, model: nn.Module) -> nn.Module:
        if not any(p.requires_grad for p in model.parameters()):
            return model
        return super()._setup_model(model)


if "ddp_engine" not in StrategyRegistry:
    StrategyRegistry.register("ddp_engine", EngineDDPStrategy,
                              description="DDP that also trains the hand-written engine")


@functools.cache
def unique_file_tensorboard_logger() -> type:
    """Lightning's ``TensorBoardLogger`` with a unique name for every event file it opens.

    tensorboardX (the writer Lightning 2.6 uses when ``tensorboard`` is not installed) names an event file by the
    second and the host only and opens it with "wb", so the writer reopened for the test after ``fit`` (within the
    same second on a fast run) would overwrite the fit's curves. ``filename_suffix`` is a public writer argument,
    but Lightning passes the one given at construction to every writer it opens; the private ``_kwargs`` and
    ``_experiment`` are where it keeps them, so a new suffix is set before each opening and a finalized writer is
    dropped, not reopened."""
    from lightning.pytorch.loggers import TensorBoardLogger

    counter = itertools.count()

    class UniqueFileTensorBoardLogger(TensorBoardLogger):
        @property
        def experiment(self) -> Any:
            if self._experiment is None:
                self._kwargs["filename_suffix"] = f".{os.getpid()}.{next(counter)}"
            return super().experiment

        def finalize(self, status: str) -> None:
            super().finalize(status)
            self._experiment = None

    return UniqueFileTensorBoardLogger
