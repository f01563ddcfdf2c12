"""Which task wrote a checkpoint, read before any model is built, and the optional packages a command needs.

Serving and exporting accept the checkpoint of any task; the task name every ``TaskModule`` stores
(:data:`~bp_apps.core.task.TASK_KEY`) picks the task's own safe loader. The packages of the ``serve`` and ``export``
extras are imported lazily, so the rest of the suite runs without them, and a missing one is named together with
the extra that installs it."""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

from bp_apps.core.io import load_checkpoint_dict
from bp_apps.core.task import TASK_KEY

__all__ = ["LABELING", "RECOGNIZER", "SPOKEN_DIGITS", "SUMMARIZATION", "TASKS", "VISION", "MissingExtraError",
           "checkpoint_task", "require"]

VISION = "vision.ImageClassifier"
RECOGNIZER = "speech.SpeechRecognizer"
SPOKEN_DIGITS = "speech.SpokenDigitClassifier"
LABELING = "text.TokenLabeler"
SUMMARIZATION = "text.Summarizer"
TASKS = (VISION, RECOGNIZER, SPOKEN_DIGITS, LABELING, SUMMARIZATION)
"""The task names the checkpoints of this suite carry (each task module's ``task_name``)."""


class MissingExtraError(ValueError):
    """An optional package a command needs is not installed (the message names the extra to install). A
    ValueError, so the command line reports it in one line."""


def require(module: str, extra: str, command: str) -> ModuleType:
    """``import module``, or a :class:`MissingExtraError` naming the ``extra`` of bp_apps that installs it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        raise MissingExtraError(f"{command} needs the package {error.name or module!r}, which is not installed: "
                                f"pip install \"bp_apps[{extra}]\"") from None


def checkpoint_task(path: str | Path) -> str:
    """The task that wrote the checkpoint at ``path`` (read safely, ``weights_only=True``); a ValueError naming the
    file when it carries no task name of this suite."""
    checkpoint = load_checkpoint_dict(path)
    task = checkpoint.get(TASK_KEY)
    if task not in TASKS:
        found = f"task {task!r}" if task else f"no task name (field {TASK_KEY!r})"
        raise ValueError(f"{path}: not a bp_apps task checkpoint: it has {found}; expected one of {', '.join(TASKS)}")
    return task
