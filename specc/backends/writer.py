"""A small indented writer for generated code, and the names generated code gives values."""
from __future__ import annotations

import builtins
import keyword
import math
from contextlib import contextmanager
from dataclasses import dataclass

from ..ir import Forward, OutputGradient, suggested_names
from ..ops import INFIX


class Writer:
    def __init__(self):
        self.lines: list[str] = []
        self._depth = 0

    def line(self, text: str = "") -> None:
        self.lines.append(("    " * self._depth + text) if text else "")

    def comment(self, text: str) -> None:
        # Comments quote the spec and its file name: keep them one printable line each.
        for part in text.splitlines():
            part = "".join(ch if ch.isprintable() else "?" for ch in part)
            self.line("# " + part if part else "#")

    @contextmanager
    def block(self, header: str):
        self.line(header)
        self._depth += 1
        yield
        self._depth -= 1

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


class Namer:
    """Hands out unique identifiers, preferring the spec's own names.

    Only identifiers that the grammar accepted, or that this module builds from them, reach
    generated code; clashes with Python keywords, builtins and the code's own names are
    resolved by a suffix.
    """

    def __init__(self, taken=()):
        self.taken = set(taken) | set(keyword.kwlist) | set(dir(builtins))

    def __call__(self, wanted: str) -> str:
        base = wanted if wanted.isidentifier() else "v"
        name, k = base, 1
        while name in self.taken:
            k += 1
            name = f"{base}_{k}"
        self.taken.add(name)
        return name


def value_names(g, kept, namer: Namer, leaf_names: dict[int, str], reverse: bool):
    """Names for a pass's values (the spec's where it has them), its carried buffers (h_seq, or
    d_h_seq going backward) and the buffers of the loop values kept for every step (i_seq): three
    dicts, node -> name, state -> name, node -> name."""
    suggested = suggested_names(g)
    names = {}
    for i, node in enumerate(g.nodes):
        if i in leaf_names:
            names[i] = leaf_names[i]
        elif node.op not in ("const", "carry"):
            names[i] = namer(suggested[i])
    carry_buf = {name: namer(f"d_{name}_seq" if reverse else f"{name}_seq") for name, _, _ in g.carries}
    seq = {i: namer(f"{names[i]}_seq") for i in sorted(kept)}
    return names, carry_buf, seq


@dataclass
class BackwardArgs:
    """The names a backward function gives its leaves: backward(saved, *d_outs, *d_final, *params)."""

    names: dict[int, str]  # leaf of the backward graph -> its name
    d_outs: list[int]  # the leaves that are output gradients, in the order of the arguments
    d_final: list[str]  # the final states' gradients
    params: list[str]  # the parameters, in the forward pass's order
    binds: list[tuple[str, str]]  # (name, key in `saved`) of each forward value it reads from `saved`


def backward_args(gb, fwd, saved_keys: dict[int, str], namer: Namer) -> BackwardArgs:
    """Names for the leaves of backward graph `gb` of forward graph `fwd`: output gradients
    (d_y), the final states' gradients (d_h_final), the parameters (their own names), and the
    forward values saved under `saved_keys`."""
    names: dict[int, str] = {}
    d_outs = []
    for key, i in gb.inputs:
        if isinstance(key, OutputGradient):
            names[i] = namer(f"d_{key.name}")
            d_outs.append(i)
    d_final = [namer(f"d_{name}_final") for name, _, _ in gb.carries]
    params = {name: namer(name) for name, _ in fwd.params}
    fwd_params = {i: name for name, i in fwd.params}
    binds = []
    for key, i in gb.inputs + gb.params:
        if isinstance(key, Forward):
            if key.node in fwd_params:
                names[i] = params[fwd_params[key.node]]
            else:
                names[i] = namer(saved_keys[key.node])
                binds.append((names[i], saved_keys[key.node]))
    return BackwardArgs(names, d_outs, d_final, list(params.values()), binds)


def after_loop(w: Writer, s, emit) -> None:
    """What a pass does after its loop (schedule `s`): the post region, then the sums over time
    and batch (reduce) and what is made of them (final); emit(region) writes one region."""
    if s.nodes_in("post"):
        w.comment("After the loop: what the carried values do not need, for all steps at once.")
        emit("post")
    if s.nodes_in("reduce"):
        w.comment("Sums over time and batch, each one matrix product over all steps.")
        emit("reduce")
        emit("final")


def input_gradient(code: str, optional: bool) -> str:
    """A backward function's returned gradient of an input: None when the caller asked for none
    (inputs_grad=False) and it was made outside the loop (made in it, it is there anyway)."""
    return f"{code} if inputs_grad else None" if optional else code


def tuple_code(items: list[str]) -> str:
    """A Python tuple of these items' code (one item: with its comma)."""
    return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"


def saved_key(g, i: int, names: dict[int, str]) -> str:
    """The key under which a forward pass saves its value i for backward: h_prev for a state's
    value before the step, h_next for its next value, else the value's name."""
    node = g.nodes[i]
    if node.op == "carry":
        return f"{node.attrs[0]}_prev"
    for name, _, nxt in g.carries:
        if nxt == i:
            return f"{name}_next"
    return names[i]


class TermSpeller:
    """Writes scan.Term values (a linear recurrence's a and b) as array code in a host function,
    one line an operation. `ref`: a node's code there; `full`, `expand`, `view`: how this code
    spells a number as (rows, size) values, a value of parameters alone repeated for every row,
    and a view (a slice of a stacked product) as rows of its own."""

    def __init__(self, w: Writer, ref, namer: Namer, batched, is_view, full: str, expand: str, view: str):
        self.w, self.ref, self.namer, self.batched, self.is_view = w, ref, namer, batched, is_view
        self.full, self.expand, self.view = full, expand, view
        self.made: dict = {}

    def code(self, t, name=None) -> str:
        """t's code; an operation is written as a line of its own, named name() when given."""
        if isinstance(t, float):
            return number_code(t)
        if isinstance(t, int):
            return self.ref(t)
        key = _typed(t)  # node 1 and the number 1.0 are equal keys of a dict
        if key not in self.made:
            op, x, y = t
            line = f"{self.code(x)} {INFIX[op]} {self.code(y)}"
            made = name() if name else self.namer("scan_term")
            self.w.line(f"{made} = {line}")
            self.made[key] = made
        return self.made[key]

    def rows(self, t, size, want: str, exact: bool = False) -> str:
        """The code of t as (rows, size) values, as a scan reads a and b; what has to be made for
        it is named `want` (exact), or after it."""
        def name() -> str:
            return want if exact else self.namer(want)

        made = None
        if isinstance(t, float):
            made = self.full.format(size=size, value=number_code(t))
        elif not self._batched(t):  # made of parameters alone: the same for every row
            made = self.expand.format(code=self.code(t), size=size)
        elif isinstance(t, int) and self.is_view(t):
            made = self.view.format(code=self.code(t))
        if made is None:
            return self.code(t, name)
        named = name()
        self.w.line(f"{named} = {made}")
        return named

    def _batched(self, t) -> bool:
        if isinstance(t, tuple):
            return self._batched(t[1]) or self._batched(t[2])
        return isinstance(t, int) and self.batched(t)


def number_code(v: float) -> str:
    """A number as Python code, safe beside an operator: (-0.5); inf and nan by float() (a division
    by the number 0 in a spec)."""
    if math.isfinite(v):
        return repr(v) if v >= 0 else f"({v!r})"
    return f"float('{v}')"


def _typed(t):
    return (t[0], _typed(t[1]), _typed(t[2])) if isinstance(t, tuple) else (type(t).__name__, t)
