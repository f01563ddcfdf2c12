"""The files a test run leaves in its report folder: per-example predictions, confusion matrices, the CTC alignment
figure and the misclassified images, each checked for its content on tiny runs; the word-error counts and the span
confusion on hand-made examples; and `bp-apps predict` on a speech config."""

from __future__ import annotations

import csv
import io
import json
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torchmetrics.text import WordErrorRate

import bp_apps.core.reports as core_reports
import bp_apps.speech.reports as speech_reports
import bp_apps.vision.reports as vision_reports
from bp_apps.cli import main
from bp_apps.core.callbacks import task_callbacks
from bp_apps.speech.audio import save_audio
from bp_apps.speech.data import FSDDDigitsDataModule
from bp_apps.speech.decoding import DIGIT_WORDS
from bp_apps.speech.features import FeatureConfig
from bp_apps.speech.models import DigitGRUNet
from bp_apps.speech.reports import align_words, prediction_row
from bp_apps.speech.task import SpokenDigitClassifier
from bp_apps.text.labeling.data import LabelingDataModule
from bp_apps.text.labeling.models import BiLSTMTagger
from bp_apps.text.labeling.reports import MISSED, SPURIOUS, span_confusion
from bp_apps.text.labeling.task import TokenLabeler
from bp_apps.vision.data import DigitsImageDataModule
from bp_apps.vision.models import ImageMLP
from bp_apps.vision.reports import denormalise
from bp_apps.vision.task import ImageClassifier

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"
pytestmark = pytest.mark.usefixtures("session_cache")


@pytest.fixture
def figures(monkeypatch: pytest.MonkeyPatch) -> dict[str, dict[str, Any]]:
    """What each report figure holds when it is saved (by file name): its axes' count, titles and tick labels."""
    seen: dict[str, dict[str, Any]] = {}
    original = core_reports.save_figure

    def recording(figure: Any, path: Path) -> Path:
        seen[Path(path).name] = {
            "axes": len(figure.axes), "titles": [a.get_title(loc="left") or a.get_title() for a in figure.axes],
            "xticklabels": [[t.get_text() for t in a.get_xticklabels()] for a in figure.axes],
            "yticklabels": [[t.get_text() for t in a.get_yticklabels()] for a in figure.axes]}
        return original(figure, path)

    for module in (core_reports, speech_reports, vision_reports):
        monkeypatch.setattr(module, "save_figure", recording)
    return seen


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# -- word errors --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reference, hypothesis, counts", [
    ("one two three", "one two three", (0, 0, 0)),
    ("one two three", "one too three", (1, 0, 0)),
    ("one two three", "one three", (0, 1, 0)),
    ("one two", "one two two", (0, 0, 1)),
    ("a b", "b c", (0, 1, 1)),  # matching "b" beats two substitutions
    ("the cat sat", "a cat sat on the mat", (1, 0, 3)),
    ("", "x y", (0, 0, 2)),
    ("a b c", "", (0, 3, 0)),
])
def test_word_alignment_counts_substitutions_deletions_and_insertions(reference: str, hypothesis: str,
                                                                      counts: tuple[int, int, int]) -> None:
    alignment = align_words(reference, hypothesis)
    assert (alignment.substitutions, alignment.deletions, alignment.insertions) == counts
    assert alignment.reference_words == len(reference.split())
    assert [w for _, w, _ in alignment.steps if w is not None] == reference.split()  # the path reads both texts
    assert [w for _, _, w in alignment.steps if w is not None] == hypothesis.split()
    row = prediction_row(reference, hypothesis, index=4, audio=None)
    assert row["index"] == 4 and "audio" not in row  # unknown sources are left out, not written as null
    assert row["word_errors"] == sum(counts) and row["reference_words"] == len(reference.split())


def test_the_word_errors_of_a_test_set_add_up_to_its_wer() -> None:
    pairs = [("one two three four", "one to three"), ("five six", "five six seven"), ("eight", "nine nine"),
             ("zero one two", "zero one two")]
    rows = [prediction_row(r, h) for r, h in pairs]
    wer = float(WordErrorRate()([h for _, h in pairs], [r for r, _ in pairs]))
    assert sum(r["word_errors"] for r in rows) / sum(r["reference_words"] for r in rows) == pytest.approx(wer)


# -- speech recognizer: `bp-apps fit` tests the best checkpoint, and `bp-apps predict` --------------------------

TONES = {"ab": 300.0, "ba": 700.0, "abba": 500.0}


def tone_manifest(folder: Path, count: int = 10, test: int = 4) -> tuple[Path, Path]:
    """Train and test manifests of short tones whose 'transcripts' are fake words."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(count):
        text = str(rng.choice(list(TONES)))
        t = np.arange(int(0.25 * 16_000 * len(text) / 2)) / 16_000
        save_audio(folder / f"{i}.wav", 0.4 * np.sin(2 * np.pi * TONES[text] * t) + 0.01 * rng.standard_normal(t.size),
                   16_000)
        lines.append(json.dumps({"audio": f"{i}.wav", "text": text}))
    (folder / "train.jsonl").write_text("\n".join(lines[:-test]) + "\n")
    (folder / "test.jsonl").write_text("\n".join(lines[-test:]) + "\n")
    return folder / "train.jsonl", folder / "test.jsonl"


def test_recognizer_fit_writes_test_predictions_and_the_ctc_alignment_and_predict_writes_transcripts(
        tmp_path: Path, figures: dict[str, dict[str, Any]], capsys: pytest.CaptureFixture[str]) -> None:
    train, test = tone_manifest(tmp_path / "corpus")
    common = ["--config", str(ROOT / "configs" / "speech" / "manifest_ctc.yaml"),
              f"--trainer.default_root_dir={tmp_path / 'runs'}", "--trainer.enable_progress_bar=false",
              f"--data.train_manifest={train}", f"--data.test_manifest={test}", "--data.val_fraction=0.25",
              "--data.batch_size=4", "--data.features.n_mels=16", "--data.cache=false",
              "--model.net.init_args.hidden=8", "--model.net.init_args.layers=1",
              "--model.net.init_args.conv_channels=4"]
    assert main(["fit", *common, "--trainer.max_epochs=1"]) == 0
    (metrics_path,) = (tmp_path / "runs").rglob("metrics.json")
    folder, metrics = metrics_path.parent, json.loads(metrics_path.read_text())

    rows = read_jsonl(folder / "test_predictions.jsonl")
    references = [json.loads(line)["text"] for line in test.read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2, 3] and [r["reference"] for r in rows] == references
    assert [Path(r["audio"][0]).name for r in rows] == ["6.wav", "7.wav", "8.wav", "9.wav"]
    assert [r["hypothesis"] for r in rows] == [e["prediction"] for e in metrics["test_examples"]]
    for row in rows:
        alignment = align_words(row["reference"], row["hypothesis"])
        assert (row["substitutions"], row["deletions"], row["insertions"]) == (
            alignment.substitutions, alignment.deletions, alignment.insertions)
        assert row["word_errors"] == row["substitutions"] + row["deletions"] + row["insertions"]
    logged_wer = metrics["test"]["test_wer"]
    assert sum(r["word_errors"] for r in rows) / sum(r["reference_words"] for r in rows) == pytest.approx(logged_wer)

    assert (folder / "ctc_alignment.png").read_bytes().startswith(PNG)
    drawn = figures["ctc_alignment.png"]
    assert drawn["axes"] == 6  # the first three test utterances: spectrogram above, posteriors below
    for n in range(3):
        assert f"reference: {rows[n]['reference']!r}" in drawn["titles"][2 * n]
        assert f"hypothesis: {rows[n]['hypothesis']!r}" in drawn["titles"][2 * n]

    capsys.readouterr()
    checkpoint = metrics["best_checkpoint"]
    assert main(["predict", *common, f"--ckpt_path={checkpoint}"]) == 0
    (predictions_path,) = (tmp_path / "runs").rglob("predictions.jsonl")
    predictions = read_jsonl(predictions_path)
    assert [p["index"] for p in predictions] == [0, 1, 2, 3]
    assert [p["prediction"] for p in predictions] == [r["hypothesis"] for r in rows]  # greedy, as the test's


# -- spoken digits: confusion matrix and predictions ----------------------------------------------------------------

def fake_fsdd(folder: Path, recordings: int = 11) -> Path:
    """FSDD-named recordings of one speaker: each digit a tone of its own pitch (0.12 s at 8 kHz)."""
    (folder / "recordings").mkdir(parents=True)
    rng = np.random.default_rng(1)
    t = np.arange(960) / 8000
    for digit in range(10):
        for index in range(recordings):
            samples = 0.5 * np.sin(2 * np.pi * (200 + 150 * digit) * t) + 0.02 * rng.standard_normal(t.size)
            save_audio(folder / "recordings" / f"{digit}_tester_{index}.wav", samples, 8000)
    return folder


def test_digit_classifier_test_writes_a_confusion_matrix_of_digit_words_and_predictions(
        tmp_path: Path, figures: dict[str, dict[str, Any]]) -> None:
    root = fake_fsdd(tmp_path / "fsdd")
    data = FSDDDigitsDataModule(data_root=str(root), features=FeatureConfig(sample_rate=8000, n_mels=16),
                                batch_size=16, cache=False)
    model = SpokenDigitClassifier(net=partial(DigitGRUNet, conv_channels=4, hidden=8, head_hidden=[8]),
                                  augment=None, input_dim=data.input_dim)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=CSVLogger(tmp_path / "run"), enable_progress_bar=False,
                        enable_model_summary=False, callbacks=task_callbacks("val_acc", "max"))
    trainer.fit(model, datamodule=data)
    trainer.test(model, datamodule=data, verbose=False)
    folder = Path(trainer.log_dir)
    metrics = json.loads((folder / "metrics.json").read_text())

    rows = read_jsonl(folder / "test_predictions.jsonl")
    assert len(rows) == 50 and [r["index"] for r in rows] == list(range(50))  # recordings 0-4 of each digit
    for row in rows:
        digit = int(Path(row["audio"][0]).name[0])
        assert row["reference"] == DIGIT_WORDS[digit] and row["hypothesis"] in DIGIT_WORDS
        assert row["correct"] == (row["reference"] == row["hypothesis"]) and 0.0 < row["probability"] <= 1.0
    accuracy = sum(r["correct"] for r in rows) / len(rows)
    assert accuracy == pytest.approx(metrics["test"]["test_acc"])

    assert (folder / "confusion_matrix.png").read_bytes().startswith(PNG)
    drawn = figures["confusion_matrix.png"]
    assert drawn["axes"] == 1
    assert drawn["xticklabels"][0] == list(DIGIT_WORDS) and drawn["yticklabels"][0] == list(DIGIT_WORDS)


# -- labeling: predictions and span confusion -------------------------------------------------------------------------

def test_span_confusion_counts_exact_boundary_matches_missed_and_spurious() -> None:
    gold = [["B-ARG0", "I-ARG0", "B-V", "B-ARG1", "I-ARG1", "O"],
            ["B-ARG0", "B-V", "B-ARG1", "O", "B-ARGM-LOC", "I-ARGM-LOC"]]
    pred = [["B-ARG0", "I-ARG0", "B-V", "B-ARG0", "I-ARG0", "O"],  # ARG0 right; ARG1's span read as ARG0
            ["O", "B-V", "B-ARG1", "I-ARG1", "B-ARGM-LOC", "I-ARGM-LOC"]]  # ARG0 missed; ARG1 too long
    confusion = span_confusion(gold, pred, exclude=["V"])
    table = list(csv.reader(io.StringIO(confusion.to_csv())))
    assert table[0] == ["gold", "ARG0", "ARG1", "ARGM-LOC", MISSED, SPURIOUS]
    assert table[1:] == [["ARG0", "1", "0", "0", "1", "0"],
                         ["ARG1", "1", "0", "0", "1", "1"],  # the too-long ARG1 prediction is spurious
                         ["ARGM-LOC", "0", "0", "1", "0", "0"]]
    with_v = span_confusion(gold, pred)
    assert "V" in with_v.types and with_v.matched["V"]["V"] == 2


def test_span_confusion_of_punctuation_tags_counts_marks_per_token() -> None:
    gold = [["O|C", "COMMA|L", "O|L", "PERIOD|L"], ["O|C", "QUESTION|L"]]
    pred = [["O|C", "PERIOD|L", "COMMA|L", "PERIOD|L"], ["O|C", "O|L"]]
    confusion = span_confusion(gold, pred, bio=False)
    assert confusion.types == ["COMMA", "PERIOD", "QUESTION"]
    assert confusion.rows() == [[0, 1, 0, 0, 1],  # COMMA read as PERIOD; a COMMA where there is none
                                [0, 1, 0, 0, 0],
                                [0, 0, 0, 1, 0]]
    with pytest.raises(ValueError, match="sentence 1 has 2 gold tags but 1 predicted"):
        span_confusion(gold, [pred[0], ["O|C"]], bio=False)


SRL_WORDS = ["the", "a", "cat", "dog", "man", "saw", "took", "ball", "park", "in", "big", "red"]


def srl_records(n: int, seed: int) -> list[dict[str, Any]]:
    """Sentences whose roles sit at fixed offsets from the marked predicate (ARG0 before, ARG1 after)."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        length = int(rng.integers(5, 9))
        tokens = [str(rng.choice(SRL_WORDS)) for _ in range(length)]
        p = int(rng.integers(1, length - 2))
        tags = ["O"] * length
        tags[p - 1], tags[p], tags[p + 1], tags[p + 2] = "B-ARG0", "B-V", "B-ARG1", "I-ARG1"
        records.append({"tokens": tokens, "tags": tags, "predicate": p, "id": f"s{seed}-{i}"})
    return records


def test_labeling_test_writes_predictions_in_file_order_and_the_span_confusion(
        tmp_path: Path, figures: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BP_APPS_CACHE", str(tmp_path / "cache"))
    files = []
    for name, records in (("train", srl_records(60, 0)), ("val", srl_records(12, 1))):
        files.append(tmp_path / f"{name}.jsonl")
        files[-1].write_text("".join(json.dumps(r) + "\n" for r in records))
    data = LabelingDataModule(str(files[0]), str(files[1]), batch_size=16, min_word_freq=1)
    net = partial(BiLSTMTagger, word_dim=8, char_channels=4, char_dim=4, predicate_dim=4, hidden=8, layers=1,
                  dropout=0.0)
    model = TokenLabeler(net=net, optim={"lr": 0.01, "warmup_fraction": 0.0}, exclude_labels=["V"],
                         vocab_file=data.vocab_file)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=CSVLogger(tmp_path / "run"), enable_progress_bar=False,
                        enable_model_summary=False, callbacks=task_callbacks("val_f1", "max"))
    trainer.fit(model, datamodule=data)
    trainer.test(model, datamodule=data, verbose=False)  # no test file: the validation file is tested
    folder = Path(trainer.log_dir)

    rows = read_jsonl(folder / "test_predictions.jsonl")
    val = srl_records(12, 1)
    assert [r["sentence"] for r in rows] == list(range(12)) and [r["id"] for r in rows] == [v["id"] for v in val]
    assert [r["tokens"] for r in rows] == [v["tokens"] for v in val]
    assert [r["gold"] for r in rows] == [v["tags"] for v in val]
    assert [r["predicate"] for r in rows] == [v["predicate"] for v in val]
    assert all(len(r["predicted"]) == len(r["tokens"]) for r in rows)

    table = list(csv.DictReader((folder / "span_confusion.csv").open()))
    expected = span_confusion([r["gold"] for r in rows], [r["predicted"] for r in rows], exclude=["V"])
    assert (folder / "span_confusion.csv").read_text() == expected.to_csv()
    by_type = {row["gold"]: row for row in table}
    for role in ("ARG0", "ARG1"):  # every gold span is matched to some type or missed: 12 of each
        row = by_type[role]
        assert sum(int(row[kind]) for kind in expected.types) + int(row[MISSED]) == 12
    assert "V" not in by_type  # excluded from the scores, so from the confusion
    assert (folder / "span_confusion.png").read_bytes().startswith(PNG)
    assert figures["span_confusion.png"]["xticklabels"][0] == [*expected.types, MISSED, SPURIOUS]


# -- vision: misclassified images ---------------------------------------------------------------------------------

def test_image_test_writes_a_grid_of_its_misclassified_images(tmp_path: Path,
                                                               figures: dict[str, dict[str, Any]]) -> None:
    L.seed_everything(0, verbose=False)
    model = ImageClassifier(partial(ImageMLP, hidden=(8,), dropout=0.0), input_shape=(1, 8, 8), optim={"lr": 1e-3})
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=CSVLogger(tmp_path / "run"), enable_progress_bar=False,
                        enable_model_summary=False, limit_train_batches=2, callbacks=task_callbacks("val_acc", "max"))
    data = DigitsImageDataModule(batch_size=64)
    trainer.fit(model, datamodule=data)
    trainer.test(model, datamodule=data, verbose=False)
    folder = Path(trainer.log_dir)
    accuracy = json.loads((folder / "metrics.json").read_text())["test"]["test_acc"]
    wrong = round((1 - accuracy) * 450)  # digits' test split: 450 images
    assert wrong > 0, "two steps of a tiny MLP must leave mistakes to draw"
    assert (folder / "misclassified.png").read_bytes().startswith(PNG)
    drawn = figures["misclassified.png"]
    assert drawn["axes"] == min(36, wrong)
    titles = drawn["titles"]
    assert all(" → " in t and t.endswith(")") and t.split(" → ")[0] != t.split(" → ")[1].split(" (")[0]
               for t in titles)


def test_a_test_without_a_logger_writes_no_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    model = ImageClassifier(partial(ImageMLP, hidden=(8,), dropout=0.0), input_shape=(1, 8, 8))
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, limit_test_batches=2)
    trainer.test(model, datamodule=DigitsImageDataModule(batch_size=64), verbose=False)
    assert list(tmp_path.iterdir()) == []


def test_denormalise_undoes_the_datas_normalisation() -> None:
    pixels = torch.rand(3, 4, 4)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    normalised = (pixels - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)
    assert torch.allclose(denormalise(normalised, mean, std), pixels, atol=1e-6)
    stretched = denormalise(normalised)  # without the figures: each image to its own range
    assert float(stretched.min()) == 0.0 and float(stretched.max()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="2/2 channels for an image of 3"):
        denormalise(normalised, (0.5, 0.5), (0.2, 0.2))
