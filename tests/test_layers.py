"""The import structure of loam/: no cycles, lower layers never import higher ones, and
function-level imports only where they defer a heavy optional dependency.

Every module under loam/ is parsed with `ast` (nothing is imported), and every import statement is
read wherever it stands: at module level, under `if`/`try`, inside functions and methods, and under
`if TYPE_CHECKING:` too (a type a lower layer needs from a higher one is still an inversion).
`import a.b.c` is an edge to `a.b.c`; `from a.b import c` is an edge to the module `a.b.c` when
that is a module, else to `a.b`; relative imports are resolved against the importing package.
A package's `__init__` counts only where it is named: it runs whenever a submodule is imported,
but an edge to it from every submodule would make each re-exporting package look like a cycle.

The rules, and why:

1. No cycle among loam modules, counting function-level imports. A function-level import does
   not make a cycle go away, it only moves the failure from import time to call time.
2. `LAYERS` below is the design's dependency order ("model, data -> step, run -> train, eval ->
   mixing, scaling, selection, experiments"): a module may import its own layer or a lower one,
   never a higher one. Every loam module must be placed by the table, so a new top-level module
   is a decision, not an accident.
3. A function-level import is allowed only when it defers a heavy optional dependency: a
   third-party package in `HEAVY` (gigabytes of install, or seconds of import, needed by one
   command path), or a loam module that itself imports one of those at module level (e.g. the
   seqio tasks module). Anything else goes to the top of the file, where the layers and cycles
   are visible. `__main__` blocks are module level and need no exception.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

LOAM = Path(__file__).resolve().parents[1] / "loam"

# Lowest layer first; a module belongs to the entry with the longest matching prefix.
LAYERS: list[tuple[str, list[str]]] = [
    # Leaf utilities every layer may use; they import no other loam layer.
    ("base", ["loam", "loam.perf", "loam.plots", "loam.plot", "loam.metrics", "loam.checkpoint",
              "loam.cli", "loam.workdir"]),
    ("model, data", ["loam.model", "loam.data"]),
    # get_config(arg) files: may size models and read corpora; research code starts from them.
    ("configs", ["loam.configs"]),
    ("step, run", ["loam.step", "loam.run", "loam.hooks", "loam.wandb_logging"]),
    # K models in one compiled step: proxy swarms, and the probes of online mixing rounds.
    ("swarm", ["loam.mixing.swarm"]),
    # Weight sources the trainer builds by name (config.mixing.method) and its output hook.
    ("online mixing", ["loam.mixing.online"]),
    ("train, eval", ["loam.train", "loam.eval", "loam.evals", "loam.average", "loam.generate",
                     "loam.export"]),
    ("mixing, scaling, selection, experiments",
     ["loam.mixing", "loam.scaling", "loam.selection", "loam.experiments", "loam.sweep",
      "loam.mixsearch"]),
    # Benchmarks measure anything.
    ("benchmarks", ["loam.bench"]),
]

# Third-party packages a function may import lazily (top-level package names).
HEAVY = {"tensorflow", "tensorflow_datasets", "tensorflow_text", "seqio", "matplotlib",
         "lightgbm", "pyarrow", "apache_beam", "transformers", "datasets", "torch",
         "safetensors",
         # optional extras ([lmeval], [wandb]) and a benchmark's reference tool (own venv)
         "lm_eval", "wandb", "data_selection"}


@dataclass(frozen=True)
class Import:
    importer: str  # loam module doing the import
    target: str  # loam module, or the top-level name of a third-party package
    line: int
    function_level: bool


def _module_name(path: Path) -> str:
    parts = path.relative_to(LOAM.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES: dict[str, Path] = {_module_name(p): p for p in sorted(LOAM.rglob("*.py"))}


def _resolve(name: str) -> str | None:
    """The loam module `name` refers to: itself, or its longest existing parent."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


class _Visitor(ast.NodeVisitor):
    def __init__(self, module: str, is_package: bool):
        self.module, self.is_package = module, is_package
        self.depth = 0  # > 0 inside a function body
        self.found: list[Import] = []

    def _function(self, node):
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def _add(self, target: str, node: ast.stmt):
        if target == "loam" or target.startswith("loam."):
            resolved = _resolve(target)
            if resolved is None or resolved == self.module:
                return
            target = resolved
        else:
            target = target.split(".")[0]
        self.found.append(Import(self.module, target, node.lineno, self.depth > 0))

    def visit_Import(self, node: ast.Import):
        for alias in node.names:
            self._add(alias.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom):
        if node.level:
            package = self.module if self.is_package else self.module.rpartition(".")[0]
            for _ in range(node.level - 1):
                package = package.rpartition(".")[0]
            base = f"{package}.{node.module}" if node.module else package
        else:
            base = node.module or ""
        for alias in node.names:
            submodule = f"{base}.{alias.name}"
            self._add(submodule if submodule in MODULES else base, node)


def _imports() -> Iterator[Import]:
    for name, path in MODULES.items():
        visitor = _Visitor(name, path.name == "__init__.py")
        visitor.visit(ast.parse(path.read_text(), filename=str(path)))
        yield from visitor.found


IMPORTS = list(_imports())


def _where(imp: Import) -> str:
    return f"{MODULES[imp.importer].relative_to(LOAM.parent)}:{imp.line}"


def _layer(module: str) -> int | None:
    best, level = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, level = len(p), i
    return level


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each as one cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
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
                components.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return components


def _a_cycle(component: list[str], edges: dict[str, set[str]]) -> list[str]:
    """One concrete cycle through the component's first module (breadth-first, so shortest)."""
    members = set(component)
    start = component[0]
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(edges[v] & members):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    return component


def test_the_parser_sees_the_package():
    """Guards the guard: the modules and edges the other tests reason about are really there."""
    assert "loam.train" in MODULES and "loam.model.transformer" in MODULES
    assert any(i.importer == "loam.train" and i.target.startswith("loam.") for i in IMPORTS)
    assert any(not i.target.startswith("loam") for i in IMPORTS)


def test_no_import_cycles():
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    lines: dict[tuple[str, str], set[str]] = {}
    for i in IMPORTS:
        if i.target in MODULES:
            edges[i.importer].add(i.target)
            lines.setdefault((i.importer, i.target), set()).add(
                _where(i) + (" (function-level)" if i.function_level else ""))
    report = []
    for component in _cycles(edges):
        cycle = _a_cycle(component, edges)
        report.append(f"cycle among {len(component)} modules {component}; e.g. "
                      + " -> ".join(cycle))
        for a, b in zip(cycle, cycle[1:]):
            report.append(f"    {a} -> {b}: {', '.join(sorted(lines[(a, b)]))}")
    assert not report, "import cycles in loam/:\n" + "\n".join(report)


def test_every_module_has_a_layer():
    unplaced = sorted(m for m in MODULES if _layer(m) is None)
    assert not unplaced, f"add these modules to LAYERS in {Path(__file__).name}: {unplaced}"


def test_lower_layers_never_import_higher_ones():
    bad = set()
    for i in IMPORTS:
        if i.target not in MODULES:
            continue
        src, dst = _layer(i.importer), _layer(i.target)
        if src is not None and dst is not None and dst > src:
            bad.add(f"{_where(i)}: {i.importer} [{LAYERS[src][0]}] imports {i.target} "
                       f"[{LAYERS[dst][0]}]")
    assert not bad, "layering inversions:\n" + "\n".join(sorted(bad))


def _heavy_loam_modules() -> set[str]:
    """loam modules that import a HEAVY package at module level."""
    return {i.importer for i in IMPORTS if not i.function_level and i.target in HEAVY}


def test_function_level_imports_only_defer_heavy_dependencies():
    allowed = HEAVY | _heavy_loam_modules()
    bad = sorted({f"{_where(i)}: {i.target}" for i in IMPORTS
                  if i.function_level and i.target not in allowed})
    assert not bad, ("function-level imports that do not defer a heavy optional dependency "
                     f"(move them to the top of the file; heavy: {sorted(allowed)}):\n"
                     + "\n".join(bad))


@pytest.mark.parametrize("source, expected", [
    ("import loam.data.vocab", {"loam.data.vocab"}),
    ("from loam.data import vocab, corpora", {"loam.data.vocab", "loam.data.corpora"}),
    ("from loam.model.sizes import get_size", {"loam.model.sizes"}),
    ("from . import vocab", {"loam.data.vocab"}),
    ("from .corpora import DOMAIN_NAMES", {"loam.data.corpora"}),
    ("from .. import step", {"loam.step"}),
    ("def f():\n    from loam import eval as e\n", {"loam.eval"}),
])
def test_import_resolution(source, expected):
    visitor = _Visitor("loam.data.objectives", is_package=False)
    visitor.visit(ast.parse(source))
    assert {i.target for i in visitor.found} == expected
    assert all(i.function_level == source.startswith("def") for i in visitor.found)
