"""Checked cell -> checked cell whose dimensions the generated code can take as its own names.

The generated functions take a cell's dimensions as keyword arguments, beside their own T, B,
np, torch, ... A dimension named like one of those (`cell c(B, H)`, B a bottleneck's width) is
renamed in the generated code only (B -> B_): the module's `DIM_NAMES` maps the spec's names to
the code's, and the runtime translates, so that `specc.load(spec, B=8, H=16)` and `module.dims`
keep the spec's names. Values are renamed by each backend's own Namer instead.
"""
from __future__ import annotations

from dataclasses import replace

from . import ast
from .check import RESERVED, RESERVED_DIMS, CheckedCell, Decl, SizeRule
from .shapes import Size


def code_dims(cell: CheckedCell) -> CheckedCell:
    """The cell with each clashing dimension renamed (recorded in cell.dim_names)."""
    clashing = [d for d in cell.dims if d in RESERVED or d in RESERVED_DIMS]
    if not clashing:
        return cell
    taken = set(cell.dims) | RESERVED | RESERVED_DIMS
    names: dict[str, str] = {}
    for d in clashing:
        new = d + "_"
        while new in taken:
            new += "_"
        taken.add(new)
        names[d] = new

    def decl(d: Decl) -> Decl:
        init = d.init and replace(d.init, args=tuple(_dim(a, names) for a in d.init.args))
        return replace(d, shape=tuple(_size(s, names) for s in d.shape), init=init)

    return replace(cell, dims=tuple(names.get(d, d) for d in cell.dims),
                   inputs=tuple(map(decl, cell.inputs)), states=tuple(map(decl, cell.states)),
                   params=tuple(map(decl, cell.params)),
                   sizes=tuple(SizeRule(_size(r.size, names), r.what, r.loc) for r in cell.sizes),
                   dim_names=tuple(names.items()))


def _size(s: Size, names: dict[str, str]) -> Size:
    acc: dict = {}
    for mono, coeff in s.terms:
        key = tuple(sorted(names.get(n, n) for n in mono))
        acc[key] = acc.get(key, 0) + coeff
    return Size._make(acc)


def _dim(d: ast.Dim, names: dict[str, str]) -> ast.Dim:
    """An initialiser's argument (uniform(1 / sqrt(H))) with the dimensions renamed."""
    if isinstance(d, ast.DimName):
        return replace(d, name=names.get(d.name, d.name))
    if isinstance(d, ast.DimBin):
        return replace(d, left=_dim(d.left, names), right=_dim(d.right, names))
    if isinstance(d, (ast.DimCall, ast.DimNeg)):
        return replace(d, arg=_dim(d.arg, names))
    return d
