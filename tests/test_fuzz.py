"""Random cells on every backend against an independent reference (specc/fuzz).

The cells are drawn by hypothesis from every construct of the language (specc/fuzz/gen.py); the
reference evaluates the checked cell op by op in torch with autograd (specc/fuzz/reference.py),
sharing nothing with specc's IR, optimiser, autodiff, scheduler or code generators. A finding
shrinks to a small spec by itself. `python -m specc.fuzz --cells 10000` runs longer.
"""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings

from specc.fuzz import reference
from specc.fuzz.gen import cells
from specc.fuzz.run import differences

CELLS = int(os.environ.get("SPECC_FUZZ_CELLS", "300"))


@pytest.mark.parametrize("backend", ["numpy", "c", "triton"])
def test_random_cells_match_the_reference(backend):
    @settings(max_examples=CELLS, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(cells())
    def one(cell):
        found = differences(cell.text, cell.dims, (backend,))
        assert not found, "\n".join(map(str, found))

    one()


def test_the_reference_is_torch_nn_lstm_and_gru():
    """The reference evaluator, on the library's LSTM and GRU with torch.nn's weights, gives
    torch.nn's outputs and final states."""
    from specc.check import check
    from specc.parse import parse
    from specc.pipeline import read_spec

    T, B, I, H = 5, 3, 4, 6
    x = torch.randn(T, B, I, dtype=torch.float64)
    h0 = torch.randn(B, H, dtype=torch.float64)
    c0 = torch.randn(B, H, dtype=torch.float64)
    for name, layer in (("lstm", torch.nn.LSTM(I, H, dtype=torch.float64)),
                        ("gru", torch.nn.GRU(I, H, dtype=torch.float64))):
        cell = check(parse(*read_spec(name)))[0]
        params = {"W_ih": layer.weight_ih_l0, "W_hh": layer.weight_hh_l0,
                  "b_ih": layer.bias_ih_l0, "b_hh": layer.bias_hh_l0}
        states = {"h": h0, "c": c0} if name == "lstm" else {"h": h0}
        outs, finals = reference.run(cell, {"x": x}, states, {k: params[k] for k in (d.name for d in cell.params)})
        want, final = layer(x, (h0[None], c0[None]) if name == "lstm" else h0[None])
        torch.testing.assert_close(outs[cell.outputs[0][0]], want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(finals["h"], (final[0] if name == "lstm" else final)[0], rtol=1e-12, atol=1e-12)


TINY = """
cell tiny(I, H) {
    input x[I]
    state h[H]
    param W[H, I]
    param U[H, H]
    h' = tanh(W @ x + U @ h)
    output h'
}
"""


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_a_wrong_backend_is_caught(monkeypatch, where):
    """The comparison can fail: a backend whose outputs or gradients are off by one part in a
    million (far below what a person would notice) is reported, in float64."""
    from specc import runtime

    assert differences(TINY, {"I": 3, "H": 4}, ("numpy",)) == []
    original = getattr(runtime.NumpyBackend, where)

    def off(self, *args, **kw):
        result = original(self, *args, **kw)
        if where == "forward":
            outs, finals, saved = result
            return [o * (1 + 1e-6) for o in outs], finals, saved
        return [g * (1 + 1e-6) for g in result]

    monkeypatch.setattr(runtime.NumpyBackend, where, off)
    found = differences(TINY, {"I": 3, "H": 4}, ("numpy",), modes=["train"])
    kinds = {f.what.split()[0] for f in found}
    assert kinds == ({"output"} if where == "forward" else {"d"}), found
