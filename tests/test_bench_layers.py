"""`bp-apps bench layers`: every engine layer and task step timed against autograd, as JSON and a table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bp_apps.cli import main
from bp_apps.engine import BatchNorm2d, Conv1d, MaxPool2d
from bp_apps.engine.recurrent import GRU, LSTM
from bp_apps.experiments.bench_layers import (
    LAYER_CASES,
    LayerCase,
    _conv2d,
    _ctc,
    _plain,
    _recurrent,
    format_layers_table,
    run_layers_bench,
    synthetic_batch,
)
from bp_apps.speech.task import SpeechRecognizer, SpokenDigitClassifier
from bp_apps.vision.task import ImageClassifier

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY_CASES = (
    LayerCase("conv2d", "tiny", _conv2d(2, 3, 4, (6, 6))),
    LayerCase("conv2d", "tiny, no dx", _conv2d(2, 1, 4, (6, 6), input_grad=False)),
    LayerCase("conv1d", "tiny", _plain(lambda: Conv1d(3, 4, 3, padding=1), (2, 3, 7))),
    LayerCase("maxpool2d", "tiny", _plain(lambda: MaxPool2d(2), (2, 3, 6, 6))),
    LayerCase("batchnorm2d", "tiny", _plain(lambda: BatchNorm2d(3), (2, 3, 6, 6))),
    LayerCase("gru", "tiny", _recurrent(GRU, 3, 5, 4)),
    LayerCase("lstm", "tiny", _recurrent(LSTM, 3, 5, 4)),
    LayerCase("ctc", "tiny", _ctc(3, 50, 6)),
)


def test_the_cases_cover_every_layer_the_issue_names() -> None:
    assert {case.layer for case in LAYER_CASES} == {"conv2d", "conv1d", "maxpool2d", "batchnorm2d", "gru", "lstm",
                                                    "ctc"}


def _tiny_modules():
    cnn = {"class_path": "bp_apps.vision.models.EngineSmallCNN", "init_args": {"width": 2, "hidden": [4]}}
    ctc = {"class_path": "bp_apps.speech.models.EngineConvGRUCTC",
           "init_args": {"conv_channels": 2, "hidden": 4, "layers": 1}}
    digits = {"class_path": "bp_apps.speech.models.EngineDigitCNNNet",
              "init_args": {"conv_channels": 2, "hidden": 4, "head_hidden": [4]}}
    return [("vision", ImageClassifier(net=cnn, input_shape=(1, 8, 8))),
            ("speech", SpeechRecognizer(net=ctc, input_dim=8)),
            ("digits", SpokenDigitClassifier(net=digits, input_dim=8))]


def test_layers_and_models_are_timed_against_autograd() -> None:
    models = [(task, f"{task}.yaml", module, synthetic_batch(module, 4)) for task, module in _tiny_modules()]
    report = run_layers_bench(models, repeats=2, cases=TINY_CASES)
    assert [row["layer"] for row in report["layers"]] == [case.layer for case in TINY_CASES]
    assert [row["task"] for row in report["models"]] == ["vision", "speech", "digits"]
    for row in (*report["layers"], *report["models"]):
        assert row["engine_ms"] > 0 and row["autograd_ms"] > 0
    json.dumps(report)  # plain data
    table = format_layers_table(report)
    assert table.count("\n|") == 2 + len(TINY_CASES) + 3 and "speed-up" in table


@pytest.mark.parametrize("index", [0, 1, 2])
def test_synthetic_batches_train_each_task_model(index: int) -> None:
    """The synthetic batch has the shape the task trains on: one engine step on it runs and changes the weights."""
    _, module = _tiny_modules()[index]
    batch = synthetic_batch(module, 3)
    before = [p.clone() for p in module.parameters()]
    with torch.no_grad():
        loss = module.engine_backward(module.training_batch(batch))
    assert torch.isfinite(loss)
    assert any(float(g.abs().sum()) > 0 for g in module.net.gradients())
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters())), "backward alone updates nothing"


def test_bench_layers_command_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "layers.json"
    code = main(["bench", "layers", "--repeats", "1", "--layers", "maxpool2d,batchnorm2d", "--json", str(out),
                 "--configs", str(CONFIGS / "vision" / "digits_mlp_engine.yaml")])
    assert code == 0
    report = json.loads(out.read_text())
    assert [row["layer"] for row in report["layers"]] == ["maxpool2d", "batchnorm2d"]
    assert report["models"][0]["config"].endswith("digits_mlp_engine.yaml")
    assert "| layer / model |" in capsys.readouterr().out


def test_unknown_layer_names_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "layers", "--layers", "conv3d", "--configs"]) == 2
    assert "conv3d" in capsys.readouterr().err
