"""The Triton backend, run on CPU tensors by Triton's interpreter (TRITON_INTERPRET=1).

Every cell in specs/ must give, through the generated kernels, what the NumPy backend gives, and
what torch.nn (for LSTM, GRU and RNN) or a hand-written torch loop (for the rest) gives: outputs,
final states and every gradient, in float32 to 1e-5, on sizes that are not powers of two.
"""
from __future__ import annotations

import inspect
import re
import sys

import pytest
import torch

import specc
from helpers import (run, assert_same, assert_spec_matches_numpy, assert_text_spec_matches_numpy,
                     TORCH_LAYERS, TorchLayer, assert_inference_keeps_c_in_two_blocks,
                     assert_long_inference_runs_in_chunks, assert_softmax_in_the_recurrence,
                     assert_softmax_feeds_a_contraction, assert_softmax_of_minus_inf_columns,
                     assert_matches_references)

import triton  # noqa: F401  (a test dependency: missing, these tests fail rather than skip)

F32 = torch.float32


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")








def test_every_spec_matches_the_numpy_backend(spec_cell):
    assert_spec_matches_numpy(spec_cell, "triton", B=3)


def test_every_spec_matches_the_numpy_backend_with_the_time_loop_in_one_kernel(spec_cell, monkeypatch):
    """PERSISTENT: each pass launches one kernel that loops over the steps itself (every stage of a
    step in turn, a program owning its examples' every feature), and no kernel of one step."""
    from helpers import odd_dims

    prog = specc.load(spec_cell.path, spec_cell.cell, backend="triton", **odd_dims(spec_cell.dims)).program
    monkeypatch.setattr(prog, "PERSISTENT", True)
    monkeypatch.setattr(prog, "PERSISTENT_FEATURES", 1 << 30)  # the interpreter has no shared memory to fill
    launches = _record(monkeypatch, prog, r"_(forward|backward)_steps?\d*$|^linear_scan$")
    assert_spec_matches_numpy(spec_cell, "triton", B=3)
    launched = [name for name, _ in launches]
    assert launched and all(n.endswith("_steps") or n == "linear_scan" for n in launched), launched
    # forward and backward once each, and inference (two lengths), with no gradient
    assert len([n for n in launched if n.endswith("_forward_steps")]) in (0, 3), launched


@pytest.mark.parametrize("suffix, cells", [
    ("", []), ("_steps", []), ("_steps", ["lstm:I=64,H=128", "gru:I=64,H=128", "multihead_lstm:I=64,N=4,D=32"]),
    ("", ["--products=bfloat16", "lstm", "gru", "multihead_lstm:I=64,N=4,D=32"]),
    ("_steps", ["--grid", "lstm:I=64,H=512", "gru:I=64,H=512", "gru_cho:I=64,H=300"])],
    ids=["every-kernel", "persistent", "persistent-at-its-widest", "bfloat16-products", "persistent-in-slices"])
def test_kernels_compile_for_a_gpu(suffix, cells):
    """Every library cell's kernels, compiled (not run) for an H100 by Triton's own compiler, within
    its shared memory: the interpreter runs kernels as Python, so a value whose shape changes in a
    loop, which the compiler refuses, passes there (tests/compile_for_gpu.py). The persistent loop
    also at PERSISTENT_FEATURES (128) features, and in slices of it with the barrier across the grid;
    and products in bfloat16, which the interpreter cannot multiply."""
    import os
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, str(root / "tests" / "compile_for_gpu.py"), suffix, *cells], cwd=root,
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("ok ") >= (6 if cells else 30), done.stdout


class _Recorded:
    """A kernel whose launches are recorded: (its name, the grid) each."""

    def __init__(self, name, kernel, launched):
        self.name, self.kernel, self.launched = name, kernel, launched

    def __getitem__(self, grid):
        self.launched.append((self.name, grid))
        return self.kernel[grid]


def _record(monkeypatch, prog, pattern=r"_(forward|backward)_steps$") -> list[tuple[str, tuple]]:
    """The launches of the generated module's kernels whose names match `pattern`, as they happen."""
    launched: list[tuple[str, tuple]] = []
    for name in dir(prog):
        if re.search(pattern, name):
            monkeypatch.setattr(prog, name, _Recorded(name, getattr(prog, name), launched))
    return launched










@pytest.mark.parametrize("name", list(TORCH_LAYERS))
@pytest.mark.parametrize("I, H", [(37, 100), (16, 20)])
def test_matches_torch_nn(name, I, H):
    make, (spec, cell) = TORCH_LAYERS[name]
    ref = make(I, H)
    ours = specc.from_torch(ref, backend="triton")
    T, B = 3, 5
    x = torch.randn(T, B, I)
    n_states = len(ours.program.STATES)
    state = [torch.randn(B, H) * 0.5 for _ in range(n_states)]
    got, want = run(ours, x, state), run(TorchLayer(ref), x, state)
    assert_same(got, want)


@pytest.mark.parametrize("tiles", [(16, 64, 16), (32, 16, 64)])
def test_any_tile_gives_the_same_numbers(tiles, monkeypatch):
    for cell in ("lstm", "gru_cho"):
        ref = specc.load(cell, I=21, H=19, backend="numpy")
        ours = specc.load(cell, I=21, H=19, backend="triton")
        ours.load_state_dict(ref.state_dict())
        monkeypatch.setattr(ours.program, "TILES", tiles)
        x, h = torch.randn(3, 35, 21), [torch.randn(35, 19) for _ in ref.program.STATES]
        assert_same(run(ours, x, h), run(ref, x, h))


def test_int64_offsets_give_the_same_numbers(monkeypatch):
    """Kernels switch to int64 offsets for tensors of 2**31 elements or more (too large for CI:
    here the switch is forced)."""
    for cell, dims in (("lstm", dict(I=21, H=19)), ("gru_cho", dict(I=21, H=19)), ("second_order", dict(I=5, H=7))):
        ref = specc.load(cell, backend="numpy", **dims)
        ours = specc.load(cell, backend="triton", **dims)
        ours.load_state_dict(ref.state_dict())
        monkeypatch.setattr(ours.program, "WIDE_ELEMENTS", 0)
        x, h = torch.randn(3, 35, dims["I"]), [torch.randn(35, dims["H"]) for _ in ref.program.STATES]
        assert_same(run(ours, x, h), run(ref, x, h))
        assert ">= WIDE_ELEMENTS" in inspect.getsource(ours.program.forward_triton)


def test_batch_picks_the_tile():
    program = specc.load("gru", I=3, H=4, backend="triton").program
    assert program.tiles(8, "ieee") == (16, 16, 32) and program.tiles(256, "ieee") == (32, 32, 32)
    assert program.tiles(8, "tf32") == (16, 32, 32) and program.tiles(256, "tf32") == (32, 64, 32)
    assert program.dot_precision(torch.device("cpu")) == "ieee"  # torch's default, "highest"


def test_spec_names_that_are_the_generated_code_s_own_are_renamed():
    spec = """
        cell own(N) {
            input x[N]
            state tiles[N] = zeros
            param precision[N, N]
            param PRECISION[N]
            dot_precision = tanh(precision @ tiles + x)
            TILES = dot_precision * PRECISION
            tiles' = TILES + sigmoid(dot_precision)
            output tiles'
        }
    """
    assert_text_spec_matches_numpy(spec, "triton", T=3, B=2, N=5)






@pytest.mark.parametrize("cell", ["lstm", "jordan", "shortcut"])
def test_long_inference_runs_in_chunks(cell, monkeypatch):
    from conftest import discover_spec_cells

    [spec_cell] = [c for c in discover_spec_cells() if c.cell == cell]
    assert_long_inference_runs_in_chunks("triton", spec_cell, monkeypatch)


def test_inference_keeps_c_in_two_blocks(monkeypatch):
    assert_inference_keeps_c_in_two_blocks("triton", monkeypatch)










def test_softmax_inside_the_recurrence():
    assert_softmax_in_the_recurrence("triton")








def test_softmax_feeds_a_contraction():
    assert_softmax_feeds_a_contraction("triton")


def test_a_value_read_twice_is_looked_at_once(monkeypatch):
    """Whether contract's first vector can be recomputed at any feature (triton._gatherable) is
    found once a value: a chain z_i = z_(i-1) * z_(i-1) of depth 12 asked 2^12 times each value
    (a depth of 25 took 27 s to compile)."""
    from specc.backends import triton as backend

    calls = []
    real = backend._gatherable
    monkeypatch.setattr(backend, "_gatherable", lambda *a: calls.append(a[2]) or real(*a))
    chain = ["z0 = tanh(h)"] + [f"z{i} = z{i - 1} * z{i - 1}" for i in range(1, 13)]
    body = "\n    ".join(chain)
    specc.compile_spec(f"""
        cell chain(H) {{
            input x[H]
            state h[H] = zeros
            param W[H, H, H]
            {body}
            h' = tanh(contract(W, z12, h) + x)
            output h'
        }}""")
    assert 0 < len(calls) <= 2 * len(set(calls))






@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # the interpreter's log(0), meant
def test_softmax_of_minus_inf_columns():
    assert_softmax_of_minus_inf_columns("triton")


def test_custom_cells_match_hand_written_references():
    assert_matches_references("triton")




@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_accumulate_in_float32(dtype):
    ref = specc.load("lstm", I=20, H=24)
    module = specc.load("lstm", I=20, H=24, backend="triton")
    module.load_state_dict(ref.state_dict())
    x = torch.randn(4, 3, 20)
    y, (h, c) = module(x.to(dtype))
    assert y.dtype == dtype and h.dtype == dtype
    want, _ = ref(x.to(dtype).float())
    torch.testing.assert_close(y.float(), want, rtol=0, atol=1e-2)
    y.float().sum().backward()
    assert module.W_hh.grad.dtype == F32 and torch.isfinite(module.W_hh.grad).all()


def _lstm_loop(x, h, c, p, rounded):
    """torch.nn.LSTM's step written out, the recurrent product's factors passed through `rounded`."""
    ys = []
    for xt in x:
        gates = xt @ p["W_ih"].T + p["b_ih"] + rounded(h) @ rounded(p["W_hh"]).T + p["b_hh"]
        i, f, g, o = gates.chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        ys.append(h)
    return torch.stack(ys), h, c


def test_a_float16_module_multiplies_in_float16_and_sums_in_float32():
    """Issue #17: a float16 module's step products take float16 factors (tensor cores on a GPU) and
    float32 sums; states and everything else stay float32. Forward: as a loop whose recurrent
    product rounds h and W_hh to float16 and nothing else, to float32's rounding, and measurably
    unlike the all-float32 loop. Gradients: near float32's. (bfloat16 the same on a GPU, where
    test_triton_gpu checks it: Triton's interpreter multiplies bfloat16 wrongly.)"""
    module = specc.load("lstm", I=20, H=40, backend="triton").half()
    p = {n: t.detach().float().requires_grad_() for n, t in module.named_parameters()}
    x, h0, c0 = torch.randn(6, 3, 20).half().float(), torch.randn(3, 40), torch.randn(3, 40)
    y, (h, c) = module(x, (h0, c0))
    assert module.backend_choice == "triton: asked for, float16 products"
    want_y, want_h, want_c = _lstm_loop(x, h0, c0, p, lambda t: t.half().float())
    plain_y, _, _ = _lstm_loop(x, h0, c0, p, lambda t: t)
    torch.testing.assert_close(y, want_y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h, want_h, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(c, want_c, rtol=1e-5, atol=1e-5)
    # the rounding to float16 shows: the all-float32 loop is ten times as far
    assert (y - plain_y).abs().max() > 10 * (y - want_y).abs().max()
    (y.sum() + c.sum()).backward()
    (plain_y.sum() + _lstm_loop(x, h0, c0, p, lambda t: t)[2].sum()).backward()
    for name, param in module.named_parameters():
        assert param.grad.dtype == torch.float16
        torch.testing.assert_close(param.grad.float(), p[name].grad, rtol=2e-2, atol=2e-2)


def test_a_float16_module_multiplies_so_under_torch_compile_too():
    """A compiled call (specc's ops in the traced graph, tensors widened before them) takes a
    half-precision module's products as the eager call does: the same numbers, gradients too."""
    module = specc.load("lstm", I=8, H=16, backend="triton").half()
    x = torch.randn(5, 3, 8).half()

    def once(f):
        for p in module.parameters():
            p.grad = None
        y, _ = f(x)
        y.float().sum().backward()
        assert module.backend_choice.endswith("float16 products"), module.backend_choice
        return y.detach().float(), module.W_hh.grad.float().clone()

    (y, g), (yc, gc) = once(module), once(torch.compile(module, backend="aot_eager"))
    torch.testing.assert_close(yc, y, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(gc, g, rtol=1e-3, atol=1e-3)


def test_runs_under_autocast():
    module = specc.load("gru", I=12, H=10, backend="triton")
    head = torch.nn.Linear(10, 3)
    x = torch.randn(5, 2, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = module(torch.nn.functional.linear(x, torch.eye(12)))  # a bfloat16 tensor under autocast
        loss = head(y).float().square().mean()
    loss.backward()
    assert module.W_ih.grad is not None and torch.isfinite(module.W_ih.grad).all()


def test_triton_on_cpu_tensors_without_the_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    module = specc.load("lstm", I=3, H=4, backend="triton")
    with pytest.raises(RuntimeError, match="CUDA tensors.*TRITON_INTERPRET=1"):
        module(torch.randn(2, 1, 3))


def test_missing_triton_is_a_clear_error(monkeypatch):
    module = specc.load("lstm", I=3, H=4, backend="triton")
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton now raises ImportError
    with pytest.raises(RuntimeError, match="needs the triton package"):
        module(torch.randn(2, 1, 3))


def test_float64_is_refused_with_a_reason():
    module = specc.load("lstm", I=3, H=4, backend="triton", dtype=torch.float64)
    with pytest.raises(TypeError, match="float32.*backend='numpy'"):
        module(torch.randn(2, 1, 3, dtype=torch.float64))


def test_auto_uses_numpy_for_cpu_tensors(monkeypatch):
    module = specc.load("lstm", I=3, H=4)
    monkeypatch.setitem(sys.modules, "triton", None)  # no triton needed on the CPU
    y, _ = module(torch.randn(2, 1, 3))
    assert y.shape == (2, 1, 4)


@pytest.mark.parametrize("cell, dims", [("lstm", dict(I=7, H=37)), ("gru_cho", dict(I=5, H=11)),
                                         ("second_order", dict(I=3, H=5))])
def test_rows_in_slices_with_a_barrier_across_the_grid(cell, dims, monkeypatch):
    """Issue #17's grid-wide loop: programs own slices of a row too wide for one, with a barrier
    across the grid after each stage (GRID_SYNC). Under the interpreter, which runs programs one
    after another, only a grid of one program passes that barrier, and only such a grid is launched
    (grid_slices(); more examples fall back to a launch a step): here it runs the barrier's code
    and the loop's arithmetic, against NumPy. tests/test_triton_gpu.py runs many programs."""
    ref = specc.load(cell, backend="numpy", **dims)
    ours = specc.load(cell, backend="triton", **dims)
    ours.load_state_dict(ref.state_dict())
    prog = ours.program
    monkeypatch.setattr(prog, "PERSISTENT", True)
    monkeypatch.setattr(prog, "persistent", lambda B, features: False)  # as if a row were too wide
    monkeypatch.setattr(prog, "PERSISTENT_FEATURES", 1 << 30)  # one slice
    launched = _record(monkeypatch, prog)
    for B, grid in ((3, [(1, 1), (1, 1)]), (40, [])):  # 40 examples: three programs, not resident here
        launched.clear()
        x = torch.randn(3, B, dims["I"])
        state = [torch.randn(B, ref.sizes["states"][n][0]) for n in prog.STATES]
        assert_same(run(ours, x, state), run(ref, x, state))
        assert [g for _, g in launched] == grid


def test_launch_plans_chosen_by_measurement(monkeypatch):
    """Issue #17: with TUNE, the first call of a batch times each launch plan (tiles, warps, the
    persistent loop) on a short forward + backward and keeps the fastest for the process; the
    module's settings are its own again after each call. The times here are given (a clock under
    which the 32x32x32 tile is ten times as fast): the interpreter's would say nothing of a GPU."""
    from specc.backends import tuning

    ref = specc.load("gru", I=9, H=20, backend="numpy")
    ours = specc.load("gru", I=9, H=20, backend="triton")
    ours.load_state_dict(ref.state_dict())
    prog = ours.program
    monkeypatch.setattr(prog, "TUNE", True)
    monkeypatch.setattr(tuning, "_CHOSEN", {})
    seen = []

    def clock():  # a timed call's end minus its start is the cost of the plan it ran under
        seen.append((prog.TILES, prog.NUM_WARPS, prog.PERSISTENT))
        return len(seen) * (0.1 if prog.TILES == (32, 32, 32) else 1.0)

    monkeypatch.setattr(tuning, "CLOCK", clock)
    launched = []
    monkeypatch.setattr(prog, "tiles", lambda B, precision, tiles=prog.tiles: launched.append(prog.TILES) or
                        tiles(B, precision))
    x, h = torch.randn(5, 3, 9), [torch.randn(3, 20)]
    assert_same(run(ours, x, h), run(ref, x, h))
    assert ours.backend_choice.startswith("triton: asked for; 32x32x32, default warps, a launch a step: the fastest "
                                          "of 6 launch plans timed on first use with batch 3"), ours.backend_choice
    assert {s for s in seen} == {(p.tiles, p.warps or 4, p.persistent) for p in tuning.PLANS}
    assert launched[-2:] == [(32, 32, 32)] * 2  # the real forward and backward ran under the choice
    assert (prog.TILES, prog.NUM_WARPS, prog.PERSISTENT) == (None, 4, False)
    timed = len(seen)
    run(ours, x, h)
    assert len(seen) == timed  # chosen once for this batch


class _NanBetweenBlocks:
    """torch, except that a block-diagonal matrix has NaN where its zeros between blocks would be."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def block_diag(*blocks):
        inside = torch.block_diag(*(torch.ones_like(b, dtype=torch.bool) for b in blocks))
        return torch.block_diag(*blocks).masked_fill(~inside, float("nan"))


@pytest.mark.parametrize("D, tiles", [(16, (16, 16, 16)), (32, (16, 16, 16)), (32, (16, 32, 16))])
def test_per_head_products_read_only_their_blocks(D, tiles, monkeypatch):
    """Issue #17: a tile of one head's features multiplies only that head's block of each per-head
    weight, forward (W @ h, the four gates stacked) and backward (W^T @ g, a block from each gate).
    The zeros between the blocks are NaN here: read, they would reach the results through tl.dot
    (0 * NaN), as they did when every product ran over the whole dense matrix."""
    dims = dict(I=8, N=3, D=D)
    ref = specc.load("multihead_lstm", backend="numpy", **dims)
    ours = specc.load("multihead_lstm", backend="triton", **dims)
    ours.load_state_dict(ref.state_dict())
    monkeypatch.setattr(ours.program, "TILES", tiles)
    monkeypatch.setattr(ours.program, "torch", _NanBetweenBlocks())
    x, state = torch.randn(3, 5, 8), [torch.randn(5, 3 * D) for _ in range(2)]
    assert_same(run(ours, x, state), run(ref, x, state))


HEADS_GRU = """
cell heads_gru(I, N, D) {
    input x[I]
    state h[N*D] = zeros
    param W[3*N*D, I]
    param R_z[N, D, D]
    param R_r[N, D, D]
    param R_n[N, D, D]
    z_in, r_in, n_in = split(W @ x, 3)
    z = sigmoid(z_in + R_z @ h)
    r = sigmoid(r_in + R_r @ h)
    h' = (1 - z) * tanh(n_in + R_n @ (r * h)) + z * h
    output h'
}
"""


@pytest.mark.parametrize("cell, D", [("multihead_lstm", 5), ("multihead_lstm", 16), (HEADS_GRU, 6)])
def test_independent_heads_run_as_a_program_each(cell, D, monkeypatch):
    """Issue #17: where a loop's heads never read each other's features, the persistent kernel runs
    a program per (batch tile, head) that owns only that head's features, with no barrier across
    programs. The interpreter runs programs one after another, each through every step: a program
    that read another head's features would read them before that head's program wrote them. At
    D = 16 the zeros between blocks are NaN (_NanBetweenBlocks): each program reads only its block."""
    dims = dict(I=7, N=3, D=D)
    ref = specc.load(cell, backend="numpy", **dims)
    ours = specc.load(cell, backend="triton", **dims)
    ours.load_state_dict(ref.state_dict())
    prog = ours.program
    monkeypatch.setattr(prog, "PERSISTENT", True)
    if D == 16:
        monkeypatch.setattr(prog, "torch", _NanBetweenBlocks())
    launched = _record(monkeypatch, prog)
    x, state = torch.randn(3, 5, 7), [torch.randn(5, 3 * D) for _ in prog.STATES]
    assert_same(run(ours, x, state), run(ref, x, state))
    grids = [g for _, g in launched]
    assert len(grids) == 2 and all(grid == (1, 3) for grid in grids), grids


@pytest.mark.parametrize("extra", ["+ U @ h", "* mean(h)"])
def test_heads_that_read_each_other_share_a_program(extra):
    """A dense product or a mean over features mixes the heads: the
    persistent kernel keeps every feature in one program (heads = 1), and the numbers still match."""
    spec = f"""
    cell mixed(I, N, D) {{
        input x[I]
        state h[N*D] = zeros
        param W[N*D, I]
        param R[N, D, D]
        param U[N*D, N*D]
        h' = tanh(W @ x + R @ h {extra})
        output h'
    }}
    """
    ours = assert_text_spec_matches_numpy(spec, "triton", N=3, D=4, I=5)
    assert "heads = 1\n" in inspect.getsource(ours.program) and "heads = N" not in inspect.getsource(ours.program)


def test_compiled_module_holds_readable_kernels():
    source = specc.compile_spec("lstm").source
    kernel = source[source.index("def lstm_forward_step0"):source.index("def lstm_forward_steps")]
    # The spec's own lines, one fused loop over h for the four gate products, and a masked store of h'.
    assert "specs/lstm.rnn:16  c' = sigmoid(f) * c + sigmoid(i) * tanh(g)" in kernel
    assert kernel.count("for k0 in range(0, H, BLOCK_K):") == 1
    assert kernel.count(" dot(operand, weight, PRECISION)") == 4
    assert "tl.store(h_seq + ((t + 1) * B + offs_b)" in kernel


class StepLoop(torch.nn.Module):
    """A cell as a hand-written torch loop: `step(p, x_t, *states)` gives the next states, the
    first of which is the output. Its parameters carry the spec's names."""

    def __init__(self, step, shapes, scale=0.5):
        super().__init__()
        self.step = step
        for name, shape in shapes.items():
            setattr(self, name, torch.nn.Parameter(torch.randn(shape) * scale))

    def forward(self, x, state):
        states = list(state) if isinstance(state, tuple) else [state]
        outs = []
        for x_t in x:
            states = list(self.step(self, x_t, *states))
            outs.append(states[0])
        return torch.stack(outs), tuple(states) if len(states) > 1 else states[0]


def assert_matches_step_loop(spec, step, shapes, dims, T=4, B=2, tol=1e-5, fixed=None):
    """A cell written in the test through Triton against its torch loop, same random weights (but
    those `fixed`) and a random initial state that takes a gradient too; the module."""
    ref = StepLoop(step, shapes)
    with torch.no_grad():
        for name, value in (fixed or {}).items():
            getattr(ref, name).copy_(value)
    ours = specc.load(spec, backend="triton", **dims)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(T, B, dims["I"])
    state = [torch.randn(B, ours.sizes["states"][n][0]) for n in ours.program.STATES]
    assert_same(run(ours, x, state), run(ref, x, state), tol)
    return ours


def _products_cell(equation, params):
    decls = "\n".join(f"    param {name}[{shape}]" for name, shape in params)
    return f"cell t(I, H) {{\n    input x[I]\n    state h[H] = ones\n{decls}\n    {equation}\n    output h'\n}}\n"


# Products of one vector are stacked into one (2H or 3H wide), then sliced; the slices the
# backward pass reads are saved, and their rows are the stacked value's, not H apart.
STACKED_PRODUCTS = {
    "first_part_kept": ("h' = (A @ x) * h + C @ x", [("A", "H, I"), ("C", "H, I")],
                        lambda p, x, h: ((x @ p.A.T) * h + x @ p.C.T,)),
    "second_part_kept": ("h' = A @ x + (C @ x) * h", [("A", "H, I"), ("C", "H, I")],
                         lambda p, x, h: (x @ p.A.T + (x @ p.C.T) * h,)),
    "three_products": ("h' = (A @ x) * h + (C @ x) * tanh(h) + D @ x", [("A", "H, I"), ("C", "H, I"), ("D", "H, I")],
                       lambda p, x, h: ((x @ p.A.T) * h + (x @ p.C.T) * torch.tanh(h) + x @ p.D.T,)),
    "middle_of_three": ("h' = A @ x + (C @ x) * h + D @ x", [("A", "H, I"), ("C", "H, I"), ("D", "H, I")],
                        lambda p, x, h: (x @ p.A.T + (x @ p.C.T) * h + x @ p.D.T,)),
    "products_of_the_state": ("h' = tanh((U @ h) * (V @ h) + (A @ x) * (C @ x))",
                              [("A", "H, I"), ("C", "H, I"), ("U", "H, H"), ("V", "H, H")],
                              lambda p, x, h: (torch.tanh((h @ p.U.T) * (h @ p.V.T) + (x @ p.A.T) * (x @ p.C.T)),)),
}


@pytest.mark.parametrize("case", list(STACKED_PRODUCTS))
def test_slices_of_stacked_products_kept_for_backward(case):
    equation, params, step = STACKED_PRODUCTS[case]
    dims = {"I": 5, "H": 3}
    shapes = {name: tuple(dims[d.strip()] for d in shape.split(",")) for name, shape in params}
    assert_matches_step_loop(_products_cell(equation, params), step, shapes, dims)


MLSTM_SPEC = """
cell mlstm(I, H) {
    \"\"\"Multiplicative LSTM (Krause et al. 2016): the gates read m = (W_mx x) * (W_mh h), not h.\"\"\"
    input x[I]
    state h[H] = zeros
    state c[H] = zeros
    param W_mx[H, I]
    param W_mh[H, H]
    param W_x[4*H, I]
    param W_m[4*H, H]
    param b[4*H]
    m = (W_mx @ x) * (W_mh @ h)
    i, f, o, u = split(W_x @ x + W_m @ m + b, 4)
    c' = sigmoid(f) * c + sigmoid(i) * tanh(u)
    h' = sigmoid(o) * tanh(c')
    output h'
}
"""


def mlstm_step(p, x, h, c):
    m = (x @ p.W_mx.T) * (h @ p.W_mh.T)
    i, f, o, u = (x @ p.W_x.T + m @ p.W_m.T + p.b).chunk(4, dim=1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(u)
    return torch.sigmoid(o) * torch.tanh(c), c


def test_multiplicative_lstm_matches_a_torch_loop():
    """W_mx @ x is stacked with W_x @ x (5H wide); backward reads its slice, for the gradient of m."""
    I, H = 6, 7
    shapes = {"W_mx": (H, I), "W_mh": (H, H), "W_x": (4 * H, I), "W_m": (4 * H, H), "b": (4 * H,)}
    assert_matches_step_loop(MLSTM_SPEC, mlstm_step, shapes, {"I": I, "H": H}, T=5, B=3)


LN_LSTM_SPEC = """
cell lnlstm(I, H) {
    \"\"\"A layer-normalised LSTM, each gate's pre-activation normalised over its H features by the
    averaging matrix M (blocks of 1/H), the cell state by N (1/H).\"\"\"
    input x[I]
    state h[H] = zeros
    state c[H] = zeros
    param W[4*H, I]
    param U[4*H, H]
    param gain[4*H] = ones
    param b[4*H] = zeros
    param M[4*H, 4*H]
    param N[H, H]
    z = W @ x + U @ h
    d = z - M @ z
    zn = gain * d * exp(-0.5 * log(M @ (d * d) + 0.01)) + b
    i, f, g, o = split(zn, 4)
    c' = sigmoid(f) * c + sigmoid(i) * tanh(g)
    e = c' - N @ c'
    h' = sigmoid(o) * tanh(e * exp(-0.5 * log(N @ (e * e) + 0.01)))
    output h'
}
"""


def ln_lstm_step(p, x, h, c):
    def normalise(v, mean):  # v's deviation from its mean over its group, over the group's spread
        d = v - v @ mean.T
        return d * ((d * d) @ mean.T + 0.01) ** -0.5

    zn = p.gain * normalise(x @ p.W.T + h @ p.U.T, p.M) + p.b
    i, f, g, o = zn.chunk(4, dim=1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(normalise(c, p.N)), c


def test_layer_normalised_lstm_matches_a_torch_loop():
    """The gradient of zn joins the four gates' gradients (H features each), and the normalisation
    reads it whole, 4H features a tile: once refused as a tile straddling a concatenation."""
    from specc.backends import BACKENDS

    I, H = 5, 6
    shapes = {"W": (4 * H, I), "U": (4 * H, H), "gain": (4 * H,), "b": (4 * H,), "M": (4 * H, 4 * H), "N": (H, H)}
    averaging = {"M": torch.block_diag(*[torch.full((H, H), 1 / H)] * 4), "N": torch.full((H, H), 1 / H)}
    ours = assert_matches_step_loop(LN_LSTM_SPEC, ln_lstm_step, shapes, {"I": I, "H": H}, T=5, B=3,
                                    fixed=averaging)
    # backend="auto" runs CUDA tensors on Triton, which can run this cell: nothing stops it there.
    assert ours.program.TRITON_UNSUPPORTED is None
    assert BACKENDS["triton"].run().problem(ours.program, on_cuda=True) is None


def test_a_straddling_tile_left_unstaged_is_refused_naming_the_split(monkeypatch):
    """Should plan_loop ever miss such a tile, the refusal names what the spec wrote, the split,
    at its line (not the line of the value split)."""
    import specc.backends.triton as triton_backend

    monkeypatch.setattr(triton_backend, "_straddled", lambda *args: set())
    source = specc.compile_spec(LN_LSTM_SPEC).source
    line = LN_LSTM_SPEC.split("\n").index("    i, f, g, o = split(zn, 4)") + 1
    assert (f"TRITON_UNSUPPORTED = 'a tile straddles the parts of the gradient of a split, or of products stacked "
            f"into one (spec line {line})'") in source


def test_numbers_made_of_numbers_inside_the_recurrence():
    """-0.5 is neg(0.5), and 1 - 0.25 a difference of numbers: the host makes them Python floats,
    which the kernels (forward, and backward's copies of them) take as numbers, not as pointers. A
    scalar parameter, and what is made from it, stays a tensor."""
    spec = """
        cell t(I, H) {
            input x[I]
            state h[H] = zeros
            param A[H, I]
            param U[H, H]
            param s[]
            h' = tanh(-0.5 * (U @ h) + (1 - 0.25) * h * (A @ x) + (s * -2) * h)
            output h'
        }
    """

    def step(p, x, h):
        return (torch.tanh(-0.5 * (h @ p.U.T) + 0.75 * h * (x @ p.A.T) + (p.s * -2) * h),)

    assert_matches_step_loop(spec, step, {"A": (3, 5), "U": (3, 3), "s": ()}, {"I": 5, "H": 3})


def _halves_of_quarters_step(p, x, h):
    a, b, e, f = torch.tanh(h @ p.U.T).chunk(4, dim=1)
    first, second = torch.cat([a * b, e, f, b], dim=1).chunk(2, dim=1)
    return (torch.tanh((first * second) @ p.W.T + x @ p.A.T),)


def _joined_and_read_whole_step(p, x, h, g):
    z = torch.cat([x @ p.A.T + h @ p.U.T, torch.tanh(g @ p.V.T)], dim=1)
    return torch.tanh(z - z @ p.M.T).chunk(2, dim=1)


# Tiles of 2H features over concatenations of H-wide parts: in the forward pass (a concatenation
# split in halves), and in the backward pass (the gradient of a split, read whole).
STRADDLING = {
    "halves_of_quarters": ("""
        cell t(I, H) {
            input x[I]
            state h[H] = zeros
            param A[H, I]
            param U[4*H, H]
            param W[H, 2*H]
            a, b, e, f = split(tanh(U @ h), 4)
            p, q = split([a * b, e, f, b], 2)
            h' = tanh(W @ (p * q) + A @ x)
            output h'
        }
    """, _halves_of_quarters_step, lambda I, H: {"A": (H, I), "U": (4 * H, H), "W": (H, 2 * H)}),
    "joined_and_read_whole": ("""
        cell t(I, H) {
            input x[I]
            state h[H] = zeros
            state g[H] = zeros
            param A[H, I]
            param U[H, H]
            param V[H, H]
            param M[2*H, 2*H]
            z = [A @ x + U @ h, tanh(V @ g)]
            h', g' = split(tanh(z - M @ z), 2)
            output h'
        }
    """, _joined_and_read_whole_step, lambda I, H: {"A": (H, I), "U": (H, H), "V": (H, H), "M": (2 * H, 2 * H)}),
}


@pytest.mark.parametrize("case", list(STRADDLING))
def test_tiles_that_straddle_the_parts_of_a_concatenation(case):
    spec, step, shapes = STRADDLING[case]
    assert_matches_step_loop(spec, step, shapes(5, 6), {"I": 5, "H": 6}, T=4, B=3)


def test_contraction_with_a_factor_whose_size_is_a_product():
    """Feature j of x (x) e is x[j // K] e[j % K]; with K = 2*I the kernel once read x[(j // 2) * I]
    and e[(j % 2) * I], unparenthesised. e, a parameter, is broadcast over the batch first."""
    spec = """
        cell t(I, H) {
            input x[I]
            state h[H] = zeros
            param A[H, I]
            param e[2*I]
            param W[H, H, 2*I]
            h' = tanh(contract(W, h, e) + A @ x)
            output h'
        }
    """

    def step(p, x, h):
        return (torch.tanh(torch.einsum("ijk,bj,k->bi", p.W, h, p.e) + x @ p.A.T),)

    I, H = 3, 5
    assert_matches_step_loop(spec, step, {"A": (H, I), "e": (2 * I,), "W": (H, H, 2 * I)}, {"I": I, "H": H})


def test_tanh_and_softplus_of_small_values_keep_their_digits():
    """tanh(v) near 0 and softplus(v) far below 0 are small: the kernels once made them as
    2 * sigmoid(2v) - 1 and log(1 + exp(v)), whose rounding of the 1 left them up to 0.6% off."""
    spec = """
        cell t(I, H) {
            input x[I]
            state h[H] = zeros
            state g[H] = zeros
            param A[H, I]
            param U[H, H]
            param V[H, H]
            h' = tanh(U @ h + A @ x)
            g' = softplus(V @ g + A @ x - 12)
            output h'
        }
    """

    def step(p, x, h, g):
        return torch.tanh(h @ p.U.T + x @ p.A.T), torch.nn.functional.softplus(g @ p.V.T + x @ p.A.T - 12)

    I, H, T, B = 4, 5, 4, 3
    ref = StepLoop(step, {"A": (H, I), "U": (H, H), "V": (H, H)})
    ours = specc.load(spec, backend="triton", I=I, H=H)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(T, B, I) * 1e-5
    state = [torch.randn(B, H) * 1e-5, torch.randn(B, H) - 12]
    got, want = run(ours, x, state), run(ref, x, state)
    assert_same(got, want)
    for k in ("y", "final0", "final1"):  # relative to values of 1e-5 (and 6e-6): the error was 0.6% of them
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-12, msg=lambda m: f"{k}: {m}")
