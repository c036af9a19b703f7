"""The import graph keeps its shape (docs/architecture.md): no circles, no imports back up, no private names.

Read from the source with ``ast`` (imports inside function bodies included), so a tie hidden in a function
counts like one at the top of a file.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("benchmark", "tasks", "methods")
# the bottom layer of benchmark/: what tasks/ and methods/ may import from it
LEAVES = {"benchmark.errors", "benchmark.registry", "benchmark.paths", "benchmark.locks", "benchmark.shard",
          "benchmark.textmetrics", "benchmark.progress"}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for f in (ROOT / pkg).rglob("*.py"):
            name = ".".join(f.relative_to(ROOT).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = f
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, str | None]]:
    """(imported module of this project, imported name or None) for every import statement of one file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [(a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            targets = [(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base, a.name) for a in node.names]
        else:
            continue
        for target, imported in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.append((target, imported))
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: {t for t, _ in _imports(m, p, modules)} for m, p in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_hand_made_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle():
    assert _cycles(_graph()) == []


def test_plugins_import_only_the_bottom_layer_of_benchmark():
    graph = _graph()
    upward = sorted((m, t) for m, targets in graph.items() if m.split(".")[0] in ("tasks", "methods")
                    for t in targets if t.startswith("benchmark") and t not in LEAVES)
    assert upward == []


def test_benchmark_never_imports_a_specific_method():
    graph = _graph()
    specific = sorted((m, t) for m, targets in graph.items() if m.startswith("benchmark")
                      for t in targets if t.startswith("methods.") and t != "methods.base")
    assert specific == []


def test_no_file_imports_another_files_private_name():
    modules = _modules()
    private = sorted((m, t, n) for m, p in modules.items() for t, n in _imports(m, p, modules)
                     if n and n.startswith("_") and not n.startswith("__"))
    assert private == []


# the layers of docs/architecture.md; a module may import its own layer or those below it
LAYERS = {
    0: LEAVES | {"benchmark"},
    2: {"benchmark.config", "benchmark.records", "benchmark.tables", "benchmark.tokens", "benchmark.data",
        "benchmark.evaluate", "benchmark.models", "benchmark.builtin_models", "benchmark.train",
        "benchmark.precision", "benchmark.evalcache", "benchmark.checkpoint", "benchmark.distributed",
        "benchmark.samples", "benchmark.sharding", "benchmark.weights",
        "benchmark.trackers"},
    3: {"benchmark.plan", "benchmark.scoring", "benchmark.stages", "benchmark.reference"},
    4: {"benchmark.validate", "benchmark.runner", "benchmark.metrics", "benchmark.leaderboard", "benchmark.plots",
        "benchmark.heatmaps", "benchmark.plotkit", "benchmark.curves", "benchmark.report", "benchmark.prepare", "benchmark.jobs",
        "benchmark.launch", "benchmark.rescore", "benchmark.cli", "benchmark.__main__"},
}


def _layer(module: str) -> int:
    if module.split(".")[0] in ("tasks", "methods"):
        return 1
    return next(k for k, names in LAYERS.items() if module in names)


def test_every_benchmark_module_has_a_documented_layer():
    doc = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    for module in _modules():
        if module.startswith("benchmark.") and module != "benchmark.__main__":
            assert _layer(module) is not None
            assert f"{module.split('.')[-1]}.py`" in doc, module


def test_imports_run_downward_only():
    upward = sorted((m, t) for m, targets in _graph().items() for t in targets if _layer(t) > _layer(m))
    assert upward == []

