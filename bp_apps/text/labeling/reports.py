"""What a labeling test leaves beside ``label_report.md``: the predictions sentence by sentence, and a confusion
of the span types that shows which roles (or punctuation marks) are mistaken for which.

Spans are read as the scores read them: BIO tags with CoNLL chunking (seqeval's ``get_entities``, the chunking of
:func:`~bp_apps.text.labeling.metrics.span_scores`, types in ``exclude`` such as SRL's ``V`` left out); other tag
sets (punctuation ``MARK|CASE``) give a one-token span of type ``MARK`` on every token whose mark is not ``O``.
A gold span counts in column X of its row when a predicted span of type X has exactly its boundaries, and as
*missed* when none has; a predicted span whose boundaries no gold span has is *spurious* (in the row of its type).
So a row's class columns and its missed column add up to the gold spans of that type, and a column plus the
spurious count of that type's row add up to the predicted spans of that type.
"""

from __future__ import annotations

import csv
import io
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from seqeval.metrics.sequence_labeling import get_entities

from bp_apps.core.io import atomic_write_text
from bp_apps.core.reports import save_count_matrix

__all__ = ["MISSED", "SPURIOUS", "SpanConfusion", "mark_spans", "span_confusion", "tag_spans"]

MISSED, SPURIOUS = "missed", "spurious"
Span = tuple[str, int, int]
"""(type, first token, last token), inclusive."""


def tag_spans(tags: Sequence[str], exclude: Sequence[str] = ()) -> list[Span]:
    """The spans of one BIO-tagged sentence, CoNLL-chunked, without the types in ``exclude``."""
    dropped = frozenset(exclude)
    return [(kind, start, end) for kind, start, end in get_entities(list(tags)) if kind not in dropped]


def mark_spans(tags: Sequence[str], project: Callable[[str], str] = lambda tag: tag.split("|")[0],
               outside: str = "O") -> list[Span]:
    """One-token spans of a per-token tag set: the projected tag (``"COMMA|C"`` -> ``COMMA``) of every token whose
    projection is not ``outside``."""
    spans = []
    for i, tag in enumerate(tags):
        kind = project(tag)
        if kind != outside:
            spans.append((kind, i, i))
    return spans


@dataclass
class SpanConfusion:
    """Counts of gold spans (rows, by type) against the type of the predicted span with the same boundaries, plus
    missed gold spans and spurious predicted ones per type."""

    matched: dict[str, Counter] = field(default_factory=dict)
    missed: Counter = field(default_factory=Counter)
    spurious: Counter = field(default_factory=Counter)

    @property
    def types(self) -> list[str]:
        """Every span type seen, gold or predicted, sorted."""
        kinds = set(self.matched) | set(self.missed) | set(self.spurious)
        kinds |= {kind for row in self.matched.values() for kind in row}
        return sorted(kinds)

    @property
    def columns(self) -> list[str]:
        return [*self.types, MISSED, SPURIOUS]

    def add(self, gold: Sequence[Span], predicted: Sequence[Span]) -> None:
        """Count one sentence's spans."""
        by_boundaries = {(start, end): kind for kind, start, end in predicted}
        gold_boundaries = {(start, end) for _, start, end in gold}
        for kind, start, end in gold:
            guess = by_boundaries.get((start, end))
            if guess is None:
                self.missed[kind] += 1
            else:
                self.matched.setdefault(kind, Counter())[guess] += 1
        for kind, start, end in predicted:
            if (start, end) not in gold_boundaries:
                self.spurious[kind] += 1

    def rows(self) -> list[list[int]]:
        """The table, one row per type in :attr:`types`, one column per entry of :attr:`columns`."""
        kinds = self.types
        return [[self.matched.get(gold, Counter())[kind] for kind in kinds] + [self.missed[gold], self.spurious[gold]]
                for gold in kinds]

    def to_csv(self) -> str:
        """The table as CSV: a ``gold`` column naming the row's type, then one column per entry of :attr:`columns`."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["gold", *self.columns])
        for kind, row in zip(self.types, self.rows()):
            writer.writerow([kind, *row])
        return out.getvalue()

    def write(self, csv_path: Path, png_path: Path) -> tuple[Path, Path]:
        """``span_confusion.csv`` and ``span_confusion.png``, each written atomically."""
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(csv_path, self.to_csv())
        kinds = self.types
        if not kinds:  # no span anywhere: an empty table still says so
            save_count_matrix([[0, 0]], ["(none)"], [MISSED, SPURIOUS], png_path, "span confusion (test): no spans",
                              xlabel="predicted span type", ylabel="gold span type")
        else:
            save_count_matrix(self.rows(), kinds, self.columns, png_path, "span confusion (test, exact boundaries)",
                              xlabel="predicted span type", ylabel="gold span type", split_after=len(kinds))
        return csv_path, png_path


def span_confusion(gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]], bio: bool = True,
                   exclude: Sequence[str] = ()) -> SpanConfusion:
    """The span confusion of gold and predicted tag sequences (see the module's docstring): BIO spans when
    ``bio``, else one-token spans of each tag's first ``|`` field. ValueError when the sequences do not pair up."""
    if len(gold) != len(predicted):
        raise ValueError(f"span confusion: {len(gold)} gold sentences but {len(predicted)} predicted")
    confusion = SpanConfusion()
    for i, (g, p) in enumerate(zip(gold, predicted)):
        if len(g) != len(p):
            raise ValueError(f"span confusion: sentence {i} has {len(g)} gold tags but {len(p)} predicted")
        if bio:
            confusion.add(tag_spans(g, exclude), tag_spans(p, exclude))
        else:
            confusion.add(mark_spans(g), mark_spans(p))
    return confusion
