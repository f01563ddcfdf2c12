"""What a data module shares with the model it feeds, so that the model never reads ``trainer.datamodule``.

- Sizes, names and files: a data module exposes them right after ``__init__`` (``num_classes``, ``input_shape``,
  ``input_dim``, ``class_names``, ``lexicon_words``, and the paths of the vocabulary or tokenizer files it builds in
  ``prepare_data``); ``bp-apps`` links each one (:data:`LINKED`) to the model's
  argument of the same name. A Trainer built by hand gets no links, so :meth:`PreprocessingDataModule.check_model`
  (called by ``setup``) refuses a model built for other sizes.
- Preprocessing: what prediction needs to treat new inputs like this data (class names, normalisation, feature
  settings) is the data module's ``state_dict()``. Lightning saves it in every checkpoint under the class's
  ``__qualname__`` and hands it back to ``load_state_dict`` on resume; :func:`saved_preprocessing` finds it again.
- A data module of the user's own (any ``LightningDataModule``) has no such state. A task that supports one offers
  a :class:`UserDataModuleCheck` (its ``user_data_callback()``, which ``bp-apps`` adds to every run): in ``setup``
  (before any training) it reads what prediction needs from the data module's attributes or hyperparameters,
  falling back on the task's defaults, or fails there naming what the data module must provide; it checks the first
  batch of each stage against the model; and it saves that preprocessing in every checkpoint under
  :data:`USER_DATA_KEY`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any, ClassVar

import lightning as L

from bp_apps.core.compose import PlainHyperparameters

__all__ = ["CHECKED", "LINKED", "USER_DATA_KEY", "PreprocessingDataModule", "UserDataModuleCheck", "data_value",
           "saved_preprocessing"]

LINKED = ("num_classes", "input_shape", "input_dim", "class_names", "mean", "std", "lexicon_words", "vocab_file",
          "tokenizer_file", "max_source_tokens", "max_target_tokens")
"""Data-module attributes ``bp-apps`` passes to the model's argument of the same name. A data module has only those
its models take: LightningCLI records a linked value in the model's saved hyperparameters even when the model has
no such argument (the link itself is skipped), and ``--ckpt_path`` then fails on the unknown argument."""
CHECKED = ("num_classes", "input_shape", "input_dim")
"""The linked sizes a network is built for: a model built for other values than the data gives is refused."""
DATAMODULE_KEY = "datamodule"
"""The key of the state naming the data module's class (also the state's key in the checkpoint)."""
LEGACY_KEY = "bp_apps_preprocessing"
"""Where the models stored the preprocessing in checkpoints written before it became the data module's state."""
USER_DATA_KEY = "user_datamodule_preprocessing"
"""Where :class:`UserDataModuleCheck` saves the preprocessing read from a data module of the user's own."""


def _plain(value: Any) -> Any:
    """Lists and tuples as tuples, so ``[1, 8, 8]`` from a config equals ``(1, 8, 8)``."""
    return tuple(value) if isinstance(value, list | tuple) else value


class PreprocessingDataModule(PlainHyperparameters, L.LightningDataModule):
    """A data module whose checkpoint state is its :meth:`preprocessing`, and which checks the attached model's
    sizes in ``setup`` (subclasses call :meth:`check_model` first thing)."""

    MUST_MATCH: ClassVar[tuple[str, ...]] = ()
    """Preprocessing entries a resumed or tested checkpoint must share with this data: its weights learned them."""

    def preprocessing(self) -> dict[str, Any]:
        """What prediction needs to preprocess inputs like this data (plain values: checkpoints load with
        ``weights_only=True``)."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {**self.preprocessing(), DATAMODULE_KEY: type(self).__qualname__}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Refuse a checkpoint (resumed, or tested with ``ckpt_path``) whose :data:`MUST_MATCH` entries differ
        from this data's."""
        current = self.preprocessing()
        differing = [k for k in self.MUST_MATCH if k in state_dict and _plain(state_dict[k]) != _plain(current[k])]
        if differing:
            found = "; ".join(f"{k}: checkpoint {state_dict[k]!r}, data {current[k]!r}" for k in differing)
            raise ValueError(f"the checkpoint was trained on data preprocessed differently ({found}); use the "
                             "data settings it was trained with")

    def check_model(self) -> None:
        """Refuse an attached model built for other sizes (:data:`CHECKED`) than this data gives."""
        model = self.trainer.lightning_module if self.trainer is not None else None
        hparams = getattr(model, "hparams", {})
        for name in CHECKED:
            if name not in hparams or not hasattr(self, name):
                continue
            given, built = _plain(getattr(self, name)), _plain(hparams[name])
            if given != built:
                raise ValueError(f"the data gives {name}={given} but the model was built for {name}={built}: "
                                 f"build it with {name}={given} (the data module's {name}; bp-apps links it)")


def data_value(datamodule: Any, name: str) -> Any:
    """The data module's attribute ``name``, else its saved hyperparameter of that name, else None: where a data
    module of the user's own can say what prediction needs (``class_names``, ``mean``, ``features`` ...)."""
    try:
        value = getattr(datamodule, name, None)
    except (AttributeError, LookupError, OSError, RuntimeError, ValueError):  # a property that cannot answer yet
        value = None
    if value is None:
        hparams = getattr(datamodule, "hparams", None)
        value = hparams.get(name) if isinstance(hparams, Mapping) else None
    return value


PreprocessingReader = Callable[[Any, Any], dict[str, Any]]
"""``(data module, model) -> preprocessing``: plain values read from a user's data module (:func:`data_value`) or
the task's defaults; raises ValueError naming what the data module must provide when there is no sane default."""
BatchCheck = Callable[[Any, Any, str], None]
"""``(batch, model, stage) -> None``: raises ValueError when a batch does not fit the model (shape, label range)."""


class UserDataModuleCheck(L.Callback):
    """What a suite data module does for its model, done for a data module of the user's own.

    Active only when the trainer's data module is not a :class:`PreprocessingDataModule` (a run with plain data
    loaders and no data module is left alone). In ``setup``, before any batch, ``read`` takes the preprocessing
    prediction needs from the data module (its error, e.g. "give the data module a ``features`` attribute", ends
    the run before training rather than after it); the first batch of each stage goes through ``check`` (so a
    batch the network cannot take fails with a message naming the setting, not deep inside a layer); and every
    checkpoint gets the preprocessing under :data:`USER_DATA_KEY`, where :func:`saved_preprocessing` finds it."""

    def __init__(self, read: PreprocessingReader, check: BatchCheck | None = None) -> None:
        self.read, self.check = read, check
        self.preprocessing: dict[str, Any] | None = None
        self._checked: set[str] = set()

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        data = trainer.datamodule
        self._checked = set()
        if data is None or isinstance(data, PreprocessingDataModule):
            self.preprocessing = None
            return
        self.preprocessing = self.read(data, pl_module)

    def _check(self, batch: Any, pl_module: L.LightningModule, stage: str) -> None:
        if self.preprocessing is None or self.check is None or stage in self._checked:
            return
        self._checked.add(stage)
        self.check(batch, pl_module, stage)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._check(batch, pl_module, "training")

    def on_validation_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                                  batch_idx: int, dataloader_idx: int = 0) -> None:
        self._check(batch, pl_module, "validation")

    def on_test_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int,
                            dataloader_idx: int = 0) -> None:
        self._check(batch, pl_module, "test")

    def on_predict_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                               batch_idx: int, dataloader_idx: int = 0) -> None:
        self._check(batch, pl_module, "predict")

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        if self.preprocessing is not None:
            checkpoint[USER_DATA_KEY] = dict(self.preprocessing)


def saved_preprocessing(checkpoint: dict[str, Any], required: Collection[str]) -> dict[str, Any] | None:
    """The preprocessing a data module saved in ``checkpoint`` (the state stored under the class name it names,
    or the entry of a checkpoint written before that, :data:`LEGACY_KEY`) holding every ``required`` key; None
    when there is none."""
    states = [v for k, v in checkpoint.items() if isinstance(v, dict) and v.get(DATAMODULE_KEY) == k]
    states += [checkpoint.get(USER_DATA_KEY), checkpoint.get(LEGACY_KEY)]
    return next((s for s in states if isinstance(s, dict) and set(required) <= s.keys()), None)
