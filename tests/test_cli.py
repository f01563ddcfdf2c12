"""The `bp-apps` command: demo, compare, bench and its help, on small settings (the Lightning subcommands run in
the task tests)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bp_apps.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_demo_prints_table_and_writes_files(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--json", str(tmp_path / "demo.json")]) == 0
    out = capsys.readouterr().out
    assert "| test accuracy |" in out and "max loss difference" in out
    assert (tmp_path / "demo" / "compare.md").exists()
    assert (tmp_path / "demo" / "compare.png").stat().st_size > 10_000
    report = json.loads((tmp_path / "demo.json").read_text())
    assert report["backends"]["engine"]["test_accuracy"] > 0.95
    assert report["max_loss_trajectory_diff"] <= 1e-4


def test_compare_options_reach_the_report(tmp_path):
    path = tmp_path / "r.json"
    assert main(["compare", "--epochs", "1", "--width", "16", "--depth", "1", "--activation", "gelu",
                 "--optimizer", "adamw", "--lr", "0.001", "--dtype", "float64", "--seed", "3",
                 "--out", str(tmp_path), "--json", str(path)]) == 0
    config = json.loads(path.read_text())["config"]
    assert (config["hidden"], config["activation"], config["optimizer"], config["dtype"], config["seed"]) == (
        [16], "gelu", "adamw", "float64", 3)


def test_compare_bad_value_gives_clear_error(capsys, tmp_path):
    assert main(["compare", "--epochs", "0", "--out", str(tmp_path)]) == 2
    assert "epochs" in capsys.readouterr().err


def test_bench_core_json(tmp_path):
    path = tmp_path / "bench.json"
    assert main(["bench", "core", "--sizes", "4x8,8x16", "--repeats", "2", "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    assert report["matmul_gflops"] > 0
    assert [(r["batch"], r["hidden"]) for r in report["results"]] == [(4, 8), (8, 16)]
    for r in report["results"]:
        assert {"batch", "hidden", "engine_ms", "autograd_ms", "engine_gflops"} <= set(r)


def test_bench_bad_sizes(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "core", "--sizes", "64by128"])
    assert "BATCHxHIDDEN" in capsys.readouterr().err


def test_console_script_help_runs():
    result = subprocess.run([sys.executable, "-m", "bp_apps.cli", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0
    for command in ("demo", "compare", "bench", "fit"):
        assert command in result.stdout



def test_lightning_commands_from_the_shell_give_no_warning_about_their_arguments() -> None:
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-m", "bp_apps.cli", "fit", "--config",
                             str(root / "configs" / "vision" / "digits_mlp_engine.yaml"), "--print_config"],
                            capture_output=True, text=True, timeout=300, cwd=root)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "class_path: bp_apps.vision.task.ImageClassifier" in result.stdout
    assert "args parameter" not in result.stderr  # Lightning's warning when arguments arrive twice


def test_help_is_plain_text(capsys: pytest.CaptureFixture[str]) -> None:
    from bp_apps.cli import main

    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "fit | validate | test | predict" in out and "``" not in out  # no raw reST markup


@pytest.mark.parametrize("command", ["fit", "test"])
def test_lightning_help_lists_the_task_classes_and_data_modules(command: str,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    listing = out[out.index("task classes (--model=CLASS_PATH"):]
    lines = listing.splitlines()
    for path in ("bp_apps.vision.task.ImageClassifier", "bp_apps.speech.task.SpeechRecognizer",
                 "bp_apps.speech.task.SpokenDigitClassifier", "bp_apps.text.labeling.task.TokenLabeler",
                 "bp_apps.text.summarization.task.Summarizer", "bp_apps.vision.data.DatasetDataModule",
                 "bp_apps.text.labeling.data.HFLabelingDataModule", "bp_apps.speech.data.ManifestDataModule"):
        assert sum(line.split()[:1] == [path] for line in lines) == 1, path  # one line each
    speech = next(line for line in lines if line.split()[:1] == ["bp_apps.speech.task.SpeechRecognizer"])
    assert speech.split(None, 1)[1] == "Character CTC speech recognizer."  # its docstring's first sentence
    assert "VisionDataModule " not in listing and "``" not in listing and ":class:" not in listing
    assert all(len(line) <= 120 for line in lines[1:] if line.startswith("  "))


def test_help_listing_is_not_built_for_an_ordinary_run() -> None:
    from bp_apps.cli import help_listing_kwargs

    assert help_listing_kwargs(["fit", "--config", "x.yaml"]) == {}
    assert set(help_listing_kwargs(["fit", "-h"])) == {"formatter_class", "fit", "validate", "test", "predict"}
