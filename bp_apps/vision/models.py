"""Image classifiers as plain ``nn.Module``s (no Lightning here). Every class takes ``(input_shape, num_classes)``
first, the sizes the data gives (``ImageClassifier`` passes them; a config names the class and its own settings):

- :class:`SmallCNN`: conv-BN-ReLU stages and an MLP head, either ``torch.nn`` layers or the engine's MLP through
  the autograd bridge (``head: engine_mlp``); :class:`EngineSmallCNN` is the same network built of engine layers,
  trained end to end by the hand-written backward (same parameter names, same initial weights for one seed);
- :class:`ResNet18`: torchvision's ResNet-18, with the small-image stem for inputs under 64 px;
- :class:`EngineImageMLP`: the engine's MLP on flattened pixels, trained by the hand-written backward (its
  ``backend`` is ``"engine"``), and :class:`ImageMLP`, its ``torch.nn`` twin trained by autograd. Built from the
  same random state, the two start from the same weights.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, ResNet, ResNet18_Weights

from bp_apps.engine import MLP, Dropout, Layer, Linear, ReLU, Sequential
from bp_apps.engine.bridge import EngineMLPHead
from bp_apps.engine.conv import BatchNorm2d, Conv2d, Flatten, MaxPool2d
from bp_apps.engine.models import twin_with_weights

__all__ = ["EngineImageMLP", "EngineSmallCNN", "ImageMLP", "ResNet18", "SmallCNN", "image_shape"]


def image_shape(input_shape: Sequence[int], network: str) -> tuple[int, int, int]:
    """``input_shape`` as (channels, height, width); a ValueError naming ``network`` otherwise."""
    shape = tuple(int(size) for size in input_shape)
    if len(shape) != 3 or min(shape) <= 0:
        raise ValueError(f"{network}: input_shape must be (channels, height, width), got {tuple(input_shape)}")
    return shape  # type: ignore[return-value]


def _conv_block(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


def _torch_mlp(in_features: int, hidden: Sequence[int], out_features: int, dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_features, width), nn.ReLU(inplace=True), nn.Dropout(dropout)]
        in_features = width
    return nn.Sequential(*layers, nn.Linear(in_features, out_features))


class SmallCNN(nn.Module):
    """Two stages of two 3×3 conv-BN-ReLU blocks, each ending in 2×2 max-pooling, then dropout and an MLP head with
    ``hidden`` widths: about 0.2 M conv weights, sized for MNIST-like images on a CPU.

    ``head``: ``torch`` (``nn.Linear`` layers, ReLU and ``dropout`` after each hidden one) or ``engine_mlp`` (the
    engine's hand-written MLP through the autograd bridge, trained together with the convolutions by a torch
    optimizer; ``norm`` — ``layer`` or ``batch`` — normalises its hidden layers).
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, width: int = 32, hidden: Sequence[int] = (128,),
                 dropout: float = 0.25, head: Literal["torch", "engine_mlp"] = "torch",
                 norm: Literal["layer", "batch"] | None = None) -> None:
        super().__init__()
        channels, height, width_px = image_shape(input_shape, "SmallCNN")
        if head not in ("torch", "engine_mlp"):
            raise ValueError(f"SmallCNN: head must be 'torch' or 'engine_mlp', got {head!r}")
        if norm is not None and head != "engine_mlp":
            raise ValueError(f"SmallCNN: norm normalises the engine MLP head (head='engine_mlp'), not head={head!r}")
        if width < 1:
            raise ValueError(f"SmallCNN: width must be at least 1, got {width}")
        self.features = nn.Sequential(
            *_conv_block(channels, width), *_conv_block(width, width), nn.MaxPool2d(2),
            *_conv_block(width, 2 * width), *_conv_block(2 * width, 2 * width), nn.MaxPool2d(2),
            nn.Flatten(), nn.Dropout(dropout),
        )
        self.feature_dim = 2 * width * (height // 4) * (width_px // 4)
        if self.feature_dim == 0:
            raise ValueError(f"SmallCNN needs images of at least 4×4 pixels, got {tuple(input_shape)}")
        if head == "engine_mlp":
            self.head: nn.Module = EngineMLPHead(self.feature_dim, list(hidden), num_classes, dropout=dropout,
                                                 norm=norm)
        else:
            self.head = _torch_mlp(self.feature_dim, hidden, num_classes, dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def _engine_conv_block(c_in: int, c_out: int) -> list[Layer]:
    return [Conv2d(c_in, c_out, 3, padding=1, bias=False), BatchNorm2d(c_out), ReLU(inplace=True)]


def _engine_mlp(in_features: int, hidden: Sequence[int], out_features: int, dropout: float) -> list[Layer]:
    layers: list[Layer] = []
    for width in hidden:
        layers += [Linear(in_features, width), ReLU(inplace=True), Dropout(dropout)]
        in_features = width
    return [*layers, Linear(in_features, out_features)]


class EngineSmallCNN(Layer):
    """:class:`SmallCNN` (``head: torch``) built of engine layers and trained by their hand-written backward: the
    same modules under the same names (``features.0.weight`` ... ``head.3.bias``), so a state dict loads into
    either, and for one random state the same initial weights and the same dropout masks. :meth:`to_autograd`
    gives the ``SmallCNN`` twin with copies of these weights."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, width: int = 32, hidden: Sequence[int] = (128,),
                 dropout: float = 0.25) -> None:
        super().__init__()
        channels, height, width_px = image_shape(input_shape, "EngineSmallCNN")
        if width < 1:
            raise ValueError(f"EngineSmallCNN: width must be at least 1, got {width}")
        self.input_shape, self.num_classes = (channels, height, width_px), num_classes
        self.width, self.hidden, self.dropout = width, list(hidden), dropout
        self.feature_dim = 2 * width * (height // 4) * (width_px // 4)
        if self.feature_dim == 0:
            raise ValueError(f"EngineSmallCNN needs images of at least 4×4 pixels, got {tuple(input_shape)}")
        self.features = Sequential(
            *_engine_conv_block(channels, width), *_engine_conv_block(width, width), MaxPool2d(2),
            *_engine_conv_block(width, 2 * width), *_engine_conv_block(2 * width, 2 * width), MaxPool2d(2),
            Flatten(), Dropout(dropout),
        )
        self.features[0].needs_input_grad = False  # nothing trains below the first convolution
        self.head = Sequential(*_engine_mlp(self.feature_dim, hidden, num_classes, dropout))

    def forward(self, x: Tensor) -> Tensor:
        """Logits of images (B, C, H, W)."""
        return self.head.forward(self.features.forward(x))

    def backward(self, grad_output: Tensor) -> None:
        """Gradients of the last :meth:`forward` into every ``<parameter>_grad`` (no input gradient)."""
        self.features.backward(self.head.backward(grad_output))

    def to_autograd(self) -> SmallCNN:
        """The :class:`SmallCNN` twin (``head: torch``) with copies of these weights, dtype and device."""
        return twin_with_weights(self, lambda: SmallCNN(self.input_shape, self.num_classes, self.width, self.hidden,
                                                        self.dropout))


class ResNet18(ResNet):
    """torchvision's ResNet-18 for ``num_classes`` classes. Random weights by default; ``pretrained`` names
    torchvision weights (e.g. ``IMAGENET1K_V1``, downloaded once and hash-checked, for online users) and the last
    layer is replaced.

    ``small_stem``: a 3×3 stride-1 first convolution without max-pooling (the usual CIFAR adaptation); None
    chooses it for random weights and images under 64 px. Inputs of other than 3 channels get a first convolution
    of that many channels (with pretrained weights: the RGB filters averaged).
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, pretrained: str | None = None,
                 small_stem: bool | None = None) -> None:
        channels = image_shape(input_shape, "ResNet18")[0]
        weights = None
        if pretrained:
            try:
                weights = ResNet18_Weights[pretrained]
            except KeyError:
                names = ", ".join(w.name for w in ResNet18_Weights)
                raise ValueError(f"ResNet18: unknown pretrained weights {pretrained!r}; choose one of "
                                 f"{names}") from None
        super().__init__(BasicBlock, [2, 2, 2, 2], num_classes=num_classes if weights is None else 1000)
        if weights is not None:
            self.load_state_dict(weights.get_state_dict(progress=True, check_hash=True))
            self.fc = nn.Linear(self.fc.in_features, num_classes)
        self.small_stem = self.uses_small_stem(input_shape, pretrained, small_stem)
        if self.small_stem:
            self.conv1 = nn.Conv2d(channels, 64, 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        elif channels != 3:
            stem = nn.Conv2d(channels, 64, 7, 2, 3, bias=False)
            if weights is not None:  # average the RGB filters into the requested channel count
                stem.weight.data.copy_(self.conv1.weight.detach().mean(1, keepdim=True).repeat(1, channels, 1, 1))
            self.conv1 = stem

    @staticmethod
    def uses_small_stem(input_shape: Sequence[int], pretrained: str | None, small_stem: bool | None) -> bool:
        """Whether the network for these arguments has the small-image stem (see the class)."""
        return bool(small_stem) if small_stem is not None else (not pretrained and int(input_shape[1]) < 64)

    @classmethod
    def offline_args(cls, init_args: dict[str, Any], input_shape: Sequence[int]) -> dict[str, Any]:
        """``init_args`` of a saved network rebuilt without downloading (the weights come from the checkpoint):
        ``pretrained`` dropped, the stem it had pinned."""
        stem = cls.uses_small_stem(input_shape, init_args.get("pretrained"), init_args.get("small_stem"))
        return {**init_args, "pretrained": None, "small_stem": stem}


class EngineImageMLP(MLP):
    """The engine's MLP on flattened pixels: ``C·H·W`` inputs → ``hidden`` (activation, optional ``norm`` and
    ``dropout`` after each) → ``num_classes``. Trained by its hand-written backward, never by autograd
    (``backend = "engine"``, as for every engine layer); :meth:`to_autograd` gives the :class:`ImageMLP` twin."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, hidden: Sequence[int] = (128,),
                 dropout: float = 0.25, norm: Literal["layer", "batch"] | None = None,
                 activation: str = "relu") -> None:
        shape = image_shape(input_shape, type(self).__name__)
        super().__init__(math.prod(shape), hidden, num_classes, activation=activation, dropout=dropout, norm=norm)
        self.input_shape = shape
        self._batch_shape: torch.Size | None = None

    def forward(self, x: Tensor) -> Tensor:
        """Logits of images (B, C, H, W) (or already flattened (B, C·H·W))."""
        self._batch_shape = x.shape
        return super().forward(x.flatten(1))

    def backward(self, grad_output: Tensor) -> Tensor | None:
        """Gradients of the last :meth:`forward`; dL/dx (with ``input_grad``) in the shape of its input."""
        grad = super().backward(grad_output)
        return grad if grad is None or self._batch_shape is None else grad.reshape(self._batch_shape)

    def to_autograd(self) -> ImageMLP:
        """The :class:`ImageMLP` with copies of these weights (same dtype and device)."""
        with torch.random.fork_rng(devices=[]):  # building the twin must not move the caller's RNG
            twin = ImageMLP(self.input_shape, self.out_features, self.hidden, self.dropout, self.norm, self.activation)
        for index, module in enumerate(MLP.to_autograd(self)):
            twin[index] = module
        twin.train(self.training)
        return twin


class ImageMLP(nn.Sequential):
    """:class:`EngineImageMLP`'s twin in ``torch.nn`` layers (trained by autograd): built from the same random
    state, it has the same initial weights, so the two backends can be compared step by step. Its modules are
    numbered as the engine MLP's ``layers``."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, hidden: Sequence[int] = (128,),
                 dropout: float = 0.25, norm: Literal["layer", "batch"] | None = None,
                 activation: str = "relu") -> None:
        engine = EngineImageMLP(input_shape, num_classes, hidden, dropout, norm, activation)
        super().__init__(*MLP.to_autograd(engine))
        self.input_shape = engine.input_shape

    def forward(self, x: Tensor) -> Tensor:
        """Logits of images (B, C, H, W) (or already flattened (B, C·H·W))."""
        return super().forward(x.flatten(1))
