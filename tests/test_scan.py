"""Which states are linear recurrences (specc/scan.py): a parallel scan where the next value is
a * state + b with a and b free of every state, however it is written, and otherwise the reason,
at the spec line that breaks it."""
from __future__ import annotations

import subprocess
import sys

import pytest

from specc.check import check
from specc.lower import lower
from specc.parse import parse
from specc.pipeline import compile_cell, compile_spec
from specc.scan import linear_states


def verdicts(body: str, states=("h",), extra: str = "") -> dict[str, str]:
    decls = "".join(f"    state {s}[H]\n" for s in states)
    text = (f"cell c(I, H) {{\n    input x[I]\n{decls}    param W[H, I]\n    param U[H, H]\n    param a[H]\n"
            f"{extra}{body}\n}}\n")
    (cell,) = check(parse(text, "<scan>"))
    lowered = {v.state: str(v) for v in linear_states(lower(cell))}
    optimised = {v.state: str(v) for v in linear_states(compile_cell(cell, text, "<scan>").forward)}
    assert lowered.keys() == optimised.keys()
    assert all((lowered[k] == "parallel scan") == (optimised[k] == "parallel scan") for k in lowered)
    return lowered


@pytest.mark.parametrize("body", [
    "    z = sigmoid(W @ x)\n    h' = (1 - z) * h + z * tanh(W @ x)\n    output h'",
    "    f = sigmoid(W @ x)\n    h' = f * h + (1 - f) * (W @ x)\n    output h'",
    "    h' = h * sigmoid(a) + W @ x\n    output h'",
    "    h' = -(sigmoid(W @ x) * -h) + a\n    output h'",
    "    h' = sigmoid(W @ x) * h + 0.5 * h - h / 3 + exp(W @ x)\n    output h'",
    "    h' = W @ x\n    output h'",
])
def test_linear_in_the_state_is_a_parallel_scan(body):
    assert verdicts(body) == {"h": "parallel scan"}


@pytest.mark.parametrize("body, why", [
    ("    h' = tanh(W @ x + U @ h)\n    output h'", "h' reads h through U @ h at line 7"),
    ("    h' = relu(a * h + W @ x)\n    output h'", "h' reads h through relu("),
    ("    h' = h * h + W @ x\n    output h'", "h' reads h through h * h"),
    ("    h' = sigmoid(U @ h) * h\n    output h'", "h' reads h through U @ h"),
    ("    h' = h / (1 + h)\n    output h'", "h' reads h through"),
])
def test_otherwise_sequential_with_the_reason_and_its_line(body, why):
    (verdict,) = verdicts(body).values()
    assert verdict.startswith("sequential: ") and why in verdict, verdict


def test_a_state_another_reads_is_no_obstacle_once_it_is_known_itself():
    """A delay (xp' = x) and another scanned state may feed a and b; a sequential one may not."""
    got = verdicts("    xp' = W @ x\n    s' = sigmoid(xp) * s + h\n    h' = sigmoid(W @ x) * h\n    output s'",
                   states=("xp", "s", "h"))
    assert got == {"xp": "parallel scan", "s": "parallel scan", "h": "parallel scan"}
    got = verdicts("    r' = tanh(U @ r)\n    s' = sigmoid(r) * s + W @ x\n    output s'", states=("r", "s"))
    assert got["r"].startswith("sequential") and got["s"] == "sequential: s' reads r through sigmoid(r) at line 9"


@pytest.mark.parametrize("spec, want", [
    ("mingru", {"h": True}), ("minlstm", {"h": True}), ("qrnn", {"xp": True, "c": True}), ("sru", {"c": True}),
    ("selective_ssm", {"h": True}), ("lstm", {"h": False, "c": False}), ("gru", {"h": False}),
    ("indrnn", {"h": False}), ("second_order", {"h": False}),
])
def test_the_library(spec, want):
    got = {v.state: v.scan for v in linear_states(compile_spec(spec).forward)}
    assert got == want


def test_specc_check_says_it_per_state(specs_dir):
    out = subprocess.run([sys.executable, "-m", "specc.cli", "check", str(specs_dir / "lstm.rnn"),
                          str(specs_dir / "mingru.rnn")], capture_output=True, text=True, check=True).stdout
    assert "  h': sequential: h' reads h through W_hh @ h at line 15" in out
    assert "  c': sequential: c' reads h through W_hh @ h at line 15" in out
    assert "  h': parallel scan" in out


def test_the_random_cells_include_linear_recurrences():
    """The differential tests' generator writes a * h + b with a and b made of inputs alone, so
    every backend is fuzzed on the cells a scan backend will take."""
    from hypothesis import HealthCheck, given, settings

    from specc.fuzz.gen import cells

    found = []

    @settings(max_examples=60, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(cells())
    def collect(cell):
        (checked,) = check(parse(cell.text, "<gen>"))
        found.extend(v.scan for v in linear_states(lower(checked)) if f"* {v.state} + " in cell.text)

    collect()
    assert sum(found) >= 5


@pytest.mark.parametrize("spec,dims", [("mingru", dict(I=4, H=8)), ("qrnn", dict(I=4, H=8)),
                                       ("selective_ssm", dict(I=4, H=8, O=3)), ("minlstm", dict(I=4, H=8))])
@pytest.mark.parametrize("backend", ["c", "numpy"])
def test_long_linear_recurrences_in_float32_hold_against_float64(spec, dims, backend):
    """T = 16,384 steps of a = sigmoid(...) < 1 (issue 15's numerics): products of a_t over
    thousands of steps underflow in a scan of cumulative products; the sequential loop the backends
    run stays within float32 rounding of the float64 run, outputs and gradients."""
    import torch

    import specc
    from specc.backends import c_runtime
    from specc.runtime import own_inputs

    if backend == "c" and c_runtime.problem() is not None:
        pytest.skip(c_runtime.problem())
    torch.manual_seed(0)
    m32 = specc.load(spec, backend=backend, **dims)
    m64 = specc.load(spec, backend="numpy", dtype=torch.float64, **dims)
    m64.load_state_dict({k: v.double() for k, v in m32.state_dict().items()})
    x = torch.randn(16384, 2, m32.sizes["inputs"][own_inputs(m32.program)[0]][0])
    outs = []
    for m, dt in ((m32, torch.float32), (m64, torch.float64)):
        xi = x.to(dt).detach().clone().requires_grad_()
        out, _ = m(xi)
        y = out[0] if isinstance(out, tuple) else out
        y.square().mean().backward()
        outs.append((y.detach().double(), xi.grad.double()))
    (y32, g32), (y64, g64) = outs
    assert torch.isfinite(y32).all() and torch.isfinite(g32).all()
    assert (y32 - y64).abs().max() <= 1e-4 * max(1.0, y64.abs().max())
    assert (g32 - g64).abs().max() <= 1e-4 * g64.abs().max()
