"""Variable-length batches, as a transformation of the step IR (between lowering and optimising).

A batch of sequences of different lengths is padded to the longest; a per-step mask m is 1 while
a sequence lasts and 0 after its end. The masked cell computes

    h' -> m * h' + (1 - m) * h      past its end, a sequence's state stays what it was at its
                                    last step, so the final state is taken there
    y  -> m * y                     outputs past the end are zero

which is what torch's packed sequences give. specc's own autodiff then differentiates the masked
cell: no gradient reaches a state through a padded step, and none leaves a padded output.

The mask is handed in already broadcast to each width it multiplies (one input per distinct size
of a state or an output, `mask`, `mask_1`, ...): the elementwise type rules and every backend
stay as they are, at the price of a (T, B, size) array per mask instead of (T, B, 1).
"""
from __future__ import annotations

from dataclasses import replace

from .check import CheckedCell, Decl
from .dimnames import _size, code_dims
from .ir import LEAVES, Builder, Graph
from .lower import lower
from .pipeline import Compiled, compile_cell


def mask_cell(cell: CheckedCell) -> tuple[CheckedCell, dict]:
    """The cell with one mask input per distinct width of its states and outputs.

    Returns the new cell and {size: mask input name}.
    """
    # The widths as the compiled step names them: code_dims renames a dimension that clashes with
    # the generated code's names (a dimension `chunk` is chunk_ there), and mask_graph meets the
    # step IR of the renamed cell. The found fuzz cell 343 of seed 101 (2026-12-02).
    coded = code_dims(cell)
    plain = lower(coded)
    back = {v: k for k, v in coded.dim_names}
    taken = {d.name for d in cell.inputs + cell.states + cell.params}
    taken |= {t.name for eq in cell.equations for t in eq.targets} | set(cell.dims)
    widths = [plain.nodes[nxt].type.shape[0] for _, _, nxt in plain.carries]
    widths += [plain.nodes[i].type.shape[0] for _, i in plain.outputs]
    names: dict = {}
    for size in widths:
        if size not in names:
            name, k = "mask", 1
            while name in taken:
                name, k = f"mask_{k}", k + 1
            taken.add(name)
            names[size] = name
    decls = tuple(Decl(name, (_size(size, back),), None, cell.loc) for size, name in names.items())
    # before the dropout masks, which stay the last inputs (CheckedCell.noise)
    inputs = cell.own_inputs + decls + cell.inputs[len(cell.own_inputs):]
    return replace(cell, name=cell.name + "_masked", inputs=inputs), names


def mask_graph(g: Graph, names: dict) -> Graph:
    """Blend each state's next value with its previous one, and zero each output, by the mask."""
    b = Builder()
    new: dict[int, int] = {}
    for i, node in enumerate(g.nodes):
        args = tuple(new[a] for a in node.args)
        new[i] = b.add(node.op, args, node.attrs, node.name, node.line,
                       type=node.type if node.op in LEAVES else None)
    inputs = dict(g.inputs)
    mask = {size: new[inputs[name]] for size, name in names.items()}
    one = b.const(1.0)
    carries = []
    for name, leaf, nxt in g.carries:
        m = mask[g.nodes[nxt].type.shape[0]]
        kept = b.add("mul", (b.add("sub", (one, m)), new[leaf]))
        blended = b.add("add", (b.add("mul", (m, new[nxt])), kept), name=f"{name}_next_masked")
        carries.append((name, new[leaf], blended))
    outputs = []
    for name, i in g.outputs:
        out = b.add("mul", (mask[g.nodes[i].type.shape[0]], new[i]), name=f"{name}_masked")
        outputs.append((name, out))
    return Graph(tuple(b.nodes), tuple((n, new[i]) for n, i in g.inputs), tuple(carries),
                 tuple((n, new[i]) for n, i in g.params), tuple(outputs))


def compile_masked(cell: CheckedCell, text: str, file: str) -> Compiled:
    """The cell compiled with masks: the usual stages, with mask_graph between lowering and optimising."""
    masked, names = mask_cell(cell)
    return compile_cell(masked, text, file, transform=lambda g: mask_graph(g, names))
