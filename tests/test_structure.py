"""The shape of the code: no import cycles in specc/, and one registry the stages read.

The stages import each other only downstream (grammar -> ... -> runtime); a cycle, even through
an import inside a function, means two stages each need the other and neither can be read alone.
"""
from __future__ import annotations

import ast
from pathlib import Path

import specc

ROOT = Path(specc.__file__).parent


def _modules(root: Path) -> dict[str, Path]:
    mods = {}
    for f in root.rglob("*.py"):
        parts = f.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = f
    return mods


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """Every module of specc this one imports, anywhere in it, but under `if TYPE_CHECKING:`."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = {n for top in tree.body if isinstance(top, ast.If) and "TYPE_CHECKING" in ast.unparse(top.test)
                   for n in ast.walk(top)}
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out = set()
    for node in ast.walk(tree):
        if node in typing_only:
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in mods}
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[:len(package) - node.level + 1]) if node.level else ""
            target = ".".join(p for p in (base, node.module or "") if p)
            for a in node.names:
                out.add(f"{target}.{a.name}" if f"{target}.{a.name}" in mods else target)
    return {m for m in out if m in mods and m != name}


def _cycles(root: Path) -> list[str]:
    mods = _modules(root)
    graph = {m: _imports(m, f, mods) for m, f in mods.items()}
    state: dict[str, int] = {}
    path: list[str] = []
    cycles = []

    def visit(m):
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycles.append(" -> ".join(path[path.index(n):] + [n]))
            elif n not in state:
                visit(n)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return cycles


def test_no_import_cycles():
    cycles = _cycles(ROOT)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_detector_sees_a_cycle(tmp_path):
    """The test above can fail: two modules importing each other, one inside a function, are a cycle."""
    pkg = tmp_path / "specc"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from . import b\n")
    (pkg / "b.py").write_text("from .a import f\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import f\n")
    assert _cycles(pkg) == ["specc.a -> specc.b -> specc.a"]


def test_every_backend_in_the_registry_writes_and_runs():
    """assemble writes one section a backend of the registry; runtime finds a runner for each."""
    from specc.backends import BACKENDS

    source = specc.compile_spec("lstm").source
    prog = specc.program(specc.compile_spec("lstm"))
    for name, backend in BACKENDS.items():
        runner = backend.run()
        assert runner.name == name
        assert hasattr(runner, "problem") and hasattr(runner, "forward") and hasattr(runner, "backward")
    assert "def forward(" in source and "def forward_triton(" in source and "def forward_c(" in source
    assert BACKENDS["numpy"].run().problem(prog, on_cuda=False) is None


def test_modules_compiled_before_the_rename_still_import_specc_init():
    """`specc compile` wrote `from specc import init` before the initialisers' module was renamed."""
    from specc import init, initializers

    assert init is initializers


def test_no_function_in_specc_is_much_over_80_lines():
    long = []
    for f in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 90:
                long.append(f"{f.relative_to(ROOT.parent)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1})")
    assert not long, long
