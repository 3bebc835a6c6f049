"""The Triton backend compiled for a real GPU (no interpreter), against CPU references.

These run only where torch sees a CUDA device: CI has none, so there they are skipped, and the
same kernels are tested on CPU tensors by Triton's interpreter in test_triton.py. On a GPU
machine run them with `python -m pytest -q tests/test_triton_gpu.py`; bench/results/ records
the last such run.

The references run on the CPU: the NumPy backend, torch.nn with copied weights, and the
hand-written torch loops of test_references. Sizes are not powers of two and span several tiles
of examples, features and the reduction (tiles() takes 16 x 16 x 32 tiles up to 64 examples,
32 x 32 x 32 above, for float32 products); with six steps of 19 examples float32's rounding differs from the CPU's by a
few 1e-5, hence tol 5e-5.
"""
from __future__ import annotations

import pytest
import torch

import specc
from helpers import (TORCH_LAYERS, TorchLayer, assert_matches_references, assert_same,
                         assert_softmax_in_the_recurrence, assert_spec_matches_numpy, run)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none)")


@pytest.fixture(autouse=True)
def compiled_kernels(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    # torch's own GPU products would use TF32 where allowed; the references are float32.
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


def test_every_spec_matches_the_numpy_backend(spec_cell):
    assert_spec_matches_numpy(spec_cell, "triton", B=19, device="cuda", T=6, tol=5e-5)


def test_every_spec_with_the_time_loop_in_one_kernel(spec_cell, monkeypatch):
    """PERSISTENT: one kernel a pass, each program looping over the steps, ordered by
    tl.debug_barrier among its threads (the interpreter cannot test that barrier). A cell wider
    than PERSISTENT_FEATURES (second_order's H * I) runs its step kernels."""
    from helpers import odd_dims

    prog = specc.load(spec_cell.path, spec_cell.cell, backend="triton", **odd_dims(spec_cell.dims)).program
    monkeypatch.setattr(prog, "PERSISTENT", True)
    assert_spec_matches_numpy(spec_cell, "triton", B=19, device="cuda", T=6, tol=5e-5)


@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_rows_in_slices_with_a_barrier_across_the_grid(name, monkeypatch):
    """Issue #17: a row wider than PERSISTENT_FEATURES (32 here) in slices, a program each (four
    slices of 100 features, two batch tiles: eight programs, resident at once), with a barrier
    across the grid after each stage of a step; against torch.nn on the CPU."""
    make, _ = TORCH_LAYERS[name]
    ref = make(37, 100)
    ours = specc.from_torch(ref, backend="triton").cuda()
    prog = ours.program
    monkeypatch.setattr(prog, "PERSISTENT", True)
    monkeypatch.setattr(prog, "PERSISTENT_FEATURES", 32)
    x = torch.randn(30, 19, 37)
    state = [torch.randn(19, 100) * 0.5 for _ in prog.STATES]
    assert_same(run(ours, x, state, device="cuda"), run(TorchLayer(ref), x, state), tol=5e-5)


@pytest.mark.parametrize("D", [16, 48])
def test_independent_heads_each_a_program(D, monkeypatch):
    """Issue #17: the persistent kernel of a multi-head LSTM runs a program per (batch tile, head),
    concurrently and with no barrier across them; the heads never read each other's features, so
    the numbers match (a wrong choice races, which the interpreter's one-program-at-a-time cannot)."""
    dims = dict(I=40, N=12, D=D)
    ref = specc.load("multihead_lstm", backend="numpy", **dims)
    ours = specc.load("multihead_lstm", backend="triton", **dims)
    ours.load_state_dict(ref.state_dict())
    monkeypatch.setattr(ours.program, "PERSISTENT", True)
    ours.cuda()
    x, state = torch.randn(20, 19, 40), [torch.randn(19, 12 * D) * 0.5 for _ in range(2)]
    assert_same(run(ours, x, state, device="cuda"), run(ref, x, state), tol=5e-5)


@pytest.mark.parametrize("name", list(TORCH_LAYERS))
@pytest.mark.parametrize("I, H, B", [(37, 100, 70), (300, 67, 5)])
def test_matches_torch_nn_on_the_cpu(name, I, H, B):
    make, _ = TORCH_LAYERS[name]
    ref = make(I, H)
    ours = specc.from_torch(ref, backend="triton").cuda()
    T = 7
    x = torch.randn(T, B, I)
    state = [torch.randn(B, H) * 0.5 for _ in ours.program.STATES]
    assert_same(run(ours, x, state, device="cuda"), run(TorchLayer(ref), x, state), tol=2e-5)


def test_auto_picks_triton_for_cuda_tensors():
    ref = torch.nn.GRU(24, 40)
    ours = specc.from_torch(ref).cuda()  # backend="auto"
    x = torch.randn(5, 9, 24)
    y, h = ours(x.cuda())
    want, h_want = ref(x)
    torch.testing.assert_close(y.cpu(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.cpu(), h_want[0], rtol=1e-5, atol=1e-5)


def test_custom_cells_match_hand_written_references():
    assert_matches_references("triton", device="cuda", B=21, tol=5e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_accumulate_in_float32(dtype):
    ref = specc.load("lstm", I=20, H=24)
    module = specc.load("lstm", I=20, H=24, backend="triton")
    module.load_state_dict(ref.state_dict())
    module.cuda()
    x = torch.randn(4, 3, 20)
    y, (h, c) = module(x.to(dtype).cuda())
    assert y.dtype == dtype and h.dtype == dtype
    want, _ = ref(x.to(dtype).float())
    torch.testing.assert_close(y.float().cpu(), want, rtol=0, atol=1e-2)
    y.float().sum().backward()
    assert module.W_hh.grad.dtype == torch.float32 and torch.isfinite(module.W_hh.grad).all()


def test_runs_under_autocast():
    module = specc.load("gru", I=12, H=10, backend="triton").cuda()
    head = torch.nn.Linear(10, 3).cuda()
    x = torch.randn(5, 2, 12, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y, _ = module(torch.nn.functional.linear(x, torch.eye(12, device="cuda")))  # bfloat16 under autocast
        loss = head(y).float().square().mean()
    loss.backward()
    assert module.W_ih.grad is not None and torch.isfinite(module.W_ih.grad).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("how", ["autocast", "module"])
def test_half_precision_products(dtype, how):
    """Issue #17: under autocast, or for a module in half precision, the step's products take
    half-precision factors and float32 sums; states stay float32. Against the LSTM loop whose
    recurrent product rounds h and W_hh so (test_triton's _lstm_loop), on the CPU; the bfloat16
    path only here (Triton's interpreter multiplies bfloat16 wrongly)."""
    from test_triton import _lstm_loop

    module = specc.load("lstm", I=40, H=72, backend="triton").cuda()
    if how == "module":
        module = module.to(dtype)
    p = {n: t.detach().float().cpu() for n, t in module.named_parameters()}
    x, h0, c0 = torch.randn(8, 5, 40).to(dtype).float(), torch.randn(5, 72), torch.randn(5, 72)
    with torch.autocast("cuda", dtype=dtype, enabled=how == "autocast"):
        y, (h, c) = module(x.cuda(), (h0.cuda(), c0.cuda()))
    assert module.backend_choice.endswith(f"{str(dtype).removeprefix('torch.')} products")
    want, _, _ = _lstm_loop(x, h0, c0, p, lambda t: t.to(dtype).float())
    # Under autocast torch's own products around the loop (W_ih @ x) round their results to `dtype`
    # too, as they do for torch.nn.LSTM: only near the loop's numbers.
    tol = 3e-2 if how == "autocast" else 1e-4
    torch.testing.assert_close(y.float().cpu(), want, rtol=tol, atol=tol)
    y.float().sum().backward()
    assert torch.isfinite(module.W_hh.grad).all()


def test_a_long_sequence_of_a_large_batch():
    """Offsets past one tile in every direction, and many launches: T * B * H = 1.3M values."""
    ref = torch.nn.LSTM(128, 160)
    ours = specc.from_torch(ref, backend="triton").cuda()
    x = torch.randn(50, 161, 128)
    y, (h, c) = ours(x.cuda())
    want, (h_want, c_want) = ref(x)
    torch.testing.assert_close(y.cpu(), want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(c.cpu(), c_want[0], rtol=1e-4, atol=1e-5)


def test_tf32_products_where_torch_allows_them():
    """Under torch.set_float32_matmul_precision("high") the step's products use TF32 tensor cores:
    about three decimal digits, as torch's own matmuls then."""
    ref = torch.nn.LSTM(64, 96)
    ours = specc.from_torch(ref, backend="triton").cuda()
    x = torch.randn(10, 100, 64)
    want, _ = ref(x)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        assert ours.program.dot_precision(torch.device("cuda")) == "tf32"
        y, _ = ours(x.cuda())
    finally:
        torch.set_float32_matmul_precision(before)
    torch.testing.assert_close(y.cpu(), want, rtol=0, atol=5e-3)


def test_softmax_inside_the_recurrence():
    assert_softmax_in_the_recurrence("triton", device="cuda", tol=5e-5)


def test_tensors_past_two_to_the_31_elements(monkeypatch):
    """h_seq of (T + 1) * B * H > 2**31 floats (8.6 GB): int32 offsets would wrap around and
    write over other rows. The last steps against torch's RNN on the same GPU (cuDNN, float32)."""
    T, B, H = 1025, 1024, 2048
    ref = torch.nn.RNN(16, H).cuda()
    ours = specc.from_torch(ref, backend="triton").cuda()
    monkeypatch.setattr(ours.program, "CHUNK_ROWS", 10 ** 12)  # one pass, not chunks far below 2**31 each
    x = torch.randn(T, B, 16, device="cuda")
    with torch.no_grad(), torch.backends.cudnn.flags(allow_tf32=False):
        y, h = ours(x)
        assert (T + 1) * B * H > 2 ** 31
        want, h_want = ref(x)
        torch.testing.assert_close(y[-2:], want[-2:], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(h, h_want[0], rtol=1e-4, atol=1e-4)
