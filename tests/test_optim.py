"""The hand-written optimizers against their torch.optim twins, state round-trips and argument errors."""

from __future__ import annotations

import io
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from bp_apps.engine import SGD, Adam, AdamW, Optimizer, build_optimizer, clip_grad_norm
from bp_apps.engine.gradcheck import relative_error

F64 = torch.float64
SHAPES = [(5, 3), (3,), (2, 2, 2)]
STEPS = 100


def initial_params(seed: int = 0) -> list[Tensor]:
    """Float64 parameters of a few shapes."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen, dtype=F64) for shape in SHAPES]


def make_gradient_fn(seed: int = 1) -> Callable[[list[Tensor]], list[Tensor]]:
    """The gradient of a fixed non-quadratic function, Σ ½a·θ² + b·θ + 0.1·sin(3θ) (elementwise a > 0)."""
    gen = torch.Generator().manual_seed(seed)
    curvature = [torch.rand(shape, generator=gen, dtype=F64) * 2 + 0.1 for shape in SHAPES]
    shift = [torch.randn(shape, generator=gen, dtype=F64) for shape in SHAPES]

    def gradient(params: list[Tensor]) -> list[Tensor]:
        return [a * p + b + 0.3 * torch.cos(3 * p) for a, b, p in zip(curvature, shift, params, strict=True)]

    return gradient


# (id, engine factory, torch.optim factory)
CASES: list[tuple[str, Callable[[list[Tensor]], Optimizer], Callable[[list[Tensor]], torch.optim.Optimizer]]] = [
    ("sgd", lambda p: SGD(p, lr=0.05), lambda p: torch.optim.SGD(p, lr=0.05)),
    ("sgd_momentum", lambda p: SGD(p, lr=0.05, momentum=0.9), lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)),
    ("sgd_dampening", lambda p: SGD(p, lr=0.05, momentum=0.8, dampening=0.3),
     lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.8, dampening=0.3)),
    ("sgd_nesterov", lambda p: SGD(p, lr=0.05, momentum=0.9, nesterov=True),
     lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True)),
    ("sgd_weight_decay", lambda p: SGD(p, lr=0.05, weight_decay=0.1),
     lambda p: torch.optim.SGD(p, lr=0.05, weight_decay=0.1)),
    ("sgd_everything", lambda p: SGD(p, lr=0.03, momentum=0.7, nesterov=True, weight_decay=0.05),
     lambda p: torch.optim.SGD(p, lr=0.03, momentum=0.7, nesterov=True, weight_decay=0.05)),
    ("adam", lambda p: Adam(p, lr=0.02), lambda p: torch.optim.Adam(p, lr=0.02)),
    ("adam_betas_eps", lambda p: Adam(p, lr=0.05, betas=(0.8, 0.99), eps=1e-3),
     lambda p: torch.optim.Adam(p, lr=0.05, betas=(0.8, 0.99), eps=1e-3)),
    ("adam_weight_decay", lambda p: Adam(p, lr=0.02, weight_decay=0.1),
     lambda p: torch.optim.Adam(p, lr=0.02, weight_decay=0.1)),
    ("adamw", lambda p: AdamW(p, lr=0.02, weight_decay=0.1), lambda p: torch.optim.AdamW(p, lr=0.02, weight_decay=0.1)),
    ("adamw_defaults", lambda p: AdamW(p), lambda p: torch.optim.AdamW(p)),
    ("build_adam", lambda p: build_optimizer("Adam", p, lr=0.02), lambda p: torch.optim.Adam(p, lr=0.02)),
    ("build_sgd", lambda p: build_optimizer("sgd", p, lr=0.05, momentum=0.5),
     lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.5)),
]
IDS = [case[0] for case in CASES]


def engine_step(optimizer: Optimizer, params: list[Tensor], grads: list[Tensor]) -> None:
    """One step as the engine takes it: the gradients in ``p.grad`` (no autograd), then ``step()``."""
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    optimizer.step()


def run_engine(optimizer: Optimizer, params: list[Tensor], gradient: Callable, steps: int) -> None:
    """``steps`` updates with gradients computed from the current parameters."""
    for _ in range(steps):
        engine_step(optimizer, params, gradient(params))


@pytest.mark.parametrize(("name", "engine_factory", "torch_factory"), CASES, ids=IDS)
def test_optimizer_matches_torch_over_100_steps(name: str, engine_factory: Callable, torch_factory: Callable) -> None:
    gradient = make_gradient_fn()
    engine_params = initial_params()
    torch_params = [p.clone().requires_grad_(True) for p in engine_params]
    engine, reference = engine_factory(engine_params), torch_factory(torch_params)
    for _ in range(STEPS):
        engine_step(engine, engine_params, gradient(engine_params))
        with torch.no_grad():
            for p, g in zip(torch_params, gradient([p.detach() for p in torch_params]), strict=True):
                p.grad = g
        reference.step()
        assert all(torch.equal(a, b) for a, b in zip(engine_params, torch_params, strict=True)), "bit-identical"
    assert isinstance(engine, torch.optim.Optimizer)
    assert all(engine.state[p].get("step", STEPS) == STEPS for p in engine_params)
    moved = max(relative_error(p, q) for p, q in zip(engine_params, initial_params(), strict=True))
    assert moved > 0.1, "the parameters must actually move for the comparison to mean something"


@pytest.mark.parametrize("max_norm", [0.5, 3.0, 1e6])
def test_clip_grad_norm_matches_torch(max_norm: float) -> None:
    grads = [g * 2 for g in initial_params(seed=3)]
    params = [torch.zeros_like(g, requires_grad=True) for g in grads]
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    expected_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    norm = clip_grad_norm(grads, max_norm)
    assert relative_error(norm, expected_norm) <= 1e-12
    assert float(norm) == pytest.approx(float(torch.cat([g.flatten() for g in initial_params(seed=3)]).norm() * 2))
    for g, p in zip(grads, params, strict=True):
        assert relative_error(g, p.grad) <= 1e-12
    clipped = float(torch.cat([g.flatten() for g in grads]).norm())
    assert clipped == pytest.approx(min(max_norm, float(norm)), rel=1e-5)


@pytest.mark.parametrize(("name", "engine_factory", "torch_factory"), CASES, ids=IDS)
def test_state_dict_round_trip_continues_exactly(name: str, engine_factory: Callable, torch_factory: Callable) -> None:
    gradient = make_gradient_fn(seed=2)
    straight_params = initial_params()
    run_engine(engine_factory(straight_params), straight_params, gradient, 20)

    first_params = initial_params()
    first = engine_factory(first_params)
    run_engine(first, first_params, gradient, 10)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed_params = [p.clone() for p in first_params]
    resumed = engine_factory(resumed_params)
    resumed.load_state_dict(torch.load(buffer))
    assert all(resumed.state[p].get("step", 10) == 10 for p in resumed_params)
    run_engine(resumed, resumed_params, gradient, 10)

    for a, b in zip(resumed_params, straight_params, strict=True):
        assert torch.equal(a, b)

    fresh_params = initial_params()  # without the state the run differs (for optimizers with state or steps)
    fresh = engine_factory(fresh_params)
    with torch.no_grad():
        for p, q in zip(fresh_params, first_params, strict=True):
            p.copy_(q)
    run_engine(fresh, fresh_params, gradient, 10)
    if not (isinstance(fresh, SGD) and fresh.defaults["momentum"] == 0):
        assert any(not torch.equal(a, b) for a, b in zip(fresh_params, straight_params, strict=True))


def test_load_state_dict_restores_hyperparameters() -> None:
    params = initial_params()
    saved = SGD(params, lr=0.3, momentum=0.5, weight_decay=0.01).state_dict()
    other = SGD(initial_params(), lr=0.01)
    other.load_state_dict(saved)
    group = other.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.3, 0.5, 0.01)
    adam = Adam(initial_params(), lr=1.0)
    adam.load_state_dict(Adam(params, lr=0.004, betas=(0.5, 0.6)).state_dict())
    assert adam.param_groups[0]["lr"] == 0.004 and tuple(adam.param_groups[0]["betas"]) == (0.5, 0.6)


def test_a_torch_lr_scheduler_drives_an_engine_optimizer() -> None:
    params = initial_params()
    opt = SGD(params, lr=0.5)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (step + 1))
    for step in range(3):
        assert opt.param_groups[0]["lr"] == pytest.approx(0.5 / (step + 1))
        engine_step(opt, params, make_gradient_fn()(params))
        schedule.step()


def test_load_state_dict_rejects_state_that_does_not_fit() -> None:
    params = initial_params()
    sgd = SGD(params, lr=0.1, momentum=0.9)
    engine_step(sgd, params, make_gradient_fn()(params))
    with pytest.raises(ValueError, match="momentum_buffer"):
        Adam(initial_params()).load_state_dict(sgd.state_dict())
    with pytest.raises(ValueError, match="size"):
        SGD(initial_params()[:2], momentum=0.9).load_state_dict(sgd.state_dict())
    wrong_shapes = [torch.zeros(2, 2, dtype=F64), torch.zeros(3, dtype=F64), torch.zeros(8, dtype=F64)]
    with pytest.raises(ValueError, match="shape"):
        SGD(wrong_shapes, momentum=0.9).load_state_dict(sgd.state_dict())


def test_parameters_without_a_gradient_are_left_alone() -> None:
    params = initial_params()
    grads = make_gradient_fn()(params)
    for opt in (SGD(params, lr=0.1, momentum=0.9), Adam(params), AdamW(params)):
        for p in params:
            p.grad = None
        params[0].grad = grads[0]
        opt.step()
        params[0].grad = None
    assert not torch.equal(params[0], initial_params()[0])
    assert all(torch.equal(a, b) for a, b in zip(params[1:], initial_params()[1:], strict=True))


@pytest.mark.parametrize("cls", [SGD, Adam, AdamW])
def test_negative_learning_rate_is_rejected(cls: type[Optimizer]) -> None:
    with pytest.raises(ValueError, match="learning rate"):
        cls(initial_params(), lr=-0.1)


@pytest.mark.parametrize("lr", [float("nan"), float("inf")])
def test_non_finite_learning_rate_is_rejected(lr: float) -> None:
    with pytest.raises(ValueError, match="learning rate"):  # it would turn every weight into NaN on the first step
        SGD(initial_params(), lr=lr)


@pytest.mark.parametrize("kwargs", [{"nesterov": True}, {"nesterov": True, "momentum": 0.9, "dampening": 0.1}])
def test_nesterov_needs_momentum_and_no_dampening(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="Nesterov"):
        SGD(initial_params(), lr=0.1, **kwargs)


def test_other_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown optimizer 'rmsprop'; choose one of sgd, adam, adamw"):
        build_optimizer("rmsprop", initial_params())
    with pytest.raises(ValueError, match="empty parameter list"):
        SGD([], lr=0.1)
    with pytest.raises(ValueError, match="betas"):
        Adam(initial_params(), betas=(0.9, 1.0))
    with pytest.raises(TypeError):
        build_optimizer("sgd", initial_params(), betas=(0.9, 0.99))
