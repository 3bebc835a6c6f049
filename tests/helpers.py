"""Checks shared by the backend tests (test_triton, test_c_backend, test_triton_gpu): each takes the
backend (and device) to run, and compares with torch.nn, a hand-written torch loop or the NumPy
backend. The references share no code with specc.
"""
from __future__ import annotations

import torch

import specc
from specc.runtime import own_inputs


def run(module, x, state, dy_seed=1, device="cpu"):
    """Outputs, final states and the gradients of a loss touching both, for x, state and weights,
    computed on `device` and returned on the CPU.

    x is a tensor, or a tuple of them for a cell with several inputs."""
    xs = [x] if isinstance(x, torch.Tensor) else list(x)
    xs = [xi.detach().to(device).clone().requires_grad_() for xi in xs]
    state = [s.detach().to(device).clone().requires_grad_() for s in state]
    for p in module.parameters():
        p.grad = None
    torch.manual_seed(dy_seed)  # the same dropout masks (a cell's own) whatever the module and device
    y, final = module(xs[0] if len(xs) == 1 else tuple(xs), state[0] if len(state) == 1 else tuple(state))
    final = [final] if isinstance(final, torch.Tensor) else list(final)
    g = torch.Generator().manual_seed(dy_seed)
    loss = (y * torch.randn(y.shape, generator=g).to(device)).sum()
    for f in final:
        loss = loss + (f * torch.randn(f.shape, generator=g).to(device)).sum()
    loss.backward()
    got = {"y": y, **{f"final{k}": f for k, f in enumerate(final)},
           **{("dx" if k == 0 else f"dx{k}"): xi.grad for k, xi in enumerate(xs)},
           **{f"d{k}": s.grad for k, s in enumerate(state)},
           **{f"d{n}": p.grad for n, p in module.named_parameters()}}
    return {k: v.detach().cpu() for k, v in got.items()}


def assert_same(got, want, tol=1e-5):
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=tol, atol=tol, msg=lambda m: f"{k}: {m}")


def per_head(R, v):
    """R[n] times the n-th of R.shape[0] equal blocks of v's features, the products side by side:
    the language's R @ v for R of three axes, written without a block-diagonal matrix."""
    blocks = v.chunk(R.shape[0], dim=1)
    return torch.cat([blocks[n] @ R[n].T for n in range(R.shape[0])], dim=1)


def odd_dims(dims):
    sizes = [37, 13, 5, 7, 11]
    return {d: sizes[k % len(sizes)] for k, d in enumerate(dims)}


def assert_spec_matches_numpy(spec_cell, backend, B, device="cpu", T=4, tol=1e-5):
    """A spec's cell through `backend` on `device` against the NumPy backend, same random weights."""
    dims = odd_dims(spec_cell.dims)
    ref = specc.load(spec_cell.path, spec_cell.cell, backend="numpy", **dims)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * 0.4)
    ours = specc.load(spec_cell.path, spec_cell.cell, backend=backend, **dims)
    ours.load_state_dict(ref.state_dict())
    ours.to(device)
    x = tuple(torch.randn(T, B, ref.sizes["inputs"][n][0]) for n in own_inputs(ref.program))
    state = [torch.randn(B, ref.sizes["states"][n][0]) * 0.5 for n in ref.program.STATES]
    assert_same(run(ours, x, state, device=device), run(ref, x, state), tol)
    if own_inputs(ref.program):
        # Inference keeps nothing for backward and takes another code path (states in two blocks
        # used in turn): outputs and final states, after an even and an odd number of steps.
        for steps in (T, T - 1):
            with torch.no_grad():
                xs = tuple(xi[:steps] for xi in x)
                xd = tuple(xi.to(device) for xi in xs)
                torch.manual_seed(steps)
                got = ours(xd[0] if len(xd) == 1 else xd, tuple(si.to(device) for si in state))
                torch.manual_seed(steps)
                want = ref(xs[0] if len(xs) == 1 else xs, tuple(state))
            for a, b in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)):
                torch.testing.assert_close(a.cpu(), b, rtol=tol, atol=tol)


def assert_text_spec_matches_numpy(spec: str, backend: str, T: int = 4, B: int = 3, **dims):
    """A cell written in the test through `backend` against the NumPy backend's loop over steps
    (scan=False: not the scan of a linear recurrence that `backend` may run), same weights; the
    module, for further checks."""
    ours = specc.load(spec, backend=backend, **dims)
    ref = specc.load(spec, backend="numpy", scan=False, **dims)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(T, B, ref.sizes["inputs"][own_inputs(ref.program)[0]][0])
    state = [torch.randn(B, ref.sizes["states"][n][0]) for n in ref.program.STATES]
    assert_same(run(ours, x, state), run(ref, x, state))
    return ours


TORCH_LAYERS = {
    "lstm": (lambda I, H: torch.nn.LSTM(I, H), ("lstm", None)),
    "gru": (lambda I, H: torch.nn.GRU(I, H), ("gru", None)),
    "rnn_tanh": (lambda I, H: torch.nn.RNN(I, H), ("elman", "rnn_tanh")),
    "rnn_relu": (lambda I, H: torch.nn.RNN(I, H, nonlinearity="relu"), ("elman", "rnn_relu")),
}


class TorchLayer(torch.nn.Module):
    """nn.LSTM/GRU/RNN seen through specc's interface: state (B, H), not (1, B, H)."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x, state):
        state = tuple(s[None] for s in state) if isinstance(state, tuple) else state[None]
        y, final = self.layer(x, state)
        return y, tuple(f[0] for f in final) if isinstance(final, tuple) else final[0]

    def named_parameters(self, *args, **kwargs):
        names = {"weight_ih_l0": "W_ih", "weight_hh_l0": "W_hh", "bias_ih_l0": "b_ih", "bias_hh_l0": "b_hh"}
        for n, p in self.layer.named_parameters():
            yield names[n], p


def assert_inference_keeps_c_in_two_blocks(backend, monkeypatch):
    """Without training, the LSTM's c (read by nothing after the loop but its final value) lives in
    two blocks used in turn; h, the output, in one block a step. Training keeps both (backward
    reads every c)."""
    module = specc.load("lstm", I=3, H=4, backend=backend)
    T, B = 50, 2
    rows, real = [], torch.empty

    def empty(*args, **kwargs):
        made = real(*args, **kwargs)
        rows.append(made.shape[0] if made.dim() else None)
        return made

    monkeypatch.setattr(torch, "empty", empty)
    x = torch.randn(T, B, 3)
    with torch.no_grad():
        module(x)
    assert rows.count((T + 1) * B) == 1 and rows.count(2 * B) == 1
    rows.clear()
    module(x)
    assert rows.count((T + 1) * B) == 2


def assert_long_inference_runs_in_chunks(backend, spec_cell, monkeypatch):
    """Without training, a sequence longer than two chunks runs a chunk at a time (CHUNK_ROWS set
    low here: chunks of 16 steps): the same outputs and final states as the NumPy backend's,
    and no buffer of the whole sequence's input-only values (the LSTM's W_ih @ x, T * B rows)."""
    dims = odd_dims(spec_cell.dims)
    ref = specc.load(spec_cell.path, spec_cell.cell, backend="numpy", **dims)
    if not own_inputs(ref.program):
        return
    ours = specc.load(spec_cell.path, spec_cell.cell, backend=backend, **dims)
    ours.load_state_dict(ref.state_dict())
    monkeypatch.setattr(ours.program, "CHUNK_ROWS", 1)
    T, B = 37, 2
    x = tuple(torch.randn(T, B, ref.sizes["inputs"][n][0]) for n in own_inputs(ref.program))
    state = tuple(torch.randn(B, ref.sizes["states"][n][0]) * 0.5 for n in ref.program.STATES)
    rows, real = [], torch.empty

    def empty(*args, **kwargs):
        made = real(*args, **kwargs)
        if made.dim() == 2:  # (rows, features); scratch and packed weights are flat
            rows.append(made.shape[0])
        return made

    monkeypatch.setattr(torch, "empty", empty)
    with torch.no_grad():
        torch.manual_seed(0)
        got = ours(x[0] if len(x) == 1 else x, state)
        torch.manual_seed(0)
        want = ref(x[0] if len(x) == 1 else x, state)
    for a, b in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert max(rows) <= 17 * B  # a chunk's steps and its initial state


ATTEND_SPEC = """
cell attend(N) {
    input x[N]
    state h[N] = zeros
    param W[N, N]
    param U[N, N]
    a = softmax(W @ h + x)
    h' = tanh(U @ (a * h) + x)
    output a
    output h'
}
"""


class AttendReference(torch.nn.Module):
    """ATTEND_SPEC as a torch loop: a softmax over each example's features inside the recurrence,
    feeding a product of the same step."""

    def __init__(self, N):
        super().__init__()
        self.W, self.U = torch.nn.Parameter(torch.randn(N, N) * 0.5), torch.nn.Parameter(torch.randn(N, N) * 0.5)

    def forward(self, x, h):
        attention = []
        for x_t in x:
            a = torch.softmax(h @ self.W.T + x_t, dim=1)
            h = torch.tanh((a * h) @ self.U.T + x_t)
            attention.append(a)
        return torch.stack(attention), h


def assert_softmax_in_the_recurrence(backend, device="cpu", tol=1e-5):
    """softmax and its gradient inside the loop, against autograd through the torch loop."""
    for N, B in ((5, 3), (37, 4), (70, 2)):
        ref = AttendReference(N)
        ours = specc.load(ATTEND_SPEC, N=N, backend=backend)
        ours.load_state_dict(ref.state_dict())
        ours.to(device)
        x, h0 = torch.randn(6, B, N), torch.randn(B, N)
        got, want = run(_FirstOutput(ours), x, [h0], device=device), run(ref, x, [h0])
        assert_same(got, want, tol)


class _FirstOutput(torch.nn.Module):
    """A module with outputs (a, h'): a, and the final state, as the reference gives them."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x, h):
        (a, _), final = self.module(x, h)
        return a, final

    def named_parameters(self, *args, **kwargs):
        return self.module.named_parameters(*args, **kwargs)


CONTRACT_SOFTMAX_SPEC = """
cell weigh(I, H) {
    input x[I]
    state h[H] = zeros
    param W[H, I, H]
    param U[I, H]
    p = softmax(x + U @ h)
    h' = tanh(contract(W, p, h))
    output h'
}
"""


class ContractSoftmaxReference(torch.nn.Module):
    """CONTRACT_SOFTMAX_SPEC as a torch loop: a softmax made in the step is a factor of x (x) h."""

    def __init__(self, I, H):
        super().__init__()
        self.W = torch.nn.Parameter(torch.randn(H, I, H) * 0.5)
        self.U = torch.nn.Parameter(torch.randn(I, H) * 0.5)

    def forward(self, x, h):
        states = []
        for x_t in x:
            p = torch.softmax(x_t + h @ self.U.T, dim=1)
            h = torch.tanh(torch.einsum("ijk,bj,bk->bi", self.W, p, h))
            states.append(h)
        return torch.stack(states), h


def assert_softmax_feeds_a_contraction(backend):
    ref = ContractSoftmaxReference(4, 6)
    ours = specc.load(CONTRACT_SOFTMAX_SPEC, I=4, H=6, backend=backend)
    ours.load_state_dict(ref.state_dict())
    x, h0 = torch.randn(5, 3, 4), torch.randn(3, 6)
    assert_same(run(ours, x, [h0]), run(ref, x, [h0]))


MINUS_INF_SPEC = """
cell scores(N) {
    input x[N]
    state h[N] = zeros
    h' = softmax(log(x) + h)
    output h'
}
"""


def assert_softmax_of_minus_inf_columns(backend):
    """A row whose first columns (more than a tile's) are -inf: they get 0, the rest a softmax."""
    x = torch.rand(3, 2, 70) + 0.5
    x[:, 0, :40] = 0.0  # log(0) = -inf
    ours = specc.load(MINUS_INF_SPEC, N=70, backend=backend)
    with torch.no_grad():
        y, h = ours(x)
        want, h_want = torch.zeros(2, 70), []
        for x_t in x:
            want = torch.softmax(torch.log(x_t) + want, dim=1)
            h_want.append(want)
    torch.testing.assert_close(y, torch.stack(h_want), rtol=1e-5, atol=1e-6)
    assert torch.equal(y[:, 0, :40], torch.zeros(3, 40))


def assert_matches_references(backend, device="cpu", B=3, tol=1e-5):
    """Every cell of test_references through `backend` on `device` against its hand-written torch
    loop on the CPU."""
    from conftest import Close
    from test_references import CASES, compare_with_reference

    for name, (_, dims, _) in CASES.items():
        compare_with_reference(name, dims, 5, B, torch.float32, Close(), tol=tol, scale=0.4, backend=backend,
                               device=device)


def library_cells() -> list[tuple[str, str, tuple[str, ...]]]:
    """(spec file's name, cell, its dimensions) of every cell of the library's spec files."""
    from specc.check import check
    from specc.library import spec_file, spec_names
    from specc.parse import parse

    out = []
    for name in spec_names():
        text = spec_file(name).read_text(encoding="utf-8")
        out += [(name, c.name, tuple(c.dims)) for c in check(parse(text, f"specs/{name}.rnn"))]
    return out


def assert_host_products_match_torch(monkeypatch, c_lib) -> None:
    """c_runtime.matmul (specc_matmul) on 1-3 threads, each product split by rows or by columns,
    for each of CBLAS's layouts (transposed views read in place), is torch's product."""
    from specc.backends import c_runtime

    torch.manual_seed(0)
    for threads in (1, 2, 3):
        monkeypatch.setattr(c_runtime, "_loop", [threads])
        monkeypatch.setattr(c_runtime, "MATMUL_SPLIT_MACS", 0)
        for M, K, N in ((37, 5, 11), (3, 7, 50), (1, 1, 1), (64, 64, 64)):
            a, w = torch.randn(M, K), torch.randn(K, N)
            for left in (a, a.T.contiguous().T):
                for right in (w, w.T.contiguous().T):
                    torch.testing.assert_close(c_runtime.matmul(c_lib, left, right), left @ right,
                                               atol=1e-5, rtol=1e-5)
                    start = torch.randn(M, N)
                    total = c_runtime.matmul(c_lib, left, right, add_to=start.clone())
                    torch.testing.assert_close(total, start + left @ right, atol=1e-5, rtol=1e-5)
