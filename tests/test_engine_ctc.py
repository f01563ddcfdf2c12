"""The engine's CTC loss and LogSoftmax against torch (float64, ≤ 1e-10) and central finite differences (≤ 1e-6).

torch.nn.functional.ctc_loss wants time-major (T, B, C) log-probabilities; the engine's CTCLoss takes
batch-first (B, T, C), so every reference transposes. The engine's ``backward()`` is compared with the
gradient autograd gives for the logits through log_softmax + ctc_loss.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from bp_apps.engine.ctc import CTCLoss, CTCTypeError, LogSoftmax
from bp_apps.engine.gradcheck import check_layer, finite_difference_errors, finite_difference_grad, relative_error

F64 = torch.float64
AUTOGRAD_TOL = 1e-10
FD_TOL = 1e-6
PROPERTY = settings(max_examples=25, deadline=None)
REDUCTIONS = ("mean", "sum", "none")


def randn(*shape: int, seed: int = 0, scale: float = 1.0, dtype: torch.dtype = F64) -> Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype) * scale


def random_targets(batch: int, width: int, classes: int, blank: int, seed: int = 0) -> Tensor:
    """(B, width) labels drawn from the non-blank classes."""
    labels = torch.tensor([c for c in range(classes) if c != blank])
    return labels[torch.randint(0, classes - 1, (batch, width), generator=torch.Generator().manual_seed(seed))]


def concatenated(targets: Tensor, target_lengths: Tensor) -> Tensor:
    return torch.cat([row[:n] for row, n in zip(targets, target_lengths.tolist(), strict=True)])


def torch_reference(logits: Tensor, targets: Tensor, input_lengths: Tensor, target_lengths: Tensor, blank: int,
                    reduction: str, zero_infinity: bool, grad_output: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """torch's loss and its gradient for the logits (autograd through log_softmax + ctc_loss)."""
    with torch.enable_grad():
        x = logits.detach().clone().requires_grad_(True)
        loss = F.ctc_loss(x.log_softmax(-1).transpose(0, 1), targets, input_lengths, target_lengths, blank=blank,
                          reduction=reduction, zero_infinity=zero_infinity)
        upstream = torch.ones_like(loss) if grad_output is None else grad_output
        loss.backward(upstream)
    return loss.detach(), x.grad


def engine_run(logits: Tensor, targets: Tensor, input_lengths: Tensor, target_lengths: Tensor, blank: int,
               reduction: str, zero_infinity: bool, grad_output: Tensor | None = None) -> tuple[Tensor, Tensor]:
    ctc = CTCLoss(blank=blank, reduction=reduction, zero_infinity=zero_infinity)
    loss = ctc.forward(torch.log_softmax(logits, -1), targets, input_lengths, target_lengths)
    return loss, ctc.backward(grad_output)


def assert_close_rel(actual: Tensor, expected: Tensor, tol: float) -> None:
    """Same NaN and ±inf positions; the finite entries within ``tol`` relative to the largest one."""
    assert actual.shape == expected.shape
    assert actual.dtype == expected.dtype
    assert torch.equal(torch.isnan(actual), torch.isnan(expected)), "NaN positions differ"
    infinite = torch.isinf(expected)
    assert torch.equal(actual[infinite], expected[infinite]), "infinite entries differ"
    finite = torch.isfinite(expected)
    error = relative_error(actual[finite], expected[finite])
    assert error <= tol, f"relative error {error:.3g} > {tol}"


def assert_matches_torch(logits: Tensor, targets: Tensor, input_lengths: Tensor, target_lengths: Tensor,
                         blank: int = 0, reduction: str = "mean", zero_infinity: bool = False,
                         grad_output: Tensor | None = None, tol: float = AUTOGRAD_TOL) -> None:
    args = (logits, targets, input_lengths, target_lengths, blank, reduction, zero_infinity, grad_output)
    loss, grad = engine_run(*args)
    loss_ref, grad_ref = torch_reference(*args)
    assert_close_rel(loss, loss_ref, tol)
    assert_close_rel(grad, grad_ref, tol)


# --------------------------------------------------------------------------- scenarios vs torch

def scenario(name: str) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
    """(logits (B, T, C), padded targets, input lengths, target lengths, blank) for a named case."""
    classes = 5
    blank = 0
    if name == "equal_lengths":
        batch, frames = 3, 8
        input_lengths, target_lengths = torch.tensor([8, 8, 8]), torch.tensor([3, 3, 3])
    elif name == "variable_lengths":
        batch, frames = 4, 9
        input_lengths, target_lengths = torch.tensor([9, 5, 7, 5]), torch.tensor([4, 2, 1, 3])
    elif name == "blank_last":
        batch, frames = 3, 7
        blank = classes - 1
        input_lengths, target_lengths = torch.tensor([7, 6, 4]), torch.tensor([3, 2, 2])
    elif name == "blank_middle":
        batch, frames = 2, 6
        blank = 2
        input_lengths, target_lengths = torch.tensor([6, 5]), torch.tensor([2, 3])
    elif name == "empty_targets":
        batch, frames = 3, 6
        input_lengths, target_lengths = torch.tensor([6, 4, 1]), torch.tensor([0, 2, 0])
    elif name == "impossible":
        batch, frames = 4, 6
        # row 0: 4 labels in 3 frames; row 2: "11" needs 3 frames (a blank between), gets 2; row 3: no frames
        input_lengths, target_lengths = torch.tensor([3, 6, 2, 0]), torch.tensor([4, 2, 2, 1])
    else:
        raise AssertionError(name)
    width = max(int(target_lengths.max()), 1) + 1  # one extra padding column
    targets = random_targets(batch, width, classes, blank, seed=7)
    if name in ("variable_lengths", "impossible", "blank_last"):
        targets[0, :2] = targets[0, 0]  # a repeated label ("11")
    if name == "impossible":
        targets[2, :2] = targets[2, 0]
    logits = randn(batch, frames, classes, seed=3, scale=1.5)
    return logits, targets, input_lengths, target_lengths, blank


SCENARIOS = ("equal_lengths", "variable_lengths", "blank_last", "blank_middle", "empty_targets", "impossible")


@pytest.mark.parametrize("zero_infinity", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", SCENARIOS)
def test_matches_torch_padded_targets(name: str, reduction: str, zero_infinity: bool) -> None:
    logits, targets, input_lengths, target_lengths, blank = scenario(name)
    assert_matches_torch(logits, targets, input_lengths, target_lengths, blank, reduction, zero_infinity)


@pytest.mark.parametrize("zero_infinity", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", SCENARIOS)
def test_matches_torch_concatenated_targets(name: str, reduction: str, zero_infinity: bool) -> None:
    logits, targets, input_lengths, target_lengths, blank = scenario(name)
    flat = concatenated(targets, target_lengths)
    assert_matches_torch(logits, flat, input_lengths, target_lengths, blank, reduction, zero_infinity)


def test_impossible_alignment_is_inf_with_nan_gradient_like_torch() -> None:
    logits, targets, input_lengths, target_lengths, blank = scenario("impossible")
    losses, grad = engine_run(logits, targets, input_lengths, target_lengths, blank, "none", False)
    assert torch.isinf(losses[[0, 2, 3]]).all() and torch.isfinite(losses[1])
    assert torch.isnan(grad[0, :3]).all() and (grad[0, 3:] == 0).all()  # NaN on valid frames only, as torch
    assert torch.isfinite(grad[1]).all()
    losses, grad = engine_run(logits, targets, input_lengths, target_lengths, blank, "none", True)
    assert (losses[[0, 2, 3]] == 0).all() and (grad[[0, 2, 3]] == 0).all()


def test_empty_target_with_no_frames_costs_nothing() -> None:
    logits = randn(2, 3, 4)
    losses, grad = engine_run(logits, torch.tensor([[1], [2]]), torch.tensor([0, 3]), torch.tensor([0, 0]), 0,
                              "none", False)
    assert losses[0] == 0 and (grad[0] == 0).all()
    # only blanks: −log Π_t p_t(blank)
    expected = -torch.log_softmax(logits[1], -1)[:, 0].sum()
    assert float(losses[1]) == pytest.approx(float(expected), rel=1e-12)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_upstream_gradient_scales_like_torch(reduction: str) -> None:
    logits, targets, input_lengths, target_lengths, blank = scenario("variable_lengths")
    grad_output = randn(4, seed=9) if reduction == "none" else torch.tensor(-2.5, dtype=F64)
    assert_matches_torch(logits, targets, input_lengths, target_lengths, blank, reduction, False, grad_output)


def test_lengths_as_lists_and_int32_tensors() -> None:
    logits, targets, input_lengths, target_lengths, blank = scenario("variable_lengths")
    loss_ref, grad_ref = torch_reference(logits, targets, input_lengths, target_lengths, blank, "mean", False)
    for il, tl, tg in ((input_lengths.tolist(), target_lengths.tolist(), targets),
                       (input_lengths.int(), target_lengths.int(), targets.int())):
        loss, grad = engine_run(logits, tg, il, tl, blank, "mean", False)  # type: ignore[arg-type]
        assert_close_rel(loss, loss_ref, AUTOGRAD_TOL)
        assert_close_rel(grad, grad_ref, AUTOGRAD_TOL)


def test_padded_entries_and_frames_are_ignored() -> None:
    """Whatever padding holds (the blank, −1, NaN log-probs) changes nothing."""
    logits, targets, input_lengths, target_lengths, blank = scenario("variable_lengths")
    ctc = CTCLoss()
    log_probs = torch.log_softmax(logits, -1)
    loss = ctc.forward(log_probs, targets, input_lengths, target_lengths)
    grad = ctc.backward()
    dirty_targets = targets.clone()
    dirty_log_probs = log_probs.clone()
    for b, (n, t) in enumerate(zip(target_lengths.tolist(), input_lengths.tolist(), strict=True)):
        dirty_targets[b, n:] = -1 if b % 2 else blank
        dirty_log_probs[b, t:] = float("nan")
    dirty_loss = ctc.forward(dirty_log_probs, dirty_targets, input_lengths, target_lengths)
    torch.testing.assert_close(dirty_loss, loss, rtol=0, atol=0)
    torch.testing.assert_close(ctc.backward(), grad, rtol=0, atol=0, equal_nan=True)
    assert torch.isfinite(grad).all()


def test_non_contiguous_log_probs() -> None:
    logits, targets, input_lengths, target_lengths, blank = scenario("variable_lengths")
    time_major = torch.log_softmax(logits, -1).transpose(0, 1).contiguous()
    ctc = CTCLoss()
    loss = ctc.forward(time_major.transpose(0, 1), targets, input_lengths, target_lengths)
    loss_ref, grad_ref = torch_reference(logits, targets, input_lengths, target_lengths, blank, "mean", False)
    assert_close_rel(loss, loss_ref, AUTOGRAD_TOL)
    assert_close_rel(ctc.backward(), grad_ref, AUTOGRAD_TOL)


# --------------------------------------------------------------------------- finite differences

@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_backward_log_probs_matches_finite_differences(reduction: str) -> None:
    """−w_b·γ is the derivative for arbitrary (unnormalised) log-probabilities too."""
    log_probs = randn(2, 5, 4, seed=11, scale=0.8)
    targets, input_lengths, target_lengths = torch.tensor([[1, 1], [2, 3]]), torch.tensor([5, 4]), torch.tensor([2, 2])
    ctc = CTCLoss(reduction=reduction)
    weights = torch.tensor([0.7, -1.3], dtype=F64)

    def scalar(lp: Tensor) -> Tensor:
        loss = ctc.forward(lp, targets, input_lengths, target_lengths)
        return (loss * weights).sum() if reduction == "none" else loss

    scalar(log_probs)
    analytic = ctc.backward_log_probs(weights if reduction == "none" else None)
    numeric = finite_difference_grad(scalar, log_probs)
    assert relative_error(analytic, numeric) <= FD_TOL
    assert (analytic[1, 4] == 0).all()  # past the input length


def test_backward_matches_finite_differences_of_the_logits() -> None:
    logits = randn(2, 4, 3, seed=12)
    targets, input_lengths, target_lengths = torch.tensor([[1, 2], [2, 0]]), torch.tensor([4, 3]), torch.tensor([2, 1])
    ctc = CTCLoss(reduction="mean")

    def scalar(z: Tensor) -> Tensor:
        return ctc.forward(torch.log_softmax(z, -1), targets, input_lengths, target_lengths)

    scalar(logits)
    analytic = ctc.backward()
    assert relative_error(analytic, finite_difference_grad(scalar, logits)) <= FD_TOL


def test_backward_is_log_probs_gradient_through_log_softmax() -> None:
    logits, targets, input_lengths, target_lengths, _ = scenario("variable_lengths")
    layer, ctc = LogSoftmax(), CTCLoss(reduction="sum")
    ctc.forward(layer.forward(logits), targets, input_lengths, target_lengths)
    through_layer = layer.backward(ctc.backward_log_probs())
    assert relative_error(ctc.backward(), through_layer) <= 1e-13


# --------------------------------------------------------------------------- LogSoftmax

@pytest.mark.parametrize(("dim", "shape"), [(-1, (6, 5)), (1, (2, 4, 3)), (0, (4, 3)), (-1, (2, 3, 7))])
def test_log_softmax_matches_autograd_and_finite_differences(dim: int, shape: tuple[int, ...]) -> None:
    x = randn(*shape, seed=5, scale=3.0)
    errors = check_layer(LogSoftmax(dim), x, seed=6)
    assert set(errors) == {"output", "input"}
    assert max(errors.values()) <= AUTOGRAD_TOL, errors
    fd = finite_difference_errors(LogSoftmax(dim), x, seed=7)
    assert fd["input"] <= FD_TOL, fd


def test_log_softmax_twin_and_float32() -> None:
    layer = LogSoftmax(1)
    twin = layer.torch_module()
    assert isinstance(twin, torch.nn.LogSoftmax) and twin.dim == 1
    x = randn(3, 4, 5, dtype=torch.float32, scale=4.0)
    errors = check_layer(layer, x)
    assert max(errors.values()) <= 1e-6, errors


# --------------------------------------------------------------------------- property test

@st.composite
def ctc_cases(draw: st.DrawFn) -> dict[str, object]:
    batch = draw(st.integers(1, 3))
    frames = draw(st.integers(1, 6))
    classes = draw(st.integers(2, 5))
    blank = draw(st.integers(0, classes - 1))
    input_lengths = [draw(st.integers(0, frames)) for _ in range(batch)]
    target_lengths = [draw(st.integers(0, 4)) for _ in range(batch)]
    labels = [c for c in range(classes) if c != blank]
    width = max(target_lengths) + draw(st.integers(0, 1))
    targets = [[draw(st.sampled_from(labels)) for _ in range(width)] for _ in range(batch)]
    return {
        "logits": randn(batch, frames, classes, seed=draw(st.integers(0, 1000)),
                        scale=draw(st.sampled_from([0.5, 2.0]))),
        "targets": torch.tensor(targets, dtype=torch.long).reshape(batch, width),
        "input_lengths": torch.tensor(input_lengths), "target_lengths": torch.tensor(target_lengths),
        "blank": blank, "reduction": draw(st.sampled_from(REDUCTIONS)), "zero_infinity": draw(st.booleans()),
        "concatenate": draw(st.booleans()),
    }


@PROPERTY
@given(ctc_cases())
def test_property_matches_torch(case: dict[str, object]) -> None:
    targets = case["targets"]
    if case["concatenate"]:
        targets = concatenated(targets, case["target_lengths"])  # type: ignore[arg-type]
    assert_matches_torch(case["logits"], targets, case["input_lengths"], case["target_lengths"],  # type: ignore[arg-type]
                         case["blank"], case["reduction"], case["zero_infinity"])  # type: ignore[arg-type]


# --------------------------------------------------------------------------- task shape, float32

def test_float32_at_task_shape() -> None:
    """B=32, T=100, C=29 (the speech vocabulary), target lengths 5..40: float32 vs a float64 torch reference."""
    gen = torch.Generator().manual_seed(0)
    batch, frames, classes = 32, 100, 29
    logits = torch.randn(batch, frames, classes, generator=gen, dtype=F64) * 2
    input_lengths = torch.randint(60, frames + 1, (batch,), generator=gen)
    target_lengths = torch.randint(5, 41, (batch,), generator=gen)
    targets = torch.randint(1, classes, (batch, 40), generator=gen)
    loss64, grad64 = torch_reference(logits, targets, input_lengths, target_lengths, 0, "mean", True)
    loss32, grad32 = engine_run(logits.float(), targets, input_lengths, target_lengths, 0, "mean", True)
    assert loss32.dtype == grad32.dtype == torch.float32
    assert relative_error(loss32, loss64) <= 1e-5
    assert relative_error(grad32, grad64) <= 1e-4
    loss, grad = engine_run(logits, targets, input_lengths, target_lengths, 0, "mean", True)
    assert relative_error(loss, loss64) <= AUTOGRAD_TOL and relative_error(grad, grad64) <= AUTOGRAD_TOL


# --------------------------------------------------------------------------- bad input

def good_inputs() -> dict[str, object]:
    return {"log_probs": torch.log_softmax(randn(2, 5, 4), -1), "targets": torch.tensor([[1, 2], [3, 0]]),
            "input_lengths": torch.tensor([5, 4]), "target_lengths": torch.tensor([2, 1])}


BAD_INPUTS = [
    ("blank_out_of_range", {}, {"blank": 4}, r"blank index 4 is out of range \[0, 4\)"),
    ("label_is_blank", {"targets": torch.tensor([[1, 0], [3, 0]])}, {}, "target label 0 is the blank"),
    ("label_too_large", {"targets": torch.tensor([[1, 4], [3, 0]])}, {}, r"target label 4 is outside \[0, 4\)"),
    ("label_negative", {"targets": torch.tensor([[-1, 2], [3, 0]])}, {}, r"target label -1 is outside"),
    ("label_is_blank_concatenated", {"targets": torch.tensor([1, 2, 0])}, {}, "target label 0 is the blank"),
    ("target_length_beyond_width", {"target_lengths": torch.tensor([3, 1])}, {}, "exceeds the padded targets' width"),
    ("negative_target_length", {"target_lengths": torch.tensor([2, -1])}, {}, "target_lengths must be >= 0"),
    ("concatenated_wrong_count", {"targets": torch.tensor([1, 2])}, {}, "sum\\(target_lengths\\) = 3"),
    ("input_length_beyond_T", {"input_lengths": torch.tensor([6, 4])}, {}, r"input_lengths must be in \[0, T=5\]"),
    ("negative_input_length", {"input_lengths": torch.tensor([5, -1])}, {}, r"input_lengths must be in \[0, T=5\], "
                                                                            "got -1"),
    ("time_major_2d", {"log_probs": torch.zeros(5, 4, dtype=F64)}, {}, r"batch-first log_probs \(B, T, C\)"),
    ("empty", {"log_probs": torch.zeros(2, 0, 4, dtype=F64)}, {}, "must not be empty"),
    ("lengths_count", {"input_lengths": torch.tensor([5, 4, 3])}, {}, r"input_lengths must have shape \(2,\)"),
    ("lengths_2d", {"target_lengths": torch.tensor([[2, 1]])}, {}, r"target_lengths must have shape \(2,\)"),
    ("targets_batch", {"targets": torch.tensor([[1, 2]])}, {}, r"padded targets must be \(B=2, S_max\)"),
    ("targets_3d", {"targets": torch.ones(2, 2, 1, dtype=torch.long)}, {}, "padded \\(B, S_max\\) or concatenated"),
]
BAD_TYPES = [
    ("integer_log_probs", {"log_probs": torch.zeros(2, 5, 4, dtype=torch.long)}, "log_probs must be a floating"),
    ("float_lengths", {"input_lengths": torch.tensor([5.0, 4.0])}, "input_lengths must be an integer tensor"),
    ("bool_lengths", {"target_lengths": torch.tensor([True, True])}, "target_lengths must be an integer tensor"),
    ("float_targets", {"targets": torch.tensor([[1.0, 2.0], [3.0, 0.0]])}, "targets must be integer class indices"),
    ("list_targets", {"targets": [[1, 2], [3, 0]]}, "targets must be a tensor"),
    ("bad_length_list", {"input_lengths": ["a", None]}, "input_lengths must be an integer tensor or a sequence"),
]


@pytest.mark.parametrize(("name", "change", "options", "message"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_raises_value_error(name: str, change: dict[str, object], options: dict[str, object],
                                      message: str) -> None:
    inputs = {**good_inputs(), **change}
    with pytest.raises(ValueError, match=f"CTCLoss.*{message}"):
        CTCLoss(**options).forward(**inputs)  # type: ignore[arg-type]


@pytest.mark.parametrize(("name", "change", "message"), BAD_TYPES, ids=[c[0] for c in BAD_TYPES])
def test_bad_types_raise_type_error_that_is_also_a_value_error(name: str, change: dict[str, object],
                                                               message: str) -> None:
    inputs = {**good_inputs(), **change}
    with pytest.raises(CTCTypeError, match=f"CTCLoss: {message}") as info:
        CTCLoss().forward(**inputs)  # type: ignore[arg-type]
    assert isinstance(info.value, TypeError) and isinstance(info.value, ValueError)


def test_padding_past_target_lengths_is_not_checked() -> None:
    inputs = good_inputs()
    inputs["targets"] = torch.tensor([[1, 2, 0], [3, -7, 99]])
    loss = CTCLoss().forward(**inputs)  # type: ignore[arg-type]
    assert math.isfinite(float(loss))


def test_target_longer_than_input_is_not_an_error() -> None:
    inputs = good_inputs()
    inputs["input_lengths"] = torch.tensor([1, 4])
    losses = CTCLoss(reduction="none").forward(**inputs)  # type: ignore[arg-type]
    assert math.isinf(float(losses[0])) and math.isfinite(float(losses[1]))


@pytest.mark.parametrize(("options", "message"), [({"blank": -1}, "blank must be a non-negative int"),
                                                  ({"blank": 1.0}, "blank must be a non-negative int"),
                                                  ({"reduction": "avg"}, "reduction must be one of")])
def test_bad_options(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=f"CTCLoss: {message}"):
        CTCLoss(**options)  # type: ignore[arg-type]


def test_backward_before_forward_and_bad_grad_output() -> None:
    with pytest.raises(RuntimeError, match="CTCLoss: call forward before backward"):
        CTCLoss().backward()
    ctc = CTCLoss(reduction="none")
    ctc.forward(**good_inputs())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"grad_output for reduction 'none' must be a scalar or \(2,\)"):
        ctc.backward(torch.ones(3, dtype=F64))
    ctc = CTCLoss()
    ctc.forward(**good_inputs())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="grad_output for reduction 'mean' must be a scalar"):
        ctc.backward(torch.ones(2, dtype=F64))
