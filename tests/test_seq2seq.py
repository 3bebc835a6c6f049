"""Encoder-decoder networks: teacher forcing against hand-written torch, gradcheck from the decoder's
outputs back into the encoder, greedy decoding consistent with teacher forcing, and a seq2seq model
that learns to reverse digit sequences.
"""
from __future__ import annotations

import ctypes

import pytest
import torch
import torch.nn.functional as F

import specc

F64 = torch.float64


def _eager_encoder_decoder(net, source, source_lengths, target, start):
    """specs/networks.rnn's encoder_decoder written out in torch: an LSTM encoder whose final
    state (at each sequence's own last step) is the context c; a decoder step
    s_t = tanh(W_y y_{t-1} + W_s s_{t-1} + W_c c + b) with s_0 = c; a linear head."""
    L = net.layers
    src_emb, tgt_emb, head = L["source_embed"].weight, L["target_embed"].weight, L["head"]
    enc, dec = L["enc"].cell(), L["dec"].cell()
    T, B = source.shape
    h = torch.zeros(B, enc.W_hh.shape[1], dtype=F64)
    c = torch.zeros_like(h)
    for t in range(T):
        x = src_emb[source[t]]
        i, f, g, o = (x @ enc.W_ih.T + enc.b_ih + h @ enc.W_hh.T + enc.b_hh).chunk(4, dim=-1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h_new = torch.sigmoid(o) * torch.tanh(c_new)
        alive = (t < source_lengths)[:, None]
        h, c = torch.where(alive, h_new, h), torch.where(alive, c_new, c)
    context, s = h, h
    outputs = []
    previous = torch.full((B,), start, dtype=torch.long)
    for t in range(target.shape[0]):
        y = tgt_emb[previous]
        s = torch.tanh(y @ dec.W_y.T + s @ dec.W_s.T + context @ dec.W_c.T + dec.b)
        outputs.append(head(s))
        previous = target[t]  # teacher forcing
    return torch.stack(outputs)


def test_teacher_forcing_matches_hand_written_torch():
    net = specc.load("encoder_decoder", V=7, W=9, E=5, H=6, dtype=F64)
    T, T2, B = 6, 5, 4
    source = torch.randint(0, 7, (T, B))
    source_lengths = torch.tensor([6, 3, 1, 5])
    target = torch.randint(0, 9, (T2, B))
    got = net(source, target=target, lengths={"source": source_lengths})
    want = _eager_encoder_decoder(net, source, source_lengths, target, start=0)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)

    weights = torch.randn_like(want)
    grads_got = torch.autograd.grad((got * weights).sum(), list(net.parameters()))
    want = _eager_encoder_decoder(net, source, source_lengths, target, start=0)
    grads_want = torch.autograd.grad((want * weights).sum(), list(net.parameters()), allow_unused=True)
    for (name, p), g, w in zip(net.named_parameters(), grads_got, grads_want, strict=True):
        torch.testing.assert_close(g, torch.zeros_like(p) if w is None else w, rtol=1e-9, atol=1e-10, msg=name)


def test_target_lengths_zero_the_outputs_past_each_end():
    net = specc.load("reverse", V=7, E=5, H=6, dtype=F64)
    source, target = torch.randint(0, 7, (5, 3)), torch.randint(0, 7, (5, 3))
    lengths = torch.tensor([5, 2, 4])
    full = net(source, target=target, lengths={"source": lengths})
    cut = net(source, target=target, lengths={"source": lengths, "target": lengths})
    for b, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(cut[:n, b], full[:n, b])
        assert torch.all(cut[n:, b] == 0)


GRADCHECK = """
network s2s(I, V, E, H) {
    input source: sequence[I]
    layer enc = gru(H=H)
    layer embed = embedding(V, E)
    layer dec = context_decoder(C=H, H=H)
    layer head = linear(H, V)
    source -> enc
    output y = prev(y, start=1) -> embed -> dec(c = enc.h, s = enc.h) -> head
}
"""


def test_gradcheck_through_the_encoder_into_the_decoder():
    net = specc.load(GRADCHECK, I=3, V=5, E=4, H=3, dtype=F64)
    source = torch.randn(4, 2, 3, dtype=F64, requires_grad=True)
    lengths = torch.tensor([4, 2])
    target = torch.randint(0, 5, (3, 2))
    names = ["layers.enc.cells.l0.W_ih", "layers.enc.cells.l0.b_hh", "layers.dec.cells.l0.W_c"]
    params = {n: p.detach().clone().requires_grad_() for n, p in net.named_parameters() if n in names}

    def run(x, *ps):
        return torch.func.functional_call(net, dict(zip(params, ps)), (x,),
                                          {"y": target, "lengths": {"source": lengths}})

    assert torch.autograd.gradcheck(run, (source, *params.values()), eps=1e-6, atol=1e-7)


def test_greedy_decoding_agrees_with_teacher_forcing_on_its_own_tokens():
    net = specc.load("reverse", V=7, E=5, H=8, dtype=F64)
    source = torch.randint(0, 7, (5, 6))
    lengths = torch.tensor([5, 1, 3, 4, 2, 5])
    tokens, out_lengths = net.generate(source, lengths=lengths, max_len=6)
    assert tokens.shape == (6, 6) and torch.equal(out_lengths, torch.full((6,), 6))
    scores = net(source, target=tokens, lengths={"source": lengths})
    assert torch.equal(scores.argmax(-1), tokens)

    end = int(tokens[2, 0])  # a token some sequence produces: decoding stops there for it
    cut, cut_lengths = net.generate(source, lengths=lengths, max_len=6, end=end)
    for b in range(6):
        n = int(cut_lengths[b])
        assert torch.equal(cut[:n, b], tokens[:n, b])
        assert int(cut[n - 1, b]) == end or n == 6
        assert torch.all(cut[n:, b] == end)
    assert int(cut_lengths[0]) <= 3

    g = torch.Generator().manual_seed(3)
    sampled, _ = net.generate(source, lengths=lengths, max_len=6, sample=True, generator=g)
    assert sampled.shape == (6, 6) and sampled.min() >= 0 and sampled.max() < 7


def _single_threaded_blas(n: int = 1) -> None:
    """One BLAS thread: small per-step products gain nothing from threads, and on a busy machine
    threads waiting for each other make training many times slower (numpy offers no call for this)."""
    with open("/proc/self/maps") as f:
        paths = {line.split()[-1] for line in f if "blas" in line.lower()}
    for path in sorted(p for p in paths if p.startswith("/")):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in ("openblas_set_num_threads", "scipy_openblas_set_num_threads64_",
                     "openblas_set_num_threads64_", "scipy_openblas_set_num_threads"):
            if hasattr(lib, name):
                getattr(lib, name)(ctypes.c_int(n))
                break


def _reversal_batch(B: int, generator=None, shortest: int = 3, longest: int = 6):
    """Digit sequences (1-9; 0 is the start token) of lengths shortest..longest, and their reversals."""
    lengths = torch.randint(shortest, longest + 1, (B,), generator=generator)
    T = int(lengths.max())
    steps = torch.arange(T)[:, None]
    source = torch.where(steps < lengths, torch.randint(1, 10, (T, B), generator=generator), 0)
    target = source.gather(0, torch.where(steps < lengths, lengths - 1 - steps, steps))
    return source, target, lengths


@pytest.fixture
def single_threaded():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _single_threaded_blas(1)
    except OSError:
        pass
    yield
    torch.set_num_threads(threads)


def test_seq2seq_learns_to_reverse_digit_sequences(single_threaded):
    net = specc.load("reverse", V=10, E=16, H=64)
    steps = 1000
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=steps, pct_start=0.2)
    for _ in range(steps):
        source, target, lengths = _reversal_batch(128)
        scores = net(source, target=target, lengths={"source": lengths, "target": lengths})
        alive = torch.arange(target.shape[0])[:, None] < lengths
        loss = F.cross_entropy(scores[alive], target[alive])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        schedule.step()

    net.eval()
    source, target, lengths = _reversal_batch(1000, torch.Generator().manual_seed(1234))
    decoded, _ = net.generate(source, lengths=lengths, max_len=target.shape[0])
    alive = torch.arange(target.shape[0])[:, None] < lengths
    exact = ((decoded == target) | ~alive).all(dim=0).float().mean().item()
    assert exact >= 0.99, f"exact-match accuracy {exact:.3f}"


STACKED = '''
network stacked_reverse(V, E, H) {
    """Two-layer GRU encoder and decoder: each decoder layer starts from its encoder layer."""
    input source: tokens[V]
    layer embed = embedding(V, E)
    layer enc = gru(H=H) stacked 2
    layer dec = gru(H=H) stacked 2
    layer head = linear(H, V)
    source -> embed -> enc
    output target = prev(target, start=0) -> embed -> dec(h = enc.h) -> head
}
'''


def _torch_gru(layer, E, H):
    """torch.nn.GRU with the weights of a specc stacked GRU layer (torch's own layout and names)."""
    ref = torch.nn.GRU(E, H, num_layers=layer.num_layers, dtype=F64)
    with torch.no_grad():
        for k in range(layer.num_layers):
            cell = layer.cell(k)
            for ours, theirs in (("W_ih", "weight_ih"), ("W_hh", "weight_hh"), ("b_ih", "bias_ih"), ("b_hh", "bias_hh")):
                getattr(ref, f"{theirs}_l{k}").copy_(getattr(cell, ours))
    return ref


def test_stacked_encoder_hands_each_layer_its_own_state():
    """As torch seq2seq models do: decoder(embedded targets, encoder's h_n), layer by layer."""
    V, E, H, T, T2, B = 7, 5, 6, 5, 4, 3
    net = specc.load(STACKED, "stacked_reverse", V=V, E=E, H=H, dtype=F64)
    source, target = torch.randint(0, V, (T, B)), torch.randint(0, V, (T2, B))
    got = net(source, target=target)

    emb, head = net.layers["embed"], net.layers["head"]
    enc, dec = _torch_gru(net.layers["enc"], E, H), _torch_gru(net.layers["dec"], E, H)
    _, h_n = enc(emb(source))
    previous = torch.cat([torch.zeros(1, B, dtype=torch.long), target[:-1]])
    out, _ = dec(emb(previous), h_n)
    want = head(out)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    # Only the top layer's state for both decoder layers would differ: the test can tell them apart.
    out_top, _ = dec(emb(previous), h_n[-1:].expand(2, B, H).contiguous())
    assert (head(out_top) - want).abs().max() > 1e-6
    w = torch.randn_like(want)
    g_got = torch.autograd.grad((got * w).sum(), list(net.parameters()))
    ref_params = [emb.weight, *enc.parameters(), *dec.parameters(), *head.parameters()]
    g_want = torch.autograd.grad((want * w).sum(), ref_params)
    # torch's GRU lists weight_ih, weight_hh, bias_ih, bias_hh per layer: specc's order too.
    names = [n for n, _ in net.named_parameters()]
    for name, a, b in zip(names, g_got, g_want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=name)
