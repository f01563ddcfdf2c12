"""Callbacks come from the configuration: each task config lists its best and last checkpoints, a user's own
callbacks add to them, ``last.ckpt`` stays current, ``metrics.json`` is written only into a logger's folder, and
no module picks its own callbacks."""

from __future__ import annotations

import json
import re
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from bp_apps.cli import main
from bp_apps.core.callbacks import BestCheckpoint, LastCheckpoint, MetricsJson, task_callbacks
from bp_apps.vision.data import DigitsImageDataModule
from bp_apps.vision.models import EngineImageMLP
from bp_apps.vision.task import ImageClassifier

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "configs" / "vision" / "digits_mlp_engine.yaml"
QUICK = ["--trainer.limit_train_batches=3", "--trainer.limit_val_batches=2", "--trainer.limit_test_batches=2",
         "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
# config -> (monitor, mode) of its best checkpoint
MONITORS = {
    "vision/cifar10_resnet18": ("val_acc", "max"), "vision/digits_mlp_autograd": ("val_loss", "min"),
    "vision/digits_mlp_engine": ("val_loss", "min"), "vision/fashion_cnn": ("val_acc", "max"),
    "vision/imagefolder": ("val_acc", "max"), "vision/mnist_cnn": ("val_acc", "max"),
    "vision/mnist_mlp": ("val_acc", "max"), "vision/mnist_cnn_engine": ("val_acc", "max"),
    "vision/mnist_dp_cnn": ("val_acc", "max"), "vision/mnist_dp_mlp": ("val_acc", "max"),
    "vision/mnist_overfit_mlp": ("val_acc", "max"), "vision/mnist_overfit_dp_mlp": ("val_acc", "max"),
    "speech/fsdd_connected_ctc": ("val_wer", "min"), "speech/fsdd_digits": ("val_loss", "min"),
    "speech/fsdd_connected_ctc_engine": ("val_wer", "min"), "speech/fsdd_digits_engine": ("val_loss", "min"),
    "speech/manifest_ctc": ("val_cer", "min"), "speech/synth_ctc": ("val_cer", "min"),
    "text/label_punct_embedded": ("val_f1", "max"), "text/ner_conll": ("val_f1", "max"),
    "text/srl_propbank_ewt": ("val_f1", "max"), "text/srl_propbank_ewt_engine": ("val_f1", "max"),
    "text/summarize_aeslc": ("val_rouge1_refmean", "max"), "text/summarize_aeslc_engine": ("val_rouge1_refmean", "max"),
    "text/summarize_dialogsum": ("val_rouge1", "max"),
    "text/summarize_embedded": ("val_rouge1", "max"), "text/summarize_pretrained": ("val_rouge1", "max"),
}


def test_every_task_config_lists_its_best_and_last_checkpoints() -> None:
    configs = {str(p.relative_to(ROOT / "configs").with_suffix("")) for p in (ROOT / "configs").rglob("*.yaml")}
    assert configs == set(MONITORS)
    for name, (monitor, mode) in MONITORS.items():
        config = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
        callbacks = config["trainer"]["callbacks"]
        paths = [c["class_path"] for c in callbacks]
        assert paths[:2] == ["bp_apps.core.callbacks.BestCheckpoint", "bp_apps.core.callbacks.LastCheckpoint"], name
        assert callbacks[0]["init_args"] == {"monitor": monitor, "mode": mode,
                                             "filename": f"best-{{epoch}}-{{{monitor}:.4f}}"}, name
        assert ("bp_apps.text.summarization.task.HFBestExport" in paths) == name.startswith("text/summarize"), name
        for early in (c for c in callbacks if c["class_path"].endswith("EarlyStopping")):
            assert (early["init_args"]["monitor"], early["init_args"]["mode"]) == (monitor, mode), name
        assert not {"monitor", "early_stopping_patience"} & set(config["model"]["init_args"]), name


def test_a_users_model_checkpoint_is_honoured_next_to_the_configs(tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    argv = ["fit", "--config", str(DIGITS), "--trainer.max_epochs=2", f"--trainer.default_root_dir={tmp_path}",
            *QUICK, "--trainer.callbacks+=ModelCheckpoint", f"--trainer.callbacks.dirpath={mine}",
            "--trainer.callbacks.filename=mine-{epoch}"]
    assert main(argv) == 0
    assert [p.name for p in mine.iterdir()] == ["mine-epoch=1.ckpt"]
    (metrics_path,) = tmp_path.rglob("metrics.json")
    checkpoints = metrics_path.parent / "checkpoints"
    (best,) = checkpoints.glob("best-epoch=*-val_loss=*.ckpt")
    assert (checkpoints / "last.ckpt").is_file()
    metrics = json.loads(metrics_path.read_text())
    assert metrics["best_checkpoint"] == str(best) and metrics["test"]  # the config's best is the one tested


def test_last_checkpoint_is_current_after_an_epoch_without_a_new_best(tmp_path: Path) -> None:
    # `epoch` under mode min never improves after the first epoch: the best stays at epoch 0.
    best, last = BestCheckpoint(monitor="epoch", mode="min", filename="best-{epoch}"), LastCheckpoint()
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", default_root_dir=tmp_path, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_train_batches=2,
                        limit_val_batches=1, callbacks=[best, last])
    trainer.fit(ImageClassifier(partial(EngineImageMLP, hidden=(8,)), input_shape=(1, 8, 8)),
                datamodule=DigitsImageDataModule())
    checkpoints = tmp_path / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best-epoch=0.ckpt", "last.ckpt"]
    state = torch.load(checkpoints / "last.ckpt", weights_only=True)
    assert (state["epoch"], state["global_step"]) == (2, 6)
    (best_state,) = (v for k, v in state["callbacks"].items() if k.startswith("BestCheckpoint"))
    assert best_state["best_model_path"] == str(checkpoints / "best-epoch=0.ckpt")


def test_no_report_in_the_current_folder_without_a_logger(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--config", str(DIGITS), "--trainer.max_epochs=1", "--trainer.logger=false", *QUICK]) == 0
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()  # the run did happen, here
    assert not list(tmp_path.rglob("metrics.json")) and "metrics written" not in capsys.readouterr().out
    # the test after fit ran too, and its report (the confusion matrix) went nowhere: only the checkpoints are here
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints"]


def test_task_callbacks_give_the_configs_set() -> None:
    best, last, metrics, early = task_callbacks("val_acc", "max", patience=3)
    assert isinstance(best, BestCheckpoint) and (best.monitor, best.mode) == ("val_acc", "max")
    assert best.filename == "best-{epoch}-{val_acc:.4f}"
    assert isinstance(last, LastCheckpoint) and last.monitor is None and isinstance(metrics, MetricsJson)
    assert (early.monitor, early.mode, early.patience) == ("val_acc", "max", 3)
    assert len(task_callbacks("val_loss", "min")) == 3  # no early stopping without patience


def test_no_module_configures_its_own_callbacks() -> None:
    found = [str(p.relative_to(ROOT)) for p in (ROOT / "bp_apps").rglob("*.py")
             if "configure_callbacks" in p.read_text(encoding="utf-8")]
    assert found == []


def test_predict_writes_one_line_per_example_in_the_datas_order(tmp_path: Path) -> None:
    """`bp-apps predict` writes predictions.jsonl: the class probabilities of each test image, in order, so that
    their argmax scores the test accuracy that `test` reports for the same checkpoint."""
    import torch

    from bp_apps.vision.data import DigitsImageDataModule

    run = tmp_path / "run"
    assert main(["fit", "--config", str(DIGITS), "--trainer.max_epochs=2", f"--trainer.default_root_dir={run}",
                 *QUICK]) == 0
    (metrics_path,) = run.rglob("metrics.json")
    metrics = json.loads(metrics_path.read_text())
    assert main(["predict", "--config", str(DIGITS), f"--ckpt_path={metrics['best_checkpoint']}",
                 f"--trainer.default_root_dir={tmp_path / 'predict'}", *QUICK]) == 0
    (written,) = (tmp_path / "predict").rglob("predictions.jsonl")
    rows = [json.loads(line) for line in written.read_text().splitlines()]
    data = DigitsImageDataModule()
    data.setup("test")
    labels = torch.cat([y for _, y in data.test_dataloader()])
    assert [row["index"] for row in rows] == list(range(len(labels)))
    probabilities = torch.tensor([row["prediction"] for row in rows])
    torch.testing.assert_close(probabilities.sum(-1), torch.ones(len(rows)))
    tested = 2 * data.hparams.batch_size  # the fit's test ran on its first two batches (QUICK)
    accuracy = float((probabilities[:tested].argmax(-1) == labels[:tested]).float().mean())
    assert accuracy == pytest.approx(metrics["test"]["test_acc"], abs=1e-6)


@pytest.mark.parametrize(("config", "backend"), [("digits_mlp_engine", "engine"), ("digits_mlp_autograd", "autograd")])
def test_the_model_summary_counts_engine_weights_as_trainable(config: str, backend: str, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """Engine weights train by the hand-written backward (none requires grad): the summary still counts them."""
    path = ROOT / "configs" / "vision" / f"{config}.yaml"
    assert main(["fit", "--config", str(path), "--trainer.max_epochs=1", f"--trainer.default_root_dir={tmp_path}",
                 "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1", "--trainer.limit_test_batches=1",
                 "--trainer.enable_progress_bar=false"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"Trainable params:? +85\.0 K|85\.0 K +Trainable params", out), out[-2000:]
    assert re.search(r"Non-trainable params:? +0\b|\b0 +Non-trainable params", out), out[-2000:]
