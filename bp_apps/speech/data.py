"""Speech data for Lightning: the Free Spoken Digit Dataset (isolated digits, and TIDIGITS-style connected digits
made from it), espeak-ng synthesized speech, JSONL manifests, and torchaudio's LibriSpeech / Speech Commands.

Every module turns its utterances into model inputs once (log-mel or waveform, see ``features.py``), keeps them in
an atomically written feature cache. The feature settings are one group, ``features`` (a
:class:`~bp_apps.speech.features.FeatureConfig`; a config writes it as a mapping, e.g. ``features: {sample_rate:
8000, n_mels: 40}``). A module exposes ``input_dim`` right after ``__init__``, as do FSDD's ``num_classes`` and the
recognition modules' ``lexicon_words`` (the training words, read on first use); ``bp-apps`` links them to the model.
Its checkpoint state (the feature settings, and the training words or class names) is what ``transcribe`` needs;
``setup`` refuses a model built for another feature size or class count. Recognition loaders yield
:class:`SpeechBatch`; the isolated-digit loader yields ``((features, lengths), labels)``.

FSDD's official split: recordings 0-4 of every speaker and digit are the test set, the rest train; validation is
taken from train by index (``val_indices``, default 5-9). Connected-digit utterances of a split are built only from
that split's recordings. Synthesized speech holds out whole voice variants for validation and test.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import tarfile
import tempfile
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, Dataset

from bp_apps.core.compose import settings
from bp_apps.core.datalink import PreprocessingDataModule, UserDataModuleCheck, data_value
from bp_apps.core.io import default_cache_dir, default_data_root, jsonl_objects
from bp_apps.core.resume import resumable_loader
from bp_apps.core.samplers import evaluation_loader
from bp_apps.speech.audio import load_audio, normalise_level, trim_silence
from bp_apps.speech.decoding import DIGIT_WORDS, encode_text, normalise_transcript
from bp_apps.speech.features import FeatureCache, FeatureConfig, make_extractor

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_FEATURES", "FSDD_ARCHIVE_URL", "FSDD_FEATURES", "FSDD_RECORDINGS_DIGEST",
           "ConnectedDigitsDataModule", "FSDDDigitsDataModule", "LibriSpeechDataModule", "ManifestDataModule",
           "RecognitionDataModule", "SpeechBatch", "SpeechCommandsDataModule", "SynthSpeechDataModule", "Utterance",
           "connected_digit_utterances", "download_fsdd", "fsdd_split", "list_fsdd", "parse_fsdd_name",
           "read_manifest", "split_voice_variants", "synthesized_digit_utterances", "user_speech_check"]

FSDD_COMMIT = "26eb9aaf76e81b692f806f9140c2d2777410d7a1"
FSDD_ARCHIVE_URL = f"https://github.com/Jakobovski/free-spoken-digit-dataset/archive/{FSDD_COMMIT}.tar.gz"
FSDD_RECORDINGS_DIGEST = "f288642b28d9e72bd7c0dd48b04e517e16ee87e0846e2f036fe6b926b270b33b"
"""sha256 over ``name\\0sha256(file)\\n`` of the sorted recordings of speakers george, jackson, lucas and nicolas
at the pinned commit (the four speakers of the developers' local copy); checked after every download."""
FSDD_CHECKED_SPEAKERS = ("george", "jackson", "lucas", "nicolas")
FSDD_NAME = re.compile(r"^([0-9])_([A-Za-z]+)_([0-9]+)\.wav$")
FSDD_FOLDER = "fsdd"
"""The FSDD folder's name under the data root: without ``data_root``, FSDD is read from ``$BP_APPS_DATA/fsdd``,
else ``./data/fsdd``."""


# ----------------------------------------------------------------------------------------------- utterances

@dataclass(frozen=True)
class Utterance:
    """Audio made of one or more files joined with pauses (seconds after each part but the last), its transcript
    (already normalised), and an optional class label (the isolated digit)."""

    parts: tuple[str, ...]
    text: str
    pauses: tuple[float, ...] = ()
    label: int = -1
    speaker: str = ""

    def key(self) -> str:
        return json.dumps([self.parts, self.text, [round(p, 4) for p in self.pauses], self.label])


def load_utterance(utterance: Utterance, sample_rate: int, max_seconds: float | None = None,
                   trim_db: float = 0.0) -> Tensor:
    """The utterance's waveform at ``sample_rate``: parts loaded (any rate, down-mixed), each trimmed of silence
    beyond ``trim_db`` (0: kept), joined with silent pauses, level-normalised as a whole."""
    pieces = []
    for i, part in enumerate(utterance.parts):
        audio = load_audio(part, sample_rate, normalise=len(utterance.parts) > 1, max_seconds=max_seconds)
        pieces.append(trim_silence(audio, sample_rate, trim_db))
        if i < len(utterance.pauses):
            pieces.append(torch.zeros(int(utterance.pauses[i] * sample_rate)))
    return normalise_level(torch.cat(pieces))


class SpeechBatch(NamedTuple):
    """A padded recognition batch: inputs ``(B, T, F)``, their lengths, targets ``(B, L)`` (0-padded), target
    lengths, and the transcripts."""

    features: Tensor
    lengths: Tensor
    targets: Tensor
    target_lengths: Tensor
    texts: list[str]


class FeatureDataset(Dataset):
    """Precomputed model inputs with their utterances."""

    def __init__(self, features: list[Tensor], utterances: Sequence[Utterance]) -> None:
        self.features, self.utterances = features, list(utterances)
        self.targets = [encode_text(u.text) for u in self.utterances]

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, str, int]:
        u = self.utterances[index]
        return self.features[index], self.targets[index], u.text, u.label


def collate_speech(items: list[tuple[Tensor, Tensor, str, int]]) -> SpeechBatch:
    features, targets, texts, _ = zip(*items)
    return SpeechBatch(pad_sequence(list(features), batch_first=True),
                       torch.tensor([f.shape[0] for f in features]),
                       pad_sequence(list(targets), batch_first=True),
                       torch.tensor([t.shape[0] for t in targets]), list(texts))


def collate_digits(items: list[tuple[Tensor, Tensor, str, int]]) -> tuple[tuple[Tensor, Tensor], Tensor]:
    features, _, _, labels = zip(*items)
    return ((pad_sequence(list(features), batch_first=True), torch.tensor([f.shape[0] for f in features])),
            torch.tensor(labels))


# ----------------------------------------------------------------------------------------------- base module

DEFAULT_FEATURES = FeatureConfig()
"""16 kHz log-mel, 64 bands every 10 ms: the feature settings of most modules when a config gives none."""
FSDD_FEATURES = FeatureConfig(sample_rate=8000, n_mels=40)
"""FSDD's recordings are 8 kHz: the feature settings of the FSDD modules when a config gives none."""
LIBRISPEECH_FEATURES = FeatureConfig(n_mels=80)
SPEECH_COMMANDS_FEATURES = FeatureConfig(n_mels=40)

FeatureSettings = FeatureConfig | Mapping[str, Any] | None
"""A module's ``features`` argument in Python: the settings, a mapping over its defaults, or None (its defaults)."""


class SpeechDataModule(PreprocessingDataModule):
    """What every speech data module shares: the feature settings ``features`` (``input_dim``: the feature size
    per frame), the feature cache, loaders, and the feature settings as its checkpoint state (what ``transcribe``
    needs). ``default_features`` are a module's settings when none are given (a mapping overrides its fields).

    Subclasses implement ``utterances(split)`` for ``train``, ``val`` and ``test``. ``cache_dir`` defaults to
    ``$BP_APPS_CACHE/speech`` (or ``~/.cache/bp_apps/speech``); ``cache=False`` keeps features in memory only.
    ``max_seconds`` refuses longer training/evaluation files (a ValueError naming the file)."""

    collate = staticmethod(collate_speech)
    MUST_MATCH = ("features",)
    default_features = DEFAULT_FEATURES

    def __init__(self, features: FeatureSettings = None, batch_size: int = 32, max_seconds: float | None = 30.0,
                 num_workers: int = 0, cache: bool = True, cache_dir: str | None = None, seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()  # with the subclass's arguments: Lightning collects the whole __init__ chain
        self.features = settings(FeatureConfig, features, "features", self.default_features)
        self.input_dim = self.features.dim
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.max_seconds = max_seconds
        root = Path(cache_dir) if cache_dir else default_cache_dir() / "speech"
        self.cache = FeatureCache(root if cache else None)
        self.datasets: dict[str, FeatureDataset] = {}

    def utterances(self, split: str) -> list[Utterance]:
        raise NotImplementedError

    def metrics_summary(self) -> dict[str, Any]:
        """For ``metrics.json``: the feature settings."""
        return {"features": self.features.to_dict()}

    def preprocessing(self) -> dict[str, Any]:
        """What ``transcribe`` needs: the feature settings."""
        return {"features": self.features.to_dict()}

    def build_features(self, utterances: Sequence[Utterance]) -> list[Tensor]:
        from tqdm.auto import tqdm

        extract = make_extractor(self.features)
        rate = self.features.sample_rate
        progress = tqdm(utterances, desc="features", unit="file", disable=None, leave=False)  # silent without a tty
        trim = self.features.trim_db
        return [extract(load_utterance(u, rate, self.max_seconds, trim)).contiguous() for u in progress]

    def source(self, split: str) -> str | None:
        """Where ``split``'s audio comes from, for error messages: the data root, when the module has one."""
        root = getattr(self, "data_root", None)
        return str(root) if root else None

    def dataset(self, split: str) -> FeatureDataset:
        if split not in self.datasets:
            utterances = self.utterances(split)
            if not utterances:
                where = self.source(split)
                raise ValueError(f"{type(self).__name__}: the {split} split is empty"
                                 + (f" (data from {where})" if where else ""))
            key = FeatureCache.key([u.key() for u in utterances], self.features)
            features = self.cache.get_or_build(f"{type(self).__name__}-{split}", key,
                                               lambda: self.build_features(utterances))
            self.datasets[split] = FeatureDataset(features, utterances)
        return self.datasets[split]

    def setup(self, stage: str | None = None) -> None:
        self.check_model()
        splits = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)
                  }.get(stage or "", ("train", "val"))
        for split in splits:
            self.dataset(split)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        """Training batches are shuffled by ``(seed, epoch)`` and resume exactly in the middle of an epoch."""
        kwargs = dict(collate_fn=self.collate, num_workers=self.num_workers, persistent_workers=self.num_workers > 0)
        if shuffle:
            return resumable_loader(self.dataset(split), self.batch_size, self.seed, **kwargs)
        return evaluation_loader(self.dataset(split), self.trainer, batch_size=self.batch_size, **kwargs)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)

    def predict_dataloader(self) -> DataLoader:
        """``bp-apps predict`` runs over the test split, in order."""
        return self._loader("test", False)


class RecognitionDataModule(SpeechDataModule):
    """Transcribed speech for the CTC recognizer. Its training words (``lexicon_words``) are linked by ``bp-apps``
    to the recognizer's beam-search lexicon and saved in its checkpoint state for ``transcribe --beam``.

    Only these modules have ``lexicon_words``: LightningCLI records a linked value in the model's saved
    hyperparameters even when the model has no such argument, which would break ``--ckpt_path``."""

    def preprocessing(self) -> dict[str, Any]:
        """The feature settings and the training words."""
        return {**super().preprocessing(), "words": list(self.lexicon_words)}

    def vocabulary_words(self) -> list[str]:
        """Every word of the training transcripts (for a beam-search lexicon)."""
        return sorted({w for u in self.utterances("train") for w in u.text.split()})

    @functools.cached_property
    def lexicon_words(self) -> list[str]:
        """:meth:`vocabulary_words`, read once; empty when the training transcripts cannot be read (``setup`` then
        says why)."""
        try:
            return self.vocabulary_words()
        except (ValueError, FileNotFoundError):
            return []


# ----------------------------------------------------------------------------------------------- FSDD

def parse_fsdd_name(path: str | Path) -> tuple[int, str, int]:
    """``{digit}_{speaker}_{index}.wav`` → (digit, speaker, index); ValueError naming the file otherwise."""
    match = FSDD_NAME.match(Path(path).name)
    if match is None:
        raise ValueError(f"{path}: not an FSDD recording name (expected DIGIT_SPEAKER_INDEX.wav)")
    return int(match.group(1)), match.group(2), int(match.group(3))


def list_fsdd(root: str | Path) -> list[Path]:
    """The sorted FSDD recordings under ``root`` (``root/recordings`` or ``root`` itself)."""
    root = Path(root)
    folder = root / "recordings" if (root / "recordings").is_dir() else root
    if not folder.is_dir():
        raise FileNotFoundError(f"FSDD folder {root} does not exist; set data_root or download=True")
    files = sorted(p for p in folder.glob("*.wav") if FSDD_NAME.match(p.name))
    if not files:
        raise FileNotFoundError(f"no FSDD recordings (DIGIT_SPEAKER_INDEX.wav) in {folder}")
    return files


def fsdd_split(files: Sequence[str | Path], val_indices: Sequence[int] = (5, 6, 7, 8, 9),
               test_indices: Sequence[int] = (0, 1, 2, 3, 4), speaker_holdout: str | None = None
               ) -> dict[str, list[Path]]:
    """FSDD's official split by recording index: ``test_indices`` (0-4) test, the rest train, with
    ``val_indices`` of train taken as validation. Every speaker and digit is in every split.

    ``speaker_holdout`` names a speaker whose every recording is the test set instead (a speaker-independent
    evaluation: the model never hears that voice); the other speakers' recordings are split into train and
    validation by ``val_indices`` alone (their recordings 0-4 train as well). ValueError for a speaker that is not
    among the files, or for a hold-out that leaves no training speaker."""
    overlap = set(val_indices) & set(test_indices)
    if overlap:
        raise ValueError(f"val_indices and test_indices overlap at {sorted(overlap)}")
    split: dict[str, list[Path]] = {"train": [], "val": [], "test": []}
    if speaker_holdout is not None:
        speakers = sorted({parse_fsdd_name(path)[1] for path in files})
        if speaker_holdout not in speakers:
            raise ValueError(f"speaker_holdout: {speaker_holdout!r} is not an FSDD speaker of the data "
                             f"(found: {', '.join(speakers) or 'none'})")
        if len(speakers) < 2:
            raise ValueError(f"speaker_holdout: holding out {speaker_holdout!r} leaves no speaker to train on")
    for path in files:
        _, speaker, index = parse_fsdd_name(path)
        if speaker_holdout is not None:
            name = "test" if speaker == speaker_holdout else "val" if index in val_indices else "train"
        else:
            name = "test" if index in test_indices else "val" if index in val_indices else "train"
        split[name].append(Path(path))
    return split


def _recordings_digest(folder: Path, speakers: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.glob("*.wav") if parse_fsdd_name(p)[1] in speakers):
        digest.update(path.name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).hexdigest().encode() + b"\n")
    return digest.hexdigest()


def _download_progress(description: str):
    """A ``urlretrieve`` report hook drawing a tqdm bar (silent when not on a terminal)."""
    from tqdm.auto import tqdm

    bar = tqdm(desc=description, unit="B", unit_scale=True, disable=None, leave=False)

    def hook(blocks: int, block_size: int, total: int) -> None:
        if total > 0 and bar.total != total:
            bar.total = total
        bar.update(blocks * block_size - bar.n)

    return hook


def download_fsdd(root: str | Path, url: str = FSDD_ARCHIVE_URL, expected_digest: str = FSDD_RECORDINGS_DIGEST
                  ) -> Path:
    """Download the pinned FSDD commit into ``root/recordings`` (for online users) and check the recordings of the
    four reference speakers against ``expected_digest``. Nothing is left in ``root`` when the check fails.
    Returns the recordings folder; an existing one is kept as is."""
    root = Path(root)
    target = root / "recordings"
    if target.is_dir() and any(target.glob("*.wav")):
        return target
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".fsdd-download-") as tmp:
        archive = Path(tmp) / "fsdd.tar.gz"
        urllib.request.urlretrieve(url, archive, reporthook=_download_progress(f"downloading {url}"))
        unpacked = Path(tmp) / "unpacked"
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if m.isfile() and "/recordings/" in f"/{m.name}"
                       and FSDD_NAME.match(Path(m.name).name)]
            tar.extractall(unpacked, members=members, filter="data")
        found = {Path(m.name).parent for m in members}
        if len(found) != 1:
            raise ValueError(f"{url}: expected one recordings/ folder in the archive, found {len(found)}")
        folder = unpacked / found.pop()
        digest = _recordings_digest(folder, FSDD_CHECKED_SPEAKERS)
        if digest != expected_digest:
            raise ValueError(f"{url}: FSDD recordings checksum mismatch (got {digest}, expected {expected_digest})")
        os.replace(folder, target)
    return target


def fsdd_root(data_root: str | Path | None) -> Path:
    """The FSDD folder: ``data_root`` (``~`` expanded), else ``fsdd`` under the default data root
    (``$BP_APPS_DATA``, else ``./data``), looked up when called."""
    return default_data_root() / FSDD_FOLDER if data_root is None else Path(data_root).expanduser()


def _fsdd_files(data_root: str | None, download: bool) -> list[Path]:
    root = fsdd_root(data_root)
    if download:
        download_fsdd(root)
    if not root.is_dir():
        value = os.environ.get("BP_APPS_DATA")
        hint = (f"data_root is {str(data_root)!r} (--data.data_root)" if data_root is not None else
                f"without data_root, FSDD is read from {FSDD_FOLDER}/ under $BP_APPS_DATA, else under ./data "
                f"(here: {f'$BP_APPS_DATA={value!r}' if value else '$BP_APPS_DATA is not set'}); set $BP_APPS_DATA, "
                f"or --data.data_root=PATH to the FSDD folder itself")
        raise FileNotFoundError(f"FSDD folder {root} ({str(root.absolute())!r}) does not exist; {hint}. "
                                f"--data.download=true fetches the pinned FSDD commit from GitHub (checksummed) "
                                f"into it.")
    return list_fsdd(root)


class FSDDDigitsDataModule(SpeechDataModule):
    """Isolated spoken digits (10 classes) from FSDD with its official split; loaders yield
    ``((features (B, T, F), lengths), labels)``. ``limit_per_split`` keeps the first N of each split (tests).
    ``data_root`` is the FSDD folder (None: :func:`fsdd_root`, ``fsdd/`` under ``$BP_APPS_DATA`` or ``./data``).
    ``speaker_holdout``: test on every recording of that speaker and train on the others (:func:`fsdd_split`).
    ``synth_utterances``: that many espeak-ng spoken digits join the training split
    (:func:`synthesized_digit_utterances`; validation and test stay FSDD recordings)."""

    collate = staticmethod(collate_digits)
    default_features = FSDD_FEATURES

    def __init__(self, data_root: str | None = None, download: bool = False,
                 val_indices: Sequence[int] = (5, 6, 7, 8, 9), limit_per_split: int | None = None,
                 features: FeatureConfig = FSDD_FEATURES, batch_size: int = 32, max_seconds: float | None = 10.0,
                 num_workers: int = 0, cache: bool = True, cache_dir: str | None = None, seed: int = 0,
                 speaker_holdout: str | None = None, synth_utterances: int = 0) -> None:
        super().__init__(features, batch_size=batch_size, max_seconds=max_seconds, num_workers=num_workers,
                         cache=cache, cache_dir=cache_dir, seed=seed)
        if synth_utterances < 0:
            raise ValueError(f"synth_utterances must be >= 0, got {synth_utterances}")
        self.data_root, self.download, self.val_indices = data_root, download, tuple(val_indices)
        self.limit_per_split, self.speaker_holdout = limit_per_split, speaker_holdout
        self.synth_utterances = synth_utterances
        self.synth_dir = Path(cache_dir) if cache_dir else default_cache_dir() / "speech"
        self.num_classes = len(DIGIT_WORDS)
        self._split: dict[str, list[Path]] | None = None

    def source(self, split: str) -> str | None:
        return str(fsdd_root(self.data_root))

    def preprocessing(self) -> dict[str, Any]:
        """The feature settings and the class names (the word ``transcribe`` gives for each class)."""
        return {**super().preprocessing(), "class_names": list(DIGIT_WORDS)}

    def split(self) -> dict[str, list[Path]]:
        if self._split is None:
            self._split = fsdd_split(_fsdd_files(self.data_root, self.download), self.val_indices,
                                     speaker_holdout=self.speaker_holdout)
        return self._split

    def utterances(self, split: str) -> list[Utterance]:
        rng = np.random.default_rng(self.seed)
        files = self.split()[split]
        if self.limit_per_split is not None:  # a random but fixed subset, so every class appears
            files = [files[i] for i in sorted(rng.permutation(len(files))[:self.limit_per_split])]
        out = []
        for path in files:
            digit, speaker, _ = parse_fsdd_name(path)
            out.append(Utterance((str(path),), DIGIT_WORDS[digit], label=digit, speaker=speaker))
        if split == "train":
            out += synthesized_digit_utterances(self.synth_utterances, self.seed * 1000 + 7, 1, self.synth_dir)
        return out


def connected_digit_utterances(files: Sequence[str | Path], count: int, seed: int, min_digits: int = 1,
                               max_digits: int = 7, pause_range: tuple[float, float] = (0.05, 0.3)
                               ) -> list[Utterance]:
    """``count`` TIDIGITS-style utterances, deterministic by ``seed``: each joins 1-7 recordings of one speaker,
    drawn from ``files`` only, with random pauses; the transcript reads the digits ("three one four")."""
    if not 1 <= min_digits <= max_digits:
        raise ValueError(f"need 1 <= min_digits <= max_digits, got {min_digits}, {max_digits}")
    by_speaker: dict[str, list[Path]] = {}
    for path in sorted(Path(f) for f in files):
        by_speaker.setdefault(parse_fsdd_name(path)[1], []).append(path)
    if not by_speaker:
        raise ValueError("connected digits need at least one recording")
    speakers = sorted(by_speaker)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        speaker = speakers[int(rng.integers(len(speakers)))]
        pool = by_speaker[speaker]
        n = int(rng.integers(min_digits, max_digits + 1))
        parts = [pool[int(i)] for i in rng.integers(len(pool), size=n)]
        pauses = tuple(float(p) for p in rng.uniform(*pause_range, size=n - 1))
        text = " ".join(DIGIT_WORDS[parse_fsdd_name(p)[0]] for p in parts)
        out.append(Utterance(tuple(str(p) for p in parts), text, pauses, speaker=speaker))
    return out


def synthesized_digit_utterances(count: int, seed: int, max_digits: int, cache_dir: str | Path,
                                 noise_prob: float = 0.3) -> list[Utterance]:
    """``count`` espeak-ng digit strings of 1-``max_digits`` digits (``max_digits`` 1: isolated digits, labelled),
    each in a voice drawn from every English accent and voice variant at a random rate and pitch, ``noise_prob``
    of them with background noise: many voices the FSDD speakers do not have, for training only. The WAVs are
    cached under ``cache_dir`` (:func:`~bp_apps.speech.synth.synthesize_corpus`)."""
    from bp_apps.speech.synth import ENGLISH_ACCENTS, VOICE_VARIANTS, make_texts, synthesize_corpus

    if count <= 0:
        return []
    texts = make_texts(count, seed, digit_fraction=1.0, max_digits=max_digits)
    voices = [f"{accent}+{variant}" for variant in VOICE_VARIANTS for accent in ENGLISH_ACCENTS]
    items = synthesize_corpus(texts, voices, cache_dir, seed=seed, noise_prob=noise_prob)
    return [Utterance((u.audio,), u.text, label=DIGIT_WORDS.index(u.text) if max_digits == 1 else -1,
                      speaker=f"espeak:{u.voice}") for u in items]


class ConnectedDigitsDataModule(RecognitionDataModule):
    """Connected digit strings (1-7 digits) made from FSDD recordings: each split's utterances use only that
    split's recordings (test: indices 0-4), so test speech never reaches training. Deterministic by ``seed``.
    ``data_root`` is the FSDD folder (None: :func:`fsdd_root`, ``fsdd/`` under ``$BP_APPS_DATA`` or ``./data``).
    ``speaker_holdout``: the test strings are built only from that speaker's recordings, and training and
    validation never hear the speaker (:func:`fsdd_split`). ``synth_utterances``: that many espeak-ng digit
    strings join the training split (:func:`synthesized_digit_utterances`)."""

    default_features = FSDD_FEATURES

    def __init__(self, data_root: str | None = None, download: bool = False,
                 val_indices: Sequence[int] = (5, 6, 7, 8, 9), train_utterances: int = 3000,
                 val_utterances: int = 200, test_utterances: int = 500, min_digits: int = 1, max_digits: int = 7,
                 pause_range: tuple[float, float] = (0.05, 0.3), features: FeatureConfig = FSDD_FEATURES,
                 batch_size: int = 32, max_seconds: float | None = 10.0, num_workers: int = 0, cache: bool = True,
                 cache_dir: str | None = None, seed: int = 0, speaker_holdout: str | None = None,
                 synth_utterances: int = 0) -> None:
        super().__init__(features, batch_size=batch_size, max_seconds=max_seconds, num_workers=num_workers,
                         cache=cache, cache_dir=cache_dir, seed=seed)
        if synth_utterances < 0:
            raise ValueError(f"synth_utterances must be >= 0, got {synth_utterances}")
        self.data_root, self.download, self.val_indices = data_root, download, tuple(val_indices)
        self.speaker_holdout, self.synth_utterances = speaker_holdout, synth_utterances
        self.synth_dir = Path(cache_dir) if cache_dir else default_cache_dir() / "speech"
        self.counts = {"train": train_utterances, "val": val_utterances, "test": test_utterances}
        self.min_digits, self.max_digits, self.pause_range = min_digits, max_digits, tuple(pause_range)
        self._utterances: dict[str, list[Utterance]] = {}

    def source(self, split: str) -> str | None:
        return str(fsdd_root(self.data_root))

    def utterances(self, split: str) -> list[Utterance]:
        if split not in self._utterances:
            files = fsdd_split(_fsdd_files(self.data_root, self.download), self.val_indices,
                               speaker_holdout=self.speaker_holdout)[split]
            split_seed = self.seed * 1000 + ("train", "val", "test").index(split)
            utterances = connected_digit_utterances(files, self.counts[split], split_seed, self.min_digits,
                                                    self.max_digits, self.pause_range)
            if split == "train":
                utterances += synthesized_digit_utterances(self.synth_utterances, split_seed + 7, self.max_digits,
                                                           self.synth_dir)
            self._utterances[split] = utterances
        return self._utterances[split]

    def vocabulary_words(self) -> list[str]:
        return list(DIGIT_WORDS)


# ----------------------------------------------------------------------------------------------- synthesized

def split_voice_variants(variants: Sequence[str], val_count: int, test_count: int, seed: int = 0
                         ) -> dict[str, list[str]]:
    """A deterministic split of voice variants into train / val / test (held out: never heard in training)."""
    if val_count + test_count >= len(variants):
        raise ValueError(f"cannot hold out {val_count}+{test_count} of {len(variants)} voice variants")
    order = np.random.default_rng(seed).permutation(len(variants))
    picked = [variants[i] for i in order]
    return {"test": sorted(picked[:test_count]), "val": sorted(picked[test_count:test_count + val_count]),
            "train": sorted(picked[test_count + val_count:])}


class SynthSpeechDataModule(RecognitionDataModule):
    """espeak-ng speech (no download): digit strings and short sentences, many voices, rates and pitches.

    Voices are ACCENT+VARIANT; the variants of validation and test (``heldout_variants``, else a deterministic
    split by ``voice_seed``) are never used in training. ``noise_prob`` of the utterances get background noise.
    WAVs are cached under ``cache_dir`` (see ``synth.synthesize_corpus``)."""

    def __init__(self, train_utterances: int = 4000, val_utterances: int = 300, test_utterances: int = 500,
                 digit_fraction: float = 0.3, accents: Sequence[str] | None = None,
                 variants: Sequence[str] | None = None, heldout_variants: dict[str, list[str]] | None = None,
                 val_variant_count: int = 5, test_variant_count: int = 8, voice_seed: int = 0,
                 noise_prob: float = 0.3, features: FeatureConfig = DEFAULT_FEATURES, batch_size: int = 32,
                 max_seconds: float | None = 30.0, num_workers: int = 0, cache: bool = True,
                 cache_dir: str | None = None, seed: int = 0) -> None:
        super().__init__(features, batch_size=batch_size, max_seconds=max_seconds, num_workers=num_workers,
                         cache=cache, cache_dir=cache_dir, seed=seed)
        from bp_apps.speech.synth import ENGLISH_ACCENTS, VOICE_VARIANTS

        self.counts = {"train": train_utterances, "val": val_utterances, "test": test_utterances}
        self.digit_fraction, self.noise_prob = digit_fraction, noise_prob
        self.accents = list(accents or ENGLISH_ACCENTS)
        all_variants = list(variants or VOICE_VARIANTS)
        if heldout_variants is not None:
            held = {s: list(heldout_variants.get(s, [])) for s in ("val", "test")}
            self.variants = {**held, "train": [v for v in all_variants if v not in held["val"] + held["test"]]}
        else:
            self.variants = split_voice_variants(all_variants, val_variant_count, test_variant_count, voice_seed)
        for split, names in self.variants.items():
            if not names:
                raise ValueError(f"no voice variants left for the {split} split")
        self.synth_dir = Path(cache_dir) if cache_dir else default_cache_dir() / "speech"
        self._utterances: dict[str, list[Utterance]] = {}

    def voices(self, split: str) -> list[str]:
        return [f"{a}+{v}" for v in self.variants[split] for a in self.accents]

    def utterances(self, split: str) -> list[Utterance]:
        if split not in self._utterances:
            from bp_apps.speech.synth import make_texts, synthesize_corpus

            split_seed = self.seed * 1000 + ("train", "val", "test").index(split)
            texts = make_texts(self.counts[split], split_seed, self.digit_fraction)
            items = synthesize_corpus(texts, self.voices(split), self.synth_dir, seed=split_seed,
                                      noise_prob=self.noise_prob)
            self._utterances[split] = [Utterance((u.audio,), u.text, speaker=u.voice) for u in items]
        return self._utterances[split]


# ----------------------------------------------------------------------------------------------- manifests

def read_manifest(path: str | Path, strict_text: bool = False) -> list[Utterance]:
    """A JSONL manifest: one ``{"audio": path, "text": transcript}`` per line; relative audio paths are relative
    to the manifest's folder. Transcripts are normalised (see ``normalise_transcript``; ``strict_text`` refuses
    characters outside the vocabulary). Errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} does not exist")
    out = []
    for number, record in jsonl_objects(path):  # bad UTF-8 or JSON: an error naming the file and line
        where = f"{path}:{number}"
        if not isinstance(record.get("audio"), str) or not isinstance(record.get("text"), str):
            raise ValueError(f"{where}: each line needs string fields 'audio' and 'text'")
        text = normalise_transcript(record["text"], strict=strict_text, source=where)
        if not text:
            raise ValueError(f"{where}: the transcript is empty after normalisation ({record['text']!r})")
        audio = Path(record["audio"])
        out.append(Utterance((str(audio if audio.is_absolute() else path.parent / audio),), text))
    if not out:
        raise ValueError(f"manifest {path} holds no records")
    return out


class ManifestDataModule(RecognitionDataModule):
    """Any speech corpus described by JSONL manifests (``train_manifest``, ``val_manifest``, ``test_manifest``;
    without a validation manifest, ``val_fraction`` of train is held out by ``seed``)."""

    def __init__(self, train_manifest: str | None = None, val_manifest: str | None = None,
                 test_manifest: str | None = None, val_fraction: float = 0.1, strict_text: bool = False,
                 features: FeatureConfig = DEFAULT_FEATURES, batch_size: int = 32, max_seconds: float | None = 30.0,
                 num_workers: int = 0, cache: bool = True, cache_dir: str | None = None, seed: int = 0) -> None:
        super().__init__(features, batch_size=batch_size, max_seconds=max_seconds, num_workers=num_workers,
                         cache=cache, cache_dir=cache_dir, seed=seed)
        self.manifests = {"train": train_manifest, "val": val_manifest, "test": test_manifest}
        self.val_fraction, self.strict_text = val_fraction, strict_text

    def source(self, split: str) -> str | None:
        return self.manifests.get(split) or self.manifests["train"]

    def utterances(self, split: str) -> list[Utterance]:
        if self.manifests["train"] is None:
            raise ValueError("ManifestDataModule needs train_manifest (a JSONL of {\"audio\": ..., \"text\": ...})")
        if split == "test" or self.manifests["val"] is not None:
            if self.manifests[split] is None:
                raise ValueError(f"no {split}_manifest given")
            return read_manifest(self.manifests[split], self.strict_text)
        train = read_manifest(self.manifests["train"], self.strict_text)
        order = np.random.default_rng(self.seed).permutation(len(train))
        held = max(1, round(self.val_fraction * len(train)))
        chosen = sorted(order[:held]) if split == "val" else sorted(order[held:])
        return [train[i] for i in chosen]


# ----------------------------------------------------------------------------------------------- torchaudio sets

class LibriSpeechDataModule(RecognitionDataModule):
    """LibriSpeech through torchaudio's ``LIBRISPEECH`` (its file list and download; audio read with soundfile).
    ``limit`` keeps the first N utterances of each split."""

    default_features = LIBRISPEECH_FEATURES

    def __init__(self, root: str = "data/librispeech", train_url: str = "train-clean-100", val_url: str = "dev-clean",
                 test_url: str = "test-clean", download: bool = False, limit: int | None = None,
                 features: FeatureConfig = LIBRISPEECH_FEATURES, batch_size: int = 16,
                 max_seconds: float | None = 35.0, num_workers: int = 0, cache: bool = True,
                 cache_dir: str | None = None, seed: int = 0) -> None:
        super().__init__(features, batch_size=batch_size, max_seconds=max_seconds, num_workers=num_workers,
                         cache=cache, cache_dir=cache_dir, seed=seed)
        self.root, self.download, self.limit = root, download, limit
        self.urls = {"train": train_url, "val": val_url, "test": test_url}

    def utterances(self, split: str) -> list[Utterance]:
        from torchaudio.datasets import LIBRISPEECH

        dataset = LIBRISPEECH(self.root, url=self.urls[split], download=self.download)
        count = len(dataset) if self.limit is None else min(self.limit, len(dataset))
        out = []
        for n in range(count):
            relative, _, transcript, speaker, _, _ = dataset.get_metadata(n)
            out.append(Utterance((str(Path(dataset._archive) / relative),), normalise_transcript(transcript),
                                 speaker=str(speaker)))
        return out


class SpeechCommandsDataModule(RecognitionDataModule):
    """Speech Commands keywords through torchaudio's ``SPEECHCOMMANDS``, transcribed as words (CTC on the label)."""

    default_features = SPEECH_COMMANDS_FEATURES

    def __init__(self, root: str = "data/speechcommands", download: bool = False, limit: int | None = None,
                 features: FeatureConfig = SPEECH_COMMANDS_FEATURES, batch_size: int = 64, num_workers: int = 0,
                 cache: bool = True, cache_dir: str | None = None, seed: int = 0) -> None:
        super().__init__(features, batch_size=batch_size, max_seconds=2.0, num_workers=num_workers, cache=cache,
                         cache_dir=cache_dir, seed=seed)
        self.root, self.download, self.limit = root, download, limit

    def utterances(self, split: str) -> list[Utterance]:
        from torchaudio.datasets import SPEECHCOMMANDS

        Path(self.root).mkdir(parents=True, exist_ok=True)
        subset = {"train": "training", "val": "validation", "test": "testing"}[split]
        dataset = SPEECHCOMMANDS(self.root, download=self.download, subset=subset)
        count = len(dataset) if self.limit is None else min(self.limit, len(dataset))
        out = []
        for n in range(count):
            relative, _, label, speaker, _ = dataset.get_metadata(n)
            out.append(Utterance((str(Path(dataset._archive) / relative),), normalise_transcript(label),
                                 speaker=speaker))
        return out


# ----------------------------------------------------------------------------------------------- your own data

def user_speech_preprocessing(data: Any, model: Any) -> dict[str, Any]:
    """What ``transcribe`` needs, from a speech data module of the user's own (its attributes, else its
    hyperparameters): ``features`` (a :class:`~bp_apps.speech.features.FeatureConfig` or a mapping of its fields),
    which must give the model's ``input_dim`` per frame, because ``transcribe`` computes the same features from audio
    and no default could guess them; and, when given, ``lexicon_words`` (the training words, for the lexicon beam).
    A ValueError before training names what is missing or disagrees."""
    given = data_value(data, "features")
    if given is None:
        raise ValueError(f"{type(data).__name__}: a speech data module of your own must give `features` (a "
                         "FeatureConfig or a mapping of its fields, e.g. {kind: logmel, sample_rate: 16000, n_mels: "
                         "64}) as an attribute or hyperparameter: transcribe computes these features from audio")
    features = given if isinstance(given, FeatureConfig) else settings(FeatureConfig, given, "features",
                                                                       DEFAULT_FEATURES)
    expected = int(model.hparams["input_dim"])
    if features.dim != expected:
        raise ValueError(f"{type(data).__name__}: its features give {features.dim} values per frame but the model "
                         f"was built for input_dim={expected}; build it with input_dim={features.dim}")
    words = data_value(data, "lexicon_words")
    return {"features": features.to_dict(), **({"words": [str(w) for w in words]} if words else {})}


def check_speech_batch(batch: Any, model: Any, stage: str) -> None:
    """Refuse a batch whose frames the speech model cannot take, naming the setting: features that are not a float
    ``(B, T, input_dim)`` tensor (a :class:`SpeechBatch`'s ``features``, or ``(features, lengths)`` first in an
    isolated-digit batch)."""
    features = batch.features if isinstance(batch, SpeechBatch) else batch[0][0] if isinstance(
        batch, (tuple, list)) and isinstance(batch[0], (tuple, list)) else None
    expected = int(model.hparams["input_dim"])
    if not torch.is_tensor(features) or features.ndim != 3 or not features.is_floating_point():
        raise ValueError(f"{stage} batches must be SpeechBatch (recognizer) or ((features, lengths), labels) "
                         f"(digit classifier) with float features (B, T, {expected})")
    if features.shape[-1] != expected:
        raise ValueError(f"{stage} batch features have {features.shape[-1]} values per frame but the model was built "
                         f"for input_dim={expected}")


def user_speech_check() -> UserDataModuleCheck:
    """The callback that lets a speech data module of the user's own train a speech task and keep what
    ``transcribe`` needs in every checkpoint (``bp-apps`` adds it to the speech tasks' runs)."""
    return UserDataModuleCheck(user_speech_preprocessing, check_speech_batch)
