"""Reading text data files the same way in every text task: strict UTF-8 line by line, with
errors naming the file and line, and paths resolved against a ``data_root`` option."""

from __future__ import annotations

import codecs
from collections.abc import Iterator
from pathlib import Path

__all__ = ["data_path", "utf8_lines"]


def utf8_lines(path: Path, error: type[ValueError] = ValueError) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` for each line, decoded strictly as UTF-8 (a leading BOM is dropped);
    a bad byte raises ``error`` naming ``path:line``."""
    data = path.read_bytes().removeprefix(codecs.BOM_UTF8)
    for lineno, raw in enumerate(data.splitlines(), start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise error(f"{path}:{lineno}: invalid UTF-8 ({exc.reason} at byte offset {exc.start} of the line)"
                        ) from None
        yield lineno, text


def data_path(name: str, data_root: str | None) -> Path:
    """``name`` under ``data_root`` (unless absolute); a ``data_root`` that is not a directory is an error."""
    path = Path(name).expanduser()
    if data_root is not None and not path.is_absolute():
        root = Path(data_root).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"data_root {str(root)!r} is not a directory")
        path = root / path
    return path
