"""Image classification with Lightning: any model of ``models.py`` on any data module of ``data.py``.

The config's callbacks keep the best checkpoint (by validation accuracy or loss) and write
``metrics.json`` (with the data module's class names and skipped images); the CLI then tests
that checkpoint, which saves a confusion matrix PNG.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor
from torchmetrics.classification import MulticlassConfusionMatrix

from bp_apps.core.io import load_checkpoint_dict
from bp_apps.core.lit import ClassifierModule
from bp_apps.core.task import OptimizerConfig, check_task
from bp_apps.vision.models import build_model

PREPROCESSING_KEY = "bp_apps_preprocessing"


class ImageClassifier(ClassifierModule):
    """Cross-entropy image classifier with top-1/top-5 accuracy and a confusion matrix at test time.

    ``model`` is one of ``mlp`` (the core MLP on flattened pixels; ``backend`` manual or
    autograd), ``cnn``, ``cnn_manual_head`` (the CNN with the manual MLP head through the
    bridge) and ``resnet18`` (``pretrained`` names torchvision weights for online users).
    ``num_classes`` and ``input_shape`` must match the data module; a mismatch is refused.
    """

    task_name = "vision.ImageClassifier"
    task_title = "an image-classification"

    def __init__(self, model: Literal["mlp", "cnn", "cnn_manual_head", "resnet18"] = "cnn", num_classes: int = 10,
                 input_shape: Sequence[int] = (1, 28, 28), hidden: Sequence[int] = (128,), dropout: float = 0.25,
                 width: int = 32, backend: Literal["manual", "autograd"] = "autograd",
                 optimizer: Literal["sgd", "adam", "adamw"] = "adamw", lr: float = 1e-3, momentum: float = 0.9,
                 weight_decay: float = 1e-4, max_grad_norm: float | None = None, label_smoothing: float = 0.0,
                 nonfinite: Literal["raise", "skip"] = "raise", scheduler: Literal["constant", "cosine"] = "cosine",
                 warmup_fraction: float = 0.0, pretrained: str | None = None, seed: int = 0) -> None:
        if backend == "manual" and model != "mlp":
            raise ValueError(f"backend='manual' applies to model='mlp' only (got model={model!r}); "
                             "'cnn_manual_head' already trains its head by hand through the bridge")
        net = build_model(model, tuple(input_shape), num_classes, hidden=hidden, dropout=dropout, backend=backend,
                          width=width, pretrained=pretrained, seed=seed)
        optim = OptimizerConfig(optimizer, lr, momentum, weight_decay, scheduler, warmup_fraction, max_grad_norm,
                                nonfinite)
        super().__init__(net, num_classes, optim=optim, label_smoothing=label_smoothing)
        self.save_hyperparameters()
        self.flatten = model == "mlp"
        self.input_shape = tuple(input_shape)
        self.confusion = MulticlassConfusionMatrix(num_classes=num_classes)

    def prepare_input(self, x: Tensor) -> Tensor:
        return x.flatten(1) if self.flatten else x

    # -- wiring to the data ------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        """Refuse a data module whose class count or image shape differs from this model's."""
        super().setup(stage)
        data = self.trainer.datamodule if self._trainer is not None else None
        if data is None:
            return
        if getattr(data, "num_classes", self.num_classes) != self.num_classes:
            raise ValueError(f"the data has {data.num_classes} classes but the model was built for "
                             f"{self.num_classes}: set model.num_classes to {data.num_classes}")
        shape = tuple(getattr(data, "input_shape", self.input_shape))
        if shape != self.input_shape:
            raise ValueError(f"the data gives images of shape {shape} but the model was built for "
                             f"{self.input_shape}: set model.input_shape to {list(shape)}")

    # -- test-time confusion matrix ------------------------------------------------------------------

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss, logits, y = self._evaluate(batch, "test")
        self.confusion.update(logits.argmax(-1), y)
        return loss

    def on_test_epoch_end(self) -> None:
        matrix = self.confusion.compute().cpu()
        self.confusion.reset()
        log_dir = self.trainer.log_dir  # a broadcast: every process must ask, not only rank 0
        if self.trainer.is_global_zero:
            data = self.trainer.datamodule
            names = list(getattr(data, "class_names", [])) or [str(i) for i in range(self.num_classes)]
            path = Path(log_dir or self.trainer.default_root_dir) / "confusion_matrix.png"
            save_confusion_matrix(matrix, names, path)
            print(f"confusion matrix written to {path}")

    # -- checkpoints -------------------------------------------------------------------------------

    @classmethod
    def load_overrides(cls, hparams: dict[str, Any]) -> dict[str, Any]:
        return {"pretrained": None}  # the weights come from the checkpoint: never download

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Also store the task name and the preprocessing, so ``predict-image`` can rebuild both."""
        super().on_save_checkpoint(checkpoint)
        data = self.trainer.datamodule if self._trainer is not None else None
        if data is not None:
            checkpoint[PREPROCESSING_KEY] = {
                "class_names": list(data.class_names), "mean": list(data.mean), "std": list(data.std),
                "input_shape": list(data.input_shape), "datamodule": type(data).__name__,
            }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse checkpoints of other tasks or of another class count before any weight is loaded."""
        super().on_load_checkpoint(checkpoint)
        check_checkpoint(checkpoint, expected_num_classes=self.num_classes, source="checkpoint")


def check_checkpoint(checkpoint: dict[str, Any], expected_num_classes: int | None = None,
                     source: str = "checkpoint") -> None:
    """Raise ValueError unless ``checkpoint`` is an image-classifier checkpoint with the expected class count."""
    check_task(checkpoint, ImageClassifier.accepted_tasks(), source, ImageClassifier.task_title)
    found = checkpoint.get("hyper_parameters", {}).get("num_classes")
    if expected_num_classes is not None and found != expected_num_classes:
        raise ValueError(f"{source} was trained for {found} classes, but this model has {expected_num_classes}; "
                         "set num_classes to match the checkpoint or train a new model")


def save_confusion_matrix(matrix: Tensor, class_names: Sequence[str], path: Path) -> None:
    """Draw a confusion matrix (rows: true class, columns: predicted) to a PNG, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(class_names)
    size = max(4.0, min(0.45 * n + 2, 16.0))
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix.numpy(), cmap="Blues")
    ax.set(xticks=range(n), yticks=range(n), xlabel="predicted", ylabel="true", title="confusion matrix (test)")
    ax.set_xticklabels(class_names, rotation=90 if n > 10 else 0)
    ax.set_yticklabels(class_names)
    if n <= 20:
        peak = float(matrix.max()) or 1.0
        for i in range(n):
            for j in range(n):
                value = int(matrix[i, j])
                ax.text(j, i, value, ha="center", va="center", fontsize=8,
                        color="white" if value > peak / 2 else "black")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def load_image_classifier(path: str | Path) -> tuple[ImageClassifier, dict[str, Any]]:
    """Load an ImageClassifier checkpoint safely (``weights_only=True``) for prediction; return the
    model in eval mode and the stored preprocessing (class names, mean, std, input shape)."""
    path = Path(path)
    checkpoint = load_checkpoint_dict(path)
    check_checkpoint(checkpoint, source=str(path))
    if PREPROCESSING_KEY not in checkpoint:
        raise ValueError(f"{path} carries no preprocessing (it was saved outside a trainer run with a data module)")
    return ImageClassifier.load(path), checkpoint[PREPROCESSING_KEY]


def predict_images(paths: Sequence[str | Path], checkpoint: str | Path, top_k: int = 5) -> list[dict[str, Any]]:
    """Top-``top_k`` classes with probabilities for each image file, preprocessed as in evaluation
    (any size and mode: converted to the training channels, resized, normalised)."""
    from bp_apps.vision.data import load_image, pil_transform

    model, prep = load_image_classifier(checkpoint)
    channels = prep["input_shape"][0]
    transform = pil_transform(tuple(prep["input_shape"]), prep["mean"], prep["std"])
    names = prep["class_names"]
    k = max(1, min(top_k, len(names)))
    results = []
    for path in paths:
        image = transform(load_image(path, channels)).unsqueeze(0)
        with torch.no_grad():
            probs = torch.softmax(model(image), dim=-1)[0]
        values, indices = probs.topk(k)
        results.append({"path": str(path), "top": [{"class": names[i], "probability": float(v)}
                                                   for v, i in zip(values.tolist(), indices.tolist())]})
    return results
