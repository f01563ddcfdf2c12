"""Side-by-side training of the two backends: parity, report contents and files."""

import json

import pytest

from bp_apps.experiments.compare import CompareConfig, format_markdown, report_figure, run_comparison, write_report


@pytest.fixture(scope="module")
def one_epoch_report():
    return run_comparison(CompareConfig(epochs=1, batch_size=32))


def test_one_epoch_loss_trajectories_match_in_float32(one_epoch_report):
    report = one_epoch_report
    assert report["config"]["dtype"] == "float32"
    assert report["steps"] == 43  # ceil(1347 / 32) batches of the 75 % training split
    assert report["max_loss_trajectory_diff"] <= 1e-5
    engine, autograd = report["loss_curves"]["engine"], report["loss_curves"]["autograd"]
    assert sum(engine[-5:]) < 0.9 * sum(engine[:5]), "one epoch of training must lower the loss"
    assert max(abs(a - b) for a, b in zip(engine, autograd)) == report["max_loss_trajectory_diff"]


def test_report_holds_the_documented_fields(one_epoch_report):
    report = one_epoch_report
    assert report["max_grad_rel_error"] <= 1e-10
    assert set(report["grad_rel_error_per_parameter"]) == {f"layers.{i}.{p}" for i in (0, 2, 4)
                                                            for p in ("weight", "bias")}
    for name in ("engine", "autograd"):
        metrics = report["backends"][name]
        assert 0.5 < metrics["test_accuracy"] <= 1.0
        assert metrics["ms_per_step"] > 0
        # at least the weights (64·128 + 128·128 + 128·10 + biases, float32) must be counted
        assert metrics["peak_memory_mb"] > 4 * 26_122 / 2**20
    assert report["backends"]["engine"]["test_accuracy"] == pytest.approx(
        report["backends"]["autograd"]["test_accuracy"], abs=1 / 450 + 1e-9)


def test_write_report_files(one_epoch_report, tmp_path):
    paths = write_report(one_epoch_report, tmp_path / "out", tmp_path / "report.json")
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| test accuracy |" in paths["markdown"].read_text()
    data = json.loads(paths["json"].read_text())
    assert {"max_grad_rel_error", "max_loss_trajectory_diff", "backends"} <= set(data)
    assert {"test_accuracy", "ms_per_step", "peak_memory_mb"} <= set(data["backends"]["engine"])
    assert not list(tmp_path.rglob("*.tmp*")), "no temporary files left behind"
    assert format_markdown(one_epoch_report).splitlines()[0].startswith("MLP 64-128-128-10")


def test_float64_and_other_architectures_track_each_other():
    report = run_comparison(CompareConfig(epochs=1, width=32, depth=3, activation="tanh", dtype="float64"))
    assert report["max_loss_trajectory_diff"] <= 1e-12
    assert len(report["grad_rel_error_per_parameter"]) == 8


def test_adam_trajectories_stay_close():
    # Adam divides by √v: where a gradient is ~0, rounding noise becomes an O(lr) step, so the
    # two backends agree less tightly than with SGD — but still closely over an epoch.
    report = run_comparison(CompareConfig(epochs=1, optimizer="adam", lr=1e-3))
    assert report["max_loss_trajectory_diff"] <= 1e-4


@pytest.mark.parametrize("field, value", [("dtype", "float16"), ("optimizer", "rmsprop"), ("epochs", 0),
                                          ("width", -1), ("device", "cuda:7")])
def test_bad_config_values_are_refused(field, value):
    if field == "device":
        pytest.importorskip("torch")
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA, so a cuda device is valid")
    with pytest.raises(ValueError, match=field if field not in ("width", "epochs") else "positive"):
        CompareConfig(**{field: value})


def test_exact_zeros_are_marked_not_drawn_at_a_floor():
    """On a log scale a difference or error of exactly 0 is named as such, never plotted as a tiny number."""
    import math

    import matplotlib.pyplot as plt

    report = {"loss_curves": {"engine": [2.0, 1.5, 1.2, 1.0], "autograd": [2.0, 1.5 + 1e-7, 1.2, 1.0 + 3e-7]},
              "grad_rel_error_per_parameter": {"w0": 1e-13, "b0": 0.0, "w1": 3e-14, "b1": 0.0}}
    figure = report_figure(report)
    _, ax_diff, ax_grad = figure.axes
    data, zeros = ax_diff.get_lines()
    assert [y for y in data.get_ydata() if not math.isnan(y)] == pytest.approx([1e-7, 3e-7], rel=1e-6)
    assert all(math.isnan(y) for y, d in zip(data.get_ydata(), (0, 1, 0, 1)) if d == 0)  # gaps, not a floor
    assert list(zeros.get_xdata()) == [0, 2] and zeros.get_label() == "exactly 0 (2 of 4 steps)"
    assert ax_diff.get_yscale() == "log"
    assert sorted(p.get_width() for p in ax_grad.patches) == pytest.approx([3e-14, 1e-13])  # no bar for a 0
    assert [t.get_text() for t in ax_grad.texts] == ["exactly 0", "exactly 0"]
    assert any(t.get_text() == "exactly 0 (2 of 4 parameters)" for t in ax_grad.get_legend().get_texts())
    plt.close(figure)

    identical = {"loss_curves": {"engine": [1.0, 0.5], "autograd": [1.0, 0.5]},
                 "grad_rel_error_per_parameter": {"w0": 0.0}}
    figure = report_figure(identical)  # nothing above 0: linear axes, only the marks
    _, ax_diff, ax_grad = figure.axes
    assert ax_diff.get_yscale() == "linear" and ax_grad.get_xscale() == "linear" and not ax_grad.patches
    assert ax_diff.get_lines()[1].get_label() == "exactly 0 (2 of 2 steps)"
    plt.close(figure)
