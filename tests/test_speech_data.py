"""Speech data: FSDD's split rule on the real recordings, the pinned download's checksum, connected digits
(determinism, split purity), espeak-ng synthesis and its cache, manifests and their errors."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from bp_apps.speech.audio import save_audio
from bp_apps.speech.data import (
    FSDD_RECORDINGS_DIGEST,
    ManifestDataModule,
    SynthSpeechDataModule,
    connected_digit_utterances,
    download_fsdd,
    fsdd_split,
    list_fsdd,
    load_utterance,
    parse_fsdd_name,
    read_manifest,
    split_voice_variants,
)
from bp_apps.speech.decoding import DIGIT_WORDS
from bp_apps.speech.synth import VOICE_VARIANTS, Espeak, espeak_available, make_texts, synthesize_corpus

ROOT = Path(__file__).resolve().parents[1]
FSDD = ROOT.parent / "shared" / "data" / "fsdd"
needs_fsdd = pytest.mark.skipif(not FSDD.is_dir(), reason="needs ../shared/data/fsdd (the real FSDD recordings)")
needs_espeak = pytest.mark.skipif(not espeak_available(), reason="needs the espeakng-loader package")


def fake_fsdd(folder: Path, speakers: tuple[str, ...] = ("ann", "bob"), indices: range = range(12)) -> list[Path]:
    """Tiny FSDD-named recordings: a tone per digit, 0.1 s, 8 kHz."""
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for digit in range(10):
        for speaker in speakers:
            for index in indices:
                t = np.arange(800) / 8000
                samples = 0.3 * np.sin(2 * np.pi * (200 + 50 * digit) * t)
                files.append(save_audio(folder / f"{digit}_{speaker}_{index}.wav", samples, 8000))
    return files


@needs_fsdd
def test_fsdd_official_split_on_the_real_data() -> None:
    files = list_fsdd(FSDD)
    assert len(files) == 2000
    split = fsdd_split(files)
    assert {k: len(v) for k, v in split.items()} == {"train": 1600, "val": 200, "test": 200}
    assert {parse_fsdd_name(p)[2] for p in split["test"]} == {0, 1, 2, 3, 4}
    assert {parse_fsdd_name(p)[2] for p in split["val"]} == {5, 6, 7, 8, 9}
    assert min(parse_fsdd_name(p)[2] for p in split["train"]) == 10
    for name in ("train", "val", "test"):  # every speaker and digit in every split
        assert {parse_fsdd_name(p)[:2] for p in split[name]} == {(d, s) for d in range(10)
                                                                  for s in ("george", "jackson", "lucas", "nicolas")}
    info = sf.info(str(split["test"][0]))
    assert info.samplerate == 8000 and info.channels == 1


def test_fsdd_name_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"notes\.wav: not an FSDD recording name"):
        parse_fsdd_name(tmp_path / "notes.wav")
    with pytest.raises(FileNotFoundError, match="no FSDD recordings"):
        list_fsdd(tmp_path)
    with pytest.raises(ValueError, match="overlap"):
        fsdd_split([], val_indices=(4, 5))


def _tar_of(folder: Path, archive: Path, top: str = "free-spoken-digit-dataset-abc") -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=f"{top}/recordings")
        tar.addfile(tarfile.TarInfo(f"{top}/README.md"), io.BytesIO(b""))
    return archive


@needs_fsdd
def test_download_checks_the_recordings_checksum(tmp_path: Path) -> None:
    archive = _tar_of(FSDD / "recordings", tmp_path / "fsdd.tar.gz")
    target = download_fsdd(tmp_path / "fsdd", url=archive.as_uri())
    assert len(list(target.glob("*.wav"))) == 2000
    assert sorted(p.name for p in (tmp_path / "fsdd").iterdir()) == ["recordings"]  # no temporary folder left


def test_download_refuses_a_checksum_mismatch_and_leaves_nothing(tmp_path: Path) -> None:
    fake_fsdd(tmp_path / "src", speakers=("george",), indices=range(2))
    archive = _tar_of(tmp_path / "src", tmp_path / "fsdd.tar.gz")
    with pytest.raises(ValueError, match="checksum mismatch"):
        download_fsdd(tmp_path / "fsdd", url=archive.as_uri(), expected_digest=FSDD_RECORDINGS_DIGEST)
    assert list((tmp_path / "fsdd").iterdir()) == []


def test_connected_digits_are_deterministic_and_pure(tmp_path: Path) -> None:
    files = fake_fsdd(tmp_path / "rec")
    split = fsdd_split(files)
    first = connected_digit_utterances(split["test"], 50, seed=3)
    assert first == connected_digit_utterances(split["test"], 50, seed=3)
    assert first != connected_digit_utterances(split["test"], 50, seed=4)
    test_files = {str(p) for p in split["test"]}
    lengths = set()
    for u in first:
        assert set(u.parts) <= test_files  # test strings only use test recordings
        assert len({parse_fsdd_name(p)[1] for p in u.parts}) == 1 == len({u.speaker})  # one speaker
        assert u.text.split() == [DIGIT_WORDS[parse_fsdd_name(p)[0]] for p in u.parts]
        assert len(u.pauses) == len(u.parts) - 1 and all(0.05 <= p <= 0.3 for p in u.pauses)
        lengths.add(len(u.parts))
    assert min(lengths) >= 1 and max(lengths) <= 7 and len(lengths) > 3
    waveform = load_utterance(first[0], 8000)
    expected = 800 * len(first[0].parts) + sum(int(p * 8000) for p in first[0].pauses)
    assert waveform.shape == (expected,)


@needs_fsdd
def test_connected_digits_module_splits_use_only_their_recordings(tmp_path: Path) -> None:
    from bp_apps.speech.data import ConnectedDigitsDataModule

    data = ConnectedDigitsDataModule(str(FSDD), train_utterances=40, val_utterances=10, test_utterances=10,
                                     cache_dir=str(tmp_path))
    indices = {split: {parse_fsdd_name(p)[2] for u in data.utterances(split) for p in u.parts}
               for split in ("train", "val", "test")}
    assert indices["test"] <= set(range(5)) and indices["val"] <= set(range(5, 10))
    assert min(indices["train"]) >= 10


def test_voice_variant_split_is_deterministic_and_disjoint() -> None:
    split = split_voice_variants(VOICE_VARIANTS, 5, 8, seed=0)
    assert split == split_voice_variants(VOICE_VARIANTS, 5, 8, seed=0)
    assert len(split["val"]) == 5 and len(split["test"]) == 8
    assert not (set(split["train"]) & set(split["val"] + split["test"])) and not set(split["val"]) & set(split["test"])
    assert sorted(split["train"] + split["val"] + split["test"]) == sorted(VOICE_VARIANTS)
    with pytest.raises(ValueError, match="cannot hold out"):
        split_voice_variants(["a", "b"], 1, 1)


def test_texts_are_deterministic_and_in_the_vocabulary() -> None:
    texts = make_texts(100, seed=1, digit_fraction=0.5)
    assert texts == make_texts(100, seed=1, digit_fraction=0.5)
    digits = [t for t in texts if set(t.split()) <= set(DIGIT_WORDS)]
    assert 30 < len(digits) < 70 and all(1 <= len(t.split()) <= 7 for t in digits)
    assert all(set(t) <= set("abcdefghijklmnopqrstuvwxyz ") for t in texts)


@needs_espeak
def test_espeak_synthesis_has_plausible_length() -> None:
    engine = Espeak.get()
    assert engine.sample_rate == 22_050
    short = engine.synthesize("one", "en-us+m3", rate=175)
    long = engine.synthesize("one two three four five six seven", "en-us+m3", rate=175)
    assert 0.2 < short.size / 22_050 < 1.5 and 1.5 < long.size / 22_050 < 5.0
    slow = engine.synthesize("one two three four five six seven", "en-us+m3", rate=100)
    assert slow.size > 1.3 * long.size and np.abs(long).max() > 1000
    with pytest.raises(ValueError, match="no voice 'xx-nowhere'"):
        engine.synthesize("one", "xx-nowhere")


@needs_espeak
def test_synth_corpus_is_cached_without_temporary_files(tmp_path: Path) -> None:
    texts = ["three one four", "the cat sees a green apple"]
    items = synthesize_corpus(texts, ["en-us+m1", "en+f2"], tmp_path, seed=0, noise_prob=0.5)
    folder = Path(items[0].audio).parent
    assert sorted(p.name for p in folder.iterdir()) == ["000000.wav", "000001.wav", "manifest.jsonl"]
    assert [u.text for u in items] == texts and all(sf.info(u.audio).samplerate == 22_050 for u in items)
    mtime = Path(items[0].audio).stat().st_mtime_ns
    again = synthesize_corpus(texts, ["en-us+m1", "en+f2"], tmp_path, seed=0, noise_prob=0.5)
    assert again == items and Path(items[0].audio).stat().st_mtime_ns == mtime  # reused, not re-synthesized


@needs_espeak
def test_synth_module_holds_voices_out_of_training(tmp_path: Path) -> None:
    data = SynthSpeechDataModule(train_utterances=6, val_utterances=2, test_utterances=2, cache_dir=str(tmp_path),
                                 accents=["en-us"], batch_size=2)
    train_voices = {u.speaker for u in data.utterances("train")}
    test_variants = {u.speaker.split("+")[1] for u in data.utterances("test")}
    assert not {v.split("+")[1] for v in train_voices} & test_variants
    assert test_variants <= set(data.variants["test"])
    batch = next(iter(data.test_dataloader()))
    assert batch.features.shape[0] == 2 and batch.features.shape[2] == 64 and batch.targets.shape[0] == 2


def write_manifest(folder: Path, lines: list[str]) -> Path:
    path = folder / "m.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_manifest_reading_normalises_and_errors_name_file_and_line(tmp_path: Path) -> None:
    save_audio(tmp_path / "a.wav", 0.3 * np.sin(np.arange(1600) / 5), 16_000)
    path = write_manifest(tmp_path, ['{"audio": "a.wav", "text": "Hello, World 2!"}'])
    (u,) = read_manifest(path)
    assert u.text == "hello world two" and u.parts == (str(tmp_path / "a.wav"),)
    bad = write_manifest(tmp_path, ['{"audio": "a.wav", "text": "ok"}', "{not json"])
    with pytest.raises(ValueError, match=r"m.jsonl:2: not valid JSON"):
        read_manifest(bad)
    strict = write_manifest(tmp_path, ['{"audio": "a.wav", "text": "ok"}', '{"audio": "a.wav", "text": "30 °C"}'])
    with pytest.raises(ValueError, match=r"m.jsonl:2: character '°'"):
        read_manifest(strict, strict_text=True)
    assert read_manifest(strict)[1].text == "three zero c"
    empty = write_manifest(tmp_path, ['{"audio": "a.wav", "text": "?!"}'])
    with pytest.raises(ValueError, match=r"m\.jsonl:1: the transcript is empty"):
        read_manifest(empty)
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(b'{"audio": "a.wav", "text": "ok"}\n{"audio": "a.wav", "text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"latin1\.jsonl:2: invalid UTF-8"):
        read_manifest(latin1)


def test_manifest_module_holds_out_validation_and_names_bad_audio(tmp_path: Path) -> None:
    for i in range(10):
        save_audio(tmp_path / f"{i}.wav", 0.3 * np.sin(np.arange(1600 + 100 * i) / 5), 16_000)
    lines = [json.dumps({"audio": f"{i}.wav", "text": f"word {i}"}) for i in range(10)]
    path = write_manifest(tmp_path, lines)
    data = ManifestDataModule(str(path), val_fraction=0.2, cache_dir=str(tmp_path / "cache"), features={"n_mels": 32})
    train, val = data.utterances("train"), data.utterances("val")
    assert len(train) == 8 and len(val) == 2 and not {u.parts for u in train} & {u.parts for u in val}
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert batch.features.shape[2] == 32 and int(batch.lengths.max()) == batch.features.shape[1]
    assert not list((tmp_path / "cache").glob(".*tmp"))
    (tmp_path / "3.wav").write_bytes(b"broken")
    broken = ManifestDataModule(str(path), val_fraction=0.2, cache=False)
    with pytest.raises(ValueError, match=r"cannot read audio .*3.wav"):
        broken.setup("fit")
    torch.manual_seed(0)
