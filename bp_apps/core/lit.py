"""Lightning glue: one MLP classifier trained either by the hand-written engine or by autograd.

Both backends build the same engine MLP under the same seed, so they start from identical
weights; ``backend='manual'`` then trains it with the engine (no autograd anywhere), and
``backend='autograd'`` trains its ``torch.nn`` twin with the matching ``torch.optim`` optimizer.
The typed ``__init__`` doubles as the model's LightningCLI configuration.
"""

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy

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
