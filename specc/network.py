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

import re

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from .errors import Diagnostic
from .runtime import CellModule, _check_memory, check_backend, check_dims


def length_mask(lengths: torch.Tensor | None, T: int, B: int, dtype, device=None) -> torch.Tensor:
    """(T, B): 1 where step t is within sequence b, 0 after its end."""
    if lengths is None:
        return torch.ones(T, B, dtype=dtype, device=device)
    steps = torch.arange(T, device=lengths.device)[:, None]
    return (steps < lengths[None, :]).to(dtype=dtype, device=device)


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


def as_lengths(lengths, B: int, T: int | None = None) -> torch.Tensor | None:
    """Lengths as a (B,) CPU tensor of whole numbers from 1 to T, or a clear error."""
    if lengths is None:
        return None
    lengths = torch.as_tensor(lengths)
    if lengths.is_floating_point() and not torch.equal(lengths, lengths.round()):
        raise ValueError(f"lengths must be whole numbers, got {lengths.tolist()}")
    lengths = lengths.to("cpu", torch.long)
    if lengths.shape != (B,):
        raise ValueError(f"lengths must have one entry per sequence ({B}), got shape {tuple(lengths.shape)}")
    if len(lengths) and (lengths.min() < 1 or (T is not None and lengths.max() > T)):
        raise ValueError(f"every length must be from 1 to the padded length {T}, got {lengths.tolist()}")
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
                 dropout: float = 0.0, batch_first: bool = False, dtype=None, backend: str = "auto"):
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
        noise = getattr(program, "NOISE", {})  # drawn by the cell itself
        self.mask_names = tuple(n for n in program.INPUTS[n_inputs:] if n not in noise)
        self.state_names = tuple(program.STATES)
        self.cells = nn.ModuleDict()
        for k, dims in enumerate(layer_dims):
            for d in range(self.num_directions):
                self.cells[self.key(k, d)] = CellModule(program, dims, dtype=dtype, backend=backend)
        self.cell_name = program.CELL.removesuffix("_masked")  # the user's cell, not masking's variant
        for cell in self.cells.values():
            cell.cell_name = self.cell_name
        # (batch, first, end): this process trains on columns first:end of a batch of `batch`
        # (DistributedDataParallel), and draws each dropout mask for the whole batch, keeping its
        # columns, so that the processes together drop what one process would. None: torch's own.
        self.batch_share: tuple[int, int, int] | None = None

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
        # One unbatched (T, features) sequence, as torch's layers take it (batch_first aside):
        # run as a batch of one, states (num_layers * num_directions, n) or (n,).
        unbatched = not packed and isinstance(x, torch.Tensor) and x.dim() == 2
        if unbatched:
            if lengths is not None:
                raise ValueError(f"{self.cell_name}: lengths are for a batch; an unbatched (T, features) "
                                 "sequence is as long as its T")
            x = x.unsqueeze(1)
            hx = _batch_of_one(hx, self.cell_name)
            inputs = {k: v.unsqueeze(-2) for k, v in (inputs or {}).items()}
        if packed:
            sorted_indices, unsorted_indices = x.sorted_indices, x.unsorted_indices
            batch_sizes = x.batch_sizes
            x, lengths = pad_packed_sequence(x)
        elif self.batch_first and not unbatched:
            x = x.transpose(0, 1)
        if x.dim() != 3:
            raise ValueError(f"{self.cell_name}: input must be (T, B, features), got {tuple(x.shape)}")
        T, B = x.shape[:2]
        lengths = as_lengths(lengths, B, T)
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
                layer_in = self._dropout(layer_in)
        final = tuple(torch.stack(finals[name]) for name in self.state_names)
        final = final[0] if len(final) == 1 else final
        out = layer_in
        if packed:
            if sorted_indices is None:  # packed with enforce_sorted=True: already in order
                data = pack_padded_sequence(out, lengths).data
            else:
                data = pack_padded_sequence(out.index_select(1, sorted_indices), lengths[sorted_indices]).data
            out = PackedSequence(data, batch_sizes, sorted_indices, unsorted_indices)
        elif unbatched:
            out = out.squeeze(1)
            final = final.squeeze(1) if isinstance(final, torch.Tensor) else tuple(f.squeeze(1) for f in final)
        elif self.batch_first:
            out = out.transpose(0, 1)
        return out, final

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        if self.batch_share is None:
            return F.dropout(x, self.dropout, training=True)
        batch, first, end = self.batch_share
        if x.shape[1] != end - first:
            raise ValueError(f"{self.cell_name}: batch_share says {end - first} sequences, got {x.shape[1]}")
        keep = torch.empty((x.shape[0], batch, *x.shape[2:]), dtype=x.dtype, device=x.device)
        keep = keep.bernoulli_(1.0 - self.dropout)[:, first:end]
        return x * keep / (1.0 - self.dropout)


def _batch_of_one(hx, name: str):
    """An unbatched sequence's initial states, (num_layers * num_directions, n) or (n,) each, as a
    batch of one: (num_layers * num_directions, 1, n) or (1, n)."""
    def one(h):
        if h is None:
            return None
        if not isinstance(h, torch.Tensor) or h.dim() not in (1, 2):
            shape = tuple(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__
            raise ValueError(f"{name}: with an unbatched (T, features) input, an initial state is "
                             f"(num_layers * num_directions, n) or (n,), got {shape}")
        return h.unsqueeze(-2)

    if hx is None:
        return None
    if isinstance(hx, torch.Tensor):
        return one(hx)
    if isinstance(hx, dict):
        return {k: one(v) for k, v in hx.items()}
    return tuple(one(h) for h in hx)


# --- networks ---

def _evaluate(size, dims: dict, what: str) -> int:
    value = size.evaluate(dims)
    if value.denominator != 1 or value < 1:
        raise ValueError(f"with {', '.join(f'{k}={v}' for k, v in dims.items())}, {what} would be {value}; "
                         f"it must be a positive whole number")
    return int(value)


def _compile_layer_program(cell, text: str, file: str):
    """The generated module of a checked cell, with the length masks every layer of a network takes."""
    from .masking import compile_masked
    from .runtime import load_program

    compiled = compile_masked(cell, text, file)
    return load_program(compiled.source, compiled.cell.name)


class _Val:
    """A value flowing through the network: a tensor, and for sequences the lengths (or None)."""

    __slots__ = ("t", "lengths")

    def __init__(self, t, lengths=None):
        self.t, self.lengths = t, lengths


class Network(nn.Module):
    """A `network` block as a torch.nn.Module.

    net(*inputs, lengths=None, steps=None, **targets) -> the outputs (one tensor, or a tuple in the
    order the outputs are declared). Inputs are given in declaration order or by name:
      sequence[n]  (T, B, n) float, or a PackedSequence      vector[n]  (B, n)
      tokens[V]    (T, B) integer ids, or a PackedSequence   token[V]   (B,)
    `lengths`: the lengths of the padded sequence inputs, a (B,) tensor (for every sequence input)
    or a dict by input name. An output fed back with prev(y) is trained with teacher forcing: pass
    the target tokens as y=(T', B) (or a PackedSequence, or with lengths={'y': ...}); its step t
    then reads the target's step t - 1, the start token at t = 0. `steps` is the length of the
    sequences made by repeat/first when nothing else gives one.

    Sequence outputs are (T, B, n), zero past each sequence's end. `generate` decodes.

    With batch_first=True every sequence going in or coming out has its batch first, as with
    torch's batch_first: sequence inputs and outputs (B, T, n), token sequences and targets (B, T),
    and generate's tokens (B, T); what is one per sequence stays (B, n) or (B,). `backend` is that
    of every compiled cell in the recurrent layers ("auto", "numpy", "c", "triton").
    """

    def __init__(self, checked, dims: dict, dtype=None, batch_first: bool = False, backend: str = "auto"):
        super().__init__()
        check_dims(f"network '{checked.name}'", checked.dims, dims)
        check_backend(backend)
        if not isinstance(batch_first, bool):
            raise TypeError(f"batch_first must be True or False, got {batch_first!r}")
        self.checked = checked
        self.dims = dict(dims)
        self.batch_first = batch_first
        self.backend = backend
        dtype = dtype or torch.get_default_dtype()
        self.layers = nn.ModuleDict()
        for spec in checked.layers:
            if spec.kind == "embedding":
                V, E = (_evaluate(s, dims, f"the size of {spec.name}") for s in spec.sizes)
                _check_memory(f"network '{checked.name}'", {f"layer {spec.name}'s weight": (V, E)}, dtype)
                self.layers[spec.name] = nn.Embedding(V, E, dtype=dtype)
            elif spec.kind == "linear":
                n_in, n_out = (_evaluate(s, dims, f"the size of {spec.name}") for s in spec.sizes)
                _check_memory(f"network '{checked.name}'", {f"layer {spec.name}'s weight": (n_out, n_in)}, dtype)
                self.layers[spec.name] = nn.Linear(n_in, n_out, dtype=dtype)
            else:
                self.layers[spec.name] = self._recurrent(spec, dims, dtype, backend)
        self.start = None
        if checked.prev is not None:
            self.start = self._start_token(checked, dims)
        self.output_names = tuple(name for name, _ in checked.outputs)
        self.input_names = tuple(name for name, _, _ in checked.inputs)

    @staticmethod
    def _start_token(checked, dims: dict) -> int:
        """prev(y)'s start token for these dimensions: a token id of y, or a BindError at its line
        (the checker has refused what no dimensions could make right)."""
        from .check import BindError

        y, op, start = checked.prev
        vocab = _evaluate(checked.ops[dict(checked.outputs)[y]].value.size, dims, f"the size of {y}")
        value = start.evaluate(dims)
        if value.denominator == 1 and 0 <= value < vocab:
            return int(value)
        bound = ", ".join(f"{k}={v}" for k, v in dims.items())
        written = "" if start.constant is not None else f"{str(start).replace('//', '/')} = "
        loc = checked.start_loc or checked.ops[op].loc
        raise BindError(Diagnostic(loc, f"with {bound}, the start token of prev({y}) would be {written}{value}; "
                                        f"it must be a token id of {y}, a whole number from 0 to {vocab - 1} "
                                        f"({y} scores {vocab} tokens)"))

    @staticmethod
    def _recurrent(spec, dims, dtype, backend: str = "auto") -> Recurrent:
        from .check import bind_inits

        rec = spec.recurrent
        prog = _compile_layer_program(rec.cell, rec.text, rec.file)
        layers = _evaluate(rec.layers, dims, f"the number of layers of {spec.name}")
        base = {d: _evaluate(s, dims, f"dimension {d} of {spec.name}") for d, s in rec.dims}
        directions = 2 if rec.bidirectional else 1
        layer_dims = [base]
        for _ in range(1, layers):
            above = dict(base)
            above[rec.input_dim] = directions * _evaluate(rec.output, dims, f"the output size of {spec.name}")
            layer_dims.append(above)
        # Initialisers the checker could not decide from the text, at the cell's line.
        for k, layer in enumerate(layer_dims):
            if layer not in layer_dims[:k]:
                where = f"layer '{spec.name}'" + (f", stacked layer {k}" if len(layer_dims) > 1 else "")
                bind_inits(rec.cell, layer, dtype, context=where)
        return Recurrent(prog, layer_dims, len(rec.cell.own_inputs), bidirectional=rec.bidirectional,
                         dropout=rec.dropout, dtype=dtype, backend=backend)

    def extra_repr(self) -> str:
        return (f"{self.checked.name}, " + ", ".join(f"{k}={v}" for k, v in self.dims.items())
                + (", batch_first=True" if self.batch_first else ""))

    def _dtype(self):
        for p in self.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.get_default_dtype()

    # --- binding the inputs ---

    def _bind(self, args, named, lengths):
        if len(args) > len(self.input_names):
            fed = self.checked.prev[0] if self.checked.prev is not None else None
            hint = (f"; its output {fed} is fed back with prev({fed}): pass the targets by name, "
                    f"net({', '.join(self.input_names + ('',))}{fed}=...)" if fed else "")
            raise TypeError(f"network '{self.checked.name}' takes {len(self.input_names)} input(s) "
                            f"({', '.join(self.input_names) or 'none'}), got {len(args)}{hint}")
        given = dict(zip(self.input_names, args))
        for k in list(named):
            if k in self.input_names:
                if k in given:
                    raise TypeError(f"input {k} given twice")
                given[k] = named.pop(k)
        if isinstance(lengths, dict):
            lengths = dict(lengths)
            known = list(self.input_names) + [name for name, _ in self.checked.outputs]
            unknown = [k for k in lengths if k not in known]
            if unknown:
                raise TypeError(f"network '{self.checked.name}': lengths given for {', '.join(map(repr, unknown))}, "
                                f"which is neither an input nor an output (those are {', '.join(known)})")
        elif lengths is not None:
            lengths = {name: lengths for name, kind, _ in self.checked.inputs if kind in ("sequence", "tokens")}
        else:
            lengths = {}
        values = {}
        for name, kind, _ in self.checked.inputs:
            if name not in given:
                raise TypeError(f"network '{self.checked.name}': input {name} not given")
            values[name] = self._sequence(given[name], lengths.get(name), kind, name)
        return values, lengths

    def _sequence(self, t, lengths, kind, name) -> _Val:
        if isinstance(t, PackedSequence):
            padded, lens = pad_packed_sequence(t)
            return _Val(padded, lens)
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        want = {"sequence": 3, "vector": 2, "tokens": 2, "token": 1}[kind]
        if t.dim() != want:
            layout = {"sequence": "(B, T, n)" if self.batch_first else "(T, B, n)", "vector": "(B, n)",
                      "tokens": "(B, T)" if self.batch_first else "(T, B)", "token": "(B,)"}[kind]
            raise ValueError(f"{name} is a {kind} input: expected {want} axes, {layout}, got shape {tuple(t.shape)}")
        if kind in ("sequence", "vector"):
            t = t.to(self._dtype())
        if self.batch_first and kind in ("sequence", "tokens"):
            t = t.transpose(0, 1)  # the plan runs time first, as the recurrent layers do
        return _Val(t, as_lengths(lengths, t.shape[1]) if kind in ("sequence", "tokens") else None)

    # --- running the plan ---

    def forward(self, *args, lengths=None, steps: int | None = None, **named):
        values, lengths = self._bind(args, named, lengths)
        targets = {}
        if self.checked.prev is not None:
            y = self.checked.prev[0]
            if y not in named:
                raise TypeError(f"output {y} is fed back with prev({y}): pass the targets for teacher forcing, "
                                f"{y}={'(B, T)' if self.batch_first else '(T, B)'} token ids, or decode with "
                                f"generate()")
            targets[y] = self._sequence(named.pop(y), lengths.get(y), "tokens", y)
        if named:
            raise TypeError(f"network '{self.checked.name}' has no input {', '.join(named)}")
        env: dict[int, _Val] = {}
        for i, op in enumerate(self.checked.ops):
            env[i] = self._run(op, env, values, targets, steps)
        outs = tuple(self._output(i, env[i]) for _, i in self.checked.outputs)
        return outs[0] if len(outs) == 1 else outs

    def _output(self, op: int, v: _Val) -> torch.Tensor:
        t = self._masked(v)
        if self.batch_first and self.checked.ops[op].value.kind in ("sequence", "tokens"):
            t = t.transpose(0, 1)
        return t

    @staticmethod
    def _masked(v: _Val) -> torch.Tensor:
        if v.lengths is None or v.t.dim() != 3:
            return v.t
        return v.t * length_mask(v.lengths, v.t.shape[0], v.t.shape[1], v.t.dtype, v.t.device)[:, :, None]

    def _run(self, op, env, values, targets, steps, step: int | None = None, carried=None) -> _Val:
        kind = op.op
        if kind == "input":
            return values[op.attrs[0]]
        if kind == "prev":
            y, _ = op.attrs
            target = targets[y]
            tokens = target.t
            start = torch.full_like(tokens[:1], self.start)
            return _Val(torch.cat([start, tokens[:-1]]), target.lengths)
        arg = env[op.args[0]] if op.args else None
        if kind == "fn":
            name = op.attrs[0]
            fn = {"tanh": torch.tanh, "sigmoid": torch.sigmoid, "relu": torch.relu,
                  "softmax": lambda t: torch.softmax(t, -1), "log_softmax": lambda t: torch.log_softmax(t, -1)}[name]
            return _Val(fn(arg.t), arg.lengths)
        if kind == "pool":
            return _Val(self._pool(op.attrs[0], arg))
        if kind in ("repeat", "first"):
            T = steps if step is None else 1
            if T is None:
                raise TypeError(f"{kind} makes a sequence from a vector: pass steps=T")
            v = arg.t.unsqueeze(0).expand(T, *arg.t.shape)
            if kind == "first":
                keep = torch.zeros(T, 1, 1, dtype=v.dtype, device=v.device)
                if step is None or step == 0:
                    keep[0] = 1
                v = v * keep
            return _Val(v)
        if kind == "final":
            layer, state = op.attrs
            return _Val(env[("final", layer)][state])
        name, wires = op.attrs
        module = self.layers[name]
        if isinstance(module, Recurrent):
            hx, inputs = {}, {}
            for wname, role, wid in wires:
                (hx if role == "state" else inputs)[wname] = env[wid].t
                if role == "state":
                    per_layer = self._per_layer(self.checked.ops[wid], env, module)
                    if per_layer is not None:
                        hx[wname] = per_layer
            if carried is not None and name in carried:
                hx = carried[name]
            out, final = module(arg.t, hx=hx or None, lengths=arg.lengths, inputs=inputs)
            final = final if isinstance(final, tuple) else (final,)
            env[("final", name)] = {s: self._top(module, f) for s, f in zip(module.state_names, final)}
            env[("carry", name)] = dict(zip(module.state_names, final))
            return _Val(out, arg.lengths)
        return _Val(module(arg.t), arg.lengths)

    def _per_layer(self, source, env, module: Recurrent) -> torch.Tensor | None:
        """A stacked layer started from the final state of another as deep (`dec(h = enc.h)`, both
        `stacked L`): each layer from its own counterpart's state, as torch seq2seq models hand
        over h_n, (L, B, directions * n); None where the wire is anything else (then every layer
        starts from the top layer's state)."""
        if source.op != "final" or module.num_layers < 2 or module.num_directions != 1:
            return None
        layer, state = source.attrs
        src = self.layers[layer]
        if not isinstance(src, Recurrent) or src.num_layers != module.num_layers:
            return None
        final = env[("carry", layer)][state]  # (L * D, B, n)
        L, D = src.num_layers, src.num_directions
        return final.view(L, D, *final.shape[1:]).permute(0, 2, 1, 3).reshape(L, final.shape[1], -1)

    @staticmethod
    def _top(module: Recurrent, final: torch.Tensor) -> torch.Tensor:
        """The top layer's final state, its directions side by side: (B, directions * n)."""
        top = final[-module.num_directions:]
        return torch.cat(list(top), dim=-1) if module.num_directions == 2 else top[0]

    @staticmethod
    def _pool(name: str, v: _Val) -> torch.Tensor:
        t, lengths = v.t, v.lengths
        T, B = t.shape[:2]
        if name == "last":
            if lengths is None:
                return t[-1]
            return t[(lengths - 1).to(t.device), torch.arange(B, device=t.device)]
        mask = length_mask(lengths, T, B, t.dtype, t.device)[:, :, None]
        if name == "mean":
            count = mask.sum(0)
            return (t * mask).sum(0) / count
        return t.masked_fill(mask == 0, float("-inf")).max(0).values

    # --- decoding ---

    @torch.no_grad()
    def generate(self, *args, max_len: int, end: int | None = None, sample: bool = False,
                 temperature: float = 1.0, lengths=None, batch: int | None = None, generator=None, **named):
        """Decode the output fed back with prev(y): greedily (the most likely token at each step)
        or by sampling, up to max_len steps or until every sequence has produced `end`.

        Returns (tokens, lengths): tokens (T, B) with T <= max_len ((B, T) with batch_first), and
        each sequence's length (up to and including its end token); tokens after a sequence's end
        are `end`. `batch` is the batch size for a network without inputs.
        """
        if self.checked.prev is None:
            raise TypeError(f"network '{self.checked.name}' feeds nothing back with prev(...); call it instead")
        values, _ = self._bind(args, named, lengths)
        if named:
            raise TypeError(f"network '{self.checked.name}' has no input {', '.join(named)}")
        y = self.checked.prev[0]
        y_op = dict(self.checked.outputs)[y]
        if batch is None:
            for (name, kind, _) in self.checked.inputs:
                t = values[name].t
                batch = t.shape[1] if kind in ("sequence", "tokens") else t.shape[0]
                break
        if batch is None:
            raise TypeError("the network has no inputs: pass batch=B")
        env: dict = {}
        ops = self.checked.ops
        for i, op in enumerate(ops):
            if not op.stepwise:
                env[i] = self._run(op, env, values, {}, None)
        device = next(self.parameters()).device
        token = torch.full((batch,), self.start, dtype=torch.long, device=device)
        done = torch.zeros(batch, dtype=torch.bool, device=device)
        out_len = torch.full((batch,), max_len, dtype=torch.long)
        carried: dict = {}
        tokens = []
        for t in range(max_len):
            step_env = dict(env)
            for i, op in enumerate(ops):
                if not op.stepwise:
                    continue
                if op.op == "prev":
                    step_env[i] = _Val(token[None, :])
                else:
                    step_env[i] = self._run(op, step_env, values, {}, None, step=t, carried=carried)
                    if op.op == "layer" and isinstance(self.layers[op.attrs[0]], Recurrent):
                        carried[op.attrs[0]] = step_env[("carry", op.attrs[0])]
            scores = step_env[y_op].t[0]
            if sample:
                probs = torch.softmax(scores / temperature, dim=-1)
                token = torch.multinomial(probs, 1, generator=generator)[:, 0]
            else:
                token = scores.argmax(-1)
            if end is not None:
                token = torch.where(done, torch.full_like(token, end), token)
                newly = (token == end) & ~done
                out_len[newly.cpu()] = t + 1
                done |= newly
            tokens.append(token)
            if end is not None and bool(done.all()):
                break
        tokens = torch.stack(tokens)
        return (tokens.transpose(0, 1) if self.batch_first else tokens), out_len


# --- loading ---

def _library_network_file(name: str):
    """(text, file) of the library spec that defines network `name`, or None."""
    from .library import spec_file, spec_names

    for stem in spec_names():
        text = spec_file(stem).read_text(encoding="utf-8")
        # A whole word: "network char" must not find "network char_lm".
        if re.search(rf"\bnetwork\s+{re.escape(name)}\s*\(", text):
            return text, f"specs/{stem}.rnn"
    return None


def load_network(spec, name: str | None = None, *, dtype=None, batch_first: bool = False, backend: str = "auto",
                 **dims) -> Network | None:
    """The Network for a spec holding `network` blocks, or None when `spec` (or `name`) is a cell.

    `spec` is a path, spec text, a library file's name, or the name of a network in the library.
    """
    from .check import check
    from .errors import SpecError
    from .network_check import check_network
    from .parse import parse
    from .pipeline import read_spec

    try:
        text, file = read_spec(spec)
    except SpecError:
        found = _library_network_file(str(spec)) if isinstance(spec, str) and spec.isidentifier() else None
        if found is None:
            return None
        (text, file), name = found, name or str(spec)
    parsed = parse(text, file)
    if not parsed.networks:
        return None
    cells = check(parsed)
    if name is not None and any(c.name == name for c in cells):
        return None
    if name is None:
        if cells or len(parsed.networks) > 1:
            choices = [n.name for n in parsed.networks] + [c.name for c in cells]
            raise SpecError(f"{file} defines {', '.join(choices)}; choose one by name: specc.load(spec, 'NAME', ...)")
        net = parsed.networks[0]
    else:
        matches = [n for n in parsed.networks if n.name == name]
        if not matches:
            raise SpecError(f"{file} has no network or cell '{name}'; it defines "
                            f"{', '.join([n.name for n in parsed.networks] + [c.name for c in cells])}")
        net = matches[0]
    return Network(check_network(net, parsed, cells), dims, dtype=dtype, batch_first=batch_first, backend=backend)


def library_recurrent(cell: str, layer_dims: list[dict], bidirectional: bool = False, dropout: float = 0.0,
                      batch_first: bool = False, dtype=None, backend: str = "auto") -> Recurrent:
    """A Recurrent layer of a library cell (specs/), e.g. for specc.from_torch."""
    from .network_check import _library_cells

    checked, text, file = _library_cells()[cell]
    return Recurrent(_compile_layer_program(checked, text, file), layer_dims, len(checked.own_inputs),
                     bidirectional=bidirectional, dropout=dropout,
                     batch_first=batch_first, dtype=dtype, backend=backend)
