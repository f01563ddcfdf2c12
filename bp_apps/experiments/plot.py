"""Loss and metric curves from the logs of Lightning runs, drawn into PNG files (``bp-apps plot``).

A run is a log directory (``lightning_logs/version_N``) or any folder above one: its newest
``metrics.csv`` (Lightning's ``CSVLogger``, on by default in ``bp-apps fit``) is read, or, without
one, its TensorBoard event files. Metrics are grouped by name without their stage and reduction
(``train_loss_epoch`` and ``val_loss`` are both ``loss``): one figure per group, one line per stage
and run, against the epoch when the metric is logged per epoch, else against the step. Several runs
go on the same figures, so they can be compared.

Each stage keeps one colour in every figure (:data:`STAGE_COLORS`: train blue, validation orange, test green);
runs differ by line style. Epoch axes have whole-number ticks. A test score is one number measured once, on the
best checkpoint after training (``bp-apps fit`` tests it), not a point of the training curve: it is drawn as a
lone star labelled "test (best checkpoint)" at the epoch it was logged at, never joined to the curves.
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

__all__ = ["STAGE_COLORS", "TEST_LABEL", "RunLog", "Series", "draw_figure", "find_log", "metric_group", "plot_runs",
           "read_run", "run_name"]

_STAGES = ("train", "val", "test")
_NOT_METRICS = {"epoch", "step", "hp_metric"}
STAGE_COLORS = {"train": "tab:blue", "val": "tab:orange", "test": "tab:green", "": "tab:gray"}
"""The colour of each stage in every figure (``""``: a metric of no stage, such as a learning rate)."""
TEST_LABEL = "test (best checkpoint)"
"""The legend entry of a test score."""
_RUN_STYLES = ("-", "--", ":", "-.")


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


@dataclass
class Series:
    """One line of a figure: a logged metric of one run, its stage and the run's position among those plotted."""

    label: str
    stage: str
    points: list[tuple[float | None, int, float]]
    run_index: int = 0


def draw_figure(group: str, per_step: bool, series: Sequence[Series]):
    """The matplotlib figure of one metric group: a line per series against the step or the epoch, each stage in
    its :data:`STAGE_COLORS` colour and each run in its own line style; test scores as lone stars (see the module's
    docstring). The caller saves and closes it."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(6.4, 4.0))
    axes = figure.subplots()
    order = {stage: i for i, stage in enumerate(("train", "val", "", "test"))}  # the legend reads train, val, test
    for line in sorted(series, key=lambda s: (order.get(s.stage, 2), s.run_index)):
        xs = [step if per_step else epoch for epoch, step, _ in line.points]
        keep = [(x, y) for x, (*_, y) in zip(xs, line.points) if x is not None and math.isfinite(y)]
        color = STAGE_COLORS.get(line.stage, STAGE_COLORS[""])
        if line.stage == "test":
            axes.plot([x for x, _ in keep], [y for _, y in keep], linestyle="none", marker="*", markersize=13,
                      markeredgecolor="black", markeredgewidth=0.6, color=color, label=line.label, zorder=3)
            continue
        axes.plot([x for x, _ in keep], [y for _, y in keep], color=color,
                  linestyle=_RUN_STYLES[line.run_index % len(_RUN_STYLES)], label=line.label,
                  marker=None if per_step else ".")
    axes.set_xlabel("step" if per_step else "epoch")
    if not per_step:  # epochs are whole numbers: no tick at 0.5
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_ylabel(group)
    axes.set_title(group + (" (per step)" if per_step else ""))
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    return figure


def _save_figure(figure, path: Path) -> None:
    """Save to a temporary name in the same folder, then rename: never a half-written PNG."""
    with atomic_output(path, suffix=".png") as temporary:
        figure.savefig(temporary, dpi=110)


def plot_runs(run_dirs: Sequence[str | Path], out_dir: str | Path, metrics: Sequence[str] | None = None,
              names: Sequence[str] | None = None) -> list[Path]:
    """One PNG per metric group (``loss.png``, ``acc.png`` ...; per-step series in ``<group>_steps.png``) in
    ``out_dir``, with a line per stage and run. ``metrics`` keeps only those groups. Returns the files written."""
    if not run_dirs:
        raise ValueError("give at least one run directory")
    if names is not None and len(names) != len(run_dirs):
        raise ValueError(f"{len(names)} names for {len(run_dirs)} runs")
    runs = [read_run(d, None if names is None else names[i]) for i, d in enumerate(run_dirs)]
    if names is None and len({r.name for r in runs}) < len(runs):  # same folder names: number them
        for i, run in enumerate(runs):
            run.name = f"{i + 1}: {run.name}"
    figures: dict[tuple[str, bool], list[Series]] = {}
    for index, run in enumerate(runs):
        for full, points in sorted(run.series.items()):
            group, stage, per_step = metric_group(full)
            if metrics and group not in metrics:
                continue
            per_step = per_step or all(epoch is None for epoch, _, _ in points)
            name = TEST_LABEL if stage == "test" else stage or full
            label = name if len(runs) == 1 else f"{run.name} {name}"
            figures.setdefault((group, per_step), []).append(Series(label, stage, points, index))
    if not figures:
        wanted = f" among {sorted(metrics)}" if metrics else ""
        raise ValueError(f"no metrics to plot{wanted} in {', '.join(str(r.source) for r in runs)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for (group, per_step), lines in sorted(figures.items()):
        figure = draw_figure(group, per_step, lines)
        path = out / f"{group}{'_steps' if per_step else ''}.png"
        _save_figure(figure, path)
        written.append(path)
    return written
