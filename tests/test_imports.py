"""Imports flow one way (DESIGN.md): cli → commands → train / infer / evaluate → model, data,
tokenizer, run → config, files, errors. Every import of every module under src/sllm counts,
including those inside functions and under TYPE_CHECKING: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
ROOT = "sllm"

# Higher layers may import lower ones and their own; never the reverse. A package entry covers
# its submodules; the root package `sllm` (lazy re-exports of the public API) is its own entry.
LAYERS = {
    "sllm.cli": 5,
    "sllm.__main__": 5,
    "sllm": 4,
    "sllm.finetune": 4,
    "sllm.export": 4,
    "sllm.export_gguf": 4,
    "sllm.commands": 4,
    "sllm.queue": 4,
    "sllm.report": 4,
    "sllm.demo": 4,
    "sllm.info": 4,
    "sllm.train": 3,
    "sllm.infer": 3,
    "sllm.evaluate": 3,
    "sllm.multiple_choice": 3,
    "sllm.model": 2,
    "sllm.data": 2,
    "sllm.tokenizer": 2,
    "sllm.tokenizer_stats": 2,
    "sllm.fast_bpe": 2,
    "sllm.morphemes": 2,
    "sllm.run": 2,
    "sllm.config": 1,
    "sllm.options": 1,
    "sllm.sampling": 1,  # the one declaration of sampling options: the config builds `sample` from it
    "sllm.files": 1,
    "sllm.progress": 1,
    "sllm.text": 1,
    "sllm.atomic": 1,
    "sllm.runtime": 1,
    "sllm.errors": 1,
}
LAYER_NAMES = {
    5: "cli",
    4: "commands",
    3: "train / infer / evaluate",
    2: "model, data, tokenizer, run",
    1: "config, files, errors",
}
CLI_ENTRY_POINTS = {"sllm.__main__"}  # `python -m sllm` is the CLI itself


@dataclass(frozen=True)
class Edge:
    importer: str
    imported: str
    where: str  # path:line of the import statement

    def __str__(self) -> str:
        return f"{self.importer} → {self.imported} ({self.where})"


def module_name(path: Path, src: Path) -> str:
    parts = path.relative_to(src).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def find_modules(src: Path = SRC) -> dict[str, Path]:
    return {module_name(path, src): path for path in sorted((src / ROOT).rglob("*.py"))}


def imports_of(module: str, source: str, is_package: bool, known: set[str], where: str) -> list[Edge]:
    """The sllm modules that `source` (the text of `module`) imports, each resolved to the
    module whose code runs: `from sllm.data import prepare` is sllm.data.prepare, `from
    sllm.model import GPT` is sllm.model. Relative imports are resolved against the package."""
    package = module if is_package else module.rpartition(".")[0]
    edges = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [_nearest_known(alias.name, known) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            targets = [_nearest_known(f"{base}.{alias.name}", known) for alias in node.names]
        else:
            continue
        for target in targets:
            if target is not None and target != module:
                edges.append(Edge(module, target, f"{where}:{node.lineno}"))
    return edges


def _nearest_known(name: str, known: set[str]) -> str | None:
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(src: Path = SRC) -> dict[str, list[Edge]]:
    """Every module's imports of other sllm modules, one Edge per imported module."""
    modules = find_modules(src)
    known = set(modules)
    graph: dict[str, list[Edge]] = {}
    for module, path in modules.items():
        where = str(path.relative_to(src))
        edges = imports_of(module, path.read_text("utf-8"), path.name == "__init__.py", known, where)
        first: dict[str, Edge] = {}
        for edge in edges:
            first.setdefault(edge.imported, edge)
        graph[module] = sorted(first.values(), key=lambda e: e.imported)
    return graph


def layer_of(module: str) -> int | None:
    if module == ROOT:
        return LAYERS.get(ROOT)
    name = module
    while name != ROOT:
        if name in LAYERS:
            return LAYERS[name]
        name = name.rpartition(".")[0]
    return None


def cycles(graph: dict[str, list[Edge]]) -> list[list[Edge]]:
    """One shortest cycle through each group of modules that import each other (Tarjan's
    strongly connected components, then a breadth-first search inside each)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(start: str) -> None:  # iterative, so deep graphs need no recursion limit
        work = [(start, iter(graph[start]))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            edge = next(edges, None)
            if edge is not None:
                target = edge.imported
                if target not in index:
                    index[target] = low[target] = len(index)
                    stack.append(target)
                    on_stack.add(target)
                    work.append((target, iter(graph[target])))
                elif target in on_stack:
                    low[node] = min(low[node], index[target])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(component)

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return [_shortest_cycle(graph, component) for component in components]


def _shortest_cycle(graph: dict[str, list[Edge]], component: set[str]) -> list[Edge]:
    start = min(component)
    came_by: dict[str, Edge] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for edge in graph[node]:
            if edge.imported == start:
                path = [edge]
                while path[0].importer != start:
                    path.insert(0, came_by[path[0].importer])
                return path
            if edge.imported in component and edge.imported not in came_by:
                came_by[edge.imported] = edge
                queue.append(edge.imported)
    raise AssertionError(f"no cycle through {start}")


def shortest_path(
    graph: dict[str, list[Edge]], start: str, reached: Callable[[str], bool]
) -> list[Edge] | None:
    """The shortest chain of imports from `start` to a module for which `reached` is true."""
    came_by: dict[str, Edge] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for edge in graph[node]:
            if edge.imported in came_by or edge.imported == start:
                continue
            came_by[edge.imported] = edge
            if reached(edge.imported):
                path = [edge]
                while path[0].importer != start:
                    path.insert(0, came_by[path[0].importer])
                return path
            queue.append(edge.imported)
    return None


def _chain(path: list[Edge]) -> str:
    return "\n      ".join(str(edge) for edge in path)


def _in(package: str) -> Callable[[str], bool]:
    return lambda module: module == package or module.startswith(package + ".")


def test_the_walker_sees_function_level_relative_and_submodule_imports(tmp_path):
    package = tmp_path / ROOT / "pkg"
    package.mkdir(parents=True)
    (tmp_path / ROOT / "__init__.py").write_text("")
    (tmp_path / ROOT / "low.py").write_text("X = 1\n")
    (package / "__init__.py").write_text("from . import helper\n")
    (package / "helper.py").write_text(
        "def f():\n    from ..low import X\n    import sllm.pkg\n    return X\n"
    )
    (package / "user.py").write_text("from sllm.pkg import helper, f\nfrom sllm.low import X\nimport os\n")
    graph = import_graph(tmp_path)
    assert {m: [e.imported for e in edges] for m, edges in graph.items()} == {
        "sllm": [],
        "sllm.low": [],
        "sllm.pkg": ["sllm.pkg.helper"],
        "sllm.pkg.helper": ["sllm.low", "sllm.pkg"],
        "sllm.pkg.user": ["sllm.low", "sllm.pkg", "sllm.pkg.helper"],
    }
    assert [str(edge) for edge in graph["sllm.pkg.helper"]] == [
        "sllm.pkg.helper → sllm.low (sllm/pkg/helper.py:2)",
        "sllm.pkg.helper → sllm.pkg (sllm/pkg/helper.py:3)",
    ]
    (cycle,) = cycles(graph)
    assert [(e.importer, e.imported) for e in cycle] == [
        ("sllm.pkg", "sllm.pkg.helper"),
        ("sllm.pkg.helper", "sllm.pkg"),
    ]


def test_every_module_has_a_layer():
    missing = [module for module in find_modules() if layer_of(module) is None]
    assert not missing, "modules with no entry in LAYERS (add them to the table): " + ", ".join(missing)


def test_no_module_imports_a_higher_layer():
    graph = import_graph()
    upward = [
        f"{edge}: layer {layer_of(edge.importer)} ({LAYER_NAMES[layer_of(edge.importer)]}) imports "
        f"layer {layer_of(edge.imported)} ({LAYER_NAMES[layer_of(edge.imported)]})"
        for edges in graph.values()
        for edge in edges
        if None not in (layer_of(edge.importer), layer_of(edge.imported))
        and layer_of(edge.importer) < layer_of(edge.imported)
    ]
    assert not upward, f"{len(upward)} upward imports:\n  " + "\n  ".join(upward)


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, f"{len(found)} import cycles:\n  " + "\n  ".join(
        "cycle:\n      " + _chain(cycle) for cycle in found
    )


def test_infer_never_reaches_train():
    graph = import_graph()
    chains = [
        shortest_path(graph, module, _in("sllm.train")) for module in graph if _in("sllm.infer")(module)
    ]
    chains = [chain for chain in chains if chain]
    assert not chains, "sllm.infer depends on sllm.train:\n  " + "\n  ".join(
        "chain:\n      " + _chain(chain) for chain in chains
    )


def test_no_module_imports_the_cli():
    graph = import_graph()
    offenders = [
        str(edge)
        for module, edges in graph.items()
        if module not in CLI_ENTRY_POINTS
        for edge in edges
        if _in("sllm.cli")(edge.imported)
    ]
    assert not offenders, "modules importing sllm.cli:\n  " + "\n  ".join(offenders)
