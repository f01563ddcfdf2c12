"""What the tasks' test reports share: the examples a test visits, rows gathered from every process, figures saved
atomically, and a table of counts drawn as a heat map.

A task's ``on_test_epoch_end`` writes its report files into :func:`bp_apps.core.callbacks.report_dir` on global
rank zero. Under several processes each one has evaluated its own shard of the test set, so the per-example rows
are first gathered (:func:`gather_rows`, ``torch.distributed.all_gather_object``: the rows hold strings, which
``LightningModule.all_gather`` cannot carry) and put back into the order one process would have written them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch.utils.data import DataLoader, RandomSampler

from bp_apps.core.io import atomic_output

__all__ = ["evaluation_order", "gather_rows", "running_test_loader", "save_count_matrix", "save_figure"]

T = TypeVar("T")


def gather_rows(rows: list[T]) -> list[T]:
    """Every process's ``rows``, concatenated in rank order (the rows as they are with a single process). Every
    process must call it: it is a collective operation under ``torch.distributed``."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return rows
    world = torch.distributed.get_world_size()
    if world == 1:
        return rows
    gathered: list[Any] = [None] * world
    torch.distributed.all_gather_object(gathered, rows)
    return [row for part in gathered for row in part]


def running_test_loader(trainer: Any) -> DataLoader | None:
    """The (first) test loader of the running ``trainer.test``, or None outside one."""
    loaders = getattr(trainer, "test_dataloaders", None)
    if isinstance(loaders, (list, tuple)):
        loaders = loaders[0] if loaders else None
    elif isinstance(loaders, dict):
        loaders = next(iter(loaders.values()), None)
    return loaders if isinstance(loaders, DataLoader) else None


def evaluation_order(loader: DataLoader | None) -> list[list[int]] | None:
    """The dataset indices of each batch ``loader`` yields, in order, so that the rows of a report can name their
    examples (and be sorted back into the order of one process after a gather). None when that order cannot be
    known beforehand: no loader, an iterable dataset, or a randomly shuffled one."""
    if loader is None or getattr(loader, "batch_sampler", None) is None:
        return None
    if isinstance(getattr(loader, "sampler", None), RandomSampler):
        return None
    try:
        return [[int(i) for i in batch] for batch in loader.batch_sampler]
    except TypeError:  # a sampler that does not yield index batches
        return None


def save_figure(figure: Any, path: Path) -> Path:
    """Save a matplotlib figure to ``path`` atomically (a temporary name in the same folder, then a rename), so no
    reader ever sees half a PNG. Report figures are ``matplotlib.figure.Figure`` objects, never pyplot's: pyplot
    keeps no reference to them, and drawing them switches no backend (a notebook keeps showing its own plots)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path, suffix=".png") as temporary:
        figure.savefig(temporary, dpi=100, format="png")
    return path


def save_count_matrix(counts: Sequence[Sequence[int]], row_labels: Sequence[str], column_labels: Sequence[str],
                      path: Path, title: str, xlabel: str = "predicted", ylabel: str = "true",
                      split_after: int | None = None) -> Path:
    """A table of counts as a heat map with the numbers written in (up to 20 columns), saved atomically to ``path``.

    The colour of a cell is its share of its row, so a rare class is as readable as a frequent one.
    ``split_after`` draws a vertical rule after that many columns (columns that are not classes: missed, spurious).
    """
    import numpy as np
    from matplotlib.figure import Figure

    matrix = np.asarray(counts, dtype=float).reshape(len(row_labels), len(column_labels))
    if matrix.size and matrix.min() < 0:
        raise ValueError(f"{path}: counts must be non-negative")
    rows, columns = matrix.shape
    totals = matrix.sum(axis=1, keepdims=True)
    shares = np.divide(matrix, totals, out=np.zeros_like(matrix), where=totals > 0)
    width = max(4.0, min(0.5 * columns + 2.5, 18.0))
    height = max(3.0, min(0.45 * rows + 2.0, 18.0))
    figure = Figure(figsize=(width, height))
    axes = figure.subplots()
    axes.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto")
    axes.set(xticks=range(columns), yticks=range(rows), xlabel=xlabel, ylabel=ylabel, title=title)
    axes.set_xticklabels(column_labels, rotation=90 if columns > 10 or max(map(len, column_labels), default=0) > 6
                         else 0)
    axes.set_yticklabels(row_labels)
    if columns <= 20:
        for i in range(rows):
            for j in range(columns):
                axes.text(j, i, int(matrix[i, j]), ha="center", va="center", fontsize=8,
                          color="white" if shares[i, j] > 0.5 else "black")
    if split_after is not None and 0 < split_after < columns:
        axes.axvline(split_after - 0.5, color="black", linewidth=1.5)
    figure.tight_layout()
    return save_figure(figure, path)
