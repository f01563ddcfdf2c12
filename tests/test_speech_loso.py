"""Leave-one-speaker-out evaluation: the hold-out split never lets the test speaker into training or validation,
connected strings of the test split are built from that speaker alone, bad speakers are named, and the fold
runner trains, tests and summarises real folds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bp_apps.experiments.speech_loso import (
    fold_command,
    format_loso_table,
    read_fold_metrics,
    run_loso,
    summarize_folds,
)
from bp_apps.speech.data import ConnectedDigitsDataModule, FSDDDigitsDataModule, fsdd_split, parse_fsdd_name
from bp_apps.speech.decoding import DIGIT_WORDS
from tests.test_speech_data import fake_fsdd

ROOT = Path(__file__).resolve().parents[1]
FSDD = ROOT.parent / "shared" / "data" / "fsdd"
needs_fsdd = pytest.mark.skipif(not FSDD.is_dir(), reason="needs ../shared/data/fsdd (the real FSDD recordings)")


def test_holdout_split_keeps_the_speaker_out_of_training(tmp_path: Path) -> None:
    files = fake_fsdd(tmp_path / "rec", speakers=("ann", "bob", "cy"), indices=range(12))
    split = fsdd_split(files, val_indices=(5, 6), speaker_holdout="bob")
    speakers = {name: {parse_fsdd_name(p)[1] for p in paths} for name, paths in split.items()}
    assert speakers == {"train": {"ann", "cy"}, "val": {"ann", "cy"}, "test": {"bob"}}
    assert len(split["test"]) == 10 * 12  # every recording of the held-out speaker, indices 0-4 included
    assert {parse_fsdd_name(p)[2] for p in split["val"]} == {5, 6}
    assert {parse_fsdd_name(p)[2] for p in split["train"]} == set(range(12)) - {5, 6}  # 0-4 train now
    assert sum(len(v) for v in split.values()) == len(files)


def test_holdout_errors_name_the_speaker(tmp_path: Path) -> None:
    files = fake_fsdd(tmp_path / "rec", speakers=("ann", "bob"), indices=range(2))
    with pytest.raises(ValueError, match=r"speaker_holdout: 'zoe' is not an FSDD speaker .*found: ann, bob"):
        fsdd_split(files, speaker_holdout="zoe")
    with pytest.raises(ValueError, match="leaves no speaker to train on"):
        fsdd_split([f for f in files if "ann" in f.name], speaker_holdout="ann")


def test_connected_test_strings_come_from_the_held_out_speaker(tmp_path: Path) -> None:
    fake_fsdd(tmp_path / "fsdd", speakers=("ann", "bob", "cy"), indices=range(12))
    data = ConnectedDigitsDataModule(data_root=str(tmp_path / "fsdd"), train_utterances=30, val_utterances=10,
                                     test_utterances=20, cache=False, speaker_holdout="cy")
    assert {u.speaker for u in data.utterances("test")} == {"cy"}
    for split in ("train", "val"):
        assert "cy" not in {u.speaker for u in data.utterances(split)}
        assert all("_cy_" not in part for u in data.utterances(split) for part in u.parts)
    digits = FSDDDigitsDataModule(data_root=str(tmp_path / "fsdd"), cache=False, speaker_holdout="ann")
    assert {u.speaker for u in digits.utterances("test")} == {"ann"}
    assert "ann" not in {u.speaker for u in digits.utterances("train")}


def test_summary_table_and_missing_metrics(tmp_path: Path) -> None:
    folds = [{"speaker": "a", "status": 0, "test": {"test_acc": 0.9, "test_wer": 0.1}},
             {"speaker": "b", "status": 0, "test": {"test_acc": 0.7}},
             {"speaker": "c", "status": 1, "log": "c/fit.log"}]
    mean = summarize_folds(folds[:2])
    assert mean["test_acc"] == pytest.approx({"mean": 0.8, "min": 0.7, "max": 0.9, "folds": 2})
    assert mean["test_wer"]["folds"] == 1
    table = format_loso_table({"config": "x.yaml", "folds": folds, "mean": mean})
    assert "| a | 90.00 % | 10.00 % |" in table and "failed (exit 1" in table and "**80.00 %** (2 folds)" in table
    with pytest.raises(ValueError, match=r"no metrics\.json"):
        read_fold_metrics(tmp_path)
    command = fold_command("c.yaml", "bob", tmp_path, ["--trainer.max_epochs=1"])
    assert "--data.init_args.speaker_holdout=bob" in command and command[-1] == "--trainer.max_epochs=1"
    with pytest.raises(ValueError, match="unknown FSDD speaker"):
        run_loso(ROOT / "configs/speech/fsdd_digits.yaml", tmp_path, speakers=["zoe"])


@needs_fsdd
@pytest.mark.slow
def test_script_runs_real_folds(tmp_path: Path) -> None:
    """Two real (tiny) folds through the script: each trains without its speaker and tests on it."""
    out = tmp_path / "loso"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts/speech_loso.py"),
         "--config", str(ROOT / "configs/speech/fsdd_digits.yaml"),
         "--out", str(out), "--speakers", "george", "lucas", "--json", str(tmp_path / "loso.json"), "--",
         "--trainer.max_epochs=1", "--data.init_args.limit_per_split=30", "--model.init_args.net.init_args.hidden=16",
         "--data.init_args.cache=false", "--trainer.enable_progress_bar=false"],
        capture_output=True, text=True, cwd=ROOT, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads((tmp_path / "loso.json").read_text())
    assert [f["speaker"] for f in report["folds"]] == ["george", "lucas"]
    assert report["mean"]["test_acc"]["folds"] == 2
    assert "| george |" in result.stdout and "| mean |" in result.stdout
    hparams = (next((out / "george").rglob("hparams.yaml"))).read_text()
    assert "speaker_holdout: george" in hparams


@pytest.mark.skipif(not __import__("bp_apps.speech.synth", fromlist=["x"]).espeak_available(),
                    reason="needs the espeakng-loader package")
def test_synthesized_digits_join_training_only(tmp_path: Path) -> None:
    fake_fsdd(tmp_path / "fsdd", speakers=("ann", "bob"), indices=range(12))
    digits = FSDDDigitsDataModule(data_root=str(tmp_path / "fsdd"), cache=False, cache_dir=str(tmp_path / "cache"),
                                  speaker_holdout="bob", synth_utterances=6)
    train = digits.utterances("train")
    synth = [u for u in train if u.speaker.startswith("espeak:")]
    assert len(synth) == 6 and len(train) == 6 + 10 * 7  # ann's recordings but 5-9 (validation), plus six
    assert all(u.text == DIGIT_WORDS[u.label] for u in synth)  # one digit, labelled
    assert not any(u.speaker.startswith("espeak:") for split in ("val", "test") for u in digits.utterances(split))
    connected = ConnectedDigitsDataModule(data_root=str(tmp_path / "fsdd"), train_utterances=5, val_utterances=3,
                                          test_utterances=3, cache=False, cache_dir=str(tmp_path / "cache"),
                                          synth_utterances=4)
    strings = [u for u in connected.utterances("train") if u.speaker.startswith("espeak:")]
    assert len(strings) == 4 and all(set(u.text.split()) <= set(DIGIT_WORDS) for u in strings)
    with pytest.raises(ValueError, match="synth_utterances must be >= 0"):
        ConnectedDigitsDataModule(data_root=str(tmp_path / "fsdd"), synth_utterances=-1)
