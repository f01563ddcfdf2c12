"""DP-SGD in the engine: per-example gradients and norms against torch.func and Opacus, the private step against
Opacus's optimizer, the recorder's refusals and bookkeeping, GroupNorm, the DP networks and the benchmark."""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from bp_apps.cli import main
from bp_apps.engine import (
    GRU,
    MLP,
    SGD,
    Conv1d,
    Conv2d,
    Flatten,
    Layer,
    Linear,
    PerExampleRecorder,
    ReLU,
    Sequential,
    SoftmaxCrossEntropy,
    Tanh,
    privatize,
)
from bp_apps.engine import privacy as privacy_module
from bp_apps.engine.conv import MaxPool2d
from bp_apps.engine.gradcheck import check_layer, finite_difference_errors, reference_module
from bp_apps.engine.privacy import GroupNorm
from bp_apps.experiments.bench_privacy import format_privacy_table, run_privacy_bench
from bp_apps.vision.dp_models import DPCNN, DPMLP, ChannelsLastMaxPool2d, EngineDPCNN, EngineDPMLP
from bp_apps.vision.models import EngineSmallCNN

opacus = pytest.importorskip("opacus", reason="needs the privacy extra (pip install \"bp_apps[privacy]\")")
from opacus import GradSampleModule, PrivacyEngine  # noqa: E402
from opacus.optimizers import DPOptimizer  # noqa: E402

F64 = torch.float64
TOL64 = 1e-10


def rel(actual: Tensor, expected: Tensor) -> float:
    a, b = actual.detach().to(F64), expected.detach().to(F64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-300)) if b.numel() else 0.0


# -- references ------------------------------------------------------------------------------------------------------

def twin_of(net: Layer) -> nn.Module:
    """The ``torch.nn`` twin with the engine's weights (an MLP's twin indexes its layers as ``0, 1, ...``)."""
    twin = net.to_autograd() if hasattr(net, "to_autograd") else reference_module(net)
    for p in twin.parameters():
        p.requires_grad_(True)
    return twin


def engine_names(net: Layer, twin: nn.Module) -> dict[str, str]:
    """twin parameter name → engine parameter name (same order, maybe other prefixes)."""
    pairs = list(zip((n for n, _ in twin.named_parameters()), (n for n, _ in net.named_parameters()), strict=True))
    return dict(pairs)


def vmap_grads(net: Layer, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """Each example's gradient of its own mean cross-entropy (as a batch of one), by torch.func, engine names."""
    twin = twin_of(net)
    params = {k: v.detach() for k, v in twin.named_parameters()}

    def loss_one(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        out = functional_call(twin, p, (xi.unsqueeze(0),))
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), yi.reshape(-1))

    grads = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
    names = engine_names(net, twin)
    return {names[k]: v for k, v in grads.items()}


def record(net: Layer, x: Tensor, y: Tensor, param_grads: bool = True, reduction: str = "mean",
           ) -> PerExampleRecorder:
    loss = SoftmaxCrossEntropy()
    with PerExampleRecorder(net, reduction, param_grads=param_grads) as rec:  # type: ignore[arg-type]
        loss.forward(net.forward(x), y)
        upstream = loss.backward()
        net.backward(upstream * x.shape[0] if reduction == "sum" else upstream)
    return rec


def norms_of(grads: dict[str, Tensor]) -> Tensor:
    return torch.sqrt(sum(g.reshape(g.shape[0], -1).square().sum(1) for g in grads.values()))


# -- the cases -------------------------------------------------------------------------------------------------------

def _seeded(build: Callable[[], Layer]) -> Callable[[], Layer]:
    def make() -> Layer:
        torch.manual_seed(0)
        return build().to(F64)
    return make


def _inputs(shape: tuple[int, ...], classes: int = 3, seq: int | None = None) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=gen, dtype=F64)
    y = torch.randint(0, classes, (shape[0],) if seq is None else (shape[0], seq), generator=gen)
    return x, y


def _channels_last(batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """Images stored channels-last (as the DP CNN runs): the recorder then orders its im2col columns to match."""
    return batch[0].contiguous(memory_format=torch.channels_last), batch[1]


def _reusing(net: MLP) -> MLP:
    """As the tasks train an engine MLP: outputs and input gradients in buffers reused every step."""
    net.reuse_buffers = True
    return net


CASES: dict[str, tuple[Callable[[], Layer], tuple[Tensor, Tensor]]] = {
    "linear": (_seeded(lambda: Sequential(Linear(7, 5), Tanh(), Linear(5, 3))), _inputs((6, 7))),
    "linear_sequence": (_seeded(lambda: MLP(7, [5], 3, activation="tanh")), _inputs((6, 4, 7), seq=4)),
    "layernorm": (_seeded(lambda: MLP(7, [5], 3, activation="relu", norm="layer")), _inputs((6, 4, 7), seq=4)),
    "conv1d": (_seeded(lambda: Sequential(Conv1d(3, 4, 3, stride=2, padding=1), Tanh(),
                                          Conv1d(4, 4, 2, dilation=2, groups=2), Flatten(), Linear(12, 3))),
               _inputs((6, 3, 9))),
    "conv2d": (_seeded(lambda: Sequential(Conv2d(2, 6, 3, stride=2, padding=1), ReLU(),
                                          Conv2d(6, 4, (2, 3), dilation=(2, 1), groups=2, bias=False), Tanh(),
                                          Conv2d(4, 4, 2, padding="same"), Flatten(), Linear(16, 3))),
               _inputs((6, 2, 7, 7))),
    "conv2d_channels_last": (_seeded(lambda: Sequential(Conv2d(2, 6, 3, stride=2, padding=1), ReLU(),
                                                        Conv2d(6, 4, (2, 3), dilation=(2, 1), groups=2), Tanh(),
                                                        Conv2d(4, 4, 2, padding="same"), Flatten(), Linear(16, 3))),
                             _channels_last(_inputs((6, 2, 7, 7)))),
    "groupnorm": (_seeded(lambda: Sequential(Conv2d(2, 4, 3, padding=1), GroupNorm(2, 4), ReLU(), Flatten(),
                                             Linear(100, 3))), _inputs((6, 2, 5, 5))),
    "dp_cnn": (_seeded(lambda: EngineDPCNN((1, 16, 16), 3, channels=(4, 8), hidden=8)), _inputs((5, 1, 16, 16))),
    "dp_cnn_group": (_seeded(lambda: EngineDPCNN((1, 16, 16), 3, channels=(4, 8), hidden=8, norm="group",
                                                 norm_groups=2)), _inputs((5, 1, 16, 16))),
    "dp_mlp": (_seeded(lambda: EngineDPMLP((1, 6, 6), 3, hidden=(8,))), _inputs((5, 1, 6, 6))),
    "dp_mlp_reused_buffers": (_seeded(lambda: _reusing(EngineDPMLP((1, 6, 6), 3, hidden=(8, 6), activation="relu"))),
                              _inputs((5, 1, 6, 6))),
}


CHOICES = ("linear_sequence", "layernorm", "conv1d", "conv2d", "conv2d_channels_last", "groupnorm", "dp_cnn")
"""The cases with a layer that may either form its per-example gradients or use the Gram form."""
RUNS = [(case, "auto", param_grads) for case in CASES for param_grads in (True, False)]
RUNS += [(case, path, False) for case in CHOICES for path in ("form", "gram")]


@pytest.mark.parametrize(("case", "path", "param_grads"), RUNS)
def test_per_example_gradients_and_norms_match_torch_func(case: str, path: str, param_grads: bool,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    if path != "auto":  # force one of the two forms
        monkeypatch.setattr(privacy_module, "_form_or_gram", lambda *args: path == "form")
    build, (x, y) = CASES[case]
    net = build()
    expected = vmap_grads(net, x, y)
    rec = record(net, x, y, param_grads=param_grads)
    got = rec.per_example_grads()
    assert list(got) == [name for name, _ in net.named_parameters()]
    for name, value in got.items():
        assert rel(value, expected[name]) <= TOL64, name
    assert rel(rec.norms(), norms_of(expected)) <= TOL64
    # the clipped sum is the same weighted sum of the per-example gradients, whichever form computed it
    weights = torch.linspace(0.2, 1.0, x.shape[0], dtype=F64)
    rec.write_weighted_sum(weights)
    for name, _, buffer in net.param_grads():
        assert rel(buffer, torch.einsum("n,n...->...", weights, expected[name])) <= TOL64, name


@pytest.mark.parametrize("case", ["linear", "conv2d", "dp_cnn"])
def test_the_recorded_backward_keeps_the_layers_contract(case: str) -> None:
    """param_grads=True leaves every gradient buffer and input gradient as the plain backward writes them;
    param_grads=False gives the same input gradients (the layers below train on them)."""
    build, (x, y) = CASES[case]
    net = build()
    loss = SoftmaxCrossEntropy()
    loss.forward(net.forward(x), y)
    upstream = loss.backward()
    first = net.features[0] if case == "dp_cnn" else net[0]
    first.needs_input_grad = True
    plain_dx = net.backward(upstream.clone()) if case != "dp_cnn" else net.features.backward(
        net.head.backward(upstream.clone()))
    plain = {name: g.clone() for name, _, g in net.param_grads()}
    for param_grads in (True, False):
        with PerExampleRecorder(net, param_grads=param_grads):
            net.forward(x)
            dx = net.backward(upstream.clone()) if case != "dp_cnn" else net.features.backward(
                net.head.backward(upstream.clone()))
        assert rel(dx, plain_dx) <= 1e-12
        if param_grads:
            for name, _, g in net.param_grads():
                assert torch.equal(g, plain[name]), name


def test_sum_reduction_reads_the_gradient_as_a_sum() -> None:
    build, (x, y) = CASES["conv2d"]
    net = build()
    rec = record(net, x, y, reduction="sum")
    expected = vmap_grads(net, x, y)
    for name, value in rec.per_example_grads().items():
        assert rel(value, expected[name]) <= TOL64


def test_ghost_norm_of_a_linear_layer_is_the_product_of_norms() -> None:
    """One row per example: ‖∇W_i‖ = ‖g_i‖·‖x_i‖ (and ∇b_i = g_i), the per-example gradient never formed."""
    torch.manual_seed(0)
    layer = Linear(5, 4, dtype=F64)
    x = torch.randn(3, 5, dtype=F64)
    g = torch.randn(3, 4, dtype=F64)
    with PerExampleRecorder(layer, "sum") as rec:
        layer.forward(x)
        layer.backward(g)
    expected = torch.sqrt(g.square().sum(1) * (x.square().sum(1) + 1))
    assert rel(rec.norms(), expected) <= 1e-14
    assert not rec._captures[""].materialised


@settings(max_examples=12, deadline=None)
@given(batch=st.integers(1, 4), channels=st.sampled_from([(1, 1, 1), (2, 4, 2), (3, 3, 3), (4, 2, 1)]),
       kernel=st.integers(1, 3), stride=st.integers(1, 2), padding=st.integers(0, 1), dilation=st.integers(1, 2),
       size=st.integers(5, 8), form=st.booleans(), bias=st.booleans())
def test_conv_per_example_gradients_property(batch: int, channels: tuple[int, int, int], kernel: int, stride: int,
                                             padding: int, dilation: int, size: int, form: bool, bias: bool) -> None:
    """Any convolution geometry, either per-example path: the same gradients and norms as torch.func."""
    c_in, c_out, groups = channels
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(batch * 100 + size)
        conv = Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups,
                      bias=bias, dtype=F64)
        out = (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
        net = Sequential(conv, Tanh(), Flatten(), Linear(c_out * out * out, 2, dtype=F64))
        x = torch.randn(batch, c_in, size, size, dtype=F64)
        y = torch.randint(0, 2, (batch,))
    original = privacy_module._form_or_gram
    privacy_module._form_or_gram = lambda *args: form
    try:
        rec = record(net, x, y, param_grads=False)
        expected = vmap_grads(net, x, y)
        got = rec.per_example_grads()
        assert all(rel(got[name], expected[name]) <= TOL64 for name in expected)
        assert rel(rec.norms(), norms_of(expected)) <= TOL64
    finally:
        privacy_module._form_or_gram = original


@settings(max_examples=12, deadline=None)
@given(batch=st.integers(1, 5), rows=st.integers(1, 5), fan_in=st.integers(1, 6), fan_out=st.integers(1, 6),
       form=st.booleans())
def test_linear_sequence_property(batch: int, rows: int, fan_in: int, fan_out: int, form: bool) -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(rows * 10 + fan_in)
        net = MLP(fan_in, [fan_out], 3, activation="tanh", dtype=F64)
        x = torch.randn(batch, rows, fan_in, dtype=F64)
        y = torch.randint(0, 3, (batch, rows))
    original = privacy_module._form_or_gram
    privacy_module._form_or_gram = lambda *args: form
    try:
        rec = record(net, x, y)
        expected = vmap_grads(net, x, y)
        assert all(rel(rec.per_example_grads()[n], expected[n]) <= TOL64 for n in expected)
        assert rel(rec.norms(), norms_of(expected)) <= TOL64
    finally:
        privacy_module._form_or_gram = original


# -- against Opacus ---------------------------------------------------------------------------------------------------

def _float32_case(kind: str, batch: int = 6) -> tuple[Layer, Tensor, Tensor]:
    torch.manual_seed(3)
    if kind == "cnn":
        net: Layer = EngineDPCNN((1, 16, 16), 4, channels=(4, 8), hidden=8)
    elif kind == "cnn_group":
        net = EngineDPCNN((1, 16, 16), 4, channels=(4, 8), hidden=8, norm="group", norm_groups=2)
    else:
        net = EngineDPMLP((1, 8, 8), 4, hidden=(16,), norm="layer" if kind == "mlp_layer" else None)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(batch, *net.input_shape, generator=gen)
    y = torch.randint(0, 4, (batch,), generator=gen)
    return net, x, y


@pytest.mark.parametrize("kind", ["cnn", "cnn_group", "mlp", "mlp_layer"])
def test_per_example_gradients_match_opacus_grad_sample_module(kind: str) -> None:
    net, x, y = _float32_case(kind)
    twin = twin_of(net)
    names = engine_names(net, twin)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = GradSampleModule(twin)
        F.cross_entropy(module(x), y).backward()
    rec = record(net, x, y, param_grads=False)
    got = rec.per_example_grads()
    expected = {names[n]: p.grad_sample for n, p in twin.named_parameters()}
    for name, value in expected.items():
        assert rel(got[name], value) <= 1e-5, name
    assert rel(rec.norms(), norms_of(expected)) <= 1e-5


def _engine_dp_run(net: Layer, batches: list[tuple[Tensor, Tensor]], clip: float, sigma: float, expected: int,
                   seed: int, momentum: float = 0.9) -> list[tuple[list[Tensor], list[Tensor]]]:
    """(parameters after the step, the private gradient of the step) for each batch."""
    optimizer = SGD(net.parameters(), lr=0.1, momentum=momentum)
    generator = torch.Generator().manual_seed(seed)
    loss = SoftmaxCrossEntropy()
    states = []
    for x, y in batches:
        with PerExampleRecorder(net, param_grads=False) as rec:
            loss.forward(net.forward(x), y)
            net.backward(loss.backward())
        privatize(net, rec, clip, sigma, expected, generator)
        net.attach_gradients()
        optimizer.step()
        states.append(([p.detach().clone() for p in net.parameters()], [g.clone() for g in net.gradients()]))
    return states


def _opacus_run(twin: nn.Module, batches: list[tuple[Tensor, Tensor]], clip: float, sigma: float, expected: int,
                seed: int, momentum: float = 0.9) -> list[tuple[list[Tensor], list[Tensor]]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = GradSampleModule(twin)
        optimizer = DPOptimizer(torch.optim.SGD(twin.parameters(), lr=0.1, momentum=momentum), noise_multiplier=sigma,
                                max_grad_norm=clip, expected_batch_size=expected,
                                generator=torch.Generator().manual_seed(seed))
        states = []
        for x, y in batches:
            optimizer.zero_grad()
            F.cross_entropy(module(x), y).backward()
            optimizer.step()
            states.append(([p.detach().clone() for p in twin.parameters()],
                           [p.grad.detach().clone() for p in twin.parameters()]))
    return states


@pytest.mark.parametrize(("kind", "clip", "sigma"), [
    ("cnn", 0.5, 1.0), ("cnn", 1e-3, 0.0), ("cnn", 1e3, 0.0), ("cnn_group", 0.2, 1.3), ("mlp", 0.5, 1.0),
    ("mlp_layer", 0.05, 0.7),
])
def test_privatize_and_sgd_match_opacus_dp_optimizer(kind: str, clip: float, sigma: float) -> None:
    """Same weights, same batches, same noise seed: the same private gradient (relative 1e-5) and the same
    parameters after every step (float32, 1e-6). σ = 0 checks the clipping alone: every example clipped (C tiny)
    and none (C huge)."""
    net, x, y = _float32_case(kind, batch=8)
    twin = twin_of(net)
    gen = torch.Generator().manual_seed(9)
    batches = [(x, y), (torch.randn((5, *x.shape[1:]), generator=gen), torch.randint(0, 4, (5,), generator=gen))]
    engine = _engine_dp_run(net, batches, clip, sigma, expected=7, seed=11)
    reference = _opacus_run(twin, batches, clip, sigma, expected=7, seed=11)
    for step, ((params, grads), (ref_params, ref_grads)) in enumerate(zip(engine, reference, strict=True)):
        for a, b in zip(grads, ref_grads, strict=True):
            assert rel(a, b) <= 1e-5, (step, a.shape)
        for a, b in zip(params, ref_params, strict=True):
            assert float((a - b).abs().max()) <= 1e-6, (step, a.shape)


def test_privatize_matches_opacus_privacy_engine() -> None:
    """The user-facing Opacus path (PrivacyEngine.make_private, noise_generator) gives the same first update."""
    from torch.utils.data import DataLoader, TensorDataset

    net, x, y = _float32_case("cnn", batch=8)
    twin = twin_of(net)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, optimizer, _ = PrivacyEngine().make_private(
            module=twin, optimizer=torch.optim.SGD(twin.parameters(), lr=0.1),
            data_loader=DataLoader(TensorDataset(x, y), batch_size=8), noise_multiplier=1.1, max_grad_norm=0.3,
            poisson_sampling=False, noise_generator=torch.Generator().manual_seed(5))
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    engine = _engine_dp_run(net, [(x, y)], 0.3, 1.1, expected=8, seed=5, momentum=0.0)
    for a, b in zip(engine[0][0], twin.parameters(), strict=True):
        assert float((a - b.detach()).abs().max()) <= 1e-6


def test_privatize_returns_the_norms_before_clipping_and_clips_to_c() -> None:
    build, (x, y) = CASES["dp_cnn"]
    net = build()
    rec = record(net, x, y, param_grads=False)
    expected = vmap_grads(net, x, y)
    clip = float(norms_of(expected).median())
    norms = privatize(net, rec, clip, 0.0, x.shape[0])
    assert rel(norms, norms_of(expected)) <= TOL64
    factors = (clip / (norms_of(expected) + 1e-6)).clamp(max=1.0)
    assert (factors < 1).any() and (factors == 1).any()
    for name, _, buffer in net.param_grads():
        want = torch.einsum("n,n...->...", factors, expected[name]) / x.shape[0]
        assert rel(buffer, want) <= TOL64, name


# -- empty batches, refusals, bookkeeping ------------------------------------------------------------------------------

def _noise_only(net: Layer, std: float, divisor: int, seed: int) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.normal(0.0, std, size=tuple(p.shape), generator=gen, dtype=p.dtype) / divisor
            for p in net.parameters()]


def test_an_empty_batch_gives_noise_only() -> None:
    net, _, _ = _float32_case("cnn")
    for g in net.gradients():
        g.fill_(7.0)
    with PerExampleRecorder(net, param_grads=False) as rec:
        pass  # Poisson sampling drew no example: no forward, no loss
    norms = privatize(net, rec, 0.5, 2.0, 16, torch.Generator().manual_seed(2))
    assert norms.shape == (0,)
    for got, want in zip(net.gradients(), _noise_only(net, 1.0, 16, 2), strict=True):
        assert float((got - want).abs().max()) <= 1e-6 * float(want.abs().max())
    privatize(net, rec, 0.5, 0.0, 16)
    assert all(not g.any() for g in net.gradients())


def test_an_empty_batch_through_the_network() -> None:
    torch.manual_seed(0)
    net = MLP(5, [4], 3, activation="tanh")
    with PerExampleRecorder(net) as rec:
        net.forward(torch.zeros(0, 5))
        net.backward(torch.zeros(0, 3))
    assert rec.norms().shape == (0,)
    assert all(g.shape == (0, *p.shape) for g, p in zip(rec.per_example_grads().values(), net.parameters(),
                                                        strict=True))
    privatize(net, rec, 1.0, 1.0, 4, torch.Generator().manual_seed(3))
    for got, want in zip(net.gradients(), _noise_only(net, 1.0, 4, 3), strict=True):
        assert float((got - want).abs().max()) <= 1e-6


@pytest.mark.parametrize(("net", "where"), [
    (lambda: EngineSmallCNN((1, 8, 8), 3), "features.1 (BatchNorm2d)"),
    (lambda: MLP(4, [3], 2, norm="batch"), "layers.1 (BatchNorm1d)"),
])
def test_batch_norm_is_refused(net: Callable[[], Layer], where: str) -> None:
    with pytest.raises(ValueError, match="not compatible with per-example gradients") as error:
        PerExampleRecorder(net())
    assert where in str(error.value) and "GroupNorm/LayerNorm" in str(error.value)


def test_unsupported_layers_are_refused() -> None:
    with pytest.raises(ValueError, match=r"0 \(GRU\).*Linear, Conv1d, Conv2d, LayerNorm and GroupNorm"):
        PerExampleRecorder(Sequential(GRU(3, 4)))
    with pytest.raises(TypeError, match="engine network"):
        PerExampleRecorder(nn.Linear(2, 2))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="loss_reduction"):
        PerExampleRecorder(Linear(2, 2), "max")  # type: ignore[arg-type]


def test_the_recorder_restores_the_network_also_after_an_error() -> None:
    net, x, y = _float32_case("cnn")
    layers = [m for m in net.modules() if isinstance(m, Layer)]
    with pytest.raises(RuntimeError, match="boom"), PerExampleRecorder(net):
        assert "forward" in net.__dict__ and "backward" in net.features[0].__dict__
        raise RuntimeError("boom")
    assert all("backward" not in m.__dict__ and "forward" not in m.__dict__ for m in layers)
    rec = PerExampleRecorder(net)
    with rec, pytest.raises(RuntimeError, match="already"), PerExampleRecorder(net):
        pass
    with rec:  # reusable
        SoftmaxCrossEntropy().forward(net.forward(x), y)
    assert all("backward" not in m.__dict__ for m in layers)


def test_recorder_misuse_is_named() -> None:
    net, x, y = _float32_case("cnn")
    loss = SoftmaxCrossEntropy()
    with PerExampleRecorder(net) as rec:
        loss.forward(net.forward(x), y)
        upstream = loss.backward()
        net.head.backward(upstream)  # the convolutions never see their gradient
    with pytest.raises(ValueError, match=r"no backward was recorded for features\.0 \(Conv2d\), features\.3"):
        privatize(net, rec, 1.0, 1.0, 6)
    with PerExampleRecorder(net) as rec, pytest.raises(ValueError, match="backward ran twice"):
        net.forward(x)
        net.backward(upstream)
        net.backward(upstream)
    rec = record(net, x, y)
    other, _, _ = _float32_case("cnn")
    with pytest.raises(ValueError, match="another network"):
        privatize(other, rec, 1.0, 1.0, 6)
    for args, field in (((0.0, 1.0, 6), "max_grad_norm"), ((1.0, -1.0, 6), "noise_multiplier"),
                        ((1.0, math.nan, 6), "noise_multiplier"), ((1.0, 1.0, 0), "expected_batch_size"),
                        ((1.0, 1.0, 2.5), "expected_batch_size")):
        with pytest.raises(ValueError, match=field):
            privatize(net, rec, *args)
    with pytest.raises(ValueError, match=r"weights must have shape \(6,\)"):
        rec.write_weighted_sum(torch.ones(5))


# -- GroupNorm ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("shape", "affine"), [((3, 4, 5, 5), True), ((3, 6, 7), True), ((3, 8), True),
                                               ((3, 4, 5, 5), False)])
def test_group_norm_gradients_match_autograd_and_finite_differences(shape: tuple[int, ...], affine: bool) -> None:
    torch.manual_seed(0)
    layer = GroupNorm(2, shape[1], affine=affine, dtype=F64)
    if affine:  # away from the initial ones and zeros, so that γ and β matter
        layer.weight.copy_(torch.randn(shape[1], dtype=F64))
        layer.bias.copy_(torch.randn(shape[1], dtype=F64))
    x = torch.randn(shape, dtype=F64)
    assert max(check_layer(layer, x).values()) <= TOL64
    if affine:  # (without γ the scalar the differences are taken of is too flat for them: autograd alone)
        assert max(finite_difference_errors(layer, x).values()) <= 1e-6
    assert isinstance(layer.torch_module(), nn.GroupNorm)


def test_group_norm_refuses_bad_settings_and_inputs() -> None:
    with pytest.raises(ValueError, match="divisible"):
        GroupNorm(3, 4)
    with pytest.raises(ValueError, match="num_groups must be a positive int"):
        GroupNorm(0, 4)
    with pytest.raises(ValueError, match=r"expects input \(N, 4, \.\.\.\), got \(2, 3, 5\)"):
        GroupNorm(2, 4).forward(torch.zeros(2, 3, 5))


# -- the DP networks --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("engine_cls", "twin_cls", "kwargs"), [
    (EngineDPCNN, DPCNN, {}), (EngineDPCNN, DPCNN, {"norm": "group", "activation": "relu"}),
    (EngineDPMLP, DPMLP, {}), (EngineDPMLP, DPMLP, {"norm": "layer", "activation": "relu", "hidden": (32, 16)}),
])
def test_dp_networks_start_like_their_twins(engine_cls: type, twin_cls: type, kwargs: dict) -> None:
    torch.manual_seed(5)
    engine = engine_cls((1, 28, 28), 10, **kwargs)
    torch.manual_seed(5)
    twin = twin_cls((1, 28, 28), 10, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(engine.state_dict().values(), twin.state_dict().values(),
                                                   strict=True))
    if engine_cls is EngineDPCNN:
        assert list(engine.state_dict()) == list(twin.state_dict())
        assert sum(p.numel() for p in engine.parameters()) == (26010 if not kwargs else 26010 + 2 * (16 + 32))
    x = torch.randn(3, 1, 28, 28)
    copy = engine.to_autograd()
    assert type(copy) is twin_cls
    assert torch.allclose(copy(x), engine.forward(x), atol=1e-6)


def test_dp_network_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="at least 14×14"):
        EngineDPCNN((1, 13, 13), 10)
    with pytest.raises(ValueError, match="BatchNorm mixes examples"):
        EngineDPCNN((1, 28, 28), 10, norm="batch")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="norm_groups"):
        EngineDPCNN((1, 28, 28), 10, norm="group", norm_groups=3)
    with pytest.raises(ValueError, match="activation"):
        EngineDPMLP((1, 28, 28), 10, activation="gelu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="BatchNorm mixes examples"):
        DPMLP((1, 28, 28), 10, norm="batch")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="channels"):
        DPCNN((1, 28, 28), 10, channels=(16,))
    with pytest.raises(ValueError, match=r"expects input \(N, 1, H, W\), got \(28, 28\)"):
        EngineDPCNN((1, 28, 28), 10).forward(torch.zeros(28, 28))


def test_channels_last_max_pool_equals_the_plain_one() -> None:
    x = torch.randn(4, 3, 9, 9)
    x[:, :, 2:4, 2:4] = 1.0  # ties: both must route the gradient to the same (first) maximum
    g = torch.randn(4, 3, 8, 8)
    plain, fast = MaxPool2d(2, stride=1), ChannelsLastMaxPool2d(2, stride=1)
    assert torch.equal(fast.forward(x), plain.forward(x))
    assert fast.forward(x).is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(fast.backward(g), plain.backward(g))


# -- the benchmark ----------------------------------------------------------------------------------------------------

def test_bench_privacy_reports_every_model_and_batch() -> None:
    report = run_privacy_bench(models=("cnn",), batches=(3, 2), repeats=1, block=1, max_grad_norm=0.5)
    assert [(r["model"], r["batch"]) for r in report["results"]] == [("cnn", 3), ("cnn", 2)]
    assert report["max_grad_norm"] == 0.5
    for row in report["results"]:
        assert set(row) == {"model", "batch", "engine_ms", "engine_dp_ms", "opacus_ms"}
        assert all(row[k] > 0 for k in ("engine_ms", "engine_dp_ms", "opacus_ms"))
    table = format_privacy_table(report)
    assert "| cnn | 2 |" in table and "Opacus / engine DP" in table


def test_bench_privacy_command_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench" / "privacy.json"
    assert main(["bench", "privacy", "--batches", "2", "--repeats", "1", "--threads", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["threads"] == 1
    assert [(r["model"], r["batch"]) for r in report["results"]] == [("mlp", 2), ("cnn", 2)]
    assert all(set(r) == {"model", "batch", "engine_ms", "engine_dp_ms", "opacus_ms"} for r in report["results"])
    assert "engine DP ms" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["bench", "privacy", "--batches", "0,64"])
