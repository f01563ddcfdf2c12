"""Small sequence pieces with hand-written backward passes: the glue of a tagger's features.

- :class:`MaskedMax`: the maximum over the valid positions of the last axis (a word's characters);
  dx = g · 1[x = max] / #ties at valid positions (``amax`` splits a tied maximum's gradient evenly), and a row
  without valid positions gives 0 with no gradient.
- :class:`Concat`: features side by side on the last axis, a part of length 1 on axis 1 broadcast over the
  steps; backward splits the gradient and sums it over the steps for the broadcast parts.
- :class:`RowGather`: ``x[index]`` (rows used several times: a sentence's states for each of its predicates);
  backward adds each row's gradient back to its source row (``index_add``).
- :class:`PositionGather`: ``x[b, position[b]]``, one step per row (the state at the predicate); backward puts
  the gradient at that step (added into a given gradient tensor, or into zeros).
"""

from __future__ import annotations

import torch
from torch import Tensor

from bp_apps.engine.layers import Layer

__all__ = ["Concat", "MaskedMax", "PositionGather", "RowGather"]


def _check_index(name: str, index: Tensor, size: int, rows: int | None) -> None:
    """An int64 index of shape ``(rows,)`` (any length when None) with values in ``[0, size)``."""
    if not isinstance(index, Tensor) or index.dtype not in (torch.int64, torch.int32):
        got = index.dtype if isinstance(index, Tensor) else type(index).__name__
        raise TypeError(f"{name}: the index must be an int64 tensor, got {got}")
    if index.dim() != 1 or (rows is not None and index.shape[0] != rows):
        raise ValueError(f"{name}: the index must have shape ({rows if rows is not None else 'M'},), "
                         f"got {tuple(index.shape)}")
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= size):
        raise IndexError(f"{name}: index values must be in [0, {size}), got [{int(index.min())}, {int(index.max())}]")


class MaskedMax(Layer):
    """``y[..., c] = max_{k: valid[..., k]} x[..., c, k]``, 0 for rows with no valid ``k``: ``x (N, C, K)`` with
    ``valid (N, K)`` (the character CNN's max over a word; padding characters never win)."""

    def forward(self, x: Tensor, valid: Tensor) -> Tensor:
        if x.dim() != 3 or valid.dtype != torch.bool or tuple(valid.shape) != (x.shape[0], x.shape[2]):
            raise ValueError(f"MaskedMax: x (N, C, K) with a bool valid (N, K) expected, got x {tuple(x.shape)} and "
                             f"valid {valid.dtype} {tuple(valid.shape)}")
        filled = x.masked_fill(~valid.unsqueeze(1), float("-inf"))
        top = filled.amax(dim=2, keepdim=True)
        self.saved = (filled, top)
        return torch.nan_to_num(top.squeeze(2), neginf=0.0)

    def backward(self, grad_output: Tensor) -> Tensor:
        filled, top = self.saved
        if tuple(grad_output.shape) != tuple(top.shape[:2]):
            raise ValueError(f"MaskedMax: grad_output must be {tuple(top.shape[:2])}, got {tuple(grad_output.shape)}")
        ties = (filled == top) & torch.isfinite(top)
        share = grad_output.unsqueeze(2) / ties.sum(2, keepdim=True).clamp_min(1)
        return torch.where(ties, share, 0)


class Concat(Layer):
    """``cat(parts, -1)`` of ``(B, T, F_i)`` parts, where a part of shape ``(B, 1, F_i)`` is broadcast over the
    ``T`` steps; ``backward`` returns the parts' gradients in order (summed over the steps for broadcast ones)."""

    def forward(self, *parts: Tensor) -> Tensor:
        steps = max(p.shape[1] for p in parts)
        for p in parts:
            if p.dim() != 3 or p.shape[0] != parts[0].shape[0] or p.shape[1] not in (1, steps):
                raise ValueError(f"Concat: parts must be (B, T, F) or (B, 1, F) with one B and T, got "
                                 f"{[tuple(q.shape) for q in parts]}")
        self.saved = tuple((p.shape[-1], p.shape[1] == 1 and steps > 1) for p in parts)
        return torch.cat([p.expand(-1, steps, -1) for p in parts], dim=-1)

    def backward(self, grad_output: Tensor) -> list[Tensor]:
        sizes = [size for size, _ in self.saved]
        if grad_output.shape[-1] != sum(sizes):
            raise ValueError(f"Concat: grad_output has {grad_output.shape[-1]} features, the parts {sum(sizes)}")
        return [g.sum(1, keepdim=True) if broadcast else g
                for g, (_, broadcast) in zip(grad_output.split(sizes, dim=-1), self.saved, strict=True)]


class RowGather(Layer):
    """``y = x[index]``: rows of ``x (N, ...)`` picked by ``index (M,)``, repeats allowed;
    dx = Σ_{m: index[m] = n} g[m] (``index_add``)."""

    def forward(self, x: Tensor, index: Tensor) -> Tensor:
        _check_index("RowGather", index, x.shape[0], None)
        self.saved = (index, x.shape)
        return x.index_select(0, index)

    def backward(self, grad_output: Tensor) -> Tensor:
        index, shape = self.saved
        if tuple(grad_output.shape) != (len(index), *shape[1:]):
            raise ValueError(f"RowGather: grad_output must be {(len(index), *shape[1:])}, "
                             f"got {tuple(grad_output.shape)}")
        return grad_output.new_zeros(shape).index_add_(0, index, grad_output)


class PositionGather(Layer):
    """``y[b] = x[b, position[b]]``: one step of each row of ``x (B, T, F)``, ``position (B,)``; backward puts
    ``g[b]`` at that step: into ``into`` (added, in place) when given, else into zeros."""

    def forward(self, x: Tensor, position: Tensor) -> Tensor:
        if x.dim() != 3:
            raise ValueError(f"PositionGather: x must be (B, T, F), got {tuple(x.shape)}")
        _check_index("PositionGather", position, x.shape[1], x.shape[0])
        self.saved = (position, x.shape)
        return x[torch.arange(x.shape[0], device=x.device), position]

    def backward(self, grad_output: Tensor, into: Tensor | None = None) -> Tensor:
        position, shape = self.saved
        if tuple(grad_output.shape) != (shape[0], shape[2]):
            raise ValueError(f"PositionGather: grad_output must be {(shape[0], shape[2])}, "
                             f"got {tuple(grad_output.shape)}")
        grad = grad_output.new_zeros(shape) if into is None else into
        grad[torch.arange(shape[0], device=grad.device), position] += grad_output
        return grad
