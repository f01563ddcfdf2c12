"""One labeled sentence, and the checks every reader applies to it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["PREDICATE_CLASSES", "LabelingDataError", "TaggedSentence", "make_sentence", "predicate_class"]

# Coarse predicate classes for semantic role labeling, from a PTB or a Universal POS tag; 0 is "not given".
PREDICATE_CLASSES = ("unknown", "verb", "noun", "adjective", "other")
_CLASS_PREFIXES = (("VB", 1), ("VERB", 1), ("AUX", 1), ("MD", 1), ("NN", 2), ("NOUN", 2), ("PROPN", 2),
                   ("JJ", 3), ("ADJ", 3))


def predicate_class(pos: str | None) -> int:
    """The index in :data:`PREDICATE_CLASSES` of a predicate's POS tag (``VBD`` and ``VERB`` -> verb, ``NNS`` and
    ``NOUN`` -> noun, ``JJ`` and ``ADJ`` -> adjective, any other tag -> other, ``None`` -> unknown)."""
    if pos is None:
        return 0
    tag = pos.strip().upper()
    return next((index for prefix, index in _CLASS_PREFIXES if tag.startswith(prefix)), 4)


class LabelingDataError(ValueError):
    """A data file (or record) that cannot be used; the message starts with ``file:line``."""


@dataclass(frozen=True)
class TaggedSentence:
    """Tokens with their tags (``None`` when unlabeled, e.g. for prediction) and, for semantic role
    labeling, the index of the predicate token and, when known, its POS tag (``predicate_pos``).
    ``where`` is ``file:line`` (or a name) for messages."""

    tokens: tuple[str, ...]
    tags: tuple[str, ...] | None = None
    predicate: int | None = None
    where: str = ""
    id: str | None = None
    predicate_pos: str | None = None


def make_sentence(tokens: Sequence[str], tags: Sequence[str] | None = None, predicate: int | None = None,
                  where: str = "", id: str | None = None, predicate_pos: str | None = None) -> TaggedSentence:
    """Validate and build a :class:`TaggedSentence`; raise :class:`LabelingDataError` naming ``where``.

    Checks: tokens is a non-empty list of non-blank strings; tags (when given) are strings, one per
    token; the predicate (when given) is an integer index into the tokens; its POS tag (when given)
    a non-blank string, and only given with a predicate.
    """
    prefix = f"{where}: " if where else ""
    if isinstance(tokens, str) or not isinstance(tokens, Sequence):
        raise LabelingDataError(f"{prefix}'tokens' must be a list of strings, got {type(tokens).__name__}")
    if not tokens:
        raise LabelingDataError(f"{prefix}'tokens' is empty")
    for i, token in enumerate(tokens):
        if not isinstance(token, str) or not token.strip():
            raise LabelingDataError(f"{prefix}token {i} is {token!r}; tokens must be non-blank strings")
    if tags is not None:
        if isinstance(tags, str) or not isinstance(tags, Sequence):
            raise LabelingDataError(f"{prefix}'tags' must be a list of strings, got {type(tags).__name__}")
        if len(tags) != len(tokens):
            raise LabelingDataError(f"{prefix}{len(tokens)} tokens but {len(tags)} tags")
        for i, tag in enumerate(tags):
            if not isinstance(tag, str) or not tag:
                raise LabelingDataError(f"{prefix}tag {i} is {tag!r}; tags must be non-empty strings")
    if predicate is not None:
        if isinstance(predicate, bool) or not isinstance(predicate, int):
            raise LabelingDataError(f"{prefix}'predicate' must be an integer token index, got {predicate!r}")
        if not 0 <= predicate < len(tokens):
            raise LabelingDataError(f"{prefix}predicate index {predicate} is out of range for {len(tokens)} tokens")
    if predicate_pos is not None:
        if not isinstance(predicate_pos, str) or not predicate_pos.strip():
            raise LabelingDataError(f"{prefix}'predicate_pos' must be a non-blank POS tag, got {predicate_pos!r}")
        if predicate is None:
            raise LabelingDataError(f"{prefix}'predicate_pos' is given without a predicate")
    return TaggedSentence(tuple(tokens), None if tags is None else tuple(tags), predicate, where, id, predicate_pos)
