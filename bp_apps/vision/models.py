"""Image classifiers as plain ``nn.Module``s (no Lightning here): the engine's MLP with either
backend, a small CNN, torchvision's ResNet-18, and a CNN whose classifier head is the engine
MLP through the autograd bridge."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from bp_apps.engine import MLP
from bp_apps.engine.bridge import EngineMLPHead

MODELS = ("mlp", "cnn", "cnn_engine_head", "resnet18")
BACKENDS = ("engine", "autograd")


def _conv_block(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class SmallCNN(nn.Module):
    """Two stages of two 3×3 conv-BN-ReLU blocks, each ending in 2×2 max-pooling, then an MLP
    classifier: about 0.2 M conv weights, sized for MNIST-like images on a CPU."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, width: int = 32, hidden: Sequence[int] = (128,),
                 dropout: float = 0.25, head: nn.Module | None = None) -> None:
        super().__init__()
        channels, height, width_px = input_shape
        self.features = nn.Sequential(
            *_conv_block(channels, width), *_conv_block(width, width), nn.MaxPool2d(2),
            *_conv_block(width, 2 * width), *_conv_block(2 * width, 2 * width), nn.MaxPool2d(2),
            nn.Flatten(), nn.Dropout(dropout),
        )
        self.feature_dim = 2 * width * (height // 4) * (width_px // 4)
        if self.feature_dim == 0:
            raise ValueError(f"SmallCNN needs images of at least 4×4 pixels, got {tuple(input_shape)}")
        self.head = head if head is not None else _torch_mlp(self.feature_dim, hidden, num_classes, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _torch_mlp(in_features: int, hidden: Sequence[int], out_features: int, dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_features, width), nn.ReLU(inplace=True), nn.Dropout(dropout)]
        in_features = width
    return nn.Sequential(*layers, nn.Linear(in_features, out_features))


def resnet18(input_shape: Sequence[int], num_classes: int, pretrained: str | None = None) -> nn.Module:
    """torchvision's ResNet-18. Random weights by default; ``pretrained`` names torchvision weights
    (e.g. ``IMAGENET1K_V1``, downloaded once for online users) and the last layer is replaced.
    For small random-weight inputs (< 64 px) the stem becomes a 3×3 stride-1 conv without
    max-pooling, the usual CIFAR adaptation; one-channel inputs get a one-channel stem."""
    from torchvision.models import ResNet18_Weights
    from torchvision.models import resnet18 as tv_resnet18

    channels, height, _ = input_shape
    if pretrained:
        model = tv_resnet18(weights=ResNet18_Weights[pretrained])
        model.fc = nn.Linear(model.fc.in_features, num_classes)
        if channels != 3:  # average the RGB filters into the requested channel count
            weight = model.conv1.weight.detach().mean(1, keepdim=True).repeat(1, channels, 1, 1)
            model.conv1 = nn.Conv2d(channels, 64, 7, 2, 3, bias=False)
            model.conv1.weight.data.copy_(weight)
        return model
    model = tv_resnet18(weights=None, num_classes=num_classes)
    if height < 64:
        model.conv1 = nn.Conv2d(channels, 64, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    elif channels != 3:
        model.conv1 = nn.Conv2d(channels, 64, 7, 2, 3, bias=False)
    return model


def build_engine_mlp(in_features: int, hidden: Sequence[int], num_classes: int, activation: str, dropout: float,
                     norm: str | None, seed: int) -> MLP:
    """An engine MLP whose weights depend on ``seed`` alone; the caller's RNG is left untouched (the
    MLP is built on the CPU, so only the CPU generator is seeded)."""
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        return MLP(in_features, hidden, num_classes, activation=activation, dropout=dropout, norm=norm)


def build_model(name: str, input_shape: Sequence[int], num_classes: int, *, hidden: Sequence[int] = (128,),
                dropout: float = 0.25, backend: str = "autograd", norm: str | None = None, width: int = 32,
                pretrained: str | None = None, seed: int = 0) -> nn.Module:
    """The network for ``name`` (see ``MODELS``). Weights depend on ``seed`` only; for ``mlp`` the
    engine backend gets the engine MLP and the autograd backend its twin with the same weights.
    ``norm`` (``layer`` or ``batch``) goes into the engine MLP of ``mlp`` and ``cnn_engine_head``."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if len(input_shape) != 3 or min(input_shape) <= 0:
        raise ValueError(f"input_shape must be (channels, height, width), got {tuple(input_shape)}")
    if name == "mlp":
        engine = build_engine_mlp(math.prod(input_shape), hidden, num_classes, "relu", dropout, norm, seed)
        return engine if backend == "engine" else engine.to_autograd()
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        if name == "resnet18":
            return resnet18(input_shape, num_classes, pretrained)
        cnn = SmallCNN(input_shape, num_classes, width=width, hidden=hidden, dropout=dropout)
        if name == "cnn_engine_head":
            cnn.head = EngineMLPHead(cnn.feature_dim, list(hidden), num_classes, dropout=dropout, norm=norm)
        return cnn
