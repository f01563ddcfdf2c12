"""Composition: a task is given its network as a class (``class_path`` in a config) and its settings as dataclass
groups, and both are saved in the checkpoint as plain data.

- A network argument is a *factory*: a class (or ``functools.partial`` of one) that the task calls with the sizes
  only the data knows (classes, input shape, vocabulary). In a YAML config it is written as
  ``{class_path: ..., init_args: {...}}`` without those sizes; LightningCLI hands the task a callable.
- A settings group (:class:`~bp_apps.core.task.OptimizerConfig`, a summarizer's generation settings, ...) is a
  dataclass checked in ``__post_init__``; configs write it as a mapping.
- :func:`plain` turns both into dicts and lists, which is what ``save_hyperparameters`` keeps: checkpoints then load
  with ``weights_only=True``. :func:`network_factory` and :func:`settings` turn them back, importing a network class
  only from :data:`TRUSTED_MODULES` (a checkpoint never makes the suite import arbitrary code).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from torch import nn

__all__ = ["TRUSTED_MODULES", "NetFactory", "PlainHyperparameters", "network_factory", "plain", "settings"]

NetFactory = Callable[..., nn.Module]
"""A network class or ``functools.partial`` of one; the task calls it with the data's sizes."""
TRUSTED_MODULES = ("bp_apps.", "torchvision.models.", "torch.nn.")
"""Module prefixes a saved ``class_path`` may name; anything else is refused when a checkpoint is loaded."""

S = TypeVar("S")


def class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def plain(value: Any, field: str = "hyperparameter") -> Any:
    """``value`` as plain data: a dataclass as a dict of its fields, a class or a ``partial`` of a class as
    ``{"class_path": ..., "init_args": {...}}``, containers element-wise. Raises ValueError, naming ``field``, for
    a callable that cannot be written down (a lambda or a bound function): the checkpoint could not rebuild it."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name), f"{field}.{f.name}") for f in dataclasses.fields(value)}
    if isinstance(value, functools.partial) and isinstance(value.func, type) and not value.args:
        return {"class_path": class_path(value.func), "init_args": plain(value.keywords, field)}
    if isinstance(value, type):
        return {"class_path": class_path(value), "init_args": {}}
    if isinstance(value, Mapping):
        return {k: plain(v, f"{field}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain(v, field) for v in value)
    if callable(value):
        raise ValueError(f"{field}: give a class or functools.partial(SomeClass, keyword=...) so the checkpoint can "
                         f"rebuild it, not {value!r}")
    return value


def _trusted_class(path: str, field: str) -> type:
    module_name, _, name = path.rpartition(".")
    if not module_name or not (module_name + ".").startswith(TRUSTED_MODULES):
        raise ValueError(f"{field}: class_path {path!r} is outside the modules a saved network may name "
                         f"({', '.join(p.rstrip('.') for p in TRUSTED_MODULES)})")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"{field}: class_path {path!r} does not exist: {error}") from error
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"{field}: class_path {path!r} is not a torch.nn.Module class")
    return cls


def network_factory(spec: Any, field: str = "net") -> NetFactory:
    """A callable that builds the network: ``spec`` itself when it is a class or a callable (as LightningCLI or a
    user passes it), or the class a saved ``{"class_path", "init_args"}`` names (trusted modules only) with its
    arguments bound."""
    if isinstance(spec, Mapping):
        if "class_path" not in spec:
            raise ValueError(f"{field}: a saved network needs 'class_path', got keys {sorted(spec)}")
        init_args = spec.get("init_args") or {}
        if not isinstance(init_args, Mapping):
            raise ValueError(f"{field}: 'init_args' must be a mapping, got {type(init_args).__name__}")
        return functools.partial(_trusted_class(str(spec["class_path"]), field), **init_args)
    if callable(spec):
        return spec
    raise ValueError(f"{field}: expected a network class (class_path in a config), got {spec!r}")


def settings(cls: type[S], value: Any, field: str, default: S | None = None) -> S:
    """``value`` as the dataclass ``cls``: an instance as it is, a mapping over ``default``'s fields (or the
    class defaults), None as ``default``. Unknown keys raise a ValueError naming ``field``."""
    base = default if default is not None else cls()
    if value is None:
        return base
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"{field}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return dataclasses.replace(base, **value)  # type: ignore[type-var]
    raise ValueError(f"{field}: expected a mapping of {cls.__name__} settings, got {type(value).__name__}")


class PlainHyperparameters:
    """Mixin for a LightningModule or LightningDataModule: ``save_hyperparameters`` as Lightning's, with every value
    made plain data (dataclass groups as dicts, network classes as ``class_path``/``init_args``), so the checkpoint
    loads with ``weights_only=True`` however the object was built (a config, or Python with dataclass instances)."""

    def save_hyperparameters(self, *args: Any, ignore: Any = None, frame: Any = None, logger: bool = True) -> None:
        frame = frame or inspect.currentframe().f_back  # type: ignore[union-attr]
        super().save_hyperparameters(*args, ignore=ignore, frame=frame, logger=logger)  # type: ignore[misc]
        for hparams in (self._hparams, getattr(self, "_hparams_initial", None)):  # type: ignore[attr-defined]
            for key in list(hparams or ()):
                hparams[key] = plain(hparams[key], key)
