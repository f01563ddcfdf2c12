"""The standard-library docstring corpus: what the walk collects, its order, its cache, and summary pairs."""

import inspect
import json
import shutil
import sysconfig
import textwrap
import warnings
from pathlib import Path

import pytest

import bp_apps.text.corpus as corpus
from bp_apps.core.io import default_cache_dir
from bp_apps.text.corpus import Docstring, stdlib_docstrings, summary_pairs

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def _write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")


@pytest.fixture
def tiny_stdlib(tmp_path: Path) -> Path:
    """A few modules standing in for the standard library, with the folders the walk must skip."""
    root = tmp_path / "lib"
    _write(root, "alpha.py", '''
        """Alpha module."""

        class Thing:
            """A thing."""

            def method(self):
                """Do it.
                """

            def same(self):
                """Same text."""

        if True:
            def conditional():
                """Defined under an if."""

        def same():
            """Same text."""

        def undocumented():
            pass
    ''')
    _write(root, "pkg/__init__.py", '"""The package."""')
    _write(root, "pkg/beta.py", 'async def run():\n    """Run it."""')
    _write(root, "broken.py", 'def f(:\n    """Never seen."""')
    (root / "latin.py").write_bytes(b'"""caf\xe9"""\n')  # not UTF-8 and no coding cookie: skipped
    for skipped in ("tests", "test", "site-packages", "idlelib", "__pycache__", "pkg/tests"):
        _write(root, f"{skipped}/mod.py", '"""Must not appear."""')
    return root


def test_walk_collects_module_class_and_function_docstrings_in_order(tiny_stdlib, tmp_path):
    docs = stdlib_docstrings(cache_dir=tmp_path / "cache", root=tiny_stdlib)
    assert [(d.name, d.text) for d in docs] == [
        ("alpha", "Alpha module."),
        ("alpha.Thing", "A thing."),
        ("alpha.Thing.method", "Do it."),  # cleandoc leaves the trailing spaces; they go
        ("alpha.Thing.same", "Same text."),  # the later identical "same" is deduplicated
        ("alpha.conditional", "Defined under an if."),
        ("pkg", "The package."),
        ("pkg.beta.run", "Run it."),
    ]
    assert not (tmp_path / "cache").exists()  # a fast walk is not cached


def test_limit_takes_the_first_docstrings(tiny_stdlib, tmp_path):
    full = stdlib_docstrings(cache_dir=tmp_path, root=tiny_stdlib)
    assert stdlib_docstrings(limit=3, cache_dir=tmp_path, root=tiny_stdlib) == full[:3]
    assert stdlib_docstrings(limit=0, cache_dir=tmp_path, root=tiny_stdlib) == []
    with pytest.raises(ValueError, match="limit"):
        stdlib_docstrings(limit=-1, cache_dir=tmp_path, root=tiny_stdlib)


def test_real_stdlib_is_deterministic_and_skips_tests(tmp_path):
    first = stdlib_docstrings(limit=400, cache_dir=tmp_path)
    assert first == stdlib_docstrings(limit=400, cache_dir=tmp_path)
    assert len(first) == 400 and len({d.text for d in first}) == 400
    assert all(d.text.strip() == d.text and d.text for d in first)
    assert not any(part in {"test", "tests", "idlelib"} for d in first for part in d.name.split("."))


def test_real_json_docstrings_match_the_imported_modules(tmp_path):
    import json.decoder

    shutil.copytree(STDLIB / "json", tmp_path / "lib" / "json")
    docs = {d.name: d.text for d in stdlib_docstrings(cache_dir=tmp_path, root=tmp_path / "lib")}
    assert docs["json.dumps"] == inspect.getdoc(json.dumps)
    assert docs["json.decoder.JSONDecoder.decode"] == inspect.getdoc(json.decoder.JSONDecoder.decode)
    assert docs["json"].startswith("JSON (JavaScript Object Notation)")


def test_slow_walk_is_cached_and_read_back(tiny_stdlib, tmp_path, monkeypatch):
    monkeypatch.setattr(corpus, "CACHE_AFTER_S", 0.0)  # every walk counts as slow
    cache = tmp_path / "cache"
    docs = stdlib_docstrings(cache_dir=cache, root=tiny_stdlib)
    (path,) = cache.glob("stdlib_docstrings-*.json")
    assert path.name.startswith(f"stdlib_docstrings-{corpus.platform.python_version()}-")
    assert json.loads(path.read_text())["docstrings"][0] == ["alpha", "Alpha module."]
    shutil.rmtree(tiny_stdlib)  # from now on only the cache can answer
    assert stdlib_docstrings(cache_dir=cache, root=tiny_stdlib) == docs
    assert stdlib_docstrings(limit=2, cache_dir=cache, root=tiny_stdlib) == docs[:2]


def test_cache_is_keyed_by_root(tiny_stdlib, tmp_path, monkeypatch):
    monkeypatch.setattr(corpus, "CACHE_AFTER_S", 0.0)
    other = tmp_path / "other"
    _write(other, "gamma.py", '"""Gamma."""')
    stdlib_docstrings(cache_dir=tmp_path / "cache", root=tiny_stdlib)
    assert stdlib_docstrings(cache_dir=tmp_path / "cache", root=other) == [Docstring("gamma", "Gamma.")]
    assert len(list((tmp_path / "cache").glob("*.json"))) == 2


@pytest.mark.parametrize("garbage", ["{not json", '{"format": 1}', '{"format": 1, "docstrings": [["a"]]}', "[]",
                                     '{"format": 999, "docstrings": []}'])
def test_corrupt_cache_is_ignored_and_rebuilt(tiny_stdlib, tmp_path, monkeypatch, garbage):
    monkeypatch.setattr(corpus, "CACHE_AFTER_S", 0.0)
    cache = tmp_path / "cache"
    expected = stdlib_docstrings(cache_dir=cache, root=tiny_stdlib)
    (path,) = cache.glob("*.json")
    path.write_text(garbage)
    monkeypatch.setattr(corpus, "CACHE_AFTER_S", 1e9)  # rewritten because it was corrupt, not because it was slow
    with pytest.warns(UserWarning, match="corrupt docstring cache"):
        assert stdlib_docstrings(cache_dir=cache, root=tiny_stdlib) == expected
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert stdlib_docstrings(cache_dir=cache, root=tiny_stdlib) == expected  # the rewritten cache is valid
    assert json.loads(path.read_text())["format"] == 1


def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("BP_APPS_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("BP_APPS_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "bp_apps"


BODY = " ".join(f"word{i}" for i in range(20))


@pytest.mark.parametrize(("text", "expected"), [
    (f"Return the thing.\n\n{BODY[:60]}\n{BODY[60:]}", (BODY, "Return the thing.")),  # body whitespace normalised
    (f"Return the thing.\n\nFirst part.\n\n{BODY}", (f"First part. {BODY}", "Return the thing.")),
    (f"Return the thing.\nSecond line.\n\n{BODY}", None),  # summary is two lines
    (f"Return the thing. And more.\n\n{BODY}", None),  # two sentences
    (f"return the thing.\n\n{BODY}", None),  # not a sentence start
    (f"Return the thing\n\n{BODY}", None),  # no final period
    ("Return the thing.\n\n" + " ".join(BODY.split()[:19]), None),  # body of 19 words
    ("Return the thing.", None),
])
def test_summary_pairs_rule(text, expected):
    pairs = summary_pairs([Docstring("m.f", text)])
    assert pairs == ([expected] if expected else [])


def test_summary_pairs_on_the_real_corpus(tmp_path):
    shutil.copytree(STDLIB / "json", tmp_path / "lib" / "json")
    pairs = summary_pairs(stdlib_docstrings(cache_dir=tmp_path, root=tmp_path / "lib"))
    by_summary = {summary: body for body, summary in pairs}
    body = by_summary["Serialize ``obj`` to a JSON formatted ``str``."]  # json.dumps
    assert body.startswith("If ``skipkeys`` is true then ``dict`` keys that are not basic types (``str``,")
    assert "Return the Python representation of ``s`` (a ``str`` instance" not in by_summary  # a two-line summary
    assert all("\n" not in summary and len(body.split()) >= 20 for body, summary in pairs)
