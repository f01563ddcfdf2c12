"""What the engine's gradient-check tests share: tolerances, seeded inputs, randomised layers, error assertions."""

from __future__ import annotations

import torch
from hypothesis import settings
from torch import Tensor

from bp_apps.engine.layers import Layer

F64 = torch.float64
AUTOGRAD_TOL = 1e-10  # float64, engine vs torch.autograd: max relative error
FD_TOL = 1e-6  # float64, engine vs central finite differences
PROPERTY = settings(max_examples=20, deadline=None)


def randn(*shape: int, seed: int = 0, scale: float = 1.0, dtype: torch.dtype = F64) -> Tensor:
    """A standard-normal tensor (float64 unless asked) from a private generator."""
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64) * scale).to(dtype)


def randomized(layer: Layer, seed: int = 1) -> Layer:
    """Give a layer's parameters (and a batch norm's running statistics) non-trivial float64 values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param, _ in layer.param_grads():
            param.copy_(torch.randn(param.shape, generator=gen, dtype=F64))
        if getattr(layer, "running_mean", None) is not None:
            layer.running_mean.copy_(torch.randn(layer.num_features, generator=gen, dtype=F64))
            layer.running_var.copy_(torch.rand(layer.num_features, generator=gen, dtype=F64) + 0.5)
    return layer


def assert_all_below(errors: dict[str, float], tol: float, expected_keys: set[str] | None = None) -> None:
    """Every error is ≤ tol (NaN fails), and the checked tensors are exactly the expected ones."""
    if expected_keys is not None:
        assert set(errors) == expected_keys
    bad = {k: v for k, v in errors.items() if not v <= tol}
    assert not bad, f"errors above {tol}: {bad}"
