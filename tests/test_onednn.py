"""The NumPy backend's products through oneDNN (numpy_runtime.operand / matmul_for).

Only large float32 matrices take that path, and the other tests use small ones, so here the size
thresholds are lowered to 0 and every float32 product of a pass goes through oneDNN or torch.mm.
The references are the same as elsewhere: torch.nn layers and hand-written torch loops (which do
not call specc), and plain float64 products for the runtime's own functions.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import specc
from specc.backends import numpy_runtime as rt
from test_references import CASES, compare_with_reference
import test_torch_equivalence as equivalence
from test_torch_equivalence import CELLS, _copy_to_torch

F32 = torch.float32

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(),
                                reason="this torch build has no oneDNN (the NumPy path is then the only one)")


@pytest.fixture
def everything_packed(monkeypatch):
    """Every float32 product through oneDNN or torch, whatever its size; on the NumPy backend,
    which backend "auto" leaves for the C loops where a compiler is."""
    monkeypatch.setenv("SPECC_C", "0")
    monkeypatch.setattr(rt, "PACK_MIN_ENTRIES", 0)
    monkeypatch.setattr(rt, "PACK_MIN_ROWS", 1)
    monkeypatch.setattr(rt, "ONE_THREAD_PRODUCT", 0)
    monkeypatch.delenv("SPECC_ONEDNN", raising=False)
    monkeypatch.setattr(rt, "_ONEDNN", None)
    assert rt._onednn(), "torch has oneDNN, but its linear op failed the probe"
    yield


def _f64_product(a, b):
    return a.astype(np.float64) @ b.astype(np.float64)


@pytest.mark.parametrize("rows, k, n", [(5, 7, 9), (64, 33, 100), (1, 16, 3)])
def test_operand_products_match_float64(rows, k, n, everything_packed):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((n, k)).astype(np.float32)
    op = rt.operand(w.T, rows)
    assert isinstance(op, rt.Packed)
    mm = rt.matmul_for(op)
    assert mm is rt.torch_matmul
    a = rng.standard_normal((rows, k)).astype(np.float32)
    want = _f64_product(a, w.T)
    np.testing.assert_allclose(mm(a, op), want, rtol=1e-5, atol=1e-5)
    out = np.full((rows, n), np.nan, dtype=np.float32)
    assert mm(a, op, out) is out
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    # Rows oneDNN does not take (strided, read-only, float64) still get the right product.
    wide = rng.standard_normal((rows, 2 * k)).astype(np.float32)
    np.testing.assert_allclose(mm(wide[:, ::2], op), _f64_product(wide[:, ::2], w.T), rtol=1e-5, atol=1e-5)
    frozen = a.copy()
    frozen.flags.writeable = False
    np.testing.assert_allclose(mm(frozen, op), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mm(a.astype(np.float64), op), want, rtol=1e-5, atol=1e-5)


def test_torch_matmul_plain_operands(everything_packed):
    rng = np.random.default_rng(2)
    g, h = rng.standard_normal((40, 12)).astype(np.float32), rng.standard_normal((40, 6)).astype(np.float32)
    # A transposed view, as the sums over time make them.
    np.testing.assert_allclose(rt.torch_matmul(g.T, h), _f64_product(g.T, h), rtol=1e-5, atol=1e-5)
    out = np.zeros((12, 6), np.float32)
    assert rt.torch_matmul(g.T, h, out) is out
    np.testing.assert_allclose(out, _f64_product(g.T, h), rtol=1e-5, atol=1e-5)


def test_small_or_float64_matrices_stay_numpy():
    w32 = np.ones((8, 8), np.float32)
    assert isinstance(rt.operand(w32, 64), np.ndarray)  # below PACK_MIN_ENTRIES
    assert isinstance(rt.operand(np.ones((1024, 1024)), 64), np.ndarray)  # float64
    big = np.broadcast_to(np.float32(1), (rt.PACK_MAX_ENTRIES // 64 + 1, 64))  # no memory behind it
    assert isinstance(rt.operand(big, 64), np.ndarray)  # a packed copy would double its memory
    assert rt.matmul_for(rt.operand(w32, 64)) is np.matmul


def test_switched_off_by_environment(monkeypatch):
    monkeypatch.setenv("SPECC_ONEDNN", "0")
    monkeypatch.setattr(rt, "_ONEDNN", None)
    monkeypatch.setattr(rt, "PACK_MIN_ENTRIES", 0)
    assert not rt._onednn()
    assert isinstance(rt.operand(np.ones((600, 600), np.float32), 64), np.ndarray)


@pytest.mark.parametrize("name", list(CELLS))
def test_torch_cells_through_onednn_match_torch(name, everything_packed, close):
    """The torch-equivalence test itself (outputs, final states, every gradient, float32 1e-5),
    with every product through oneDNN; and the inference pass (two state blocks in turn)."""
    equivalence.test_cell_matches_torch_layer(name, (37, 100, 9, 6), F32, close)
    (spec, cell), make, n_states = CELLS[name]
    sp = specc.load(spec, cell, I=37, H=100, dtype=F32)
    assert sp._backend_for([torch.zeros(1)], F32)[0].name == "numpy"
    ref = make(37, 100)
    _copy_to_torch(sp, ref)
    x = torch.randn(9, 6, 37)
    with torch.no_grad():
        out, _ = sp(x)
        ref_out, _ = ref(x)
    close(out, ref_out, F32, "outputs under no_grad")


@pytest.mark.parametrize("name", list(CASES))
def test_custom_cells_through_onednn_match_reference(name, everything_packed, close):
    dims = {d: v * 3 for d, v in CASES[name][1].items()}
    # float32 sums of a few hundred terms, in different orders
    compare_with_reference(name, dims, 7, 5, F32, close, tol=1e-4, scale=0.3)


def test_generated_code_names_the_choice():
    """The pass picks its products' library once, where a reader sees it."""
    text = specc.load("lstm", I=3, H=4).program.__specc_source__
    assert "matmul = rt.matmul_for(W_hh_T" in text
    assert "rt.operand(W_hh.T, B)" in text
