"""Stage 3: checked cell -> step IR (one timestep as a graph of typed operations)."""
from __future__ import annotations

from . import ast, ops
from .check import CheckedCell, broadcast_one, number_written
from .ir import Builder, Graph, Type
from .shapes import Size

_BINOPS = {"+": "add", "-": "sub", "*": "mul", "/": "div", "@": "matvec"}


def lower(cell: CheckedCell) -> Graph:
    b = Builder()
    env: dict[tuple[str, bool], int] = {}
    inputs, carries, params = [], [], []
    for d in cell.inputs:
        env[(d.name, False)] = b.add("input", (), (d.name,), type=Type(d.shape, True))
        inputs.append((d.name, env[(d.name, False)]))
    # dropout(v, p) and zoneout(a, v, p) read the mask the module drew for them (check.Noise)
    env.update({("noise", n.loc.line, n.loc.col): env[(n.name, False)] for n in cell.noise})
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


def _binary(b: Builder, op: str, left: int, right: int, line: int) -> int:
    """An elementwise op of two values, broadcast as the checker typed them."""
    lt, rt = b.type(left), b.type(right)
    # check.broadcast_one: a [1] parameter beside a vector is a scalar (a per-example [1] is
    # widened by expand below instead: no reshape inside the recurrence)
    left, right = (b.add("reshape", (v,), ((),), line=line) if broadcast_one(t, o) != t and not t.batched else v
                   for v, t, o in ((left, lt, rt), (right, rt, lt)))
    left, right = _widened(b, left, right, line), _widened(b, right, left, line)
    return b.add(op, (left, right), line=line)


# The functions of several arguments, made of primitives. Where the step function picks one side,
# both sides are multiplied by 0 or 1 and added, which is exact for finite numbers, and the
# gradient goes where torch's does: to both halves on a tie of maximum, to the slope at 0 for
# leaky_relu, through clamp's bounds themselves.

def _sign(b: Builder, d: int, line: int) -> int:
    return b.add("sub", (b.add("step", (d,), line=line), b.add("step", (b.add("neg", (d,), line=line),), line=line)),
                 line=line)


def _maximum(b: Builder, args, numbers, line: int, larger: bool = True) -> int:
    x, y = args
    sign = _sign(b, _binary(b, "sub", x, y, line), line)
    half = b.add("mul", (b.const(0.5 if larger else -0.5), sign), line=line)
    w = b.add("add", (b.const(0.5), half), line=line)  # 1 where x wins, 0 where y does, 1/2 on a tie
    rest = b.add("sub", (b.const(1), w), line=line)
    return b.add("add", (_binary(b, "mul", w, x, line), _binary(b, "mul", rest, y, line)), line=line)


def _leaky_relu(b: Builder, args, numbers, line: int) -> int:
    v, slope = args
    up = b.add("step", (v,), line=line)
    factor = b.add("add", (up, b.add("mul", (b.add("sub", (b.const(1), up), line=line), slope), line=line)), line=line)
    return b.add("mul", (v, factor), line=line)


def _clamp(b: Builder, args, numbers, line: int) -> int:
    v, lo, hi = args
    below = b.add("step", (b.add("sub", (lo, v), line=line),), line=line)
    above = b.add("step", (b.add("sub", (v, hi), line=line),), line=line)
    inside = b.add("sub", (b.add("sub", (b.const(1), below), line=line), above), line=line)
    kept = b.add("mul", (v, inside), line=line)
    return b.add("add", (kept, b.add("add", (b.add("mul", (below, lo), line=line), b.add("mul", (above, hi), line=line)),
                                         line=line)), line=line)


def _pow(b: Builder, args, numbers, line: int) -> int:
    """Whole powers as products (so that negative numbers have them), halves as square roots."""
    v, k = args[0], numbers[1]
    if k == 0.5:
        return b.add("sqrt", (v,), line=line)
    if k == -0.5:
        return b.add("rsqrt", (v,), line=line)
    if k != int(k):
        return b.add("pow", (v, b.const(k)), line=line)
    n, result, square = abs(int(k)), None, v
    while n:
        if n & 1:
            result = square if result is None else b.add("mul", (result, square), line=line)
        n >>= 1
        if n:
            square = b.add("mul", (square, square), line=line)
    return result if k > 0 else b.add("div", (b.const(1), result), line=line)


_TWO_ARGUMENTS = {"maximum": _maximum, "minimum": lambda b, a, n, line: _maximum(b, a, n, line, larger=False),
                  "leaky_relu": _leaky_relu, "clamp": _clamp, "pow": _pow}


def _widened(b: Builder, v: int, other: int, line: int) -> int:
    """A reduction's number (a [1] vector) beside a wider vector, broadcast to its width: the
    checker typed it as a scalar. (A [1] parameter beside a vector was made a scalar before this.)"""
    t, o = b.type(v), b.type(other)
    one = (Size.of(1),)
    if t.shape == one and len(o.shape) == 1 and o.shape != one:
        return b.add("expand", (v,), (o.shape[0], Size.of(1)), line=line)
    return v


_REDUCED = {"sum": "rowsum", "mean": "rowsum", "max": "rowmax"}


def _reduced(b: Builder, fn: str, v: int, line: int) -> int:
    total = b.add(_REDUCED[fn], (v,), line=line)
    if fn != "mean":
        return total
    return b.add("expand", (total,), (Size.of(1), b.type(v).shape[0]), line=line)


def _norm(b: Builder, fn: str, v: int, line: int) -> int:
    """layernorm(v) = (v - mean(v)) / sqrt(mean((v - mean(v))^2) + eps); rmsnorm(v) = v / sqrt(mean(v^2) + eps)."""
    n = b.type(v).shape[0]
    centred = v
    if fn == "layernorm":
        centred = b.add("sub", (v, b.add("expand", (b.add("rowsum", (v,), line=line),), (n, n), line=line)), line=line)
    square = b.add("mul", (centred, centred), line=line)
    variance = b.add("expand", (b.add("rowsum", (square,), line=line),), (Size.of(1), n), line=line)
    scale = b.add("rsqrt", (b.add("add", (variance, b.const(ops.NORM_EPS)), line=line),), line=line)
    return b.add("mul", (centred, b.add("expand", (scale,), (n, Size.of(1)), line=line)), line=line)


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
        if e.op == "@":
            if len(b.type(left).shape) == 3:  # W[N, R, C] @ v: one block of W a head
                left = b.add("blockdiag", (left,), line=line)
            return b.add("matvec", (left, right), line=line)
        return _binary(b, _BINOPS[e.op], left, right, line)
    if isinstance(e, ast.Concat):
        return b.add("concat", tuple(_expr(b, a, env, line) for a in e.items), line=line)
    args = [_expr(b, a, env, line) for a in e.args]
    if e.fn == "concat":
        return b.add("concat", tuple(args), line=line)
    if e.fn in ("dropout", "zoneout"):
        mask = env[("noise", e.loc.line, e.loc.col)]
        if e.fn == "dropout":  # the mask is 0 or 1 / (1 - p) while training, 1 in eval
            return _binary(b, "mul", args[0], mask, line)
        # zoneout(v_next, v, p): the mask is 1 (keep v) or 0 while training, p in eval
        kept = _binary(b, "mul", mask, args[1], line)
        return _binary(b, "add", kept, _binary(b, "mul", b.add("sub", (b.const(1), mask), line=line), args[0], line), line)
    if e.fn in _TWO_ARGUMENTS:
        return _TWO_ARGUMENTS[e.fn](b, args, [number_written(a) for a in e.args], line)
    if e.fn in _REDUCED:
        return _reduced(b, e.fn, args[0], line)
    if e.fn in ("layernorm", "rmsnorm"):
        return _norm(b, e.fn, args[0], line)
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
