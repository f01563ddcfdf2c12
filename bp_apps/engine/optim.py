"""Optimizers written out by hand, with the update rules of their ``torch.optim`` twins.

Each is a ``torch.optim.Optimizer`` subclass: torch keeps the bookkeeping (parameter groups, per-parameter
state, ``state_dict``, learning-rate schedulers, Lightning's step counting and checkpoints), and ``step()``
applies the rule written here to the gradients the engine's backward left in ``p.grad``. All tensors of a group
are updated at once with ``torch._foreach_*`` kernels (one launch per rule, not per tensor). No autograd.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["SGD", "Adam", "AdamW", "Optimizer", "build_optimizer", "clip_grad_norm", "cosine_lr"]


class Optimizer(torch.optim.Optimizer):
    """The engine's optimizers: ``step()`` reads ``p.grad`` (written by the engine, see
    :meth:`bp_apps.engine.models.MLP.attach_gradients`) and calls :meth:`update` per parameter group."""

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], defaults: dict[str, Any]) -> None:
        lr = defaults["lr"]
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0):
            raise ValueError(f"learning rate must be a finite number >= 0, got {lr}")
        params = list(params)
        if not params:
            raise ValueError(f"{type(self).__name__} got an empty parameter list")
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update of every parameter that has a gradient (parameters whose ``grad`` is None are left alone,
        as in ``torch.optim``: that is how a skipped step skips)."""
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self.update(group, params, [p.grad for p in params])
        return loss

    state_names: tuple[str, ...] = ()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's loading (which checks the groups' sizes), then a check that every state tensor belongs to this
        optimizer and has its parameter's shape: a state from another optimizer or model is refused, not used."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for p in group["params"]:
                for name, value in self.state.get(p, {}).items():
                    if name != "step" and name not in self.state_names:
                        raise ValueError(f"optimizer state {name!r} does not belong to {type(self).__name__}")
                    if torch.is_tensor(value) and value.shape != p.shape:
                        raise ValueError(f"optimizer state {name!r}: shape {tuple(value.shape)} does not fit the "
                                         f"parameter's {tuple(p.shape)}")

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The engine overwrites its gradients on every backward; dropping them (``set_to_none``) is all there is."""
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    def update(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:  # pragma: no cover
        """The update rule itself for one parameter group; autograd is off."""
        raise NotImplementedError


class SGD(Optimizer):
    """θ ← θ − lr·d, with d = g + λθ, and with momentum μ: b ← μb + (1 − dampening)d
    (b = d on the first step), then d = b, or d = d + μb for Nesterov — as ``torch.optim.SGD``."""

    state_names = ("momentum_buffer",)

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], lr: float = 0.01, momentum: float = 0.0,
                 dampening: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0) -> None:
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum needs momentum > 0 and zero dampening")
        super().__init__(params, {"lr": lr, "momentum": momentum, "dampening": dampening, "nesterov": nesterov,
                                  "weight_decay": weight_decay})

    def update(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        lr, momentum, weight_decay = group["lr"], group["momentum"], group["weight_decay"]
        direction = grads
        if weight_decay:
            direction = torch._foreach_add(direction, params, alpha=weight_decay)
        if momentum:
            states = [self.state[p] for p in params]
            if any("momentum_buffer" not in s for s in states):
                for s, d in zip(states, direction, strict=True):
                    s["momentum_buffer"] = d.clone()
                buffers = [s["momentum_buffer"] for s in states]
            else:
                buffers = [s["momentum_buffer"] for s in states]
                torch._foreach_mul_(buffers, momentum)
                torch._foreach_add_(buffers, direction, alpha=1 - group["dampening"])
            direction = torch._foreach_add(direction, buffers, alpha=momentum) if group["nesterov"] else buffers
        torch._foreach_add_(params, direction, alpha=-lr)


class Adam(Optimizer):
    """Adam (Kingma & Ba) with bias correction, as ``torch.optim.Adam``:
    m ← β₁m + (1 − β₁)g, v ← β₂v + (1 − β₂)g², θ ← θ − lr/(1 − β₁ᵗ) · m / (√v/√(1 − β₂ᵗ) + ε).
    ``weight_decay`` adds λθ to the gradient (L2); ``AdamW`` decays the weights directly."""

    state_names = ("exp_avg", "exp_avg_sq")
    decoupled = False

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"Adam betas must be in [0, 1), got {betas}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})

    def update(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        lr, (beta1, beta2), eps, weight_decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        if weight_decay:
            if self.decoupled:
                torch._foreach_mul_(params, 1 - lr * weight_decay)
            else:
                grads = torch._foreach_add(grads, params, alpha=weight_decay)
        states = [self.state[p] for p in params]
        for s, p in zip(states, params, strict=True):
            if not s:
                s.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
            s["step"] += 1
        step = states[0]["step"]  # the parameters of a group step together
        exp_avg, exp_avg_sq = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
        torch._foreach_lerp_(exp_avg, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sq, beta2)
        torch._foreach_addcmul_(exp_avg_sq, grads, grads, 1 - beta2)
        step_size = lr / (1 - beta1 ** step)
        denom = torch._foreach_sqrt(exp_avg_sq)
        torch._foreach_div_(denom, math.sqrt(1 - beta2 ** step))
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(params, exp_avg, denom, -step_size)


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter): θ ← θ(1 − lr·λ) before the Adam step."""

    decoupled = True

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2) -> None:
        super().__init__(params, lr, betas, eps, weight_decay)


@torch.no_grad()
def clip_grad_norm(grads: Sequence[Tensor], max_norm: float) -> Tensor:
    """Scale gradients in place so their joint L2 norm is at most ``max_norm`` (as
    ``torch.nn.utils.clip_grad_norm_``); return the norm before clipping."""
    grads = list(grads)
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    torch._foreach_mul_(grads, scale)
    return total


def cosine_lr(base_lr: float, step: int, total_steps: int, warmup_steps: int = 0) -> float:
    """Learning rate at ``step``: linear warm-up over ``warmup_steps``, then cosine decay to 0."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * progress))


OPTIMIZERS = {"sgd": SGD, "adam": Adam, "adamw": AdamW}


def build_optimizer(name: str, params: Iterable[Tensor] | Iterable[dict[str, Any]], **kwargs: Any) -> Optimizer:
    """An engine optimizer by name ('sgd', 'adam', 'adamw')."""
    try:
        cls = OPTIMIZERS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}") from None
    return cls(params, **kwargs)
