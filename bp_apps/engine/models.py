"""A multi-layer perceptron built from hand-written layers, and its autograd twin."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from bp_apps.engine.layers import GELU, BatchNorm1d, Dropout, Layer, LayerNorm, LeakyReLU, Linear, ReLU, Sigmoid, Tanh

ACTIVATIONS = ("relu", "leaky_relu", "tanh", "sigmoid", "gelu", "gelu_tanh")
NORMS = (None, "layer", "batch")


class NonFiniteError(FloatingPointError):
    """A loss or gradient became NaN or infinite; the message names the step and the layer."""


def make_activation(name: str, inplace: bool = False) -> Layer:
    """The engine layer for an activation name (see ``ACTIVATIONS``)."""
    if name == "relu":
        return ReLU(inplace=inplace)
    if name == "leaky_relu":
        return LeakyReLU()
    if name == "tanh":
        return Tanh()
    if name == "sigmoid":
        return Sigmoid()
    if name in ("gelu", "gelu_tanh"):
        return GELU("tanh" if name == "gelu_tanh" else "none")
    raise ValueError(f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}")


class MLP(Layer):
    """Linear → [norm] → activation → [dropout], repeated per hidden width, then a last Linear.

    For the same ``torch.manual_seed`` its weights equal those of ``to_autograd()``'s
    ``nn.Sequential`` built from scratch, because every Linear draws from the RNG in the same
    order as ``nn.Linear``. Inputs of shape (..., in_features) are accepted; leading
    dimensions are flattened for the matrix products and restored on the way out.

    ``reuse_buffers=True`` keeps training-mode activations and gradients in buffers reused
    every step (no fresh allocation, no page faults): the fast path for a training loop that
    consumes each output before the next forward. Keep it off when outputs of two forward
    calls must live at once (as in the autograd bridge).
    """

    def __init__(self, in_features: int, hidden: Sequence[int], out_features: int, activation: str = "relu",
                 dropout: float = 0.0, norm: str | None = None, bias: bool = True, input_grad: bool = False,
                 reuse_buffers: bool = False, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}; choose one of None, 'layer', 'batch'")
        if in_features <= 0 or out_features <= 0 or any(h <= 0 for h in hidden):
            raise ValueError(f"layer widths must be positive, got {in_features}, {list(hidden)}, {out_features}")
        self.in_features, self.out_features = in_features, out_features
        self.hidden, self.activation, self.dropout, self.norm = list(hidden), activation, dropout, norm
        factory = {"device": device, "dtype": dtype}
        layers: list[Layer] = []
        width = in_features
        for h in hidden:
            layers.append(Linear(width, h, bias=bias, **factory))
            if norm == "layer":
                layers.append(LayerNorm(h, **factory))
            elif norm == "batch":
                layers.append(BatchNorm1d(h, **factory))
            layers.append(make_activation(activation, inplace=True))
            if dropout > 0:
                layers.append(Dropout(dropout))
            width = h
        layers.append(Linear(width, out_features, bias=bias, **factory))
        self.layers = nn.ModuleList(layers)
        self._sequence: tuple[Layer, ...] = tuple(layers)
        self._reversed: tuple[Layer, ...] = tuple(reversed(layers))
        self.input_grad = input_grad
        self.reuse_buffers = reuse_buffers

    @property
    def reuse_buffers(self) -> bool:
        """Whether Linear layers write training outputs and input gradients into reused buffers."""
        return self._sequence[0].reuse_buffers

    @reuse_buffers.setter
    def reuse_buffers(self, value: bool) -> None:
        for layer in self._sequence:
            if isinstance(layer, Linear):
                layer.reuse_buffers = value

    @property
    def input_grad(self) -> bool:
        """Whether ``backward`` returns dL/dx (needed when something trains below the MLP)."""
        return self._sequence[0].needs_input_grad

    @input_grad.setter
    def input_grad(self, value: bool) -> None:
        self._sequence[0].needs_input_grad = value

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"MLP expects inputs with {self.in_features} features in the last dimension, "
                             f"got shape {tuple(x.shape)}")
        weight = self._sequence[0].weight
        if x.dtype != weight.dtype or x.device != weight.device:
            raise TypeError(f"MLP input is {x.dtype} on {x.device} but its weights are {weight.dtype} on "
                            f"{weight.device}; convert one of them")
        lead = x.shape[:-1]
        h = x.reshape(-1, self.in_features) if x.dim() != 2 else x
        for layer in self._sequence:
            h = layer.forward(h)
        return h.reshape(*lead, self.out_features) if x.dim() != 2 else h

    def backward(self, grad_output: Tensor) -> Tensor | None:
        lead = grad_output.shape[:-1]
        g = grad_output.reshape(-1, self.out_features) if grad_output.dim() != 2 else grad_output
        for layer in self._reversed:
            g = layer.backward(g)
        if g is None or grad_output.dim() == 2:
            return g
        return g.reshape(*lead, self.in_features)

    def saved_state(self) -> list[tuple]:
        """What every layer kept for backward (the bridge stores it between forward and backward)."""
        return [layer.saved for layer in self._sequence]

    def restore_state(self, saved: list[tuple]) -> None:
        for layer, state in zip(self._sequence, saved, strict=True):
            layer.saved = state

    def locate_nonfinite_forward(self, x: Tensor) -> str:
        """Say where a forward pass first produces NaN/Inf: the input itself or a named layer.

        Runs on a copy with the RNG state preserved, so the model (and its BatchNorm running
        statistics) stays exactly as it was; meant for error messages, not the hot path.
        """
        if not bool(torch.isfinite(x).all()):
            return "the input batch (it already holds NaN or Inf)"
        probe = copy.deepcopy(self)
        probe.reuse_buffers = False
        with torch.no_grad(), torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            h = x.reshape(-1, self.in_features)
            for i, layer in enumerate(probe._sequence):
                h = layer.forward(h)
                if not bool(torch.isfinite(h).all()):
                    bad = [name for name, p, _ in layer.param_grads() if not bool(torch.isfinite(p).all())]
                    detail = f"; its {', '.join(bad)} holds NaN or Inf" if bad else ""
                    return f"the output of layers.{i} ({type(layer).__name__}){detail}"
        return "the loss (every layer's output is finite: check the targets)"

    def to_autograd(self) -> nn.Sequential:
        """The same network as ``torch.nn`` modules with copies of these weights (for autograd)."""
        with torch.random.fork_rng(devices=[]):  # nn.Linear's own init must not move the caller's RNG
            modules = [_torch_twin(layer) for layer in self._sequence]
        twin = nn.Sequential(*modules)
        twin.train(self.training)
        return twin


class Sequential(Layer):
    """Engine layers applied in order and back-propagated in reverse. Children are named ``0``, ``1``, ... as in
    ``nn.Sequential``, so a state dict loads into :meth:`to_autograd`'s twin and back. Backward stops early when a
    layer returns no input gradient (a first layer with ``needs_input_grad = False``)."""

    def __init__(self, *layers: Layer) -> None:
        super().__init__()
        for index, layer in enumerate(layers):
            if not isinstance(layer, Layer):
                raise TypeError(f"Sequential takes engine layers; item {index} is {type(layer).__name__}")
            self.add_module(str(index), layer)
        self._sequence: tuple[Layer, ...] = tuple(layers)
        self._reversed: tuple[Layer, ...] = tuple(reversed(layers))

    def __len__(self) -> int:
        return len(self._sequence)

    def __getitem__(self, index: int) -> Layer:
        return self._sequence[index]

    def forward(self, x: Tensor) -> Tensor:
        for layer in self._sequence:
            x = layer.forward(x)
        return x

    def backward(self, grad_output: Tensor) -> Tensor | None:
        grad: Tensor | None = grad_output
        for layer in self._reversed:
            grad = layer.backward(grad)
            if grad is None:
                break
        return grad

    def torch_module(self) -> nn.Sequential:
        return nn.Sequential(*(_torch_twin(layer) for layer in self._sequence))

    def to_autograd(self) -> nn.Sequential:
        """The ``torch.nn`` twin with copies of these weights, built without moving the caller's RNG."""
        with torch.random.fork_rng(devices=[]):
            twin = self.torch_module()
        return twin.train(self.training)


def twin_with_weights(engine: Layer, build: Callable[[], nn.Module]) -> nn.Module:
    """``build()`` (an autograd network with the engine network's parameter names) made without moving the caller's
    RNG, in the engine's dtype and device, with the engine's weights and buffers loaded and its train/eval mode."""
    with torch.random.fork_rng(devices=[]):
        twin = build()
    parameter = next(engine.parameters())
    twin = twin.to(device=parameter.device, dtype=parameter.dtype)
    twin.load_state_dict(engine.state_dict())
    return twin.train(engine.training)


def _torch_twin(layer: Layer) -> nn.Module:
    """One engine layer as the equivalent ``torch.nn`` module (created directly in the layer's
    dtype and device, so copying the weights rounds nothing), weights copied."""
    tensor = next((t for t in (*layer.parameters(), *layer.buffers()) if t.is_floating_point()), None)
    factory = {} if tensor is None else {"device": tensor.device, "dtype": tensor.dtype}
    if isinstance(layer, Linear):
        module: nn.Module = nn.Linear(layer.in_features, layer.out_features, bias=layer.has_bias, **factory)
    elif isinstance(layer, ReLU):
        return nn.ReLU()
    elif isinstance(layer, LeakyReLU):
        return nn.LeakyReLU(layer.negative_slope)
    elif isinstance(layer, Tanh):
        return nn.Tanh()
    elif isinstance(layer, Sigmoid):
        return nn.Sigmoid()
    elif isinstance(layer, GELU):
        return nn.GELU(approximate=layer.approximate)
    elif isinstance(layer, Dropout):
        return nn.Dropout(layer.p)
    elif isinstance(layer, LayerNorm):
        module = nn.LayerNorm(layer.normalized_shape, eps=layer.eps, elementwise_affine=layer.affine, **factory)
    elif isinstance(layer, BatchNorm1d):
        module = nn.BatchNorm1d(layer.num_features, eps=layer.eps, momentum=layer.momentum, affine=layer.affine,
                                **factory)
    else:  # the layers of the other engine modules name their own twin
        module = layer.torch_module().to(**factory)
    module.load_state_dict(layer.state_dict())
    return module
