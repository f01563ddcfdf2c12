"""`bp-apps plot` and the default loggers of `bp-apps fit`: curves from real runs' logs."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from bp_apps.cli import main
from bp_apps.experiments import plot as plot_module
from bp_apps.experiments.plot import (
    STAGE_COLORS,
    TEST_LABEL,
    RunLog,
    Series,
    draw_figure,
    find_log,
    metric_group,
    plot_runs,
    read_run,
    run_name,
)

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def fitted_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two `bp-apps fit` runs of the digits MLP (two epochs each) in one root: version_0 and version_1."""
    root = tmp_path_factory.mktemp("runs")
    config = ROOT / "configs" / "vision" / "digits_mlp_engine.yaml"
    for _ in range(2):
        argv = ["fit", "--config", str(config), "--trainer.max_epochs=2", f"--trainer.default_root_dir={root}",
                "--trainer.enable_progress_bar=false"]
        assert main(argv) == 0
    return root


def test_fit_logs_csv_and_tensorboard_into_one_version_folder(fitted_runs: Path) -> None:
    versions = sorted(p.name for p in (fitted_runs / "lightning_logs").iterdir())
    assert versions == ["version_0", "version_1"]  # no collision: the second run takes the next version
    for version in versions:
        folder = fitted_runs / "lightning_logs" / version
        assert (folder / "metrics.csv").is_file() and list(folder.glob("events.out.tfevents*"))
        assert (folder / "config.yaml").is_file()
        rows = list(csv.DictReader((folder / "metrics.csv").open()))
        assert {r["epoch"] for r in rows if r.get("val_acc")} == {"0", "1"}


def test_metric_group_names() -> None:
    assert metric_group("train_loss_epoch") == ("loss", "train", False)
    assert metric_group("train_loss_step") == ("loss", "train", True)
    assert metric_group("val_f1") == ("f1", "val", False)
    assert metric_group("test_rouge1") == ("rouge1", "test", False)
    assert metric_group("lr-AdamW") == ("lr-AdamW", "", False)


def test_run_names() -> None:
    assert run_name("runs/a/lightning_logs/version_3") == "a/version_3"
    assert run_name("runs/mnist") == "mnist"


def test_read_run_from_csv_and_from_tensorboard_agree(fitted_runs: Path, tmp_path: Path) -> None:
    version = fitted_runs / "lightning_logs" / "version_0"
    from_csv = read_run(version)
    assert find_log(version).name == "metrics.csv"
    only_events = tmp_path / "events_only"
    only_events.mkdir()
    for event_file in version.glob("events.out.tfevents*"):
        (only_events / event_file.name).write_bytes(event_file.read_bytes())
    from_events = read_run(only_events)
    assert find_log(only_events).name.startswith("events.out.tfevents")
    for name in ("val_acc", "val_loss"):
        assert [v for *_, v in from_csv.series[name]] == pytest.approx([v for *_, v in from_events.series[name]])
        assert [e for e, *_ in from_csv.series[name]] == [e for e, *_ in from_events.series[name]] == [0.0, 1.0]


def test_plot_one_run_writes_a_png_per_metric(fitted_runs: Path, tmp_path: Path, capsys) -> None:
    run = fitted_runs / "lightning_logs" / "version_0"
    assert main(["plot", str(run), "--out", str(tmp_path / "plots")]) == 0
    written = sorted(p.name for p in (tmp_path / "plots").glob("*.png"))
    assert {"loss.png", "acc.png"} <= set(written)
    assert all((tmp_path / "plots" / name).read_bytes().startswith(PNG) for name in written)
    assert "wrote" in capsys.readouterr().out
    assert not list((tmp_path / "plots").glob(".*"))  # no temporary files left


def test_plot_compares_runs_and_filters_metrics(fitted_runs: Path, tmp_path: Path) -> None:
    runs = [fitted_runs / "lightning_logs" / v for v in ("version_0", "version_1")]
    paths = plot_runs(runs, tmp_path, metrics=["loss"])
    assert sorted(p.name for p in paths) in (["loss.png"], ["loss.png", "loss_steps.png"])
    with pytest.raises(ValueError, match="no metrics to plot among"):
        plot_runs(runs, tmp_path, metrics=["no_such_metric"])


def test_plot_errors_name_the_directory(tmp_path: Path, capsys) -> None:
    assert main(["plot", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "missing" in err and "does not exist" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["plot", str(empty)]) == 2
    assert "no metrics.csv or TensorBoard event file" in capsys.readouterr().err
    bad = tmp_path / "bad" / "metrics.csv"
    bad.parent.mkdir()
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match=r"not a Lightning metrics\.csv"):
        read_run(bad.parent)


def test_a_test_after_fit_in_the_same_second_keeps_the_fits_event_file(tmp_path: Path, monkeypatch) -> None:
    """tensorboardX names event files by the second: the logger must not let the test's writer overwrite the fit's."""
    import tensorboardX.event_file_writer as event_file_writer

    from bp_apps.cli import default_loggers

    class FrozenClock:
        @staticmethod
        def time() -> float:
            return 1_800_000_000.0

    monkeypatch.setattr(event_file_writer, "time", FrozenClock)
    tensorboard = default_loggers(tmp_path)[-1]
    tensorboard.log_metrics({"val_acc": 0.5}, step=1)
    tensorboard.finalize("success")
    tensorboard.log_metrics({"test_acc": 0.75}, step=2)
    tensorboard.finalize("success")
    folder = Path(tensorboard.log_dir)
    assert len(list(folder.glob("events.out.tfevents*"))) == 2
    run = read_run(folder)
    assert [v for *_, v in run.series["val_acc"]] == [0.5]
    assert [v for *_, v in run.series["test_acc"]] == [0.75]


def test_fit_uses_richs_progress_bar_unless_told_otherwise() -> None:
    from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar

    from bp_apps.cli import default_callbacks
    from bp_apps.core.callbacks import MetricsJson, PredictionsJsonl
    from bp_apps.core.internals import EngineAwareRichModelSummary

    def kinds(callbacks: list) -> list[type]:  # the progress bar and the files, the summary checked apart
        return [type(c) for c in callbacks if not isinstance(c, (PredictionsJsonl, EngineAwareRichModelSummary))]

    assert kinds(default_callbacks(None, [])) == [MetricsJson, RichProgressBar]
    assert kinds(default_callbacks(True, [MetricsJson])) == [RichProgressBar]
    assert kinds(default_callbacks(False, [])) == [MetricsJson]  # --trainer.enable_progress_bar=false
    assert kinds(default_callbacks(True, [TQDMProgressBar])) == [MetricsJson]  # the user's own bar
    assert not any(isinstance(c, ProgressBar) for c in default_callbacks(True, [RichProgressBar]))
    assert any(isinstance(c, EngineAwareRichModelSummary) for c in default_callbacks(None, []))
    assert not any(isinstance(c, EngineAwareRichModelSummary) for c in default_callbacks(None, [], False))


def test_the_callbacks_given_on_the_command_line_are_read_as_classes() -> None:
    from jsonargparse import Namespace
    from lightning.pytorch.callbacks import TQDMProgressBar

    from bp_apps.cli import callback_classes
    from bp_apps.core.callbacks import LastCheckpoint

    given = Namespace(class_path="lightning.pytorch.callbacks.TQDMProgressBar", init_args=Namespace())
    assert callback_classes(None) == [] and callback_classes(given) == [TQDMProgressBar]
    assert callback_classes([given, Namespace(class_path="bp_apps.core.callbacks.LastCheckpoint")]) == [
        TQDMProgressBar, LastCheckpoint]


def _series(run: RunLog, index: int = 0) -> dict[str, list[Series]]:
    """The figures' series of a hand-made run, grouped as plot_runs groups them."""
    out: dict[str, list[Series]] = {}
    for name, points in run.series.items():
        group, stage, _ = metric_group(name)
        out.setdefault(group, []).append(Series(TEST_LABEL if stage == "test" else stage, stage, points, index))
    return out


HAND_MADE = RunLog("hand", Path("."), {
    "train_loss_epoch": [(0.0, 10, 1.0), (1.0, 20, 0.6), (2.0, 30, 0.5)],
    "val_loss": [(0.0, 10, 0.9), (1.0, 20, 0.7), (2.0, 30, 0.65)],
    "test_loss": [(3.0, 31, 0.62)],
    "val_acc": [(0.0, 10, 0.5), (1.0, 20, 0.7), (2.0, 30, 0.8)],
    "test_acc": [(3.0, 31, 0.79)]})


def test_epoch_axes_have_whole_number_ticks() -> None:
    import matplotlib.pyplot as plt

    figure = draw_figure("loss", False, _series(HAND_MADE)["loss"])
    axes = figure.axes[0]
    low, high = axes.get_xlim()
    ticks = [t for t in axes.get_xticks() if low <= t <= high]
    assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks)  # 0 1 2 3, never 0.5
    plt.close(figure)


def test_a_test_score_is_a_lone_marker_named_for_the_best_checkpoint() -> None:
    import matplotlib.pyplot as plt

    figure = draw_figure("loss", False, _series(HAND_MADE)["loss"])
    lines = {line.get_label(): line for line in figure.axes[0].get_lines()}
    test = lines[TEST_LABEL]
    assert test.get_linestyle() == "None" and test.get_marker() == "*"  # a point of its own, joined to nothing
    assert list(test.get_xdata()) == [3.0] and list(test.get_ydata()) == [0.62]
    assert lines["train"].get_linestyle() == "-" and lines["train"].get_marker() == "."
    assert [text.get_text() for text in figure.axes[0].get_legend().get_texts()] == ["train", "val", TEST_LABEL]
    plt.close(figure)


def test_each_stage_keeps_its_colour_in_every_figure() -> None:
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgba

    grouped = _series(HAND_MADE)
    second_run = _series(HAND_MADE, index=1)
    colours: dict[str, set] = {}
    for group in ("loss", "acc"):
        figure = draw_figure(group, False, grouped[group] + second_run[group])
        for line in figure.axes[0].get_lines():
            stage = "test" if line.get_label() == TEST_LABEL else line.get_label()
            colours.setdefault(stage, set()).add(to_rgba(line.get_color()))
        styles = {line.get_linestyle() for line in figure.axes[0].get_lines() if line.get_label() == "val"}
        assert styles == {"-", "--"}  # the two runs differ by line style, not colour
        plt.close(figure)
    assert colours == {stage: {to_rgba(STAGE_COLORS[stage])} for stage in ("train", "val", "test")}


def test_plotting_a_fitted_run_marks_its_test_score(fitted_runs: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    legends: dict[str, list[str]] = {}
    original = plot_module._save_figure

    def recording(figure, path: Path) -> None:
        legends[path.name] = [text.get_text() for text in figure.axes[0].get_legend().get_texts()]
        original(figure, path)

    monkeypatch.setattr(plot_module, "_save_figure", recording)
    plot_runs([fitted_runs / "lightning_logs" / "version_0"], tmp_path)
    assert legends["acc.png"] == ["val", TEST_LABEL]  # `bp-apps fit` tested its best checkpoint
    assert TEST_LABEL in legends["loss.png"]
