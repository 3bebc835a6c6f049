"""The spec as written: frozen AST nodes, each carrying the location it came from."""
from __future__ import annotations

from dataclasses import dataclass

from .errors import Loc


# --- dimension and initialiser arithmetic (scalars known once dimensions are bound) ---

# The words that start a statement or a block. A value may not take one: `const' = ...` would
# read as a declaration.
KEYWORDS = ("cell", "network", "input", "state", "param", "const", "output", "layer")


@dataclass(frozen=True)
class DimNum:
    value: float
    loc: Loc


@dataclass(frozen=True)
class DimName:
    name: str
    loc: Loc


@dataclass(frozen=True)
class DimBin:
    op: str  # + - * /
    left: "Dim"
    right: "Dim"
    loc: Loc


@dataclass(frozen=True)
class DimCall:
    fn: str  # sqrt
    arg: "Dim"
    loc: Loc


@dataclass(frozen=True)
class DimNeg:
    arg: "Dim"
    loc: Loc


Dim = DimNum | DimName | DimBin | DimCall | DimNeg


@dataclass(frozen=True)
class Init:
    name: str  # zeros, ones, constant, uniform, normal, orthogonal, identity
    args: tuple[Dim, ...]
    loc: Loc


# --- declarations and equations ---

@dataclass(frozen=True)
class Target:
    name: str
    next: bool  # h' (the value this step gives) rather than h (the value it was given)
    loc: Loc

    def __str__(self) -> str:
        return self.name + ("'" if self.next else "")


@dataclass(frozen=True)
class Input:
    name: str
    shape: tuple[Dim, ...]
    loc: Loc


@dataclass(frozen=True)
class State:
    name: str
    shape: tuple[Dim, ...]
    init: Init | None
    loc: Loc


@dataclass(frozen=True)
class Param:
    name: str
    shape: tuple[Dim, ...]
    init: Init | None
    loc: Loc
    const: bool = False  # `const M[H, H] = identity`: a buffer of the module, never trained


@dataclass(frozen=True)
class Output:
    target: Target
    expr: "Expr | None"  # `output h'` names an existing value; `output y = ...` defines one
    loc: Loc


@dataclass(frozen=True)
class Assign:
    targets: tuple[Target, ...]
    expr: "Expr"
    loc: Loc


# --- expressions ---

@dataclass(frozen=True)
class Num:
    value: float
    loc: Loc


@dataclass(frozen=True)
class Ref:
    name: str
    next: bool
    loc: Loc


@dataclass(frozen=True)
class BinOp:
    op: str  # + - * / @
    left: "Expr"
    right: "Expr"
    loc: Loc


@dataclass(frozen=True)
class Neg:
    arg: "Expr"
    loc: Loc


@dataclass(frozen=True)
class Call:
    fn: str
    args: tuple["Expr", ...]
    loc: Loc


@dataclass(frozen=True)
class Concat:
    items: tuple["Expr", ...]
    loc: Loc


Expr = Num | Ref | BinOp | Neg | Call | Concat
Stmt = Input | State | Param | Output | Assign


@dataclass(frozen=True)
class Cell:
    name: str
    dims: tuple[tuple[str, Loc], ...]
    doc: str
    stmts: tuple[Stmt, ...]
    loc: Loc


@dataclass(frozen=True)
class Spec:
    file: str
    text: str
    cells: tuple[Cell, ...]
    networks: tuple["Network", ...] = ()


# --- networks: cells wired into models (grammar/rnn.lark `network`, specc/network_check.py) ---

@dataclass(frozen=True)
class NetInput:
    name: str
    kind: str  # sequence, vector, tokens, token
    size: Dim  # features, or the vocabulary size for tokens
    loc: Loc
    kind_loc: Loc


@dataclass(frozen=True)
class LayerArg:
    name: str | None  # None for a positional argument
    value: Dim
    loc: Loc


@dataclass(frozen=True)
class Layer:
    name: str
    kind: str  # embedding, linear, or the name of a cell
    args: tuple[LayerArg, ...]
    stacked: Dim | None
    bidirectional: bool
    dropout: float
    loc: Loc
    kind_loc: Loc


@dataclass(frozen=True)
class Source:
    """Where a chain starts: a value's name, a layer's final state (`enc.h`), or `prev(y)`."""
    kind: str  # name, final, prev
    name: str
    state: str = ""  # for final
    start: Dim | None = None  # for prev: the start token
    loc: Loc | None = None


@dataclass(frozen=True)
class Wire:
    name: str  # a cell's other input (fed at every step) or one of its states (its initial value)
    chain: "Chain"
    loc: Loc


@dataclass(frozen=True)
class Stage:
    name: str
    wires: tuple[Wire, ...]
    loc: Loc


@dataclass(frozen=True)
class Chain:
    source: Source
    stages: tuple[Stage, ...]
    loc: Loc


@dataclass(frozen=True)
class Flow:
    name: str | None  # `a = chain`, `output a = chain`, or an unnamed chain that runs its layers
    chain: Chain
    output: bool
    loc: Loc


@dataclass(frozen=True)
class Network:
    name: str
    dims: tuple[tuple[str, Loc], ...]
    doc: str
    inputs: tuple[NetInput, ...]
    layers: tuple[Layer, ...]
    flows: tuple[Flow, ...]
    loc: Loc
