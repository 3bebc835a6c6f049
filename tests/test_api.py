"""The module's interface: layouts, dtypes, states, errors, training, saving, and specc.load.

Numbers are checked against torch's own layers (through from_torch, whose equivalence
test_torch_equivalence.py proves), hand computation, or finite differences.
"""
from __future__ import annotations

import traceback
from pathlib import Path

import pytest
import torch
from torch import nn

import specc

F64, F32 = torch.float64, torch.float32
LSTM_PARAMS = {"W_ih", "W_hh", "b_ih", "b_hh"}


def _raised_in_numpy(excinfo) -> bool:
    """Whether the exception came out of numpy's code rather than a check of specc's."""
    last = traceback.extract_tb(excinfo.value.__traceback__)[-1]
    return "numpy" in Path(last.filename).parts


def _lstm(dtype=F64, **kw):
    return specc.load("lstm", I=3, H=4, dtype=dtype, **kw)


# --- layouts ------------------------------------------------------------------------------------

def test_batch_first_matches_torch(close):
    ref = nn.LSTM(3, 4, batch_first=True).double()
    sp = specc.load("lstm", I=3, H=4, batch_first=True, dtype=F64)
    sp.load_state_dict({"W_ih": ref.weight_ih_l0, "W_hh": ref.weight_hh_l0,
                        "b_ih": ref.bias_ih_l0, "b_hh": ref.bias_hh_l0})
    x = torch.randn(2, 6, 3, dtype=F64)  # (B, T, I)
    h0, c0 = torch.randn(2, 4, dtype=F64), torch.randn(2, 4, dtype=F64)
    out, (h, c) = sp(x, (h0, c0))
    ref_out, (rh, rc) = ref(x, (h0[None], c0[None]))
    assert out.shape == (2, 6, 4)
    close(out, ref_out, F64, "outputs")
    close(h, rh[0], F64, "h")
    close(c, rc[0], F64, "c")


@pytest.mark.parametrize("batch_first", [False, True])
def test_unbatched_input_matches_torch(batch_first, close):
    ref = nn.GRU(3, 5, batch_first=batch_first).double()
    sp = specc.from_torch(ref)
    x = torch.randn(7, 3, dtype=F64)  # (T, I): one sequence, no batch axis, in either layout
    out, h = sp(x)
    ref_out, rh = ref(x)
    assert out.shape == (7, 5) and h.shape == (5,)
    close(out, ref_out, F64, "outputs")
    close(h, rh[0], F64, "h")
    # With an unbatched (H,) initial state, and its gradient.
    h0 = torch.randn(5, dtype=F64)
    h0s, h0t = h0.clone().requires_grad_(), h0.clone().requires_grad_()
    out, h = sp(x, h0s)
    ref_out, rh = ref(x, h0t[None])
    close(out, ref_out, F64, "outputs from h0")
    (out.sum() + h.sum()).backward()
    (ref_out.sum() + rh.sum()).backward()
    assert h0s.grad.shape == (5,)
    close(h0s.grad, h0t.grad, F64, "d h0")


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
def test_dtypes(dtype, close):
    ref = nn.LSTM(3, 4).to(dtype)
    sp = specc.from_torch(ref)
    assert all(p.dtype == dtype for p in sp.parameters())
    x = torch.randn(4, 2, 3, dtype=dtype, requires_grad=True)
    out, (h, c) = sp(x)
    assert out.dtype == h.dtype == c.dtype == dtype
    ref_out, _ = ref(x)
    close(out, ref_out, dtype, "outputs")
    out.sum().backward()
    assert x.grad.dtype == dtype and sp.W_ih.grad.dtype == dtype


def test_load_dtype_and_conversion(close):
    m32 = specc.load("gru", I=3, H=4)  # the default dtype
    assert m32.W_ih.dtype == torch.get_default_dtype()
    m64 = specc.load("gru", I=3, H=4, dtype=F64)
    assert m64.W_ih.dtype == F64
    m64.load_state_dict({k: v.double() for k, v in m32.state_dict().items()})
    converted = m32.double()  # module.double() is the way the dtype error points to
    x = torch.randn(5, 2, 3, dtype=F64)
    close(converted(x)[0], m64(x)[0], F64, "double() module")


def test_dtype_mismatch_is_a_clear_type_error():
    m = _lstm(F64)
    with pytest.raises(TypeError, match="float32") as info:
        m(torch.randn(5, 2, 3, dtype=F32))
    assert "float64" in str(info.value)
    assert not _raised_in_numpy(info)
    with pytest.raises(TypeError, match="float32"):
        m(torch.randn(5, 2, 3, dtype=F64), (torch.zeros(2, 4, dtype=F32), torch.zeros(2, 4, dtype=F64)))
    with pytest.raises(TypeError, match="float64"):
        _lstm(F32)(torch.randn(5, 2, 3, dtype=F64))


# --- clear errors for wrong shapes ------------------------------------------------------------------

@pytest.mark.parametrize("make_x, words", [
    (lambda: torch.randn(5, 2, 4), "4"),       # 4 features, the cell takes I=3
    (lambda: torch.randn(5, 2, 1), "1"),
    (lambda: torch.randn(5, 4), "4"),          # unbatched, wrong size
    (lambda: torch.randn(5), "(5,)"),          # not a sequence
    (lambda: torch.randn(2, 5, 2, 3), "(2, 5, 2, 3)"),
], ids=["features", "too-few", "unbatched", "1d", "4d"])
def test_wrong_input_size_is_a_clear_error(make_x, words):
    m = _lstm(F32)
    with pytest.raises((ValueError, TypeError)) as info:
        m(make_x())
    message = str(info.value)
    assert words in message and ("x" in message or "input" in message), message
    assert not _raised_in_numpy(info), "".join(traceback.format_exception(info.value))


@pytest.mark.parametrize("make_state, words", [
    (lambda: (torch.zeros(2, 5), torch.zeros(2, 4)), "(2, 5)"),     # wrong size
    (lambda: (torch.zeros(3, 4), torch.zeros(3, 4)), "(3, 4)"),     # wrong batch
    (lambda: (torch.zeros(2, 4), torch.zeros(2, 4, 1)), "(2, 4, 1)"),
    (lambda: (torch.zeros(1, 2, 4), torch.zeros(1, 2, 4)), "(1, 2, 4)"),  # torch's (layers, B, H)
    (lambda: torch.zeros(2, 4), "2"),                                # LSTM needs (h, c)
    (lambda: (torch.zeros(2, 4),), "2"),
    (lambda: (torch.zeros(2, 4),) * 3, "3"),
], ids=["size", "batch", "3d-c", "torch-layout", "tensor-for-two", "one-of-two", "three"])
def test_wrong_state_is_a_clear_error(make_state, words):
    m = _lstm(F32)
    with pytest.raises((ValueError, TypeError)) as info:
        m(torch.randn(5, 2, 3), make_state())
    message = str(info.value)
    assert words in message and "state" in message, message
    assert not _raised_in_numpy(info), "".join(traceback.format_exception(info.value))


def test_wrong_dimensions_of_gru_state_are_clear():
    m = specc.load("gru", I=3, H=4)
    with pytest.raises(ValueError, match="state") as info:
        m(torch.randn(5, 2, 3), torch.zeros(2, 3))
    assert not _raised_in_numpy(info)


# --- states ---------------------------------------------------------------------------------------

def test_state_as_tensor_or_tuple(close):
    gru = specc.load("gru", I=3, H=4, dtype=F64)
    x, h0 = torch.randn(5, 2, 3, dtype=F64), torch.randn(2, 4, dtype=F64)
    out_t, h_t = gru(x, h0)
    out_tuple, h_tuple = gru(x, (h0,))
    out_list, _ = gru(x, [h0])
    assert isinstance(h_t, torch.Tensor)  # one state: a tensor, as nn.GRU
    close(out_tuple, out_t, F64, "tuple state")
    close(out_list, out_t, F64, "list state")
    close(h_tuple, h_t, F64, "final from tuple state")
    # The state matters: a different h0 gives different outputs (the state was not ignored).
    assert (gru(x, h0 + 1)[0] - out_t).abs().max() > 1e-3

    lstm = _lstm(F64)
    h0, c0 = torch.randn(2, 4, dtype=F64), torch.randn(2, 4, dtype=F64)
    out, finals = lstm(x, (h0, c0))
    assert isinstance(finals, tuple) and len(finals) == 2  # several states: a tuple, in the spec's order
    out_list, finals_list = lstm(x, [h0, c0])
    close(out_list, out, F64, "list state")
    out_swapped, _ = lstm(x, (c0, h0))
    assert (out_swapped - out).abs().max() > 1e-6, "h and c are interchangeable: the order is not respected"


def test_gradient_reaches_the_initial_state():
    """Against central differences, with only the state requiring a gradient."""
    lstm = _lstm(F64).requires_grad_(False)
    x = torch.randn(6, 2, 3, dtype=F64)
    h0, c0 = torch.randn(2, 4, dtype=F64), torch.randn(2, 4, dtype=F64)
    w_out, w_h, w_c = torch.randn(6, 2, 4, dtype=F64), torch.randn(2, 4, dtype=F64), torch.randn(2, 4, dtype=F64)

    def loss(h, c):
        out, (hT, cT) = lstm(x, (h, c))
        return (out * w_out).sum() + (hT * w_h).sum() + (cT * w_c).sum()

    hs, cs = h0.clone().requires_grad_(), c0.clone().requires_grad_()
    loss(hs, cs).backward()
    assert hs.grad is not None and cs.grad is not None
    eps = 1e-6
    for d_h, d_c in [(torch.randn_like(h0), torch.zeros_like(c0)), (torch.zeros_like(h0), torch.randn_like(c0))]:
        with torch.no_grad():
            numeric = (loss(h0 + eps * d_h, c0 + eps * d_c) - loss(h0 - eps * d_h, c0 - eps * d_c)) / (2 * eps)
        analytic = (hs.grad * d_h).sum() + (cs.grad * d_c).sum()
        assert abs(numeric.item()) > 1e-3
        assert abs((analytic - numeric).item()) < 1e-7 * max(1.0, abs(numeric.item()))


# --- results the caller may modify in place --------------------------------------------------------

def test_modifying_outputs_in_place_keeps_gradients_right(close):
    """`out.mul_(2)` (or `out += skip`, an in-place dropout) on the returned sequence is legal torch.
    Autograd must then give the gradients of what was computed, or refuse with an error; specc's
    backward must not read the caller's modified tensor as if it were its own saved state."""
    ref = nn.GRU(3, 4).double()
    sp = specc.from_torch(ref)
    x = torch.randn(5, 2, 3, dtype=F64)
    ref_out, _ = ref(x)
    ref_out.mul_(2)
    ref_out.sum().backward()
    out, _ = sp(x)
    try:
        out.mul_(2)
        out.sum().backward()
    except RuntimeError:
        return  # refusing, as torch does for a modified saved tensor, is also right
    close(sp.W_hh.grad, ref.weight_hh_l0.grad, F64, "d W_hh after out.mul_(2)")
    close(sp.W_ih.grad, ref.weight_ih_l0.grad, F64, "d W_ih after out.mul_(2)")


def test_modifying_the_input_in_place_after_forward_keeps_gradients_right(close):
    """torch raises when a tensor saved for backward was modified; specc shares the input's memory
    with numpy (no copy), so it must copy what it saves, or notice the change and refuse."""
    ref = nn.GRU(3, 4).double()
    sp = specc.from_torch(ref)
    x = torch.randn(5, 2, 3, dtype=F64)
    ref_out, _ = ref(x)
    ref_out.sum().backward()
    xs = x.clone()
    out, _ = sp(xs)
    try:
        with torch.no_grad():
            xs.add_(1.0)
        out.sum().backward()
    except RuntimeError:
        return
    close(sp.W_ih.grad, ref.weight_ih_l0.grad, F64, "d W_ih after the input changed")


# --- training, saving, inference ------------------------------------------------------------------

def test_module_trains_with_torch_optim():
    """elman with an output layer learns to echo the previous input: the loss falls by far."""
    torch.manual_seed(1)
    m = specc.load("elman", "elman", I=1, H=12, O=1)
    opt = torch.optim.Adam(m.parameters(), lr=0.03)
    x = torch.randn(10, 16, 1)
    target = torch.cat([torch.zeros(1, 16, 1), x[:-1]])
    losses = []
    for _ in range(150):
        opt.zero_grad()
        y, _ = m(x)
        loss = ((y - target) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0], (losses[0], losses[-1])
    # ... and it generalises to a fresh sequence.
    x2 = torch.randn(10, 4, 1)
    with torch.no_grad():
        y2, _ = m(x2)
    assert ((y2[1:] - x2[:-1]) ** 2).mean() < 0.2 * losses[0]


def test_state_dict_round_trip(tmp_path, close):
    m = _lstm(F64)
    assert set(m.state_dict()) == LSTM_PARAMS  # named as in the spec
    assert dict(m.named_parameters())["W_ih"].shape == (16, 3)
    torch.save(m.state_dict(), tmp_path / "lstm.pt")
    torch.manual_seed(123)
    fresh = _lstm(F64)
    x = torch.randn(4, 2, 3, dtype=F64)
    assert (fresh(x)[0] - m(x)[0]).abs().max() > 1e-6  # a different initialisation
    fresh.load_state_dict(torch.load(tmp_path / "lstm.pt"))
    close(fresh(x)[0], m(x)[0], F64, "outputs after load_state_dict", tol=0)
    # And the state dict loads into torch's own layer under torch's names.
    ref = nn.LSTM(3, 4).double()
    names = {"W_ih": "weight_ih_l0", "W_hh": "weight_hh_l0", "b_ih": "bias_ih_l0", "b_hh": "bias_hh_l0"}
    ref.load_state_dict({names[k]: v for k, v in torch.load(tmp_path / "lstm.pt").items()})
    close(m(x)[0], ref(x)[0], F64, "specc vs torch with the saved weights")


def test_no_grad_forward(close):
    ref = nn.GRU(3, 4).double()
    sp = specc.from_torch(ref)
    x = torch.randn(5, 2, 3, dtype=F64, requires_grad=True)
    with torch.no_grad():
        out, h = sp(x)
        ref_out, rh = ref(x)
    assert not out.requires_grad and not h.requires_grad
    close(out, ref_out, F64, "outputs under no_grad")
    close(h, rh[0], F64, "h under no_grad")
    with torch.inference_mode():
        out2, _ = sp(x)
    close(out2, ref_out, F64, "outputs under inference_mode")


# --- specc.load: a library name, a path, spec text; dimensions ----------------------------------------

LEAKY = """
# A leaky integrator, not in the library.
cell leaky(I, H) {
    \"\"\"h' = 0.5 h + tanh(W x + b)\"\"\"
    input x[I]
    state h[H] = zeros
    param W[H, I]
    param b[H] = zeros
    h' = 0.5 * h + tanh(W @ x + b)
    output h'
}
"""


def _leaky_by_hand(x, W, b):
    h, outs = torch.zeros(x.shape[1], W.shape[0], dtype=x.dtype), []
    for t in range(x.shape[0]):
        h = 0.5 * h + torch.tanh(x[t] @ W.T + b)
        outs.append(h)
    return torch.stack(outs)


@pytest.mark.parametrize("how", ["text", "path", "str-path"])
def test_load_spec_text_and_paths(how, tmp_path, close):
    file = tmp_path / "leaky.rnn"
    file.write_text(LEAKY)
    spec = {"text": LEAKY, "path": file, "str-path": str(file)}[how]
    m = specc.load(spec, I=3, H=5, dtype=F64)
    assert set(m.state_dict()) == {"W", "b"}
    with torch.no_grad():
        m.b.copy_(torch.randn(5, dtype=F64))
    x = torch.randn(6, 2, 3, dtype=F64)
    out, h = m(x)
    want = _leaky_by_hand(x, m.W.detach(), m.b.detach())
    close(out, want, F64, "outputs")
    close(h, want[-1], F64, "final h")


def test_load_library_name_equals_library_file(repo_root, close):
    by_name = specc.load("gru_cho", I=3, H=4, dtype=F64)
    by_path = specc.load(repo_root / "specs" / "gru_cho.rnn", I=3, H=4, dtype=F64)
    by_text = specc.load((repo_root / "specs" / "gru_cho.rnn").read_text(), I=3, H=4, dtype=F64)
    for other in (by_path, by_text):
        assert set(other.state_dict()) == set(by_name.state_dict())
        other.load_state_dict(by_name.state_dict())
    x = torch.randn(4, 2, 3, dtype=F64)
    close(by_path(x)[0], by_name(x)[0], F64, "by path", tol=0)
    close(by_text(x)[0], by_name(x)[0], F64, "by text", tol=0)


def test_load_picks_a_cell():
    # several cells: the library name picks the cell of that name, a file of its own does not
    assert specc.load("elman", I=3, H=4, O=2).program.CELL == "elman"
    with pytest.raises(specc.SpecError, match="rnn_tanh"):
        specc.load((specc.library.spec_file("elman").read_text()), I=3, H=4)
    with pytest.raises(specc.SpecError, match="nosuch"):
        specc.load("elman", "nosuch", I=3, H=4)
    with pytest.raises(specc.SpecError, match="no_such_spec"):
        specc.load("no_such_spec", I=3, H=4)
    m = specc.load("elman", "rnn_relu", I=3, H=4)
    assert set(m.state_dict()) == LSTM_PARAMS


def test_missing_and_unknown_dimensions_are_clear():
    with pytest.raises((TypeError, ValueError, specc.SpecError), match="H") as info:
        specc.load("lstm", I=3)
    assert "H=" in str(info.value) or "not bound" in str(info.value)
    with pytest.raises((TypeError, ValueError, specc.SpecError), match="O") as info:
        specc.load("lstm", I=3, H=4, O=2)
    assert "I" in str(info.value) and "H" in str(info.value)  # names the cell's real dimensions
    with pytest.raises((TypeError, ValueError, specc.SpecError), match="H"):
        specc.load("lstm", I=3, H=0)
    with pytest.raises((TypeError, ValueError, specc.SpecError), match="I"):
        specc.load("lstm", I=2.5, H=3)
