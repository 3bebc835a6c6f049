"""specc.from_torch for stacked, bidirectional and projected torch layers: the copy computes what
torch computes (padded and packed batches), and gives the same gradients."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import specc
from specc.network import Recurrent

F64 = torch.float64


@pytest.mark.parametrize("make", [
    lambda: nn.LSTM(3, 5, num_layers=2, bidirectional=True, proj_size=2, dtype=F64),
    lambda: nn.LSTM(3, 4, proj_size=3, dtype=F64),
    lambda: nn.GRU(3, 4, num_layers=3, batch_first=True, dtype=F64),
    lambda: nn.RNN(3, 4, num_layers=2, bidirectional=True, nonlinearity="relu", dtype=F64),
], ids=["lstm-proj-stacked-bidir", "lstm-proj", "gru-stacked-batch-first", "rnn-relu-bidir"])
def test_from_torch_stacked_bidirectional_and_projected(make):
    ref = make()
    ours = specc.from_torch(ref)
    assert isinstance(ours, Recurrent)
    B, T = 5, 4
    shape = (B, T, 3) if ref.batch_first else (T, B, 3)
    x = torch.randn(*shape, dtype=F64)
    lengths = torch.tensor([4, 1, 3, 2, 4])
    for packed in (False, True):
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        if packed:
            ia = pack_padded_sequence(xa, lengths, batch_first=ref.batch_first, enforce_sorted=False)
            ib = pack_padded_sequence(xb, lengths, batch_first=ref.batch_first, enforce_sorted=False)
        else:
            ia, ib = xa, xb
        out_a, fin_a = ref(ia)
        out_b, fin_b = ours(ib)
        data_a, data_b = (out_a.data, out_b.data) if packed else (out_a, out_b)
        torch.testing.assert_close(data_b, data_a, rtol=1e-10, atol=1e-10)
        fin_a = fin_a if isinstance(fin_a, tuple) else (fin_a,)
        fin_b = fin_b if isinstance(fin_b, tuple) else (fin_b,)
        for a, b in zip(fin_a, fin_b, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)
        w = torch.randn_like(data_a)
        ga = torch.autograd.grad((data_a * w).sum() + sum(f.sum() for f in fin_a), [xa, *ref.parameters()])
        gb = torch.autograd.grad((data_b * w).sum() + sum(f.sum() for f in fin_b), [xb, *ours.parameters()])
        # Our parameters come layer by layer, direction by direction, in torch's own order.
        assert len(ga) == len(gb)
        got = dict(zip(["x"] + [n for n, _ in ours.named_parameters()], gb))
        for (name, _), g in zip(ref.named_parameters(), ga[1:]):
            kind, layer = name.rsplit("_l", 1)
            key = "cells.l" + layer + "." + {"weight_ih": "W_ih", "weight_hh": "W_hh", "bias_ih": "b_ih",
                                             "bias_hh": "b_hh", "weight_hr": "W_hr"}[kind]
            torch.testing.assert_close(got[key], g, rtol=1e-9, atol=1e-10, msg=name)
        torch.testing.assert_close(got["x"], ga[0], rtol=1e-9, atol=1e-10)


def test_a_stacked_copy_saves_and_loads_with_state_dict():
    ref = nn.LSTM(3, 4, num_layers=2, bidirectional=True)
    a, b = specc.from_torch(ref), specc.from_torch(nn.LSTM(3, 4, num_layers=2, bidirectional=True))
    x = torch.randn(5, 2, 3)
    assert not torch.equal(a(x)[0], b(x)[0])
    b.load_state_dict(a.state_dict())
    assert torch.equal(a(x)[0], b(x)[0])


@pytest.mark.parametrize("make", [
    lambda: nn.LSTM(3, 4, num_layers=2, bidirectional=True, dtype=F64),
    lambda: nn.GRU(3, 4, num_layers=2, batch_first=True, dtype=F64),
], ids=["lstm-stacked-bidir", "gru-stacked-batch-first"])
def test_unbatched_sequence_as_torch_takes_it(make):
    """One (T, features) sequence, and (num_layers * num_directions, n) states: torch's unbatched
    convention (batch_first does not apply)."""
    ref = make()
    ours = specc.from_torch(ref)
    T, n = 6, ref.num_layers * (2 if ref.bidirectional else 1)
    x = torch.randn(T, 3, dtype=F64)
    states = [torch.randn(n, 4, dtype=F64) for _ in range(2 if isinstance(ref, nn.LSTM) else 1)]
    hx = tuple(states) if len(states) == 2 else states[0]
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_a, fin_a = ref(xa, hx)
    out_b, fin_b = ours(xb, hx)
    assert out_b.shape == out_a.shape == (T, (2 if ref.bidirectional else 1) * 4)
    torch.testing.assert_close(out_b, out_a, rtol=1e-10, atol=1e-10)
    fin_a = fin_a if isinstance(fin_a, tuple) else (fin_a,)
    fin_b = fin_b if isinstance(fin_b, tuple) else (fin_b,)
    for a, b in zip(fin_a, fin_b, strict=True):
        assert b.shape == a.shape == (n, 4)
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)
    w = torch.randn_like(out_a)
    (ga,) = torch.autograd.grad((out_a * w).sum() + sum(f.sum() for f in fin_a), [xa])
    (gb,) = torch.autograd.grad((out_b * w).sum() + sum(f.sum() for f in fin_b), [xb])
    torch.testing.assert_close(gb, ga, rtol=1e-9, atol=1e-10)
    # No state given: zeros, as torch.
    torch.testing.assert_close(ours(x)[0], ref(x)[0], rtol=1e-10, atol=1e-10)


def test_unbatched_sequence_rejects_lengths_and_batched_states():
    ours = specc.from_torch(nn.GRU(3, 4, num_layers=2, dtype=F64))
    assert isinstance(ours, Recurrent)
    x = torch.randn(5, 3, dtype=F64)
    with pytest.raises(ValueError, match="unbatched"):
        ours(x, lengths=torch.tensor([5]))
    with pytest.raises(ValueError, match="unbatched"):
        ours(x, torch.zeros(2, 1, 4, dtype=F64))
