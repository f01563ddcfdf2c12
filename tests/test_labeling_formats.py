"""Labeled-sentence readers and writers on small files made here, plus the first lines of real PropBank EWT data."""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from bp_apps.core.io import write_jsonl
from bp_apps.text.labeling.formats import (
    check_bio,
    check_known_tags,
    load_hf,
    read_conll,
    read_jsonl,
    read_labeled_file,
    sentences_from_hf,
)
from bp_apps.text.labeling.records import LabelingDataError, TaggedSentence, make_sentence

REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
PROPBANK_VALIDATION = REAL_DATA / "labeling" / "propbank_ewt" / "validation.jsonl"


def write_lines(path: Path, lines: list[str | dict]) -> Path:
    """Write ``lines`` (dicts as JSON) one per line as UTF-8 and return the path."""
    path.write_text("".join((json.dumps(x) if isinstance(x, dict) else x) + "\n" for x in lines), encoding="utf-8")
    return path


# ---------------------------------------------------------------- JSON Lines


def test_read_jsonl_good_records_with_and_without_predicate(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "d.jsonl", [
        {"sent_id": "s-1", "tokens": ["He", "ran"], "tags": ["B-ARG0", "B-V"], "predicate": 1, "roleset": "run.02"},
        "",
        {"id": 7, "tokens": ["Bonn", "ist", "schön"], "tags": ["B-LOC", "O", "O"]},
        "   ",
        {"tokens": ["ok"], "tags": ["O"], "id": "x", "sent_id": "ignored"},
    ])
    sentences = read_jsonl(path)
    assert sentences == [
        TaggedSentence(("He", "ran"), ("B-ARG0", "B-V"), 1, f"{path}:1", "s-1"),
        TaggedSentence(("Bonn", "ist", "schön"), ("B-LOC", "O", "O"), None, f"{path}:3", "7"),
        TaggedSentence(("ok",), ("O",), None, f"{path}:5", "x"),
    ]


def test_read_jsonl_custom_fields_and_optional_tags(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "d.jsonl", [
        {"words": ["a", "b"], "labels": ["O", "B-X"], "verb": 0, "key": "k1"},
        {"words": ["c"]},
    ])
    sentences = read_jsonl(path, tokens_field="words", tags_field="labels", predicate_field="verb", id_field="key",
                           require_tags=False)
    assert sentences[0] == TaggedSentence(("a", "b"), ("O", "B-X"), 0, f"{path}:1", "k1")
    assert sentences[1] == TaggedSentence(("c",), None, None, f"{path}:2", None)
    with pytest.raises(LabelingDataError, match=r":2: missing field 'labels'"):
        read_jsonl(path, tokens_field="words", tags_field="labels")


def test_read_jsonl_crlf_and_bom(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"tokens": ["a"], "tags": ["O"]}\r\n{"tokens": ["b"], "tags": ["O"]}\r\n')
    assert [s.tokens for s in read_jsonl(path)] == [("a",), ("b",)]


def test_read_jsonl_invalid_utf8_names_the_line(tmp_path: Path) -> None:
    good = b'{"tokens": ["a"], "tags": ["O"]}\n'
    path = tmp_path / "bad.jsonl"
    path.write_bytes(good + good + b'{"tokens": ["caf\xe9"], "tags": ["O"]}\n' + good)
    with pytest.raises(LabelingDataError, match=r"bad\.jsonl:3: invalid UTF-8 \(invalid continuation byte"):
        read_jsonl(path)


@pytest.mark.parametrize(("line", "message"), [
    ('{"tokens": ["a"], "tags": ["O"]', r":2: not valid JSON: Expecting ',' delimiter"),
    ('[{"tokens": ["a"], "tags": ["O"]}]', r":2: expected a JSON object, got list"),
    ('{"tags": ["O"]}', r":2: missing field 'tokens'"),
    ('{"tokens": ["a"]}', r":2: missing field 'tags'"),
    ('{"tokens": ["a"], "tags": null}', r":2: missing field 'tags'"),
    ('{"tokens": ["a", "b"], "tags": ["O"]}', r":2: 2 tokens but 1 tags"),
    ('{"tokens": ["a", "b"], "tags": ["O", "O"], "predicate": 2}', r":2: predicate index 2 is out of range"),
    ('{"tokens": "a b", "tags": ["O", "O"]}', r":2: 'tokens' must be a list of strings, got str"),
    ('{"tokens": ["a", " "], "tags": ["O", "O"]}', r":2: token 1 is ' '"),
])
def test_read_jsonl_bad_records_name_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = write_lines(tmp_path / "d.jsonl", ['{"tokens": ["ok"], "tags": ["O"]}', line])
    with pytest.raises(LabelingDataError, match=r"d\.jsonl" + message):
        read_jsonl(path)


def test_read_jsonl_skips_empty_sentences_with_one_warning(tmp_path: Path) -> None:
    empty = {"tokens": [], "tags": []}
    lines = [empty, {"tokens": ["a"], "tags": ["O"]}, *([empty] * 6), {"tokens": ["b"], "tags": ["O"]}]
    path = write_lines(tmp_path / "d.jsonl", lines)
    with pytest.warns(UserWarning) as record:
        sentences = read_jsonl(path)
    assert [s.tokens for s in sentences] == [("a",), ("b",)]
    assert len(record) == 1
    assert "skipped 7 empty sentence(s)" in str(record[0].message)
    assert "line(s) 1, 3, 4, 5, 6, ..." in str(record[0].message)


def test_read_jsonl_empty_or_missing_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(LabelingDataError, match=r"empty\.jsonl: no sentences"):
        read_jsonl(empty)
    with pytest.raises(FileNotFoundError, match=r"nowhere\.jsonl"):
        read_jsonl(tmp_path / "nowhere.jsonl")


# ---------------------------------------------------------------- CoNLL


CONLL_NER = """\
-DOCSTART- -X- -X- O

# a comment before the sentence
EU NNP B-NP B-ORG
rejects VBZ B-VP O
# NN I-NP O

Peter NNP B-NP B-PER
-DOCSTART- -X- -X- O
Blackburn NNP B-NP B-PER


"""


def test_read_conll_docstart_comments_and_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "ner.conll"
    path.write_text(CONLL_NER, encoding="utf-8")
    sentences = read_conll(path)
    assert sentences == [
        TaggedSentence(("EU", "rejects", "#"), ("B-ORG", "O", "O"), None, f"{path}:4"),
        TaggedSentence(("Peter",), ("B-PER",), None, f"{path}:8"),
        TaggedSentence(("Blackburn",), ("B-PER",), None, f"{path}:10"),
    ]
    pos = read_conll(path, tag_column=1)
    assert pos[0].tags == ("NNP", "VBZ", "NN")
    assert read_conll(path, tag_column=None)[0] == TaggedSentence(("EU", "rejects", "#"), None, None, f"{path}:4")


def test_read_conll_short_line_names_line_and_columns(tmp_path: Path) -> None:
    path = tmp_path / "ner.conll"
    path.write_text("EU NNP B-ORG\nrejects O\n", encoding="utf-8")
    assert read_conll(path)[0].tags == ("B-ORG", "O")  # tag column -1 needs one column only
    with pytest.raises(LabelingDataError, match=r"ner\.conll:2: 2 column\(s\), need at least 3"):
        read_conll(path, tag_column=2)


def test_read_conll_invalid_utf8_and_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "ner.conll"
    path.write_bytes(b"a O\n\nb O\n\xff O\n")
    with pytest.raises(LabelingDataError, match=r"ner\.conll:4: invalid UTF-8"):
        read_conll(path)
    path.write_text("-DOCSTART- O\n\n# only a comment\n", encoding="utf-8")
    with pytest.raises(LabelingDataError, match=r"ner\.conll: no sentences"):
        read_conll(path)


SRL_CONLL = """\
The\tDT\t-\tB-ARG0
cat\tNN\t-\tI-ARG0
sat\tVBD\tsit.01\tB-V
.\t.\t-\tO

It\tPRP\t_\tB-ARG0
rains\tVBZ\train.01\tB-V
"""


def test_read_conll_predicate_column(tmp_path: Path) -> None:
    path = tmp_path / "srl.tsv"
    path.write_text(SRL_CONLL, encoding="utf-8")
    first, second = read_conll(path, predicate_column=2)
    assert first == TaggedSentence(("The", "cat", "sat", "."), ("B-ARG0", "I-ARG0", "B-V", "O"), 2, f"{path}:1")
    assert (second.predicate, second.where) == (1, f"{path}:6")


@pytest.mark.parametrize(("rows", "found"), [("a\t-\tO\nb\t_\tO\n", "found 0 (lines: none)"),
                                              ("a\tx.01\tB-V\nb\ty.01\tB-V\n", "found 2 (lines: 1, 2)")])
def test_read_conll_predicate_column_needs_exactly_one(tmp_path: Path, rows: str, found: str) -> None:
    path = tmp_path / "srl.tsv"
    path.write_text(rows, encoding="utf-8")
    with pytest.raises(LabelingDataError, match=r"srl\.tsv:1: expected exactly one predicate row") as info:
        read_conll(path, predicate_column=1)
    assert found in str(info.value)


# ---------------------------------------------------------------- dispatch


@pytest.mark.parametrize("name", ["d.jsonl", "d.JSON", "d.conll", "d.conllu", "d.txt", "d.tsv", "d.bio", "d.iob"])
def test_read_labeled_file_dispatches_on_extension(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    if name.lower().endswith((".jsonl", ".json")):
        write_lines(path, [{"tokens": ["a", "b"], "tags": ["B-X", "O"]}])
    else:
        path.write_text("a B-X\nb O\n", encoding="utf-8")
    assert read_labeled_file(path) == [TaggedSentence(("a", "b"), ("B-X", "O"), None, f"{path}:1")]


def test_read_labeled_file_forced_format_options_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "data.dat"
    path.write_text("a NN B-X\nb NN O\n", encoding="utf-8")
    with pytest.raises(LabelingDataError, match=r"data\.dat: cannot tell the format .*'\.dat'.*\.jsonl.*\.iob"):
        read_labeled_file(path)
    assert read_labeled_file(path, format="conll", tag_column=1)[0].tags == ("NN", "NN")
    with pytest.raises(LabelingDataError, match=r"data\.dat:1: not valid JSON"):
        read_labeled_file(path, format="jsonl")
    with pytest.raises(ValueError, match="unknown format 'csv'"):
        read_labeled_file(path, format="csv")


# ---------------------------------------------------------------- Hugging Face


class FakeDataset:
    """Rows plus ``.features`` shaped like ``datasets``: ``{column: Sequence(feature=ClassLabel(names=...))}``."""

    def __init__(self, rows: list[dict], names: list[str] | None) -> None:
        self.rows = rows
        self.features = {} if names is None else {"ner_tags": SimpleNamespace(feature=SimpleNamespace(names=names))}

    def __iter__(self):
        return iter(self.rows)


NAMES = ["O", "B-PER", "I-PER", "B-LOC"]


def test_sentences_from_hf_maps_classlabel_names(tmp_path: Path) -> None:
    dataset = FakeDataset([{"id": "0", "tokens": ["Ann", "Lee", "left"], "ner_tags": [1, 2, 0]},
                           {"id": "1", "tokens": [], "ner_tags": []},
                           {"id": "2", "tokens": ["Rome"], "ner_tags": [3]}], NAMES)
    with pytest.warns(UserWarning, match=r"conll: skipped 1 empty sentence\(s\).*row\(s\) 1"):
        sentences = sentences_from_hf(dataset, where="conll")
    assert sentences == [TaggedSentence(("Ann", "Lee", "left"), ("B-PER", "I-PER", "O"), None, "conll[0]", "0"),
                         TaggedSentence(("Rome",), ("B-LOC",), None, "conll[2]", "2")]


def test_sentences_from_hf_string_tags_and_list_feature() -> None:
    rows = [{"words": ["a", "b"], "labels": ["B-X", "O"]}]
    assert sentences_from_hf(rows, tokens_column="words", tags_column="labels")[0].tags == ("B-X", "O")
    dataset = FakeDataset([{"tokens": ["x"], "ner_tags": [1]}], None)
    dataset.features = {"ner_tags": [SimpleNamespace(names=NAMES)]}  # datasets' list form of Sequence(ClassLabel)
    assert sentences_from_hf(dataset)[0].tags == ("B-PER",)


def test_sentences_from_hf_errors() -> None:
    with pytest.raises(LabelingDataError, match=r"hf\[0\]: tag 1 is an integer but column 'ner_tags' has no label"):
        sentences_from_hf(FakeDataset([{"tokens": ["x"], "ner_tags": [1]}], None))
    with pytest.raises(LabelingDataError, match=r"hf\[1\]: tag 4 is out of range for 4 label names"):
        sentences_from_hf(FakeDataset([{"tokens": ["x"], "ner_tags": [0]}, {"tokens": ["y"], "ner_tags": [4]}], NAMES))
    with pytest.raises(LabelingDataError, match=r"hf\[0\]: missing column 'ner_tags' \(columns: tokens, pos\)"):
        sentences_from_hf([{"tokens": ["x"], "pos": [1]}])
    with pytest.raises(LabelingDataError, match=r"hf\[0\]: 2 tokens but 1 tags"):
        sentences_from_hf(FakeDataset([{"tokens": ["x", "y"], "ner_tags": [0]}], NAMES))


def test_load_hf_without_datasets_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match="pip install datasets"):
        load_hf("conll2003", "train")


def test_load_hf_calls_load_dataset(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def load_dataset(name, config_name, split):
        calls.append((name, config_name, split))
        return FakeDataset([{"tokens": ["x"], "ner_tags": [3]}], NAMES)

    monkeypatch.setitem(sys.modules, "datasets", SimpleNamespace(load_dataset=load_dataset))
    sentences = load_hf("wikiann", "validation", config_name="en")
    assert calls == [("wikiann", "en", "validation")]
    assert sentences == [TaggedSentence(("x",), ("B-LOC",), None, "wikiann/en:validation[0]")]


# ---------------------------------------------------------------- checks


def test_check_known_tags() -> None:
    known = [f"B-L{i:02d}" for i in range(12)] + ["O"]
    good = [make_sentence(["a", "b"], ["B-L00", "O"], where="train.jsonl:1"), make_sentence(["c"])]
    check_known_tags(good, known)
    bad = [*good, make_sentence(["a", "b"], ["O", "B-NEW"], where="dev.jsonl:9")]
    with pytest.raises(LabelingDataError) as info:
        check_known_tags(bad, known)
    message = str(info.value)
    assert message.startswith("dev.jsonl:9: tag 'B-NEW' (token 1) is not in the training label set")
    assert message.endswith("known tags: " + ", ".join(f"B-L{i:02d}" for i in range(10)) + ", ... (13 in all)")
    assert "B-L10" not in message


def test_check_bio() -> None:
    check_bio([make_sentence(["a", "b", "c"], ["B-ARG0", "I-ARG0", "O"], where="f:1"), make_sentence(["d"])])
    for tag in ["E-ARG0", "B-", "ARG0", "S-LOC", "o"]:
        with pytest.raises(LabelingDataError, match=rf"^f:2: tag '{tag}' \(token 1\) is not BIO"):
            check_bio([make_sentence(["a", "b"], ["O", tag], where="f:2")])


# ---------------------------------------------------------------- writing


def test_write_jsonl_round_trip_atomic_and_replacing(tmp_path: Path) -> None:
    path = tmp_path / "out" / "nested" / "pred.jsonl"
    records = [{"tokens": ["Köln", "liegt"], "tags": ["B-LOC", "O"], "id": "1"},
               {"tokens": ["x"], "tags": ["O"], "predicate": 0}]
    assert write_jsonl(path, records) == path
    assert path.read_text(encoding="utf-8").splitlines()[0] == \
        '{"tokens": ["Köln", "liegt"], "tags": ["B-LOC", "O"], "id": "1"}'
    assert [s.tokens for s in read_jsonl(path)] == [("Köln", "liegt"), ("x",)]
    write_jsonl(path, iter([{"tokens": ["y"], "tags": ["O"]}]))
    assert path.read_text(encoding="utf-8") == '{"tokens": ["y"], "tags": ["O"]}\n'
    assert sorted(p.name for p in path.parent.iterdir()) == ["pred.jsonl"]  # no temporary files left


def test_write_jsonl_unserializable_record_leaves_old_file(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "pred.jsonl", [{"tokens": ["old"], "tags": ["O"]}])
    before = path.read_bytes()
    sentence = make_sentence(["a"], ["O"])
    with pytest.raises(TypeError, match=r"pred\.jsonl: record 1 cannot be written as JSON"):
        write_jsonl(path, [{"ok": 1}, sentence])
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["pred.jsonl"]


# ---------------------------------------------------------------- real data


@pytest.mark.skipif(not PROPBANK_VALIDATION.is_file(), reason=f"{PROPBANK_VALIDATION} is absent")
def test_propbank_ewt_validation_first_lines(tmp_path: Path) -> None:
    with PROPBANK_VALIDATION.open("rb") as source:
        head = b"".join(itertools.islice(source, 200))
    path = tmp_path / "validation_head.jsonl"
    path.write_bytes(head)
    sentences = read_labeled_file(path)
    assert len(sentences) == 200
    check_bio(sentences)
    first = sentences[0]
    assert first.tokens == ("From", "the", "AP", "comes", "this", "story", ":")
    assert first.predicate == 3 and first.tags[3] == "B-V" and first.where == f"{path}:1"
    assert first.id == "weblog-blogspot.com_nominations_20041117172713_ENG_20041117_172713-0001"
    assert all(s.tags[s.predicate].endswith("-V") for s in sentences)  # the predicate lies in its V span
