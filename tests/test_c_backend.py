"""The C backend: each pass's time loop compiled from C_SOURCE, the rest in torch.

Every cell in specs/ whose loop the C backend writes must give what the NumPy backend gives, and
what torch.nn (LSTM, GRU, RNN, weights copied) or a hand-written torch loop gives: outputs, final
states and every gradient, in float32 to 1e-5, on sizes that are not powers of two (so the
elementwise loops' vector tails run). Its exp, tanh and sigmoid are its own
polynomials: they are checked against torch at the edges of float32 (overflow, NaN, infinities).
Where it cannot run (no compiler, a compiler that fails, a cell it cannot write, float64), "auto"
uses NumPy and an explicit backend="c" says why.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import textwrap
import warnings

import pytest
import time

import torch

import specc
from specc import runtime
from specc.backends import c as c_backend
from specc.backends import c_runtime
from helpers import (TORCH_LAYERS, TorchLayer, assert_host_products_match_torch, assert_inference_keeps_c_in_two_blocks,
                         assert_long_inference_runs_in_chunks, assert_matches_references,
                         assert_same, assert_softmax_feeds_a_contraction, assert_softmax_in_the_recurrence,
                         assert_softmax_of_minus_inf_columns, assert_spec_matches_numpy, assert_text_spec_matches_numpy,
                         odd_dims, run)


def _backend(module, steps: int = 2, batch: int = 1) -> str:
    """The backend a call of `module` runs on (backend_choice reads "c: why" or "numpy: why")."""
    x = torch.randn(steps, batch, module.sizes["inputs"][module.program.INPUTS[0]][0], dtype=module._dtype())
    with torch.no_grad():
        module(x)
    return module.backend_choice.split(":")[0]


@pytest.fixture
def timed_faster(monkeypatch, tmp_path):
    """Makes backend "auto"'s timing of the C loops against NumPy name a winner: which one is
    faster on the machine running the tests is no business of theirs. Choices are kept on disk,
    in a cache of the test's own."""
    timed = []
    monkeypatch.setenv("SPECC_CACHE", str(tmp_path / "cache"))

    def make(winner: str) -> list:
        monkeypatch.setattr(runtime, "_CHOICES", {})
        for kept in runtime.choice_dir().glob("*.txt"):
            kept.unlink()
        monkeypatch.setattr(runtime, "time_backends", lambda module, tensors, n_inputs, n_states, T, B: timed.append(
            (module.program.CELL, T, B)) or {"c": 1.0 if winner == "c" else 2.0, "numpy": 1.5})
        return timed

    return make


def test_every_spec_matches_the_numpy_backend(spec_cell):
    dims = odd_dims(spec_cell.dims)
    ref = specc.load(spec_cell.path, spec_cell.cell, backend="numpy", **dims)
    if ref.program.C_UNSUPPORTED is not None:
        with pytest.raises(RuntimeError, match="cannot use the C backend"):
            specc.load(spec_cell.path, spec_cell.cell, backend="c", **dims)(
                torch.randn(2, 1, ref.sizes["inputs"][ref.program.INPUTS[0]][0]) if ref.program.INPUTS else None,
                None if ref.program.INPUTS else [torch.zeros(1, ref.sizes["states"][n][0])
                                                 for n in ref.program.STATES])
        return
    assert_spec_matches_numpy(spec_cell, "c", B=7)


@pytest.mark.parametrize("name", list(TORCH_LAYERS))
@pytest.mark.parametrize("I, H, B", [(37, 100, 5), (16, 20, 9), (64, 64, 16)])
def test_matches_torch_nn(name, I, H, B):
    make, _ = TORCH_LAYERS[name]
    ref = make(I, H)
    ours = specc.from_torch(ref, backend="c")
    x = torch.randn(6, B, I)
    n_states = len(ours.program.STATES)
    state = [torch.randn(B, H) * 0.5 for _ in range(n_states)]
    assert_same(run(ours, x, state), run(TorchLayer(ref), x, state))


def test_larger_products_match_torch():
    """A step's product of 48 x 96 x 384 multiply-adds, large enough for OpenBLAS's blocked kernels."""
    ref = torch.nn.LSTM(40, 96)
    ours = specc.from_torch(ref, backend="c")
    x = torch.randn(3, 48, 40)
    state = [torch.randn(48, 96) * 0.5 for _ in range(2)]
    assert_same(run(ours, x, state), run(TorchLayer(ref), x, state), tol=2e-5)


def test_custom_cells_match_hand_written_references():
    assert_matches_references("c")


ACTIVATION_SPEC = """
cell acts(N) {
    input x[N]
    state s[N] = zeros
    s' = s + ACT(x)
    output s'
}
"""


@pytest.mark.parametrize("act", ["exp", "tanh", "sigmoid", "softplus", "relu", "log"])
def test_activations_at_the_edges_of_float32(act):
    """Values from the subnormals to overflow, infinities and NaN, against torch's own functions."""
    edges = [0.0, -0.0, 1e-30, -1e-30, 1e-7, 0.3, -0.6249, 0.6251, 1.0, -2.5, 9.0, 20.0, -20.0, 80.0,
             88.5, 88.72, 88.8, -87.0, -87.4, -100.0, -103.9, -104.5, 200.0, -200.0,
             float("inf"), float("-inf"), float("nan")]
    grid = torch.linspace(-30.0, 30.0, 1001).tolist()
    values = torch.tensor(edges + grid, dtype=torch.float32)
    if act == "log":
        values = torch.cat([values.abs(), torch.tensor([0.0, 1e-40, 3e38])])
    spec = ACTIVATION_SPEC.replace("ACT", act)
    module = specc.load(spec, N=values.numel(), backend="c")
    with torch.no_grad():
        got, _ = module(values[None, None, :])
    fn = {"exp": torch.exp, "tanh": torch.tanh, "sigmoid": torch.sigmoid, "relu": torch.relu, "log": torch.log,
          "softplus": lambda v: torch.logaddexp(torch.zeros_like(v), v)}[act]
    want = fn(values.double()).float()
    # float32 is what both compute in: a few units in the last place, and below it at the subnormals
    torch.testing.assert_close(got[0, 0], want, rtol=4e-7, atol=1e-37, equal_nan=True)


ELMAN_SPEC = """
cell elman(N) {
    input x[N]
    state h[N] = zeros
    param W[N, N]
    h' = tanh(W @ h + x)
    output h'
}
"""


def test_cells_it_cannot_write_run_on_numpy_and_say_why(monkeypatch):
    """No cell of the language reaches an op the loop cannot run today (a reshape inside the
    recurrence would): the writer is made to refuse one, as it would such a cell."""
    def refuse(loop):
        raise c_backend.Unsupported("reshape inside the recurrence (spec line 6)")

    monkeypatch.setattr(c_backend.CLoop, "write", refuse)
    module = specc.load(ELMAN_SPEC, N=4)
    assert "reshape" in module.program.C_UNSUPPORTED
    assert _backend(module) == "numpy"
    assert "reshape inside the recurrence" in module.backend_choice
    with pytest.raises(RuntimeError, match="elman.*cannot use the C backend.*reshape inside the recurrence"):
        specc.load(ELMAN_SPEC, N=4, backend="c")(torch.randn(2, 1, 4))


def test_softmax_inside_the_recurrence():
    assert_softmax_in_the_recurrence("c")


def test_softmax_of_minus_inf_columns():
    assert_softmax_of_minus_inf_columns("c")


def test_softmax_feeds_a_contraction():
    assert_softmax_feeds_a_contraction("c")


STRADDLE_SPEC = """
cell straddle(N) {
    input x[N]
    state h[N] = zeros
    param W[2*N, N]
    param U[N, N]
    z = tanh(W @ h + [x, x])
    u, v = split(z, 2)
    h' = tanh(U @ softmax(u)) + v
    output z
}
"""


def test_a_cell_whose_tiles_straddle_a_concatenation_runs_on_c(timed_faster):
    """A tile would straddle the parts of [x, x] (Triton stages it); the C loops, and their torch
    host code, run it on their own."""
    timed_faster("c")
    ours = assert_text_spec_matches_numpy(STRADDLE_SPEC, "auto", N=5)
    assert ours.program.C_UNSUPPORTED is None
    assert _backend(ours) == "c"


SHARED_NEXT_SPEC = """
cell shared(N) {
    input x[N]
    state h[N] = zeros
    state c[N] = zeros
    state d[N] = zeros
    param W[N, N]
    z = tanh(W @ h + c + x)
    h' = tanh(W @ d + x)
    c' = z
    d' = z
    output h'
}
"""


def test_states_that_share_a_next_value():
    assert_text_spec_matches_numpy(SHARED_NEXT_SPEC, "c", N=6)


def test_second_order_products_run_in_c():
    """contract(W, x, h): x (x) h made per step, its gradient's two halves in the backward loop."""
    assert specc.load("second_order", I=3, H=4).program.C_UNSUPPORTED is None


def test_auto_runs_float32_on_the_c_loops_and_float64_on_numpy(timed_faster):
    timed_faster("c")
    assert _backend(specc.load("gru", I=3, H=4)) == "c"
    m64 = specc.load("gru", I=3, H=4, dtype=torch.float64)
    assert _backend(m64) == "numpy" and m64.backend_choice == "numpy: torch.float64 (the C loops compute in float32)"
    with pytest.raises(TypeError, match="C backend computes in float32.*backend='numpy'"):
        specc.load("gru", I=3, H=4, dtype=torch.float64, backend="c")(torch.randn(2, 1, 3, dtype=torch.float64))


def test_auto_runs_numpy_where_numpy_timed_faster(timed_faster, monkeypatch):
    """Where the C loops time slower than NumPy (issue 13: 10-20x on an AVX2 CPU with the old
    products), "auto" runs NumPy, and says why; the choice is made once per batch size."""
    timed = timed_faster("numpy")
    loops = []
    real_run = c_runtime.run
    monkeypatch.setattr(c_runtime, "run", lambda *a, **k: loops.append(a[1]) or real_run(*a, **k))
    module = specc.load("lstm", I=5, H=6)
    ref = specc.load("lstm", I=5, H=6, backend="numpy")
    ref.load_state_dict(module.state_dict())
    x = torch.randn(12, 3, 5)
    state = [torch.randn(3, 6) * 0.5 for _ in range(2)]
    assert_same(run(module, x, state), run(ref, x, state), tol=0)
    assert module.backend_choice.startswith("numpy: the faster on this CPU, timed on first use with batch 3")
    assert "numpy 1500.00 ms, c 2000.00 ms" in module.backend_choice
    # the first PROBE_STEPS steps (here all 12) timed; the C loops never ran for real
    assert loops == [] and timed == [("lstm", min(12, runtime.PROBE_STEPS), 3)]
    run(module, x, state)
    assert timed == [("lstm", min(12, runtime.PROBE_STEPS), 3)]  # the same batch size: not timed again
    timed_faster("c")
    assert _backend(module, steps=4, batch=3) == "c" and timed[-1] == ("lstm", 4, 3)
    assert loops == ["specc_lstm_forward"]


def test_a_choice_is_kept_for_the_next_process(timed_faster, monkeypatch):
    timed = timed_faster("numpy")
    module = specc.load("gru", I=3, H=4)
    assert _backend(module, batch=2) == "numpy" and len(timed) == 1
    monkeypatch.setattr(runtime, "_CHOICES", {})  # as a new process starts
    again = specc.load("gru", I=3, H=4)
    assert _backend(again, batch=2) == "numpy" and len(timed) == 1
    assert "timed by an earlier process" in again.backend_choice
    assert _backend(again, batch=5) == "numpy" and len(timed) == 2  # another batch size: timed
    # Other threads (the C loops split the batch among them) or other OpenBLAS kernels: timed again.
    monkeypatch.setattr(runtime, "_CHOICES", {})
    monkeypatch.setattr(torch, "get_num_threads", lambda: 7)
    assert _backend(specc.load("gru", I=3, H=4), batch=2) == "numpy" and len(timed) == 3
    monkeypatch.setattr(runtime, "_CHOICES", {})
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Prescott")
    assert _backend(specc.load("gru", I=3, H=4), batch=2) == "numpy" and len(timed) == 4


def test_the_timing_runs_both_backends_on_the_callers_tensors(monkeypatch, tmp_path):
    """time_backends itself: one forward + backward of each backend, the caller's tensors and the
    global random state untouched (what it measures is not asserted: the machine may be busy)."""
    monkeypatch.setattr(runtime, "_CHOICES", {})
    monkeypatch.setattr(runtime, "PROBE_SETTLE", 0.05)
    monkeypatch.setattr(runtime, "PROBE_FIRST_CALLS", 3)
    monkeypatch.setenv("SPECC_CACHE", str(tmp_path))
    loops = []
    real_run = c_runtime.run
    monkeypatch.setattr(c_runtime, "run", lambda *a, **k: loops.append((a[1], time.perf_counter())) or real_run(*a, **k))
    module = specc.load("gru", I=4, H=5)
    x = torch.randn(20, 2, 4, dtype=torch.bfloat16)
    before, rng = x.clone(), torch.get_rng_state()
    y, h = module(x)
    assert y.dtype == torch.bfloat16 and torch.equal(x, before) and torch.equal(torch.get_rng_state(), rng)
    name, why = module.backend_choice.split(": ", 1)
    assert name in ("c", "numpy") and f"forward + backward of {min(20, runtime.PROBE_STEPS)} steps" in why
    # Two or three rows of the C loops' calls (see test_a_third_row_unless_one_backend_is_clearly_faster),
    # each of them PROBE_SETTLE seconds of untimed calls and PROBE_RUNS timed ones (and the real
    # call after them: forward only).
    names = [n for n, _ in loops[:len(loops) - (name == "c")]]
    assert names == ["specc_gru_forward", "specc_gru_backward"] * (len(names) // 2)
    starts = [t for n, t in loops if n == "specc_gru_forward"][:len(names) // 2]
    cuts = [k for k in range(1, len(starts)) if starts[k] - starts[k - 1] >= 0.04]  # NumPy's rows between
    rows = [starts[a:b] for a, b in zip([0, *cuts], [*cuts, len(starts)])]
    assert len(rows) in (2, runtime.PROBE_ROWS)
    for row in rows:
        assert len(row) >= runtime.PROBE_RUNS + 1 and row[-runtime.PROBE_RUNS] - row[0] >= 0.04  # less the host code before the first loop
    assert len(rows[0]) >= runtime.PROBE_FIRST_CALLS + runtime.PROBE_RUNS  # the first row waits for its calls to settle


@pytest.mark.parametrize("numpy_ms, rows", [(1.2, 3), (4.0, 2)])
def test_a_third_row_unless_one_backend_is_clearly_faster(monkeypatch, numpy_ms, rows):
    """Bursts of noise on a VM can cover two rows of one backend: a third row of each is timed
    unless the first two made one PROBE_CLEAR times faster (here NumPy 1.2x, then 4x, slower)."""
    from specc.backends import tuning

    ran = []

    def fake_probe(*args):
        def once(runner):
            ran.append(runner.name)
            time.sleep((1.0 if runner.name == "c" else numpy_ms) / 1e3)
        return once

    monkeypatch.setattr(tuning, "probe", fake_probe)
    module = specc.load("gru", I=4, H=5)
    seconds = runtime.time_backends(module, [], 1, 1, 8, 2)
    assert min(seconds, key=seconds.get) == "c"
    turns = [n for k, n in enumerate(ran) if k == 0 or ran[k - 1] != n]
    assert turns == ["c", "numpy"] * rows


def test_turned_off_or_without_a_compiler_auto_uses_numpy(monkeypatch):
    module = specc.load("lstm", I=3, H=4)
    monkeypatch.setenv("SPECC_C", "0")
    assert _backend(module) == "numpy" and "SPECC_C=0" in module.backend_choice
    monkeypatch.setenv("SPECC_C", "1")
    monkeypatch.setenv("CC", "/nonexistent/cc")
    assert _backend(module) == "numpy" and "no C compiler found" in module.backend_choice
    with pytest.raises(RuntimeError, match="no C compiler found"):
        specc.load("lstm", I=3, H=4, backend="c")(torch.randn(2, 1, 3))


def test_a_failing_compiler_is_reported_once_and_numpy_runs(monkeypatch, tmp_path):
    broken = tmp_path / "broken-cc"
    broken.write_text("#!/bin/sh\necho 'broken-cc: cannot compile anything' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CC", str(broken))
    monkeypatch.setenv("SPECC_CACHE", str(tmp_path / "cache"))
    module = specc.load("lstm", I=3, H=5)
    x = torch.randn(2, 1, 3)
    with pytest.warns(RuntimeWarning, match="(?s)cannot compile anything.*NumPy backend instead"):
        y, _ = module(x)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call is quiet
        y2, _ = module(x)
    ref = specc.load("lstm", I=3, H=5, backend="numpy")
    ref.load_state_dict(module.state_dict())
    torch.testing.assert_close(y2, ref(x)[0], rtol=0, atol=0)
    torch.testing.assert_close(y, y2, rtol=0, atol=0)
    with pytest.raises(c_runtime.CompileError, match="broken-cc.*failed"):
        specc.load("lstm", I=3, H=5, backend="c")(x)


def test_libraries_are_compiled_once_and_kept(monkeypatch, tmp_path):
    monkeypatch.setenv("SPECC_CACHE", str(tmp_path))
    spec = ACTIVATION_SPEC.replace("ACT", "tanh")
    module = specc.load(spec, N=9, backend="c")
    module(torch.randn(2, 1, 9))
    files = list((tmp_path / "c").glob("*.so"))
    assert len(files) == 1
    inode = files[0].stat().st_ino
    c_runtime._by_source.clear()
    c_runtime._loaded.clear()  # as a new process would: found on disk, not compiled again
    calls = []
    real_run = c_runtime.subprocess.run
    monkeypatch.setattr(c_runtime.subprocess, "run", lambda *a, **k: calls.append(a) or real_run(*a, **k))
    specc.load(spec, N=9, backend="c")(torch.randn(2, 1, 9))
    assert calls == [] and files[0].stat().st_ino == inode  # the same file, not written again
    specc.load(spec, N=10, backend="c")(torch.randn(2, 1, 10))  # other dimensions: another library
    assert len(calls) == 1 and len(list((tmp_path / "c").glob("*.so"))) == 2


def test_the_cache_keeps_the_libraries_used_last(monkeypatch, tmp_path):
    monkeypatch.setenv("SPECC_CACHE", str(tmp_path))
    monkeypatch.setattr(c_runtime, "KEEP", 2)
    spec = ACTIVATION_SPEC.replace("ACT", "tanh")
    for n, age in ((5, 300), (6, 200)):
        specc.load(spec, N=n, backend="c")(torch.randn(2, 1, n))
        for f in (tmp_path / "c").glob("*.so"):  # make what is there older than what comes next
            os.utime(f, (f.stat().st_atime - age, f.stat().st_mtime - age))
    first = min((tmp_path / "c").glob("*.so"), key=lambda f: f.stat().st_mtime)
    c_runtime._by_source.clear()
    c_runtime._loaded.clear()
    specc.load(spec, N=5, backend="c")(torch.randn(2, 1, 5))  # found on disk: now the one used last
    specc.load(spec, N=7, backend="c")(torch.randn(2, 1, 7))  # a third: the least recently used goes
    kept = list((tmp_path / "c").glob("*.so"))
    assert len(kept) == 2 and first in kept


def test_a_library_just_made_is_kept_whatever_the_clocks_say(monkeypatch, tmp_path):
    """Files dated ahead (a cache copied from elsewhere) must not make pruning take the new one."""
    monkeypatch.setenv("SPECC_CACHE", str(tmp_path))
    monkeypatch.setattr(c_runtime, "KEEP", 2)
    (tmp_path / "c").mkdir()
    for k in range(2):
        future = tmp_path / "c" / f"future{k}.so"
        future.write_bytes(b"")
        os.utime(future, (future.stat().st_atime + 3600, future.stat().st_mtime + 3600))
    spec = ACTIVATION_SPEC.replace("ACT", "tanh")
    x = torch.randn(2, 1, 11)
    y, _ = specc.load(spec, N=11, backend="c")(x)
    torch.testing.assert_close(y[0], torch.tanh(x[0]), rtol=1e-6, atol=1e-6)
    names = [f.name for f in (tmp_path / "c").glob("*.so")]
    assert len(names) == 2 and len([n for n in names if n.startswith("future")]) == 1  # and the new one


def test_a_library_pruned_by_another_process_is_made_again(monkeypatch, tmp_path):
    monkeypatch.setenv("SPECC_CACHE", str(tmp_path))
    spec = ACTIVATION_SPEC.replace("ACT", "sigmoid")
    source, dims = specc.load(spec, N=13).program.C_SOURCE, {"N": 13}
    text = c_runtime.full_source(source, dims)
    cc = c_runtime.compiler()
    key = c_runtime.cache_key(text, cc)
    path = tmp_path / "c" / f"{key}.so"
    c_runtime._compile(cc, text, path, key)  # on disk, never loaded by this process
    real_utime = os.utime

    def pruned_meanwhile(p, *args, **kwargs):  # another process deletes it just after our look
        os.unlink(p)
        return real_utime(tmp_path, *args, **kwargs)

    monkeypatch.setattr(c_runtime.os, "utime", pruned_meanwhile)
    x = torch.randn(2, 1, 13)
    y, _ = specc.load(spec, N=13, backend="c")(x)
    torch.testing.assert_close(y[0], torch.sigmoid(x[0]), rtol=1e-6, atol=1e-6)
    assert path.exists()


def test_an_unusable_cache_folder_means_numpy_with_a_warning(monkeypatch, tmp_path):
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("SPECC_CACHE", str(tmp_path / "a_file" / "cache"))
    spec = ACTIVATION_SPEC.replace("ACT", "relu")
    with pytest.warns(RuntimeWarning, match="cannot write the compiled loops"):
        y, _ = specc.load(spec, N=14)(torch.randn(2, 1, 14))
    with pytest.raises(RuntimeError, match="cannot write the compiled loops"):
        specc.load(spec, N=15, backend="c")(torch.randn(2, 1, 15))


def test_long_inference_runs_in_chunks(spec_cell, monkeypatch):
    assert_long_inference_runs_in_chunks("c", spec_cell, monkeypatch)


def test_inference_keeps_c_in_two_blocks(monkeypatch):
    assert_inference_keeps_c_in_two_blocks("c", monkeypatch)


def test_spec_names_that_are_c_words_are_renamed_in_the_c():
    spec = textwrap.dedent("""
        cell words(N) {
            input x[N]
            state int[N] = zeros
            param W[N, N]
            static = tanh(W @ int + x)
            M_PI = static * 0.5
            int' = M_PI * sigmoid(static)
            output int'
        }
    """)
    source = assert_text_spec_matches_numpy(spec, "c", T=3, B=2, N=6).program.C_SOURCE
    assert "float *int =" not in source and "float static =" not in source and "float M_PI =" not in source
    assert "float v_M_PI =" in source  # a header's macro, renamed


def test_the_c_is_readable_and_quotes_the_spec():
    source = specc.load("lstm", I=3, H=4).program.C_SOURCE
    assert ("void specc_lstm_forward(long T, long B, int train, int threads, int cols, int packed, float *const *arg, "
            "const long *row)") in source
    assert "/* specs/lstm.rnn:16  c' = sigmoid(f) * c + sigmoid(i) * tanh(g) */" in source
    assert "float v_sigmoid_f = sp_sigmoid(" in source  # one fused loop: a local per value


@pytest.mark.parametrize("M, K, N", [(1, 1, 1), (7, 5, 33), (70, 2500, 45), (130, 300, 64)])
def test_the_host_products_match_float64(M, K, N):
    """rt_c.matmul (OpenBLAS): row-major operands, transposed views read as they are (a weight as
    torch keeps it, g^T for a weight gradient) and other strides copied first."""
    lib = c_runtime.library(specc.load("gru", I=3, H=4).program.C_SOURCE, {"I": 3, "H": 4})
    g = torch.Generator().manual_seed(M + K + N)
    a = torch.randn(M, K, generator=g)
    w_t = torch.randn(N, K, generator=g)
    want = (a.double() @ w_t.double().T).float()
    tol = dict(rtol=1e-5, atol=1e-5 * K ** 0.5)
    torch.testing.assert_close(c_runtime.matmul(lib, a, w_t.T), want, **tol)
    torch.testing.assert_close(c_runtime.matmul(lib, a.T.contiguous().T, w_t.T.contiguous()), want, **tol)
    wide = torch.randn(M, 2 * K, generator=g)
    wide[:, ::2] = a
    torch.testing.assert_close(c_runtime.matmul(lib, wide[:, ::2], w_t.T), want, **tol)  # copied first
    rows = torch.randn(M, K + 3, generator=g)
    rows[:, :K] = a
    torch.testing.assert_close(c_runtime.matmul(lib, rows[:, :K], w_t.T), want, **tol)  # rows K + 3 apart


def test_a_compiler_without_openmp_still_builds_the_loops(monkeypatch, tmp_path):
    """Apple's clang refuses -fopenmp: the loops are built without it and run on one thread."""
    import shutil

    real = shutil.which("cc")
    picky = tmp_path / "picky-cc"
    picky.write_text(f'#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp ] && {{ echo "no openmp" >&2; exit 1; }}; done\n'
                     f'exec {real} "$@"\n')
    picky.chmod(0o755)
    monkeypatch.setenv("CC", str(picky))
    monkeypatch.setenv("SPECC_CACHE", str(tmp_path / "cache"))
    ref = torch.nn.GRU(6, 9)
    ours = specc.from_torch(ref, backend="c")
    x, state = torch.randn(4, 3, 6), [torch.randn(3, 9)]
    assert_same(run(ours, x, state), run(TorchLayer(ref), x, state))


def test_inference_keeps_nothing_for_backward(monkeypatch):
    """Under no_grad the loop writes what only backward reads (the LSTM's five gate activations
    per step) into scratch: the host allocates none of those (T*B, H) buffers."""
    handed = []
    real_run = c_runtime.run
    monkeypatch.setattr(c_runtime, "run", lambda lib, fn, T, B, train, tensors, scratch, **kw:
                        handed.append([t for t in tensors]) or real_run(lib, fn, T, B, train, tensors, scratch, **kw))
    module = specc.load("lstm", I=5, H=6, backend="c")
    x = torch.randn(30, 4, 5)
    with torch.no_grad():
        module(x)
    inference = handed.pop()
    assert sum(t is None for t in inference) == 5
    module(x.requires_grad_())
    assert all(t is not None for t in handed.pop())


# --- cells checked against a hand-written torch loop ------------------------------------------

def assert_matches_torch_loop(module, step, x, state, tol=1e-5):
    """`module` against `step(x_t, states, params) -> (y_t, next states)`, one step of the same
    cell in torch, run over x by hand with autograd: outputs, final states, and the gradients of
    x, of the initial states and of every parameter (the loss of run())."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    got = run(module, x, state)
    params = {n: p.detach().clone().requires_grad_() for n, p in module.named_parameters()}
    xr = x.clone().requires_grad_()
    first = [s.clone().requires_grad_() for s in state]
    states, ys = first, []
    for t in range(x.shape[0]):
        y, states = step(xr[t], states, params)
        ys.append(y)
    y = torch.stack(ys)
    g = torch.Generator().manual_seed(1)
    loss = (y * torch.randn(y.shape, generator=g)).sum()
    for f in states:
        loss = loss + (f * torch.randn(f.shape, generator=g)).sum()
    loss.backward()
    want = {"y": y, **{f"final{k}": f for k, f in enumerate(states)}, "dx": xr.grad,
            **{f"d{k}": s.grad for k, s in enumerate(first)}, **{f"d{n}": p.grad for n, p in params.items()}}
    assert_same(got, {k: v.detach() for k, v in want.items()}, tol)


STACKED_SPEC = """
cell stacked(I, H) {
    input x[I]
    state h[H] = ones
    param A[H, I]
    param C[H, I]
    h' = (A @ x) * h + C @ x
    output h'
}
"""


@pytest.mark.parametrize("I, H", [(5, 3), (7, 1), (1, 6)])
def test_a_part_of_stacked_products_that_backward_keeps(I, H):
    """A @ x and C @ x are one product over [A; C] before the loop; backward reads the part A @ x,
    which the forward pass's host code holds as columns of that product (rows 2H apart)."""
    module = specc.load(STACKED_SPEC, backend="c", I=I, H=H)

    def step(x, states, p):
        h = (x @ p["A"].T) * states[0] + x @ p["C"].T
        return h, [h]

    assert_matches_torch_loop(module, step, torch.randn(4, 2, I), [torch.randn(2, H)])


JOINED_SPEC = """
cell joined(I, H) {
    input x[I]
    state h[H] = zeros
    param W[H, H]
    param U[H, I]
    a = tanh(W @ h + U @ x)
    b = sigmoid(a)
    h' = a * b
    y = [a, b]
    output y
}
"""


@pytest.mark.parametrize("I, H", [(5, 3), (7, 1)])
def test_parts_of_a_concatenation_that_backward_keeps(I, H):
    """The loop writes a and b into their columns of the output y; backward reads them there."""
    module = specc.load(JOINED_SPEC, backend="c", I=I, H=H)

    def step(x, states, p):
        a = torch.tanh(states[0] @ p["W"].T + x @ p["U"].T)
        b = torch.sigmoid(a)
        return torch.cat([a, b], dim=1), [a * b]

    assert_matches_torch_loop(module, step, torch.randn(5, 3, I), [torch.randn(3, H)])
    source = module.program.C_SOURCE
    assert "const long v_a_row = row[" in source and "const long v_b_row = row[" in source


def test_the_loop_refuses_a_view_it_was_not_told_of():
    """What the C reads as contiguous must be: a strided tensor in its place is an error, not
    wrong numbers."""
    module = specc.load(STACKED_SPEC, backend="c", I=5, H=3)
    lib = c_runtime.library(module.program.C_SOURCE, {"I": 5, "H": 3})
    wide = torch.zeros(8, 6)
    state = torch.zeros(5 * 2, 3)
    with pytest.raises(AssertionError, match="argument 0 of specc_stacked_forward is not a contiguous"):
        c_runtime.run(lib, "specc_stacked_forward", 4, 2, False, [wide[:, :3], state], 0)
    with pytest.raises(AssertionError, match="argument 0 of .* not a float32 CPU matrix with adjacent columns"):
        c_runtime.run(lib, "specc_stacked_forward", 4, 2, False, [wide[:, ::2], state], 0, views=(0,))


CONSTANT_SPEC = """
cell k(I, H) {
    input x[I]
    state h[H] = zeros
    param W[H, I]
    h' = tanh(W @ x - K / (1 + K * K)) * 0.5 + h * K / (1 + K * K)
    output h'
}
"""


@pytest.mark.parametrize("spec_text, value, I, H", [
    ("-0.5", -0.5, 5, 3), ("-0.5", -0.5, 7, 1), ("0.25", 0.25, 5, 3), ("1e-3", 1e-3, 5, 3), ("100", 100.0, 7, 1),
    ("-1e-3", -1e-3, 5, 3), ("-100", -100.0, 5, 3), ("(0 - 3)", -3.0, 5, 3), ("2 * -1.5", -3.0, 1, 4),
    ("-tanh(0.5) / 4", None, 5, 3),
])
def test_constants_of_every_sign_and_size(spec_text, value, I, H):
    """Constants in the loop are C literals, and so is a number made of constants alone (-0.5 is
    neg(0.5)): the host holds those as Python floats, and backward gets them from forward. The
    state's gain, K / (1 + K^2), stays below 1/2 whatever K is, so float32 is enough to compare."""
    if value is None:
        value = -torch.tanh(torch.tensor(0.5, dtype=torch.float64)).item() / 4
    module = specc.load(CONSTANT_SPEC.replace("K", spec_text), backend="c", I=I, H=H)

    def step(x, states, p):
        gain = value / (1 + value * value)
        h = torch.tanh(x @ p["W"].T - gain) * 0.5 + states[0] * value / (1 + value * value)
        return h, [h]

    assert_matches_torch_loop(module, step, torch.randn(4, 2, I), [torch.randn(2, H)])
    if spec_text.lstrip("-").replace(".", "").replace("e-", "").isdigit():  # a plain number: a C literal
        assert c_backend.c_float(float(spec_text)) in module.program.C_SOURCE


NAMES_SPEC = """
cell clash(linux, WCHAR_MAX) {
    input stdin[WCHAR_MAX]
    state errno[linux] = zeros
    param NULL[linux, linux]
    param EOF[linux, WCHAR_MAX]
    param M_PI[linux]
    INT32_MAX = NULL @ errno + EOF @ stdin + M_PI
    int = tanh(INT32_MAX)
    float = sigmoid(INT32_MAX)
    restrict = int * float
    main = restrict - 0.25 * errno
    math_errhandling = exp(-0.5 * main)
    abs = main * math_errhandling
    sqrt = abs + 0.5 * errno
    errno' = sqrt
    output unix = abs
}
"""


def _names_step(x, states, p):
    errno = states[0]
    int32_max = errno @ p["NULL"].T + x @ p["EOF"].T + p["M_PI"]
    main = torch.tanh(int32_max) * torch.sigmoid(int32_max) - 0.25 * errno
    a = main * torch.exp(-0.5 * main)
    return a, [a + 0.5 * errno]


@pytest.mark.parametrize("linux, wchar", [(4, 5), (1, 7)])
def test_spec_names_that_are_c_macros_or_library_names(linux, wchar):
    """Header macros (linux, WCHAR_MAX, INT32_MAX, EOF, NULL, M_PI, errno, stdin), the library's
    names (abs, sqrt, exp, main) and keywords (int, float, restrict) as dimensions, parameters, an
    input, a state and values: the C names them with a prefix, keeping the spec's names readable."""
    module = specc.load(NAMES_SPEC, backend="c", linux=linux, WCHAR_MAX=wchar)
    assert_matches_torch_loop(module, _names_step, torch.randn(4, 3, wchar), [torch.randn(3, linux)])
    source = module.program.C_SOURCE
    assert "/* <spec>:9  int = tanh(INT32_MAX) */" in source
    assert "float v_int = sp_tanh(v_INT32_MAX);" in source
    assert "B * d_linux" in source and "v_NULL" in source and "v_errno" in source


def test_auto_runs_cells_named_like_c_on_the_c_loops_without_a_warning(timed_faster):
    timed_faster("c")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = specc.load(NAMES_SPEC, linux=3, WCHAR_MAX=6)
        assert module.program.C_UNSUPPORTED is None
        assert _backend(module) == "c"
        assert_matches_torch_loop(module, _names_step, torch.randn(3, 2, 6), [torch.randn(2, 3)])
        for dim in ("double", "main", "unix"):  # a keyword, the library's name, a macro
            elman = specc.load(ELMAN_SPEC.replace("N", dim), **{dim: 3})
            assert _backend(elman) == "c"
            h, _ = elman(torch.randn(2, 1, 3))
    assert [str(w.message) for w in caught] == []


def test_a_pass_splits_its_batch_among_threads_or_each_products_columns(monkeypatch):
    """Each pass tells the runtime its batch and how much its loop multiplies a step (an LSTM:
    B * H * 4H each way). The batch is split among torch's threads, SPLIT_ROWS rows or more each;
    where a step's weights are large, each product's columns are split among all of them instead,
    whatever the batch. OpenBLAS itself stays on one thread."""
    import re

    source = specc.compile_spec("lstm").source
    calls = re.findall(r"rt_c\.pass_threads\((.*?)\)  #", source)
    assert calls == ["B, B * (H * 4*H)", "B, B * (4*H * H)"], calls
    monkeypatch.setattr(c_runtime, "_loop", [1])
    monkeypatch.setattr(c_runtime, "_cols", [False])
    monkeypatch.delenv("SPECC_LOOP_THREADS", raising=False)
    monkeypatch.delenv("SPECC_LOOP_SPLIT", raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    c_runtime.pass_threads(64, 64 * 128 * 512)  # weights of 64K floats: the batch split
    assert (c_runtime._cols[0], c_runtime.loop_threads(64), c_runtime.loop_threads(6)) == (False, 4, 1)
    c_runtime.pass_threads(1, 1024 * 4096)  # one example, 4M floats of weights: the columns split
    assert (c_runtime._cols[0], c_runtime.loop_threads(1)) == (True, 4)
    c_runtime.pass_threads(16, 16 * 256 * 1024)  # 1 MiB of weights, the threshold
    assert (c_runtime._cols[0], c_runtime.loop_threads(16)) == (True, 4)
    monkeypatch.setenv("SPECC_LOOP_SPLIT", "rows")
    c_runtime.pass_threads(16, 16 * 256 * 1024)
    assert (c_runtime._cols[0], c_runtime.loop_threads(16)) == (False, 4)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    monkeypatch.setenv("SPECC_LOOP_SPLIT", "cols")
    c_runtime.pass_threads(16, 16 * 256 * 1024)  # one thread: no columns to share
    assert (c_runtime._cols[0], c_runtime.loop_threads(16)) == (False, 1)


@pytest.mark.parametrize("B", [1, 3, 4, 5, 8, 13])
@pytest.mark.parametrize("threads", ["1", "2", "3"])
@pytest.mark.parametrize("split", ["rows", "cols"])
def test_every_split_of_the_batch_gives_torchs_numbers(monkeypatch, split, threads, B):
    """However the batch is split among the loop's threads (rows left over, a thread with none),
    or each product's columns (28 = 16 + 12 columns a gate: a block that is not a multiple of 16),
    the LSTM's outputs and gradients are torch.nn.LSTM's."""
    monkeypatch.setenv("SPECC_LOOP_THREADS", threads)
    monkeypatch.setenv("SPECC_LOOP_SPLIT", split)
    monkeypatch.setattr(c_runtime, "SPLIT_ROWS", 1)  # every split, down to one row a thread
    torch.manual_seed(B)
    m = specc.load("lstm", I=5, H=7, backend="c")
    ref = torch.nn.LSTM(5, 7)
    with torch.no_grad():
        for mine, theirs in (("W_ih", "weight_ih_l0"), ("W_hh", "weight_hh_l0"), ("b_ih", "bias_ih_l0"),
                             ("b_hh", "bias_hh_l0")):
            getattr(ref, theirs).copy_(getattr(m, mine))
    x = torch.randn(6, B, 5, requires_grad=True)
    y, (h, c) = m(x)
    y_ref, (h_ref, c_ref) = ref(x)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c, c_ref[0], atol=1e-5, rtol=1e-5)
    mine = torch.autograd.grad((y * y).sum() + c.sum(), [x, m.W_hh, m.W_ih])
    theirs = torch.autograd.grad((y_ref * y_ref).sum() + c_ref.sum(), [x, ref.weight_hh_l0, ref.weight_ih_l0])
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def _forward_backward_in_child(m, x, queue, one_thread):
    if one_thread:  # as torch's DataLoader workers do: torch's own ops on large tensors hang there too
        torch.set_num_threads(1)
    y, _ = m(x)
    (dx,) = torch.autograd.grad(y.sum(), [x])
    queue.put((y.detach().numpy(), dx.numpy()))  # arrays: pickled by value, not shared


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
@pytest.mark.parametrize("threads, B, H", [(None, 16, 8), ("1", 64, 1024)])
def test_a_forked_child_runs_the_loops_after_its_parent_did(monkeypatch, threads, B, H):
    """GCC's OpenMP waits forever, in a forked child, for the threads of a region its parent ran
    (the batch split among threads; a wide elementwise loop on one): a multiprocessing or
    DataLoader worker that calls the model hung. In a forked child the loops start no region."""
    import multiprocessing

    if threads:
        monkeypatch.setenv("SPECC_LOOP_THREADS", threads)
    torch.manual_seed(0)
    m = specc.load("lstm", I=4, H=H, backend="c")
    x = torch.randn(3, B, 4, requires_grad=True)
    y, _ = m(x)
    (dx,) = torch.autograd.grad(y.sum(), [x])  # the parent's regions, before the fork
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_forward_backward_in_child, args=(m, x, queue, H > 64))
    child.start()
    try:
        y_child, dx_child = queue.get(timeout=60)
    finally:
        child.join(5)
        if child.is_alive():
            child.kill()
    torch.testing.assert_close(torch.from_numpy(y_child), y.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.from_numpy(dx_child), dx, atol=1e-5, rtol=1e-5)


def test_host_products_split_among_threads_match_torch(monkeypatch):
    """specc_matmul splits a product by rows, or by columns when it has fewer rows, over any
    number of threads, for each of CBLAS's layouts (transposed views read in place)."""
    specc.load("lstm", I=3, H=4, backend="c")(torch.randn(2, 1, 3))  # a compiled library to call
    c_lib = next(iter(c_runtime._loaded.values()))
    assert_host_products_match_torch(monkeypatch, c_lib)


@pytest.mark.parametrize("rows_a_block", [1, 4, 7, 64])
def test_contract_sums_by_blocks_of_rows_match_einsum(monkeypatch, rows_a_block):
    """contract(W, a, b)'s weight gradient, sum_r g[r, k] a[r, n] b[r, m], a block of rows' outer
    products at a time (blocks that divide the rows and that do not, one block), by the C host
    (specc_matmul adding into its result), by the NumPy backend's helper and by the Triton host's
    (float32 and 64)."""
    from specc.backends import numpy_runtime

    specc.load("lstm", I=3, H=4, backend="c")(torch.randn(2, 1, 3))  # a compiled library to call
    c_lib = next(iter(c_runtime._loaded.values()))
    torch.manual_seed(0)
    R, K, N, M = 28, 5, 3, 6
    g, a, b = torch.randn(R, K, dtype=torch.float64), torch.randn(R, N, dtype=torch.float64), torch.randn(R, M, dtype=torch.float64)
    want = torch.einsum("rk,rn,rm->knm", g, a, b).reshape(K, N * M)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        itemsize = torch.empty((), dtype=dtype).element_size()
        monkeypatch.setattr(numpy_runtime, "CONTRACT_BYTES", rows_a_block * N * M * itemsize)
        assert numpy_runtime.contract_rows(R, N * M, itemsize, numpy_runtime.CONTRACT_BYTES) == min(rows_a_block, R)
        got = numpy_runtime.contract_sum(*(v.to(dtype).numpy() for v in (g, a, b)))
        assert got.dtype == torch.empty((), dtype=dtype).numpy().dtype
        torch.testing.assert_close(torch.from_numpy(got).double(), want, atol=tol, rtol=tol)
        got = numpy_runtime.contract_sum_tensors(*(v.to(dtype) for v in (g, a, b)))
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)
    # float32 views with strides, as the host hands them in (a transposed matrix, a block of columns)
    got = c_runtime.contract_sum(c_lib, g.float().T.contiguous().T, a.float(), torch.cat([b, b], 1).float()[:, :M])
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_contract_sums_off_the_cpu_take_larger_blocks(monkeypatch):
    """On a GPU the blocks are CONTRACT_BYTES_GPU (fewer launches; torch.einsum made every row's
    outer product at once there). Run on torch's meta device, which has shapes and no numbers."""
    from specc.backends import numpy_runtime

    budgets = []
    real = numpy_runtime.contract_rows
    monkeypatch.setattr(numpy_runtime, "contract_rows", lambda *a: budgets.append(a[-1]) or real(*a))
    g, a, b = (torch.empty(R, n, device="meta") for R, n in ((4000, 64), (4000, 64), (4000, 64)))
    assert numpy_runtime.contract_sum_tensors(g, a, b).shape == (64, 64 * 64)
    numpy_runtime.contract_sum_tensors(*(torch.zeros(v.shape) for v in (g, a, b)))
    assert budgets == [numpy_runtime.CONTRACT_BYTES_GPU, numpy_runtime.CONTRACT_BYTES]


@pytest.mark.parametrize("vendor, family, flags, expected", [
    ("AuthenticAMD", 26, "avx2 fma avx512f avx512cd avx512bw avx512dq avx512vl", "SkylakeX"),  # Zen 5
    ("AuthenticAMD", 26, "avx2 fma", None),  # a Zen 5 VM that hides AVX-512
    ("AuthenticAMD", 25, "avx2 fma avx512f avx512cd avx512bw avx512dq avx512vl", None),  # Zen 4: OpenBLAS knows it
    ("AuthenticAMD", 23, "avx2 fma", None),
    ("GenuineIntel", 6, "avx2 fma avx512f avx512cd avx512bw avx512dq avx512vl", None),
])
def test_openblas_is_told_the_kernels_only_where_it_misreads_the_cpu(monkeypatch, vendor, family, flags, expected):
    monkeypatch.delenv("OPENBLAS_CORETYPE", raising=False)
    info = (f"processor\t: 0\nvendor_id\t: {vendor}\ncpu family\t: {family}\nmodel\t\t: 2\n"
            f"flags\t\t: fpu sse sse2 {flags}\n\nprocessor\t: 1\nvendor_id\t: {vendor}\n")
    assert c_runtime._core_type(info) == expected
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")  # the user's choice stands
    assert c_runtime._core_type(info) is None


CROSS_CC = shutil.which("aarch64-linux-gnu-gcc")


@pytest.mark.skipif(CROSS_CC is None, reason="no aarch64 cross compiler (Debian: apt install gcc-aarch64-linux-gnu)")
@pytest.mark.parametrize("spec, cell", [("lstm", None), ("gru", None), ("elman", "rnn_tanh"), ("second_order", None),
                                        ("gru_cho", None), ("jordan", None), ("lstm_proj", None)])
def test_the_c_compiles_for_aarch64(tmp_path, spec, cell):
    """Nothing x86-only in the generated C or its prelude: each library cell's loops compile for
    64-bit ARM (NEON) with the flags the runtime uses, and vectorise there too."""
    prog = specc.program(specc.compile_spec(spec, cell))
    dims = {d: 8 for d in prog.DIMS}
    source = tmp_path / "cell.c"
    source.write_text(c_runtime.full_source(prog.C_SOURCE, dims))
    include = c_runtime.openblas()[0]  # cblas.h is the same on every architecture
    flags = [f for f in c_runtime.BASE_FLAGS if f not in ("-shared", "-fPIC")]
    result = subprocess.run([CROSS_CC, "-O3", "-march=armv8-a", *flags, f"-I{include}", "-c", str(source),
                             "-o", str(tmp_path / "cell.o"), "-fopt-info-vec-optimized"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "loop vectorized" in result.stderr


def _host_code(spec: str, function: str, after: str, before: str | None = None) -> list[str]:
    """The code lines (stripped, no comments) of a generated host function between the line
    holding `after` and the first holding `before` (or the function's end), neither included."""
    source = specc.compile_spec(spec).source
    body = source[source.index(f"def {function}("):]
    body = body[:body.index("\n\n\n")]
    part = body[body.index(after):body.index(before) if before else None].splitlines()[1:]
    return [line.strip() for line in part if line.strip() and not line.strip().startswith("#")]


def test_elementwise_work_after_the_backward_loop_is_made_in_it():
    """minGRU's backward: every elementwise gradient the scheduler put after the loop (d_z and the
    halves of the input product's gradient) is made in the C loop, which writes only what the
    host's products and sums read; after the loop the host runs products and sums alone. (Its
    numbers: test_references and the differential tests, on every backend.)"""
    code = _host_code("mingru", "backward_c", "rt_c.run(")
    arithmetic = [line for line in code if re.search(r"[^*]\s[-+*/]\s", line.split("=", 1)[-1])]
    assert arithmetic == [], arithmetic
    assert sum("rt_c.matmul" in line for line in code) == 2  # d_x, and both weights' gradients in one


@pytest.mark.parametrize("cell", ["mingru", "minlstm", "sru"])
def test_elementwise_work_before_the_forward_loop_is_made_in_it(cell):
    """Gates made from the input alone (minGRU's z = sigmoid(W_z @ x + b_z)) are made in the C loop
    at their step, and written there only where backward keeps them: before the loop the host
    makes the input products, joins weights and slices views, and nothing elementwise."""
    code = [line for line in _host_code(cell, "forward_c", "rt_c.pass_threads(", "rt_c.run(")
            if "rt_c.empty(" not in line]
    arithmetic = [line for line in code if re.search(r"[^*]\s[-+*/]\s|torch\.(sigmoid|tanh|exp)", line.split("=", 1)[-1])]
    assert arithmetic == [], arithmetic
    assert any("rt_c.matmul" in line for line in code)


SHARED_GATE_SPEC = """
cell shared(I, H) {
    input x[I]
    state h[H] = zeros
    param W[H, I]
    param U[H, I]
    param V[H, H]
    g = sigmoid(W @ x)
    u = tanh(U @ x) * 0.5
    h' = g * h + u + V @ u
    y = g + h'
    output y
}
"""


def test_an_input_only_gate_that_feeds_a_product_stays_before_the_loop():
    """u feeds a product (V @ u, one over the sequence), so it stays a whole tensor made before
    the loop; g, read only in the loop (y = g + h' is made there too), is made in it."""
    before = "\n".join(_host_code(SHARED_GATE_SPEC, "forward_c", "def forward_c(", "rt_c.run("))
    assert "torch.tanh(" in before and "torch.sigmoid(" not in before
    ours = specc.load(SHARED_GATE_SPEC, backend="c", I=6, H=9)
    ref = specc.load(SHARED_GATE_SPEC, backend="numpy", I=6, H=9)
    ref.load_state_dict(ours.state_dict())
    x, state = torch.randn(5, 3, 6), [torch.randn(3, 9)]
    assert_same(run(ours, x, state), run(ref, x, state))


@pytest.mark.parametrize("T, chosen", [(32, "numpy"), (400, "c")])
def test_a_long_sequence_is_timed_at_two_lengths_and_drawn_to_its_own(monkeypatch, T, chosen):
    """The C loops cost more once a call and less a step: what wins for 32 steps may lose for 400.
    Here (sleeps) the C loops take 3 ms + 0.02 ms a step, NumPy 0.08 ms a step."""
    from specc.backends import tuning

    def fake_probe(module, tensors, n_inputs, n_states, steps, B):
        def once(runner):
            time.sleep((3.0 + 0.02 * steps if runner.name == "c" else 0.08 * steps) / 1e3)
        return once

    monkeypatch.setattr(tuning, "probe", fake_probe)
    seconds = runtime.time_backends(specc.load("gru", I=4, H=5), [], 1, 1, T, 2)
    assert min(seconds, key=seconds.get) == chosen
    # Drawn through its two lengths, the C loops' 400 steps are ~11 ms (sleeps run late: more).
    assert T == 32 or 1e3 * seconds["c"] > 0.6 * (3.0 + 0.02 * T)


def test_a_backends_first_row_waits_for_its_calls_to_settle(monkeypatch):
    """A process's first calls of a size can run slow (on a Xeon VM: the first huge-page buffers,
    ~45 ms for 33 MB, then 3-4): the first row times only after PROBE_FIRST_CALLS calls. Here
    (sleeps) the C loops' first 6 calls take 10 ms and then 1 ms, NumPy's 2 ms; without the wait
    the C loops' slow calls are all the probe sees."""
    from specc.backends import tuning

    made = {"c": 0, "numpy": 0}

    def fake_probe(*args):
        def once(runner):
            made[runner.name] += 1
            slow = runner.name == "c" and made["c"] <= 6
            time.sleep((10.0 if slow else 1.0 if runner.name == "c" else 2.0) / 1e3)
        return once

    monkeypatch.setattr(tuning, "probe", fake_probe)
    monkeypatch.setattr(runtime, "PROBE_FIRST_CALLS", 8)  # the suite's own setting is 0 (conftest)
    seconds = runtime.time_backends(specc.load("gru", I=4, H=5), [], 1, 1, 8, 2)
    assert min(seconds, key=seconds.get) == "c"
