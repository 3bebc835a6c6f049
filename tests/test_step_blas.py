"""The C loops' products: OpenBLAS, or the MKL inside torch's own library (a step's products from
a weight packed once a pass; those around the loop by its sgemm_) where the runtime measured it
faster. Either way the loops give torch.nn's numbers; which one runs is measured once per
machine and setting, kept on disk, and can be forced (SPECC_BLAS)."""
from __future__ import annotations

import pytest
import torch

import specc
from specc.backends import c_runtime
from helpers import assert_host_products_match_torch

needs_c = pytest.mark.skipif(c_runtime.problem() is not None, reason=str(c_runtime.problem()))
needs_mkl = pytest.mark.skipif(c_runtime.mkl() is None, reason="this torch exports no MKL (not x86-64 Linux)")

LAYERS = {"lstm": (torch.nn.LSTM, ("W_ih", "W_hh", "b_ih", "b_hh")),
          "gru": (torch.nn.GRU, ("W_ih", "W_hh", "b_ih", "b_hh"))}


def mkl_counts(lib) -> list[int]:
    """(weights packed by MKL, products around the loop made by MKL) so far in this library."""
    import ctypes

    return list((ctypes.c_long * 2).in_dll(lib, "specc_mkl_counts"))


def only_library():
    (lib,) = c_runtime._loaded.values()
    return lib


@pytest.fixture
def fresh_libraries(monkeypatch, tmp_path):
    """Libraries compiled and loaded anew, into a cache of the test's own."""
    monkeypatch.setenv("SPECC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(c_runtime, "_by_source", {})
    monkeypatch.setattr(c_runtime, "_loaded", {})


@needs_c
@needs_mkl
@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("split, threads", [("rows", "1"), ("rows", "2"), ("cols", "2"), ("cols", "3")])
def test_mkls_packed_products_give_torchs_numbers(monkeypatch, fresh_libraries, cell, split, threads):
    """H = 256, a batch of 16: a thread's product a step is ~1-4 M multiply-adds, mostly above
    SP_PACK_MIN_MACS, so the products read weights MKL packed (all of a weight for a thread's rows,
    or its columns: 3 threads split 1024 columns into 336, 336 and 352; the GRU's backward 256
    columns into 80, 80 and 96, of which the 80s stay OpenBLAS's); outputs and gradients are
    torch.nn's, and MKL did pack."""
    monkeypatch.setattr(c_runtime, "blas_choice", lambda: c_runtime.BlasChoice("mkl", "mkl"))
    monkeypatch.setenv("SPECC_LOOP_THREADS", threads)
    monkeypatch.setenv("SPECC_LOOP_SPLIT", split)
    torch.manual_seed(1)
    I, H, T, B = 24, 256, c_runtime.PACK_MIN_STEPS + 1, 16
    m = specc.load(cell, I=I, H=H, backend="c")
    layer, names = LAYERS[cell]
    ref = layer(I, H)
    with torch.no_grad():
        for mine, theirs in zip(names, ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")):
            getattr(ref, theirs).copy_(getattr(m, mine))
    x = torch.randn(T, B, I, requires_grad=True)
    y, y_ref = m(x)[0], ref(x)[0]
    assert only_library().specc_mkl and mkl_counts(only_library())[0] > 0
    assert m.backend_choice.startswith("c: ") and "; a step's products MKL (torch's)" in m.backend_choice
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-4)
    mine = torch.autograd.grad((y * y).sum(), [x, m.W_hh, m.W_ih])
    theirs = torch.autograd.grad((y_ref * y_ref).sum(), [x, ref.weight_hh_l0, ref.weight_ih_l0])
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@needs_c
@needs_mkl
@pytest.mark.parametrize("choice, T", [("openblas", 12), ("mkl", c_runtime.PACK_MIN_STEPS - 1)])
def test_a_short_sequence_or_openblas_packs_nothing(monkeypatch, fresh_libraries, choice, T):
    """OpenBLAS chosen, or fewer than PACK_MIN_STEPS steps: nothing packed, torch.nn's numbers."""
    monkeypatch.setattr(c_runtime, "blas_choice", lambda: c_runtime.BlasChoice(choice, "openblas"))
    torch.manual_seed(2)
    m = specc.load("lstm", I=8, H=256, backend="c")
    ref = torch.nn.LSTM(8, 256)
    with torch.no_grad():
        for mine, theirs in zip(LAYERS["lstm"][1], ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")):
            getattr(ref, theirs).copy_(getattr(m, mine))
    x = torch.randn(T, 16, 8, requires_grad=True)
    y, y_ref = m(x)[0], ref(x)[0]
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.autograd.grad(y.sum(), x)[0], torch.autograd.grad(y_ref.sum(), x)[0],
                               atol=1e-4, rtol=1e-4)
    assert only_library().specc_mkl == (choice == "mkl") and mkl_counts(only_library()) == [0, 0]


@needs_c
@needs_mkl
def test_products_around_the_loop_by_mkl_match_torch(monkeypatch, fresh_libraries):
    """specc_matmul by MKL's sgemm_ (Fortran's column-major convention) for each of CBLAS's
    layouts, split by rows or by columns among threads."""
    monkeypatch.setattr(c_runtime, "blas_choice", lambda: c_runtime.BlasChoice("openblas", "mkl"))
    specc.load("lstm", I=3, H=4, backend="c")(torch.randn(2, 1, 3))  # a compiled library to call
    c_lib = next(iter(c_runtime._loaded.values()))
    assert not c_lib.specc_mkl  # a step's products stay OpenBLAS's
    before = mkl_counts(c_lib)
    assert_host_products_match_torch(monkeypatch, c_lib)
    assert mkl_counts(c_lib)[1] > before[1] and mkl_counts(c_lib)[0] == before[0]


def pair(choice) -> tuple[str, str]:
    return choice.steps, choice.host


def test_the_choice_is_measured_once_kept_and_can_be_forced(monkeypatch, tmp_path):
    monkeypatch.setenv("SPECC_CACHE", str(tmp_path))
    monkeypatch.delenv("SPECC_BLAS", raising=False)

    class FakeMKL:
        def MKL_Set_Num_Threads_Local(self, n):
            return 0

    monkeypatch.setattr(c_runtime, "mkl", lambda: (FakeMKL(), (0, 0, 0, 0, 0)))
    timed = []

    def seconds(which, shapes, step):  # MKL faster for a step's products, not for the host's
        timed.append((which, step))
        return {("mkl", True): 0.5, ("openblas", True): 1.0, ("mkl", False): 1.0, ("openblas", False): 0.9}[which, step]

    monkeypatch.setattr(c_runtime, "_seconds", seconds)
    choice = c_runtime.blas_choice
    choice.cache_clear()
    try:
        assert pair(choice()) == ("mkl", "openblas") and len(set(timed)) == 4
        assert choice().why == "measured on this machine"
        choice.cache_clear()
        timed.clear()
        assert pair(choice()) == ("mkl", "openblas") and timed == []  # kept on disk
        assert choice().why == "measured on this machine earlier"
        kept = list((tmp_path / "c" / "choices").glob("blas-*.txt"))
        assert len(kept) == 1 and kept[0].read_text().startswith("mkl openblas\n")
        # Another setting of the libraries is another choice, timed again: MKL 3 % faster is not enough.
        monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", "AVX2")
        monkeypatch.setattr(c_runtime, "_seconds", lambda which, shapes, step: 0.97 if which == "mkl" else 1.0)
        choice.cache_clear()
        assert pair(choice()) == ("openblas", "openblas")
        for forced, expected in (("openblas", "openblas"), ("MKL", "mkl")):
            monkeypatch.setenv("SPECC_BLAS", forced)
            choice.cache_clear()
            assert pair(choice()) == (expected, expected) and choice().why == "SPECC_BLAS"
        monkeypatch.setattr(c_runtime, "mkl", lambda: None)  # no MKL in this torch: OpenBLAS, whatever is asked
        choice.cache_clear()
        assert pair(choice()) == ("openblas", "openblas") and choice().why == "no usable MKL in this torch"
    finally:
        choice.cache_clear()


@needs_mkl
def test_each_timed_product_computes_the_product():
    """What blas_choice() times is the product it stands for, by each library and kind."""
    import numpy as np

    for which in ("openblas", "mkl"):
        for step in (True, False):
            once, (a, w, o, *_) = c_runtime._product(which, 5, 7, 19, step)
            once()
            np.testing.assert_allclose(o, a @ w, rtol=1e-5, atol=1e-5)


@needs_mkl
def test_an_mkl_that_computes_wrongly_is_not_used(monkeypatch):
    """mkl() checks one product of each kind against NumPy before any loop may call MKL: an MKL
    reading our arguments otherwise (64-bit integers) must give OpenBLAS, not wrong numbers."""
    real = c_runtime._product

    def doubled(which, M, K, N, step, lib=None):
        once, arrays = real(which, M, K, N, step, lib)
        return (lambda: (once(), arrays[2].__imul__(2))), arrays

    monkeypatch.setattr(c_runtime, "_product", doubled)
    c_runtime.mkl.cache_clear()
    try:
        assert c_runtime.mkl() is None
    finally:
        monkeypatch.undo()
        c_runtime.mkl.cache_clear()
    assert c_runtime.mkl() is not None
