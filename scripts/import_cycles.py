"""List the import circles inside the `autotransfer` package (issue 17's first acceptance point).

Reads every module's source with `ast` (nothing is imported), builds the graph of imports from one
`autotransfer` module to another, and prints each strongly connected component of more than one
module: a set of modules that import each other, directly or through others. Imports inside
functions count too (they hide a circle from Python's import machinery but not from a reader);
`--module-level` counts only those run at import time. `if TYPE_CHECKING:` imports never count.
Exits 1 when there is a circle; tests/test_import_cycles.py keeps the package free of them.

    python scripts/import_cycles.py [--module-level]
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

PACKAGE = "autotransfer"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(path: Path, module_level: bool) -> set[str]:
    """The package modules `path` imports (`from .x import y` resolves to `.x.y` when that is a module)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(nodes: list[ast.stmt] | list[ast.AST], top: bool) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and _is_type_checking(node):
                visit(node.orelse, top)
                continue
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names if alias.name.split(".")[0] == PACKAGE)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                if base.split(".")[0] == PACKAGE:
                    found.add(base)
                    found.update(f"{base}.{alias.name}" for alias in node.names)
            is_body = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if is_body and module_level:
                continue
            visit(list(ast.iter_child_nodes(node)), top and not is_body)

    visit(ast.parse(path.read_text()).body, True)
    return found - {name}


def graph(module_level: bool) -> dict[str, set[str]]:
    paths = sorted(ROOT.rglob("*.py"))
    modules = {module_name(path) for path in paths}
    return {module_name(path): imports_of(path, module_level) & modules for path in paths}


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted, largest first."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(edges.get(node, ())):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
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

    sys.setrecursionlimit(10_000)
    for node in sorted(edges):
        if node not in index:
            connect(node)
    return sorted(found, key=lambda c: (-len(c), c))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--module-level", action="store_true", help="count only imports run at import time")
    args = parser.parse_args()
    edges = graph(args.module_level)
    found = circles(edges)
    for component in found:
        inner = {m: sorted(edges[m] & set(component)) for m in component}
        print(f"circle of {len(component)}: " + "; ".join(f"{m} -> {', '.join(t)}" for m, t in inner.items()))
    print(f"{len(found)} import circle(s) among {len(edges)} modules"
          + (" (module-level imports only)" if args.module_level else " (imports inside functions included)"))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
