"""The first two stages on their own: the parser's AST (with locations) and the checker's output
(dimensions, symbolic shapes such as 4*H, equations put in dependency order).
"""
from __future__ import annotations

from fractions import Fraction

import pytest

from specc import ast
from specc.check import check
from specc.errors import Loc, SpecError
from specc.library import spec_file, spec_names
from specc.parse import parse
from specc.shapes import Size, numel, shape_str

F = "t.rnn"


def L(line: int, col: int) -> Loc:
    return Loc(F, line, col)


def parse_expr(text: str) -> ast.Expr:
    """The AST of one expression, parsed as the right side of an equation on line 2, column 9."""
    spec = parse("cell c() {\n    y = " + text + "\n}\n", F)
    [stmt] = spec.cells[0].stmts
    return stmt.expr


def shape(expr) -> object:
    """An expression tree without locations, for comparing structure."""
    if isinstance(expr, ast.Num):
        return expr.value
    if isinstance(expr, ast.Ref):
        return expr.name + ("'" if expr.next else "")
    if isinstance(expr, ast.BinOp):
        return (expr.op, shape(expr.left), shape(expr.right))
    if isinstance(expr, ast.Neg):
        return ("neg", shape(expr.arg))
    if isinstance(expr, ast.Call):
        return (expr.fn, *map(shape, expr.args))
    if isinstance(expr, ast.Concat):
        return ("[]", *map(shape, expr.items))
    raise AssertionError(expr)


# --- the parser ---------------------------------------------------------------------------------

def test_a_small_cell_parses_to_the_expected_ast_with_locations():
    text = (
        "cell tiny(I, H) {\n"                            # 1
        '    """A tiny cell."""\n'                       # 2
        "    input x[I]\n"                               # 3
        "    state h[H] = zeros  # a comment\n"          # 4
        "    param W[2*H, I] ~ uniform(1 / sqrt(H))\n"   # 5
        "    a, b = split(W @ x, 2)\n"                   # 6
        "    h' = tanh(a) * h + b\n"                     # 7
        "    output h'\n"                                # 8
        "}\n")
    spec = parse(text, F)
    assert spec.file == F and spec.text == text
    want = ast.Cell(
        "tiny", (("I", L(1, 11)), ("H", L(1, 14))), "A tiny cell.",
        (
            ast.Input("x", (ast.DimName("I", L(3, 13)),), L(3, 11)),
            ast.State("h", (ast.DimName("H", L(4, 13)),), ast.Init("zeros", (), L(4, 18)), L(4, 11)),
            ast.Param("W", (ast.DimBin("*", ast.DimNum(2.0, L(5, 13)), ast.DimName("H", L(5, 15)), L(5, 14)),
                            ast.DimName("I", L(5, 18))),
                      ast.Init("uniform", (ast.DimBin("/", ast.DimNum(1.0, L(5, 31)),
                                                      ast.DimCall("sqrt", ast.DimName("H", L(5, 40)), L(5, 35)),
                                                      L(5, 33)),), L(5, 23)),
                      L(5, 11)),
            ast.Assign((ast.Target("a", False, L(6, 5)), ast.Target("b", False, L(6, 8))),
                       ast.Call("split", (ast.BinOp("@", ast.Ref("W", False, L(6, 18)), ast.Ref("x", False, L(6, 22)),
                                                    L(6, 20)),
                                          ast.Num(2.0, L(6, 25))), L(6, 12)),
                       L(6, 5)),
            ast.Assign((ast.Target("h", True, L(7, 5)),),
                       ast.BinOp("+",
                                 ast.BinOp("*", ast.Call("tanh", (ast.Ref("a", False, L(7, 15)),), L(7, 10)),
                                           ast.Ref("h", False, L(7, 20)), L(7, 18)),
                                 ast.Ref("b", False, L(7, 24)), L(7, 22)),
                       L(7, 5)),
            ast.Output(ast.Target("h", True, L(8, 12)), None, L(8, 5)),
        ),
        L(1, 6))
    assert spec.cells == (want,)


def test_locations_carry_the_source_line_for_messages():
    spec = parse("cell c(H) {\n  state h[H]\n  h' = tanh(h)\n  output h'\n}\n", F)
    stmt = spec.cells[0].stmts[1]
    assert stmt.loc.text == "  h' = tanh(h)"
    assert stmt.expr.args[0].loc.text == "  h' = tanh(h)"


@pytest.mark.parametrize("text, want", [
    ("a + b * c", ("+", "a", ("*", "b", "c"))),
    ("a - b - c", ("-", ("-", "a", "b"), "c")),               # left associative
    ("a / b * c", ("*", ("/", "a", "b"), "c")),
    ("r * U @ h", ("*", "r", ("@", "U", "h"))),                # @ binds tighter than * (README)
    ("U @ h * r", ("*", ("@", "U", "h"), "r")),
    ("A @ B @ x", ("@", ("@", "A", "B"), "x")),
    ("-a * b", ("*", ("neg", "a"), "b")),
    ("-(a * b)", ("neg", ("*", "a", "b"))),
    ("--a", ("neg", ("neg", "a"))),
    ("1 - z", ("-", 1.0, "z")),
    ("(1 - z) * h + z * n", ("+", ("*", ("-", 1.0, "z"), "h"), ("*", "z", "n"))),
    ("h' * c'", ("*", "h'", "c'")),
    ("[a, b, c]", ("[]", "a", "b", "c")),
    ("concat(a, b)", ("concat", "a", "b")),
    ("contract(W, x, h)", ("contract", "W", "x", "h")),
    ("sigmoid(W @ x + b)", ("sigmoid", ("+", ("@", "W", "x"), "b"))),
    ("f()", ("f",)),
    ("2.5e-3 + .5 + 7.", ("+", ("+", 0.0025, 0.5), 7.0)),
])
def test_expressions_parse_with_the_documented_precedence(text, want):
    assert shape(parse_expr(text)) == want


def test_operator_locations_are_the_operator():
    e = parse_expr("a + b * c")
    assert e.loc == L(2, 11) and e.right.loc == L(2, 15)
    assert e.left.loc == L(2, 9) and e.right.right.loc == L(2, 17)


def test_outputs_docstrings_semicolons_and_several_cells():
    text = ("cell a(H) { state h[H]; h' = h; output y = h' * 2 }\n"
            "# between cells\n"
            "cell b() {\n  \"\"\"\n  Two\n  lines.\n  \"\"\"\n}\n")
    spec = parse(text, F)
    a, b = spec.cells
    assert a.name == "a" and b.name == "b" and b.dims == ()
    assert b.doc == "Two\n  lines." and b.stmts == ()
    out = a.stmts[-1]
    assert isinstance(out, ast.Output) and out.target == ast.Target("y", False, L(1, 40))
    assert shape(out.expr) == ("*", "h'", 2.0)


def test_parameter_initialisers_parse_with_either_sign():
    spec = parse("cell c(H) {\n  param A[H] ~ normal(0, 0.1)\n  param B[H] = constant(-1)\n}\n", F)
    a, b = spec.cells[0].stmts
    assert a.init.name == "normal" and [d.value for d in a.init.args] == [0.0, 0.1]
    assert b.init.name == "constant" and isinstance(b.init.args[0], ast.DimNeg)


def test_every_library_spec_parses_and_checks():
    for name in spec_names():
        text = spec_file(name).read_text()
        cells = check(parse(text, name))
        assert cells and all(c.outputs for c in cells)


# --- the checker --------------------------------------------------------------------------------

LSTM = (spec_file("lstm").read_text())


def test_checked_lstm_has_symbolic_shapes():
    [c] = check(parse(LSTM, "lstm.rnn"))
    assert c.name == "lstm" and c.dims == ("I", "H") and c.file == "lstm.rnn"
    assert c.doc.startswith("Long short-term memory")
    assert [(d.name, shape_str(d.shape)) for d in c.inputs] == [("x", "[I]")]
    assert [(d.name, shape_str(d.shape)) for d in c.states] == [("h", "[H]"), ("c", "[H]")]
    assert [(d.name, shape_str(d.shape)) for d in c.params] == [
        ("W_ih", "[4*H, I]"), ("W_hh", "[4*H, H]"), ("b_ih", "[4*H]"), ("b_hh", "[4*H]")]
    assert c.params[0].shape == (Size.of("H") * 4, Size.of("I"))
    assert [(name, str(t)) for name, t in c.outputs] == [("h", "h'")]
    assert [tuple(map(str, e.targets)) for e in c.equations] == [("i", "f", "g", "o"), ("c'",), ("h'",)]
    assert c.states[0].init.name == "zeros" and c.params[0].init is None


def test_equations_may_be_written_in_any_order():
    body = ["i, f, g, o = split(W_ih @ x + b_ih + W_hh @ h + b_hh, 4)",
            "c' = sigmoid(f) * c + sigmoid(i) * tanh(g)",
            "h' = sigmoid(o) * tanh(c')",
            "output h'"]
    head = LSTM[:LSTM.index("    i, f, g, o")]
    forward = check(parse(head + "\n".join(body) + "\n}\n"))[0]
    backward = check(parse(head + "\n".join(reversed(body)) + "\n}\n"))[0]
    order = [tuple(map(str, e.targets)) for e in backward.equations]
    assert order == [tuple(map(str, e.targets)) for e in forward.equations]
    assert order.index(("c'",)) < order.index(("h'",))
    assert order.index(("i", "f", "g", "o")) < order.index(("c'",))


def test_outputs_defined_by_an_expression_are_equations_too():
    text = ("cell c(I, H, O) {\n  input x[I]\n  state h[H]\n  param V[O, H]\n  param W[H, I]\n"
            "  output y = V @ h'\n  h' = tanh(W @ x + h)\n}\n")
    [c] = check(parse(text))
    assert [tuple(map(str, e.targets)) for e in c.equations] == [("h'",), ("y",)]
    assert [name for name, _ in c.outputs] == ["y"]


def test_checked_sizes_are_polynomials_in_the_dimensions():
    text = ("cell c(I, H) {\n  input x[I + H]\n  state h[H]\n  param W[3*H - H, (I + H) * 2]\n"
            "  param V[H * I, H / 2]\n  param b[2 * (H + 1)]\n  h' = tanh(h)\n  output h'\n}\n")
    [c] = check(parse(text))
    assert shape_str(c.inputs[0].shape) == "[H + I]"
    assert [shape_str(d.shape) for d in c.params] == ["[2*H, 2*H + 2*I]", "[H*I, H//2]", "[2*H + 2]"]
    w = c.params[0].shape
    assert w[1].evaluate({"H": 5, "I": 3}) == 16 and w[0].names() == {"H"}


def test_split_parts_have_symbolic_sizes_and_are_recorded_for_binding():
    [c] = check(parse(LSTM))
    rules = [(str(r.size), r.what) for r in c.sizes]
    assert ("H", "each of the 4 parts of split(..., 4)") in rules


def test_state_previous_value_and_inputs_may_be_outputs():
    text = "cell c(H) {\n  input x[H]\n  state h[H]\n  h' = tanh(h + x)\n  output h\n  output x\n}\n"
    [c] = check(parse(text))
    assert [(name, str(t)) for name, t in c.outputs] == [("h", "h"), ("x", "x")]


def test_check_reports_every_cell_not_only_the_first():
    text = "cell a(H) {\n  state h[H]\n  output h\n}\ncell b(H) {\n  state h[H]\n  output h\n}\n"
    with pytest.raises(SpecError) as info:
        check(parse(text))
    assert [d.loc.line for d in info.value.diagnostics] == [2, 6]


# --- symbolic sizes (shapes.py) -----------------------------------------------------------------

def test_size_arithmetic_and_printing():
    H, I = Size.of("H"), Size.of("I")
    assert str(4 * H) == "4*H" and str(H * 4) == "4*H"
    assert str(H + I) == "H + I" and str(I + H) == "H + I"
    assert str(4 * H + I - 3) == "4*H + I - 3"
    assert str(H * I + H) == "H*I + H"
    assert str(H - H) == "0" and (H - H).constant == 0
    assert str(-H) == "-H" and str(2 - H) == "-H + 2"
    assert str(H / 2) == "H//2" and str(3 * H / 2) == "3*H//2"
    assert str(H * H) == "H*H"
    assert (H + 1).constant is None and Size.of(7).constant == 7
    assert (4 * H) / 4 == H and (H / 2) * 2 == H
    assert (3 * H / 2).evaluate({"H": 5}) == Fraction(15, 2)
    assert Size.of(H) is H and Size.of(0) == Size.of(0) - 0
    assert (H + I).names() == {"H", "I"}
    assert str(numel((2 * H, I))) == "2*H*I"
    assert shape_str(()) == "[]" and shape_str((H, I + 1)) == "[H, I + 1]"
