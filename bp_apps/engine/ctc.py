"""Connectionist temporal classification with a hand-written forward-backward (alpha-beta) recursion.

Notation (one sequence of the batch): log-probabilities y_t(c) = log p_t(c) for frames t < T_b (its input
length), a target l of length L, and the extended label sequence l' = (∅, l₁, ∅, l₂, …, l_L, ∅) of length
2L + 1, where ∅ is the blank. A path visits one state s of l' per frame. LSE is the log-sum-exp, −∞-safe
(``torch.logaddexp(−∞, −∞) = −∞``), and skip(s) means l'_s ≠ ∅ and l'_s ≠ l'_{s−2}.

Forward (alpha; the code keeps a_t(s) = α_t(s) − y_t(l'_s), the same recursion as beta's below):

    α_0(0) = y_0(∅),  α_0(1) = y_0(l₁),  α_0(s) = −∞ for s ≥ 2
    α_t(s) = y_t(l'_s) + LSE(α_{t−1}(s), α_{t−1}(s−1), α_{t−1}(s−2) if skip(s))
    log p(l | y) = LSE(α_{T_b−1}(2L), α_{T_b−1}(2L−1)),   loss = −log p(l | y)

Backward (beta, *excluding* the emission of frame t, so no −∞ − (−∞) ever appears):

    β_{T_b−1}(s) = 0 for s ∈ {2L, 2L−1}, −∞ otherwise
    β_t(s) = LSE(y_{t+1}(l'_s) + β_{t+1}(s), y_{t+1}(l'_{s+1}) + β_{t+1}(s+1),
                 y_{t+1}(l'_{s+2}) + β_{t+1}(s+2) if skip(s+2))

Every path passes through exactly one state at each frame, so Σ_s exp(α_t(s) + β_t(s)) = p for every t < T_b,
and the posterior occupancy of class c at frame t is

    γ_t(c) = Σ_{s : l'_s = c} exp(α_t(s) + β_t(s) − log p)     (renormalised so that Σ_c γ_t(c) = 1 exactly).

Derivatives (w_b is the reduction weight of sequence b times the upstream gradient):

    ∂loss/∂y_t(c) = −w_b·γ_t(c)                                            (``CTCLoss.backward_log_probs``)
    ∂loss/∂z_t(c) = w_b·(softmax(z_t)(c) − γ_t(c)),  y = log_softmax(z)     (``CTCLoss.backward``)

The second is the first composed with log-softmax's backward (dz = dy − softmax·Σ_c dy) using Σ_c γ_t(c) = 1.
It is what ``torch.nn.functional.ctc_loss`` itself returns as its "log_probs gradient"; autograd through
log_softmax leaves it unchanged because Σ_c (softmax − γ) = 0. An engine model that ends in ``LogSoftmax``
therefore passes ``CTCLoss.backward()`` straight to the layer before its log-softmax and skips that layer's
backward. Frames t ≥ T_b get zero gradient.

Implementation: the loop runs over time only, vectorised over the batch and the extended states. Sequences
are packed end to end in one flat vector, each as [−∞, −∞, state 0, …, state 2L_b], so the shifted operands
s − 1 and s − 2 are contiguous slices (several times faster than strided ones) and no state past 2L_b is ever
computed. Frames t ≥ T_b get the emission "0 at state 2L_b, −∞ elsewhere", under which β stays "0 at 2L_b"
until the sequence's own last frame: one sweep serves every input length. β runs in the same sweep as α on a
second copy of the packed vector reversed end to end (time and states), which turns its recursion into α's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from bp_apps.engine.layers import Layer

_REDUCTIONS = ("mean", "sum", "none")


class CTCTypeError(TypeError, ValueError):
    """A wrong dtype or argument type given to ``CTCLoss``: both a TypeError (as the engine's other losses raise
    for dtypes) and a ValueError (so one ``except ValueError`` catches every bad CTC input)."""


class LogSoftmax(Layer):
    """y = x − logsumexp(x) along ``dim``, as ``nn.LogSoftmax(dim)``.

    Backward: dx = g − softmax(x)·Σ_dim g, with softmax(x) = exp(y) (only y is kept).
    """

    def __init__(self, dim: int = -1) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        y = torch.log_softmax(x, self.dim)
        self.saved = (y,)
        return y

    def backward(self, grad_output: Tensor) -> Tensor:
        (y,) = self.saved
        total = grad_output.sum(self.dim, keepdim=True)
        return grad_output - torch.exp(y).mul_(total)

    def torch_module(self) -> nn.Module:
        return nn.LogSoftmax(dim=self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


def _as_lengths(name: str, lengths: Tensor | Sequence[int], batch: int, device: torch.device) -> Tensor:
    """A (B,) int64 tensor of lengths on ``device``; ValueError/CTCTypeError naming CTCLoss otherwise."""
    if not isinstance(lengths, Tensor):
        try:
            lengths = torch.as_tensor(list(lengths), dtype=torch.long)
        except (TypeError, ValueError, RuntimeError):
            raise CTCTypeError(f"CTCLoss: {name} must be an integer tensor or a sequence of ints") from None
    if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
        raise CTCTypeError(f"CTCLoss: {name} must be an integer tensor, got {lengths.dtype}")
    if lengths.dim() != 1 or lengths.shape[0] != batch:
        raise ValueError(f"CTCLoss: {name} must have shape ({batch},) (one per sequence), got {tuple(lengths.shape)}")
    return lengths.to(device=device, dtype=torch.long)


class CTCLoss:
    """CTC loss with ``torch.nn.functional.ctc_loss``'s conventions, except that log-probabilities are
    BATCH-FIRST: ``forward(log_probs (B, T, C), targets, input_lengths (B,), target_lengths (B,))``.

    ``targets`` is either padded (B, S_max) (entries past a sequence's target length are ignored) or the
    concatenation of all targets, 1-D of length Σ target_lengths. ``reduction``: "mean" (each loss divided by its
    target length clamped to ≥ 1, then averaged over the batch), "sum", or "none" (a (B,) tensor).
    ``zero_infinity`` replaces infinite losses (and their gradients) by zero. As in torch, a target that no
    alignment of its input can produce (too long for its input length, counting the blanks that separate repeated
    labels) is not an error: its loss is inf, and its gradient NaN on its valid frames unless ``zero_infinity``.

    ``backward(grad_output=None)`` returns dL/dlogits (B, T, C) for ``log_probs = log_softmax(logits)``: the
    gradient torch's CTC backward also returns (see the module docstring); ``backward_log_probs`` returns the true
    derivative with respect to ``log_probs``. ``grad_output`` is the upstream gradient of the loss (a scalar, or (B,)
    for reduction "none"), 1 by default. ``forward`` runs both recursions (one sweep; see the module docstring), so
    the backwards only assemble γ.

    Bad input raises a ValueError naming CTCLoss (dtype problems a :class:`CTCTypeError`, which is both a
    ValueError and a TypeError): a blank outside [0, C), a target label equal to the blank or outside [0, C),
    target lengths < 0 or wider than padded targets, input lengths outside [0, T], wrong shapes. Differences from
    torch: torch accepts (T, B, C) and unbatched input and does not check the labels; and a NaN in one sequence's
    valid log-probabilities makes every loss of the batch NaN here (the packed sweep shares one vector), not
    only that sequence's.
    """

    saved: tuple = ()

    def __init__(self, blank: int = 0, reduction: str = "mean", zero_infinity: bool = False) -> None:
        if isinstance(blank, bool) or not isinstance(blank, int) or blank < 0:
            raise ValueError(f"CTCLoss: blank must be a non-negative int, got {blank!r}")
        if reduction not in _REDUCTIONS:
            raise ValueError(f"CTCLoss: reduction must be one of {', '.join(_REDUCTIONS)}, got {reduction!r}")
        self.blank, self.reduction, self.zero_infinity = blank, reduction, bool(zero_infinity)

    def __repr__(self) -> str:
        return f"CTCLoss(blank={self.blank}, reduction={self.reduction!r}, zero_infinity={self.zero_infinity})"

    # ----------------------------------------------------------------------------------------- input checks

    def _padded_targets(self, targets: Tensor, target_lengths: Tensor, classes: int, min_len: int, max_len: int,
                        total: int) -> Tensor:
        """Validate the targets and return them padded (B, L_max) with the blank past each length."""
        batch = target_lengths.shape[0]
        if min_len < 0:
            raise ValueError(f"CTCLoss: target_lengths must be >= 0, got {min_len}")
        device = target_lengths.device
        if targets.dim() == 2:
            if targets.shape[0] != batch:
                raise ValueError(f"CTCLoss: padded targets must be (B={batch}, S_max), got {tuple(targets.shape)}")
            if max_len > targets.shape[1]:
                raise ValueError(f"CTCLoss: a target length ({max_len}) exceeds the padded targets' width "
                                 f"{targets.shape[1]}")
            padded = targets[:, :max_len].to(device=device, dtype=torch.long)
        elif targets.dim() == 1:
            if targets.shape[0] != total:
                raise ValueError(f"CTCLoss: concatenated targets must have sum(target_lengths) = {total} entries, "
                                 f"got {targets.shape[0]}")
            flat = targets.to(device=device, dtype=torch.long)
            starts = torch.cumsum(target_lengths, 0) - target_lengths
            index = (starts.unsqueeze(1) + torch.arange(max_len, device=device)).clamp_(max=max(total - 1, 0))
            padded = flat[index] if total else torch.zeros(batch, max_len, dtype=torch.long, device=device)
        else:
            raise ValueError(f"CTCLoss: targets must be padded (B, S_max) or concatenated 1-D, got "
                             f"{tuple(targets.shape)}")
        inside = torch.arange(max_len, device=device) < target_lengths.unsqueeze(1)
        bad = inside & ((padded < 0) | (padded >= classes) | (padded == self.blank))
        if max_len and bool(bad.any()):
            label = int(padded[bad][0])
            reason = "is the blank" if label == self.blank else f"is outside [0, {classes})"
            raise ValueError(f"CTCLoss: target label {label} {reason} (blank={self.blank}, C={classes})")
        return torch.where(inside, padded, self.blank)

    def _check(self, log_probs: Tensor, targets: Tensor, input_lengths: Tensor | Sequence[int],
               target_lengths: Tensor | Sequence[int]) -> tuple[Tensor, Tensor, Tensor, int, int]:
        """Validated (input_lengths, target_lengths, padded targets (B, L_max), frames used, Σ target lengths)."""
        if not isinstance(log_probs, Tensor) or not log_probs.is_floating_point():
            kind = log_probs.dtype if isinstance(log_probs, Tensor) else type(log_probs).__name__
            raise CTCTypeError(f"CTCLoss: log_probs must be a floating-point tensor, got {kind}")
        if log_probs.dim() != 3:
            raise ValueError(f"CTCLoss expects batch-first log_probs (B, T, C), got {tuple(log_probs.shape)}")
        batch, frames, classes = log_probs.shape
        if not batch or not frames:
            raise ValueError(f"CTCLoss: log_probs must not be empty, got {tuple(log_probs.shape)}")
        if not self.blank < classes:
            raise ValueError(f"CTCLoss: blank index {self.blank} is out of range [0, {classes})")
        device = log_probs.device
        input_lengths = _as_lengths("input_lengths", input_lengths, batch, device)
        target_lengths = _as_lengths("target_lengths", target_lengths, batch, device)
        if not isinstance(targets, Tensor):
            raise CTCTypeError(f"CTCLoss: targets must be a tensor, got {type(targets).__name__}")
        if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
            raise CTCTypeError(f"CTCLoss: targets must be integer class indices, got {targets.dtype}")
        low, high, min_len, max_len, total = torch.stack((  # one device→host copy for all the checks
            input_lengths.min(), input_lengths.max(), target_lengths.min(), target_lengths.max(),
            target_lengths.sum())).tolist()
        if low < 0 or high > frames:
            value = low if low < 0 else high
            raise ValueError(f"CTCLoss: input_lengths must be in [0, T={frames}], got {value}")
        padded = self._padded_targets(targets, target_lengths, classes, min_len, max_len, total)
        return input_lengths, target_lengths, padded, high, total

    # ----------------------------------------------------------------------------------------- forward

    def forward(self, log_probs: Tensor, targets: Tensor, input_lengths: Tensor | Sequence[int],
                target_lengths: Tensor | Sequence[int]) -> Tensor:
        input_lengths, target_lengths, padded, steps, sum_len = self._check(log_probs, targets, input_lengths,
                                                                            target_lengths)
        batch, frames, classes = log_probs.shape
        device, dtype = log_probs.device, log_probs.dtype
        max_len = padded.shape[1]
        neg_inf = float("-inf")

        # Packed layout: sequence b owns a segment [pad, pad, state 0, …, state 2L_b] of a flat vector, so rows
        # have their own widths (no state past 2L_b is ever computed) and the shifted operands s − 1, s − 2 of
        # the recursion are contiguous slices (the −∞ pads keep neighbouring sequences apart).
        widths = 2 * target_lengths + 3
        size = 2 * sum_len + 3 * batch
        row = torch.repeat_interleave(torch.arange(batch, device=device), widths, output_size=size)
        offsets = torch.cumsum(widths, 0) - widths
        state = torch.arange(size, device=device) - offsets[row] - 2  # −2, −1 for the pads
        pad = state < 0
        odd = (state % 2 == 1) & ~pad
        if max_len:
            label = padded[row, ((state - 1) // 2).clamp(0, max_len - 1)]
            label = torch.where(odd, label, self.blank)
        else:
            label = torch.full_like(state, self.blank)
        # skip: 0 where s − 2 → s is allowed (l'_s ≠ ∅ and l'_s ≠ l'_{s−2}), −∞ elsewhere (pads included).
        skip = torch.full((size,), neg_inf, dtype=dtype, device=device)  # size ≥ 3
        skip[2:].masked_fill_(odd[2:] & (state[2:] >= 2) & (label[2:] != label[:-2]), 0.0)
        last_state = state == (2 * target_lengths)[row]
        finish = torch.full((size,), neg_inf, dtype=dtype, device=device).masked_fill_(last_state, 0.0)
        first_state = torch.full((size,), neg_inf, dtype=dtype, device=device).masked_fill_(state == 0, 0.0)

        # One gather: y_t(l'_s) for every frame and position, (T', size). Frames t ≥ T_b emit 0 at state 2L_b
        # and −∞ elsewhere ("finish"): β then stays "0 at 2L_b" there, which is exactly the start β_{T_b−1}
        # needs, so one sweep serves every input length (and whatever padded frames hold is never read).
        index = (row * (frames * classes) + label).unsqueeze(0) \
            + torch.arange(0, steps * classes, classes, device=device).unsqueeze(1)
        flat_log_probs = log_probs.reshape(-1)
        emit = flat_log_probs.take(index)
        live = torch.arange(steps, device=device).unsqueeze(1) < torch.where(pad, 0, input_lengths[row])
        emit = torch.where(live, emit, finish)

        # Both recursions in one sweep: the first `size` entries run α forward in time; the last `size` entries
        # hold the same layout reversed end to end (time and states), which turns β's recursion into α's. Two
        # −∞ pads between the halves precede the first reversed sequence.
        gap = torch.full((2,), neg_inf, dtype=dtype, device=device)
        start = torch.cat((first_state, gap, finish.flip(0)))
        emission = torch.cat((emit, gap.expand(steps, 2), emit.flip((0, 1))), 1)
        # Reversed β may skip from s + 2 into s iff α may skip from s into s + 2.
        jumps = torch.cat((skip, gap, gap, skip.flip(0)[:-2]))
        sweep = _sweep(start, emission, jumps)  # (T', 2·size + 2)

        # log p = LSE(α_{T_b−1}(2L_b), α_{T_b−1}(2L_b − 1)); for L_b = 0 the second is a −∞ pad.
        if steps:
            last = (input_lengths - 1).clamp(min=0)
            end = offsets + 2 + 2 * target_lengths
            ends = torch.stack((end, end - 1), 1)
            frame = last.unsqueeze(1).expand(batch, 2)
            log_likelihood = torch.logsumexp(sweep[frame, ends] + emit[frame, ends], 1)
        else:
            log_likelihood = torch.zeros(batch, dtype=dtype, device=device)
        # No frames: p = 1 for an empty target, 0 otherwise.
        empty = torch.where(target_lengths == 0, 0.0, neg_inf).to(dtype)
        nll = torch.where(input_lengths == 0, empty, log_likelihood).neg()

        infinite = torch.isinf(nll) if self.zero_infinity else None
        losses = nll.masked_fill(infinite, 0.0) if infinite is not None else nll
        self.saved = (log_probs, emit, sweep, index, row, nll, input_lengths, target_lengths, infinite)
        if self.reduction == "none":
            return losses
        if self.reduction == "sum":
            return losses.sum()
        return (losses / target_lengths.clamp(min=1).to(dtype)).mean()

    # ----------------------------------------------------------------------------------------- backward

    def _weights(self, grad_output: Tensor | float | None, target_lengths: Tensor, dtype: torch.dtype) -> Tensor:
        """w_b: the reduction's weight of each sequence times the upstream gradient, (B,)."""
        batch, device = target_lengths.shape[0], target_lengths.device
        grad = torch.as_tensor(1.0 if grad_output is None else grad_output, dtype=dtype, device=device)
        if self.reduction == "none":
            if grad.dim() and grad.shape != (batch,):
                raise ValueError(f"CTCLoss: grad_output for reduction 'none' must be a scalar or ({batch},), got "
                                 f"{tuple(grad.shape)}")
            return grad.expand(batch)
        if grad.numel() != 1:
            raise ValueError(f"CTCLoss: grad_output for reduction {self.reduction!r} must be a scalar, got "
                             f"{tuple(grad.shape)}")
        grad = grad.reshape(())
        if self.reduction == "sum":
            return grad.expand(batch)
        return grad / (target_lengths.clamp(min=1).to(dtype) * batch)

    def _occupancy(self, grad_output: Tensor | float | None) -> tuple[Tensor, Tensor, Tensor]:
        """−w_b·γ (B, T, C) (NaN on the valid frames of an impossible target), the mask of frames without a
        gradient (B, T, 1) and w_b (B,)."""
        if len(self.saved) != 9:
            raise RuntimeError("CTCLoss: call forward before backward")
        log_probs, emit, sweep, index, row, nll, input_lengths, target_lengths, infinite = self.saved
        batch, frames, classes = log_probs.shape
        size = emit.shape[1]
        weights = self._weights(grad_output, target_lengths, log_probs.dtype)

        # log α_t(s)β_t(s)/p (the emission of frame t counted once): the posterior of state s at frame t.
        joint = sweep[:, :size] + emit
        joint += sweep[:, size + 2:].flip((0, 1))
        joint += nll[row]
        joint.exp_()
        gamma = torch.zeros(batch, frames, classes, dtype=log_probs.dtype, device=log_probs.device)
        gamma.view(-1).scatter_add_(0, index.view(-1), joint.view(-1))
        # Normalised per frame (Σ_c γ_t(c) = 1 exactly; this also cancels the rounding of log p), weighted by −w_b.
        gamma.mul_(gamma.sum(2, keepdim=True).reciprocal_().mul_(weights.view(-1, 1, 1).neg()))
        skip = torch.arange(frames, device=log_probs.device) >= input_lengths.unsqueeze(1)
        if infinite is not None:
            skip |= infinite.unsqueeze(1)
        return gamma, skip.unsqueeze(2), weights

    def backward(self, grad_output: Tensor | float | None = None) -> Tensor:
        """dL/dlogits (B, T, C) for log_probs = log_softmax(logits): w_b·(exp(log_probs) − γ), 0 on padded frames."""
        gamma, skip, weights = self._occupancy(grad_output)
        grad = torch.exp(self.saved[0]).mul_(weights.view(-1, 1, 1)).add_(gamma)
        return grad.masked_fill_(skip, 0.0)

    def backward_log_probs(self, grad_output: Tensor | float | None = None) -> Tensor:
        """dL/dlog_probs (B, T, C) = −w_b·γ, 0 on padded frames."""
        gamma, skip, _ = self._occupancy(grad_output)
        return gamma.masked_fill_(skip, 0.0)


def _sweep(start: Tensor, emission: Tensor, jumps: Tensor) -> Tensor:
    """The CTC recursion on a flat vector: x_t(i) = LSE(v(i), v(i−1), v(i−2) + jumps(i)) with
    v = x_{t−1} + emission_{t−1} (v = start for t = 0); start, jumps (N,), emission (T, N) → x (T, N).

    Entries 0 and 1 of each x_t are −∞; every other operand is a contiguous slice (elementwise ops on
    contiguous memory run several times faster than on strided views).
    """
    steps, size = emission.shape
    out = torch.empty(steps, size, dtype=start.dtype, device=start.device)
    out[:, :2] = float("-inf")
    ahead = start.clone()
    now, one_back, two_back = ahead[2:], ahead[1:-1], ahead[:-2]
    jump_mask = jumps[2:]
    skip = torch.empty_like(jump_mask)
    rows = out[:, 2:].unbind(0)
    previous = out.unbind(0)
    emitted = emission.unbind(0)
    for t in range(steps):
        if t:
            torch.add(previous[t - 1], emitted[t - 1], out=ahead)
        torch.logaddexp(now, one_back, out=rows[t])
        torch.add(two_back, jump_mask, out=skip)
        torch.logaddexp(rows[t], skip, out=rows[t])
    return out
