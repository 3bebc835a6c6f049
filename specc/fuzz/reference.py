"""An independent reference: a checked cell evaluated directly in torch, op by op, step by step.

It reads the checked AST (what the user wrote, names resolved and equations ordered) and nothing
after it: not the step IR, the optimiser, specc's autodiff, the scheduler or any code generator.
Gradients come from torch's autograd through this loop. That is what makes it a reference for
every backend: a bug in the compiler's later stages cannot be shared with it.
"""
from __future__ import annotations

import math

import torch

from .. import ast
from ..check import CheckedCell

_ACTIVATIONS = {
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "relu": torch.relu,
    "exp": torch.exp,
    "log": torch.log,
    "softplus": lambda v: torch.logaddexp(torch.zeros_like(v), v),
    "gelu": lambda v: torch.nn.functional.gelu(v, approximate="tanh"),
    "sqrt": torch.sqrt,
    "rsqrt": torch.rsqrt,
    "abs": torch.abs,
    "square": torch.square,
    "silu": torch.nn.functional.silu,
    "elu": torch.nn.functional.elu,
    # torch's own hardsigmoid differentiates with 1/6 rounded to float32, in float64 too
    "hardsigmoid": lambda v: torch.clamp(v + 3, 0, 6) / 6,
    "hardtanh": torch.nn.functional.hardtanh,
    "softsign": torch.nn.functional.softsign,
    "softmax": lambda v: torch.softmax(v, dim=-1),
    # one number per example, kept as a last axis of 1 so that it broadcasts against vectors
    "sum": lambda v: v.sum(-1, keepdim=True),
    "mean": lambda v: v.mean(-1, keepdim=True),
    "max": lambda v: v.amax(-1, keepdim=True),
    "layernorm": lambda v: torch.nn.functional.layer_norm(v, v.shape[-1:], eps=1e-5),
    "rmsnorm": lambda v: torch.nn.functional.rms_norm(v, v.shape[-1:], eps=1e-5),
}


def scalar(d: ast.Dim, dims: dict[str, int]) -> float:
    """An initialiser argument or a size, with the dimensions bound."""
    if isinstance(d, ast.DimNum):
        return d.value
    if isinstance(d, ast.DimName):
        return float(dims[d.name])
    if isinstance(d, ast.DimNeg):
        return -scalar(d.arg, dims)
    if isinstance(d, ast.DimCall):
        assert d.fn == "sqrt", d.fn
        return math.sqrt(scalar(d.arg, dims))
    a, b = scalar(d.left, dims), scalar(d.right, dims)
    return {"+": a + b, "-": a - b, "*": a * b, "/": a / b}[d.op]


def initial_fill(cell: CheckedCell, dims: dict[str, int]) -> dict[str, float]:
    """Each state's starting value, from its initialiser as written."""
    fill = {}
    for s in cell.states:
        init = s.init
        if init is None or init.name == "zeros" or (init.name == "learned" and not init.args):
            fill[s.name] = 0.0
        elif init.name == "ones":
            fill[s.name] = 1.0
        else:
            fill[s.name] = scalar(init.args[0], dims)
    return fill


def size(shape, dims: dict[str, int]) -> tuple[int, ...]:
    out = []
    for s in shape:
        v = s.evaluate(dims)
        assert v.denominator == 1, (shape, dims)
        out.append(int(v))
    return tuple(out)


def _eval(e: ast.Expr, env: dict):
    if isinstance(e, ast.Num):
        # A 0-d tensor: it takes the other operand's precision, as a number would.
        return torch.tensor(e.value, dtype=torch.float64)
    if isinstance(e, ast.Ref):
        return env[(e.name, e.next)]
    if isinstance(e, ast.Neg):
        return -_eval(e.arg, env)
    if isinstance(e, ast.BinOp):
        a, b = _eval(e.left, env), _eval(e.right, env)
        if e.op == "@":
            # W (m, n) @ v: v is (B, n) for a per-example value, (n,) for one made of parameters.
            if a.dim() == 3:  # W (heads, m, n) @ v: v's n-entry blocks, each by its own W[head]
                heads = b.reshape(*b.shape[:-1], a.shape[0], a.shape[2])
                return torch.einsum("hmn,...hn->...hm", a, heads).flatten(-2)
            return torch.matmul(b, a.transpose(0, 1))
        return {"+": lambda: a + b, "-": lambda: a - b, "*": lambda: a * b, "/": lambda: a / b}[e.op]()
    if isinstance(e, ast.Concat):
        return _concat([_eval(i, env) for i in e.items])
    if e.fn == "concat":
        return _concat([_eval(i, env) for i in e.args])
    if e.fn == "contract":
        w, a, b = (_eval(i, env) for i in e.args)
        if a.dim() < b.dim():
            a = a.expand(*b.shape[:-1], a.shape[-1])
        if b.dim() < a.dim():
            b = b.expand(*a.shape[:-1], b.shape[-1])
        return torch.einsum("ijk,...j,...k->...i", w, a, b)
    if e.fn in _SEVERAL:
        return _SEVERAL[e.fn](*(_eval(a, env) for a in e.args))
    [arg] = e.args
    return _ACTIVATIONS[e.fn](_eval(arg, env))


# Their numbers arrive as 0-d tensors (see _eval); torch takes Python numbers for these.
_SEVERAL = {
    "maximum": torch.maximum,
    "minimum": torch.minimum,
    "leaky_relu": lambda v, slope: torch.nn.functional.leaky_relu(v, float(slope)),
    "clamp": lambda v, lo, hi: torch.clamp(v, float(lo), float(hi)),
    "pow": lambda v, k: torch.pow(v, float(k)),
    # in eval, which is how the differential runs use them (train-mode masks: tests/test_language_features)
    "dropout": lambda v, p: v,
    "zoneout": lambda v_next, v, p: p * v + (1 - p) * v_next,
}


def _concat(items):
    # A part made of parameters alone beside per-example ones (dropout(b) is per-example to the
    # checker, a plain vector here): every example's copy of it.
    lead = max(items, key=lambda v: v.dim()).shape[:-1]
    return torch.cat([v.expand(*lead, v.shape[-1]) for v in items], dim=-1)


def step(cell: CheckedCell, values: dict[tuple[str, bool], torch.Tensor]) -> dict:
    """One step: `values` holds the inputs, the states before the step and the parameters, keyed
    (name, False); returns it with every equation's targets added."""
    env = dict(values)
    for eq in cell.equations:
        if isinstance(eq.expr, ast.Call) and eq.expr.fn == "split":
            whole = _eval(eq.expr.args[0], env)
            parts = torch.chunk(whole, len(eq.targets), dim=-1)
            for t, p in zip(eq.targets, parts):
                env[(t.name, t.next)] = p
        else:
            [t] = eq.targets
            env[(t.name, t.next)] = _eval(eq.expr, env)
    return env


def run(cell: CheckedCell, inputs: dict[str, torch.Tensor], states: dict[str, torch.Tensor],
        params: dict[str, torch.Tensor], lengths: list[int] | None = None):
    """The whole sequence: inputs (T, B, n) by name, initial states (B, n), parameters.

    Returns (outputs by name as (T, B, n), final states by name as (B, n)). With `lengths`, each
    sequence b runs its first lengths[b] steps alone: its outputs are zero after them and its final
    state is the one after its last step, as torch's packed sequences define.
    """
    if lengths is not None:
        per = [run(cell, {k: v[:n, b:b + 1] for k, v in inputs.items()},
                   {k: v[b:b + 1] for k, v in states.items()}, params) for b, n in enumerate(lengths)]
        T = next(iter(inputs.values())).shape[0]
        outs = {}
        for name, _ in cell.outputs:
            cols = [torch.cat([o[name], o[name].new_zeros((T - o[name].shape[0],) + o[name].shape[1:])])
                    for o, _ in per]
            outs[name] = torch.cat(cols, dim=1)
        finals = {s.name: torch.cat([f[s.name] for _, f in per]) for s in cell.states}
        return outs, finals
    T = next(iter(inputs.values())).shape[0]
    h = dict(states)
    outs: dict[str, list] = {name: [] for name, _ in cell.outputs}
    B = next(iter(states.values())).shape[0] if states else next(iter(inputs.values())).shape[1]
    for t in range(T):
        values = {(k, False): v[t] for k, v in inputs.items()}
        values |= {(k, False): v for k, v in h.items()}
        values |= {(k, False): v for k, v in params.items()}
        env = step(cell, values)
        for name, target in cell.outputs:
            v = env[(target.name, target.next)]
            outs[name].append(v.expand(B, v.shape[-1]) if v.dim() == 1 else v)
        # A next value made of parameters alone (dropout(b) is per-example to the checker) is
        # every example's state, as it is every example's output.
        h = {s.name: v.expand(B, v.shape[-1]) if v.dim() == 1 else v
             for s in cell.states for v in [env[(s.name, True)]]}
    return {k: torch.stack(v) for k, v in outs.items()}, h
