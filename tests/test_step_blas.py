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
    """H = 256, a batch of 16: each thread's product a step is 1-4 M multiply-adds, above
    SP_PACK_MIN_MACS, so every product of both passes reads a weight MKL packed (all of it for a
    thread's rows, or a thread's columns: 3 threads split 1024 columns into blocks of 336, 336 and
    352, and 768 into 256 each); outputs and gradients are torch.nn's."""
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
    assert [getattr(lib, "specc_mkl", False) for lib in c_runtime._loaded.values()] == [True]
    assert m.backend_choice.startswith("c: ") and "; a step's products MKL (torch's)" in m.backend_choice
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-4)
    mine = torch.autograd.grad((y * y).sum(), [x, m.W_hh, m.W_ih])
    theirs = torch.autograd.grad((y_ref * y_ref).sum(), [x, ref.weight_hh_l0, ref.weight_ih_l0])
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@needs_c
@needs_mkl
def test_a_short_sequence_or_openblas_packs_nothing(monkeypatch, fresh_libraries):
    """Fewer than PACK_MIN_STEPS steps, or OpenBLAS chosen: the same numbers, by OpenBLAS."""
    monkeypatch.setattr(c_runtime, "blas_choice", lambda: c_runtime.BlasChoice("openblas", "openblas"))
    torch.manual_seed(2)
    m = specc.load("lstm", I=8, H=256, backend="c")
    x = torch.randn(3, 16, 8)
    with torch.no_grad():
        y_openblas = m(x)[0]
    assert [getattr(lib, "specc_mkl", False) for lib in c_runtime._loaded.values()] == [False]
    monkeypatch.setattr(c_runtime, "blas_choice", lambda: c_runtime.BlasChoice("mkl", "mkl"))
    monkeypatch.setattr(c_runtime, "_by_source", {})
    monkeypatch.setattr(c_runtime, "_loaded", {})
    m2 = specc.load("lstm", I=8, H=256, backend="c")
    m2.load_state_dict(m.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(m2(x)[0], y_openblas, atol=1e-5, rtol=1e-5)


@needs_c
@needs_mkl
def test_products_around_the_loop_by_mkl_match_torch(monkeypatch, fresh_libraries):
    """specc_matmul by MKL's sgemm_ (Fortran's column-major convention) for each of CBLAS's
    layouts, split by rows or by columns among threads."""
    monkeypatch.setattr(c_runtime, "blas_choice", lambda: c_runtime.BlasChoice("openblas", "mkl"))
    specc.load("lstm", I=3, H=4, backend="c")(torch.randn(2, 1, 3))  # a compiled library to call
    c_lib = next(iter(c_runtime._loaded.values()))
    assert not c_lib.specc_mkl  # a step's products stay OpenBLAS's
    assert_host_products_match_torch(monkeypatch, c_lib)


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
        assert choice() == c_runtime.BlasChoice("mkl", "openblas") and len(set(timed)) == 4
        choice.cache_clear()
        timed.clear()
        assert choice() == c_runtime.BlasChoice("mkl", "openblas") and timed == []  # kept on disk
        kept = list((tmp_path / "c" / "choices").glob("blas-*.txt"))
        assert len(kept) == 1 and kept[0].read_text().startswith("mkl openblas\n")
        # Another setting of the libraries is another choice, timed again: MKL 3 % faster is not enough.
        monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", "AVX2")
        monkeypatch.setattr(c_runtime, "_seconds", lambda which, shapes, step: 0.97 if which == "mkl" else 1.0)
        choice.cache_clear()
        assert choice() == c_runtime.BlasChoice("openblas", "openblas")
        for forced, expected in (("openblas", "openblas"), ("MKL", "mkl")):
            monkeypatch.setenv("SPECC_BLAS", forced)
            choice.cache_clear()
            assert choice() == c_runtime.BlasChoice(expected, expected)
        monkeypatch.setattr(c_runtime, "mkl", lambda: None)  # no MKL in this torch: OpenBLAS, whatever is asked
        choice.cache_clear()
        assert choice() == c_runtime.BlasChoice("openblas", "openblas")
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
