"""Hugging Face ``datasets`` as a source for the text data modules: a data set on the hub by name, local files
(``data_files``: JSON Lines, CSV/TSV or Parquet) or a folder written by ``Dataset.save_to_disk``.

The two text tasks' ``HF*DataModule`` classes share the rules here, so both read a source the same way:

- ``data_files`` is one path (or a list of paths): the training data; or a mapping from split name to path(s), whose
  names are the module's ``train_split`` / ``val_split`` / ``test_split``. Relative paths are under the data root
  (``data_root``, else ``$BP_APPS_DATA``, else ``./data``), as for the suite's file modules; ``*`` patterns are
  expanded there. The file extension picks the ``datasets`` builder (:data:`BUILDERS`); the files of one source
  share it.
- ``saved_dataset`` is a folder ``save_to_disk`` wrote (one data set: the training data; or a dict of splits).
- Otherwise ``name`` (and ``config_name``) is looked up on the hub (online, or the local ``datasets`` cache).

A source with one split holds only training data (the module holds out validation, and tests on it); in a source
with several splits, each split the module names must exist (an error lists the ones there; a null ``val_split`` or
``test_split`` leaves that split out). ``datasets`` is imported only when data is read: without it the error says
``pip install "bp_apps[hf]"``.
"""

from __future__ import annotations

import glob
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bp_apps.core.io import data_root_hint, resolve_data_root

__all__ = ["BUILDERS", "HF_EXTRA", "DatasetsMissingError", "HFSource", "require_columns"]

HF_EXTRA = 'pip install "bp_apps[hf]"'
"""How to install ``datasets`` (the ``hf`` extra)."""
BUILDERS = {".json": ("json", {}), ".jsonl": ("json", {}), ".csv": ("csv", {}), ".tsv": ("csv", {"sep": "\t"}),
            ".parquet": ("parquet", {})}
"""File extension -> the ``datasets`` builder that reads it, and the builder's settings."""

DataFiles = str | Sequence[str] | Mapping[str, str | Sequence[str]]


class DatasetsMissingError(ImportError, ValueError):
    """``datasets`` is not installed. Also a ValueError, so ``bp-apps`` reports it in one line (exit status 2)."""


def import_datasets(what: str) -> Any:
    """The ``datasets`` module, or :class:`DatasetsMissingError` saying how to install it."""
    try:
        import datasets
    except ImportError as error:
        raise DatasetsMissingError(f"{what} needs the Hugging Face 'datasets' package: {HF_EXTRA}") from error
    return datasets


def _paths(value: str | Sequence[str], field: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, Sequence) and value and all(isinstance(v, str) for v in value):
        return list(value)
    raise ValueError(f"{field}: expected a path or a list of paths, got {value!r}")


def files_of(files: Mapping[str, Sequence[Path]]) -> list[Path]:
    """Every file of a split -> files mapping, once each, in order."""
    return list(dict.fromkeys(p for paths in files.values() for p in paths))


def _digest_files(paths: Sequence[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(str(path.absolute()).encode() + b"\0")
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class HFSource:
    """Where a text data module's records come from: ``data_files``, else ``saved_dataset``, else the hub's
    ``name``/``config_name`` (see the module's docstring for the rules)."""

    name: str | None = None
    config_name: str | None = None
    data_files: DataFiles | None = None
    saved_dataset: str | None = None
    data_root: str | None = None

    def __post_init__(self) -> None:
        if self.data_files is not None and self.saved_dataset is not None:
            raise ValueError("give data_files or saved_dataset, not both")
        if self.data_files is not None:
            self.files()  # checks the shape of the setting now, before anything is read
        elif self.saved_dataset is None and not self.name:
            raise ValueError("give a data set name, data_files or saved_dataset")

    @property
    def kind(self) -> str:
        """``data_files``, ``saved_dataset`` or ``hub``."""
        return "data_files" if self.data_files is not None else "saved_dataset" if self.saved_dataset else "hub"

    def _resolve(self, name: str) -> Path:
        path = Path(name).expanduser()
        return path if path.is_absolute() else resolve_data_root(self.data_root) / path

    def files(self) -> dict[str, list[Path]]:
        """``data_files`` as split name -> files (one path or a list: ``train``), patterns expanded; nothing is
        checked to exist here (reading says what is missing)."""
        value = self.data_files
        if isinstance(value, Mapping):
            if not value:
                raise ValueError("data_files: the mapping of split name to files is empty")
            named = {str(split): _paths(paths, f"data_files.{split}") for split, paths in value.items()}
        else:
            named = {"train": _paths(value, "data_files")}  # type: ignore[arg-type]
        out: dict[str, list[Path]] = {}
        for split, names in named.items():
            found: list[Path] = []
            for name in names:
                path = self._resolve(name)
                matches = sorted(glob.glob(str(path))) if glob.has_magic(str(path)) else []
                found += [Path(m) for m in matches] or [path]
            out[split] = found
        return out

    def folder(self) -> Path:
        """The ``saved_dataset`` folder (relative: under the data root)."""
        assert self.saved_dataset is not None
        return self._resolve(self.saved_dataset)

    def identity(self) -> dict[str, Any]:
        """What names the source without reading it: the files or folder (absolute), or the hub name."""
        if self.kind == "data_files":
            files = self.files()
            return {"source": "data_files", "files": {k: [str(p.absolute()) for p in v] for k, v in files.items()}}
        if self.kind == "saved_dataset":
            return {"source": "saved_dataset", "folder": str(self.folder().absolute())}
        return {"source": "huggingface", "name": self.name, "config_name": self.config_name}

    def fingerprint(self, train_split: str) -> dict[str, Any]:
        """The contents behind the training data: a digest of the training files, or of a saved folder's JSON
        metadata (``datasets`` writes each data set's fingerprint into ``state.json``); empty for a hub name,
        which names its contents. Missing files give an empty digest (reading then names them)."""
        if self.kind == "data_files":
            files = self.files()
            train = files.get(train_split, files.get("train", []))
            return {"train": _digest_files(train) if all(p.is_file() for p in train) else None}
        if self.kind == "saved_dataset":
            folder = self.folder()
            meta = sorted(folder.rglob("*.json")) if folder.is_dir() else []
            return {"saved": _digest_files(meta) if meta else None}
        return {}

    def label(self, split: str) -> str:
        """For messages: where a split's rows come from (its files, the folder, or ``name/config:split``)."""
        if self.kind == "data_files":
            files = self.files().get(split) or self.files().get("train", [])
            return ", ".join(str(p) for p in files)
        if self.kind == "saved_dataset":
            return f"{self.folder()}:{split}"
        return f"{self.name}/{self.config_name}:{split}" if self.config_name else f"{self.name}:{split}"

    def _load_all(self, what: str) -> tuple[Mapping[str, Any], dict[str, str]]:
        """Every split of the source (``datasets`` objects) and each split's label for messages."""
        datasets = import_datasets(what)
        if self.kind == "data_files":
            files = self.files()
            for path in files_of(files):
                if not path.is_file():
                    raise FileNotFoundError(f"data_files: {path} not found (looked for {str(path.absolute())!r}; "
                                            "relative paths are under the data root: "
                                            f"{data_root_hint(self.data_root)})")
                if path.suffix.lower() not in BUILDERS:
                    raise ValueError(f"data_files: {path}: cannot tell the format from the extension "
                                     f"{path.suffix or '(none)'!r}; accepted: {', '.join(BUILDERS)}")
            suffixes = sorted({p.suffix.lower() for p in files_of(files)})
            if len({repr(BUILDERS[s]) for s in suffixes}) > 1:
                raise ValueError(f"data_files: the files must share one format, got {', '.join(suffixes)}")
            builder, settings = BUILDERS[suffixes[0]]
            try:
                loaded = datasets.load_dataset(builder, data_files={k: [str(p) for p in v] for k, v in files.items()},
                                               **settings)
            except (ValueError, TypeError, KeyError, datasets.exceptions.DatasetsError) as error:
                detail = error.__cause__ or error  # datasets wraps pyarrow's parse error, which names the row
                raise ValueError(f"data_files: cannot read {', '.join(str(p) for p in files_of(files))} as "
                                 f"{builder}: {type(detail).__name__}: {detail}") from error
            return loaded, {k: ", ".join(str(p) for p in v) for k, v in files.items()}
        if self.kind == "saved_dataset":
            folder = self.folder()
            if not folder.is_dir():
                raise FileNotFoundError(f"saved_dataset: folder {folder} not found (looked for "
                                        f"{str(folder.absolute())!r}; {data_root_hint(self.data_root)})")
            try:
                loaded = datasets.load_from_disk(str(folder))
            except FileNotFoundError as error:
                raise ValueError(f"saved_dataset: {folder} is not a folder written by save_to_disk ({error})") from None
            if not isinstance(loaded, Mapping):
                loaded = {"train": loaded}
            return loaded, {k: f"{folder}:{k}" for k in loaded}
        loaded = datasets.load_dataset(self.name, self.config_name)
        return loaded, {k: self.label(k) for k in loaded}

    def load(self, splits: Mapping[str, str | None], what: str) -> dict[str, tuple[Any, str]]:
        """``key -> (rows, label)`` for the module's ``splits`` (key -> split name; ``train`` first, then ``val``
        and ``test``, which may be None). A source with one split gives ``train`` only; otherwise a named split
        that is not there is a ValueError listing the ones that are."""
        loaded, labels = self._load_all(what)
        available = list(loaded)
        where = self.label("train") if self.kind == "data_files" else (
            str(self.folder()) if self.kind == "saved_dataset" else self.name)
        out: dict[str, tuple[Any, str]] = {}
        for key, split in splits.items():
            if split is None:
                continue
            if split not in loaded and (key == "train" and len(available) == 1):
                split = available[0]  # one split: it is the training data, whatever its name
            if split in loaded:
                out[key] = (loaded[split], labels[split])
                continue
            if key != "train" and len(available) == 1:
                continue  # training data only: validation is held out, testing uses it
            option = {"train": "train_split", "val": "val_split", "test": "test_split"}[key]
            hint = {"train": "", "val": "; a null val_split holds validation out of the training data",
                    "test": "; a null test_split tests on the validation data"}[key]
            raise ValueError(f"{where}: no split {split!r} for {option}; splits there: {', '.join(available)}{hint}")
        return out


def require_columns(dataset: Any, columns: Mapping[str, str | Sequence[str]], where: str) -> None:
    """Refuse rows without a named column, naming the source (``where``), the column, its setting (``columns``:
    setting -> column name or names) and the columns there are."""
    present = list(getattr(dataset, "column_names", None) or [])
    if not present:
        return  # not a datasets table: the row readers name a missing field per row
    for option, names in columns.items():
        for name in [names] if isinstance(names, str) else names:
            if name not in present:
                raise ValueError(f"{where}: no column {name!r} ({option}); columns there: {', '.join(present)}")
