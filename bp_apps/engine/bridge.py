"""Autograd bridge: an engine MLP as a ``torch.autograd.Function`` whose backward is the hand-written one.

This lets a hand-written head sit on top of an autograd feature extractor: autograd calls the
engine's ``backward`` for the head, gets dL/dx to continue into the extractor, and accumulates
the engine's parameter gradients into the head parameters' ``.grad`` so any ``torch.optim``
optimizer can train them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx, once_differentiable

from bp_apps.engine.models import MLP

__all__ = ["EngineMLPFunction", "EngineMLPHead", "engine_mlp"]


class EngineMLPFunction(torch.autograd.Function):
    """y = mlp(x) by the engine's forward; backward is ``mlp.backward`` (no autograd inside).

    Call as ``EngineMLPFunction.apply(x, mlp, *mlp.parameters())``: the parameters are inputs
    only so that autograd knows to deliver their gradients (their values are read from ``mlp``).
    """

    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, mlp: MLP, *params: Tensor) -> Tensor:  # type: ignore[override]
        """Run the engine forward and keep its backward state on ``ctx`` (not only in the layers)."""
        own = list(mlp.parameters())
        if len(params) != len(own) or any(p is not q for p, q in zip(params, own, strict=True)):
            raise ValueError("EngineMLPFunction expects the MLP's own parameters, in mlp.parameters() order")
        if getattr(mlp, "reuse_buffers", False):
            raise ValueError("EngineMLPFunction needs mlp.reuse_buffers = False: autograd may hold several "
                             "outputs and input gradients at once, which reused buffers would overwrite")
        with torch.no_grad():
            out = mlp.forward(x)
        ctx.mlp = mlp
        # A later forward overwrites the layers' ``saved``; this copy is what backward restores.
        ctx.engine_state = mlp.saved_state()
        # Saved only for autograd's version-counter check: an in-place change of x or of a
        # parameter between forward and backward then raises instead of giving wrong gradients.
        ctx.save_for_backward(x, *params)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        """Restore this call's state, run the engine backward, return (dx, None, *dparams)."""
        ctx.saved_tensors  # noqa: B018 - triggers the in-place modification check
        mlp: MLP = ctx.mlp
        needs_x = ctx.needs_input_grad[0]
        needs_params = ctx.needs_input_grad[2:]
        previous_input_grad = mlp.input_grad
        mlp.restore_state(ctx.engine_state)
        mlp.input_grad = needs_x
        try:
            # Expanded (stride-0) or transposed upstream gradients are made dense once here.
            grad_x = mlp.backward(grad_output.contiguous())
        finally:
            mlp.input_grad = previous_input_grad
        # Clone: the engine overwrites its gradient buffers on the next backward, while autograd
        # may still hold this tensor (e.g. to add it to another call's gradient of the same weight).
        grads = [g.clone() if need else None for g, need in zip(mlp.gradients(), needs_params, strict=True)]
        return (grad_x if needs_x else None, None, *grads)


def engine_mlp(x: Tensor, mlp: MLP) -> Tensor:
    """Apply ``mlp`` to ``x`` through :class:`EngineMLPFunction` (differentiable by the engine)."""
    return EngineMLPFunction.apply(x, mlp, *mlp.parameters())


class EngineMLPHead(nn.Module):
    """An engine MLP usable as an ordinary autograd module: a torch optimizer trains it and
    gradients flow through it (by the hand-written backward) into whatever produced its input.

    Build it from widths (``in_features``, ``hidden``, ``out_features``, ``activation``,
    ``dropout``, ``norm``) or wrap an existing engine MLP with ``mlp=``. The MLP's parameters
    are switched to ``requires_grad=True``, its ``input_grad`` to True and its ``reuse_buffers``
    (if the engine has it) to False. Inputs are (..., D).
    """

    def __init__(self, in_features: int | None = None, hidden: Sequence[int] = (), out_features: int | None = None,
                 activation: str = "relu", dropout: float = 0.0, norm: str | None = None, *, mlp: MLP | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if mlp is None:
            if in_features is None or out_features is None:
                raise ValueError("EngineMLPHead needs in_features and out_features, or an existing mlp=")
            mlp = MLP(in_features, hidden, out_features, activation=activation, dropout=dropout, norm=norm,
                      device=device, dtype=dtype)
        elif not isinstance(mlp, MLP):
            raise TypeError(f"mlp must be an engine MLP, got {type(mlp).__name__}")
        elif in_features is not None or out_features is not None:
            raise ValueError("give either the widths or mlp=, not both")
        for p in mlp.parameters():
            p.requires_grad_(True)
        mlp.input_grad = True
        if getattr(mlp, "reuse_buffers", False):
            mlp.reuse_buffers = False  # outputs of several forward calls may be alive at once
        self.mlp = mlp

    @property
    def in_features(self) -> int:
        return self.mlp.in_features

    @property
    def out_features(self) -> int:
        return self.mlp.out_features

    def forward(self, x: Tensor) -> Tensor:
        """The engine forward; recorded for autograd only when a gradient can be needed."""
        params = list(self.mlp.parameters())
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
            return EngineMLPFunction.apply(x, self.mlp, *params)
        return self.mlp(x)
