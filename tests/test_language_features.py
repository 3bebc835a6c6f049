"""Cells nobody has named: the language's less common parts, end to end, on every backend.

Per-head (block-diagonal) products, a learned scalar, a concatenation feeding a product inside the
recurrence, a softmax output, two inputs, a state starting at ones, every elementwise function,
division and negation. Each cell is checked against a hand-written torch loop (outputs, final
states, every gradient) on the NumPy backend in float64, on the Triton backend (interpreted) and
the C loops in float32, and by gradcheck.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import specc
from helpers import per_head

SPEC = '''
cell leaky(I, H) {
    """Leaky integrator with a learned scalar rate."""
    input x[I]
    state h[H] = zeros
    param alpha[] ~ constant(0.3)
    param W[H, I]
    param U[H, H]
    h' = alpha * h + (1 - alpha) * tanh(W @ x + U @ h)
    output h'
}

cell concat_rnn(I, H, O) {
    """One weight over the concatenated input and state; a softmax output."""
    input x[I]
    state h[H] = zeros
    param W[H, I + H]
    param b[H] ~ zeros
    param V[O, H]
    h' = tanh(W @ [x, h] + b)
    output p = softmax(V @ h')
}

cell delay(I) {
    """The state is the previous input: its gradient comes straight from the carried one."""
    input x[I]
    state h[I] = zeros
    param W[I]
    h' = x
    output y = h * W
}

cell swap(I, H) {
    """Each state's next value is the other's previous value, or made from it."""
    input x[I]
    state a[H] = zeros
    state b[H] = zeros
    param W[H, I]
    a' = b
    b' = tanh(W @ x + a)
    output a'
}

cell names(I, H) {
    """A gate named like the generated code's own names for a state's values."""
    input x[I]
    state h[H] = zeros
    param W[H, I]
    h_prev = tanh(W @ x + h)
    h_next = h_prev * 0.5
    h' = h_prev * h + h_next
    output h'
}

cell feedforward(I, H) {
    """The next state does not depend on the state; the output is made from it after the loop."""
    input x[I]
    state h[H] = zeros
    param W[H, I]
    h' = tanh(W @ x)
    output y = h' * 2
}

cell heads(I, N, D) {
    """Per-head products: square and not, of a state and of a value made in the step, of a
    parameter and of an expression of one, with the heads a dimension (N) and a number (2)."""
    input x[I]
    state h[N*D] = zeros
    param W[N*D, I]
    param R[N, D, D]
    param P[N, 2*D, D]
    param Q[N, D, 2*D]
    param S[2, D, N*D]
    u = tanh(P @ h)
    h' = tanh(W @ x + R @ h + (R * 0.5) @ h + Q @ (u * u)) * mean(S @ u)
    output h'
}

cell odd_ops(I, H) {
    """Two inputs, a state that starts at ones, and the rarer functions."""
    input x[I]
    input u[H]
    state h[H] = ones
    param W[H, I]
    param U[H, H]
    a = softplus(W @ x) + 0.5
    h' = -(log(a) * h) / (1 + exp(-(U @ h))) + relu(u) - 2
    output h'
}

cell gelu_rnn(I, H) {
    """GELU, in its tanh form, on the state and on the input."""
    input x[I]
    state h[H] = zeros
    param W[H, I]
    param U[H, H]
    h' = gelu(U @ h) * 0.5 + gelu(W @ x)
    output h'
}

cell one_entry(I, H) {
    """A learned scalar written as a parameter of one entry: it broadcasts as a number would."""
    input x[I]
    state h[H]
    param a[1] ~ constant(0.3)
    param W[H, I]
    h' = a * h + (1 - a) * tanh(W @ x) / (a + 1)
    output h'
}

cell functions(I, H) {
    """Every elementwise function of the language but the ones above, on values of either sign."""
    input x[I]
    state h[H]
    param W[H, I]
    param U[H, H]
    a = W @ x + U @ h
    r = sqrt(1.5 + tanh(a)) * rsqrt(softplus(a) + 0.5) + abs(a) * 0.1 - square(h) * 0.2
    q = silu(a) * 0.3 + elu(a) * 0.2 + hardsigmoid(3 * a) - hardtanh(2 * a) * 0.5 + softsign(a)
    h' = tanh(r + q)
    output h'
}

cell reductions(I, H) {
    """sum, mean and max of vectors made in the step, of an input and of parameters alone; the
    norms; a reduction feeding a product; max over a vector with ties (its gradient is shared)."""
    input x[I]
    state h[H]
    param W[H, I]
    param U[H, H]
    param v[H]
    a = W @ x + U @ h
    n = layernorm(a) + rmsnorm(h) * 0.5
    m = max([h, h]) - mean(x) + sum(v) * 0.1
    z = U @ (n * rsqrt(mean(a * a) + 1)) + sum(tanh(a)) / 4
    h' = tanh(z - m * max(v))
    output h'
}

cell several(I, H) {
    """The functions of several arguments: whole, fractional and negative powers, a maximum of
    two vectors and of a vector and a per-example number, clamp, leaky_relu with slopes both ways."""
    input x[I]
    state h[H]
    param W[H, I]
    param U[H, H]
    a = W @ x + U @ h
    p = pow(1.5 + tanh(a), 2.5) + pow(a, 3) * 0.1 - pow(2 + tanh(h), -2) + pow(1.5 + tanh(a), -0.5)
    q = maximum(a, h) - minimum(a, 0.5) + maximum(h, mean(a)) + clamp(a, -0.5, 0.75)
    h' = tanh(p + q + leaky_relu(a, 0.1) - leaky_relu(h, -2))
    output h'
}
'''


def leaky_ref(xs, h, p):
    outs = []
    for x in xs[0]:
        h = p["alpha"] * h + (1 - p["alpha"]) * torch.tanh(x @ p["W"].T + h @ p["U"].T)
        outs.append(h)
    return torch.stack(outs), h


def concat_ref(xs, h, p):
    outs = []
    for x in xs[0]:
        h = torch.tanh(torch.cat([x, h], dim=1) @ p["W"].T + p["b"])
        outs.append(torch.softmax(h @ p["V"].T, dim=1))
    return torch.stack(outs), h


def odd_ref(xs, h, p):
    outs = []
    for x, u in zip(*xs):
        a = F.softplus(x @ p["W"].T) + 0.5
        h = -(torch.log(a) * h) / (1 + torch.exp(-(h @ p["U"].T))) + torch.relu(u) - 2
        outs.append(h)
    return torch.stack(outs), h


def gelu_ref(xs, h, p):
    outs = []
    for x in xs[0]:
        h = F.gelu(h @ p["U"].T, approximate="tanh") * 0.5 + F.gelu(x @ p["W"].T, approximate="tanh")
        outs.append(h)
    return torch.stack(outs), h


def one_entry_ref(xs, h, p):
    outs = []
    for x in xs[0]:
        h = p["a"] * h + (1 - p["a"]) * torch.tanh(x @ p["W"].T) / (p["a"] + 1)
        outs.append(h)
    return torch.stack(outs), h


def functions_ref(xs, h, p):
    # hardsigmoid by its definition: torch's F.hardsigmoid differentiates with 1/6 in float32, also in float64
    outs = []
    for x in xs[0]:
        a = x @ p["W"].T + h @ p["U"].T
        r = torch.sqrt(1.5 + torch.tanh(a)) * torch.rsqrt(F.softplus(a) + 0.5) + torch.abs(a) * 0.1 - torch.square(h) * 0.2
        q = (F.silu(a) * 0.3 + F.elu(a) * 0.2 + torch.clamp(3 * a + 3, 0, 6) / 6 - F.hardtanh(2 * a) * 0.5 + F.softsign(a))
        h = torch.tanh(r + q)
        outs.append(h)
    return torch.stack(outs), h


def reductions_ref(xs, h, p):
    outs = []
    H = h.shape[-1]
    for x in xs[0]:
        a = x @ p["W"].T + h @ p["U"].T
        n = F.layer_norm(a, (H,), eps=1e-5) + F.rms_norm(h, (H,), eps=1e-5) * 0.5
        m = torch.cat([h, h], dim=1).amax(1, keepdim=True) - x.mean(1, keepdim=True) + p["v"].sum() * 0.1
        z = (n * torch.rsqrt((a * a).mean(1, keepdim=True) + 1)) @ p["U"].T + torch.tanh(a).sum(1, keepdim=True) / 4
        h = torch.tanh(z - m * p["v"].max())
        outs.append(h)
    return torch.stack(outs), h


def several_ref(xs, h, p):
    outs = []
    for x in xs[0]:
        a = x @ p["W"].T + h @ p["U"].T
        pw = (torch.pow(1.5 + torch.tanh(a), 2.5) + torch.pow(a, 3) * 0.1 - torch.pow(2 + torch.tanh(h), -2)
              + torch.pow(1.5 + torch.tanh(a), -0.5))
        q = (torch.maximum(a, h) - torch.minimum(a, torch.tensor(0.5, dtype=a.dtype))
             + torch.maximum(h, a.mean(1, keepdim=True)) + torch.clamp(a, -0.5, 0.75))
        h = torch.tanh(pw + q + F.leaky_relu(a, 0.1) - F.leaky_relu(h, -2))
        outs.append(h)
    return torch.stack(outs), h


def delay_ref(xs, h, p):
    outs = []
    for x in xs[0]:
        outs.append(h * p["W"])
        h = x
    return torch.stack(outs), h


def swap_ref(xs, ab, p):
    a, b = ab.chunk(2, dim=1)
    outs = []
    for x in xs[0]:
        a, b = b, torch.tanh(x @ p["W"].T + a)
        outs.append(a)
    return torch.stack(outs), torch.cat([a, b], dim=1)


def names_ref(xs, h, p):
    outs = []
    for x in xs[0]:
        h_prev = torch.tanh(x @ p["W"].T + h)
        h = h_prev * h + h_prev * 0.5
        outs.append(h)
    return torch.stack(outs), h


def feedforward_ref(xs, h, p):
    outs = []
    for x in xs[0]:
        h = torch.tanh(x @ p["W"].T)
        outs.append(h * 2)
    return torch.stack(outs), h


def heads_ref(xs, h, p):
    outs = []
    for x in xs[0]:
        u = torch.tanh(per_head(p["P"], h))
        h = (torch.tanh(x @ p["W"].T + per_head(p["R"], h) + per_head(p["R"] * 0.5, h) + per_head(p["Q"], u * u))
             * per_head(p["S"], u).mean(1, keepdim=True))
        outs.append(h)
    return torch.stack(outs), h


CASES = {
    "heads": (heads_ref, dict(I=3, N=3, D=2)),
    "delay": (delay_ref, dict(I=4)),
    "swap": (swap_ref, dict(I=3, H=5)),
    "names": (names_ref, dict(I=3, H=5)),
    "feedforward": (feedforward_ref, dict(I=3, H=5)),
    "leaky": (leaky_ref, dict(I=3, H=5)),
    "concat_rnn": (concat_ref, dict(I=3, H=5, O=4)),
    "odd_ops": (odd_ref, dict(I=3, H=5)),
    "gelu_rnn": (gelu_ref, dict(I=3, H=5)),
    "functions": (functions_ref, dict(I=3, H=5)),
    "one_entry": (one_entry_ref, dict(I=3, H=5)),
    "reductions": (reductions_ref, dict(I=3, H=5)),
    "several": (several_ref, dict(I=3, H=5)),
}


def make(cell, dtype, backend="numpy"):
    dims = CASES[cell][1]
    module = specc.load(SPEC, cell, dtype=dtype, backend=backend, **dims)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.rand(p.shape) if name in ("alpha", "a") else torch.randn_like(p) * 0.5)
    return module


def inputs(module, dtype, T=5, B=3):
    return tuple(torch.randn(T, B, module.sizes["inputs"][n][0], dtype=dtype) for n in module.program.INPUTS)


def grads(fn, xs, h0, params):
    xs = [x.clone().requires_grad_() for x in xs]
    h0 = h0.clone().requires_grad_()
    params = {n: p.detach().clone().requires_grad_() for n, p in params.items()}
    y, h = fn(xs, h0, params)
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(2), dtype=y.dtype)
    ((y * w).sum() + (h ** 2).sum()).backward()
    def grad(t):  # a reference that never reads a tensor leaves its gradient None: zero
        return torch.zeros_like(t) if t.grad is None else t.grad

    return [y.detach(), h.detach(), *(grad(x) for x in xs), grad(h0), *(grad(p) for p in params.values())]


def through_specc(module):
    """The module as a function of (inputs, initial state, parameters); several states travel
    concatenated, as the references take them."""
    sizes = [module.sizes["states"][n][0] for n in module.program.STATES]

    def fn(xs, h0, params):
        state = h0 if len(sizes) == 1 else tuple(h0.split(sizes, dim=1))
        y, h = functional_call(module, params, (tuple(xs) if len(xs) > 1 else xs[0], state))
        return y, h if len(sizes) == 1 else torch.cat(h, dim=1)
    return fn


# Lanes past the edge of a tile are masked out of every store but still computed; the interpreter
# warns when such a lane divides zero by zero.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("cell", list(CASES))
@pytest.mark.parametrize("dtype, backend, tol", [(torch.float64, "numpy", 1e-10), (torch.float32, "triton", 1e-5),
                                                 (torch.float32, "c", 1e-5)],
                         ids=["numpy-f64", "triton-f32", "c-f32"])
def test_matches_hand_written_loop(cell, dtype, backend, tol):
    module = make(cell, dtype, backend)
    xs = inputs(module, dtype)
    h0 = torch.randn(3, sum(module.sizes["states"][n][0] for n in module.program.STATES), dtype=dtype) * 0.5
    params = dict(module.named_parameters())
    got = grads(through_specc(module), xs, h0, params)
    want = grads(CASES[cell][0], xs, h0, params)
    for k, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m: f"{cell} result {k}: {m}")


@pytest.mark.parametrize("cell", list(CASES))
def test_gradcheck(cell):
    module = make(cell, torch.float64)
    xs = inputs(module, torch.float64, T=3, B=2)
    names = [n for n, _ in module.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in module.parameters())
    xs = tuple(x.requires_grad_() for x in xs)

    def f(*args):
        x, p = args[:len(xs)], args[len(xs):]
        y, final = functional_call(module, dict(zip(names, p)), (x if len(x) > 1 else x[0],))
        return (y, *final) if isinstance(final, tuple) else (y, final)

    assert torch.autograd.gradcheck(f, xs + params)


def test_state_initialiser_and_scalar_parameter():
    module = specc.load(SPEC, "odd_ops", I=2, H=3)
    (h0,) = module.initial_state(4)
    assert torch.equal(h0, torch.ones(4, 3))
    leaky = specc.load(SPEC, "leaky", I=2, H=3)
    assert leaky.alpha.shape == () and leaky.alpha.item() == pytest.approx(0.3)


PASS_THROUGH = '''
cell pass_through(I) {
    """The input is also an output."""
    input x[I]
    state h[I] = zeros
    h' = tanh(h + x)
    output h'
    output x
}
'''


@pytest.mark.parametrize("backend", ["numpy", "triton"])
def test_an_output_that_is_an_input_does_not_share_its_memory(backend):
    """`output x` hands back x's values, not x itself: changing the output in place leaves the
    caller's x alone."""
    module = specc.load(PASS_THROUGH, "pass_through", I=3, dtype=torch.float32, backend=backend)
    keep = torch.randn(4, 2, 3)
    x = keep.clone()
    with torch.no_grad():
        (_, y), _ = module(x)
        torch.testing.assert_close(y, keep, rtol=0, atol=0)
        y.mul_(0.0)
    torch.testing.assert_close(x, keep, rtol=0, atol=0)

    xg = keep.clone().requires_grad_()
    (h, y), _ = module(xg)
    assert y.untyped_storage().data_ptr() != xg.untyped_storage().data_ptr()
    w = torch.randn(h.shape)
    (g,) = torch.autograd.grad((h * w).sum() + (y * w).sum(), [xg])
    # The reference: the same two outputs from a hand-written loop.
    xr = keep.clone().requires_grad_()
    hr, outs = torch.zeros(2, 3), []
    for t in range(4):
        hr = torch.tanh(hr + xr[t])
        outs.append(hr)
    (gr,) = torch.autograd.grad((torch.stack(outs) * w).sum() + (xr * w).sum(), [xr])
    torch.testing.assert_close(g, gr, rtol=1e-5, atol=1e-5)


LEARNED = '''
cell learned_start(I, H) {
    input x[I]
    state h[H] = learned(0.5)
    state c[H] = learned
    param W[H, I]
    param U[H, H]
    h' = tanh(W @ x + U @ h + c)
    c' = c * 0.5 + h'
    output h'
}
'''


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("backend, dtype, tol", [("numpy", torch.float64, 1e-10), ("c", torch.float32, 1e-5),
                                                 ("triton", torch.float32, 1e-5)])
def test_a_learned_initial_state_is_a_parameter_with_its_gradient(backend, dtype, tol):
    """`state h[H] = learned(0.5)`: a parameter h_init starting at 0.5, used when no state is given,
    broadcast over the batch, and trained: its gradient is the torch loop's."""
    m = specc.load(LEARNED, dtype=dtype, backend=backend, I=3, H=4)
    assert sorted(n for n, _ in m.named_parameters()) == ["U", "W", "c_init", "h_init"]
    assert torch.equal(m.h_init.detach(), torch.full((4,), 0.5, dtype=dtype))
    assert torch.equal(m.c_init.detach(), torch.zeros(4, dtype=dtype))
    assert "h_init" in m.state_dict()
    with torch.no_grad():
        m.h_init.normal_()
        m.c_init.normal_()
    x = torch.randn(5, 2, 3, dtype=dtype)
    out, (_, c) = m(x)
    got = torch.autograd.grad(out.sum() + c.sum(), [m.h_init, m.c_init, m.W])

    h0, c0, W, U = (t.detach().clone().requires_grad_() for t in (m.h_init, m.c_init, m.W, m.U))
    h, c, outs = h0.expand(2, -1), c0.expand(2, -1), []
    for t in range(5):
        h = torch.tanh(x[t] @ W.T + h @ U.T + c)
        c = c * 0.5 + h
        outs.append(h)
    want = torch.autograd.grad(torch.stack(outs).sum() + c.sum(), [h0, c0, W])
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


CONST = '''
cell with_const(I, H) {
    input x[I]
    state h[H]
    const M[H, H] = identity
    const s[H] ~ uniform(0.5)
    param W[H, I]
    h' = tanh(W @ x + M @ h * s)
    output h'
}
'''


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("backend, dtype, tol", [("numpy", torch.float64, 1e-10), ("c", torch.float32, 1e-5),
                                                 ("triton", torch.float32, 1e-5)])
def test_a_const_is_a_buffer_without_a_gradient(backend, dtype, tol):
    """`const M[H, H] = identity`: a buffer (in state_dict, moved by .to(), not a parameter, never
    trained) that the step reads as it reads a parameter; the backward pass does not compute its
    gradient at all."""
    m = specc.load(CONST, dtype=dtype, backend=backend, I=3, H=4)
    assert [n for n, _ in m.named_parameters()] == ["W"]
    assert sorted(n for n, _ in m.named_buffers()) == ["M", "s"] and "M" in m.state_dict()
    assert torch.equal(m.M, torch.eye(4, dtype=dtype))
    with torch.no_grad():
        m.M.normal_()
    x = torch.randn(5, 2, 3, dtype=dtype, requires_grad=True)
    out, _ = m(x)
    got = torch.autograd.grad(out.sum(), [x, m.W])

    xr, W = x.detach().clone().requires_grad_(), m.W.detach().clone().requires_grad_()
    h, outs = torch.zeros(2, 4, dtype=dtype), []
    for t in range(5):
        h = torch.tanh(xr[t] @ W.T + (h @ m.M.T) * m.s)
        outs.append(h)
    want = torch.autograd.grad(torch.stack(outs).sum(), [xr, W])
    torch.testing.assert_close(out.detach(), torch.stack(outs).detach(), rtol=tol, atol=tol)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    assert m.to(torch.float64).M.dtype == torch.float64


def test_the_backward_pass_computes_no_gradient_for_a_const():
    from specc.pipeline import compile_cell
    from specc.check import check
    from specc.parse import parse

    (cell,) = check(parse(CONST, "<const>"))
    c = compile_cell(cell, CONST, "<const>")
    reduced = dict(c.backward.reduced)
    assert c.backward.nodes[reduced["M"]].op == "zeros" and c.backward.nodes[reduced["s"]].op == "zeros"
    assert c.backward.nodes[reduced["W"]].op != "zeros"
    # nothing in the backward step multiplies by h to make M's gradient: one outer product (W's) only
    assert sum(n.op == "outer_sum" for n in c.backward.nodes) == 1


DROPOUT = '''
cell dropout_lstm(I, H) {
    input x[I]
    state h[H]
    state c[H]
    param W[4*H, I]
    param U[4*H, H]
    i, f, g, o = split(W @ x + U @ dropout(h, 0.25), 4)
    c' = zoneout(sigmoid(f) * c + sigmoid(i) * tanh(g), c, 0.1)
    h' = zoneout(sigmoid(o) * tanh(c'), h, 0.2)
    output h'
}
'''


def _dropout_lstm_ref(x, P, masks):
    """Gal & Ghahramani's dropout of h before the recurrent product (one mask for the sequence),
    Krueger et al.'s zoneout of c and h (a mask a step: 1 keeps the previous value)."""
    d, zc, zh = masks
    T, B = x.shape[:2]
    h = c = torch.zeros(B, P["U"].shape[1], dtype=x.dtype)
    outs = []
    for t in range(T):
        i, f, g, o = (x[t] @ P["W"].T + (h * d[t]) @ P["U"].T).chunk(4, 1)
        c = zc[t] * c + (1 - zc[t]) * (torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g))
        h = zh[t] * h + (1 - zh[t]) * torch.sigmoid(o) * torch.tanh(c)
        outs.append(h)
    return torch.stack(outs), c


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("backend, dtype, tol", [("numpy", torch.float64, 1e-10), ("c", torch.float32, 1e-5),
                                                 ("triton", torch.float32, 1e-5)])
def test_dropout_and_zoneout_train_with_torchs_generator_and_are_their_expectation_in_eval(backend, dtype, tol):
    m = specc.load(DROPOUT, dtype=dtype, backend=backend, I=3, H=4)
    T, B = 6, 5
    x = torch.randn(T, B, 3, dtype=dtype, requires_grad=True)
    torch.manual_seed(7)
    masks = m.draw_noise(T, B, dtype)
    d, zc, zh = masks
    assert torch.equal(d, d[:1].expand_as(d)), "a dropout mask is drawn once for the whole sequence"
    assert set(d.unique().tolist()) <= {0.0, torch.tensor(4 / 3, dtype=dtype).item()}
    assert set(zc.unique().tolist()) <= {0.0, 1.0}
    torch.manual_seed(7)
    out, (_, c) = m(x)  # draws the same masks from the same seed
    P = {k: v.detach().clone().requires_grad_() for k, v in m.named_parameters()}
    xr = x.detach().clone().requires_grad_()
    want_out, want_c = _dropout_lstm_ref(xr, P, masks)
    torch.testing.assert_close(out.detach(), want_out.detach(), rtol=tol, atol=tol)
    got = torch.autograd.grad(out.sum() + c.sum(), [x, m.W, m.U])
    want = torch.autograd.grad(want_out.sum() + want_c.sum(), [xr, P["W"], P["U"]])
    for a, b in zip(got, want, strict=True):  # the backward pass used the forward pass's masks
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)

    m.eval()
    ones = torch.ones(T, B, 4, dtype=dtype)
    torch.testing.assert_close(m(x)[0].detach(), _dropout_lstm_ref(x, P, [ones, ones * 0.1, ones * 0.2])[0].detach(),
                               rtol=tol, atol=tol)


def test_a_dropout_cell_in_a_layer_with_lengths_is_reproducible_from_a_seed():
    from specc.check import check
    from specc.masking import compile_masked
    from specc.network import Recurrent
    from specc.parse import parse

    (cell,) = check(parse(DROPOUT, "<d>"))
    layer = Recurrent(specc.program(compile_masked(cell, DROPOUT, "<d>")), [dict(I=3, H=4), dict(I=4, H=4)],
                      len(cell.own_inputs))
    x, lengths = torch.randn(7, 3, 3), torch.tensor([7, 4, 2])
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        runs.append(layer(x, lengths=lengths)[0])
    assert torch.equal(runs[0], runs[1])
    torch.manual_seed(4)
    assert not torch.equal(runs[0], layer(x, lengths=lengths)[0]), "the masks change with the seed"
    assert torch.equal(runs[0][4:, 1], torch.zeros(3, 4)), "nothing past a sequence's end"


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("backend", ["numpy", "c", "triton"])
def test_names_the_generated_code_uses_are_the_specs_to_take(backend):
    """T, B and t (the loop's), np, torch, tl, triton (its modules), self, rows: a spec may name
    its values so; the generated code renames its own. Checked against the fuzzer's reference."""
    from specc.fuzz.run import differences

    text = """
cell names(I, H) {
    input T[I]
    input np[H]
    state B[H]
    state t[H] = learned
    param torch[H, I]
    param rows[H, H]
    param x[H]
    const tl[H] = ones
    triton = tanh(torch @ T + rows @ B + x * tl)
    specc = triton * np
    B' = specc
    t' = sigmoid(t + triton)
    output self = B' + t'
}
"""
    assert differences(text, {"I": 3, "H": 4}, (backend,)) == []


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("backend", ["numpy", "c", "triton"])
def test_dimensions_named_like_the_generated_codes_own(backend):
    """cell c(T, B, len): the generated code takes its dimensions as T_, B_, len_; specc.load, the
    module's dims and its messages keep the spec's names."""
    from specc.fuzz.run import differences

    text = """
cell bt(T, B, len) {
    input x[T]
    state h[B]
    param W[B, T] ~ uniform(1 / sqrt(B))
    param U[B, B]
    param V[len, B]
    h' = tanh(W @ x + U @ h)
    output y = V @ h'
}
"""
    assert differences(text, {"T": 3, "B": 4, "len": 2}, (backend,)) == []
    m = specc.load(text, T=3, B=4, len=2)
    assert m.dims == {"T": 3, "B": 4, "len": 2} and "T=3, B=4, len=2" in repr(m)
    with pytest.raises(TypeError, match="dimension len not bound; pass len="):
        specc.load(text, T=3, B=4)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("backend", ["numpy", "c", "triton"])
def test_a_value_of_one_entry_broadcasts_against_a_vector(backend):
    """A state s[1] (and an input u[1]) times a vector: one number per example, as a scalar is."""
    from specc.fuzz.run import differences

    text = """
cell one(I, H) {
    input x[I]
    input u[1]
    state s[1]
    state h[H]
    param W[H, I]
    param w[1, H]
    s' = sigmoid(w @ h + u)
    h' = tanh(W @ x) * s + h * (1 - s) - u
    output h'
}
"""
    assert differences(text, {"I": 3, "H": 4}, (backend,)) == []
