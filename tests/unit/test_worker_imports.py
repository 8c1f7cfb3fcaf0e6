"""Imports of `workers/`: no circle between its modules; the listener side loads no torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

WORKERS = Path(__file__).resolve().parents[2] / "workers"


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path) -> set[str]:
    """Worker modules ``path`` imports anywhere (functions too), except type-only imports."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module.startswith("workers."):
                found.add(node.module.split(".")[1])
            elif node.module == "workers":
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("workers."):
                    found.add(alias.name.split(".")[1])
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return found - {path.stem}


def test_no_import_circle_in_workers() -> None:
    graph = {p.stem: _imports(p) for p in WORKERS.glob("*.py") if p.stem != "__init__"}
    assert {"broker", "publisher", "tasks", "queue", "lease", "celery_app"} <= graph.keys()
    done: set[str] = set()

    def walk(module: str, path: list[str]) -> None:
        if module in path:
            raise AssertionError("import circle: " + " -> ".join([*path, module]))
        if module in done:
            return
        for imported in sorted(graph.get(module, set())):
            walk(imported, [*path, module])
        done.add(module)

    for module in sorted(graph):
        walk(module, [])


def test_listener_side_of_celery_loads_no_model_code() -> None:
    code = (
        "import sys, workers.publisher, workers.factory, listeners.storescp; "
        "print(sorted(m for m in ('torch', 'torchvision', 'monai', 'workers.tasks') "
        "if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
