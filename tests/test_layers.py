"""The core's shape: packages in layers, imports only downward, no import cycle (in wuerstchen/ and tools/).

The import graph is read from the source (every ``import``, also the ones inside functions), so a
lazy import that runs upward or closes a loop fails here even if no test happens to execute it.
"""

import ast
from pathlib import Path

import wuerstchen

REPO = Path(__file__).resolve().parent.parent


def _modules(root: Path, package: str) -> dict:
    """Module name -> file, for every .py file under root (a package named `package`)."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def package_of(name: str) -> str:
    """The root package: importing it runs only its own __init__ (facts, no imports)."""
    return name.split(".")[0]


def _imports(name: str, path: Path, known: dict) -> set:
    """The modules of `known` that module `name` imports (a package counts as its __init__)."""
    is_package = path.name == "__init__.py"
    here = name if is_package else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            bases = [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")
                base = base[: len(base) - (node.level - 1)]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            bases = [(base, [alias.name for alias in node.names])]
        else:
            continue
        for base, names in bases:
            for candidate in [base] + [f"{base}.{n}" for n in names]:
                if candidate in known and candidate not in (name, package_of(name)):
                    targets.add(candidate)
    return targets


def _graph(root: Path, package: str) -> dict:
    known = _modules(root, package)
    return {name: _imports(name, path, known) for name, path in known.items()}


def _cycles(graph: dict) -> list:
    """Every strongly connected group of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return groups


def _layer(module: str) -> tuple:
    """(layer number, package) of a core module; the top-level modules sit above every layer."""
    parts = module.split(".")
    package = parts[1] if len(parts) > 1 else ""
    for number, packages in enumerate(wuerstchen.LAYERS):
        if package in packages:
            return number, package
    return len(wuerstchen.LAYERS), package


def test_every_core_module_is_in_a_layer():
    graph = _graph(REPO / "wuerstchen", "wuerstchen")
    outside = sorted(m for m in graph if m.count(".") >= 1 and _layer(m)[0] == len(wuerstchen.LAYERS)
                     and m not in ("wuerstchen.__main__",))
    assert not outside, f"modules in no layer of wuerstchen.LAYERS: {outside}"


def test_core_has_no_import_cycle():
    cycles = _cycles(_graph(REPO / "wuerstchen", "wuerstchen"))
    assert not cycles, "import cycles in wuerstchen/: " + "; ".join(" -> ".join(c) for c in cycles)


def test_core_imports_only_run_downward():
    wrong = []
    for module, targets in _graph(REPO / "wuerstchen", "wuerstchen").items():
        mine, my_package = _layer(module)
        for target in targets:
            theirs, their_package = _layer(target)
            if theirs > mine or (theirs == mine and their_package != my_package):
                wrong.append(f"{module} -> {target}")
    assert not wrong, "imports that run up (or sideways) a layer: " + ", ".join(sorted(wrong))


def test_tools_have_no_import_cycle():
    cycles = _cycles(_graph(REPO / "tools", "tools"))
    assert not cycles, "import cycles in tools/: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_checks_see_a_cycle_and_an_upward_import():
    """The graph reader itself: a lazy import inside a function is an edge, a loop is found."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    known = _modules(REPO / "wuerstchen", "wuerstchen")
    assert "wuerstchen.pipeline.stages" in _imports("wuerstchen.pipeline.cascade",
                                                   known["wuerstchen.pipeline.cascade"], known)
    assert _layer("wuerstchen.cli.generate")[0] > _layer("wuerstchen.storage.weights_io")[0]


def test_nodes_have_no_import_cycle():
    cycles = _cycles(_graph(REPO / "nodes", "nodes"))
    assert not cycles, "import cycles in nodes/: " + "; ".join(" -> ".join(c) for c in cycles)
