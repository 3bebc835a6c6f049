"""The library cells torch has no layer for, against hand-written torch-eager references.

Each reference is a plain Python loop over time using torch ops, written from the equations in
the spec file's comments and docstring (not from specc's code); torch's autograd differentiates
it. specc must agree on the outputs, the final states and every gradient to 1e-10 in float64.
"""
from __future__ import annotations

import math

import pytest
import torch

import specc
from helpers import per_head

F64 = torch.float64


def jordan_ref(x, y0, p):
    """Jordan (1986): h = tanh(W_xh x + W_yh y + b_h), y' = W_hy h + b_y; the output y' is fed back."""
    (y,), outs = y0, []
    for t in range(x.shape[0]):
        h = torch.tanh(x[t] @ p["W_xh"].T + y @ p["W_yh"].T + p["b_h"])
        y = h @ p["W_hy"].T + p["b_y"]
        outs.append(y)
    return torch.stack(outs), (y,)


def shortcut_ref(x, h0, p):
    """h' = tanh(W_xh x + W_hh h + b_h), y = W_hy h' + W_xy x + b_y."""
    (h,), outs = h0, []
    for t in range(x.shape[0]):
        h = torch.tanh(x[t] @ p["W_xh"].T + h @ p["W_hh"].T + p["b_h"])
        outs.append(h @ p["W_hy"].T + x[t] @ p["W_xy"].T + p["b_y"])
    return torch.stack(outs), (h,)


def second_order_ref(x, h0, p):
    """Giles et al. (1992): h'_i = sigmoid(sum_jk W_ijk x_j h_k + b_i)."""
    (h,), outs = h0, []
    for t in range(x.shape[0]):
        # Written as explicit sums over j and k, not with einsum, to stay far from any shortcut.
        W = p["W"]
        s = torch.zeros_like(h)
        for j in range(W.shape[1]):
            s = s + x[t][:, j:j + 1] * (h @ W[:, j, :].T)
        h = torch.sigmoid(s + p["b"])
        outs.append(h)
    return torch.stack(outs), (h,)


def gru_cho_ref(x, h0, p):
    """Cho et al. (2014), reset before the recurrent product:
    z = sigmoid(W_z x + U_z h + b_z), r = sigmoid(W_r x + U_r h + b_r),
    n = tanh(W x + U (r * h) + b), h' = (1 - z) * h + z * n."""
    (h,), outs = h0, []
    for t in range(x.shape[0]):
        xt = x[t]
        z = torch.sigmoid(xt @ p["W_z"].T + h @ p["U_z"].T + p["b_z"])
        r = torch.sigmoid(xt @ p["W_r"].T + h @ p["U_r"].T + p["b_r"])
        n = torch.tanh(xt @ p["W"].T + (r * h) @ p["U"].T + p["b"])
        h = (1 - z) * h + z * n
        outs.append(h)
    return torch.stack(outs), (h,)


def layernorm_lstm_ref(x, hc, p):
    """Ba et al. (2016), eq. 20-22, with torch's own layer_norm (eps 1e-5, no affine part):
    i, f, g, o = chunks of LN(W_ih x) * g_ih + LN(W_hh h) * g_hh + b,
    c' = sigmoid(f) c + sigmoid(i) tanh(g), h' = sigmoid(o) tanh(LN(c') * g_c + b_c)."""
    (h, c), outs = hc, []
    ln = torch.nn.functional.layer_norm
    for t in range(x.shape[0]):
        a = x[t] @ p["W_ih"].T
        r = h @ p["W_hh"].T
        gates = ln(a, a.shape[-1:], eps=1e-5) * p["g_ih"] + ln(r, r.shape[-1:], eps=1e-5) * p["g_hh"] + p["b"]
        i, f, g, o = gates.chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(ln(c, c.shape[-1:], eps=1e-5) * p["g_c"] + p["b_c"])
        outs.append(h)
    return torch.stack(outs), (h, c)


def peephole_lstm_ref(x, hc, p):
    """Gers et al. (2002): i = sigmoid(W_i x + U_i h + p_i c + b_i), f likewise with p_f,
    c' = f c + i tanh(W_c x + U_c h + b_c), o = sigmoid(W_o x + U_o h + p_o c' + b_o), h' = o tanh(c')."""
    (h, c), outs = hc, []
    H = h.shape[-1]
    for t in range(x.shape[0]):
        pre = x[t] @ p["W_ih"].T + h @ p["W_hh"].T + p["b"]
        i = torch.sigmoid(pre[:, :H] + p["p_i"] * c)
        f = torch.sigmoid(pre[:, H:2 * H] + p["p_f"] * c)
        c = f * c + i * torch.tanh(pre[:, 2 * H:3 * H])
        o = torch.sigmoid(pre[:, 3 * H:] + p["p_o"] * c)
        h = o * torch.tanh(c)
        outs.append(h)
    return torch.stack(outs), (h, c)


def indrnn_ref(x, hs, p):
    """Li et al. (2018): h' = relu(W x + u * h + b), u a vector (each unit its own recurrence)."""
    (h,), outs = hs, []
    for t in range(x.shape[0]):
        h = torch.relu(x[t] @ p["W"].T + p["u"] * h + p["b"])
        outs.append(h)
    return torch.stack(outs), (h,)


def mingru_ref(x, hs, p):
    """Feng et al. (2024), minGRU: z = sigmoid(W_z x + b_z), h' = (1 - z) h + z (W_h x + b_h)."""
    (h,), outs = hs, []
    for t in range(x.shape[0]):
        z = torch.sigmoid(x[t] @ p["W_z"].T + p["b_z"])
        h = (1 - z) * h + z * (x[t] @ p["W_h"].T + p["b_h"])
        outs.append(h)
    return torch.stack(outs), (h,)


def minlstm_ref(x, hs, p):
    """Feng et al. (2024), minLSTM: f, i from x; h' = f/(f+i) h + i/(f+i) (W_h x + b_h)."""
    (h,), outs = hs, []
    for t in range(x.shape[0]):
        f = torch.sigmoid(x[t] @ p["W_f"].T + p["b_f"])
        i = torch.sigmoid(x[t] @ p["W_i"].T + p["b_i"])
        h = f / (f + i) * h + i / (f + i) * (x[t] @ p["W_h"].T + p["b_h"])
        outs.append(h)
    return torch.stack(outs), (h,)


def qrnn_ref(x, states, p):
    """Bradbury et al. (2016), window 2, fo-pooling: [z, f, o] = W x_t + V x_{t-1} + b,
    c_t = sigmoid(f) c_{t-1} + (1 - sigmoid(f)) tanh(z), h_t = sigmoid(o) c_t."""
    (xp, c), outs = states, []
    for t in range(x.shape[0]):
        z, f, o = (x[t] @ p["W"].T + xp @ p["V"].T + p["b"]).chunk(3, dim=-1)
        f = torch.sigmoid(f)
        c = f * c + (1 - f) * torch.tanh(z)
        outs.append(torch.sigmoid(o) * c)
        xp = x[t]
    return torch.stack(outs), (xp, c)


def sru_ref(x, cs, p):
    """Lei et al. (2017): f, r = sigmoid(W_f x + b_f), sigmoid(W_r x + b_r);
    c' = f c + (1 - f) W x; h = r tanh(c') + (1 - r) x."""
    (c,), outs = cs, []
    for t in range(x.shape[0]):
        f = torch.sigmoid(x[t] @ p["W_f"].T + p["b_f"])
        r = torch.sigmoid(x[t] @ p["W_r"].T + p["b_r"])
        c = f * c + (1 - f) * (x[t] @ p["W"].T)
        outs.append(r * torch.tanh(c) + (1 - r) * x[t])
    return torch.stack(outs), (c,)


def selective_ssm_ref(x, hs, p):
    """dt = softplus(W_dt x + b_dt), a = exp(-dt exp(A_log)), h' = a h + dt (W_B x),
    y = W_C h' + D x: a real diagonal selective state space, one state per channel."""
    (h,), outs = hs, []
    for t in range(x.shape[0]):
        dt = torch.nn.functional.softplus(x[t] @ p["W_dt"].T + p["b_dt"])
        h = torch.exp(-dt * torch.exp(p["A_log"])) * h + dt * (x[t] @ p["W_B"].T)
        outs.append(h @ p["W_C"].T + x[t] @ p["D"].T)
    return torch.stack(outs), (h,)


def multihead_lstm_ref(x, hc, p):
    """An LSTM whose recurrent matrices are block-diagonal: head n's gates read h[n*D:(n+1)*D]
    through R_*[n] alone. Each head is multiplied on its own (no block-diagonal matrix is built)."""
    (h, c), outs = hc, []
    for t in range(x.shape[0]):
        i, f, g, o = (x[t] @ p["W"].T + p["b"]).chunk(4, dim=1)
        c = (torch.sigmoid(f + per_head(p["R_f"], h)) * c
             + torch.sigmoid(i + per_head(p["R_i"], h)) * torch.tanh(g + per_head(p["R_g"], h)))
        h = torch.sigmoid(o + per_head(p["R_o"], h)) * torch.tanh(c)
        outs.append(h)
    return torch.stack(outs), (h, c)


# name -> (reference, {dimension: size}, parameter shapes as the spec files declare them)
CASES = {
    "jordan": (jordan_ref, dict(I=4, H=6, O=3),
               dict(W_xh=("H", "I"), W_yh=("H", "O"), b_h=("H",), W_hy=("O", "H"), b_y=("O",))),
    "shortcut": (shortcut_ref, dict(I=5, H=7, O=3),
                 dict(W_xh=("H", "I"), W_hh=("H", "H"), b_h=("H",), W_hy=("O", "H"), W_xy=("O", "I"), b_y=("O",))),
    "second_order": (second_order_ref, dict(I=3, H=5), dict(W=("H", "I", "H"), b=("H",))),
    "gru_cho": (gru_cho_ref, dict(I=4, H=6),
                dict(W_z=("H", "I"), W_r=("H", "I"), W=("H", "I"), U_z=("H", "H"), U_r=("H", "H"), U=("H", "H"),
                     b_z=("H",), b_r=("H",), b=("H",))),
    "layernorm_lstm": (layernorm_lstm_ref, dict(I=5, H=6),
                       dict(W_ih=("4*H", "I"), W_hh=("4*H", "H"), g_ih=("4*H",), g_hh=("4*H",), b=("4*H",),
                            g_c=("H",), b_c=("H",))),
    "peephole_lstm": (peephole_lstm_ref, dict(I=4, H=5),
                      dict(W_ih=("4*H", "I"), W_hh=("4*H", "H"), b=("4*H",), p_i=("H",), p_f=("H",), p_o=("H",))),
    "indrnn": (indrnn_ref, dict(I=4, H=6), dict(W=("H", "I"), u=("H",), b=("H",))),
    "mingru": (mingru_ref, dict(I=4, H=6), dict(W_z=("H", "I"), b_z=("H",), W_h=("H", "I"), b_h=("H",))),
    "minlstm": (minlstm_ref, dict(I=4, H=6), dict(W_f=("H", "I"), b_f=("H",), W_i=("H", "I"), b_i=("H",),
                                                   W_h=("H", "I"), b_h=("H",))),
    "qrnn": (qrnn_ref, dict(I=4, H=5), dict(W=("3*H", "I"), V=("3*H", "I"), b=("3*H",))),
    "sru": (sru_ref, dict(H=6), dict(W=("H", "H"), W_f=("H", "H"), b_f=("H",), W_r=("H", "H"), b_r=("H",))),
    "selective_ssm": (selective_ssm_ref, dict(I=4, H=6, O=3),
                      dict(W_dt=("H", "I"), b_dt=("H",), A_log=("H",), W_B=("H", "I"), W_C=("O", "H"), D=("O", "I"))),
    "multihead_lstm": (multihead_lstm_ref, dict(I=4, N=3, D=2),
                       dict(W=("4*N*D", "I"), R_i=("N", "D", "D"), R_f=("N", "D", "D"), R_g=("N", "D", "D"),
                            R_o=("N", "D", "D"), b=("4*N*D",))),
}
# each cell's states, by size, in the spec's order
STATES = {"jordan": ("O",), "shortcut": ("H",), "second_order": ("H",), "gru_cho": ("H",),
          "layernorm_lstm": ("H", "H"), "peephole_lstm": ("H", "H"), "indrnn": ("H",), "mingru": ("H",),
          "minlstm": ("H",), "qrnn": ("I", "H"), "sru": ("H",), "selective_ssm": ("H",),
          "multihead_lstm": ("N*D", "N*D")}
# each cell's input size, where it is not I
INPUT = {"sru": "H"}


def _size(d: str, dims: dict) -> int:
    """A size as the spec writes it: a product of numbers and dimensions (4*H, N*D)."""
    return math.prod(int(f) if f.isdigit() else dims[f] for f in d.split("*"))


def _one_or_tuple(items):
    return items[0] if len(items) == 1 else tuple(items)


def compare_with_reference(name, dims, T, B, dtype, close, tol=None, scale=0.6, backend="auto", device="cpu"):
    """specc's cell `name` (through `backend`, on `device`) against its hand-written reference on
    the CPU: outputs, final states and every gradient, with the same fresh random parameters,
    inputs and initial states in both."""
    ref, _, shapes = CASES[name]
    sp = specc.load(name, **dims, dtype=dtype, backend=backend)
    names = [n for n, _ in sp.named_parameters()]
    assert sorted(names) == sorted(shapes), f"{name}: parameters {names}, the spec declares {list(shapes)}"

    # Fresh random values for every parameter (the spec zero-initialises some biases, which would
    # hide mistakes in what they multiply).
    params = {n: torch.randn(tuple(_size(d, dims) for d in shapes[n]), dtype=dtype) * scale for n in shapes}
    with torch.no_grad():
        for n, v in params.items():
            getattr(sp, n).copy_(v)

    x = torch.randn(T, B, dims[INPUT.get(name, "I")], dtype=dtype)
    s0 = [torch.randn(B, _size(d, dims), dtype=dtype) for d in STATES[name]]

    sp.to(device)
    xs, ss = x.to(device).requires_grad_(), [s.to(device).requires_grad_() for s in s0]
    out, final = sp(xs, _one_or_tuple(ss))
    final = final if isinstance(final, tuple) else (final,)

    xr, sr = x.clone().requires_grad_(), [s.clone().requires_grad_() for s in s0]
    pr = {n: v.clone().requires_grad_() for n, v in params.items()}
    ref_out, ref_final = ref(xr, sr, pr)

    close(out.cpu(), ref_out, dtype, "outputs", tol=tol)
    for f, rf in zip(final, ref_final, strict=True):
        close(f.cpu(), rf, dtype, "final state", tol=tol)

    w_out, w_final = torch.randn(ref_out.shape, dtype=dtype), [torch.randn(f.shape, dtype=dtype) for f in ref_final]
    got = torch.autograd.grad((out * w_out.to(device)).sum() + sum((f * w.to(device)).sum() for f, w in zip(final, w_final)),
                              [xs, *ss, *(getattr(sp, n) for n in shapes)])
    got = [g.cpu() for g in got]
    want = torch.autograd.grad((ref_out * w_out).sum() + sum((f * w).sum() for f, w in zip(ref_final, w_final)),
                               [xr, *sr, *pr.values()])
    labels = ["d x", *(f"d state {k}" for k in range(len(ss))), *(f"d {n}" for n in shapes)]
    for g, w, label in zip(got, want, labels, strict=True):
        assert w.abs().max() > 0, f"{label}: the reference gradient is zero; the test would prove nothing"
        close(g, w, dtype, label, tol=tol)


@pytest.mark.parametrize("T, B", [(1, 1), (6, 3), (11, 2)], ids=lambda v: str(v))
@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(name, T, B, close):
    compare_with_reference(name, CASES[name][1], T, B, F64, close)


@pytest.mark.parametrize("name", list(CASES))
def test_default_state_and_init_match_reference(name, close):
    """No state given: the spec's initial state (zeros) and its own initial parameters."""
    ref, dims, shapes = CASES[name]
    sp = specc.load(name, **dims, dtype=F64)
    x = torch.randn(5, 2, dims[INPUT.get(name, "I")], dtype=F64)
    out, final = sp(x)
    params = {n: getattr(sp, n).detach().clone() for n in shapes}
    ref_out, ref_final = ref(x, [torch.zeros(2, _size(d, dims), dtype=F64) for d in STATES[name]], params)
    close(out, ref_out, F64, "outputs")
    for f, rf in zip(final if isinstance(final, tuple) else (final,), ref_final, strict=True):
        close(f, rf, F64, "final state")


def test_layer_norm_adds_no_product_to_a_step():
    """layernorm() is a reduction over features, not a product with an averaging matrix: the
    layer-normalised LSTM's step, forward and backward, makes as many matrix products as the
    plain LSTM's."""
    from specc.pipeline import compile_spec

    def loop_products(c):
        fwd = sum(n.op in ("matvec", "matvec_t") for i, n in enumerate(c.forward.nodes)
                  if c.forward_schedule.region[i] == "loop")
        bwd = sum(n.op in ("matvec", "matvec_t") for i, n in enumerate(c.backward.nodes)
                  if c.backward_schedule.region[i] == "loop")
        return fwd, bwd

    plain, normed = compile_spec("lstm"), compile_spec("layernorm_lstm")
    assert loop_products(normed) == loop_products(plain), (loop_products(normed), loop_products(plain))
    assert loop_products(plain)[0] >= 1


@pytest.mark.parametrize("backend, dtype, tol", [("numpy", F64, None), ("c", torch.float32, 1e-5),
                                                 ("triton", torch.float32, 1e-5)])
def test_second_order_weight_gradient_by_blocks_of_rows(monkeypatch, backend, dtype, tol, close):
    """W's gradient is made after the loop from x and h, a few rows' x (x) h at a time: here 4 of
    the 22 rows (time x batch) a block, the last block short."""
    from specc.backends import numpy_runtime

    dims = CASES["second_order"][1]
    monkeypatch.setattr(numpy_runtime, "CONTRACT_BYTES", 4 * dims["I"] * dims["H"] * torch.empty((), dtype=dtype).element_size())
    compare_with_reference("second_order", dims, 11, 2, dtype, close, tol=tol, scale=0.4, backend=backend)


@pytest.mark.parametrize("threads", ["1", "2", "3"])
@pytest.mark.parametrize("split", ["rows", "cols"])
def test_inference_on_every_split_with_a_product_operand_in_scratch(monkeypatch, split, threads):
    """Without a backward pass, gru_cho's r * h, the operand of U @ (r * h), lives in scratch: two
    blocks used in turn (odd and even steps), which every thread reads whole when the product's
    columns are split. Outputs and final state against the hand-written loop, over an odd number
    of steps and every split of the batch."""
    from specc.backends import c_runtime

    monkeypatch.setenv("SPECC_LOOP_THREADS", threads)
    monkeypatch.setenv("SPECC_LOOP_SPLIT", split)
    monkeypatch.setattr(c_runtime, "SPLIT_ROWS", 1)
    torch.manual_seed(int(threads))
    ref, dims, _ = CASES["gru_cho"]
    sp = specc.load("gru_cho", **dims, backend="c")
    assert "(t & 1) * B" in sp.program.C_SOURCE  # the case this test is about
    params = {n: torch.randn_like(p) * 0.6 for n, p in sp.named_parameters()}
    with torch.no_grad():
        for n, v in params.items():
            getattr(sp, n).copy_(v)
        x, h0 = torch.randn(7, 5, dims["I"]), torch.randn(5, dims["H"])
        out, final = sp(x, h0)
        ref_out, (ref_final,) = ref(x, (h0,), params)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(final, ref_final, atol=1e-5, rtol=1e-5)
