"""Every keyword of specc.load means the same for a network as for a cell, or is refused.

batch_first: each network is compared with itself loaded time-first, given the same weights and
the transposed inputs; its outputs must be the same after transposing back. backend: every cell
inside gets it, and a name no cell takes is refused with the cell's message. dtype: every
parameter and output has it.
"""
from __future__ import annotations

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import specc
from specc.runtime import CellModule

F64 = torch.float64
B = 3

SEQUENCES = """
network sequences(I, H, O) {
    \"\"\"Every kind of value that comes out: sequences, per-sequence vectors, token ids passed through,
    and a sequence made from a vector.\"\"\"
    input x: sequence[I]
    input ids: tokens[O]
    input z: vector[I]
    layer enc = lstm(H=H) stacked 2 bidirectional
    layer head = linear(O)
    layer spread = gru(H=H)
    output y = x -> enc -> head
    output top = enc.h
    output pooled = x -> tanh -> mean
    output echo = ids
    output each = z -> repeat -> spread
}
"""


def _pair(spec, **dims):
    """The same network time-first and batch-first, with the same weights."""
    torch.manual_seed(0)
    tf = specc.load(spec, dtype=F64, **dims)
    bf = specc.load(spec, dtype=F64, batch_first=True, **dims)
    bf.load_state_dict(tf.state_dict())
    tf.eval(), bf.eval()  # char_lm's dropout
    return tf, bf


def _same(got_bf, want_tf, per_sequence=False):
    got_bf = got_bf if isinstance(got_bf, tuple) else (got_bf,)
    want_tf = want_tf if isinstance(want_tf, tuple) else (want_tf,)
    assert len(got_bf) == len(want_tf)
    for got, want, vector in zip(got_bf, want_tf, per_sequence or [False] * len(got_bf)):
        back = got if vector else got.transpose(0, 1)
        assert back.shape == want.shape, (tuple(got.shape), tuple(want.shape))
        torch.testing.assert_close(back, want, rtol=1e-12, atol=1e-12)


def test_batch_first_many_to_one_classifier():
    tf, bf = _pair("classifier", V=10, E=4, H=5, C=3)
    tokens = torch.randint(0, 10, (B, 6))  # (B, T)
    lengths = torch.tensor([6, 2, 4])
    got, want = bf(tokens, lengths=lengths), tf(tokens.T, lengths=lengths)
    assert got.shape == want.shape == (B, 3)  # one label per sequence: (B, C) either way
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_batch_first_sequences_vectors_and_packed_input():
    tf, bf = _pair(SEQUENCES, I=3, H=4, O=5)
    x, ids, z = torch.randn(B, 7, 3, dtype=F64), torch.randint(0, 5, (B, 7)), torch.randn(B, 3, dtype=F64)
    lengths = torch.tensor([7, 3, 5])
    got = bf(x, ids, z, lengths={"x": lengths}, steps=4)
    want = tf(x.transpose(0, 1), ids.T, z, lengths={"x": lengths}, steps=4)
    assert got[0].shape == (B, 7, 5) and got[3].shape == (B, 7) and got[4].shape == (B, 4, 4)
    _same(got, want, per_sequence=[False, True, True, False, False])
    assert torch.all(got[0][1, 3:] == 0)  # zero past the end, now along the second axis

    # A PackedSequence carries its own layout; what comes out is still batch-first.
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    again = bf(packed, ids, z, steps=4)
    _same(again[:3], got[:3], per_sequence=[True, True, True])

    with pytest.raises(ValueError, match=r"\(B, T, n\)"):
        bf(x[0], ids, z, steps=4)


@pytest.mark.parametrize("name, dims", [("reverse", dict(V=7, E=4, H=5)),
                                        ("encoder_decoder", dict(V=7, W=6, E=4, H=5))])
def test_batch_first_seq2seq_teacher_forcing_and_decoding(name, dims):
    tf, bf = _pair(name, **dims)
    source, target = torch.randint(1, 6, (B, 5)), torch.randint(1, 6, (B, 4))
    lengths = {"source": torch.tensor([5, 2, 3]), "target": torch.tensor([4, 4, 1])}
    got = bf(source, target=target, lengths=lengths)
    want = tf(source.T, target=target.T, lengths=lengths)
    assert got.shape[:2] == (B, 4)
    _same(got, want)

    tokens, n = bf.generate(source, lengths=lengths["source"], max_len=6, end=0)
    tokens_tf, n_tf = tf.generate(source.T, lengths=lengths["source"], max_len=6, end=0)
    assert tokens.shape[0] == B and torch.equal(n, n_tf)
    assert torch.equal(tokens.T, tokens_tf)
    with pytest.raises(TypeError, match=r"target=\(B, T\)"):
        bf(source)


def test_batch_first_one_to_many_generator_and_language_model():
    tf, bf = _pair("generator", I=3, V=6, E=4, H=5)
    features, target = torch.randn(B, 3, dtype=F64), torch.randint(0, 6, (B, 4))
    _same(bf(features, tokens=target), tf(features, tokens=target.T))
    tokens, _ = bf.generate(features, max_len=5)
    assert tokens.shape == (B, 5)
    assert torch.equal(tokens.T, tf.generate(features, max_len=5)[0])

    tf, bf = _pair("char_lm", V=6, E=4, H=5)
    text = torch.randint(0, 6, (B, 8))
    _same(bf(next=text), tf(next=text.T))
    sampled = [net.generate(batch=2, max_len=5, sample=True, generator=torch.Generator().manual_seed(1))[0]
               for net in (bf, tf)]
    assert sampled[0].shape == (2, 5) and torch.equal(sampled[0].T, sampled[1])


def test_batch_first_must_be_a_bool():
    for spec, dims in (("classifier", dict(V=10, E=4, H=5, C=3)), ("lstm", dict(I=3, H=4))):
        with pytest.raises(TypeError, match="batch_first must be True or False, got 'yes'"):
            specc.load(spec, batch_first="yes", **dims)


def _cells(net):
    return [m for m in net.modules() if isinstance(m, CellModule)]


def test_backend_reaches_every_cell_of_a_network():
    net = specc.load("encoder_decoder", V=7, W=6, E=4, H=5, backend="numpy")
    cells = _cells(net)
    assert len(cells) == 2 and {c.backend for c in cells} == {"numpy"}
    net = specc.load(SEQUENCES, I=3, H=4, O=5, backend="numpy")
    cells = _cells(net)
    assert len(cells) == 5 and {c.backend for c in cells} == {"numpy"}  # 2 layers x 2 directions, and one
    assert net.backend == "numpy"
    out = net(torch.randn(6, B, 3), torch.randint(0, 5, (6, B)), torch.randn(B, 3), steps=2)
    assert out[0].shape == (6, B, 5)
    assert {c.backend for c in _cells(specc.load("classifier", V=10, E=4, H=5, C=3))} == {"auto"}


def test_an_unknown_backend_is_refused_with_the_cells_message():
    with pytest.raises(ValueError) as cell:
        specc.load("gru", I=3, H=4, backend="cuda")
    for spec, dims in (("classifier", dict(V=10, E=4, H=5, C=3)),
                       ("network n(I, O) {\n  input x: vector[I]\n  layer f = linear(I, O)\n  output y = x -> f\n}",
                        dict(I=2, O=3))):  # no recurrent layer: refused all the same
        with pytest.raises(ValueError) as net:
            specc.load(spec, backend="cuda", **dims)
        assert str(net.value) == str(cell.value) == "unknown backend 'cuda'; expected 'auto', 'numpy', 'c' or 'triton'"


def test_dtype_reaches_every_parameter_and_output_of_a_network():
    net = specc.load("reverse", V=7, E=4, H=5, dtype=F64)
    assert {p.dtype for p in net.parameters()} == {F64}
    scores = net(torch.randint(0, 7, (5, 2)), target=torch.randint(0, 7, (3, 2)))
    assert scores.dtype == F64
    assert {p.dtype for p in specc.load("reverse", V=7, E=4, H=5).parameters()} == {torch.get_default_dtype()}
    for bad in (torch.int64, "float64"):
        for spec, dims in (("reverse", dict(V=7, E=4, H=5)), ("gru", dict(I=3, H=4))):
            with pytest.raises(TypeError, match="dtype must be a floating-point torch.dtype"):
                specc.load(spec, dtype=bad, **dims)


def test_dimensions_of_a_network_are_checked_as_a_cells_are():
    with pytest.raises(TypeError, match="dimension C not bound; pass C=..."):
        specc.load("classifier", V=10, E=4, H=5)
    with pytest.raises(TypeError, match="no dimension Z"):
        specc.load("classifier", V=10, E=4, H=5, C=3, Z=2)
    with pytest.raises(ValueError, match="dimension H must be a positive whole number"):
        specc.load("classifier", V=10, E=4, H=0, C=3)
