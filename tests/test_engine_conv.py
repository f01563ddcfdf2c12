"""Engine convolution, pooling, Flatten and BatchNorm2d against torch.autograd (float64, ≤ 1e-10), central finite
differences (≤ 1e-6), torch's initialisation and state dicts, and their bad-input errors."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from engine_checks import AUTOGRAD_TOL, F64, PROPERTY, assert_all_below, randn, randomized
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn

from bp_apps.engine.conv import (
    INPUT_GRAD_METHODS,
    WEIGHT_GRAD_METHODS,
    AdaptiveAvgPool2d,
    AvgPool2d,
    BatchNorm2d,
    Conv1d,
    Conv2d,
    Flatten,
    MaxPool2d,
)
from bp_apps.engine.gradcheck import check_layer, reference_module
from bp_apps.engine.layers import Layer

# torch's own Conv with padding='same' and an even kernel warns about its internal padded copy
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")
BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def with_method(layer: Layer, method: str) -> Layer:
    layer.weight_grad_method = method
    return layer


WB = ("weight", "bias")
# (id, factory, input shape, parameter names, buffer names)
CONV_CASES: list[tuple[str, Callable[[], Layer], tuple[int, ...], tuple[str, ...], tuple[str, ...]]] = [
    ("conv2d", lambda: Conv2d(3, 4, 3, padding=1, dtype=F64), (2, 3, 5, 6), WB, ()),
    ("conv2d_no_bias", lambda: Conv2d(3, 4, 3, bias=False, dtype=F64), (2, 3, 5, 5), ("weight",), ()),
    ("conv2d_stride_not_dividing", lambda: Conv2d(2, 3, 3, stride=2, padding=1, dtype=F64), (2, 2, 6, 7), WB, ()),
    ("conv2d_stride_tuple", lambda: Conv2d(2, 3, (2, 3), stride=(3, 2), padding=(1, 0), dtype=F64), (2, 2, 7, 8),
     WB, ()),
    ("conv2d_dilation", lambda: Conv2d(2, 3, 3, padding=2, dilation=2, dtype=F64), (2, 2, 6, 5), WB, ()),
    ("conv2d_dilation_stride", lambda: Conv2d(2, 3, 2, stride=2, dilation=(2, 1), dtype=F64), (2, 2, 7, 6), WB, ()),
    ("conv2d_groups", lambda: Conv2d(4, 6, 3, padding=1, groups=2, dtype=F64), (2, 4, 5, 5), WB, ()),
    ("conv2d_depthwise_strided", lambda: Conv2d(3, 3, 3, stride=2, groups=3, dtype=F64), (2, 3, 7, 6), WB, ()),
    ("conv2d_same_odd", lambda: Conv2d(2, 3, 3, padding="same", dtype=F64), (2, 2, 5, 4), WB, ()),
    ("conv2d_same_even", lambda: Conv2d(2, 3, (2, 4), padding="same", dtype=F64), (2, 2, 5, 6), WB, ()),
    ("conv2d_same_dilated", lambda: Conv2d(2, 3, 2, padding="same", dilation=3, dtype=F64), (2, 2, 6, 6), WB, ()),
    ("conv2d_valid", lambda: Conv2d(2, 3, 3, padding="valid", dtype=F64), (2, 2, 5, 4), WB, ()),
    ("conv2d_1x1", lambda: Conv2d(3, 2, 1, dtype=F64), (2, 3, 4, 3), WB, ()),
    ("conv2d_single_channel_first_layer", lambda: Conv2d(1, 4, 3, padding=1, dtype=F64), (3, 1, 5, 5), WB, ()),
    ("conv1d", lambda: Conv1d(3, 4, 3, padding=1, dtype=F64), (2, 3, 7), WB, ()),
    ("conv1d_strided_dilated", lambda: Conv1d(2, 3, 3, stride=2, padding=2, dilation=2, dtype=F64), (2, 2, 9),
     WB, ()),
    ("conv1d_groups_no_bias", lambda: Conv1d(4, 2, 2, groups=2, bias=False, dtype=F64), (2, 4, 6), ("weight",), ()),
    ("conv1d_same_even", lambda: Conv1d(2, 3, 4, padding="same", dtype=F64), (2, 2, 7), WB, ()),
    ("maxpool", lambda: MaxPool2d(2), (2, 3, 6, 6), (), ()),
    ("maxpool_floor_drops_edge", lambda: MaxPool2d(2), (2, 2, 5, 7), (), ()),
    ("maxpool_overlapping", lambda: MaxPool2d(3, stride=1), (2, 2, 5, 6), (), ()),
    ("maxpool_pad_ceil", lambda: MaxPool2d(3, stride=2, padding=1, ceil_mode=True), (2, 2, 6, 7), (), ()),
    ("maxpool_dilated", lambda: MaxPool2d(2, stride=1, dilation=2), (2, 2, 5, 5), (), ()),
    ("avgpool", lambda: AvgPool2d(2), (2, 3, 6, 4), (), ()),
    ("avgpool_floor_drops_edge", lambda: AvgPool2d(2), (2, 2, 5, 7), (), ()),
    ("avgpool_overlapping", lambda: AvgPool2d(3, stride=1), (2, 2, 5, 6), (), ()),
    ("avgpool_pad_include", lambda: AvgPool2d(3, stride=2, padding=1), (2, 2, 6, 7), (), ()),
    ("avgpool_pad_exclude", lambda: AvgPool2d(3, stride=2, padding=1, count_include_pad=False), (2, 2, 6, 7), (), ()),
    ("avgpool_ceil_include", lambda: AvgPool2d(3, stride=2, padding=1, ceil_mode=True), (2, 2, 6, 7), (), ()),
    ("avgpool_ceil_exclude", lambda: AvgPool2d(2, stride=2, ceil_mode=True, count_include_pad=False), (2, 2, 5, 7),
     (), ()),
    ("avgpool_ceil_no_pad", lambda: AvgPool2d((3, 2), stride=(2, 3), ceil_mode=True), (2, 2, 6, 7), (), ()),
    ("adaptive_global", lambda: AdaptiveAvgPool2d(1), (2, 3, 4, 5), (), ()),
    ("adaptive_dividing", lambda: AdaptiveAvgPool2d((2, 3)), (2, 2, 4, 6), (), ()),
    ("adaptive_not_dividing", lambda: AdaptiveAvgPool2d((3, 2)), (2, 2, 7, 5), (), ()),
    ("adaptive_none_keeps_size", lambda: AdaptiveAvgPool2d((None, 2)), (2, 2, 3, 5), (), ()),
    ("adaptive_upsampling", lambda: AdaptiveAvgPool2d(4), (2, 2, 3, 2), (), ()),
    ("flatten", Flatten, (2, 3, 4, 5), (), ()),
    ("flatten_middle", lambda: Flatten(1, 2), (2, 3, 4, 5), (), ()),
    ("batch_norm2d_train", lambda: randomized(BatchNorm2d(3, dtype=F64)), (2, 3, 4, 5), WB, BN_BUFFERS),
    ("batch_norm2d_train_momentum", lambda: randomized(BatchNorm2d(3, eps=1e-3, momentum=0.7, dtype=F64)),
     (4, 3, 2, 3), WB, BN_BUFFERS),
    ("batch_norm2d_cumulative", lambda: randomized(BatchNorm2d(3, momentum=None, dtype=F64)), (2, 3, 3, 3), WB,
     BN_BUFFERS),
    ("batch_norm2d_eval", lambda: randomized(BatchNorm2d(3, dtype=F64)).eval(), (2, 3, 4, 5), WB, BN_BUFFERS),
    ("batch_norm2d_no_affine", lambda: randomized(BatchNorm2d(3, affine=False, dtype=F64)), (2, 3, 4, 5), (),
     BN_BUFFERS),
    ("batch_norm2d_no_affine_eval", lambda: randomized(BatchNorm2d(3, affine=False, dtype=F64)).eval(), (2, 3, 4, 5),
     (), BN_BUFFERS),
    ("batch_norm2d_no_running_stats", lambda: randomized(BatchNorm2d(3, track_running_stats=False, dtype=F64)),
     (2, 3, 4, 5), WB, ()),
    ("batch_norm2d_no_running_stats_eval",
     lambda: randomized(BatchNorm2d(3, track_running_stats=False, dtype=F64)).eval(), (2, 3, 4, 5), WB, ()),
]
CONV_METHOD_CASES = [
    ("stride1", lambda: Conv2d(3, 4, 3, padding=1, dtype=F64), (2, 3, 5, 6)),
    ("stride1_dilated_rect", lambda: Conv2d(2, 3, (3, 2), padding=(2, 0), dilation=(2, 1), dtype=F64), (2, 2, 6, 5)),
    ("stride1_same_even", lambda: Conv2d(2, 3, (2, 3), padding="same", dtype=F64), (2, 2, 5, 6)),
    ("stride1_no_padding", lambda: Conv2d(3, 2, 2, dtype=F64), (3, 3, 4, 5)),
    ("conv1d", lambda: Conv1d(3, 4, 3, padding=2, dilation=2, dtype=F64), (2, 3, 8)),
]


@pytest.mark.parametrize("method", WEIGHT_GRAD_METHODS)
@pytest.mark.parametrize(("name", "factory", "shape"), CONV_METHOD_CASES, ids=[c[0] for c in CONV_METHOD_CASES])
def test_every_weight_grad_method_matches_autograd(method: str, name: str, factory: Callable[[], Layer],
                                                   shape: tuple[int, ...]) -> None:
    errors = check_layer(with_method(factory(), method), randn(*shape, seed=7), seed=8)
    assert_all_below(errors, AUTOGRAD_TOL, {"output", "input", "weight", "bias"})


@pytest.mark.parametrize("input_method", INPUT_GRAD_METHODS)
@pytest.mark.parametrize("method", ["unfold", "swap"])
@pytest.mark.parametrize("dims", [1, 2])
def test_strided_grouped_gradient_methods_match_autograd(input_method: str, method: str, dims: int) -> None:
    cls, shape = (Conv1d, (2, 4, 11)) if dims == 1 else (Conv2d, (2, 4, 7, 8))
    layer = with_method(cls(4, 6, 3, stride=2, padding=1, dilation=2, groups=2, dtype=F64), method)
    layer.input_grad_method = input_method
    assert_all_below(check_layer(layer, randn(*shape, seed=9)), AUTOGRAD_TOL, {"output", "input", "weight", "bias"})


@pytest.mark.parametrize("input_method", INPUT_GRAD_METHODS)
@pytest.mark.parametrize(("name", "factory", "shape"), [
    ("speech_subsampling", lambda: Conv2d(1, 4, 3, stride=2, padding=1, dtype=F64), (2, 1, 9, 6)),
    ("wide", lambda: Conv2d(3, 4, 3, stride=2, padding=1, dtype=F64), (2, 3, 8, 7)),
    ("same_even", lambda: Conv2d(2, 3, (2, 4), padding="same", dtype=F64), (2, 2, 5, 6)),
    ("conv1d_same_even", lambda: Conv1d(2, 3, 4, padding="same", dtype=F64), (2, 2, 7)),
], ids=lambda v: v if isinstance(v, str) else None)
def test_every_input_grad_method_matches_autograd(input_method: str, name: str, factory: Callable[[], Layer],
                                                  shape: tuple[int, ...]) -> None:
    layer = factory()
    layer.input_grad_method = input_method
    assert_all_below(check_layer(layer, randn(*shape, seed=10)), AUTOGRAD_TOL, {"output", "input", "weight", "bias"})


def test_shift_method_refuses_strides_and_groups_and_unknown_methods_are_refused() -> None:
    x = randn(1, 2, 5, 5)
    for layer in (Conv2d(2, 2, 3, stride=2, dtype=F64), Conv2d(2, 2, 3, groups=2, dtype=F64)):
        layer.weight_grad_method = "shift"
        layer.forward(x)
        with pytest.raises(ValueError, match=r"Conv2d\(2, 2, .*'shift' needs stride 1 and groups 1"):
            layer.backward(randn(*layer.forward(x).shape))
    layer = with_method(Conv2d(2, 2, 3, dtype=F64), "winograd")
    with pytest.raises(ValueError, match="weight_grad_method must be one of"):
        layer.backward(randn(*layer.forward(x).shape))
    layer = Conv2d(2, 2, 3, dtype=F64)
    layer.input_grad_method = "fft"
    with pytest.raises(ValueError, match="input_grad_method must be one of"):
        layer.backward(randn(*layer.forward(x).shape))


@st.composite
def conv_cases(draw: st.DrawFn, dims: int) -> tuple[dict, tuple[int, ...]]:
    groups = draw(st.sampled_from([1, 1, 2]))
    in_channels = groups * draw(st.integers(1, 2))
    out_channels = groups * draw(st.integers(1, 2))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(dims))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(dims))
    padding = tuple(draw(st.integers(0, 2)) for _ in range(dims))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(dims))
    # each spatial size at least the dilated kernel minus the padding, plus up to 4
    sizes = tuple(max(1, d * (k - 1) + 1 - 2 * p) + draw(st.integers(0, 4))
                  for k, p, d in zip(kernel, padding, dilation))
    kwargs = dict(in_channels=in_channels, out_channels=out_channels, kernel_size=kernel, stride=stride,
                  padding=padding, dilation=dilation, groups=groups, bias=draw(st.booleans()))
    return kwargs, (draw(st.integers(1, 3)), in_channels, *sizes)


def _check_conv_every_method(cls: type, kwargs: dict, shape: tuple[int, ...]) -> None:
    expected = {"output", "input", "weight", *(("bias",) if kwargs["bias"] else ())}
    x = randn(*shape, seed=11, scale=1.5)
    for method in WEIGHT_GRAD_METHODS:
        if method == "shift" and (kwargs["groups"] != 1 or any(s != 1 for s in kwargs["stride"])):
            continue
        layer = with_method(cls(**kwargs, dtype=F64), method)
        layer.input_grad_method = INPUT_GRAD_METHODS[WEIGHT_GRAD_METHODS.index(method) % len(INPUT_GRAD_METHODS)]
        assert_all_below(check_layer(layer, x, seed=12), AUTOGRAD_TOL, expected)


@PROPERTY
@given(conv_cases(2))
def test_conv2d_matches_autograd_for_any_geometry(case: tuple[dict, tuple[int, ...]]) -> None:
    _check_conv_every_method(Conv2d, *case)


@PROPERTY
@given(conv_cases(1))
def test_conv1d_matches_autograd_for_any_geometry(case: tuple[dict, tuple[int, ...]]) -> None:
    _check_conv_every_method(Conv1d, *case)


@PROPERTY
@given(st.integers(1, 3), st.integers(1, 3), st.integers(0, 1), st.integers(1, 2), st.booleans(),
       st.booleans(), st.integers(0, 3), st.integers(0, 3), st.sampled_from(["max", "avg"]))
def test_pooling_matches_autograd_for_any_geometry(kernel: int, stride: int, padding: int, dilation: int,
                                                   ceil_mode: bool, include_pad: bool, extra_h: int, extra_w: int,
                                                   kind: str) -> None:
    padding = min(padding, kernel // 2)  # torch: padding at most half the kernel
    if kind == "max":
        layer: Layer = MaxPool2d(kernel, stride, padding, ceil_mode, dilation=dilation)
        span = dilation * (kernel - 1) + 1
    else:
        width = max(1, kernel - 1)
        layer = AvgPool2d((kernel, width), (stride, stride + 1), (padding, min(padding, width // 2)), ceil_mode,
                          include_pad)
        span = kernel
    x = randn(2, 2, span + extra_h, span + extra_w, seed=13)
    assert_all_below(check_layer(layer, x, seed=14), AUTOGRAD_TOL, {"output", "input"})


@PROPERTY
@given(st.integers(1, 7), st.integers(1, 7), st.integers(1, 7), st.integers(1, 7))
def test_adaptive_avg_pool_matches_autograd_for_any_sizes(height: int, width: int, out_h: int, out_w: int) -> None:
    layer = AdaptiveAvgPool2d((out_h, out_w))
    assert_all_below(check_layer(layer, randn(2, 2, height, width, seed=15)), AUTOGRAD_TOL, {"output", "input"})


@PROPERTY
@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 4), st.integers(1, 4), st.booleans(), st.booleans(),
       st.sampled_from([0.1, 0.5, None]))
def test_batch_norm2d_matches_autograd_for_any_shape(batch: int, channels: int, height: int, width: int,
                                                     training: bool, affine: bool, momentum: float | None) -> None:
    if training and batch * height * width < 2:
        batch = 2
    layer = randomized(BatchNorm2d(channels, momentum=momentum, affine=affine, dtype=F64)).train(training)
    expected = {"output", "input", *BN_BUFFERS, *(WB if affine else ())}
    assert_all_below(check_layer(layer, randn(batch, channels, height, width, seed=16)), AUTOGRAD_TOL, expected)


@pytest.mark.parametrize(("engine_cls", "torch_cls", "args", "kwargs"), [
    (Conv2d, nn.Conv2d, (3, 8, 3), {}),
    (Conv2d, nn.Conv2d, (1, 32, 3), {"padding": 1}),
    (Conv2d, nn.Conv2d, (4, 6, (2, 3)), {"stride": 2, "groups": 2, "dilation": (1, 2)}),
    (Conv2d, nn.Conv2d, (3, 5, 3), {"bias": False, "padding": "same"}),
    (Conv1d, nn.Conv1d, (40, 16, 5), {"stride": 2}),
    (Conv1d, nn.Conv1d, (6, 4, 1), {"groups": 2}),
])
def test_conv_initialisation_equals_torch_for_the_same_seed(engine_cls: type, torch_cls: type, args: tuple,
                                                            kwargs: dict) -> None:
    torch.manual_seed(0)
    engine = engine_cls(*args, **kwargs)
    after_engine = torch.rand(3)
    torch.manual_seed(0)
    reference = torch_cls(*args, **kwargs)
    after_torch = torch.rand(3)
    assert torch.equal(engine.weight, reference.weight)
    if kwargs.get("bias", True):
        assert torch.equal(engine.bias, reference.bias)
    else:
        assert reference.bias is None and "bias" not in dict(engine.named_parameters())
    assert torch.equal(after_engine, after_torch), "the same number of RNG draws"
    assert engine.weight.dtype == torch.float32 and not engine.weight.requires_grad
    assert repr(engine) == repr(reference)


@pytest.mark.parametrize("factory", [
    lambda: Conv2d(3, 4, 3, padding=1, dtype=F64),
    lambda: Conv2d(3, 4, 3, bias=False, dtype=F64),
    lambda: Conv1d(2, 6, 3, groups=2, dtype=F64),
    lambda: randomized(BatchNorm2d(4, dtype=F64)),
    lambda: BatchNorm2d(4, affine=False, dtype=F64),
    lambda: BatchNorm2d(4, track_running_stats=False, dtype=F64),
], ids=["conv2d", "conv2d_no_bias", "conv1d", "bn2d", "bn2d_no_affine", "bn2d_no_running_stats"])
def test_state_dict_loads_into_the_torch_module_and_back(factory: Callable[[], Layer]) -> None:
    engine = randomized(factory())
    twin = engine.torch_module()
    twin.load_state_dict(engine.state_dict())  # strict: same names, same shapes
    assert set(twin.state_dict()) == set(engine.state_dict())
    for name, value in twin.state_dict().items():
        assert torch.equal(value, engine.state_dict()[name])
    fresh = factory()
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(-2.0)
    fresh.load_state_dict(twin.state_dict())
    for name, value in twin.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value)


def test_batch_norm2d_running_stats_follow_torch_over_several_batches() -> None:
    for momentum in (0.3, None):
        engine = randomized(BatchNorm2d(3, momentum=momentum, dtype=F64))
        torch_bn = reference_module(engine)
        for step in range(4):
            x = randn(3, 3, 2, 4, seed=step, scale=step + 1.0) + step
            torch.testing.assert_close(engine.forward(x), torch_bn(x).detach(), rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(engine.running_mean, torch_bn.running_mean, rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(engine.running_var, torch_bn.running_var, rtol=1e-12, atol=0)
            assert int(engine.num_batches_tracked) == int(torch_bn.num_batches_tracked) == step + 1
        engine.eval()
        torch_bn.eval()
        x = randn(2, 3, 2, 2, seed=9)
        torch.testing.assert_close(engine.forward(x), torch_bn(x).detach(), rtol=1e-12, atol=1e-12)
        assert int(engine.num_batches_tracked) == 4, "eval forward must not update the statistics"


@pytest.mark.parametrize("cls", [Conv2d, Conv1d])
def test_first_layer_without_input_grad_returns_none_and_still_fills_weight_grads(cls: type) -> None:
    layer = cls(1, 4, 3, padding=1, dtype=F64)
    layer.needs_input_grad = False
    shape = (3, 1, 6, 5) if cls is Conv2d else (3, 1, 7)
    assert_all_below(check_layer(layer, randn(*shape)), AUTOGRAD_TOL, {"output", "weight", "bias"})
    layer.forward(randn(*shape))
    assert layer.backward(randn(*layer.forward(randn(*shape)).shape)) is None


@pytest.mark.parametrize(("method", "input_method"), [(m, "auto") for m in WEIGHT_GRAD_METHODS] + [("auto", "fold")])
def test_float32_at_the_task_shape(method: str, input_method: str) -> None:
    torch.manual_seed(0)
    layer = with_method(Conv2d(32, 32, 3, padding=1), method)
    layer.input_grad_method = input_method
    errors = check_layer(layer, torch.randn(8, 32, 28, 28))
    assert_all_below(errors, 1e-5, {"output", "input", "weight", "bias"})


def test_float32_pooling_and_batch_norm() -> None:
    x = torch.randn(4, 8, 12, 12, generator=torch.Generator().manual_seed(0))
    for layer in (MaxPool2d(2), AvgPool2d(3, 2, 1), AdaptiveAvgPool2d(1), BatchNorm2d(8)):
        errors = check_layer(layer, x)
        assert_all_below(errors, 1e-5)


def test_conv_stays_correct_when_the_batch_size_or_data_change_between_steps() -> None:
    """The shift method keeps padded buffers between steps; new shapes reallocate them, old ones keep zero borders."""
    layer = randomized(with_method(Conv2d(2, 3, 3, padding=2, dtype=F64), "shift"))
    for step, batch in enumerate((2, 3, 3, 1, 2)):
        errors = check_layer(layer, randn(batch, 2, 5, 4 + step % 2, seed=step, scale=step + 1.0), seed=step)
        assert_all_below(errors, AUTOGRAD_TOL, {"output", "input", "weight", "bias"})


def test_conv_shift_buffers_follow_a_change_of_geometry_with_the_same_buffer_size() -> None:
    """Two (5, 3) images and three (3, 3) ones fill padded grids of the same length with different borders."""
    layer = randomized(with_method(Conv2d(2, 3, 3, padding=1, dtype=F64), "shift"))
    for step, shape in enumerate(((2, 2, 5, 3), (3, 2, 3, 3), (2, 2, 5, 3))):
        errors = check_layer(layer, randn(*shape, seed=step, scale=3.0), seed=step)
        assert_all_below(errors, AUTOGRAD_TOL, {"output", "input", "weight", "bias"})


def test_conv_converts_to_float64_after_construction() -> None:
    layer = Conv2d(2, 3, 3, padding=1)
    layer.forward(torch.randn(2, 2, 4, 4))
    layer.backward(torch.randn(2, 3, 4, 4))
    layer.to(F64)
    assert layer.weight_grad.dtype == F64
    assert_all_below(check_layer(layer, randn(2, 2, 4, 4)), AUTOGRAD_TOL)


def test_maxpool_overlapping_windows_add_their_gradients() -> None:
    x = torch.zeros(1, 1, 3, 3, dtype=F64)
    x[0, 0, 1, 1] = 5.0  # the maximum of all four 2x2 windows
    layer = MaxPool2d(2, stride=1)
    layer.forward(x)
    grad = layer.backward(torch.ones(1, 1, 2, 2, dtype=F64))
    assert grad[0, 0, 1, 1] == 4.0 and grad.sum() == 4.0


# -- bad input ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("layer", "x", "error", "match"), [
    (Conv2d(1, 32, 3), torch.randn(3, 28, 28), ValueError,
     r"Conv2d\(1, 32, kernel_size=\(3, 3\).*\) expects input \(N, 1, H, W\), got \(3, 28, 28\)"),
    (Conv2d(3, 4, 3), torch.randn(2, 1, 8, 8), ValueError, r"Conv2d\(3, 4, .*expects input \(N, 3, H, W\)"),
    (Conv2d(3, 4, 3), torch.randn(2, 3, 8, 8, dtype=F64), TypeError,
     r"Conv2d\(3, 4, .*has torch.float32 parameters .* but got a torch.float64 input"),
    (Conv2d(3, 4, 5), torch.randn(2, 3, 4, 8), ValueError, r"Conv2d\(3, 4, .*smaller than the dilated kernel"),
    (Conv2d(3, 4, 3), torch.ones(2, 3, 8, 8, dtype=torch.long), TypeError, "expects a floating-point input"),
    (Conv1d(2, 4, 3), torch.randn(2, 2, 5, 5), ValueError, r"Conv1d\(2, 4, .*expects input \(N, 2, L\)"),
    (Conv1d(2, 4, 3, dtype=F64), torch.randn(2, 2, 5), TypeError, r"Conv1d\(2, 4, .*torch.float64 parameters"),
    (MaxPool2d(2), torch.randn(3, 8, 8), ValueError, r"MaxPool2d\(kernel_size=\(2, 2\).*expects input \(N, C, H, W\)"),
    (MaxPool2d(4), torch.randn(1, 1, 2, 2), ValueError, r"MaxPool2d\(kernel_size=\(4, 4\)"),
    (AvgPool2d(2), torch.randn(8, 8), ValueError, r"AvgPool2d\(.*expects input \(N, C, H, W\)"),
    (AvgPool2d(2, padding=2), torch.randn(1, 1, 8, 8), ValueError, r"AvgPool2d\(.*pad"),
    (AdaptiveAvgPool2d(1), torch.randn(2, 3, 4), ValueError, r"AdaptiveAvgPool2d\(output_size=\(1, 1\)\) expects"),
    (BatchNorm2d(3), torch.randn(2, 4, 5, 5), ValueError, r"BatchNorm2d\(3, .*expects input \(N, 3, H, W\), got"),
    (BatchNorm2d(3), torch.randn(2, 3, 5), ValueError, r"BatchNorm2d\(3, .*expects input \(N, 3, H, W\)"),
    (BatchNorm2d(3), torch.randn(1, 3, 1, 1), ValueError, "more than one value per channel"),
    (BatchNorm2d(3), torch.randn(2, 3, 4, 4, dtype=F64), TypeError, r"BatchNorm2d\(3, .*torch.float32 parameters"),
    (Flatten(2, 3), torch.randn(2, 3), ValueError, r"Flatten\(start_dim=2, end_dim=3\) cannot flatten"),
], ids=lambda v: None)
def test_bad_input_names_the_layer(layer: Layer, x: Tensor, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        layer.forward(x)


@pytest.mark.parametrize(("factory", "error", "match"), [
    (lambda: Conv2d(3, 4, 3, groups=2), ValueError, "divisible by groups"),
    (lambda: Conv2d(0, 4, 3), ValueError, "in_channels must be a positive int"),
    (lambda: Conv2d(3, 4, 3, stride=2, padding="same"), ValueError, "not supported for strided"),
    (lambda: Conv2d(3, 4, 3, padding="full"), ValueError, "padding must be"),
    (lambda: Conv2d(3, 4, (3, 3, 3)), TypeError, "kernel_size must be an int or a tuple of 2 ints"),
    (lambda: Conv2d(3, 4, 3, stride=0), ValueError, "stride must be positive"),
    (lambda: Conv1d(3, 4, 3, padding=-1), ValueError, "padding must be non-negative"),
    (lambda: AdaptiveAvgPool2d(0), ValueError, "output_size must be"),
    (lambda: AdaptiveAvgPool2d((2, 2, 2)), ValueError, "output_size must be"),
    (lambda: BatchNorm2d(0), ValueError, "num_features must be a positive int"),
])
def test_bad_settings_are_refused(factory: Callable[[], Layer], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        factory()


def test_torch_twins_have_the_same_settings() -> None:
    pairs = [
        (MaxPool2d(3, 2, 1, True, dilation=2), nn.MaxPool2d(3, 2, 1, 2, ceil_mode=True)),
        (AvgPool2d(3, 2, 1, True, False), nn.AvgPool2d(3, 2, 1, True, False)),
        (AdaptiveAvgPool2d((2, None)), nn.AdaptiveAvgPool2d((2, None))),
        (Flatten(1, 2), nn.Flatten(1, 2)),
        (Conv1d(2, 4, 3, padding="same", bias=False), nn.Conv1d(2, 4, 3, padding="same", bias=False)),
    ]
    x = randn(2, 2, 7, 6).float()
    for engine, reference in pairs:
        twin = engine.torch_module()
        assert type(twin) is type(reference)
        inp = x[:, :, 0] if isinstance(engine, Conv1d) else x
        if isinstance(engine, Conv1d):
            twin.load_state_dict(engine.state_dict())
        torch.testing.assert_close(twin(inp), engine.forward(inp), rtol=0, atol=0)


@pytest.mark.parametrize("factory", [
    lambda: Conv2d(3, 4, 3, padding=1, dtype=F64),
    lambda: with_method(Conv2d(3, 4, 3, padding=1, dtype=F64), "unfold"),
    lambda: Conv2d(3, 4, 3, stride=2, dtype=F64),
    lambda: MaxPool2d(2),
    lambda: MaxPool2d(3, 1, 1),
    lambda: AvgPool2d(3, 2, 1),
    lambda: AdaptiveAvgPool2d((2, 3)),
    lambda: randomized(BatchNorm2d(3, dtype=F64)),
], ids=["conv", "conv_unfold", "conv_strided", "maxpool", "maxpool_overlapping", "avgpool", "adaptive", "bn"])
def test_channels_last_and_non_contiguous_inputs(factory: Callable[[], Layer]) -> None:
    x = randn(2, 3, 6, 7, seed=17).contiguous(memory_format=torch.channels_last)
    assert_all_below(check_layer(factory(), x), AUTOGRAD_TOL)
    y = randn(2, 7, 6, 3, seed=18).permute(0, 3, 2, 1)  # (2, 3, 6, 7), no memory format at all
    assert_all_below(check_layer(factory(), y), AUTOGRAD_TOL)
