"""Speed of one DP-SGD training step: the engine's hand-written per-example path against Opacus.

For each model (the DP MNIST MLP and CNN of :mod:`bp_apps.vision.dp_models`) and batch size, three steps on the
same synthetic MNIST-shaped batch, from the same initial weights, with plain SGD:

* ``engine_ms``: the engine's ordinary step (forward, loss, backward, update), no privacy;
* ``engine_dp_ms``: the engine's DP-SGD step: the same forward and backward under a
  :class:`~bp_apps.engine.privacy.PerExampleRecorder` (``param_grads=False``: the clipped sum is the only
  weight-gradient product), :func:`~bp_apps.engine.privacy.privatize` (norms, clipping, noise), the update;
* ``opacus_ms``: Opacus's ``PrivacyEngine.make_private`` on the ``torch.nn`` twin: autograd with per-sample
  gradient hooks, its DPOptimizer clipping to the same norm and adding noise of the same multiplier.

The three alternate in short blocks so that machine noise hits them alike; the first step of a block is not
counted; medians are reported.
"""

from __future__ import annotations

import statistics
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from bp_apps.core.privacy import require_opacus
from bp_apps.engine import MLP, SGD, Layer, SoftmaxCrossEntropy
from bp_apps.engine.privacy import PerExampleRecorder, privatize
from bp_apps.experiments.bench import _timed
from bp_apps.vision.dp_models import EngineDPCNN, EngineDPMLP

__all__ = ["PRIVACY_MODELS", "format_privacy_table", "run_privacy_bench"]

MNIST_SHAPE = (1, 28, 28)
PRIVACY_MODELS: dict[str, Callable[[], Layer]] = {
    "mlp": lambda: EngineDPMLP(MNIST_SHAPE, 10),
    "cnn": lambda: EngineDPCNN(MNIST_SHAPE, 10),
}
"""The benchmarked networks by name: the 784-512-10 tanh MLP and the Papernot/Tramèr–Boneh CNN."""

KINDS = ("engine", "engine_dp", "opacus")


def _engine_steps(net: Layer, x: Tensor, y: Tensor, lr: float, max_grad_norm: float, noise_multiplier: float,
                  seed: int) -> tuple[Callable[[], object], Callable[[], object]]:
    """The engine's plain step and its DP-SGD step on ``net`` (one shared optimizer: plain SGD keeps no state)."""
    loss_fn = SoftmaxCrossEntropy()
    optimizer = SGD(net.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    recorder = PerExampleRecorder(net, "mean", param_grads=False)

    def plain() -> None:
        loss_fn.forward(net.forward(x), y)
        net.backward(loss_fn.backward())
        net.attach_gradients()
        optimizer.step()

    def private() -> None:
        with recorder:
            loss_fn.forward(net.forward(x), y)
            net.backward(loss_fn.backward())
        privatize(net, recorder, max_grad_norm, noise_multiplier, x.shape[0], generator)
        net.attach_gradients()
        optimizer.step()

    return plain, private


def _opacus_step(net: Layer, x: Tensor, y: Tensor, lr: float, max_grad_norm: float, noise_multiplier: float,
                 seed: int) -> Callable[[], object]:
    """Opacus's step on the ``torch.nn`` twin of ``net``, made private by ``PrivacyEngine.make_private``."""
    require_opacus()
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    twin = net.to_autograd()
    for p in twin.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.SGD(twin.parameters(), lr=lr)
    loader = DataLoader(TensorDataset(x, y), batch_size=x.shape[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its notes on secure RNG and on the accountant do not concern a timing
        model, dp_optimizer, _ = PrivacyEngine().make_private(
            module=twin, optimizer=optimizer, data_loader=loader, noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm, poisson_sampling=False,
            noise_generator=torch.Generator().manual_seed(seed))

    def step() -> None:
        dp_optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        dp_optimizer.step()

    return step


def bench_model(model: str, batch: int, repeats: int = 10, block: int = 3, lr: float = 0.05,
                max_grad_norm: float = 1.0, noise_multiplier: float = 1.0, seed: int = 0) -> dict[str, Any]:
    """Median ms per step of the three steps (see the module docstring) for one model and batch size."""
    if model not in PRIVACY_MODELS:
        raise ValueError(f"bench privacy: unknown model {model!r}; choose among {', '.join(PRIVACY_MODELS)}")
    if batch <= 0 or repeats <= 0 or block <= 0:
        raise ValueError(f"bench privacy: batch, repeats and block must be positive, got {batch}, {repeats}, "
                         f"{block}")
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *MNIST_SHAPE, generator=generator)
    y = torch.randint(0, 10, (batch,), generator=generator)
    engine_net = PRIVACY_MODELS[model]().train()
    dp_net = PRIVACY_MODELS[model]().train()
    dp_net.load_state_dict(engine_net.state_dict())
    for net in (engine_net, dp_net):
        if isinstance(net, MLP):
            net.reuse_buffers = True  # as the tasks train an engine MLP
    plain, _ = _engine_steps(engine_net, x, y, lr, max_grad_norm, noise_multiplier, seed)
    _, private = _engine_steps(dp_net, x, y, lr, max_grad_norm, noise_multiplier, seed)
    steps = {"engine": plain, "engine_dp": private,
             "opacus": _opacus_step(engine_net, x, y, lr, max_grad_norm, noise_multiplier, seed)}
    device = torch.device("cpu")
    times: dict[str, list[float]] = {kind: [] for kind in KINDS}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook")  # Opacus's hooks on an input without grad
        while len(times["engine"]) < repeats:
            for kind in KINDS:
                steps[kind]()  # the first step of a block finds the caches holding the other steps' data
                times[kind] += [_timed(steps[kind], device) for _ in range(block)]
    return {"model": model, "batch": batch,
            **{f"{kind}_ms": 1e3 * statistics.median(times[kind]) for kind in KINDS}}


def run_privacy_bench(models: Sequence[str] = ("mlp", "cnn"), batches: Sequence[int] = (256, 64), repeats: int = 10,
                      threads: int | None = None, **options: Any) -> dict[str, Any]:
    """Time every (model, batch) pair; ``threads`` sets torch's CPU threads for the run (restored after).
    Returns ``{"threads", "max_grad_norm", "noise_multiplier", "results": [{model, batch, engine_ms,
    engine_dp_ms, opacus_ms}, ...]}``."""
    previous = torch.get_num_threads()
    if threads is not None:
        if threads <= 0:
            raise ValueError(f"bench privacy: threads must be positive, got {threads}")
        torch.set_num_threads(threads)
    try:
        results = [bench_model(model, batch, repeats, **options) for model in models for batch in batches]
        used = torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)
    return {"threads": used, "max_grad_norm": options.get("max_grad_norm", 1.0),
            "noise_multiplier": options.get("noise_multiplier", 1.0), "results": results}


def format_privacy_table(report: dict[str, Any]) -> str:
    """The report as a Markdown table, with the two ratios the targets are stated in."""
    lines = [f"one SGD step, median ms (cpu, {report['threads']} threads; C = {report['max_grad_norm']}, "
             f"σ = {report['noise_multiplier']})", "",
             "| model | batch | engine ms | engine DP ms | Opacus ms | DP / engine | Opacus / engine DP |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for row in report["results"]:
        lines.append(f"| {row['model']} | {row['batch']} | {row['engine_ms']:.2f} | {row['engine_dp_ms']:.2f} | "
                     f"{row['opacus_ms']:.2f} | {row['engine_dp_ms'] / row['engine_ms']:.2f}x | "
                     f"{row['opacus_ms'] / row['engine_dp_ms']:.2f}x |")
    return "\n".join(lines)
