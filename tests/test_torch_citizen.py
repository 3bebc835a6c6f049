"""A compiled cell under torch's tracers (issue 16): torch.compile with fullgraph=True, torch.export
and torch.jit.trace, each against torch.nn.LSTM / nn.GRU with the same weights (specc.from_torch)."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import specc
from helpers import library_cells
from specc.backends import c_runtime

BACKENDS = ["numpy"] + (["c"] if c_runtime.problem() is None else [])
try:  # the op runs any backend: Triton's kernels too (its interpreter on CPU tensors, conftest.py)
    import triton  # noqa: F401

    BACKENDS.append("triton")
except ImportError:
    pass


def _pair(kind: str, backend: str, **kw):
    torch.manual_seed(0)
    ref = getattr(torch.nn, kind)(5, 7, **kw)
    return ref, specc.from_torch(ref, backend=backend)


def _grads(model, x):
    x = x.clone().requires_grad_(True)
    for p in model.parameters():
        p.grad = None
    out, final = model(x)
    final = final[0] if isinstance(final, tuple) else final
    (out.square().sum() + final.sum()).backward()
    return out.detach(), x.grad, [p.grad for p in model.parameters()]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,kw", [("LSTM", {}), ("GRU", dict(num_layers=2, bidirectional=True, batch_first=True))])
def test_compile_fullgraph_matches_torch_nn(kind, kw, backend):
    ref, m = _pair(kind, backend, **kw)
    x = torch.randn(6, 3, 5)
    want_out, want_dx, want_dw = _grads(ref, x)
    torch._dynamo.reset()
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")  # a graph break is an error
    out, dx, dw = _grads(compiled, x)
    assert torch.allclose(out, want_out, atol=1e-5)
    assert torch.allclose(dx, want_dx, atol=1e-5)
    assert len(dw) == len(want_dw)
    for got, want in zip(dw, want_dw):
        assert torch.allclose(got, want, atol=1e-4)


def test_compile_with_inductor_trains():
    ref, m = _pair("LSTM", "auto")
    torch._dynamo.reset()
    compiled = torch.compile(m, fullgraph=True)
    x = torch.randn(4, 2, 5)
    out, dx, dw = _grads(compiled, x)
    want_out, want_dx, want_dw = _grads(ref, x)
    assert torch.allclose(out, want_out, atol=1e-5) and torch.allclose(dx, want_dx, atol=1e-5)
    for got, want in zip(dw, want_dw):
        assert torch.allclose(got, want, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_export_runs_and_equals_eager(backend):
    ref, m = _pair("LSTM", backend, num_layers=2, batch_first=True)
    x = torch.randn(3, 6, 5)
    program = torch.export.export(m, (x,))
    calls = [n for n in program.graph.nodes if n.op == "call_function" and "specc.scan" in str(n.target)]
    assert len(calls) == 2  # one op a layer, nothing of specc's internals
    out, (h, c) = program.module()(x)
    want, (want_h, want_c) = ref(x)
    assert torch.allclose(out, want, atol=1e-5)
    assert torch.allclose(h, want_h, atol=1e-5) and torch.allclose(c, want_c, atol=1e-5)


def test_jit_trace_passes_its_check():
    ref, m = _pair("GRU", "numpy")
    x = torch.randn(6, 3, 5)
    with pytest.warns(torch.jit.TracerWarning):  # the shape checks of forward are Python ifs
        traced = torch.jit.trace(m, (x,))  # check_trace: traced twice, run, compared
    y = torch.randn(6, 3, 5)
    assert torch.allclose(traced(y)[0], ref(y)[0], atol=1e-5)


def test_exported_program_runs_in_another_process(tmp_path):
    """The op names its cell by the generated module's digest: a fresh process that loads the same
    cell runs a saved program; one that has not gets a message saying so."""
    m = specc.load("gru", I=5, H=7, backend="numpy")
    x = torch.randn(4, 2, 5)
    path = tmp_path / "gru.pt2"
    torch.export.save(torch.export.export(m, (x,)), str(path))
    torch.save(x, tmp_path / "x.pt")
    want = m(x)[0]
    torch.save(want, tmp_path / "want.pt")
    script = textwrap.dedent(f"""
        import sys, torch, specc
        program = torch.export.load({str(path)!r})
        x = torch.load({str(tmp_path / 'x.pt')!r})
        if sys.argv[1] == "load":
            specc.load("gru", I=5, H=7, backend="numpy")
        out = program.module()(x)[0]
        assert torch.allclose(out, torch.load({str(tmp_path / 'want.pt')!r}), atol=1e-6)
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script, "load"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]
    done = subprocess.run([sys.executable, "-c", script, "none"], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "is not loaded in this process" in done.stderr


def test_eager_calls_do_not_go_through_the_op(monkeypatch):
    """The op runs the forward twice for a gradient; an eager call must not pay for that."""
    from specc import torch_ops

    m = specc.load("lstm", I=5, H=7, backend="numpy")
    monkeypatch.setattr(torch_ops, "run", lambda *a, **k: pytest.fail("eager call went through the op"))
    out, _ = m(torch.randn(4, 2, 5, requires_grad=True))
    out.sum().backward()


LAYERS = [
    lambda: torch.nn.LSTM(5, 7),
    lambda: torch.nn.LSTM(5, 7, num_layers=2, bidirectional=True, batch_first=True),
    lambda: torch.nn.LSTM(5, 7, num_layers=2, proj_size=3),
    lambda: torch.nn.GRU(5, 7, num_layers=3, dropout=0.25),
    lambda: torch.nn.RNN(5, 7, nonlinearity="relu", bidirectional=True),
]


@pytest.mark.parametrize("make", LAYERS)
def test_state_dict_and_sizes_round_trip_with_torch(make):
    torch.manual_seed(1)
    theirs, other = make(), make()
    m = specc.from_torch(theirs, backend="numpy")
    for name in ("input_size", "hidden_size", "num_layers", "bidirectional", "proj_size", "bias", "batch_first", "dropout"):
        assert getattr(m, name) == getattr(theirs, name), name
    m.load_state_dict(other.state_dict())  # torch's own keys: weight_ih_l0, bias_hh_l1_reverse, ...
    m.eval(), other.eval()
    x = torch.randn(4, 3, 5)
    assert torch.allclose(m(x)[0], other(x)[0], atol=1e-5)
    back = specc.to_torch(m)
    assert type(back) is type(other)
    assert back.state_dict().keys() == other.state_dict().keys()
    for k, v in other.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    back.eval()
    assert torch.allclose(back(x)[0], other(x)[0], atol=1e-6)


def test_to_torch_refuses_a_module_that_does_not_know_its_torch_layer():
    with pytest.raises(TypeError, match="made by specc.from_torch"):
        specc.to_torch(specc.load("lstm", I=3, H=4))


def test_torch_func_transforms_are_refused_in_one_line():
    m = specc.load("lstm", I=3, H=4, backend="numpy")
    x = torch.randn(5, 2, 3)
    for transform in (torch.func.grad(lambda x: m(x)[0].sum()), torch.func.vmap(lambda x: m(x)[0])):
        with pytest.raises(RuntimeError, match="do not run under torch.func transforms"):
            transform(x)
    out = torch.func.functional_call(m, dict(m.named_parameters()), (x,))[0]
    assert torch.allclose(out, m(x)[0])


@pytest.mark.parametrize("name,dims,named", [("classifier", dict(V=11, E=6, H=8, C=3), None),
                                             ("char_lm", dict(V=11, E=6, H=8), "next"),  # teacher forcing
                                             ("reverse", dict(V=11, E=6, H=8), "target")])
def test_a_network_compiles_and_exports_equal_to_eager(name, dims, named):
    torch.manual_seed(0)
    net = specc.load(name, backend="numpy", **dims).eval()  # char_lm drops out in training
    x = torch.randint(0, 11, (7, 2))
    args, kwargs = ((), {named: x}) if named == "next" else ((x,), {named: x[:5]} if named else {})
    want = net(*args, **kwargs)
    torch._dynamo.reset()
    got = torch.compile(net, fullgraph=True, backend="aot_eager")(*args, **kwargs)
    exported = torch.export.export(net, args, kwargs).module()(*args, **kwargs)
    flat = lambda v: [t for t in (v if isinstance(v, tuple) else (v,)) if isinstance(t, torch.Tensor)]
    assert len(flat(want)) == len(flat(got)) == len(flat(exported)) > 0
    for w, g, e in zip(flat(want), flat(got), flat(exported)):
        assert torch.allclose(g, w, atol=1e-6) and torch.allclose(e, w, atol=1e-6)


@pytest.mark.parametrize("spec,cell,dims", library_cells(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_library_cell_compiles_fullgraph_and_exports_equal_to_eager(spec, cell, dims):
    from specc.runtime import own_inputs

    torch.manual_seed(0)
    m = specc.load(spec, cell, backend="numpy", **dict(zip(dims, [5, 7, 3, 4, 6]))).eval()
    xs = tuple(torch.randn(4, 2, m.sizes["inputs"][n][0]) for n in own_inputs(m.program))
    assert xs  # every library cell reads an input sequence
    x = xs[0] if len(xs) == 1 else xs
    want = m(x)
    flat = lambda v: [t for part in v for t in (part if isinstance(part, tuple) else (part,))]
    torch._dynamo.reset()
    got = torch.compile(m, fullgraph=True, backend="aot_eager")(x)
    exported = torch.export.export(m, (x,)).module()(x)
    for w, g, e in zip(flat(want), flat(got), flat(exported)):
        assert torch.allclose(g, w, atol=1e-6) and torch.allclose(e, w, atol=1e-6)
