"""Inputs that ask for no gradient (a first layer fed data): the generated backward leaves out what
only their gradients need (an LSTM's d_x = W_ih^T @ d_gates after the loop), as torch's autograd
does for its own ops; the gradients that are asked for stay torch.nn's."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import specc
from specc.backends import c_runtime
from specc.runtime import CellModule

F64 = torch.float64


def _copied_lstm(backend: str, dtype):
    ref = nn.LSTM(3, 5, dtype=dtype)
    ours = specc.load("lstm", I=3, H=5, backend=backend, dtype=dtype)
    with torch.no_grad():
        for a, b in (("W_ih", "weight_ih_l0"), ("W_hh", "weight_hh_l0"), ("b_ih", "bias_ih_l0"), ("b_hh", "bias_hh_l0")):
            getattr(ours, a).copy_(getattr(ref, b))
    return ref, ours


@pytest.mark.parametrize("backend, dtype, tol", [("numpy", F64, 1e-10), ("c", torch.float32, 2e-5),
                                                 ("triton", torch.float32, 2e-5)])
def test_data_inputs_get_no_gradient_and_the_rest_are_torchs(backend, dtype, tol):
    if backend == "triton":
        pytest.importorskip("triton")
    ref, ours = _copied_lstm(backend, dtype)
    x = torch.randn(6, 4, 3, dtype=dtype)  # data: no gradient asked of it
    h0 = torch.randn(1, 4, 5, dtype=dtype, requires_grad=True)
    c0 = torch.randn(1, 4, 5, dtype=dtype)
    y_ref, (h_ref, _) = ref(x, (h0, c0))
    y, (h, _) = ours(x, (h0[0], c0[0]))
    w = torch.randn_like(y_ref)
    want = torch.autograd.grad((y_ref * w).sum() + h_ref.sum(), [h0, *ref.parameters()])
    got = torch.autograd.grad((y * w).sum() + h.sum(), [h0, ours.W_ih, ours.W_hh, ours.b_ih, ours.b_hh])
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g.reshape(r.shape), r, rtol=tol, atol=tol)
    assert x.grad is None


def test_the_input_product_is_not_made(monkeypatch):
    """The C loops' backward makes three products after its loop for an LSTM (d_x, d_W_hh, d_W_ih):
    two when the input asks for no gradient."""
    products = []
    real = c_runtime.matmul
    monkeypatch.setattr(c_runtime, "matmul", lambda *a, **k: products.append(a[1].shape) or real(*a, **k))
    ours = specc.load("lstm", I=3, H=5, backend="c")
    for wants_x, count in ((True, 3), (False, 2)):
        x = torch.randn(6, 4, 3, requires_grad=wants_x)
        y, _ = ours(x)
        products.clear()
        y.sum().backward()
        assert len(products) == count and (x.grad is not None) == wants_x


def test_the_generated_backward_returns_none_for_the_input():
    ours = specc.load("gru", I=3, H=4, backend="numpy", dtype=F64)
    prog, dims = ours.program, ours._dim_args
    T, B = 5, 2
    params = [p.detach().numpy() for p in ours.parameters()]
    x, h0 = torch.randn(T, B, 3, dtype=F64).numpy(), torch.zeros(B, 4, dtype=F64).numpy()
    _, _, saved = prog.forward(x, h0, *params, T=T, B=B, train=True, **dims)
    d_h, d_final = torch.ones(T, B, 4, dtype=F64).numpy(), torch.zeros(B, 4, dtype=F64).numpy()
    full = prog.backward(saved, d_h, d_final, *params, T=T, B=B, **dims)
    lean = prog.backward(saved, d_h, d_final, *params, T=T, B=B, inputs_grad=False, **dims)
    assert full[0][0].shape == (T, B, 3) and lean[0] == (None,)
    for a, b in zip(full[2], lean[2], strict=True):
        assert (a == b).all()


def test_a_module_compiled_before_still_runs(monkeypatch):
    """A module `specc compile` wrote before backward took inputs_grad (no SKIPS_INPUT_GRADIENTS)
    is asked for every gradient, as it was."""
    ref, ours = _copied_lstm("c", torch.float32)
    monkeypatch.delattr(ours.program, "SKIPS_INPUT_GRADIENTS")
    x = torch.randn(6, 4, 3)
    y_ref, _ = ref(x)
    y, _ = ours(x)
    want = torch.autograd.grad(y_ref.sum(), list(ref.parameters()))
    got = torch.autograd.grad(y.sum(), [ours.W_ih, ours.W_hh, ours.b_ih, ours.b_hh])
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r, rtol=2e-5, atol=2e-5)


@pytest.fixture
def asked(monkeypatch):
    """The inputs_grad each generated backward function was called with, in call order."""
    calls = []
    real = CellModule._choose

    def spying(self, *args, **kwargs):
        chosen = real(self, *args, **kwargs)
        prog, name = self.program, chosen[0].name  # (runner, dtype, why)
        fn = "backward" if name == "numpy" else f"backward_{name}"
        generated = getattr(prog, fn)
        if not getattr(generated, "spied", False):
            def backward(*a, **k):
                calls.append(k.get("inputs_grad", True))
                return generated(*a, **k)
            backward.spied = True
            monkeypatch.setattr(prog, fn, backward)
        return chosen

    monkeypatch.setattr(CellModule, "_choose", spying)
    return calls


@pytest.mark.parametrize("backend, dtype", [("numpy", F64), ("c", torch.float32), ("triton", torch.float32)])
def test_every_backend_is_told(asked, backend, dtype):
    if backend == "triton":
        pytest.importorskip("triton")
    ours = specc.load("gru", I=3, H=4, backend=backend, dtype=dtype)
    for wants_x in (True, False):
        ours(torch.randn(5, 2, 3, dtype=dtype, requires_grad=wants_x))[0].sum().backward()
    assert asked == [True, False]


def test_a_stack_skips_only_its_first_layer(asked):
    """In a stack, layer 2's input is layer 1's output: its gradient is needed and made."""
    ref = nn.LSTM(3, 4, num_layers=2, dtype=F64)
    ours = specc.from_torch(ref)
    x = torch.randn(5, 2, 3, dtype=F64)
    want = torch.autograd.grad(ref(x)[0].sum(), list(ref.parameters()))
    got = torch.autograd.grad(ours(x)[0].sum(), list(ours.parameters()))
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-10)
    assert asked == [True, False]  # backward runs the last layer first


TWO_INPUTS = """
cell two(I, J, H) {
    input x[I]
    input u[J]
    state h[H] = zeros
    param W[H, I]
    param U[H, J]
    param R[H, H]
    h' = tanh(W @ x + U @ u + R @ h)
    output h'
}
"""


@pytest.mark.parametrize("backend, dtype, tol", [("numpy", F64, 1e-10), ("c", torch.float32, 2e-5)])
def test_one_input_of_two_asking(backend, dtype, tol):
    """x asks for a gradient and u does not: x gets its gradient (torch's, by an eager loop)."""
    ours = specc.load(TWO_INPUTS, I=3, J=2, H=4, backend=backend, dtype=dtype)
    x = torch.randn(5, 2, 3, dtype=dtype, requires_grad=True)
    u = torch.randn(5, 2, 2, dtype=dtype)
    y, _ = ours((x, u))
    (y ** 2).sum().backward()
    xe = x.detach().clone().requires_grad_()
    W, U, R = (getattr(ours, n).detach() for n in ("W", "U", "R"))
    h, ys = torch.zeros(2, 4, dtype=dtype), []
    for t in range(5):
        h = torch.tanh(xe[t] @ W.T + u[t] @ U.T + h @ R.T)
        ys.append(h)
    (torch.stack(ys) ** 2).sum().backward()
    torch.testing.assert_close(x.grad, xe.grad, rtol=tol, atol=tol)


def test_a_traced_call_is_told_too(asked):
    """Under torch.compile the cell is one custom op (torch_ops.scan) whose gradient op runs the
    generated backward: a first layer fed data leaves out its input's gradient there too, and the
    parameters' gradients stay torch.nn's."""
    ref, ours = _copied_lstm("numpy", F64)
    torch._dynamo.reset()
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    for wants_x in (True, False):
        x = torch.randn(6, 4, 3, dtype=F64, requires_grad=wants_x)
        want = torch.autograd.grad(ref(x)[0].sum(), list(ref.parameters()))
        got = torch.autograd.grad(compiled(x)[0].sum(), [ours.W_ih, ours.W_hh, ours.b_ih, ours.b_hh])
        for g, r in zip(got, want, strict=True):
            torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-10)
    assert asked[-2:] == [True, False]
