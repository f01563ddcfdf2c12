"""Speed benchmark of the engine's layers and task models: forward + backward, hand-written vs torch.autograd.

Each layer runs at a shape one of the tasks uses, from the same weights on the same input, engine and autograd
alternating in short blocks so that machine noise hits both alike (the first call of a block is not counted);
medians are reported. ``models`` times each task model's whole training step (forward, loss, backward, optimizer
step) on a synthetic batch of the config's shape, through the task module's own steps.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from bp_apps.engine import Layer
from bp_apps.engine.conv import BatchNorm2d, Conv1d, Conv2d, MaxPool2d
from bp_apps.engine.ctc import CTCLoss
from bp_apps.engine.gradcheck import reference_forward, reference_module
from bp_apps.engine.recurrent import GRU, LSTM
from bp_apps.experiments.bench import _timed

__all__ = ["LAYER_CASES", "LayerCase", "format_layers_table", "run_layers_bench", "time_pair"]


@dataclass(frozen=True)
class LayerCase:
    """One benchmarked layer: ``layer`` name in the report, the shape it is timed at, and how to build it."""

    layer: str
    shape: str
    build: Callable[[torch.device], tuple[Callable[[], object], Callable[[], object]]]


def time_pair(engine: Callable[[], object], autograd: Callable[[], object], device: torch.device, repeats: int,
              block: int = 5) -> tuple[float, float]:
    """Median milliseconds of each callable, timed in alternating blocks of ``block`` calls (the first call of each
    block is a warm-up), ``repeats`` counted calls each."""
    times: dict[str, list[float]] = {"engine": [], "autograd": []}
    while len(times["engine"]) < repeats:
        for name, fn in (("engine", engine), ("autograd", autograd)):
            fn()
            times[name] += [_timed(fn, device) for _ in range(block)]
    return 1e3 * statistics.median(times["engine"]), 1e3 * statistics.median(times["autograd"])


def _layer_pair(layer: Layer, x: Tensor, input_grad: bool = True,
                lengths: Tensor | None = None) -> tuple[Callable[[], object], Callable[[], object]]:
    """Forward + backward of an engine layer and of its ``torch.nn`` twin (same weights) on ``x`` (a recurrent
    layer's sequences of ``lengths``, which its twin reads packed)."""
    twin = reference_module(layer)
    extra = () if lengths is None else (lengths,)
    grad = torch.randn_like(layer.forward(x, *extra))
    x_ref = x.clone().requires_grad_(input_grad)
    if hasattr(layer, "needs_input_grad"):
        layer.needs_input_grad = input_grad

    def engine() -> None:
        with torch.no_grad():
            layer.forward(x, *extra)
            layer.backward(grad)

    def autograd() -> None:
        for p in twin.parameters():
            p.grad = None
        reference_forward(twin, layer, x_ref, lengths).backward(grad)

    return engine, autograd


def _conv2d(batch: int, c_in: int, c_out: int, size: tuple[int, int], stride: int = 1, input_grad: bool = True):
    def build(device: torch.device):
        layer = Conv2d(c_in, c_out, 3, stride=stride, padding=1).to(device)
        return _layer_pair(layer, torch.randn(batch, c_in, *size, device=device), input_grad)
    return build


def _plain(layer_factory: Callable[[], Layer], shape: tuple[int, ...]):
    def build(device: torch.device):
        return _layer_pair(layer_factory().to(device), torch.randn(*shape, device=device))
    return build


def _recurrent(cls: type, batch: int, frames: int, size: int):
    def build(device: torch.device):
        layer = cls(size, size, num_layers=2, batch_first=True, bidirectional=True).to(device)
        lengths = torch.linspace(frames // 2, frames, batch).long()
        return _layer_pair(layer, torch.randn(batch, frames, size, device=device), lengths=lengths.to(device))
    return build


def _ctc(batch: int, frames: int, classes: int):
    def build(device: torch.device):
        generator = torch.Generator().manual_seed(0)
        logits = torch.randn(batch, frames, classes, generator=generator).to(device)
        input_lengths = torch.linspace(0.6 * frames, frames, batch).long()
        target_lengths = torch.linspace(10, 40, batch).long()
        targets = torch.randint(1, classes, (batch, 40), generator=generator)
        loss = CTCLoss(blank=0, reduction="mean", zero_infinity=True)
        log_probs = torch.log_softmax(logits, -1)
        logits_ref = logits.clone().requires_grad_(True)

        def engine() -> None:
            loss.forward(log_probs, targets.to(device), input_lengths.to(device), target_lengths.to(device))
            loss.backward()

        def autograd() -> None:
            logits_ref.grad = None
            lp = torch.log_softmax(logits_ref, -1).transpose(0, 1)
            torch.nn.functional.ctc_loss(lp, targets.to(device), input_lengths, target_lengths, blank=0,
                                         zero_infinity=True).backward()

        return engine, autograd
    return build


LAYER_CASES = (
    LayerCase("conv2d", "(128, 32, 28, 28) → 32, 3×3 (MNIST CNN)", _conv2d(128, 32, 32, (28, 28))),
    LayerCase("conv2d", "(128, 64, 14, 14) → 64, 3×3 (MNIST CNN)", _conv2d(128, 64, 64, (14, 14))),
    LayerCase("conv2d", "(128, 1, 28, 28) → 32, 3×3, no dx (MNIST CNN, first)",
              _conv2d(128, 1, 32, (28, 28), input_grad=False)),
    LayerCase("conv2d", "(32, 32, 200, 20) → 32, 3×3 stride 2 (speech subsampling)",
              _conv2d(32, 32, 32, (200, 20), stride=2)),
    LayerCase("conv1d", "(32, 128, 100) → 128, k3", _plain(lambda: Conv1d(128, 128, 3, padding=1), (32, 128, 100))),
    LayerCase("maxpool2d", "(128, 32, 28, 28), 2×2", _plain(lambda: MaxPool2d(2), (128, 32, 28, 28))),
    LayerCase("batchnorm2d", "(128, 32, 28, 28)", _plain(lambda: BatchNorm2d(32), (128, 32, 28, 28))),
    LayerCase("gru", "B 32, T 100 (lengths 50–100), 128 → 128, 2 layers, bidirectional",
              _recurrent(GRU, 32, 100, 128)),
    LayerCase("lstm", "B 32, T 100 (lengths 50–100), 128 → 128, 2 layers, bidirectional",
              _recurrent(LSTM, 32, 100, 128)),
    LayerCase("ctc", "B 32, T 100 (lengths 60–100), 29 classes, targets 10–40", _ctc(32, 100, 29)),
)


def model_step_pair(module: Any, batch: Any) -> tuple[Callable[[], object], Callable[[], object]]:
    """A whole training step of an engine task module and of its autograd twin (same weights), on ``batch``."""
    from bp_apps.experiments.compare_tasks import _autograd_step, _engine_step, _optimizer, autograd_twin

    module.train()
    twin = autograd_twin(module).train()
    engine_step, autograd_step = _engine_step(module, _optimizer(module)), _autograd_step(twin, _optimizer(twin))
    return (lambda: engine_step(batch)), (lambda: autograd_step(batch))


def run_layers_bench(models: Sequence[tuple[str, str, Any, Any]] = (), device: str = "cpu", repeats: int = 20,
                     cases: Sequence[LayerCase] = LAYER_CASES, seed: int = 0) -> dict[str, Any]:
    """Median ms of forward + backward for each of ``cases``, and of a training step for each
    ``(task, config, engine task module, batch)`` of ``models``; engine vs autograd, alternating, in one run."""
    dev = torch.device(device)
    torch.manual_seed(seed)
    layers = []
    for case in cases:
        engine_ms, autograd_ms = time_pair(*case.build(dev), dev, repeats)
        layers.append({"layer": case.layer, "shape": case.shape, "engine_ms": engine_ms, "autograd_ms": autograd_ms})
    rows = []
    for task, config, module, batch in models:
        engine_ms, autograd_ms = time_pair(*model_step_pair(module.to(dev), batch), dev, max(5, repeats // 2))
        rows.append({"task": task, "config": config, "engine_ms": engine_ms, "autograd_ms": autograd_ms})
    return {"device": device, "threads": torch.get_num_threads(), "repeats": repeats, "layers": layers,
            "models": rows}


def format_layers_table(report: dict[str, Any]) -> str:
    """The report as a Markdown table: ms per call and the speed-up (autograd ms / engine ms)."""
    lines = [f"forward + backward, median ms ({report['device']}, {report['threads']} threads)", "",
             "| layer / model | shape / config | engine ms | autograd ms | speed-up |", "|---|---|---:|---:|---:|"]
    for row in report["layers"]:
        lines.append(f"| {row['layer']} | {row['shape']} | {row['engine_ms']:.2f} | {row['autograd_ms']:.2f} | "
                     f"{row['autograd_ms'] / row['engine_ms']:.2f}x |")
    for row in report["models"]:
        lines.append(f"| {row['task']} training step | {row['config']} | {row['engine_ms']:.1f} | "
                     f"{row['autograd_ms']:.1f} | {row['autograd_ms'] / row['engine_ms']:.2f}x |")
    return "\n".join(lines)


def synthetic_batch(module: Any, batch_size: int, seed: int = 0) -> Any:
    """A random training batch of the shape ``module``'s task trains on (images; 4 s utterances with 5–40
    character targets; 1 s spoken digits), for timing a step without reading data; None for the text tasks, whose
    batches need the data's vocabulary (time them on a real batch)."""
    from bp_apps.speech.data import SpeechBatch

    generator = torch.Generator().manual_seed(seed)
    hparams = module.hparams
    if module.task_name.startswith("text."):
        return None
    if module.task_name == "vision.ImageClassifier":
        images = torch.randn(batch_size, *hparams["input_shape"], generator=generator)
        return images, torch.randint(0, hparams["num_classes"], (batch_size,), generator=generator)
    lengths = torch.linspace(0.5, 1.0, batch_size)
    if module.task_name.endswith("SpokenDigitClassifier"):
        frames = 100
        features = torch.randn(batch_size, frames, hparams["input_dim"], generator=generator)
        labels = torch.randint(0, hparams["num_classes"], (batch_size,), generator=generator)
        return (features, (lengths * frames).long()), labels
    frames, vocab = 400, module.net.vocab_size
    target_lengths = torch.linspace(5, 40, batch_size).long()
    return SpeechBatch(torch.randn(batch_size, frames, hparams["input_dim"], generator=generator),
                       (lengths * frames).long(), torch.randint(1, vocab, (batch_size, 40), generator=generator),
                       target_lengths, [""] * batch_size)
