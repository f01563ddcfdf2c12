"""Engine GRU/LSTM: backpropagation through time against autograd through packed sequences (float64, ≤ 1e-10),
central finite differences (≤ 1e-6), torch's initialisation, state_dict compatibility, dropout and bad input."""

from __future__ import annotations

import pytest
import torch
from engine_checks import AUTOGRAD_TOL, F64, FD_TOL, PROPERTY, assert_all_below, randn
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from bp_apps.engine.gradcheck import check_layer, finite_difference_grad, reference_module, relative_error
from bp_apps.engine.recurrent import GRU, LSTM, RecurrentSaved

CELLS = {"GRU": (GRU, nn.GRU), "LSTM": (LSTM, nn.LSTM)}


def make(cell: str, *args: object, seed: int = 0, **kwargs: object) -> GRU | LSTM:
    """An engine layer initialised from ``seed`` (the global RNG is left alone)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CELLS[cell][0](*args, **kwargs)


def twin(layer: GRU | LSTM) -> nn.Module:
    """The torch.nn twin with the layer's weights."""
    module = layer.torch_module()
    module.load_state_dict(layer.state_dict())
    return module.train(layer.training)


def packed_forward(module: nn.Module, x: Tensor, lengths: Tensor | None) -> Tensor:
    """Output of a torch RNN as pad_packed_sequence gives it (a plain call without lengths)."""
    if lengths is None:
        return module(x)[0]
    packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
    return pad_packed_sequence(module(packed)[0], batch_first=True, total_length=x.shape[1])[0]


def autograd_errors(layer: GRU | LSTM, x: Tensor, lengths: Tensor | None, seed: int = 7) -> dict[str, float]:
    """Relative errors of the engine's output, input gradient and every parameter gradient vs autograd."""
    return check_layer(layer, x, seed=seed, lengths=lengths)


def param_keys(layer: GRU | LSTM) -> set[str]:
    return {name for name, _ in layer.named_parameters()}


LENGTHS = {
    "none": None,
    "all_full": torch.tensor([7, 7, 7, 7, 7]),
    "variable": torch.tensor([3, 7, 1, 7, 5]),  # a length-1 sequence and full-length ones, unsorted
    "sorted_short": torch.tensor([6, 6, 4, 2, 2]),  # max length below T: trailing steps of nobody
    "equal_short": torch.tensor([4, 4, 4, 4, 4]),
}


# --------------------------------------------------------------------------- autograd parity

@pytest.mark.parametrize("lengths", list(LENGTHS), ids=list(LENGTHS))
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("cell", list(CELLS))
def test_matches_autograd_on_packed_sequences(cell: str, num_layers: int, bidirectional: bool, lengths: str) -> None:
    layer = make(cell, 4, 3, num_layers=num_layers, bidirectional=bidirectional, dtype=F64)
    errors = autograd_errors(layer, randn(5, 7, 4, seed=1, scale=1.5), LENGTHS[lengths])
    assert_all_below(errors, AUTOGRAD_TOL, {"output", "input", *param_keys(layer)})


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("cell", list(CELLS))
def test_without_bias_matches_autograd(cell: str, bidirectional: bool) -> None:
    layer = make(cell, 4, 3, num_layers=2, bias=False, bidirectional=bidirectional, dtype=F64)
    assert not any("bias" in name for name in param_keys(layer))
    errors = autograd_errors(layer, randn(5, 7, 4, seed=2), LENGTHS["variable"])
    assert_all_below(errors, AUTOGRAD_TOL, {"output", "input", *param_keys(layer)})


@pytest.mark.parametrize("cell", list(CELLS))
def test_large_weights_and_single_step_and_single_sequence(cell: str) -> None:
    layer = make(cell, 3, 4, num_layers=2, bidirectional=True, dtype=F64)
    with torch.no_grad():
        for p in layer.parameters():
            p.mul_(4)  # saturating gates
    assert_all_below(autograd_errors(layer, randn(1, 6, 3, seed=3), torch.tensor([4])), AUTOGRAD_TOL)
    assert_all_below(autograd_errors(layer, randn(3, 1, 3, seed=4), None), AUTOGRAD_TOL)
    assert_all_below(autograd_errors(layer, randn(3, 1, 3, seed=4), torch.tensor([1, 1, 1])), AUTOGRAD_TOL)


@pytest.mark.parametrize("cell", list(CELLS))
def test_without_input_grad_returns_none_and_still_fills_weight_grads(cell: str) -> None:
    layer = make(cell, 4, 3, num_layers=2, bidirectional=True, dtype=F64)
    layer.needs_input_grad = False
    errors = autograd_errors(layer, randn(5, 7, 4, seed=5), LENGTHS["variable"])
    assert_all_below(errors, AUTOGRAD_TOL, {"output", *param_keys(layer)})


@pytest.mark.parametrize("cell", list(CELLS))
def test_backward_overwrites_gradients(cell: str) -> None:
    layer = make(cell, 4, 3, bidirectional=True, dtype=F64)
    x, lengths = randn(5, 7, 4), LENGTHS["variable"]
    grad_output = randn(5, 7, 6, seed=1)
    layer.forward(x, lengths)
    layer.backward(grad_output)
    first = [g.clone() for g in layer.gradients()]
    layer.forward(x, lengths)
    layer.backward(grad_output)
    for a, b in zip(layer.gradients(), first, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cell", list(CELLS))
def test_int32_lengths_on_the_same_footing(cell: str) -> None:
    layer = make(cell, 4, 3, bidirectional=True, dtype=F64)
    x = randn(5, 7, 4)
    expected = layer.forward(x, LENGTHS["variable"])
    assert torch.equal(layer.forward(x, LENGTHS["variable"].to(torch.int32)), expected)


# --------------------------------------------------------------------------- finite differences

def fd_errors(layer: GRU | LSTM, x: Tensor, lengths: Tensor | None, seed: int | None = None) -> dict[str, float]:
    """Engine gradients vs central differences of Σ(output · grad_output); every forward starts from the RNG
    state ``seed`` (so train-mode dropout draws the same masks each time)."""

    def run(inp: Tensor) -> Tensor:
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            return layer.forward(inp, lengths)

    output = run(x)
    grad_output = randn(*output.shape, seed=11)
    grad_input = layer.backward(grad_output)
    analytic = {name: grad.clone() for name, _, grad in layer.param_grads()}
    errors = {"input": relative_error(grad_input, finite_difference_grad(lambda t: (run(t) * grad_output).sum(), x))}
    for name, param, _ in layer.param_grads():
        original = param.detach().clone()

        def scalar(value: Tensor, param: Tensor = param) -> Tensor:
            with torch.no_grad():
                param.copy_(value)
            return (run(x) * grad_output).sum()

        try:
            numeric = finite_difference_grad(scalar, original)
        finally:
            with torch.no_grad():
                param.copy_(original)
        errors[name] = relative_error(analytic[name], numeric)
    return errors


@pytest.mark.parametrize("cell", list(CELLS))
def test_matches_finite_differences(cell: str) -> None:
    layer = make(cell, 2, 2, num_layers=2, bidirectional=True, dtype=F64)
    errors = fd_errors(layer, randn(3, 3, 2, seed=6, scale=1.5), torch.tensor([2, 3, 1]))
    assert_all_below(errors, FD_TOL, {"input", *param_keys(layer)})


# --------------------------------------------------------------------------- property tests

@PROPERTY
@given(cell=st.sampled_from(list(CELLS)), batch=st.integers(1, 4), steps=st.integers(1, 5),
       input_size=st.integers(1, 4), hidden=st.integers(1, 4), num_layers=st.integers(1, 2),
       bidirectional=st.booleans(), bias=st.booleans(), variable=st.booleans(), seed=st.integers(0, 2**16))
def test_property_matches_autograd(cell: str, batch: int, steps: int, input_size: int, hidden: int,
                                   num_layers: int, bidirectional: bool, bias: bool, variable: bool,
                                   seed: int) -> None:
    layer = make(cell, input_size, hidden, num_layers=num_layers, bias=bias, bidirectional=bidirectional,
                 dtype=F64, seed=seed)
    lengths = None
    if variable:
        lengths = torch.randint(1, steps + 1, (batch,), generator=torch.Generator().manual_seed(seed))
    x = randn(batch, steps, input_size, seed=seed + 1, scale=2.0)
    errors = autograd_errors(layer, x, lengths, seed=seed + 2)
    assert_all_below(errors, AUTOGRAD_TOL, {"output", "input", *param_keys(layer)})


# --------------------------------------------------------------------------- initialisation and state_dict

@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("cell", list(CELLS))
def test_same_seed_init_equals_torch(cell: str, bias: bool, dtype: torch.dtype) -> None:
    kwargs = {"num_layers": 2, "bias": bias, "bidirectional": True, "dtype": dtype}
    torch.manual_seed(5)
    engine = CELLS[cell][0](4, 3, **kwargs)
    after_engine = torch.get_rng_state()
    torch.manual_seed(5)
    reference = CELLS[cell][1](4, 3, batch_first=True, **kwargs)
    assert torch.equal(torch.get_rng_state(), after_engine), "same number of random draws"
    assert [name for name, _ in engine.named_parameters()] == reference._flat_weights_names
    engine_state, ref_state = engine.state_dict(), reference.state_dict()
    assert list(engine_state) == list(ref_state)
    for key, value in ref_state.items():
        assert engine_state[key].dtype == dtype and engine_state[key].shape == value.shape
        assert torch.equal(engine_state[key], value), key


@pytest.mark.parametrize("cell", list(CELLS))
def test_state_dict_round_trip(cell: str) -> None:
    engine = make(cell, 4, 3, num_layers=2, bidirectional=True, dtype=F64, seed=1)
    reference = CELLS[cell][1](4, 3, num_layers=2, bidirectional=True, batch_first=True, dtype=F64)
    reference.load_state_dict(engine.state_dict())  # strict
    x, lengths = randn(5, 7, 4), LENGTHS["variable"]
    torch.testing.assert_close(engine.forward(x, lengths), packed_forward(reference, x, lengths).detach(),
                               rtol=1e-12, atol=1e-12)
    other = make(cell, 4, 3, num_layers=2, bidirectional=True, dtype=F64, seed=2)
    other.load_state_dict(reference.state_dict())  # and back, strict
    assert torch.equal(other.forward(x, lengths), engine.forward(x, lengths))
    module = engine.torch_module()
    assert isinstance(module, CELLS[cell][1]) and module.batch_first and module.bidirectional
    assert module.num_layers == 2 and module.weight_ih_l0.dtype == F64


# --------------------------------------------------------------------------- padding

@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("cell", list(CELLS))
def test_padding_never_leaks(cell: str, bidirectional: bool) -> None:
    layer = make(cell, 4, 3, num_layers=2, bidirectional=bidirectional, dtype=F64)
    lengths = LENGTHS["variable"]
    padded = torch.arange(7)[None, :] >= lengths[:, None]  # (B, T)
    x = randn(5, 7, 4)
    x_clean = x.masked_fill(padded[..., None], 0.0)
    x_dirty = x.masked_fill(padded[..., None], float("nan"))
    grad_output = randn(5, 7, layer.num_directions * 3, seed=1)
    grad_dirty = grad_output.masked_fill(padded[..., None], float("inf"))

    out_clean = layer.forward(x_clean, lengths)
    dx_clean = layer.backward(grad_output)
    grads_clean = [g.clone() for g in layer.gradients()]
    out_dirty = layer.forward(x_dirty, lengths)
    dx_dirty = layer.backward(grad_dirty)

    assert torch.equal(out_clean, out_dirty)
    assert torch.equal(out_clean[padded], torch.zeros_like(out_clean[padded]))
    assert torch.equal(dx_clean, dx_dirty)
    assert torch.equal(dx_dirty[padded], torch.zeros_like(dx_dirty[padded])), "gradient at padding exactly 0"
    assert (dx_dirty[~padded] != 0).all()
    for a, b in zip(layer.gradients(), grads_clean, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cell", list(CELLS))
def test_each_sequence_as_if_alone(cell: str) -> None:
    """Every row of a padded batch gives what the row alone, cut to its length, gives."""
    layer = make(cell, 4, 3, num_layers=2, bidirectional=True, dtype=F64)
    x, lengths = randn(5, 7, 4), LENGTHS["variable"]
    out = layer.forward(x, lengths)
    for b, length in enumerate(lengths.tolist()):
        alone = layer.forward(x[b:b + 1, :length])
        torch.testing.assert_close(out[b:b + 1, :length], alone, rtol=1e-13, atol=1e-13)


# --------------------------------------------------------------------------- dropout

def layerwise_reference(layer: GRU | LSTM, x: Tensor, lengths: Tensor, masks: tuple[Tensor, ...]) -> Tensor:
    """Stacked single-layer torch RNNs with the engine's saved dropout scales applied between them."""
    out = x
    for k in range(layer.num_layers):
        fan_in = layer.input_size if k == 0 else layer.hidden_size * layer.num_directions
        module = CELLS[type(layer).__name__][1](fan_in, layer.hidden_size, bidirectional=layer.bidirectional,
                                                 batch_first=True, dtype=x.dtype)
        state = {name.replace(f"_l{k}", "_l0"): value for name, value in layer.state_dict().items()
                 if f"_l{k}" in name}
        module.load_state_dict(state)
        if k > 0:
            out = out * masks[k - 1]
        out = packed_forward(module, out, lengths)
    return out


@pytest.mark.parametrize("cell", list(CELLS))
def test_dropout_eval_mode_equals_no_dropout(cell: str) -> None:
    with_dropout = make(cell, 4, 3, num_layers=3, dropout=0.5, bidirectional=True, dtype=F64, seed=3).eval()
    without = make(cell, 4, 3, num_layers=3, bidirectional=True, dtype=F64, seed=3)
    x, lengths = randn(5, 7, 4), LENGTHS["variable"]
    rng = torch.get_rng_state()
    assert torch.equal(with_dropout.forward(x, lengths), without.forward(x, lengths))
    assert torch.equal(torch.get_rng_state(), rng), "eval mode draws nothing"
    assert with_dropout.saved.dropout_masks == ()
    grad_output = randn(5, 7, 6, seed=1)
    assert torch.equal(with_dropout.backward(grad_output), without.backward(grad_output))


@pytest.mark.parametrize("cell", list(CELLS))
def test_dropout_train_mode_uses_saved_masks(cell: str) -> None:
    layer = make(cell, 4, 3, num_layers=3, dropout=0.4, bidirectional=True, dtype=F64, seed=4)
    x, lengths = randn(5, 7, 4), LENGTHS["variable"]
    torch.manual_seed(21)
    first = layer.forward(x, lengths)
    saved = layer.saved
    assert isinstance(saved, RecurrentSaved)
    masks = saved.dropout_masks
    assert len(masks) == 2 and all(m.shape == (5, 7, 6) for m in masks)
    assert all(set(torch.unique(m).tolist()) <= {0.0, 1 / 0.6} for m in masks)
    assert not torch.equal(masks[0], masks[1]), "each gap draws its own mask"
    torch.manual_seed(21)
    assert torch.equal(layer.forward(x, lengths), first), "same seed, same masks"
    torch.manual_seed(22)
    assert not torch.equal(layer.forward(x, lengths), first)
    # the same masks reproduced by hand on torch's layers: output and gradients match autograd
    torch.manual_seed(21)
    output = layer.forward(x, lengths)
    grad_output = randn(5, 7, 6, seed=1)
    grad_input = layer.backward(grad_output)
    with torch.enable_grad():
        x_ref = x.clone().requires_grad_(True)
        reference = layerwise_reference(layer, x_ref, lengths, layer.saved.dropout_masks)
        reference.backward(grad_output)
    assert relative_error(output, reference) <= AUTOGRAD_TOL
    assert relative_error(grad_input, x_ref.grad) <= AUTOGRAD_TOL
    assert relative_error(output, layer.eval().forward(x, lengths)) > 1e-2


@pytest.mark.parametrize("cell", list(CELLS))
def test_dropout_backward_matches_finite_differences(cell: str) -> None:
    layer = make(cell, 2, 2, num_layers=2, dropout=0.5, bidirectional=True, dtype=F64, seed=5)
    errors = fd_errors(layer, randn(3, 3, 2, seed=6), torch.tensor([3, 1, 2]), seed=8)
    assert_all_below(errors, FD_TOL, {"input", *param_keys(layer)})


# --------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("cell", list(CELLS))
def test_bad_input_names_the_layer(cell: str) -> None:
    layer = make(cell, 4, 3, num_layers=2, bidirectional=True)
    name = f"{cell}(4, 3, num_layers=2"
    x = torch.randn(2, 5, 4)
    cases = [
        (torch.randn(2, 5, 3), None, "expects input"),
        (torch.randn(5, 4), None, "expects input"),
        (torch.randn(1, 2, 5, 4), None, "expects input"),
        (x, torch.tensor([6, 2]), "lengths in"),
        (x, torch.tensor([0, 2]), "lengths in"),
        (x, torch.tensor([5, 2, 1]), "lengths of shape"),
        (x, torch.tensor([[5, 2]]), "lengths of shape"),
    ]
    for inp, lengths, message in cases:
        with pytest.raises(ValueError, match=message) as info:
            layer.forward(inp, lengths)
        assert name in str(info.value)
    with pytest.raises(TypeError, match="integer lengths"):
        layer.forward(x, torch.tensor([5.0, 2.0]))
    with pytest.raises(TypeError, match=r"float32 weights but got a torch\.float64"):
        layer.forward(x.double())
    layer.forward(x)
    with pytest.raises(ValueError, match="grad_output"):
        layer.backward(torch.randn(2, 5, 3))


def test_bad_settings() -> None:
    with pytest.raises(ValueError, match="batch_first=True"):
        GRU(4, 3, batch_first=False)
    with pytest.raises(ValueError, match="dropout"):
        LSTM(4, 3, num_layers=2, dropout=1.5)
    with pytest.raises(ValueError, match="hidden_size"):
        GRU(4, 0)
    with pytest.warns(UserWarning, match="num_layers=1"):
        GRU(4, 3, dropout=0.2)


# --------------------------------------------------------------------------- float32 at the task's shape

@pytest.mark.parametrize("cell", list(CELLS))
def test_float32_at_task_shape(cell: str) -> None:
    layer = make(cell, 128, 128, num_layers=2, bidirectional=True, seed=9)
    lengths = torch.randint(50, 101, (32,), generator=torch.Generator().manual_seed(1))
    lengths[3] = 100
    x = randn(32, 100, 128, seed=2, dtype=torch.float32)
    assert_all_below(autograd_errors(layer, x, lengths), 1e-4, {"output", "input", *param_keys(layer)})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("cell", list(CELLS))
def test_on_cuda_matches_cpu_autograd(cell: str) -> None:
    layer = make(cell, 4, 3, num_layers=2, bidirectional=True, dtype=F64)
    cpu_errors = autograd_errors(layer, randn(5, 7, 4), LENGTHS["variable"])
    assert_all_below(cpu_errors, AUTOGRAD_TOL)
    layer = layer.to("cuda")
    errors = autograd_errors(layer, randn(5, 7, 4).cuda(), LENGTHS["variable"].cuda())
    assert_all_below(errors, AUTOGRAD_TOL, {"output", "input", *param_keys(layer)})


@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("lengths", [[7, 5, 7, 2, 6], [7] * 5, [3] * 5])
def test_dropout_draws_the_masks_torch_draws_on_packed_sequences(cell: str, lengths: list[int]) -> None:
    """From one random state, the engine and nn.GRU / nn.LSTM (packed, train mode) drop the same units and leave
    the RNG in the same state: training runs of the two backends can be compared step by step."""
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    layer = make(cell, 4, 3, num_layers=3, dropout=0.4, bidirectional=True, dtype=F64, seed=4)
    twin = reference_module(layer).train()
    x, lengths_t = randn(5, 7, 4), torch.tensor(lengths)
    torch.manual_seed(5)
    output = layer.forward(x, lengths_t)
    after_engine = torch.get_rng_state()
    torch.manual_seed(5)
    packed = pack_padded_sequence(x, lengths_t, batch_first=True, enforce_sorted=False)
    with torch.no_grad():
        expected = pad_packed_sequence(twin(packed)[0], batch_first=True, total_length=7)[0]
    assert relative_error(output, expected) <= AUTOGRAD_TOL
    assert torch.equal(after_engine, torch.get_rng_state())
