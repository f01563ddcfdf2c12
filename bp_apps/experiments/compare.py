"""Side-by-side training: the hand-written engine and torch.autograd on the same MLP.

Both backends start from the same weights (``MLP.to_autograd`` copies them), see the same
batches in the same order and use the same optimizer rule (hand-written vs ``torch.optim``).
The report holds the float64 gradient check, the per-step loss difference, test accuracy,
median milliseconds per training step and peak tensor memory of one step.
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from bp_apps.core.io import atomic_output, atomic_write_bytes, atomic_write_text
from bp_apps.core.samplers import batch_order
from bp_apps.engine import MLP, SoftmaxCrossEntropy, build_optimizer, train_step
from bp_apps.engine.gradcheck import mlp_gradient_errors
from bp_apps.experiments.bench import synchronize
from bp_apps.vision.data import load_digits_split

DTYPES = {"float32": torch.float32, "float64": torch.float64}
TORCH_OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


@dataclass
class CompareConfig:
    """What to train and how; every field is a ``bp-apps compare`` option."""

    width: int = 128
    depth: int = 2
    activation: str = "relu"
    batch_size: int = 32
    epochs: int = 20
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    dtype: str = "float32"
    device: str = "cpu"
    seed: int = 0
    split_seed: int = 0
    hidden: list[int] = field(init=False)

    def __post_init__(self) -> None:
        if self.width <= 0 or self.depth < 0 or self.batch_size <= 0 or self.epochs <= 0:
            raise ValueError(f"width, batch_size and epochs must be positive and depth >= 0, got width={self.width}, "
                             f"depth={self.depth}, batch_size={self.batch_size}, epochs={self.epochs}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.optimizer not in TORCH_OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(TORCH_OPTIMIZERS)}, got {self.optimizer!r}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r} asked for, but CUDA is not available on this machine")
        self.hidden = [self.width] * self.depth

    def optimizer_kwargs(self) -> dict[str, float]:
        return {"lr": self.lr, "momentum": self.momentum} if self.optimizer == "sgd" else {"lr": self.lr}


def _tensor_bytes(tensors: list[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def peak_step_memory_mb(step: Callable[[], object], persistent: list[Tensor], device: torch.device) -> float:
    """Peak tensor memory of one training step in MiB: the persistent state (weights, gradient
    buffers, optimizer state) plus the peak of what the step allocates on top of it. On CPU the
    allocations come from the profiler's memory events; on CUDA from the caching allocator."""
    if device.type == "cuda":
        synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        synchronize(device)
        transient = torch.cuda.max_memory_allocated(device) - base
    else:
        import os
        import warnings

        from torch.profiler import ProfilerActivity, profile

        os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # kineto's own start-up chatter, not ours to show
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                step()
        events = []
        for event in prof.events():
            amount = event.cpu_memory_usage if event.name == "[memory]" else event.self_cpu_memory_usage
            if amount:
                events.append((event.time_range.start, amount))
        current = transient = 0
        for _, amount in sorted(events):
            current += amount
            transient = max(transient, current)
    return (_tensor_bytes(persistent) + transient) / 2**20


@torch.no_grad()
def accuracy(predict: Callable[[Tensor], Tensor], x: Tensor, y: Tensor) -> float:
    return (predict(x).argmax(dim=1) == y).float().mean().item()


def run_comparison(config: CompareConfig) -> dict:
    """Train both backends on digits and return the report as a plain dict."""
    device, dtype = torch.device(config.device), DTYPES[config.dtype]
    data = load_digits_split(random_state=config.split_seed, standardize=True)
    x_train, y_train = data.x_train.to(device, dtype), data.y_train.to(device)
    x_test, y_test = data.x_test.to(device, dtype), data.y_test.to(device)

    torch.manual_seed(config.seed)
    engine = MLP(data.num_features, config.hidden, data.num_classes, activation=config.activation,
                 reuse_buffers=True, device=device, dtype=dtype)
    twin = engine.to_autograd()

    first_batch = batch_order(len(y_train), config.batch_size, config.seed)[0]
    grad_errors = mlp_gradient_errors(copy.deepcopy(engine).double(), x_train[first_batch].double(),
                                      y_train[first_batch])

    loss_fn = SoftmaxCrossEntropy()
    engine_opt = build_optimizer(config.optimizer, engine.parameters(), **config.optimizer_kwargs())
    torch_opt = TORCH_OPTIMIZERS[config.optimizer](twin.parameters(), **config.optimizer_kwargs())

    def engine_step(x: Tensor, y: Tensor) -> Tensor:
        return train_step(engine, loss_fn, engine_opt, x, y)[0]

    def autograd_step(x: Tensor, y: Tensor) -> Tensor:
        torch_opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(twin(x), y)
        loss.backward()
        torch_opt.step()
        return loss.detach()

    losses: dict[str, list[float]] = {"engine": [], "autograd": []}
    seconds: dict[str, list[float]] = {"engine": [], "autograd": []}
    for epoch in range(config.epochs):
        for index in batch_order(len(y_train), config.batch_size, config.seed, epoch):
            x, y = x_train[index], y_train[index]
            for name, step in (("engine", engine_step), ("autograd", autograd_step)):
                synchronize(device)
                start = time.perf_counter()
                loss = step(x, y)
                synchronize(device)
                seconds[name].append(time.perf_counter() - start)
                losses[name].append(loss.item())

    engine.eval()
    twin.eval()
    backends = {name: {"test_accuracy": accuracy(predict, x_test, y_test),
                       "ms_per_step": 1e3 * statistics.median(seconds[name])}
                for name, predict in (("engine", engine.forward), ("autograd", twin))}
    engine.train()
    twin.train()
    # Measured after the accuracy, on one extra step, so it cannot change what is reported above.
    persistent = {"engine": [*engine.parameters(), *engine.gradients(), *engine.workspaces(),
                             *_optimizer_tensors(engine_opt)],
                  "autograd": [*twin.parameters(), *_optimizer_tensors(torch_opt)]}
    sample_x, sample_y = x_train[first_batch], y_train[first_batch]
    for name, step in (("engine", engine_step), ("autograd", autograd_step)):
        backends[name]["peak_memory_mb"] = peak_step_memory_mb(lambda s=step: s(sample_x, sample_y),
                                                               persistent[name], device)

    return comparison_report(asdict(config), grad_errors, losses, backends)


def comparison_report(config: dict, grad_errors: dict[str, float], losses: dict[str, list[float]],
                      backends: dict[str, dict[str, float]]) -> dict:
    """The report both comparisons write: the setup, the float64 gradient errors, both loss curves with their
    largest step difference, and each backend's figures."""
    diffs = [abs(a - b) for a, b in zip(losses["engine"], losses["autograd"], strict=True)]
    return {
        "config": config,
        "max_grad_rel_error": max(grad_errors.values()),
        "grad_rel_error_per_parameter": grad_errors,
        "max_loss_trajectory_diff": max(diffs),
        "steps": len(diffs),
        "loss_curves": losses,
        "backends": backends,
    }


def _optimizer_tensors(optimizer: object) -> list[Tensor]:
    """The state tensors an optimizer keeps between steps (momentum, Adam moments)."""
    if isinstance(optimizer, torch.optim.Optimizer):
        return [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0]
    return [t for buffers in optimizer.state.values() for t in buffers]


def format_markdown(report: dict) -> str:
    """The report as a Markdown table with a line on the setup."""
    cfg, man, auto = report["config"], report["backends"]["engine"], report["backends"]["autograd"]
    if "task" in cfg:  # a task's model (experiments.compare_tasks)
        header = (f"{cfg['network']} ({cfg['task']}), first {report['steps']} training steps, {cfg['optimizer']} lr "
                  f"{cfg['lr']}; {cfg['setup']}")
        quality = f"| training loss after the last step | {man['final_loss']:.4f} | {auto['final_loss']:.4f} |"
    else:
        header = (f"MLP 64-{'-'.join(map(str, cfg['hidden']))}-10 ({cfg['activation']}), {cfg['optimizer']} lr "
                  f"{cfg['lr']}, batch {cfg['batch_size']}, {cfg['epochs']} epochs ({report['steps']} steps), "
                  f"{cfg['dtype']} on {cfg['device']}, seed {cfg['seed']}")
        quality = f"| test accuracy | {man['test_accuracy']:.4f} | {auto['test_accuracy']:.4f} |"
    lines = [
        header,
        "",
        "| metric | engine | autograd |",
        "|---|---:|---:|",
        quality,
        f"| ms per step (median) | {man['ms_per_step']:.3f} | {auto['ms_per_step']:.3f} |",
        f"| peak memory of a step (MiB) | {man['peak_memory_mb']:.3f} | {auto['peak_memory_mb']:.3f} |",
        "",
        f"- max gradient relative error, engine vs autograd (float64): {report['max_grad_rel_error']:.2e}",
        f"- max loss difference over all steps ({cfg.get('dtype', 'float32')}): "
        f"{report['max_loss_trajectory_diff']:.2e}",
    ]
    return "\n".join(lines)


def report_figure(report: dict):
    """The figure of ``compare.png``: loss curves of both backends, their per-step difference and the
    per-parameter gradient error, the last two on log scales.

    A log scale cannot show 0, and the two backends often agree exactly (a loss difference or a gradient error of
    exactly 0). Such values are not drawn as data at some small floor, which would read as a measured 1e-12:
    steps with no difference are marked by ticks along the bottom of the panel, and parameters with no error by
    the words "exactly 0" in place of a bar, both named in the legend. The caller saves and closes it."""
    from matplotlib.figure import Figure
    from matplotlib.transforms import blended_transform_factory

    fig = Figure(figsize=(15, 4))
    ax_loss, ax_diff, ax_grad = fig.subplots(1, 3)
    for name, style in (("engine", "-"), ("autograd", "--")):
        ax_loss.plot(report["loss_curves"][name], style, label=name, linewidth=1)
    ax_loss.set(title="training loss", xlabel="step", ylabel="cross-entropy", yscale="log")
    ax_loss.legend()

    diffs = [abs(a - b) for a, b in zip(*report["loss_curves"].values())]
    positive = [d if d > 0 else float("nan") for d in diffs]  # a gap in the line where the difference is 0
    zeros = [step for step, d in enumerate(diffs) if d == 0]
    ax_diff.plot(positive, linewidth=0.8, marker=".", markersize=2, label="difference > 0")
    if zeros:  # at the panel's bottom edge (axes coordinates), not at a y value
        bottom = blended_transform_factory(ax_diff.transData, ax_diff.transAxes)
        ax_diff.plot(zeros, [0.0] * len(zeros), linestyle="none", marker="|", markersize=10, color="tab:red",
                     transform=bottom, clip_on=False, label=f"exactly 0 ({len(zeros)} of {len(diffs)} steps)")
    ax_diff.set(title="|loss engine − loss autograd|", xlabel="step")
    if any(d > 0 for d in diffs):
        ax_diff.set_yscale("log")
    ax_diff.legend(fontsize=8)

    names = list(report["grad_rel_error_per_parameter"])
    errors = list(report["grad_rel_error_per_parameter"].values())
    kept = [(i, e) for i, e in enumerate(errors) if e > 0]
    ax_grad.barh([i for i, _ in kept], [e for _, e in kept], label="relative error > 0")
    ax_grad.set(title="gradient relative error (float64)", yticks=range(len(names)))
    ax_grad.set_yticklabels(names)
    ax_grad.set_ylim(-0.5, len(names) - 0.5)
    if kept:
        ax_grad.set_xscale("log")
        ax_grad.set_xlim(left=min(e for _, e in kept) / 10)  # the smallest bar stays visible
    exact = [i for i, e in enumerate(errors) if e == 0]
    if exact:
        left = blended_transform_factory(ax_grad.transAxes, ax_grad.transData)
        for i in exact:
            ax_grad.text(0.02, i, "exactly 0", transform=left, va="center", fontsize=8, color="tab:red")
        ax_grad.plot([], [], linestyle="none", marker="$0$", color="tab:red",
                     label=f"exactly 0 ({len(exact)} of {len(names)} parameters)")
    if kept or exact:
        ax_grad.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_report(report: dict, path: Path) -> None:
    """Draw :func:`report_figure` to ``path`` atomically."""
    fig = report_figure(report)
    with atomic_output(path, suffix=".png") as temporary:
        fig.savefig(temporary, dpi=110, format="png")


def write_report(report: dict, out_dir: Path, json_path: Path | None = None) -> dict[str, Path]:
    """Write compare.md, compare.png (and the JSON when asked); return the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out_dir / "compare.md", "plot": out_dir / "compare.png"}
    atomic_write_text(paths["markdown"], format_markdown(report) + "\n")
    plot_report(report, paths["plot"])
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(json_path, json.dumps(report, indent=2).encode())
        paths["json"] = json_path
    return paths

