"""Layers with hand-written backward passes.

Each layer is an ``nn.Module`` only so that parameters, buffers, ``.to(device)`` and
``state_dict`` work as users expect; no autograd is involved. ``forward`` keeps in
``self.saved`` exactly what ``backward`` needs, and ``backward(grad_output)`` writes the
parameter gradients into ``<name>_grad`` buffers (overwriting, not accumulating) and
returns the gradient with respect to the input.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

SQRT_2 = math.sqrt(2.0)
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
GELU_TANH_COEF = 0.044715


class Layer(nn.Module):
    """Base class: a forward that saves its backward state and an explicit backward."""

    backend = "engine"  # trained by its own backward, not by autograd (see bp_apps.core.task.backend_of)
    saved: tuple = ()
    param_names: tuple[str, ...] = ()

    def __setattr__(self, name: str, value: object) -> None:
        # ``saved`` is written on every forward: skip nn.Module's parameter/buffer bookkeeping for it.
        if name == "saved":
            self.__dict__["saved"] = value
            return
        super().__setattr__(name, value)
        if name in self._parameters or name in self._buffers:
            self._mirror_tensors()

    def __delattr__(self, name: str) -> None:
        super().__delattr__(name)
        self.__dict__.pop(name, None)

    def _mirror_tensors(self) -> None:
        """Copy parameter and buffer references into the instance ``__dict__``.

        ``nn.Module`` keeps them in side dictionaries reached through ``__getattr__``, which costs
        about half a microsecond per access; the hot path reads several per layer and step. The
        mirror is refreshed whenever ``nn.Module`` can swap a tensor (assignment, ``_apply``).
        """
        for name, tensor in (*self._parameters.items(), *self._buffers.items()):
            self.__dict__[name] = tensor

    def backward(self, grad_output: Tensor) -> Tensor | None:  # pragma: no cover - abstract
        raise NotImplementedError

    def workspace(self, key: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """A buffer kept between steps for outputs of this layer: reusing memory instead of
        allocating fresh pages every step is what makes the hand-written step cheap."""
        spaces = self.__dict__.setdefault("_workspaces", {})
        buffer = spaces.get(key)
        if buffer is None or buffer.shape != shape or buffer.dtype != like.dtype or buffer.device != like.device:
            buffer = spaces[key] = torch.empty(shape, dtype=like.dtype, device=like.device)
        return buffer

    def workspaces(self) -> list[Tensor]:
        """The reused output buffers this layer and the engine layers inside it hold (for memory accounting)."""
        return [t for module in self.modules() if isinstance(module, Layer)
                for t in module.__dict__.get("_workspaces", {}).values()]

    def _apply(self, fn, recurse: bool = True):  # type: ignore[no-untyped-def]
        # Device or dtype changes invalidate the workspaces and the gradient list, and may replace tensors.
        self.__dict__.pop("_workspaces", None)
        self.__dict__.pop("_gradient_list", None)
        result = super()._apply(fn, recurse)
        self._mirror_tensors()
        return result

    def register_buffer(self, name: str, tensor: Tensor | None, persistent: bool = True) -> None:
        super().register_buffer(name, tensor, persistent)
        self._mirror_tensors()

    def _add_param(self, name: str, value: Tensor) -> None:
        """Register ``value`` as a parameter (no autograd) and a same-shaped gradient buffer."""
        self.register_parameter(name, nn.Parameter(value, requires_grad=False))
        self.register_buffer(f"{name}_grad", torch.zeros_like(value), persistent=False)
        self.param_names = (*self.param_names, name)

    def param_grads(self) -> list[tuple[str, Tensor, Tensor]]:
        """``(name, parameter, gradient buffer)`` for each parameter of this layer and of the engine layers inside
        it, named as in ``state_dict`` and in ``parameters()`` order."""
        return [(f"{prefix}.{n}" if prefix else n, getattr(module, n), getattr(module, f"{n}_grad"))
                for prefix, module in self.named_modules() if isinstance(module, Layer)
                for n in module.param_names]

    def gradients(self) -> list[Tensor]:
        """Gradient buffers, in the order of ``self.parameters()`` (cached; ``.to()`` refreshes it)."""
        cached = self.__dict__.get("_gradient_list")
        if cached is None:
            cached = self.__dict__["_gradient_list"] = [g for _, _, g in self.param_grads()]
        return cached

    def attach_gradients(self) -> None:
        """Point each parameter's ``grad`` at the gradient the last backward wrote (no copy), so any
        ``torch.optim.Optimizer`` (the engine's own included) can step with it."""
        for _, p, g in self.param_grads():
            p.grad = g

    def find_nonfinite(self) -> str | None:
        """Name the last layer (the first one backward reached) whose gradient is not finite."""
        for prefix, module in reversed(list(self.named_modules())):
            if isinstance(module, Layer):
                for name in module.param_names:
                    if not bool(torch.isfinite(getattr(module, f"{name}_grad")).all()):
                        return f"{prefix or 'the network'} ({type(module).__name__}) {name}"
        return None

    def torch_module(self) -> nn.Module:
        """The ``torch.nn`` module this layer computes, built with the same settings (weights not copied)."""
        raise TypeError(f"no torch.nn twin for {type(self).__name__}")


class Linear(Layer):
    """y = x Wᵀ + b, initialised exactly like ``nn.Linear`` (same RNG draws, same order).

    Backward: dW = gᵀx, db = Σ_rows g, dx = g W. Set ``needs_input_grad = False`` on the
    first layer of a network to skip dx, as autograd does for inputs without gradients.
    With ``reuse_buffers`` (set by ``MLP``), training-mode outputs and dx are written into
    buffers reused every step, so each call overwrites the previous call's results.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        weight = torch.empty(out_features, in_features, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))  # nn.Linear.reset_parameters
        self._add_param("weight", weight)
        self.has_bias = bias
        if bias:
            bound = 1.0 / math.sqrt(in_features) if in_features > 0 else 0.0
            self._add_param("bias", torch.empty(out_features, device=device, dtype=dtype).uniform_(-bound, bound))
        self.needs_input_grad = True
        self.reuse_buffers = False

    def forward(self, x: Tensor) -> Tensor:
        self.saved = (x,)
        out = None
        if self.reuse_buffers and self.training:
            out = self.workspace("output", (x.shape[0], self.out_features), x)
        if self.has_bias:
            return torch.addmm(self.bias, x, self.weight.t(), out=out)
        return torch.mm(x, self.weight.t(), out=out)

    def backward(self, grad_output: Tensor) -> Tensor | None:
        (x,) = self.saved
        torch.mm(grad_output.t(), x, out=self.weight_grad)
        if self.has_bias:
            torch.sum(grad_output, 0, out=self.bias_grad)
        if not self.needs_input_grad:
            return None
        out = self.workspace("grad_input", x.shape, x) if self.reuse_buffers else None
        return torch.mm(grad_output, self.weight, out=out)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.has_bias}"


class ReLU(Layer):
    """y = max(x, 0); dy/dx = 1[y > 0].

    ``inplace`` overwrites the input in forward and the incoming gradient in backward: safe
    inside ``MLP``, where both belong to the engine, not for tensors a caller still needs.
    """

    def __init__(self, inplace: bool = False) -> None:
        super().__init__()
        self.inplace = inplace

    def forward(self, x: Tensor) -> Tensor:
        y = torch.relu_(x) if self.inplace else torch.relu(x)
        self.saved = (y,)
        return y

    def backward(self, grad_output: Tensor) -> Tensor:
        (y,) = self.saved
        # threshold_backward computes grad * 1[y > 0] in one pass (a plain kernel, not autograd).
        if self.inplace:
            return torch.ops.aten.threshold_backward.grad_input(grad_output, y, 0, grad_input=grad_output)
        return torch.ops.aten.threshold_backward(grad_output, y, 0)


class LeakyReLU(Layer):
    """y = x for x > 0, slope·x otherwise; dy/dx = 1 or slope."""

    def __init__(self, negative_slope: float = 0.01) -> None:
        super().__init__()
        self.negative_slope = negative_slope

    def forward(self, x: Tensor) -> Tensor:
        self.saved = (x,)
        return torch.where(x > 0, x, x * self.negative_slope)

    def backward(self, grad_output: Tensor) -> Tensor:
        (x,) = self.saved
        return torch.where(x > 0, grad_output, grad_output * self.negative_slope)


class Tanh(Layer):
    """y = tanh x; dy/dx = 1 − y²."""

    def forward(self, x: Tensor) -> Tensor:
        y = torch.tanh(x)
        self.saved = (y,)
        return y

    def backward(self, grad_output: Tensor) -> Tensor:
        (y,) = self.saved
        return grad_output * (1 - y * y)


class Sigmoid(Layer):
    """y = 1 / (1 + e⁻ˣ); dy/dx = y (1 − y)."""

    def forward(self, x: Tensor) -> Tensor:
        y = torch.sigmoid(x)
        self.saved = (y,)
        return y

    def backward(self, grad_output: Tensor) -> Tensor:
        (y,) = self.saved
        return grad_output * y * (1 - y)


class GELU(Layer):
    """GELU, exact (x·Φ(x)) or its tanh approximation, as ``nn.GELU(approximate=...)``.

    Exact: d/dx = Φ(x) + x·φ(x).  Tanh form with u = √(2/π)(x + 0.044715x³), t = tanh u:
    d/dx = ½(1 + t) + ½x(1 − t²)·√(2/π)(1 + 3·0.044715x²).
    """

    def __init__(self, approximate: str = "none") -> None:
        super().__init__()
        if approximate not in ("none", "tanh"):
            raise ValueError(f"GELU approximate must be 'none' or 'tanh', got {approximate!r}")
        self.approximate = approximate

    def forward(self, x: Tensor) -> Tensor:
        if self.approximate == "tanh":
            t = torch.tanh(SQRT_2_OVER_PI * (x + GELU_TANH_COEF * x * x * x))
            self.saved = (x, t)
            return 0.5 * x * (1 + t)
        cdf = torch.erf(x * (1 / SQRT_2)).add_(1).mul_(0.5)  # in place: one temporary, not five
        self.saved = (x, cdf)
        return x * cdf

    def backward(self, grad_output: Tensor) -> Tensor:
        x, aux = self.saved
        if self.approximate == "tanh":
            t = aux
            du_dx = SQRT_2_OVER_PI * (1 + 3 * GELU_TANH_COEF * x * x)
            return grad_output * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * du_dx)
        slope = x.square().mul_(-0.5).exp_().mul_(INV_SQRT_2PI).mul_(x).add_(aux)  # Φ(x) + x·φ(x), in place
        return slope.mul_(grad_output)


class Dropout(Layer):
    """Inverted dropout: in training y = x·m/(1−p) with m ~ Bernoulli(1−p); identity in eval."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability must be in [0, 1], got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            self.saved = (None,)
            return x
        if self.p == 1.0:
            scale = torch.zeros_like(x)
        else:
            # bernoulli_ draws from the RNG exactly as nn.Dropout does, so for one seed both
            # backends drop the same units and their training runs stay comparable.
            scale = torch.empty_like(x).bernoulli_(1 - self.p).div_(1 - self.p)
        self.saved = (scale,)
        return x * scale

    def backward(self, grad_output: Tensor) -> Tensor:
        (scale,) = self.saved
        return grad_output if scale is None else grad_output * scale


def _normalized_input_grad(dxhat: Tensor, xhat: Tensor, rstd: Tensor, dim: int) -> Tensor:
    """dx for x̂ = (x − μ)·rstd with μ, σ² taken over ``dim``:
    dx = rstd·(dx̂ − mean(dx̂) − x̂·mean(dx̂·x̂))."""
    return rstd * (dxhat - dxhat.mean(dim, keepdim=True) - xhat * (dxhat * xhat).mean(dim, keepdim=True))


class LayerNorm(Layer):
    """Normalise the last dimension: y = (x − μ)/√(σ² + ε)·γ + β, as ``nn.LayerNorm(dim)``."""

    def __init__(self, normalized_shape: int, eps: float = 1e-5, elementwise_affine: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.normalized_shape, self.eps, self.affine = normalized_shape, eps, elementwise_affine
        if elementwise_affine:
            self._add_param("weight", torch.ones(normalized_shape, device=device, dtype=dtype))
            self._add_param("bias", torch.zeros(normalized_shape, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        # Two passes (mean, then the mean square of x − μ): on CPU several times faster than var_mean's one.
        centred = x - x.mean(-1, keepdim=True)
        rstd = torch.rsqrt(centred.square().mean(-1, keepdim=True) + self.eps)
        xhat = centred.mul_(rstd)
        self.saved = (xhat, rstd)
        return torch.addcmul(self.bias, xhat, self.weight) if self.affine else xhat

    def backward(self, grad_output: Tensor) -> Tensor:
        xhat, rstd = self.saved
        if self.affine:
            rows_g = grad_output.reshape(-1, self.normalized_shape)
            torch.sum(rows_g * xhat.reshape(-1, self.normalized_shape), 0, out=self.weight_grad)
            torch.sum(rows_g, 0, out=self.bias_grad)
            grad_output = grad_output * self.weight
        return _normalized_input_grad(grad_output, xhat, rstd, -1)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.affine}"


class BatchNorm1d(Layer):
    """Batch normalisation over the batch of a (N, C) input, as ``nn.BatchNorm1d(C)``.

    Training normalises with the batch statistics (biased variance) and updates the running
    mean and the running unbiased variance with ``momentum``; eval uses the running ones.
    Buffer names match ``nn.BatchNorm1d`` so state dicts are interchangeable.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, affine: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.num_features, self.eps, self.momentum, self.affine = num_features, eps, momentum, affine
        if affine:
            self._add_param("weight", torch.ones(num_features, device=device, dtype=dtype))
            self._add_param("bias", torch.zeros(num_features, device=device, dtype=dtype))
        self.register_buffer("running_mean", torch.zeros(num_features, device=device, dtype=dtype))
        self.register_buffer("running_var", torch.ones(num_features, device=device, dtype=dtype))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 2 or x.shape[1] != self.num_features:
            raise ValueError(f"BatchNorm1d({self.num_features}) expects input (N, {self.num_features}), "
                             f"got {tuple(x.shape)}")
        if self.training:
            n = x.shape[0]
            if n < 2:
                raise ValueError("BatchNorm1d needs more than one sample per batch in training mode")
            var, mean = torch.var_mean(x, dim=0, keepdim=True, correction=0)
            self.running_mean.lerp_(mean.squeeze(0), self.momentum)
            self.running_var.lerp_(var.squeeze(0) * (n / (n - 1)), self.momentum)
            self.num_batches_tracked.add_(1)
            rstd = torch.rsqrt(var + self.eps)
            xhat = (x - mean) * rstd
        else:
            rstd = torch.rsqrt(self.running_var + self.eps)
            xhat = (x - self.running_mean) * rstd
        self.saved = (xhat, rstd, self.training)
        return torch.addcmul(self.bias, xhat, self.weight) if self.affine else xhat

    def backward(self, grad_output: Tensor) -> Tensor:
        xhat, rstd, batch_stats = self.saved
        if self.affine:
            torch.sum(grad_output * xhat, 0, out=self.weight_grad)
            torch.sum(grad_output, 0, out=self.bias_grad)
            grad_output = grad_output * self.weight
        if batch_stats:
            return _normalized_input_grad(grad_output, xhat, rstd, 0)
        return grad_output * rstd  # eval: the statistics are constants

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}"
