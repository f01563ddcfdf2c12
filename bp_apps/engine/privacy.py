"""Differentially private SGD for engine networks: per-example gradients, their norms, the clipped and noised step.

DP-SGD (Abadi et al. 2016) clips each example's gradient to a norm C before the batch sum and adds Gaussian noise
of standard deviation σ·C. That needs every example's gradient, which autograd only gives by tricks (hooks, vmap);
a hand-written backward already holds, per layer, the input x and the output gradient g of every example, and a
parameter gradient is a product of the two. So everything here is algebra on what the backward sees:

* Linear, y = x Wᵀ + b, example i with rows t (one row, or a sequence):
  ∇W_i = Σ_t g_it x_itᵀ, ∇b_i = Σ_t g_it. With one row, ‖∇W_i‖ = ‖g_i‖·‖x_i‖ without forming ∇W_i (a "ghost"
  norm); with T rows, ‖∇W_i‖² = ⟨G_i G_iᵀ, X_i X_iᵀ⟩ (two T×T Gram matrices), or the O×I gradients themselves
  when forming them costs less (counting the clipped sum that follows: see :func:`_form_or_gram`).
* Conv1d/Conv2d are the same with x replaced by its im2col rows (one row per output position), per group.
* LayerNorm and GroupNorm: ∇γ_i = Σ g_i ⊙ x̂_i, ∇β_i = Σ g_i over example i's positions: small, formed directly.

BatchNorm normalises with statistics of the whole batch, so one example's loss depends on every other example:
there is no per-example gradient to clip, and the recorder refuses it. No autograd anywhere (engine rule).

The step (:func:`privatize`) writes, for every parameter,
(Σ_i min(1, C/(‖g_i‖ + 10⁻⁶))·g_i + N(0, (σC)²)) / expected_batch_size into its ``<name>_grad`` buffer, g_i being
example i's own gradient (the mean reduction of the loss undone). The 10⁻⁶ and the order, shape and generator of
the noise draws are Opacus's (``DPOptimizer.clip_and_accumulate`` / ``add_noise``), so for one generator seed and
one batch the engine's update equals Opacus's. The clipped sum is not formed from per-example gradients when the
algebra allows: Σ_i c_i ∇W_i = Σ_i (c_i g_i) x_iᵀ is the ordinary weight-gradient product with the rows of g
scaled by c_i (where the per-example gradients were formed for the norms anyway, it is their weighted sum). The
noise, already divided by the expected batch size, is drawn straight into the gradient buffers and the products
add onto it, so the step makes no extra pass over the gradients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from bp_apps.engine.conv import BatchNorm2d, _ConvNd
from bp_apps.engine.layers import BatchNorm1d, Layer, LayerNorm, Linear

__all__ = ["CLIP_EPS", "GroupNorm", "PerExampleRecorder", "privatize"]

CLIP_EPS = 1e-6
"""Added to each norm before dividing C by it, as Opacus does: the same clip factors, and no division by zero."""

_MATERIALISED_BYTES = 512 * 2**20
"""Per-example gradients of one layer above this size are never formed (the Gram form is used instead)."""


class GroupNorm(Layer):
    """Normalisation over groups of channels of each example, as ``nn.GroupNorm(num_groups, num_channels)``.

    Unlike BatchNorm it uses no statistic of other examples, so per-example gradients exist: the norm of choice
    for a DP-SGD network. Input (N, C, *): x̂ = (x − μ)/√(σ² + ε) with μ, σ² over the C/G channels of a group
    and all positions (biased σ²), then y = γ_c x̂ + β_c.

    dγ_c = Σ_{n, positions} g·x̂;  dβ_c = Σ g;  dx = rstd·(d − mean(d) − x̂·mean(d·x̂)) per (example, group) with
    d = γ·g (the same formula as LayerNorm's, over the group).
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        for what, value in (("num_groups", num_groups), ("num_channels", num_channels)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"GroupNorm: {what} must be a positive int, got {value!r}")
        if num_channels % num_groups:
            raise ValueError(f"GroupNorm: num_channels ({num_channels}) must be divisible by num_groups "
                             f"({num_groups})")
        self.num_groups, self.num_channels, self.eps, self.affine = num_groups, num_channels, eps, affine
        if affine:
            self._add_param("weight", torch.ones(num_channels, device=device, dtype=dtype))
            self._add_param("bias", torch.zeros(num_channels, device=device, dtype=dtype))

    def _channel_shape(self, x: Tensor) -> tuple[int, ...]:
        return (1, self.num_channels) + (1,) * (x.dim() - 2)

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() < 2 or x.shape[1] != self.num_channels:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"GroupNorm({self.num_groups}, {self.num_channels}) expects input (N, "
                             f"{self.num_channels}, ...), got {shape}")
        per_group = self.num_channels // self.num_groups * math.prod(x.shape[2:])
        rows = x.reshape(x.shape[0], self.num_groups, per_group)
        var, mean = torch.var_mean(rows, dim=2, keepdim=True, correction=0)
        rstd = torch.rsqrt(var + self.eps)
        xhat = ((rows - mean) * rstd).view(x.shape)
        self.saved = (xhat, rstd)
        if not self.affine:
            return xhat
        shape = self._channel_shape(x)
        return torch.addcmul(self.bias.view(shape), xhat, self.weight.view(shape))

    def backward(self, grad_output: Tensor) -> Tensor:
        xhat, rstd = self.saved
        batch = xhat.shape[0]
        if self.affine:
            per_channel = (batch, self.num_channels, -1) if batch else (0, self.num_channels, 1)
            g_rows = grad_output.reshape(per_channel)
            torch.sum((g_rows * xhat.reshape(per_channel)).sum(2), 0, out=self.weight_grad)
            torch.sum(g_rows.sum(2), 0, out=self.bias_grad)
            grad_output = grad_output * self.weight.view(self._channel_shape(xhat))
        per_group = self.num_channels // self.num_groups * math.prod(xhat.shape[2:])
        d = grad_output.reshape(batch, self.num_groups, per_group)
        xh = xhat.reshape(batch, self.num_groups, per_group)
        grad_input = rstd * (d - d.mean(2, keepdim=True) - xh * (d * xh).mean(2, keepdim=True))
        return grad_input.view(xhat.shape)

    def torch_module(self) -> nn.Module:
        factory = {"device": self.weight.device, "dtype": self.weight.dtype} if self.affine else {}
        return nn.GroupNorm(self.num_groups, self.num_channels, self.eps, self.affine, **factory)

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}"


# -- what each kind of layer contributes -----------------------------------------------------------------------------

@dataclass
class _Capture:
    """What one layer's backward saw: its (saved) input ``x`` — x̂ for the norms — and its ``grad_output``."""

    name: str
    layer: Layer
    x: Tensor
    g: Tensor
    materialised: dict[str, Tensor] = field(default_factory=dict)  # unscaled per-example grads, when formed
    channels_minor: bool = False  # a convolution's im2col columns ordered (kernel offset, channel)


def _kind(layer: Layer) -> str:
    if isinstance(layer, Linear):
        return "linear"
    if isinstance(layer, _ConvNd):
        return "conv"
    if isinstance(layer, (LayerNorm, GroupNorm)):
        return "norm"
    raise TypeError(type(layer).__name__)


def _rows(capture: _Capture, batch: int) -> tuple[Tensor, Tensor]:
    """A Linear's input and output gradient as (N, T, features): T rows per example (T = 1 for plain batches;
    an MLP given (N, T, D) flattens it to N·T consecutive rows)."""
    x, g = capture.x, capture.g
    return x.reshape(batch, -1, x.shape[-1]), g.reshape(batch, -1, g.shape[-1])


def _channels_minor(layer: _ConvNd, x: Tensor) -> bool:
    """Whether x is channels-last in memory (channels the innermost axis) and the im2col rows should follow it:
    columns ordered (kernel offset, channel), each run of channels one contiguous copy. One group only (the
    columns of a group must be contiguous)."""
    return layer.groups == 1 and x.shape[1] > 1 and x.stride(1) == 1


def _padded(layer: _ConvNd, x: Tensor, minor: bool) -> Tensor:
    """x with the layer's symmetric zero padding, in a buffer the layer keeps between steps (a fresh one every
    step would cost its page faults: as large as the input), in x's memory layout."""
    pads = layer._conv_padding
    if not any(pads):
        return x
    spatial = tuple(size + 2 * p for size, p in zip(x.shape[2:], pads))
    if minor:
        padded = layer.workspace("privacy_padded", (x.shape[0], *spatial, x.shape[1]), x).movedim(-1, 1)
    else:
        padded = layer.workspace("privacy_padded", (*x.shape[:2], *spatial), x)
    for axis, p in enumerate(pads, start=2):
        if p:
            padded.narrow(axis, 0, p).zero_()
            padded.narrow(axis, padded.shape[axis] - p, p).zero_()
    padded[(slice(None), slice(None), *(slice(p, p + size) for p, size in zip(pads, x.shape[2:])))] = x
    return padded


def _im2row(layer: _ConvNd, x: Tensor, out_sizes: tuple[int, ...], minor: bool) -> Tensor:
    """rows[n, q, (c, i)] = x_pad[n, c, q·s + i·d]: (N, Πout, C·Πk), one strided view copied into a buffer kept
    between steps (x is the padded input the layer saved when its padding is asymmetric; symmetric padding is
    applied here); with ``minor`` the columns are ordered (i, c) instead. Position-major rows are the layout
    batched GEMMs take fastest here, and g_n · rows_n is then the weight gradient with the columns' order."""
    xp = _padded(layer, x, minor)
    strides = xp.stride()
    channel = ((xp.shape[1],), (strides[1],))
    kernel = (tuple(layer.kernel_size), tuple(d * st for d, st in zip(layer.dilation, strides[2:])))
    inner = (kernel, channel) if minor else (channel, kernel)
    view = xp.as_strided((xp.shape[0], *out_sizes, *inner[0][0], *inner[1][0]),
                         (strides[0], *(s * st for s, st in zip(layer.stride, strides[2:])), *inner[0][1],
                          *inner[1][1]), xp.storage_offset())
    rows = layer.workspace("privacy_rows", tuple(view.shape), x)
    rows.copy_(view)
    return rows.view(xp.shape[0], math.prod(out_sizes), -1)


def _conv_groups(capture: _Capture) -> tuple[Tensor, Tensor]:
    """A convolution's im2col rows (N, G, L, C/G·Πk) and output gradient (N, G, O/G, L); sets
    ``capture.channels_minor`` to the rows' column order."""
    layer: _ConvNd = capture.layer  # type: ignore[assignment]
    x, g = capture.x, capture.g
    batch, groups = x.shape[0], layer.groups
    capture.channels_minor = _channels_minor(layer, x)
    rows = _im2row(layer, x, tuple(g.shape[2:]), capture.channels_minor)
    rows = rows.view(batch, rows.shape[1], groups, -1).transpose(1, 2)
    return rows, g.reshape(batch, groups, layer.out_channels // groups, -1)


def _conv_weight(t: Tensor, capture: _Capture, lead: tuple[int, ...]) -> Tensor:
    """A product g·rows (per example with ``lead`` = (N,), or summed with ``lead`` = ()) in the weight's layout
    (O, C/G, *k): the columns reordered when they were (kernel offset, channel)."""
    layer: _ConvNd = capture.layer  # type: ignore[assignment]
    if not capture.channels_minor:
        return t.reshape(*lead, *layer.weight.shape)
    return t.reshape(*lead, layer.out_channels, *layer.kernel_size, layer.in_channels).movedim(-1, len(lead) + 1)


def _form_or_gram(rows: int, fan_out: int, fan_in: int, batch: int, itemsize: int, for_sum: bool) -> bool:
    """Whether forming the per-example weight gradients (batch × fan_out × fan_in) is cheaper than the Gram form.

    For the norm alone, forming costs T·O·I multiply-adds per example, the Gram form T²·(O + I). When the clipped
    sum follows, the Gram form must also redo the weighted product (another T·O·I, as one large GEMM), while the
    formed gradients give it as a weighted sum over examples (O·I each, memory-bound: counted four times).
    """
    if batch * fan_out * fan_in * itemsize > _MATERIALISED_BYTES:
        return False
    form = rows * fan_out * fan_in + (4 * fan_out * fan_in if for_sum else 0)
    gram = rows * rows * (fan_out + fan_in) + (rows * fan_out * fan_in if for_sum else 0)
    return form <= gram


def _sq(t: Tensor, batch: int) -> Tensor:
    """Per-example squared L2 norm of an (N, ...) tensor."""
    return torch.linalg.vector_norm(t.reshape(batch, -1), dim=1).square_()


def _squared_norm(capture: _Capture, batch: int, for_sum: bool) -> Tensor:
    """Σ over the layer's parameters of ‖∇θ_i‖², per example, for the captured (unscaled) output gradient.
    Per-example gradients formed on the way are kept in ``capture.materialised`` for the clipped sum."""
    layer = capture.layer
    kind = _kind(layer)
    if kind == "norm":
        grads = capture.materialised = _norm_grads(capture, batch)
        return _sq(grads["weight"], batch) + _sq(grads["bias"], batch)
    if kind == "linear":
        x, g = _rows(capture, batch)
        if x.shape[1] == 1:  # the ghost norm: ‖g_i x_iᵀ‖ = ‖g_i‖·‖x_i‖
            g_sq = _sq(g, batch)
            total = g_sq * _sq(x, batch)
            return total + g_sq if layer.has_bias else total
        rows, fan_out, fan_in = x.shape[1], g.shape[2], x.shape[2]
        bias_sq = _sq(g.sum(1), batch) if layer.has_bias else 0.0
        if _form_or_gram(rows, fan_out, fan_in, batch, x.element_size(), for_sum):
            weight = capture.materialised["weight"] = torch.bmm(g.transpose(1, 2), x)  # (N, O, I)
            return _sq(weight, batch) + bias_sq
        gram = (torch.bmm(x, x.transpose(1, 2)) * torch.bmm(g, g.transpose(1, 2))).sum((1, 2))
        return gram + bias_sq
    rows, gv = _conv_groups(capture)
    positions, fan_out, fan_in = rows.shape[2], gv.shape[2], rows.shape[3]
    bias_sq = _sq(capture.g.reshape(batch, layer.out_channels, -1).sum(2), batch) if layer.has_bias else 0.0
    if _form_or_gram(positions, fan_out * layer.groups, fan_in, batch, rows.element_size(), for_sum):
        weight = layer.workspace("privacy_per_example", (batch, *gv.shape[1:3], rows.shape[3]), rows)
        capture.materialised["weight"] = torch.matmul(gv, rows, out=weight)  # (N, G, O/G, C/G·Πk)
        return _sq(weight, batch) + bias_sq
    gram = torch.matmul(rows, rows.transpose(-1, -2)) * torch.matmul(gv.transpose(-1, -2), gv)  # (N, G, L, L)
    return gram.sum((1, 2, 3)) + bias_sq


def _norm_grads(capture: _Capture, batch: int) -> dict[str, Tensor]:
    """LayerNorm / GroupNorm per-example (unscaled) ∇γ, ∇β: sums of g·x̂ and g over the example's positions."""
    layer = capture.layer
    xhat, g = capture.x, capture.g
    if isinstance(layer, LayerNorm):
        per = (batch, -1, layer.normalized_shape)
        g_rows = g.reshape(per)
        return {"weight": (g_rows * xhat.reshape(per)).sum(1), "bias": g_rows.sum(1)}
    per = (batch, layer.num_channels, -1)
    g_rows = g.reshape(per)
    return {"weight": (g_rows * xhat.reshape(per)).sum(2), "bias": g_rows.sum(2)}


def _per_example(capture: _Capture, batch: int) -> dict[str, Tensor]:
    """Every parameter's (unscaled) per-example gradient, (N, *param.shape)."""
    layer = capture.layer
    kind = _kind(layer)
    if kind == "norm":
        return _norm_grads(capture, batch)
    out: dict[str, Tensor] = {}
    if kind == "linear":
        x, g = _rows(capture, batch)
        out["weight"] = capture.materialised.get("weight")
        if out["weight"] is None:
            out["weight"] = torch.bmm(g.transpose(1, 2), x)
        if layer.has_bias:
            out["bias"] = g.sum(1)
        return out
    weight = capture.materialised.get("weight")
    if weight is None:
        rows, gv = _conv_groups(capture)
        weight = torch.matmul(gv, rows)
    out["weight"] = _conv_weight(weight, capture, (batch,))
    if layer.has_bias:
        out["bias"] = capture.g.reshape(batch, layer.out_channels, -1).sum(2)
    return out


def _put(target: Tensor, value: Tensor, accumulate: bool) -> None:
    if accumulate:
        target.add_(value)
    else:
        target.copy_(value)


def _write_weighted_sum(capture: _Capture, batch: int, weights: Tensor, accumulate: bool = False) -> None:
    """Write (or with ``accumulate`` add) Σ_i wᵢ·∇θ_i (unscaled per-example gradients) into the layer's
    ``<name>_grad`` buffers: a weighted sum of the formed gradients where they exist, else the layer's own gradient
    product with the rows of g scaled by wᵢ."""
    layer = capture.layer
    formed = capture.materialised
    kind = _kind(layer)
    if kind == "norm":
        for name, tensor in formed.items():
            _put(getattr(layer, f"{name}_grad"), torch.mv(tensor.t(), weights), accumulate)
        return
    if kind == "linear":
        x, g = _rows(capture, batch)
        rows = x.shape[0] * x.shape[1]
        scaled = torch.mul(g, weights.view(batch, 1, 1), out=layer.workspace("privacy_scaled", g.shape, g))
        scaled = scaled.view(rows, -1)
        if "weight" in formed:
            _put(layer.weight_grad, torch.mv(formed["weight"].reshape(batch, -1).t(), weights).view_as(layer.weight),
                 accumulate)
        elif accumulate:
            layer.weight_grad.addmm_(scaled.t(), x.reshape(rows, -1))
        else:
            torch.mm(scaled.t(), x.reshape(rows, -1), out=layer.weight_grad)
        if layer.has_bias:
            _put(layer.bias_grad, scaled.sum(0), accumulate)
        return
    g = capture.g
    if layer.has_bias:
        _put(layer.bias_grad, torch.mv(g.reshape(batch, layer.out_channels, -1).sum(2).t(), weights), accumulate)
    if "weight" in formed:
        summed = torch.mv(formed["weight"].reshape(batch, -1).t(), weights)
        _put(layer.weight_grad, _conv_weight(summed, capture, ()), accumulate)
        return
    rows, _ = _conv_groups(capture)
    groups, positions, fan_in = rows.shape[1], rows.shape[2], rows.shape[3]
    gv = (g * weights.view(batch, *(1,) * (g.dim() - 1))).reshape(batch, groups, -1, positions)
    # Σ_n (w_n g_n)·rows_n for all groups at once: the examples and positions become one contraction axis
    rows_flat = rows.transpose(0, 1).reshape(groups, batch * positions, fan_in)
    g_flat = gv.permute(1, 2, 0, 3).reshape(groups, -1, batch * positions)
    if capture.channels_minor:
        _put(layer.weight_grad, _conv_weight(torch.bmm(g_flat, rows_flat), capture, ()), accumulate)
        return
    target = layer.weight_grad.view(groups, -1, fan_in)
    if accumulate:
        target.baddbmm_(g_flat, rows_flat)
    else:
        torch.bmm(g_flat, rows_flat, out=target)


def _input_grad(capture: _Capture) -> Tensor | None:
    """dL/dx of a Linear or convolution alone (what the layers below need), without its weight gradient."""
    layer, x, g = capture.layer, capture.x, capture.g
    if not layer.needs_input_grad:
        return None
    if isinstance(layer, Linear):
        out = layer.workspace("grad_input", x.shape, x) if layer.reuse_buffers else None
        return torch.mm(g, layer.weight, out=out)
    conv: _ConvNd = layer  # type: ignore[assignment]
    if conv._dims == 2 and g.is_cpu:
        # torch's CPU transposed convolution is several times faster on a channels-last gradient (oneDNN's own
        # layout); the result is made contiguous again below
        g = g.contiguous(memory_format=torch.channels_last)
    output_padding = tuple(size + 2 * p - (d * (k - 1) + 1) - (o - 1) * s
                           for size, o, p, d, k, s in zip(x.shape[2:], g.shape[2:], conv._conv_padding,
                                                          conv.dilation, conv.kernel_size, conv.stride))
    grad_input = conv._conv_transpose(g, conv.weight, None, conv.stride, conv._conv_padding, output_padding,
                                      conv.groups, conv.dilation)
    if not conv._symmetric:  # crop the explicit padding of 'same'
        index = (slice(None), slice(None), *(slice(left, size - right)
                                              for size, (left, right) in zip(x.shape[2:], conv._pads)))
        grad_input = grad_input[index]
    return grad_input.contiguous()


# -- the recorder ----------------------------------------------------------------------------------------------------

def _describe(name: str, layer: nn.Module) -> str:
    return f"{name or 'the network'} ({type(layer).__name__})"


class PerExampleRecorder:
    """Capture what each parameterised layer's backward receives, for per-example gradients and their norms.

    ``with PerExampleRecorder(net, loss_reduction="mean") as rec:`` then forward, loss, ``net.backward(...)``:
    while active, every layer with parameters has its instance ``backward`` wrapped to keep the ``grad_output``
    it receives and the input in its ``saved``; the network's own ``forward`` is wrapped to learn the batch size
    N (``input.shape[0]``) and to start a fresh batch. Everything is restored on exit, also after an exception;
    the captures stay readable after exit, until the network's next forward or backward overwrites the tensors
    they refer to (they are references, not copies).

    ``loss_reduction``: ``"mean"`` when the loss averages over the N examples (each captured gradient row then
    carries 1/N, which the per-example gradients undo), ``"sum"`` when it adds them up.

    ``param_grads=False`` is the fast path for DP-SGD: the wrapped backward of Linear and convolution layers
    computes only the input gradient the layers below need and leaves ``<name>_grad`` alone, because
    :func:`privatize` writes those buffers anyway (the clipped sum is then the only weight-gradient product).
    With the default ``True`` the layers' backward runs unchanged.

    Supported: Linear (2-D batches, or N·T consecutive rows per batch as an MLP makes of (N, T, D) inputs),
    Conv1d/Conv2d (any stride, padding, dilation, groups), LayerNorm, :class:`GroupNorm`. BatchNorm is refused
    (it mixes examples); so is any other module with parameters (recurrent layers are not supported).
    """

    def __init__(self, net: Layer, loss_reduction: Literal["mean", "sum"] = "mean", *,
                 param_grads: bool = True) -> None:
        if not isinstance(net, Layer):
            raise TypeError(f"PerExampleRecorder needs an engine network (a Layer), got {type(net).__name__}")
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"PerExampleRecorder: loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        self.net, self.loss_reduction, self.param_grads = net, loss_reduction, bool(param_grads)
        self.layers: list[tuple[str, Layer]] = self._parameterised_layers(net)
        self.batch_size: int | None = None
        self._captures: dict[str, _Capture] = {}
        self._squared: Tensor | None = None
        self._patched: list[tuple[nn.Module, str, Any]] = []

    @staticmethod
    def _parameterised_layers(net: Layer) -> list[tuple[str, Layer]]:
        """The layers whose per-example gradients are needed, in ``named_parameters`` order; a ValueError naming
        the first module that cannot give them."""
        found = []
        for name, module in net.named_modules():
            if isinstance(module, (BatchNorm1d, BatchNorm2d)):
                raise ValueError(f"{_describe(name, module)} is not compatible with per-example gradients: it "
                                 f"normalises with statistics of the whole batch, so each example's gradient "
                                 f"depends on the others; use GroupNorm/LayerNorm or no norm")
            own = list(module.parameters(recurse=False))
            if not own:
                continue
            if not isinstance(module, Layer):
                raise ValueError(f"{_describe(name, module)} is not an engine layer; per-example gradients are "
                                 f"recorded from engine layers only")
            try:
                _kind(module)
            except TypeError:
                raise ValueError(f"{_describe(name, module)}: per-example gradients are supported for Linear, "
                                 f"Conv1d, Conv2d, LayerNorm and GroupNorm layers only") from None
            found.append((name, module))
        return found

    # -- context ----------------------------------------------------------------------------------------------------
    def __enter__(self) -> PerExampleRecorder:
        if self._patched:
            raise RuntimeError("PerExampleRecorder is already active")
        targets: list[nn.Module] = [self.net, *(layer for _, layer in self.layers)]
        for module in targets:
            for attr in ("forward", "backward"):
                if getattr(module.__dict__.get(attr), "_per_example_recorder", None) is not None:
                    raise RuntimeError(f"{type(module).__name__} is already being recorded by another "
                                       f"PerExampleRecorder")
        self._begin(None)
        try:
            self._patch(self.net, "forward", self._wrap_forward(self.net.forward))
            for name, layer in self.layers:
                self._patch(layer, "backward", self._wrap_backward(name, layer, layer.backward))
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore()

    def _patch(self, module: nn.Module, attr: str, wrapper: Any) -> None:
        wrapper._per_example_recorder = self
        self._patched.append((module, attr, module.__dict__.get(attr)))
        module.__dict__[attr] = wrapper

    def _restore(self) -> None:
        while self._patched:
            module, attr, previous = self._patched.pop()
            if previous is None:
                module.__dict__.pop(attr, None)
            else:
                module.__dict__[attr] = previous

    def _begin(self, batch_size: int | None) -> None:
        self.batch_size = batch_size
        self._captures = {}
        self._squared = None

    def _wrap_forward(self, original: Any) -> Any:
        def forward(*args: Any, **kwargs: Any) -> Any:
            first = args[0] if args else next(iter(kwargs.values()), None)
            self._begin(int(first.shape[0]) if isinstance(first, Tensor) and first.dim() else None)
            return original(*args, **kwargs)
        return forward

    def _wrap_backward(self, name: str, layer: Layer, original: Any) -> Any:
        skip_param_grads = not self.param_grads and isinstance(layer, (Linear, _ConvNd))

        def backward(grad_output: Tensor) -> Tensor | None:
            if name in self._captures:
                raise ValueError(f"{_describe(name, layer)}: backward ran twice for one forward while recording; "
                                 f"a layer used twice in one pass (shared weights) has no per-example gradient "
                                 f"here")
            capture = _Capture(name, layer, layer.saved[0], grad_output)
            self._captures[name] = capture
            self._squared = None
            return _input_grad(capture) if skip_param_grads else original(grad_output)
        return backward

    # -- results ----------------------------------------------------------------------------------------------------
    @property
    def recorded(self) -> bool:
        """Whether a backward was recorded since the last forward (False also stands for an empty batch)."""
        return bool(self._captures)

    def _examples(self) -> int:
        """N for the captured batch: the forward's batch size, or the captures' common first dimension; checks
        that every parameterised layer was captured, with rows that split evenly into N examples."""
        if not self._captures:
            return 0 if self.batch_size in (None, 0) else self._missing()
        if len(self._captures) != len(self.layers):
            return self._missing()
        batch = self.batch_size
        if batch is None:
            firsts = {c.x.shape[0] for c in self._captures.values()}
            if len(firsts) != 1:
                raise ValueError(f"PerExampleRecorder: the layers saw batches of {sorted(firsts)} rows; run the "
                                 f"forward through the recorded network itself so that it knows N")
            batch = firsts.pop()
        for capture in self._captures.values():
            rows = capture.x.shape[0]
            if batch == 0 and rows == 0:
                continue
            if batch == 0 or rows % batch:
                raise ValueError(f"{_describe(capture.name, capture.layer)} saw {rows} rows, which do not split "
                                 f"into the batch's {batch} examples")
        return batch

    def _missing(self) -> int:
        names = [_describe(name, layer) for name, layer in self.layers if name not in self._captures]
        raise ValueError(f"PerExampleRecorder: no backward was recorded for {', '.join(names)}; run forward, loss "
                         f"and net.backward inside the 'with' block")

    def _scale(self, batch: int) -> float:
        return float(batch) if self.loss_reduction == "mean" else 1.0

    def _squared_norms(self, for_sum: bool = False) -> Tensor:
        """Σ over all parameters of each example's squared gradient norm (cached until the next batch)."""
        if self._squared is None:
            batch = self._examples()
            if batch == 0:
                reference = next(iter(self.net.parameters()))
                return reference.new_zeros(0)
            total = None
            for capture in self._captures.values():
                part = _squared_norm(capture, batch, for_sum)
                total = part if total is None else total + part
            self._squared = total * self._scale(batch) ** 2
        return self._squared

    def norms(self) -> Tensor:
        """Each example's gradient norm over all parameters, (N,): ghost norms where the algebra allows (Linear
        on plain batches: ‖g_i‖·‖x_i‖), the Gram form or the formed gradients (whichever is cheaper) for
        sequences and convolutions."""
        return self._squared_norms().sqrt()

    def per_example_grads(self) -> dict[str, Tensor]:
        """Each parameter's per-example gradients, (N, *param.shape), named as in ``net.named_parameters()``."""
        batch = self._examples()
        scale = self._scale(batch)
        out: dict[str, Tensor] = {}
        for name, layer in self.layers:
            params = dict(layer.named_parameters(recurse=False))
            if batch == 0:
                grads = {pname: p.new_zeros((0, *p.shape)) for pname, p in params.items()}
            else:
                grads = _per_example(self._captures[name], batch)
            for pname in layer.param_names:
                out[f"{name}.{pname}" if name else pname] = grads[pname] * scale
        return out

    def write_weighted_sum(self, weights: Tensor, accumulate: bool = False) -> None:
        """Write Σ_i weights[i]·(example i's gradient) into every parameter's ``<name>_grad`` buffer (with
        ``accumulate``: add it to what the buffers hold)."""
        batch = self._examples()
        if weights.shape != (batch,):
            raise ValueError(f"PerExampleRecorder: weights must have shape ({batch},), got {tuple(weights.shape)}")
        if batch == 0:
            if not accumulate:
                for _, layer in self.layers:
                    for pname in layer.param_names:
                        getattr(layer, f"{pname}_grad").zero_()
            return
        for capture in self._captures.values():
            _write_weighted_sum(capture, batch, (weights * self._scale(batch)).to(capture.g.dtype), accumulate)


def _check_number(name: str, value: object, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0 or (positive and value == 0):
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"privatize: {name} must be a finite number {bound}, got {value!r}")
    return float(value)


def privatize(net: Layer, rec: PerExampleRecorder, max_grad_norm: float, noise_multiplier: float,
              expected_batch_size: int, generator: torch.Generator | None = None) -> Tensor:
    """Turn the recorded batch into the DP-SGD gradient: clip each example's gradient to ``max_grad_norm`` (C),
    sum, add N(0, (σC)²) noise (σ = ``noise_multiplier``) and divide by ``expected_batch_size``; the result goes
    into every parameter's ``<name>_grad`` (then ``net.attach_gradients()`` and any engine optimizer step).
    Returns the per-example gradient norms before clipping, (N,).

    Clip factor min(1, C/(‖g_i‖ + 10⁻⁶)) and noise drawn per parameter in ``net.parameters()`` order, one
    Gaussian tensor of the parameter's shape from ``generator`` (the global RNG when None; nothing drawn when
    σC = 0), as Opacus's DPOptimizer draws it with ``torch.normal(0, σC, size=p.shape, generator=generator)``:
    the same generator state gives the same update (here the draws are scaled by σC/B at once). An empty batch
    (Poisson sampling can draw none; a recorder that saw no backward stands for it) gives noise only. The divisor
    is the *expected* batch size, not N, as the privacy analysis of Poisson sampling requires.
    """
    if rec.net is not net:
        raise ValueError("privatize: the recorder was made for another network")
    clip = _check_number("max_grad_norm", max_grad_norm, positive=True)
    sigma = _check_number("noise_multiplier", noise_multiplier, positive=False)
    if isinstance(expected_batch_size, bool) or not isinstance(expected_batch_size, int) or expected_batch_size <= 0:
        raise ValueError(f"privatize: expected_batch_size must be a positive int, got {expected_batch_size!r}")
    norms = rec._squared_norms(for_sum=True).sqrt()
    factors = (clip / (norms + CLIP_EPS)).clamp_(max=1.0)
    # (clipped sum + noise) / B computed as noise/B drawn straight into the buffers, then the clipped sum with
    # weights c_i/B added by the gradient products themselves: no extra pass over the gradients.
    std = sigma * clip
    for grad in net.gradients():  # parameters() order, as Opacus draws
        if std > 0:
            grad.normal_(0.0, std / expected_batch_size, generator=generator)
        else:
            grad.zero_()
    rec.write_weighted_sum(factors / expected_batch_size, accumulate=True)
    return norms
