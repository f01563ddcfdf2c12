"""A real-text corpus that needs no download: the docstrings of the installed Python standard library.

The ``.py`` files are parsed with :mod:`ast` (never imported), so the walk has no side effects and gives the
same corpus, in the same order, on every run with the same Python. A slow walk is cached as JSON.
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import os
import platform
import re
import sysconfig
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

from bp_apps.core.io import atomic_write_text, default_cache_dir

__all__ = ["Docstring", "stdlib_docstrings", "summary_pairs"]

log = logging.getLogger(__name__)

# Folders that are not the library proper (tests, demos, bundled wheels, third-party packages).
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo",
                           "__pycache__", "ensurepip", "pydoc_data"})
# A full walk slower than this (seconds) is cached; a faster one is cheaper to redo than to keep on disk.
CACHE_AFTER_S = 3.0
_CACHE_FORMAT = 1


@dataclass(frozen=True)
class Docstring:
    """One docstring and the dotted name of what it documents."""

    name: str  # e.g. "json.decoder.JSONDecoder.decode"
    text: str  # inspect.cleandoc'ed and stripped


def _source_files(root: Path) -> Iterator[Path]:
    """The ``.py`` files under ``root`` in sorted order, skipping :data:`EXCLUDED_DIRS`."""
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in EXCLUDED_DIRS)
        for name in sorted(files):
            if name.endswith(".py"):
                yield Path(folder) / name


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def _definitions(node: ast.AST, prefix: str) -> Iterator[Docstring]:
    """Class and function docstrings under ``node`` in source order, also inside ``if``/``try`` blocks."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            name = f"{prefix}.{child.name}"
            text = (ast.get_docstring(child, clean=True) or "").strip()
            if text:
                yield Docstring(name, text)
            yield from _definitions(child, name)
        else:
            yield from _definitions(child, prefix)


def _file_docstrings(root: Path, path: Path) -> list[Docstring]:
    """The module, class and function docstrings of one file; none if it cannot be read or parsed."""
    try:
        with warnings.catch_warnings():  # old files have invalid escape sequences; they are not our concern
            warnings.simplefilter("ignore")
            tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError, OSError, RecursionError):
        return []
    module = _module_name(root, path)
    text = (ast.get_docstring(tree, clean=True) or "").strip()  # cleandoc keeps a last line of spaces
    head = [Docstring(module, text)] if text else []
    return head + list(_definitions(tree, module))


def _unique(docstrings: Iterable[Docstring]) -> Iterator[Docstring]:
    seen: set[str] = set()
    for doc in docstrings:
        if doc.text not in seen:
            seen.add(doc.text)
            yield doc


def _walk(root: Path) -> Iterator[Docstring]:
    for path in _source_files(root):
        yield from _file_docstrings(root, path)


def _cache_path(cache_dir: Path, root: Path) -> Path:
    digest = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:12]
    return cache_dir / f"stdlib_docstrings-{platform.python_version()}-{digest}.json"


def _read_cache(path: Path) -> list[Docstring] | None:
    """The cached corpus; ``None`` when there is none; :class:`ValueError` when the file is unusable."""
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    data = json.loads(raw)
    items = data.get("docstrings") if isinstance(data, dict) and data.get("format") == _CACHE_FORMAT else None
    if not isinstance(items, list):
        raise ValueError("not a docstring cache of this format")
    docs = []
    for item in items:
        if not (isinstance(item, list) and len(item) == 2 and all(isinstance(s, str) for s in item)):
            raise ValueError(f"bad entry {item!r}")
        docs.append(Docstring(item[0], item[1]))
    return docs


def stdlib_docstrings(limit: int | None = None, cache_dir: str | Path | None = None,
                      root: str | Path | None = None) -> list[Docstring]:
    """The standard library's docstrings (module, class, function), deduplicated, in a fixed order.

    ``root`` defaults to ``sysconfig.get_paths()["stdlib"]`` (tests point it at a small folder). A full
    walk slower than :data:`CACHE_AFTER_S` is cached under ``cache_dir`` (default :func:`default_cache_dir`),
    keyed by Python version and root; a corrupt cache is ignored with a warning and rewritten. ``limit``
    keeps the first N; without a cache it stops the walk early (and caches nothing).
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    root = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    path = _cache_path(Path(cache_dir) if cache_dir is not None else default_cache_dir(), root)
    corrupt = False
    try:
        cached = _read_cache(path)
    except (ValueError, OSError) as err:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        warnings.warn(f"ignoring corrupt docstring cache {path} ({err}); rebuilding it", stacklevel=2)
        cached, corrupt = None, True
    if cached is not None:
        return cached[:limit]
    if limit is not None:
        return list(islice(_unique(_walk(root)), limit))
    start = time.perf_counter()
    from tqdm.auto import tqdm

    docs = list(tqdm(_unique(_walk(root)), desc="standard-library docstrings", unit="doc", disable=None,
                     leave=False))
    elapsed = time.perf_counter() - start
    log.info("walked %s: %d docstrings in %.1f s", root, len(docs), elapsed)
    if elapsed > CACHE_AFTER_S or corrupt:
        data = {"format": _CACHE_FORMAT, "python": platform.python_version(), "root": str(root),
                "docstrings": [[d.name, d.text] for d in docs]}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(data, ensure_ascii=False))
        except OSError as err:  # a read-only home is no reason to fail; the next run walks again
            warnings.warn(f"could not cache docstrings at {path}: {err}", stacklevel=2)
    return docs


_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")
_INNER_SENTENCE_END = re.compile(r"[.!?]\s")


def summary_pairs(docstrings: Sequence[Docstring], min_words: int = 20) -> list[tuple[str, str]]:
    """``(body, summary_line)`` pairs for summarization, from docstrings written as "summary line, blank, body".

    Rule: the first paragraph is one line that starts with an upper-case letter, ends with ``.`` and holds no
    other sentence end (``.``, ``!``, ``?`` followed by a space); the rest, whitespace-normalised, is the body
    and has at least ``min_words`` words.
    """
    pairs = []
    for doc in docstrings:
        first, *rest = _PARAGRAPH_BREAK.split(doc.text.strip(), maxsplit=1)
        first = first.strip()
        if ("\n" in first or not first[:1].isupper() or not first.endswith(".")
                or _INNER_SENTENCE_END.search(first)):
            continue
        body = " ".join(" ".join(rest).split())
        if len(body.split()) >= min_words:
            pairs.append((body, first))
    return pairs
