"""Networks at run time: compiled cells composed in torch.

`Recurrent` is a recurrent layer as torch has it (nn.LSTM/GRU/RNN): one compiled cell, stacked
and/or bidirectional, over padded or packed variable-length batches. Each layer and direction is
a CellModule, one autograd node over the whole sequence running the generated forward and BPTT
code; what lies between them (dropout, reversal, concatenation) is ordinary torch.

`Network` runs a checked `network` block (specc/network_check.py): its plan is a list of
operations in dependency order, each an embedding, a linear layer, a Recurrent, a function or
a pooling, interpreted here op by op. Teacher forcing is a plain forward pass; `generate` runs the
operations that depend on prev(y) one step at a time, feeding back the chosen token.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from .runtime import CellModule


def length_mask(lengths: torch.Tensor | None, T: int, B: int, dtype, device=None) -> torch.Tensor:
    """(T, B): 1 where step t is within sequence b, 0 after its end."""
    if lengths is None:
        return torch.ones(T, B, dtype=dtype, device=device)
    steps = torch.arange(T, device=lengths.device)[:, None]
    return (steps < lengths[None, :]).to(dtype)


def reverse_index(lengths: torch.Tensor | None, T: int, B: int) -> torch.Tensor:
    """(T, B) indices reversing each sequence within its own length; padding stays where it is.

    This is what torch's packed bidirectional layers do: the reverse direction starts at each
    sequence's own last step, not at the padded end.
    """
    steps = torch.arange(T)[:, None].expand(T, B)
    if lengths is None:
        return (T - 1 - steps).contiguous()
    lengths = lengths.to(torch.long)[None, :]
    return torch.where(steps < lengths, lengths - 1 - steps, steps)


def gather_steps(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return x.gather(0, index.to(x.device)[:, :, None].expand_as(x))


def as_lengths(lengths, B: int) -> torch.Tensor | None:
    if lengths is None:
        return None
    lengths = torch.as_tensor(lengths).to("cpu", torch.long)
    if lengths.shape != (B,):
        raise ValueError(f"lengths must have one entry per sequence ({B}), got shape {tuple(lengths.shape)}")
    return lengths


class Recurrent(nn.Module):
    """A recurrent layer of a compiled cell: `num_layers` stacked, each one or two directions.

    `program` is a masked cell (specc/masking.py) whose first `n_inputs` inputs are the cell's own
    and the rest its masks. `layer_dims` holds each layer's dimensions: a layer above the first
    reads the layer below, so its input dimension is bound to that layer's output size.

    forward(x, hx=None, lengths=None, inputs=None) -> (output, final states), as nn.LSTM:
      x        (T, B, I) (or (B, T, I) with batch_first), or a PackedSequence
      hx       initial states: a tensor, or a tuple in the cell's state order, or a dict by state
               name; each (num_layers * num_directions, B, n), or (B, n) for every layer
      lengths  (B,) sequence lengths, when x is padded
      inputs   the cell's other inputs by name: (B, n) for the same value at every step (a
               context vector), or (T, B, n) per step
    output is (T, B, num_directions * O), zero past each sequence's end (a PackedSequence when x
    is one); each final state is (num_layers * num_directions, B, n), taken at each sequence's
    own last step; a tuple of them when the cell has several states.
    """

    def __init__(self, program, layer_dims: list[dict], n_inputs: int, bidirectional: bool = False,
                 dropout: float = 0.0, batch_first: bool = False, dtype=None):
        super().__init__()
        if not layer_dims:
            raise ValueError("a recurrent layer needs at least one layer")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.num_layers = len(layer_dims)
        self.num_directions = 2 if bidirectional else 1
        self.bidirectional = bidirectional
        self.dropout = float(dropout)
        self.batch_first = batch_first
        self.input_names = tuple(program.INPUTS[:n_inputs])
        self.mask_names = tuple(program.INPUTS[n_inputs:])
        self.state_names = tuple(program.STATES)
        self.cells = nn.ModuleDict()
        for k, dims in enumerate(layer_dims):
            for d in range(self.num_directions):
                self.cells[self.key(k, d)] = CellModule(program, dims, dtype=dtype)
        self.cell_name = program.CELL

    @staticmethod
    def key(layer: int, direction: int) -> str:
        """The name of one layer and direction, after torch's suffixes (weight_ih_l0_reverse)."""
        return f"l{layer}" + ("_reverse" if direction else "")

    def extra_repr(self) -> str:
        return (f"{self.cell_name}, num_layers={self.num_layers}, bidirectional={self.bidirectional}"
                + (f", dropout={self.dropout}" if self.dropout else ""))

    def cell(self, layer: int = 0, direction: int = 0) -> CellModule:
        return self.cells[self.key(layer, direction)]

    @property
    def output_size(self) -> int:
        first = self.cell(self.num_layers - 1)
        return self.num_directions * first.sizes["outputs"][first.program.OUTPUTS[0]][0]

    def _initial(self, hx, B: int):
        """Per state name, a (num_layers * num_directions, B, n) tensor or None (the cell's own)."""
        n = self.num_layers * self.num_directions
        if hx is None:
            return {}
        if isinstance(hx, torch.Tensor):
            hx = (hx,)
        if not isinstance(hx, dict):
            if len(hx) != len(self.state_names):
                raise ValueError(f"{self.cell_name} has {len(self.state_names)} state(s) "
                                 f"({', '.join(self.state_names)}), got {len(hx)}")
            hx = dict(zip(self.state_names, hx))
        out = {}
        for name, h in hx.items():
            if name not in self.state_names:
                raise ValueError(f"{self.cell_name} has no state {name!r}")
            if h is None:
                continue
            if h.dim() == 2:
                h = h.unsqueeze(0).expand(n, *h.shape)
            if h.dim() != 3 or h.shape[0] != n or h.shape[1] != B:
                raise ValueError(f"initial state {name} must be ({n}, {B}, size) or ({B}, size), "
                                 f"got {tuple(h.shape)}")
            out[name] = h
        return out

    def forward(self, x, hx=None, lengths=None, inputs=None):
        packed = isinstance(x, PackedSequence)
        if packed:
            sorted_indices, unsorted_indices = x.sorted_indices, x.unsorted_indices
            batch_sizes = x.batch_sizes
            x, lengths = pad_packed_sequence(x)
        elif self.batch_first:
            x = x.transpose(0, 1)
        if x.dim() != 3:
            raise ValueError(f"{self.cell_name}: input must be (T, B, features), got {tuple(x.shape)}")
        T, B = x.shape[:2]
        lengths = as_lengths(lengths, B)
        dtype = self.cell()._dtype()
        x = x.to(dtype)
        mask = length_mask(lengths, T, B, dtype, x.device)
        first = self.cell()
        masks = [mask[:, :, None].expand(T, B, first.sizes["inputs"][m][0]) for m in self.mask_names]
        inputs = dict(inputs or {})
        extra = []
        for name in self.input_names[1:]:
            if name not in inputs:
                raise ValueError(f"{self.cell_name}: input {name!r} not given; pass inputs={{{name!r}: ...}}")
            v = inputs.pop(name).to(dtype)
            extra.append(v.unsqueeze(0).expand(T, *v.shape) if v.dim() == 2 else v)
        if inputs:
            raise ValueError(f"{self.cell_name} has no input {', '.join(inputs)}")
        init = self._initial(hx, B)
        index = reverse_index(lengths, T, B) if self.num_directions == 2 else None
        finals = {name: [] for name in self.state_names}
        layer_in = x
        for k in range(self.num_layers):
            outs = []
            for d in range(self.num_directions):
                cell = self.cell(k, d)
                seq = [layer_in, *extra]
                if d:
                    seq = [gather_steps(s, index) for s in seq]
                state = None
                if init:
                    state = tuple(init[s][k * self.num_directions + d] if s in init
                                  else cell.initial_state(B, dtype, x.device)[i]
                                  for i, s in enumerate(self.state_names))
                out, fin = cell((*seq, *masks), state)
                if isinstance(out, tuple):
                    out = out[0]
                if d:
                    out = gather_steps(out, index)
                outs.append(out)
                for name, f in zip(self.state_names, fin if isinstance(fin, tuple) else (fin,)):
                    finals[name].append(f)
            layer_in = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
            if k < self.num_layers - 1 and self.dropout and self.training:
                layer_in = F.dropout(layer_in, self.dropout, training=True)
        final = tuple(torch.stack(finals[name]) for name in self.state_names)
        final = final[0] if len(final) == 1 else final
        out = layer_in
        if packed:
            data = pack_padded_sequence(out.index_select(1, sorted_indices), lengths[sorted_indices]).data
            out = PackedSequence(data, batch_sizes, sorted_indices, unsorted_indices)
        elif self.batch_first:
            out = out.transpose(0, 1)
        return out, final
