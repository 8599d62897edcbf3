"""The package's two tiers, checked on the import graph (every import, including those inside functions).

The library (``rcdm/*.py``, ``rcdm/formats/``) never imports a stage; a stage (a module of ``rcdm/stages/``,
or the ``study`` package) imports the library and no other stage, except ``bench``, which measures stages.
No import cycles among library modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "rcdm"
STAGE_EXERCISERS = {"rcdm.stages.bench"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every ``rcdm`` module ``path`` imports (``from rcdm.x import y`` counts y when it is a module)."""
    mod = _module_name(path)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("rcdm"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            if not base.startswith("rcdm"):
                continue
            found.add(base)
            for a in node.names:
                sub = f"{base}.{a.name}"
                if (ROOT.parent / Path(*sub.split("."))).with_suffix(".py").exists() or (
                    ROOT.parent / Path(*sub.split("."))
                ).is_dir():
                    found.add(sub)
    found.discard(mod)
    return found


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in sorted(ROOT.rglob("*.py"))}


def _stage_of(module: str) -> str | None:
    """``rcdm.stages.X`` (or ``rcdm.stages.study`` for its sub-modules); None for library modules."""
    parts = module.split(".")
    if len(parts) >= 3 and parts[1] == "stages":
        return ".".join(parts[:3])
    return None


def test_graph_is_read():
    graph = _graph()
    assert "rcdm.stages.sample" in graph and "rcdm.conditioning" in graph["rcdm.stages.sample"]
    assert "rcdm.stages.study.common" in graph["rcdm.stages.study.adversarial"]


def test_library_never_imports_a_stage():
    bad = [
        f"{m} -> {d}"
        for m, deps in _graph().items()
        if _stage_of(m) is None and m not in ("rcdm.cli", "rcdm.__main__", "rcdm.stages")
        for d in deps
        if _stage_of(d) is not None
    ]
    assert not bad, "library modules import stages:\n" + "\n".join(bad)


def test_stages_import_no_other_stage():
    bad = [
        f"{m} -> {d}"
        for m, deps in _graph().items()
        if (s := _stage_of(m)) is not None and s not in STAGE_EXERCISERS
        for d in deps
        if _stage_of(d) not in (None, s)
    ]
    assert not bad, "stages import other stages:\n" + "\n".join(bad)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state, stack = [], {}, []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if d not in graph:
                continue
            if state.get(d) == 1:
                found.append([*stack[stack.index(d) :], d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return found


@pytest.mark.parametrize("scope", ["library", "stages"])
def test_no_import_cycles(scope):
    graph = _graph()
    # A package's __init__ re-exporting from its own modules is not a cycle that can bite.
    graph = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}
    keep = (lambda m: _stage_of(m) is None) if scope == "library" else (lambda m: _stage_of(m) is not None)
    graph = {m: {d for d in deps if keep(d)} for m, deps in graph.items() if keep(m)}
    assert not _cycles(graph), f"import cycles: {_cycles(graph)}"


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
