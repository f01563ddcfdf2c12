"""What an image-classification test leaves beside ``confusion_matrix.png``: ``misclassified.png``, a grid of the
first test images the model got wrong, so that its mistakes can be looked at, not only counted.

The images reach the model normalised with the data's per-channel mean and standard deviation; the grid undoes
that (``x * std + mean``) so they look as they were. Without those figures (a data module that does not give
them) each image is stretched to its own range instead, which shows its content but not its true brightness.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from bp_apps.core.reports import save_figure

__all__ = ["MAX_MISCLASSIFIED", "Misclassified", "denormalise", "misclassified_in_batch", "save_misclassified"]

MAX_MISCLASSIFIED = 36
"""The most images ``misclassified.png`` shows (a 6 x 6 grid)."""


@dataclass(frozen=True)
class Misclassified:
    """One wrongly classified test image (as the model saw it, ``(C, H, W)``), its true and predicted classes, the
    probability the model gave its prediction, and its position in the test set (to keep the first ones)."""

    image: Tensor
    true: int
    predicted: int
    probability: float
    index: int


def misclassified_in_batch(images: Tensor, labels: Tensor, logits: Tensor, indices: Sequence[int],
                           limit: int = MAX_MISCLASSIFIED) -> list[Misclassified]:
    """The batch's misclassified images (at most ``limit``), copied to the CPU; ``indices`` are the images'
    positions in the test set."""
    probabilities = torch.softmax(logits.detach().float(), dim=-1)
    confidence, predicted = probabilities.max(dim=-1)
    wrong = (predicted != labels).nonzero().flatten().tolist()[:limit]
    return [Misclassified(images[i].detach().float().cpu().clone(), int(labels[i]), int(predicted[i]),
                          float(confidence[i]), int(indices[i])) for i in wrong]


def denormalise(image: Tensor, mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> Tensor:
    """A normalised ``(C, H, W)`` image back in ``[0, 1]``: ``x * std + mean`` per channel, clipped; without
    ``mean``/``std``, stretched to its own minimum and maximum."""
    image = image.detach().float().cpu()
    if mean is not None and std is not None:
        channels = image.shape[0]
        if len(mean) not in (1, channels) or len(std) not in (1, channels):
            raise ValueError(f"mean/std of {len(mean)}/{len(std)} channels for an image of {channels}")
        m = torch.tensor(list(mean), dtype=torch.float32).view(-1, 1, 1)
        s = torch.tensor(list(std), dtype=torch.float32).view(-1, 1, 1)
        return (image * s + m).clamp(0.0, 1.0)
    low, high = image.min(), image.max()
    return (image - low) / (high - low) if high > low else torch.zeros_like(image)


def save_misclassified(examples: Sequence[Misclassified], class_names: Sequence[str], path: Path,
                       mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                       limit: int = MAX_MISCLASSIFIED) -> Path:
    """A grid of the first ``limit`` examples (one axes each, titled ``true → predicted (p)``), written atomically
    to ``path``. With no example at all the figure says that every test image was classified correctly."""
    from matplotlib.figure import Figure

    shown = list(examples)[:limit]
    if not shown:
        figure = Figure(figsize=(4, 1.5))
        axes = figure.subplots()
        axes.axis("off")
        axes.text(0.5, 0.5, "no misclassified test images", ha="center", va="center")
        return save_figure(figure, path)
    columns = math.ceil(math.sqrt(len(shown)))
    rows = math.ceil(len(shown) / columns)
    figure = Figure(figsize=(1.9 * columns, 2.1 * rows))
    grid = figure.subplots(rows, columns, squeeze=False)
    for axes in grid.flat[len(shown):]:
        figure.delaxes(axes)
    for axes, example in zip(grid.flat, shown):
        image = denormalise(example.image, mean, std)
        if image.shape[0] == 1:
            axes.imshow(image[0].numpy(), cmap="gray", vmin=0.0, vmax=1.0)
        else:
            axes.imshow(image[:3].permute(1, 2, 0).numpy())
        axes.set_title(f"{class_names[example.true]} → {class_names[example.predicted]} ({example.probability:.2f})",
                       fontsize=7)
        axes.set_xticks([])
        axes.set_yticks([])
    figure.suptitle(f"misclassified test images (first {len(shown)}): true → predicted (probability)", fontsize=9)
    figure.tight_layout()
    return save_figure(figure, path)
