"""Which states are linear recurrences (specc/scan.py): a parallel scan where the next value is
a * state + b with a and b free of every state, however it is written, and otherwise the reason,
at the spec line that breaks it."""
from __future__ import annotations

import re
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


LONG = [("mingru", dict(I=4, H=8)), ("qrnn", dict(I=4, H=8)), ("selective_ssm", dict(I=4, H=8, O=3)),
        ("minlstm", dict(I=4, H=8))]


# On Triton, one cell with two values a step: the interpreter runs a scan's combining function once
# an element, in Python (~0.2 ms each); the scan of every library cell is tested over 70 steps above.
@pytest.mark.parametrize("spec,dims,backend", [(s, d, b) for s, d in LONG for b in ("c", "numpy")]
                         + [("mingru", dict(I=2, H=2), "triton")])
def test_long_linear_recurrences_in_float32_hold_against_float64(spec, dims, backend, monkeypatch):
    """T = 16,384 steps of a = sigmoid(...) < 1 (issue 15's numerics): products of a_t over
    thousands of steps underflow in a scan of cumulative products. Triton's scan combines the
    pairs (a, b) themselves (no log space, no division by a running product): a run of a_t that
    underflows to 0 is a state forgotten, as it is step by step. The sequential loops and the scan
    stay within float32 rounding of the float64 run, outputs and gradients."""
    import torch

    monkeypatch.setenv("TRITON_INTERPRET", "1")

    import specc
    from specc.backends import c_runtime
    from specc.runtime import own_inputs

    if backend == "c" and c_runtime.problem() is not None:
        pytest.skip(c_runtime.problem())
    torch.manual_seed(0)
    m32 = specc.load(spec, backend=backend, **dims)
    if backend == "triton":
        # Blocks of 1,024 steps: the running products of a inside a block underflow too.
        monkeypatch.setattr(m32.program, "SCAN_BLOCKS", (1024, 16))
    m64 = specc.load(spec, backend="numpy", dtype=torch.float64, **dims)
    m64.load_state_dict({k: v.double() for k, v in m32.state_dict().items()})
    B = 1 if backend == "triton" else 2
    x = torch.randn(16384, B, m32.sizes["inputs"][own_inputs(m32.program)[0]][0])
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


# --- the Triton backend runs such a loop as one scan a state (issue 15) -----------------------------

SCAN_CELLS = {"mingru": dict(I=4, H=6), "minlstm": dict(I=4, H=6), "sru": dict(H=6),
              "selective_ssm": dict(I=4, H=6, O=3), "qrnn": dict(I=4, H=6)}


class _Launches:
    """Counts the launches of a generated module's kernels, by name, and runs them."""

    def __init__(self, prog, monkeypatch):
        self.counts: dict[str, int] = {}
        for name in dir(prog):
            kernel = getattr(prog, name)
            if name == "linear_scan" or re.search(r"_(forward|backward)_step\d", name):
                monkeypatch.setattr(prog, name, self._counting(name, kernel))

    def _counting(self, name, kernel):
        counts = self.counts

        class Launch:
            def __getitem__(self, grid):
                counts[name] = counts.get(name, 0) + 1
                return kernel[grid]

        return Launch()


@pytest.mark.parametrize("blocks", [(32, 64), (16, 16), (64, 8)], ids=lambda b: f"{b[0]}x{b[1]}")
@pytest.mark.parametrize("name", list(SCAN_CELLS))
def test_triton_runs_linear_recurrences_as_one_scan_a_pass(name, blocks, close, monkeypatch):
    """Against the cell's hand-written torch loop (test_references), forward and every gradient,
    over 70 steps: two blocks of 32 steps and a part of one, reversed going backward; B x H = 18
    values over one or more programs. No kernel runs a step: one scan forward, one backward (QRNN's
    delayed input xp' = x is filled in before the scan, its gradient after it)."""
    import torch

    from specc.api import program

    from test_references import compare_with_reference

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    prog = program(compile_spec(name))
    monkeypatch.setattr(prog, "SCAN_BLOCKS", blocks)
    launches = _Launches(prog, monkeypatch)
    monkeypatch.setattr("specc.api.program", lambda compiled: prog)
    compare_with_reference(name, SCAN_CELLS[name], 70, 3, torch.float32, close, tol=2e-5, scale=0.4,
                           backend="triton")
    assert launches.counts == {"linear_scan": 2}


def test_scan_false_runs_the_same_cell_step_by_step(monkeypatch):
    import torch

    import specc

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch.manual_seed(0)
    seq = specc.load("mingru", backend="triton", scan=False, I=3, H=5)
    par = specc.load("mingru", backend="triton", I=3, H=5)
    par.load_state_dict(seq.state_dict())
    assert "scan=False" in repr(seq) and "scan" not in repr(par)
    x = torch.randn(9, 2, 3, requires_grad=True)
    grads, counts = [], []
    for m in (seq, par):  # one program: the two modules differ in how they call it
        launches = _Launches(m.program, monkeypatch)
        y, _ = m(x)
        grads.append(torch.autograd.grad(y.square().sum(), [x, *m.parameters()]))
        counts.append(dict(launches.counts))
    assert counts == [{"mingru_forward_step0": 9, "mingru_backward_step0": 9}, {"linear_scan": 2}]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="scan must be True or False"):
        specc.load("mingru", scan="no", I=3, H=5)


@pytest.mark.parametrize("body", [
    # a a number, b an input product: a decaying sum
    "    h' = 0.9 * h + W @ x\n    output h'",
    # a made of parameters alone (the same every step), the state in two terms
    "    h' = sigmoid(a) * h + 0.5 * h - W @ x\n    output h'",
    # a = 1: a running sum; a loop value kept as an output; division by an input-only value
    "    u = h / (1 + sigmoid(W @ x))\n    h' = u + tanh(W @ x)\n    output u",
    # two states, each scanned alone; one an output, one read after the loop
    "    s' = sigmoid(W @ x) * s + a\n    h' = h + W @ x\n    output y = s' * h'",
    # a next value made before the loop (a = 0)
    "    h' = tanh(W @ x)\n    output y = h' * 2",
])
def test_triton_scans_what_users_write_as_the_numpy_backend_runs_it(body, monkeypatch):
    """Cells written here, not the library's: a a number or a parameter, the state in several
    terms, a kept loop value, two states; against the NumPy backend's sequential loop."""
    from helpers import assert_text_spec_matches_numpy

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    states = ("s", "h") if "s'" in body else ("h",)
    decls = "".join(f"    state {s}[H]\n" for s in states)
    text = f"cell c(I, H) {{\n    input x[I]\n{decls}    param W[H, I]\n    param a[H]\n{body}\n}}\n"
    m = assert_text_spec_matches_numpy(text, "triton", T=37, B=2, I=3, H=4)
    assert m.program.TRITON_UNSUPPORTED is None and "linear_scan[" in m.program.__specc_source__


@pytest.mark.parametrize("body", [
    "    xp' = x\n    h' = sigmoid(W @ xp) * h + W @ x\n    output y = h' + W @ xp",
    # a delay of a delay (window 3), beside a state that stays sequential
    "    xp' = x\n    xpp' = xp\n    h' = tanh(W @ xpp + U @ h)\n    output h'",
    # a delay of a value made from the input
    "    xp' = tanh(x)\n    h' = tanh(W @ xp + U @ h)\n    output h'",
    # one next value for two states (the fuzzer's cell 815 of seed 914: one buffer filled, not both)
    "    xp' = tanh(x)\n    xpp' = tanh(x)\n    h' = tanh(W @ xp + W @ xpp + U @ h)\n    output h'",
])
@pytest.mark.parametrize("backend", ["numpy", "c", "triton"])
def test_delayed_states_are_filled_outside_the_loop(body, backend, monkeypatch):
    """A state whose next value depends on no state (QRNN's xp' = x) is known for every step
    before the loop: what reads it is made there (one product over the sequence), and the
    backward's gradient of it, which the loop never reads, after it (schedule.hoist_delays).
    Against the differential tester's own reference (specc/fuzz/reference.py, a torch
    interpreter of the spec): training, no_grad, chunked inference, masked lengths, float64."""
    from specc.backends import c_runtime
    from specc.fuzz.run import differences

    if backend == "c" and c_runtime.problem() is not None:
        pytest.skip(c_runtime.problem())
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    states = [n for n in ("xp", "xpp", "h") if f"    {n}' = " in body]
    decls = "".join(f"    state {n}[{'I' if n.startswith('x') else 'H'}]\n" for n in states)
    text = f"cell c(I, H) {{\n    input x[I]\n{decls}    param W[H, I]\n    param U[H, H]\n{body}\n}}\n"
    for seed in range(3):
        found = differences(text, dict(I=3, H=4), (backend,), seed=seed)
        assert not found, "\n".join(map(str, found))


def test_qrnn_makes_no_product_inside_its_loops():
    """V @ xp before the forward loop, V^T @ dgates after the backward one: QRNN's loops, as the
    Triton and NumPy backends run them, are elementwise (and so a scan)."""
    from specc.schedule import hoist_delays
    from specc.scan import affine_loop

    c = compile_spec("qrnn")
    for s in (c.forward_schedule, c.backward_schedule):
        assert any(c.forward.nodes[i].op == "matvec" for i in c.forward_schedule.nodes_in("loop")) or s is c.backward_schedule
        hoisted = hoist_delays(s)
        assert not [i for i in hoisted.nodes_in("loop") if s.graph.nodes[i].op in ("matvec", "matvec_t")]
        assert affine_loop(hoisted) is not None


USER_BODIES = [
    "    h' = 0.9 * h + W @ x\n    output h'",
    "    h' = sigmoid(a) * h + 0.5 * h - W @ x\n    output h'",
    "    u = h / (1 + sigmoid(W @ x))\n    h' = u + tanh(W @ x)\n    output u",
    "    s' = sigmoid(W @ x) * s + a\n    h' = h + W @ x\n    output y = s' * h'",
    "    h' = tanh(W @ x)\n    output y = h' * 2",
]


def _user_cell(body: str) -> str:
    states = ("s", "h") if "s'" in body else ("h",)
    decls = "".join(f"    state {s}[H]\n" for s in states)
    return f"cell c(I, H) {{\n    input x[I]\n{decls}    param W[H, I]\n    param a[H]\n{body}\n}}\n"


@pytest.mark.parametrize("spec", [*SCAN_CELLS, *USER_BODIES])
def test_numpy_scan_gives_the_loop_over_steps_gradients_to_1e9_in_float64(spec, monkeypatch):
    """Issue 15's bar: the NumPy backend's chunked scan (rt.linear_scan, ~sqrt(T) steps a chunk)
    against the same cell run step by step (scan=False), in float64, over 301 steps (chunks of 17,
    the last one short): outputs, final states and every gradient within 1e-9 of their scale."""
    import torch

    import specc
    from specc.runtime import own_inputs

    from specc.backends import numpy_runtime

    scans = []
    real = numpy_runtime.linear_scan
    monkeypatch.setattr(numpy_runtime, "linear_scan", lambda *a, **k: scans.append(1) or real(*a, **k))
    dims = SCAN_CELLS.get(spec, dict(I=3, H=4))
    text = spec if spec in SCAN_CELLS else _user_cell(spec)
    torch.manual_seed(0)
    par = specc.load(text, backend="numpy", dtype=torch.float64, **dims)
    seq = specc.load(text, backend="numpy", dtype=torch.float64, scan=False, **dims)
    seq.load_state_dict(par.state_dict())
    x = torch.randn(301, 3, par.sizes["inputs"][own_inputs(par.program)[0]][0], dtype=torch.float64)
    state = tuple(torch.randn(3, par.sizes["states"][n][0], dtype=torch.float64) for n in par.program.STATES)
    results = []
    for m in (par, seq):
        xi, si = x.clone().requires_grad_(), [s.clone().requires_grad_() for s in state]
        out, final = m(xi, si[0] if len(si) == 1 else tuple(si))
        leaves = [o for o in (out if isinstance(out, tuple) else (out,))] + list(final if isinstance(final, tuple) else (final,))
        loss = sum((v * torch.linspace(-1, 1, v.numel(), dtype=v.dtype).reshape(v.shape)).sum() for v in leaves)
        results.append([v.detach() for v in leaves] + list(torch.autograd.grad(loss, [xi, *si, *m.parameters()])))
    for got, want in zip(*results, strict=True):  # a parameter the cell does not read: both exactly 0
        assert (got - want).abs().max() <= 1e-9 * want.abs().max()
    assert sum(bool(want.abs().max() > 0) for want in results[1]) >= len(results[1]) - 2  # h0, a unread
    assert scans  # on the scan side only (a delay such as h' = tanh(W @ x) is filled, not scanned, forward)


def test_numpy_runs_wide_states_step_by_step(monkeypatch):
    """Where a step's values are many (B x H > rt.SCAN_MAX_WIDTH), NumPy's loop over steps, which
    makes a and b a chunk at a time in cache, is the faster (bench/results/scan-cpu-2026-12-02c.md)."""
    import torch

    import specc
    from specc.backends import numpy_runtime

    scans = []
    real = numpy_runtime.linear_scan
    monkeypatch.setattr(numpy_runtime, "linear_scan", lambda *a, **k: scans.append(a[0].shape) or real(*a, **k))
    m = specc.load("mingru", backend="numpy", I=3, H=64)
    m(torch.randn(5, 16, 3))[0].sum().backward()  # 1,024 values a step: the scan
    assert len(scans) == 2
    m(torch.randn(5, 17, 3))[0].sum().backward()  # 1,088: step by step
    assert len(scans) == 2
    # Without training, the loop keeps a state only the loop reads in two blocks: the final state
    # is read from the block it ended in, not from block T, which only a scan writes (a reviewer's
    # cell: its final state came back empty).
    _same_as_the_loop_without_training("cell alt(H) {\n    input x[H]\n    state c[H] = zeros\n    param W[H, H]\n"
                                       "    f = sigmoid(W @ x)\n    c' = f * c + x\n    output y = tanh(x)\n}\n",
                                       "numpy", T=3, B=2, H=600)


def _same_as_the_loop_without_training(text: str, backend: str, T: int, B: int, H: int) -> None:
    """Outputs and final states under no_grad through `backend` against NumPy's loop over steps."""
    import torch

    import specc

    ours = specc.load(text, backend=backend, H=H)
    ref = specc.load(text, backend="numpy", scan=False, H=H)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(T, B, H)
    with torch.no_grad():
        for got, want in zip(ours(x), ref(x), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_a_part_of_a_value_backward_reads_is_made_when_not_training(monkeypatch):
    """Kept loop values share parts (c * f in m1 and in k): the one only backward reads is made under
    `if train:`, so a part both need must be made before it, outside (a reviewer's cell: without
    training it raised UnboundLocalError on Triton)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _same_as_the_loop_without_training("cell gk(H) {\n    input x[H]\n    state c[H] = zeros\n    param p[H]\n"
                                       "    f = sigmoid(x)\n    m1 = (c + x) * f\n    k = c * f\n    c' = p * m1 + k\n"
                                       "    output y = tanh(k)\n}\n", "triton", T=7, B=2, H=3)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("backend", ["numpy", "triton"])
def test_a_division_by_the_number_zero_is_infinite_as_in_the_loop(backend, monkeypatch):
    """h / 0.0 makes a = inf: the scan's code spells it (it raised ZeroDivisionError, a Python
    division of two numbers), and the states are not finite, as the loop over steps makes them."""
    import torch

    import specc

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    text = "cell z(H) {\n    input x[H]\n    state h[H]\n    h' = h / 0.0 + x\n    output h'\n}\n"
    x, h0 = torch.randn(3, 1, 2), torch.randn(1, 2)
    with torch.no_grad():
        got = specc.load(text, backend=backend, H=2)(x, h0)[0]
        want = specc.load(text, backend="numpy", scan=False, H=2)(x, h0)[0]
    assert not torch.isfinite(want).any() and not torch.isfinite(got).any()
