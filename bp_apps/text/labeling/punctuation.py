"""Punctuation and capitalisation restoration: each token is tagged with the mark that follows it and its case.

The model sees lower-cased words without punctuation; a tag ``"MARK|CASE"`` says what to put back:
``MARK`` is one of :data:`MARKS` (``","`` → COMMA, ``"."``/``"!"`` → PERIOD, ``"?"`` → QUESTION, ``":"``/``";"``
→ COLON) and ``CASE`` one of :data:`CASES` (L lower, C Capitalised, U UPPER). Examples come from prose
paragraphs of real text (e.g. :func:`bp_apps.text.corpus.stdlib_docstrings`); paragraphs that look like
code or markup are left out, see :func:`examples_from_text`.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Sequence

from bp_apps.text.corpus import Docstring
from bp_apps.text.labeling.records import TaggedSentence, make_sentence

__all__ = ["CASES", "MARKS", "PUNCT_TAGS", "case_of", "examples_from_text", "mark_of", "punctuation_corpus",
           "restore_text"]

MARKS = ("O", "COMMA", "PERIOD", "QUESTION", "COLON")
CASES = ("L", "C", "U")
PUNCT_TAGS = tuple(f"{mark}|{case}" for mark in MARKS for case in CASES)
_TAG_SET = frozenset(PUNCT_TAGS)

_MARK_OF_CHAR = {",": "COMMA", ".": "PERIOD", "!": "PERIOD", "?": "QUESTION", ":": "COLON", ";": "COLON"}
_CHAR_OF_MARK = {"O": "", "COMMA": ",", "PERIOD": ".", "QUESTION": "?", "COLON": ":"}
_SENTENCE_ENDS = frozenset({"PERIOD", "QUESTION"})

_OPENERS = "\"'(“‘"  # stripped from the start of a word
_CLOSERS = "\"')”’" + "".join(_MARK_OF_CHAR)  # stripped from the end; the marks among them give the tag
_DASHES = frozenset({"-", "--", "—", "–"})  # a free-standing dash is dropped, not a reason to reject prose
# What a word may be once quotes, brackets and marks are stripped: letters/digits with internal apostrophes or
# hyphens ("don't", "built-in"), a number ("3.14", "1,000"), or an abbreviation keeping its final dot ("e.g.").
_WORD = re.compile(r"(?:[^\W_]+(?:['’-][^\W_]+)*|\d+(?:[.,]\d+)*|(?:[^\W\d_]\.)+[^\W\d_])\.?")
# Abbreviations whose final dot belongs to the word, not a PERIOD: dotted letters (e.g., i.e., U.S.) and these.
_ABBREVIATION = re.compile(r"(?:[^\W\d_]\.)+[^\W\d_]|etc|cf|vs|viz|approx", re.IGNORECASE)
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")
_BULLET = re.compile(r"[-*+•]\s")


def _split(tag: str) -> tuple[str, str]:
    if tag not in _TAG_SET:
        raise ValueError(f"unknown punctuation tag {tag!r}; expected one of {', '.join(PUNCT_TAGS)}")
    mark, case = tag.split("|")
    return mark, case


def mark_of(tag: str) -> str:
    """The punctuation mark of a tag (``"COMMA|C"`` → ``"COMMA"``), for per-mark metrics."""
    return _split(tag)[0]


def case_of(tag: str) -> str:
    """The case of a tag (``"COMMA|C"`` → ``"C"``), for per-case metrics."""
    return _split(tag)[1]


def _apply_case(word: str, case: str) -> str:
    if case == "U":
        return word.upper()
    word = word.lower()
    return word[:1].upper() + word[1:] if case == "C" else word


def _case(word: str) -> str | None:
    """The case that restores ``word`` exactly from its lower-cased form; ``None`` for mixed case ("JSONDecoder")."""
    if len(word) >= 2 and any(c.isalpha() for c in word) and _apply_case(word, "U") == word:
        return "U"
    return next((case for case in ("L", "C") if _apply_case(word, case) == word), None)


def _label(word: str) -> tuple[str, str] | None:
    """``(token, tag)`` for one whitespace-separated word; ``("", "")`` (dropped) when it strips to nothing or is
    a lone dash; ``None`` when it is not a prose word."""
    core = word.lstrip(_OPENERS)
    tail_start = len(core.rstrip(_CLOSERS))
    core, tail = core[:tail_start], core[tail_start:]
    if not core or core in _DASHES:
        return "", ""
    if tail.startswith(".") and _ABBREVIATION.fullmatch(core):
        core, tail = core + ".", tail[1:]
    case = _case(core)
    if case is None or not _WORD.fullmatch(core):
        return None
    marks = [_MARK_OF_CHAR[c] for c in tail if c in _MARK_OF_CHAR]
    return core.lower(), f"{marks[-1] if marks else 'O'}|{case}"


def _prose_labels(paragraph: str) -> list[tuple[str, str]] | None:
    """The labelled tokens of a prose paragraph, or ``None`` if it looks like code or markup."""
    for line in paragraph.split("\n"):
        stripped = line.strip()
        if (line[:1].isspace() or stripped.startswith((">>>", "...", ".. ")) or "::" in line
                or "://" in line or _BULLET.match(stripped) or not any(c.isalnum() for c in stripped)):
            return None
    labels = [_label(word) for word in paragraph.split()]
    if any(label is None for label in labels):
        return None
    return [label for label in labels if label[0]]


def _chunks(tags: Sequence[str], max_tokens: int) -> list[tuple[int, int]]:
    """``(start, end)`` spans of at most ``max_tokens``, cut after a sentence end in the window's last half."""
    n, spans, start = len(tags), [], 0
    while start < n:
        end = min(start + max_tokens, n)
        if end < n:
            end = next((i + 1 for i in range(end - 1, start + max_tokens // 2 - 1, -1)
                        if mark_of(tags[i]) in _SENTENCE_ENDS), end)
        spans.append((start, end))
        start = end
    return spans


def examples_from_text(text: str, max_tokens: int = 48, where: str = "") -> list[TaggedSentence]:
    """Punctuation/case examples from the prose paragraphs of ``text`` (paragraphs are split at blank lines).

    After :func:`inspect.cleandoc`, a paragraph is dropped as code or markup when a line is indented, starts
    with ``>>>``, ``...``, ``.. `` or a bullet (``- ``, ``* ``), holds ``::`` or ``://``, has no letter or digit
    (an underline), or when a word is not a plain word: after stripping opening quotes/brackets and closing
    quotes/brackets/marks, every word must be letters/digits with internal ``'`` or ``-``, a number (``3.14``)
    or a dotted abbreviation (``e.g.``), and be exactly lower/Capitalised/UPPER case (no ``JSONDecoder``).
    So ``=``, ``_``, backquotes, ``*``, ``/``, ``@``, ``#``, ``<>``, ``[]``, ``{}``, ``f(x)``, ``os.path`` reject it.
    The last mark character after a word gives its mark (``"end.)"`` → PERIOD); abbreviations (dotted letters,
    ``etc``, ``cf``, ``vs``, ``viz``, ``approx``) keep their final dot in the token, so ``"e.g.,"`` is
    ``e.g.`` + COMMA and a sentence-final ``etc.`` gets O. A paragraph is cut into chunks of at most
    ``max_tokens``, preferring to cut after a PERIOD/QUESTION in the last half of a window; chunks of fewer
    than 3 tokens are dropped; chunk ``k`` of ``text`` is named ``f"{where}#{k}"``.
    """
    if max_tokens < 3:
        raise ValueError(f"max_tokens must be at least 3 (shorter chunks are dropped), got {max_tokens}")
    examples: list[TaggedSentence] = []
    for paragraph in _PARAGRAPH_BREAK.split(inspect.cleandoc(text)):
        labels = _prose_labels(paragraph)
        if not labels:
            continue
        tokens, tags = zip(*labels)
        for start, end in _chunks(tags, max_tokens):
            if end - start >= 3:
                examples.append(make_sentence(tokens[start:end], tags[start:end], where=f"{where}#{len(examples)}"))
    return examples


def punctuation_corpus(docstrings: Sequence[Docstring], max_tokens: int = 48) -> list[TaggedSentence]:
    """:func:`examples_from_text` over every docstring, each example named ``"<docstring name>#k"``."""
    return [example for doc in docstrings for example in examples_from_text(doc.text, max_tokens, where=doc.name)]


def restore_text(tokens: Sequence[str], tags: Sequence[str]) -> str:
    """Apply each tag's case and mark to its token and join with spaces: the text a model's tags stand for.

    ``restore_text(["hello", "world", "how"], ["O|C", "COMMA|L", "QUESTION|L"])`` is ``"Hello world, how?"``;
    a tag outside :data:`PUNCT_TAGS` raises :class:`ValueError` naming it.
    """
    if len(tokens) != len(tags):
        raise ValueError(f"{len(tokens)} tokens but {len(tags)} tags")
    words = []
    for token, tag in zip(tokens, tags):
        mark, case = _split(tag)
        words.append(_apply_case(token, case) + _CHAR_OF_MARK[mark])
    return " ".join(words)
