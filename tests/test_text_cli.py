"""The text configs and commands end to end, on tiny settings: `bp-apps fit` for the embedded
punctuation and summarization demos, `scripts/train_text.py`, `bp-apps label` and `bp-apps summarize`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bp_apps.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "text"
PROPBANK = ROOT.parent / "shared" / "data" / "labeling" / "propbank_ewt"


pytestmark = pytest.mark.usefixtures("session_cache")


@pytest.mark.parametrize("config", sorted(p.stem for p in CONFIGS.glob("*.yaml")))
def test_every_text_config_parses(config: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIGS / f"{config}.yaml"), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "bp_apps.text." in printed and "class_path" in printed


def fit(config: str, root: Path, *overrides: str) -> dict:
    argv = ["fit", "--config", str(CONFIGS / f"{config}.yaml"), f"--trainer.default_root_dir={root}",
            "--trainer.enable_progress_bar=false", "--trainer.max_epochs=1", *overrides]
    assert main(argv) == 0
    (metrics,) = root.rglob("metrics.json")
    return json.loads(metrics.read_text())


@pytest.fixture(scope="module")
def punct_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    root = tmp_path_factory.mktemp("punct")
    metrics = fit("label_punct_embedded", root, "--data.max_docstrings=400", "--trainer.max_epochs=3",
                  "--model.net.hidden=32", "--model.net.word_dim=32", "--model.net.char_channels=16")
    return metrics, root


def test_punctuation_demo_fits_tests_and_reports_marks(punct_run: tuple[dict, Path]) -> None:
    metrics, root = punct_run
    assert {"test_f1", "test_case_f1", "test_accuracy"} <= set(metrics["test"])
    assert metrics["test"]["test_accuracy"] > 0.8  # "O" alone is ~87 % of tokens: the run must have trained
    assert set(metrics["test_report"]["per_label"]) >= {"O", "COMMA", "PERIOD"}
    assert "| PERIOD |" in next(root.rglob("label_report.md")).read_text()


def test_label_command_restores_text(punct_run: tuple[dict, Path], capsys: pytest.CaptureFixture[str]) -> None:
    metrics, _ = punct_run
    capsys.readouterr()
    assert main(["label", "Return the value, if any.", "--ckpt", metrics["best_checkpoint"], "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tokens"] == ["return", "the", "value", "if", "any"]  # marks and case removed first
    assert len(result["tags"]) == 5 and all("|" in t for t in result["tags"])
    from bp_apps.text.labeling.punctuation import restore_text

    assert result["text"] == restore_text(result["tokens"], result["tags"])


def test_label_command_errors_name_the_problem(punct_run: tuple[dict, Path], tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = punct_run[0]["best_checkpoint"]
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"tokens": ["a"]}\n{"tokens": ["b\xff"]}\n')
    assert main(["label", "--ckpt", ckpt, "--file", str(bad)]) == 2
    assert f"{bad}:2: invalid UTF-8" in capsys.readouterr().err
    assert main(["label", "--ckpt", str(tmp_path / "none.ckpt"), "x"]) == 2
    assert "none.ckpt" in capsys.readouterr().err


def test_summarize_demo_and_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    metrics = fit("summarize_embedded", tmp_path / "run", "--data.max_pairs=120", "--model.net.d_model=32",
                  "--model.net.ff=64", "--model.net.layers=1", "--data.tokenizer_vocab_size=300",
                  "--model.val_generate_limit=8", "--model.generation.max_new_tokens=8")
    assert {"test_rouge1", "test_rouge2", "test_rougeL", "test_rougeLsum"} <= set(metrics["test"])
    ckpt = metrics["best_checkpoint"]
    assert (Path(ckpt).parent / "hf_best" / "tokenizer.json").is_file()
    capsys.readouterr()
    assert main(["summarize", "Read the file and return its lines as a list of strings.", "--ckpt", ckpt,
                 "--json", "--beams", "1"]) == 0
    assert isinstance(json.loads(capsys.readouterr().out)["summary"], str)
    inputs = tmp_path / "in.jsonl"
    inputs.write_text('{"id": "a", "source": "Open a file."}\n{"source": "Close it again."}\n', encoding="utf-8")
    out = tmp_path / "out.jsonl"
    assert main(["summarize", "--ckpt", ckpt, "--file", str(inputs), "--out", str(out), "--max-new-tokens", "4"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [sorted(r) for r in records] == [["id", "summary"], ["summary"]] and records[0]["id"] == "a"
    assert main(["summarize", "   ", "--ckpt", ckpt]) == 2
    assert "empty" in capsys.readouterr().err
    capsys.readouterr()
    text = "Read the file and return its lines as a list of strings."
    from bp_apps.text.summarization.task import load_summarizer, summarize

    expected = summarize(load_summarizer(ckpt), [text], mbr_samples=6)[0]
    assert main(["summarize", text, "--ckpt", ckpt, "--json", "--mbr-samples", "6"]) == 0
    assert json.loads(capsys.readouterr().out)["summary"] == expected
    assert main(["summarize", text, "--ckpt", ckpt, "--mbr-samples", "-1"]) == 2
    assert "mbr_samples must be >= 0" in capsys.readouterr().err
    assert main(["summarize", text, "--ckpt", ckpt, "--beams", "0"]) == 2
    assert "num_beams" in capsys.readouterr().err


@pytest.mark.skipif(not PROPBANK.is_dir(), reason="needs ../shared/data/labeling/propbank_ewt (the real SRL data)")
def test_train_text_script_on_real_srl_data(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train_text.py"), "--config", str(CONFIGS / "srl_propbank_ewt.yaml"),
         f"--data.data_root={PROPBANK.parents[1]}", "--data.limit_train=200", "--data.limit_val=50",
         "--trainer.max_epochs=1",
         "--model.net.hidden=16", "--model.net.word_dim=16", f"--trainer.default_root_dir={tmp_path}",
         "--trainer.enable_progress_bar=false"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads(next(tmp_path.rglob("metrics.json")).read_text())
    assert "test_f1" in metrics["test"] and "B-ARG0" in metrics["labels"]
