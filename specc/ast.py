"""The spec as written: frozen AST nodes, each carrying the location it came from."""
from __future__ import annotations

from dataclasses import dataclass

from .errors import Loc


# --- dimension and initialiser arithmetic (scalars known once dimensions are bound) ---

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
