"""Lightning glue: one MLP classifier trained either by the hand-written engine or by autograd.

Both backends build the same engine MLP under the same seed, so they start from identical
weights; ``backend='manual'`` then trains it with the engine (no autograd anywhere), and
``backend='autograd'`` trains its ``torch.nn`` twin with the matching ``torch.optim`` optimizer.
The typed ``__init__`` doubles as the model's LightningCLI configuration.
"""

from collections.abc import Sequence
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy

from bp_apps.core.backprop import MLP, NonFiniteError, Optimizer, SoftmaxCrossEntropy, build_optimizer, train_step

__all__ = ["ENGINE_OPTIMIZER_KEY", "MLPClassifier"]

Activation = Literal["relu", "leaky_relu", "tanh", "sigmoid", "gelu", "gelu_tanh"]
ENGINE_OPTIMIZER_KEY = "engine_optimizer"
"""Checkpoint key holding the manual backend's engine optimizer ``state_dict``."""

Batch = tuple[Tensor, Tensor]


class MLPClassifier(L.LightningModule):
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
                 label_smoothing: float = 0.0, nonfinite: Literal["raise", "skip"] = "raise", seed: int = 0) -> None:
        super().__init__()
        if backend not in ("manual", "autograd"):
            raise ValueError(f"backend must be 'manual' or 'autograd', got {backend!r}")
        if optimizer not in ("sgd", "adam", "adamw"):
            raise ValueError(f"optimizer must be 'sgd', 'adam' or 'adamw', got {optimizer!r}")
        if nonfinite not in ("raise", "skip"):
            raise ValueError(f"nonfinite must be 'raise' or 'skip', got {nonfinite!r}")
        if max_grad_norm is not None and max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be positive or None, got {max_grad_norm}")
        self.save_hyperparameters()
        # The weights depend on ``seed`` alone, and the caller's RNG is left untouched (the MLP is
        # built on the CPU, so only the CPU generator is seeded: CUDA generators are not reseeded).
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(seed)
            engine = MLP(in_features, hidden, num_classes, activation=activation, dropout=dropout, norm=norm)
        self.manual = backend == "manual"
        self.automatic_optimization = not self.manual
        # Training steps consume each output before the next forward: the engine may reuse its buffers.
        engine.reuse_buffers = self.manual
        self.net: torch.nn.Module = engine if self.manual else engine.to_autograd()
        self.engine_loss = SoftmaxCrossEntropy(label_smoothing)
        self.engine_optimizer: Optimizer | None = None  # manual backend; created in configure_optimizers
        self._pending_engine_state: dict | None = None
        self.skipped_steps = 0
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    # -- forward and evaluation -------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        """Logits; the manual backend runs the engine forward with autograd off."""
        if self.manual:
            with torch.no_grad():
                return self.net(x)
        return self.net(x)

    def _loss(self, logits: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing)

    def _evaluate(self, batch: Batch, stage: str, accuracy: MulticlassAccuracy) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = self._loss(logits, y)
        accuracy(logits.argmax(-1), y)
        self.log(f"{stage}_loss", loss, prog_bar=stage == "val")
        self.log(f"{stage}_acc", accuracy, prog_bar=stage == "val")
        return loss

    def validation_step(self, batch: Batch, batch_idx: int) -> Tensor:
        return self._evaluate(batch, "val", self.val_acc)

    def test_step(self, batch: Batch, batch_idx: int) -> Tensor:
        return self._evaluate(batch, "test", self.test_acc)

    def predict_step(self, batch: Batch | Tensor, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """Class probabilities (softmax of the logits) for the batch's inputs."""
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return torch.softmax(self(x), dim=-1)

    # -- training -----------------------------------------------------------------------------

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        x, y = batch
        if self.manual:
            return self._manual_training_step(x, y)
        loss = self._loss(self.net(x), y)
        if self.hparams.nonfinite == "raise" and not bool(torch.isfinite(loss)):
            raise NonFiniteError(f"non-finite loss ({float(loss.detach())}) at step {self.global_step}; lower the "
                                 "learning rate, clip gradients, or check the inputs")
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        return loss

    def _manual_training_step(self, x: Tensor, y: Tensor) -> Tensor:
        """One engine step (forward, hand-written backward, engine optimizer), autograd off."""
        if self.engine_optimizer is None:
            raise RuntimeError("the engine optimizer does not exist yet: configure_optimizers() has not run")
        with torch.no_grad():
            loss, updated = train_step(self.net, self.engine_loss, self.engine_optimizer, x, y,
                                       max_grad_norm=self.hparams.max_grad_norm, nonfinite=self.hparams.nonfinite,
                                       step=self.global_step)
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
        if self.hparams.nonfinite == "raise":
            raise NonFiniteError(f"non-finite gradient at step {self.global_step}; lower the learning rate, clip "
                                 "gradients, or check the inputs")
        for p in self.net.parameters():
            p.grad = None  # torch optimizers leave parameters without a gradient untouched
        self._record_skip()

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Autograd backend: clip by ``max_grad_norm`` unless the Trainer asks for its own clipping."""
        if gradient_clip_val is None and self.hparams.max_grad_norm is not None:
            gradient_clip_val, gradient_clip_algorithm = self.hparams.max_grad_norm, "norm"
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def _optimizer_kwargs(self) -> dict[str, float]:
        kwargs = {"lr": self.hparams.lr, "weight_decay": self.hparams.weight_decay}
        if self.hparams.optimizer == "sgd":
            kwargs["momentum"] = self.hparams.momentum
        return kwargs

    def configure_optimizers(self) -> torch.optim.Optimizer | list:
        """Autograd: the ``torch.optim`` optimizer. Manual: build the engine optimizer here, after the
        module is on its device, restore its state when resuming, and give Lightning no optimizer."""
        name, kwargs = self.hparams.optimizer, self._optimizer_kwargs()
        if not self.manual:
            cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[name]
            return cls(self.net.parameters(), **kwargs)
        self.engine_optimizer = build_optimizer(name, self.net.parameters(), **kwargs)
        pending, self._pending_engine_state = self._pending_engine_state, None
        # Like Lightning's own optimizers: restored on resume (fit with ckpt_path), fresh otherwise.
        if pending is not None and self._trainer is not None and self._trainer.ckpt_path is not None:
            self.engine_optimizer.load_state_dict(pending)
        return []  # an empty list: no Lightning optimizer, and no "returned None" warning

    # -- checkpoints --------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the engine optimizer's state (Lightning only saves the optimizers it manages)."""
        if self.manual and self.engine_optimizer is not None:
            checkpoint[ENGINE_OPTIMIZER_KEY] = self.engine_optimizer.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the engine optimizer's state now if it exists, else when configure_optimizers builds it."""
        state = checkpoint.get(ENGINE_OPTIMIZER_KEY)
        if not self.manual or state is None:
            return
        if self.engine_optimizer is not None:
            self.engine_optimizer.load_state_dict(state)
        else:
            self._pending_engine_state = state
