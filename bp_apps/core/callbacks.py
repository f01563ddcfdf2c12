"""Callbacks the tasks take from their configuration: ``metrics.json`` and the best and last checkpoints.

The configs list them under ``trainer.callbacks``; :func:`task_callbacks` gives the same set to a ``Trainer`` built
by hand (tests, notebooks). Task-specific entries of ``metrics.json`` come from ``metrics_summary()`` methods of the
data module and the LightningModule, so one :class:`MetricsJson` serves every task.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, EarlyStopping, ModelCheckpoint

from bp_apps.core.io import atomic_write_text

__all__ = ["BestCheckpoint", "LastCheckpoint", "MetricsJson", "PredictionsJsonl", "best_checkpoint_callback",
           "report_dir", "task_callbacks"]


def report_dir(trainer: L.Trainer) -> Path | None:
    """The folder for a run's reports (``metrics.json``, confusion matrices, predictions): the first logger's
    folder, or None for a run without a logger, which then writes no report (never into the current folder, where
    Lightning's ``log_dir`` would point). Every process must call it (``log_dir`` is a broadcast under DDP)."""
    if not trainer.loggers:
        return None
    log_dir = trainer.log_dir
    return Path(log_dir) if log_dir else None


class PredictionsJsonl(BasePredictionWriter):
    """``predictions.jsonl`` in the run's log folder after ``predict``: one line per example, ``{"index": i,
    "prediction": ...}`` in the order of the data (a tensor row as a list, e.g. class probabilities; a string as
    it is), written atomically. Under several processes each writes ``predictions-rank<r>.jsonl`` for its share.
    Without a logger there is no log folder, and nothing is written."""

    def __init__(self) -> None:
        super().__init__(write_interval="epoch")

    def write_on_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, predictions: Any,
                           batch_indices: Any) -> None:
        folder = report_dir(trainer)
        if folder is None:
            return
        several = len(trainer.num_predict_batches) > 1  # then one list of batches per loader, and a "dataloader" key
        lines = []
        for loader, batches in enumerate(predictions if several else [predictions]):
            rows = [row for batch in batches for row in _prediction_rows(batch)]
            lines += [json.dumps({**({"dataloader": loader} if several else {}), "index": i, "prediction": row})
                      for i, row in enumerate(rows)]
        name = "predictions.jsonl" if trainer.world_size == 1 else f"predictions-rank{trainer.global_rank}.jsonl"
        path = folder / name
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, "".join(line + "\n" for line in lines))
        print(f"predictions written to {path}")


def _prediction_rows(batch: Any) -> list[Any]:
    """One JSON-ready value per example of a ``predict_step`` output (a batch-first tensor, or a list)."""
    if torch.is_tensor(batch):
        return batch.detach().cpu().tolist() if batch.dim() > 0 else [batch.item()]
    if isinstance(batch, (list, tuple)):
        return [item.detach().cpu().tolist() if torch.is_tensor(item) else item for item in batch]
    return [batch]


class MetricsJson(L.Callback):
    """Write a run's final validation and test metrics to ``metrics.json`` in the logger's folder (atomically) and
    print the path, so every run leaves one small machine-readable summary. A run without a logger writes nothing
    (never into the current folder). The data module's and the module's ``metrics_summary()`` add their entries."""

    def __init__(self) -> None:
        self.metrics: dict[str, Any] = {"validation": {}, "test": {}}

    @staticmethod
    def path(trainer: L.Trainer) -> Path | None:
        """``metrics.json`` in the first logger's folder; None without a logger."""
        folder = report_dir(trainer)
        return folder / "metrics.json" if folder else None

    @staticmethod
    def summaries(trainer: L.Trainer) -> dict[str, Any]:
        """What the data module and then the LightningModule add through their ``metrics_summary()``."""
        out: dict[str, Any] = {}
        for source in (trainer.datamodule, trainer.lightning_module):
            summary = getattr(source, "metrics_summary", None)
            if callable(summary):
                out.update(summary())
        return out

    def _scalars(self, trainer: L.Trainer, prefix: str) -> dict[str, float]:
        return {k: float(v) for k, v in trainer.callback_metrics.items()
                if k.startswith(prefix) and torch.is_tensor(v) and v.numel() == 1}

    def _write(self, trainer: L.Trainer) -> None:
        path = self.path(trainer)
        if path is None or not trainer.is_global_zero:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        # A test after fit in the same log directory adds its section to what fit wrote.
        previous = json.loads(path.read_text()) if path.exists() else {}
        sections = {k: v or previous.get(k, {}) for k, v in self.metrics.items()}
        summary = {**previous, **sections, **self.summaries(trainer), "global_step": trainer.global_step,
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


class _FolderKeepingCheckpoint(ModelCheckpoint):
    """A ``ModelCheckpoint`` that takes its whole saved state into a fit resumed in a new log folder."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """A fit resumed into a new log folder keeps the best score and files found so far. Lightning would keep
        only the best path when the folder changes (with a warning), and the next validation would then pass for
        the best. Files of the former folder are never deleted (Lightning removes only files in its own folder)."""
        super().load_state_dict({**state_dict, "dirpath": self.dirpath})


class BestCheckpoint(_FolderKeepingCheckpoint):
    """A ``ModelCheckpoint`` on a monitored metric whose best score survives a fit resumed into a new log folder."""


class LastCheckpoint(_FolderKeepingCheckpoint):
    """``last.ckpt``, rewritten at the end of every training epoch (after its validation), to resume from.

    ``save_last=True`` on the best checkpoint would not do: Lightning 2.6 rewrites ``last.ckpt`` only in a step that
    also saves a new best, so it goes stale once the metric stops improving. This is a checkpoint without a monitor
    that keeps its one newest file under a fixed name. Its own class gives it its own state key, so a plain
    ``ModelCheckpoint`` can run beside it; list it after the best checkpoint, so ``last.ckpt`` holds the best
    checkpoint's state of the same epoch."""

    def __init__(self, dirpath: str | None = None) -> None:
        super().__init__(dirpath=dirpath, filename=self.CHECKPOINT_NAME_LAST, save_top_k=1,
                         enable_version_counter=False)


def best_checkpoint_callback(trainer: L.Trainer) -> L.Callback | None:
    """The checkpoint callback that keeps the best weights (the first with a monitor), else Lightning's first one:
    a step checkpoint added on the command line must not take its place."""
    monitored = [c for c in trainer.checkpoint_callbacks if getattr(c, "monitor", None)]
    return monitored[0] if monitored else trainer.checkpoint_callback


def task_callbacks(monitor: str, mode: Literal["min", "max"], patience: int | None = None) -> list[L.Callback]:
    """The callbacks a task's config lists, for a ``Trainer`` built by hand: the best checkpoint by ``monitor``,
    ``last.ckpt``, ``metrics.json`` and, with ``patience``, early stopping on ``monitor``."""
    callbacks: list[L.Callback] = [
        BestCheckpoint(monitor=monitor, mode=mode, save_top_k=1, filename=f"best-{{epoch}}-{{{monitor}:.4f}}"),
        LastCheckpoint(), MetricsJson()]
    if patience is not None:
        callbacks.append(EarlyStopping(monitor=monitor, mode=mode, patience=patience))
    return callbacks
