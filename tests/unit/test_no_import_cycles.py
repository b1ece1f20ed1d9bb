"""No import cycle among the modules of daemon/, counting every import: those under
``if TYPE_CHECKING:`` and inside functions too (a cycle that only the type checker sees is still
two modules that each need the other to be read).

The layer contract (tests/unit/test_layers.py) cannot say this: its I/O and pure layers are
lists of siblings that may import each other, in any direction. Read from the files with
:mod:`ast` (nothing is imported), so a cycle is named with the imports that close it.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "daemon"


def imported(source: str, modules: set[str]) -> set[str]:
    """The modules of ``modules`` (names within daemon) that ``source``, a module of daemon/,
    imports: ``from . import x``, ``from .x import y``, ``import daemon.x``,
    ``from daemon.x import y``, wherever the statement is."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[1] for alias in node.names
                         if alias.name.startswith("daemon."))
        elif isinstance(node, ast.ImportFrom):
            parts = (node.module or "").split(".")
            if node.level == 0 and parts[0] == "daemon":
                parts = parts[1:]
            elif node.level != 1:
                continue  # another package's module (level 0), or above daemon (level > 1)
            if parts and parts[0]:
                found.add(parts[0])
            else:  # from . import x, y: modules, or names of daemon/__init__.py
                found.update(alias.name for alias in node.names)
    return found & modules


def import_graph(package: Path) -> dict[str, set[str]]:
    """Each module of ``package`` (by its name within it) and the modules it imports."""
    modules = {p.stem for p in package.glob("*.py") if p.name != "__init__.py"}
    return {m: imported((package / f"{m}.py").read_text(), modules) - {m} for m in modules}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (each a set of modules that
    all reach each other through imports), sorted; Tarjan's algorithm, iteratively."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
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
    return sorted(found)


def describe(graph: dict[str, set[str]], component: list[str]) -> str:
    edges = [f"{a} -> {b}" for a in component for b in sorted(graph[a]) if b in component]
    return (f"import cycle among daemon.{', daemon.'.join(component)}: {'; '.join(edges)} "
            "(TYPE_CHECKING imports count; type against a Protocol or a type parameter "
            "instead of importing back)")


def test_daemon_has_no_import_cycle() -> None:
    graph = import_graph(PACKAGE)
    assert len(graph) > 10 and any(graph.values()), f"no modules read from {PACKAGE}"
    assert not cycles(graph), "\n".join(describe(graph, c) for c in cycles(graph))


def test_a_cycle_under_type_checking_is_found(tmp_path: Path) -> None:
    """The check above can fail: a cycle closed only under ``if TYPE_CHECKING:``, through a
    third module, is found and named; an import of another package is not an edge."""
    (tmp_path / "base.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .conn import Conn\n")
    (tmp_path / "mid.py").write_text("from . import base\nimport asyncio\n")
    (tmp_path / "conn.py").write_text("from daemon.mid import x\nfrom asyncio import base\n")
    (tmp_path / "leaf.py").write_text("from .base import y\n")
    graph = import_graph(tmp_path)
    assert graph == {"base": {"conn"}, "mid": {"base"}, "conn": {"mid"}, "leaf": {"base"}}
    assert cycles(graph) == [["base", "conn", "mid"]]
    assert describe(graph, ["base", "conn", "mid"]).startswith(
        "import cycle among daemon.base, daemon.conn, daemon.mid: base -> conn; conn -> mid; "
        "mid -> base")
