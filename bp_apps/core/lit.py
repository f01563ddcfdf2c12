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

from bp_apps.core.backprop import (
    MLP,
    NonFiniteError,
    Optimizer,
    SoftmaxCrossEntropy,
    build_optimizer,
    cosine_lr,
    train_step,
)
from bp_apps.core.distributed import data_parallel_mean
from bp_apps.core.io import atomic_write_text
from bp_apps.core.resume import RNG_KEY, restore_training_state, save_rng_state

__all__ = ["ENGINE_OPTIMIZER_KEY", "ClassifierModule", "MLPClassifier"]

Activation = Literal["relu", "leaky_relu", "tanh", "sigmoid", "gelu", "gelu_tanh"]
ENGINE_OPTIMIZER_KEY = "engine_optimizer"
"""Checkpoint key holding the manual backend's engine optimizer ``state_dict``."""

Batch = tuple[Tensor, Tensor]


class ClassifierModule(L.LightningModule):
    """What every classification task shares: the two backends, loss, accuracy (top-1 and,
    with more than five classes, top-5), the non-finite policy, gradient clipping, optimizer and
    learning-rate schedule, and the engine optimizer's checkpoint state.

    Subclasses build ``net`` (an engine ``MLP`` when ``backend='manual'``; any ``nn.Module``
    for ``autograd``), call ``super().__init__`` and then ``self.save_hyperparameters()``.
    ``prepare_input`` adapts a batch to ``net`` (for example, flattening images for an MLP).
    """

    def __init__(self, net: torch.nn.Module, num_classes: int, *, backend: str = "manual", optimizer: str = "adam",
                 lr: float = 1e-3, momentum: float = 0.9, weight_decay: float = 0.0, max_grad_norm: float | None = None,
                 label_smoothing: float = 0.0, nonfinite: str = "raise", scheduler: str = "constant",
                 warmup_fraction: float = 0.0) -> None:
        super().__init__()
        if backend not in ("manual", "autograd"):
            raise ValueError(f"backend must be 'manual' or 'autograd', got {backend!r}")
        if optimizer not in ("sgd", "adam", "adamw"):
            raise ValueError(f"optimizer must be 'sgd', 'adam' or 'adamw', got {optimizer!r}")
        if nonfinite not in ("raise", "skip"):
            raise ValueError(f"nonfinite must be 'raise' or 'skip', got {nonfinite!r}")
        if max_grad_norm is not None and max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be positive or None, got {max_grad_norm}")
        if scheduler not in ("constant", "cosine"):
            raise ValueError(f"scheduler must be 'constant' or 'cosine', got {scheduler!r}")
        if not 0.0 <= warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {warmup_fraction}")
        if backend == "manual" and not isinstance(net, MLP):
            raise ValueError(f"backend='manual' trains hand-written MLPs only, not {type(net).__name__}; "
                             "use backend='autograd' for this model")
        self.manual = backend == "manual"
        self.automatic_optimization = not self.manual
        if self.manual:  # training steps consume each output before the next forward: reuse buffers
            net.reuse_buffers = True
        self.net = net
        self.num_classes = num_classes
        self.optimizer_name, self.lr, self.momentum, self.weight_decay = optimizer, lr, momentum, weight_decay
        self.max_grad_norm, self.label_smoothing, self.nonfinite = max_grad_norm, label_smoothing, nonfinite
        self.scheduler, self.warmup_fraction = scheduler, warmup_fraction
        self._total_steps = 1  # set in configure_optimizers
        self.engine_loss = SoftmaxCrossEntropy(label_smoothing)
        self.engine_optimizer: Optimizer | None = None  # manual backend; created in configure_optimizers
        self._pending_engine_state: dict | None = None
        self._pending_rng_state: Tensor | None = None
        self.skipped_steps = 0
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
        """Logits; the manual backend runs the engine forward with autograd off."""
        x = self.prepare_input(x)
        if self.manual:
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
        x, y = batch
        x = self.prepare_input(x)
        if self.manual:
            return self._manual_training_step(x, y)
        loss = self._loss(self.net(x), y)
        if self.nonfinite == "raise" and not bool(torch.isfinite(loss)):
            raise NonFiniteError(f"non-finite loss ({float(loss.detach())}) at step {self.global_step}; lower the "
                                 "learning rate, clip gradients, or check the inputs")
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        return loss

    def _manual_training_step(self, x: Tensor, y: Tensor) -> Tensor:
        """One engine step (forward, hand-written backward, engine optimizer), autograd off."""
        if self.engine_optimizer is None:
            raise RuntimeError("the engine optimizer does not exist yet: configure_optimizers() has not run")
        if self.scheduler != "constant" or self.warmup_fraction:
            self.engine_optimizer.lr = self._lr_factor(self.global_step) * self.lr
        with torch.no_grad():
            loss, updated = train_step(self.net, self.engine_loss, self.engine_optimizer, x, y,
                                       max_grad_norm=self.max_grad_norm, nonfinite=self.nonfinite,
                                       step=self.global_step, reduce_grads=data_parallel_mean())
        if not updated:
            self._record_skip()
        self._advance_global_step()
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        return loss

    def _record_skip(self) -> None:
        self.skipped_steps += 1
        self.log("skipped_steps", float(self.skipped_steps), on_step=True, on_epoch=False)

    def _advance_global_step(self) -> None:
        """Count one optimizer step in Lightning's progress, as ``LightningOptimizer.step`` would.

        The engine optimizer is not a Lightning-managed optimizer, so without this
        ``trainer.global_step`` (logging steps, ``max_steps``, checkpoint names) would stay 0.
        """
        if self._trainer is None:
            return
        progress = self._trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
        progress.increment_ready()
        progress.increment_completed()

    def on_fit_start(self) -> None:
        """Reject mixed precision for the manual backend: autocast would hand the engine's fixed-dtype
        gradient buffers half-precision products (the autograd backend supports it as usual)."""
        if self.manual and "mixed" in str(self.trainer.precision):
            raise ValueError(f"backend='manual' does not support precision={self.trainer.precision!r}; use '32-true', "
                             "'64-true', '16-true' or 'bf16-true' (or backend='autograd')")

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Autograd backend: apply the ``nonfinite`` policy to the (unscaled) gradients."""
        if self.manual:
            return
        grads = [p.grad for p in self.net.parameters() if p.grad is not None]
        if not grads or bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()):
            return
        if self.nonfinite == "raise":
            raise NonFiniteError(f"non-finite gradient at step {self.global_step}; lower the learning rate, clip "
                                 "gradients, or check the inputs")
        for p in self.net.parameters():
            p.grad = None  # torch optimizers leave parameters without a gradient untouched
        self._record_skip()

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Autograd backend: clip by ``max_grad_norm`` unless the Trainer asks for its own clipping."""
        clip_by_max_grad_norm(self, optimizer, self.max_grad_norm, gradient_clip_val, gradient_clip_algorithm)

    def _optimizer_kwargs(self) -> dict[str, float]:
        kwargs = {"lr": self.lr, "weight_decay": self.weight_decay}
        if self.optimizer_name == "sgd":
            kwargs["momentum"] = self.momentum
        return kwargs

    def _lr_factor(self, step: int) -> float:
        return lr_factor(step, self._total_steps, self.warmup_fraction, self.scheduler)

    def configure_optimizers(self) -> Any:
        """Autograd: the ``torch.optim`` optimizer (with a per-step schedule when asked). Manual: build
        the engine optimizer here, after the module is on its device, restore its state when resuming,
        and give Lightning no optimizer (the schedule is applied in the training step)."""
        name, kwargs = self.optimizer_name, self._optimizer_kwargs()
        # Known once the data is set up; Lightning recomputes it on every access, so keep it.
        self._total_steps = max(1, int(self.trainer.estimated_stepping_batches)) if self._trainer is not None else 1
        if not self.manual:
            cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[name]
            optimizer = cls(self.net.parameters(), **kwargs)
            if self.scheduler == "constant" and not self.warmup_fraction:
                return optimizer
            schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, self._lr_factor)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
        self.engine_optimizer = build_optimizer(name, self.net.parameters(), **kwargs)
        pending, self._pending_engine_state = self._pending_engine_state, None
        # Like Lightning's own optimizers: restored on resume (fit with ckpt_path), fresh otherwise.
        if pending is not None and self._trainer is not None and self._trainer.ckpt_path is not None:
            self.engine_optimizer.load_state_dict(pending)
        return []  # an empty list: no Lightning optimizer, and no "returned None" warning

    # -- checkpoints --------------------------------------------------------------------------

    def on_train_start(self) -> None:
        pending, self._pending_rng_state = self._pending_rng_state, None  # set only when a fit resumes
        restore_training_state(self.trainer, pending)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the engine optimizer's state (Lightning only saves the optimizers it manages) and the CPU RNG
        state (dropout), so a resumed run continues exactly as an uninterrupted one would."""
        if self.manual and self.engine_optimizer is not None:
            checkpoint[ENGINE_OPTIMIZER_KEY] = self.engine_optimizer.state_dict()
        save_rng_state(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the engine optimizer's state now if it exists, else when configure_optimizers builds it; keep
        the RNG state for ``on_train_start`` (only a resumed fit restores it, never a load for inference)."""
        self._pending_rng_state = checkpoint.get(RNG_KEY)
        state = checkpoint.get(ENGINE_OPTIMIZER_KEY)
        if not self.manual or state is None:
            return
        if self.engine_optimizer is not None:
            self.engine_optimizer.load_state_dict(state)
        else:
            self._pending_engine_state = state


def lr_factor(step: int, total_steps: int, warmup_fraction: float, scheduler: str) -> float:
    """The learning-rate schedule as a multiple of the base rate: linear warm-up over
    ``warmup_fraction`` of the steps, then constant or cosine decay to 0."""
    warmup = int(warmup_fraction * total_steps)
    if scheduler == "cosine":
        return cosine_lr(1.0, step, total_steps, warmup)
    return min(1.0, (step + 1) / warmup) if warmup else 1.0


NO_DECAY_KEYS = ("bias", "embed", "shared", "norm", "relative_attention_bias")


def adamw_with_schedule(module: L.LightningModule, lr: float, weight_decay: float, warmup_fraction: float,
                        scheduler: str) -> dict[str, Any]:
    """AdamW without weight decay on biases, norms and embeddings, and a per-step :func:`lr_factor`
    schedule over the trainer's estimated number of steps (the text tasks' optimizer)."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        plain = p.ndim < 2 or any(key in name.lower() for key in NO_DECAY_KEYS)
        (no_decay if plain else decay).append(p)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    total = max(1, int(module.trainer.estimated_stepping_batches)) if module._trainer is not None else 1
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total, warmup_fraction, scheduler))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def clip_by_max_grad_norm(module: L.LightningModule, optimizer: torch.optim.Optimizer, max_grad_norm: float | None,
                          gradient_clip_val: float | None, gradient_clip_algorithm: str | None) -> None:
    """Gradient clipping: the Trainer's own setting when it has one, else the norm ``max_grad_norm``."""
    if gradient_clip_val is None and max_grad_norm is not None:
        gradient_clip_val, gradient_clip_algorithm = max_grad_norm, "norm"
    module.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)


class MLPClassifier(ClassifierModule):
    """An MLP classifier (logits over ``num_classes``) with a hand-written or an autograd backend.

    ``seed`` fixes the initial weights only (identical for both backends); seed the rest of
    training (dropout, data order) with ``lightning.seed_everything`` and the data module.
    ``nonfinite`` decides what a NaN/Inf loss or gradient does: ``raise`` an error or ``skip``
    the update. ``max_grad_norm`` clips the joint gradient norm before each update.
    """

    def __init__(self, in_features: int = 64, num_classes: int = 10, hidden: Sequence[int] = (128, 128),
                 activation: Activation = "relu", dropout: float = 0.0, norm: Literal["layer", "batch"] | None = None,
                 backend: Literal["manual", "autograd"] = "manual", optimizer: Literal["sgd", "adam", "adamw"] = "adam",
                 lr: float = 1e-3, momentum: float = 0.9, weight_decay: float = 0.0, max_grad_norm: float | None = None,
                 label_smoothing: float = 0.0, nonfinite: Literal["raise", "skip"] = "raise",
                 scheduler: Literal["constant", "cosine"] = "constant", warmup_fraction: float = 0.0,
                 seed: int = 0) -> None:
        engine = build_engine_mlp(in_features, hidden, num_classes, activation, dropout, norm, seed)
        super().__init__(engine if backend == "manual" else engine.to_autograd(), num_classes, backend=backend,
                         optimizer=optimizer, lr=lr, momentum=momentum, weight_decay=weight_decay,
                         max_grad_norm=max_grad_norm, label_smoothing=label_smoothing, nonfinite=nonfinite,
                         scheduler=scheduler, warmup_fraction=warmup_fraction)
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
        callback = trainer.checkpoint_callback
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
