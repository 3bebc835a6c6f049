"""specc.from_torch: the specc cell equivalent to a torch recurrent layer, with its weights."""
from __future__ import annotations

import torch
from torch import nn

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

    The state is (B, H) per state rather than torch's (num_layers, B, H).
    """
    from . import load

    spec, cell = _spec_for(m)
    unsupported = []
    if m.num_layers != 1:
        unsupported.append(f"num_layers={m.num_layers}")
    if m.bidirectional:
        unsupported.append("bidirectional=True")
    if not m.bias:
        unsupported.append("bias=False")
    if getattr(m, "proj_size", 0):
        unsupported.append(f"proj_size={m.proj_size}")
    if unsupported:
        raise SpecError(f"from_torch: {type(m).__name__} with {', '.join(unsupported)} has no single-cell "
                        f"equivalent yet; only single-layer, unidirectional layers with biases are supported")
    weight = m.weight_ih_l0
    out = load(spec, cell, I=m.input_size, H=m.hidden_size, batch_first=m.batch_first, backend=backend,
               dtype=weight.dtype)
    with torch.no_grad():
        for theirs, ours in _WEIGHTS.items():
            getattr(out, ours).copy_(getattr(m, theirs))
    return out.to(weight.device)
