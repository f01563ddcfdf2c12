"""Side-by-side training of a task's real model: its engine network and the ``torch.nn`` twin of it.

The engine task module (its ``net`` built of engine layers) is copied and given ``net.to_autograd()``, so both
start from the same weights; each step then sees the same batch, and the same random state, so SpecAugment and
dropout draw the same masks. The report has the keys of the digits comparison (:mod:`.compare`):
``max_grad_rel_error`` (float64, one batch), ``max_loss_trajectory_diff`` (the first ``steps`` steps, float32 unless
asked otherwise, SGD at the task's learning rate unless asked for the task's own optimizer; constant learning
rate), and ``backends.{engine,autograd}.{ms_per_step,peak_memory_mb}``.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any, Literal

import torch
from torch import Tensor

from bp_apps.core.task import TaskModule
from bp_apps.experiments.bench import synchronize
from bp_apps.experiments.compare import DTYPES, _optimizer_tensors, comparison_report, peak_step_memory_mb

__all__ = ["autograd_twin", "compare_task_modules", "map_floats"]


def map_floats(batch: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """``batch`` with ``fn`` applied to every floating-point tensor in it (tuples, named tuples, lists, dicts)."""
    if isinstance(batch, Tensor):
        return fn(batch) if batch.is_floating_point() else batch
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(map_floats(item, fn) for item in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(map_floats(item, fn) for item in batch)
    if isinstance(batch, dict):
        return {key: map_floats(value, fn) for key, value in batch.items()}
    return batch


def autograd_twin(module: TaskModule) -> TaskModule:
    """A copy of an engine task module whose engine layers are their ``torch.nn`` twins with the same weights."""
    return module.autograd_copy()


def _optimizer(module: TaskModule) -> torch.optim.Optimizer:
    return module.configure_optimizers()["optimizer"]


def _engine_step(module: TaskModule, optimizer: torch.optim.Optimizer) -> Callable[[Any], Tensor]:
    def step(batch: Any) -> Tensor:
        return module.engine_update(module.training_batch(batch), optimizer).detach()
    return step


def _autograd_step(module: TaskModule, optimizer: torch.optim.Optimizer) -> Callable[[Any], Tensor]:
    def step(batch: Any) -> Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = module.autograd_loss(module.training_batch(batch))
        loss.backward()
        if module.optim.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_([p for p in module.parameters() if p.requires_grad],
                                           module.optim.max_grad_norm)
        optimizer.step()
        return loss.detach()
    return step


ZERO_GRADIENT_FLOOR = 1e-3
"""A parameter whose gradient is below this fraction of the network's largest gradient entry is measured against
that floor: a bias right before a train-mode batch norm has a gradient that is zero up to rounding (its batch mean
cancels it), and an error relative to rounding noise says nothing."""


def gradient_errors(module: TaskModule, batch: Any) -> dict[str, float]:
    """Per-parameter relative error (max |engine − autograd| / max |autograd|, with the floor above) of the engine's
    float64 gradients on ``batch`` (copies of the module in float64; both passes from the same random state)."""
    engine = copy.deepcopy(module).double()
    twin = autograd_twin(engine)
    batch = map_floats(batch, lambda t: t.double())
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        engine.engine_backward(engine.training_batch(batch))
    with torch.random.fork_rng(devices=[]):
        twin.autograd_loss(twin.training_batch(batch)).backward()
    reference = {name.removeprefix("net."): p.grad for name, p in twin.named_parameters() if p.grad is not None}
    floor = ZERO_GRADIENT_FLOOR * max(float(g.abs().max()) for g in reference.values())
    errors = {}
    for name, _, grad in engine.engine_param_grads():
        expected = reference[name]
        scale = max(float(expected.abs().max()), floor)
        errors[name] = float((grad - expected).abs().max()) / scale if scale > 0 else 0.0
    return errors


def compare_task_modules(module: TaskModule, batches: Iterable[Any], *, steps: int = 50, setup: str = "",
                         optimizer: Literal["sgd", "task"] = "sgd", dtype: str = "float32") -> dict[str, Any]:
    """Train ``module`` (an engine network) and its autograd twin side by side for ``steps`` batches of
    ``batches``; return the report (see the module docstring).

    ``optimizer``: ``sgd`` (the default) steps both with SGD, momentum 0.9, at the task's learning rate and without
    weight decay; ``task`` with the task's own optimizer settings. Adam-type updates divide each gradient entry by
    its running size, so an entry that is zero up to float32 rounding moves its weight by ±lr on whichever side its
    rounding falls: trajectories under AdamW part by ~1e-4 after one step, though every gradient agrees to rounding.
    SGD keeps the comparison to what the backward passes compute. ``dtype`` (``float32`` or ``float64``) is the
    precision of the trajectories: in float32 a network with max-pooling also parts slowly, as a weight that differs
    in its last bits flips a near-tie in some pooling window and sends that window's gradient elsewhere."""
    if dtype not in DTYPES:
        raise ValueError(f"compare: dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if optimizer not in ("sgd", "task"):
        raise ValueError(f"compare: optimizer must be 'sgd' or 'task', got {optimizer!r}")
    if optimizer == "sgd":
        module.optim = replace(module.optim, name="sgd", momentum=0.9, weight_decay=0.0)
    module.to(DTYPES[dtype]).train()
    batches = [map_floats(batch, lambda t: t.to(DTYPES[dtype])) for _, batch in zip(range(steps), batches,
                                                                                     strict=False)]
    if not batches:
        raise ValueError("compare: the data gave no training batch")
    grad_errors = gradient_errors(module, batches[0])
    twin = autograd_twin(module)
    twin.train()
    engine_opt, twin_opt = _optimizer(module), _optimizer(twin)
    run = {"engine": _engine_step(module, engine_opt), "autograd": _autograd_step(twin, twin_opt)}
    losses: dict[str, list[float]] = {"engine": [], "autograd": []}
    seconds: dict[str, list[float]] = {"engine": [], "autograd": []}
    device = next(module.net.parameters()).device
    for batch in batches:
        state = torch.random.get_rng_state()
        for name, step in run.items():
            torch.random.set_rng_state(state)  # the same augmentation and dropout masks for both
            synchronize(device)
            start = time.perf_counter()
            loss = step(batch)
            synchronize(device)
            seconds[name].append(time.perf_counter() - start)
            losses[name].append(float(loss))
    layers = module.engine_layers().values()
    persistent = {"engine": [t for layer in layers for t in (*layer.parameters(), *layer.gradients(),
                                                             *layer.workspaces())] + _optimizer_tensors(engine_opt),
                  "autograd": [*twin.parameters(), *_optimizer_tensors(twin_opt)]}
    backends = {}
    for name, step in run.items():
        with torch.random.fork_rng(devices=[]):
            memory = peak_step_memory_mb(lambda s=step: s(batches[0]), persistent[name], device)
        backends[name] = {"ms_per_step": 1e3 * statistics.median(seconds[name]), "peak_memory_mb": memory,
                          "final_loss": losses[name][-1]}
    config = {"task": module.task_name, "network": type(module.net).__name__, "setup": setup,
              "optimizer": module.optim.name, "lr": module.optim.lr, "dtype": dtype}
    return comparison_report(config, grad_errors, losses, backends)
