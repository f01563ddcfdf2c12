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
    "bp_apps.deploy": ("bp_apps.engine", "bp_apps.core", *TASKS, "bp_apps.text"),
    "bp_apps.cli": ("bp_apps.engine", "bp_apps.core", *TASKS, "bp_apps.text", "bp_apps.experiments", "bp_apps.deploy"),
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



AUTOGRAD_ATTRIBUTES = {"requires_grad", "requires_grad_", "grad_fn", "enable_grad", "autograd", "func", "grad"}
AUTOGRAD_ALLOWED = {"bridge.py", "gradcheck.py"}  # the autograd bridge and the checks against autograd
ALLOWED_KERNELS = {"threshold_backward"}  # ReLU's grad · 1[y > 0] in one elementwise pass


def _dotted(node: ast.AST) -> str:
    """``torch.nn.grad`` for the attribute chain of a node ('' when it does not start at a name)."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return ".".join([node.id, *reversed(parts)]) if isinstance(node, ast.Name) else ""


def autograd_uses(source: str) -> list[str]:
    """The autograd, torch.func, torch.nn.grad and aten backward-kernel uses in ``source`` (docstrings aside)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Attribute):
            continue
        chain = _dotted(node)
        if (node.attr in ("requires_grad", "requires_grad_", "grad_fn")
                or (node.attr in AUTOGRAD_ATTRIBUTES and chain.startswith("torch."))
                or (chain.startswith("torch.ops.aten.") and node.attr.endswith("_backward")
                    and node.attr not in ALLOWED_KERNELS)):
            found.append(f"{node.lineno}: {chain or node.attr}")
    return found


def test_engine_layers_use_no_autograd() -> None:
    """Every derivative in the engine is written out by hand."""
    for path in sorted((PACKAGE / "engine").glob("*.py")):
        if path.name not in AUTOGRAD_ALLOWED:
            assert not autograd_uses(path.read_text()), path.name


def test_the_autograd_scan_catches_each_kind_of_use() -> None:
    source = ("import torch\nx = torch.ones(2).requires_grad_(True)\ntorch.autograd.grad(x, x)\n"
              "torch.nn.grad.conv2d_weight\ntorch.ops.aten.convolution_backward\ntorch.enable_grad()\n"
              "torch.ops.aten.threshold_backward\n'torch.autograd in a string'\n")
    assert {use.split(":")[0] for use in autograd_uses(source)} == {"2", "3", "4", "5", "6"}
