"""The shape of the code, measured from its import graph and its source (ARCHITECTURE.md, "Layers").

Each module belongs to one layer; a module imports only modules of its own layer or below, nothing
imports in a circle, no module is over 450 lines, no function over 60, and no block of six or more lines
stands twice in product code. A failure names the module, the import or the function.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("builder", "dataset_card", "training")

# Longest prefix wins. 1 ground, 2 rows, 3 card, 4 folder ops, 5 services, 6 training, 7 dev, 8 cli.
LAYERS = {
    "builder": 1, "builder.errors": 1, "builder.files": 1, "builder.settings": 1, "builder.retry": 1,
    "builder.config_fields": 1, "builder.taxonomy": 1, "builder.shipped": 1,
    "builder.format": 1, "builder.format.schema": 2, "builder.format.shards": 2, "builder.format.writer": 2,
    "builder.format.history": 2,
    "spa_vl": 2,
    "dataset_card": 3,
    "builder.validate": 4, "builder.versioning": 4, "builder.upstream": 4,
    "builder.generate": 5, "builder.vlm": 5, "builder.hub": 5, "builder.review": 5,
    "training": 6,
    "builder.dev": 7,
    "builder.cli": 8,
}
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 60
MIN_DUPLICATE_LINES = 6


def _modules() -> dict[str, Path]:
    files = [ROOT / "spa_vl.py"] + [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]
    out = {}
    for path in files:
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def layer_of(module: str) -> int:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in LAYERS:
            return LAYERS[".".join(parts[:n])]
    raise KeyError(f"{module} has no layer in tests/test_structure.py LAYERS")


def imports_of(module: str) -> set[str]:
    """Project modules ``module`` imports, anywhere in its body (a lazy import inside a function counts)."""
    found = set()
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found |= {n for n in names if n in MODULES and n != module}
    return found


GRAPH = {m: imports_of(m) for m in MODULES}


def test_every_module_has_a_layer():
    for module in MODULES:
        layer_of(module)


def test_no_import_reaches_up_a_layer():
    up = [f"{m} (layer {layer_of(m)}) imports {d} (layer {layer_of(d)})"
          for m, deps in GRAPH.items() for d in sorted(deps) if layer_of(d) > layer_of(m)]
    assert not up, "\n".join(up)


def test_no_import_cycles():
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
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
                cycles.append(sorted(component))

    for v in GRAPH:
        if v not in index:
            visit(v)
    assert not cycles, cycles


def test_modules_are_short():
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, long


def test_functions_are_short():
    long = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{module}.{node.name}: {n} lines")
    assert not long, "\n".join(long)


def _code_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text with white space folded) of lines that carry code: no blank, comment, import,
    docstring or lone-punctuation lines (the ones the `duplicates` tool also passes over)."""
    source = path.read_text()
    doc_lines = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Expr) and isinstance(getattr(node, "value", None), ast.Constant) \
                and isinstance(node.value.value, str):
            doc_lines |= set(range(node.lineno, node.end_lineno + 1))
    out = []
    for number, line in enumerate(source.splitlines(), 1):
        text = " ".join(line.split("#", 1)[0].split()) if "'" not in line and '"' not in line else " ".join(line.split())
        if not text or number in doc_lines or re.fullmatch(r"[\[\](){},:;.]*", text) \
                or re.match(r"(from \S+ )?import ", text):
            continue
        out.append((number, text))
    return out


def test_no_block_of_six_lines_stands_twice():
    places = defaultdict(list)  # six code lines, white space folded -> where they stand
    for module, path in MODULES.items():
        lines = _code_lines(path)
        for i in range(len(lines) - MIN_DUPLICATE_LINES + 1):
            places[tuple(text for _, text in lines[i:i + MIN_DUPLICATE_LINES])].append((module, lines[i][0]))
    pairs = defaultdict(list)  # (module, module) -> the first places of their shared blocks
    for where in places.values():
        first = where[0]
        for other in where[1:]:
            if other[0] != first[0] or other[1] - first[1] >= MIN_DUPLICATE_LINES:  # not an overlap of one run
                pairs[(first[0], other[0])].append(f"{first[0]}:{first[1]} ~ {other[0]}:{other[1]}")
    report = sorted(f"{v[0]} ({len(v)} windows)" for v in pairs.values())
    assert not report, "\n".join(report)


@pytest.mark.parametrize("module", ["builder.cli"])
def test_the_cli_is_on_top(module):
    """Nothing below the command line imports it (it may import everything)."""
    importers = sorted(m for m, deps in GRAPH.items() if any(d == module or d.startswith(module + ".") for d in deps)
                       and not (m == module or m.startswith(module + ".")))
    assert not importers, importers
