"""Lightning glue: one MLP classifier trained either by the hand-written engine or by autograd.

Both backends build the same engine MLP under the same seed, so they start from identical
weights; ``backend='manual'`` then trains it with the engine (no autograd anywhere), and
``backend='autograd'`` trains its ``torch.nn`` twin with the matching ``torch.optim`` optimizer.
The typed ``__init__`` doubles as the model's LightningCLI configuration.
"""

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy

from bp_apps.core.io import atomic_write_text
from bp_apps.core.task import OptimizerConfig, TaskModule, backend_of
from bp_apps.engine import MLP, SoftmaxCrossEntropy

__all__ = ["ClassifierModule", "MLPClassifier"]

Activation = Literal["relu", "leaky_relu", "tanh", "sigmoid", "gelu", "gelu_tanh"]

Batch = tuple[Tensor, Tensor]


class ClassifierModule(TaskModule):
    """What every classification task shares: loss, accuracy (top-1 and, with more than five classes, top-5),
    and both backends: an engine ``MLP`` trains by its hand-written backward, any other ``nn.Module`` by autograd.

    Subclasses build ``net``, call ``super().__init__`` and then ``self.save_hyperparameters()``.
    ``prepare_input`` adapts a batch to ``net`` (for example, flattening images for an MLP).
    """

    def __init__(self, net: torch.nn.Module, num_classes: int, *, optim: OptimizerConfig,
                 label_smoothing: float = 0.0) -> None:
        super().__init__(optim)
        if backend_of(net) == "engine":
            if not isinstance(net, MLP):
                raise ValueError(f"the engine backend trains hand-written MLPs only, not {type(net).__name__}")
            net.reuse_buffers = True  # training steps consume each output before the next forward
        self.net = net
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing
        self.engine_loss = SoftmaxCrossEntropy(label_smoothing)
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.top5 = num_classes > 5
        if self.top5:
            self.val_acc_top5 = MulticlassAccuracy(num_classes=num_classes, top_k=5, average="micro")
            self.test_acc_top5 = MulticlassAccuracy(num_classes=num_classes, top_k=5, average="micro")

    def prepare_input(self, x: Tensor) -> Tensor:
        """The batch's inputs as ``net`` takes them (identity here)."""
        return x

    # -- forward and evaluation -------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        """Logits; an engine network runs its forward with autograd off."""
        x = self.prepare_input(x)
        if self.engine:
            with torch.no_grad():
                return self.net(x)
        return self.net(x)

    def _loss(self, logits: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)

    def _evaluate(self, batch: Batch, stage: str) -> tuple[Tensor, Tensor, Tensor]:
        x, y = batch
        logits = self(x)
        loss = self._loss(logits, y)
        accuracy = getattr(self, f"{stage}_acc")
        accuracy(logits, y)
        # sync_dist: under DDP every process must see the same monitored value (checkpoint names, early stopping)
        self.log(f"{stage}_loss", loss, prog_bar=stage == "val", batch_size=len(y), sync_dist=True)
        self.log(f"{stage}_acc", accuracy, prog_bar=stage == "val")
        if self.top5:
            top5 = getattr(self, f"{stage}_acc_top5")
            top5(logits, y)
            self.log(f"{stage}_acc_top5", top5)
        return loss, logits, y

    def validation_step(self, batch: Batch, batch_idx: int) -> Tensor:
        return self._evaluate(batch, "val")[0]

    def test_step(self, batch: Batch, batch_idx: int) -> Tensor:
        return self._evaluate(batch, "test")[0]

    def predict_step(self, batch: Batch | Tensor, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """Class probabilities (softmax of the logits) for the batch's inputs."""
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return torch.softmax(self(x), dim=-1)

    # -- training -----------------------------------------------------------------------------

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        if self.engine:
            loss = self.engine_training_step(batch, self.net)
        else:
            x, y = batch
            loss = self._loss(self.net(self.prepare_input(x)), y)
            self.check_loss(loss)
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        return loss

    def engine_backward(self, batch: Batch) -> Tensor:
        x, y = batch
        loss = self.engine_loss.forward(self.net.forward(self.prepare_input(x)), y)
        self.net.backward(self.engine_loss.backward())
        return loss


class MLPClassifier(ClassifierModule):
    """An MLP classifier (logits over ``num_classes``) with a hand-written or an autograd backend.

    ``seed`` fixes the initial weights only (identical for both backends); seed the rest of
    training (dropout, data order) with ``lightning.seed_everything`` and the data module.
    ``nonfinite`` decides what a NaN/Inf loss or gradient does: ``raise`` an error or ``skip``
    the update. ``max_grad_norm`` clips the joint gradient norm before each update.
    """

    task_name = "core.MLPClassifier"
    task_title = "an MLP-classifier"

    def __init__(self, in_features: int = 64, num_classes: int = 10, hidden: Sequence[int] = (128, 128),
                 activation: Activation = "relu", dropout: float = 0.0, norm: Literal["layer", "batch"] | None = None,
                 backend: Literal["manual", "autograd"] = "manual", optimizer: Literal["sgd", "adam", "adamw"] = "adam",
                 lr: float = 1e-3, momentum: float = 0.9, weight_decay: float = 0.0, max_grad_norm: float | None = None,
                 label_smoothing: float = 0.0, nonfinite: Literal["raise", "skip"] = "raise",
                 scheduler: Literal["constant", "cosine"] = "constant", warmup_fraction: float = 0.0,
                 seed: int = 0) -> None:
        engine = build_engine_mlp(in_features, hidden, num_classes, activation, dropout, norm, seed)
        optim = OptimizerConfig(optimizer, lr, momentum, weight_decay, scheduler, warmup_fraction, max_grad_norm,
                                nonfinite)
        super().__init__(engine if backend == "manual" else engine.to_autograd(), num_classes, optim=optim,
                         label_smoothing=label_smoothing)
        self.save_hyperparameters()


def build_engine_mlp(in_features: int, hidden: Sequence[int], num_classes: int, activation: str, dropout: float,
                     norm: str | None, seed: int) -> MLP:
    """An engine MLP whose weights depend on ``seed`` alone; the caller's RNG is left untouched (the
    MLP is built on the CPU, so only the CPU generator is seeded)."""
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        return MLP(in_features, hidden, num_classes, activation=activation, dropout=dropout, norm=norm)


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
