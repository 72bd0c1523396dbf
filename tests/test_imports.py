"""nanoseek's modules import only downward: the graph of their imports, at the top of a module or inside a
function alike, has no circle.

A package and its own submodules are one unit here (nanoseek.tasks lists the built-in tasks, which import
its Problem and Reward): importing a submodule runs its package first whatever the edges say."""

import ast
from pathlib import Path

import pytest

import nanoseek

PACKAGE = Path(nanoseek.__file__).parent


def module_of(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, module: str, is_package: bool, modules: set[str]) -> set[str]:
    """The nanoseek modules that `source` (the text of `module`) imports, wherever the import statement is."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package (of a module, or the package itself)
                anchor = module.split(".")[: len(module.split(".")) - node.level + is_package]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{alias.name}" for alias in node.names]  # a submodule, or a name defined in base
        else:
            continue
        for name in names:
            while name and name not in modules:  # nanoseek.train.read_metrics -> nanoseek.train
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def import_graph(sources: dict[str, tuple[str, bool]]) -> dict[str, set[str]]:
    """module -> the modules it imports, from module -> (source, is a package); imports between a package and
    its own submodules (either way) left out."""
    modules = set(sources)
    graph = {}
    for module, (source, is_package) in sources.items():
        graph[module] = {m for m in imported_modules(source, module, is_package, modules)
                         if m != module and not m.startswith(module + ".") and not module.startswith(m + ".")}
    return graph


def find_cycle(graph: dict[str, set[str]], first=None) -> list[str] | None:
    """A list of modules m0 -> m1 -> ... -> m0 that import one another in a circle, or None; the search starts
    from `first` when given."""
    state = {}  # module -> "open" while its imports are being followed, "done" after

    def visit(module, path):
        state[module] = "open"
        for nxt in sorted(graph.get(module, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [module, nxt] if nxt in path else [module, nxt]
            if nxt not in state and (cycle := visit(nxt, path + [module])):
                return cycle
        state[module] = "done"
        return None

    for module in ([first] if first else []) + sorted(graph):
        if module not in state and (cycle := visit(module, [])):
            return cycle
    return None


def nanoseek_sources():
    return {module_of(p): (p.read_text(), p.name == "__init__.py") for p in sorted(PACKAGE.rglob("*.py"))}


def test_no_import_circle_among_nanoseek_modules():
    graph = import_graph(nanoseek_sources())
    assert {"nanoseek.train", "nanoseek.rundir", "nanoseek.rejection", "nanoseek.tasks"} <= set(graph)
    assert "nanoseek.rundir" in graph["nanoseek.train"] and "nanoseek.train" in graph["nanoseek.selftrain"]
    assert "nanoseek.selftrain" in graph["nanoseek.rejection"] and "nanoseek.selftrain" in graph["nanoseek.mtp"]
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


@pytest.mark.parametrize("statement, cycle", [
    ("from nanoseek.rejection import rs",  # at the top
     ["nanoseek.rejection", "nanoseek.selftrain", "nanoseek.train", "nanoseek.rejection"]),
    ("def f():\n    from nanoseek.mtp import mtp",  # in a function
     ["nanoseek.mtp", "nanoseek.selftrain", "nanoseek.train", "nanoseek.mtp"]),
    ("def f():\n    from . import rejection",
     ["nanoseek.rejection", "nanoseek.selftrain", "nanoseek.train", "nanoseek.rejection"]),
])
def test_a_real_circle_is_found(statement, cycle):
    sources = nanoseek_sources()
    source, is_package = sources["nanoseek.train"]
    sources["nanoseek.train"] = (source + "\n" + statement + "\n", is_package)
    found = find_cycle(import_graph(sources), first="nanoseek.train")
    assert found is not None and set(found) == set(cycle) and found[0] == found[-1], found
