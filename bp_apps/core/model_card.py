"""Model cards and export folders for models handed to other tools (``save_pretrained`` folders and the like).

A shared model has to say what it is without the suite: what it was trained on, how well it did, under which
licence, what it is for and where it fails. :func:`model_card` writes that as the ``README.md`` the Hugging Face
hub reads: YAML front matter (licence, tags, data sets, metric names and a ``model-index`` with the figures), then
prose. The figures come from the run's ``metrics.json`` (:func:`run_metrics` finds it next to the checkpoint).

An export is a folder of several files that only make sense together (weights, config, tokenizer, card).
:func:`staged_export` writes them into a temporary sibling and renames it into place, so a reader sees the old
export or the new one, never a mixture; a marker file (:data:`EXPORT_MARKER`) tells a previous export, which may
be replaced, from any other folder, which is refused. It lives here, beside the card, because every task's
export writes the two together and no task may import another's helpers.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bp_apps.core.io import atomic_write_text, current_umask

__all__ = ["EXPORT_MARKER", "ModelCard", "checkpoint_data", "model_card", "run_metrics", "staged_export",
           "write_model_card"]

EXPORT_MARKER = "bp_apps_export.json"
"""The file every export folder holds: what wrote it (task, checkpoint, format). Its presence marks a folder an
export may replace."""


@dataclass
class ModelCard:
    """What a card says. ``metrics`` are figures by name (``val_rouge1``: 0.41); ``usage`` is a code block shown
    as it is; ``notes`` are extra paragraphs (decoding settings that do not travel with the weights ...)."""

    title: str
    summary: str
    pipeline_tag: str
    license: str = "mit"
    tags: Sequence[str] = ()
    datasets: Sequence[str] = ()
    data: str = ""
    metrics: Mapping[str, float] = field(default_factory=dict)
    metrics_source: str = ""
    intended_use: str = ""
    limitations: Sequence[str] = ()
    usage: str = ""
    notes: Sequence[str] = ()


def _yaml_string(text: str) -> str:
    """A YAML scalar for ``text``: a JSON string is a valid YAML double-quoted scalar."""
    return json.dumps(str(text), ensure_ascii=False)


def _front_matter(card: ModelCard) -> list[str]:
    lines = ["---", f"license: {_yaml_string(card.license)}", "library_name: transformers",
             f"pipeline_tag: {_yaml_string(card.pipeline_tag)}"]
    tags = ["bp-apps", *card.tags]
    lines += ["tags:", *(f"  - {_yaml_string(tag)}" for tag in dict.fromkeys(tags))]
    if card.datasets:
        lines += ["datasets:", *(f"  - {_yaml_string(name)}" for name in card.datasets)]
    figures = {name: value for name, value in card.metrics.items() if math.isfinite(value)}
    if figures:
        lines += ["metrics:", *(f"  - {_yaml_string(name)}" for name in figures)]
        dataset = card.datasets[0] if card.datasets else "bp-apps run data"
        lines += ["model-index:", f"  - name: {_yaml_string(card.title)}", "    results:",
                  f"      - task: {{type: {_yaml_string(card.pipeline_tag)}}}",
                  f"        dataset: {{type: {_yaml_string(dataset)}, name: {_yaml_string(dataset)}}}",
                  "        metrics:"]
        lines += [f"          - {{type: {_yaml_string(name)}, name: {_yaml_string(name)}, value: {value!r}}}"
                  for name, value in figures.items()]
    lines.append("---")
    return lines


def model_card(card: ModelCard) -> str:
    """The card's text: front matter, then sections on the model, its data, its figures, use and limits."""
    lines = [*_front_matter(card), "", f"# {card.title}", "", card.summary, ""]
    lines += ["## Training data", "", card.data or "Not recorded with the checkpoint.", ""]
    lines += ["## Evaluation", ""]
    figures = {name: value for name, value in card.metrics.items() if math.isfinite(value)}
    if figures:
        lines += [f"From {card.metrics_source or 'the training run'}:", "", "| metric | value |", "|---|---|"]
        lines += [f"| {name} | {value:.4f} |" for name, value in figures.items()]
    else:
        lines.append("No figures were found next to the checkpoint (the run's `metrics.json`).")
    lines += ["", "## Intended use", "", card.intended_use or "Research and teaching.", ""]
    if card.limitations:
        lines += ["## Limitations", "", *(f"- {item}" for item in card.limitations), ""]
    if card.usage:
        lines += ["## Usage", "", "```python", card.usage.strip("\n"), "```", ""]
    for note in card.notes:
        lines += [note, ""]
    lines += ["## Licence", "", f"The weights are released under the `{card.license}` licence of bp-apps; the "
              "training data keeps its own terms.", ""]
    return "\n".join(lines)


def write_model_card(directory: str | Path, card: ModelCard) -> Path:
    """Write ``README.md`` into ``directory`` atomically; returns its path."""
    return atomic_write_text(Path(directory) / "README.md", model_card(card))


def run_metrics(checkpoint: str | Path) -> tuple[dict[str, float], str]:
    """The scalar figures of the run that wrote ``checkpoint`` and where they were read: ``metrics.json`` in the
    checkpoint's folder or the one above it (the logger's folder, where the checkpoints sit in ``checkpoints/``).
    Test figures come first, then validation ones, then the best monitored score. None found: ``({}, "")``."""
    checkpoint = Path(checkpoint)
    for folder in (checkpoint.parent, checkpoint.parent.parent):
        path = folder / "metrics.json"
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        if not isinstance(data, dict):
            continue
        figures: dict[str, float] = {}
        for section in ("test", "validation"):
            values = data.get(section)
            if isinstance(values, dict):
                figures.update({k: float(v) for k, v in values.items() if _number(v)})
        figures.update({k: float(v) for k, v in data.items() if k.startswith("best_") and _number(v)})
        return figures, str(path.name if folder == checkpoint.parent else Path("..") / path.name)
    return {}, ""


def checkpoint_data(checkpoint: Mapping[str, Any] | None) -> tuple[list[str], str]:
    """The data sets a checkpoint was trained on and a line on its data module's settings, from the module's saved
    hyperparameters (``datamodule_hyper_parameters``). Paths and folders are left out: they name the machine the
    run was on, not the data."""
    hparams = (checkpoint or {}).get("datamodule_hyper_parameters")
    if not isinstance(hparams, Mapping):
        return [], ""
    datasets = [str(hparams[k]) for k in ("name", "dataset", "hf_name") if isinstance(hparams.get(k), str)
                and hparams[k]]
    skipped = ("root", "dir", "file", "path", "cache")
    settings = {k: v for k, v in sorted(hparams.items()) if isinstance(k, str) and not k.startswith("_")
                and not any(word in k for word in skipped) and isinstance(v, str | int | float | bool)}
    if not settings:
        return datasets, ""
    return datasets, "Data module settings: " + ", ".join(f"`{k}={v}`" for k, v in settings.items()) + "."


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_previous_export(folder: Path) -> bool:
    return (folder / EXPORT_MARKER).is_file()


@contextlib.contextmanager
def staged_export(out: str | Path, marker: Mapping[str, Any], *, replace_any: bool = False) -> Iterator[Path]:
    """A fresh temporary folder beside ``out`` to write an export into; when the block ends without an error,
    :data:`EXPORT_MARKER` (``marker`` as JSON) is added and the folder is renamed to ``out``, replacing a previous
    export there. An existing ``out`` that is a file, or a non-empty folder without the marker, is refused with a
    ValueError before anything is written (``replace_any``: replace any folder, for a folder the suite owns such
    as ``hf_best``). On an error the temporary folder is removed and ``out`` is left as it was."""
    out = Path(out)
    if out.exists() and not replace_any:
        if not out.is_dir():
            raise ValueError(f"export folder {str(out)!r} is a file: choose a new folder")
        if any(out.iterdir()) and not _is_previous_export(out):
            raise ValueError(f"export folder {str(out)!r} is not empty and holds no earlier export ({EXPORT_MARKER}): "
                             "choose a new or empty folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    fresh = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    old: Path | None = None
    try:
        yield fresh
        atomic_write_text(fresh / EXPORT_MARKER, json.dumps(dict(marker), indent=2, sort_keys=True) + "\n")
        mask = current_umask()  # mkdtemp makes 0700 and some writers 0600 files; an export is shared like any folder
        os.chmod(fresh, 0o777 & ~mask)
        for path in fresh.rglob("*"):
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            os.replace(out, old / out.name)
        os.replace(fresh, out)
    except BaseException:
        shutil.rmtree(fresh, ignore_errors=True)
        if old is not None and not out.exists() and (old / out.name).exists():
            os.replace(old / out.name, out)  # the rename failed: put the previous export back
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

