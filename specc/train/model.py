"""A trainable model: input encoding, a compiled specc cell, a linear head.

`build_model` is the one place that turns a config's `model:` section into a module, so that it
can later build from network specs (embeddings, stacks, heads) instead.
"""
from __future__ import annotations

import torch
from torch import nn


class SequenceModel(nn.Module):
    """x (T, B) token ids or (T, B, F) values -> y (T, B, n_out), final state of the cell."""

    def __init__(self, cell: nn.Module, n_in: int, n_out: int, inputs: str = "tokens",
                 embed: int | None = None, head: bool = True):
        super().__init__()
        self.n_in, self.n_out, self.inputs = n_in, n_out, inputs
        self.embedding = nn.Embedding(n_in, embed) if inputs == "tokens" and embed else None
        self.cell = cell
        out_size = _output_size(cell)
        self.head = nn.Linear(out_size, n_out) if head else None
        if not head and out_size != n_out:
            raise ValueError(f"model.head is off, so the cell's output must have {n_out} entries, not {out_size}")

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        if self.inputs == "vector":
            return x
        if self.embedding is not None:
            return self.embedding(x)
        return nn.functional.one_hot(x, self.n_in).to(next(self.cell.parameters()).dtype)

    def forward(self, x: torch.Tensor, state=None):
        out, state = self.cell(self.encode(x), state)
        if isinstance(out, tuple):  # a cell with several outputs: the first is the prediction
            out = out[0]
        return (self.head(out) if self.head is not None else out), state


def _output_size(cell) -> int:
    return cell.sizes["outputs"][cell.program.OUTPUTS[0]][0]


def build_model(model_cfg: dict, n_in: int, n_out: int, inputs: str) -> SequenceModel:
    """From a config's model section and the task's input/output sizes. Dimensions I (the input
    size) and, with the head off, O (the output size) are filled in when the cell has them."""
    import specc

    spec, cell_name = model_cfg["spec"], model_cfg.get("cell")
    if cell_name is None and spec.isidentifier():
        cell_name = spec  # a library name: the file's cell of that name (elman.rnn also holds rnn_tanh, ...)
    prog = specc.program(specc.compile_spec(spec, cell_name))
    if len(prog.INPUTS) != 1:
        raise ValueError(f"cell '{prog.CELL}' has {len(prog.INPUTS)} inputs; training needs a cell with one")
    dims = dict(model_cfg.get("dims") or {})
    embed = model_cfg.get("embed")
    head = model_cfg.get("head", True)
    if "I" in prog.DIMS and "I" not in dims:
        dims["I"] = embed if inputs == "tokens" and embed else n_in
    if not head and "O" in prog.DIMS and "O" not in dims:
        dims["O"] = n_out
    cell = specc.load(spec, cell_name, **dims)
    return SequenceModel(cell, n_in, n_out, inputs, embed, head)
