"""Every reach into private Lightning and torch API, in one place (Lightning 2.6.x, torch 2.11).

Each piece says why no public route exists. Check them on a Lightning or torch upgrade: ``tests/test_resume.py``,
``tests/test_resume_tasks.py`` and ``tests/test_ddp.py`` exercise all of them.
"""

from __future__ import annotations

import functools
import importlib
import itertools
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelSummary, RichModelSummary
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.utilities.model_summary.model_summary import ModelSummary as LightningSummary
from torch import nn
from torch.utils.data import DataLoader

from bp_apps.core.datalink import LINKED
from bp_apps.core.io import load_checkpoint_dict

__all__ = [
    "EngineAwareModelSummary",
    "EngineAwareRichModelSummary",
    "EngineDDPStrategy",
    "SkippingIndexSampler",
    "checkpoint_is_data_cli",
    "disable_distributed_sampler",
    "reload_loader_states",
    "unique_file_tensorboard_logger",
]


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


@functools.cache
def checkpoint_is_data_cli() -> type:
    """LightningCLI for which a ``--ckpt_path`` checkpoint is data, never configuration or code (see the class)."""
    from lightning.pytorch.cli import LightningCLI

    from bp_apps.core.task import check_task

    class CheckpointIsDataCLI(LightningCLI):
        """LightningCLI for which a ``--ckpt_path`` checkpoint is data, never configuration or code.

        Lightning 2.6's private ``_parse_ckpt_path`` (there is no public switch) merges the checkpoint's
        ``hyper_parameters``, ``_class_path`` included, over the parsed config before anything is built: the
        checkpoint's values silently beat the user's config and command line, a checkpoint of another task is half
        restored before failing, and a crafted class path makes jsonargparse import any module. Here the file is read
        with ``weights_only=True`` (a damaged or payload-carrying file is refused, naming it), its task is checked
        against the configured model class before anything is restored, and hyperparameters that differ from the
        config's are reported; the config stays as the user gave it."""

        def _parse_ckpt_path(self) -> None:
            subcommand = self.config.get("subcommand")
            ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
            if not ckpt_path or not Path(ckpt_path).is_file():
                return  # "last", "best", ... or a missing file: Lightning's own handling and message
            source = f"--ckpt_path {ckpt_path}"
            try:
                checkpoint = load_checkpoint_dict(ckpt_path)
            except ValueError as error:  # its message starts with the path
                raise ValueError(f"--ckpt_path {error}") from None
            model = self.config[subcommand].get("model")
            class_path = getattr(model, "class_path", None)
            model_class = None
            if class_path:
                module_name, _, name = class_path.rpartition(".")
                model_class = getattr(importlib.import_module(module_name), name, None)  # the user's config names it
            accepted = getattr(model_class, "accepted_tasks", None)
            if callable(accepted):
                check_task(checkpoint, accepted(), source, getattr(model_class, "task_title", "a task's"))
            saved = checkpoint.get("hyper_parameters") or {}
            given = model.init_args.as_dict() if getattr(model, "init_args", None) is not None else {}
            compared = saved.keys() & given.keys() - set(LINKED)  # linked values come from the data, not the config
            differing = sorted(k for k in compared if not k.startswith("_")
                               and json.dumps(saved[k], sort_keys=True, default=str)
                               != json.dumps(given[k], sort_keys=True, default=str))
            if differing:
                print(f"{source}: the checkpoint was trained with other values of {', '.join(differing)}; the config's "
                      "and command line's are used (Lightning would have taken the checkpoint's)", file=sys.stderr)

    return CheckpointIsDataCLI


class _EngineAwareSummary:
    """Lightning's model summary, with an engine network's weights counted as trainable: they train by the
    hand-written backward, so none requires grad, and Lightning's count (``requires_grad`` parameters) says 0.
    Lightning 2.6 builds the summary object in the private ``ModelSummary._summary``."""

    def _summary(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Any:
        summary = super()._summary(trainer, pl_module)  # type: ignore[misc]
        if getattr(pl_module, "engine", False) and isinstance(summary, LightningSummary):
            summary.__class__ = _EngineSummary
        return summary


class EngineAwareModelSummary(_EngineAwareSummary, ModelSummary):
    """Lightning's ``ModelSummary`` counting an engine network's weights as trainable."""


class EngineAwareRichModelSummary(_EngineAwareSummary, RichModelSummary):
    """Lightning's ``RichModelSummary`` (next to Rich's progress bar) counting an engine network's weights as
    trainable."""


class _EngineSummary(LightningSummary):
    @property
    def trainable_parameters(self) -> int:
        return self.total_parameters
