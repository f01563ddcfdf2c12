"""The bad-input matrix, end to end: ``bp-apps fit`` with each task's real config on bad data, a bad setting or a
bad ``--ckpt_path``, and the other commands on bad outputs and crafted checkpoints.

Every case runs in a workspace that already holds a previous run (checkpoint, metrics, a cache entry) and the data.
It asserts the exit status and the message (naming the file, line, field or setting), that every file already on
disk is byte-for-byte unchanged, and that no new file is half-written (no temporary file is left; every new
checkpoint and JSON file loads). The README's Reliability section lists the same matrix."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from test_vision_data import add_bad_images, make_face_folder, make_idx_root

from bp_apps.cli import main

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
        "--trainer.limit_test_batches=1", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false"]


# ------------------------------------------------------------------------------------------------ data builders

def write_lines(path: Path, lines: list[str | bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines))
    return path


def srl_record(tokens: str, tags: str, predicate: int) -> str:
    return json.dumps({"tokens": tokens.split(), "tags": tags.split(), "predicate": predicate})


GOOD_SRL = [srl_record("the cat sat on the mat", "B-ARG0 I-ARG0 B-V B-ARGM-LOC I-ARGM-LOC I-ARGM-LOC", 2),
            srl_record("dogs bark loudly", "B-ARG0 B-V B-ARGM-MNR", 1)] * 4


def split_files(folder: str, train: list[str | bytes], val: list[str | bytes]) -> Callable[[Path], Path]:
    """A builder of ``folder/train.jsonl`` and ``folder/validation.jsonl`` under the data root (the config's
    file names); returns the data root."""
    def build(root: Path) -> Path:
        write_lines(root / folder / "train.jsonl", train)
        write_lines(root / folder / "validation.jsonl", val)
        return root
    return build


def labeling_data(train: list[str | bytes], val: list[str | bytes] = GOOD_SRL) -> Callable[[Path], Path]:
    return split_files("labeling/propbank_ewt", train, val)


GOOD_PAIRS = [json.dumps({"source": f"please send the report for week {i} by friday", "target": f"week {i} report"})
              for i in range(12)]


def summarization_data(train: list[str | bytes], val: list[str | bytes] = GOOD_PAIRS) -> Callable[[Path], Path]:
    return split_files("summarization/aeslc", train, val)


def tone(path: Path, seconds: float = 0.4, rate: int = 8000, channels: int = 1) -> Path:
    t = np.arange(int(seconds * rate)) / rate
    wave = 0.3 * np.sin(2 * np.pi * 440 * t) * np.hanning(len(t))
    sf.write(path, np.stack([wave] * channels, axis=1) if channels > 1 else wave, rate)
    return path


def manifest_data(bad: str) -> Callable[[Path], Path]:
    """Manifests of tones, one of them bad: ``corrupt`` (not audio), ``empty`` (zero samples), ``long`` (over
    max_seconds), ``no_text`` (a record without its transcript)."""
    def build(root: Path) -> Path:
        audio = root / "audio"
        audio.mkdir(parents=True)
        records = [{"audio": tone(audio / f"{i}.wav").name, "text": "one two"} for i in range(6)]
        if bad == "corrupt":
            (audio / "bad.wav").write_bytes(b"RIFF....not really a wave file")
        elif bad == "empty":
            sf.write(audio / "bad.wav", np.zeros(0), 8000)
        elif bad == "long":
            tone(audio / "bad.wav", seconds=3.0)
        records.append({"audio": "bad.wav", "text": "three"} if bad != "no_text" else {"audio": "0.wav"})
        write_lines(audio / "train.jsonl", [json.dumps(r) for r in records])
        write_lines(audio / "dev.jsonl", [json.dumps(r) for r in records[:2]])
        return audio
    return build


def fsdd_recordings(root: Path, indices: range) -> Path:
    """Tones named as FSDD recordings; the official split takes 0-4 for test, 5-9 for validation, the rest train."""
    recordings = root / "fsdd" / "recordings"
    recordings.mkdir(parents=True)
    for digit in range(2):
        for index in indices:
            tone(recordings / f"{digit}_alice_{index}.wav", seconds=0.3 + 0.01 * index)
    return root / "fsdd"


def fsdd_with_a_bad_recording(root: Path) -> Path:
    recordings = fsdd_recordings(root, range(14)) / "recordings"
    (recordings / "1_alice_12.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEtruncated")
    return root / "fsdd"


def idx_truncated(root: Path) -> Path:
    make_idx_root(root / "idx")
    images = root / "idx" / "MNIST" / "raw" / "train-images-idx3-ubyte.gz"
    images.write_bytes(images.read_bytes()[:200])
    return root / "idx"


def faces_with_bad_images(root: Path) -> Path:
    faces = make_face_folder(root / "faces")
    add_bad_images(faces / "bob")
    return faces


def missing(root: Path) -> Path:
    return root / "no_such_folder"


class _Payload:
    """Pickled code: unpickling it would create ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def bad_checkpoints(root: Path) -> Path:
    """Checkpoints a ``--ckpt_path`` must refuse: another task's naming a class to import, a truncated one, one
    carrying a code payload. (The digits config needs no data root.)"""
    root.mkdir(parents=True)
    torch.save({"bp_apps_task": "speech.SpeechRecognizer", "state_dict": {},
                "hyper_parameters": {"_class_path": "this.Anything"}}, root / "speech.ckpt")
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, root / "cut.ckpt")
    (root / "cut.ckpt").write_bytes((root / "cut.ckpt").read_bytes()[:300])
    torch.save({"bp_apps_task": "vision.ImageClassifier", "state_dict": {}, "hyper_parameters": {},
                "payload": _Payload(root / "payload_ran")}, root / "payload.ckpt")
    return root


# ------------------------------------------------------------------------------------------------ the matrix

SRL = ("text/srl_propbank_ewt", ["--model.net.hidden=16", "--model.net.word_dim=16", "--model.net.char_channels=4"])
MAIL = ("text/summarize_aeslc", ["--model.net.d_model=16", "--model.net.ff=32", "--model.net.layers=1",
                                 "--data.tokenizer_vocab_size=120"])
FOLDER = ("vision/imagefolder", ["--data.image_size=16", "--data.batch_size=4", "--model.net.init_args.width=4",
                                 "--model.net.init_args.hidden=[8]"])
DIGITS = ("vision/digits_mlp_engine", [])
MNIST = ("vision/mnist_mlp", ["--data.download=false"])  # never the network in tests (missing files are fetched)
FSDD = ("speech/fsdd_digits", ["--model.net.init_args.hidden=8", "--data.batch_size=4"])
MANIFEST = ("speech/manifest_ctc", ["--model.net.init_args.hidden=8", "--model.net.init_args.layers=1",
                                    "--model.decoding.beam_size=0", "--data.features.sample_rate=8000",
                                    "--data.features.n_mels=16", "--data.max_seconds=2", "--data.batch_size=4"])

CASES: dict[str, tuple[tuple[str, list[str]], Callable[[Path], Path] | None, list[str], str]] = {
    # name: ((config, small settings), data builder (returns the data root), more options, expected message)
    "labeling/invalid_utf8": (SRL, labeling_data([GOOD_SRL[0], b'{"tokens": ["caf\xe9"], "tags": ["O"]}']), [],
                              r"train\.jsonl.*:2: .*UTF-8"),
    "labeling/not_json": (SRL, labeling_data([GOOD_SRL[0], "{tokens: oops"]), [], r"train\.jsonl:2: "),
    "labeling/length_mismatch": (SRL, labeling_data([srl_record("a b c", "B-ARG0 B-V", 1)]), [],
                                 r"train\.jsonl.*:1: .*3 tokens.*2 tags"),
    "labeling/predicate_out_of_range": (SRL, labeling_data([srl_record("a b", "B-ARG0 B-V", 5)]), [],
                                        r"train\.jsonl.*:1: .*predicate"),
    "labeling/unknown_tag": (SRL, labeling_data(GOOD_SRL, [srl_record("a b", "B-ARG9 B-V", 1)]), [],
                             r"validation\.jsonl.*:1: .*ARG9"),
    "labeling/missing_root": (SRL, missing, [], r"no_such_folder"),
    "labeling/invalid_setting": (SRL, labeling_data(GOOD_SRL), ["--model.optim.lr=-1"], r"lr must be positive"),
    "summarization/missing_field": (MAIL, summarization_data([GOOD_PAIRS[0], json.dumps({"source": "no target"})]),
                                    [], r"train\.jsonl.*:2: .*target"),
    "summarization/invalid_utf8": (MAIL, summarization_data([GOOD_PAIRS[0], b'{"source": "\xff", "target": "x"}']),
                                   [], r"train\.jsonl.*:2: .*UTF-8"),
    "summarization/missing_root": (MAIL, missing, [], r"no_such_folder"),
    "summarization/invalid_setting": (MAIL, summarization_data(GOOD_PAIRS), ["--model.label_smoothing=1.5"],
                                      r"label_smoothing must be in \[0, 1\)"),
    "vision/corrupt_image_mid_training": (FOLDER, faces_with_bad_images, ["--data.test_fraction=0.0",
                                                                          "--data.val_fraction=0.0",
                                                                          "--trainer.limit_train_batches=null"],
                                          r"(truncated\.jpg|fake\.png)"),
    "vision/truncated_idx": (MNIST, idx_truncated, [], r"train-images-idx3-ubyte\.gz.*truncated"),
    "vision/missing_root": (MNIST, missing, [], r"no_such_folder"),
    "vision/invalid_setting": (FOLDER, lambda root: make_face_folder(root / "faces"), ["--data.batch_size=0"],
                               r"batch_size must be at least 1"),
    "speech/corrupt_recording": (FSDD, fsdd_with_a_bad_recording, [], r"1_alice_12\.wav"),
    "speech/missing_root": (FSDD, missing, [], r"no_such_folder"),
    "speech/invalid_setting": (FSDD, lambda root: fsdd_recordings(root, range(14)), ["--data.val_indices=[4,5]"],
                               r"val_indices and test_indices overlap at \[4\]"),
    "speech/no_training_recordings": (FSDD, lambda root: fsdd_recordings(root, range(10)), [],
                                      r"train split is empty \(data from .*fsdd\)"),
    "speech/corrupt_audio": (MANIFEST, manifest_data("corrupt"), [], r"bad\.wav"),
    "speech/empty_audio": (MANIFEST, manifest_data("empty"), [], r"bad\.wav"),
    "speech/over_max_seconds": (MANIFEST, manifest_data("long"), [], r"bad\.wav.*max_seconds"),
    "speech/missing_transcript": (MANIFEST, manifest_data("no_text"), [], r"train\.jsonl.*:7: .*text"),
    # a --ckpt_path is data, never configuration or code (the options name files the builder made in {root})
    "all/ckpt_path_of_another_task": (DIGITS, bad_checkpoints, ["--ckpt_path={root}/speech.ckpt"],
                                      r"speech\.ckpt: not an image-classification.*speech\.SpeechRecognizer"),
    "all/ckpt_path_truncated": (DIGITS, bad_checkpoints, ["--ckpt_path={root}/cut.ckpt"],
                                r"cut\.ckpt: not a loadable checkpoint"),
    "all/ckpt_path_with_a_payload": (DIGITS, bad_checkpoints, ["--ckpt_path={root}/payload.ckpt"],
                                     r"payload\.ckpt"),
    "all/training_diverges": (DIGITS, None, ["--model.optim.lr=1e12"], r"non-finite"),
}


def data_options(config: str, root: Path) -> list[str]:
    if config == "vision/digits_mlp_engine":  # embedded data: the builder only made files the options name
        return []
    if config == "speech/manifest_ctc":
        return [f"--data.train_manifest={root / 'train.jsonl'}", f"--data.val_manifest={root / 'dev.jsonl'}"]
    return [f"--data.data_root={root}"]


# ------------------------------------------------------------------------------------------------ disk checks

def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def previous_run(work: Path) -> None:
    """What an earlier run left: its checkpoint, metrics and a cache entry."""
    checkpoints = work / "runs" / "lightning_logs" / "version_0" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save({"state_dict": {"w": torch.arange(4.0)}, "global_step": 7}, checkpoints / "last.ckpt")
    (checkpoints.parent / "metrics.json").write_text(json.dumps({"validation": {"val_loss": 0.5}}))
    (work / "cache" / "speech").mkdir(parents=True)
    (work / "cache" / "speech" / "previous.pt").write_bytes(b"an earlier cache entry")


def assert_nothing_lost_or_half_written(before: dict[str, str], work: Path) -> None:
    after = snapshot(work)
    changed = [path for path, digest in before.items() if after.get(path) != digest]
    assert not changed, f"files already on disk were changed or removed: {changed}"
    new = [work / path for path in after if path not in before]
    temporary = [p for p in new if p.suffix in (".tmp", ".part", ".partial") or ".tmp" in p.name]
    assert not temporary, f"half-written files were left: {temporary}"
    for path in new:
        if path.suffix == ".ckpt":
            torch.load(path, weights_only=True)  # complete, or this raises
        elif path.suffix == ".json":
            json.loads(path.read_text())


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_gets_a_clear_error_and_loses_nothing(case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    (config, small), build, options, message = CASES[case]
    work = tmp_path / "work"
    previous_run(work)
    data_root = build(work / "data") if build is not None else None
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("BP_APPS_CACHE", str(work / "cache"))
    before = snapshot(work)
    argv = ["fit", "--config", str(ROOT / "configs" / f"{config}.yaml"), f"--trainer.default_root_dir={work / 'runs'}",
            *FAST, *small, *(data_options(config, data_root) if data_root else []),
            *(option.format(root=data_root) for option in options)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert re.search(rf"bp-apps fit: error: .*{message}", err, flags=re.S), err[-3000:]
    assert_nothing_lost_or_half_written(before, work)
    assert not (work / "data" / "payload_ran").exists(), "a pickled payload ran"


# ------------------------------------------------------------------------------------------------ other commands

def crafted_image_checkpoint(work: Path, change: str) -> Path:
    """A tiny image-classifier checkpoint made bad in one way: ``nan`` weights, ``huge`` hyperparameters, ``classes``
    (too few class names in its data state)."""
    from test_crafted_checkpoints import DIGITS_STATE, save

    from bp_apps.vision.models import SmallCNN
    from bp_apps.vision.task import ImageClassifier

    model = ImageClassifier({"class_path": f"{SmallCNN.__module__}.SmallCNN",
                             "init_args": {"width": 4, "hidden": [8]}}, input_shape=(1, 8, 8))
    folder = work / "models"
    folder.mkdir(exist_ok=True)
    if change == "nan":
        state = model.state_dict()
        state["net.head.0.weight"][0, 0] = float("nan")
        return Path(save(folder, model, state_dict=state))
    if change == "huge":
        hparams = {**model.hparams, "net": {"class_path": f"{SmallCNN.__module__}.SmallCNN",
                                            "init_args": {"width": 200_000, "hidden": [8]}}}
        return Path(save(folder, model, hyper_parameters=hparams))
    return Path(save(folder, model, DigitsImageDataModule={**DIGITS_STATE, "class_names": ["0", "1"]}))


def image(work: Path) -> Path:
    from PIL import Image

    path = work / "digit.png"
    Image.new("L", (8, 8), 128).save(path)
    return path


def jsonl_input(work: Path) -> Path:
    path = work / "in.jsonl"
    path.write_bytes(b'{"id": "s1", "tokens": ["Hello", "world"], "text": "Hello world", "note": "kept"}\n')
    return path


COMMAND_CASES: dict[str, tuple[Callable[[Path], list[str]], str]] = {
    # name: (workspace builder returning the command line, expected message)
    "label/out_is_the_input": (lambda w: ["label", "--file", str(jsonl_input(w)), "--out", str(w / "in.jsonl"),
                                          "--ckpt", str(w / "model.ckpt")], r"--out .*in\.jsonl is the input"),
    "summarize/out_is_the_input": (lambda w: ["summarize", "--file", str(jsonl_input(w)), "--out",
                                              str(w / "in.jsonl"), "--ckpt", str(w / "model.ckpt")],
                                   r"--out .*in\.jsonl is the input"),
    "label/out_is_a_folder": (lambda w: ["label", "--file", str(jsonl_input(w)), "--out", str(w / "runs"),
                                         "--ckpt", str(w / "model.ckpt")], r"--out .*runs is a folder"),
    "predict-image/nan_weights": (lambda w: ["predict-image", str(image(w)), "--ckpt",
                                             str(crafted_image_checkpoint(w, "nan"))],
                                  r"model\.ckpt: weight 'net\.head\.0\.weight' holds NaN"),
    "predict-image/huge_hyperparameters": (lambda w: ["predict-image", str(image(w)), "--ckpt",
                                                      str(crafted_image_checkpoint(w, "huge"))],
                                           r"model\.ckpt: .*describe a model of [\d,]+ weights"),
    "predict-image/too_few_class_names": (lambda w: ["predict-image", str(image(w)), "--ckpt",
                                                     str(crafted_image_checkpoint(w, "classes"))],
                                          r"names 2 classes but the model predicts 10"),
}


@pytest.mark.parametrize("case", sorted(COMMAND_CASES))
def test_bad_command_input_gets_a_clear_error_and_loses_nothing(case: str, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    build, message = COMMAND_CASES[case]
    work = tmp_path / "work"
    previous_run(work)
    argv = build(work)
    before = snapshot(work)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert re.search(rf"bp-apps {argv[0]}: error: .*{message}", err, flags=re.S), err[-3000:]
    assert_nothing_lost_or_half_written(before, work)
