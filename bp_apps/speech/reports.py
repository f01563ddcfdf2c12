"""What a speech test leaves beside ``metrics.json``: per-utterance predictions with their word errors, and a
figure of what the CTC network emits over time.

The word errors come from a Levenshtein alignment of the reference and hypothesis words (:func:`align_words`):
the fewest substitutions + deletions + insertions that turn the reference into the hypothesis. Their sum over a
test set divided by its reference words is the WER the test logs, so the file shows where that figure comes from,
utterance by utterance. A wrong word is one substitution (one edit), never a deletion plus an insertion (two);
among alignments with equally few edits the one with the fewest substitutions, i.e. the most matched words, is
kept: "a b" against "b c" deletes "a", matches "b" and inserts "c" rather than substituting twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bp_apps.core.reports import save_figure
from bp_apps.speech.decoding import BLANK, TOKENS, WORD_BOUNDARY

__all__ = ["ALIGNMENT_EXAMPLES", "AlignmentExample", "WordAlignment", "align_words", "prediction_row",
           "save_ctc_alignment"]

ALIGNMENT_EXAMPLES = 3
"""How many test utterances ``ctc_alignment.png`` shows (the first ones of the test set)."""


@dataclass(frozen=True)
class WordAlignment:
    """A minimum-edit alignment of reference and hypothesis words. ``steps`` lists it pair by pair: ``("=", ref,
    hyp)`` a match, ``("S", ref, hyp)`` a substitution, ``("D", ref, None)`` a deletion (a reference word the
    hypothesis lacks), ``("I", None, hyp)`` an insertion."""

    steps: tuple[tuple[str, str | None, str | None], ...]

    def count(self, kind: str) -> int:
        return sum(1 for step in self.steps if step[0] == kind)

    @property
    def substitutions(self) -> int:
        return self.count("S")

    @property
    def deletions(self) -> int:
        return self.count("D")

    @property
    def insertions(self) -> int:
        return self.count("I")

    @property
    def errors(self) -> int:
        """Substitutions + deletions + insertions: the word edit distance."""
        return self.substitutions + self.deletions + self.insertions

    @property
    def reference_words(self) -> int:
        return sum(1 for step in self.steps if step[1] is not None)


def _words(text: str | Sequence[str]) -> list[str]:
    return text.split() if isinstance(text, str) else list(text)


def align_words(reference: str | Sequence[str], hypothesis: str | Sequence[str]) -> WordAlignment:
    """The Levenshtein alignment of two word sequences (strings are split on whitespace).

    ``cost[i][j]`` is (edits, substitutions) for the first ``i`` reference and ``j`` hypothesis words, compared
    as a pair: the fewest edits, then the fewest substitutions among them. The path is read back from the end."""
    ref, hyp = _words(reference), _words(hypothesis)
    rows, cols = len(ref) + 1, len(hyp) + 1
    cost = [[(0, 0)] * cols for _ in range(rows)]
    for i in range(1, rows):
        cost[i][0] = (i, 0)
    for j in range(1, cols):
        cost[0][j] = (j, 0)
    for i in range(1, rows):
        for j in range(1, cols):
            edits, subs = cost[i - 1][j - 1]
            diagonal = (edits, subs) if ref[i - 1] == hyp[j - 1] else (edits + 1, subs + 1)
            deletion = (cost[i - 1][j][0] + 1, cost[i - 1][j][1])
            insertion = (cost[i][j - 1][0] + 1, cost[i][j - 1][1])
            cost[i][j] = min(diagonal, deletion, insertion)
    steps: list[tuple[str, str | None, str | None]] = []
    i, j = len(ref), len(hyp)
    while i > 0 or j > 0:
        if i > 0 and j > 0:
            edits, subs = cost[i - 1][j - 1]
            same = ref[i - 1] == hyp[j - 1]
            if cost[i][j] == ((edits, subs) if same else (edits + 1, subs + 1)):
                steps.append(("=" if same else "S", ref[i - 1], hyp[j - 1]))
                i, j = i - 1, j - 1
                continue
        if i > 0 and cost[i][j] == (cost[i - 1][j][0] + 1, cost[i - 1][j][1]):
            steps.append(("D", ref[i - 1], None))
            i -= 1
        else:
            steps.append(("I", None, hyp[j - 1]))
            j -= 1
    return WordAlignment(tuple(reversed(steps)))


def prediction_row(reference: str, hypothesis: str, **source: Any) -> dict[str, Any]:
    """One line of ``test_predictions.jsonl``: where the utterance comes from (``source``: its index in the test
    set, its audio files, when known), the reference and the hypothesis, and the word errors between them."""
    alignment = align_words(reference, hypothesis)
    return {**{k: v for k, v in source.items() if v is not None}, "reference": reference, "hypothesis": hypothesis,
            "substitutions": alignment.substitutions, "deletions": alignment.deletions,
            "insertions": alignment.insertions, "word_errors": alignment.errors,
            "reference_words": alignment.reference_words}


@dataclass(frozen=True)
class AlignmentExample:
    """What the alignment figure shows of one utterance: its input features ``(T, F)`` (log-mel, or a waveform
    with ``F`` = 1), the network's log-probabilities ``(T', V)`` over its output frames, and the two transcripts."""

    features: Tensor
    log_probs: Tensor
    reference: str
    hypothesis: str
    index: int = 0


def _token_name(index: int) -> str:
    token = TOKENS[index] if 0 <= index < len(TOKENS) else str(index)
    return {BLANK: "blank", WORD_BOUNDARY: "space"}.get(token, token)


def save_ctc_alignment(examples: Sequence[AlignmentExample], path: Path) -> Path:
    """Two panels per utterance, one above the other, written atomically to ``path``: the input (a log-mel
    spectrogram, or the waveform) and, on the same time axis, the posterior of every label that is the best one
    in some output frame, with the best non-blank label written over the frames where it wins (the greedy CTC
    path, before repeats are merged). The reference and the hypothesis are the upper panel's title."""
    from matplotlib.figure import Figure

    if not examples:
        raise ValueError(f"{path}: no utterances to draw")
    figure = Figure(figsize=(10, 4.2 * len(examples)))
    axes = figure.subplots(2 * len(examples), 1, squeeze=False)
    for n, example in enumerate(examples):
        top, bottom = axes[2 * n, 0], axes[2 * n + 1, 0]
        features = example.features.detach().float().cpu()
        frames = features.shape[0]
        if features.shape[-1] == 1:  # a waveform model: the samples themselves
            top.plot(features[:, 0].numpy(), linewidth=0.4)
            top.set(ylabel="amplitude", xlim=(0, frames))
        else:
            top.imshow(features.T.numpy(), origin="lower", aspect="auto", cmap="magma",
                       extent=(0, frames, 0, features.shape[1]))
            top.set(ylabel="mel band")
        top.set_title(f"#{example.index}  reference: {example.reference!r}\nhypothesis: {example.hypothesis!r}",
                      fontsize=9, loc="left")
        probs = example.log_probs.detach().float().cpu().exp()
        steps = probs.shape[0]
        scale = frames / max(steps, 1)  # output frames on the input's time axis (the network subsamples)
        times = (torch.arange(steps) + 0.5) * scale
        best = probs.argmax(-1)
        shown = sorted(set(best.tolist()) | {0})
        for label in shown:
            style = {"color": "0.6", "linestyle": ":"} if label == 0 else {}
            bottom.plot(times.numpy(), probs[:, label].numpy(), linewidth=1.0, label=_token_name(label), **style)
        for t, label in enumerate(best.tolist()):
            if label != 0:
                bottom.text(float(times[t]), 1.02, _token_name(label), ha="center", va="bottom", fontsize=7)
        bottom.set(xlim=(0, frames), ylim=(0, 1.12), xlabel="input frame", ylabel="posterior")
        bottom.legend(fontsize=6, ncol=min(len(shown), 10), loc="upper right", framealpha=0.6)
    figure.tight_layout()
    return save_figure(figure, path)
