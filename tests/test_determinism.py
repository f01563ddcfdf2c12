"""The same seed gives the same metrics twice in a row on CPU, for every task (tiny settings, the real configs).
The digits MLP under a hand-built Trainer is covered in test_lit.py; here it runs through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bp_apps.cli import main

ROOT = Path(__file__).resolve().parents[1]
FSDD = ROOT.parent / "shared" / "data" / "fsdd"
TINY = ["--trainer.max_epochs=2", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=2",
        "--trainer.limit_test_batches=2", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false"]
RUNS = {
    "vision_engine": ("vision/digits_mlp_engine", []),
    "vision_autograd": ("vision/digits_mlp_autograd", []),
    "labeling": ("text/label_punct_embedded", ["--data.max_docstrings=200", "--model.net.hidden=32",
                                              "--model.net.word_dim=32", "--model.net.char_channels=8"]),
    "summarization": ("text/summarize_embedded", ["--data.max_pairs=200", "--data.tokenizer_vocab_size=400",
                                                  "--model.net.d_model=32", "--model.net.ff=64",
                                                  "--model.net.layers=1", "--model.generation.max_new_tokens=6"]),
    "summarization_copy": ("text/summarize_embedded", ["--data.max_pairs=200", "--data.tokenizer_vocab_size=400",
                                                       "--model.net=bp_apps.text.summarization.models.BartCopyNet",
                                                       "--model.net.d_model=32", "--model.net.ff=64",
                                                       "--model.net.layers=1", "--model.generation.max_new_tokens=6"]),
    "speech_classifier": ("speech/fsdd_digits", ["--data.limit_per_split=40", "--model.net.init_args.hidden=16"]),
    "speech_ctc": ("speech/fsdd_connected_ctc", ["--data.train_utterances=12", "--data.val_utterances=4",
                                                 "--data.test_utterances=4", "--data.batch_size=4",
                                                 "--model.net.init_args.hidden=16",
                                                 "--model.decoding.beam_size=0"]),
}


def fit_metrics(config: str, extra: list[str], root: Path) -> dict:
    argv = ["fit", "--config", str(ROOT / "configs" / f"{config}.yaml"), f"--trainer.default_root_dir={root}",
            *TINY, *extra]
    assert main(argv) == 0
    (path,) = root.rglob("metrics.json")
    metrics = json.loads(path.read_text())
    return {"validation": metrics["validation"], "test": metrics["test"], "global_step": metrics["global_step"]}


@pytest.mark.parametrize("name", sorted(RUNS))
def test_same_seed_same_metrics(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config, extra = RUNS[name]
    if config.startswith("speech/") and not (FSDD / "recordings").is_dir():
        pytest.skip(f"{FSDD} is not on this machine")
    monkeypatch.chdir(ROOT)  # the configs' data roots are relative to the repository
    monkeypatch.setenv("BP_APPS_CACHE", str(tmp_path / "cache"))
    first = fit_metrics(config, extra, tmp_path / "first")
    second = fit_metrics(config, extra, tmp_path / "second")
    assert first["validation"] and first["test"]
    assert first == second
