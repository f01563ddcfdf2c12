"""JSON Lines reading shared by the tasks' data readers."""

from __future__ import annotations

import pytest

from bp_apps.core.io import jsonl_objects


class DataError(ValueError):
    pass


def test_jsonl_objects_yield_each_object_with_its_line_and_skip_blank_lines(tmp_path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"a": 1}\n\n  \n{"b": [2]}\n')
    assert list(jsonl_objects(path)) == [(1, {"a": 1}), (4, {"b": [2]})]


@pytest.mark.parametrize(("content", "message"), [
    (b'{"a": 1}\n{"a": \n', r"d.jsonl:2: not valid JSON: .*column"),
    (b'{"a": 1}\n[1, 2]\n', r"d.jsonl:2: expected a JSON object, got list"),
    (b'{"a": "\xff"}\n', r"d.jsonl:1: invalid UTF-8"),
])
def test_jsonl_objects_name_the_file_and_line_of_a_bad_record(tmp_path, content, message) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        list(jsonl_objects(path, DataError))


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_atomic_writes_honour_the_umask(tmp_path, mask) -> None:
    import os

    from bp_apps.core.io import atomic_write_text

    previous = os.umask(mask)
    try:
        path = atomic_write_text(tmp_path / "out.json", "{}")
    finally:
        os.umask(previous)
    assert path.read_text() == "{}"
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temporary(tmp_path) -> None:
    from bp_apps.core.io import atomic_output

    path = tmp_path / "model.ckpt"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk full"), atomic_output(path) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("disk full")
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["model.ckpt"]


def test_read_json_file_names_a_missing_or_unreadable_file(tmp_path) -> None:
    from bp_apps.core.io import read_json_file

    with pytest.raises(FileNotFoundError, match=r"vocabulary file '.*v.json' does not exist: build it first"):
        read_json_file(tmp_path / "v.json", "vocabulary file", "build it first")
    (tmp_path / "v.json").write_text("{oops")
    with pytest.raises(ValueError, match=r"v.json: not a readable vocabulary file"):
        read_json_file(tmp_path / "v.json", "vocabulary file")
    (tmp_path / "v.json").write_text('{"words": []}')
    assert read_json_file(tmp_path / "v.json", "vocabulary file") == {"words": []}
