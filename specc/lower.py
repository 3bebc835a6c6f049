"""Stage 3: checked cell -> step IR (one timestep as a graph of typed operations)."""
from __future__ import annotations

from . import ast
from .check import CheckedCell, broadcast_one
from .ir import Builder, Graph, Type

_BINOPS = {"+": "add", "-": "sub", "*": "mul", "/": "div", "@": "matvec"}


def lower(cell: CheckedCell) -> Graph:
    b = Builder()
    env: dict[tuple[str, bool], int] = {}
    inputs, carries, params = [], [], []
    for d in cell.inputs:
        env[(d.name, False)] = b.add("input", (), (d.name,), type=Type(d.shape, True))
        inputs.append((d.name, env[(d.name, False)]))
    for d in cell.states:
        env[(d.name, False)] = b.add("carry", (), (d.name,), type=Type(d.shape, True))
    for d in cell.params:
        env[(d.name, False)] = b.add("param", (), (d.name,), type=Type(d.shape, False))
        params.append((d.name, env[(d.name, False)]))

    for eq in cell.equations:
        line = eq.loc.line
        if isinstance(eq.expr, ast.Call) and eq.expr.fn == "split":
            whole = _expr(b, eq.expr.args[0], env, line)
            # The split value is named after its parts (i_f_g_o), and its gradient d_i_f_g_o.
            b.name(whole, "_".join(_name(t) for t in eq.targets), line)
            parts = len(eq.targets)
            size = b.type(whole).shape[0] / parts
            for k, t in enumerate(eq.targets):
                part = b.add("slice", (whole,), (size * k, size * (k + 1)), name=_name(t), line=line)
                b.name(part, _name(t), line)
                env[(t.name, t.next)] = part
        else:
            value = _expr(b, eq.expr, env, line)
            b.name(value, _name(eq.targets[0]), line)
            env[(eq.targets[0].name, eq.targets[0].next)] = value

    for d in cell.states:
        carries.append((d.name, env[(d.name, False)], env[(d.name, True)]))
    outputs = tuple((name, env[(t.name, t.next)]) for name, t in cell.outputs)
    return Graph(tuple(b.nodes), tuple(inputs), tuple(carries), tuple(params), outputs)


def _per_example(b: Builder, v: int, line: int) -> int:
    t = b.type(v)
    if t.batched:
        return v
    return b.add("add", (v, b.add("zeros", (), (t.shape, True), line=line)), line=line)


def _name(t: ast.Target) -> str:
    return t.name + ("_next" if t.next else "")


def _expr(b: Builder, e: ast.Expr, env, line: int) -> int:
    if isinstance(e, ast.Num):
        return b.const(e.value)
    if isinstance(e, ast.Ref):
        return env[(e.name, e.next)]
    if isinstance(e, ast.Neg):
        return b.add("neg", (_expr(b, e.arg, env, line),), line=line)
    if isinstance(e, ast.BinOp):
        left, right = _expr(b, e.left, env, line), _expr(b, e.right, env, line)
        if e.op != "@":  # check.broadcast_one: a [1] parameter beside a vector is a scalar
            lt, rt = b.type(left), b.type(right)
            left, right = (b.add("reshape", (v,), ((),), line=line) if broadcast_one(t, o) != t else v
                           for v, t, o in ((left, lt, rt), (right, rt, lt)))
        return b.add(_BINOPS[e.op], (left, right), line=line)
    if isinstance(e, ast.Concat):
        return b.add("concat", tuple(_expr(b, a, env, line) for a in e.items), line=line)
    args = [_expr(b, a, env, line) for a in e.args]
    if e.fn == "concat":
        return b.add("concat", tuple(args), line=line)
    if e.fn == "contract":
        # sum_jk W_ijk a_j b_k = W.reshape(M, N*K) @ outer(a, b): one matrix product.
        w, x, y = args
        m, n, k = b.type(w).shape
        # Every backend's outer product takes two per-example vectors: one made of parameters
        # alone is broadcast over the batch first (its gradient is summed back by add's VJP).
        x, y = (_per_example(b, v, line) if b.type(x).batched != b.type(y).batched else v for v in (x, y))
        flat = b.add("reshape", (w,), ((m, n * k),), line=line)
        return b.add("matvec", (flat, b.add("outer", (x, y), line=line)), line=line)
    return b.add(e.fn, tuple(args), line=line)
