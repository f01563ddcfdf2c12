"""The classification module the vision and speech tasks share: one network trained either by the
hand-written engine (an engine ``MLP``, no autograd anywhere) or by autograd (any other ``nn.Module``)."""

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy

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
    """

    def __init__(self, net: torch.nn.Module, num_classes: int, *, optim: OptimizerConfig,
                 label_smoothing: float = 0.0) -> None:
        super().__init__(optim)
        if backend_of(net) == "engine":
            if not isinstance(net, Layer):
                raise ValueError(f"the engine backend trains networks of engine layers, not {type(net).__name__}")
            if isinstance(net, MLP):
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
