"""``--ckpt_path`` gives Lightning commands a checkpoint as data: its task is checked before anything is restored,
nothing it names is imported, and its hyperparameters never replace the config's."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from bp_apps.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "vision" / "digits_mlp_engine.yaml")


def test_another_tasks_checkpoint_is_refused_before_anything_it_names_is_imported(tmp_path, capsys) -> None:
    sys.modules.pop("this", None)
    path = tmp_path / "speech.ckpt"
    torch.save({"bp_apps_task": "speech.SpeechRecognizer", "state_dict": {},
                "hyper_parameters": {"_class_path": "this.Anything", "lr": 1.0}}, path)
    argv = ["test", "--config", CONFIG, f"--ckpt_path={path}", f"--trainer.default_root_dir={tmp_path}"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"--ckpt_path {path}: not an image-classification checkpoint" in err
    assert "it belongs to speech.SpeechRecognizer" in err
    assert "this" not in sys.modules  # the class path in the checkpoint was never imported
    assert sorted(p.name for p in tmp_path.iterdir()) == ["speech.ckpt"]  # and nothing was written


def test_a_truncated_checkpoint_is_named_with_exit_2(tmp_path, capsys) -> None:
    path = tmp_path / "cut.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, path)
    path.write_bytes(path.read_bytes()[:300])
    assert main(["validate", "--config", CONFIG, f"--ckpt_path={path}",
                 f"--trainer.default_root_dir={tmp_path}"]) == 2
    assert f"--ckpt_path {path}: not a loadable checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("subcommand", ["validate"])
def test_the_configs_hyperparameters_win_and_differences_are_reported(tmp_path, capsys, subcommand) -> None:
    run = tmp_path / "run"
    assert main(["fit", "--config", CONFIG, "--trainer.max_epochs=1", f"--trainer.default_root_dir={run}",
                 "--trainer.enable_progress_bar=false"]) == 0
    best = next(run.rglob("best-*.ckpt"))
    capsys.readouterr()
    assert main([subcommand, "--config", CONFIG, f"--ckpt_path={best}", "--model.init_args.label_smoothing=0.2",
                 f"--trainer.default_root_dir={tmp_path / 'eval'}", "--trainer.enable_progress_bar=false"]) == 0
    err = capsys.readouterr().err
    assert "the checkpoint was trained with other values of label_smoothing;" in err  # only it: links excluded
    config = next((tmp_path / "eval").rglob("config.yaml")).read_text()
    assert "label_smoothing: 0.2" in config  # the command line's value, not the checkpoint's 0.1
