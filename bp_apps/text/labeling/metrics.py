"""Scores for token labeling: CoNLL span precision/recall/F1 (via seqeval) and token-level scores."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

from seqeval.metrics.sequence_labeling import get_entities, precision_recall_fscore_support

__all__ = ["span_scores", "token_scores"]


def _check_lengths(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> None:
    """Raise ``ValueError`` unless ``gold`` and ``pred`` have the same number of sentences and sentence lengths."""
    if len(gold) != len(pred):
        raise ValueError(f"gold has {len(gold)} sentences but pred has {len(pred)}")
    for i, (g, p) in enumerate(zip(gold, pred)):
        if len(g) != len(p):
            raise ValueError(f"sentence {i}: gold has {len(g)} tags but pred has {len(p)}")


def _drop_types(tags: Sequence[str], exclude: frozenset[str]) -> list[str]:
    """``tags`` with every ``B-X``/``I-X`` whose type ``X`` is in ``exclude`` turned into ``O``."""
    return ["O" if tag.startswith(("B-", "I-")) and tag[2:] in exclude else tag for tag in tags]


def _prf(correct: int, predicted: int, actual: int) -> dict[str, float]:
    """Precision, recall and F1 from counts, 0.0 where a denominator is zero."""
    precision = correct / predicted if predicted else 0.0
    recall = correct / actual if actual else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def span_scores(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]], exclude: Sequence[str] = ()) -> dict:
    """Micro span precision/recall/F1, gold ``support`` and ``per_label`` scores with CoNLL (conlleval) chunking;
    span types in ``exclude`` (e.g. ``"V"`` for SRL, as in CoNLL-2005) become ``O`` on both sides first."""
    _check_lengths(gold, pred)
    excluded = frozenset(exclude)
    gold = [_drop_types(sentence, excluded) for sentence in gold]
    pred = [_drop_types(sentence, excluded) for sentence in pred]
    kinds = sorted({kind for kind, _, _ in get_entities(gold)} | {kind for kind, _, _ in get_entities(pred)})
    precision, recall, f1, support = precision_recall_fscore_support(gold, pred, average="micro", zero_division=0)
    per_label = {}
    if kinds:
        rows = zip(*precision_recall_fscore_support(gold, pred, average=None, zero_division=0))
        per_label = {kind: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
                     for kind, (p, r, f, s) in zip(kinds, rows)}
    return {"precision": float(precision), "recall": float(recall), "f1": float(f1), "support": int(support),
            "per_label": per_label}


def token_scores(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]],
                 project: Callable[[str], str] | None = None, ignore: Sequence[str] = ("O",)) -> dict:
    """Token-level scores after mapping tags through ``project`` (e.g. ``"COMMA|C"`` -> ``"COMMA"``): ``per_label``
    P/R/F1/support, ``micro`` P/R/F1/support over labels not in ``ignore``, and ``accuracy`` over all tokens."""
    _check_lengths(gold, pred)
    mapped = project if project is not None else str
    pairs = [(mapped(g), mapped(p)) for g_sent, p_sent in zip(gold, pred) for g, p in zip(g_sent, p_sent)]
    actual = Counter(g for g, _ in pairs)
    predicted = Counter(p for _, p in pairs)
    correct = Counter(g for g, p in pairs if g == p)
    per_label = {label: {**_prf(correct[label], predicted[label], actual[label]), "support": actual[label]}
                 for label in sorted(actual | predicted)}
    ignored = set(ignore)
    kept = [label for label in per_label if label not in ignored]
    n_actual = sum(actual[label] for label in kept)
    micro = {**_prf(sum(correct[label] for label in kept), sum(predicted[label] for label in kept), n_actual),
             "support": n_actual}
    accuracy = sum(correct.values()) / len(pairs) if pairs else 0.0
    return {"per_label": per_label, "micro": micro, "accuracy": accuracy}
