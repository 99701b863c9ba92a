"""The package's layout, checked by walking its imports (ast; nothing is imported).

Floors, from the bottom: a module imports only from its own floor or below (README, "Where each
part lives"). The table below is the layout; a new module gets a floor here or this test fails.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "text2llm"

# module (or package prefix) -> floor; the longest matching prefix wins
FLOORS = {
    "text2llm.errors": 0, "text2llm.files": 0, "text2llm.chat": 0, "text2llm.workers": 0, "text2llm.metrics": 0,
    "text2llm.config": 0, "text2llm.data.config": 0, "text2llm.model.config": 0, "text2llm.train.config": 0,
    "text2llm.data": 1, "text2llm.tokenizer": 1, "text2llm.model": 1, "text2llm.loss": 1,
    "text2llm.checkpoint": 2, "text2llm.pack": 2, "text2llm.loader": 2, "text2llm.evaluate": 2,
    "text2llm.infer": 3,
    "text2llm.train": 4,
    "text2llm.compress": 5, "text2llm.interop": 5,
    "text2llm.artifacts": 6,
    "text2llm.run": 7, "text2llm.cli": 7, "text2llm.__main__": 7, "text2llm": 7,
}

# (importer prefix, imported prefix) pairs that never appear, whatever the floors say
NEVER = [
    ("text2llm.model", "text2llm.train"), ("text2llm.model", "text2llm.infer"), ("text2llm.model", "text2llm.compress"),
    ("text2llm.model", "text2llm.data"), ("text2llm.model", "text2llm.cli"), ("text2llm.model", "text2llm.interop"),
    ("text2llm.data", "text2llm.model"), ("text2llm.data", "text2llm.train"),
    ("text2llm.infer", "text2llm.train"),
]

# modules allowed to import text2llm modules inside functions, and why
LAZY_OK = {
    "text2llm": "package __init__: `import text2llm` stays instant (load() imports torch)",
    "text2llm.cli": "a fast --help: each verb imports its stage",
    "text2llm.artifacts": "the ONNX Runtime path must not import torch",
    "text2llm.model": "package __init__: importing the model config must not import torch",
    "text2llm.train": "package __init__: reading configs must not import torch",
    "text2llm.data": "package __init__: importing the data config must not import the pipeline",
}


def _modules() -> dict[str, Path]:
    mods = {}
    for p in SRC.rglob("*.py"):
        parts = p.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = p
    return mods


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The module a dotted name refers to (a submodule, else its package), within text2llm."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(mod: str, path: Path) -> list[tuple[str, bool, int]]:
    """(imported text2llm module, at module level?, line) for every import in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {id(n) for n in tree.body}
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                pkg = ".".join(base + ([node.module] if node.module else []))
            else:
                pkg = node.module or ""
            names = [f"{pkg}.{a.name}" for a in node.names] if pkg.startswith("text2llm") else [pkg]
        for n in names:
            if n == "text2llm" or n.startswith("text2llm."):
                target = _resolve(n)
                if target and target != mod:
                    out.append((target, id(node) in top, node.lineno))
    return out


EDGES = {mod: _imports(mod, path) for mod, path in MODULES.items()}


def _floor(mod: str) -> int:
    best = max((k for k in FLOORS if mod == k or mod.startswith(k + ".")), key=len, default=None)
    assert best is not None, f"{mod}: not in the FLOORS table of tests/test_layout.py (give it a floor)"
    return FLOORS[best]


def _under(mod: str, prefix: str) -> bool:
    return mod == prefix or mod.startswith(prefix + ".")


def test_every_module_has_a_floor_and_imports_only_downwards():
    bad = [f"{m} (floor {_floor(m)}) imports {t} (floor {_floor(t)}) at line {line}"
           for m, edges in EDGES.items() for t, _, line in edges if _floor(t) > _floor(m)]
    assert not bad, "\n".join(bad)


def test_the_nevers():
    bad = [f"{m} imports {t} at line {line}" for m, edges in EDGES.items() for t, _, line in edges
           for a, b in NEVER if _under(m, a) and _under(t, b)]
    bad += [f"{m} imports text2llm.cli" for m, edges in EDGES.items() for t, _, _ in edges
            if t == "text2llm.cli" and m != "text2llm.__main__"]
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    graph = {m: sorted({t for t, _, _ in edges}) for m, edges in EDGES.items()}
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def strong(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, []):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            strong(v)
    assert not cycles, f"import cycles: {cycles}"


def test_internal_imports_sit_at_module_level():
    bad = [f"{m}:{line} imports {t} inside a function" for m, edges in EDGES.items() if m not in LAZY_OK
           for t, at_top, line in edges if not at_top]
    assert not bad, "\n".join(bad)


def _module_level_closure(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo += [t for t, at_top, _ in EDGES.get(m, []) if at_top]
        # importing text2llm.a.b runs the package __init__ files first
        parts = m.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
    return seen


def _third_party(mod: str) -> set[str]:
    tree = ast.parse(MODULES[mod].read_text(encoding="utf-8"))
    out = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            out.add(node.module.split(".")[0])
    return out


@pytest.mark.parametrize("start", ["text2llm.infer.ort_runtime", "text2llm.artifacts", "text2llm.cli"])
def test_the_onnx_runtime_path_never_imports_torch(start):
    """What `generate EXPORT_DIR` / `serve EXPORT_DIR` load at module level: no torch, no model.
    (tests/test_onnx.py runs that path with torch made unimportable.)"""
    closure = _module_level_closure(start)
    assert not [m for m in closure if _under(m, "text2llm.model")], closure
    torchy = sorted(m for m in closure if "torch" in _third_party(m))
    assert not torchy, f"{start} imports torch through {torchy}"


def test_the_literal_ignore_index_lives_in_the_loss_module_only():
    number = re.compile(r"(?<![\w.])-100(?![\w.])")  # the number, not a name like "test-100k"
    hits = [f"{p.relative_to(SRC)}:{n}" for p in SRC.rglob("*.py") if p.name != "loss.py"
            for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if number.search(line)]
    assert not hits, hits


def test_one_engine_selection_function():
    """Which engine serves a dir is decided in text2llm.artifacts alone: nothing else asks whether
    a dir is an ONNX or AOT export."""
    asks = [f"{m}:{line}" for m, path in MODULES.items() if m not in ("text2llm.artifacts",)
            for line, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
            if ("is_export_dir(" in text or "is_aot_dir(" in text) and "def " not in text]
    assert not asks, asks
