"""The package's structure stays as designed: no import circles, no reads of private state.

Imports are read statically (``ast``) from every module of ``ttaperso`` and
``ttaperso.adapters``, including imports inside functions and under ``TYPE_CHECKING``: a
circle hidden in a function body is still a circle in the design. The implicit import of a
parent package (``import a.b`` runs ``a/__init__``) is not an edge.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOTS = ((REPO / "src" / "ttaperso", "ttaperso"), (REPO / "adapters", "ttaperso.adapters"))


def _modules() -> dict[str, tuple[Path, bool]]:
    """Module name -> (file, is a package)."""
    found: dict[str, tuple[Path, bool]] = {}
    for base, package in ROOTS:
        for file in sorted(base.rglob("*.py")):
            parts = list(file.relative_to(base).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            found[".".join([package, *parts])] = (file, is_package)
    return found


def _import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, (file, is_package) in modules.items():
        for node in ast.walk(ast.parse(file.read_text(), str(file))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                for alias in node.names:
                    full = f"{source}.{alias.name}"
                    targets.append(full if full in modules else source)
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circles() -> None:
    graph = _import_graph()
    assert len(graph) > 50  # the walk really found the package
    assert "ttaperso.strategies.base" in graph["ttaperso.strategies.norm"]
    cycles = _cycles(graph)
    detail = [{m: sorted(graph[m] & set(c)) for m in c} for c in cycles]
    assert not cycles, f"import circles: {detail}"


def test_cycle_finder_finds_a_circle() -> None:
    """The checker itself can fail (the circle issue 14 removed: calibration <-> norm)."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]


PRIVATE_READ = re.compile(
    r"\b(?!self\b)\w+\._(states|strategy|runtime|lock|trail|working|commit)\b"
)


def test_no_private_reads_of_the_personalizer_outside_it() -> None:
    """Code outside the Personalizer uses its public API (``strategy``, ``inspect``, ...)."""
    offenders = []
    for folder in ("src/ttaperso", "adapters", "experiments", "tests"):
        for file in sorted((REPO / folder).rglob("*.py")):
            if "personalizer" in file.parts or file.name == "test_architecture.py":
                continue
            for number, line in enumerate(file.read_text().splitlines(), 1):
                if PRIVATE_READ.search(line) and "# white-box:" not in line:
                    offenders.append(f"{file.relative_to(REPO)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
