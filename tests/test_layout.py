"""The package's shape (issue 15): no import cycle, short files, one of each shared mechanism."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "s3d"
FILES = sorted(ROOT.rglob("*.py"))


def _module(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top_level_imports(path: Path) -> set[str]:
    """s3d modules imported when ``path`` is imported (module-level statements, not function bodies)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("s3d")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("s3d") and not node.level:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def test_no_import_cycle() -> None:
    modules = {_module(p): p for p in FILES}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for imp in _top_level_imports(path):
            # "from s3d.x import y" imports s3d.x (and s3d.x.y when y is a module); packages import parents
            while imp and imp not in modules:
                imp = imp.rpartition(".")[0]
            if imp and imp != name:
                deps.add(imp)
        graph[name] = deps
    # (the implicit import of a package's __init__ before its child is not an edge: a child may run while
    # its package is being initialised, which is how packages work)
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(n: str, stack: list[str]) -> bool:
        state[n] = 1
        for d in sorted(graph[n]):
            if state.get(d) == 1:
                cycle.extend(stack[stack.index(d):] + [d] if d in stack else [n, d])
                return True
            if state.get(d) is None and visit(d, stack + [d]):
                return True
        state[n] = 2
        return False

    for n in sorted(graph):
        if state.get(n) is None and visit(n, [n]):
            break
    assert not cycle, f"import cycle: {' -> '.join(cycle)}"


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
