"""Convolution, pooling, flattening and 2-d batch normalisation with hand-written backward passes.

Same contract as :mod:`bp_apps.engine.layers`: ``forward`` keeps in ``self.saved`` what ``backward`` needs,
``backward(grad_output)`` overwrites the ``<name>_grad`` buffers and returns dL/dinput. Forwards use the
``torch.nn.functional`` forward ops; every backward is an explicit formula (matmul, the adjoint convolution
``conv_transpose``, strided im2col copies, ``fold``, ``scatter_add``, elementwise ops), never autograd or an aten
backward kernel. (BatchNorm2d runs its per-channel x·a + b passes through ``F.batch_norm`` in eval form with
mean 0 and variance 1: the same arithmetic as ``addcmul``, in torch's fastest kernel for it.)

Notation for a convolution with stride s, padding p, dilation d, kernel k (per spatial axis) and groups G:

    y[n, o, h] = b[o] + Σ_{c ∈ group(o), i} W[o, c, i] · x_pad[n, c, h·s + i·d]

    ∂L/∂b[o]       = Σ_{n, h} g[n, o, h]
    ∂L/∂W[o, c, i] = Σ_{n, h} g[n, o, h] · x_pad[n, c, h·s + i·d]          (a correlation of x with g)
    ∂L/∂x[n, c, t] = Σ_{o, i : h·s + i·d − p = t} g[n, o, h] · W[o, c, i]  (the transposed convolution of g)
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bp_apps.engine.layers import Layer

WEIGHT_GRAD_METHODS = ("auto", "shift", "unfold", "swap")
INPUT_GRAD_METHODS = ("auto", "transpose", "fold")
_UNIT_EPS = 1e-30  # 1 + _UNIT_EPS == 1 in float32 and float64
# Below this many weights per output channel, im2col (unfold) and col2im (fold) are cheap and win (first layers,
# C = 1: conv_transpose into one channel is slow there).
_UNFOLD_MAX_ROW = 32


def _tuple(value: int | tuple[int, ...] | list[int], n: int, what: str, owner: str) -> tuple[int, ...]:
    """An int or an n-sequence of ints as an n-tuple of ints."""
    if isinstance(value, bool):
        raise TypeError(f"{owner}: {what} must be an int or a tuple of {n} ints, got {value!r}")
    if isinstance(value, int):
        return (value,) * n
    if isinstance(value, (tuple, list)) and len(value) == n and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        return tuple(value)
    raise TypeError(f"{owner}: {what} must be an int or a tuple of {n} ints, got {value!r}")


def _describe(layer: nn.Module) -> str:
    return f"{type(layer).__name__}({layer.extra_repr()})"


def _check_float_input(layer: nn.Module, x: Tensor, like: Tensor | None) -> None:
    """TypeError naming the layer for a non-tensor, a non-float input or a dtype/device mismatch with ``like``."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{_describe(layer)} expects a tensor input, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{_describe(layer)} expects a floating-point input, got {x.dtype}")
    if like is not None and (x.dtype != like.dtype or x.device != like.device):
        raise TypeError(f"{_describe(layer)} has {like.dtype} parameters on {like.device} but got a {x.dtype} input "
                        f"on {x.device}; convert one to match (e.g. layer.to(x.dtype) or x.to(layer's dtype))")


class _ConvNd(Layer):
    """Shared implementation of :class:`Conv1d` and :class:`Conv2d` (``_dims`` spatial axes).

    Gradients (see the module docstring for the formulas):

    * db: ``g.sum`` over batch and spatial axes;
    * dx, skipped (backward returns None) when ``needs_input_grad`` is False (first layer), else one of
      ``input_grad_method``:
      - ``"transpose"``: ``conv_transpose{1,2}d(g, W)`` with the stride, padding, dilation and groups of the
        forward and the ``output_padding`` that gives dx exactly x's shape (the rows a stride that does not
        divide never reads get zero gradient);
      - ``"fold"``: col2im of the columns Wᵀ·g (``F.fold``, the adjoint of ``unfold``);
      - ``"auto"``: fold when a group's weight row (C/G · Πk) is small, else transpose;
    * dW, one of ``weight_grad_method``:
      - ``"shift"`` (stride 1, groups 1): x and g are laid out on a zero-padded grid, flattened; a kernel
        offset i is then a constant shift δ_i of the flat index and dW[:, :, i] = G · X[δ_i:δ_i+M], one GEMM per
        kernel offset on views (no im2col copy; see ``_weight_grad_shift``);
      - ``"unfold"``: im2col (a strided copy, as ``F.unfold``) then dW = Σ_n g_n · cols_nᵀ per group;
      - ``"swap"``: the correlation as a convolution with the batch and channel axes swapped:
        conv(xᵀ, gᵀ, stride=d, dilation=s) cropped to the kernel size;
      - ``"auto"``: unfold when a group's weight row (C/G · Πk) is small, shift when it applies, else swap
        (the fastest of the three at the tasks' shapes on CPU).
    """

    _dims = 2
    _conv = staticmethod(F.conv2d)
    _conv_transpose = staticmethod(F.conv_transpose2d)

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, ...],
                 stride: int | tuple[int, ...] = 1, padding: int | tuple[int, ...] | str = 0,
                 dilation: int | tuple[int, ...] = 1, groups: int = 1, bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        name, n = type(self).__name__, self._dims
        for what, value in (("in_channels", in_channels), ("out_channels", out_channels), ("groups", groups)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}: {what} must be a positive int, got {value!r}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"{name}: in_channels ({in_channels}) and out_channels ({out_channels}) must both be "
                             f"divisible by groups ({groups})")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = _tuple(kernel_size, n, "kernel_size", name)
        self.stride = _tuple(stride, n, "stride", name)
        self.dilation = _tuple(dilation, n, "dilation", name)
        for what, values in (("kernel_size", self.kernel_size), ("stride", self.stride),
                             ("dilation", self.dilation)):
            if min(values) <= 0:
                raise ValueError(f"{name}: {what} must be positive, got {values}")
        # (left, right) zero padding per axis; 'same' pads d·(k−1) in total, the odd one on the right (as torch).
        if isinstance(padding, str):
            if padding == "valid":
                pads = [(0, 0)] * n
            elif padding == "same":
                if any(s != 1 for s in self.stride):
                    raise ValueError(f"{name}: padding='same' is not supported for strided convolutions")
                pads = [(d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2)
                        for d, k in zip(self.dilation, self.kernel_size)]
            else:
                raise ValueError(f"{name}: padding must be an int, a tuple, 'valid' or 'same', got {padding!r}")
            self.padding: tuple[int, ...] | str = padding
        else:
            self.padding = _tuple(padding, n, "padding", name)
            if min(self.padding) < 0:
                raise ValueError(f"{name}: padding must be non-negative, got {self.padding}")
            pads = [(p, p) for p in self.padding]
        self._pads = tuple(pads)
        self._symmetric = all(left == right for left, right in pads)
        # symmetric padding goes to the convolution; an asymmetric one ('same' with an odd total) is applied with F.pad
        self._conv_padding = tuple(left for left, _ in pads) if self._symmetric else (0,) * n
        self._pad_arg = () if self._symmetric else tuple(v for pair in reversed(pads) for v in pair)

        weight = torch.empty(out_channels, in_channels // groups, *self.kernel_size, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))  # _ConvNd.reset_parameters
        self._add_param("weight", weight)
        self.has_bias = bias
        if bias:
            fan_in = in_channels // groups * math.prod(self.kernel_size)
            bound = 1.0 / math.sqrt(fan_in)
            self._add_param("bias", torch.empty(out_channels, device=device, dtype=dtype).uniform_(-bound, bound))
        self.needs_input_grad = True
        self.weight_grad_method = "auto"
        self.input_grad_method = "auto"

    # -- forward -------------------------------------------------------------------------------------------------
    def _check_input(self, x: Tensor) -> None:
        _check_float_input(self, x, self.weight)
        n = self._dims
        if x.dim() != n + 2 or x.shape[1] != self.in_channels:
            axes = "L" if n == 1 else "H, W"
            raise ValueError(f"{_describe(self)} expects input (N, {self.in_channels}, {axes}), got {tuple(x.shape)}")
        padded = [size + left + right for size, (left, right) in zip(x.shape[2:], self._pads)]
        span = [d * (k - 1) + 1 for d, k in zip(self.dilation, self.kernel_size)]
        if any(size < extent for size, extent in zip(padded, span)):
            raise ValueError(f"{_describe(self)}: input spatial size {tuple(x.shape[2:])} (padded: {tuple(padded)}) "
                             f"is smaller than the dilated kernel {tuple(span)}")

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        if not self._symmetric:
            x = F.pad(x, self._pad_arg)
        self.saved = (x,)
        return self._conv(x, self.weight, self.bias if self.has_bias else None, self.stride, self._conv_padding,
                          self.dilation, self.groups)

    # -- backward ------------------------------------------------------------------------------------------------
    def backward(self, grad_output: Tensor) -> Tensor | None:
        (x,) = self.saved
        n = self._dims
        spatial = tuple(range(2, 2 + n))
        if self.has_bias:
            torch.sum(grad_output, (0, *spatial), out=self.bias_grad)
        self._weight_grad(x, grad_output)
        if not self.needs_input_grad:
            return None
        if self._choose_input_method() == "fold":
            grad_input = self._input_grad_fold(x, grad_output)
        else:
            grad_input = self._input_grad_transpose(x, grad_output)
        if not self._symmetric:  # drop the explicit padding of 'same'
            index = (slice(None), slice(None), *(slice(left, size - right)
                                                  for size, (left, right) in zip(x.shape[2:], self._pads)))
            grad_input = grad_input[index].contiguous()
        return grad_input

    def _input_grad_transpose(self, x: Tensor, g: Tensor) -> Tensor:
        """dx = conv_transpose(g, W), ``output_padding`` chosen so that dx has exactly x's shape."""
        output_padding = tuple(
            size + 2 * p - (d * (k - 1) + 1) - (o - 1) * s
            for size, o, p, d, k, s in zip(x.shape[2:], g.shape[2:], self._conv_padding, self.dilation,
                                           self.kernel_size, self.stride))
        return self._conv_transpose(g, self.weight, None, self.stride, self._conv_padding, output_padding,
                                    self.groups, self.dilation)

    def _input_grad_fold(self, x: Tensor, g: Tensor) -> Tensor:
        """dx = col2im(Wᵀ g): per group, the columns Wᵀ·g_n (C/G·Πk, L) summed back onto the input (``F.fold``,
        the adjoint of ``unfold``; the padding is cropped). 1-d convolutions run as 2-d ones of height 1."""
        groups, batch = self.groups, x.shape[0]
        out_group = self.out_channels // groups
        weight_t = self.weight.reshape(groups, out_group, -1).transpose(1, 2)  # (G, C/G·Πk, O/G)
        cols = torch.matmul(weight_t, g.reshape(batch, groups, out_group, -1))  # (N, G, C/G·Πk, L)
        cols = cols.view(batch, -1, cols.shape[-1])
        kernel, dilation, padding, stride = self.kernel_size, self.dilation, self._conv_padding, self.stride
        if self._dims == 1:
            kernel, dilation, padding, stride = (1, *kernel), (1, *dilation), (0, *padding), (1, *stride)
            return F.fold(cols, (1, x.shape[2]), kernel, dilation, padding, stride).squeeze(2)
        return F.fold(cols, tuple(x.shape[2:]), kernel, dilation, padding, stride)

    def _choose_input_method(self) -> str:
        method = self.input_grad_method
        if method not in INPUT_GRAD_METHODS:
            raise ValueError(f"{_describe(self)}: input_grad_method must be one of {INPUT_GRAD_METHODS}, "
                             f"got {method!r}")
        if method != "auto":
            return method
        small = self.in_channels // self.groups * math.prod(self.kernel_size) <= _UNFOLD_MAX_ROW
        return "fold" if small else "transpose"

    def _choose_method(self) -> str:
        method = self.weight_grad_method
        if method not in WEIGHT_GRAD_METHODS:
            raise ValueError(f"{_describe(self)}: weight_grad_method must be one of {WEIGHT_GRAD_METHODS}, "
                             f"got {method!r}")
        shift_ok = self.groups == 1 and all(s == 1 for s in self.stride)
        if method == "shift" and not shift_ok:
            raise ValueError(f"{_describe(self)}: weight_grad_method='shift' needs stride 1 and groups 1")
        if method != "auto":
            return method
        if self.in_channels // self.groups * math.prod(self.kernel_size) <= _UNFOLD_MAX_ROW:
            return "unfold"
        return "shift" if shift_ok else "swap"

    def _weight_grad(self, x: Tensor, g: Tensor) -> None:
        method = self._choose_method()
        if method == "shift":
            self._weight_grad_shift(x, g)
        elif method == "unfold":
            self._weight_grad_unfold(x, g)
        else:
            self._weight_grad_swap(x, g)

    def _weight_grad_shift(self, x: Tensor, g: Tensor) -> None:
        """Stride 1, groups 1: dW[:, :, i] = G · X[δ_i : δ_i + M, :] on a zero-padded grid, flattened.

        Each image sits in a grid with period P = size + p per axis (at least the output size) and p zeros before
        it, so neighbouring images and rows share their padding. G is g channel-major, (O, M = N·ΠP), each output
        map in the corner of its cell and zeros elsewhere; X is x channels-last, (M + max δ, C). The output
        at flat position q reads the input at q + δ_i for kernel offset i (δ_i = Σ_axis i·d·(flat stride of the
        axis)); a read past the end of a row or an image lands in the next one's leading zeros. So each offset is
        one GEMM on views, no im2col copy; the layouts (K-contiguous rows times channel-contiguous rows) are
        MKL's fast case. The two grids are kept between steps: only their interiors are rewritten.
        """
        n = self._dims
        batch, channels, out_channels = x.shape[0], x.shape[1], g.shape[1]
        pads, sizes, out_sizes = self._conv_padding, x.shape[2:], g.shape[2:]
        period = tuple(max(size + p, o) for size, p, o in zip(sizes, pads, out_sizes))
        steps = [math.prod(period[axis + 1:]) for axis in range(n)]  # flat stride of each grid axis
        shifts = [sum(i * d * st for i, d, st in zip(index, self.dilation, steps))
                  for index in itertools.product(*(range(k) for k in self.kernel_size))]
        cells = batch * math.prod(period)
        layout = (batch, *sizes, *period)
        xf = self._zeroed_workspace("weight_grad_x", (cells + shifts[-1], channels), x, layout)
        grid = xf[:cells].view(batch, *period, channels)
        grid[(slice(None), *(slice(p, p + size) for p, size in zip(pads, sizes)))] = x.movedim(1, -1)
        gp = self._zeroed_workspace("weight_grad_g", (out_channels, batch, *period), g, layout)
        gp[(slice(None), slice(None), *(slice(0, o) for o in out_sizes))] = g.transpose(0, 1)
        gf = gp.view(out_channels, cells)
        taps = self.workspace("weight_grad_taps", (len(shifts), out_channels, channels), x)
        for tap, shift in enumerate(shifts):
            torch.mm(gf, xf[shift:shift + cells], out=taps[tap])
        self.weight_grad.copy_(taps.view(*self.kernel_size, out_channels, channels).permute(n, n + 1, *range(n)))

    def _zeroed_workspace(self, key: str, shape: tuple[int, ...], like: Tensor, layout: tuple) -> Tensor:
        """``workspace`` zero-filled whenever it is (re)allocated, and reallocated when the ``layout`` of the data
        it holds changes (the same shape can hold images of another geometry, with borders elsewhere)."""
        spaces = self.__dict__.setdefault("_workspaces", {})
        layouts = self.__dict__.setdefault("_workspace_layouts", {})
        if layouts.get(key) != layout:
            spaces.pop(key, None)
        before = spaces.get(key)
        buffer = self.workspace(key, shape, like)
        if buffer is not before:
            buffer.zero_()
            layouts[key] = layout
        return buffer

    def _im2col(self, x: Tensor, out_sizes: tuple[int, ...]) -> Tensor:
        """cols[n, (c, i), q] = x_pad[n, c, q·s + i·d]: (N, C·Πk, Πout), one strided copy of the padded input
        (what ``F.unfold`` computes, several times faster, and for any number of spatial axes)."""
        pads = self._conv_padding
        xp = F.pad(x, tuple(p for p in reversed(pads) for _ in range(2))) if any(pads) else x
        spatial = xp.stride()[2:]
        view = xp.as_strided((*xp.shape[:2], *self.kernel_size, *out_sizes),
                             (*xp.stride()[:2], *(d * st for d, st in zip(self.dilation, spatial)),
                              *(s * st for s, st in zip(self.stride, spatial))), xp.storage_offset())
        return view.reshape(xp.shape[0], -1, math.prod(out_sizes))

    def _weight_grad_unfold(self, x: Tensor, g: Tensor) -> None:
        """dW = Σ_n g_n · cols_nᵀ per group, cols = im2col(x)."""
        groups, batch = self.groups, x.shape[0]
        cols = self._im2col(x, tuple(g.shape[2:]))  # (N, C·Πk, L)
        cols = cols.view(batch, groups, -1, cols.shape[-1])
        gv = g.reshape(batch, groups, g.shape[1] // groups, -1)  # (N, G, O/G, L)
        # dWᵀ = Σ_n cols_n · g_nᵀ: this operand order is the faster one for MKL's batched GEMM (by 1.5-2x)
        grad_t = torch.matmul(cols, gv.transpose(-1, -2)).sum(0)  # (G, C/G·Πk, O/G)
        self.weight_grad.view(groups, gv.shape[2], -1).copy_(grad_t.transpose(1, 2))

    def _weight_grad_swap(self, x: Tensor, g: Tensor) -> None:
        """The correlation as a convolution over the batch: input (C/G, G·N, ...), weight (O, N, ...), groups G,
        stride ↔ dilation swapped; the result (C/G, O, k' ≥ k) is cropped to the kernel."""
        groups, batch, n = self.groups, x.shape[0], self._dims
        cg = x.shape[1] // groups
        xs = x.reshape(batch, groups, cg, *x.shape[2:]).transpose(0, 2).reshape(cg, groups * batch, *x.shape[2:])
        gs = g.transpose(0, 1)
        if groups > 1:
            og = g.shape[1] // groups
            gs = g.reshape(batch, groups, og, *g.shape[2:]).permute(1, 2, 0, *range(3, 3 + n))
            gs = gs.reshape(g.shape[1], batch, *g.shape[2:])
        full = self._conv(xs, gs, None, self.dilation, self._conv_padding, self.stride, groups)  # (C/G, O, k'...)
        crop = full[(slice(None), slice(None), *(slice(0, k) for k in self.kernel_size))]
        self.weight_grad.copy_(crop.transpose(0, 1))

    # -- torch twin ----------------------------------------------------------------------------------------------
    def torch_module(self) -> nn.Module:
        cls = nn.Conv1d if self._dims == 1 else nn.Conv2d
        return cls(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding, self.dilation,
                   self.groups, self.has_bias, device=self.weight.device, dtype=self.weight.dtype)

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if isinstance(self.padding, str) or any(self.padding):
            s += f", padding={self.padding}"  # as torch: padding=same, unquoted
        if any(d != 1 for d in self.dilation):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if not self.has_bias:
            s += ", bias=False"
        return s


class Conv2d(_ConvNd):
    """2-d convolution of an (N, C, H, W) input, as ``nn.Conv2d`` (same arguments without ``padding_mode``,
    same initialisation: kaiming_uniform_(a=√5) on the weight, then bias ~ U(−1/√fan_in, 1/√fan_in)).

    y = conv2d(x, W) + b;  db = Σ_{n,h,w} g;  dx = conv_transpose2d(g, W);  dW = corr(x, g) (see ``_ConvNd``).
    """

    _dims = 2
    _conv = staticmethod(F.conv2d)
    _conv_transpose = staticmethod(F.conv_transpose2d)


class Conv1d(_ConvNd):
    """1-d convolution of an (N, C, L) input, as ``nn.Conv1d`` (same arguments without ``padding_mode``,
    same initialisation).

    y = conv1d(x, W) + b;  db = Σ_{n,l} g;  dx = conv_transpose1d(g, W);  dW = corr(x, g) (see ``_ConvNd``).
    """

    _dims = 1
    _conv = staticmethod(F.conv1d)
    _conv_transpose = staticmethod(F.conv_transpose1d)


def _check_4d(layer: nn.Module, x: Tensor) -> None:
    _check_float_input(layer, x, None)
    if x.dim() != 4:
        raise ValueError(f"{_describe(layer)} expects input (N, C, H, W), got {tuple(x.shape)}")


def _pool_call(layer: nn.Module, fn, *args):  # type: ignore[no-untyped-def]
    """Run a functional pooling op, re-raising its shape complaints as a ValueError naming the layer."""
    try:
        return fn(*args)
    except RuntimeError as error:
        raise ValueError(f"{_describe(layer)}: {error}") from None


class MaxPool2d(Layer):
    """Max pooling, as ``nn.MaxPool2d`` (``dilation`` keyword-only here).

    y[n, c, h, w] = x[n, c, a(n, c, h, w)] with a the flat argmax of each window (``return_indices``);
    dx[n, c, t] = Σ_{(h, w) : a(n, c, h, w) = t} g[n, c, h, w]  (scatter_add: overlapping windows add up).
    """

    def __init__(self, kernel_size: int | tuple[int, int], stride: int | tuple[int, int] | None = None,
                 padding: int | tuple[int, int] = 0, ceil_mode: bool = False, *,
                 dilation: int | tuple[int, int] = 1) -> None:
        super().__init__()
        self.kernel_size = _tuple(kernel_size, 2, "kernel_size", "MaxPool2d")
        self.stride = self.kernel_size if stride is None else _tuple(stride, 2, "stride", "MaxPool2d")
        self.padding = _tuple(padding, 2, "padding", "MaxPool2d")
        self.dilation = _tuple(dilation, 2, "dilation", "MaxPool2d")
        self.ceil_mode = bool(ceil_mode)

    def forward(self, x: Tensor) -> Tensor:
        _check_4d(self, x)
        y, indices = _pool_call(self, F.max_pool2d, x, self.kernel_size, self.stride, self.padding, self.dilation,
                                self.ceil_mode, True)
        self.saved = (indices, x.shape)
        return y

    def backward(self, grad_output: Tensor) -> Tensor:
        indices, shape = self.saved
        rows = shape[0] * shape[1]
        grad_input = grad_output.new_zeros(rows, shape[2] * shape[3])
        grad_input.scatter_add_(1, indices.reshape(rows, -1), grad_output.reshape(rows, -1))
        return grad_input.view(shape)

    def torch_module(self) -> nn.Module:
        return nn.MaxPool2d(self.kernel_size, self.stride, self.padding, self.dilation, ceil_mode=self.ceil_mode)

    def extra_repr(self) -> str:
        s = f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        return s + f", ceil_mode={self.ceil_mode}"


def _avg_pool_divisors(size: int, out: int, kernel: int, stride: int, padding: int, include_pad: bool,
                       like: Tensor) -> Tensor:
    """Per output position along one axis, the divisor torch's avg_pool uses: the window [start, end) clipped to
    the padded input (count_include_pad) or to the input itself."""
    divisors = []
    for o in range(out):
        start = o * stride - padding
        end = min(start + kernel, size + padding)
        if not include_pad:
            start, end = max(start, 0), min(end, size)
        divisors.append(max(end - start, 1))
    return torch.tensor(divisors, dtype=like.dtype, device=like.device)


class AvgPool2d(Layer):
    """Average pooling, as ``nn.AvgPool2d`` (no ``divisor_override``), exact for ceil_mode and count_include_pad.

    y[n, c, h, w] = Σ_{window(h, w)} x / D[h, w], D the window size torch divides by (separable: D = D_h·D_w);
    dx = the transposed sum-pooling of g / D: conv_transpose2d with a per-channel all-ones kernel, cropped to x.
    Non-overlapping unpadded windows (stride = kernel) take a broadcast fast path.
    """

    def __init__(self, kernel_size: int | tuple[int, int], stride: int | tuple[int, int] | None = None,
                 padding: int | tuple[int, int] = 0, ceil_mode: bool = False, count_include_pad: bool = True) -> None:
        super().__init__()
        self.kernel_size = _tuple(kernel_size, 2, "kernel_size", "AvgPool2d")
        self.stride = self.kernel_size if stride is None else _tuple(stride, 2, "stride", "AvgPool2d")
        self.padding = _tuple(padding, 2, "padding", "AvgPool2d")
        self.ceil_mode, self.count_include_pad = bool(ceil_mode), bool(count_include_pad)

    def forward(self, x: Tensor) -> Tensor:
        _check_4d(self, x)
        y = _pool_call(self, F.avg_pool2d, x, self.kernel_size, self.stride, self.padding, self.ceil_mode,
                       self.count_include_pad)
        self.saved = (x.shape,)
        return y

    def backward(self, grad_output: Tensor) -> Tensor:
        (shape,) = self.saved
        batch, channels, height, width = shape
        out_h, out_w = grad_output.shape[2:]
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        if (kh, kw) == (sh, sw) and (ph, pw) == (0, 0) and out_h * kh <= height and out_w * kw <= width:
            # disjoint windows inside the input: every covered element gets g / (kh·kw)
            spread = (grad_output / (kh * kw)).view(batch, channels, out_h, 1, out_w, 1)
            spread = spread.expand(batch, channels, out_h, kh, out_w, kw).reshape(batch, channels, out_h * kh,
                                                                                   out_w * kw)
            if (out_h * kh, out_w * kw) == (height, width):
                return spread
            grad_input = grad_output.new_zeros(shape)
            grad_input[:, :, :out_h * kh, :out_w * kw] = spread
            return grad_input
        div_h = _avg_pool_divisors(height, out_h, kh, sh, ph, self.count_include_pad, grad_output)
        div_w = _avg_pool_divisors(width, out_w, kw, sw, pw, self.count_include_pad, grad_output)
        scaled = grad_output / (div_h[:, None] * div_w)
        ones = grad_output.new_ones(channels, 1, kh, kw)
        # the canvas covers the padded input: ((out − 1)·s + k) wide, extended by output_padding (< s) if shorter
        pad_h = max(0, height + 2 * ph - ((out_h - 1) * sh + kh))
        pad_w = max(0, width + 2 * pw - ((out_w - 1) * sw + kw))
        canvas = F.conv_transpose2d(scaled, ones, None, (sh, sw), 0, (pad_h, pad_w), channels)
        return canvas[:, :, ph:ph + height, pw:pw + width].contiguous()

    def torch_module(self) -> nn.Module:
        return nn.AvgPool2d(self.kernel_size, self.stride, self.padding, self.ceil_mode, self.count_include_pad)

    def extra_repr(self) -> str:
        return (f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
                f"ceil_mode={self.ceil_mode}, count_include_pad={self.count_include_pad}")


def _adaptive_matrix(size: int, out: int, like: Tensor) -> Tensor:
    """A (out, size) averaging matrix: row i is 1/|w_i| on torch's adaptive window w_i = [⌊i·size/out⌋,
    ⌈(i+1)·size/out⌉)."""
    matrix = torch.zeros(out, size, dtype=like.dtype, device=like.device)
    for i in range(out):
        start, end = (i * size) // out, -((-(i + 1) * size) // out)
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix


class AdaptiveAvgPool2d(Layer):
    """Adaptive average pooling, as ``nn.AdaptiveAvgPool2d`` (any output size; None keeps that input size).

    The windows are separable, so y = A_h · x · A_wᵀ per (n, c) with A the averaging matrices of
    :func:`_adaptive_matrix`, and dx = A_hᵀ · g · A_w. Output (1, 1) (global average) broadcasts g / (H·W).
    """

    def __init__(self, output_size: int | tuple[int | None, int | None] | None) -> None:
        super().__init__()
        sizes = (output_size, output_size) if not isinstance(output_size, (tuple, list)) else tuple(output_size)
        if len(sizes) != 2 or any(s is not None and (isinstance(s, bool) or not isinstance(s, int) or s <= 0)
                                  for s in sizes):
            raise ValueError(f"AdaptiveAvgPool2d: output_size must be a positive int, None or a pair of them, "
                             f"got {output_size!r}")
        self.output_size = sizes

    def forward(self, x: Tensor) -> Tensor:
        _check_4d(self, x)
        if 0 in x.shape[2:]:
            raise ValueError(f"{_describe(self)} expects a non-empty (H, W), got {tuple(x.shape)}")
        out = tuple(x.shape[2 + i] if s is None else s for i, s in enumerate(self.output_size))
        self.saved = (x.shape, out)
        return F.adaptive_avg_pool2d(x, out)

    def backward(self, grad_output: Tensor) -> Tensor:
        shape, (out_h, out_w) = self.saved
        height, width = shape[2], shape[3]
        if (out_h, out_w) == (1, 1):
            return (grad_output / (height * width)).expand(shape).contiguous()
        cache = self.__dict__.setdefault("_matrices", {})
        key = (height, width, out_h, out_w, grad_output.dtype, grad_output.device)
        if key not in cache:
            cache.clear()
            cache[key] = (_adaptive_matrix(height, out_h, grad_output).t().contiguous(),
                          _adaptive_matrix(width, out_w, grad_output))
        rows_t, cols = cache[key]
        return torch.matmul(torch.matmul(rows_t, grad_output), cols)

    def torch_module(self) -> nn.Module:
        return nn.AdaptiveAvgPool2d(self.output_size)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}"


class Flatten(Layer):
    """y = x.flatten(start_dim, end_dim), as ``nn.Flatten``; dx = g reshaped to x's shape."""

    def __init__(self, start_dim: int = 1, end_dim: int = -1) -> None:
        super().__init__()
        self.start_dim, self.end_dim = start_dim, end_dim

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"{_describe(self)} expects a tensor input, got {type(x).__name__}")
        try:
            y = x.flatten(self.start_dim, self.end_dim)
        except (IndexError, RuntimeError) as error:
            raise ValueError(f"{_describe(self)} cannot flatten an input of shape {tuple(x.shape)}: {error}") from None
        self.saved = (x.shape,)
        return y

    def backward(self, grad_output: Tensor) -> Tensor:
        (shape,) = self.saved
        return grad_output.reshape(shape)

    def torch_module(self) -> nn.Module:
        return nn.Flatten(self.start_dim, self.end_dim)

    def extra_repr(self) -> str:
        return f"start_dim={self.start_dim}, end_dim={self.end_dim}"


class BatchNorm2d(Layer):
    """Batch normalisation of an (N, C, H, W) input per channel, as ``nn.BatchNorm2d(C)``.

    Training (or no running statistics): μ, σ² over (N, H, W), biased σ² for normalising; the running mean and
    the running unbiased variance (σ²·m/(m − 1), m = N·H·W) move by ``momentum`` (None: cumulative average),
    ``num_batches_tracked`` += 1. Eval with running statistics normalises by those.

    x̂ = (x − μ)·rstd, rstd = 1/√(σ² + ε);  y = γ x̂ + β
    dγ = Σ g·x̂;  dβ = Σ g  (sums over N, H, W)
    dx = γ·rstd·(g − dβ/m − x̂·dγ/m)  with batch statistics,  γ·rstd·g  with running ones (constants).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features <= 0:
            raise ValueError(f"BatchNorm2d: num_features must be a positive int, got {num_features!r}")
        self.num_features, self.eps, self.momentum, self.affine = num_features, eps, momentum, affine
        self.track_running_stats = track_running_stats
        if affine:
            self._add_param("weight", torch.ones(num_features, device=device, dtype=dtype))
            self._add_param("bias", torch.zeros(num_features, device=device, dtype=dtype))
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, device=device, dtype=dtype))
            self.register_buffer("running_var", torch.ones(num_features, device=device, dtype=dtype))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)

    def _affine(self, x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
        """x·scale + shift per channel, a fresh tensor: ``F.batch_norm`` in eval form with mean 0 and variance 1
        (1/√(1 + 1e-30) is exactly 1) is torch's fastest per-channel affine pass."""
        key = (x.dtype, x.device)
        cache = self.__dict__.get("_unit_stats")
        if cache is None or cache[0] != key:
            cache = self.__dict__["_unit_stats"] = (key, x.new_zeros(self.num_features), x.new_ones(self.num_features))
        return F.batch_norm(x, cache[1], cache[2], scale, shift, False, 0.0, _UNIT_EPS)

    def forward(self, x: Tensor) -> Tensor:
        _check_float_input(self, x, self.weight if self.affine else self.running_mean)
        if x.dim() != 4 or x.shape[1] != self.num_features:
            raise ValueError(f"{_describe(self)} expects input (N, {self.num_features}, H, W), got {tuple(x.shape)}")
        channel = (1, self.num_features, 1, 1)
        batch_stats = self.training or self.running_mean is None
        if not batch_stats:
            rstd = torch.rsqrt(self.running_var + self.eps)
            xhat = self._affine(x, rstd, -self.running_mean * rstd)
        else:
            count = x.numel() // self.num_features
            if count < 2:
                raise ValueError(f"{_describe(self)} needs more than one value per channel in training mode, "
                                 f"got input {tuple(x.shape)}")
            rows = x.reshape(x.shape[0], self.num_features, -1)
            mean = rows.sum(2).sum(0) / count
            centred = self._affine(x, torch.ones_like(mean), -mean)  # two passes: σ² from the centred values
            var = torch.linalg.vector_norm(centred.reshape(-1, rows.shape[2]), dim=1).square_()
            var = var.view(x.shape[0], self.num_features).sum(0) / count
            if self.training and self.running_mean is not None:
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean, factor)
                self.running_var.lerp_(var * (count / (count - 1)), factor)
            rstd = torch.rsqrt(var + self.eps)
            xhat = centred.mul_(rstd.view(channel))
        self.saved = (xhat, rstd, batch_stats)
        return self._affine(xhat, self.weight, self.bias) if self.affine else xhat

    def backward(self, grad_output: Tensor) -> Tensor:
        xhat, rstd, batch_stats = self.saved
        batch = xhat.shape[0]
        if self.affine or batch_stats:
            rows = (batch, self.num_features, -1)
            grad_bias = grad_output.reshape(rows).sum(2).sum(0)
            product = torch.mul(grad_output, xhat, out=self.workspace("product", xhat.shape, xhat))
            grad_weight = product.view(rows).sum(2).sum(0)
            if self.affine:
                self.weight_grad.copy_(grad_weight)
                self.bias_grad.copy_(grad_bias)
        scale = rstd * self.weight if self.affine else rstd  # ∂y/∂x with the statistics held constant
        if not batch_stats:
            return self._affine(grad_output, scale, torch.zeros_like(scale))
        # dx = a·g + b·x̂ + c per channel: a = γ·rstd, b = −a·dγ/m, c = −a·dβ/m
        count = xhat.numel() // self.num_features
        grad_input = self._affine(xhat, scale * grad_weight * (-1.0 / count), scale * grad_bias * (-1.0 / count))
        return grad_input.addcmul_(grad_output, scale.view(1, self.num_features, 1, 1))

    def torch_module(self) -> nn.Module:
        ref = next((t for t in (*self.parameters(), *self.buffers()) if t.is_floating_point()), None)
        factory = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
        return nn.BatchNorm2d(self.num_features, self.eps, self.momentum, self.affine, self.track_running_stats,
                              **factory)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
                f"track_running_stats={self.track_running_stats}")
