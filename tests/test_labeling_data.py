"""Token-labeling data: vocabulary, batch collation, the length-bucketing sampler and the data modules.

All data files are small ones written to ``tmp_path``; the punctuation module reads 300 standard-library docstrings.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path

import pytest
import torch

from bp_apps.core.samplers import BucketBatchSampler
from bp_apps.text.labeling.data import (
    MAX_WORD_CHARS,
    PAD,
    UNK,
    LabelingDataModule,
    LabelingVocab,
    PunctuationDataModule,
    collate_sentences,
    normalize_word,
)
from bp_apps.text.labeling.punctuation import PUNCT_TAGS
from bp_apps.text.labeling.records import LabelingDataError, TaggedSentence, make_sentence


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The vocabulary files the data modules build go to a temporary cache, not the user's."""
    monkeypatch.setenv("BP_APPS_CACHE", str(tmp_path / "cache"))


def sent(tokens: list[str], tags: list[str] | None = None, predicate: int | None = None) -> TaggedSentence:
    return make_sentence(tokens, tags, predicate)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def rec(tokens: list[str], tags: list[str], predicate: int | None = None) -> dict:
    return {"tokens": tokens, "tags": tags} if predicate is None else {"tokens": tokens, "tags": tags,
                                                                       "predicate": predicate}


# ---------------------------------------------------------------- normalize_word


@pytest.mark.parametrize(("word", "expected"), [
    ("Hello", "hello"), ("ABC123", "abc000"), ("3.14", "0.00"), ("x٣", "x0"), ("<pad>", "<pad>"), ("", ""),
])
def test_normalize_word(word: str, expected: str) -> None:
    assert normalize_word(word) == expected


# ---------------------------------------------------------------- LabelingVocab

SENTENCES = [
    sent(["The", "cat", "sat"], ["O", "B-A", "I-A"]),
    sent(["the", "dog", "sat"], ["B-B", "O", "O"]),
    sent(["A", "cat", "2"], ["O", "O", "O"]),
]


def test_vocab_words_by_frequency_then_alphabet() -> None:
    # normalised counts: cat 2, sat 2, the 2; 0 1, a 1, dog 1
    assert LabelingVocab.build(SENTENCES, min_word_freq=1).words == [PAD, UNK, "cat", "sat", "the", "0", "a", "dog"]
    assert LabelingVocab.build(SENTENCES, min_word_freq=2).words == [PAD, UNK, "cat", "sat", "the"]
    assert LabelingVocab.build(SENTENCES, min_word_freq=3).words == [PAD, UNK]
    assert LabelingVocab.build(SENTENCES, min_word_freq=1, max_words=4).words == [PAD, UNK, "cat", "sat", "the", "0"]
    assert LabelingVocab.build(SENTENCES, min_word_freq=1, max_words=0).words == [PAD, UNK]


def test_vocab_chars_are_raw_characters_sorted() -> None:
    vocab = LabelingVocab.build(SENTENCES)
    assert vocab.chars == [PAD, UNK, "2", "A", "T", "a", "c", "d", "e", "g", "h", "o", "s", "t"]


def test_vocab_labels_o_first_then_sorted_and_bio_completed() -> None:
    assert LabelingVocab.build(SENTENCES).labels == ["O", "B-A", "B-B", "I-A", "I-B"]
    plain = [sent(["a", "b", "c"], ["PERIOD|C", "O", "COMMA|L"])]
    assert LabelingVocab.build(plain).labels == ["O", "COMMA|L", "PERIOD|C"]
    assert LabelingVocab.build([sent(["a", "b"], ["y", "x"])]).labels == ["x", "y"]


def test_vocab_fixed_label_inventory_keeps_its_order() -> None:
    fixed = ["Z", "I-A", "O", "B-B", "B-A", "I-B"]
    assert LabelingVocab.build(SENTENCES, labels=fixed).labels == fixed
    with pytest.raises(LabelingDataError, match=re.escape("training tags ['B-B', 'I-A'] are not in the given")):
        LabelingVocab.build(SENTENCES, labels=["O", "B-A"])


def test_vocab_without_tags_is_an_error() -> None:
    with pytest.raises(LabelingDataError, match="no tags"):
        LabelingVocab.build([sent(["a", "b"])])


def test_vocab_dict_round_trip() -> None:
    vocab = LabelingVocab.build(SENTENCES, min_word_freq=1)
    data = vocab.to_dict()
    assert data == {"words": vocab.words, "chars": vocab.chars, "labels": vocab.labels}
    restored = LabelingVocab.from_dict(json.loads(json.dumps(data)))
    assert restored == vocab
    assert restored.word_ids(["dog", "cat", "zebra"]) == vocab.word_ids(["dog", "cat", "zebra"]) == [7, 2, 1]
    data["words"].append("extra")  # to_dict hands out copies
    assert "extra" not in vocab.words


def test_word_ids_normalise_and_map_unknown_to_1() -> None:
    vocab = LabelingVocab.build(SENTENCES, min_word_freq=2)  # [pad, unk, cat, sat, the]
    assert vocab.word_ids(["The", "CAT", "dog", "Sat", "the"]) == [4, 2, 1, 3, 4]
    numbers = LabelingVocab.build([sent(["1999", "2024"], ["O", "O"])], min_word_freq=2)
    assert numbers.words == [PAD, UNK, "0000"]
    assert numbers.word_ids(["1850", "185", "abcd"]) == [2, 1, 1]


def test_char_ids_unknown_and_truncated() -> None:
    vocab = LabelingVocab.build(SENTENCES)  # chars: pad unk 2 A T a c d e g h o s t
    assert vocab.char_ids("Tax") == [4, 5, 1]
    assert vocab.char_ids("2") == [2]
    long_word = "cat" * 10
    assert MAX_WORD_CHARS == 20
    assert vocab.char_ids(long_word) == vocab.char_ids(long_word[:MAX_WORD_CHARS])
    assert len(vocab.char_ids(long_word)) == MAX_WORD_CHARS


def test_label_ids() -> None:
    vocab = LabelingVocab.build(SENTENCES)
    assert vocab.label_ids(["I-B", "O", "B-A"]) == [4, 0, 1]


@pytest.mark.parametrize(("labels", "expected"), [
    (["O", "B-X", "I-X"], True),
    (["O"], True),
    (["B-ARG0", "I-ARG0", "B-V"], True),
    (["O|L", "COMMA|C"], False),
    (["O", "B-X", "COMMA|C"], False),
    (list(PUNCT_TAGS), False),
])
def test_is_bio(labels: list[str], expected: bool) -> None:
    assert LabelingVocab([PAD, UNK], [PAD, UNK], labels).is_bio is expected


@pytest.mark.parametrize(("words", "chars", "labels", "message"), [
    (["a", UNK], [PAD, UNK], ["O"], "must start with <pad>, <unk>"),
    ([UNK, PAD], [PAD, UNK], ["O"], "must start with <pad>, <unk>"),
    ([PAD, UNK], [PAD], ["O"], "must start with <pad>, <unk>"),
    ([PAD, UNK], [PAD, UNK], [], "non-empty list without repeats"),
    ([PAD, UNK], [PAD, UNK], ["O", "B-X", "O"], "non-empty list without repeats"),
])
def test_vocab_constructor_validation(words, chars, labels, message) -> None:
    with pytest.raises(ValueError, match=message):
        LabelingVocab(words, chars, labels)


# ---------------------------------------------------------------- collate_sentences

SMALL_VOCAB = LabelingVocab([PAD, UNK, "a", "b"], [PAD, UNK, "a", "b", "c"], ["O", "B-X", "I-X"])


def test_collate_two_sentences_of_different_lengths() -> None:
    first = sent(["a", "bc", "zz"], ["B-X", "I-X", "O"], predicate=1)
    second = sent(["B"], ["O"])
    batch = collate_sentences([first, second], SMALL_VOCAB)
    assert set(batch) == {"words", "chars", "predicate", "predicate_class", "mask", "tags", "tokens", "predicates"}
    assert batch["words"].dtype == batch["chars"].dtype == batch["predicate"].dtype == torch.long
    assert batch["tags"].dtype == torch.long and batch["mask"].dtype == torch.bool
    assert batch["words"].tolist() == [[2, 1, 1], [3, 0, 0]]  # "B" is looked up as "b"
    assert batch["chars"].tolist() == [[[2, 0], [3, 4], [1, 1]],
                                       [[1, 0], [0, 0], [0, 0]]]  # characters are not lower-cased
    assert batch["mask"].tolist() == [[True, True, True], [True, False, False]]
    assert batch["predicate"].tolist() == [[0, 1, 0], [0, 0, 0]]
    assert batch["tags"].tolist() == [[1, 2, 0], [0, -100, -100]]
    assert batch["tokens"] == [("a", "bc", "zz"), ("B",)]
    assert batch["predicates"] == [1, None]
    assert batch["predicate_class"].tolist() == [0, 0]  # no predicate_pos given: unknown


def test_collate_truncates_long_words_to_max_word_chars() -> None:
    batch = collate_sentences([sent(["a" * 30, "b"], ["O", "O"])], SMALL_VOCAB)
    assert batch["chars"].shape == (1, 2, MAX_WORD_CHARS)
    assert batch["chars"][0, 0].tolist() == [2] * MAX_WORD_CHARS
    assert batch["chars"][0, 1].tolist() == [3] + [0] * (MAX_WORD_CHARS - 1)


@pytest.mark.parametrize("tags", [[None, None], [["O"], None]])
def test_collate_without_tags_has_no_tags_key(tags) -> None:
    sentences = [sent(["a"], tags[0]), sent(["b", "c"], tags[1], predicate=0)]
    batch = collate_sentences(sentences, SMALL_VOCAB)
    assert "tags" not in batch
    assert batch["words"].tolist() == [[2, 0], [3, 1]]
    assert batch["predicate"].tolist() == [[0, 0], [1, 0]]
    assert batch["tokens"] == [("a",), ("b", "c")] and batch["predicates"] == [None, 0]


# ---------------------------------------------------------------- BucketBatchSampler


def math_ceil(a: int, b: int) -> int:
    return -(-a // b)


def lengths_of(n: int, seed: int = 1) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, 60, (n,), generator=gen).tolist()


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize(("n", "batch_size"), [(1, 4), (7, 3), (64, 8), (450, 4), (1001, 7)])
def test_sampler_yields_every_index_once_and_len_matches(n: int, batch_size: int, shuffle: bool) -> None:
    sampler = BucketBatchSampler(lengths_of(n), batch_size, shuffle=shuffle, seed=3)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(n))
    assert len(sampler) == len(batches)
    assert all(1 <= len(b) <= batch_size for b in batches)
    assert sum(len(b) < batch_size for b in batches) <= (math_ceil(n, batch_size * 50) if shuffle else 1)


def test_sampler_is_deterministic_per_seed_and_epoch() -> None:
    lengths = lengths_of(300)
    a, b = BucketBatchSampler(lengths, 4, seed=5), BucketBatchSampler(lengths, 4, seed=5)
    assert list(a) == list(b)
    epoch0 = list(a)
    a.set_epoch(1)
    b.set_epoch(1)
    assert list(a) == list(b) != epoch0
    assert list(BucketBatchSampler(lengths, 4, seed=6)) != epoch0


def test_shuffled_batches_are_length_sorted_within_a_pool() -> None:
    lengths = list(range(40))
    lengths = [lengths[(7 * i) % 40] for i in range(40)]  # a permutation of 0..39, one pool (4 * 50 >= 40)
    batches = list(BucketBatchSampler(lengths, 4, seed=2))
    assert len(batches) == 10
    for batch in batches:
        ls = [lengths[i] for i in batch]
        assert ls == sorted(ls)
        assert max(ls) - min(ls) == 3  # four consecutive lengths
    assert [lengths[b[0]] for b in batches] != sorted(lengths[b[0]] for b in batches)  # batch order shuffled


def test_shuffled_batches_are_sorted_inside_each_batch_across_pools() -> None:
    lengths = lengths_of(1000)
    for batch in BucketBatchSampler(lengths, 3, seed=0):
        ls = [lengths[i] for i in batch]
        assert ls == sorted(ls)


def test_unshuffled_order_is_sorted_by_length() -> None:
    lengths = [5, 1, 3, 1, 9, 2, 3]
    batches = list(BucketBatchSampler(lengths, 3, shuffle=False))
    assert batches == [[1, 3, 5], [2, 6, 0], [4]]  # stable: ties keep their index order


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("n", [40, 52, 3])
def test_sampler_two_replicas_same_count_and_full_cover(n: int, shuffle: bool) -> None:
    lengths = lengths_of(n)
    ranks = [BucketBatchSampler(lengths, 4, shuffle=shuffle, seed=9, num_replicas=2, rank=r) for r in (0, 1)]
    for r in ranks:
        r.set_epoch(2)
    got = [list(r) for r in ranks]
    total = math_ceil(n, 4)  # batches in all
    assert len(got[0]) == len(got[1]) == len(ranks[0]) == len(ranks[1]) == math_ceil(total, 2)
    counts = Counter(i for b in got[0] + got[1] for i in b)
    assert set(counts) == set(range(n))
    repeated = sorted(i for i, c in counts.items() if c > 1)
    if total % 2 == 0:
        assert repeated == []
    else:  # one batch is repeated to even out the ranks
        assert set(counts.values()) <= {1, 2} and repeated in [sorted(b) for b in got[0]]


def test_sampler_pads_every_replica_even_with_fewer_batches_than_half_the_replicas() -> None:
    ranks = [BucketBatchSampler([3, 1, 2], 8, shuffle=False, num_replicas=3, rank=r) for r in range(3)]
    assert [len(list(r)) for r in ranks] == [len(r) for r in ranks] == [1, 1, 1]


def test_sampler_rejects_batch_size_below_1() -> None:
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        BucketBatchSampler([1, 2], 0)


def test_grouped_items_share_batches_and_every_item_comes_once() -> None:
    # 300 sentences of 1-5 predicate instances each (consecutive, as in an SRL file), lengths per sentence
    gen = random.Random(4)
    groups, lengths = [], []
    for sentence in range(300):
        length = gen.randint(3, 40)
        for _ in range(gen.randint(1, 5)):
            groups.append(sentence)
            lengths.append(length)
    sampler = BucketBatchSampler(lengths, 16, seed=1, groups=groups)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(len(groups))) and len(sampler) == len(batches)
    split = {g for g in set(groups) if len({k for k, b in enumerate(batches) for i in b if groups[i] == g}) > 1}
    assert len(split) <= len(batches)  # a group is cut only where a batch ends
    ungrouped = list(BucketBatchSampler(lengths, 16, seed=1))
    split_ungrouped = {g for g in set(groups)
                       if len({k for k, b in enumerate(ungrouped) for i in b if groups[i] == g}) > 1}
    assert len(split_ungrouped) > 2 * len(split)
    sampler.set_epoch(1)
    assert list(sampler) != batches  # the groups are shuffled anew each epoch
    with pytest.raises(ValueError, match="2 groups for 3 items"):
        BucketBatchSampler([1, 2, 3], 2, groups=[0, 0])


def test_grouped_sampler_without_groups_is_unchanged_by_the_tie_order() -> None:
    lengths = [3] * 12 + [5] * 12  # many ties: they keep the shuffled order, as before groups existed
    batches = list(BucketBatchSampler(lengths, 4, seed=0))
    assert [i for b in batches for i in b if lengths[i] == 3] != sorted(i for i in range(12))


# ---------------------------------------------------------------- LabelingDataModule

TRAIN = [
    rec(["the", "cat", "sat"], ["B-X", "I-X", "O"]),
    rec(["the", "dog", "ran"], ["B-X", "I-X", "O"]),
    rec(["a", "cat", "ran"], ["O", "B-Y", "O"]),
]


def module(tmp_path: Path, train: list[dict] = TRAIN, val: list[dict] | None = None, **kwargs) -> LabelingDataModule:
    """A data module on ``train.jsonl`` (and ``val.jsonl`` when ``val`` is given) written to ``tmp_path``."""
    train_path = write_jsonl(tmp_path / "train.jsonl", train)
    val_path = None if val is None else write_jsonl(tmp_path / "val.jsonl", val)
    return LabelingDataModule(str(train_path), None if val_path is None else str(val_path), **kwargs)


def test_setup_builds_vocab_from_training_file_only(tmp_path: Path) -> None:
    dm = module(tmp_path, val=[rec(["zebra", "zebra", "cat"], ["B-X", "I-X", "O"])])
    dm.setup("fit")
    assert dm.vocab is not None
    assert dm.vocab.words == [PAD, UNK, "cat", "ran", "the"]
    assert dm.vocab.labels == ["O", "B-X", "B-Y", "I-X", "I-Y"]
    assert dm.vocab.chars == [PAD, UNK, *sorted(set("thecatsatdogrananda"))]
    assert [s.tokens for s in dm.splits["train"]] == [tuple(r["tokens"]) for r in TRAIN]
    assert [s.tokens for s in dm.splits["val"]] == [("zebra", "zebra", "cat")]
    assert "test" not in dm.splits
    assert dm.splits["val"][0].where == f"{tmp_path / 'val.jsonl'}:1"
    vocab = dm.vocab
    dm.setup("validate")  # a second call keeps what it has
    assert dm.vocab is vocab


@pytest.mark.parametrize(("suffix", "format"), [(".conll", "auto"), (".dat", "conll")])
def test_conll_files(tmp_path: Path, suffix: str, format: str) -> None:
    train = tmp_path / f"train{suffix}"
    train.write_text("# a comment\nThe x B-X\ncat x I-X\n\nDogs x O\nran x B-V\n.\tx\tO\n", encoding="utf-8")
    val = tmp_path / f"val{suffix}"
    val.write_text("cat x B-X\n", encoding="utf-8")
    dm = LabelingDataModule(str(train), str(val), format=format, min_word_freq=1)
    dm.setup()
    assert [(s.tokens, s.tags) for s in dm.splits["train"]] == [
        (("The", "cat"), ("B-X", "I-X")), (("Dogs", "ran", "."), ("O", "B-V", "O"))]
    assert dm.vocab is not None and dm.vocab.labels == ["O", "B-V", "B-X", "I-V", "I-X"]
    assert dm.vocab.words == [PAD, UNK, ".", "cat", "dogs", "ran", "the"]
    assert [s.tokens for s in dm.splits["val"]] == [("cat",)]


def test_limit_train_keeps_the_whole_files_label_inventory(tmp_path: Path) -> None:
    train = [*TRAIN, rec(["rare", "one"], ["B-Z", "I-Z"])]
    dm = module(tmp_path, train, val=[rec(["rare", "cat"], ["B-Z", "O"])], limit_train=2, min_word_freq=1)
    dm.setup()
    assert [s.tokens for s in dm.splits["train"]] == [("the", "cat", "sat"), ("the", "dog", "ran")]
    assert dm.vocab is not None
    assert dm.vocab.labels == ["O", "B-X", "B-Y", "B-Z", "I-X", "I-Y", "I-Z"]
    assert dm.vocab.words == [PAD, UNK, "the", "cat", "dog", "ran", "sat"]  # words: from the kept sentences


def test_limit_val_and_test(tmp_path: Path) -> None:
    test_path = write_jsonl(tmp_path / "test.jsonl", [rec(["a"], ["O"]), rec(["b"], ["O"]), rec(["c"], ["O"])])
    dm = module(tmp_path, val=[rec(["a"], ["O"]), rec(["b"], ["O"])], test_file=str(test_path), limit_val=1,
                limit_test=2)
    dm.setup()
    assert [s.tokens for s in dm.splits["val"]] == [("a",)]
    assert [s.tokens for s in dm.splits["test"]] == [("a",), ("b",)]


def test_unknown_validation_tag_names_file_and_line(tmp_path: Path) -> None:
    dm = module(tmp_path, val=[rec(["the", "cat"], ["B-X", "I-X"]), rec(["a", "cat"], ["O", "B-Q"])])
    with pytest.raises(LabelingDataError, match=re.escape(f"{tmp_path / 'val.jsonl'}:2: tag 'B-Q' (token 1)")):
        dm.setup()


def test_fixed_labels_are_used_and_checked(tmp_path: Path) -> None:
    fixed = ["O", "I-Y", "I-X", "B-Y", "B-X", "B-W"]
    dm = module(tmp_path, val=[rec(["a"], ["B-W"])], labels=fixed)
    dm.setup()
    assert dm.vocab is not None and dm.vocab.labels == fixed
    with pytest.raises(LabelingDataError, match=re.escape("training tags ['I-X'] are not in the given label set")):
        module(tmp_path, val=[rec(["a"], ["O"])], labels=["O", "B-X", "B-Y", "I-Y"]).setup()


def test_max_train_tokens_drops_long_training_sentences_with_a_warning(tmp_path: Path) -> None:
    train = [rec(["a", "b"], ["O", "O"]), rec(list("abcde"), ["O"] * 5), rec(list("abc"), ["B-X", "O", "O"])]
    dm = module(tmp_path, train, val=[rec(list("abcdefgh"), ["O"] * 8)], max_train_tokens=3)
    with pytest.warns(UserWarning, match=re.escape("left out 1 training sentences longer than max_train_tokens=3")):
        dm.setup()
    assert [len(s.tokens) for s in dm.splits["train"]] == [2, 3]
    assert [len(s.tokens) for s in dm.splits["val"]] == [8]  # evaluation keeps every sentence


def test_all_training_sentences_too_long_is_an_error(tmp_path: Path) -> None:
    dm = module(tmp_path, val=[rec(["a"], ["O"])], max_train_tokens=2)
    with pytest.raises(LabelingDataError, match=re.escape("no training sentences left (left out 3 training sentences "
                                                          "longer than max_train_tokens=2)")):
        dm.setup()


@pytest.mark.parametrize(("fraction", "val_ids"), [(0.25, [0, 4, 8]), (0.1, [0]), (0.5, [0, 2, 4, 6, 8]),
                                                   (0.9, [0, 2, 4, 6, 8])])
def test_val_fraction_holds_out_every_kth_training_sentence(tmp_path: Path, fraction: float, val_ids) -> None:
    train = [rec([f"w{i}", "x"], ["O", "B-X"]) for i in range(10)]
    dm = module(tmp_path, train, val_fraction=fraction)
    dm.setup()
    assert [s.tokens[0] for s in dm.splits["val"]] == [f"w{i}" for i in val_ids]
    assert [s.tokens[0] for s in dm.splits["train"]] == [f"w{i}" for i in range(10) if i not in val_ids]


def test_val_fraction_hold_out_keeps_the_whole_training_files_labels(tmp_path: Path) -> None:
    train = [rec(["rare", "one"], ["B-Z", "O"]), *TRAIN]  # index 0 goes to validation
    dm = module(tmp_path, train, val_fraction=0.5)
    dm.setup()
    assert dm.vocab is not None and "B-Z" in dm.vocab.labels


def test_no_validation_data_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no validation data: give val_file or a positive val_fraction"):
        module(tmp_path, val_fraction=0.0).setup()


def test_data_root_joins_relative_paths(tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_jsonl(root / "sub" / "train.jsonl", TRAIN)
    write_jsonl(root / "sub" / "val.jsonl", [rec(["cat"], ["B-Y"])])
    dm = LabelingDataModule("sub/train.jsonl", "sub/val.jsonl", data_root=str(root))
    dm.setup()
    assert len(dm.splits["train"]) == 3 and dm.splits["val"][0].where == f"{root / 'sub' / 'val.jsonl'}:1"


def test_missing_data_root_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=re.escape(f"data_root {str(missing)!r} is not a directory")):
        LabelingDataModule("train.jsonl", data_root=str(missing)).setup()
    train = write_jsonl(tmp_path / "train.jsonl", TRAIN)  # absolute paths do not use data_root
    val = write_jsonl(tmp_path / "val.jsonl", [rec(["cat"], ["O"])])
    dm = LabelingDataModule(str(train), str(val), data_root=str(missing))
    dm.setup()
    assert len(dm.splits["train"]) == 3 and len(dm.splits["val"]) == 1


def test_missing_train_file_argument(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs train_file"):
        LabelingDataModule().setup()


def _check_batches(batches: list[dict], sentences: list[TaggedSentence], vocab: LabelingVocab) -> None:
    by_tokens = {s.tokens: s for s in sentences}
    assert len(by_tokens) == len(sentences)  # tokens identify the sentences in these tests
    seen = []
    for batch in batches:
        for i, tokens in enumerate(batch["tokens"]):
            s = by_tokens[tokens]
            n = len(tokens)
            seen.append(tokens)
            assert batch["tags"][i, :n].tolist() == vocab.label_ids(s.tags)
            assert (batch["tags"][i, n:] == -100).all() and batch["mask"][i].sum() == n
            assert batch["words"][i, :n].tolist() == vocab.word_ids(tokens)
            assert batch["predicates"][i] == s.predicate
    assert Counter(seen) == Counter(list(by_tokens))


def test_dataloaders_yield_batches_that_match_the_records(tmp_path: Path) -> None:
    train = [rec([f"w{i}"] * (1 + i % 5) + ["v"], ["O"] * (1 + i % 5) + [["B-V", "B-X"][i % 2]], i % 5)
             for i in range(23)]
    val = [rec(["v"] * k, ["O"] * (k - 1) + ["B-X"], 0) for k in (4, 1, 3, 2)]
    dm = module(tmp_path, train, val, batch_size=4, eval_batch_size=3, min_word_freq=1)
    loader = dm.train_dataloader()  # sets up on demand
    assert dm.vocab is not None and dm.has_predicates
    batches = list(loader)
    assert len(batches) == len(loader) == 6
    _check_batches(batches, dm.splits["train"], dm.vocab)
    val_batches = list(dm.val_dataloader())
    assert [b["tokens"] for b in val_batches] == [[("v",), ("v",) * 2, ("v",) * 3], [("v",) * 4]]
    _check_batches(val_batches, dm.splits["val"], dm.vocab)
    test_batches = list(dm.test_dataloader())  # no test file: the validation data
    assert [b["tokens"] for b in test_batches] == [b["tokens"] for b in val_batches]


def test_test_dataloader_reads_the_test_file(tmp_path: Path) -> None:
    test_path = write_jsonl(tmp_path / "test.jsonl", [rec(["cat", "sat"], ["B-X", "I-X"])])
    dm = module(tmp_path, val=[rec(["cat"], ["O"])], test_file=str(test_path))
    (batch,) = list(dm.test_dataloader())
    assert batch["tokens"] == [("cat", "sat")] and batch["tags"].tolist() == [[1, 3]]


def test_has_predicates(tmp_path: Path) -> None:
    plain = module(tmp_path / "plain", val=[rec(["a"], ["O"])])
    assert not plain.has_predicates  # before setup
    plain.setup()
    assert not plain.has_predicates
    srl = module(tmp_path / "srl", train=[rec(["a", "b"], ["O", "B-V"], 1), rec(["c"], ["O"])],
                 val=[rec(["a"], ["O"])])
    srl.setup()
    assert srl.has_predicates


def test_state_dict_carries_the_vocab_and_refuses_another(tmp_path: Path) -> None:
    dm = module(tmp_path, val=[rec(["cat"], ["O"])], min_word_freq=1)
    assert dm.state_dict() == {"datamodule": "LabelingDataModule"}  # nothing read yet
    dm.setup()
    assert dm.vocab is not None
    state = dm.state_dict()
    assert state == {"vocab": dm.vocab.to_dict(), "has_predicates": False, "datamodule": "LabelingDataModule"}
    json.dumps(state)  # plain lists: no pickle needed

    same = module(tmp_path, val=[rec(["cat"], ["O"])], min_word_freq=1)
    same.setup()
    same.load_state_dict(state)  # the same vocabulary: accepted
    other = module(tmp_path, val=[rec(["cat"], ["O"])], min_word_freq=2)
    other.setup()
    with pytest.raises(ValueError, match="another vocabulary or label set"):
        other.load_state_dict(state)


def test_the_vocabulary_file_is_named_by_the_settings_and_rebuilt_when_the_data_changes(tmp_path: Path) -> None:
    dm = module(tmp_path, val=[rec(["cat"], ["O"])], min_word_freq=1)
    path = Path(dm.vocab_file)
    assert path.parent == tmp_path / "cache" / "labeling" and not path.exists()  # named before anything is read
    assert module(tmp_path, val=[rec(["cat"], ["O"])], min_word_freq=1).vocab_file == str(path)
    assert module(tmp_path, val=[rec(["cat"], ["O"])], min_word_freq=2).vocab_file != str(path)
    assert LabelingDataModule(str(tmp_path / "train.jsonl"), str(tmp_path / "val.jsonl"), batch_size=7,
                              min_word_freq=1).vocab_file == str(path)  # batching does not shape the vocabulary
    dm.prepare_data()
    first = json.loads(path.read_text())
    assert first["words"] == [PAD, UNK, "cat", "ran", "the", "a", "dog", "sat"] and first["has_predicates"] is False
    stamp = path.stat().st_mtime_ns
    dm.prepare_data()  # current: left alone
    assert path.stat().st_mtime_ns == stamp
    write_jsonl(tmp_path / "train.jsonl", [*TRAIN, rec(["zebra"], ["B-Z"], 0)])  # new training data: rebuilt
    dm.prepare_data()
    second = json.loads(path.read_text())
    assert "zebra" in second["words"] and "B-Z" in second["labels"] and second["has_predicates"] is True
    path.write_text("{not json")  # a damaged file: rebuilt too
    dm.prepare_data()
    assert json.loads(path.read_text())["words"] == second["words"]
    assert not list(path.parent.glob("*.tmp"))  # written atomically


def test_the_tokenizer_file_is_built_only_when_asked(tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    assert module(tmp_path, val=[rec(["cat"], ["O"])]).tokenizer_file is None
    dm = module(tmp_path, val=[rec(["cat"], ["O"])], tokenizer_vocab_size=40)
    path = Path(dm.tokenizer_file)
    assert path.parent == tmp_path / "cache" / "labeling" and not path.exists()
    dm.prepare_data()
    tokenizer = Tokenizer.from_file(str(path))  # a plain `tokenizers` file
    assert tokenizer.encode("the cat").tokens == ["[CLS]", "the", "cat", "[SEP]"]
    with pytest.raises(ValueError, match="tokenizer_vocab_size must be >= 16"):
        module(tmp_path, val=[rec(["cat"], ["O"])], tokenizer_vocab_size=4)


def test_a_missing_vocabulary_file_is_named(tmp_path: Path) -> None:
    from bp_apps.text.labeling.data import read_vocab_file

    with pytest.raises(FileNotFoundError, match="builds it in prepare_data"):
        read_vocab_file(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text('{"words": []}')
    with pytest.raises(ValueError, match=r"bad\.json: not a labeling vocabulary file"):
        read_vocab_file(tmp_path / "bad.json")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"batch_size": 0}, "batch sizes must be >= 1, got 0 and 128"),
    ({"eval_batch_size": 0}, "batch sizes must be >= 1, got 32 and 0"),
    ({"val_fraction": 1.0}, re.escape("val_fraction must be in [0, 1), got 1.0")),
    ({"val_fraction": -0.1}, re.escape("val_fraction must be in [0, 1), got -0.1")),
    ({"max_train_tokens": 0}, "max_train_tokens must be >= 1 or null, got 0"),
])
def test_constructor_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LabelingDataModule("train.jsonl", **kwargs)


def test_constructor_accepts_no_length_limit(tmp_path: Path) -> None:
    train = [*TRAIN, rec(["x"] * 200, ["O"] * 200)]
    dm = module(tmp_path, train, val=[rec(["a"], ["O"])], max_train_tokens=None)
    dm.setup()
    assert len(dm.splits["train"]) == 4


# ---------------------------------------------------------------- PunctuationDataModule


def test_punctuation_data_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BP_APPS_CACHE", str(tmp_path))  # no shared docstring cache
    first, second = PunctuationDataModule(max_docstrings=300), PunctuationDataModule(max_docstrings=300)
    first.setup()
    second.setup()
    assert first.splits == second.splits and first.vocab == second.vocab
    assert {name: bool(split) for name, split in first.splits.items()} == {"train": True, "val": True, "test": True}
    names = {name: {s.where.split("#")[0] for s in split} for name, split in first.splits.items()}
    assert not names["train"] & names["val"]
    assert not names["train"] & names["test"]
    assert not names["val"] & names["test"]
    assert first.vocab is not None and first.vocab.labels == list(PUNCT_TAGS)
    assert not first.vocab.is_bio
    assert all(len(s.tokens) <= 48 and set(s.tags) <= set(PUNCT_TAGS) for split in first.splits.values()
               for s in split)


# ---------------------------------------------------------------- HF data module: local files and saved data sets

NER_ROWS = [{"tokens": ["Ann", "met", "Bob", "in", "Oslo", "."], "tags": ["B-PER", "O", "B-PER", "O", "B-LOC", "O"]},
            {"tokens": ["Oslo", "is", "cold", "."], "tags": ["B-LOC", "O", "O", "O"]},
            {"tokens": ["Bob", "left", "."], "tags": ["B-PER", "O", "O"]}] * 4


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``datasets``' own cache in ``tmp_path`` (the vocabulary files already go there: see ``_cache``)."""
    datasets = pytest.importorskip("datasets", reason="needs the hf extra (pip install \"bp_apps[hf]\")")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    return tmp_path


def _write_ner(path: Path, rows: list[dict]) -> Path:
    """JSON Lines as they are; CSV and Parquet with tokens and tags as space-separated strings and lists."""
    import pandas as pd

    if path.suffix == ".jsonl":
        return write_jsonl(path, rows)
    if path.suffix == ".csv":
        pd.DataFrame([{k: " ".join(v) for k, v in r.items()} for r in rows]).to_csv(path, index=False)
    else:
        pd.DataFrame(rows).to_parquet(path)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_hf_labeling_reads_data_files(hf_cache: Path, suffix: str) -> None:
    from bp_apps.text.labeling.data import HFLabelingDataModule

    train = _write_ner(hf_cache / f"train{suffix}", NER_ROWS)
    val = _write_ner(hf_cache / f"dev{suffix}", NER_ROWS[:3])
    dm = HFLabelingDataModule(data_files={"train": str(train), "dev": str(val)}, tags_column="tags",
                              val_split="dev", test_split=None, min_word_freq=1, batch_size=4)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.vocab.labels == ["O", "B-LOC", "B-PER", "I-LOC", "I-PER"]
    assert [list(s.tokens) for s in dm.splits["val"]] == [r["tokens"] for r in NER_ROWS[:3]]
    assert dm.splits["val"][2].tags == ("B-PER", "O", "O") and len(dm.splits["train"]) == len(NER_ROWS)
    batch = next(iter(dm.val_dataloader()))
    assert batch["tags"].shape[0] == 3 and batch["words"].shape[1] == 6
    assert dm.test_dataloader() is not None  # no test split: testing uses validation


def test_hf_labeling_one_file_and_saved_dataset(hf_cache: Path) -> None:
    import datasets

    from bp_apps.text.labeling.data import HFLabelingDataModule

    one = HFLabelingDataModule(data_files=str(_write_ner(hf_cache / "all.jsonl", NER_ROWS)), tags_column="tags",
                               val_fraction=0.25, min_word_freq=1)
    one.setup("fit")
    assert (len(one.splits["train"]), len(one.splits["val"])) == (9, 3)
    saved = hf_cache / "saved"
    features = datasets.Features({"tokens": datasets.Sequence(datasets.Value("string")),
                                  "ner_tags": datasets.Sequence(datasets.ClassLabel(names=["O", "B-PER", "B-LOC"]))})
    ids = {"O": 0, "B-PER": 1, "B-LOC": 2}
    rows = [{"tokens": r["tokens"], "ner_tags": [ids[t] for t in r["tags"]]} for r in NER_ROWS]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows, features=features),
                          "validation": datasets.Dataset.from_list(rows[:3], features=features)}
                         ).save_to_disk(str(saved))
    dm = HFLabelingDataModule(saved_dataset=str(saved), test_split=None, min_word_freq=1)
    dm.setup("fit")
    assert dm.splits["val"][0].tags == ("B-PER", "O", "B-PER", "O", "B-LOC", "O")  # ClassLabel names
    assert dm.splits["val"][0].where == f"{saved}:validation[0]"
    assert Path(dm.vocab_file) != Path(one.vocab_file)


def test_hf_labeling_errors_name_the_file_and_column(hf_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from bp_apps.text.labeling.data import HFLabelingDataModule

    path = _write_ner(hf_cache / "train.jsonl", NER_ROWS)
    with pytest.raises(ValueError, match=re.escape(f"{path}: no column 'ner_tags' (tags_column); columns there: "
                                                   "tokens, tags")):
        HFLabelingDataModule(data_files=str(path)).prepare_data()
    with pytest.raises(ValueError, match=r"no split 'validation' for val_split; splits there: train, extra; a null "
                                         r"val_split holds validation out"):
        HFLabelingDataModule(data_files={"train": str(path), "extra": str(path)}, tags_column="tags").load_splits()
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ValueError, match=re.escape('pip install "bp_apps[hf]"')):
        HFLabelingDataModule(data_files=str(path), tags_column="tags").load_splits()
