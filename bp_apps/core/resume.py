"""Exact mid-epoch resume, shared by every task.

A run stopped in the middle of an epoch (an exception, SIGKILL, a pre-empted node) and restarted from its last
checkpoint must see the same batches and draw the same random numbers as an uninterrupted run. Three pieces:

* :class:`EpochShuffle` (or any sampler / batch sampler with ``set_epoch``): the order of an epoch depends on
  ``(seed, epoch)`` only, never on how many epochs this process has run.
* :class:`ResumableDataLoader`: records how many batches of the current pass were handed out (Lightning stores
  that in the checkpoint) and skips them on resume *by index*, without loading them. Random data augmentation
  run while loading (in ``__getitem__`` or ``collate_fn``) draws from a stream seeded by ``(seed, epoch, batch)``,
  so it is the same for a replayed batch and does not move the model's random stream (dropout, SpecAugment).
  Exact for ``num_workers=0``; worker processes have streams of their own.
* The model's CPU random state in the checkpoint (:func:`save_rng_state`), put back when training starts
  (:func:`restore_training_state`): :class:`ExactResume` does both for any LightningModule.
"""

from __future__ import annotations

import itertools
import os
import signal
from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor
from torch.utils.data import Dataset

from bp_apps.core.internals import SkippingIndexSampler, reload_loader_states
from bp_apps.core.samplers import MIX, EpochShuffle

RNG_KEY = "bp_apps_cpu_rng_state"
"""Checkpoint key holding ``torch.get_rng_state()`` at the time of saving."""

__all__ = ["RNG_KEY", "ExactResume", "FailAtStep", "ResumableDataLoader", "StepCheckpoint", "restore_training_state",
           "resumable_loader", "save_rng_state"]


class ResumableDataLoader(SkippingIndexSampler):
    """A DataLoader that Lightning can restore in the middle of an epoch (see the module's docstring).

    ``seed`` seeds the loader's own generator (so creating an iterator never draws from the global RNG) and the
    per-batch stream for loading-time augmentation. The sampler (or batch sampler) must replay an epoch from
    ``(seed, epoch)``: :class:`EpochShuffle`, or a bucket sampler with ``set_epoch``."""

    def __init__(self, *args: Any, seed: int = 0, **kwargs: Any) -> None:
        if kwargs.get("shuffle"):
            raise ValueError("ResumableDataLoader cannot replay shuffle=True (its order depends on how many epochs "
                             "the generator has run): pass sampler=EpochShuffle(len(dataset), seed)")
        kwargs.setdefault("generator", torch.Generator().manual_seed(seed))
        super().__init__(*args, **kwargs)
        self.seed = seed
        self._served = 0
        self._skip = 0

    def _epoch(self) -> int:
        for sampler in (self.batch_sampler, self.sampler, getattr(self.batch_sampler, "sampler", None)):
            if hasattr(sampler, "epoch"):
                return int(sampler.epoch)
        return 0

    def __iter__(self) -> Iterator[Any]:
        skip = self._skip
        base = (self.seed * MIX + self._epoch()) * MIX
        iterator = super().__iter__()  # starts after the skipped batches; _skip is read when the pass begins
        self._skip = 0
        self._served = skip
        for index in itertools.count(skip):
            with torch.random.fork_rng(devices=[]):
                if self.num_workers == 0:  # loading-time augmentation draws from this batch's own stream
                    torch.manual_seed((base + index) % (2**63))
                try:
                    batch = next(iterator)
                except StopIteration:
                    return
            self._served = index + 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"batches_served": self._served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Skip the batches the checkpoint's pass had served. A checkpoint written on a pass's last batch has
        served them all: Lightning then resumes with the next epoch, which starts from its first batch (skipping
        a whole pass there would silently drop an epoch)."""
        served = int(state.get("batches_served", 0))
        try:
            complete = served >= len(self)
        except TypeError:  # a sampler without a length: only a partial pass can be known
            complete = False
        self._skip = 0 if complete else served


def resumable_loader(dataset: Dataset, batch_size: int, seed: int, **kwargs: Any) -> ResumableDataLoader:
    """A shuffled training loader that resumes exactly: an :class:`EpochShuffle` over ``dataset``."""
    return ResumableDataLoader(dataset, batch_size=batch_size, sampler=EpochShuffle(len(dataset), seed), seed=seed,
                               **kwargs)


def save_rng_state(checkpoint: dict[str, Any]) -> None:
    """Store the CPU random state (dropout, masks) in a checkpoint."""
    checkpoint[RNG_KEY] = torch.get_rng_state()


def restore_training_state(trainer: L.Trainer, rng_state: Tensor | None) -> None:
    """At the start of a resumed fit: the loaders' positions and the random state saved with the checkpoint."""
    reload_loader_states(trainer)
    if rng_state is not None:
        torch.set_rng_state(rng_state)


class ExactResume(L.Callback):
    """Saves the CPU random state with every checkpoint and, when a fit resumes from one, restores it and the
    training loaders' positions, so the run continues as if it had never stopped. Only a resumed fit restores
    anything; loading a checkpoint for inference leaves the random state alone."""

    def __init__(self) -> None:
        self._pending: Tensor | None = None

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        save_rng_state(checkpoint)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        self._pending = checkpoint.get(RNG_KEY)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pending, self._pending = self._pending, None
        restore_training_state(trainer, pending)


class FailAtStep(L.Callback):
    """Fault injection for checking a resume set-up: at the end of training step ``step`` (before that step's
    checkpoint is written), raise a RuntimeError, or with ``kill=True`` end the process with SIGKILL."""

    def __init__(self, step: int, kill: bool = False) -> None:
        if step < 1:
            raise ValueError(f"step must be at least 1, got {step}")
        self.step, self.kill = step, kill

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            if self.kill:
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"injected fault at step {self.step}")


class StepCheckpoint(ModelCheckpoint):
    """``last-step.ckpt``, rewritten every ``every_n_train_steps`` training steps, to resume from mid-epoch.

    Add it on the command line (``--trainer.callbacks+=bp_apps.core.resume.StepCheckpoint
    --trainer.callbacks.every_n_train_steps=200``). Its file has its own name, so it never collides with the
    config's ``last.ckpt``, and its own class, so Lightning keeps it beside the config's checkpoint callbacks."""

    CHECKPOINT_NAME_LAST = "last-step"

    def __init__(self, dirpath: str | None = None, every_n_train_steps: int = 200) -> None:
        if every_n_train_steps < 1:
            raise ValueError(f"every_n_train_steps must be at least 1, got {every_n_train_steps}")
        super().__init__(dirpath=dirpath, every_n_train_steps=every_n_train_steps, save_top_k=0, save_last=True)
