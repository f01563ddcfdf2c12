"""Reading and writing labeled sentences: JSON Lines, CoNLL column files and Hugging Face datasets.

Every reader returns :class:`TaggedSentence` objects whose ``where`` is ``file:line`` (or ``name[row]``), and
every data problem is a :class:`LabelingDataError` whose message starts with that location.
"""

from __future__ import annotations

import itertools
import numbers
import warnings
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from bp_apps.core.io import format_from_suffix, jsonl_objects, utf8_lines
from bp_apps.text.labeling.records import LabelingDataError, TaggedSentence, make_sentence

__all__ = [
    "CONLL_SUFFIXES",
    "JSONL_SUFFIXES",
    "check_bio",
    "check_known_tags",
    "load_hf",
    "read_conll",
    "read_jsonl",
    "read_labeled_file",
    "sentences_from_hf",
]

JSONL_SUFFIXES = (".jsonl", ".json")
CONLL_SUFFIXES = (".conll", ".conllu", ".txt", ".tsv", ".bio", ".iob")
_NO_PREDICATE = frozenset({"-", "_", "O"})  # predicate-column values on rows that are not the predicate
_SHOWN = 5  # line numbers (or row numbers) listed in the "skipped empty sentences" warning
_SHOWN_TAGS = 10  # known tags listed in an "unknown tag" error


def _warn_empty(source: str, unit: str, positions: list[int]) -> None:
    """One warning for all the empty sentences a reader skipped, naming the first few positions."""
    if not positions:
        return
    shown = ", ".join(map(str, positions[:_SHOWN])) + (", ..." if len(positions) > _SHOWN else "")
    warnings.warn(f"{source}: skipped {len(positions)} empty sentence(s) (empty token list) at {unit} {shown}",
                  UserWarning, stacklevel=3)


def _require_some(sentences: list[TaggedSentence], source: str) -> list[TaggedSentence]:
    """Return ``sentences``, or raise when there are none: an empty data file is a mistake, not an empty split."""
    if not sentences:
        raise LabelingDataError(f"{source}: no sentences")
    return sentences


def read_jsonl(path: Path | str, *, tokens_field: str = "tokens", tags_field: str = "tags",
               predicate_field: str = "predicate", id_field: str = "id", predicate_pos_field: str = "predicate_pos",
               require_tags: bool = True) -> list[TaggedSentence]:
    """Read one sentence per JSON Lines record, so that bad records are reported as ``file:line: problem``.

    Blank lines are skipped; records with an empty token list are skipped with one warning. The id comes from
    ``id_field``, else ``sent_id``; tags may be absent only when ``require_tags`` is false. The predicate's POS
    tag (``predicate_pos_field``, optional) is kept for models that use it.
    """
    path = Path(path)
    sentences: list[TaggedSentence] = []
    empty: list[int] = []
    for lineno, record in jsonl_objects(path, LabelingDataError):
        where = f"{path}:{lineno}"
        if tokens_field not in record:
            raise LabelingDataError(f"{where}: missing field {tokens_field!r}")
        tags = record.get(tags_field)
        if tags is None and require_tags:
            raise LabelingDataError(f"{where}: missing field {tags_field!r}")
        tokens = record[tokens_field]
        if isinstance(tokens, list) and not tokens:
            empty.append(lineno)
            continue
        raw_id = record.get(id_field, record.get("sent_id"))
        sentences.append(make_sentence(tokens, tags, record.get(predicate_field), where=where,
                                       id=None if raw_id is None else str(raw_id),
                                       predicate_pos=record.get(predicate_pos_field)))
    _warn_empty(str(path), "line(s)", empty)
    return _require_some(sentences, str(path))


def _width(column: int) -> int:
    """The number of columns a row needs for ``column`` (negative indices count from the end) to exist."""
    return column + 1 if column >= 0 else -column


def _conll_sentence(path: Path, rows: list[tuple[int, list[str]]], token_column: int, tag_column: int | None,
                    predicate_column: int | None) -> TaggedSentence:
    """Build one sentence from its ``(line number, columns)`` rows; ``where`` is its first token's line."""
    where = f"{path}:{rows[0][0]}"
    predicate = None
    if predicate_column is not None:
        marked = [i for i, (_, fields) in enumerate(rows) if fields[predicate_column] not in _NO_PREDICATE]
        if len(marked) != 1:
            lines = ", ".join(str(rows[i][0]) for i in marked) or "none"
            raise LabelingDataError(
                f"{where}: expected exactly one predicate row (column {predicate_column} not '-', '_' or 'O'), "
                f"found {len(marked)} (lines: {lines})")
        predicate = marked[0]
    tokens = [fields[token_column] for _, fields in rows]
    tags = None if tag_column is None else [fields[tag_column] for _, fields in rows]
    return make_sentence(tokens, tags, predicate, where=where)


def read_conll(path: Path | str, *, token_column: int = 0, tag_column: int | None = -1,
               predicate_column: int | None = None) -> list[TaggedSentence]:
    """Read a CoNLL column file (whitespace-separated columns, blank line between sentences) into sentences.

    ``-DOCSTART-`` lines end a sentence and are dropped; ``#`` lines before a sentence's first token are comments
    (inside a sentence they are token rows). ``tag_column=None`` reads unlabeled text. ``predicate_column`` marks
    the predicate's row with any value other than ``-``, ``_`` or ``O`` (SRL files); exactly one per sentence.
    """
    path = Path(path)
    used = [token_column] + [c for c in (tag_column, predicate_column) if c is not None]
    needed = max(map(_width, used))
    described = f"token column {token_column}, tag column {tag_column}" + (
        "" if predicate_column is None else f", predicate column {predicate_column}")
    sentences: list[TaggedSentence] = []
    rows: list[tuple[int, list[str]]] = []
    # a final blank line ends the last sentence
    for lineno, line in itertools.chain(utf8_lines(path, LabelingDataError), [(0, "")]):
        fields = line.split()
        if not fields or fields[0] == "-DOCSTART-":
            if rows:
                sentences.append(_conll_sentence(path, rows, token_column, tag_column, predicate_column))
                rows = []
            continue
        if fields[0].startswith("#") and not rows:
            continue
        if len(fields) < needed:
            raise LabelingDataError(
                f"{path}:{lineno}: {len(fields)} column(s), need at least {needed} ({described})")
        rows.append((lineno, fields))
    return _require_some(sentences, str(path))


def read_labeled_file(path: Path | str, format: str = "auto", *, tokens_field: str = "tokens",
                      tags_field: str = "tags", predicate_field: str = "predicate", id_field: str = "id",
                      token_column: int = 0, tag_column: int | None = -1, predicate_column: int | None = None,
                      require_tags: bool = True) -> list[TaggedSentence]:
    """Read a labeled file with the reader its extension (or ``format``: auto, jsonl, conll) calls for.

    The ``*_field`` options go to :func:`read_jsonl`, the ``*_column`` ones to :func:`read_conll`
    (whose ``tag_column=None`` reads unlabeled files; ``require_tags=False`` does so for JSONL).
    """
    path = Path(path)
    if format == "auto":
        format = format_from_suffix(path, {"jsonl": JSONL_SUFFIXES, "conll": CONLL_SUFFIXES}, LabelingDataError)
    if format == "jsonl":
        return read_jsonl(path, tokens_field=tokens_field, tags_field=tags_field, predicate_field=predicate_field,
                          id_field=id_field, require_tags=require_tags)
    if format == "conll":
        return read_conll(path, token_column=token_column, tag_column=tag_column if require_tags else None,
                          predicate_column=predicate_column)
    raise ValueError(f"unknown format {format!r}; expected 'auto', 'jsonl' or 'conll'")


def _label_names(dataset: object, tags_column: str) -> Sequence[str] | None:
    """The ClassLabel names behind an integer tag column (``Sequence(ClassLabel)`` or ``[ClassLabel]``), if any."""
    features = getattr(dataset, "features", None)
    if not features or tags_column not in features:
        return None
    feature = features[tags_column]
    inner = feature[0] if isinstance(feature, list) and len(feature) == 1 else getattr(feature, "feature", None)
    return getattr(inner, "names", None)


def sentences_from_hf(dataset: Iterable[Mapping[str, Any]], *, tokens_column: str = "tokens",
                      tags_column: str = "ner_tags", where: str = "hf") -> list[TaggedSentence]:
    """Convert a Hugging Face dataset (or any iterable of dict rows) to sentences, naming integer tags.

    Integer tags are mapped through ``dataset.features[tags_column].feature.names``; string tags pass through.
    Rows with an empty token list are skipped with one warning; ``where`` prefixes row locations (``hf[3]``).
    """
    names = _label_names(dataset, tags_column)
    sentences: list[TaggedSentence] = []
    empty: list[int] = []
    for index, row in enumerate(dataset):
        row_where = f"{where}[{index}]"
        for column in (tokens_column, tags_column):
            if column not in row:
                raise LabelingDataError(f"{row_where}: missing column {column!r} (columns: {', '.join(row)})")
        tokens = row[tokens_column]
        if isinstance(tokens, Sequence) and not isinstance(tokens, str) and not tokens:
            empty.append(index)
            continue
        tags = row[tags_column]
        if isinstance(tags, Sequence) and not isinstance(tags, str):
            tags = [_tag_name(tag, names, tags_column, row_where) for tag in tags]
        raw_id = row.get("id")
        sentences.append(make_sentence(tokens, tags, where=row_where, id=None if raw_id is None else str(raw_id)))
    _warn_empty(where, "row(s)", empty)
    return _require_some(sentences, where)


def _tag_name(tag: object, names: Sequence[str] | None, tags_column: str, where: str) -> object:
    """An integer tag's ClassLabel name; other values are returned for :func:`make_sentence` to check."""
    if isinstance(tag, bool) or not isinstance(tag, numbers.Integral):
        return tag
    if names is None:
        raise LabelingDataError(
            f"{where}: tag {tag} is an integer but column {tags_column!r} has no label names "
            "(expected dataset.features[column] to be a Sequence of ClassLabel)")
    if not 0 <= tag < len(names):
        raise LabelingDataError(f"{where}: tag {tag} is out of range for {len(names)} label names")
    return names[tag]


def load_hf(name: str, split: str, *, config_name: str | None = None, tokens_column: str = "tokens",
            tags_column: str = "ner_tags") -> list[TaggedSentence]:
    """Load a Hugging Face dataset split and convert it with :func:`sentences_from_hf`.

    ``datasets`` is imported only here, so the rest of the package works without it.
    """
    try:
        import datasets
    except ImportError as exc:
        raise ImportError("load_hf needs the Hugging Face 'datasets' package: pip install datasets") from exc
    dataset = datasets.load_dataset(name, config_name, split=split)
    label = f"{name}/{config_name}" if config_name else name
    return sentences_from_hf(dataset, tokens_column=tokens_column, tags_column=tags_column,
                             where=f"{label}:{split}")


def check_known_tags(sentences: Iterable[TaggedSentence], known: Collection[str]) -> None:
    """Raise when a sentence uses a tag outside ``known`` (the training label set), e.g. in a validation file.

    The model has no output for such a tag, so it is a data error rather than something to learn.
    """
    known_set = frozenset(known)
    for sentence in sentences:
        for i, tag in enumerate(sentence.tags or ()):
            if tag not in known_set:
                listed = sorted(known_set)
                shown = ", ".join(listed[:_SHOWN_TAGS]) + (
                    f", ... ({len(listed)} in all)" if len(listed) > _SHOWN_TAGS else "")
                prefix = f"{sentence.where}: " if sentence.where else ""
                raise LabelingDataError(
                    f"{prefix}tag {tag!r} (token {i}) is not in the training label set; known tags: {shown or 'none'}")


def check_bio(sentences: Iterable[TaggedSentence]) -> None:
    """Raise unless every tag is ``O``, ``B-<label>`` or ``I-<label>``, for files declared to be BIO-tagged."""
    for sentence in sentences:
        for i, tag in enumerate(sentence.tags or ()):
            if tag != "O" and not (tag[:2] in ("B-", "I-") and len(tag) > 2):
                prefix = f"{sentence.where}: " if sentence.where else ""
                raise LabelingDataError(
                    f"{prefix}tag {tag!r} (token {i}) is not BIO: expected 'O', 'B-<label>' or 'I-<label>'")
