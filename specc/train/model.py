"""A trainable model: input encoding, a compiled specc cell (or a stack of them), a linear head.

`build_model` is the one place that turns a config's `model:` section into a module, so that it
can later build from network specs (embeddings, heads, seq2seq) too.
"""
from __future__ import annotations

import torch
from torch import nn

from ..network import Recurrent
from .config import model_cell


class SequenceModel(nn.Module):
    """x (T, B) token ids or (T, B, F) values -> y (T, B, n_out), final state of the cell.

    The state is what the training loop carries between chunks, with the batch first in every
    tensor: the cell's (B, n) states, or for a stack (a specc.network.Recurrent, whose states are
    (layers, B, n) as torch's) the same transposed to (B, layers, n)."""

    def __init__(self, cell: nn.Module, n_in: int, n_out: int, inputs: str = "tokens",
                 embed: int | None = None, head: bool = True):
        super().__init__()
        self.n_in, self.n_out, self.inputs = n_in, n_out, inputs
        self.embedding = nn.Embedding(n_in, embed) if inputs == "tokens" and embed else None
        self.cell = cell
        self.stacked = isinstance(cell, Recurrent)
        out_size = cell.output_size if self.stacked else _output_size(cell)
        self.head = nn.Linear(out_size, n_out) if head else None
        if not head and out_size != n_out:
            raise ValueError(f"model.head is off, so the cell's output must have {n_out} entries, not {out_size}")

    def share_of_batch(self, share: tuple[int, int, int] | None) -> None:
        """Train on columns first:end of each global batch of `batch`, share = (batch, first, end)
        (see Recurrent.batch_share); None: any batch, torch's own dropout."""
        if self.stacked:
            self.cell.batch_share = share

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        if self.inputs == "vector":
            return x
        if self.embedding is not None:
            return self.embedding(x)
        return nn.functional.one_hot(x, self.n_in).to(next(self.cell.parameters()).dtype)

    def forward(self, x: torch.Tensor, state=None):
        if self.stacked and state is not None:
            state = _swap_first_axes(state)
        out, state = self.cell(self.encode(x), state)
        if self.stacked:
            state = _swap_first_axes(state)
        if isinstance(out, tuple):  # a cell with several outputs: the first is the prediction
            out = out[0]
        return (self.head(out) if self.head is not None else out), state


def _swap_first_axes(state):
    if isinstance(state, torch.Tensor):
        return state.transpose(0, 1)
    return tuple(s.transpose(0, 1) for s in state)


def _output_size(cell) -> int:
    return cell.sizes["outputs"][cell.program.OUTPUTS[0]][0]


def spec_of(model_cfg: dict) -> dict:
    """The cell a config's model section names, as a checkpoint keeps it: the spec's text (so that
    the checkpoint rebuilds its model wherever it is read, whatever became of the file) and the
    cell's name."""
    from ..pipeline import read_spec

    text, file = read_spec(model_cfg["spec"])
    return {"text": text, "file": file, "cell": model_cell(model_cfg)}


def build_model(model_cfg: dict, n_in: int, n_out: int, inputs: str) -> SequenceModel:
    """From a config's model section and the task's input/output sizes. Dimensions I (the input
    size) and, with the head off, O (the output size) are filled in when the cell has them; with
    `layers` above 1, the layers above the first read the one below (their input dimension is
    bound to its output size), with `dropout` between them, as torch's stacked layers."""
    from ..api import compile_spec, load, program
    from ..runtime import own_inputs

    spec, cell_name = model_cfg["spec"], model_cell(model_cfg)
    prog = program(compile_spec(spec, cell_name))
    if len(own_inputs(prog)) != 1:
        raise ValueError(f"cell '{prog.CELL}' has {len(own_inputs(prog))} inputs; training needs a cell with one")
    dims = dict(model_cfg.get("dims") or {})
    embed = model_cfg.get("embed")
    head = model_cfg.get("head", True)
    if "I" in prog.DIMS and "I" not in dims:
        dims["I"] = embed if inputs == "tokens" and embed else n_in
    if not head and "O" in prog.DIMS and "O" not in dims:
        dims["O"] = n_out
    layers = model_cfg.get("layers", 1)
    if layers == 1:
        return SequenceModel(load(spec, cell_name, **dims), n_in, n_out, inputs, embed, head)
    return SequenceModel(_stack(spec, cell_name, dims, layers, model_cfg.get("dropout", 0.0)),
                         n_in, n_out, inputs, embed, head)


def _stack(spec, cell_name, dims: dict, layers: int, dropout: float) -> Recurrent:
    from ..api import program
    from ..check import check
    from ..masking import compile_masked
    from ..network_check import _cell_output_and_states, cannot_stack, input_dim, stackable
    from ..parse import parse
    from ..pipeline import pick_cell, read_spec
    from ..runtime import check_dims

    text, file = read_spec(spec)
    cell = pick_cell(check(parse(text, file)), cell_name, file)
    if not stackable(cell):
        raise ValueError(f"model.layers is {layers}, but {cannot_stack(cell)}")
    check_dims(f"cell '{cell.name}'", cell.dims, dims)
    out_size, _ = _cell_output_and_states(cell)
    below = dict(dims, **{input_dim(cell): int(out_size.evaluate(dims))})
    return Recurrent(program(compile_masked(cell, text, file)), [dims] + [below] * (layers - 1),
                     len(cell.own_inputs), dropout=dropout)
