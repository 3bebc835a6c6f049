"""The library cells torch has no layer for, against hand-written torch-eager references.

Each reference is a plain Python loop over time using torch ops, written from the equations in
the spec file's comments and docstring (not from specc's code); torch's autograd differentiates
it. specc must agree on the outputs, the final states and every gradient to 1e-10 in float64.
"""
from __future__ import annotations

import pytest
import torch

import specc

F64 = torch.float64


def jordan_ref(x, y0, p):
    """Jordan (1986): h = tanh(W_xh x + W_yh y + b_h), y' = W_hy h + b_y; the output y' is fed back."""
    y, outs = y0, []
    for t in range(x.shape[0]):
        h = torch.tanh(x[t] @ p["W_xh"].T + y @ p["W_yh"].T + p["b_h"])
        y = h @ p["W_hy"].T + p["b_y"]
        outs.append(y)
    return torch.stack(outs), (y,)


def shortcut_ref(x, h0, p):
    """h' = tanh(W_xh x + W_hh h + b_h), y = W_hy h' + W_xy x + b_y."""
    h, outs = h0, []
    for t in range(x.shape[0]):
        h = torch.tanh(x[t] @ p["W_xh"].T + h @ p["W_hh"].T + p["b_h"])
        outs.append(h @ p["W_hy"].T + x[t] @ p["W_xy"].T + p["b_y"])
    return torch.stack(outs), (h,)


def second_order_ref(x, h0, p):
    """Giles et al. (1992): h'_i = sigmoid(sum_jk W_ijk x_j h_k + b_i)."""
    h, outs = h0, []
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
    h, outs = h0, []
    for t in range(x.shape[0]):
        xt = x[t]
        z = torch.sigmoid(xt @ p["W_z"].T + h @ p["U_z"].T + p["b_z"])
        r = torch.sigmoid(xt @ p["W_r"].T + h @ p["U_r"].T + p["b_r"])
        n = torch.tanh(xt @ p["W"].T + (r * h) @ p["U"].T + p["b"])
        h = (1 - z) * h + z * n
        outs.append(h)
    return torch.stack(outs), (h,)


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
}
STATE_SIZE = {"jordan": "O", "shortcut": "H", "second_order": "H", "gru_cho": "H"}


@pytest.mark.parametrize("T, B", [(1, 1), (6, 3), (11, 2)], ids=lambda v: str(v))
@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(name, T, B, close):
    ref, dims, shapes = CASES[name]
    sp = specc.load(name, **dims, dtype=F64)
    names = [n for n, _ in sp.named_parameters()]
    assert sorted(names) == sorted(shapes), f"{name}: parameters {names}, the spec declares {list(shapes)}"

    # Fresh random values for every parameter (the spec zero-initialises some biases, which would
    # hide mistakes in what they multiply).
    params = {n: torch.randn(tuple(dims[d] for d in shapes[n]), dtype=F64) * 0.6 for n in shapes}
    with torch.no_grad():
        for n, v in params.items():
            getattr(sp, n).copy_(v)

    x = torch.randn(T, B, dims["I"], dtype=F64)
    s0 = torch.randn(B, dims[STATE_SIZE[name]], dtype=F64)

    xs, ss = x.clone().requires_grad_(), s0.clone().requires_grad_()
    out, final = sp(xs, ss)

    xr, sr = x.clone().requires_grad_(), s0.clone().requires_grad_()
    pr = {n: v.clone().requires_grad_() for n, v in params.items()}
    ref_out, (ref_final,) = ref(xr, sr, pr)

    close(out, ref_out, F64, "outputs")
    close(final, ref_final, F64, "final state")

    w_out, w_final = torch.randn(ref_out.shape, dtype=F64), torch.randn(ref_final.shape, dtype=F64)
    got = torch.autograd.grad((out * w_out).sum() + (final * w_final).sum(),
                              [xs, ss, *(getattr(sp, n) for n in shapes)])
    want = torch.autograd.grad((ref_out * w_out).sum() + (ref_final * w_final).sum(), [xr, sr, *pr.values()])
    for g, w, label in zip(got, want, ["d x", "d state", *(f"d {n}" for n in shapes)]):
        assert w.abs().max() > 0, f"{label}: the reference gradient is zero; the test would prove nothing"
        close(g, w, F64, label)


@pytest.mark.parametrize("name", list(CASES))
def test_default_state_and_init_match_reference(name, close):
    """No state given: the spec's initial state (zeros) and its own initial parameters."""
    ref, dims, shapes = CASES[name]
    sp = specc.load(name, **dims, dtype=F64)
    x = torch.randn(5, 2, dims["I"], dtype=F64)
    out, final = sp(x)
    params = {n: getattr(sp, n).detach().clone() for n in shapes}
    ref_out, (ref_final,) = ref(x, torch.zeros(2, dims[STATE_SIZE[name]], dtype=F64), params)
    close(out, ref_out, F64, "outputs")
    close(final, ref_final, F64, "final state")
