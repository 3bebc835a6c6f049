"""specc.from_torch: the specc cell equivalent to a torch recurrent layer, with its weights."""
from __future__ import annotations

import torch
from torch import nn

from .api import load
from .errors import SpecError

# torch's parameter names -> the library specs' names (the same order and layout).
_WEIGHTS = {"weight_ih_l0": "W_ih", "weight_hh_l0": "W_hh", "bias_ih_l0": "b_ih", "bias_hh_l0": "b_hh"}


def _spec_for(m: nn.Module) -> tuple[str, str]:
    if isinstance(m, nn.LSTM):
        return "lstm", "lstm"
    if isinstance(m, nn.GRU):
        return "gru", "gru"
    if isinstance(m, nn.RNN):
        return "elman", "rnn_tanh" if m.nonlinearity == "tanh" else "rnn_relu"
    raise TypeError(f"from_torch takes nn.RNN, nn.LSTM or nn.GRU, not {type(m).__name__}")


def from_torch(m: nn.Module, backend: str = "auto"):
    """A specc module computing what `m` computes, its weights copied (not shared).

    A single-layer, unidirectional layer becomes a CellModule, whose state is (B, H) per state
    rather than torch's (1, B, H). Stacked and bidirectional layers, and LSTM's proj_size (the
    library's lstm_proj cell), become a specc.network.Recurrent, which takes and returns what `m`
    does: padded or packed sequences, final states (num_layers * num_directions, B, H).
    """
    spec, cell = _spec_for(m)
    if not m.bias:
        raise SpecError(f"from_torch: {type(m).__name__} with bias=False is not supported; the library's cells "
                        f"have biases (only layers with biases are supported)")
    weight = m.weight_ih_l0
    proj = getattr(m, "proj_size", 0)
    if m.num_layers == 1 and not m.bidirectional and not proj:
        out = load(spec, cell, I=m.input_size, H=m.hidden_size, batch_first=m.batch_first, backend=backend,
                   dtype=weight.dtype)
        with torch.no_grad():
            for theirs, ours in _WEIGHTS.items():
                getattr(out, ours).copy_(getattr(m, theirs))
        return out.to(weight.device)
    return _recurrent_from_torch(m, cell, proj, backend)


def _recurrent_from_torch(m: nn.Module, cell: str, proj: int, backend: str):
    from .network import library_recurrent

    directions = 2 if m.bidirectional else 1
    base = {"I": m.input_size, "H": m.hidden_size}
    if proj:
        cell, base["P"] = "lstm_proj", proj
    layer_dims = [base] + [dict(base, I=directions * (proj or m.hidden_size)) for _ in range(m.num_layers - 1)]
    weight = m.weight_ih_l0
    out = library_recurrent(cell, layer_dims, bidirectional=m.bidirectional, dropout=m.dropout,
                            batch_first=m.batch_first, dtype=weight.dtype, backend=backend)
    names = {"weight_ih": "W_ih", "weight_hh": "W_hh", "bias_ih": "b_ih", "bias_hh": "b_hh", "weight_hr": "W_hr"}
    with torch.no_grad():
        for name, p in m.named_parameters():
            kind, layer = name.rsplit("_l", 1)  # weight_ih_l2_reverse -> weight_ih, 2_reverse
            reverse = layer.endswith("_reverse")
            getattr(out.cell(int(layer.removesuffix("_reverse")), int(reverse)), names[kind]).copy_(p)
    return out.to(weight.device)
