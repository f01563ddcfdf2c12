"""Speed benchmark: one MLP training step, hand-written engine vs torch.autograd.

Both sides train an MLP in_features-H-H-classes with plain SGD (the article's update
θ ← θ − α·∂L/∂θ) on the same fixed batch, from the same weights. Steps run in short blocks
of back-to-back steps, as in a training loop, and the blocks of the two backends (and of a
plain ``torch.mm``) alternate, so that machine noise hits all of them alike. The first step
of each block (caches still holding the other backend's data) is not counted; medians are
reported.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from itertools import pairwise

import torch
import torch.nn.functional as F

from bp_apps.engine import MLP, SGD, SoftmaxCrossEntropy, train_step

DEFAULT_SIZES = ((64, 128), (256, 512), (1024, 1024))


def step_matmul_flops(batch: int, widths: Sequence[int]) -> int:
    """Matrix-product FLOPs of one step: forward, weight gradients and input gradients
    (the first layer's input gradient is not needed and not computed)."""
    layer = [2 * batch * a * b for a, b in pairwise(widths)]
    return 3 * sum(layer) - layer[0]


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock timings cover it (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def bench_size(batch: int, hidden: int, *, in_features: int = 784, classes: int = 10, repeats: int = 50,
               warmup: int = 5, block_size: int = 5, device: str = "cpu", seed: int = 0,
               matmul_size: int | None = None) -> dict:
    """Median milliseconds per step for both backends at one (batch, hidden) size and, with
    ``matmul_size``, two references timed in the same loop: a square ``torch.mm`` of that size,
    and the step's own eight matrix products alone (their shapes are less efficient than a
    square; the gap between that and the engine step is everything that is not a matmul).
    The references are left out otherwise: between small steps they would evict the steps'
    data from cache."""
    dev = torch.device(device)
    torch.manual_seed(seed)
    engine = MLP(in_features, [hidden, hidden], classes, reuse_buffers=True, device=dev)
    twin = engine.to_autograd()
    x = torch.randn(batch, in_features, device=dev)
    y = torch.randint(0, classes, (batch,), device=dev)
    loss_fn, engine_opt = SoftmaxCrossEntropy(), SGD(engine.parameters(), lr=0.01)
    torch_opt = torch.optim.SGD(twin.parameters(), lr=0.01)
    size = matmul_size or 1
    a, b = torch.randn(size, size, device=dev), torch.randn(size, size, device=dev)
    out = torch.empty(size, size, device=dev)

    def engine_step() -> None:
        train_step(engine, loss_fn, engine_opt, x, y, nonfinite="ignore")

    def autograd_step() -> None:
        torch_opt.zero_grad(set_to_none=True)
        F.cross_entropy(twin(x), y).backward()
        torch_opt.step()

    def matmul() -> None:
        torch.mm(a, b, out=out)

    widths = [in_features, hidden, hidden, classes]
    weights = [torch.randn(o, i, device=dev) for i, o in pairwise(widths)]
    acts = [x] + [torch.randn(batch, w, device=dev) for w in widths[1:]]
    weight_grads = [torch.empty_like(w) for w in weights]
    input_grads = [torch.empty(batch, w, device=dev) for w in widths[1:-1]]

    def step_matmuls() -> None:
        for i, w in enumerate(weights):
            torch.mm(acts[i], w.t(), out=acts[i + 1])
        for i in reversed(range(len(weights))):
            torch.mm(acts[i + 1].t(), acts[i], out=weight_grads[i])
            if i:
                torch.mm(acts[i + 1], weights[i], out=input_grads[i - 1])

    timed = {"engine": engine_step, "autograd": autograd_step}
    if matmul_size:
        timed["matmul"], timed["step_matmuls"] = matmul, step_matmuls
    for _ in range(warmup):
        for fn in timed.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in timed}
    while len(times["engine"]) < repeats:
        for name, fn in timed.items():
            block = [_timed(fn, dev) for _ in range(block_size + 1)]
            times[name].extend(block[1:])
    median = {k: statistics.median(v) for k, v in times.items()}
    flops = step_matmul_flops(batch, [in_features, hidden, hidden, classes])
    result = {
        "batch": batch, "hidden": hidden,
        "engine_ms": median["engine"] * 1e3, "autograd_ms": median["autograd"] * 1e3,
        "speedup": median["autograd"] / median["engine"],
        "engine_gflops": flops / median["engine"] / 1e9,
        "autograd_gflops": flops / median["autograd"] / 1e9,
    }
    if matmul_size:
        result["matmul_gflops"] = 2 * matmul_size**3 / median["matmul"] / 1e9
        result["step_matmul_gflops"] = flops / median["step_matmuls"] / 1e9
    return result


def run_core_bench(sizes: Sequence[tuple[int, int]] = DEFAULT_SIZES, repeats: int | None = None,
                   device: str = "cpu", seed: int = 0) -> dict:
    """Benchmark every (batch, hidden) size. ``matmul_gflops`` is a square ``torch.mm`` of the
    largest hidden width, timed interleaved with the largest size's steps."""
    largest_size = max(sizes, key=lambda s: s[0] * s[1])
    results = []
    for batch, hidden in sizes:
        flops = step_matmul_flops(batch, [784, hidden, hidden, 10])
        n = repeats if repeats is not None else max(15, min(300, int(4e9 / flops)))
        results.append(bench_size(batch, hidden, repeats=n, device=device, seed=seed,
                                  matmul_size=hidden if (batch, hidden) == largest_size else None))
    largest = results[sizes.index(largest_size)]
    return {
        "device": device, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "matmul_gflops": largest["matmul_gflops"],
        "matmul_fraction_at_largest": largest["engine_gflops"] / largest["matmul_gflops"],
        "step_matmul_gflops": largest["step_matmul_gflops"],
        "step_matmul_fraction_at_largest": largest["engine_gflops"] / largest["step_matmul_gflops"],
        "results": results,
    }


def format_core_table(report: dict) -> str:
    """A Markdown table of a ``run_core_bench`` report."""
    lines = [f"device {report['device']}, {report['threads']} threads, torch {report['torch']}; "
             f"torch.mm {report['matmul_gflops']:.1f} GFLOP/s (square); the largest step's own matmuls alone "
             f"{report['step_matmul_gflops']:.1f} GFLOP/s, of which the engine step reaches "
             f"{100 * report['step_matmul_fraction_at_largest']:.0f}%",
             "",
             "| batch | hidden | engine ms | autograd ms | speed-up | engine GFLOP/s | % of torch.mm |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["results"]:
        lines.append(f"| {r['batch']} | {r['hidden']} | {r['engine_ms']:.3f} | {r['autograd_ms']:.3f} | "
                     f"{r['speedup']:.2f}x | {r['engine_gflops']:.1f} | "
                     f"{100 * r['engine_gflops'] / report['matmul_gflops']:.0f}% |")
    return "\n".join(lines)
