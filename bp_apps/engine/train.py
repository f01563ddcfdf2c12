"""One hand-written training step: forward, loss, backward, update — the article's three steps."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, Protocol

import torch
from torch import Tensor

from bp_apps.engine.models import MLP, NonFiniteError
from bp_apps.engine.optim import clip_grad_norm

NonFinitePolicy = Literal["raise", "skip", "ignore"]


class Loss(Protocol):
    def forward(self, prediction: Tensor, target: Tensor) -> Tensor: ...
    def backward(self) -> Tensor: ...


def train_step(model: MLP, loss_fn: Loss, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor, *,
               max_grad_norm: float | None = None, nonfinite: NonFinitePolicy = "raise",
               step: int | None = None,
               reduce_grads: Callable[[list[Tensor]], None] | None = None) -> tuple[Tensor, bool]:
    """Run one step and return ``(loss, updated)``.

    ``nonfinite`` decides what a NaN/Inf loss or gradient does: ``raise`` a
    :class:`NonFiniteError` naming the step and the layer, ``skip`` the update (``updated`` is
    then False), or ``ignore`` the check entirely (no extra host synchronisation; benchmarks).
    ``reduce_grads`` (data parallel training) averages the gradients across processes in place
    right after the backward pass, before the checks, so every process takes the same decision.
    """
    with torch.no_grad():
        return _train_step(model, loss_fn, optimizer, x, y, max_grad_norm, nonfinite, step, reduce_grads)


def _train_step(model: MLP, loss_fn: Loss, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor,
                max_grad_norm: float | None, nonfinite: NonFinitePolicy, step: int | None,
                reduce_grads: Callable[[list[Tensor]], None] | None = None) -> tuple[Tensor, bool]:
    loss = loss_fn.forward(model.forward(x), y)
    model.backward(loss_fn.backward())
    grads = model.gradients()
    if reduce_grads is not None:
        reduce_grads(grads)
    if nonfinite != "ignore":
        where = f"step {step}" if step is not None else "this step"
        problem = None
        if not bool(torch.isfinite(loss)):
            problem = f"non-finite loss ({float(loss)}) at {where}, first seen in {model.locate_nonfinite_forward(x)}"
        elif not bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()):
            problem = f"non-finite gradient at {where} in {model.find_nonfinite()}"
        if problem is not None:
            if nonfinite == "raise":
                raise NonFiniteError(problem + "; lower the learning rate, clip gradients, or check the inputs")
            return loss, False
    if max_grad_norm is not None:
        clip_grad_norm(grads, max_grad_norm)
    model.attach_gradients()
    optimizer.step()
    return loss, True
