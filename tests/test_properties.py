"""Property tests for the parser and checker (hypothesis).

- A random expression tree, rendered to spec text with as few parentheses as the documented
  precedence allows, parses back to the same tree.
- Random well-formed elementwise cells (named gates written in any order, activations, products
  with square weights) always check and compile, and their outputs, final states and gradients
  match a direct torch evaluation of the same expression trees. The tree is built here and turned
  into spec text and into a torch function independently.
- Sizes written with + and * check to the polynomial that evaluates like the written arithmetic.
- Randomly mutated library specs never raise anything but SpecError, whose locations lie in the
  text.
"""
from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import specc
from specc import ast
from specc.check import check
from specc.errors import SpecError
from specc.library import spec_file, spec_names
from specc.parse import parse
from specc.pipeline import compile_cell

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)

# --- expression trees ---------------------------------------------------------------------------
# ("name", n) a value by name; ("num", v); ("neg", e); ("call", fn, e); (op, a, b) for + - * / @
# (the left side of @ is always the name of a square weight).

ACTIVATIONS = ("sigmoid", "tanh", "relu", "softplus")
VECTORS = ("x", "h", "b0", "b1")
WEIGHTS = ("W0", "W1")
NUMBERS = (0.5, 1.0, 1.5, 2.0, 3.0)


def trees(leaves) -> st.SearchStrategy:
    base = st.one_of(st.sampled_from(leaves).map(lambda n: ("name", n)),
                     st.sampled_from(NUMBERS).map(lambda v: ("num", v)))

    def grow(sub):
        return st.one_of(
            st.tuples(st.sampled_from("+-*"), sub, sub),
            # a denominator kept away from zero: a / (2 + tanh(b))
            st.tuples(st.just("/"), sub, sub).map(lambda t: ("/", t[1], ("+", ("num", 2.0), ("call", "tanh", t[2])))),
            st.tuples(st.just("@"), st.sampled_from(WEIGHTS).map(lambda w: ("name", w)), sub.map(vectorised)),
            st.tuples(st.just("neg"), sub),
            st.tuples(st.just("call"), st.sampled_from(ACTIVATIONS), sub),
            # exp and log where they stay finite
            sub.map(lambda e: ("call", "exp", ("call", "tanh", e))),
            sub.map(lambda e: ("call", "log", ("+", ("num", 2.0), ("call", "tanh", e)))),
        )

    return st.recursive(base, grow, max_leaves=8)


def vectorised(tree):
    """The tree, or the tree times x where it is a bare number (the right side of @ is a vector)."""
    return tree if vector_tree(tree) else ("*", tree, ("name", "x"))


def vector_tree(tree) -> bool:
    """Whether the tree is a vector rather than a bare number."""
    kind = tree[0]
    if kind in ("name", "@"):
        return True
    if kind == "num":
        return False
    if kind in ("neg", "call"):
        return vector_tree(tree[-1])
    return vector_tree(tree[1]) or vector_tree(tree[2])


def per_example(tree, batched_names) -> bool:
    """Whether the tree differs between examples: it reads an input, a state or such a gate."""
    kind = tree[0]
    if kind == "name":
        return tree[1] in batched_names
    if kind == "num":
        return False
    if kind in ("neg", "call"):
        return per_example(tree[-1], batched_names)
    return per_example(tree[1], batched_names) or per_example(tree[2], batched_names)


def per_example_tree(tree, batched_names):
    """The tree, plus x where it is the same for every example (a state and an output must not be)."""
    return tree if per_example(tree, batched_names) else ("+", tree, ("name", "x"))


PREC = {"+": 1, "-": 1, "*": 2, "/": 2, "@": 3, "neg": 4}


def prec(tree) -> int:
    return PREC.get(tree[0], 5)


def render(tree, minimal: bool = True) -> str:
    """Spec text for a tree: with minimal=True, only the parentheses the precedence needs."""
    kind = tree[0]
    if kind == "name":
        return tree[1]
    if kind == "num":
        return repr(tree[1])
    if kind == "call":
        return f"{tree[1]}({render(tree[2], minimal)})"
    if kind == "neg":
        inner = render(tree[1], minimal)
        return f"-({inner})" if prec(tree[1]) < PREC["neg"] or not minimal else f"-{inner}"
    op, left, right = tree
    lt, rt = render(left, minimal), render(right, minimal)
    if not minimal:
        return f"({lt} {op} {rt})"
    if prec(left) < PREC[op]:
        lt = f"({lt})"
    if prec(right) <= PREC[op]:  # left associative: a - (b - c) keeps its parentheses
        rt = f"({rt})"
    return f"{lt} {op} {rt}"


def as_tree(expr) -> tuple:
    """The parser's AST as a tree of the same form, locations dropped."""
    if isinstance(expr, ast.Ref):
        return ("name", expr.name)
    if isinstance(expr, ast.Num):
        return ("num", expr.value)
    if isinstance(expr, ast.Neg):
        return ("neg", as_tree(expr.arg))
    if isinstance(expr, ast.Call):
        [arg] = expr.args
        return ("call", expr.fn, as_tree(arg))
    assert isinstance(expr, ast.BinOp), expr
    return (expr.op, as_tree(expr.left), as_tree(expr.right))


TORCH_FN = {"sigmoid": torch.sigmoid, "tanh": torch.tanh, "relu": torch.relu, "exp": torch.exp, "log": torch.log,
            "softplus": lambda v: torch.logaddexp(torch.zeros_like(v), v)}


def evaluate(tree, env: dict):
    """The tree in torch: vectors are (B, H) rows, weights (H, H)."""
    kind = tree[0]
    if kind == "name":
        return env[tree[1]]
    if kind == "num":
        return torch.tensor(tree[1], dtype=torch.float64)
    if kind == "neg":
        return -evaluate(tree[1], env)
    if kind == "call":
        return TORCH_FN[tree[1]](evaluate(tree[2], env))
    op, left, right = tree
    a, b = evaluate(left, env), evaluate(right, env)
    if op == "@":
        return b @ a.T
    return {"+": a + b, "-": a - b, "*": a * b, "/": a / b}[op]


# --- the parser: text -> tree -----------------------------------------------------------------

@settings(max_examples=150, **SETTINGS)
@given(tree=trees(VECTORS + ("h'", "g")), minimal=st.booleans())
def test_rendered_expressions_parse_back_to_the_same_tree(tree, minimal):
    text = render(tree, minimal).replace("h'", "hp")  # a name, not a prime, for this round trip
    spec = parse(f"cell c() {{\n  y = {text}\n}}\n")
    assert as_tree(spec.cells[0].stmts[0].expr) == _unprime(tree)


def _unprime(tree):
    if tree[0] == "name":
        return ("name", tree[1].replace("h'", "hp"))
    return tuple(_unprime(t) if isinstance(t, tuple) else t for t in tree)


# --- random cells: check, compile, and compute what torch computes -----------------------------

@st.composite
def cells(draw):
    """(spec text, gate trees in dependency order, next-state tree, output tree)."""
    n_gates = draw(st.integers(0, 2))
    gates, batched = [], {"x", "h", "h'"}
    for k in range(n_gates):
        leaves = VECTORS + tuple(f"g{j}" for j in range(k))
        tree = vectorised(draw(trees(leaves)))
        gates.append((f"g{k}", tree))
        if per_example(tree, batched):
            batched.add(f"g{k}")
    leaves = VECTORS + tuple(name for name, _ in gates)
    nxt = per_example_tree(draw(trees(leaves)), batched)
    out = per_example_tree(draw(trees(leaves + ("h'",))), batched)
    minimal = draw(st.booleans())
    lines = [f"{name} = {render(tree, minimal)}" for name, tree in gates]
    lines += [f"h' = tanh({render(nxt, minimal)})", f"output y = {render(out, minimal)}"]
    order = draw(st.permutations(range(len(lines))))  # equations may be written in any order
    text = ("cell random(H) {\n    input x[H]\n    state h[H] = zeros\n"
            "    param W0[H, H]\n    param W1[H, H]\n    param b0[H]\n    param b1[H]\n"
            + "".join(f"    {lines[i]}\n" for i in order) + "}\n")
    return text, gates, nxt, out


def torch_reference(gates, nxt, out, x, h0, params):
    """The cell run step by step in torch, from the trees (not from the spec text)."""
    h, ys = h0, []
    for t in range(x.shape[0]):
        env = {"x": x[t], "h": h, **params}
        for name, tree in gates:
            env[name] = evaluate(tree, env)
        env["h'"] = torch.tanh(evaluate(nxt, env))
        ys.append(evaluate(out, env).expand(h.shape))
        h = env["h'"]
    return torch.stack(ys), h


@settings(max_examples=40, **SETTINGS)
@given(cell=cells(), size=st.integers(1, 4), seed=st.integers(0, 2 ** 16))
def test_random_elementwise_cells_compute_what_torch_computes(cell, size, seed):
    text, gates, nxt, out = cell
    [checked] = check(parse(text, "random.rnn"))  # always checks
    assert [d.name for d in checked.states] == ["h"]
    module = specc.load(text, H=size).double()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.5)
    T, B = 3, 2
    x = torch.randn(T, B, size, generator=gen, dtype=torch.float64, requires_grad=True)
    params = {name: getattr(module, name).detach().clone().requires_grad_() for name in ("W0", "W1", "b0", "b1")}
    x_ref = x.detach().clone().requires_grad_()
    h0 = torch.zeros(B, size, dtype=torch.float64)

    ys, h = module(x)
    ys_ref, h_ref = torch_reference(gates, nxt, out, x_ref, h0, params)
    torch.testing.assert_close(ys, ys_ref, rtol=1e-9, atol=1e-9, msg=lambda m: f"outputs of\n{text}\n{m}")
    torch.testing.assert_close(h, h_ref, rtol=1e-9, atol=1e-9, msg=lambda m: f"final state of\n{text}\n{m}")

    d_y = torch.randn(ys.shape, generator=gen, dtype=torch.float64)
    d_h = torch.randn(h.shape, generator=gen, dtype=torch.float64)
    ((ys * d_y).sum() + (h * d_h).sum()).backward()
    loss_ref = (ys_ref * d_y).sum() + (h_ref * d_h).sum()
    if loss_ref.requires_grad:  # else the cell reads neither its input nor its parameters
        loss_ref.backward()
    pairs = [("x", x.grad, x_ref.grad)] + [(n, getattr(module, n).grad, params[n].grad) for n in params]
    for name, got, want in pairs:
        want = torch.zeros_like(got) if want is None else want  # a parameter the cell does not use
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-9, msg=lambda m: f"d{name} of\n{text}\n{m}")


# --- sizes ------------------------------------------------------------------------------------

def size_trees() -> st.SearchStrategy:
    base = st.one_of(st.sampled_from(["H", "I"]), st.integers(1, 5).map(str))
    return st.recursive(base, lambda sub: st.tuples(st.sampled_from("+*"), sub, sub), max_leaves=6)


def size_text(tree) -> str:
    if isinstance(tree, str):
        return tree
    return f"({size_text(tree[1])} {tree[0]} {size_text(tree[2])})"


@settings(max_examples=100, **SETTINGS)
@given(tree=size_trees(), h=st.integers(1, 9), i=st.integers(1, 9))
def test_sizes_check_to_the_polynomial_written(tree, h, i):
    text = size_text(tree)
    [c] = check(parse(f"cell c(I, H) {{\n  state s[{text}]\n  s' = tanh(s)\n  output s'\n}}\n"))
    [size] = c.states[0].shape
    assert size.evaluate({"H": h, "I": i}) == eval(text, {"H": h, "I": i})


# --- mutated specs: a SpecError with located diagnostics, never anything else -----------------

LIBRARY = [spec_file(name).read_text() for name in spec_names()]
TOKENS = ["(", ")", "[", "]", "{", "}", ",", "=", "@", "+", "-", "*", "/", "'", "~", ";", "#", '"', "\n", " ",
          "split", "H", "I", "x", "h", "h'", "W", "0", "2", "1.5", "1e999", "output", "state", "param", "input",
          "cell", "sqrt", "contract", "concat", "softmax", "zeros", "uniform", "np", "é", "\t", "(1)", "x'",
          "split(x, 2)", "a, b = split(h, 2)\n", "y = y\n", "h' = h\n"]


@st.composite
def mutated(draw):
    text = draw(st.sampled_from(LIBRARY))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(text)))
        kind = draw(st.sampled_from(["delete", "insert", "copy", "swap lines"]))
        if kind == "delete":
            text = text[:at] + text[at + draw(st.integers(1, 12)):]
        elif kind == "insert":
            text = text[:at] + draw(st.sampled_from(TOKENS)) + text[at:]
        elif kind == "copy":
            start = draw(st.integers(0, len(text)))
            text = text[:at] + text[start:start + draw(st.integers(1, 20))] + text[at:]
        else:
            lines = text.split("\n")
            i, j = draw(st.integers(0, len(lines) - 1)), draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
            text = "\n".join(lines)
    return text


@settings(max_examples=300, **SETTINGS)
@given(text=mutated())
def test_mutated_specs_raise_only_spec_errors(text):
    n_lines = max(len(text.splitlines()), 1)
    try:
        cells = check(parse(text, "m.rnn"))
    except SpecError as e:
        assert e.diagnostics
        for d in e.diagnostics:
            assert d.loc is not None and d.loc.file == "m.rnn"
            assert 1 <= d.loc.line <= n_lines + 1 and d.loc.col >= 1
            assert d.format().startswith(f"m.rnn:{d.loc.line}:{d.loc.col}: error: ")
        return
    for c in cells:  # what checks, compiles
        compile_cell(c, text, "m.rnn")
