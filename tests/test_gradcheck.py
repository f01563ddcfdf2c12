"""The engine's gradients against torch.autograd (float64, ≤ 1e-10) and central finite differences (≤ 1e-6)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from engine_checks import AUTOGRAD_TOL, F64, FD_TOL, PROPERTY, assert_all_below, randn, randomized
from hypothesis import given
from hypothesis import strategies as st
from test_engine_conv import CONV_CASES
from torch import Tensor, nn

from bp_apps.engine import (
    ACTIVATIONS,
    GELU,
    MLP,
    BatchNorm1d,
    BCEWithLogitsLoss,
    Dropout,
    Layer,
    LayerNorm,
    LeakyReLU,
    Linear,
    MSELoss,
    ReLU,
    Sigmoid,
    SoftmaxCrossEntropy,
    Tanh,
)
from bp_apps.engine.gradcheck import (
    check_layer,
    check_loss,
    finite_difference_errors,
    finite_difference_grad,
    loss_finite_difference_error,
    make_loss,
    mlp_gradient_errors,
    reference_loss,
    reference_module,
    relative_error,
)

# (id, factory, input shape, parameter names, buffer names)
LAYER_CASES: list[tuple[str, Callable[[], Layer], tuple[int, ...], tuple[str, ...], tuple[str, ...]]] = [
    ("linear", lambda: Linear(6, 4, dtype=F64), (8, 6), ("weight", "bias"), ()),
    ("linear_no_bias", lambda: Linear(6, 4, bias=False, dtype=F64), (8, 6), ("weight",), ()),
    ("relu", ReLU, (8, 6), (), ()),
    ("relu_inplace", lambda: ReLU(inplace=True), (8, 6), (), ()),
    ("relu_3d", ReLU, (2, 3, 5), (), ()),
    ("leaky_relu", lambda: LeakyReLU(0.2), (8, 6), (), ()),
    ("leaky_relu_default_slope", LeakyReLU, (2, 3, 5), (), ()),
    ("tanh", Tanh, (8, 6), (), ()),
    ("sigmoid", Sigmoid, (8, 6), (), ()),
    ("gelu_exact", GELU, (8, 6), (), ()),
    ("gelu_tanh", lambda: GELU("tanh"), (8, 6), (), ()),
    ("gelu_exact_3d", GELU, (2, 3, 5), (), ()),
    ("dropout", lambda: Dropout(0.4), (8, 6), (), ()),
    ("dropout_3d", lambda: Dropout(0.25), (2, 3, 5), (), ()),
    ("dropout_eval", lambda: Dropout(0.4).eval(), (8, 6), (), ()),
    ("layer_norm", lambda: randomized(LayerNorm(6, dtype=F64)), (8, 6), ("weight", "bias"), ()),
    ("layer_norm_3d", lambda: randomized(LayerNorm(5, dtype=F64)), (2, 3, 5), ("weight", "bias"), ()),
    ("layer_norm_no_affine", lambda: LayerNorm(6, elementwise_affine=False, dtype=F64), (8, 6), (), ()),
    ("batch_norm_train", lambda: randomized(BatchNorm1d(6, dtype=F64)), (8, 6), ("weight", "bias"),
     ("running_mean", "running_var", "num_batches_tracked")),
    ("batch_norm_train_momentum", lambda: randomized(BatchNorm1d(6, momentum=0.7, eps=1e-3, dtype=F64)), (5, 6),
     ("weight", "bias"), ("running_mean", "running_var", "num_batches_tracked")),
    ("batch_norm_eval", lambda: randomized(BatchNorm1d(6, dtype=F64)).eval(), (8, 6), ("weight", "bias"),
     ("running_mean", "running_var", "num_batches_tracked")),
    ("batch_norm_no_affine", lambda: BatchNorm1d(6, affine=False, dtype=F64), (8, 6), (),
     ("running_mean", "running_var", "num_batches_tracked")),
]
LAYER_CASES += CONV_CASES  # the same checks for the convolution, pooling and 2-d batch-norm layers
LAYER_IDS = [case[0] for case in LAYER_CASES]


@pytest.mark.parametrize(("name", "factory", "shape", "params", "buffers"), LAYER_CASES, ids=LAYER_IDS)
def test_layer_matches_autograd(name: str, factory: Callable[[], Layer], shape: tuple[int, ...],
                                params: tuple[str, ...], buffers: tuple[str, ...]) -> None:
    errors = check_layer(factory(), randn(*shape, seed=3, scale=2.0), seed=4)
    assert_all_below(errors, AUTOGRAD_TOL, {"output", "input", *params, *buffers})


@pytest.mark.parametrize(("name", "factory", "shape", "params", "buffers"), LAYER_CASES, ids=LAYER_IDS)
def test_layer_matches_finite_differences(name: str, factory: Callable[[], Layer], shape: tuple[int, ...],
                                          params: tuple[str, ...], buffers: tuple[str, ...]) -> None:
    errors = finite_difference_errors(factory(), randn(*shape, seed=5, scale=2.0), seed=6)
    assert_all_below(errors, FD_TOL, {"input", *params})


def test_linear_without_input_grad_returns_none_and_still_fills_weight_grads() -> None:
    layer = Linear(5, 3, dtype=F64)
    layer.needs_input_grad = False
    assert_all_below(check_layer(layer, randn(4, 5)), AUTOGRAD_TOL, {"output", "weight", "bias"})


def test_batch_norm_running_stats_follow_torch_over_several_batches() -> None:
    engine = randomized(BatchNorm1d(4, momentum=0.3, dtype=F64))
    torch_bn = reference_module(engine)
    for step in range(5):
        x = randn(6, 4, seed=step, scale=step + 1.0) + step
        torch.testing.assert_close(engine.forward(x), torch_bn(x).detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(engine.running_mean, torch_bn.running_mean, rtol=1e-12, atol=0)
        torch.testing.assert_close(engine.running_var, torch_bn.running_var, rtol=1e-12, atol=0)
        assert int(engine.num_batches_tracked) == int(torch_bn.num_batches_tracked) == step + 1
    engine.eval()
    torch_bn.eval()
    x = randn(3, 4, seed=9)
    torch.testing.assert_close(engine.forward(x), torch_bn(x).detach(), rtol=1e-12, atol=1e-12)
    assert int(engine.num_batches_tracked) == 5, "eval forward must not update the statistics"


def test_dropout_draws_the_same_mask_as_torch_for_the_same_seed() -> None:
    x = randn(40, 30, seed=2)
    layer = Dropout(0.3)
    torch.manual_seed(11)
    engine = layer.forward(x)
    torch.manual_seed(11)
    torch.testing.assert_close(engine, F.dropout(x, 0.3), rtol=0, atol=0)
    (scale,) = layer.saved
    assert set(torch.unique(scale).tolist()) == {0.0, 1 / 0.7}
    assert 0.2 < float((scale == 0).double().mean()) < 0.4


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_dropout_edge_probabilities(p: float) -> None:
    x = randn(5, 4)
    layer = Dropout(p)
    out = layer.forward(x)
    grad = layer.backward(torch.ones_like(x))
    expected = x if p == 0.0 else torch.zeros_like(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(grad, torch.ones_like(x) if p == 0.0 else torch.zeros_like(x), rtol=0, atol=0)


def test_checks_catch_a_wrong_backward() -> None:
    class WrongTanh(Tanh):
        def backward(self, grad_output: Tensor) -> Tensor:
            (y,) = self.saved
            return grad_output * (1 - y)  # should be 1 − y²

    x = randn(6, 5, scale=2.0)
    assert check_layer(WrongTanh(), x)["input"] > 1e-2
    assert finite_difference_errors(WrongTanh(), x)["input"] > 1e-2

    class WrongMSE(MSELoss):
        def backward(self) -> Tensor:
            return super().backward() / 2

    assert check_loss(WrongMSE(), randn(4, 3), randn(4, 3, seed=1)) == pytest.approx(0.5)
    assert loss_finite_difference_error(WrongMSE(), randn(4, 3), randn(4, 3, seed=1)) == pytest.approx(0.5, rel=1e-4)


# --------------------------------------------------------------------------- losses

def ce_targets(*shape: int, classes: int, seed: int = 0) -> Tensor:
    """Random class indices."""
    return torch.randint(0, classes, shape, generator=torch.Generator().manual_seed(seed))


def with_ignored(target: Tensor, ignore_index: int, every: int = 3) -> Tensor:
    """Mark every ``every``-th label (flattened) as ``ignore_index``."""
    target = target.clone()
    target.view(-1)[::every] = ignore_index
    return target


LOSS_CASES: list[tuple[str, Callable[[], object], Callable[[], tuple[Tensor, Tensor]]]] = [
    ("mse", MSELoss, lambda: (randn(6, 4), randn(6, 4, seed=1))),
    ("mse_3d", MSELoss, lambda: (randn(2, 3, 4), randn(2, 3, 4, seed=1))),
    ("ce", SoftmaxCrossEntropy, lambda: (randn(8, 5, scale=3.0), ce_targets(8, classes=5))),
    ("ce_label_smoothing", lambda: SoftmaxCrossEntropy(label_smoothing=0.15),
     lambda: (randn(8, 5, scale=3.0), ce_targets(8, classes=5))),
    ("ce_full_smoothing", lambda: SoftmaxCrossEntropy(label_smoothing=1.0),
     lambda: (randn(8, 5, scale=3.0), ce_targets(8, classes=5))),
    ("ce_ignore_index", SoftmaxCrossEntropy,
     lambda: (randn(9, 5, scale=3.0), with_ignored(ce_targets(9, classes=5), -100))),
    ("ce_ignore_index_in_range", lambda: SoftmaxCrossEntropy(ignore_index=2),
     lambda: (randn(9, 5, scale=3.0), ce_targets(9, classes=5, seed=3))),
    ("ce_ignore_and_smoothing", lambda: SoftmaxCrossEntropy(label_smoothing=0.2, ignore_index=-1),
     lambda: (randn(9, 5, scale=3.0), with_ignored(ce_targets(9, classes=5), -1, every=2))),
    ("ce_3d", SoftmaxCrossEntropy, lambda: (randn(2, 3, 5, scale=3.0), ce_targets(2, 3, classes=5))),
    ("ce_3d_ignore_smoothing", lambda: SoftmaxCrossEntropy(label_smoothing=0.1),
     lambda: (randn(2, 4, 5, scale=3.0), with_ignored(ce_targets(2, 4, classes=5), -100))),
    ("ce_int32_targets", SoftmaxCrossEntropy,
     lambda: (randn(6, 4, scale=3.0), ce_targets(6, classes=4).to(torch.int32))),
    ("bce_soft_targets", BCEWithLogitsLoss,
     lambda: (randn(6, 4, scale=4.0), torch.rand(6, 4, generator=torch.Generator().manual_seed(1), dtype=F64))),
    ("bce_hard_targets_3d", BCEWithLogitsLoss,
     lambda: (randn(2, 3, 4, scale=4.0), ce_targets(2, 3, 4, classes=2).to(F64))),
]
LOSS_IDS = [case[0] for case in LOSS_CASES]


@pytest.mark.parametrize(("name", "factory", "data"), LOSS_CASES, ids=LOSS_IDS)
def test_loss_value_and_gradient_match_autograd(name: str, factory: Callable, data: Callable) -> None:
    loss = factory()
    pred, target = data()
    value = loss.forward(pred, target)
    expected = reference_loss(loss)(pred, target)
    assert torch.isfinite(expected)
    assert relative_error(value, expected) <= 1e-12
    assert check_loss(loss, pred, target) <= AUTOGRAD_TOL


@pytest.mark.parametrize(("name", "factory", "data"), LOSS_CASES, ids=LOSS_IDS)
def test_loss_gradient_matches_finite_differences(name: str, factory: Callable, data: Callable) -> None:
    pred, target = data()
    assert loss_finite_difference_error(factory(), pred, target) <= FD_TOL


def test_cross_entropy_gradient_has_the_logits_shape() -> None:
    logits = randn(2, 3, 5, scale=2.0)
    loss = SoftmaxCrossEntropy()
    loss.forward(logits, ce_targets(2, 3, classes=5))
    assert loss.backward().shape == logits.shape


def test_ignored_rows_get_zero_gradient_and_do_not_count() -> None:
    logits, target = randn(6, 4, scale=2.0), torch.tensor([0, -100, 3, -100, 1, 2])
    loss = SoftmaxCrossEntropy()
    value = loss.forward(logits, target)
    grad = loss.backward()
    assert torch.equal(grad[[1, 3]], torch.zeros(2, 4, dtype=F64))
    keep = target != -100
    torch.testing.assert_close(value, F.cross_entropy(logits[keep], target[keep]), rtol=1e-14, atol=0)


def test_make_loss_names() -> None:
    assert isinstance(make_loss("mse"), MSELoss)
    assert isinstance(make_loss("bce_with_logits"), BCEWithLogitsLoss)
    ce = SoftmaxCrossEntropy(label_smoothing=0.3)
    assert make_loss(ce) is ce
    with pytest.raises(ValueError, match="unknown loss 'hinge'"):
        make_loss("hinge")


# --------------------------------------------------------------------------- helpers

def test_relative_error_definition() -> None:
    b = torch.tensor([1.0, -4.0, 2.0], dtype=F64)
    assert relative_error(b, b) == 0.0
    assert relative_error(b + torch.tensor([0.0, 0.0, 0.5], dtype=F64), b) == pytest.approx(0.5 / 4.0)
    assert relative_error(torch.zeros(3), torch.zeros(3)) == 0.0
    assert relative_error(torch.tensor([1e-300], dtype=F64), torch.zeros(1, dtype=F64)) > 1e7
    assert relative_error(torch.tensor([float("nan")]), torch.zeros(1)) != relative_error(b, b)
    with pytest.raises(ValueError, match="shapes"):
        relative_error(torch.zeros(2), torch.zeros(3))


def test_finite_difference_grad_of_a_known_function() -> None:
    x = randn(3, 4)
    before = x.clone()
    grad = finite_difference_grad(lambda t: (t**3).sum() + t[0, 0] * t[1, 1], x)
    expected = 3 * x**2
    expected[0, 0] += x[1, 1]
    expected[1, 1] += x[0, 0]
    torch.testing.assert_close(grad, expected, rtol=1e-8, atol=1e-8)
    assert torch.equal(x, before), "x must not be modified"


def test_reference_module_copies_float64_weights_exactly() -> None:
    layer = Linear(7, 5, dtype=F64)
    twin = reference_module(layer)
    assert twin.weight.dtype == F64
    assert torch.equal(twin.weight, layer.weight) and torch.equal(twin.bias, layer.bias)


# --------------------------------------------------------------------------- MLPs

MLP_CASES: list[tuple[str, dict]] = [
    ("no_hidden", {"hidden": []}),
    ("one_hidden", {"hidden": [8]}),
    ("three_hidden", {"hidden": [8, 6, 5]}),
    *[(f"act_{act}", {"hidden": [7, 5], "activation": act}) for act in ACTIVATIONS],
    ("layer_norm", {"hidden": [7, 5], "norm": "layer", "activation": "gelu"}),
    ("batch_norm", {"hidden": [7, 5], "norm": "batch", "bias": False, "activation": "tanh"}),
    ("dropout", {"hidden": [7, 5], "dropout": 0.3}),
    ("dropout_layer_norm", {"hidden": [7, 5], "norm": "layer", "dropout": 0.2, "activation": "leaky_relu"}),
    ("no_bias", {"hidden": [7, 5], "bias": False}),
]
MLP_IDS = [case[0] for case in MLP_CASES]


def make_mlp(seed: int = 0, in_features: int = 6, out_features: int = 4, **kwargs: object) -> MLP:
    """A float64 MLP with seeded weights (and randomized norm parameters)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mlp = MLP(in_features, out_features=out_features, dtype=F64, **kwargs)
    for i, layer in enumerate(mlp.layers):
        if isinstance(layer, LayerNorm | BatchNorm1d):
            randomized(layer, seed=100 + i)
    return mlp


@pytest.mark.parametrize("loss", ["cross_entropy", "mse", "bce_with_logits"])
@pytest.mark.parametrize(("name", "kwargs"), MLP_CASES, ids=MLP_IDS)
def test_mlp_gradients_match_autograd(name: str, kwargs: dict, loss: str) -> None:
    mlp = make_mlp(**kwargs)
    x = randn(9, 6, seed=1, scale=1.5)
    y = ce_targets(9, classes=4) if loss == "cross_entropy" else torch.rand(9, 4, dtype=F64)
    errors = mlp_gradient_errors(mlp, x, y, loss)
    assert_all_below(errors, AUTOGRAD_TOL, {name for name, _ in mlp.named_parameters()})


@pytest.mark.parametrize(("name", "kwargs"), MLP_CASES, ids=MLP_IDS)
def test_mlp_backward_matches_autograd_including_input_grad(name: str, kwargs: dict) -> None:
    mlp = make_mlp(input_grad=True, **kwargs)
    errors = check_layer(mlp, randn(9, 6, seed=2, scale=1.5))
    buffers = {name for name, _ in mlp.named_buffers() if not name.endswith("_grad")}
    assert_all_below(errors, AUTOGRAD_TOL, {"output", "input", *dict(mlp.named_parameters()), *buffers})


@pytest.mark.parametrize(("name", "kwargs"), MLP_CASES, ids=MLP_IDS)
def test_mlp_backward_matches_finite_differences(name: str, kwargs: dict) -> None:
    mlp = make_mlp(in_features=4, out_features=3, input_grad=True, **kwargs)
    errors = finite_difference_errors(mlp, randn(5, 4, seed=3, scale=1.5))
    assert_all_below(errors, FD_TOL, {"input", *dict(mlp.named_parameters())})


def test_mlp_in_eval_mode_with_batch_norm_matches_autograd() -> None:
    mlp = make_mlp(hidden=[7, 5], norm="batch", activation="gelu_tanh", input_grad=True)
    for seed in range(3):  # move the running statistics away from their initial values
        mlp.forward(randn(8, 6, seed=seed) + 1.0)
    mlp.eval()
    assert_all_below(check_layer(mlp, randn(4, 6, seed=7)), AUTOGRAD_TOL)
    assert_all_below(mlp_gradient_errors(mlp, randn(4, 6, seed=7), ce_targets(4, classes=4)), AUTOGRAD_TOL)
    assert_all_below(finite_difference_errors(mlp, randn(4, 6, seed=8)), FD_TOL)


def test_bias_before_train_mode_batch_norm_gets_zero_gradient() -> None:
    mlp = make_mlp(hidden=[7], norm="batch")
    loss = SoftmaxCrossEntropy()
    loss.forward(mlp.forward(randn(8, 6)), ce_targets(8, classes=4))
    mlp.backward(loss.backward())
    assert mlp.layers[0].weight_grad.abs().max() > 1e-3
    assert mlp.layers[0].bias_grad.abs().max() < 1e-14, "batch statistics cancel a constant shift"


def test_mlp_gradient_errors_catch_a_wrong_weight_gradient() -> None:
    mlp = make_mlp(hidden=[7, 5])
    linear = mlp.layers[2]
    correct_backward = linear.backward

    def wrong_backward(grad_output: Tensor) -> Tensor | None:
        grad_input = correct_backward(grad_output)
        linear.weight_grad.mul_(1.001)
        return grad_input

    linear.backward = wrong_backward
    errors = mlp_gradient_errors(mlp, randn(9, 6), ce_targets(9, classes=4))
    assert errors["layers.2.weight"] == pytest.approx(1e-3, rel=1e-6)
    assert errors["layers.0.weight"] <= AUTOGRAD_TOL


def test_mlp_gradient_errors_leave_the_mlp_and_the_rng_alone() -> None:
    mlp = make_mlp(hidden=[7, 5], norm="batch", dropout=0.4, bias=False)
    loss = SoftmaxCrossEntropy()
    loss.forward(mlp.forward(randn(9, 6, seed=4)), ce_targets(9, classes=4))
    mlp.backward(loss.backward())
    state = {name: t.clone() for name, t in mlp.state_dict().items()}
    grads = [g.clone() for g in mlp.gradients()]
    saved = mlp.saved_state()
    rng = torch.get_rng_state()
    x, y = randn(9, 6, seed=5), ce_targets(9, classes=4, seed=5)

    errors = mlp_gradient_errors(mlp, x, y)

    assert_all_below(errors, AUTOGRAD_TOL)
    assert torch.equal(torch.get_rng_state(), rng)
    for name, value in mlp.state_dict().items():
        assert torch.equal(value, state[name]), name
    for after, before in zip(mlp.gradients(), grads, strict=True):
        assert torch.equal(after, before)
    assert all(a is b for a, b in zip(mlp.saved_state(), saved, strict=True))
    assert mlp_gradient_errors(mlp, x, y) == errors, "repeatable: same masks, same statistics"


def test_mlp_gradient_errors_between_a_callers_forward_and_backward() -> None:
    x, y = randn(9, 6, seed=6), ce_targets(9, classes=4, seed=6)
    expected = []
    for interrupt in (False, True):
        mlp = make_mlp(hidden=[7, 5], dropout=0.3, reuse_buffers=True)  # ReLU keeps a reused Linear output
        loss = SoftmaxCrossEntropy()
        torch.manual_seed(3)
        loss.forward(mlp.forward(x), y)
        if interrupt:
            assert_all_below(mlp_gradient_errors(mlp, randn(9, 6, seed=8), ce_targets(9, classes=4)), AUTOGRAD_TOL)
        mlp.backward(loss.backward())
        grads = [g.clone() for g in mlp.gradients()]
        if interrupt:
            for a, b in zip(grads, expected, strict=True):
                assert torch.equal(a, b)
        expected = grads
    assert mlp.reuse_buffers


def test_mlp_gradient_errors_on_a_float32_mlp() -> None:
    torch.manual_seed(0)
    mlp = MLP(6, [16, 16], 4, activation="gelu")
    errors = mlp_gradient_errors(mlp, randn(9, 6).float(), ce_targets(9, classes=4))
    assert_all_below(errors, 1e-4)
    assert_all_below(mlp_gradient_errors(mlp.double(), randn(9, 6), ce_targets(9, classes=4)), AUTOGRAD_TOL)


# --------------------------------------------------------------------------- MLP init and twins

@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("bias", [True, False])
def test_mlp_init_equals_torch_linear_init_under_the_same_seed(dtype: torch.dtype, bias: bool) -> None:
    torch.manual_seed(123)
    mlp = MLP(5, [8, 7], 3, activation="tanh", norm="layer", bias=bias, dtype=dtype)
    after_mlp = torch.get_rng_state()
    torch.manual_seed(123)
    seq = nn.Sequential(nn.Linear(5, 8, bias=bias, dtype=dtype), nn.LayerNorm(8, dtype=dtype), nn.Tanh(),
                        nn.Linear(8, 7, bias=bias, dtype=dtype), nn.LayerNorm(7, dtype=dtype), nn.Tanh(),
                        nn.Linear(7, 3, bias=bias, dtype=dtype))
    assert torch.equal(torch.get_rng_state(), after_mlp), "same number of random draws"
    mlp_state, seq_state = mlp.state_dict(), seq.state_dict()
    assert [k.removeprefix("layers.") for k in mlp_state] == list(seq_state)
    for key, value in seq_state.items():
        assert value.dtype == dtype
        assert torch.equal(mlp_state[f"layers.{key}"], value), key


def test_to_autograd_matches_forward_and_keeps_rng_in_float32() -> None:
    torch.manual_seed(0)
    mlp = MLP(6, [8, 5], 3, norm="layer", activation="sigmoid")
    rng = torch.get_rng_state()
    twin = mlp.to_autograd()
    assert torch.equal(torch.get_rng_state(), rng)
    x = randn(4, 6).float()
    torch.testing.assert_close(mlp.forward(x), twin(x).detach(), rtol=1e-6, atol=1e-6)


def test_to_autograd_copies_float64_weights_exactly() -> None:
    torch.manual_seed(0)
    mlp = MLP(6, [8], 3, norm="batch", dtype=F64)
    with torch.no_grad():
        mlp.layers[1].running_mean.copy_(randn(8))
    twin = mlp.to_autograd()
    for key, value in mlp.state_dict().items():
        assert torch.equal(twin.state_dict()[key.removeprefix("layers.")], value), key


def test_mlp_dropout_masks_match_torch_twin_on_cpu() -> None:
    torch.manual_seed(0)
    mlp = MLP(6, [9, 7], 3, dropout=0.5, dtype=F64)
    twin = mlp.to_autograd()
    x = randn(5, 6)
    torch.manual_seed(42)
    out = mlp.forward(x)
    torch.manual_seed(42)
    torch.testing.assert_close(out, twin(x).detach(), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- 3-D inputs

def test_mlp_accepts_batch_time_feature_inputs() -> None:
    mlp = make_mlp(hidden=[7, 5], norm="layer", input_grad=True)
    x = randn(2, 3, 6, seed=1)
    out = mlp.forward(x)
    assert out.shape == (2, 3, 4)
    torch.testing.assert_close(out, mlp.forward(x.reshape(6, 6)).reshape(2, 3, 4), rtol=0, atol=0)
    mlp.forward(x)
    grad_in = mlp.backward(randn(2, 3, 4, seed=2))
    assert grad_in.shape == (2, 3, 6)

    assert_all_below(check_layer(mlp, x), AUTOGRAD_TOL)
    assert_all_below(finite_difference_errors(mlp, x), FD_TOL)
    y = ce_targets(2, 3, classes=4)
    assert_all_below(mlp_gradient_errors(mlp, x, y), AUTOGRAD_TOL, {n for n, _ in mlp.named_parameters()})
    assert_all_below(mlp_gradient_errors(mlp, x, torch.rand(2, 3, 4, dtype=F64), "mse"), AUTOGRAD_TOL)


def test_mlp_3d_inputs_with_batch_norm_normalise_over_all_positions() -> None:
    mlp = make_mlp(hidden=[7], norm="batch", bias=False, input_grad=True)
    x = randn(2, 4, 6, seed=3)
    assert_all_below(check_layer(mlp, x), AUTOGRAD_TOL)
    assert_all_below(finite_difference_errors(mlp, x), FD_TOL)


# --------------------------------------------------------------------------- property tests

@PROPERTY
@given(batch=st.integers(1, 6), fan_in=st.integers(1, 6), fan_out=st.integers(1, 6), bias=st.booleans(),
       seed=st.integers(0, 2**16), scale=st.floats(0.1, 10.0))
def test_property_linear(batch: int, fan_in: int, fan_out: int, bias: bool, seed: int, scale: float) -> None:
    torch.manual_seed(seed)
    layer = Linear(fan_in, fan_out, bias=bias, dtype=F64)
    assert_all_below(check_layer(layer, randn(batch, fan_in, seed=seed, scale=scale), seed=seed + 1), AUTOGRAD_TOL)


ELEMENTWISE: dict[str, Callable[[], Layer]] = {
    "relu": ReLU, "relu_inplace": lambda: ReLU(inplace=True), "leaky_relu": lambda: LeakyReLU(0.05), "tanh": Tanh,
    "sigmoid": Sigmoid, "gelu": GELU, "gelu_tanh": lambda: GELU("tanh"), "dropout": lambda: Dropout(0.3),
}


@PROPERTY
@given(kind=st.sampled_from(sorted(ELEMENTWISE)), shape=st.lists(st.integers(1, 5), min_size=1, max_size=3),
       seed=st.integers(0, 2**16), scale=st.floats(0.1, 8.0))
def test_property_elementwise(kind: str, shape: list[int], seed: int, scale: float) -> None:
    # beyond |x| ≈ 7, tanh' = 1 − y² is mostly rounding noise in any implementation, so stay inside ±6
    x = randn(*shape, seed=seed, scale=scale).clamp(-6, 6)
    assert_all_below(check_layer(ELEMENTWISE[kind](), x, seed=seed + 1), AUTOGRAD_TOL)
    # |x| ≤ 3 keeps the derivative ≥ 1e-2, far above the ~1e-10 rounding noise of the differences
    assert_all_below(finite_difference_errors(ELEMENTWISE[kind](), x.clamp(-3, 3), seed=seed + 1), FD_TOL)


@PROPERTY
@given(lead=st.lists(st.integers(1, 4), min_size=1, max_size=2), features=st.integers(3, 7),
       affine=st.booleans(), seed=st.integers(0, 2**16), scale=st.floats(0.1, 10.0))
def test_property_layer_norm(lead: list[int], features: int, affine: bool, seed: int, scale: float) -> None:
    layer = randomized(LayerNorm(features, elementwise_affine=affine, dtype=F64), seed=seed + 2)
    x = randn(*lead, features, seed=seed, scale=scale) + scale
    assert_all_below(check_layer(layer, x, seed=seed + 1), AUTOGRAD_TOL)


@PROPERTY
@given(batch=st.integers(3, 8), features=st.integers(1, 5), train=st.booleans(), momentum=st.floats(0.0, 1.0),
       seed=st.integers(0, 2**16), scale=st.floats(0.1, 10.0))
def test_property_batch_norm(batch: int, features: int, train: bool, momentum: float, seed: int,
                             scale: float) -> None:
    layer = randomized(BatchNorm1d(features, momentum=momentum, dtype=F64), seed=seed + 2).train(train)
    x = randn(batch, features, seed=seed, scale=scale) - scale
    assert_all_below(check_layer(layer, x, seed=seed + 1), AUTOGRAD_TOL)


@PROPERTY
@given(lead=st.lists(st.integers(1, 4), min_size=1, max_size=2), classes=st.integers(2, 6),
       smoothing=st.floats(0.0, 1.0), ignore_every=st.integers(0, 3), ignore_index=st.sampled_from([-100, 0, 1]),
       seed=st.integers(0, 2**16), scale=st.floats(0.1, 3.0))
def test_property_cross_entropy(lead: list[int], classes: int, smoothing: float, ignore_every: int,
                                ignore_index: int, seed: int, scale: float) -> None:
    # (much larger logits make every gradient a rounding-dominated 1 − p ≈ 0 when the target is the argmax)
    logits = randn(*lead, classes, seed=seed, scale=scale)
    target = ce_targets(*lead, classes=classes, seed=seed)
    if ignore_every:
        target = with_ignored(target, ignore_index, every=ignore_every + 1)
    target.view(-1)[0] = (ignore_index + 1) % classes  # at least one counted row
    loss = SoftmaxCrossEntropy(label_smoothing=smoothing, ignore_index=ignore_index)
    assert relative_error(loss.forward(logits, target), reference_loss(loss)(logits, target)) <= 1e-12
    assert check_loss(loss, logits, target) <= AUTOGRAD_TOL


@PROPERTY
@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=3), kind=st.sampled_from(["mse", "bce"]),
       seed=st.integers(0, 2**16), scale=st.floats(0.1, 10.0))
def test_property_elementwise_losses(shape: list[int], kind: str, seed: int, scale: float) -> None:
    pred = randn(*shape, seed=seed, scale=scale)
    target = torch.rand(shape, generator=torch.Generator().manual_seed(seed + 1), dtype=F64)
    loss = MSELoss() if kind == "mse" else BCEWithLogitsLoss()
    assert relative_error(loss.forward(pred, target), reference_loss(loss)(pred, target)) <= 1e-12
    assert check_loss(loss, pred, target) <= AUTOGRAD_TOL
    assert loss_finite_difference_error(loss, pred, target) <= FD_TOL


@PROPERTY
@given(in_features=st.integers(2, 5), hidden=st.lists(st.integers(3, 7), max_size=3), out_features=st.integers(1, 4),
       activation=st.sampled_from(ACTIVATIONS), norm=st.sampled_from([None, "layer", "batch"]),
       dropout=st.sampled_from([0.0, 0.3]), batch=st.integers(3, 6), loss=st.sampled_from(["cross_entropy", "mse"]),
       seed=st.integers(0, 2**16))
def test_property_mlp(in_features: int, hidden: list[int], out_features: int, activation: str, norm: str | None,
                      dropout: float, batch: int, loss: str, seed: int) -> None:
    # (one input feature would make a train-mode BatchNorm blind to the first weights' scale: zero gradient)
    mlp = make_mlp(seed, in_features, out_features, hidden=hidden, activation=activation, norm=norm,
                   dropout=dropout, bias=norm != "batch", input_grad=True)
    x = randn(batch, in_features, seed=seed, scale=1.5)
    gen = torch.Generator().manual_seed(seed)
    if loss == "cross_entropy":
        y = torch.randint(0, out_features, (batch,), generator=gen)
    else:
        y = torch.randn(batch, out_features, generator=gen, dtype=F64)
    assert_all_below(mlp_gradient_errors(mlp, x, y, loss), AUTOGRAD_TOL)
    assert_all_below(check_layer(mlp, x, seed=seed + 1), AUTOGRAD_TOL)
