"""Bad input gets a clear error that says where and what, and never a traceback.

Each malformed spec below states every error it must produce: the exact line and column, and the
words the message must contain. Each is checked twice, through the Python API (parse + check
raise SpecError with .diagnostics) and through the command line (`specc check FILE` prints
`FILE:LINE:COL: error: ...`, the source line and a caret, and exits 1).
"""
from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

import specc
from specc.check import MODULE_ATTRS, check, check_dims
from specc.errors import Diagnostic, Loc, SpecError
from specc.parse import parse


@dataclass(frozen=True)
class Want:
    line: int
    col: int
    words: tuple[str, ...]


def want(line: int, col: int, *words: str) -> Want:
    return Want(line, col, words)


# A well-formed cell; cases replace or add lines to it. Line numbers:
#  1 cell c(I, H) {
#  2     input x[I]
#  3     state h[H] = zeros
#  4     param W[H, I]
#  5     param U[H, H]
#  6     param b[H]
#  7     <body line 7>
#  8     <body line 8> ...
def cell(*body: str, header: str = "cell c(I, H) {") -> str:
    head = [header, "    input x[I]", "    state h[H] = zeros", "    param W[H, I]", "    param U[H, H]",
            "    param b[H]"]
    return "\n".join(head + ["    " + line for line in body] + ["}"]) + "\n"


CASES: dict[str, tuple[str, list[Want]]] = {
    # --- syntax ---
    "syntax error": (
        cell("h' = tanh(W @ x +)", "output h'"),
        [want(7, 22, "unexpected ')'", "expected an expression")]),
    "unexpected character": (
        cell("h' = tanh(W @ x $ b)", "output h'"),
        [want(7, 21, "unexpected character '$'")]),
    "unexpected end of file": (
        "cell c(I, H) {\n    input x[I]\n    h' = tanh(W @ x",
        [want(3, 20, "unexpected end of file", "'(' at line 3, column 14 is not closed")]),
    "cell not closed": (
        "cell c(I, H) {\n    input x[I]\n    state h[H]\n    h' = tanh(h)\n    output h'\n\n",
        [want(5, 14, "end of file", "cell 'c'", "not closed", "'}'")]),
    "misspelt keyword": (
        cell("parm V[H]", "h' = tanh(W @ x)", "output h'"),
        [want(7, 5, "unknown keyword 'parm'", "did you mean 'param'")]),
    "unterminated docstring": (
        'cell c(I, H) {\n    """An LSTM\n    input x[I]\n}\n',
        [want(2, 5, "unterminated docstring")]),
    "empty file": (
        "# nothing here\n\n",
        [want(1, 1, "no cell")]),
    "several syntax errors": (
        cell("h' = tanh(W @ x $ b)", "a = (U @ h +", "     * 2)", "output y = h' * * 2"),
        [want(7, 21, "unexpected character '$'"),
         want(9, 10, "unexpected '*'", "expected an expression"),
         want(10, 21, "unexpected '*'", "expected an expression")]),
    "bracket left open": (
        cell("h' = tanh(W @ x", "output h'"),
        [want(7, 20, "')' expected", "'(' at line 7, column 14 is not closed", "'output' on line 8")]),
    # --- names ---
    "unknown name, with a suggestion": (
        cell("h' = tanh(W @ x + U @ hh + b)", "output h'"),
        [want(7, 27, "unknown name 'hh'", "did you mean 'h'")]),
    "unknown function, with a suggestion": (
        cell("h' = tanhh(W @ x + U @ h + b)", "output h'"),
        [want(7, 10, "unknown function 'tanhh'", "did you mean 'tanh'")]),
    "a parameter called like a function": (
        cell("h' = tanh(W(x))", "output h'"),
        [want(7, 15, "unknown function 'W'", "parameter", "W @")]),
    "a dimension used as a value": (
        cell("h' = tanh(W @ x) * H", "output h'"),
        [want(7, 24, "'H' is a dimension, not a value")]),
    "unbound dimension in a shape": (
        cell("param V[K, H]", "h' = tanh(W @ x)", "output h'"),
        [want(7, 13, "unknown dimension 'K'", "cell name(H, I, K)")]),
    "reserved name for a value": (
        cell("__v = W @ x", "h' = tanh(__v)", "output h'"),
        [want(7, 5, "'__v' is a reserved name", "value")]),
    "reserved name for a dimension": (
        cell("h' = tanh(W @ x)", "output h'", header="cell c(I, H, dtype) {"),
        [want(1, 14, "'dtype' is a reserved name", "specc.load")]),
    "python keyword as a name": (
        cell("lambda = W @ x", "h' = tanh(lambda)", "output h'"),
        [want(7, 5, "'lambda' is a reserved name")]),
    "parameter named like a module attribute": (
        cell("param train[H]", "h' = tanh(W @ x + train)", "output h'"),
        [want(7, 11, "'train' is a reserved name", "attribute")]),
    "dimension named like a keyword of specc.load": (
        cell("h' = tanh(W @ x)", "output h'", header="cell c(I, H, backend) {"),
        [want(1, 14, "'backend' is a reserved name", "specc.load")]),
    # --- shapes ---
    "shape mismatch in @": (
        cell("h' = tanh(W @ h + b)", "output h'"),
        [want(7, 17, "matrix [H, I] @ vector [H]", "I columns but H entries")]),
    "per-head product of a vector that is not heads of its columns": (
        cell("param R[2, H, I]", "h' = tanh(R @ h)", "output h'"),
        [want(8, 17, "per-head product [2, H, I] @ [H]", "2 heads of I entries (2*I)", "got H")]),
    "a vector on the left of @": (
        cell("h' = tanh(x @ h)", "output h'"),
        [want(7, 17, "left side of @ must be a matrix")]),
    "shape mismatch in +": (
        cell("h' = tanh(W @ x + x)", "output h'"),
        [want(7, 21, "shape mismatch in '+'", "[H]", "[I]")]),
    "next value of the wrong shape": (
        cell("h' = [h, h]", "output h'"),
        [want(7, 5, "h' has shape [2*H]", "declared [H]")]),
    "next value the same for every example": (
        cell("h' = tanh(b)", "output h'"),
        [want(7, 5, "h'", "same for every example")]),
    "negative size": (
        cell("param V[2 - 3]", "h' = tanh(W @ x)", "output h'"),
        [want(7, 15, "size must be positive", "-1")]),
    "split into unequal parts": (
        cell("param V[3, H]", "p, q = split(V @ h, 2)", "h' = tanh(W @ x)", "output y = p"),
        [want(8, 12, "split(..., 2)", "3 entries", "2 equal parts")]),
    "number too large": (
        cell("param V[1e999]", "h' = tanh(W @ x)", "output h'"),
        [want(7, 13, "size must be a whole number", "inf")]),
    # --- definitions ---
    "state with no next value": (
        cell("a = tanh(W @ x)", "output a"),
        [want(3, 11, "state 'h' has no next value", "h' = ...")]),
    "parameter defined twice": (
        cell("param b[H]", "h' = tanh(W @ x + b)", "output h'"),
        [want(7, 11, "'b' is defined twice", "parameter at line 6")]),
    "gate assigned twice": (
        cell("a = W @ x", "a = U @ h", "h' = tanh(a)", "output h'"),
        [want(8, 5, "'a' is defined twice", "line 7")]),
    "next value given twice": (
        cell("h' = tanh(W @ x)", "h' = tanh(U @ h)", "output h'"),
        [want(8, 5, "h' is defined twice", "line 7")]),
    "wrong number of arguments": (
        cell("h' = sigmoid(W @ x, b)", "output h'"),
        [want(7, 10, "sigmoid takes 1 argument, got 2")]),
    "a reduction of a matrix": (
        cell("h' = tanh(W @ x + sum(U))", "output h'"),
        [want(7, 23, "sum(v) takes a vector", "got [H, H]")]),
    "a per-example number as an output": (
        cell("h' = tanh(W @ x)", "output m = mean(h')"),
        [want(8, 12, "output 'm' must be a per-example vector")]),
    "a slope that is not a number": (
        cell("h' = leaky_relu(W @ x, b)", "output h'"),
        [want(7, 28, "leaky_relu: its slope must be a number")]),
    "clamp's bounds the wrong way round": (
        cell("h' = clamp(W @ x, 1, -1)", "output h'"),
        [want(7, 10, "clamp(v, lo, hi) needs lo <= hi")]),
    "a learned state whose parameter name is taken": (
        cell("param h_init[H]", "h' = tanh(W @ x + h_init)", "output h'").replace("state h[H] = zeros",
                                                                                  "state h[H] = learned"),
        [want(3, 11, "state 'h' is learned", "'h_init'")]),
    "a parameter cannot be learned": (
        cell("param a[H] = learned", "h' = tanh(W @ x + a)", "output h'"),
        [want(7, 18, "unknown initialiser 'learned'")]),
    "a dropout probability of 1": (
        cell("h' = tanh(W @ dropout(x, 1))", "output h'"),
        [want(7, 30, "dropout(v, p) drops with probability p, 0 <= p < 1")]),
    "a keyword of the language as a state's name": (
        cell("state const[H]", "const' = tanh(W @ x)", "output const'"),
        [want(8, 5, "'const' is a keyword of the language")]),
    "a keyword of the language as a parameter's name": (
        cell("param output[H]", "h' = tanh(W @ x + output)", "output h'"),
        [want(7, 11, "'output' is a keyword of the language")]),
    "split count not matching the names": (
        cell("p, q = split(W @ x, 3)", "h' = tanh(p + q)", "output h'"),
        [want(7, 12, "split(..., 3) gives 3 values but 2 names")]),
    "next value of an input": (
        cell("x' = W @ x", "h' = tanh(W @ x)", "output h'"),
        [want(7, 5, "x' gives a next value", "'x' is an input, not a state")]),
    "assigning to a state without prime": (
        cell("h = tanh(W @ x)", "output h"),
        [want(7, 5, "cannot assign to state 'h'", "write h' = ...")]),
    "cycle through two values": (
        cell("p = q + b", "q = tanh(p)", "h' = tanh(W @ x + p)", "output h'"),
        [want(7, 5, "p depends on itself within one step", "p -> q -> p")]),
    "next value depending on itself": (
        cell("h' = h' * 2", "output h'"),
        [want(7, 5, "h' depends on itself within one step", "h' -> h'")]),
    "unknown initialiser": (
        cell("param V[H] ~ gaussian", "h' = tanh(W @ x)", "output h'"),
        [want(7, 18, "unknown initialiser 'gaussian'", "expected one of", "normal")]),
    "initialiser with the wrong number of arguments": (
        cell("param V[H] ~ uniform(1, 2, 3)", "h' = tanh(W @ x)", "output h'"),
        [want(7, 18, "uniform takes 1 or 2 arguments, got 3")]),
    "initialiser with a negative standard deviation": (
        cell("param V[H] ~ normal(-0.5)", "h' = tanh(W @ x)", "output h'"),
        [want(7, 25, "standard deviation must be 0 or more, got -0.5")]),
    "initialiser with an empty range": (
        cell("param V[H] ~ uniform(2, 1 / 2)", "h' = tanh(W @ x)", "output h'"),
        [want(7, 18, "a must not exceed b, got 2 > 0.5")]),
    # --- initialiser arguments wrong whatever the dimensions (each a whole number from 1 up) ---
    "spread negative for every dimension": (
        cell("param V[H] ~ uniform(-1 / sqrt(H))", "h' = tanh(W @ x)", "output h'"),
        [want(7, 26, "uniform(k)", "k must be 0 or more", "but -1 / sqrt(H) < 0 for every H")]),
    "standard deviation negative for every dimension": (
        cell("param V[H] ~ normal(0, 1 - 2 * H * I)", "h' = tanh(W @ x)", "output h'"),
        [want(7, 28, "standard deviation must be 0 or more", "1 - 2 * H * I < 0 for every H and I")]),
    "range empty for every dimension": (
        cell("param V[H] ~ uniform(H, H - 1)", "h' = tanh(W @ x)", "output h'"),
        [want(7, 18, "a must not exceed b", "but H > H - 1 for every H")]),
    "initialiser dividing by zero": (
        cell("param V[H] ~ constant(1 / (H - H))", "h' = tanh(W @ x)", "output h'"),
        [want(7, 29, "1 / (H - H) divides by zero", "H - H = 0 for every H")]),
    "gain the square root of a negative number": (
        cell("param V[H, H] ~ orthogonal(sqrt(1 - 2 * H))", "h' = tanh(W @ x)", "output h'"),
        [want(7, 32, "sqrt(1 - 2 * H) is the square root of a negative number", "1 - 2 * H < 0 for every H")]),
    "gain that overflows": (
        cell("param V[H, H] ~ identity(1e200 * 1e200)", "h' = tanh(W @ x)", "output h'"),
        [want(7, 30, "1e+200 * 1e+200 overflows to infinity")]),
    "state constant dividing by zero": (
        cell("state s[H] = constant(2 / 0)", "s' = tanh(W @ x + s)", "h' = tanh(W @ x)", "output h'"),
        [want(7, 29, "2 / 0 divides by zero")]),
    "state initialiser that is not a constant": (
        "cell c(H) {\n    state h[H] = normal(1)\n    h' = tanh(h)\n    output h'\n}\n",
        [want(2, 18, "unknown initialiser 'normal'", "zeros, ones, constant")]),
    "no output": (
        cell("h' = tanh(W @ x)"),
        [want(1, 6, "cell 'c' has no output", "output h'")]),
    "output of a parameter": (
        cell("h' = tanh(W @ x)", "output b"),
        [want(8, 12, "'b' is a parameter", "per-example")]),
    "unknown output": (
        cell("h' = tanh(W @ x)", "output z"),
        [want(8, 12, "unknown value 'z' in output")]),
    "cell defined twice": (
        "cell c(H) {\n  state h[H]\n  h' = tanh(h)\n  output h'\n}\n"
        "cell c(H) {\n  state h[H]\n  h' = tanh(h)\n  output h'\n}\n",
        [want(6, 6, "cell 'c' is defined twice", "line 1")]),
    # --- several independent errors, each reported once, none caused by another ---
    "several independent errors": (
        cell("param V[H] ~ gausian",
             "z = sigmoid(W @ h)",
             "r = sigmoid(U @ hh)",
             "p, q = split(W @ x, 3)",
             "h' = tanh(z + r + p + q)",
             "output y"),
        [want(7, 18, "unknown initialiser 'gausian'", "normal"),
         want(8, 19, "matrix [H, I] @ vector [H]"),
         want(9, 21, "unknown name 'hh'", "did you mean 'h'"),
         want(10, 12, "split(..., 3) gives 3 values"),
         want(12, 12, "unknown value 'y' in output")]),
}


def diagnostics(text: str, file: str = "bad.rnn") -> list[Diagnostic]:
    with pytest.raises(SpecError) as info:
        check(parse(text, file))
    return info.value.diagnostics


def assert_matches(got: list[Diagnostic], wanted: list[Want], file: str = "bad.rnn") -> None:
    summary = "\n".join(d.format() for d in got)
    assert [(d.loc.line, d.loc.col) if d.loc else None for d in got] == [(w.line, w.col) for w in wanted], summary
    for d, w in zip(got, wanted):
        assert d.loc.file == file
        for word in w.words:
            assert word in d.message, f"{word!r} not in {d.message!r}"


@pytest.mark.parametrize("name", list(CASES))
def test_error_through_the_api(name):
    text, wanted = CASES[name]
    assert_matches(diagnostics(text), wanted)


def test_the_cases_cover_enough_malformed_specs():
    assert len(CASES) >= 14


def _cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "specc.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


@pytest.mark.parametrize("name", list(CASES))
def test_error_through_the_cli(name, tmp_path):
    text, wanted = CASES[name]
    path = tmp_path / "bad.rnn"
    path.write_text(text)
    result = _cli("check", str(path))
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    lines = text.splitlines()
    for w in wanted:
        head = f"{path}:{w.line}:{w.col}: error: "
        assert head in result.stderr, result.stderr
        message_line = next(s for s in result.stderr.splitlines() if s.startswith(head))
        for word in w.words:
            assert word in message_line
        # the source line, then a caret under the spot
        out = result.stderr.splitlines()
        i = out.index(message_line)
        if w.line <= len(lines) and lines[w.line - 1].strip():
            assert out[i + 1] == "    " + lines[w.line - 1].rstrip()
            assert out[i + 2] == "    " + " " * (w.col - 1) + "^"
    assert result.stderr.count(": error: ") == len(wanted), result.stderr


def test_compile_command_reports_errors_and_exits_1(tmp_path):
    path = tmp_path / "bad.rnn"
    path.write_text(CASES["shape mismatch in @"][0])
    result = _cli("compile", str(path), "-o", str(tmp_path / "out.py"))
    assert result.returncode == 1
    assert f"{path}:7:17: error: matrix [H, I] @ vector [H]" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out.py").exists()


def test_check_command_goes_on_to_the_next_file(tmp_path, specs_dir):
    bad = tmp_path / "bad.rnn"
    bad.write_text(CASES["unknown name, with a suggestion"][0])
    result = _cli("check", str(bad), str(specs_dir / "gru.rnn"))
    assert result.returncode == 1
    assert f"{bad}:7:27: error: unknown name 'hh'" in result.stderr
    assert "cell gru(I, H)" in result.stdout


def test_caret_keeps_tabs_so_it_sits_under_the_spot():
    text = "cell c(H) {\n\tstate h[H]\n\th' = tanh(h + q)\n\toutput h'\n}\n"
    [d] = diagnostics(text)
    assert (d.loc.line, d.loc.col) == (3, 16)
    assert d.format().splitlines()[1:] == ["    \th' = tanh(h + q)", "    \t              ^"]


def test_diagnostic_without_a_location_or_source_line():
    assert Diagnostic(None, "boom").format() == "error: boom"
    assert Diagnostic(Loc("f.rnn", 3, 4), "boom").format() == "f.rnn:3:4: error: boom"


def test_the_same_problem_found_twice_is_reported_once():
    text = cell("h' = tanh(W @ x + U @ hh + b)", "output h'")
    assert len(diagnostics(text)) == 1


def test_a_failed_definition_causes_no_further_errors():
    # split fails, so p and q have no type; their uses are not reported again
    text = cell("p, q = split(W @ x, 3)", "r = p * q", "h' = tanh(r)", "output y = r + p")
    assert [(d.loc.line, d.loc.col) for d in diagnostics(text)] == [(7, 12)]
    # a state declared with a bad shape: its next value and uses are not reported again
    text = "cell c(H) {\n    state h[K]\n    h' = tanh(h)\n    output h'\n}\n"
    [d] = diagnostics(text)
    assert (d.loc.line, d.loc.col, "unknown dimension 'K'") == (2, 13, d.message[:21])


def test_errors_in_two_cells_are_reported_together():
    text = ("cell a(H) {\n  state h[H]\n  h' = tanh(q)\n  output h'\n}\n"
            "cell b(H) {\n  state h[H]\n  output h\n}\n")
    got = diagnostics(text)
    assert [(d.loc.line, d.loc.col) for d in got] == [(3, 13), (7, 9)]
    assert "unknown name 'q'" in got[0].message
    assert "state 'h' has no next value" in got[1].message


def test_nothing_but_spec_errors_for_odd_inputs():
    odd = ["", "}", "cell", "cell c(", "cell c() {}", "cell c(H) { state h[H] h' = h output h' }",
           "cell c(H) { state h[1e400] h' = h output h' }", "cell c(H) { state h[H] a = split(h, 1e400) }",
           "cell c(H) { input x[H] output y = x }", "\x00", "cell c(H) { state h[H] h' = h @ @ h output h' }"]
    for text in odd:
        try:
            check(parse(text))
        except SpecError as e:
            for d in e.diagnostics:
                assert d.loc is None or (d.loc.line >= 1 and d.loc.col >= 1)


# --- errors when a cell is loaded -------------------------------------------------------------

SPLIT = """cell halves(I, H) {
    input x[I]
    state h[H] = zeros
    param W[H, I]
    a, b = split(W @ x + h, 2)
    h' = [tanh(a), b]
    output h'
}
"""


def test_loading_a_cell_that_does_not_exist(tmp_path):
    path = tmp_path / "two.rnn"
    path.write_text(SPLIT + SPLIT.replace("halves", "other"))
    with pytest.raises(SpecError) as info:
        specc.load(path, cell="nope", I=3, H=4)
    message = str(info.value)
    assert "no cell 'nope'" in message and "halves" in message and "other" in message
    assert "Traceback" not in message
    with pytest.raises(SpecError, match=r"choose one \(cell=NAME"):
        specc.load(path, I=3, H=4)


def test_loading_with_a_dimension_missing():
    with pytest.raises(Exception, match=r"dimension H not bound; pass H=\.\.\.") as info:
        specc.load("lstm", I=3)
    assert isinstance(info.value, (TypeError, SpecError))


@pytest.mark.parametrize("value", [0, -2, "a", 2.0, True, None])
def test_loading_with_a_dimension_that_is_not_a_positive_whole_number(value):
    with pytest.raises(Exception, match=r"dimension H must be a positive whole number, got") as info:
        specc.load("lstm", I=3, H=value)
    assert isinstance(info.value, (ValueError, TypeError, SpecError))


def test_loading_with_an_unknown_dimension():
    with pytest.raises(Exception, match="K") as info:
        specc.load("lstm", I=3, H=4, K=2)
    assert "dimension" in str(info.value)


def test_check_dims_rejects_a_split_that_does_not_divide():
    [c] = check(parse(SPLIT, "halves.rnn"))
    assert check_dims(c, {"I": 3, "H": 4}) == {"I": 3, "H": 4}
    with pytest.raises(SpecError) as info:
        check_dims(c, {"I": 3, "H": 5})
    [d] = info.value.diagnostics
    assert (d.loc.file, d.loc.line, d.loc.col) == ("halves.rnn", 5, 12)
    assert "H=5" in d.message and "split(..., 2)" in d.message and "5/2" in d.message
    with pytest.raises(SpecError, match="dimension H must be a positive whole number, got 0"):
        check_dims(c, {"I": 3, "H": 0})
    with pytest.raises(SpecError, match="dimension H of cell 'halves' not bound"):
        check_dims(c, {"I": 3})
    with pytest.raises(SpecError, match="has no dimension 'K'"):
        check_dims(c, {"I": 3, "H": 4, "K": 1})


def test_check_dims_rejects_a_declared_size_that_is_not_positive():
    [c] = check(parse("cell c(I, H) {\n  input x[I]\n  state h[H - I]\n  h' = tanh(h)\n  output h'\n}\n"))
    with pytest.raises(SpecError) as info:
        check_dims(c, {"I": 3, "H": 3})
    [d] = info.value.diagnostics
    assert (d.loc.line, d.loc.col) == (3, 13) and "state h" in d.message and "H - I = 0" in d.message


def test_loading_with_a_split_that_does_not_divide():
    with pytest.raises(Exception, match=r"split\(\.\.\., 2\)"):
        specc.load(SPLIT, I=3, H=5)


# --- initialiser arguments that depend on the dimensions' values: refused at load, at their line ----

def _with_init(init: str, state: str = "zeros") -> str:
    return (f"cell c(I, H) {{\n    input x[I]\n    state h[H] = {state}\n    param W[H, I] ~ {init}\n"
            f"    h' = tanh(W @ x + h)\n    output h'\n}}\n")


@pytest.mark.parametrize("init, dims, where, words", [
    ("uniform(H - 4)", dict(I=3, H=2), (4, 29), "with I=3, H=2, uniform(k) draws from U(-k, k): k must be 0 or more, "
                                                "got H - 4 = -2"),
    ("normal(0, 1 - H)", dict(I=3, H=2), (4, 31), "with I=3, H=2, normal's standard deviation must be 0 or more, "
                                                  "got 1 - H = -1"),
    ("uniform(H, 3)", dict(I=3, H=4), (4, 21), "with I=3, H=4, uniform(a, b) draws from U(a, b): a must not "
                                               "exceed b, got H = 4 > 3"),
    ("constant(1 / (H - 2))", dict(I=3, H=2), (4, 32), "with I=3, H=2, constant for W cannot be computed: "
                                                       "1 / (H - 2) divides by H - 2 = 0"),
    ("orthogonal(sqrt(H - 3))", dict(I=3, H=2), (4, 32), "with I=3, H=2, orthogonal for W cannot be computed: "
                                                         "sqrt(H - 3) = sqrt(-1), the square root of a negative"),
    ("identity(1e306 * H * I)", dict(I=20, H=20), (4, 30), "with I=20, H=20, identity's argument 1e+306 * H * I = "
                                                           "inf for W is not a finite number"),
    ("uniform(1e38 * H)", dict(I=3, H=4), (4, 21), "with I=3, H=4, uniform's range [-4e+38, 4e+38] for W is too "
                                                   "wide for float32"),
])
def test_an_initialiser_the_dimensions_make_wrong_is_refused_at_load_at_its_line(init, dims, where, words):
    text = _with_init(init)
    check(parse(text))  # nothing the checker can prove: these are right for other dimensions
    with pytest.raises(ValueError) as info:
        specc.load(text, **dims, dtype=torch.float32)
    assert isinstance(info.value, SpecError)
    [d] = info.value.diagnostics
    assert ((d.loc.line, d.loc.col), d.message[:len(words)]) == (where, words), d.message
    assert "\n    " + " " * (where[1] - 1) + "^" in str(info.value)


def test_the_same_initialisers_load_with_other_dimensions():
    for init, dims in (("uniform(H - 4)", dict(I=3, H=5)), ("normal(0, 1 - H)", dict(I=3, H=1)),
                       ("uniform(H, 3)", dict(I=3, H=3)), ("constant(1 / (H - 2))", dict(I=3, H=4)),
                       ("orthogonal(sqrt(H - 3))", dict(I=3, H=3))):
        m = specc.load(_with_init(init), **dims)
        assert torch.isfinite(m.W).all(), init
    m = specc.load(_with_init("uniform(1e38 * H)"), I=3, H=4, dtype=torch.float64)
    assert m.W.abs().max() <= 4e38


def test_a_state_constant_the_dimensions_make_wrong_is_refused_at_load_not_at_the_first_step():
    text = _with_init("normal(0.1)", state="constant(1 / (H - 2))")
    with pytest.raises(ValueError, match=r"<spec>:3:29: error: with I=3, H=2, constant for h cannot be computed"):
        specc.load(text, I=3, H=2)
    m = specc.load(text, I=3, H=4)
    assert m.initial_state(2)[0][0, 0].item() == 0.5


def test_an_initialiser_of_a_networks_cell_is_checked_for_each_layer_it_makes():
    net = """cell wide(I, H) {
    input x[I]
    state h[H] = zeros
    param W[H, I] ~ uniform(I - 4)
    h' = tanh(W @ x + h)
    output h'
}
network n(I, H) {
    input x: sequence[I]
    layer enc = wide(H=H) stacked 2
    output y = x -> enc
}
"""
    with pytest.raises(ValueError) as info:
        specc.load(net, "n", I=2, H=5)  # the first layer's I is 2
    assert str(info.value).startswith("<spec>:4:29: error: with I=2, H=5 (layer 'enc', stacked layer 0), "
                                      "uniform(k) draws from U(-k, k): k must be 0 or more, got I - 4 = -2")
    with pytest.raises(ValueError, match=r"^<spec>:4:29: error: with I=3, H=3 \(layer 'enc', stacked layer 1\)"):
        specc.load(net, "n", I=5, H=3)  # the first layer is right; the second's I is H = 3
    assert specc.load(net, "n", I=5, H=4)(torch.randn(3, 2, 5)).shape == (3, 2, 4)


def _expressions(rng, depth: int) -> str:
    """A random initialiser argument: numbers, H and I, + - * /, unary minus and sqrt."""
    if depth == 0 or rng.random() < 0.25:
        return rng.choice(["H", "I", "0", "1", "2", "3", "0.5", "4"])
    kind = rng.random()
    if kind < 0.15:
        return f"-{_expressions(rng, depth - 1)}"
    if kind < 0.3:
        return f"sqrt({_expressions(rng, depth - 1)})"
    return f"({_expressions(rng, depth - 1)} {rng.choice('+-*/')} {_expressions(rng, depth - 1)})"


def test_what_the_checker_accepts_loads_or_is_refused_at_its_line():
    """For random arguments of every initialiser: when specc check proves one wrong, it is wrong for
    every binding tried; when it does not, each binding either fills the tensor as the generated
    code would (specc.initializers, the arguments computed by the generated expressions) or is refused by
    the load-time check, at the initialiser's line."""
    import math
    import random

    from specc import initializers as initialisers
    from specc.assemble import scalar_code
    from specc.check import bind_inits

    rng = random.Random(0)
    bindings = [dict(I=1, H=1), dict(I=2, H=1), dict(I=1, H=3), dict(I=5, H=2), dict(I=4, H=9)]
    shapes = {"orthogonal": "[H, I]", "identity": "[H, H]"}
    counts = {"proved": 0, "refused": 0, "loaded": 0}
    for _ in range(400):
        name, arity = rng.choice([("uniform", 1), ("uniform", 2), ("normal", 1), ("normal", 2), ("constant", 1),
                                  ("orthogonal", 1), ("identity", 1)])
        args = [_expressions(rng, 3) for _ in range(arity)]
        text = (f"cell c(I, H) {{\n    input x[I]\n    state h[H]\n    param V{shapes.get(name, '[H]')} ~ "
                f"{name}({', '.join(args)})\n    h' = tanh(h)\n    output h'\n}}\n")
        try:
            [cell_] = check(parse(text))
        except SpecError as e:
            assert all(d.loc.line == 4 for d in e.diagnostics), e.format()
            counts["proved"] += 1  # the next test shows these wrong for every binding
            continue
        init = cell_.params[0].init
        for dims in bindings:
            try:
                bind_inits(cell_, dims, torch.float32)
            except SpecError as e:
                assert isinstance(e, ValueError) and all(d.loc.line == 4 for d in e.diagnostics), e.format()
                counts["refused"] += 1
                continue
            values = [eval(scalar_code(a), {"math": math}, dict(dims)) for a in init.args]
            t = torch.empty(tuple(dims[n] for n in shapes.get(name, "[H]").strip("[]").split(", ")))
            getattr(initialisers, name)(t, *values)  # must not raise
            assert all(math.isfinite(v) for v in values), (text, dims)
            counts["loaded"] += 1
    assert min(counts.values()) >= 20, counts


def test_what_the_checker_proves_wrong_is_wrong_for_every_binding():
    import math
    import random

    from specc import initializers as initialisers
    from specc.assemble import scalar_code

    rng = random.Random(1)
    proved = 0
    for _ in range(400):
        name, arity = rng.choice([("uniform", 1), ("uniform", 2), ("normal", 1), ("normal", 2), ("constant", 1)])
        args = [_expressions(rng, 3) for _ in range(arity)]
        text = (f"cell c(I, H) {{\n    input x[I]\n    state h[H]\n    param V[H] ~ {name}({', '.join(args)})\n"
                f"    h' = tanh(h)\n    output h'\n}}\n")
        try:
            check(parse(text))
            continue
        except SpecError:
            proved += 1
        init = parse(text).cells[0].stmts[2].init
        for dims in (dict(I=1, H=1), dict(I=3, H=2), dict(I=2, H=7), dict(I=40, H=31)):
            try:
                values = [eval(scalar_code(a), {"math": math}, dict(dims)) for a in init.args]
                getattr(initialisers, name)(torch.empty(dims["H"]), *values)
            except (ArithmeticError, ValueError, RuntimeError):
                continue
            assert not all(math.isfinite(v) for v in values), f"proved wrong, but {text} loads with {dims}"
    assert proved >= 20


def test_module_attribute_names_are_reserved_for_parameters():
    """MODULE_ATTRS is a snapshot: it must cover every attribute a loaded module has."""
    m = specc.load("elman", cell="elman", I=2, H=3, O=2)
    names = {n for n in dir(m) if not n.startswith("_")} - {"W_xh", "W_hh", "b_h", "W_hy", "b_y"}
    missing = sorted(names - MODULE_ATTRS)
    assert not missing, f"add to check.MODULE_ATTRS: {missing}"
    for name in sorted(names)[:: max(1, len(names) // 12)] + ["training", "_parameters"]:
        text = f"cell c(H) {{\n  state h[H]\n  param {name}[H]\n  h' = tanh(h + {name})\n  output h'\n}}\n"
        [d] = diagnostics(text)
        assert (d.loc.line, d.loc.col) == (3, 9) and "reserved" in d.message, name


def test_the_command_line_takes_library_names_and_refuses_what_is_not_a_spec(tmp_path):
    """`specc check lstm`, `specc compile elman` (the file's cell of that name); a directory, an
    endless file or an output directory: one line each, exit 1, no traceback."""
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "specc.cli", *args], capture_output=True, text=True,
                              cwd=tmp_path, timeout=120)

    ok = cli("check", "lstm", "gru")
    assert ok.returncode == 0 and "specs/lstm.rnn: cell lstm(I, H)" in ok.stdout and "cell gru(" in ok.stdout
    elman = cli("compile", "elman")
    assert elman.returncode == 0 and "class Elman(CellModule)" in elman.stdout
    for args, message in [(("check", str(tmp_path)), "error: not a file"),
                          (("check", "/dev/zero"), "error: not a file"),
                          (("compile", "lstm", "-o", str(tmp_path)), "error: is a directory")]:
        run = cli(*args)
        assert run.returncode == 1 and message in run.stderr and "Traceback" not in run.stderr, (args, run.stderr)
    nets = cli("compile", "networks", "-o", str(tmp_path / "n.py"))
    assert nets.returncode == 1 and "char_lm" in nets.stderr and "specc.load" in nets.stderr
    assert not (tmp_path / "n.py").exists()
    assert cli("compile", "networks", "--cell", "context_decoder").returncode == 0
    big = tmp_path / "big.rnn"
    big.write_text("#" * (2 << 20))
    run = cli("check", str(big))
    assert run.returncode == 1 and "not a spec" in run.stderr
