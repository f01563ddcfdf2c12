"""Loss and metric curves from the logs of Lightning runs, drawn into PNG files (``bp-apps plot``).

A run is a log directory (``lightning_logs/version_N``) or any folder above one: its newest
``metrics.csv`` (Lightning's ``CSVLogger``, on by default in ``bp-apps fit``) is read, or, without
one, its TensorBoard event files. Metrics are grouped by name without their stage and reduction
(``train_loss_epoch`` and ``val_loss`` are both ``loss``): one figure per group, one line per stage
and run, against the epoch when the metric is logged per epoch, else against the step. Several runs
go on the same figures, so they can be compared.
"""

from __future__ import annotations

import csv
import math
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bp_apps.core.io import atomic_output

__all__ = ["RunLog", "find_log", "metric_group", "plot_runs", "read_run", "run_name"]

_STAGES = ("train", "val", "test")
_NOT_METRICS = {"epoch", "step", "hp_metric"}


@dataclass
class RunLog:
    """A run's logged scalars: ``series[name]`` is a list of (epoch or None, step, value)."""

    name: str
    source: Path
    series: dict[str, list[tuple[float | None, int, float]]] = field(default_factory=dict)


def find_log(run_dir: str | Path) -> Path:
    """The metrics file of a run: ``run_dir``'s newest ``metrics.csv`` (searched below it), else its newest
    TensorBoard event file (whose folder's event files are read together). A clear error when there is neither."""
    run_dir = Path(run_dir)
    if run_dir.is_file():
        return run_dir
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {str(run_dir)!r} does not exist")
    for pattern in ("metrics.csv", "events.out.tfevents*"):
        found = sorted(run_dir.rglob(pattern), key=lambda p: p.stat().st_mtime)
        if found:
            return found[-1]
    raise FileNotFoundError(f"{run_dir}: no metrics.csv or TensorBoard event file below it (was the run logged? "
                            "bp-apps fit logs both by default)")


def _read_csv(path: Path, log: RunLog) -> None:
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or "step" not in reader.fieldnames:
            raise ValueError(f"{path}: not a Lightning metrics.csv (no 'step' column)")
        for row in reader:
            epoch = row.get("epoch") or None
            step = int(float(row["step"] or 0))
            for name, text in row.items():
                if name in _NOT_METRICS or not text:
                    continue
                try:
                    value = float(text)
                except ValueError:
                    continue
                log.series.setdefault(name, []).append((float(epoch) if epoch else None, step, value))


def _tfevent_records(data: bytes):
    """The serialized records of a TFRecord file (length, length CRC, payload, payload CRC)."""
    offset = 0
    while offset + 12 <= len(data):
        (length,) = struct.unpack("<Q", data[offset:offset + 8])
        start = offset + 12
        if start + length + 4 > len(data):
            return  # a file still being written ends mid-record
        yield data[start:start + length]
        offset = start + length + 4


def _read_tfevents(path: Path, log: RunLog) -> None:
    try:
        from tensorboardX.proto import event_pb2
    except ImportError as error:
        raise ImportError(f"{path}: reading TensorBoard files needs tensorboardX; log with CSVLogger instead"
                          ) from error
    epochs: dict[int, float] = {}
    scalars: list[tuple[str, int, float]] = []
    for record in _tfevent_records(path.read_bytes()):
        event = event_pb2.Event()
        event.ParseFromString(record)
        for value in event.summary.value:
            if value.tag == "epoch":
                epochs[event.step] = value.simple_value
            elif value.tag not in _NOT_METRICS and value.HasField("simple_value"):
                scalars.append((value.tag, event.step, value.simple_value))
    for tag, step, value in scalars:
        log.series.setdefault(tag, []).append((epochs.get(step), step, value))


def run_name(run_dir: str | Path) -> str:
    """A short name for a run: ``runs/a/lightning_logs/version_3`` -> ``a/version_3``, else the folder's name."""
    path = Path(run_dir).resolve()
    if re.fullmatch(r"version_\d+", path.name) and path.parent.name == "lightning_logs":
        return f"{path.parent.parent.name}/{path.name}"
    return path.name


def read_run(run_dir: str | Path, name: str | None = None) -> RunLog:
    """The scalars logged by a run (see :func:`find_log`)."""
    source = find_log(run_dir)
    log = RunLog(name or run_name(run_dir), source)
    if source.name.endswith(".csv"):
        _read_csv(source, log)
    else:  # a run's folder can hold several event files (a test after the fit starts a new one): read them all
        for events in sorted(source.parent.glob("events.out.tfevents*"), key=lambda p: p.stat().st_mtime):
            _read_tfevents(events, log)
    if not log.series:
        raise ValueError(f"{source}: no metrics logged yet")
    return log


def metric_group(name: str) -> tuple[str, str, bool]:
    """(group, stage, per_step) of a logged name: ``train_loss_epoch`` -> ('loss', 'train', False),
    ``train_loss_step`` -> ('loss', 'train', True), ``val_f1`` -> ('f1', 'val', False)."""
    stage = ""
    for prefix in _STAGES:
        if name.startswith(prefix + "_"):
            stage, name = prefix, name[len(prefix) + 1:]
            break
    per_step = name.endswith("_step")
    name = re.sub(r"_(epoch|step)$", "", name)
    return name, stage, per_step


def _save_figure(figure, path: Path) -> None:
    """Save to a temporary name in the same folder, then rename: never a half-written PNG."""
    with atomic_output(path, suffix=".png") as temporary:
        figure.savefig(temporary, dpi=110)


def plot_runs(run_dirs: Sequence[str | Path], out_dir: str | Path, metrics: Sequence[str] | None = None,
              names: Sequence[str] | None = None) -> list[Path]:
    """One PNG per metric group (``loss.png``, ``acc.png`` ...; per-step series in ``<group>_steps.png``) in
    ``out_dir``, with a line per stage and run. ``metrics`` keeps only those groups. Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not run_dirs:
        raise ValueError("give at least one run directory")
    if names is not None and len(names) != len(run_dirs):
        raise ValueError(f"{len(names)} names for {len(run_dirs)} runs")
    runs = [read_run(d, None if names is None else names[i]) for i, d in enumerate(run_dirs)]
    if names is None and len({r.name for r in runs}) < len(runs):  # same folder names: number them
        for i, run in enumerate(runs):
            run.name = f"{i + 1}: {run.name}"
    figures: dict[tuple[str, bool], list[tuple[str, list[tuple[float | None, int, float]]]]] = {}
    for run in runs:
        for full, points in sorted(run.series.items()):
            group, stage, per_step = metric_group(full)
            if metrics and group not in metrics:
                continue
            per_step = per_step or all(epoch is None for epoch, _, _ in points)
            label = f"{stage or full}" if len(runs) == 1 else f"{run.name} {stage or full}"
            figures.setdefault((group, per_step), []).append((label, points))
    if not figures:
        wanted = f" among {sorted(metrics)}" if metrics else ""
        raise ValueError(f"no metrics to plot{wanted} in {', '.join(str(r.source) for r in runs)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for (group, per_step), lines in sorted(figures.items()):
        figure, axes = plt.subplots(figsize=(6.4, 4.0))
        for label, points in lines:
            xs = [step if per_step else epoch for epoch, step, _ in points]
            ys = [value for *_, value in points]
            keep = [(x, y) for x, y in zip(xs, ys) if x is not None and math.isfinite(y)]
            axes.plot([x for x, _ in keep], [y for _, y in keep], "-", label=label, marker=None if per_step else ".")
        axes.set_xlabel("step" if per_step else "epoch")
        axes.set_ylabel(group)
        axes.set_title(group + (" (per step)" if per_step else ""))
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
        figure.tight_layout()
        path = out / f"{group}{'_steps' if per_step else ''}.png"
        _save_figure(figure, path)
        plt.close(figure)
        written.append(path)
    return written
