"""Commands end with one line naming the problem and exit status 2, and lose nothing: an output that is a folder
or one of the inputs is refused before any work, a write that fails names its file, diverged training is reported."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from bp_apps.cli import main

ROOT = Path(__file__).resolve().parents[1]
INPUT = b'{"id": "s1", "tokens": ["Hello", "world"], "tags": ["O", "O"], "note": "kept"}\n'


@pytest.mark.parametrize("command", ["label", "summarize"])
def test_an_output_that_is_an_input_is_refused_before_any_work(command, tmp_path, capsys) -> None:
    data = tmp_path / "in.jsonl"
    data.write_bytes(INPUT)
    ckpt = tmp_path / "model.ckpt"  # never read: the output is checked first
    assert main([command, "--file", str(data), "--out", str(data), "--ckpt", str(ckpt)]) == 2
    assert f"--out {data} is the input given as --file" in capsys.readouterr().err
    assert data.read_bytes() == INPUT and sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


@pytest.mark.parametrize("command", ["label", "summarize"])
def test_an_output_that_is_a_folder_is_refused(command, tmp_path, capsys) -> None:
    data = tmp_path / "in.jsonl"
    data.write_bytes(INPUT)
    assert main([command, "--file", str(data), "--out", str(tmp_path), "--ckpt", str(tmp_path / "m.ckpt")]) == 2
    assert f"--out {tmp_path} is a folder" in capsys.readouterr().err


def test_a_write_that_fails_names_the_file_and_keeps_what_was_there(tmp_path, capsys, monkeypatch) -> None:
    report = tmp_path / "report"
    report.mkdir()
    (report / "compare.md").write_text("earlier")

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied", kwargs.get("dir"))

    monkeypatch.setattr(tempfile, "mkstemp", read_only)  # as in a read-only folder (root ignores chmod)
    code = main(["compare", "--width", "8", "--epochs", "1", "--out", str(report)])
    assert code == 2
    err = capsys.readouterr().err
    assert f"could not write {report}" in err and "files already there are unchanged" in err
    assert (report / "compare.md").read_text() == "earlier"


def test_training_that_diverges_is_one_line_with_exit_2(tmp_path, capsys) -> None:
    config = ROOT / "configs" / "vision" / "digits_mlp_engine.yaml"
    code = main(["fit", "--config", str(config), "--model.optim.lr=1e12",
                 "--trainer.max_epochs=1", f"--trainer.default_root_dir={tmp_path}",
                 "--trainer.enable_progress_bar=false"])
    assert code == 2
    assert "bp-apps fit: error: non-finite" in capsys.readouterr().err


@pytest.mark.parametrize(("setting", "hint"), [("--trainer.gradient_clip_val=1.0", "--model.optim.max_grad_norm"),
                                               ("--trainer.accumulate_grad_batches=2", "batch_size")])
def test_trainer_settings_the_engine_cannot_take_are_one_line_with_what_to_use(setting, hint, tmp_path,
                                                                             capsys) -> None:
    config = ROOT / "configs" / "vision" / "digits_mlp_engine.yaml"
    code = main(["fit", "--config", str(config), setting, "--trainer.max_epochs=1",
                 f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false"])
    assert code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("bp-apps fit: error: ") and "manual optimization" in last and hint in last


def test_lightning_clis_optimizer_option_is_not_offered(tmp_path, capsys) -> None:
    """A task's optimizer and schedule are its `optim` group; LightningCLI's --optimizer would replace both
    silently, so it is refused as an unknown option."""
    config = ROOT / "configs" / "vision" / "digits_mlp_autograd.yaml"
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--optimizer=torch.optim.Adam", f"--trainer.default_root_dir={tmp_path}"])
    assert exit_info.value.code == 2
    assert "--optimizer" in capsys.readouterr().err
    assert not any(tmp_path.iterdir()), "nothing ran"
