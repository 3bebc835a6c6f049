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
        return _like_torch(out.to(weight.device), m)
    return _like_torch(_recurrent_from_torch(m, cell, proj, backend), m)


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


# What nn.RNN/LSTM/GRU users read off a layer: copied onto the module from_torch returns.
_SIZES = ("input_size", "hidden_size", "num_layers", "bidirectional", "proj_size", "bias", "batch_first",
          "dropout", "nonlinearity")


def _torch_keys(module) -> dict[str, str]:
    """torch's state_dict names of a layer like `module` -> module's own names."""
    ours = {"weight_ih": "W_ih", "weight_hh": "W_hh", "bias_ih": "b_ih", "bias_hh": "b_hh", "weight_hr": "W_hr"}
    if not hasattr(module, "cells"):  # one layer, one direction: the cell itself
        return {f"{k}_l0": v for k, v in ours.items() if v in module.program.PARAMS}
    out = {}
    for name, cell in module.cells.items():  # l0, l0_reverse, l1, ...
        for k, v in ours.items():
            if v in cell.program.PARAMS:
                out[f"{k}_{name}"] = f"cells.{name}.{v}"
    return out


class _TorchStateDict:
    """A load_state_dict pre-hook: torch's keys (weight_ih_l0, bias_hh_l1_reverse) are read as the
    module's own (W_ih, cells.l1_reverse.b_hh), so an nn.LSTM's state_dict loads as it is. A class,
    not a closure, so that the module still pickles."""

    def __call__(self, module, state_dict, prefix, *args):
        for theirs, ours in _torch_keys(module).items():
            if prefix + theirs in state_dict and prefix + ours not in state_dict:
                state_dict[prefix + ours] = state_dict.pop(prefix + theirs)


def _like_torch(out, m: nn.Module):
    out.torch_class = type(m).__name__
    for name in _SIZES:
        if hasattr(m, name):
            setattr(out, name, getattr(m, name))
    out.proj_size = getattr(m, "proj_size", 0)
    out.register_load_state_dict_pre_hook(_TorchStateDict())
    return out


def to_torch(module) -> nn.Module:
    """The torch.nn.RNN / LSTM / GRU that computes what `module` (made by specc.from_torch) computes,
    with its weights copied. Refused for any other module: only those know which torch layer they are."""
    kind = getattr(module, "torch_class", None)
    if kind not in ("RNN", "LSTM", "GRU"):
        raise TypeError("to_torch takes a module made by specc.from_torch (it knows which torch layer it is); "
                        f"got {type(module).__name__}" + (f" of cell '{module.program.CELL}'" if hasattr(module, "program") else ""))
    kw = dict(num_layers=module.num_layers, bidirectional=module.bidirectional, batch_first=module.batch_first,
              dropout=module.dropout, bias=module.bias)
    if kind == "RNN":
        kw["nonlinearity"] = module.nonlinearity
    if kind == "LSTM":
        kw["proj_size"] = module.proj_size
    weight = next(module.parameters())
    out = getattr(nn, kind)(module.input_size, module.hidden_size, **kw).to(dtype=weight.dtype, device=weight.device)
    ours = module.state_dict()
    out.load_state_dict({theirs: ours[mine] for theirs, mine in _torch_keys(module).items()})
    return out
