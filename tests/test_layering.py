"""The import graph reads one way, bottom to top: engine <- core <- tasks <- experiments <- cli.

Each module's imports are read with ``ast`` (nothing is imported), so a wrong-way import fails here however deep
inside a function it hides."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "bp_apps"
TASKS = ("bp_apps.vision", "bp_apps.speech", "bp_apps.text.labeling", "bp_apps.text.summarization")
# What each layer may import from bp_apps (besides itself). The text commons (bp_apps.text's own modules: the
# docstring corpus, tokenizer training) serve the two text tasks and import only the floors below them.
ALLOWED = {
    "bp_apps": (),  # the package root: its __init__ imports nothing of the suite
    "bp_apps.engine": (),
    "bp_apps.core": ("bp_apps.engine",),
    "bp_apps.text": ("bp_apps.engine", "bp_apps.core"),
    **{task: ("bp_apps.engine", "bp_apps.core", *(("bp_apps.text",) if task.startswith("bp_apps.text.") else ()))
       for task in TASKS},
    "bp_apps.experiments": ("bp_apps.engine", "bp_apps.core", *TASKS, "bp_apps.text"),
    "bp_apps.cli": ("bp_apps.engine", "bp_apps.core", *TASKS, "bp_apps.text", "bp_apps.experiments"),
}


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str:
    """The most specific layer a module belongs to (a task before bp_apps.text)."""
    matches = [layer for layer in ALLOWED if module == layer or module.startswith(layer + ".")]
    layer = max(matches, key=len)
    if layer == "bp_apps" and module != "bp_apps":
        raise AssertionError(f"{module} belongs to no layer: add its package to ALLOWED in {__file__}")
    return layer


def bp_apps_imports(path: Path, root: Path = PACKAGE) -> list[tuple[int, str]]:
    """``(line, module)`` for every import of a bp_apps module in the file (relative imports resolved)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    name = module_name(path, root)
    package = name.rsplit(".", 1)[0] if path.name != "__init__.py" else name
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                base = ".".join(anchor[: len(anchor) - node.level + 1] + ([base] if base else []))
            found.append((node.lineno, base))
    return [(line, name) for line, name in found if name == "bp_apps" or name.startswith("bp_apps.")]


def wrong_way_imports(root: Path) -> list[str]:
    problems = []
    for path in sorted(root.rglob("*.py")):
        importer = module_name(path, root)
        layer = layer_of(importer)
        for line, imported in bp_apps_imports(path, root):
            target = layer_of(imported)
            if target == layer or target in ALLOWED[layer]:
                continue
            problems.append(f"{path.relative_to(root.parent)}:{line}: {importer} ({layer}) imports {imported} "
                            f"({target})")
    return problems


def test_every_module_imports_only_downwards() -> None:
    assert wrong_way_imports(PACKAGE) == []


def test_nothing_imports_the_cli() -> None:
    importers = [module_name(p) for p in PACKAGE.rglob("*.py")
                 if any(name == "bp_apps.cli" for _, name in bp_apps_imports(p)) and p.name != "cli.py"]
    assert importers == []


@pytest.mark.parametrize(("importer", "statement"), [
    ("engine/models.py", "from bp_apps.core.io import atomic_write_text"),
    ("core/io.py", "from bp_apps.vision.data import load_image"),
    ("speech/data.py", "from bp_apps.text.corpus import stdlib_docstrings"),
    ("text/summarization/data.py", "from bp_apps.text.labeling.data import LabelingVocab"),
    ("text/corpus.py", "from bp_apps.text.labeling import records"),
    ("vision/task.py", "import bp_apps.experiments.compare"),
    ("text/labeling/task.py", "from ..summarization import rouge"),
])
def test_a_wrong_way_import_is_caught(tmp_path: Path, importer: str, statement: str) -> None:
    """A copy of the package with one wrong-way import added fails the check, naming the file and both layers."""
    import shutil

    copy = tmp_path / "bp_apps"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    target = copy / importer
    target.write_text(target.read_text(encoding="utf-8") + f"\n\ndef _late():\n    {statement}\n", encoding="utf-8")
    problems = wrong_way_imports(copy)
    assert len(problems) == 1 and problems[0].startswith(f"bp_apps/{importer}:"), problems
