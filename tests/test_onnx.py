"""ONNX export (issue 16): every library cell and random cells, written by specc.export_onnx and
run in onnxruntime, against the module in eval (float32, 1e-5)."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings

import specc
from helpers import library_cells
from specc.fuzz.gen import cells
from specc.onnx_export import ACTIVATION_NODES, export_onnx
from specc.ops import ACTIVATIONS
from specc.runtime import own_inputs

ort = pytest.importorskip("onnxruntime")  # a test extra: pip install -e '.[test]'


SIZES = [5, 7, 3, 4, 6]


def _session(path):
    options = ort.SessionOptions()
    options.log_severity_level = 3  # not the warning for each weight a forward does not read
    return ort.InferenceSession(str(path), options)


def _compare(m, path, T=6, B=3, seed=0, rtol=1e-5, atol=1e-5):
    torch.manual_seed(seed)
    sess = _session(path)
    prog = m.program
    xs = [torch.randn(T, B, m.sizes["inputs"][n][0]) for n in own_inputs(prog)]
    states = [torch.randn(B, m.sizes["states"][n][0]) for n in prog.STATES]
    assert [i.name for i in sess.get_inputs()][:len(xs)] == list(own_inputs(prog))
    assert len(sess.get_inputs()) == len(xs) + len(states)
    out, final = m(xs[0] if len(xs) == 1 else tuple(xs), states[0] if len(states) == 1 else tuple(states))
    want = [*(out if isinstance(out, tuple) else (out,)), *(final if isinstance(final, tuple) else (final,))]
    got = sess.run(None, {i.name: v.numpy() for i, v in zip(sess.get_inputs(), xs + states)})
    assert len(got) == len(want)
    for g, w in zip(got, want):
        w = w.detach().numpy()
        if np.isfinite(w).all():
            scale = max(1.0, float(np.abs(w).max()))
            np.testing.assert_allclose(g, w, rtol=rtol, atol=atol * scale)


@pytest.mark.parametrize("spec,cell,dims", library_cells(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_library_cell_runs_in_onnxruntime_as_in_specc(spec, cell, dims, tmp_path):
    m = specc.load(spec, cell, backend="numpy", **dict(zip(dims, SIZES))).eval()
    path = export_onnx(m, tmp_path / f"{cell}.onnx")
    _compare(m, path)
    _compare(m, path, T=1, B=1, seed=1)  # T and B are free in the graph


@settings(max_examples=int(os.environ.get("SPECC_ONNX_CELLS", "40")), derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(cells())
def test_random_cells_run_in_onnxruntime_as_in_specc(tmp_path_factory, cell):
    """What users write, not only what we wrote: cells drawn from every construct of the language."""
    m = specc.load(cell.text, backend="numpy", **cell.dims).eval()
    assume(own_inputs(m.program))  # a cell without inputs takes T from steps=, which ONNX has not
    path = export_onnx(m, tmp_path_factory.mktemp("onnx") / "cell.onnx")
    _compare(m, path, T=4, B=2, rtol=1e-4, atol=1e-4)


def test_every_activation_has_an_onnx_spelling():
    assert set(ACTIVATION_NODES) == set(ACTIVATIONS)


def test_the_graph_hoists_the_input_product_out_of_the_scan(tmp_path):
    import onnx

    path = export_onnx(specc.load("lstm", I=5, H=7), tmp_path / "lstm.onnx")
    model = onnx.load(str(path))
    main_ops = [n.op_type for n in model.graph.node]
    assert main_ops.count("Scan") == 1 and "MatMul" in main_ops  # W_ih @ x for all steps, before
    body = next(n for n in model.graph.node if n.op_type == "Scan").attribute[0].g
    assert [n.op_type for n in body.node].count("MatMul") == 1  # W_hh @ h, the only product a step
    assert {i.name for i in model.graph.initializer} == {"W_ih", "W_hh", "b_ih", "b_hh"}


def test_from_torch_lstm_exports_and_equals_torch(tmp_path):
    ref = torch.nn.LSTM(5, 7)
    path = export_onnx(specc.from_torch(ref), tmp_path / "lstm.onnx")
    x, h0, c0 = torch.randn(6, 3, 5), torch.randn(3, 7), torch.randn(3, 7)
    out, h, c = _session(path).run(None, {"x": x.numpy(), "h0": h0.numpy(), "c0": c0.numpy()})
    want, (want_h, want_c) = ref(x, (h0[None], c0[None]))
    np.testing.assert_allclose(out, want.detach().numpy(), atol=1e-5)
    np.testing.assert_allclose(c, want_c[0].detach().numpy(), atol=1e-5)


@pytest.mark.parametrize("make", [
    lambda: specc.from_torch(torch.nn.LSTM(5, 7, num_layers=2, bidirectional=True), backend="numpy"),
    lambda: specc.from_torch(torch.nn.GRU(5, 7, num_layers=2, batch_first=True), backend="numpy"),
], ids=["lstm_2_layers_bidirectional", "gru_2_layers_batch_first"])
def test_stacked_layers_export_and_equal_torch(make, tmp_path):
    torch.manual_seed(0)
    layer = make().eval()
    x = torch.randn(3, 6, 5) if layer.batch_first else torch.randn(6, 3, 5)
    path = export_onnx(layer, tmp_path / "layer.onnx", x)
    x = torch.randn(2, 4, 5) if layer.batch_first else torch.randn(4, 2, 5)  # T and B are free
    got = _session(path).run(None, {_session(path).get_inputs()[0].name: x.numpy()})
    back = specc.to_torch(layer).eval()  # the torch layer itself, as the reference
    out, final = back(x)
    finals = final if isinstance(final, tuple) else (final,)
    assert len(got) == 1 + len(finals)
    for g, w in zip(got, (out, *finals)):
        np.testing.assert_allclose(g, w.detach().numpy(), atol=1e-5)


@pytest.mark.parametrize("name,dims,named", [("classifier", dict(V=11, E=6, H=8, C=3), None),
                                             ("char_lm", dict(V=11, E=6, H=8), "next"),
                                             ("reverse", dict(V=11, E=6, H=8), "target")])
def test_networks_export_and_equal_eager(name, dims, named, tmp_path):
    torch.manual_seed(0)
    net = specc.load(name, backend="numpy", **dims).eval()
    x = torch.randint(0, 11, (7, 2))
    args, kwargs = ((), {named: x}) if named == "next" else ((x,), {named: x[:5]} if named else {})
    path = export_onnx(net, tmp_path / f"{name}.onnx", args, kwargs)
    sess = _session(path)
    # run on other lengths and batch sizes than the example's: T and B are free in the graph
    y = torch.randint(0, 11, (9, 3))
    args, kwargs = ((), {named: y}) if named == "next" else ((y,), {named: y[:4]} if named else {})
    feeds = [*args, *kwargs.values()]
    got = sess.run(None, {i.name: v.numpy() for i, v in zip(sess.get_inputs(), feeds)})
    want = net(*args, **kwargs)
    want = want if isinstance(want, tuple) else (want,)
    np.testing.assert_allclose(got[0], want[0].detach().numpy(), atol=1e-5)


def test_what_is_not_exported_is_refused_clearly(tmp_path):
    net = specc.load("classifier", V=5, E=3, H=4, C=2)
    with pytest.raises(TypeError, match="needs an example input"):
        export_onnx(net, tmp_path / "n.onnx")
    counter = specc.load("cell counter(H) {\n state h[H] = zeros\n h' = h + 1\n output h'\n}", H=2)
    with pytest.raises(ValueError, match="no input sequence"):
        export_onnx(counter, tmp_path / "c.onnx")


def test_specc_export_on_the_command_line(tmp_path, capsys):
    from specc.cli import main

    out = tmp_path / "gru.onnx"
    assert main(["export", "gru", "--onnx", str(out), "--dims", "I=6,H=8"]) == 0
    sess = _session(out)
    assert [i.name for i in sess.get_inputs()] == ["x", "h0"]
    assert main(["export", "gru", "--onnx", str(out), "--dims", "I=6,H=8"]) == 1  # exists: not overwritten
    assert "not overwriting" in capsys.readouterr().err
    assert main(["export", "gru", "--onnx", str(tmp_path / "g1.onnx"), "--dims", "I=6,H=eight"]) == 2
    assert "NAME=NUMBER" in capsys.readouterr().err
    assert main(["export", "gru", "--onnx", str(tmp_path / "g2.onnx"), "--dims", "I=6"]) == 1
    assert "H" in capsys.readouterr().err


def test_specc_export_of_a_training_checkpoint(tmp_path):
    from specc.cli import main
    from specc.train import config_from_dict, train

    cfg = config_from_dict({"model": {"spec": "gru", "dims": {"H": 8}}, "task": {"name": "hello"},
                            "train": {"batch_size": 4, "seq_len": 10, "steps": 3}, "out": str(tmp_path / "run")})
    train(cfg, progress=False)
    out = tmp_path / "model.onnx"
    assert main(["export", str(tmp_path / "run" / "checkpoint.pt"), "--onnx", str(out)]) == 0
    model = specc.load_checkpoint(tmp_path / "run" / "checkpoint.pt").eval()
    x = torch.tensor([[0, 1, 2, 2, 3, 0, 1], [1, 2, 3, 0, 1, 2, 2]]).T  # (T, B) tokens, not the example's sizes
    sess = _session(out)
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    np.testing.assert_allclose(got[0], model(x)[0].detach().numpy(), atol=1e-5)
