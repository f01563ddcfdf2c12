"""Linear-chain CRF (forward algorithm, Viterbi) and BIO-valid decoding for taggers without a CRF.

Shapes: ``B`` sentences, ``T`` time steps (padded), ``L`` labels. ``mask[B, T]`` is boolean and left-aligned:
each row is ``True`` for the sentence's tokens, then ``False`` for padding, and every sentence has at least one
token. ``transitions[i, j]`` scores label ``j`` following label ``i``.

Constraint handling in the loss: a move that :func:`bio_constraints` forbids gets the large finite penalty
:data:`CONSTRAINT_PENALTY` in the partition function (``exp(-1e4)`` is exactly 0 in float32 and float64, so those
paths are excluded, while no ``-inf`` ever reaches ``logsumexp`` and its gradient stays NaN-free). A gold path that
itself breaks the constraints (noisy data) would have probability 0 under the constrained model, i.e. an infinite
loss; for such a sentence the constraints are dropped (its partition runs over all paths), so its loss is the
finite, non-negative NLL of the unconstrained CRF. Decoding always applies the constraints exactly (``-inf``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from bp_apps.engine.crf import check_mask, viterbi_decode

__all__ = ["CONSTRAINT_PENALTY", "CRF", "bio_constraints", "constrained_decode", "viterbi_decode"]

CONSTRAINT_PENALTY = -1.0e4
"""Score added to a forbidden move in the CRF's partition function (finite, so gradients stay NaN-free)."""

_REDUCTIONS = ("mean", "sum", "token_mean")


def _split_bio(label: str) -> tuple[str, str] | None:
    """``("B", type)``, ``("I", type)``, ``("O", "")`` for a BIO label, or ``None`` for anything else."""
    if label == "O":
        return "O", ""
    if label.startswith(("B-", "I-")):
        return label[0], label[2:]
    return None


def bio_constraints(labels: Sequence[str]) -> tuple[Tensor, Tensor, Tensor]:
    """Boolean ``start_allowed[L]``, ``allowed[L, L]`` (``allowed[i, j]``: ``j`` may follow ``i``), ``end_allowed[L]``
    for CoNLL BIO labels: ``I-X`` only after ``B-X``/``I-X`` and never first. A non-BIO label set allows everything."""
    n = len(labels)
    start_allowed = torch.ones(n, dtype=torch.bool)
    allowed = torch.ones(n, n, dtype=torch.bool)
    end_allowed = torch.ones(n, dtype=torch.bool)
    parts = [_split_bio(label) for label in labels]
    if any(part is None for part in parts):
        return start_allowed, allowed, end_allowed
    for j, (prefix, kind) in enumerate(parts):
        if prefix != "I":
            continue
        start_allowed[j] = False
        for i, (prev_prefix, prev_kind) in enumerate(parts):
            allowed[i, j] = prev_prefix in ("B", "I") and prev_kind == kind
    return start_allowed, allowed, end_allowed


def _constraint_scores(labels: Sequence[str], dtype: torch.dtype, device: torch.device | str
                       ) -> tuple[Tensor, Tensor, Tensor]:
    """Zero transition/start/end scores with ``-inf`` for the moves :func:`bio_constraints` forbids."""
    start_allowed, allowed, end_allowed = (m.to(device) for m in bio_constraints(labels))
    return tuple(torch.zeros(m.shape, dtype=dtype, device=device).masked_fill(~m, float("-inf"))
                 for m in (allowed, start_allowed, end_allowed))


def constrained_decode(scores: Tensor, mask: Tensor, labels: Sequence[str]) -> list[list[int]]:
    """Best BIO-valid path under per-token ``scores[B, T, L]`` (e.g. log-softmax) for taggers without a CRF;
    for a non-BIO label set this is the per-token argmax."""
    transitions, start, end = _constraint_scores(labels, scores.dtype, scores.device)
    return viterbi_decode(scores, mask, transitions, start, end)


_TINY = 1e-30  # floor of a step's summed probability mass: a label no path reaches gets log(1e-30), not -inf


def _log_partition(alpha: Tensor, transitions: Tensor, emissions: Tensor, mask: Tensor, end: Tensor) -> Tensor:
    """The forward algorithm, ``log Z`` per sentence ``[B]``, from ``alpha = start + emissions[:, 0]`` and per-sentence
    ``transitions[B, L, L]``. Each step is a batched matrix product in probability space, shifted for stability:
    ``alpha_t = m + c + log(exp(alpha - m) @ exp(transitions - c)) + emissions[:, t]`` with ``m`` the row maximum of
    ``alpha`` and ``c`` that of the transitions. It equals the ``logsumexp`` recursion up to rounding, without the
    ``[B, L, L]`` temporary per step (several times faster, and far less memory kept for the backward pass)."""
    shift = transitions.amax(dim=(1, 2), keepdim=True)  # [B, 1, 1]
    weights = torch.exp(transitions - shift)  # forbidden moves (penalty -1e4) are exactly 0
    # unbind once: indexing emissions[:, t] per step would make each step's backward write a zero [B, T, L] tensor
    for step, keep in zip(emissions.unbind(1)[1:], mask.unbind(1)[1:], strict=True):
        top = alpha.amax(dim=1, keepdim=True)  # [B, 1]
        mass = torch.bmm(torch.exp(alpha - top).unsqueeze(1), weights).squeeze(1).clamp_min(_TINY)
        nxt = mass.log() + top + shift[:, 0] + step
        alpha = torch.where(keep.unsqueeze(1), nxt, alpha)
    return torch.logsumexp(alpha + end, dim=1)


class CRF(nn.Module):
    """Linear-chain CRF over ``labels`` with learned transition, start and end scores; with ``constrain`` the moves
    :func:`bio_constraints` forbids are excluded from the partition function and from decoding."""

    def __init__(self, labels: Sequence[str], constrain: bool = True) -> None:
        super().__init__()
        self.labels = tuple(labels)
        num_labels = len(self.labels)
        self.transitions = nn.Parameter(torch.zeros(num_labels, num_labels))
        self.start = nn.Parameter(torch.zeros(num_labels))
        self.end = nn.Parameter(torch.zeros(num_labels))
        if constrain:
            start_allowed, allowed, end_allowed = bio_constraints(self.labels)
        else:
            start_allowed = end_allowed = torch.ones(num_labels, dtype=torch.bool)
            allowed = torch.ones(num_labels, num_labels, dtype=torch.bool)
        # Derived from the labels, so rebuilt by __init__ rather than stored in checkpoints; they follow .to(device).
        self.register_buffer("start_allowed", start_allowed, persistent=False)
        self.register_buffer("allowed", allowed, persistent=False)
        self.register_buffer("end_allowed", end_allowed, persistent=False)

    def _check(self, emissions: Tensor, mask: Tensor) -> Tensor:
        """Validate ``emissions[B, T, L]`` against the label count and return the lengths from ``mask``."""
        if emissions.dim() != 3 or emissions.shape[2] != len(self.labels):
            raise ValueError(f"emissions must have shape [B, T, {len(self.labels)}], got {tuple(emissions.shape)}")
        return check_mask(mask, emissions.shape[0], emissions.shape[1])

    def log_likelihood(self, emissions: Tensor, tags: Tensor, mask: Tensor) -> Tensor:
        """Per-sentence ``log p(tags | emissions)`` ``[B]``: gold path score minus the log partition (forward
        algorithm); padded tags are ignored, and gold paths that break the constraints drop them (module doc)."""
        lengths = self._check(emissions, mask)
        dtype = emissions.dtype
        transitions, start, end = (p.to(dtype) for p in (self.transitions, self.start, self.end))
        tags = tags.masked_fill(~mask, 0)
        last = tags.gather(1, (lengths - 1).unsqueeze(1)).squeeze(1)

        step_scores = transitions[tags[:, :-1], tags[:, 1:]] + emissions[:, 1:].gather(2, tags[:, 1:, None])[..., 0]
        gold = start[tags[:, 0]] + emissions[:, 0].gather(1, tags[:, :1])[:, 0] + end[last]
        gold = gold + torch.where(mask[:, 1:], step_scores, torch.zeros_like(step_scores)).sum(1)

        step_ok = self.allowed[tags[:, :-1], tags[:, 1:]] | ~mask[:, 1:]
        constrained = (self.start_allowed[tags[:, 0]] & step_ok.all(1) & self.end_allowed[last]).to(dtype)
        # Per-sentence scores: the penalty applies only to sentences whose gold path respects the constraints.
        transitions = transitions + constrained[:, None, None] * (~self.allowed).to(dtype) * CONSTRAINT_PENALTY
        start = start + constrained[:, None] * (~self.start_allowed).to(dtype) * CONSTRAINT_PENALTY
        end = end + constrained[:, None] * (~self.end_allowed).to(dtype) * CONSTRAINT_PENALTY

        return gold - _log_partition(start + emissions[:, 0], transitions, emissions, mask, end)

    def forward(self, emissions: Tensor, tags: Tensor, mask: Tensor) -> Tensor:
        """Per-sentence log-likelihood ``[B]`` (see :meth:`log_likelihood`), so the module can be called directly."""
        return self.log_likelihood(emissions, tags, mask)

    def nll(self, emissions: Tensor, tags: Tensor, mask: Tensor, reduction: str = "mean") -> Tensor:
        """Negative log-likelihood as a training loss: ``mean`` over sentences, ``sum``, or ``token_mean`` (total over
        the number of real tokens, so long and short batches weigh tokens alike)."""
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        loss = -self.log_likelihood(emissions, tags, mask)
        if reduction == "mean":
            return loss.mean()
        if reduction == "sum":
            return loss.sum()
        return loss.sum() / mask.sum()

    def decode(self, emissions: Tensor, mask: Tensor) -> list[list[int]]:
        """Best label path per sentence (Viterbi), with forbidden moves excluded exactly when constrained."""
        self._check(emissions, mask)
        dtype = emissions.dtype
        transitions = self.transitions.to(dtype).masked_fill(~self.allowed, float("-inf"))
        start = self.start.to(dtype).masked_fill(~self.start_allowed, float("-inf"))
        end = self.end.to(dtype).masked_fill(~self.end_allowed, float("-inf"))
        return viterbi_decode(emissions, mask, transitions, start, end)
