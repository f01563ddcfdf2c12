"""ROUGE-1/2/L/Lsum F1 with the ``rouge_score`` package (Porter stemming, best reference per example).

ROUGE-Lsum scores summaries sentence by sentence; ``rouge_score`` expects the sentences on separate lines.
Sentences are split here with a simple regex (after ``.``, ``!`` or ``?`` followed by white space, and at
line breaks), so no NLTK sentence-tokenizer download is needed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

__all__ = ["ROUGE_TYPES", "rouge_scores", "split_sentences"]

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\s*\n\s*")


def split_sentences(text: str) -> list[str]:
    """The sentences of ``text``: split after ``.``, ``!`` or ``?`` followed by white space, and at line breaks."""
    return [s for s in _SENTENCE_END.split(text.strip()) if s]


def rouge_scores(predictions: Sequence[str], references: Sequence[Sequence[str]],
                 use_stemmer: bool = True, multi_reference: Literal["best", "mean"] = "best") -> dict[str, float]:
    """Mean ROUGE-1/2/L/Lsum F1 (fractions) of ``predictions`` against their references. With several
    references, each example counts its best one per ROUGE type (``multi_reference="best"``) or the mean over
    them (``"mean"``, the stricter figure). No predictions give zeros."""
    if multi_reference not in ("best", "mean"):
        raise ValueError(f"multi_reference must be 'best' or 'mean', got {multi_reference!r}")
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    if not predictions:
        return totals
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer)
    for i, (prediction, refs) in enumerate(zip(predictions, references)):
        if isinstance(refs, str) or not refs:
            raise ValueError(f"example {i}: references must be a non-empty sequence of strings, got {refs!r}")
        target = "\n".join(split_sentences(prediction))
        lines = ["\n".join(split_sentences(r)) for r in refs]
        if multi_reference == "best":
            scores = scorer.score_multi(lines, target)
            for key in ROUGE_TYPES:
                totals[key] += scores[key].fmeasure
        else:
            each = [scorer.score(line, target) for line in lines]
            for key in ROUGE_TYPES:
                totals[key] += sum(s[key].fmeasure for s in each) / len(each)
    return {key: value / len(predictions) for key, value in totals.items()}
