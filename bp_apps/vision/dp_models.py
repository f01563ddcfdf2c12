"""Image classifiers built for DP-SGD: engine networks whose every layer has per-example gradients, and their
``torch.nn`` twins.

Differentially private training clips each example's gradient, so a network for it may hold no layer that mixes
examples (BatchNorm) and does best when small: the noise added per step grows with the number of weights
relative to the signal. :class:`EngineDPCNN` is the MNIST CNN of Papernot et al. (2020, "Tempered sigmoid
activations for deep learning with differential privacy") and Tramèr & Boneh (2021): two strided convolutions
with tanh and stride-1 max-pooling, then a 32-unit hidden layer, about 26 k weights. :class:`EngineDPMLP` is a
one-hidden-layer perceptron on the pixels. Each engine network has a twin (:class:`DPCNN`, same parameter
names; :class:`DPMLP`, numbered as the engine MLP's ``layers``) with, built from the same random state, the same
initial weights: the twins are what Opacus trains in the comparisons.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from bp_apps.engine import MLP, Layer, Linear, Sequential, make_activation
from bp_apps.engine.conv import Conv2d, Flatten, MaxPool2d
from bp_apps.engine.models import twin_with_weights
from bp_apps.engine.privacy import GroupNorm
from bp_apps.vision.models import EngineImageMLP, ImageMLP, image_shape

__all__ = ["DPCNN", "DPMLP", "ChannelsLastMaxPool2d", "EngineDPCNN", "EngineDPMLP"]

DP_ACTIVATIONS = ("tanh", "relu")
_TORCH_ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU}


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def dp_cnn_feature_size(input_shape: Sequence[int], channels: Sequence[int] = (16, 32),
                        network: str = "EngineDPCNN") -> int:
    """The flattened feature count after the two conv-pool stages (32·4·4 = 512 for 28×28 MNIST); a ValueError
    naming ``network`` when the images are too small for them."""
    _, height, width = image_shape(input_shape, network)
    sizes = []
    for size in (height, width):
        size = _conv_out(size, 8, 2, 3) - 1  # conv 8×8 stride 2 pad 3, then max-pool 2 stride 1
        size = _conv_out(size, 4, 2, 0) - 1 if size >= 4 else 0  # conv 4×4 stride 2, then max-pool 2 stride 1
        sizes.append(size)
    if min(sizes) <= 0:
        raise ValueError(f"{network} needs images of at least 14×14 pixels, got {tuple(input_shape)}")
    return channels[1] * sizes[0] * sizes[1]


def _check_options(network: str, channels: Sequence[int], hidden: int, activation: str, norm: str | None,
                   norm_groups: int) -> tuple[int, int]:
    if len(channels) != 2 or any(isinstance(c, bool) or not isinstance(c, int) or c <= 0 for c in channels):
        raise ValueError(f"{network}: channels must be two positive ints, got {channels!r}")
    if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden <= 0:
        raise ValueError(f"{network}: hidden must be a positive int, got {hidden!r}")
    if activation not in DP_ACTIVATIONS:
        raise ValueError(f"{network}: activation must be one of {', '.join(DP_ACTIVATIONS)}, got {activation!r}")
    if norm not in (None, "group"):
        raise ValueError(f"{network}: norm must be None or 'group' (BatchNorm mixes examples, which DP-SGD "
                         f"cannot clip), got {norm!r}")
    if norm == "group" and (isinstance(norm_groups, bool) or not isinstance(norm_groups, int) or norm_groups <= 0
                            or any(c % norm_groups for c in channels)):
        raise ValueError(f"{network}: norm_groups ({norm_groups!r}) must be a positive int dividing both channel "
                         f"counts {tuple(channels)}")
    return int(channels[0]), int(channels[1])


def _channels_last(x: Tensor) -> Tensor:
    """Images (B, C, H, W) stored channels-last; anything else as it is (the first layer names what is wrong)."""
    return x.contiguous(memory_format=torch.channels_last) if isinstance(x, Tensor) and x.dim() == 4 else x


class ChannelsLastMaxPool2d(MaxPool2d):
    """The engine's :class:`~bp_apps.engine.conv.MaxPool2d` run by torch's channels-last kernel, its output left
    channels-last: on CPU, for the small overlapping windows of the DP CNN (2×2, stride 1), torch's NCHW
    max-pooling is several times slower than its channels-last one, and it dominated the whole training step.
    Same values, same argmax indices (flat positions in each H×W plane, whatever the memory layout), so the same
    backward and twin."""

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 4 or not x.is_cpu:
            return super().forward(x)
        return super().forward(x.contiguous(memory_format=torch.channels_last))


class EngineDPCNN(Layer):
    """The DP-SGD MNIST CNN of engine layers: conv c₁ 8×8 stride 2 pad 3, act, max-pool 2 stride 1, conv c₂ 4×4
    stride 2, act, max-pool 2 stride 1, flatten, Linear ``hidden``, act, Linear ``num_classes`` (c = 16, 32 and
    tanh by default, the published network). ``norm: group`` adds a :class:`~bp_apps.engine.privacy.GroupNorm`
    of ``norm_groups`` groups after each convolution. Parameters ``features.*`` and ``head.*`` as in
    :class:`DPCNN`; :meth:`to_autograd` gives that twin with copies of these weights.

    The convolutions run on channels-last tensors (oneDNN's own layout on CPU; for one input channel converting
    the images costs nothing): forward, pooling and the input gradient are each several times faster so, and
    the parameters keep the usual layout."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, channels: Sequence[int] = (16, 32),
                 hidden: int = 32, activation: Literal["tanh", "relu"] = "tanh",
                 norm: Literal["group"] | None = None, norm_groups: int = 4) -> None:
        super().__init__()
        c1, c2 = _check_options("EngineDPCNN", channels, hidden, activation, norm, norm_groups)
        in_channels = image_shape(input_shape, "EngineDPCNN")[0]
        self.feature_dim = dp_cnn_feature_size(input_shape, (c1, c2), "EngineDPCNN")
        self.input_shape, self.num_classes = tuple(int(s) for s in input_shape), num_classes
        self.channels, self.hidden, self.activation = (c1, c2), hidden, activation
        self.norm, self.norm_groups = norm, norm_groups

        def stage(c_in: int, c_out: int, kernel: int, padding: int) -> list[Layer]:
            layers: list[Layer] = [Conv2d(c_in, c_out, kernel, stride=2, padding=padding)]
            if norm == "group":
                layers.append(GroupNorm(norm_groups, c_out))
            return [*layers, make_activation(activation), ChannelsLastMaxPool2d(2, stride=1)]

        self.features = Sequential(*stage(in_channels, c1, 8, 3), *stage(c1, c2, 4, 0), Flatten())
        self.features[0].needs_input_grad = False  # nothing trains below the first convolution
        self.head = Sequential(Linear(self.feature_dim, hidden), make_activation(activation),
                               Linear(hidden, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        """Logits of images (B, C, H, W)."""
        return self.head.forward(self.features.forward(_channels_last(x)))

    def backward(self, grad_output: Tensor) -> None:
        """Gradients of the last :meth:`forward` into every ``<parameter>_grad`` (no input gradient)."""
        self.features.backward(self.head.backward(grad_output))

    def to_autograd(self) -> DPCNN:
        """The :class:`DPCNN` twin with copies of these weights, dtype and device."""
        return twin_with_weights(self, lambda: DPCNN(self.input_shape, self.num_classes, self.channels, self.hidden,
                                                     self.activation, self.norm, self.norm_groups))


class DPCNN(nn.Module):
    """:class:`EngineDPCNN` in ``torch.nn`` layers (trained by autograd, or by Opacus): same modules under the same
    names, for one random state the same initial weights, and the same channels-last activations."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, channels: Sequence[int] = (16, 32),
                 hidden: int = 32, activation: Literal["tanh", "relu"] = "tanh",
                 norm: Literal["group"] | None = None, norm_groups: int = 4) -> None:
        super().__init__()
        c1, c2 = _check_options("DPCNN", channels, hidden, activation, norm, norm_groups)
        in_channels = image_shape(input_shape, "DPCNN")[0]
        feature_dim = dp_cnn_feature_size(input_shape, (c1, c2), "DPCNN")
        act = _TORCH_ACTIVATIONS[activation]

        def stage(c_in: int, c_out: int, kernel: int, padding: int) -> list[nn.Module]:
            layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, kernel, stride=2, padding=padding)]
            if norm == "group":
                layers.append(nn.GroupNorm(norm_groups, c_out))
            return [*layers, act(), nn.MaxPool2d(2, stride=1)]

        self.features = nn.Sequential(*stage(in_channels, c1, 8, 3), *stage(c1, c2, 4, 0), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(feature_dim, hidden), act(), nn.Linear(hidden, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(_channels_last(x)))


class EngineDPMLP(EngineImageMLP):
    """A perceptron on flattened pixels for DP-SGD: C·H·W → ``hidden`` (``activation``, optional LayerNorm) →
    ``num_classes``, no dropout and no BatchNorm (784-512-10 tanh by default). :meth:`to_autograd` gives the
    :class:`DPMLP` twin."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, hidden: Sequence[int] = (512,),
                 activation: Literal["tanh", "relu"] = "tanh", norm: Literal["layer"] | None = None) -> None:
        _check_mlp_options(type(self).__name__, activation, norm)
        super().__init__(input_shape, num_classes, hidden, dropout=0.0, norm=norm, activation=activation)

    def to_autograd(self) -> DPMLP:
        """The :class:`DPMLP` with copies of these weights (same dtype and device)."""
        with torch.random.fork_rng(devices=[]):  # building the twin must not move the caller's RNG
            twin = DPMLP(self.input_shape, self.out_features, self.hidden, self.activation, self.norm)
        for index, module in enumerate(MLP.to_autograd(self)):
            twin[index] = module
        return twin.train(self.training)


def _check_mlp_options(network: str, activation: str, norm: str | None) -> None:
    if activation not in DP_ACTIVATIONS:
        raise ValueError(f"{network}: activation must be one of {', '.join(DP_ACTIVATIONS)}, got {activation!r}")
    if norm not in (None, "layer"):
        raise ValueError(f"{network}: norm must be None or 'layer' (BatchNorm mixes examples, which DP-SGD "
                         f"cannot clip), got {norm!r}")


class DPMLP(ImageMLP):
    """:class:`EngineDPMLP`'s twin in ``torch.nn`` layers, numbered as the engine MLP's ``layers``; built from the
    same random state, it has the same initial weights."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, hidden: Sequence[int] = (512,),
                 activation: Literal["tanh", "relu"] = "tanh", norm: Literal["layer"] | None = None) -> None:
        _check_mlp_options(type(self).__name__, activation, norm)
        super().__init__(input_shape, num_classes, hidden, dropout=0.0, norm=norm, activation=activation)
