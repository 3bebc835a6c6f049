"""Networks built with the language against torch.nn: stacked, bidirectional, packed variable-length
batches (outputs, final states and every gradient), pooling, state_dict, and the wiring errors.

References are torch.nn modules with the same weights copied in, and plain torch code.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import specc
from specc.errors import SpecError

F64 = torch.float64

DEEP = """
network deep(I, H) {
    \"\"\"Three stacked bidirectional layers; each layer's input size comes from the one below.\"\"\"
    input x: sequence[I]
    layer enc = CELL(H=H) stacked 3 bidirectional
    output y = x -> enc
    output top = enc.h
}
"""


def copy_torch_weights(ours, theirs: nn.RNNBase) -> None:
    """torch's weight_ih_l{k}{_reverse}, ... into our layer k, direction d (the same layout)."""
    names = {"weight_ih": "W_ih", "weight_hh": "W_hh", "bias_ih": "b_ih", "bias_hh": "b_hh", "weight_hr": "W_hr"}
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            kind, layer = name.rsplit("_l", 1)
            direction = 1 if layer.endswith("_reverse") else 0
            k = int(layer.removesuffix("_reverse"))
            getattr(ours.cell(k, direction), names[kind]).copy_(p)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_three_layer_bidirectional_matches_torch_with_packed_batches(kind):
    I, H, T, B = 3, 4, 7, 5
    net = specc.load(DEEP.replace("CELL", kind), I=I, H=H, dtype=F64)
    ref = getattr(nn, kind.upper())(I, H, num_layers=3, bidirectional=True, dtype=F64)
    enc = net.layers["enc"]
    assert (enc.num_layers, enc.num_directions) == (3, 2)
    copy_torch_weights(enc, ref)

    lengths = torch.tensor([4, 7, 1, 3, 7])  # unsorted, with ties and a length-1 sequence
    x = torch.randn(T, B, I, dtype=F64)
    x_ref, x_ours, x_net = (x.clone().requires_grad_() for _ in range(3))

    out_ref, fin_ref = ref(pack_padded_sequence(x_ref, lengths, enforce_sorted=False))
    out_ours, fin_ours = enc(pack_padded_sequence(x_ours, lengths, enforce_sorted=False))
    fin_ref = fin_ref if isinstance(fin_ref, tuple) else (fin_ref,)
    fin_ours = fin_ours if isinstance(fin_ours, tuple) else (fin_ours,)

    # The packed output: same data, same batch order.
    assert torch.equal(out_ours.batch_sizes, out_ref.batch_sizes)
    assert torch.equal(out_ours.sorted_indices, out_ref.sorted_indices)
    torch.testing.assert_close(out_ours.data, out_ref.data, rtol=1e-10, atol=1e-10)
    # Every layer's and direction's final state, each at its sequence's own last step.
    for got, want in zip(fin_ours, fin_ref, strict=True):
        assert got.shape == want.shape == (6, B, H)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)

    # The network itself, given padded input and lengths: zero past each end, as torch pads.
    padded_ref, _ = pad_packed_sequence(out_ref, total_length=T)
    y, top = net(x_net, lengths=lengths)
    torch.testing.assert_close(y, padded_ref, rtol=1e-10, atol=1e-10)
    assert torch.all(y[5:, 3] == 0) and torch.all(y[1:, 2] == 0)
    torch.testing.assert_close(top, torch.cat([fin_ref[0][4], fin_ref[0][5]], dim=-1), rtol=1e-10, atol=1e-10)

    # Every gradient: of the input and of all 3 x 2 x 4 parameters.
    w_out = torch.randn_like(padded_ref)
    w_fin = [torch.randn_like(f) for f in fin_ref]

    def loss(out, fins):
        return (out * w_out).sum() + sum((f * w).sum() for f, w in zip(fins, w_fin))

    loss(padded_ref, fin_ref).backward()
    loss(pad_packed_sequence(out_ours, total_length=T)[0], fin_ours).backward()
    torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=1e-9, atol=1e-10)
    names = {"weight_ih": "W_ih", "weight_hh": "W_hh", "bias_ih": "b_ih", "bias_hh": "b_hh"}
    checked = 0
    for name, p in ref.named_parameters():
        kind_, layer = name.rsplit("_l", 1)
        ours = getattr(enc.cell(int(layer.removesuffix("_reverse")), int(layer.endswith("_reverse"))), names[kind_])
        torch.testing.assert_close(ours.grad, p.grad, rtol=1e-9, atol=1e-10, msg=name)
        checked += 1
    assert checked == 24


def test_dropout_between_layers_only_in_training():
    net = specc.load(DEEP.replace("CELL", "gru").replace("bidirectional", "dropout 0.5"), I=3, H=4, dtype=F64)
    x = torch.randn(5, 2, 3, dtype=F64)
    net.eval()
    assert torch.equal(net(x)[0], net(x)[0])
    net.train()
    a, b = net(x)[0], net(x)[0]
    assert not torch.equal(a, b)


def test_pooling_and_last_step_follow_each_sequence_length():
    spec = """
    network pools(I, H) {
        input x: sequence[I]
        layer enc = rnn_tanh(H=H)
        h = x -> enc
        output at_last = h -> last
        output averaged = h -> mean
        output largest = h -> max
        output final = enc.h
    }
    """
    net = specc.load(spec, I=3, H=4, dtype=F64)
    ref = nn.RNN(3, 4, dtype=F64)
    copy_torch_weights(net.layers["enc"], ref)
    x = torch.randn(6, 4, 3, dtype=F64)
    lengths = torch.tensor([6, 2, 5, 1])
    last, mean, mx, final = net(x, lengths=lengths)
    for b, n in enumerate(lengths.tolist()):
        steps, _ = ref(x[:n, b])  # one unpadded sequence
        torch.testing.assert_close(last[b], steps[-1])
        torch.testing.assert_close(final[b], steps[-1])
        torch.testing.assert_close(mean[b], steps.mean(0))
        torch.testing.assert_close(mx[b], steps.max(0).values)


def test_state_dict_saves_and_loads_a_network(tmp_path):
    dims = dict(V=7, E=5, H=6, C=3)
    a = specc.load("classifier", **dims)
    path = tmp_path / "classifier.pt"
    torch.save(a.state_dict(), path)
    b = specc.load("classifier", **dims)
    tokens = torch.randint(0, 7, (5, 3))
    assert not torch.equal(a(tokens), b(tokens))
    b.load_state_dict(torch.load(path))
    assert torch.equal(a(tokens), b(tokens))
    assert any(k.startswith("layers.enc.cells.l0_reverse.") for k in a.state_dict())


def test_one_to_one_and_one_to_many_shapes():
    spec = """
    network shapes(I, H, O) {
        input z: vector[I]
        layer hidden = linear(I, H)
        layer out = linear(O)
        layer every = rnn_tanh(H=H)
        layer once = rnn_tanh(H=H)
        output single = z -> hidden -> tanh -> out
        output each = z -> repeat -> every
        output start = z -> first -> once
    }
    """
    net = specc.load(spec, I=3, H=4, O=2, dtype=F64)
    z = torch.randn(5, 3, dtype=F64)
    single, each, start = net(z, steps=4)
    lin1, lin2 = net.layers["hidden"], net.layers["out"]
    torch.testing.assert_close(single, lin2(torch.tanh(lin1(z))))
    assert each.shape == start.shape == (4, 5, 4)
    for name, seq, got in (("every", z.expand(4, 5, 3), each),
                           ("once", torch.cat([z[None], torch.zeros(3, 5, 3, dtype=F64)]), start)):
        ref = nn.RNN(3, 4, dtype=F64)
        with torch.no_grad():
            cell = net.layers[name].cell()
            ref.weight_ih_l0.copy_(cell.W_ih), ref.weight_hh_l0.copy_(cell.W_hh)
            ref.bias_ih_l0.copy_(cell.b_ih), ref.bias_hh_l0.copy_(cell.b_hh)
        torch.testing.assert_close(got, ref(seq)[0])


# --- wiring errors, each at the spec's line and column ---

def _error(spec: str) -> str:
    with pytest.raises(SpecError) as e:
        specc.load(spec, V=5, E=4, H=3, C=2)
    return e.value.format()


def test_sizes_that_do_not_connect_are_reported_where_they_meet():
    spec = """network bad(V, E, H, C) {
    input tokens: tokens[V]
    layer embed = embedding(V, E)
    layer enc = gru(H=H) bidirectional
    layer head = linear(H, C)
    output y = tokens -> embed -> enc -> head
}"""
    msg = _error(spec)
    assert msg.startswith("<spec>:6:42: error: sizes do not connect: linear layer 'head' takes H features, "
                          "but its input is a sequence of 2*H-vectors"), msg
    assert "\n    " + " " * 41 + "^" in msg


def test_a_decoder_without_an_encoder_is_reported():
    spec = """network bad(V, E, H, C) {
    layer embed = embedding(V, E)
    layer enc = gru(H=H)
    layer dec = gru(H=H)
    layer head = linear(H, V)
    output y = prev(y) -> embed -> dec(h = enc.h) -> head
}"""
    msg = _error(spec)
    assert msg.startswith("<spec>:6:44: error: 'enc' is not run on any input, so enc.h has no value "
                          "(a decoder without an encoder)"), msg


def test_a_cycle_is_reported():
    spec = """network bad(V, E, H, C) {
    input x: sequence[E]
    layer a = linear(E, E)
    layer b = linear(E, E)
    p = q -> a
    q = p -> b
    output y = q
}"""
    msg = _error(spec)
    assert msg.startswith("<spec>:6:9: error: 'p' depends on itself: a cycle p -> q -> p"), msg


def test_an_output_fed_to_itself_without_prev_is_a_cycle_with_a_hint():
    spec = """network bad(V, E, H, C) {
    layer embed = embedding(V, E)
    layer head = linear(E, V)
    output y = y -> embed -> head
}"""
    msg = _error(spec)
    assert msg.startswith("<spec>:4:16: error: 'y' depends on itself"), msg
    assert "prev(y)" in msg


def test_several_wiring_errors_are_reported_together():
    spec = """network bad(V, E, H, C) {
    input tokens: tokens[V]
    layer embed = embedding(V, E)
    layer enc = lstmm(H=H)
    layer head = linear(H, C)
    output y = tokens -> head
    output z = tokens -> embd
}"""
    msg = _error(spec)
    lines = [line for line in msg.splitlines() if ": error: " in line]
    assert lines[0].startswith("<spec>:4:17: error: unknown layer 'lstmm'; did you mean 'lstm'?"), msg
    assert len(lines) == 1  # declarations are checked first; chains only once they are right
    msg = _error(spec.replace("lstmm", "lstm"))
    lines = [line for line in msg.splitlines() if ": error: " in line]
    assert lines[0].startswith("<spec>:6:26: error: linear layer 'head' reads vectors, but its input is "
                               "a sequence of token ids"), msg
    assert lines[1].startswith("<spec>:7:26: error: unknown layer 'embd'; did you mean 'embed'?"), msg


def test_the_library_networks_all_check():
    from specc.check import check
    from specc.library import spec_file
    from specc.network_check import check_networks
    from specc.parse import parse

    path = spec_file("networks")
    spec = parse(path.read_text(encoding="utf-8"), "specs/networks.rnn")
    names = {n.name for n in check_networks(spec, check(spec))}
    assert {"char_lm", "classifier", "reverse", "encoder_decoder", "generator"} <= names


def test_language_model_and_generator_train_and_generate():
    lm = specc.load("char_lm", V=6, E=4, H=5)
    text = torch.randint(0, 6, (7, 3))
    scores = lm(next=text)
    assert scores.shape == (7, 3, 6)
    scores.logsumexp(-1).sum().backward()
    assert all(p.grad is not None for p in lm.parameters())
    lm.eval()
    tokens, lengths = lm.generate(batch=2, max_len=5, sample=True, generator=torch.Generator().manual_seed(0))
    assert tokens.shape == (5, 2) and torch.equal(lengths, torch.tensor([5, 5]))

    gen = specc.load("generator", I=3, V=6, E=4, H=5, dtype=F64)
    features = torch.randn(2, 3, dtype=F64)
    tokens, _ = gen.generate(features, max_len=4)
    # Greedy decoding, step by step, agrees with teacher forcing on the tokens it chose.
    assert torch.equal(gen(features, tokens=tokens).argmax(-1), tokens)


LM = """network lm(V, E, H) {
        layer embed = embedding(V, E)
        layer rnn = gru(H=H)
        layer head = linear(H, V)
        output y = prev(y, start=START) -> embed -> rnn -> head
    }"""


@pytest.mark.parametrize("start, words", [
    ("V", "but V is not below V for every V"),
    ("V + 2", "but V + 2 is not below V for every V"),
    ("-1", "got -1"),
    ("1 - 2*V", "but -2*V + 1 < 0 for every V"),
    ("1 / 2", "got 1/2"),
])
def test_a_start_token_that_is_never_a_token_id_is_reported_at_its_place(start, words):
    # A token id of y is a whole number from 0 to V - 1: these are outside for every V.
    msg = _error(LM.replace("START", start))
    assert msg.startswith("<spec>:5:34: error: the start token of prev(y) must be a token id of y, a whole number "
                          "from 0 to V - 1 (y scores V tokens), " + words), msg
    assert msg.splitlines()[2] == "    " + " " * 33 + "^"


@pytest.mark.parametrize("start, words", [
    ("V / 0", "<spec>:5:36: error: a token id can only be divided by a positive whole number"),
    ("0.5", "<spec>:5:34: error: a token id must be a whole number, got 0.5"),
    ("sqrt(V)", "<spec>:5:34: error: sqrt(...) cannot be used in a token id"),
])
def test_a_start_token_that_is_no_whole_number_is_reported(start, words):
    msg = _error(LM.replace("START", start))
    assert msg.startswith(words), msg


def test_a_start_token_that_the_dimensions_make_wrong_is_refused_at_load_at_its_line():
    spec = LM.replace("START", "V - 6")  # a token id when V is 6 or more
    with pytest.raises(ValueError) as e:
        specc.load(spec, V=5, E=3, H=4)
    assert isinstance(e.value, SpecError)
    assert str(e.value).startswith("<spec>:5:34: error: with V=5, E=3, H=4, the start token of prev(y) would be "
                                   "V - 6 = -1; it must be a token id of y, a whole number from 0 to 4 "
                                   "(y scores 5 tokens)"), str(e.value)
    assert specc.load(spec, V=8, E=3, H=4).start == 2
    assert specc.load(LM.replace("START", "V - 1"), V=5, E=3, H=4).start == 4
    with pytest.raises(ValueError, match="start token of prev.y. would be V/2 = 5/2; it must be"):
        specc.load(LM.replace("START", "V / 2"), V=5, E=3, H=4)


def test_specc_check_reports_a_start_token_out_of_range(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "lm.rnn"
    path.write_text(LM.replace("START", "-1") + "\n")
    result = subprocess.run([sys.executable, "-m", "specc.cli", "check", str(path)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.startswith(f"{path}:5:34: error: the start token of prev(y) must be a token id of y"), \
        result.stderr
    assert "Traceback" not in result.stderr


def test_packed_sequences_packed_sorted_and_checked_lengths():
    from torch.nn.utils.rnn import pack_padded_sequence

    torch.manual_seed(1)
    ref = nn.GRU(3, 4, num_layers=2, bidirectional=True)
    ours = specc.from_torch(ref)
    x = torch.randn(4, 3, 3)
    packed = pack_padded_sequence(x, torch.tensor([4, 3, 1]))  # enforce_sorted=True: no sorted_indices
    (got, h), (want, h_ref) = ours(packed), ref(packed)
    torch.testing.assert_close(got.data, want.data, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-5)
    for bad in ([4, 0, 1], [5, 3, 1], [2.5, 3.0, 1.0]):
        with pytest.raises(ValueError, match="length"):
            ours(x, lengths=torch.tensor(bad))
    net = specc.load("classifier", V=10, E=4, H=5, C=3)
    with pytest.raises(TypeError, match="'tokenz'"):
        net(torch.randint(0, 10, (6, 2)), lengths={"tokenz": torch.tensor([6, 3])})
