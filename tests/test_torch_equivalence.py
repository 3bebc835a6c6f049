"""specc's library cells compute what torch's own recurrent layers compute.

The reference is torch.nn.RNN / LSTM / GRU (and nn.Linear), which share no code with specc.
Every comparison covers the outputs, the final states and every gradient: each parameter, the
input sequence and each initial state, through a loss that weighs every output and every final
state with random weights, so that each gradient path carries a distinct signal.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import specc

F64, F32 = torch.float64, torch.float32

# name -> (specc.load arguments, torch layer factory, number of states)
CELLS = {
    "lstm": (("lstm", None), lambda I, H, **kw: nn.LSTM(I, H, **kw), 2),
    "gru": (("gru", None), lambda I, H, **kw: nn.GRU(I, H, **kw), 1),
    "rnn_tanh": (("elman", "rnn_tanh"), lambda I, H, **kw: nn.RNN(I, H, nonlinearity="tanh", **kw), 1),
    "rnn_relu": (("elman", "rnn_relu"), lambda I, H, **kw: nn.RNN(I, H, nonlinearity="relu", **kw), 1),
}
TORCH_NAMES = {"W_ih": "weight_ih_l0", "W_hh": "weight_hh_l0", "b_ih": "bias_ih_l0", "b_hh": "bias_hh_l0"}

# (I, H, T, B): tiny, odd, non-powers of two, a single unit, a batch of one, a longer sequence.
SIZES = [(3, 4, 5, 2), (37, 100, 3, 2), (1, 3, 6, 1), (10, 7, 4, 5), (6, 13, 20, 3)]


def _torch_state(states, n_states):
    """specc's (B, H) states as torch's (1, B, H) ones."""
    if n_states == 2:
        return tuple(s.unsqueeze(0) for s in states)
    return states[0].unsqueeze(0)


def _torch_finals(finals, n_states):
    if n_states == 2:
        return [f.squeeze(0) for f in finals]
    return [finals.squeeze(0)]


def _specc_finals(finals, n_states):
    return list(finals) if n_states > 1 else [finals]


def _weights(out, finals, dtype):
    """Random weights for a loss touching the outputs and every final state."""
    return torch.randn(out.shape, dtype=dtype), [torch.randn(f.shape, dtype=dtype) for f in finals]


def _loss(out, finals, w_out, w_finals):
    loss = (out * w_out).sum()
    for f, w in zip(finals, w_finals):
        loss = loss + (f * w).sum()
    return loss


def _copy_to_torch(sp, ref):
    with torch.no_grad():
        for ours, theirs in TORCH_NAMES.items():
            getattr(ref, theirs).copy_(getattr(sp, ours))


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "I{}-H{}-T{}-B{}".format(*s))
@pytest.mark.parametrize("name", list(CELLS))
def test_cell_matches_torch_layer(name, size, dtype, close):
    (spec, cell), make, n_states = CELLS[name]
    I, H, T, B = size
    # specc's default initialisation is torch's, U(-1/sqrt(H), 1/sqrt(H)) for every weight and
    # bias: random, non-zero, and well conditioned enough for float32 to agree to 1e-5.
    sp = specc.load(spec, cell, I=I, H=H, dtype=dtype)
    ref = make(I, H).to(dtype)
    _copy_to_torch(sp, ref)

    x = torch.randn(T, B, I, dtype=dtype)
    states = [torch.randn(B, H, dtype=dtype) for _ in range(n_states)]

    xs = x.clone().requires_grad_()
    ss = [s.clone().requires_grad_() for s in states]
    out, finals = sp(xs, ss[0] if n_states == 1 else tuple(ss))
    finals = _specc_finals(finals, n_states)

    xt = x.clone().requires_grad_()
    st = [s.clone().requires_grad_() for s in states]
    ref_out, ref_finals = ref(xt, _torch_state(st, n_states))
    ref_finals = _torch_finals(ref_finals, n_states)

    close(out, ref_out, dtype, "outputs")
    for i, (f, rf) in enumerate(zip(finals, ref_finals)):
        close(f, rf, dtype, f"final state {i}")

    w_out, w_finals = _weights(ref_out, ref_finals, dtype)
    ours = [getattr(sp, n) for n in TORCH_NAMES]
    theirs = [getattr(ref, TORCH_NAMES[n]) for n in TORCH_NAMES]
    got = torch.autograd.grad(_loss(out, finals, w_out, w_finals), [xs, *ss, *ours])
    want = torch.autograd.grad(_loss(ref_out, ref_finals, w_out, w_finals), [xt, *st, *theirs])
    labels = ["d x", *[f"d state {i}" for i in range(n_states)], *[f"d {n}" for n in TORCH_NAMES]]
    for g, w, label in zip(got, want, labels):
        assert w.abs().max() > 0, f"{label}: the reference gradient is zero; the test would prove nothing"
        close(g, w, dtype, label)


@pytest.mark.parametrize("name", list(CELLS))
def test_default_initial_state_matches_torch(name, close, randomize):
    """No state given: both start from zeros; gradients go through .backward() into .grad."""
    (spec, cell), make, n_states = CELLS[name]
    sp = randomize(specc.load(spec, cell, I=4, H=6, dtype=F64), scale=0.4)
    ref = make(4, 6).double()
    _copy_to_torch(sp, ref)
    x = torch.randn(7, 3, 4, dtype=F64)
    out, finals = sp(x)
    ref_out, ref_finals = ref(x)
    close(out, ref_out, F64, "outputs")
    finals, ref_finals = _specc_finals(finals, n_states), _torch_finals(ref_finals, n_states)
    for f, rf in zip(finals, ref_finals):
        close(f, rf, F64, "final state")
    w_out, w_finals = _weights(ref_out, ref_finals, F64)
    _loss(out, finals, w_out, w_finals).backward()
    _loss(ref_out, ref_finals, w_out, w_finals).backward()
    for ours, theirs in TORCH_NAMES.items():
        close(getattr(sp, ours).grad, getattr(ref, theirs).grad, F64, f"d {ours}")


# --- specc.from_torch ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["seq_first", "batch_first"])
@pytest.mark.parametrize("name", list(CELLS))
def test_from_torch(name, batch_first, dtype, close):
    _, make, n_states = CELLS[name]
    I, H, T, B = 5, 11, 6, 3
    ref = make(I, H, batch_first=batch_first).to(dtype)
    sp = specc.from_torch(ref)

    # The weights are copied, not shared.
    for ours, theirs in TORCH_NAMES.items():
        p, q = getattr(sp, ours), getattr(ref, theirs)
        assert p.dtype == dtype
        assert p.data_ptr() != q.data_ptr(), f"{ours} shares memory with torch's {theirs}"
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=0)

    x = torch.randn((B, T, I) if batch_first else (T, B, I), dtype=dtype)
    states = [torch.randn(B, H, dtype=dtype) for _ in range(n_states)]
    xs, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
    ss = [s.clone().requires_grad_() for s in states]
    st = [s.clone().requires_grad_() for s in states]

    out, finals = sp(xs, ss[0] if n_states == 1 else tuple(ss))
    ref_out, ref_finals = ref(xt, _torch_state(st, n_states))
    finals, ref_finals = _specc_finals(finals, n_states), _torch_finals(ref_finals, n_states)
    close(out, ref_out, dtype, "outputs")
    for f, rf in zip(finals, ref_finals):
        close(f, rf, dtype, "final state")

    w_out, w_finals = _weights(ref_out, ref_finals, dtype)
    _loss(out, finals, w_out, w_finals).backward()
    _loss(ref_out, ref_finals, w_out, w_finals).backward()
    close(xs.grad, xt.grad, dtype, "d x")
    for i, (a, b) in enumerate(zip(ss, st)):
        close(a.grad, b.grad, dtype, f"d state {i}")
    for ours, theirs in TORCH_NAMES.items():
        close(getattr(sp, ours).grad, getattr(ref, theirs).grad, dtype, f"d {ours}")

    # Changing torch's weights afterwards leaves the copy alone.
    before = sp.W_hh.detach().clone()
    with torch.no_grad():
        ref.weight_hh_l0.add_(1.0)
    torch.testing.assert_close(sp.W_hh.detach(), before, rtol=0, atol=0)


# Stacked, bidirectional and projected layers are supported since issue 4 (tests/test_interop_network.py).
@pytest.mark.parametrize("module, words", [
    (lambda: nn.RNN(3, 4, bias=False), "bias=False"),
    (lambda: nn.LSTM(3, 4, bias=False), "bias=False"),
    (lambda: nn.GRU(3, 4, num_layers=2, bidirectional=True, bias=False), "bias=False"),
], ids=["rnn-nobias", "lstm-nobias", "gru-stacked-nobias"])
def test_from_torch_rejects_unsupported(module, words):
    with pytest.raises(specc.SpecError) as info:
        specc.from_torch(module())
    message = str(info.value)
    assert words in message, message
    assert "support" in message, message


def test_from_torch_rejects_non_recurrent_module():
    with pytest.raises((TypeError, specc.SpecError), match="Linear"):
        specc.from_torch(nn.Linear(3, 4))


# --- the elman cell with its output layer is nn.RNN followed by nn.Linear -----------------------

@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("size", [(5, 7, 3, 4, 3), (2, 9, 1, 6, 1)], ids=lambda s: "I{}-H{}-O{}-T{}-B{}".format(*s))
def test_elman_is_rnn_then_linear(size, dtype, close, randomize):
    I, H, O, T, B = size
    sp = randomize(specc.load("elman", "elman", I=I, H=H, O=O, dtype=dtype))
    rnn, lin = nn.RNN(I, H).to(dtype), nn.Linear(H, O).to(dtype)
    with torch.no_grad():
        rnn.weight_ih_l0.copy_(sp.W_xh)
        rnn.weight_hh_l0.copy_(sp.W_hh)
        # elman has one bias; torch's two add up to it.
        split = torch.randn(H, dtype=dtype)
        rnn.bias_ih_l0.copy_(split)
        rnn.bias_hh_l0.copy_(sp.b_h - split)
        lin.weight.copy_(sp.W_hy)
        lin.bias.copy_(sp.b_y)

    x = torch.randn(T, B, I, dtype=dtype)
    h0 = torch.randn(B, H, dtype=dtype)
    xs, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
    hs, ht = h0.clone().requires_grad_(), h0.clone().requires_grad_()

    y, h = sp(xs, hs)
    hseq, ref_h = rnn(xt, ht.unsqueeze(0))
    ref_y, ref_h = lin(hseq), ref_h.squeeze(0)
    close(y, ref_y, dtype, "outputs y")
    close(h, ref_h, dtype, "final h")

    w_y, w_h = torch.randn(ref_y.shape, dtype=dtype), torch.randn(ref_h.shape, dtype=dtype)
    ((y * w_y).sum() + (h * w_h).sum()).backward()
    ((ref_y * w_y).sum() + (ref_h * w_h).sum()).backward()
    close(xs.grad, xt.grad, dtype, "d x")
    close(hs.grad, ht.grad, dtype, "d h0")
    close(sp.W_xh.grad, rnn.weight_ih_l0.grad, dtype, "d W_xh")
    close(sp.W_hh.grad, rnn.weight_hh_l0.grad, dtype, "d W_hh")
    close(sp.b_h.grad, rnn.bias_ih_l0.grad, dtype, "d b_h")
    close(sp.W_hy.grad, lin.weight.grad, dtype, "d W_hy")
    close(sp.b_y.grad, lin.bias.grad, dtype, "d b_y")
