"""The primitives: for each, its type rule and its vector-Jacobian product, side by side.

`infer` gives an op's result type (or raises ShapeError with a message for the checker);
`VJP[op](b, node, args, out, g)` builds, with Builder `b`, the gradient contribution of each
argument of the forward `node`, given the ids in `b` of its arguments (`args`), of its value
(`out`) and of the gradient of its value (`g`); None where an argument gets no gradient.

Activations are one table, `ACTIVATIONS`: their VJP, and how each backend spells them. Adding one
is adding a row there.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from .shapes import Size, Type, shape_str

if TYPE_CHECKING:  # ops builds gradients with an ir.Builder, which reads the type rules here
    from .ir import Builder


class ShapeError(Exception):
    pass


@dataclass(frozen=True)
class Activation:
    """One activation: its gradient, its value on a number, and how each backend spells it. Each
    spelling is an expression in {x}, an argument's code (a name, or in C and Triton an expression
    too: a spelling that reads {x} more than once relies on the compiler to compute it once)."""

    vjp: Callable  # (b, x, y, g) -> gradient of x; x the argument, y the value
    scalar: Callable  # of a Python float: a function of numbers alone is folded to a number
    numpy: str  # for arrays; may call the helpers of backends/numpy_runtime as rt.NAME
    numpy_out: str | None  # the same, written into {out}; None: computed, then copied there
    torch: str  # for torch tensors (the host code of the Triton and C backends, outside the loop)
    triton: str  # for tl tensors inside a kernel (float32)
    c: str  # for a float inside the C loop
    # Functions the spellings call, defined once in each generated module: the source of a
    # @triton.jit function, and of a `static inline float` C function (after sp_exp of the prelude).
    triton_helper: str = ""
    c_helper: str = ""


def _sigmoid_vjp(b, x, y, g):
    return b.add("mul", (g, b.add("mul", (y, b.add("sub", (b.const(1), y))))))


def _tanh_vjp(b, x, y, g):
    return b.add("mul", (g, b.add("sub", (b.const(1), b.add("mul", (y, y))))))


def _gelu_vjp(b, x, y, g):
    """gelu(x) = x (1 + tanh(u)) / 2, u = c (x + a x^3): gelu'(x) = (1 + tanh u) / 2 + x (1 - tanh^2 u) c (1 + 3 a x^2) / 2."""
    c, a = math.sqrt(2 / math.pi), 0.044715

    def mul(p, q):
        return b.add("mul", (p, q))

    def add(p, q):
        return b.add("add", (p, q))

    x2 = mul(x, x)
    t = b.add("tanh", (mul(b.const(c), add(x, mul(b.const(a), mul(x2, x)))),))
    slope = mul(b.const(0.5 * c), mul(x, mul(b.add("sub", (b.const(1), mul(t, t))), add(b.const(1), mul(b.const(3 * a), x2)))))
    return mul(g, add(mul(b.const(0.5), add(b.const(1), t)), slope))


def _silu_vjp(b, x, y, g):
    s = b.add("sigmoid", (x,))
    return b.add("mul", (g, b.add("mul", (s, b.add("add", (b.const(1), b.add("mul", (x, b.add("sub", (b.const(1), s))))))))))


def _elu_vjp(b, x, y, g):
    above = b.add("step", (x,))
    return b.add("mul", (g, b.add("add", (above, b.add("mul", (b.add("sub", (b.const(1), above)), b.add("add", (y, b.const(1)))))))))


def _between(b, x, g, edge: float, slope: float):
    """g * slope where -edge < x < edge, else 0 (hardtanh's, hardsigmoid's derivative)."""
    inside = b.add("mul", (b.add("step", (b.add("add", (x, b.const(edge))),)),
                           b.add("step", (b.add("sub", (b.const(edge), x)),))))
    return b.add("mul", (g, inside if slope == 1.0 else b.add("mul", (b.const(slope), inside))))


def _softsign_vjp(b, x, y, g):
    d = b.add("add", (b.const(1), b.add("abs", (x,))))
    return b.add("div", (g, b.add("mul", (d, d))))


_TANH_TRITON = """def _tanh(x):
    \"\"\"Within 2 ulps. 2 * sigmoid(2x) - 1 loses a small tanh to the 1 it subtracts (tanh(1e-5) up
    to 0.6% off); near 0 a polynomial (Cephes' tanhf), elsewhere 1 - 2 / (exp(2|x|) + 1).\"\"\"
    a = tl.abs(x)
    z = x * x
    small = ((((-5.70498872745e-3 * z + 2.06390887954e-2) * z - 5.37397155531e-2) * z
              + 1.33314422036e-1) * z - 3.33332819422e-1) * z * x + x
    large = 1.0 - 2.0 / (tl.exp(2.0 * a) + 1.0)
    return tl.where(a < 0.625, small, tl.where(x < 0.0, -large, large))
"""
_TANH_C = """static inline float sp_tanh(float x) {
    float ax = fabsf(x), z = x * x;
    float small = ((((-5.70498872745e-3f * z + 2.06390887954e-2f) * z - 5.37397155531e-2f) * z
                    + 1.33314422036e-1f) * z - 3.33332819422e-1f) * z * x + x;
    float big = 1.0f - 2.0f / (sp_exp(2.0f * ax) + 1.0f);
    big = x < 0.0f ? -big : big;
    return ax < 0.625f ? small : big;
}
"""
_SOFTPLUS_TRITON = """def _softplus(x):
    \"\"\"log(1 + u), u = exp(-|x|), as log(w) * u / (w - 1), w = 1 + u, which cancels the rounding of
    w (log(w) alone: log(1 + 1e-5) up to 0.6% off); u itself where w rounds to 1.\"\"\"
    u = tl.exp(-tl.abs(x))
    w = 1.0 + u
    d = w - 1.0
    return tl.maximum(x, 0.0) + tl.where(d == 0.0, u, tl.log(w) * u / tl.where(d == 0.0, 1.0, d))
"""

ACTIVATIONS: dict[str, Activation] = {
    "sigmoid": Activation(
        _sigmoid_vjp, lambda x: 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x)),
        numpy="rt.sigmoid({x})", numpy_out="rt.sigmoid({x}, out={out})", torch="torch.sigmoid({x})",
        triton="tl.sigmoid({x})", c="sp_sigmoid({x})",
        c_helper="static inline float sp_sigmoid(float x) { return 1.0f / (1.0f + sp_exp(-x)); }\n"),
    "tanh": Activation(
        _tanh_vjp, math.tanh, numpy="np.tanh({x})", numpy_out="np.tanh({x}, out={out})", torch="torch.tanh({x})",
        triton="_tanh({x})", c="sp_tanh({x})", triton_helper=_TANH_TRITON, c_helper=_TANH_C),
    "relu": Activation(
        lambda b, x, y, g: b.add("mul", (g, b.add("step", (x,)))), lambda x: max(x, 0.0),
        numpy="np.maximum({x}, 0)", numpy_out="np.maximum({x}, 0, out={out})", torch="torch.relu({x})",
        triton="tl.maximum({x}, 0.0)", c="({x} < 0.0f ? 0.0f : {x})"),  # NaN stays NaN, as in torch
    "exp": Activation(
        lambda b, x, y, g: b.add("mul", (g, y)), math.exp, numpy="np.exp({x})", numpy_out="np.exp({x}, out={out})",
        torch="torch.exp({x})", triton="tl.exp({x})", c="sp_exp({x})"),
    "log": Activation(
        lambda b, x, y, g: b.add("div", (g, x)), math.log, numpy="np.log({x})", numpy_out="np.log({x}, out={out})",
        torch="torch.log({x})", triton="tl.log({x})", c="logf({x})"),
    "softplus": Activation(
        lambda b, x, y, g: b.add("mul", (g, b.add("sigmoid", (x,)))),
        lambda x: max(x, 0.0) + math.log1p(math.exp(-abs(x))),
        numpy="np.logaddexp(0, {x})", numpy_out="np.logaddexp(0, {x}, out={out})",
        torch="torch.logaddexp(torch.zeros_like({x}), {x})", triton="_softplus({x})", c="sp_softplus({x})",
        triton_helper=_SOFTPLUS_TRITON,
        c_helper="static inline float sp_softplus(float x) { return fmaxf(x, 0.0f) + log1pf(sp_exp(-fabsf(x))); }\n"),
    # The tanh form (torch's gelu(x, approximate="tanh"), GPT-2's and BERT's), not the erf one:
    # NumPy has no erf.
    "gelu": Activation(
        _gelu_vjp, lambda x: 0.5 * x * (1 + math.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3))),
        numpy="0.5 * {x} * (1 + np.tanh(0.7978845608028654 * ({x} + 0.044715 * {x} * {x} * {x})))", numpy_out=None,
        torch="torch.nn.functional.gelu({x}, approximate='tanh')", triton="_gelu({x})", c="sp_gelu({x})",
        triton_helper="def _gelu(x):\n    return 0.5 * x * (1.0 + _tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))\n",
        c_helper="static inline float sp_gelu(float x) {\n"
                 "    return 0.5f * x * (1.0f + sp_tanh(0.7978845608f * (x + 0.044715f * x * x * x)));\n}\n"),
    "sqrt": Activation(
        lambda b, x, y, g: b.add("div", (b.add("mul", (b.const(0.5), g)), y)), math.sqrt,
        numpy="np.sqrt({x})", numpy_out="np.sqrt({x}, out={out})", torch="torch.sqrt({x})",
        triton="tl.sqrt_rn({x})", c="sqrtf({x})"),
    "rsqrt": Activation(
        lambda b, x, y, g: b.add("mul", (b.add("mul", (b.const(-0.5), g)), b.add("mul", (y, b.add("mul", (y, y)))))),
        lambda x: 1 / math.sqrt(x), numpy="1 / np.sqrt({x})", numpy_out="np.divide(1, np.sqrt({x}, out={out}), out={out})",
        torch="torch.rsqrt({x})", triton="(1.0 / tl.sqrt_rn({x}))", c="(1.0f / sqrtf({x}))"),
    # d|x| = sign(x), 0 at 0 as torch's: step(x) - step(-x).
    "abs": Activation(
        lambda b, x, y, g: b.add("mul", (g, b.add("sub", (b.add("step", (x,)), b.add("step", (b.add("neg", (x,)),)))))),
        abs, numpy="np.abs({x})", numpy_out="np.abs({x}, out={out})", torch="torch.abs({x})", triton="tl.abs({x})",
        c="fabsf({x})"),
    "square": Activation(
        lambda b, x, y, g: b.add("mul", (b.add("mul", (b.const(2), g)), x)), lambda x: x * x,
        numpy="np.square({x})", numpy_out="np.square({x}, out={out})", torch="torch.square({x})",
        triton="({x} * {x})", c="({x} * {x})"),
    # silu(x) = x sigmoid(x): s (1 + x (1 - s)).
    "silu": Activation(
        _silu_vjp, lambda x: x * ACTIVATIONS["sigmoid"].scalar(x), numpy="{x} * rt.sigmoid({x})", numpy_out=None,
        torch="torch.nn.functional.silu({x})", triton="({x} * tl.sigmoid({x}))", c="({x} * sp_sigmoid({x}))"),
    # elu with alpha 1 (torch's default): x above 0, exp(x) - 1 below; its slope there is y + 1.
    "elu": Activation(
        _elu_vjp, lambda x: x if x > 0 else math.expm1(x),
        numpy="np.where({x} > 0, {x}, np.expm1(np.minimum({x}, 0)))", numpy_out=None,
        torch="torch.nn.functional.elu({x})", triton="tl.where({x} > 0.0, {x}, tl.exp(tl.minimum({x}, 0.0)) - 1.0)",
        c="({x} > 0.0f ? {x} : sp_exp({x}) - 1.0f)"),
    # torch's: relu6(x + 3) / 6, slope 1/6 strictly between -3 and 3.
    "hardsigmoid": Activation(
        lambda b, x, y, g: _between(b, x, g, 3.0, 1 / 6), lambda x: min(max(x / 6 + 0.5, 0.0), 1.0),
        numpy="np.clip({x} / 6 + 0.5, 0, 1)", numpy_out="np.clip({x} / 6 + 0.5, 0, 1, out={out})",
        torch="torch.nn.functional.hardsigmoid({x})",
        triton="tl.minimum(tl.maximum({x} / 6.0 + 0.5, 0.0), 1.0)", c="fminf(fmaxf({x} / 6.0f + 0.5f, 0.0f), 1.0f)"),
    "hardtanh": Activation(
        lambda b, x, y, g: _between(b, x, g, 1.0, 1.0), lambda x: min(max(x, -1.0), 1.0),
        numpy="np.clip({x}, -1, 1)", numpy_out="np.clip({x}, -1, 1, out={out})",
        torch="torch.nn.functional.hardtanh({x})", triton="tl.minimum(tl.maximum({x}, -1.0), 1.0)",
        c="fminf(fmaxf({x}, -1.0f), 1.0f)"),
    # x / (1 + |x|): its slope is 1 / (1 + |x|)^2.
    "softsign": Activation(
        _softsign_vjp, lambda x: x / (1 + abs(x)), numpy="{x} / (1 + np.abs({x}))", numpy_out=None,
        torch="torch.nn.functional.softsign({x})", triton="({x} / (1.0 + tl.abs({x})))", c="({x} / (1.0f + fabsf({x})))"),
    # step is relu's derivative; it has no gradient of its own (no double backward).
    "step": Activation(
        lambda b, x, y, g: None, lambda x: float(x > 0), numpy="rt.step({x})", numpy_out="rt.step({x}, out={out})",
        torch="({x} > 0).to({x}.dtype)", triton="tl.where({x} > 0, 1.0, 0.0)", c="({x} > 0.0f ? 1.0f : 0.0f)"),
}


def helper_name(source: str) -> str:
    """The name of the function a helper's source defines (`def _tanh(x):`, `static inline float sp_tanh(float x)`)."""
    return source.split("(")[0].split()[-1]


def helper_names(field: str) -> set[str]:
    """The names of the helper functions the activations define (field "triton_helper" or "c_helper")."""
    return {helper_name(source) for a in ACTIVATIONS.values() if (source := getattr(a, field))}


ELEMENTWISE = ("add", "sub", "mul", "div")  # the binary ones; INFIX, below, spells them
# Reductions over a vector's own features, one number per example (sum(v), max(v)), and that
# number broadcast back over W features (divided by d: mean(v) is expand(rowsum(v), 1, n)). A
# per-example number is a [1] vector; `expand` is how it meets a wider one.
ROW_REDUCTIONS = ("rowsum", "rowmax")

# Ops whose batched arguments are summed over rows: over batch inside a step, over time x batch
# when the scheduler runs them after the loop.
REDUCTIONS = ("outer_sum", "contract_sum", "sum_rows", "sum_all")


def infer(op: str, args: list[Type], attrs: tuple) -> Type:
    if op in ELEMENTWISE:
        a, b = args
        if a.shape != b.shape and a.shape != () and b.shape != ():
            raise ShapeError(f"shapes {shape_str(a.shape)} and {shape_str(b.shape)} differ")
        if (a.batched and len(b.shape) > 1) or (b.batched and len(a.shape) > 1):
            raise ShapeError("a matrix cannot be combined elementwise with a per-example vector")
        return Type(a.shape if a.shape != () else b.shape, a.batched or b.batched)
    if op == "neg" or op in ACTIVATIONS or op == "pow":  # pow(v, k): k a number
        return args[0]
    if op == "softmax":
        if len(args[0].shape) != 1:
            raise ShapeError(f"softmax needs a vector, got {shape_str(args[0].shape)}")
        return args[0]
    if op == "softmax_vjp":
        return args[0]
    if op in ROW_REDUCTIONS:
        if len(args[0].shape) != 1:
            raise ShapeError(f"a reduction needs a vector, got {shape_str(args[0].shape)}")
        return Type((Size.of(1),), args[0].batched)
    if op == "expand":
        return Type((attrs[0],), args[0].batched)
    if op == "blockdiag":
        (w,) = args
        if len(w.shape) != 3 or w.batched:
            raise ShapeError(f"a block-diagonal matrix is made of a parameter [heads, rows, columns], got {w}")
        n, r, c = w.shape
        return Type((n * r, n * c), False)
    if op == "diagblocks":
        return Type(tuple(attrs), False)
    if op == "matvec":
        w, v = args
        if len(w.shape) == 3 and not w.batched:  # W[N, R, C] @ v[N*C]: the block-diagonal product
            n, r, c = w.shape
            if len(v.shape) != 1 or v.shape[0] != n * c:
                raise ShapeError(f"per-head product {shape_str(w.shape)} @ {shape_str(v.shape)}: the vector needs "
                                 f"{n} heads of {c} entries ({n * c}), got {v.shape[0] if v.shape else 'a number'}"
                                 "; contract(W, a, b) is the sum over j, k of W[i, j, k] a[j] b[k]")
            return Type((n * r,), v.batched)
        if len(w.shape) != 2 or w.batched:
            raise ShapeError(f"the left side of @ must be a matrix, got {shape_str(w.shape)}")
        if len(v.shape) != 1:
            raise ShapeError(f"the right side of @ must be a vector, got {shape_str(v.shape)}")
        if w.shape[1] != v.shape[0]:
            raise ShapeError(f"matrix {shape_str(w.shape)} @ vector {shape_str(v.shape)}: "
                             f"{w.shape[1]} columns but {v.shape[0]} entries")
        return Type((w.shape[0],), v.batched)
    if op == "matvec_t":
        w, g = args
        return Type((w.shape[1],), g.batched)
    if op == "outer_sum":
        g, v = args
        return Type((g.shape[0], v.shape[0]), False)
    if op == "contract_sum":  # sum over rows of g (x) a (x) b: contract(W, a, b)'s weight gradient
        g, a, b = args
        return Type((g.shape[0], a.shape[0] * b.shape[0]), False)
    if op == "sum_rows":
        return Type(args[0].shape, False)
    if op == "sum_all":
        return Type((), False)
    if op == "concat":
        if any(len(a.shape) == 0 for a in args):
            raise ShapeError("cannot concatenate scalars")
        if len({a.shape[1:] for a in args}) > 1:
            raise ShapeError("concatenated values differ in their trailing dimensions: "
                             + ", ".join(shape_str(a.shape) for a in args))
        if len({a.batched for a in args}) > 1:
            raise ShapeError("cannot concatenate a per-example value with a parameter")
        total = Size.of(0)
        for a in args:
            total = total + a.shape[0]
        return Type((total,) + args[0].shape[1:], args[0].batched)
    if op == "slice":
        start, stop = attrs
        return Type((stop - start,) + args[0].shape[1:], args[0].batched)
    if op == "zeros":
        shape, batched = attrs
        return Type(shape, batched)
    if op == "reshape":
        return Type(attrs[0], args[0].batched)
    if op == "outer":
        a, b = args
        if len(a.shape) != 1 or len(b.shape) != 1:
            raise ShapeError("contract(W, a, b) needs vectors a and b")
        return Type((a.shape[0] * b.shape[0],), a.batched or b.batched)
    if op in ("outer_vjp_a", "outer_vjp_b"):
        n, k = attrs
        return Type((n if op == "outer_vjp_a" else k,), args[0].batched)
    raise AssertionError(f"no type rule for op {op!r}")


# Numbers computed as the graph is built: `-0.5`, `2 * 3`, `tanh(0.5)` are constants, not values
# every backend would have to carry as a tensor of no shape.
_SCALAR = {
    "neg": lambda x: -x, "add": lambda x, y: x + y, "sub": lambda x, y: x - y, "mul": lambda x, y: x * y,
    "div": lambda x, y: x / y, "pow": math.pow, **{name: a.scalar for name, a in ACTIVATIONS.items()},
}


def _fold_constants(nodes, op: str, args: tuple) -> float | None:
    if op not in _SCALAR or not args or any(nodes[a].op != "const" for a in args):
        return None
    try:
        value = float(_SCALAR[op](*(nodes[a].attrs[0] for a in args)))
    except (ArithmeticError, ValueError):  # log(-1), 1/0: left to the backends' own arithmetic
        return None
    return value if math.isfinite(value) else None


def fold(b: Builder, op: str, args: tuple, attrs: tuple) -> int | None:
    """Algebraic simplifications applied as nodes are built: constants computed, x*1, x+0, x-0,
    --x, slice of all."""
    nodes = b.nodes

    def const(i):
        return nodes[i].attrs[0] if nodes[i].op == "const" else None

    value = _fold_constants(nodes, op, args)
    if value is not None:
        return b.const(value)

    if op == "mul":
        x, y = args
        if const(y) == 1.0 and nodes[x].type.shape != () :
            return x
        if const(x) == 1.0 and nodes[y].type.shape != ():
            return y
    if op in ("add", "sub") and const(args[1]) == 0.0 and nodes[args[0]].type.shape != ():
        return args[0]
    if op == "add" and const(args[0]) == 0.0 and nodes[args[1]].type.shape != ():
        return args[1]
    if op == "neg" and nodes[args[0]].op == "neg":
        return nodes[args[0]].args[0]
    if op == "slice" and attrs[0] == Size.of(0) and attrs[1] == nodes[args[0]].type.shape[0]:
        return args[0]
    return None


def unbroadcast(b: Builder, g: int, to: Type) -> int:
    """Sum a gradient down to the type of the value it is for (bias gradients sum over rows)."""
    gt = b.type(g)
    if gt.batched and not to.batched:
        return b.add("sum_all" if to.shape == () else "sum_rows", (g,))
    if gt.shape != () and to.shape == ():
        return b.add("sum_all", (g,))
    return g


def _elementwise_vjp(b: Builder, node, args, n: int, g: int):
    x, y = args
    tx, ty = b.type(x), b.type(y)
    if node.op == "add":
        return unbroadcast(b, g, tx), unbroadcast(b, g, ty)
    if node.op == "sub":
        return unbroadcast(b, g, tx), unbroadcast(b, b.add("neg", (g,)), ty)
    if node.op == "mul":
        return unbroadcast(b, b.add("mul", (g, y)), tx), unbroadcast(b, b.add("mul", (g, x)), ty)
    # div: d(x/y) = g/y, -g*x/y^2 = -(g/y)*(x/y)
    gy = b.add("div", (g, y))
    return unbroadcast(b, gy, tx), unbroadcast(b, b.add("neg", (b.add("mul", (gy, n)),)), ty)


def _activation_vjp(b: Builder, node, args, n: int, g: int):
    return (ACTIVATIONS[node.op].vjp(b, args[0], n, g),)


def _matvec_vjp(b: Builder, node, args, n: int, g: int):
    w, v = args
    return b.add("outer_sum", (g, v)), b.add("matvec_t", (w, g))


def _blockdiag_vjp(b: Builder, node, args, n: int, g: int):
    return (b.add("diagblocks", (g,), b.type(args[0]).shape),)


def _concat_vjp(b: Builder, node, args, n: int, g: int):
    start, grads = Size.of(0), []
    for a in args:
        stop = start + b.type(a).shape[0]
        grads.append(b.add("slice", (g,), (start, stop)))
        start = stop
    return tuple(grads)


def _outer_vjp(b: Builder, node, args, n: int, g: int):
    x, y = args
    sizes = (b.type(x).shape[0], b.type(y).shape[0])
    return b.add("outer_vjp_a", (g, y), sizes), b.add("outer_vjp_b", (g, x), sizes)


def _reshape_vjp(b: Builder, node, args, n: int, g: int):
    return (b.add("reshape", (g,), (b.type(args[0]).shape,)),)


def _rowsum_vjp(b: Builder, node, args, n: int, g: int):
    return (b.add("expand", (g,), (b.type(args[0]).shape[0], Size.of(1))),)


def _rowmax_vjp(b: Builder, node, args, n: int, g: int):
    """To the entries equal to the maximum (1 - step(max - v) is 1 there), shared evenly on a tie
    as torch.amax's."""
    v = args[0]
    width = (b.type(v).shape[0], Size.of(1))
    at_top = b.add("sub", (b.const(1), b.add("step", (b.add("sub", (b.add("expand", (n,), width), v)),))))
    share = b.add("div", (g, b.add("rowsum", (at_top,))))
    return (b.add("mul", (b.add("expand", (share,), width), at_top)),)


def _expand_vjp(b: Builder, node, args, n: int, g: int):
    total = b.add("rowsum", (g,))
    divisor = node.attrs[1]
    return (total if divisor == Size.of(1) else b.add("expand", (total,), (Size.of(1), divisor)),)


def _pow_vjp(b: Builder, node, args, n: int, g: int):
    """d v^k = k v^(k-1): written so, not k y / v, which is 0 / 0 at v = 0. k gets no gradient."""
    v, k = args
    exponent = b.nodes[k].attrs[0]
    slope = b.add("mul", (b.const(exponent), b.add("pow", (v, b.const(exponent - 1)))))
    return b.add("mul", (g, slope)), None


def _softmax_vjp(b: Builder, node, args, n: int, g: int):
    return (b.add("softmax_vjp", (g, n)),)


# `slice` has no entry: autodiff gathers the gradients of all slices of one value into a single
# concatenation (the VJP of `split`) instead of padding each one with zeros.
VJP: dict[str, Callable] = {
    **{op: _elementwise_vjp for op in ELEMENTWISE},
    **{op: _activation_vjp for op in ACTIVATIONS},
    "neg": lambda b, node, args, n, g: (b.add("neg", (g,)),),
    "matvec": _matvec_vjp,
    "blockdiag": _blockdiag_vjp,
    "concat": _concat_vjp,
    "outer": _outer_vjp,
    "reshape": _reshape_vjp,
    "softmax": _softmax_vjp,
    "pow": _pow_vjp,
    "rowsum": _rowsum_vjp,
    "rowmax": _rowmax_vjp,
    "expand": _expand_vjp,
    "zeros": lambda b, node, args, n, g: (),
}

# Functions a spec may call, with their arity (split, contract, the reductions and the norms are
# lowered specially).
FUNCTIONS = {name: 1 for name in ACTIVATIONS if name != "step"} | {
    "softmax": 1, "split": 2, "contract": 3, "concat": None, "sum": 1, "mean": 1, "max": 1,
    "layernorm": 1, "rmsnorm": 1, "maximum": 2, "minimum": 2, "leaky_relu": 2, "clamp": 3, "pow": 2,
    "dropout": 2, "zoneout": 3}
# The per-example numbers the reductions give; they broadcast against vectors.
SCALAR_FUNCTIONS = ("sum", "mean", "max")
# layernorm(v), rmsnorm(v): torch's default epsilon, and no gain or bias (the spec adds its own).
NORM_EPS = 1e-5


# --- how the NumPy backend and the torch host code spell each op, over all rows at once ----------
#
# One row an op: the NumPy spelling beside the torch one (the host code of the Triton and C
# backends, outside the loop). Each is a function (node, args' code, args' types, rows) -> code,
# `rows` the code of the number of rows of a batched value; `numpy_into` (node, args' code, out)
# -> code writes the value into the array `out` instead (None: the op cannot). Activations are
# spelled by their own rows above. The loops' own spellings (Triton tiles, C elements) are below.

@dataclass(frozen=True)
class Spelling:
    numpy: Callable
    torch: Callable
    numpy_into: Callable | None = None


INFIX = {"add": "+", "sub": "-", "mul": "*", "div": "/"}
_UFUNCS = {"add": "np.add", "sub": "np.subtract", "mul": "np.multiply", "div": "np.divide", "neg": "np.negative"}


def _ufunc_into(op: str) -> Callable:
    return lambda n, a, out: f"{_UFUNCS[op]}({', '.join(a)}, out={out})"


def _infix(op: str) -> Spelling:
    both = lambda n, a, t, rows: f"{a[0]} {INFIX[op]} {a[1]}"  # noqa: E731
    return Spelling(both, both, _ufunc_into(op))


def _activation(act: Activation) -> Spelling:
    into = None if act.numpy_out is None else (lambda n, a, out: act.numpy_out.format(x=a[0], out=out))
    return Spelling(lambda n, a, t, rows: act.numpy.format(x=a[0]), lambda n, a, t, rows: act.torch.format(x=a[0]), into)


def _slice(n, a, t, rows) -> str:
    start, stop = (str(s) for s in n.attrs)
    start = "" if start == "0" else start
    return f"{a[0]}[:, {start}:{stop}]" if n.type.batched else f"{a[0]}[{start}:{stop}]"


def _reshape(n, a, rows) -> str:
    shape = ", ".join(str(s) for s in n.attrs[0])
    if not n.type.batched:
        return f"{a[0]}.reshape({shape or '()'})"
    return f"{a[0]}.reshape({rows}, {shape})"


def _zeros(n, rows) -> str:
    """The shape of a zeros node as a tuple's code: (), (n,) or (rows, n)."""
    parts = ([rows] if n.type.batched else []) + [str(s) for s in n.attrs[0]]
    return f"({parts[0]},)" if len(parts) == 1 else f"({', '.join(parts)})"


def _expand(n, x: str, repeated: str) -> str:
    """expand's argument divided by its divisor (a size: mean's count of features), then
    `repeated` over the features unless there is one."""
    width, divisor = n.attrs
    d = str(divisor) if str(divisor).isidentifier() or str(divisor).isdigit() else f"({divisor})"
    x = x if divisor == Size.of(1) else f"({x} / {d})"
    return x if width == Size.of(1) else repeated.format(x)


def _rt(helper: str, torch: Callable, sizes: bool = False) -> Spelling:
    """A call of backends/numpy_runtime's `helper` (`rt.` in a generated module), which takes the
    array to write into last; sizes: with the factors' sizes n, k (the gradients of an outer product)."""
    def call(n, a, out=None):
        return f"rt.{helper}({', '.join(list(a) + ([str(s) for s in n.attrs] if sizes else []) + ([out] if out else []))})"

    return Spelling(lambda n, a, t, rows: call(n, a), torch, call)


def _torch_outer_vjp(n, a, t, rows) -> str:
    k, m = (str(s) for s in n.attrs)
    if not n.type.batched:
        return f"{a[0]}.reshape({k}, {m}) @ {a[1]}" if n.op == "outer_vjp_a" else f"{a[1]} @ {a[0]}.reshape({k}, {m})"
    pattern = "rnk,rk->rn" if n.op == "outer_vjp_a" else "rnk,rn->rk"
    return f'torch.einsum("{pattern}", {a[0]}.reshape(-1, {k}, {m}), {a[1]})'


# A batched product into `out`: NumPy's loop hands in as a[0] the operand rt.operand made of the matrix.
_MATMUL_INTO = lambda n, a, out: f"matmul({a[1]}, {a[0]}, {out})"  # noqa: E731

SPELLINGS: dict[str, Spelling] = {
    **{op: _infix(op) for op in INFIX},
    "neg": Spelling(lambda n, a, t, rows: f"-{a[0]}", lambda n, a, t, rows: f"-{a[0]}", _ufunc_into("neg")),
    "pow": Spelling(lambda n, a, t, rows: f"np.power({a[0]}, {a[1]})", lambda n, a, t, rows: f"torch.pow({a[0]}, {a[1]})",
                    lambda n, a, out: f"np.power({a[0]}, {a[1]}, out={out})"),
    **{name: _activation(act) for name, act in ACTIVATIONS.items()},
    "softmax": _rt("softmax", lambda n, a, t, rows: f"torch.softmax({a[0]}, dim=-1)"),
    "softmax_vjp": _rt("softmax_vjp", lambda n, a, t, rows: f"{a[1]} * ({a[0]} - ({a[0]} * {a[1]}).sum(-1, keepdim=True))"),
    # NumPy's batched products go through the pass's `matmul` (numpy_runtime.matmul_for). torch:
    # linear, not v @ W.T, which on the CPU multiplies by a transposed view a third slower.
    "matvec": Spelling(
        lambda n, a, t, rows: f"matmul({a[1]}, {a[0]}.T)" if n.type.batched else f"{a[0]} @ {a[1]}",
        lambda n, a, t, rows: f"torch.nn.functional.linear({a[1]}, {a[0]})" if n.type.batched else f"{a[0]} @ {a[1]}",
        _MATMUL_INTO),
    "matvec_t": Spelling(
        lambda n, a, t, rows: f"matmul({a[1]}, {a[0]})" if n.type.batched else f"{a[0]}.T @ {a[1]}",
        lambda n, a, t, rows: f"{a[1]} @ {a[0]}" if n.type.batched else f"{a[0]}.T @ {a[1]}", _MATMUL_INTO),
    # W[N, R, C] as the (N*R, N*C) matrix with W[n] as its n-th diagonal block, and back: the
    # blocks are multiplied as one dense product (see the language's per-head @).
    "blockdiag": Spelling(
        lambda n, a, t, rows: f"rt.block_diagonal({a[0]})",
        lambda n, a, t, rows: f"torch.block_diag(*{a[0]}.unbind(0))"),
    "diagblocks": Spelling(
        lambda n, a, t, rows: f"rt.diagonal_blocks({a[0]}, {n.attrs[0]})",
        lambda n, a, t, rows: (f"{a[0]}.reshape({n.attrs[0]}, {n.attrs[1]}, {n.attrs[0]}, {n.attrs[2]})"
                               ".diagonal(dim1=0, dim2=2).permute(2, 0, 1)")),
    "outer_sum": Spelling(
        lambda n, a, t, rows: f"matmul({a[0]}.T, {a[1]})" if t[0].batched else f"np.outer({a[0]}, {a[1]})",
        lambda n, a, t, rows: f"{a[0]}.T @ {a[1]}" if t[0].batched else f"torch.outer({a[0]}, {a[1]})"),
    # A block of rows' outer products at a time on every host (the C host's: c.c_spell).
    "contract_sum": Spelling(
        lambda n, a, t, rows: f"rt.contract_sum({', '.join(a)})",
        lambda n, a, t, rows: f"rt.contract_sum_tensors({', '.join(a)})"),
    "sum_rows": Spelling(lambda n, a, t, rows: f"{a[0]}.sum(axis=0)", lambda n, a, t, rows: f"{a[0]}.sum(0)"),
    "sum_all": Spelling(lambda n, a, t, rows: f"{a[0]}.sum()", lambda n, a, t, rows: f"{a[0]}.sum()"),
    "concat": Spelling(
        lambda n, a, t, rows: f"np.concatenate([{', '.join(a)}], axis={1 if n.type.batched else 0})",
        lambda n, a, t, rows: f"torch.cat([{', '.join(a)}], dim={1 if n.type.batched else 0})"),
    "slice": Spelling(_slice, _slice),
    "reshape": Spelling(lambda n, a, t, rows: _reshape(n, a, rows), lambda n, a, t, rows: _reshape(n, a, "-1")),
    "zeros": Spelling(lambda n, a, t, rows: f"np.zeros({_zeros(n, rows)}, dtype=dtype)",
                      lambda n, a, t, rows: f"torch.zeros({_zeros(n, 'rows')}, device=dev, dtype=dtype)"),
    "rowsum": Spelling(lambda n, a, t, rows: f"{a[0]}.sum(axis=-1, keepdims=True)",
                       lambda n, a, t, rows: f"{a[0]}.sum(-1, keepdim=True)"),
    "rowmax": Spelling(lambda n, a, t, rows: f"{a[0]}.max(axis=-1, keepdims=True)",
                       lambda n, a, t, rows: f"{a[0]}.amax(-1, keepdim=True)"),
    "expand": Spelling(lambda n, a, t, rows: _expand(n, a[0], f"np.repeat({{}}, {n.attrs[0]}, axis=-1)"),
                       lambda n, a, t, rows: _expand(n, a[0], f"{{}}.repeat({'1, ' if n.type.batched else ''}{n.attrs[0]})")),
    "outer": _rt("outer_rows", lambda n, a, t, rows: (
        f"({a[0]}[:, :, None] * {a[1]}[:, None, :]).reshape({a[0]}.shape[0], -1)"
        if n.type.batched else f"torch.outer({a[0]}, {a[1]}).reshape(-1)")),
    "outer_vjp_a": _rt("outer_vjp_a", _torch_outer_vjp, sizes=True),
    "outer_vjp_b": _rt("outer_vjp_b", _torch_outer_vjp, sizes=True),
}


# --- how the loops spell an elementwise op on one element (C) or one tile (Triton) ----------------

@dataclass(frozen=True)
class Element:
    """An op the C and Triton loops compute element by element: its spelling in each, a format
    string of its arguments' code ({0}, {1}). `operator`: an infix or prefix spelling, which
    takes parentheses inside another expression."""

    c: str
    triton: str
    operator: bool = False

    def spell(self, backend: str, args: list[str], nested: bool = True) -> str:
        code = getattr(self, backend).format(*args)
        return f"({code})" if nested and self.operator else code


ELEMENTS: dict[str, Element] = {
    **{op: Element(f"{{0}} {sign} {{1}}", f"{{0}} {sign} {{1}}", True) for op, sign in INFIX.items()},
    "neg": Element("-{0}", "-{0}", True),
    # pow(v, k), k a number (integer powers were made products): negative v gives NaN, as torch's
    "pow": Element("powf({0}, {1})", "tl.exp2({1} * tl.log2({0}))"),
    **{name: Element(a.c.replace("{x}", "{0}"), a.triton.replace("{x}", "{0}")) for name, a in ACTIVATIONS.items()},
}
