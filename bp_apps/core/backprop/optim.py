"""Optimizers written out by hand, with the update rules of their ``torch.optim`` twins.

They take the parameter list once and the matching gradient list at each ``step``, and
update all tensors at once with ``torch._foreach_*`` kernels (one launch per rule, not per
tensor). State lives in plain tensors and round-trips through ``state_dict``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor


class Optimizer:
    """Shared bookkeeping: parameters, hyper-parameters, step count and state buffers."""

    state_names: tuple[str, ...] = ()

    def __init__(self, params: Iterable[Tensor], lr: float) -> None:
        self.params = list(params)
        if not self.params:
            raise ValueError(f"{type(self).__name__} got an empty parameter list")
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0):
            raise ValueError(f"learning rate must be a finite number >= 0, got {lr}")
        self.lr = lr
        self.step_count = 0
        self.state: dict[str, list[Tensor]] = {}

    def _check(self, grads: Sequence[Tensor]) -> None:
        if len(grads) != len(self.params):
            raise ValueError(f"{type(self).__name__}.step got {len(grads)} gradients for {len(self.params)} parameters")

    def step(self, grads: Sequence[Tensor]) -> None:
        """Apply one update with ``grads`` (aligned with the parameters)."""
        self._check(grads)
        with torch.no_grad():
            self.update(grads)

    def update(self, grads: Sequence[Tensor]) -> None:  # pragma: no cover - abstract
        """The update rule itself; the caller has checked ``grads`` and disabled autograd."""
        raise NotImplementedError

    def hyperparameters(self) -> dict[str, float | bool]:
        return {"lr": self.lr}

    def state_dict(self) -> dict:
        return {"step": self.step_count, "hyperparameters": self.hyperparameters(),
                "state": {k: [t.clone() for t in v] for k, v in self.state.items()}}

    def load_state_dict(self, state: dict) -> None:
        buffers = state["state"]
        for name, tensors in buffers.items():
            if name not in self.state_names or len(tensors) != len(self.params):
                raise ValueError(f"optimizer state {name!r} does not fit {type(self).__name__} with "
                                 f"{len(self.params)} parameters")
            for t, p in zip(tensors, self.params, strict=True):
                if t.shape != p.shape:
                    raise ValueError(f"optimizer state {name!r}: shape {tuple(t.shape)} != parameter {tuple(p.shape)}")
        self.state = {k: [t.to(device=p.device, dtype=p.dtype) for t, p in zip(v, self.params, strict=True)]
                      for k, v in buffers.items()}
        self.step_count = int(state["step"])
        for key, value in state.get("hyperparameters", {}).items():
            setattr(self, key, value)


class SGD(Optimizer):
    """θ ← θ − lr·d, with d = g + λθ, and with momentum μ: b ← μb + (1 − dampening)d
    (b = d on the first step), then d = b, or d = d + μb for Nesterov — as ``torch.optim.SGD``."""

    state_names = ("momentum_buffer",)

    def __init__(self, params: Iterable[Tensor], lr: float = 0.01, momentum: float = 0.0, dampening: float = 0.0,
                 nesterov: bool = False, weight_decay: float = 0.0) -> None:
        super().__init__(params, lr)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum needs momentum > 0 and zero dampening")
        self.momentum, self.dampening, self.nesterov, self.weight_decay = momentum, dampening, nesterov, weight_decay

    def hyperparameters(self) -> dict[str, float | bool]:
        return {"lr": self.lr, "momentum": self.momentum, "dampening": self.dampening,
                "nesterov": self.nesterov, "weight_decay": self.weight_decay}

    def update(self, grads: Sequence[Tensor]) -> None:
        direction = list(grads)
        if self.weight_decay:
            direction = torch._foreach_add(direction, self.params, alpha=self.weight_decay)
        if self.momentum:
            buffers = self.state.get("momentum_buffer")
            if buffers is None:
                buffers = self.state["momentum_buffer"] = [d.clone() for d in direction]
            else:
                torch._foreach_mul_(buffers, self.momentum)
                torch._foreach_add_(buffers, direction, alpha=1 - self.dampening)
            if self.nesterov:
                direction = torch._foreach_add(direction, buffers, alpha=self.momentum)
            else:
                direction = buffers
        torch._foreach_add_(self.params, direction, alpha=-self.lr)
        self.step_count += 1


class Adam(Optimizer):
    """Adam (Kingma & Ba) with bias correction, as ``torch.optim.Adam``:
    m ← β₁m + (1 − β₁)g, v ← β₂v + (1 − β₂)g², θ ← θ − lr/(1 − β₁ᵗ) · m / (√v/√(1 − β₂ᵗ) + ε).
    ``weight_decay`` adds λθ to the gradient (L2); ``AdamW`` decays the weights directly."""

    state_names = ("exp_avg", "exp_avg_sq")
    decoupled = False

    def __init__(self, params: Iterable[Tensor], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        super().__init__(params, lr)
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"Adam betas must be in [0, 1), got {betas}")
        self.betas, self.eps, self.weight_decay = tuple(betas), eps, weight_decay

    def hyperparameters(self) -> dict[str, float | bool]:
        return {"lr": self.lr, "betas": self.betas, "eps": self.eps, "weight_decay": self.weight_decay}

    def update(self, grads: Sequence[Tensor]) -> None:
        beta1, beta2 = self.betas
        grads = list(grads)
        if self.weight_decay:
            if self.decoupled:
                torch._foreach_mul_(self.params, 1 - self.lr * self.weight_decay)
            else:
                grads = torch._foreach_add(grads, self.params, alpha=self.weight_decay)
        if not self.state:
            self.state = {name: [torch.zeros_like(p) for p in self.params] for name in self.state_names}
        exp_avg, exp_avg_sq = self.state["exp_avg"], self.state["exp_avg_sq"]
        self.step_count += 1
        torch._foreach_lerp_(exp_avg, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sq, beta2)
        torch._foreach_addcmul_(exp_avg_sq, grads, grads, 1 - beta2)
        step_size = self.lr / (1 - beta1 ** self.step_count)
        denom = torch._foreach_sqrt(exp_avg_sq)
        torch._foreach_div_(denom, math.sqrt(1 - beta2 ** self.step_count))
        torch._foreach_add_(denom, self.eps)
        torch._foreach_addcdiv_(self.params, exp_avg, denom, -step_size)


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter): θ ← θ(1 − lr·λ) before the Adam step."""

    decoupled = True

    def __init__(self, params: Iterable[Tensor], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2) -> None:
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


def build_optimizer(name: str, params: Iterable[Tensor], **kwargs: float) -> Optimizer:
    """An engine optimizer by name ('sgd', 'adam', 'adamw')."""
    try:
        cls = OPTIMIZERS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}") from None
    return cls(params, **kwargs)
