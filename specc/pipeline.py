"""The pipeline, one stage after another: text -> AST -> checked cell -> step IR -> optimised
step IR -> backward step IR -> schedules -> generated module source.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import assemble
from .autodiff import differentiate
from .check import CheckedCell, check
from .dimnames import code_dims
from .errors import SpecError
from .ir import Forward, Graph
from .library import spec_file
from .lower import lower
from .optimize import contract_products, forward_renumbered, optimize
from .parse import parse
from .schedule import Schedule, schedule


@dataclass(frozen=True)
class Compiled:
    cell: CheckedCell
    forward: Graph  # optimised step IR
    backward: Graph  # optimised backward step IR
    forward_schedule: Schedule
    backward_schedule: Schedule
    source: str  # the generated Python module


def read_spec(spec: str | Path) -> tuple[str, str]:
    """(text, file name) of a spec given as a path, a library name ("lstm") or spec text."""
    if isinstance(spec, Path):
        return spec.read_text(encoding="utf-8"), str(spec)
    if "{" in spec or "\n" in spec:
        return spec, "<spec>"
    library = spec_file(spec)
    if library is not None:
        return library.read_text(encoding="utf-8"), f"specs/{spec}.rnn"
    path = Path(spec)
    if path.is_file():
        return path.read_text(encoding="utf-8"), str(spec)
    raise SpecError(f"no spec file '{spec}' and no spec of that name in the library")


def pick_cell(cells: list[CheckedCell], name: str | None, file: str) -> CheckedCell:
    if name is None:
        if len(cells) == 1:
            return cells[0]
        # a library file named after one of its cells (elman.rnn also holds rnn_tanh, rnn_relu)
        same = [c for c in cells if file == f"specs/{c.name}.rnn"]
        if same:
            return same[0]
        raise SpecError(f"{file} defines cells {', '.join(c.name for c in cells)}; choose one "
                        f"(cell=NAME in Python, --cell NAME on the command line)")
    for c in cells:
        if c.name == name:
            return c
    raise SpecError(f"{file} has no cell '{name}'; it defines {', '.join(c.name for c in cells)}")


def compile_cell(cell: CheckedCell, text: str, file: str, transform=None) -> Compiled:
    """`transform`, a function from Graph to Graph, rewrites the step IR before it is optimised
    (masking.py's variable-length masks are one)."""
    code = code_dims(cell)  # the generated code's names for dimensions; Compiled.cell keeps the spec's
    step = lower(code)
    if transform is not None:
        step = transform(step)
    fwd = optimize(step)
    bwd = optimize(differentiate(fwd, cell.consts), keep_leaves=False)
    # Forward values the backward pass reads: kept by the forward's last rewrite, renumbered by it.
    read = frozenset(k.node for k, _ in bwd.inputs + bwd.params if isinstance(k, Forward))
    fwd, moved = contract_products(fwd, read)
    bwd = forward_renumbered(bwd, moved)
    # Those the forward pass saves: all but the parameters, which backward is handed anyway.
    saved = sorted(moved[i] for i in read if fwd.nodes[moved[i]].op != "param")
    fs = schedule(fwd, also_keep=frozenset(saved))
    bs = schedule(bwd)
    source = assemble.module_source(code, fs, bs, saved, text, file)
    return Compiled(cell, fwd, bwd, fs, bs, source)


def compile_spec(spec: str | Path, cell: str | None = None) -> Compiled:
    text, file = read_spec(spec)
    checked = pick_cell(check(parse(text, file)), cell, file)
    return compile_cell(checked, text, file)
