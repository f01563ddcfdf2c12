"""Clear errors from the engine: shapes, dtypes, labels, bad options, and non-finite training steps."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import Tensor

from bp_apps.engine import (
    GELU,
    MLP,
    SGD,
    Adam,
    BatchNorm1d,
    BCEWithLogitsLoss,
    Dropout,
    MSELoss,
    NonFiniteError,
    SoftmaxCrossEntropy,
    make_activation,
    train_step,
)

F64 = torch.float64


def small_mlp(dtype: torch.dtype = torch.float32, **kwargs: object) -> MLP:
    """A seeded 4 → 5 → 3 MLP."""
    torch.manual_seed(0)
    return MLP(4, kwargs.pop("hidden", [5]), 3, dtype=dtype, **kwargs)


def batch(dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Six random inputs with class labels in [0, 3)."""
    gen = torch.Generator().manual_seed(1)
    return torch.randn(6, 4, generator=gen, dtype=dtype), torch.randint(0, 3, (6,), generator=gen)


def snapshot(mlp: MLP) -> dict[str, Tensor]:
    """A copy of every parameter and buffer."""
    return {name: t.clone() for name, t in mlp.state_dict().items()}


def assert_unchanged(mlp: MLP, before: dict[str, Tensor]) -> None:
    """Every parameter and buffer equals its snapshot (inf equals inf)."""
    for name, value in mlp.state_dict().items():
        assert torch.equal(value, before[name]), f"{name} changed"


# --------------------------------------------------------------------------- shapes

def test_mlp_rejects_the_wrong_feature_count() -> None:
    with pytest.raises(ValueError, match=re.escape("4 features in the last dimension, got shape (6, 5)")):
        small_mlp().forward(torch.randn(6, 5))
    with pytest.raises(ValueError, match=re.escape("got shape (2, 3, 7)")):
        small_mlp().forward(torch.randn(2, 3, 7))


def test_mse_and_bce_reject_shape_mismatches() -> None:
    with pytest.raises(ValueError, match=re.escape("MSELoss: prediction shape (3, 2) and target shape (3, 1) differ")):
        MSELoss().forward(torch.zeros(3, 2), torch.zeros(3, 1))
    with pytest.raises(ValueError, match=re.escape("prediction shape (3, 2) and target shape (6,) differ")):
        MSELoss().forward(torch.zeros(3, 2), torch.zeros(6))  # same count, still an error (no broadcasting)
    with pytest.raises(ValueError, match="BCEWithLogitsLoss"):
        BCEWithLogitsLoss().forward(torch.zeros(4), torch.zeros(4, 1))


def test_cross_entropy_rejects_shape_mismatches() -> None:
    loss = SoftmaxCrossEntropy()
    with pytest.raises(ValueError, match=re.escape("logits (4, 3) and targets (5,)")):
        loss.forward(torch.zeros(4, 3), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="logits"):
        loss.forward(torch.zeros(3), torch.zeros((), dtype=torch.long))
    with pytest.raises(ValueError, match="empty batch"):
        loss.forward(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))


def test_batch_norm_rejects_bad_inputs() -> None:
    bn = BatchNorm1d(3)
    with pytest.raises(ValueError, match=re.escape("expects input (N, 3), got (4, 2)")):
        bn.forward(torch.zeros(4, 2))
    with pytest.raises(ValueError, match=re.escape("got (2, 3, 5)")):
        bn.forward(torch.zeros(2, 3, 5))
    with pytest.raises(ValueError, match="more than one sample"):
        bn.forward(torch.zeros(1, 3))
    assert int(bn.num_batches_tracked) == 0
    assert bn.eval().forward(torch.ones(1, 3)).shape == (1, 3), "one sample is fine in eval mode"


# --------------------------------------------------------------------------- dtypes

def test_mlp_rejects_an_input_of_another_dtype() -> None:
    with pytest.raises(TypeError, match=r"MLP input is torch\.float64 .* weights are torch\.float32"):
        small_mlp().forward(torch.randn(6, 4, dtype=F64))
    with pytest.raises(TypeError, match=r"float32 .* weights are torch\.float64"):
        small_mlp(F64).forward(torch.randn(6, 4))


def test_cross_entropy_rejects_float_targets() -> None:
    with pytest.raises(TypeError, match=re.escape("targets must be integer class indices, got torch.float32")):
        SoftmaxCrossEntropy().forward(torch.randn(4, 3), torch.tensor([0.0, 1.0, 2.0, 1.0]))


def test_mse_and_bce_reject_integer_targets() -> None:
    with pytest.raises(TypeError, match=re.escape("MSELoss: target must be a floating-point tensor, got torch.int64")):
        MSELoss().forward(torch.zeros(3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match="BCEWithLogitsLoss"):
        BCEWithLogitsLoss().forward(torch.zeros(3), torch.zeros(3, dtype=torch.long))


# --------------------------------------------------------------------------- labels

@pytest.mark.parametrize(("labels", "bad"), [([0, 3, 1], 3), ([0, 9, 1, 2], 9), ([-1, 0, 2], -1),
                                             ([2, -7, 1], -7), ([-100, 0, 5], 5)])
def test_label_out_of_range_is_named(labels: list[int], bad: int) -> None:
    logits = torch.randn(len(labels), 3)
    with pytest.raises(ValueError, match=re.escape(f"label {bad} is outside [0, 3)")):
        SoftmaxCrossEntropy().forward(logits, torch.tensor(labels))


@pytest.mark.parametrize("labels", [[-100, -5, 0], [1, -100, -2]])
def test_negative_label_next_to_the_ignore_index_is_named(labels: list[int]) -> None:
    bad = next(v for v in labels if v not in (-100, 0, 1))
    with pytest.raises(ValueError, match=re.escape(f"label {bad} is outside [0, 3)")):
        SoftmaxCrossEntropy().forward(torch.randn(3, 3), torch.tensor(labels))


def test_labels_equal_to_ignore_index_are_not_errors() -> None:
    assert torch.isfinite(SoftmaxCrossEntropy(ignore_index=7).forward(torch.randn(3, 3), torch.tensor([7, 0, 2])))
    assert torch.isfinite(SoftmaxCrossEntropy().forward(torch.randn(3, 3), torch.tensor([-100, 0, 2])))


# --------------------------------------------------------------------------- bad options

def test_bad_layer_and_loss_options() -> None:
    with pytest.raises(ValueError, match="GELU approximate must be 'none' or 'tanh', got 'erf'"):
        GELU("erf")
    with pytest.raises(ValueError, match=r"dropout probability must be in \[0, 1\], got 1.5"):
        Dropout(1.5)
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        SoftmaxCrossEntropy(label_smoothing=1.5)
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        make_activation("swish")
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        MLP(4, [5], 3, activation="swish")
    with pytest.raises(ValueError, match="unknown norm 'group'"):
        MLP(4, [5], 3, norm="group")
    with pytest.raises(ValueError, match="layer widths must be positive"):
        MLP(4, [5, 0], 3)


# --------------------------------------------------------------------------- non-finite steps

def nan_input() -> tuple[MLP, Tensor, Tensor]:
    """An MLP and a batch whose third input has a NaN feature."""
    x, y = batch()
    x[2, 1] = float("nan")
    return small_mlp(), x, y


def inf_weight() -> tuple[MLP, Tensor, Tensor]:
    """An MLP whose first weight matrix holds an infinity, and a clean batch."""
    mlp = small_mlp()
    with torch.no_grad():
        mlp.layers[0].weight[1, 2] = float("inf")
    return mlp, *batch()


@pytest.mark.parametrize("make, where", [(nan_input, r"the input batch"),
                                         (inf_weight, r"layers\.0 \(Linear\).*weight")],
                         ids=["nan_input", "inf_weight"])
def test_nonfinite_raise_names_the_step_and_where(make, where) -> None:
    mlp, x, y = make()
    with pytest.raises(NonFiniteError) as info:
        train_step(mlp, SoftmaxCrossEntropy(), SGD(mlp.parameters(), lr=0.1), x, y, step=7)
    message = str(info.value)
    assert "step 7" in message
    assert re.search(where, message), f"expected {where!r} in: {message}"


@pytest.mark.parametrize("make", [nan_input, inf_weight], ids=["nan_input", "inf_weight"])
def test_nonfinite_raise_leaves_the_weights_alone(make) -> None:
    mlp, x, y = make()
    before = snapshot(mlp)
    with pytest.raises(NonFiniteError, match="step 7"):
        train_step(mlp, SoftmaxCrossEntropy(), SGD(mlp.parameters(), lr=0.1), x, y, step=7)
    assert_unchanged(mlp, before)


def test_nonfinite_gradient_with_finite_loss_names_the_layer() -> None:
    # 1e21 inputs through a 1e-3 weight: the loss (~1e36) is finite in float32, dL/dW (~1e39) is not.
    torch.manual_seed(0)
    mlp = MLP(1, [1], 1, activation="relu", bias=False)
    with torch.no_grad():
        mlp.layers[0].weight.fill_(1.0)
        mlp.layers[2].weight.fill_(1e-3)
    x, y = torch.full((2, 1), 1e21), torch.zeros(2, 1)
    before = snapshot(mlp)
    with pytest.raises(NonFiniteError, match=r"non-finite gradient at step 3 in layers\.2 \(Linear\) weight"):
        train_step(mlp, MSELoss(), SGD(mlp.parameters(), lr=0.1), x, y, step=3)
    assert_unchanged(mlp, before)


@pytest.mark.parametrize("make", [nan_input, inf_weight], ids=["nan_input", "inf_weight"])
def test_nonfinite_skip_keeps_weights_and_optimizer_state(make) -> None:
    mlp, x, y = make()
    optimizer = Adam(mlp.parameters(), lr=0.1)
    clean_x, clean_y = batch()
    clean_x[2, 1] = 0.0
    if make is nan_input:  # one good step first, so there is optimizer state to protect
        loss, updated = train_step(mlp, SoftmaxCrossEntropy(), optimizer, clean_x, clean_y)
        assert updated and torch.isfinite(loss)
    before = snapshot(mlp)
    state_before = copy.deepcopy(optimizer.state_dict())  # torch's state_dict holds references, not copies

    loss, updated = train_step(mlp, SoftmaxCrossEntropy(), optimizer, x, y, nonfinite="skip", step=2)

    assert updated is False
    assert not torch.isfinite(loss)
    assert_unchanged(mlp, before)
    state_after = optimizer.state_dict()["state"]
    assert state_after.keys() == state_before["state"].keys()
    for index, entries in state_before["state"].items():
        for name, then in entries.items():
            now = state_after[index][name]
            assert torch.equal(now, then) if torch.is_tensor(then) else now == then


def test_nonfinite_ignore_updates_anyway() -> None:
    mlp, x, y = nan_input()
    loss, updated = train_step(mlp, SoftmaxCrossEntropy(), SGD(mlp.parameters(), lr=0.1), x, y, nonfinite="ignore")
    assert updated is True and not torch.isfinite(loss)
    assert torch.isnan(mlp.layers[0].weight).any(), "without the check the NaN reaches the weights"


def test_finite_step_updates() -> None:
    mlp = small_mlp()
    x, y = batch()
    before = snapshot(mlp)
    loss, updated = train_step(mlp, SoftmaxCrossEntropy(), SGD(mlp.parameters(), lr=0.1), x, y, nonfinite="raise")
    assert updated is True and torch.isfinite(loss)
    assert not torch.equal(mlp.layers[0].weight, before["layers.0.weight"])
