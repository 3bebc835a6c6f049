"""Finite differences against the generated BPTT, for every cell of every spec in specs/.

The cells are found when the tests are collected (conftest.py parses and checks each file and
parametrises `spec_cell`), so a spec added to specs/ is checked the day it lands.
torch.autograd.gradcheck compares the analytic Jacobian of the outputs and final states with a
central-difference one, in float64, with respect to the input sequence(s), the initial state(s)
and every parameter (passed in with torch.func.functional_call).
"""
from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from specc.runtime import own_inputs

F64 = torch.float64
LIBRARY = {"elman:elman", "elman:rnn_tanh", "elman:rnn_relu", "gru:gru", "gru_cho:gru_cho", "jordan:jordan",
           "lstm:lstm", "second_order:second_order", "shortcut:shortcut"}


def test_discovery_finds_every_spec_file(all_spec_cells, specs_dir):
    """The discovery itself works: every file yields cells, and the library's are all there."""
    assert {c.path.stem for c in all_spec_cells} == {p.stem for p in specs_dir.glob("*.rnn")}
    assert LIBRARY <= {c.id for c in all_spec_cells}


@pytest.mark.parametrize("T, B", [(3, 2), (1, 1)], ids=["T3B2", "T1B1"])
def test_gradcheck_bptt(spec_cell, T, B, load_small):
    module, dims = load_small(spec_cell, F64)
    prog, sizes = module.program, module.sizes

    # Parameters away from zero, so zero-initialised biases and gates are exercised too.
    names = [n for n, _ in module.named_parameters()]
    params = [(torch.randn_like(getattr(module, n)) * 0.5).requires_grad_() for n in names]
    xs = [torch.randn(T, B, sizes["inputs"][n][0], dtype=F64, requires_grad=True) for n in own_inputs(prog)]
    states = [torch.randn(B, sizes["states"][n][0], dtype=F64, requires_grad=True) for n in prog.STATES]
    n_x, n_s = len(xs), len(states)

    def run(*tensors):
        x, s, p = tensors[:n_x], tensors[n_x:n_x + n_s], tensors[n_x + n_s:]
        args = (x[0] if n_x == 1 else (tuple(x) if x else None)), (s[0] if n_s == 1 else tuple(s))
        kwargs = {} if x else {"steps": T}
        torch.manual_seed(0)  # a cell's own dropout: the same masks at every evaluation
        outs, finals = functional_call(module, dict(zip(names, p)), args, kwargs)
        outs = (outs,) if isinstance(outs, torch.Tensor) else tuple(outs)
        finals = (finals,) if isinstance(finals, torch.Tensor) else tuple(finals)
        return (*outs, *finals)

    inputs = (*xs, *states, *params)
    base = run(*inputs)
    assert len(base) == len(prog.OUTPUTS) + len(prog.STATES)
    assert all(o.dtype == F64 for o in base)
    # Every perturbed tensor really reaches the result (were one ignored, say a parameter read from
    # the module instead of the one passed in, gradcheck would pass with two zero Jacobians).
    loss = sum((o * torch.randn_like(o)).sum() for o in base)
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    labels = [*own_inputs(prog), *(s + "0" for s in prog.STATES), *names]
    for g, label in zip(grads, labels):
        assert g is not None and g.abs().max() > 0, f"{spec_cell.id} {dims}: no gradient reaches {label}"
    assert torch.autograd.gradcheck(run, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("backend", ["numpy", "c"])
def test_double_backward_is_refused_in_one_line(backend):
    """specc has each cell's gradient, not the gradient of that gradient: create_graph=True says
    so at once, in specc's words (torch's once_differentiable said it at the second pass)."""
    import specc

    m = specc.load("gru", I=3, H=4, backend=backend)
    out, _ = m(torch.randn(5, 2, 3))
    with pytest.raises(RuntimeError, match="cell 'gru': specc computes the gradient of a cell but not the "
                                           "gradient of that gradient"):
        torch.autograd.grad(out.sum(), list(m.parameters()), create_graph=True)
    out, _ = m(torch.randn(5, 2, 3))
    assert all(not g.requires_grad for g in torch.autograd.grad(out.sum(), list(m.parameters())))
