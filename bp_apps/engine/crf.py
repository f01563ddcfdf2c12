"""Linear-chain CRF loss with its gradient by the forward-backward recursion, and Viterbi decoding.

Shapes: ``B`` sentences, ``T`` steps (padded), ``L`` labels; ``mask[B, T]`` is boolean, left-aligned, every row has
at least one token. ``A = transitions`` (``A[i, j]`` scores label ``j`` after ``i``), ``start``, ``end``, emissions
``e_t``. The constraint masks (``start_allowed``, ``allowed``, ``end_allowed``) are given by the caller.

Loss per sentence b of length n with gold path y (``bp_apps.text.labeling.crf.CRF.nll`` exactly, constraints
included): score(y) = start[y_0] + Σ_t e_t[y_t] + Σ_{t≥1} A[y_{t−1}, y_t] + end[y_{n−1}] and
NLL_b = log Z_b − score(y). A forbidden move gets the finite penalty ``CONSTRAINT_PENALTY`` (−1e4) in Z_b, unless
y itself breaks the constraints: then that sentence's Z_b runs over all paths. So each sentence has its own
A_b, start_b, end_b (penalised or not); the penalty is a constant, its derivative is the identity.

Forward algorithm (batched, probability space with shifts, as the text CRF's ``_log_partition``):

    α_0 = start_b + e_0,   c_b = max A_b,   W_b = exp(A_b − c_b)            (forbidden moves: exactly 0)
    m_t = max_i α_{t−1}(i),   u_t = exp(α_{t−1} − m_t),   s_t = max(u_t W_b, τ)     (τ = 1e−30)
    α_t = log s_t + m_t + c_b + e_t   for rows with mask[:, t] (others keep α_{t−1})
    log Z = logsumexp(α_{T−1} + end_b)

Backward (forward-backward marginals): a_t(j) = ∂log Z/∂α_t(j) is the marginal P(y_t = j); it runs backward as the
β recursion in normalised form, P(y_{t−1} = i, y_t = j) = u_t(i) W_b(i, j) d_t(j) with d_t = a_t / s_t:

    a_{T−1} = softmax(α_{T−1} + end_b)                         (= P(y_{n−1} = j))
    a_{t−1} = u_t ⊙ (d_t W_bᵀ)   for rows with mask[:, t] (others: a_{t−1} = a_t)
    ∂log Z/∂e_t[j] = P(y_t = j) (mask),  ∂log Z/∂start = P(y_0 = j),  ∂log Z/∂end = P(y_{n−1} = j),
    ∂log Z/∂A[i, j] = Σ_t P(y_{t−1} = i, y_t = j) = (Σ_t u_tᵀ d_t) ⊙ W_b      (one bmm over all steps)

and the NLL's gradient is that minus the gold path's counts (one-hot e_t[y_t], A[y_{t−1}, y_t], start[y_0],
end[y_{n−1}]), times the reduction's weight. Where s_t was floored at τ (a label no path reaches, to rounding) the
forward's floor makes log s_t a constant: d_t is 0 there and that a_t(j) flows to the maxima m_t and c_b instead
(split among ties, as ``amax`` routes its gradient), so the gradient is the exact derivative of the loss computed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bp_apps.engine.layers import Layer

__all__ = ["CONSTRAINT_PENALTY", "CRF", "viterbi_decode"]

CONSTRAINT_PENALTY = -1.0e4
"""Score added to a forbidden move in the partition function (as ``bp_apps.text.labeling.crf``)."""

_TINY = 1e-30  # the floor τ of a step's summed probability mass (as the text CRF)
_REDUCTIONS = ("mean", "sum", "token_mean")


def check_mask(mask: Tensor, batch: int, steps: int) -> Tensor:
    """The lengths ``[B]`` of a ``[B, T]`` left-aligned bool mask whose rows hold at least one token."""
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (batch, steps):
        got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"CRF: mask must be a bool tensor of shape {(batch, steps)}, got {got}")
    if steps == 0 or not bool(mask[:, 0].all()):
        raise ValueError("CRF: every sentence needs at least one token (mask[:, 0] must be True)")
    lengths = mask.sum(1)
    positions = torch.arange(steps, device=mask.device)
    if not bool((mask == (positions < lengths[:, None])).all()):
        raise ValueError("CRF: mask must be left-aligned (tokens first, then padding)")
    return lengths


@torch.no_grad()
def viterbi_decode(emissions: Tensor, mask: Tensor, transitions: Tensor, start: Tensor, end: Tensor
                   ) -> list[list[int]]:
    """Highest-scoring label path per sentence (``-inf`` scores forbid moves), batched over sentences with
    backpointers; each path has its sentence's length. The text CRF's decoder, step for step."""
    batch, steps, num_labels = emissions.shape
    lengths = check_mask(mask, batch, steps)
    identity = torch.arange(num_labels, device=emissions.device).expand(batch, num_labels)
    score = start + emissions[:, 0]
    backpointers = []
    for t in range(1, steps):
        best, pointer = (score.unsqueeze(2) + transitions).max(dim=1)
        step_mask = mask[:, t].unsqueeze(1)
        score = torch.where(step_mask, best + emissions[:, t], score)
        backpointers.append(torch.where(step_mask, pointer, identity))  # padding carries the last label back
    current = (score + end).argmax(dim=1)
    path = [current]
    for pointer in reversed(backpointers):
        current = pointer.gather(1, current.unsqueeze(1)).squeeze(1)
        path.append(current)
    paths = torch.stack(path[::-1], dim=1).cpu()
    return [paths[b, :n].tolist() for b, n in enumerate(lengths.tolist())]


def _tie_split(values: Tensor, top: Tensor) -> Tensor:
    """``1[values == top] / count`` along the last axis: how ``amax`` shares a gradient among tied maxima."""
    ties = (values == top).to(values.dtype)
    return ties / ties.sum(-1, keepdim=True)


class CRF(Layer):
    """Linear-chain CRF over ``num_labels`` labels: parameters ``transitions [L, L]``, ``start [L]``, ``end [L]``
    (zeros, as the text CRF, so ``state_dict``s load into either); ``start_allowed``, ``allowed``,
    ``end_allowed`` are the constraint masks (all allowed when omitted; a task passes ``bio_constraints(labels)``).

    ``forward(emissions, tags, mask, reduction)`` is the negative log-likelihood (``mean`` over sentences, ``sum``,
    or ``token_mean``: the total over the number of real tokens) and keeps what ``backward`` needs;
    ``backward(grad_output=1)`` writes the parameters' gradients and returns dL/demissions; ``decode`` is Viterbi
    with the constraints exact (``-inf``)."""

    def __init__(self, num_labels: int, start_allowed: Tensor | None = None, allowed: Tensor | None = None,
                 end_allowed: Tensor | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
            raise ValueError(f"CRF: num_labels must be a positive int, got {num_labels!r}")
        self.num_labels = num_labels
        factory = {"device": device, "dtype": dtype}
        self._add_param("transitions", torch.zeros(num_labels, num_labels, **factory))
        self._add_param("start", torch.zeros(num_labels, **factory))
        self._add_param("end", torch.zeros(num_labels, **factory))
        for name, mask, shape in (("start_allowed", start_allowed, (num_labels,)),
                                  ("allowed", allowed, (num_labels, num_labels)),
                                  ("end_allowed", end_allowed, (num_labels,))):
            if mask is None:
                mask = torch.ones(shape, dtype=torch.bool)
            if not isinstance(mask, Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != shape:
                got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, Tensor) else type(mask).__name__
                raise ValueError(f"CRF: {name} must be a bool tensor of shape {shape}, got {got}")
            # derived from the labels: rebuilt by the constructor, not stored in checkpoints (as the text CRF)
            self.register_buffer(name, mask.to(device) if device is not None else mask.clone(), persistent=False)

    def extra_repr(self) -> str:
        return f"num_labels={self.num_labels}"

    # ------------------------------------------------------------------ checks

    def _check(self, emissions: Tensor) -> None:
        if not isinstance(emissions, Tensor) or not emissions.is_floating_point():
            got = emissions.dtype if isinstance(emissions, Tensor) else type(emissions).__name__
            raise TypeError(f"CRF: emissions must be a floating-point tensor, got {got}")
        if emissions.dim() != 3 or emissions.shape[2] != self.num_labels:
            raise ValueError(f"CRF: emissions must have shape [B, T, {self.num_labels}], got {tuple(emissions.shape)}")

    def _check_tags(self, tags: Tensor, mask: Tensor) -> Tensor:
        """``tags`` with padding set to 0; an error for a shape or dtype that does not fit, or a tag out of range."""
        if not isinstance(tags, Tensor) or tags.dtype not in (torch.int64, torch.int32):
            got = tags.dtype if isinstance(tags, Tensor) else type(tags).__name__
            raise TypeError(f"CRF: tags must be an int64 tensor of label ids, got {got}")
        if tags.shape != mask.shape:
            raise ValueError(f"CRF: tags must have the mask's shape {tuple(mask.shape)}, got {tuple(tags.shape)}")
        tags = tags.long().masked_fill(~mask, 0)
        bad = tags[(tags < 0) | (tags >= self.num_labels)]
        if bad.numel():
            raise ValueError(f"CRF: tag {int(bad[0])} is outside [0, {self.num_labels})")
        return tags

    # ------------------------------------------------------------------ loss

    def forward(self, emissions: Tensor, tags: Tensor, mask: Tensor, reduction: str = "mean") -> Tensor:
        """Negative log-likelihood of ``tags`` (see the module docstring); padded tags are ignored."""
        if reduction not in _REDUCTIONS:
            raise ValueError(f"CRF: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        self._check(emissions)
        lengths = check_mask(mask, emissions.shape[0], emissions.shape[1])
        tags = self._check_tags(tags, mask)
        dtype = emissions.dtype
        transitions, start, end = (p.to(dtype) for p in (self.transitions, self.start, self.end))
        last = tags.gather(1, (lengths - 1).unsqueeze(1)).squeeze(1)

        # the gold path's score, in the text CRF's order of operations (same rounding)
        step_scores = transitions[tags[:, :-1], tags[:, 1:]] + emissions[:, 1:].gather(2, tags[:, 1:, None])[..., 0]
        gold = start[tags[:, 0]] + emissions[:, 0].gather(1, tags[:, :1])[:, 0] + end[last]
        gold = gold + torch.where(mask[:, 1:], step_scores, torch.zeros_like(step_scores)).sum(1)

        step_ok = self.allowed[tags[:, :-1], tags[:, 1:]] | ~mask[:, 1:]
        constrained = (self.start_allowed[tags[:, 0]] & step_ok.all(1) & self.end_allowed[last]).to(dtype)
        transitions = transitions + constrained[:, None, None] * (~self.allowed).to(dtype) * CONSTRAINT_PENALTY
        start = start + constrained[:, None] * (~self.start_allowed).to(dtype) * CONSTRAINT_PENALTY
        end = end + constrained[:, None] * (~self.end_allowed).to(dtype) * CONSTRAINT_PENALTY

        log_z, state = self._log_partition(start + emissions[:, 0], transitions, emissions, mask, end)
        loss = -(gold - log_z)
        if reduction == "mean":
            loss, weight = loss.mean(), 1.0 / len(loss)
        elif reduction == "sum":
            loss, weight = loss.sum(), 1.0
        else:
            count = mask.sum()
            loss, weight = loss.sum() / count, 1.0 / float(count)
        self.saved = (*state, tags, mask, last, weight)
        return loss

    nll = forward  # the text CRF's name for its loss, so a task calls either CRF alike

    def _log_partition(self, alpha: Tensor, transitions: Tensor, emissions: Tensor, mask: Tensor, end: Tensor
                       ) -> tuple[Tensor, tuple]:
        """log Z ``[B]`` by the forward algorithm, and what the backward recursion reads (module docstring)."""
        batch, steps, num_labels = emissions.shape
        shift = transitions.amax(dim=(1, 2), keepdim=True)  # c_b
        weights = torch.exp(transitions - shift)  # W_b
        alphas = emissions.new_empty((steps, batch, num_labels))
        units = emissions.new_empty((steps, batch, num_labels))  # u_t (t >= 1)
        masses = emissions.new_empty((steps, batch, num_labels))  # s_t before the floor
        alphas[0] = alpha
        for t, (step, keep) in enumerate(zip(emissions.unbind(1)[1:], mask.unbind(1)[1:], strict=True), start=1):
            top = alpha.amax(dim=1, keepdim=True)
            torch.exp(alpha - top, out=units[t])
            raw = torch.bmm(units[t].unsqueeze(1), weights, out=masses[t].unsqueeze(1)).squeeze(1)
            nxt = raw.clamp_min(_TINY).log() + top + shift[:, 0] + step
            alpha = torch.where(keep.unsqueeze(1), nxt, alpha)
            alphas[t] = alpha
        final = alpha + end
        log_z = torch.logsumexp(final, dim=1)
        return log_z, (transitions, shift, weights, alphas, units, masses, final)

    def backward(self, grad_output: Tensor | float = 1.0) -> Tensor:
        """dL/demissions ``[B, T, L]`` (0 at padding); writes ``transitions_grad``, ``start_grad``, ``end_grad``."""
        if not self.saved:
            raise RuntimeError("CRF: backward needs a forward first")
        transitions, shift, weights, alphas, units, masses, final, tags, mask, last, weight = self.saved
        steps, batch, num_labels = alphas.shape
        if isinstance(grad_output, Tensor) and grad_output.numel() != 1:
            raise ValueError(f"CRF: grad_output must be a scalar, got shape {tuple(grad_output.shape)}")
        scale = float(grad_output) * weight
        keep = mask.t().unsqueeze(-1)  # [T, B, 1]
        floored = (masses < _TINY) & keep
        floored[0] = False  # α_0 has no mass
        inverse_mass = torch.where(keep & ~floored, masses.clamp_min(_TINY).reciprocal(), 0)
        any_floored = bool(floored.any())
        marginals = alphas.new_empty((steps, batch, num_labels))  # a_t = P(y_t = j)
        directions = alphas.new_zeros((steps, batch, num_labels))  # d_t = a_t / s_t
        marginals[steps - 1] = torch.softmax(final, dim=1)
        weights_t = weights.transpose(1, 2)
        for t in range(steps - 1, 0, -1):
            a = marginals[t]
            torch.mul(a, inverse_mass[t], out=directions[t])
            previous = torch.bmm(directions[t].unsqueeze(1), weights_t).squeeze(1).mul_(units[t])
            if any_floored:  # the floored labels' share flows to the maximum m_t of α_{t−1}
                lost = (a * floored[t]).sum(1, keepdim=True)
                previous += lost * _tie_split(alphas[t - 1], alphas[t - 1].amax(dim=1, keepdim=True))
            torch.where(keep[t], previous, a, out=marginals[t - 1])
        # Σ_t P(y_{t−1} = i, y_t = j) per sentence: (Σ_t u_tᵀ d_t) ⊙ W_b
        pairs = torch.bmm(units[1:].permute(1, 2, 0), directions[1:].transpose(0, 1)).mul_(weights)
        if any_floored:  # and the floored share to the maximum c_b of A_b
            lost = (marginals * floored).sum(dim=(0, 2))[:, None, None]
            pairs += lost * _tie_split(transitions.flatten(1), shift.flatten(1)).view_as(pairs)
        grad_emissions = marginals.transpose(0, 1) * mask.unsqueeze(-1)
        grad_emissions.scatter_add_(2, tags.unsqueeze(-1), -mask.unsqueeze(-1).to(grad_emissions.dtype))
        grad_emissions.mul_(scale)

        rows = torch.arange(batch, device=tags.device)
        grad_start = marginals[0].clone()
        grad_start[rows, tags[:, 0]] -= 1
        grad_end = marginals[steps - 1].clone()
        grad_end[rows, last] -= 1
        grad_transitions = pairs.sum(0).view(-1)
        gold_moves = (tags[:, :-1] * num_labels + tags[:, 1:])[mask[:, 1:]]
        grad_transitions.index_add_(0, gold_moves, torch.full_like(gold_moves, -1, dtype=pairs.dtype))
        self.transitions_grad.copy_(grad_transitions.view(num_labels, num_labels).mul_(scale))
        self.start_grad.copy_(grad_start.sum(0).mul_(scale))
        self.end_grad.copy_(grad_end.sum(0).mul_(scale))
        return grad_emissions

    # ------------------------------------------------------------------ decoding

    def decode(self, emissions: Tensor, mask: Tensor) -> list[list[int]]:
        """Best label path per sentence (Viterbi), forbidden moves excluded exactly."""
        self._check(emissions)
        dtype = emissions.dtype
        transitions = self.transitions.to(dtype).masked_fill(~self.allowed, float("-inf"))
        start = self.start.to(dtype).masked_fill(~self.start_allowed, float("-inf"))
        end = self.end.to(dtype).masked_fill(~self.end_allowed, float("-inf"))
        return viterbi_decode(emissions, mask, transitions, start, end)
