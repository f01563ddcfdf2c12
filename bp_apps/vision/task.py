"""Image classification with Lightning: any model of ``models.py`` on any data module of ``data.py``.

The config's callbacks keep the best checkpoint (by validation accuracy or loss) and write
``metrics.json`` (with the data module's class names and skipped images); the CLI then tests
that checkpoint, which saves a confusion matrix PNG and a grid of misclassified test images
(:mod:`bp_apps.vision.reports`). The model never reads the data module: the CLI
links what it needs, and the data module's state in the checkpoint is what ``predict-image`` uses.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics.classification import MulticlassConfusionMatrix

from bp_apps.core.callbacks import report_dir
from bp_apps.core.compose import network_factory
from bp_apps.core.datalink import saved_preprocessing
from bp_apps.core.io import load_checkpoint_dict
from bp_apps.core.lit import ClassifierModule
from bp_apps.core.privacy import PrivacyConfig
from bp_apps.core.reports import evaluation_order, gather_rows, running_test_loader, save_count_matrix
from bp_apps.core.task import OptimizerConfig, check_task
from bp_apps.vision.models import ResNet18, SmallCNN
from bp_apps.vision.reports import MAX_MISCLASSIFIED, Misclassified, misclassified_in_batch, save_misclassified

DEFAULT_OPTIM = OptimizerConfig(name="adamw", lr=1e-3, momentum=0.9, weight_decay=1e-4, scheduler="cosine",
                                warmup_fraction=0.0, max_grad_norm=None, nonfinite="raise")
"""The image classifier's optimizer settings when a config gives none (a config's ``optim`` overrides fields)."""


class ImageClassifier(ClassifierModule):
    """Cross-entropy image classifier with top-1/top-5 accuracy and a confusion matrix at test time.

    ``net`` is the network's class (``class_path`` and ``init_args`` in a config; any class of
    :mod:`bp_apps.vision.models` or another ``nn.Module`` whose first two arguments are ``input_shape`` and
    ``num_classes``); the task calls it with the data's sizes. Its backend is the network's: an engine network
    (:class:`~bp_apps.vision.models.EngineImageMLP`) trains by the hand-written backward, any other by autograd.
    Initial weights depend on ``seed`` only. ``optim`` holds the optimizer settings (:data:`DEFAULT_OPTIM` for
    those a config leaves out). ``num_classes``, ``input_shape`` and ``class_names`` (which label the confusion
    matrix) come from the data module: ``bp-apps`` links them, and the data module's ``setup`` refuses a model
    built for other sizes; so do ``mean`` and ``std``, the data's normalisation, with which the test's
    ``misclassified.png`` shows the images as they were. ``privacy`` (a config's ``privacy:`` group:
    ``target_epsilon`` or ``noise_multiplier``, ``delta``, ``max_grad_norm``) trains an engine network by DP-SGD
    (:class:`~bp_apps.core.lit.ClassifierModule`).
    """

    task_name = "vision.ImageClassifier"
    task_title = "an image-classification"
    default_optim = DEFAULT_OPTIM

    def __init__(self, net: Callable[[Sequence[int], int], nn.Module] = SmallCNN,
                 optim: OptimizerConfig = DEFAULT_OPTIM, label_smoothing: float = 0.0, seed: int = 0,
                 num_classes: int = 10, input_shape: Sequence[int] = (1, 28, 28),
                 class_names: Sequence[str] | None = None, privacy: PrivacyConfig | None = None,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> None:
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        factory = network_factory(net, "net")
        with torch.random.fork_rng(devices=[]):  # the weights depend on the seed only; the caller's RNG stays
            torch.random.default_generator.manual_seed(seed)
            network = factory(tuple(input_shape), num_classes)
        super().__init__(network, num_classes, optim=optim, label_smoothing=label_smoothing, privacy=privacy)
        self.save_hyperparameters(ignore=["class_names", "mean", "std"])  # the data's, saved as its state
        self.class_names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
        # the data's normalisation, linked like class_names: only the misclassified-images report uses it
        self.normalisation = (list(mean), list(std)) if mean is not None and std is not None else (None, None)
        self.confusion = MulticlassConfusionMatrix(num_classes=num_classes)

    # -- test-time confusion matrix ------------------------------------------------------------------

    def on_test_epoch_start(self) -> None:
        self._test_order = evaluation_order(running_test_loader(self.trainer))
        self._misclassified: list[Misclassified] = []
        self._seen = 0

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss, logits, y = self._evaluate(batch, "test")
        self.confusion.update(logits.argmax(-1), y)
        order = getattr(self, "_test_order", None)
        indices = order[batch_idx] if order is not None and batch_idx < len(order) else []
        if len(indices) != len(y):  # order unknown: this process's running count
            indices = list(range(self._seen, self._seen + len(y)))
        self._seen += len(y)
        room = MAX_MISCLASSIFIED - len(self._misclassified)
        if room > 0:
            self._misclassified += misclassified_in_batch(batch[0], y, logits, indices, room)
        return loss

    def on_test_epoch_end(self) -> None:
        """Write ``confusion_matrix.png`` and ``misclassified.png`` (the first misclassified test images, gathered
        from every process) into the run's report folder."""
        matrix = self.confusion.compute().cpu()
        self.confusion.reset()
        folder = report_dir(self.trainer)  # None without a logger: no report, never into the current folder
        if folder is None:
            return
        wrong = sorted(gather_rows(getattr(self, "_misclassified", [])), key=lambda example: example.index)
        if self.trainer.is_global_zero:
            path = folder / "confusion_matrix.png"
            save_confusion_matrix(matrix, self.class_names, path)
            print(f"confusion matrix written to {path}")
            mean, std = self.normalisation
            path = save_misclassified(wrong, self.class_names, folder / "misclassified.png", mean, std)
            print(f"misclassified test images written to {path}")

    # -- checkpoints -------------------------------------------------------------------------------

    @staticmethod
    def user_data_callback() -> L.Callback:
        """What lets a data module of the user's own train this model: its first batches checked against the model
        and what ``predict-image`` needs kept in every checkpoint (:func:`~bp_apps.vision.data.user_data_check`).
        Callbacks come from the run, never from the model: ``bp-apps`` adds this one to every command of a task
        that offers it, as it adds ``metrics.json``; give it to a ``Trainer`` built by hand yourself."""
        from bp_apps.vision.data import user_data_check

        return user_data_check()

    @classmethod
    def load_overrides(cls, hparams: dict[str, Any]) -> dict[str, Any]:
        """The weights come from the checkpoint: a pretrained ResNet18 is rebuilt without downloading any."""
        net = hparams.get("net")
        if not (isinstance(net, Mapping) and net.get("class_path") == f"{ResNet18.__module__}.ResNet18"):
            return {}
        init_args = dict(net.get("init_args") or {})
        return {"net": {**net, "init_args": ResNet18.offline_args(init_args, hparams.get("input_shape", (3, 32, 32)))}}

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
    """Draw a confusion matrix (rows: true class, columns: predicted; a cell's colour is its share of the row) to
    a PNG, written atomically."""
    save_count_matrix(matrix.tolist(), class_names, class_names, path, "confusion matrix (test)")


def load_image_classifier(path: str | Path) -> tuple[ImageClassifier, dict[str, Any]]:
    """Load an ImageClassifier checkpoint safely (``weights_only=True``) for prediction; return the
    model in eval mode and the preprocessing its data module saved (class names, mean, std, input
    shape; checkpoints written before that was the data module's state are read too)."""
    path = Path(path)
    checkpoint = load_checkpoint_dict(path)
    check_checkpoint(checkpoint, source=str(path))
    preprocessing = saved_preprocessing(checkpoint, ("class_names", "mean", "std", "input_shape"))
    if preprocessing is None:
        raise ValueError(f"{path} carries no preprocessing (no image data module's state: it was saved outside a "
                         "trainer run with a data module)")
    model = ImageClassifier.load(path)
    if len(preprocessing["class_names"]) != model.num_classes:
        raise ValueError(f"{path}: the data module's state names {len(preprocessing['class_names'])} classes but the "
                         f"model predicts {model.num_classes}")
    return model, preprocessing


def rank_images(model: ImageClassifier, prep: dict[str, Any], images: Sequence[Any], top_k: int = 5
                ) -> list[list[dict[str, Any]]]:
    """Top-``top_k`` classes with probabilities for images already opened by
    :func:`~bp_apps.vision.data.load_image` (PIL images in the training channels), preprocessed as in evaluation
    and classified in one forward pass (``bp-apps serve`` batches several requests through it)."""
    from bp_apps.vision.data import pil_transform

    transform = pil_transform(tuple(prep["input_shape"]), prep["mean"], prep["std"])
    names = prep["class_names"]
    k = max(1, min(top_k, len(names)))
    with torch.no_grad():
        probs = torch.softmax(model(torch.stack([transform(image) for image in images])), dim=-1)
    values, indices = probs.topk(k, dim=-1)
    return [[{"class": names[i], "probability": float(v)} for v, i in zip(row_values, row_indices)]
            for row_values, row_indices in zip(values.tolist(), indices.tolist())]


def predict_images(paths: Sequence[str | Path], checkpoint: str | Path, top_k: int = 5) -> list[dict[str, Any]]:
    """Top-``top_k`` classes with probabilities for each image file, preprocessed as in evaluation
    (any size and mode: converted to the training channels, resized, normalised)."""
    from bp_apps.vision.data import load_image

    model, prep = load_image_classifier(checkpoint)
    channels = prep["input_shape"][0]
    return [{"path": str(path), "top": rank_images(model, prep, [load_image(path, channels)], top_k)[0]}
            for path in paths]
