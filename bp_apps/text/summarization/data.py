"""Data for abstractive summarization: records, readers, token batches and Lightning data modules.

Files (JSON Lines or CSV/TSV with a header row) -> :func:`read_records` (validated :class:`SummaryRecord`
objects whose ``where`` is ``file:line``) -> a tokenizer (pretrained by name, or trained here on the training
split), which the data module writes to its ``tokenizer_file`` in ``prepare_data`` (the model reads the same file)
-> padded batches from :func:`encode_batch`. Decisions, shared by every reader:

- Text is cleaned with :func:`clean_text` (runs of spaces and tabs become one space; line breaks are kept, one
  per line, because they separate dialogue turns and e-mail lines).
- A target field may hold one string or a list of strings, and several target fields may be named: all of them
  are the record's reference summaries, in order; the first one is the training target. Blank references are
  dropped; a record whose source, or (when targets are required) every reference, is blank after cleaning is
  skipped, with one :class:`UserWarning` per file giving the count and the first line numbers.
- Labels are the target's token ids without a leading CLS/BOS token (:func:`target_ids`), ending with the
  tokenizer's end token (``[SEP]`` or ``</s>``), padded with -100. Sources longer than ``max_source_tokens`` are
  truncated, and the data module warns once that it did so.
"""

from __future__ import annotations

import csv
import hashlib
import json
import platform
import re
import sysconfig
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from tokenizers import Tokenizer
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from bp_apps.core.distributed import shard_by_process
from bp_apps.core.io import (
    atomic_write_text,
    data_file,
    default_cache_dir,
    format_from_suffix,
    jsonl_objects,
    read_json_file,
    resolve_data_root,
    utf8_lines,
)
from bp_apps.core.resume import ResumableDataLoader
from bp_apps.core.samplers import BucketBatchSampler, evaluation_loader
from bp_apps.text.corpus import stdlib_docstrings, summary_pairs
from bp_apps.text.tokenization import tokenizer_from_json, tokenizer_to_json, train_tokenizer

__all__ = [
    "CSV_DELIMITERS",
    "HF_FIELDS",
    "JSONL_SUFFIXES",
    "EmbeddedSummarizationDataModule",
    "HFSummarizationDataModule",
    "SummarizationDataError",
    "SummarizationDataModule",
    "SummaryCollate",
    "SummaryRecord",
    "clean_text",
    "encode_batch",
    "load_tokenizer_file",
    "read_records",
    "records_from_hf",
    "save_tokenizer_file",
    "target_ids",
    "tokenizer_state",
]

JSONL_SUFFIXES = (".jsonl", ".json")
CSV_DELIMITERS = {".csv": ",", ".tsv": "\t"}
# Source and target fields of some Hugging Face summarization data sets (used when none are given).
HF_FIELDS = {
    "xsum": ("document", "summary"),
    "EdinburghNLP/xsum": ("document", "summary"),
    "cnn_dailymail": ("article", "highlights"),
    "abisee/cnn_dailymail": ("article", "highlights"),
    "samsum": ("dialogue", "summary"),
    "knkarthick/dialogsum": ("dialogue", "summary"),
    "aeslc": ("email_body", "subject_line"),
    "billsum": ("text", "summary"),
}
_SHOWN = 5  # line (or row) numbers listed in the "skipped blank records" warning
TOKENIZER_FORMAT = "bp_apps.summarization.tokenizer/1"  # the "format" entry of a tokenizer file
_SPACES = re.compile(r"\s+")


class SummarizationDataError(ValueError):
    """A data file or record that cannot be used; the message starts with ``file:line:`` (or ``file:``)."""


@dataclass(frozen=True)
class SummaryRecord:
    """A source text and its reference summaries (an empty tuple when unlabeled, for prediction);
    ``where`` is ``file:line`` (or ``name[row]``) for messages."""

    source: str
    references: tuple[str, ...] = ()
    id: str | None = None
    where: str = ""


def clean_text(text: str) -> str:
    """``text`` with each line's runs of whitespace (spaces, tabs, no-break spaces) made one space and stripped,
    blank lines dropped, and the remaining lines joined by one ``\\n`` (any line break: ``\\r\\n``, ``\\r``, ...)."""
    lines = (_SPACES.sub(" ", line).strip() for line in text.splitlines())
    return "\n".join(line for line in lines if line)


# ---------------------------------------------------------------- records


def _target_fields(target_field: str | Sequence[str]) -> tuple[str, ...]:
    fields = (target_field,) if isinstance(target_field, str) else tuple(target_field)
    if not fields:
        raise ValueError("target_field must name at least one field")
    return fields


def _string(value: object, field: str, where: str) -> str:
    if not isinstance(value, str):
        raise SummarizationDataError(f"{where}: field {field!r} must be a string, got {type(value).__name__}")
    return value


def _strings(value: object, field: str, where: str) -> list[str]:
    """A target value as a list of strings: one string, or a list of them (several references)."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise SummarizationDataError(
            f"{where}: field {field!r} must be a string or a list of strings, got {type(value).__name__}")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise SummarizationDataError(f"{where}: field {field!r} item {i} must be a string, got "
                                         f"{type(item).__name__}")
    return value


def _record(row: Mapping[str, Any], where: str, source_field: str, target_fields: tuple[str, ...], id_field: str,
            require_target: bool) -> SummaryRecord | None:
    """Validate one row; ``None`` when its source, or every reference while targets are required, is blank.

    A missing target field (or JSON ``null``) is an error only when ``require_target``; otherwise it adds no
    reference.
    """
    if row.get(source_field) is None:
        raise SummarizationDataError(f"{where}: missing field {source_field!r}")
    source = clean_text(_string(row[source_field], source_field, where))
    references: list[str] = []
    for field in target_fields:
        if row.get(field) is None:
            if require_target:
                raise SummarizationDataError(f"{where}: missing field {field!r}")
            continue
        references += [clean_text(text) for text in _strings(row[field], field, where)]
    references = [text for text in references if text]
    if not source or (require_target and not references):
        return None
    raw_id = row.get(id_field)
    return SummaryRecord(source, tuple(references), None if raw_id is None else str(raw_id), where)


def _finish(records: list[SummaryRecord], skipped: list[int], source: str, unit: str) -> list[SummaryRecord]:
    """Warn once about the skipped blank records; raise when no record is left."""
    if skipped:
        shown = ", ".join(map(str, skipped[:_SHOWN])) + (", ..." if len(skipped) > _SHOWN else "")
        warnings.warn(f"{source}: skipped {len(skipped)} record(s) with an empty source or summary at {unit} {shown}",
                      UserWarning, stacklevel=3)
    if not records:
        raise SummarizationDataError(f"{source}: no usable records (the file is empty or every record is blank)")
    return records

def _csv_rows(path: Path, delimiter: str, required: Sequence[str]) -> Iterator[tuple[int, dict[str, str]]]:
    """``(first line number, row)`` for each non-blank row after the header row, which must name ``required``."""
    reader = csv.reader((text + "\n" for _, text in utf8_lines(path, SummarizationDataError)), delimiter=delimiter)
    header: list[str] | None = None
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise SummarizationDataError(f"{path}:{reader.line_num}: {exc}") from None
        if not row:
            continue
        if header is None:
            header = row
            for field in required:
                if field not in header:
                    raise SummarizationDataError(
                        f"{path}:{start}: missing field {field!r} (header columns: {', '.join(header)}; "
                        "CSV files need a header row naming the fields)")
            continue
        if len(row) != len(header):
            raise SummarizationDataError(f"{path}:{start}: {len(row)} values, but the header has {len(header)} columns")
        yield start, dict(zip(header, row))


def read_records(path: Path | str, *, source_field: str = "source", target_field: str | Sequence[str] = "target",
                 id_field: str = "id", require_target: bool = True,
                 format: Literal["auto", "jsonl", "csv", "tsv"] = "auto") -> list[SummaryRecord]:
    """Read summarization records from JSON Lines (``.jsonl``, ``.json``) or CSV/TSV (``.csv``, ``.tsv``, header row
    required), chosen by the extension unless ``format`` says; ``where`` is the file and (first) line of each record.

    ``target_field`` names one field or several (each a string or a list of strings: several references). Problems
    raise :class:`SummarizationDataError` starting with ``file:line:``; blank records are skipped with one warning.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"summarization data file {str(path)!r} does not exist (or is not a file)")
    targets = _target_fields(target_field)
    if format == "auto":
        format = format_from_suffix(path, {"jsonl": JSONL_SUFFIXES, "csv": (".csv",), "tsv": (".tsv",)},
                                    SummarizationDataError)
    if format == "jsonl":
        rows: Iterator[tuple[int, Mapping[str, Any]]] = jsonl_objects(path, SummarizationDataError)
    elif format in ("csv", "tsv"):
        required = [source_field, *(targets if require_target else ())]
        rows = _csv_rows(path, CSV_DELIMITERS[f".{format}"], required)
    else:
        raise ValueError(f"unknown format {format!r}; expected 'auto', 'jsonl', 'csv' or 'tsv'")
    records: list[SummaryRecord] = []
    skipped: list[int] = []
    for lineno, row in rows:
        record = _record(row, f"{path}:{lineno}", source_field, targets, id_field, require_target)
        if record is None:
            skipped.append(lineno)
        else:
            records.append(record)
    return _finish(records, skipped, str(path), "line(s)")


def records_from_hf(rows: Iterable[Mapping[str, Any]], source_field: str = "document",
                    target_field: str | Sequence[str] = "summary", id_field: str = "id",
                    where: str = "hf") -> list[SummaryRecord]:
    """Convert Hugging Face dataset rows (or any dicts) to records with the checks of :func:`read_records`;
    ``where`` prefixes row locations (``xsum:train[3]``)."""
    targets = _target_fields(target_field)
    records: list[SummaryRecord] = []
    skipped: list[int] = []
    for index, row in enumerate(rows):
        record = _record(row, f"{where}[{index}]", source_field, targets, id_field, require_target=True)
        if record is None:
            skipped.append(index)
        else:
            records.append(record)
    return _finish(records, skipped, where, "row(s)")


# ---------------------------------------------------------------- tokenizer files


def tokenizer_state(tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """A fast tokenizer as plain data: ``tokenizer`` (its whole definition as one JSON string) and
    ``special_tokens`` (its special-token map); :func:`tokenizer_from_json` rebuilds it. What a tokenizer file and
    a summarization checkpoint hold."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"a tokenizer file needs a fast tokenizer (tokenizers JSON), got {type(tokenizer).__name__}")
    backend = Tokenizer.from_str(tokenizer_to_json(tokenizer))
    backend.no_truncation()  # set by each call with truncation=True / padding=True: not part of the tokenizer
    backend.no_padding()
    return {"tokenizer": backend.to_str(),
            "special_tokens": {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}}


def save_tokenizer_file(path: str | Path, tokenizer: PreTrainedTokenizerBase) -> Path:
    """Write ``tokenizer`` (:func:`tokenizer_state`) to ``path`` as one JSON file, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, json.dumps({"format": TOKENIZER_FORMAT, **tokenizer_state(tokenizer)}) + "\n")


def load_tokenizer_file(path: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer :func:`save_tokenizer_file` wrote to ``path``; a missing or unreadable file is a
    ValueError naming it."""
    state = read_json_file(path, "tokenizer file", "the data module writes it in prepare_data()")
    try:
        if not isinstance(state, dict) or state.get("format") != TOKENIZER_FORMAT:
            raise ValueError(f"not a {TOKENIZER_FORMAT} file")
        return tokenizer_from_json(state["tokenizer"], state.get("special_tokens"))
    except Exception as error:  # JSON, a missing entry, or a tokenizer the tokenizers library refuses
        raise ValueError(f"{path}: not a readable tokenizer file ({error})") from error


def _file_identity(path: Path) -> list[Any]:
    """A data file as part of a tokenizer's identity: its absolute path, size and modification time (None for
    a file that is not there yet; reading it later says what is missing)."""
    try:
        stat = path.stat()
    except OSError:
        return [str(path.absolute()), None]
    return [str(path.absolute()), stat.st_size, stat.st_mtime_ns]


# ---------------------------------------------------------------- batches


def target_ids(tokenizer: PreTrainedTokenizerBase, text_ids: Sequence[int]) -> list[int]:
    """A tokenized target as labels: without its first token when that is the tokenizer's CLS or BOS token
    (``[CLS] a b [SEP]`` -> ``a b [SEP]``; T5's ``a b </s>`` stays as it is)."""
    leading = {tokenizer.cls_token_id, tokenizer.bos_token_id} - {None}
    return list(text_ids[1:]) if text_ids and text_ids[0] in leading else list(text_ids)


def encode_batch(tokenizer: PreTrainedTokenizerBase, sources: Sequence[str], targets: Sequence[str] | None,
                 max_source_tokens: int, max_target_tokens: int) -> dict[str, Any]:
    """Tokenize a batch: ``input_ids`` and ``attention_mask`` [B, S] (sources cut to ``max_source_tokens``,
    special tokens included), ``truncated_sources`` (how many were cut) and, with ``targets``, ``labels`` [B, T]:
    :func:`target_ids` of each target, at most ``max_target_tokens`` long, padded with -100."""
    sources = list(sources)
    lengths = [len(ids) for ids in tokenizer(sources, truncation=True, max_length=max_source_tokens + 1)["input_ids"]]
    encoded = tokenizer(sources, truncation=True, max_length=max_source_tokens, padding=True, return_tensors="pt")
    batch: dict[str, Any] = {"input_ids": encoded["input_ids"].long(),
                             "attention_mask": encoded["attention_mask"].long(),
                             "truncated_sources": sum(n > max_source_tokens for n in lengths)}
    if targets is not None:
        if len(targets) != len(sources):
            raise ValueError(f"{len(sources)} sources but {len(targets)} targets")
        probe = tokenizer("")["input_ids"]
        dropped = len(probe) - len(target_ids(tokenizer, probe))  # room for the leading token target_ids removes
        rows = [target_ids(tokenizer, ids) for ids in
                tokenizer(list(targets), truncation=True, max_length=max_target_tokens + dropped)["input_ids"]]
        labels = torch.full((len(rows), max(map(len, rows))), -100, dtype=torch.long)
        for i, ids in enumerate(rows):
            labels[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        batch["labels"] = labels
    return batch


class _TruncationLog:
    """Counts truncated sources and warns the first time there are any."""

    def __init__(self) -> None:
        self.count, self.warned = 0, False

    def add(self, count: int, max_source_tokens: int) -> None:
        self.count += count
        if self.count and not self.warned:
            self.warned = True
            warnings.warn(f"{self.count} source(s) so far are longer than max_source_tokens={max_source_tokens} "
                          "tokens and were truncated (this warning is given once)", UserWarning, stacklevel=2)


class SummaryCollate:
    """Picklable collate function: :func:`encode_batch` of the records (with labels when every record has a
    reference; the first one is the target) plus their ``sources``, ``references`` and ``ids``."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_source_tokens: int, max_target_tokens: int,
                 log: _TruncationLog | None = None) -> None:
        self.tokenizer, self.max_source_tokens, self.max_target_tokens = tokenizer, max_source_tokens, max_target_tokens
        self.log = log or _TruncationLog()

    def __call__(self, records: Sequence[SummaryRecord]) -> dict[str, Any]:
        targets = [r.references[0] for r in records] if all(r.references for r in records) else None
        batch = encode_batch(self.tokenizer, [r.source for r in records], targets, self.max_source_tokens,
                             self.max_target_tokens)
        self.log.add(batch["truncated_sources"], self.max_source_tokens)
        batch.update(sources=[r.source for r in records], references=[r.references for r in records],
                     ids=[r.id for r in records])
        return batch


# ---------------------------------------------------------------- data modules


def _hold_out(records: list[SummaryRecord], fraction: float) -> tuple[list[SummaryRecord], list[SummaryRecord]]:
    """Every k-th record (k = 1 / fraction, from the first) for validation, the rest for training."""
    if fraction <= 0:
        raise ValueError("no validation data: give val_file or a positive val_fraction")
    step = max(2, round(1 / fraction))
    return [r for i, r in enumerate(records) if i % step], [r for i, r in enumerate(records) if i % step == 0]


class SummarizationDataModule(L.LightningDataModule):
    """Source/summary pairs from files (JSON Lines or CSV/TSV; relative paths are under ``data_root``, by default
    ``$BP_APPS_DATA``, else ``./data``).

    Without ``val_file``, every k-th training record (k = 1 / ``val_fraction``) is held out; without ``test_file``,
    testing uses the validation split. ``eval_target_field`` reads the validation and test files' references from
    other fields (AESLC: ``references``, its three annotator subject lines); default ``target_field``. ``limit_*``
    keep the first N records; the character-length filters then leave out training records (with a warning),
    never evaluation ones. Training batches are length-bucketed and shuffled anew for each epoch (seed + epoch);
    evaluation batches keep the file order.

    The tokenizer is ``AutoTokenizer.from_pretrained(tokenizer_name)`` or, without a name, trained on the training
    sources and references (``lowercase`` applies to that one). :meth:`prepare_data` writes it once to
    :attr:`tokenizer_file` (a path under the cache folder derived from the training data's identity and the
    tokenizer settings, known right after ``__init__``); :meth:`setup` and the batches read that file, and so does
    the Summarizer: ``bp-apps`` links ``tokenizer_file``, ``max_source_tokens`` and ``max_target_tokens`` to the
    model's arguments of the same names (a Trainer built by hand passes them). :meth:`setup` refuses an attached
    model that already has another tokenizer (e.g. loaded from a checkpoint trained on other data settings).
    """

    def __init__(self, train_file: str | None = None, val_file: str | None = None, test_file: str | None = None,
                 data_root: str | None = None, format: Literal["auto", "jsonl", "csv", "tsv"] = "auto",
                 source_field: str = "source", target_field: str | list[str] = "target", id_field: str = "id",
                 eval_target_field: str | list[str] | None = None, tokenizer_name: str | None = None,
                 tokenizer_vocab_size: int = 8000, tokenizer_kind: Literal["wordpiece", "unigram"] = "unigram",
                 lowercase: bool = False, max_source_tokens: int = 256, max_target_tokens: int = 48,
                 min_source_chars: int = 1, max_source_chars: int | None = None, min_target_chars: int = 1,
                 val_fraction: float = 0.05, limit_train: int | None = None, limit_val: int | None = None,
                 limit_test: int | None = None, batch_size: int = 32, eval_batch_size: int = 64, seed: int = 0,
                 num_workers: int = 0) -> None:
        super().__init__()
        if batch_size < 1 or eval_batch_size < 1:
            raise ValueError(f"batch sizes must be >= 1, got {batch_size} and {eval_batch_size}")
        if max_source_tokens < 1 or max_target_tokens < 1:
            raise ValueError(f"token limits must be >= 1, got {max_source_tokens} and {max_target_tokens}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if max_source_chars is not None and max_source_chars < min_source_chars:
            raise ValueError(f"max_source_chars={max_source_chars} is below min_source_chars={min_source_chars}")
        self.save_hyperparameters()
        self.train_file, self.val_file, self.test_file, self.data_root = train_file, val_file, test_file, data_root
        self.format, self.source_field, self.id_field = format, source_field, id_field
        self.target_field = target_field
        self.eval_target_field = target_field if eval_target_field is None else eval_target_field
        self.tokenizer_name, self.tokenizer_vocab_size = tokenizer_name, tokenizer_vocab_size
        self.tokenizer_kind, self.lowercase = tokenizer_kind, lowercase
        self.max_source_tokens, self.max_target_tokens = max_source_tokens, max_target_tokens
        self.min_source_chars, self.max_source_chars = min_source_chars, max_source_chars
        self.min_target_chars, self.val_fraction = min_target_chars, val_fraction
        self.limits = {"train": limit_train, "val": limit_val, "test": limit_test}
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.seed, self.num_workers = seed, num_workers
        self.tokenizer: PreTrainedTokenizerBase | None = None  # read from tokenizer_file by setup()
        self.splits: dict[str, list[SummaryRecord]] = {}
        self._truncation = _TruncationLog()

    # -- the tokenizer file -----------------------------------------------------------------

    def data_identity(self) -> dict[str, Any]:
        """What decides the training texts a tokenizer is trained on (files by path, size and modification
        time; subclasses their own sources), without reading them."""
        root = resolve_data_root(self.data_root)
        train = None if self.train_file is None else _file_identity(root / Path(self.train_file).expanduser())
        return {"train_file": train, "format": self.format, "source_field": self.source_field,
                "target_field": self.target_field,
                "val_fraction": self.val_fraction if self.val_file is None else None}

    def tokenizer_identity(self) -> dict[str, Any]:
        """The data identity and tokenizer settings that :attr:`tokenizer_file`'s name is derived from."""
        if self.tokenizer_name is not None:
            name = Path(self.tokenizer_name).expanduser()
            return {"pretrained": _file_identity(name / "tokenizer.json") if name.is_dir() else self.tokenizer_name}
        return {"class": type(self).__qualname__, "data": self.data_identity(), "limit_train": self.limits["train"],
                "min_source_chars": self.min_source_chars, "max_source_chars": self.max_source_chars,
                "min_target_chars": self.min_target_chars, "kind": self.tokenizer_kind,
                "vocab_size": self.tokenizer_vocab_size, "lowercase": self.lowercase}

    @cached_property
    def tokenizer_file(self) -> str:
        """Where :meth:`prepare_data` writes the tokenizer (JSON, :func:`save_tokenizer_file`): the same path for
        the same data and tokenizer settings, so it is built once."""
        key = json.dumps(self.tokenizer_identity(), sort_keys=True, default=str)
        digest = hashlib.sha256(key.encode()).hexdigest()[:24]
        kind = "pretrained" if self.tokenizer_name is not None else self.tokenizer_kind
        return str(default_cache_dir() / "tokenizers" / f"summarization-{kind}-{digest}.json")

    def prepare_data(self) -> None:
        """Write :attr:`tokenizer_file` unless it is there and readable: the pretrained tokenizer's definition, or
        one trained on the training split (read here, after the limits and length filters)."""
        path = Path(self.tokenizer_file)
        if path.is_file():
            try:
                load_tokenizer_file(path)
                return
            except ValueError:
                pass  # a damaged file: build it again
        if self.tokenizer_name is not None:
            tokenizer = self._pretrained_tokenizer()
        else:
            if not self.splits:
                self.splits = self._read_splits()
            tokenizer = self._train_tokenizer(self.splits["train"])
        save_tokenizer_file(path, tokenizer)

    @property
    def truncated_sources(self) -> int:
        """How many sources the loaders have truncated so far (counted in this process: ``num_workers=0``)."""
        return self._truncation.count

    # -- reading ----------------------------------------------------------------------------

    def _read(self, name: str, target_field: str | list[str]) -> list[SummaryRecord]:
        path = data_file(name, self.data_root)
        return read_records(path, source_field=self.source_field, target_field=target_field,
                            id_field=self.id_field, format=self.format)

    def load_splits(self) -> dict[str, list[SummaryRecord]]:
        """The train / val / test records (val and test may be missing); subclasses read other sources."""
        if self.train_file is None:
            raise ValueError("SummarizationDataModule needs train_file (a .jsonl, .csv or .tsv file)")
        splits = {"train": self._read(self.train_file, self.target_field)}
        for split, name in (("val", self.val_file), ("test", self.test_file)):
            if name is not None:
                splits[split] = self._read(name, self.eval_target_field)
        return splits

    # -- set-up -----------------------------------------------------------------------------

    def _keep(self, record: SummaryRecord) -> bool:
        """Whether a training record passes the character-length filters (the target is its first reference)."""
        n = len(record.source)
        return (n >= self.min_source_chars and (self.max_source_chars is None or n <= self.max_source_chars)
                and len(record.references[0]) >= self.min_target_chars)

    def setup(self, stage: str | None = None) -> None:
        """Read the tokenizer file (written first when :meth:`prepare_data` has not run) and the splits (applying
        the limits and the training filters), once; refuse an attached model with another tokenizer."""
        if self.tokenizer is None:
            self.prepare_data()  # nothing to do when it ran (the file is there and readable)
            self.tokenizer = load_tokenizer_file(self.tokenizer_file)
        if not self.splits:
            self.splits = self._read_splits()
        self._check_model()

    def _check_model(self) -> None:
        model = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        theirs = getattr(model, "tokenizer", None)
        if theirs is not None and tokenizer_state(theirs) != tokenizer_state(self.tokenizer):
            raise ValueError(f"the model's tokenizer (from its checkpoint) is not this data's ({self.tokenizer_file}): "
                             "its ids would mean other tokens; use the data and tokenizer settings the checkpoint "
                             "was trained with")

    def _read_splits(self) -> dict[str, list[SummaryRecord]]:
        splits = self.load_splits()
        if "val" not in splits:
            splits["train"], splits["val"] = _hold_out(splits["train"], self.val_fraction)
        for name, limit in self.limits.items():
            if limit is not None and name in splits:
                splits[name] = splits[name][:limit]
        kept = [r for r in splits["train"] if self._keep(r)]
        if len(kept) < len(splits["train"]):
            warnings.warn(f"left out {len(splits['train']) - len(kept)} of {len(splits['train'])} training records "
                          f"outside the length filters (min_source_chars={self.min_source_chars}, max_source_chars="
                          f"{self.max_source_chars}, min_target_chars={self.min_target_chars})", stacklevel=2)
        splits["train"] = kept
        if not splits["train"]:
            raise SummarizationDataError("no training records left after the limits and length filters")
        return splits

    def _pretrained_tokenizer(self) -> PreTrainedTokenizerBase:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_name)
        if not tokenizer.is_fast:
            raise ValueError(f"tokenizer_name={self.tokenizer_name!r}: a tokenizer file needs a fast tokenizer")
        return tokenizer

    def _train_tokenizer(self, records: list[SummaryRecord]) -> PreTrainedTokenizerBase:
        texts = [r.source for r in records] + [text for r in records for text in r.references]
        return train_tokenizer(texts, self.tokenizer_vocab_size, kind=self.tokenizer_kind, lowercase=self.lowercase,
                               cache_dir=default_cache_dir() / "tokenizers")

    # -- loaders ----------------------------------------------------------------------------

    def _collate(self) -> SummaryCollate:
        assert self.tokenizer is not None
        return SummaryCollate(self.tokenizer, self.max_source_tokens, self.max_target_tokens, self._truncation)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        records = self.splits["train"]
        replicas, rank = shard_by_process(self.trainer)  # the bucket sampler shards batches across processes
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        sampler = BucketBatchSampler([len(r.source) for r in records], self.batch_size, shuffle=True, seed=self.seed,
                                     num_replicas=replicas, rank=rank)
        sampler.set_epoch(epoch)  # Lightning calls set_epoch again at the start of each epoch
        return ResumableDataLoader(records, batch_sampler=sampler, collate_fn=self._collate(), seed=self.seed,
                                   num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def _eval_loader(self, split: str) -> DataLoader:
        self.setup()
        return evaluation_loader(self.splits[split], self.trainer, batch_size=self.eval_batch_size,
                                 collate_fn=self._collate(), num_workers=self.num_workers,
                                 persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        """The test split, or the validation split when there is no test file."""
        self.setup()
        return self._eval_loader("test" if "test" in self.splits else "val")


class EmbeddedSummarizationDataModule(SummarizationDataModule):
    """Summarization that needs no download: the installed standard library's docstrings, body -> first line
    (:func:`~bp_apps.text.corpus.summary_pairs`). Whole docstrings go to one split by their index (every k-th
    to validation, the next to test; k = 1 / ``val_fraction``); ``max_pairs`` keeps the first N pairs."""

    def __init__(self, max_pairs: int | None = None, min_words: int = 20, tokenizer_name: str | None = None,
                 tokenizer_vocab_size: int = 4000, tokenizer_kind: Literal["wordpiece", "unigram"] = "unigram",
                 lowercase: bool = False, max_source_tokens: int = 256, max_target_tokens: int = 48,
                 min_source_chars: int = 1, max_source_chars: int | None = None, min_target_chars: int = 1,
                 val_fraction: float = 0.1, limit_train: int | None = None, limit_val: int | None = None,
                 limit_test: int | None = None, batch_size: int = 32, eval_batch_size: int = 64, seed: int = 0,
                 num_workers: int = 0) -> None:
        if val_fraction <= 0:
            raise ValueError(f"val_fraction must be > 0 for the docstring splits, got {val_fraction}")
        super().__init__(tokenizer_name=tokenizer_name, tokenizer_vocab_size=tokenizer_vocab_size,
                         tokenizer_kind=tokenizer_kind, lowercase=lowercase, max_source_tokens=max_source_tokens,
                         max_target_tokens=max_target_tokens, min_source_chars=min_source_chars,
                         max_source_chars=max_source_chars, min_target_chars=min_target_chars,
                         val_fraction=val_fraction, limit_train=limit_train, limit_val=limit_val,
                         limit_test=limit_test, batch_size=batch_size, eval_batch_size=eval_batch_size, seed=seed,
                         num_workers=num_workers)
        self.max_pairs, self.min_words = max_pairs, min_words

    def data_identity(self) -> dict[str, Any]:
        """The installed standard library (its folder and the Python version) and the pair settings."""
        return {"stdlib": sysconfig.get_paths()["stdlib"], "python": platform.python_version(),
                "max_pairs": self.max_pairs, "min_words": self.min_words, "val_fraction": self.val_fraction}

    def load_splits(self) -> dict[str, list[SummaryRecord]]:
        step = max(3, round(1 / self.val_fraction))
        splits: dict[str, list[SummaryRecord]] = {"train": [], "val": [], "test": []}
        count = 0
        for i, doc in enumerate(stdlib_docstrings()):
            if self.max_pairs is not None and count >= self.max_pairs:
                break
            for body, first_line in summary_pairs([doc], self.min_words):
                split = "val" if i % step == 0 else "test" if i % step == 1 else "train"
                record = SummaryRecord(clean_text(body), (clean_text(first_line),), doc.name, f"stdlib:{i}")
                splits[split].append(record)
                count += 1
        return splits


class HFSummarizationDataModule(SummarizationDataModule):
    """Summarization data through Hugging Face ``datasets`` (``pip install "bp_apps[hf]"``): a data set on the hub
    by ``name`` (``xsum``, ``cnn_dailymail`` with ``config_name="3.0.0"``, ``samsum``, ...; online, or from the
    ``datasets`` cache), local files (``data_files``: JSON Lines, CSV/TSV or Parquet; one path or a list for the
    training data, or a mapping from split name to path(s)), or a folder written by ``save_to_disk``
    (``saved_dataset``). With either of the last two, ``name`` is not used. Relative paths are under ``data_root``
    (``$BP_APPS_DATA``, else ``./data``).

    The fields default to :data:`HF_FIELDS` for known hub names, and to ``source`` and ``target`` for local files and
    saved data sets; a missing column is an error naming the file (or data set) and the column. ``train_split`` /
    ``val_split`` / ``test_split`` name the splits; a source with one split is training data only (``val_fraction``
    of it is held out for validation, which testing then uses), and a null ``val_split`` or ``test_split`` does the
    same for a source with several splits (the rules: :mod:`bp_apps.text.hf_datasets`)."""

    def __init__(self, name: str = "xsum", config_name: str | None = None,
                 data_files: str | list[str] | dict[str, str | list[str]] | None = None,
                 saved_dataset: str | None = None, data_root: str | None = None, source_field: str | None = None,
                 target_field: str | list[str] | None = None, id_field: str = "id", train_split: str = "train",
                 val_split: str | None = "validation", test_split: str | None = "test", val_fraction: float = 0.05,
                 tokenizer_name: str | None = None, tokenizer_vocab_size: int = 8000,
                 tokenizer_kind: Literal["wordpiece", "unigram"] = "unigram", lowercase: bool = False,
                 max_source_tokens: int = 256, max_target_tokens: int = 48, min_source_chars: int = 1,
                 max_source_chars: int | None = None, min_target_chars: int = 1, limit_train: int | None = None,
                 limit_val: int | None = None, limit_test: int | None = None, batch_size: int = 32,
                 eval_batch_size: int = 64, seed: int = 0, num_workers: int = 0) -> None:
        from bp_apps.text.hf_datasets import HFSource

        source = HFSource(name=name, config_name=config_name, data_files=data_files, saved_dataset=saved_dataset,
                          data_root=data_root)
        if source.kind != "hub":
            source_field, target_field = source_field or "source", target_field or "target"
        elif source_field is None or target_field is None:
            if name not in HF_FIELDS:
                raise ValueError(f"no default fields for data set {name!r} (known: {', '.join(HF_FIELDS)}); "
                                 "give source_field and target_field")
            source_field = source_field or HF_FIELDS[name][0]
            target_field = target_field or HF_FIELDS[name][1]
        super().__init__(data_root=data_root, source_field=source_field, target_field=target_field,
                         id_field=id_field, tokenizer_name=tokenizer_name, tokenizer_vocab_size=tokenizer_vocab_size,
                         tokenizer_kind=tokenizer_kind, lowercase=lowercase, max_source_tokens=max_source_tokens,
                         max_target_tokens=max_target_tokens, min_source_chars=min_source_chars,
                         max_source_chars=max_source_chars, min_target_chars=min_target_chars,
                         val_fraction=val_fraction, limit_train=limit_train, limit_val=limit_val,
                         limit_test=limit_test, batch_size=batch_size, eval_batch_size=eval_batch_size, seed=seed,
                         num_workers=num_workers)
        self.name, self.config_name, self.source = name, config_name, source
        self.split_names = {"train": train_split, "val": val_split, "test": test_split}

    def data_identity(self) -> dict[str, Any]:
        """The source (hub name and configuration; or the files, by path, size and modification time; or the saved
        folder's metadata files, likewise), the training split, the fields and, when validation may be held out of
        the training data, ``val_fraction``."""
        identity: dict[str, Any] = {"name": self.name, "config_name": self.config_name}
        if self.source.kind == "data_files":
            identity = {"data_files": {k: [_file_identity(p) for p in v] for k, v in self.source.files().items()}}
        elif self.source.kind == "saved_dataset":
            folder = self.source.folder()
            identity = {"saved_dataset": [_file_identity(p) for p in sorted(folder.rglob("*.json"))]
                        if folder.is_dir() else str(folder.absolute())}
        return {**identity, "train_split": self.split_names["train"], "source_field": self.source_field,
                "target_field": self.target_field, "val_fraction": self.val_fraction}

    def load_splits(self) -> dict[str, list[SummaryRecord]]:
        from bp_apps.text.hf_datasets import require_columns

        targets = _target_fields(self.target_field)
        splits = {}
        for key, (dataset, where) in self.source.load(self.split_names, type(self).__name__).items():
            require_columns(dataset, {"source_field": self.source_field, "target_field": targets}, where)
            splits[key] = records_from_hf(dataset, self.source_field, self.target_field, self.id_field, where=where)
        return splits
