"""The package's shape (issues 15, 23): no import cycle (also through lazy and TYPE_CHECKING imports), no
private name imported from another file, short files, one of each shared mechanism."""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "s3d"
FILES = sorted(ROOT.rglob("*.py"))


@dataclass(frozen=True)
class Import:
    """One import statement of a package file: what it imports, where, and when it runs."""

    source: str  # the importing module
    target: str  # the module named in the statement (``from X import ...`` -> X)
    names: tuple[str, ...]  # the names of ``from X import a, b`` (empty for ``import X``)
    path: Path
    line: int
    kind: str  # "top" (runs on import), "lazy" (inside a function) or "type-checking" (``if TYPE_CHECKING:``)


def module_name(path: Path, root: Path) -> str:
    """``root/a/b.py`` -> ``"{root.name}.a.b"``; a package's ``__init__.py`` is the package itself."""
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def file_imports(path: Path, root: Path) -> list[Import]:
    """Every import statement of ``path``: module level, lazy (function bodies) and ``if TYPE_CHECKING:`` blocks.

    Relative imports are resolved against the file's package.
    """
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: list[Import] = []

    def walk(node: ast.AST, kind: str) -> None:
        for child in ast.iter_child_nodes(node):
            k = kind
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) and kind == "top":
                k = "lazy"
            if isinstance(node, ast.If) and _is_type_checking(node.test) and child in node.body:
                k = "type-checking"
            if isinstance(child, ast.Import):
                out.extend(Import(name, a.name, (), path, child.lineno, k) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                target = child.module or ""
                if child.level:
                    base = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    target = ".".join(base + ([child.module] if child.module else []))
                out.append(Import(name, target, tuple(a.name for a in child.names), path, child.lineno, k))
            walk(child, k)

    walk(ast.parse(path.read_text(encoding="utf-8")), "top")
    return out


def import_graph(root: Path) -> dict[str, dict[str, Import]]:
    """Module -> {package module it imports -> the first statement that does}, for every kind of import.

    ``from X import y`` is an edge to ``X.y`` when that is a module, else to ``X`` (the longest module
    prefix); the implicit import of a package's ``__init__`` before its child is not an edge (a child
    may run while its package is being initialised, which is how packages work).
    """
    files = sorted(root.rglob("*.py"))
    modules = {module_name(p, root) for p in files}
    graph: dict[str, dict[str, Import]] = {module_name(p, root): {} for p in files}
    for p in files:
        for imp in file_imports(p, root):
            wanted = [f"{imp.target}.{n}" for n in imp.names] or [imp.target]
            for t in wanted:
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                if t and t != imp.source:
                    graph[imp.source].setdefault(t, imp)
    return graph


def find_cycle(graph: dict[str, dict[str, Import]]) -> list[Import]:
    """The statements that close one import cycle (any kind of import), or ``[]`` when there is none."""
    state: dict[str, int] = {}

    def visit(n: str, stack: list[Import]) -> list[Import]:
        state[n] = 1
        for d in sorted(graph[n]):
            edge = graph[n][d]
            if state.get(d) == 1:
                path = stack + [edge]
                start = next(i for i, e in enumerate(path) if e.source == d)
                return path[start:]
            if state.get(d) is None and (found := visit(d, stack + [edge])):
                return found
        state[n] = 2
        return []

    for n in sorted(graph):
        if state.get(n) is None and (found := visit(n, [])):
            return found
    return []


def private_imports(root: Path) -> list[Import]:
    """Imports of a private name (``_x``, not a module, not a dunder) from another module of the package."""
    modules = {module_name(p, root) for p in root.rglob("*.py")}
    out = []
    for p in sorted(root.rglob("*.py")):
        for imp in file_imports(p, root):
            if imp.target != root.name and not imp.target.startswith(root.name + "."):
                continue
            private = [n for n in imp.names if n.startswith("_") and not n.startswith("__")
                       and f"{imp.target}.{n}" not in modules]
            if private and imp.target != imp.source:
                out.append(Import(imp.source, imp.target, tuple(private), imp.path, imp.line, imp.kind))
    return out


def _where(imp: Import) -> str:
    return f"{imp.path.relative_to(ROOT.parent)}:{imp.line} ({imp.kind})"


def test_no_import_cycle() -> None:
    """No cycle through any import: module level, lazy (in a function) or under ``if TYPE_CHECKING:``."""
    cycle = find_cycle(import_graph(ROOT))
    steps = " -> ".join(f"{e.source} [{_where(e)}]" for e in cycle)
    assert not cycle, f"import cycle: {steps} -> {cycle[0].source if cycle else ''}"


def test_no_private_name_imported_from_another_file() -> None:
    """A helper shared between files is public in the module that owns it."""
    found = private_imports(ROOT)
    assert not found, "private names imported across files: " + "; ".join(
        f"{_where(i)} imports {', '.join(i.names)} from {i.target}" for i in found)


# ---- the checker itself, on small module trees ----------------------------------------------------
def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "pkg"
    for rel, text in {"__init__.py": "", **files}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text, encoding="utf-8")
    return root


def test_checker_finds_a_lazy_cycle(tmp_path: Path) -> None:
    root = _tree(tmp_path, {"a.py": "from pkg.b import f\n",
                            "b.py": "def f():\n    from pkg.a import g\n    return g\n"})
    cycle = find_cycle(import_graph(root))
    assert sorted((e.source, e.kind) for e in cycle) == [("pkg.a", "top"), ("pkg.b", "lazy")]


def test_checker_finds_a_cycle_through_type_checking_and_relative_imports(tmp_path: Path) -> None:
    root = _tree(tmp_path, {"sub/__init__.py": "", "sub/x.py": "from .y import Y\n",
                            "sub/y.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                        "    from pkg.sub.x import X\nY = 1\n"})
    cycle = find_cycle(import_graph(root))
    assert sorted((e.source, e.target, e.kind) for e in cycle) == [
        ("pkg.sub.x", "pkg.sub.y", "top"), ("pkg.sub.y", "pkg.sub.x", "type-checking")]


def test_checker_passes_a_tree_without_cycles(tmp_path: Path) -> None:
    root = _tree(tmp_path, {"a.py": "import os\nfrom pkg import b\nfrom pkg.b import f\n",
                            "b.py": "def f():\n    from pkg import c\n", "c.py": "X = 1\n"})
    assert find_cycle(import_graph(root)) == []
    assert set(import_graph(root)["pkg.a"]) == {"pkg.b"}


def test_checker_finds_private_names_from_other_files(tmp_path: Path) -> None:
    root = _tree(tmp_path, {"_impl.py": "def helper():\n    pass\n\ndef _secret():\n    pass\n",
                            "a.py": "from pkg._impl import helper\nfrom pkg import _impl\n"
                                    "from pkg.c import __version__\n",
                            "b.py": "def f():\n    from pkg._impl import _secret, helper\n",
                            "c.py": "__version__ = '1'\n_own = 1\nX = _own\n"})
    found = private_imports(root)
    assert [(i.source, i.names, i.kind) for i in found] == [("pkg.b", ("_secret",), "lazy")]


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT.parent)))
def test_no_package_file_over_400_lines(path: Path) -> None:
    n = len(path.read_text(encoding="utf-8").splitlines())
    assert n <= 400, f"{path.relative_to(ROOT.parent)}: {n} lines; split it by concept"


def _definitions(pattern: str) -> list[str]:
    rx = re.compile(pattern, re.M)
    return [str(p.relative_to(ROOT.parent)) for p in FILES if rx.search(p.read_text(encoding="utf-8"))]


def test_one_of_each_shared_mechanism() -> None:
    assert _definitions(r"^class AugmentConfig\b") == ["s3d/augment/config.py"]
    assert _definitions(r"^def resolve_device\b") == ["s3d/runtime/device.py"]
    assert _definitions(r"^def resolve_amp\b") == ["s3d/runtime/device.py"]
    assert _definitions(r"^AMP_MODES = ") == ["s3d/runtime/device.py"]
    assert _definitions(r"^def save_checkpoint\b") == ["s3d/runtime/checkpoint.py"]
    assert _definitions(r"^class MetricsLog\b") == ["s3d/runtime/metrics.py"]
    assert _definitions(r"^def lr_at\b") == ["s3d/runtime/lr.py"]
    assert _definitions(r"\bLambdaLR\b|PolyLRScheduler") == []
    assert _definitions(r"^def mirror\b") == ["s3d/augment/spatial.py"]
    # issue 23: one per-axis parser, one norm/activation factory
    assert _definitions(r"^def to_3tuple\b") == ["s3d/_triple.py"]
    assert _definitions(r"def _triple\b|def _as3\b|type: ignore\[return-value\]") == []
    assert _definitions(r"instancenorm\.InstanceNorm3d|\"torch\.nn\.LeakyReLU\"") == ["s3d/nn/blocks.py"]
    # one sliding-window predictor (fine-tuning's validation included) and one Dice
    assert _definitions(r"^class SlidingWindowInferer\b") == ["s3d/infer/sliding_window.py"]
    assert _definitions(r"^def _tile_starts\b|^def dice\b") == ["s3d/metrics/overlap.py"]
    # the pre-training loop asks a method nothing but its contract (s3d.runtime.method.PretrainMethod)
    assert "s3d/pretrain/loop.py" not in _definitions(r"\b(hasattr|getattr)\(")
