"""Summarization data: readers and their errors, text cleaning, token batches, the tokenizer file and the data
modules.

Data files are small ones written to ``tmp_path`` (tokenizer files to a temporary cache); the embedded module reads
standard-library docstrings, and one test reads the first lines of the real AESLC validation file (skipped when it
is absent).
"""

from __future__ import annotations

import itertools
import json
import re
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tokenizers import processors

from bp_apps.core.datalink import LINKED
from bp_apps.text.summarization.data import (
    EmbeddedSummarizationDataModule,
    HFSummarizationDataModule,
    SummarizationDataError,
    SummarizationDataModule,
    SummaryRecord,
    clean_text,
    encode_batch,
    load_tokenizer_file,
    read_records,
    records_from_hf,
    save_tokenizer_file,
    target_ids,
    tokenizer_state,
)
from bp_apps.text.tokenization import train_tokenizer

REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
AESLC_VALIDATION = REAL_DATA / "summarization" / "aeslc" / "validation.jsonl"
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven", "happy", "cats",
         "watch", "from", "under", "an", "old", "red", "wooden", "table", "near", "the", "quiet", "river", "bank"]
BATCH_KEYS = {"input_ids", "attention_mask", "labels", "truncated_sources", "sources", "references", "ids"}


def write_lines(path: Path, lines: list[str | dict]) -> Path:
    """Write ``lines`` (dicts as JSON) one per line as UTF-8 and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((json.dumps(x) if isinstance(x, dict) else x) + "\n" for x in lines), encoding="utf-8")
    return path


def text(i: int, n: int) -> str:
    """``n`` words from a fixed list, starting at word ``i``: distinct, deterministic sentences."""
    return " ".join(WORDS[(i + k) % len(WORDS)] for k in range(n))


def pair(i: int, source_words: int | None = None) -> dict:
    return {"id": f"r{i}", "source": text(i, source_words or 8 + i % 7), "target": text(i + 3, 3)}


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tokenizer files go to a cache folder of this test session."""
    monkeypatch.setenv("BP_APPS_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([text(i, 12) for i in range(len(WORDS))], vocab_size=80, kind="unigram", lowercase=False)


# ---------------------------------------------------------------- clean_text


@pytest.mark.parametrize(("raw", "expected"), [
    ("  Hello,\t\tworld  ", "Hello, world"),
    ("#P1#: Hi.\r\n#P2#:  Hello!\r\n", "#P1#: Hi.\n#P2#: Hello!"),
    ("a\n\n \n\tb\rc", "a\nb\nc"),
    ("no\u00a0break  space", "no break space"),
    (" \n\t ", ""),
])
def test_clean_text(raw: str, expected: str) -> None:
    assert clean_text(raw) == expected


# ---------------------------------------------------------------- read_records: JSON Lines


def test_read_jsonl_records(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "d.jsonl", [
        {"id": "a", "source": "Dear  all,\nthe\tmeeting moved.", "target": " Meeting moved "},
        "",
        {"id": 7, "source": "#P1#: Hi.\n#P2#: Hello.", "target": ["Greeting.", "  ", "They say hello."]},
        {"source": "no id here", "target": "x"},
    ])
    assert read_records(path) == [
        SummaryRecord("Dear all,\nthe meeting moved.", ("Meeting moved",), "a", f"{path}:1"),
        SummaryRecord("#P1#: Hi.\n#P2#: Hello.", ("Greeting.", "They say hello."), "7", f"{path}:3"),
        SummaryRecord("no id here", ("x",), None, f"{path}:4"),
    ]


def test_read_jsonl_several_target_fields_and_custom_names(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "d.json", [
        {"key": "k", "body": "text", "subject": "orig", "refs": ["r1", "r2"]},
    ])
    [record] = read_records(path, source_field="body", target_field=["subject", "refs"], id_field="key")
    assert record == SummaryRecord("text", ("orig", "r1", "r2"), "k", f"{path}:1")
    with pytest.raises(SummarizationDataError, match=r"d\.json:1: missing field 'summary'$"):
        read_records(path, source_field="body", target_field=["subject", "summary"])


def test_read_unlabeled_records_for_prediction(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "d.jsonl", [{"source": "a b"}, {"source": "c", "target": "d"}])
    records = read_records(path, require_target=False)
    assert [(r.source, r.references) for r in records] == [("a b", ()), ("c", ("d",))]
    with pytest.raises(SummarizationDataError, match=r"d\.jsonl:1: missing field 'target'"):
        read_records(path)


def test_read_jsonl_crlf_and_bom(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"source": "a", "target": "b"}\r\n{"source": "c", "target": "d"}\r\n')
    assert [(r.source, r.where) for r in read_records(path)] == [("a", f"{path}:1"), ("c", f"{path}:2")]


@pytest.mark.parametrize(("line", "message"), [
    ('{"source": "a", "target": ', r":2: not valid JSON: Expecting value \(column 27\)"),
    ('["a", "b"]', r":2: expected a JSON object, got list"),
    ('{"text": "a", "target": "b"}', r":2: missing field 'source'$"),
    ('{"source": null, "target": "b"}', r":2: missing field 'source'$"),
    ('{"source": "a"}', r":2: missing field 'target'$"),
    ('{"source": 3, "target": "b"}', r":2: field 'source' must be a string, got int$"),
    ('{"source": "a", "target": {"x": 1}}', r":2: field 'target' must be a string or a list of strings, got dict$"),
    ('{"source": "a", "target": ["ok", 5]}', r":2: field 'target' item 1 must be a string, got int$"),
])
def test_read_jsonl_bad_records_name_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = write_lines(tmp_path / "bad.jsonl", [{"source": "fine", "target": "fine"}, line])
    with pytest.raises(SummarizationDataError, match=r"bad\.jsonl" + message):
        read_records(path)


@pytest.mark.parametrize(("name", "content"), [
    ("bad.jsonl", b'{"source": "a", "target": "b"}\n\n{"source": "caf\xe9", "target": "b"}\n'),
    ("bad.csv", b"source,target\na,b\ncaf\xe9,b\n"),
])
def test_invalid_utf8_names_the_line(tmp_path: Path, name: str, content: bytes) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(SummarizationDataError, match=re.escape(name) + r":3: invalid UTF-8 \(invalid continuation"):
        read_records(path)


def test_blank_records_are_skipped_with_one_warning(tmp_path: Path) -> None:
    lines: list[str | dict] = [{"source": "ok", "target": "fine"}, {"source": " \n\t", "target": "x"},
                               {"source": "y", "target": "  "}, {"source": "z", "target": ["", " "]}]
    lines += [{"source": "", "target": "x"}] * 4
    path = write_lines(tmp_path / "d.jsonl", lines)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        records = read_records(path)
    assert [r.where for r in records] == [f"{path}:1"]
    assert [str(w.message) for w in caught] == [
        f"{path}: skipped 7 record(s) with an empty source or summary at line(s) 2, 3, 4, 5, 6, ..."]
    assert caught[0].category is UserWarning


def test_file_without_usable_records(tmp_path: Path) -> None:
    empty = write_lines(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(SummarizationDataError, match=r"empty\.jsonl: no usable records"):
        read_records(empty)
    blank = write_lines(tmp_path / "blank.jsonl", [{"source": " ", "target": "x"}])
    with pytest.warns(UserWarning, match="skipped 1 record"), \
            pytest.raises(SummarizationDataError, match=r"blank\.jsonl: no usable records"):
        read_records(blank)


def test_missing_file_and_unknown_extension(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nothing\.jsonl"):
        read_records(tmp_path / "nothing.jsonl")
    path = write_lines(tmp_path / "d.txt", [{"source": "a", "target": "b"}])
    with pytest.raises(SummarizationDataError, match=r"d\.txt: cannot tell the format from the extension '\.txt'"):
        read_records(path)
    assert read_records(path, format="jsonl")[0].references == ("b",)
    with pytest.raises(ValueError, match="unknown format 'xml'"):
        read_records(path, format="xml")  # type: ignore[arg-type]


# ---------------------------------------------------------------- read_records: CSV and TSV


def test_read_csv_multiline_fields_and_several_target_columns(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text('id,dialogue,summary1,summary2\n'
                    '\n'
                    'd1,"#A#: Hi,  there.\n#B#: Hello.",They greet.,A greets B.\n'
                    'd2,Just one line,Short.,\n', encoding="utf-8")
    records = read_records(path, source_field="dialogue", target_field=["summary1", "summary2"])
    assert records == [
        SummaryRecord("#A#: Hi, there.\n#B#: Hello.", ("They greet.", "A greets B."), "d1", f"{path}:3"),
        SummaryRecord("Just one line", ("Short.",), "d2", f"{path}:5"),
    ]


def test_read_tsv(tmp_path: Path) -> None:
    path = tmp_path / "d.tsv"
    path.write_text("source\ttarget\na, b\tc\n", encoding="utf-8")
    assert read_records(path) == [SummaryRecord("a, b", ("c",), None, f"{path}:2")]


def test_csv_errors_name_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("text,title\nx,y\n", encoding="utf-8")
    with pytest.raises(SummarizationDataError,
                       match=r"d\.csv:1: missing field 'summary' \(header columns: text, title; CSV files need a "
                             r"header row"):
        read_records(path, source_field="text", target_field="summary")
    assert read_records(path, source_field="text", target_field="summary", require_target=False)[0].references == ()
    path.write_text("source,target\na,b\nc\n", encoding="utf-8")
    with pytest.raises(SummarizationDataError, match=r"d\.csv:3: 1 values, but the header has 2 columns"):
        read_records(path)


# ---------------------------------------------------------------- records_from_hf


def test_records_from_hf_rows() -> None:
    rows = [{"id": "0", "document": "A  text.", "summary": "Sum."}, {"id": 1, "document": " ", "summary": "x"},
            {"document": "B", "summary": ["s1", "s2"]}]
    with pytest.warns(UserWarning, match=r"xsum:train: skipped 1 record\(s\) .* at row\(s\) 1$"):
        records = records_from_hf(rows, "document", "summary", "id", where="xsum:train")
    assert records == [SummaryRecord("A text.", ("Sum.",), "0", "xsum:train[0]"),
                       SummaryRecord("B", ("s1", "s2"), None, "xsum:train[2]")]
    with pytest.raises(SummarizationDataError, match=r"^xsum:train\[1\]: missing field 'summary'$"):
        records_from_hf([rows[0], {"document": "x"}], "document", "summary", where="xsum:train")


def test_hf_module_field_defaults_and_missing_datasets(monkeypatch: pytest.MonkeyPatch) -> None:
    dm = HFSummarizationDataModule("samsum")
    assert (dm.source_field, dm.target_field) == ("dialogue", "summary")
    assert HFSummarizationDataModule("mine", source_field="a", target_field="b").source_field == "a"
    with pytest.raises(ValueError, match="no default fields for data set 'mine'"):
        HFSummarizationDataModule("mine")
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match=re.escape('pip install "bp_apps[hf]"')) as caught:
        dm.setup()
    assert isinstance(caught.value, ValueError)  # so the CLI reports it in one line


# ---------------------------------------------------------------- HF data module: local files and saved data sets

SUMMARY_ROWS = [{"id": str(i), "source": f"report {i}: the river rose by {i} metres overnight and roads closed",
                 "target": f"river rose {i} metres"} for i in range(24)]


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``datasets``' own cache and the suite's (tokenizer files) in ``tmp_path``, never the user's."""
    datasets = pytest.importorskip("datasets", reason="needs the hf extra (pip install \"bp_apps[hf]\")")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("BP_APPS_CACHE", str(tmp_path / "cache"))
    return tmp_path


def _write_rows(path: Path, rows: list[dict]) -> Path:
    """``rows`` as JSON Lines, CSV or Parquet, by ``path``'s extension."""
    import pandas as pd

    frame = pd.DataFrame(rows)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif path.suffix == ".csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_hf_module_reads_data_files_by_split(hf_cache: Path, suffix: str) -> None:
    train = _write_rows(hf_cache / f"train{suffix}", SUMMARY_ROWS[:16])
    val = _write_rows(hf_cache / f"val{suffix}", SUMMARY_ROWS[16:20])
    test = _write_rows(hf_cache / f"test{suffix}", SUMMARY_ROWS[20:])
    dm = HFSummarizationDataModule(data_files={"train": str(train), "validation": str(val), "test": str(test)},
                                   tokenizer_vocab_size=120, batch_size=4)
    assert (dm.source_field, dm.target_field) == ("source", "target")  # local files: the suite's field names
    dm.setup()
    assert {k: [r.id for r in v] for k, v in dm.splits.items()} == {
        "train": [str(i) for i in range(16)], "val": [str(i) for i in range(16, 20)],
        "test": [str(i) for i in range(20, 24)]}
    assert dm.splits["val"][0].references == ("river rose 16 metres",)
    assert dm.splits["train"][3].where == f"{train}[3]"
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 4 and "labels" in batch
    assert Path(dm.tokenizer_file).is_file()


def test_hf_module_one_file_holds_out_validation_relative_to_the_data_root(hf_cache: Path) -> None:
    (hf_cache / "data").mkdir()
    _write_rows(hf_cache / "data" / "all.jsonl", SUMMARY_ROWS)
    dm = HFSummarizationDataModule(data_files="all.jsonl", data_root=str(hf_cache / "data"), val_fraction=0.25,
                                   tokenizer_vocab_size=120)
    dm.setup()
    assert (len(dm.splits["train"]), len(dm.splits["val"])) == (18, 6) and "test" not in dm.splits
    first = dm.tokenizer_file
    _write_rows(hf_cache / "data" / "all.jsonl", SUMMARY_ROWS[:-1])  # other data: another tokenizer file
    assert HFSummarizationDataModule(data_files="all.jsonl", data_root=str(hf_cache / "data"), val_fraction=0.25,
                                     tokenizer_vocab_size=120).tokenizer_file != first


def test_hf_module_reads_a_saved_dataset(hf_cache: Path) -> None:
    import datasets

    saved = hf_cache / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(SUMMARY_ROWS[:20]),
                          "validation": datasets.Dataset.from_list(SUMMARY_ROWS[20:])}).save_to_disk(str(saved))
    dm = HFSummarizationDataModule(saved_dataset=str(saved), test_split=None, tokenizer_vocab_size=120)
    dm.setup()
    assert (len(dm.splits["train"]), len(dm.splits["val"])) == (20, 4)
    assert dm.splits["val"][0].where == f"{saved}:validation[0]"
    with pytest.raises(ValueError, match=r"no split 'test' for test_split; splits there: train, validation"):
        HFSummarizationDataModule(saved_dataset=str(saved), tokenizer_vocab_size=120).load_splits()
    with pytest.raises(ValueError, match="not a folder written by save_to_disk"):
        HFSummarizationDataModule(saved_dataset=str(hf_cache), tokenizer_vocab_size=120).load_splits()


def test_hf_module_names_the_file_and_the_missing_column(hf_cache: Path) -> None:
    path = _write_rows(hf_cache / "train.csv", SUMMARY_ROWS)
    with pytest.raises(ValueError, match=re.escape(f"{path}: no column 'summary' (target_field); columns there: "
                                                   "id, source, target")):
        HFSummarizationDataModule(data_files=str(path), target_field="summary").load_splits()
    with pytest.raises(FileNotFoundError, match=r"missing\.jsonl not found"):
        HFSummarizationDataModule(data_files=str(hf_cache / "missing.jsonl")).load_splits()
    text = hf_cache / "train.txt"
    text.write_text("x", encoding="utf-8")
    with pytest.raises(ValueError, match=r"cannot tell the format from the extension '\.txt'"):
        HFSummarizationDataModule(data_files=str(text)).load_splits()
    with pytest.raises(ValueError, match="data_files or saved_dataset, not both"):
        HFSummarizationDataModule(data_files=str(path), saved_dataset=str(hf_cache))


# ---------------------------------------------------------------- encode_batch


def test_target_ids_strips_only_a_leading_cls_or_bos() -> None:
    bert_like = SimpleNamespace(cls_token_id=2, bos_token_id=None)
    t5_like = SimpleNamespace(cls_token_id=None, bos_token_id=None)
    bart_like = SimpleNamespace(cls_token_id=None, bos_token_id=0)
    assert target_ids(bert_like, [2, 7, 8, 3]) == [7, 8, 3]
    assert target_ids(bert_like, [7, 2, 3]) == [7, 2, 3]
    assert target_ids(t5_like, [7, 8, 1]) == [7, 8, 1]
    assert target_ids(bart_like, [0, 7, 2]) == [7, 2]
    assert target_ids(bert_like, []) == []


def test_encode_batch_labels_padding_and_truncation(tokenizer) -> None:
    sources = [text(0, 30), "the"]
    targets = [text(4, 1), text(5, 4)]
    batch = encode_batch(tokenizer, sources, targets, max_source_tokens=8, max_target_tokens=48)
    cls, sep, pad = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id
    assert batch["truncated_sources"] == 1
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.dtype == mask.dtype == torch.long and ids.shape == (2, 8)
    assert ids[0].tolist() == [*tokenizer(sources[0])["input_ids"][:7], sep]
    short = tokenizer(sources[1])["input_ids"]
    assert len(short) < 8 < len(tokenizer(sources[0])["input_ids"])
    assert ids[1].tolist() == short + [pad] * (8 - len(short))
    assert mask[1].tolist() == [1] * len(short) + [0] * (8 - len(short))
    labels = batch["labels"]
    full = [tokenizer(t)["input_ids"] for t in targets]
    assert full[0][0] == cls and labels.dtype == torch.long and labels.shape == (2, max(map(len, full)) - 1)
    for row, ids_ in zip(labels.tolist(), full):
        assert row == ids_[1:] + [-100] * (labels.shape[1] - len(ids_) + 1)  # first real token ... [SEP], -100
        assert row[len(ids_) - 2] == sep


def test_encode_batch_truncates_targets_keeping_the_end_token(tokenizer) -> None:
    batch = encode_batch(tokenizer, ["a"], [text(0, 20)], max_source_tokens=16, max_target_tokens=4)
    full = tokenizer(text(0, 20))["input_ids"]
    assert batch["labels"].tolist() == [[*full[1:4], tokenizer.sep_token_id]]
    assert batch["truncated_sources"] == 0
    assert "labels" not in encode_batch(tokenizer, ["a"], None, 16, 4)
    with pytest.raises(ValueError, match="2 sources but 1 targets"):
        encode_batch(tokenizer, ["a", "b"], ["c"], 16, 4)


def test_encode_batch_without_a_leading_token_keeps_all_ids(tokenizer) -> None:
    end_only = train_tokenizer([text(i, 12) for i in range(len(WORDS))], vocab_size=80, kind="unigram")
    sep = end_only.sep_token_id
    end_only.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="$A [SEP]", special_tokens=[("[SEP]", sep)])  # like T5: only an end token
    target = text(0, 20)
    full = end_only(target)["input_ids"]
    assert full[0] != end_only.cls_token_id and full[-1] == sep
    batch = encode_batch(end_only, ["a"], [target], max_source_tokens=16, max_target_tokens=4)
    assert batch["labels"].tolist() == [[*full[:3], sep]]


# ---------------------------------------------------------------- SummarizationDataModule


def module(tmp_path: Path, records: list[dict] | None = None, **kwargs) -> SummarizationDataModule:
    if records is not None or not (tmp_path / "train.jsonl").exists():  # kept as it is: the same training data
        write_lines(tmp_path / "train.jsonl", records or [pair(i) for i in range(40)])
    options = {"train_file": "train.jsonl", "data_root": str(tmp_path), "tokenizer_vocab_size": 80,
               "batch_size": 4, "eval_batch_size": 3, "val_fraction": 0.1, **kwargs}
    return SummarizationDataModule(**options)


def ids_of(loader) -> list[str]:
    return [i for batch in loader for i in batch["ids"]]


def test_hold_out_limits_and_test_falls_back_to_val(tmp_path: Path) -> None:
    dm = module(tmp_path)
    dm.setup()
    assert [r.id for r in dm.splits["val"]] == ["r0", "r10", "r20", "r30"]
    assert len(dm.splits["train"]) == 36 and "r0" not in {r.id for r in dm.splits["train"]}
    assert ids_of(dm.test_dataloader()) == ids_of(dm.val_dataloader()) == ["r0", "r10", "r20", "r30"]
    limited = module(tmp_path / "l", limit_train=5, limit_val=2)
    limited.setup()
    assert [r.id for r in limited.splits["train"]] == ["r1", "r2", "r3", "r4", "r5"]
    assert [r.id for r in limited.splits["val"]] == ["r0", "r10"]


def test_val_and_test_files_and_eval_target_field(tmp_path: Path) -> None:
    write_lines(tmp_path / "val.jsonl", [{"id": "v", "source": "s", "target": "orig", "references": ["a", "b"]}])
    write_lines(tmp_path / "test.jsonl", [{"id": "t", "source": "s", "target": "orig", "references": ["c"]}])
    dm = module(tmp_path, val_file="val.jsonl", test_file="test.jsonl", eval_target_field=["references"])
    dm.setup()
    assert len(dm.splits["train"]) == 40 and dm.splits["train"][0].references == (text(3, 3),)
    assert dm.splits["val"][0].references == ("a", "b")
    test_batch = next(iter(dm.test_dataloader()))
    assert test_batch["ids"] == ["t"] and test_batch["references"] == [("c",)]


def test_length_filters_apply_to_training_only(tmp_path: Path) -> None:
    train = [pair(i, source_words=10) for i in range(20)]
    train[3]["source"] = "tiny"
    train[5]["source"] = text(0, 60)
    train[7]["target"] = "x"
    write_lines(tmp_path / "val.jsonl", [{"source": "tiny", "target": "x"}])
    dm = module(tmp_path, train, val_file="val.jsonl", min_source_chars=10, max_source_chars=200, min_target_chars=2)
    with pytest.warns(UserWarning, match=r"left out 3 of 20 training records outside the length filters "
                                         r"\(min_source_chars=10, max_source_chars=200, min_target_chars=2\)"):
        dm.setup()
    assert {r.id for r in dm.splits["train"]} == {f"r{i}" for i in range(20)} - {"r3", "r5", "r7"}
    assert [r.source for r in dm.splits["val"]] == ["tiny"]
    with pytest.raises(ValueError, match="max_source_chars=5 is below min_source_chars=10"):
        module(tmp_path, min_source_chars=10, max_source_chars=5)


def test_loader_batches_have_the_documented_keys(tmp_path: Path) -> None:
    dm = module(tmp_path)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == BATCH_KEYS
    assert len(batch["sources"]) == len(batch["ids"]) == batch["input_ids"].shape[0] == batch["labels"].shape[0] == 4
    by_id = {r.id: r for r in dm.splits["train"]}
    assert batch["sources"] == [by_id[i].source for i in batch["ids"]]
    assert batch["references"] == [by_id[i].references for i in batch["ids"]]
    assert batch["labels"][0, 0] != dm.tokenizer.cls_token_id


def test_training_order_is_deterministic_per_seed_and_epoch(tmp_path: Path) -> None:
    first, again, other = module(tmp_path / "a"), module(tmp_path / "b"), module(tmp_path / "c", seed=1)
    orders = []
    for dm in (first, again, other):
        dm.setup()
        orders.append(ids_of(dm.train_dataloader()))
    assert orders[0] == orders[1] != orders[2]
    assert sorted(orders[0]) == sorted(r.id for r in first.splits["train"])  # every record once per epoch
    loader = first.train_dataloader()
    loader.batch_sampler.set_epoch(1)
    assert ids_of(loader) != orders[0]
    loader.batch_sampler.set_epoch(0)
    assert ids_of(loader) == orders[0]


def test_truncation_is_warned_once_per_data_module(tmp_path: Path) -> None:
    dm = module(tmp_path, max_source_tokens=4)
    dm.setup()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        truncated = sum(b["truncated_sources"] for b in itertools.chain(dm.train_dataloader(), dm.val_dataloader()))
    messages = [str(w.message) for w in caught if "max_source_tokens" in str(w.message)]
    assert messages == ["4 source(s) so far are longer than max_source_tokens=4 tokens and were truncated "
                        "(this warning is given once)"]
    assert truncated == dm.truncated_sources == 40


def test_data_root_and_tokenizer_choices(tmp_path: Path, tokenizer) -> None:
    with pytest.raises(FileNotFoundError, match=r"data_root '.*nowhere' is not a directory"):
        module(tmp_path, data_root=str(tmp_path / "nowhere")).setup()
    tokenizer.save_pretrained(tmp_path / "tok")
    named = module(tmp_path, tokenizer_name=str(tmp_path / "tok"))
    named.setup()
    assert named.tokenizer.get_vocab() == tokenizer.get_vocab()
    trained = module(tmp_path, lowercase=True)
    trained.setup()
    assert trained.tokenizer.tokenize("THE FOX") == trained.tokenizer.tokenize("the fox")


def test_tokenizer_file_is_known_after_init_and_built_once_in_prepare_data(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    dm = module(tmp_path)
    path = Path(dm.tokenizer_file)
    assert not path.exists() and path.name.startswith("summarization-unigram-") and not dm.splits  # nothing read
    assert {name for name in LINKED if hasattr(dm, name)} == {"tokenizer_file", "max_source_tokens",
                                                               "max_target_tokens"}
    assert (dm.max_source_tokens, dm.max_target_tokens) == (256, 48)
    dm.prepare_data()
    written = load_tokenizer_file(path)
    assert len(written) <= 80 and written.cls_token == "[CLS]"
    stamp = path.stat().st_mtime_ns
    again = module(tmp_path)  # the same data and settings: the same file, not built again
    assert again.tokenizer_file == dm.tokenizer_file
    monkeypatch.setattr(SummarizationDataModule, "_train_tokenizer", lambda *a: pytest.fail("trained again"))
    again.prepare_data()
    again.setup()
    assert path.stat().st_mtime_ns == stamp
    assert tokenizer_state(again.tokenizer) == tokenizer_state(written)
    batch = next(iter(again.train_dataloader()))  # the batches encode with the file's tokenizer
    expected = written(batch["sources"][0], truncation=True, max_length=256)["input_ids"]
    assert batch["input_ids"][0, :len(expected)].tolist() == expected
    for changed in ({"tokenizer_vocab_size": 60}, {"lowercase": True}, {"limit_train": 10}, {"min_target_chars": 3},
                    {"tokenizer_kind": "wordpiece"}):
        assert module(tmp_path, **changed).tokenizer_file != dm.tokenizer_file, changed
    assert module(tmp_path, batch_size=2, max_source_tokens=9).tokenizer_file == dm.tokenizer_file
    write_lines(tmp_path / "train.jsonl", [pair(i) for i in range(41)])  # other training data: another file
    assert module(tmp_path).tokenizer_file != dm.tokenizer_file


def test_a_damaged_tokenizer_file_is_built_again_and_named_when_read(tmp_path: Path, tokenizer) -> None:
    dm = module(tmp_path)
    Path(dm.tokenizer_file).parent.mkdir(parents=True, exist_ok=True)
    Path(dm.tokenizer_file).write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match=r"summarization-unigram-.*\.json: not a readable tokenizer file"):
        load_tokenizer_file(dm.tokenizer_file)
    dm.setup()  # prepare_data rebuilds it
    assert tokenizer_state(load_tokenizer_file(dm.tokenizer_file)) == tokenizer_state(dm.tokenizer)
    with pytest.raises(FileNotFoundError, match=r"missing\.json' does not exist: the data module writes it"):
        load_tokenizer_file(tmp_path / "missing.json")
    tokenizer("a b c", truncation=True, max_length=2, padding="max_length")  # sets the backend's truncation
    save_tokenizer_file(tmp_path / "t.json", tokenizer)
    assert tokenizer_state(load_tokenizer_file(tmp_path / "t.json")) == tokenizer_state(tokenizer)


def test_setup_refuses_a_model_with_another_tokenizer(tmp_path: Path, tokenizer) -> None:
    """A model loaded from a checkpoint brings its tokenizer: this data must encode with the same one."""
    dm = module(tmp_path)
    dm.trainer = SimpleNamespace(lightning_module=SimpleNamespace(tokenizer=tokenizer))
    with pytest.raises(ValueError, match=r"the model's tokenizer \(from its checkpoint\) is not this data's"):
        dm.setup()
    same = module(tmp_path)
    same.prepare_data()
    same.trainer = SimpleNamespace(lightning_module=SimpleNamespace(tokenizer=load_tokenizer_file(dm.tokenizer_file)))
    same.setup()
    fresh = module(tmp_path)
    fresh.trainer = SimpleNamespace(lightning_module=SimpleNamespace(tokenizer=None))  # a model not built yet
    fresh.setup()


def test_no_training_records_left(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="left out 36 of 36"), \
            pytest.raises(SummarizationDataError, match="no training records left"):
        module(tmp_path, min_source_chars=10_000).setup()


# ---------------------------------------------------------------- embedded and real data


@pytest.mark.filterwarnings("ignore:.*were truncated")
def test_embedded_module_splits_docstrings_disjointly() -> None:
    dm = EmbeddedSummarizationDataModule(max_pairs=200, tokenizer_vocab_size=300, batch_size=8)
    dm.setup()
    splits = dm.splits
    assert sum(map(len, splits.values())) == 200 and all(splits.values())
    indices = {name: {int(r.where.split(":")[1]) for r in records} for name, records in splits.items()}
    assert {i % 10 for i in indices["val"]} == {0} and {i % 10 for i in indices["test"]} == {1}
    assert not {i % 10 for i in indices["train"]} & {0, 1}
    sources = [{r.source for r in records} for records in splits.values()]
    assert not (sources[0] & sources[1] or sources[0] & sources[2] or sources[1] & sources[2])
    record = splits["train"][0]
    assert len(record.references) == 1 and record.references[0].endswith(".") and "\n" not in record.references[0]
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == BATCH_KEYS and batch["input_ids"].shape[0] == 8


@pytest.mark.skipif(not AESLC_VALIDATION.is_file(), reason=f"real data not found at {AESLC_VALIDATION}")
def test_real_aeslc_validation_head(tmp_path: Path) -> None:
    with AESLC_VALIDATION.open(encoding="utf-8") as handle:
        head = list(itertools.islice(handle, 50))
    path = tmp_path / "validation.jsonl"
    path.write_text("".join(head), encoding="utf-8")
    records = read_records(path, target_field=["target", "references"])
    assert len(records) == 50 and records[-1].where == f"{path}:50"
    assert all(len(r.references) == 4 and r.id for r in records)
    assert records[0].references[0] == clean_text(json.loads(head[0])["target"])
    assert all("  " not in r.source and "\t" not in r.source for r in records)
