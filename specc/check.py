"""Stage 2: AST -> checked cell. Every name resolves, every shape agrees, every state gets exactly
one next value, and no value within a step depends on itself. All problems found are reported
together, each at its line and column.
"""
from __future__ import annotations

import difflib
import keyword
from dataclasses import dataclass

from . import ast, ops
from .errors import Collector, Loc, SpecError
from .ir import Type
from .shapes import Shape, Size, shape_str

# Initialisers and how many scalar arguments each takes.
INITS = {
    "zeros": (0,), "ones": (0,), "constant": (1,), "uniform": (1, 2), "normal": (1, 2),
    "orthogonal": (0, 1), "identity": (0, 1),
}
STATE_INITS = ("zeros", "ones", "constant")
# Names the generated code reserves for itself; a spec may not take them.
RESERVED = {"np", "tl", "triton", "torch", "self", "T", "B", "t", "rows", "dims", "specc"}


@dataclass(frozen=True)
class Decl:
    name: str
    shape: Shape
    init: ast.Init | None
    loc: Loc


@dataclass(frozen=True)
class Equation:
    targets: tuple[ast.Target, ...]
    expr: ast.Expr
    loc: Loc


@dataclass(frozen=True)
class CheckedCell:
    name: str
    doc: str
    file: str
    dims: tuple[str, ...]
    inputs: tuple[Decl, ...]
    states: tuple[Decl, ...]
    params: tuple[Decl, ...]
    equations: tuple[Equation, ...]  # in an order where every value is defined before use
    outputs: tuple[tuple[str, ast.Target], ...]
    loc: Loc


def dim_size(d: ast.Dim, dims: set[str], errors: Collector) -> Size | None:
    """A shape entry as a polynomial in the dimensions, or None after reporting why not."""
    if isinstance(d, ast.DimNum):
        if d.value != int(d.value) or d.value < 0:
            errors.error(d.loc, f"a size must be a whole number, got {d.value:g}")
            return None
        return Size.of(int(d.value))
    if isinstance(d, ast.DimName):
        if d.name not in dims:
            errors.error(d.loc, f"unknown dimension '{d.name}'" + _suggest(d.name, dims)
                         + (f"; declare it in the cell's header, e.g. cell name({', '.join(sorted(dims) + [d.name])})"))
            return None
        return Size.of(d.name)
    if isinstance(d, ast.DimNeg):
        inner = dim_size(d.arg, dims, errors)
        return None if inner is None else -inner
    if isinstance(d, ast.DimCall):
        errors.error(d.loc, f"{d.fn}(...) cannot be used in a shape")
        return None
    left, right = dim_size(d.left, dims, errors), dim_size(d.right, dims, errors)
    if left is None or right is None:
        return None
    if d.op == "/":
        k = right.constant
        if k is None or k.denominator != 1 or k <= 0:
            errors.error(d.loc, "a size can only be divided by a positive whole number")
            return None
        return left / int(k)
    return {"+": left + right, "-": left - right, "*": left * right}[d.op]


def check_scalar(d: ast.Dim, dims: set[str], errors: Collector) -> None:
    """Initialiser arguments: numbers, dimensions, + - * / and sqrt."""
    if isinstance(d, ast.DimName) and d.name not in dims:
        errors.error(d.loc, f"unknown dimension '{d.name}'" + _suggest(d.name, dims))
    elif isinstance(d, ast.DimCall):
        if d.fn != "sqrt":
            errors.error(d.loc, f"unknown function '{d.fn}' in an initialiser; only sqrt is allowed")
        check_scalar(d.arg, dims, errors)
    elif isinstance(d, ast.DimNeg):
        check_scalar(d.arg, dims, errors)
    elif isinstance(d, ast.DimBin):
        check_scalar(d.left, dims, errors)
        check_scalar(d.right, dims, errors)


def _suggest(name: str, candidates) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1)
    return f"; did you mean '{close[0]}'?" if close else ""


def check(spec: ast.Spec) -> list[CheckedCell]:
    errors = Collector()
    cells = []
    seen = {}
    for cell in spec.cells:
        if cell.name in seen:
            errors.error(cell.loc, f"cell '{cell.name}' is defined twice (first at line {seen[cell.name].line})")
        seen[cell.name] = cell.loc
        checked = _check_cell(cell, spec.file, errors)
        if checked is not None:
            cells.append(checked)
    errors.raise_if_any()
    return cells


def _check_cell(cell: ast.Cell, file: str, errors: Collector) -> CheckedCell | None:
    start = len(errors.diagnostics)
    defined: dict[str, Loc] = {}

    def define(name: str, loc: Loc, what: str) -> bool:
        if keyword.iskeyword(name) or name in RESERVED or name.startswith("__"):
            errors.error(loc, f"'{name}' is a reserved name; choose another name for this {what}")
            return False
        if name in defined:
            errors.error(loc, f"'{name}' is defined twice (first at line {defined[name].line})")
            return False
        defined[name] = loc
        return True

    dims: set[str] = set()
    for name, loc in cell.dims:
        if define(name, loc, "dimension"):
            dims.add(name)

    def shape_of(dims_ast) -> Shape | None:
        sizes = [dim_size(d, dims, errors) for d in dims_ast]
        return None if any(s is None for s in sizes) else tuple(sizes)

    def check_init(init: ast.Init | None, allowed) -> None:
        if init is None:
            return
        if init.name not in allowed:
            errors.error(init.loc, f"unknown initialiser '{init.name}'; expected one of {', '.join(allowed)}")
            return
        counts = INITS[init.name]
        if len(init.args) not in counts:
            want = " or ".join(str(c) for c in counts)
            errors.error(init.loc, f"{init.name} takes {want} argument{'s' if counts[-1] != 1 else ''}, "
                                   f"got {len(init.args)}")
        for a in init.args:
            check_scalar(a, dims, errors)

    inputs, states, params = [], [], []
    assigns: list[ast.Assign] = []
    outputs: list[ast.Output] = []
    for s in cell.stmts:
        if isinstance(s, ast.Input):
            shape = shape_of(s.shape)
            if define(s.name, s.loc, "input") and shape is not None:
                if len(shape) != 1:
                    errors.error(s.loc, f"input '{s.name}' must be a vector, got {shape_str(shape)}")
                inputs.append(Decl(s.name, shape, None, s.loc))
        elif isinstance(s, ast.State):
            shape = shape_of(s.shape)
            check_init(s.init, STATE_INITS)
            if define(s.name, s.loc, "state") and shape is not None:
                if len(shape) != 1:
                    errors.error(s.loc, f"state '{s.name}' must be a vector, got {shape_str(shape)}")
                states.append(Decl(s.name, shape, s.init, s.loc))
        elif isinstance(s, ast.Param):
            shape = shape_of(s.shape)
            check_init(s.init, tuple(INITS))
            if define(s.name, s.loc, "parameter") and shape is not None:
                if len(shape) > 3:
                    errors.error(s.loc, f"parameter '{s.name}' has {len(shape)} axes; at most 3 are supported")
                params.append(Decl(s.name, shape, s.init, s.loc))
        elif isinstance(s, ast.Assign):
            assigns.append(s)
        elif isinstance(s, ast.Output):
            outputs.append(s)

    state_names = {d.name for d in states}
    # Every value the step defines: key (name, is_next) -> defining equation.
    defs: dict[tuple[str, bool], Equation] = {}
    equations: list[Equation] = []
    for a in assigns + [o for o in outputs if o.expr is not None]:
        targets = a.targets if isinstance(a, ast.Assign) else (a.target,)
        ok = True
        for t in targets:
            if t.next:
                if t.name not in state_names:
                    what = "is not declared" if t.name not in defined else "is not a state"
                    errors.error(t.loc, f"{t.name}' gives a next value, but '{t.name}' {what}; "
                                        f"only states have next values")
                    ok = False
                elif (t.name, True) in defs:
                    errors.error(t.loc, f"{t.name}' is defined twice (first at line {defs[(t.name, True)].loc.line})")
                    ok = False
            else:
                if t.name in state_names:
                    errors.error(t.loc, f"cannot assign to state '{t.name}'; write {t.name}' = ... for its next value")
                    ok = False
                elif not define(t.name, t.loc, "value"):
                    ok = False
        eq = Equation(tuple(targets), a.expr, a.loc)
        if ok:
            for t in targets:
                defs[(t.name, t.next)] = eq
            equations.append(eq)

    for d in states:
        if (d.name, True) not in defs:
            errors.error(d.loc, f"state '{d.name}' has no next value; add an equation {d.name}' = ...")
    if not outputs:
        errors.error(cell.loc, f"cell '{cell.name}' has no output; add a line such as: output h'")
    output_list = []
    output_names: dict[str, Loc] = {}
    for o in outputs:
        t = o.target
        if o.expr is None and (t.name, t.next) not in defs and not (t.next is False and t.name in state_names):
            errors.error(t.loc, f"unknown value '{t}' in output" + _suggest(t.name, [k[0] for k in defs]))
            continue
        if t.name in output_names:
            errors.error(t.loc, f"output '{t.name}' is declared twice (first at line {output_names[t.name].line})")
            continue
        output_names[t.name] = t.loc
        output_list.append((t.name, t))

    if len(errors.diagnostics) > start:
        return None

    env: dict[tuple[str, bool], Type] = {}
    for d in inputs:
        env[(d.name, False)] = Type(d.shape, True)
    for d in states:
        env[(d.name, False)] = Type(d.shape, True)
    for d in params:
        env[(d.name, False)] = Type(d.shape, False)

    ordered = _order(equations, defs, errors)
    if ordered is None:
        return None
    for eq in ordered:
        _check_equation(eq, env, defined, errors, state_names)
    for d in states:
        got = env.get((d.name, True))
        if got is not None and (got.shape != d.shape or not got.batched):
            eq = defs[(d.name, True)]
            errors.error(eq.targets[0].loc, f"{d.name}' has shape {shape_str(got.shape)}, "
                                            f"but state '{d.name}' is declared {shape_str(d.shape)}")
    for name, t in output_list:
        got = env.get((t.name, t.next))
        if got is not None and (len(got.shape) != 1 or not got.batched):
            errors.error(t.loc, f"output '{name}' must be a per-example vector, got {got}")
    if len(errors.diagnostics) > start:
        return None
    return CheckedCell(cell.name, cell.doc, file, tuple(n for n, _ in cell.dims), tuple(inputs), tuple(states),
                       tuple(params), tuple(ordered), tuple(output_list), cell.loc)


def _refs(expr: ast.Expr):
    if isinstance(expr, ast.Ref):
        yield expr
    elif isinstance(expr, ast.BinOp):
        yield from _refs(expr.left)
        yield from _refs(expr.right)
    elif isinstance(expr, ast.Neg):
        yield from _refs(expr.arg)
    elif isinstance(expr, (ast.Call, ast.Concat)):
        for a in (expr.args if isinstance(expr, ast.Call) else expr.items):
            yield from _refs(a)


def _order(equations: list[Equation], defs, errors: Collector) -> list[Equation] | None:
    """Equations in dependency order (they may be written in any order), or None on a cycle."""
    ordered: list[Equation] = []
    state: dict[int, str] = {}  # id(eq) -> "visiting" | "done"

    def visit(eq: Equation, path: list[Equation]) -> bool:
        s = state.get(id(eq))
        if s == "done":
            return True
        if s == "visiting":
            cycle = path[path.index(eq):] + [eq]
            names = " -> ".join(str(e.targets[0]) for e in cycle)
            errors.error(eq.loc, f"{eq.targets[0]} depends on itself within one step: {names}")
            return False
        state[id(eq)] = "visiting"
        for r in _refs(eq.expr):
            dep = defs.get((r.name, r.next))
            if dep is not None and not visit(dep, path + [eq]):
                return False
        state[id(eq)] = "done"
        ordered.append(eq)
        return True

    for eq in equations:
        if not visit(eq, []):
            return None
    return ordered


def _check_equation(eq: Equation, env, defined, errors: Collector, state_names) -> None:
    expr = eq.expr
    if isinstance(expr, ast.Call) and expr.fn == "split":
        if len(expr.args) != 2 or not isinstance(expr.args[1], ast.Num):
            errors.error(expr.loc, "split takes a value and a whole number of parts: split(v, 4)")
            return
        n = expr.args[1].value
        if n != int(n) or n < 1:
            errors.error(expr.args[1].loc, f"split needs a positive whole number of parts, got {n:g}")
            return
        if int(n) != len(eq.targets):
            errors.error(expr.loc, f"split(..., {int(n)}) gives {int(n)} values but {len(eq.targets)} "
                                   f"name{'s are' if len(eq.targets) != 1 else ' is'} assigned")
            return
        whole = type_of(expr.args[0], env, errors, state_names)
        if whole is None:
            return
        if len(whole.shape) != 1:
            errors.error(expr.loc, f"split needs a vector, got {shape_str(whole.shape)}")
            return
        for t in eq.targets:
            env[(t.name, t.next)] = Type((whole.shape[0] / int(n),), whole.batched)
        return
    if len(eq.targets) != 1:
        errors.error(eq.loc, f"{len(eq.targets)} names are assigned but the right side gives one value; "
                             f"use split(v, {len(eq.targets)}) to give several")
        return
    t = type_of(expr, env, errors, state_names)
    if t is not None:
        env[(eq.targets[0].name, eq.targets[0].next)] = t


def type_of(expr: ast.Expr, env, errors: Collector, state_names=()) -> Type | None:
    """The type of an expression, or None after reporting why it has none."""
    if isinstance(expr, ast.Num):
        return Type((), False)
    if isinstance(expr, ast.Ref):
        t = env.get((expr.name, expr.next))
        if t is None:
            known = sorted({k[0] + ("'" if k[1] else "") for k in env})
            if expr.next and expr.name not in state_names:
                errors.error(expr.loc, f"'{expr.name}' is not a state, so {expr.name}' has no meaning")
            else:
                errors.error(expr.loc, f"unknown name '{expr.name}{chr(39) if expr.next else ''}'"
                             + _suggest(expr.name, known))
        return t
    if isinstance(expr, ast.Neg):
        return type_of(expr.arg, env, errors, state_names)
    if isinstance(expr, ast.BinOp):
        left = type_of(expr.left, env, errors, state_names)
        right = type_of(expr.right, env, errors, state_names)
        if left is None or right is None:
            return None
        op = {"+": "add", "-": "sub", "*": "mul", "/": "div", "@": "matvec"}[expr.op]
        return _infer(op, [left, right], (), expr.loc, errors)
    if isinstance(expr, ast.Concat):
        items = [type_of(a, env, errors, state_names) for a in expr.items]
        return None if any(i is None for i in items) else _infer("concat", items, (), expr.loc, errors)
    # a call
    if expr.fn == "split":
        errors.error(expr.loc, "split gives several values; assign them to names: a, b = split(v, 2)")
        return None
    if expr.fn not in ops.FUNCTIONS:
        errors.error(expr.loc, f"unknown function '{expr.fn}'" + _suggest(expr.fn, ops.FUNCTIONS))
        return None
    arity = ops.FUNCTIONS[expr.fn]
    if arity is not None and len(expr.args) != arity:
        errors.error(expr.loc, f"{expr.fn} takes {arity} argument{'s' if arity != 1 else ''}, got {len(expr.args)}")
        return None
    args = [type_of(a, env, errors, state_names) for a in expr.args]
    if any(a is None for a in args):
        return None
    if expr.fn == "concat":
        return _infer("concat", args, (), expr.loc, errors)
    if expr.fn == "contract":
        w, a, b = args
        if len(w.shape) != 3 or w.batched:
            errors.error(expr.loc, f"contract(W, a, b) needs a three-axis W, got {w}")
            return None
        outer = _infer("outer", [a, b], (), expr.loc, errors)
        if outer is None:
            return None
        if (w.shape[1], w.shape[2]) != (a.shape[0], b.shape[0]):
            errors.error(expr.loc, f"contract(W, a, b): W is {shape_str(w.shape)} but a is {shape_str(a.shape)} "
                                   f"and b is {shape_str(b.shape)}")
            return None
        return Type((w.shape[0],), outer.batched)
    return _infer(expr.fn, args, (), expr.loc, errors)


def _infer(op, args, attrs, loc, errors: Collector) -> Type | None:
    try:
        return ops.infer(op, args, attrs)
    except ops.ShapeError as e:
        errors.error(loc, str(e))
        return None


def check_dims(cell: CheckedCell, values: dict[str, int]) -> dict[str, int]:
    """Bind the cell's dimensions; every size in it must come out a positive whole number."""
    errors = Collector()
    for k in values:
        if k not in cell.dims:
            errors.error(None, f"cell '{cell.name}' has no dimension '{k}'; its dimensions are "
                               f"{', '.join(cell.dims) or 'none'}")
    missing = [d for d in cell.dims if d not in values]
    if missing:
        errors.error(cell.loc, f"dimension{'s' if len(missing) > 1 else ''} {', '.join(missing)} of cell "
                               f"'{cell.name}' not bound; pass {', '.join(f'{d}=...' for d in missing)}")
    for k, v in values.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            errors.error(None, f"dimension {k} must be a positive whole number, got {v!r}")
    errors.raise_if_any()
    return dict(values)
