"""The step IR: one timestep as a graph of typed operations.

A `Graph` is a scan body. Its leaves are per-step inputs (`input`), the carried values
(`carry`: a state's previous value in the forward pass, a state's gradient in the backward
pass), and values fixed for the whole sequence (`param`). It yields the carried values' next
values, per-step outputs, and `reduced` values (sums over batch and time: weight gradients).

Every batched value is one vector per example; code generators keep batched values as
(rows, features) arrays, rows being the batch inside the time loop and time x batch outside it.
"""
from __future__ import annotations

from dataclasses import dataclass

from . import ops
from .shapes import Type, shape_str  # noqa: F401 - Type is the IR's, defined beside the shapes it holds


@dataclass(frozen=True)
class Forward:
    """The key of a backward step's leaf that is forward node `node`'s value (at the step, or for
    the sequence when it is made of parameters alone)."""

    node: int

    def __str__(self) -> str:
        return f"%{self.node}"


@dataclass(frozen=True)
class OutputGradient:
    """The key of a backward step's leaf that is the gradient of output `name` at the step."""

    name: str

    def __str__(self) -> str:
        return f"d:{self.name}"


@dataclass(frozen=True)
class Node:
    op: str
    args: tuple[int, ...]
    attrs: tuple
    type: Type
    name: str = ""  # the spec's name for this value, when it has one
    line: int = 0  # the spec line it came from (0: made by the compiler)


@dataclass(frozen=True)
class Graph:
    nodes: tuple[Node, ...]  # in topological order; a node's id is its index
    inputs: tuple[tuple[str, int], ...]
    carries: tuple[tuple[str, int, int], ...]  # (name, leaf id, id of its next value)
    params: tuple[tuple[str, int], ...]
    outputs: tuple[tuple[str, int], ...]
    reduced: tuple[tuple[str, int], ...] = ()

    def results(self) -> list[int]:
        return [n for _, _, n in self.carries] + [n for _, n in self.outputs] + [n for _, n in self.reduced]

    def users(self) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in self.nodes]
        for i, n in enumerate(self.nodes):
            for a in n.args:
                out[a].append(i)
        return out

    def __str__(self) -> str:
        return format_graph(self)


LEAVES = ("input", "carry", "param", "const")


class Builder:
    """Builds a graph node by node. Identical nodes are made once (common subexpressions)."""

    def __init__(self):
        self.nodes: list[Node] = []
        self._memo: dict[tuple, int] = {}
        self.line = 0  # the spec line new nodes are credited to when the caller gives none

    def add(self, op: str, args=(), attrs=(), name: str = "", line: int = 0, type: Type | None = None) -> int:

        args, attrs = tuple(args), tuple(attrs)
        line = line or self.line
        key = (op, args, attrs)
        if op not in ("input", "carry", "param") and key in self._memo:
            found = self._memo[key]
            if name and not self.nodes[found].name:
                self.nodes[found] = Node(op, args, attrs, self.nodes[found].type, name, line)
            return found
        folded = ops.fold(self, op, args, attrs)
        if folded is not None:
            return folded
        if type is None:
            type = ops.infer(op, [self.nodes[a].type for a in args], attrs)
        self.nodes.append(Node(op, args, attrs, type, name, line))
        self._memo[key] = len(self.nodes) - 1
        return len(self.nodes) - 1

    def name(self, node: int, name: str, line: int) -> None:
        """Give an already-built value the spec's name for it (first name wins)."""
        n = self.nodes[node]
        if not n.name and n.op not in LEAVES:
            self.nodes[node] = Node(n.op, n.args, n.attrs, n.type, name, line or n.line)

    def type(self, node: int) -> Type:
        return self.nodes[node].type

    def const(self, value: float) -> int:
        return self.add("const", (), (float(value),), type=Type((), False))


def suggested_names(g: Graph) -> list[str]:
    """A readable name for every value: the spec's own, or one made from its operands' names.

    sigmoid(f) reads as sigmoid_f and W_hh @ h as W_hh_h; values whose operands have no such
    names are v<id>. Code generators start from these (and make them unique).
    """
    names: list[str] = []
    given: list[bool] = []  # a spec name or a leaf's, rather than one made up here
    for i, node in enumerate(g.nodes):
        if node.name:
            names.append(node.name)
            given.append(True)
            continue
        if node.op in ("input", "carry", "param") and node.attrs and str(node.attrs[0]).isidentifier():
            names.append(str(node.attrs[0]))
            given.append(True)
            continue
        simple = all(given[a] for a in node.args)
        arg = [names[a] for a in node.args]
        if simple and len(arg) == 1 and node.op not in ("slice", "reshape", "zeros", "sum_rows", "sum_all"):
            name = f"{node.op}_{arg[0]}"
        elif simple and node.op == "matvec":
            name = f"{arg[0]}_{arg[1]}"
        elif simple and node.op == "matvec_t":
            name = f"{arg[0]}T_{arg[1]}"
        else:
            name = f"v{i}"
        names.append(name)
        given.append(False)
    return names


def format_graph(g: Graph) -> str:
    roles: dict[int, str] = {}
    for name, leaf, nxt in g.carries:
        roles[nxt] = f"  -> next {name}"
    for name, n in g.outputs:
        roles[n] = roles.get(n, "") + f"  -> output {name}"
    for name, n in g.reduced:
        roles[n] = roles.get(n, "") + f"  -> reduced {name}"
    lines = []
    for i, n in enumerate(g.nodes):
        args = ", ".join(f"%{a}" for a in n.args)
        attrs = ", ".join(str(a) for a in n.attrs)
        inner = ", ".join(x for x in (args, attrs) if x)
        label = f" ({n.name})" if n.name else ""
        lines.append(f"%{i} = {n.op}({inner}) : {n.type}{label}{roles.get(i, '')}")
    return "\n".join(lines)
