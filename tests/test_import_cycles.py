"""scripts/import_cycles.py, the check behind issue 17's "no import circle": it must find real circles."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "import_cycles.py"
spec = importlib.util.spec_from_file_location("import_cycles", SCRIPT)
import_cycles = importlib.util.module_from_spec(spec)
spec.loader.exec_module(import_cycles)


def test_circles_are_the_strongly_connected_components_of_more_than_one_module():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a", "e"}, "e": {"d"}, "f": set(), "g": {"g"}}
    assert import_cycles.circles(edges) == [["a", "b", "c"], ["d", "e"]]
    assert import_cycles.circles({"a": {"b"}, "b": set()}) == []


def test_imports_are_read_relative_absolute_inside_functions_and_not_under_type_checking():
    edges = import_cycles.graph(module_level=False)
    assert "autotransfer.portfolio" in edges["autotransfer.search"]  # from .portfolio import ...
    assert "autotransfer.bench.methods" in edges and "autotransfer.search" in edges["autotransfer.bench.methods"]
    assert "autotransfer.events" not in edges["autotransfer.hookspecs"]  # only under TYPE_CHECKING
    inside = edges["autotransfer.probe"]  # sklearn and threadpoolctl only: no package import
    assert inside == set()
    top = import_cycles.graph(module_level=True)
    assert top["autotransfer.search"] <= edges["autotransfer.search"]
    methods = "autotransfer.bench.methods"  # imports backbones only inside linear_probe()
    assert "autotransfer.backbones" in edges[methods] and "autotransfer.backbones" not in top[methods]


def test_the_package_has_no_import_circle():
    edges = import_cycles.graph(module_level=False)
    assert import_cycles.circles(edges) == [], "run scripts/import_cycles.py to see the circle"


def parameter_counts(root: Path) -> dict[str, int]:
    """Every function's parameter count (self and cls left out; *args and **kwargs count one each)."""
    import ast

    counts = {}
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args
                names = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]
                names += [a.arg for a in (args.vararg, args.kwarg) if a is not None]
                counts[f"{path.relative_to(root.parent)}:{node.lineno} {node.name}"] = len(
                    [n for n in names if n not in ("self", "cls")])
    return counts


def test_no_function_in_the_package_takes_more_than_eight_parameters():
    """Issue 17: a long keyword block is a settings object waiting to be named (trainer.FitSettings)."""
    counts = parameter_counts(import_cycles.ROOT)
    assert len(counts) > 300 and max(counts.values()) >= 6  # it read the package
    assert {name: n for name, n in counts.items() if n > 8} == {}


def test_the_readme_layout_names_every_module_and_package():
    """Issue 17: the README's layout paragraph matches the tree (a new module must be placed there)."""
    import re

    readme = (import_cycles.ROOT.parent / "README.md").read_text()
    layout = readme[readme.index("Layout: `autotransfer/`"):]
    layout = layout[:layout.index("`scripts/`.")]
    named = set(re.findall(r"`([a-z_]+/?)", layout))
    package = import_cycles.ROOT
    missing = []
    for path in sorted(package.rglob("*.py")):
        if path.name == "__init__.py" or "__pycache__" in path.parts:
            continue
        inner = path.relative_to(package)
        if len(inner.parts) > 1 and f"{inner.parts[0]}/" not in named:
            missing.append(f"{inner.parts[0]}/")
        elif len(inner.parts) > 1 and inner.parts[0] != "bench" and path.stem not in named:
            missing.append(str(inner))
        elif len(inner.parts) == 1 and path.stem not in named and path.stem != "__main__":
            missing.append(path.stem)
    assert not missing, f"README.md's layout paragraph does not name: {sorted(set(missing))}"
