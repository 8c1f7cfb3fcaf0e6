"""The library's layers: imports only go down, and no module imports itself in a circle.

Every import counts, at module level, inside functions and under ``TYPE_CHECKING`` alike, and
``import a.b.c`` counts as importing ``a`` and ``a.b`` too (Python runs their ``__init__``
first). The order of the layers is the one ``cxr_pipeline/__init__.py`` gives.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("cxr_pipeline", "workers", "listeners", "training", "viewer")

# Lowest first. A module may import its own group and any group of a lower rank.
LIBRARY_RANKS: dict[str, int] = {
    "core": 0,  # cxr_pipeline/__init__, errors, settings, results, logs
    "dicom": 1,
    "model": 2,
    "explain": 3,
    "encode": 3,
    "pipeline": 4,
    "service": 5,
    "batch": 6,
    "__main__": 7,
}
CORE = {"cxr_pipeline", "errors", "settings", "results", "logs"}
# The project's top-level packages: the library at the bottom, then the Celery workers (which
# use only the library), the listener (which queues to the workers); training and the viewer
# tools use the library only.
PROJECT_RANKS: dict[str, int] = {
    "cxr_pipeline": 0,
    "workers": 1,
    "listeners": 2,
    "training": 1,
    "viewer": 1,
}
TOP_LEVEL_LIMIT = 10


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            found[_module_name(path)] = path
    return found


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The project module ``name`` names, or its nearest project ancestor; None if outside."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in MODULES:
            return candidate
        parts.pop()
    return None


def _with_parents(name: str) -> Iterator[str]:
    parts = name.split(".")
    for end in range(1, len(parts) + 1):
        candidate = ".".join(parts[:end])
        if candidate in MODULES:
            yield candidate


def _imports(module: str) -> set[str]:
    """Project modules ``module`` imports anywhere in its source (parents included)."""
    path = MODULES[module]
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join([*package, *([base] if base else [])])
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        for target in targets:
            resolved = _resolve(target)
            if resolved is not None:
                found.update(_with_parents(resolved))
    found.discard(module)
    return found


GRAPH = {module: _imports(module) for module in MODULES}


def _library_group(module: str) -> str:
    parts = module.split(".")
    if parts[0] != "cxr_pipeline":
        raise ValueError(module)
    name = parts[1] if len(parts) > 1 else "cxr_pipeline"
    return "core" if name in CORE else name


def test_every_library_module_has_a_layer() -> None:
    groups = {_library_group(m) for m in MODULES if m.startswith("cxr_pipeline")}
    assert groups <= set(LIBRARY_RANKS), groups - set(LIBRARY_RANKS)


def test_library_imports_only_go_down() -> None:
    upward = []
    for module, targets in GRAPH.items():
        if not module.startswith("cxr_pipeline"):
            continue
        source = _library_group(module)
        for target in targets:
            if not target.startswith("cxr_pipeline"):
                upward.append(f"{module} -> {target} (outside the library)")
                continue
            dest = _library_group(target)
            if dest != source and LIBRARY_RANKS[dest] >= LIBRARY_RANKS[source]:
                upward.append(f"{module} ({source}) -> {target} ({dest})")
    assert not upward, "\n".join(sorted(upward))


def test_project_packages_import_only_down() -> None:
    upward = []
    for module, targets in GRAPH.items():
        source = module.split(".")[0]
        for target in targets:
            dest = target.split(".")[0]
            if dest != source and PROJECT_RANKS[dest] >= PROJECT_RANKS[source]:
                upward.append(f"{module} -> {target}")
    assert not upward, "\n".join(sorted(upward))


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_circle_in_the_project() -> None:
    assert _cycles(GRAPH) == []


def test_cycle_finder_finds_a_circle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("package", ["cxr_pipeline"])
def test_few_modules_at_the_top(package: str) -> None:
    top = sorted(p.name for p in (ROOT / package).glob("*.py"))
    assert len(top) <= TOP_LEVEL_LIMIT, top


def test_every_subpackage_says_what_it_is_for() -> None:
    for init in sorted((ROOT / "cxr_pipeline").rglob("__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and "import" in doc, f"{init} has no docstring saying what it may import"
