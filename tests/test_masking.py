"""The masking transformation (specc/masking.py) on its own: the IR it makes, and a masked cell
against torch's packed sequences and against the unmasked cell."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import specc
from specc.check import check
from specc.lower import lower
from specc.masking import compile_masked, mask_cell, mask_graph
from specc.parse import parse
from specc.pipeline import read_spec
from specc.runtime import CellModule

F64 = torch.float64


def _cell(name, which=None):
    text, file = read_spec(name)
    cells = check(parse(text, file))
    return next(c for c in cells if which in (None, c.name)), text, file


def test_mask_inputs_one_per_width_and_the_blend_in_the_ir():
    cell, _, _ = _cell("lstm_proj")
    masked, names = mask_cell(cell)
    assert [d.name for d in masked.inputs] == ["x", "mask", "mask_1"]  # h is [P], c is [H]
    g = mask_graph(lower(masked), names)
    for state, _, nxt in g.carries:
        node = g.nodes[nxt]
        assert node.op == "add" and node.name == f"{state}_next_masked"
    for _, out in g.outputs:
        assert g.nodes[out].op == "mul"


def test_masked_lstm_matches_torch_packed_and_the_plain_cell():
    cell, text, file = _cell("lstm")
    prog = specc.program(compile_masked(cell, text, file))
    masked = CellModule(prog, dict(I=3, H=4), dtype=F64)
    plain = specc.load("lstm", I=3, H=4, dtype=F64)
    ref = nn.LSTM(3, 4, dtype=F64)
    with torch.no_grad():
        for ours in (masked, plain):
            ours.W_ih.copy_(ref.weight_ih_l0), ours.W_hh.copy_(ref.weight_hh_l0)
            ours.b_ih.copy_(ref.bias_ih_l0), ours.b_hh.copy_(ref.bias_hh_l0)
    T, B = 6, 4
    x = torch.randn(T, B, 3, dtype=F64)
    lengths = torch.tensor([6, 2, 4, 1])
    m = (torch.arange(T)[:, None] < lengths).to(F64)[:, :, None].expand(T, B, 4)
    out, (h, c) = masked((x, m))
    want, (h_ref, c_ref) = ref(pack_padded_sequence(x, lengths, enforce_sorted=False))
    torch.testing.assert_close(out, pad_packed_sequence(want, total_length=T)[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h, h_ref[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(c, c_ref[0], rtol=1e-12, atol=1e-12)
    # All ones: the plain cell, forward and backward.
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    a, _ = masked((xa, torch.ones(T, B, 4, dtype=F64)))
    b, _ = plain(xb)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    a.sum().backward()
    b.sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(masked.W_hh.grad, plain.W_hh.grad, rtol=1e-12, atol=1e-12)


def test_gradcheck_of_a_masked_cell():
    cell, text, file = _cell("gru")
    prog = specc.program(compile_masked(cell, text, file))
    module = CellModule(prog, dict(I=2, H=3), dtype=F64)
    T, B = 4, 3
    m = (torch.arange(T)[:, None] < torch.tensor([4, 1, 3])).to(F64)[:, :, None].expand(T, B, 3)
    x = torch.randn(T, B, 2, dtype=F64, requires_grad=True)
    h0 = torch.randn(B, 3, dtype=F64, requires_grad=True)

    def run(x, h0, W):
        out, h = torch.func.functional_call(module, {"W_hh": W}, ((x, m), h0))
        return out, h

    assert torch.autograd.gradcheck(run, (x, h0, module.W_hh.detach().clone().requires_grad_()))
