"""ONNX: a compiled cell's forward over a whole sequence as an ONNX graph (issue 16).

Built from the optimised step IR and its schedule, as the other backends are, with the same
regions (schedule.py): `const` values from the weights, once; `pre` values (W @ x for all steps)
as (T*B, features) tensors before the loop; the `loop` values as the body of an ONNX Scan over
time, which carries the states; `post` values after it. The weights are initializers. The graph
takes the cell's input sequences (T, B, n) first, then its initial states (B, n) (named h0 for a
state h), and returns its outputs (T, B, n), then its final states (h_final); T and B are free.

    specc.export_onnx(module, "lstm.onnx")

Only the forward, in inference: dropout is the identity and zoneout keeps its expectation, as in
the module's eval(). The IR is derived again from the spec the module was generated from
(SPEC_TEXT), so a module written by an older specc is refused with a message to regenerate it.

A network goes through torch.onnx.export (embeddings, heads, reversal and concatenation are
torch's), each of its cells a call of an ONNX function of domain `specc`, built here as above.
"""
from __future__ import annotations

import inspect
from fractions import Fraction
from pathlib import Path

import numpy as np

from .ir import Graph
from .ops import ACTIVATIONS
from .schedule import Schedule
from .shapes import Size

OPSET = 18  # torch.onnx.export's own (a network's graph and its cells' functions share one)


def _onnx():
    try:
        import onnx
        from onnx import helper
    except ImportError:
        raise RuntimeError("ONNX export needs the onnx package (pip install onnx)") from None
    return onnx, helper


def size_of(s: Size, dims: dict) -> int:
    total = Fraction(0)
    for mono, coef in s.terms:
        term = Fraction(coef)
        for d in mono:
            term *= dims[d]
        total += term
    if total.denominator != 1:
        raise ValueError(f"size {s} is not whole with {dims}")
    return int(total)


class _Nodes:
    """One ONNX graph's nodes being built (the main graph, or the Scan's body)."""

    def __init__(self, helper, prefix: str):
        self.helper, self.prefix, self.nodes, self.count = helper, prefix, [], 0

    def fresh(self, hint: str) -> str:
        self.count += 1
        # A dot: no spec name has one, so no made name is an input's, a weight's or an output's.
        return f"{self.prefix}{hint}.{self.count}"

    def op(self, kind: str, inputs: list[str], hint: str = "t", **attrs) -> str:
        out = self.fresh(hint)
        self.nodes.append(self.helper.make_node(kind, inputs, [out], **attrs))
        return out

    def const(self, value, dtype=np.float32, hint: str = "c") -> str:
        from onnx import numpy_helper

        out = self.fresh(hint)
        self.nodes.append(self.helper.make_node("Constant", [], [out],
                                                value=numpy_helper.from_array(np.asarray(value, dtype=dtype), out)))
        return out


# Each activation of ops.ACTIVATIONS in ONNX operators: (nodes, x) -> name of the result.
# test_onnx checks that every activation has one.
def _gelu(n: _Nodes, x: str) -> str:  # the tanh form, as every backend computes it
    cube = n.op("Mul", [x, n.op("Mul", [x, x])])
    inner = n.op("Mul", [n.const(0.7978845608028654), n.op("Add", [x, n.op("Mul", [n.const(0.044715), cube])])])
    return n.op("Mul", [n.op("Mul", [n.const(0.5), x]), n.op("Add", [n.const(1.0), n.op("Tanh", [inner])])])


ACTIVATION_NODES = {
    "sigmoid": lambda n, x: n.op("Sigmoid", [x]),
    "tanh": lambda n, x: n.op("Tanh", [x]),
    "relu": lambda n, x: n.op("Relu", [x]),
    "exp": lambda n, x: n.op("Exp", [x]),
    "log": lambda n, x: n.op("Log", [x]),
    "softplus": lambda n, x: n.op("Softplus", [x]),
    "gelu": _gelu,
    "sqrt": lambda n, x: n.op("Sqrt", [x]),
    "rsqrt": lambda n, x: n.op("Reciprocal", [n.op("Sqrt", [x])]),
    "abs": lambda n, x: n.op("Abs", [x]),
    "square": lambda n, x: n.op("Mul", [x, x]),
    "silu": lambda n, x: n.op("Mul", [x, n.op("Sigmoid", [x])]),
    "elu": lambda n, x: n.op("Elu", [x], alpha=1.0),
    "hardsigmoid": lambda n, x: n.op("HardSigmoid", [x], alpha=1 / 6, beta=0.5),
    "hardtanh": lambda n, x: n.op("Clip", [x, n.const(-1.0), n.const(1.0)]),
    "softsign": lambda n, x: n.op("Softsign", [x]),
    "step": lambda n, x: n.op("Cast", [n.op("Greater", [x, n.const(0.0)])], to=1),  # 1: FLOAT
}
_BINARY = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div"}


def _emit(n: _Nodes, g: Graph, i: int, names: dict[int, str], dims: dict, rows: str) -> str:
    """Node i of g as ONNX nodes in `n`, its arguments already named in `names`. Batched values are
    (rows, features) tensors, `rows` a 1-D int64 tensor holding their number of rows."""
    node = g.nodes[i]
    a = [names[k] for k in node.args]
    hint = node.name or node.op
    batched = node.type.batched
    if node.op == "const":
        return n.const(node.attrs[0], hint="const")
    if node.op in _BINARY:
        return n.op(_BINARY[node.op], a, hint)
    if node.op == "neg":
        return n.op("Neg", a, hint)
    if node.op == "pow":
        return n.op("Pow", a, hint)
    if node.op in ACTIVATIONS:
        return ACTIVATION_NODES[node.op](n, a[0])
    if node.op == "softmax":
        return n.op("Softmax", a, hint, axis=-1)
    if node.op == "rowsum":
        return n.op("ReduceSum", [a[0], n.const([-1], np.int64)], hint, keepdims=1)
    if node.op == "rowmax":
        return n.op("ReduceMax", [a[0], n.const([-1], np.int64)], hint, keepdims=1)
    if node.op == "expand":  # a [1] value broadcast to `width`, divided by `divisor` (mean)
        width, divisor = (size_of(s, dims) for s in node.attrs)
        shape = n.op("Concat", [rows, n.const([width], np.int64)], axis=0) if batched else n.const([width], np.int64)
        out = n.op("Expand", [a[0], shape], hint)
        return out if divisor == 1 else n.op("Div", [out, n.const(float(divisor))], hint)
    if node.op == "matvec":
        w, v = a
        if g.nodes[node.args[1]].type.batched:  # (rows, K) @ W^T
            return n.op("MatMul", [v, n.op("Transpose", [w], "T", perm=[1, 0])], hint)
        return n.op("MatMul", [w, v], hint)
    if node.op == "concat":
        return n.op("Concat", a, hint, axis=1 if batched else 0)
    if node.op == "slice":
        start, stop = (size_of(s, dims) for s in node.attrs)
        axis = 1 if batched else 0
        return n.op("Slice", [a[0], n.const([start], np.int64), n.const([stop], np.int64), n.const([axis], np.int64)], hint)
    if node.op == "reshape":
        if batched:
            raise NotImplementedError("ONNX export: a per-example reshape")
        shape = [size_of(s, dims) for s in node.attrs[0]]
        return n.op("Reshape", [a[0], n.const(shape, np.int64)], hint)
    if node.op == "blockdiag":  # W[N, R, C] -> (N*R, N*C): W[:, :, None, :] * eye(N)[:, None, :, None]
        N, R, C = (size_of(s, dims) for s in g.nodes[node.args[0]].type.shape)
        w = n.op("Reshape", [a[0], n.const([N, R, 1, C], np.int64)])
        spread = n.op("Mul", [w, n.const(np.eye(N).reshape(N, 1, N, 1))])
        return n.op("Reshape", [spread, n.const([N * R, N * C], np.int64)], hint)
    if node.op == "outer":  # a[:, :, None] * b[:, None, :], flattened
        (x, y), (tx, ty) = a, (g.nodes[k].type for k in node.args)
        A, B = size_of(tx.shape[0], dims), size_of(ty.shape[0], dims)
        left = n.op("Reshape", [x, n.const([-1, A, 1], np.int64)])
        right = n.op("Reshape", [y, n.const([-1, 1, B], np.int64)])
        flat = [0, A * B] if batched else [A * B]
        prod = n.op("Mul", [left, right])
        return n.op("Reshape", [prod, n.const([-1, A * B] if batched else flat, np.int64)], hint)
    if node.op == "outer_vjp_a" and batched:  # contract's forward (optimize.contract_products):
        N, K = (size_of(s, dims) for s in node.attrs)  # out[i] = sum_j G[i * K + j] b[j], an example at a time
        blocks = n.op("Reshape", [a[0], n.const([-1, N, K], np.int64)])
        other = n.op("Reshape", [a[1], n.const([-1, K, 1], np.int64)])
        return n.op("Reshape", [n.op("MatMul", [blocks, other]), n.const([-1, N], np.int64)], hint)
    if node.op == "zeros":
        shape, is_batched = node.attrs
        sizes = n.const([size_of(s, dims) for s in shape], np.int64)
        if is_batched:
            sizes = n.op("Concat", [rows, sizes], axis=0)
        return n.op("ConstantOfShape", [sizes], hint)
    raise NotImplementedError(f"ONNX export: no ONNX spelling of op {node.op!r}")


def _scan_body(helper, f32, fwd: Schedule, loop_args: set[int], names: dict[int, str], main: _Nodes,
               steps_batch: str, sizes: dict, dims: dict, first: str, name: str):
    """The Scan's body: the states in, then this step's rows of each pre value the loop reads; the
    next states out, then the loop values needed after it. Returns (the main graph's sequences
    the Scan steps through, the body, the nodes of the values it hands out for every step)."""
    g, region = fwd.graph, fwd.region
    body = _Nodes(helper, "step.")
    body_names: dict[int, str] = {}
    body_inputs, scan_inputs = [], []
    for nm, leaf, _ in g.carries:
        body_names[leaf] = f"step.{nm}"
        body_inputs.append(helper.make_tensor_value_info(body_names[leaf], f32, ["B", sizes["states"][nm][0]]))
    pre_read = sorted(a for a in loop_args if region[a] == "pre")
    for k in pre_read:
        width = size_of(g.nodes[k].type.shape[0], dims)
        shape = main.op("Concat", [steps_batch, main.const([width], np.int64)], axis=0)
        scan_inputs.append(main.op("Reshape", [names[k], shape], "per_step"))
        body_names[k] = f"step.in.{len(scan_inputs)}"
        body_inputs.append(helper.make_tensor_value_info(body_names[k], f32, ["B", width]))
    if not scan_inputs:  # a Scan has at least one sequence to step through: the first input's, unread
        scan_inputs.append(first)
        body_inputs.append(helper.make_tensor_value_info("step.unread", f32, ["B", sizes["inputs"][first][0]]))
    for k in loop_args:
        if region[k] == "const":
            body_names[k] = names[k]  # from the enclosing graph
    body_rows = body.op("Shape", [body_names[g.carries[0][1]]], "B", start=0, end=1)
    for i, node in enumerate(g.nodes):
        if region[i] != "loop" or node.op == "carry":
            continue
        body_names[i] = _emit(body, g, i, body_names, dims, body_rows)
    # What leaves the loop for every step: outputs and what the values after it read.
    wanted = sorted({k for i, r in enumerate(region) if r == "post" for k in g.nodes[i].args if region[k] == "loop"}
                    | {k for _, k in g.outputs if region[k] == "loop"})
    body_outputs = []
    for nm, _, nxt in g.carries:
        body_outputs.append(helper.make_tensor_value_info(body.op("Identity", [body_names[nxt]], f"{nm}_next"), f32, None))
    per_step = []
    for k in wanted:
        out = body.op("Identity", [body_names[k]], "kept")
        body_outputs.append(helper.make_tensor_value_info(out, f32, None))
        per_step.append(k)
    scan_body = helper.make_graph(body.nodes, f"{name}_step", body_inputs, body_outputs)
    return scan_inputs, scan_body, per_step


def _outputs(helper, f32, main: _Nodes, g: Graph, names: dict[int, str], sizes: dict, steps_batch: str,
             outs: list[str], finals: list[str]) -> list:
    """The graph's outputs: each per-step output back to (T, B, n), then the final states."""
    outputs = []
    for (nm, k), out in zip(g.outputs, outs):
        width = sizes["outputs"][nm][0]
        shape = main.op("Concat", [steps_batch, main.const([width], np.int64)], axis=0)
        main.nodes.append(helper.make_node("Reshape", [names[k], shape], [out]))
        outputs.append(helper.make_tensor_value_info(out, f32, ["T", "B", width]))
    for (nm, _, _), final in zip(g.carries, finals):
        outputs.append(helper.make_tensor_value_info(final, f32, ["B", sizes["states"][nm][0]]))
    return outputs


def build(prog, fwd: Schedule, params: dict[str, np.ndarray] | None, dims: dict, name: str):
    """The ONNX model of one cell: `prog` the generated module (names, sizes, noise), `fwd` the
    optimised forward's schedule, `params` the weights by name, `dims` the generated code's
    dimensions. With `params` None, an ONNX function (domain specc) instead, as a network's graph
    calls it: every input (masks too), the initial states and the weights are its inputs, in the
    order of the module's own call (specc::scan's tensors)."""
    onnx, helper = _onnx()
    g = fwd.graph
    region = fwd.region
    function = params is None
    noise = {} if function else getattr(prog, "NOISE", {})
    sizes = prog.sizes(**dims)
    own = [nm for nm in prog.INPUTS if nm not in noise]
    if not own:
        raise ValueError(f"cell '{prog.CELL}' has no input sequence; ONNX export takes T from the first input")
    main = _Nodes(helper, "")
    graph_inputs, initializers = [], []
    f32 = onnx.TensorProto.FLOAT

    def seq_info(nm: str, n: int):
        return helper.make_tensor_value_info(nm, f32, ["T", "B", n])

    names: dict[int, str] = {}
    for nm in own:
        graph_inputs.append(seq_info(nm, sizes["inputs"][nm][0]))
    first = own[0]
    steps_batch = main.op("Shape", [first], "T_B", start=0, end=2)
    rows = main.op("ReduceProd", [steps_batch], "rows", keepdims=1)
    for nm, k in g.inputs:
        n_feat = sizes["inputs"][nm][0]
        if nm in noise:  # eval: dropout keeps everything, zoneout its expectation
            kind, p = noise[nm]
            shape = main.op("Concat", [rows, main.const([n_feat], np.int64)], axis=0)
            names[k] = main.op("Expand", [main.const(1.0 if kind == "dropout" else p), shape], nm)
        else:
            names[k] = main.op("Reshape", [nm, main.const([-1, n_feat], np.int64)], nm + "_rows")
    for nm, k in g.params:
        if not function:
            initializers.append(onnx.numpy_helper.from_array(np.ascontiguousarray(params[nm], dtype=np.float32), nm))
        names[k] = nm
    state_names = [nm for nm, _, _ in g.carries]
    taken = set(own) | set(prog.PARAMS)

    def unique(want: str) -> str:  # h0 for state h, unless an input or a weight is called h0
        while want in taken:
            want += "_"
        taken.add(want)
        return want

    starts = [unique(f"{nm}0") for nm in state_names]
    for nm, start in zip(state_names, starts):
        graph_inputs.append(helper.make_tensor_value_info(start, f32, ["B", sizes["states"][nm][0]]))

    # const and pre: the main graph, before the loop.
    # What the body reads: the loop's arguments, and each state's next value (which may be made
    # before the loop: QRNN's xp' = x).
    loop_args = ({a for i, r in enumerate(region) if r == "loop" for a in g.nodes[i].args}
                 | {nxt for _, _, nxt in g.carries})
    for i, node in enumerate(g.nodes):
        if i in names or node.op in ("input", "param", "carry") or region[i] not in ("const", "pre"):
            continue
        names[i] = _emit(main, g, i, names, dims, rows)

    scan_inputs, scan_body, per_step = _scan_body(helper, f32, fwd, loop_args, names, main, steps_batch,
                                                  sizes, dims, first, name)
    outs = [unique(nm) for nm, _ in g.outputs]
    finals = [unique(f"{nm}_final") for nm in state_names]
    stacked = [main.fresh("steps") for _ in per_step]
    main.nodes.append(helper.make_node("Scan", starts + scan_inputs, finals + stacked,
                                       body=scan_body, num_scan_inputs=len(scan_inputs)))
    for k, st in zip(per_step, stacked):
        width = size_of(g.nodes[k].type.shape[0], dims)
        names[k] = main.op("Reshape", [st, main.const([-1, width], np.int64)], "rows")

    # post: the main graph, after the loop.
    for i, node in enumerate(g.nodes):
        if region[i] == "post":
            names[i] = _emit(main, g, i, names, dims, rows)

    outputs = _outputs(helper, f32, main, g, names, sizes, steps_batch, outs, finals)
    if function:
        return helper.make_function("specc", name, [*own, *starts, *prog.PARAMS], [*outs, *finals], main.nodes,
                                    [helper.make_opsetid("", OPSET)])
    graph = helper.make_graph(main.nodes, name, graph_inputs, outputs, initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="specc")
    model.ir_version = 8  # what onnxruntime of the last years reads
    onnx.checker.check_model(model)
    return model


def _step_schedule(prog) -> Schedule:
    """The optimised forward step of a generated module, derived again from its spec (SPEC_TEXT):
    a network's layer is the masked variant of its cell (masking.py), made the same way."""
    from .check import check
    from .masking import compile_masked
    from .parse import parse
    from .pipeline import compile_cell, pick_cell

    text = getattr(prog, "SPEC_TEXT", None)
    if text is None:
        raise ValueError(f"cell '{prog.CELL}': this module does not carry its spec (written by an older specc); "
                         f"regenerate it with specc compile")
    cells = check(parse(text, prog.SPEC_FILE))
    # The same stages that made the module (compile_cell or masking's compile_masked), so the
    # ONNX graph is built from the very step IR its generated code came from.
    if prog.CELL.endswith("_masked") and prog.CELL not in {c.name for c in cells}:
        cell = pick_cell(cells, prog.CELL.removesuffix("_masked"), prog.SPEC_FILE)
        return compile_masked(cell, text, prog.SPEC_FILE).forward_schedule
    return compile_cell(pick_cell(cells, prog.CELL, prog.SPEC_FILE), text, prog.SPEC_FILE).forward_schedule


def _positional(module, n_args: int, names: list[str]):
    """`module(*args, **kwargs)` as a module called with every tensor positional, in that order."""
    import torch

    class Positional(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.module = module

        def forward(self, *tensors):
            return self.module(*tensors[:n_args], **dict(zip(names, tensors[n_args:])))

    return Positional().eval()


def _export_network(module, path: Path, example_input, example_kwargs) -> Path:
    """A network (or a from_torch stack) through torch.onnx.export, each of its cells a call of an
    ONNX function defined here from the cell's step IR (torch_ops.run emits the calls)."""
    import torch

    from . import torch_ops

    if example_input is None:
        raise TypeError("export_onnx of a network needs an example input (what the network is called with): it "
                        "traces the network with torch.onnx.export; from Python, specc.export_onnx(net, path, x)")
    onnx, helper = _onnx()
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    kwargs = dict(example_kwargs or {})
    # Sequences of any length and batch: the first two axes of every tensor argument are free
    # (AUTO: torch keeps one fixed where the network's code needs it so).
    free = {0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO}

    def spec(v):
        if isinstance(v, torch.Tensor):
            return free if v.dim() >= 2 else None
        if isinstance(v, (tuple, list)):
            return type(v)(spec(a) for a in v)
        if isinstance(v, dict):
            return {k: spec(a) for k, a in v.items()}
        return None

    traced = module.eval()
    if kwargs:  # torch.export cannot free the axes of keyword tensors (a **kwargs): all positional
        traced, args = _positional(module, len(args), list(kwargs)), (*args, *kwargs.values())
    bound = inspect.signature(traced.forward).bind(*args)
    dynamic = {name: spec(value) for name, value in bound.arguments.items()}
    torch_ops.ONNX_CELLS.clear()
    program = torch.onnx.export(traced, args, dynamo=True, opset_version=OPSET, dynamic_shapes=dynamic,
                                verbose=False)
    model = program.model_proto
    used = {n.op_type for n in model.graph.node if n.domain == "specc"}
    for fname in sorted(used):
        cell = torch_ops.ONNX_CELLS[fname]
        model.functions.append(build(cell.program, _step_schedule(cell.program), None, cell._dim_args, fname))
    if not any(o.domain == "specc" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("specc", 1))
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())
    return path


def export_onnx(module, path, example_input=None, example_kwargs=None) -> Path:
    """Write `module` to `path` as ONNX: a cell (specc.load("lstm", I=6, H=8)) from its step IR
    alone; a network (specc.load of one, or from_torch of a stacked or bidirectional layer)
    through torch.onnx.export, called with `example_input` (a tensor or a tuple of them) and
    `example_kwargs`, each of its cells an ONNX function made from the cell's step IR. For a cell
    the example is optional, and only checked against the module's sizes by running it."""
    from .runtime import CellModule

    path = Path(path)
    if not isinstance(module, CellModule):
        return _export_network(module, path, example_input, example_kwargs)
    prog = module.program
    if prog.CELL.endswith("_masked"):
        raise ValueError(f"cell '{module.cell_name}' is a network's layer; export the network")
    if example_input is not None:
        module.eval()(example_input)
    params = {n: getattr(module, n).detach().float().cpu().numpy() for n in prog.PARAMS}
    model = build(prog, _step_schedule(prog), params, module._dim_args, prog.CELL)
    path = Path(path)
    path.write_bytes(model.SerializeToString())
    return path
