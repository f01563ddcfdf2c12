"""One labeled sentence, and the checks every reader applies to it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["LabelingDataError", "TaggedSentence", "make_sentence"]


class LabelingDataError(ValueError):
    """A data file (or record) that cannot be used; the message starts with ``file:line``."""


@dataclass(frozen=True)
class TaggedSentence:
    """Tokens with their tags (``None`` when unlabeled, e.g. for prediction) and, for semantic role
    labeling, the index of the predicate token. ``where`` is ``file:line`` (or a name) for messages."""

    tokens: tuple[str, ...]
    tags: tuple[str, ...] | None = None
    predicate: int | None = None
    where: str = ""
    id: str | None = None


def make_sentence(tokens: Sequence[str], tags: Sequence[str] | None = None, predicate: int | None = None,
                  where: str = "", id: str | None = None) -> TaggedSentence:
    """Validate and build a :class:`TaggedSentence`; raise :class:`LabelingDataError` naming ``where``.

    Checks: tokens is a non-empty list of non-blank strings; tags (when given) are strings, one per
    token; the predicate (when given) is an integer index into the tokens.
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
    return TaggedSentence(tuple(tokens), None if tags is None else tuple(tags), predicate, where, id)
