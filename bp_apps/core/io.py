"""Files, safely: atomic writes (a temporary name in the same folder, then a rename), checkpoints loaded without
running code, strict UTF-8 lines and JSONL, data paths and the cache folder."""

from __future__ import annotations

import codecs
import contextlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any


def current_umask() -> int:
    """The process's file-creation mask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_output(path: Path | str, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary file in ``path``'s folder to write; when the block ends without an error it is flushed to disk,
    given the permissions the umask allows a new file (``mkstemp`` alone would leave 0600) and renamed to ``path``,
    so readers see the old file or the new one, never half. On an error it is removed and ``path`` is untouched."""
    path = Path(path)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    except OSError as error:  # a read-only or missing folder: name the file that was to be written
        raise type(error)(error.errno, error.strerror, str(path)) from None
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        if error.errno is not None and error.filename in (None, str(tmp), tmp):  # a full disk: name the file
            raise type(error)(error.errno, error.strerror, str(path)) from None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path | str, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (:func:`atomic_output`)."""
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: Path | str, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def load_checkpoint_dict(path: Path | str) -> dict:
    """A Lightning checkpoint read safely: ``torch.load(weights_only=True)`` on the CPU, so a file carrying a
    pickled payload is refused without running it. A missing, truncated or corrupt file, or one that is not a
    checkpoint dictionary, gives an error naming it."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated, corrupt or carrying code: refuse without running it
        raise ValueError(f"{path}: not a loadable checkpoint ({type(error).__name__}: {str(error)[:300]})") from None
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path} is not a Lightning checkpoint")
    return checkpoint


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



def jsonl_objects(path: Path, error: type[ValueError] = ValueError) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for each non-blank line of a JSON Lines file (strict UTF-8); a line that is not
    a JSON object raises ``error`` naming ``path:line``."""
    for lineno, line in utf8_lines(path, error):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise error(f"{path}:{lineno}: not valid JSON: {exc.msg} (column {exc.colno})") from None
        if not isinstance(record, dict):
            raise error(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__} "
                        "(JSON Lines: one object per line)")
        yield lineno, record


def format_from_suffix(path: Path, formats: Mapping[str, Iterable[str]], error: type[ValueError] = ValueError) -> str:
    """The format whose suffixes (``formats``: name -> suffixes) include ``path``'s, or ``error`` naming the file,
    its suffix and every accepted one."""
    suffix = path.suffix.lower()
    for name, suffixes in formats.items():
        if suffix in suffixes:
            return name
    accepted = ", ".join(f"{name} ({', '.join(suffixes)})" for name, suffixes in formats.items())
    names = ", ".join(repr(name) for name in formats)
    raise error(f"{path}: cannot tell the format from the extension {suffix or '(none)'!r}; accepted: {accepted}, "
                f"or pass format= one of {names}")

def read_json_file(path: Path | str, what: str, missing_hint: str = "") -> Any:
    """The JSON value in ``path``. A missing file is a FileNotFoundError naming it as ``what`` (and how it is
    made: ``missing_hint``); a file that is not UTF-8 JSON is a ValueError naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist" + (f": {missing_hint}" if missing_hint else ""))
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not a readable {what} ({error})") from None

def data_path(name: str, data_root: str | None) -> Path:
    """``name`` under ``data_root`` (unless absolute); a ``data_root`` that is not a directory is an error."""
    path = Path(name).expanduser()
    if data_root is not None and not path.is_absolute():
        root = Path(data_root).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"data_root {str(root)!r} is not a directory")
        path = root / path
    return path


def default_cache_dir() -> Path:
    """``$BP_APPS_CACHE``, else ``~/.cache/bp_apps``: where derived corpora are kept between runs."""
    return Path(os.environ.get("BP_APPS_CACHE") or Path.home() / ".cache" / "bp_apps")


def write_jsonl(path: Path | str, records: Iterable[Mapping[str, Any]]) -> Path:
    """Write one JSON object per line (UTF-8, not ASCII-escaped) atomically, creating parent folders.

    Readers see the old file or the complete new one, never a partial write.
    """
    path = Path(path)
    lines = []
    for index, record in enumerate(records):
        try:
            lines.append(json.dumps(record, ensure_ascii=False) + "\n")
        except TypeError as exc:
            raise TypeError(f"{path}: record {index} cannot be written as JSON: {exc}") from exc
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, "".join(lines))


def default_data_root() -> Path:
    """``$BP_APPS_DATA`` when set (and not empty), else ``data`` (relative to the current folder): where the data
    sets live when a data module is given no ``data_root``."""
    value = os.environ.get("BP_APPS_DATA")
    return Path(value).expanduser() if value else Path("data")


def resolve_data_root(data_root: str | Path | None) -> Path:
    """``data_root`` (``~`` expanded), or :func:`default_data_root` when it is None."""
    return default_data_root() if data_root is None else Path(data_root).expanduser()


def data_root_hint(data_root: str | Path | None) -> str:
    """For error messages: which data root was used and how to choose another."""
    if data_root is not None:
        return (f"data_root is {str(data_root)!r} (--data.data_root; without it the data root is $BP_APPS_DATA, "
                f"else ./data)")
    value = os.environ.get("BP_APPS_DATA")
    where = f"$BP_APPS_DATA={value!r}" if value else "./data (the default: $BP_APPS_DATA is not set)"
    return f"the data root is {where}; choose another with --data.data_root=PATH or by setting $BP_APPS_DATA"


def data_file(name: str, data_root: str | Path | None) -> Path:
    """``name`` under ``data_root``, or under :func:`default_data_root` when that is None (absolute names as they
    are). A given ``data_root`` behaves as in :func:`data_path`; under the default one, a missing file is a
    FileNotFoundError naming the path it was looked for at and how to choose the data root."""
    if data_root is not None:
        return data_path(name, str(data_root))
    path = Path(name).expanduser()
    if path.is_absolute():
        return path
    path = default_data_root() / path
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (looked for {str(path.absolute())!r}): "
                                f"{data_root_hint(None)}")
    return path
