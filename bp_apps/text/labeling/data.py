"""Data for token labeling: vocabularies, batches and Lightning data modules.

Raw files -> :mod:`formats` readers (validated :class:`TaggedSentence` records) -> a vocabulary
built from the training split -> length-bucketed batches of word ids, character ids, the
predicate indicator and tag ids. The raw tokens travel with each batch so sub-word models can
tokenize them their own way.

The vocabulary (words, characters, labels, whether the records mark a predicate) is a JSON file the data module
builds in ``prepare_data`` (and, when asked with ``tokenizer_vocab_size``, a sub-word tokenizer trained on the
training words). Their paths (``vocab_file``, ``tokenizer_file``) are known right after ``__init__``: a digest of
the data's identity and the vocabulary settings under ``default_cache_dir()/labeling``. ``bp-apps`` links them to
the model's arguments of the same names; the model reads them, the data module never hands it objects.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import sysconfig
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader

from bp_apps.core.datalink import PreprocessingDataModule
from bp_apps.core.distributed import shard_by_process
from bp_apps.core.io import atomic_write_text, data_file, default_cache_dir, read_json_file, resolve_data_root
from bp_apps.core.resume import ResumableDataLoader
from bp_apps.core.samplers import BucketBatchSampler
from bp_apps.text.labeling.formats import check_known_tags, read_labeled_file, sentences_from_hf
from bp_apps.text.labeling.records import LabelingDataError, TaggedSentence, predicate_class

__all__ = ["PAD", "UNK", "HFLabelingDataModule", "LabelingDataModule", "LabelingVocab",
           "PunctuationDataModule", "collate_sentences", "label_inventory", "normalize_word", "read_vocab_file"]

PAD, UNK = "<pad>", "<unk>"
VOCAB_FORMAT = 1
"""The version of the vocabulary file's layout (part of its path's digest: a new layout is a new file)."""
MAX_WORD_CHARS = 20
_DIGITS = re.compile(r"\d")


def normalize_word(word: str) -> str:
    """The form a word is looked up by: lower case, every digit as 0 (numbers share statistics)."""
    return _DIGITS.sub("0", word.lower())


@dataclass
class LabelingVocab:
    """Word, character and label inventories (index 0 = padding, 1 = unknown for words and chars).

    Stored in checkpoints as plain lists (``to_dict``), so loading needs no pickle.
    """

    words: list[str]
    chars: list[str]
    labels: list[str]
    _word_index: dict[str, int] = field(init=False, repr=False)
    _char_index: dict[str, int] = field(init=False, repr=False)
    _label_index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.words[:2] != [PAD, UNK] or self.chars[:2] != [PAD, UNK]:
            raise ValueError("word and character vocabularies must start with <pad>, <unk>")
        if not self.labels or len(set(self.labels)) != len(self.labels):
            raise ValueError(f"labels must be a non-empty list without repeats, got {self.labels[:10]}")
        self._word_index = {w: i for i, w in enumerate(self.words)}
        self._char_index = {c: i for i, c in enumerate(self.chars)}
        self._label_index = {t: i for i, t in enumerate(self.labels)}

    @classmethod
    def build(cls, sentences: Sequence[TaggedSentence], min_word_freq: int = 2, max_words: int | None = None,
              labels: Sequence[str] | None = None) -> LabelingVocab:
        """Words seen at least ``min_word_freq`` times (most frequent first), all characters, and the
        tags: ``labels`` when given (a fixed inventory), else :func:`label_inventory` of the tags seen."""
        word_counts = Counter(normalize_word(t) for s in sentences for t in s.tokens)
        char_counts = Counter(c for s in sentences for t in s.tokens for c in t)
        tags = {t for s in sentences if s.tags is not None for t in s.tags}
        if not tags:
            raise LabelingDataError("the training data has no tags")
        words = [w for w, n in sorted(word_counts.items(), key=lambda kv: (-kv[1], kv[0])) if n >= min_word_freq]
        if labels is not None:
            unknown = sorted(tags - set(labels))
            if unknown:
                raise LabelingDataError(f"training tags {unknown[:10]} are not in the given label set")
            labels = list(labels)
        else:
            labels = label_inventory(tags)
        return cls([PAD, UNK, *words[:max_words]], [PAD, UNK, *sorted(char_counts)], labels)

    def to_dict(self) -> dict[str, list[str]]:
        return {"words": list(self.words), "chars": list(self.chars), "labels": list(self.labels)}

    @classmethod
    def from_dict(cls, data: dict[str, list[str]]) -> LabelingVocab:
        return cls(list(data["words"]), list(data["chars"]), list(data["labels"]))

    def word_ids(self, tokens: Sequence[str]) -> list[int]:
        return [self._word_index.get(normalize_word(t), 1) for t in tokens]

    def char_ids(self, token: str) -> list[int]:
        return [self._char_index.get(c, 1) for c in token[:MAX_WORD_CHARS]]

    def label_ids(self, tags: Sequence[str]) -> list[int]:
        return [self._label_index[t] for t in tags]

    @property
    def is_bio(self) -> bool:
        """Whether the labels are BIO span tags (scored by spans) rather than per-token classes."""
        return all(t == "O" or t[:2] in ("B-", "I-") for t in self.labels)


def label_inventory(tags: set[str]) -> list[str]:
    """The label set for the tags seen: "O" first, then sorted. A BIO set is completed so that each
    span type has both its B- and I- tag (a type seen only as single-token spans in training may
    still have longer spans elsewhere)."""
    if all(t == "O" or t[:2] in ("B-", "I-") for t in tags):
        tags = {"O"} | {f"{p}-{t[2:]}" for t in tags - {"O"} for p in "BI"}
    return (["O"] if "O" in tags else []) + sorted(tags - {"O"})


def read_vocab_file(path: str | Path) -> tuple[LabelingVocab, bool]:
    """The vocabulary and whether the data marks predicates, from a file :class:`LabelingDataModule` built
    (``vocab_file``); a missing or malformed file is an error naming it."""
    data = read_json_file(path, "vocabulary file", "the labeling data module builds it in prepare_data "
                          "(trainer.fit/validate/test do that before setup)")
    try:
        return LabelingVocab.from_dict(data), bool(data["has_predicates"])
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{path}: not a labeling vocabulary file ({type(error).__name__}: {error})") from None


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def collate_sentences(sentences: Sequence[TaggedSentence], vocab: LabelingVocab) -> dict[str, Any]:
    """A padded batch: ``words`` [B, T], ``chars`` [B, T, C], ``predicate`` [B, T] (1 on the predicate
    token; all 0 without one), ``predicate_class`` [B] (the predicate's coarse POS class, see
    :func:`~bp_apps.text.labeling.records.predicate_class`), ``mask`` [B, T], ``tags`` [B, T] (-100 on padding;
    absent when the sentences carry no tags), and the raw ``tokens`` and ``predicates`` lists."""
    batch_size, length = len(sentences), max(len(s.tokens) for s in sentences)
    max_chars = max(min(len(t), MAX_WORD_CHARS) for s in sentences for t in s.tokens)
    words = torch.zeros(batch_size, length, dtype=torch.long)
    chars = torch.zeros(batch_size, length, max_chars, dtype=torch.long)
    predicate = torch.zeros(batch_size, length, dtype=torch.long)
    mask = torch.zeros(batch_size, length, dtype=torch.bool)
    labeled = all(s.tags is not None for s in sentences)
    tags = torch.full((batch_size, length), -100, dtype=torch.long)
    for i, sentence in enumerate(sentences):
        n = len(sentence.tokens)
        words[i, :n] = torch.tensor(vocab.word_ids(sentence.tokens))
        for j, token in enumerate(sentence.tokens):
            ids = vocab.char_ids(token)
            chars[i, j, : len(ids)] = torch.tensor(ids)
        mask[i, :n] = True
        if sentence.predicate is not None:
            predicate[i, sentence.predicate] = 1
        if labeled:
            tags[i, :n] = torch.tensor(vocab.label_ids(sentence.tags))  # type: ignore[arg-type]
    classes = torch.tensor([predicate_class(s.predicate_pos) for s in sentences], dtype=torch.long)
    batch: dict[str, Any] = {"words": words, "chars": chars, "predicate": predicate, "predicate_class": classes,
                             "mask": mask,
                             "tokens": [s.tokens for s in sentences], "predicates": [s.predicate for s in sentences]}
    if labeled:
        batch["tags"] = tags
    return batch


class _Collate:
    """Picklable collate function bound to a vocabulary (for worker processes)."""

    def __init__(self, vocab: LabelingVocab) -> None:
        self.vocab = vocab

    def __call__(self, sentences: Sequence[TaggedSentence]) -> dict[str, Any]:
        return collate_sentences(sentences, self.vocab)


class LabelingDataModule(PreprocessingDataModule):
    """Labeled sentences from files (JSONL or CoNLL columns; relative paths are under ``data_root``, by default
    ``$BP_APPS_DATA``, else ``./data``).

    The vocabulary comes from the training file; ``prepare_data`` writes it to ``vocab_file`` (and, with
    ``tokenizer_vocab_size``, a WordPiece tokenizer trained on the training words to ``tokenizer_file``, for
    ``TransformerTagger``). The files are rebuilt when the training data changes. Validation and test tags must
    belong to the training label set (an error names the file and line otherwise). Training sentences longer
    than ``max_train_tokens`` are left out with a warning (evaluation keeps every sentence).
    Without ``val_file``, ``val_fraction`` of the training records (every k-th, deterministic)
    is held out. ``limit_*`` keep only the first N records (quick runs and tests). ``labels`` fixes
    the label inventory (otherwise: every tag of the training file). ``group_predicates`` batches
    the SRL predicate instances of one sentence together (what a shared sentence encoder needs).
    ``setup`` refuses an attached model built for another vocabulary.
    """

    def __init__(self, train_file: str | None = None, val_file: str | None = None, test_file: str | None = None,
                 data_root: str | None = None, format: Literal["auto", "jsonl", "conll"] = "auto",
                 tokens_field: str = "tokens", tags_field: str = "tags", predicate_field: str = "predicate",
                 token_column: int = 0, tag_column: int = -1, batch_size: int = 32, eval_batch_size: int = 128,
                 min_word_freq: int = 2, max_words: int | None = None, max_train_tokens: int | None = 150,
                 val_fraction: float = 0.1, limit_train: int | None = None, limit_val: int | None = None,
                 limit_test: int | None = None, labels: list[str] | None = None, seed: int = 0,
                 num_workers: int = 0, group_predicates: bool = True, tokenizer_vocab_size: int | None = None
                 ) -> None:
        super().__init__()
        if batch_size < 1 or eval_batch_size < 1:
            raise ValueError(f"batch sizes must be >= 1, got {batch_size} and {eval_batch_size}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if max_train_tokens is not None and max_train_tokens < 1:
            raise ValueError(f"max_train_tokens must be >= 1 or null, got {max_train_tokens}")
        if min_word_freq < 1:
            raise ValueError(f"min_word_freq must be >= 1, got {min_word_freq}")
        if tokenizer_vocab_size is not None and tokenizer_vocab_size < 16:
            raise ValueError(f"tokenizer_vocab_size must be >= 16 or null, got {tokenizer_vocab_size}")
        self.save_hyperparameters()
        self.train_file, self.val_file, self.test_file = train_file, val_file, test_file
        self.data_root = data_root
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.min_word_freq, self.max_words, self.max_train_tokens = min_word_freq, max_words, max_train_tokens
        self.val_fraction, self.seed, self.num_workers = val_fraction, seed, num_workers
        self.limits = {"train": limit_train, "val": limit_val, "test": limit_test}
        self.labels, self.group_predicates = labels, group_predicates
        self.tokenizer_vocab_size = tokenizer_vocab_size
        self.vocab: LabelingVocab | None = None
        self.splits: dict[str, list[TaggedSentence]] = {}
        self._has_predicates: bool | None = None

    # -- the files the model reads ------------------------------------------------------------

    def data_identity(self) -> dict[str, Any]:
        """What names this data without reading it (the files and how they are read); subclasses name theirs."""
        h = self.hparams
        root = resolve_data_root(self.data_root).absolute()
        return {"source": "files", "root": str(root), "train_file": self.train_file, "val_file": self.val_file,
                "format": h.format, "tokens_field": h.tokens_field, "tags_field": h.tags_field,
                "predicate_field": h.predicate_field, "token_column": h.token_column, "tag_column": h.tag_column}

    def vocab_settings(self) -> dict[str, Any]:
        """The settings that shape the vocabulary (with :meth:`data_identity`, the vocabulary file's name)."""
        return {"format_version": VOCAB_FORMAT, "class": type(self).__qualname__, "min_word_freq": self.min_word_freq,
                "max_words": self.max_words, "max_train_tokens": self.max_train_tokens,
                "val_fraction": self.val_fraction if self.val_file is None else None,
                "limit_train": self.limits["train"], "labels": self.labels}

    def input_fingerprint(self) -> dict[str, Any]:
        """The contents the vocabulary was built from (the training file's digest); a changed fingerprint makes
        ``prepare_data`` rebuild the files."""
        if self.train_file is None:
            raise ValueError("LabelingDataModule needs train_file (a .jsonl or CoNLL file)")
        return {"train": _file_digest(data_file(self.train_file, self.data_root))}

    @property
    def vocab_file(self) -> str:
        """Where ``prepare_data`` writes the vocabulary (JSON): known without reading any data."""
        key = _digest({"data": self.data_identity(), "vocab": self.vocab_settings()})
        return str(default_cache_dir() / "labeling" / f"vocab-{key}.json")

    @property
    def tokenizer_file(self) -> str | None:
        """Where ``prepare_data`` writes the sub-word tokenizer (``tokenizers`` JSON) trained on the training words,
        or None without ``tokenizer_vocab_size``."""
        if self.tokenizer_vocab_size is None:
            return None
        key = _digest({"data": self.data_identity(), "vocab": self.vocab_settings(),
                       "tokenizer": {"kind": "wordpiece", "vocab_size": self.tokenizer_vocab_size, "lowercase": True}})
        return str(default_cache_dir() / "labeling" / f"tokenizer-{key}.json")

    def prepare_data(self) -> None:
        """Build the vocabulary file (and the tokenizer file when asked) unless they are current: a file is
        rebuilt when missing, unreadable, or built from other training data."""
        vocab_path, inputs = Path(self.vocab_file), self.input_fingerprint()
        vocab_path.parent.mkdir(parents=True, exist_ok=True)
        train: list[TaggedSentence] | None = None
        try:
            current = json.loads(vocab_path.read_text(encoding="utf-8")).get("inputs")
        except (OSError, ValueError, AttributeError):
            current = None
        rebuilt = current != inputs
        if rebuilt:
            splits, labels = self._prepared_splits(warn=False)
            train = splits["train"]
            vocab = LabelingVocab.build(train, self.min_word_freq, self.max_words, labels)
            content = {**vocab.to_dict(), "has_predicates": any(s.predicate is not None for s in train),
                       "inputs": inputs, "data": self.data_identity(), "settings": self.vocab_settings()}
            atomic_write_text(vocab_path, json.dumps(content, ensure_ascii=False))
        if self.tokenizer_file is None:
            return
        tokenizer_path = Path(self.tokenizer_file)
        if (rebuilt or not tokenizer_path.is_file()
                or tokenizer_path.stat().st_mtime_ns < vocab_path.stat().st_mtime_ns):  # older than the vocabulary
            from bp_apps.text.tokenization import tokenizer_to_json, train_tokenizer

            if train is None:
                train = self._prepared_splits(warn=False)[0]["train"]
            tokenizer = train_tokenizer((" ".join(s.tokens) for s in train), self.tokenizer_vocab_size)
            atomic_write_text(tokenizer_path, tokenizer_to_json(tokenizer))

    # -- reading ----------------------------------------------------------------------------

    def _read(self, name: str) -> list[TaggedSentence]:
        h = self.hparams
        return read_labeled_file(data_file(name, self.data_root), h.format, tokens_field=h.tokens_field,
                                 tags_field=h.tags_field, predicate_field=h.predicate_field,
                                 token_column=h.token_column, tag_column=h.tag_column)

    def load_splits(self) -> dict[str, list[TaggedSentence]]:
        """The train / val / test records (test may be missing); subclasses read other sources."""
        if self.train_file is None:
            raise ValueError("LabelingDataModule needs train_file (a .jsonl or CoNLL file)")
        splits = {"train": self._read(self.train_file)}
        if self.val_file is not None:
            splits["val"] = self._read(self.val_file)
        if self.test_file is not None:
            splits["test"] = self._read(self.test_file)
        return splits

    def _prepared_splits(self, warn: bool = True) -> tuple[dict[str, list[TaggedSentence]], list[str]]:
        """The splits as used (held out, limited, long training sentences left out) and the label inventory."""
        splits = self.load_splits()
        # The label inventory is the whole training file's, even when only part of it is used.
        tags = {t for s in splits["train"] if s.tags is not None for t in s.tags}
        labels = self.labels or label_inventory(tags)
        if "val" not in splits:
            splits["train"], splits["val"] = _hold_out(splits["train"], self.val_fraction)
        for name, limit in self.limits.items():
            if limit is not None and name in splits:
                splits[name] = splits[name][:limit]
        left_out = ""
        if self.max_train_tokens is not None:
            kept = [s for s in splits["train"] if len(s.tokens) <= self.max_train_tokens]
            if len(kept) < len(splits["train"]):
                left_out = (f"left out {len(splits['train']) - len(kept)} training sentences longer than "
                            f"max_train_tokens={self.max_train_tokens}")
                if warn and kept:
                    warnings.warn(left_out, stacklevel=3)
            splits["train"] = kept
        if not splits["train"]:
            raise LabelingDataError(f"no training sentences left{f' ({left_out})' if left_out else ''}")
        if any(s.tags is None for s in splits["train"]):
            raise LabelingDataError("training sentences need tags")
        return splits, labels

    # -- set-up -----------------------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        """Read the vocabulary file (built here first when ``prepare_data`` has not run, as with a data module
        used by hand), refuse an attached model of another vocabulary, and read the splits."""
        if self.vocab is None:
            if not Path(self.vocab_file).is_file():
                self.prepare_data()
            self.vocab, self._has_predicates = read_vocab_file(self.vocab_file)
        self.check_model()
        if self.splits:
            return
        splits, _ = self._prepared_splits()
        for name in ("val", "test"):
            if name in splits:
                check_known_tags(splits[name], self.vocab.labels)
        self.splits = splits

    def check_model(self) -> None:
        """Refuse an attached model whose vocabulary (built, or the file it was given) is not this data's."""
        super().check_model()
        model = self.trainer.lightning_module if self.trainer is not None else None
        if model is None or self.vocab is None:
            return
        built = getattr(model, "vocab", None)
        given = getattr(model, "hparams", {}).get("vocab_file")
        if isinstance(built, LabelingVocab):
            differs = built.to_dict() != self.vocab.to_dict()
        elif given and Path(given) != Path(self.vocab_file):
            try:
                differs = read_vocab_file(given)[0].to_dict() != self.vocab.to_dict()
            except (OSError, ValueError):
                differs = True
        else:
            return
        if differs:
            raise ValueError("the model was built for another vocabulary or label set than this data gives: build "
                             f"it with vocab_file={self.vocab_file!r} (the data module's vocab_file; bp-apps links "
                             "it), or evaluate with the data the model was trained on")

    @property
    def has_predicates(self) -> bool:
        """Whether the training records mark a predicate (known once the vocabulary is read in ``setup``)."""
        return bool(self._has_predicates)

    def _loader(self, split: str, train: bool) -> DataLoader:
        if split not in self.splits:
            self.setup()
        sentences = self.splits[split]
        assert self.vocab is not None
        replicas, rank = shard_by_process(self.trainer)  # the bucket sampler shards batches across processes
        # SRL: the predicate instances of one sentence share batches (a shared encoder reads the sentence once)
        grouped = self.group_predicates and any(s.predicate is not None for s in sentences)
        groups = [s.tokens for s in sentences] if grouped else None
        sampler = BucketBatchSampler([len(s.tokens) for s in sentences],
                                     self.batch_size if train else self.eval_batch_size, shuffle=train,
                                     seed=self.seed, num_replicas=replicas, rank=rank, groups=groups, even=train)
        kwargs = dict(batch_sampler=sampler, collate_fn=_Collate(self.vocab), num_workers=self.num_workers,
                      persistent_workers=self.num_workers > 0)
        if not train:
            return DataLoader(sentences, **kwargs)
        if self.trainer is not None:
            sampler.set_epoch(self.trainer.current_epoch)
        return ResumableDataLoader(sentences, seed=self.seed, **kwargs)  # resumes exactly mid-epoch

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        if "test" not in self.splits:
            self.setup()
        return self._loader("test" if "test" in self.splits else "val", train=False)

    # -- checkpoint state -----------------------------------------------------------------------

    def preprocessing(self) -> dict[str, Any]:
        """The vocabulary (once read) as plain lists: saved in the checkpoint with the data module's state."""
        if self.vocab is None:
            return {}
        return {"vocab": self.vocab.to_dict(), "has_predicates": self.has_predicates}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Refuse a checkpoint (resumed, or tested with ``ckpt_path``) trained on another vocabulary."""
        saved = state_dict.get("vocab")
        if saved is not None and self.vocab is not None and saved != self.vocab.to_dict():
            raise ValueError("the checkpoint was trained on another vocabulary or label set than this data gives; "
                             "use the data settings it was trained with")


def _hold_out(sentences: list[TaggedSentence], fraction: float) -> tuple[list[TaggedSentence], list[TaggedSentence]]:
    """Every k-th sentence for validation (k = 1 / fraction), the rest for training."""
    if fraction <= 0:
        raise ValueError("no validation data: give val_file or a positive val_fraction")
    step = max(2, round(1 / fraction))
    return ([s for i, s in enumerate(sentences) if i % step],
            [s for i, s in enumerate(sentences) if i % step == 0])


class PunctuationDataModule(LabelingDataModule):
    """Punctuation and capitalisation restoration on the installed Python standard library's
    docstrings: real English prose that needs no download. Whole docstrings go to one split
    (every k-th docstring to validation, the next to test), so no paragraph leaks across."""

    def __init__(self, max_tokens: int = 48, max_docstrings: int | None = None, batch_size: int = 32,
                 eval_batch_size: int = 128, min_word_freq: int = 2, val_fraction: float = 0.1,
                 limit_train: int | None = None, limit_val: int | None = None, limit_test: int | None = None,
                 seed: int = 0, num_workers: int = 0, tokenizer_vocab_size: int | None = None) -> None:
        from bp_apps.text.labeling.punctuation import PUNCT_TAGS

        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, min_word_freq=min_word_freq,
                         max_train_tokens=None, val_fraction=val_fraction, limit_train=limit_train,
                         limit_val=limit_val, limit_test=limit_test, labels=list(PUNCT_TAGS), seed=seed,
                         num_workers=num_workers, tokenizer_vocab_size=tokenizer_vocab_size)
        if max_tokens < 2:
            raise ValueError(f"max_tokens must be >= 2, got {max_tokens}")
        self.max_tokens, self.max_docstrings = max_tokens, max_docstrings

    def data_identity(self) -> dict[str, Any]:
        """The installed standard library (its Python version and folder) and how it is cut into examples."""
        return {"source": "stdlib_docstrings", "python": sys.version, "stdlib": sysconfig.get_paths()["stdlib"],
                "max_tokens": self.max_tokens, "max_docstrings": self.max_docstrings}

    def input_fingerprint(self) -> dict[str, Any]:
        return {}  # the identity (Python version and library folder) names the docstrings

    def load_splits(self) -> dict[str, list[TaggedSentence]]:
        from bp_apps.text.corpus import stdlib_docstrings
        from bp_apps.text.labeling.punctuation import examples_from_text

        step = max(3, round(1 / self.val_fraction)) if self.val_fraction > 0 else 0
        splits: dict[str, list[TaggedSentence]] = {"train": [], "val": [], "test": []}
        for i, doc in enumerate(stdlib_docstrings(self.max_docstrings)):
            split = "val" if step and i % step == 0 else "test" if step and i % step == 1 else "train"
            splits[split] += examples_from_text(doc.text, self.max_tokens, where=doc.name)
        return splits


class _SplitStrings:
    """Rows of a data set with string cells of the named columns split at whitespace (a CSV file's ``tokens`` and
    ``tags`` cells), keeping the data set's ``features`` (the label names of integer tags)."""

    def __init__(self, dataset: Any, columns: Sequence[str]) -> None:
        self.dataset, self.columns = dataset, tuple(columns)
        self.features = getattr(dataset, "features", None)

    def __iter__(self) -> Any:
        for row in self.dataset:
            yield {**row, **{c: row[c].split() for c in self.columns if isinstance(row.get(c), str)}}


class HFLabelingDataModule(LabelingDataModule):
    """Token-labeling data through Hugging Face ``datasets`` (``pip install "bp_apps[hf]"``): a data set on the hub
    by ``name`` (for example ``conll2003``; online, or from the ``datasets`` cache), local files (``data_files``:
    JSON Lines, CSV/TSV or Parquet; one path or a list for the training data, or a mapping from split name to
    path(s)), or a folder written by ``save_to_disk`` (``saved_dataset``). With either of the last two, ``name`` is
    not used. Relative paths are under ``data_root`` (``$BP_APPS_DATA``, else ``./data``).

    ``tokens_column`` holds each sentence's tokens, ``tags_column`` its tags: lists of strings, or integer tags with
    ``ClassLabel`` names (the hub's NER sets); a string cell (CSV) is split at whitespace. A missing column is an
    error naming the file (or data set) and the column. ``train_split`` / ``val_split`` / ``test_split`` name the
    splits; a source with one split is training data only (``val_fraction`` of it is held out for validation,
    which testing then uses), and a null ``val_split`` or ``test_split`` does the same for a source with several
    splits (the rules: :mod:`bp_apps.text.hf_datasets`)."""

    def __init__(self, name: str = "conll2003", config_name: str | None = None,
                 data_files: str | list[str] | dict[str, str | list[str]] | None = None,
                 saved_dataset: str | None = None, data_root: str | None = None, tokens_column: str = "tokens",
                 tags_column: str = "ner_tags", train_split: str = "train", val_split: str | None = "validation",
                 test_split: str | None = "test", val_fraction: float = 0.1, batch_size: int = 32,
                 eval_batch_size: int = 128, min_word_freq: int = 2, max_train_tokens: int | None = 150,
                 limit_train: int | None = None, limit_val: int | None = None, limit_test: int | None = None,
                 seed: int = 0, num_workers: int = 0, tokenizer_vocab_size: int | None = None) -> None:
        from bp_apps.text.hf_datasets import HFSource

        super().__init__(data_root=data_root, batch_size=batch_size, eval_batch_size=eval_batch_size,
                         min_word_freq=min_word_freq, max_train_tokens=max_train_tokens, val_fraction=val_fraction,
                         limit_train=limit_train, limit_val=limit_val, limit_test=limit_test, seed=seed,
                         num_workers=num_workers, tokenizer_vocab_size=tokenizer_vocab_size)
        self.name, self.config_name = name, config_name
        self.source = HFSource(name=name, config_name=config_name, data_files=data_files,
                               saved_dataset=saved_dataset, data_root=data_root)
        self.columns = {"tokens_column": tokens_column, "tags_column": tags_column}
        self.split_names = {"train": train_split, "val": val_split, "test": test_split}

    def data_identity(self) -> dict[str, Any]:
        return {**self.source.identity(), **self.columns, "train_split": self.split_names["train"],
                "val_split": self.split_names["val"]}

    def input_fingerprint(self) -> dict[str, Any]:
        """The training files' digest, or the saved folder's metadata (a hub name names its contents)."""
        return self.source.fingerprint(self.split_names["train"])

    def load_splits(self) -> dict[str, list[TaggedSentence]]:
        from bp_apps.text.hf_datasets import require_columns

        splits = {}
        for key, (dataset, where) in self.source.load(self.split_names, type(self).__name__).items():
            require_columns(dataset, self.columns, where)
            rows = _SplitStrings(dataset, list(self.columns.values()))
            splits[key] = sentences_from_hf(rows, where=where, **self.columns)
        return splits
