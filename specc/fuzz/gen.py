"""Random well-typed cells, written as spec text, as a user would write them.

`cells()` is a hypothesis strategy: a failing cell shrinks to a small spec by itself. It draws
every construct the language has — several inputs of different sizes, several states (some only
the loop reads), parameters of one, two and three axes, non-square products, several products of
one operand in one expression, products of values made inside the step, split, concatenation,
per-head (block-diagonal) products, contract, softmax, every activation, numbers of every sign and
size, outputs of states, of intermediates and of expressions, dimensions of 1 and sizes that are
not powers of two — and names that collide with C macros, Python builtins and the generated code's
own habits.

A new construct in the language gets a branch in `_Writer.expr` (or an equation form in `_cell`),
so that every backend is tested on it from the day it lands.

Values are kept finite by construction, the way people keep their own cells finite: a divisor is
kept away from zero (`a / (2 + tanh(b))`), a logarithm's argument positive (`log(1.5 + tanh(b))`),
an exponential's argument bounded (`exp(tanh(b))`), a square root's positive (`sqrt(1.5 + tanh(b))`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from hypothesis import strategies as st

from ..check import _reserved
from ..ops import FUNCTIONS, SCALAR_FUNCTIONS
from ..shapes import Size

# Every function of the language of one argument (a new row of ops.ACTIVATIONS is drawn from the
# day it lands), except those drawn only in the forms that keep them finite (below).
ACTIVATIONS = tuple(f for f, arity in FUNCTIONS.items()
                    if arity == 1 and f not in ("exp", "log", "sqrt", "rsqrt", "softmax", *SCALAR_FUNCTIONS))
# Numbers of every sign and size, fractions among them.
NUMBERS = (0.5, 2.0, 1.0, -0.5, 3.0, -1.0, 0.25, -2.0, 0.001, 1.5, -0.125, 10.0, 0.1, -3.0, 100.0, 1e-05)
# Names that a C compiler, the C library, Python or the generated code may already use.
TRICKY = ("linux", "unix", "INT32_MAX", "WCHAR_MAX", "math_errhandling", "errno", "stdin", "NULL", "EOF",
          "M_PI", "abs", "exp", "sqrt", "main", "float", "int", "len", "range", "min", "max", "sum", "i", "j",
          "k", "n", "out", "grad", "tmp", "acc", "x_t", "h_seq", "saved", "mask", "w", "b", "g", "np", "rt",
          "lib", "restrict", "inline", "static", "const", "double", "signed", "char", "auto", "case", "goto",
          # the generated Python's own names: the loop's T, B and t, its modules, its helpers
          "T", "B", "t", "rows", "dims", "np", "tl", "triton", "torch", "self", "specc", "dev", "dtype", "wrap",
          "chunk", "whole", "part", "math", "init", "sys", "train", "p", "s", "e", "mask", "lengths", "inputs_grad")
DIM_NAMES = ("I", "H", "K", "N", "D", "Q", "R", "T", "B", "len")  # T, B, len: the generated code's own too


@dataclass(frozen=True)
class GenCell:
    """A generated spec and the dimensions to load it with."""
    text: str
    name: str
    dims: dict

    def __repr__(self) -> str:  # hypothesis prints the falsifying example this way
        bound = ", ".join(f"{k}={v}" for k, v in self.dims.items())
        return f"GenCell({bound}):\n{self.text}"


@dataclass(frozen=True)
class _Sz:
    size: Size  # symbolic, as the checker compares sizes
    value: int  # at the drawn dimensions

    def __str__(self) -> str:
        text = str(self.size)
        return text if self.size.constant is not None or len(self.size.terms) == 1 and \
            self.size.terms[0][1] == 1 else f"({text})"


@dataclass(frozen=True)
class _Val:
    name: str  # as referenced: h, h', g0
    sz: _Sz
    batched: bool


class _Writer:
    """Draws one cell; `draw` is hypothesis's draw function."""

    def __init__(self, draw):
        self.draw = draw
        self.taken: set[str] = set()
        self.params: list[str] = []  # declaration lines
        self.pool: list[_Val] = []  # values an expression may read
        self.dims: dict[str, int] = {}

    # --- names and sizes ----------------------------------------------------------------------

    def name(self, stem: str, what: str) -> str:
        draw = self.draw
        if draw(st.integers(0, 9)) == 0:
            for cand in draw(st.permutations(TRICKY))[:4]:
                if cand not in self.taken and _reserved(cand, what) is None:
                    self.taken.add(cand)
                    return cand
        k = 0
        while f"{stem}{k}" in self.taken or _reserved(f"{stem}{k}", what) is not None:
            k += 1
        self.taken.add(f"{stem}{k}")
        return f"{stem}{k}"

    def size(self) -> _Sz:
        draw = self.draw
        names = list(self.dims)
        kind = draw(st.integers(0, 9))
        d = draw(st.sampled_from(names))
        if kind <= 4:
            return _Sz(Size.of(d), self.dims[d])
        if kind == 5:
            return _Sz(Size.of(d) * 2, 2 * self.dims[d])
        if kind == 6:
            return _Sz(Size.of(d) + 1, self.dims[d] + 1)
        if kind == 7:
            e = draw(st.sampled_from(names))
            return _Sz(Size.of(d) + Size.of(e), self.dims[d] + self.dims[e])
        n = draw(st.sampled_from((1, 3)))
        return _Sz(Size.of(n), n)

    def param(self, stem: str, shape: tuple[_Sz, ...]) -> str:
        name = self.name(stem, "parameter")
        inits = ["", "", "", " ~ normal(0.5)", " ~ uniform(0.3)", " ~ uniform(-0.5, 1 / 4)", " = zeros",
                 " ~ constant(-0.25)", " ~ normal(0.1, 0.5)", " ~ uniform(1 / sqrt(%s))" % next(iter(self.dims))]
        if len(shape) >= 2:
            inits += [" ~ orthogonal", " ~ orthogonal(0.5)"]
        if len(shape) == 2:
            inits += [" ~ identity", " ~ identity(0.5)"]
        init = self.draw(st.sampled_from(inits))
        keyword = self.draw(st.sampled_from(("param",) * 7 + ("const",)))  # a buffer, never trained
        self.params.append(f"    {keyword} {name}[{', '.join(str(s) for s in shape)}]{init}")
        return name

    # --- expressions --------------------------------------------------------------------------

    def leaf(self, sz: _Sz) -> str | None:
        same = [v for v in self.pool if v.sz.size == sz.size]
        return self.draw(st.sampled_from(same)).name if same else None

    def operand(self, depth: int) -> tuple[str, _Sz]:
        """The right side of a product: a value, a concatenation of values, or an expression."""
        draw = self.draw
        kind = draw(st.integers(0, 5))
        if kind == 0 and len(self.pool) >= 2:
            items = draw(st.lists(st.sampled_from(self.pool), min_size=2, max_size=3))
            if any(v.batched for v in items) and not all(v.batched for v in items):
                items = [v for v in items if v.batched] or items[:1]
            if len(items) >= 2:
                total = items[0].sz.size
                for v in items[1:]:
                    total = total + v.sz.size
                sz = _Sz(total, sum(v.sz.value for v in items))
                names = ", ".join(v.name for v in items)
                return (f"[{names}]" if draw(st.booleans()) else f"concat({names})"), sz
        v = draw(st.sampled_from(self.pool))
        if kind == 1 and depth > 0:
            return f"({self.expr(v.sz, depth - 1)})", v.sz
        if kind == 2:
            act = draw(st.sampled_from(ACTIVATIONS + ("softmax",)))
            return f"{act}({v.name})", v.sz
        return v.name, v.sz

    def expr(self, sz: _Sz, depth: int) -> str:
        """Spec text for a vector of size `sz` (it may or may not depend on the step's inputs)."""
        draw = self.draw
        leaf = self.leaf(sz)
        if depth <= 0:
            kind = draw(st.integers(0, 2))
            if kind == 0 and leaf is not None:
                return leaf
            if kind == 1:
                return self.param("b", (sz,))
            arg, asz = self.operand(0)
            return f"{self.param('W', (sz, asz))} @ {arg}"
        kind = draw(st.integers(0, 16))
        sub = lambda: self.expr(sz, depth - 1)  # noqa: E731
        if kind == 0 and leaf is not None:
            return leaf
        if kind in (1, 2):
            arg, asz = self.operand(depth - 1)
            return f"{self.param('W', (sz, asz))} @ {arg}"
        if kind == 3:
            op = draw(st.sampled_from("+-*"))
            return f"({sub()}) {op} ({sub()})"
        if kind == 4:
            op = draw(st.sampled_from("+-*"))
            num = draw(st.sampled_from(NUMBERS))
            if draw(st.booleans()):
                return f"{num!r} {op} ({sub()})"
            return f"({sub()}) {op} {num!r}"
        if kind == 5:  # several products of one operand in one expression: A @ x * h + C @ x
            arg, asz = self.operand(depth - 1)
            a, c = self.param("A", (sz, asz)), self.param("C", (sz, asz))
            return f"{a} @ {arg} * ({sub()}) + {c} @ {arg}"
        if kind == 6:
            shift = draw(st.sampled_from((2.0, 1.5, 3.0)))
            return f"({sub()}) / ({shift!r} + tanh({sub()}))"
        if kind == 7:
            return f"{draw(st.sampled_from(ACTIVATIONS))}({sub()})"
        if kind == 8:
            return f"softmax({sub()})"
        if kind == 9:
            return draw(st.sampled_from((f"exp(tanh({sub()}))", f"log(1.5 + tanh({sub()}))",
                                         f"log(softplus({sub()}) + 0.5)", f"sqrt(1.5 + tanh({sub()}))",
                                         f"rsqrt(softplus({sub()}) + 0.5)")))
        if kind == 10:
            return f"-({sub()})"
        if kind == 11 and draw(st.booleans()):
            product = self.per_head_product(sz, depth)
            if product is not None:
                return product
        if kind == 11 and self.pool:
            a, b = draw(st.sampled_from(self.pool)), draw(st.sampled_from(self.pool))
            if a.sz.value * b.sz.value <= 36:
                w = self.param("T", (sz, a.sz, b.sz))
                return f"contract({w}, {a.name}, {b.name})"
        if kind == 12:
            parts = self.concat_parts(sz)
            if parts is not None:
                texts = [self.expr(p, depth - 1) for p in parts]
                if any(_refs_batched(t, self.pool) for t in texts):  # a concatenation is all per-example
                    texts = [self.per_example(t, p) for t, p in zip(texts, parts)]
                return f"[{', '.join(texts)}]"
        if kind == 13:
            return f"{sub()} / {draw(st.sampled_from((2.0, -4.0, 0.5, 3.0)))!r}"
        if kind == 15:  # the functions of several arguments, numbers where they take numbers
            return self.several(sub)
        if kind == 16:  # a learned scalar, written with no axes or one of one entry
            a = self.param("a", draw(st.sampled_from(((), (_Sz(Size.of(1), 1),)))))
            return f"{a} {draw(st.sampled_from('+-*'))} ({sub()})"
        if kind == 14 and self.pool:  # a reduction of any vector: a number broadcast over this one
            other = draw(st.sampled_from(self.pool)).sz
            reduced = f"{draw(st.sampled_from(SCALAR_FUNCTIONS))}({self.expr(other, depth - 1)})"
            if draw(st.booleans()):
                return f"({sub()}) {draw(st.sampled_from('+-*'))} {reduced}"
            return f"{reduced} * ({sub()})"
        return sub()

    def several(self, sub) -> str:
        """One of the functions of several arguments; `sub()` draws an argument."""
        draw = self.draw
        which = draw(st.integers(0, 7))
        if which == 0:
            return f"maximum({sub()}, {sub()})"
        if which == 1:
            return f"minimum({sub()}, {draw(st.sampled_from(NUMBERS))!r})"
        if which == 2:
            return f"leaky_relu({sub()}, {draw(st.sampled_from((0.01, 0.2, -0.5, 2.0)))!r})"
        if which == 3:
            lo, hi = draw(st.sampled_from(((-1.0, 1.0), (0.0, 6.0), (-0.25, 0.5), (2.0, 2.0))))
            return f"clamp({sub()}, {lo!r}, {hi!r})"
        if which == 4:
            return f"pow({sub()}, {draw(st.sampled_from((2, 3, 4)))})"
        if which == 6:  # run in eval: the identity, through a mask input of ones
            return f"dropout({sub()}, {draw(st.sampled_from((0.0, 0.25, 0.5)))!r})"
        if which == 7:  # run in eval: p v + (1 - p) v_next
            return f"zoneout({sub()}, {sub()}, {draw(st.sampled_from((0.0, 0.1, 0.5, 1.0)))!r})"
        # negative and fractional powers of a positive number away from 0
        return f"pow(1.5 + tanh({sub()}), {draw(st.sampled_from((0.5, -0.5, 2.5, -1.5, 1.25, -1, -2)))!r})"

    def per_head_product(self, sz: _Sz, depth: int) -> str | None:
        """R @ v, R of three axes: a block-diagonal product, heads a dimension or a number that
        divides both sizes; None where none does."""
        arg, asz = self.operand(depth - 1)
        blocks = {h: (rows, cols) for h in (*self.dims, 2, 3)
                  if (rows := _per_head(sz, h, self.dims)) and (cols := _per_head(asz, h, self.dims))}
        if not blocks:
            return None
        h = self.draw(st.sampled_from(list(blocks)))
        n = _Sz(Size.of(h), self.dims[h] if isinstance(h, str) else h)
        return f"{self.param('R', (n, *blocks[h]))} @ {arg}"

    def concat_parts(self, sz: _Sz) -> tuple[_Sz, ...] | None:
        """Two sizes in the pool that add up to `sz`, if any."""
        for a in self.pool:
            for b in self.pool:
                if a.sz.size + b.sz.size == sz.size:
                    return a.sz, b.sz
        return None

    def per_example(self, text: str, sz: _Sz) -> str:
        """`text` plus an input's product where it might be the same for every example (a state's
        next value and an output must not be)."""
        if _refs_batched(text, self.pool):
            return text
        x = self.draw(st.sampled_from([v for v in self.pool if v.batched]))
        return f"{text} + {self.param('W', (sz, x.sz))} @ {x.name}"


def _per_head(sz: _Sz, heads: str | int, dims: dict) -> _Sz | None:
    """sz as `heads` blocks: the size of one, if sz is a whole multiple of heads (a number, or a
    dimension every term of sz has)."""
    count = dims[heads] if isinstance(heads, str) else heads
    if isinstance(heads, int):
        part = sz.size / heads
        if not part.terms or any(c.denominator != 1 for _, c in part.terms):
            return None
    else:
        terms = {}
        for m, c in sz.size.terms:
            if heads not in m:
                return None
            rest = list(m)
            rest.remove(heads)
            terms[tuple(rest)] = c
        part = Size._make(terms)
    return _Sz(part, sz.value // count)


def _refs_batched(text: str, pool: list[_Val]) -> bool:
    """Whether `text` reads a per-example value of `pool`, or draws a mask per example (dropout
    and zoneout of parameters alone are per-example values too). A name followed by "(" is a
    function called, not a value read: an input named exp is not read by exp(tanh(b))."""
    if re.search(r"(?<![A-Za-z0-9_'])(dropout|zoneout)\s*\(", text):
        return True
    names = {m.group(1) for m in re.finditer(r"([A-Za-z_][A-Za-z0-9_]*'?)(?![A-Za-z0-9_'])(?!\s*\()", text)
             if not (m.start() and (text[m.start() - 1].isalnum() or text[m.start() - 1] == "_"))}
    return any(v.batched and v.name in names for v in pool)


@st.composite
def heads_cells(draw) -> GenCell:
    """A cell whose loop is independent heads (issue #17's multi-head recurrences): every state has
    heads * D features, every product through a state is per-head with square blocks (R[heads, D,
    D] @ v), everything else in the loop elementwise; the inputs' products are dense. The Triton
    backend runs such a loop persistent with a program a head, which no other cell exercises."""
    w = _Writer(draw)
    heads = draw(st.sampled_from(("N", 2, 3)))
    for d in (["N"] if heads == "N" else []) + ["D"]:
        w.taken.add(d)
        w.dims[d] = draw(st.sampled_from((1, 2, 3, 5)))
    n = _Sz(Size.of(heads), w.dims.get("N", heads) if heads == "N" else heads)
    block = _Sz(Size.of("D"), w.dims["D"])
    sz = _Sz(n.size * block.size, n.value * block.value)
    x = w.name("x", "input")
    decls = [f"    input {x}[{(isz := w.size())}]"]
    states = [w.name("h", "state") for _ in range(draw(st.integers(1, 2)))]
    decls += [f"    state {h}[{sz}]" + draw(st.sampled_from(("", " = learned", " = constant(0.5)"))) for h in states]

    def operand(names: list[str]) -> str:
        v = draw(st.sampled_from(names))
        return draw(st.sampled_from((v, f"tanh({v})", f"{v} * {draw(st.sampled_from(names))}",
                                     f"sigmoid({v}) - 0.5")))

    def terms(names: list[str]) -> str:
        parts = [f"{w.param('R', (n, block, block))} @ ({operand(names)})"
                 for _ in range(draw(st.integers(1, 2)))]
        parts.append(f"{w.param('W', (sz, isz))} @ {x}")
        if draw(st.booleans()):
            parts.append(w.param("b", (sz,)))
        return " + ".join(draw(st.permutations(parts)))

    equations, seen = [], list(states)
    for h in states:
        if draw(st.booleans()):  # gated, as a GRU's
            text = f"sigmoid({terms(seen)}) * {h} + (1 - sigmoid({terms(seen)})) * tanh({terms(seen)})"
        else:
            text = f"{draw(st.sampled_from(('tanh', 'sigmoid', 'softsign')))}({terms(seen)})"
        equations.append(f"    {h}' = {text}")
        seen.append(f"{h}'")  # a later state may read this one's next value (the LSTM's h' reads c')
    outputs = [f"    output {draw(st.sampled_from(seen[len(states):]))}"]
    lines = [f"cell heads({', '.join(w.dims)}) {{", *decls, *w.params, *equations, *outputs, "}"]
    return GenCell("\n".join(lines) + "\n", "heads", dict(w.dims))


@st.composite
def cells(draw, max_values: int = 5, max_depth: int = 3) -> GenCell:
    if draw(st.integers(0, 15)) == 0:
        return draw(heads_cells())
    w = _Writer(draw)
    n_dims = draw(st.integers(1, 3))
    for _ in range(n_dims):
        d = w.name("D", "dimension") if draw(st.integers(0, 5)) == 0 else \
            next(n for n in DIM_NAMES if n not in w.taken)
        w.taken.add(d)
        w.dims[d] = draw(st.sampled_from((1, 2, 3, 5, 6, 7)))
    decls: list[str] = []
    for _ in range(draw(st.integers(1, 3))):
        name, sz = w.name("x", "input"), w.size()
        decls.append(f"    input {name}[{sz}]")
        w.pool.append(_Val(name, sz, True))
    inputs = list(w.pool)  # what a linear recurrence's coefficients may read
    states = []
    for _ in range(draw(st.integers(1, 3))):
        name, sz = w.name("h", "state"), w.size()
        init = draw(st.sampled_from(("", " = zeros", " = ones", " = constant(-0.5)", " = constant(1 / 3)",
                                     " = learned", " = learned(0.25)")))
        decls.append(f"    state {name}[{sz}]{init}")
        w.pool.append(_Val(name, sz, True))
        states.append((name, sz))
    equations: list[str] = []
    for _ in range(draw(st.integers(0, max_values))):
        form = draw(st.integers(0, 3))
        if form == 0:  # a, b = split(v, n)
            n = draw(st.integers(2, 3))
            part = draw(st.sampled_from([v.sz for v in w.pool] + [w.size()]))
            whole = _Sz(part.size * n, part.value * n)
            text = w.expr(whole, draw(st.integers(0, max_depth)))
            names = [w.name("p", "value") for _ in range(n)]
            equations.append(f"    {', '.join(names)} = split({text}, {n})")
            batched = _refs_batched(text, w.pool)
            w.pool += [_Val(p, part, batched) for p in names]
            continue
        if form == 1 and len(w.pool) >= 2:  # a value whose size is two others' together
            a, b = draw(st.sampled_from(w.pool)), draw(st.sampled_from(w.pool))
            sz = _Sz(a.sz.size + b.sz.size, a.sz.value + b.sz.value)
        else:
            sz = draw(st.sampled_from([v.sz for v in w.pool] + [w.size()]))
        text = w.expr(sz, draw(st.integers(0, max_depth)))
        name = w.name("g", "value")
        equations.append(f"    {name} = {text}")
        w.pool.append(_Val(name, sz, _refs_batched(text, w.pool)))
    for name, sz in states:
        text = w.expr(sz, draw(st.integers(0, max_depth)))
        form = draw(st.integers(0, 4))
        if form == 0:  # kept bounded, as most cells do
            text = f"{draw(st.sampled_from(('tanh', 'sigmoid', 'softmax')))}({text})"
        elif form == 1:  # a gated mix of old and new, as GRU's
            z = w.expr(sz, 1)
            text = f"sigmoid({z}) * {name} + (1 - sigmoid({z})) * tanh({text})"
        elif form == 2:  # a linear recurrence (minGRU's, a scan): a and b read the inputs alone
            pool, w.pool = w.pool, inputs
            a, b = w.expr(sz, 1), w.expr(sz, draw(st.integers(0, max_depth)))
            w.pool = pool
            text = f"sigmoid({a}) * {name} + {b}"
        equations.append(f"    {name}' = {w.per_example(text, sz)}")
        # A later state's next value may read this one's (the LSTM's h' = o * tanh(c')).
        w.pool.append(_Val(name + "'", sz, True))
    outputs = []
    used: set[str] = set()
    for _ in range(draw(st.integers(1, 3))):
        form = draw(st.integers(0, 5))
        batched = [v for v in w.pool if v.batched and v.name.rstrip("'") not in used]
        if not batched:
            break
        if form <= 2:
            v = draw(st.sampled_from(batched))
            outputs.append(f"    output {v.name}")
            used.add(v.name.rstrip("'"))
        else:
            sz = w.size()
            name = w.name("y", "output")
            text = w.per_example(w.expr(sz, draw(st.integers(0, 2))), sz)
            outputs.append(f"    output {name} = {text}")
            used.add(name)
    if not outputs:
        outputs.append(f"    output {states[0][0]}'")
    shuffled = draw(st.permutations(equations))
    cell = draw(st.sampled_from(("fuzz", "cell_a", "main", "float")))
    lines = [f"cell {cell}({', '.join(w.dims)}) {{", *decls, *w.params, *shuffled, *outputs, "}"]
    return GenCell("\n".join(lines) + "\n", cell, dict(w.dims))

