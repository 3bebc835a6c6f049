"""Which states are linear recurrences: step IR -> a verdict per state.

A state whose next value is `a * h + b`, with `a` and `b` free of every state, needs no product
through the state: the whole sequence is an associative scan over the pairs (a_t, b_t), which a
GPU runs in log-depth and a CPU in chunks across its cores (issue #15). minGRU, minLSTM, QRNN's
fo-pooling, SRU and diagonal state-space layers are this shape, however they are written:
`(1 - z) * h + z * c`, `f * h + i * c`, `h * a + b`, `-(a * -h) + b`, the state in several terms.

This stage says, for each state, "parallel scan" or "sequential" and why (the first thing that
reads a state other than linearly, with its spec line). `affine_loop` is what a backend reads: for
a scheduled pass (forward, or backward, whose carried gradients of such states are linear in
themselves too), every loop value as a * s + b over values made outside the loop, or None where
the loop is not only linear recurrences.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Union

from .ir import Graph
from .ops import INFIX
from .schedule import Schedule


@dataclass(frozen=True)
class Verdict:
    state: str
    scan: bool
    why: str  # for a sequential state: what reads a state other than linearly, and where

    def __str__(self) -> str:
        return "parallel scan" if self.scan else f"sequential: {self.why}"


def linear_states(g: Graph) -> list[Verdict]:
    """A verdict for each state of the step graph `g` (a forward step, as lowered or optimised).

    A state read by another's a or b is no obstacle when it is itself known for every step before
    that one's scan runs: a delay (`xp' = x`, QRNN's previous input) or another scanned state."""
    leaves = {leaf: name for name, leaf, _ in g.carries}
    known: set[int] = set()  # leaves of states settled as scans, in an order that has no cycle
    while True:
        reads = _carries_read(g, set(leaves) - known)
        grown = {leaf for _, leaf, nxt in g.carries
                 if leaf not in known and _nonlinear(g, nxt, leaf, leaves, reads) is None}
        if not grown:
            break
        known |= grown
    verdicts = []
    for name, leaf, nxt in g.carries:
        why = None if leaf in known else _nonlinear(g, nxt, leaf, leaves, reads)
        verdicts.append(Verdict(name, why is None, f"{name}' {why}" if why else ""))
    return verdicts


def _carries_read(g: Graph, leaves: set[int]) -> list[frozenset[int]]:
    """For each node, the state leaves (of `leaves`) it depends on."""
    out: list[frozenset[int]] = []
    for i, node in enumerate(g.nodes):
        found = {i} if i in leaves else set()
        for a in node.args:
            found |= out[a]
        out.append(frozenset(found))
    return out


def _nonlinear(g: Graph, i: int, leaf: int, leaves: dict[int, str], reads) -> str | None:
    """None if node i is a * leaf + b with a, b free of the states in `reads`; else why not."""
    if not reads[i] or i == leaf:
        return None  # b alone (a = 0), or the state itself (a = 1)
    node = g.nodes[i]
    if node.op in ("add", "sub"):
        return _nonlinear(g, node.args[0], leaf, leaves, reads) or _nonlinear(g, node.args[1], leaf, leaves, reads)
    if node.op == "neg":
        return _nonlinear(g, node.args[0], leaf, leaves, reads)
    if node.op in ("mul", "div"):
        x, y = node.args  # x the term carrying the state, y its coefficient
        if node.op == "mul" and (leaf not in reads[x] or y == leaf
                                 or (reads[y] and _nonlinear(g, x, leaf, leaves, reads) is not None)):
            x, y = y, x
        if reads[y]:  # the coefficient reads a state: through itself, or here when it is one
            return _culprit(g, i if y in leaves else y, leaves, reads)
        return _nonlinear(g, x, leaf, leaves, reads)
    return _culprit(g, i, leaves, reads)


# Ops through which a state stays a term (a slice of a sum is still a sum)
_PLAIN = ("add", "sub", "neg", "mul", "div", "slice", "concat", "expand")


def _culprit(g: Graph, i: int, leaves: dict[int, str], reads) -> str:
    """What, at or below node i, reads a state other than as a term: a product if there is one on
    the way down to the state, else the first op that is not a sum or a scaling."""
    first, at = None, i
    while at not in leaves:
        node = g.nodes[at]
        if node.op in ("matvec", "matvec_t", "outer"):
            first = at
            break
        if first is None and node.op not in _PLAIN:
            first = at
        below = [a for a in node.args if reads[a]]
        if not below:
            break
        at = below[-1] if node.op in ("matvec", "matvec_t") else below[0]
    if first is None:
        first = i
    if first in leaves:
        return f"reads state {leaves[first]}"
    node = g.nodes[first]
    line = f" at line {node.line}" if node.line else ""
    return f"reads {_state_names(reads[first], leaves)} through {_describe(g, first)}{line}"


def _describe(g: Graph, i: int) -> str:
    node = g.nodes[i]
    names = [_name(g, a) for a in node.args]
    if node.op == "matvec":
        return f"{names[0]} @ {names[1]}"
    if node.op in ("mul", "div", "add", "sub"):
        return f"{names[0]} {INFIX[node.op]} {names[1]}"
    return f"{node.op}({', '.join(names)})"


def _name(g: Graph, i: int) -> str:
    node = g.nodes[i]
    if node.op in ("reshape", "blockdiag"):  # contract(W, a, b)'s W, flattened; a per-head W's blocks
        return _name(g, node.args[0])
    if node.op == "outer":
        return f"outer({_name(g, node.args[0])}, {_name(g, node.args[1])})"
    if node.op == "concat":  # products of one operand stacked by the optimiser
        return "[" + ", ".join(_name(g, a) for a in node.args) + "]"
    if node.op in ("carry", "param", "input"):
        return str(node.attrs[0])
    if node.op == "const":
        return f"{node.attrs[0]:g}"
    return node.name.replace("_next", "'") if node.name else "..."


def _state_names(found: frozenset[int], leaves: dict[int, str]) -> str:
    return ", ".join(sorted(leaves[i] for i in found))


# --- a loop of linear recurrences, as the scan backends read it ------------------------------------

# A coefficient or offset: a number, a node made outside the loop (its id), or (op, term, term)
# with op one of add, sub, mul, div.
Term = Union[float, int, tuple]


@dataclass(frozen=True)
class Affine:
    """A loop value as a * s + b: s the carry leaf it reads (None: it reads none, a = 0), a and b
    terms over values made outside the loop."""

    state: int | None
    a: Term
    b: Term

    def term(self) -> Term:
        """The value itself, a * s + b, as one term (s a node like any other)."""
        return combine("add", combine("mul", self.a, self.state) if self.state is not None else 0.0, self.b)


def affine_loop(s: Schedule) -> dict[int, Affine] | None:
    """Every loop value of the pass `s` (carry leaves included) as a * s + b, where each state's next
    value reads that state alone; None if the loop is anything else (a product through a state, a
    nonlinear op, a value mixing two states, a next value reading another state). The scan is then
    the whole loop: a and b for all steps before it, every kept loop value from the states after it."""
    g = s.graph
    forms: dict[int, Affine] = {}

    def outside(i: int) -> Affine:
        node = g.nodes[i]
        return Affine(None, 0.0, float(node.attrs[0]) if node.op == "const" else i)

    for i in s.nodes_in("loop"):
        node = g.nodes[i]
        if node.op == "carry":
            forms[i] = Affine(i, 1.0, 0.0)
            continue
        args = [forms[a] if s.region[a] == "loop" else outside(a) for a in node.args]
        states = {f.state for f in args} - {None}
        if len(states) > 1 or node.op not in ("add", "sub", "neg", "mul", "div"):
            return None
        state = states.pop() if states else None
        if node.op == "neg":
            (x,) = args
            forms[i] = Affine(state, combine("sub", 0.0, x.a), combine("sub", 0.0, x.b))
        elif node.op in ("add", "sub"):
            x, y = args
            forms[i] = Affine(state, combine(node.op, x.a, y.a), combine(node.op, x.b, y.b))
        else:
            x, y = args
            if node.op == "mul" and x.state is None:
                x, y = y, x  # x the factor carrying the state, y its coefficient
            if y.state is not None:  # s * s, or a division by the state
                return None
            forms[i] = Affine(state, combine(node.op, x.a, y.b), combine(node.op, x.b, y.b))
    for _, leaf, nxt in g.carries:
        if s.region[nxt] != "loop":
            forms[nxt] = outside(nxt)
        if forms[nxt].state not in (None, leaf):
            return None
    return forms


def combine(op: str, x: Term, y: Term) -> Term:
    """x op y, with numbers folded and the identities (0 + y, 1 * y, 0 * y, x / 1) applied."""
    def num(t: Term, v: float | None = None) -> bool:
        return isinstance(t, float) and (v is None or t == v)

    if op in ("mul", "div") and num(x, 0.0):
        return 0.0  # no such term (a state's offset that is not there), whatever it is scaled by
    if num(x) and num(y):
        if op == "div" and y == 0.0:  # h / 0.0: as the loop's arrays divide (inf), not an exception
            return math.copysign(math.inf, x) * math.copysign(1.0, y) if not math.isnan(x) else math.nan
        return {"add": x + y, "sub": x - y, "mul": x * y, "div": x / y if op == "div" else 0.0}[op]
    if op == "add" and num(x, 0.0):
        return y
    if op in ("add", "sub") and num(y, 0.0):
        return x
    if op == "mul" and num(y, 0.0):
        return 0.0
    if op == "mul" and num(x, 1.0):
        return y
    if op in ("mul", "div") and num(y, 1.0):
        return x
    return (op, x, y)
