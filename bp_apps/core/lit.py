"""The classification module the vision and speech tasks share: one network trained either by the
hand-written engine (an engine ``MLP``, no autograd anywhere) or by autograd (any other ``nn.Module``), and, for an
engine network, optionally with differential privacy (DP-SGD, :mod:`bp_apps.core.privacy`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy

from bp_apps.core.privacy import PRIVACY_KEY, PrivacyConfig, PrivateTraining, privacy_settings
from bp_apps.core.task import OptimizerConfig, TaskModule, backend_of
from bp_apps.engine import MLP, Layer, SoftmaxCrossEntropy

__all__ = ["ClassifierModule"]

Batch = tuple[Tensor, Tensor]


class ClassifierModule(TaskModule):
    """What every classification task shares: loss, accuracy (top-1 and, with more than five classes, top-5),
    and both backends: an engine network (``MLP``, ``EngineSmallCNN``, ... — any engine ``Layer``) trains by its
    hand-written backward, any other ``nn.Module`` by autograd.

    Subclasses build ``net``, call ``super().__init__`` and then ``self.save_hyperparameters()``.
    ``prepare_input`` adapts a batch's inputs to ``net`` (identity here; the vision networks flatten images
    themselves).

    ``privacy`` (a :class:`~bp_apps.core.privacy.PrivacyConfig` or its mapping) trains by DP-SGD: Poisson-sampled
    batches, each example's gradient clipped and Gaussian noise added by the engine, ε counted per step, logged as
    ``privacy_epsilon`` every epoch and written to ``metrics.json`` (``privacy``). Only engine networks train
    privately: their hand-written backward gives each example's gradient.
    """

    def __init__(self, net: torch.nn.Module, num_classes: int, *, optim: OptimizerConfig,
                 label_smoothing: float = 0.0, privacy: PrivacyConfig | Mapping[str, Any] | None = None) -> None:
        super().__init__(optim)
        if backend_of(net) == "engine":
            if not isinstance(net, Layer):
                raise ValueError(f"the engine backend trains networks of engine layers, not {type(net).__name__}")
            if isinstance(net, MLP):
                net.reuse_buffers = True  # training steps consume each output before the next forward
        self.privacy = privacy_settings(privacy)
        if self.privacy is not None:
            check_private(net, self.optim)
        self.private = PrivateTraining(self.privacy) if self.privacy is not None else None
        self._pending_privacy: dict[str, Any] | None = None
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
        loss = self.backend_training_step(batch)
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        return loss

    def autograd_loss(self, batch: Batch) -> Tensor:
        x, y = batch
        return self._loss(self.net(self.prepare_input(x)), y)

    def engine_backward(self, batch: Batch) -> Tensor:
        x, y = batch
        loss = self.engine_loss.forward(self.net.forward(self.prepare_input(x)), y)
        self.net.backward(self.engine_loss.backward())
        return loss

    # -- differential privacy -----------------------------------------------------------------------

    def engine_gradients(self, batch: Batch) -> Tensor:
        """The task's backward, or with ``privacy`` its DP-SGD gradient (clipped per example, noised, averaged)."""
        if self.private is None:
            return self.engine_backward(batch)
        return self.private.step(self.net, self.engine_backward, batch, len(batch[1]), self.global_rank)

    def setup(self, stage: str) -> None:
        """A private fit solves its plan (σ for the target over the trainer's epochs) and draws Poisson batches."""
        super().setup(stage)
        if self.private is not None and stage == "fit":
            self.private.attach(self.trainer)

    def teardown(self, stage: str) -> None:
        if self.private is not None:
            self.private.detach()
        super().teardown(stage)

    def on_train_start(self) -> None:
        """A private fit resumed from a checkpoint continues its accounting (before the first step)."""
        pending, self._pending_privacy = self._pending_privacy, None
        if self.private is not None and pending is not None and self.trainer.ckpt_path:
            self.private.resume(pending)
        super().on_train_start()

    def on_train_epoch_end(self) -> None:
        if self.private is not None:
            self.log("privacy_epsilon", self.private.ledger.epsilon(), prog_bar=True, sync_dist=True)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.private is not None:
            checkpoint[PRIVACY_KEY] = self.private.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        record = checkpoint.get(PRIVACY_KEY)
        if self.private is not None and isinstance(record, dict):
            self._pending_privacy = record  # taken up when a fit resumes (on_train_start)
            self.private.checkpoint_record = record

    def metrics_summary(self) -> dict[str, Any]:
        """For ``metrics.json``: a private run's ``privacy`` (ε spent, δ, σ, C, sampling rate)."""
        return {"privacy": self.private.summary()} if self.private is not None else {}


def check_private(net: torch.nn.Module, optim: OptimizerConfig) -> None:
    """Refuse settings DP-SGD cannot train with, naming them: an autograd network (per-example gradients come from
    the engine's hand-written backward), batch normalisation (it mixes the examples of a batch, so no example has a
    gradient of its own), clipping of the batch gradient on top of the per-example clipping, and skipping non-finite
    steps (a decision taken on the un-noised gradient)."""
    if backend_of(net) != "engine":
        raise ValueError(f"privacy: DP-SGD trains engine networks (their hand-written backward gives each example's "
                         f"gradient); {type(net).__name__} is trained by autograd: choose an engine network such as "
                         "bp_apps.vision.dp_models.EngineDPCNN or EngineDPMLP")
    from bp_apps.engine.privacy import PerExampleRecorder

    try:
        PerExampleRecorder(net)  # names the first layer without per-example gradients (BatchNorm, recurrent, ...)
    except ValueError as error:
        raise ValueError(f"privacy: {type(net).__name__} cannot train by DP-SGD: {error}") from error
    if optim.max_grad_norm is not None:
        raise ValueError(f"optim.max_grad_norm={optim.max_grad_norm:g} conflicts with privacy: DP-SGD clips each "
                         "example's gradient to privacy.max_grad_norm; remove optim.max_grad_norm")
    if optim.nonfinite != "raise":
        raise ValueError("optim.nonfinite='skip' conflicts with privacy: skipping a step is decided on the un-noised "
                         "gradient; use nonfinite='raise'")
