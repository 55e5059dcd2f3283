"""The package imports downward only, and no import circle runs through it.

Every ``import`` in ``memgpt/`` counts: at module level, inside functions and under
``TYPE_CHECKING`` alike (a circle that only type checkers see is still a circle for a reader).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "memgpt"

# What may import what: a module may import its own part and the parts of lower rank only.
# The root ``memgpt/__init__`` gathers the library's public names; the applications sit on top
# of it and nothing in the library imports them.
RANKS = {
    "memgpt._version": 0,
    "memgpt.testing": 0,
    "memgpt.memory": 1,
    "memgpt.tasks": 1,
    "memgpt.layers": 2,
    "memgpt.models": 3,
    "memgpt.integrations": 3,
    "memgpt.training": 4,
    "memgpt": 5,
    "memgpt.apps": 6,
    "memgpt.__main__": 7,
}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph(sources: dict[str, tuple[str, bool]]) -> dict[str, set[str]]:
    """``sources``: module name -> (source text, is a package ``__init__``); returns module ->
    the package modules it imports (``from pkg import sub`` counts as importing ``pkg.sub``)."""
    graph: dict[str, set[str]] = {}
    for name, (text, is_package) in sources.items():
        package = name if is_package else name.rpartition(".")[0]
        edges: set[str] = set()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in sources else base for a in node.names]
            else:
                continue
            edges |= {t for t in targets if t == "memgpt" or t.startswith("memgpt.")}
        graph[name] = edges - {name}
    return graph


def part_of(module: str) -> str:
    """The entry of RANKS that ``module`` belongs to (the longest matching prefix)."""
    matches = [p for p in RANKS if module == p or module.startswith(p + ".")]
    if not matches:
        raise AssertionError(f"{module} belongs to no part of the layout: add it to RANKS in {__file__}")
    return max(matches, key=len)


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for module, targets in sorted(graph.items()):
        here = part_of(module)
        for target in sorted(targets):
            there = part_of(target)
            if there != here and RANKS[there] >= RANKS[here]:
                bad.append(f"{module} (rank {RANKS[here]}) imports {target} (rank {RANKS[there]})")
    return bad


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import circle found by a depth-first search (one path per back edge)."""
    found, state, path = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def package_sources() -> dict[str, tuple[str, bool]]:
    return {module_name(p, PACKAGE): (p.read_text(), p.name == "__init__.py") for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_import_points_downward():
    assert upward_imports(import_graph(package_sources())) == []


def test_no_import_circle():
    assert cycles(import_graph(package_sources())) == []


def test_the_library_never_imports_the_applications():
    graph = import_graph(package_sources())
    library = [m for m in graph if part_of(m) not in ("memgpt.apps", "memgpt.__main__")]
    assert [(m, t) for m in library for t in graph[m] if part_of(t) == "memgpt.apps"] == []


def test_the_checks_can_fail():
    """The two checks catch what they are for, on a made-up package."""
    fake = {
        "memgpt": ("from .models import model", True),
        "memgpt.models": ("", True),
        "memgpt.models.model": ("from .state import X\nfrom ..apps import demo", False),
        "memgpt.models.state": ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .model import M", False),
        "memgpt.memory": ("", True),
        "memgpt.memory.read": ("import memgpt", False),
        "memgpt.apps": ("", True),
        "memgpt.apps.demo": ("", False),
    }
    graph = import_graph(fake)
    assert graph["memgpt.models.model"] == {"memgpt.models.state", "memgpt.apps.demo"}
    assert upward_imports(graph) == [
        "memgpt.memory.read (rank 1) imports memgpt (rank 5)",
        "memgpt.models.model (rank 3) imports memgpt.apps.demo (rank 6)",
    ]
    assert cycles(graph) == [["memgpt.models.model", "memgpt.models.state", "memgpt.models.model"]]
    with pytest.raises(AssertionError, match="no part of the layout"):
        part_of("memgpt_other.thing")
