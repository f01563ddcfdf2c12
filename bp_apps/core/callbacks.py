"""Callbacks every task can take from its configuration: ``metrics.json`` and the best/last checkpoints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch

from bp_apps.core.io import atomic_write_text

__all__ = ["MetricsJsonCallback", "best_checkpoint_callback", "best_checkpoint_callbacks"]


class MetricsJsonCallback(L.Callback):
    """Write a run's final validation and test metrics to ``metrics.json`` in its log directory
    (atomically) and print the path, so every run leaves one small machine-readable summary."""

    def __init__(self) -> None:
        self.metrics: dict[str, Any] = {"validation": {}, "test": {}}

    def extra(self, trainer: L.Trainer) -> dict[str, Any]:
        """More entries for the summary (subclasses add task-specific ones)."""
        return {}

    @staticmethod
    def path(trainer: L.Trainer) -> Path:
        return Path(trainer.log_dir or trainer.default_root_dir) / "metrics.json"

    def _scalars(self, trainer: L.Trainer, prefix: str) -> dict[str, float]:
        return {k: float(v) for k, v in trainer.callback_metrics.items()
                if k.startswith(prefix) and torch.is_tensor(v) and v.numel() == 1}

    def _write(self, trainer: L.Trainer) -> None:
        path = self.path(trainer)  # trainer.log_dir is a broadcast: every process must ask, not only rank 0
        if not trainer.is_global_zero:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        # A test after fit in the same log directory adds its section to what fit wrote.
        previous = json.loads(path.read_text()) if path.exists() else {}
        sections = {k: v or previous.get(k, {}) for k, v in self.metrics.items()}
        summary = {**previous, **sections, **self.extra(trainer), "global_step": trainer.global_step,
                   "epochs_completed": trainer.current_epoch}
        callback = best_checkpoint_callback(trainer)
        if callback is not None and getattr(callback, "best_model_path", ""):
            summary["best_checkpoint"] = callback.best_model_path
            if callback.monitor and callback.best_model_score is not None:
                summary[f"best_{callback.monitor}"] = float(callback.best_model_score)
        atomic_write_text(path, json.dumps(summary, indent=2) + "\n")
        print(f"metrics written to {path}")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.metrics["validation"] = self._scalars(trainer, "val_")
            if trainer.state.fn == "validate":  # `bp-apps validate` leaves its figures too
                self._write(trainer)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.metrics["test"] = self._scalars(trainer, "test_")
        self._write(trainer)


def best_checkpoint_callback(trainer: L.Trainer) -> L.Callback | None:
    """The checkpoint callback that keeps the best weights (the first with a monitor), else Lightning's first one:
    a step checkpoint added on the command line must not take its place."""
    monitored = [c for c in trainer.checkpoint_callbacks if getattr(c, "monitor", None)]
    return monitored[0] if monitored else trainer.checkpoint_callback


def best_checkpoint_callbacks(trainer: L.Trainer, monitor: str = "val_acc", mode: str = "max",
                              patience: int | None = None) -> list[L.Callback]:
    """Best-checkpoint saving on ``monitor`` plus an up-to-date ``last.ckpt`` (when the trainer saves
    checkpoints at all) and, with ``patience``, early stopping on it."""
    from lightning.pytorch.callbacks import EarlyStopping

    callbacks: list[L.Callback] = []
    if trainer.checkpoint_callback is not None:
        callbacks.append(_best_and_last_checkpoint(monitor, mode))
    if patience is not None:
        callbacks.append(EarlyStopping(monitor=monitor, mode=mode, patience=patience))
    return callbacks


def _best_and_last_checkpoint(monitor: str, mode: str) -> L.Callback:
    from lightning.pytorch.callbacks import ModelCheckpoint

    class BestAndLastCheckpoint(ModelCheckpoint):
        """The best checkpoint by ``monitor``, and ``last.ckpt`` after every validation.

        Lightning 2.6 rewrites ``last.ckpt`` only when it also writes a new best one, so after
        the metric stops improving ``last.ckpt`` would hold stale weights (wrong for resuming).
        """

        def load_state_dict(self, state_dict: dict[str, Any]) -> None:
            """A fit resumed into a new log folder keeps the best score and files found so far; Lightning would
            drop the score when the folder changes, and the next validation would then pass for the best."""
            super().load_state_dict({**state_dict, "dirpath": self.dirpath})

        def _refresh_last(self, trainer: L.Trainer) -> None:
            if not self._should_skip_saving_checkpoint(trainer):  # nothing saved at this step yet
                self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

        def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            super().on_train_epoch_end(trainer, pl_module)
            if self._should_save_on_train_epoch_end(trainer):
                self._refresh_last(trainer)

        def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            super().on_validation_end(trainer, pl_module)
            if not self._should_save_on_train_epoch_end(trainer):
                self._refresh_last(trainer)

    return BestAndLastCheckpoint(monitor=monitor, mode=mode, save_last=True,
                                 filename=f"best-{{epoch}}-{{{monitor}:.4f}}")
