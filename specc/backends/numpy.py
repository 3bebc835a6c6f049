"""Backend: scheduled step IR -> NumPy source for the forward and backward passes over a sequence.

Batched values are (rows, features) arrays: rows are the batch inside the time loop and
time x batch outside it, so one spelling serves both. States live in ((T + 1) * B, size)
sequence buffers: block t holds the value before step t.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..ir import Graph, Node
from ..ops import ACTIVATIONS
from ..schedule import Schedule
from .writer import Namer, Writer

INTERNAL = {"np", "rt", "math", "T", "B", "rows", "dtype", "t", "s", "e", "train", "saved"}


def _size(s) -> str:
    return str(s)


@dataclass
class Scan:
    """What emitting one scan needs: its schedule and the names chosen for its values."""

    sched: Schedule
    reverse: bool
    source_lines: list[str]
    file: str
    names: dict[int, str] = field(default_factory=dict)
    seq: dict[int, str] = field(default_factory=dict)  # kept loop values -> their buffers
    carry_buf: dict[str, str] = field(default_factory=dict)  # state -> its sequence buffer

    @property
    def g(self) -> Graph:
        return self.sched.graph

    def carry_of(self, i: int) -> tuple[str, bool] | None:
        """(state, is_leaf) when node i is a state's carried value, read or written."""
        for name, leaf, nxt in self.g.carries:
            if i == leaf:
                return name, True
            if i == nxt:
                return name, False
        return None

    def ref(self, i: int, loop: bool) -> str:
        node = self.g.nodes[i]
        if node.op == "const":
            v = node.attrs[0]
            return repr(v) if v >= 0 else f"({v!r})"
        carried = self.carry_of(i)
        if carried and (node.op == "carry" or not loop):
            state, is_leaf = carried
            buf = self.carry_buf[state]
            # Forward reads block t and writes block t + 1; backward reads t + 1 and writes t.
            reads_later = is_leaf == self.reverse
            if loop:
                return f"{buf}[e:e + B]" if reads_later else f"{buf}[s:e]"
            return f"{buf}[B:]" if reads_later else f"{buf}[:rows]"
        region = self.sched.region[i]
        if region == "pre" and loop:
            return f"{self.names[i]}[s:e]"
        if region == "loop" and not loop:
            return self.seq[i]
        return self.names[i]


def spell(node: Node, a: list[str], types: list, rows: str) -> str:
    """How NumPy spells one op, given its arguments' code."""
    op = node.op
    batched = node.type.batched
    if op in ("add", "sub", "mul", "div"):
        return f"{a[0]} {dict(add='+', sub='-', mul='*', div='/')[op]} {a[1]}"
    if op == "neg":
        return f"-{a[0]}"
    if op in ACTIVATIONS:
        return ACTIVATIONS[op].numpy.format(x=a[0]).replace("sigmoid(", "rt.sigmoid(")
    if op == "softmax":
        return f"rt.softmax({a[0]})"
    if op == "softmax_vjp":
        return f"rt.softmax_vjp({a[0]}, {a[1]})"
    if op == "matvec":
        return f"{a[1]} @ {a[0]}.T" if batched else f"{a[0]} @ {a[1]}"
    if op == "matvec_t":
        return f"{a[1]} @ {a[0]}" if batched else f"{a[0]}.T @ {a[1]}"
    if op == "outer_sum":
        return f"{a[0]}.T @ {a[1]}" if types[0].batched else f"np.outer({a[0]}, {a[1]})"
    if op == "sum_rows":
        return f"{a[0]}.sum(axis=0)"
    if op == "sum_all":
        return f"{a[0]}.sum()"
    if op == "concat":
        return f"np.concatenate([{', '.join(a)}], axis={1 if batched else 0})"
    if op == "slice":
        start, stop = (_size(s) for s in node.attrs)
        start = "" if start == "0" else start
        return f"{a[0]}[:, {start}:{stop}]" if batched else f"{a[0]}[{start}:{stop}]"
    if op == "reshape":
        shape = ", ".join(_size(s) for s in node.attrs[0])
        return f"{a[0]}.reshape({rows}, {shape})" if batched else f"{a[0]}.reshape({shape})"
    if op == "zeros":
        shape = [_size(s) for s in node.attrs[0]]
        if batched:
            shape = [rows] + shape
        return f"np.zeros(({', '.join(shape)},), dtype=dtype)"
    if op == "outer":
        return f"rt.outer_rows({a[0]}, {a[1]})"
    if op in ("outer_vjp_a", "outer_vjp_b"):
        n, k = (_size(s) for s in node.attrs)
        return f"rt.{op}({a[0]}, {a[1]}, {n}, {k})"
    raise AssertionError(f"numpy backend cannot spell {op!r}")


def _name_values(scan: Scan, namer: Namer, leaf_names: dict[int, str]) -> None:
    g = scan.g
    for i, node in enumerate(g.nodes):
        if i in leaf_names:
            scan.names[i] = leaf_names[i]
        elif node.op not in ("const", "carry"):
            scan.names[i] = namer(node.name or f"v{i}")
    for name, _, _ in g.carries:
        scan.carry_buf[name] = namer(f"d_{name}_seq" if scan.reverse else f"{name}_seq")
    for i in sorted(scan.sched.kept):
        scan.seq[i] = namer(f"{scan.names[i]}_seq")


class _Lines:
    """Emits a spec-line comment whenever the statements move to another spec line."""

    def __init__(self, w: Writer, scan: Scan):
        self.w, self.scan, self.last = w, scan, None

    def emit(self, node: Node, stmt: str) -> None:
        if node.line and node.line != self.last and node.line <= len(self.scan.source_lines):
            self.w.comment(f"{self.scan.file}:{node.line}  {self.scan.source_lines[node.line - 1].strip()}")
            self.last = node.line
        self.w.line(stmt)


def _emit_nodes(w: Writer, scan: Scan, region: str, loop: bool) -> None:
    lines = _Lines(w, scan)
    g = scan.g
    for i in scan.sched.nodes_in(region):
        node = g.nodes[i]
        if node.op in ("input", "param", "const", "carry"):
            continue
        args = [scan.ref(a, loop) for a in node.args]
        rows = "B" if loop else "rows"
        lines.emit(node, f"{scan.names[i]} = {spell(node, args, [g.nodes[a].type for a in node.args], rows)}")


def emit_scan(w: Writer, scan: Scan, carry_init: list[str], guard_kept: frozenset[int] = frozenset()) -> None:
    """The body of one pass over the sequence.

    `carry_init`: per state, the code of the value it starts from (the initial state forward, the
    final state's gradient backward). `guard_kept` buffers are filled only when training.
    """
    g, sched = scan.g, scan.sched
    w.comment("Fixed for the whole sequence.")
    _emit_nodes(w, scan, "const", loop=False)
    w.comment("Before the loop: everything that does not depend on the state, for all steps at once.")
    _emit_nodes(w, scan, "pre", loop=False)
    for (name, leaf, _), init in zip(g.carries, carry_init):
        size = _size(g.nodes[leaf].type.shape[0])
        w.line(f"{scan.carry_buf[name]} = np.empty(((T + 1) * B, {size}), dtype=dtype)")
        w.line(f"{scan.carry_buf[name]}[{'T * B:' if scan.reverse else ':B'}] = {init}")
    for i, buf in scan.seq.items():
        size = _size(g.nodes[i].type.shape[0])
        alloc = f"np.empty((rows, {size}), dtype=dtype)"
        w.line(f"{buf} = {alloc} if train else None" if i in guard_kept else f"{buf} = {alloc}")
    steps = "reversed(range(T))" if scan.reverse else "range(T)"
    w.comment("The time loop: only what depends on the state." if not scan.reverse else
              "The time loop, from the last step to the first: only what the carried gradient needs.")
    with w.block(f"for t in {steps}:"):
        w.line("s, e = t * B, (t + 1) * B")
        _emit_nodes(w, scan, "loop", loop=True)
        for i, buf in scan.seq.items():
            if i not in guard_kept:
                w.line(f"{buf}[s:e] = {scan.names[i]}")
        if any(i in guard_kept for i in scan.seq):
            with w.block("if train:"):
                for i, buf in scan.seq.items():
                    if i in guard_kept:
                        w.line(f"{buf}[s:e] = {scan.names[i]}")
        for name, _, nxt in g.carries:
            block = "s:e" if scan.reverse else "e:e + B"
            w.line(f"{scan.carry_buf[name]}[{block}] = {scan.ref(nxt, loop=True)}")
    if sched.nodes_in("post"):
        w.comment("After the loop: what the carried values do not need, for all steps at once.")
        _emit_nodes(w, scan, "post", loop=False)
    if sched.nodes_in("reduce"):
        w.comment("Sums over time and batch, each one matrix product over all steps.")
        _emit_nodes(w, scan, "reduce", loop=False)
        _emit_nodes(w, scan, "final", loop=False)


def _tuple(items: list[str]) -> str:
    return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"


def _reshape_in(w: Writer, name: str, size: str) -> None:
    w.line(f"{name} = {name}.reshape(rows, {size})")


def emit_forward(w: Writer, fwd: Schedule, saved_nodes: list[int], dims: tuple[str, ...],
                 source_lines: list[str], file: str) -> dict[int, str]:
    """def forward(...): the pass over the sequence. Returns the names the saved values go by."""
    g = fwd.graph
    namer = Namer(INTERNAL | set(dims))
    scan = Scan(fwd, reverse=False, source_lines=source_lines, file=file)
    leaf_names = {}
    for name, i in g.inputs:
        leaf_names[i] = namer(name)
    init_names = [namer(f"{name}0") for name, _, _ in g.carries]
    for name, i in g.params:
        leaf_names[i] = namer(name)
    _name_values(scan, namer, leaf_names)
    args = [leaf_names[i] for _, i in g.inputs] + init_names + [leaf_names[i] for _, i in g.params]
    kw = ", ".join(["T", "B", *dims])
    with w.block(f"def forward({', '.join(args)}, *, {kw}, train=False):"):
        w.line('"""One pass over a sequence of T steps with batch B; inputs are (T, B, size).')
        w.line("")
        w.line("Returns (outputs, final states, saved): saved holds what backward needs when train is set.")
        w.line('"""')
        w.line("rows = T * B")
        first = (leaf_names[g.inputs[0][1]] if g.inputs else init_names[0])
        w.line(f"dtype = {first}.dtype")
        for name, i in g.inputs:
            _reshape_in(w, leaf_names[i], _size(g.nodes[i].type.shape[0]))
        saved_only = frozenset(i for i in saved_nodes if i in fwd.kept) - _needed_kept(fwd)
        emit_scan(w, scan, init_names, guard_kept=saved_only)
        outs = _tuple([f"{scan.ref(i, loop=False)}.reshape(T, B, -1)" for _, i in g.outputs])
        finals = _tuple([f"{scan.carry_buf[name]}[T * B:]" for name, _, _ in g.carries])
        saved_names = {i: _saved_key(g, i, scan) for i in saved_nodes}
        if saved_nodes:
            items = ", ".join(f'"{saved_names[i]}": {scan.ref(i, loop=False)}' for i in saved_nodes)
            w.line(f"saved = {{{items}}} if train else None")
        else:
            w.line("saved = {} if train else None")
        w.line(f"return {outs}, {finals}, saved")
    return saved_names


def _saved_key(g: Graph, i: int, scan: Scan) -> str:
    node = g.nodes[i]
    if node.op == "carry":
        return f"{node.attrs[0]}_prev"
    carried = scan.carry_of(i)
    if carried:
        return f"{carried[0]}_next"
    return scan.names[i]


def _needed_kept(s: Schedule) -> frozenset[int]:
    """Kept loop values that the pass itself needs (not only the backward pass)."""
    g = s.graph
    need = set()
    for i, node in enumerate(g.nodes):
        if s.region[i] in ("post", "reduce"):
            need.update(node.args)
    need.update(i for _, i in g.outputs)
    return frozenset(need & s.kept)


def emit_backward(w: Writer, bwd: Schedule, fwd: Graph, saved_names: dict[int, str],
                  dims: tuple[str, ...], source_lines: list[str], file: str) -> None:
    g = bwd.graph
    namer = Namer(INTERNAL | set(dims))
    scan = Scan(bwd, reverse=True, source_lines=source_lines, file=file)
    fwd_param_names = {i: name for name, i in fwd.params}
    leaf_names, bind = {}, []
    d_out_args = []
    for key, i in g.inputs:
        if key.startswith("d:"):
            leaf_names[i] = namer(f"d_{key[2:]}")
            d_out_args.append(i)
    d_final = [namer(f"d_{name}_final") for name, _, _ in g.carries]
    param_args = [namer(name) for name, _ in fwd.params]
    by_name = dict(zip((n for n, _ in fwd.params), param_args))
    for key, i in g.inputs + g.params:
        if key.startswith("%"):
            f = int(key[1:])
            if f in fwd_param_names:
                leaf_names[i] = by_name[fwd_param_names[f]]
            else:
                leaf_names[i] = namer(saved_names[f])
                bind.append((leaf_names[i], saved_names[f]))
    _name_values(scan, namer, leaf_names)
    args = ["saved"] + [leaf_names[i] for i in d_out_args] + d_final + param_args
    kw = ", ".join(["T", "B", *dims])
    with w.block(f"def backward({', '.join(args)}, *, {kw}):"):
        w.line('"""Backpropagation through time: gradients of the inputs, initial states and parameters."""')
        w.line("rows = T * B")
        w.line(f"dtype = {d_final[0] if d_final else leaf_names[d_out_args[0]]}.dtype")
        w.line("train = True")
        for i in d_out_args:
            _reshape_in(w, leaf_names[i], _size(g.nodes[i].type.shape[0]))
        for local, key in bind:
            w.line(f'{local} = saved["{key}"]')
        emit_scan(w, scan, d_final)
        d_inputs = _tuple([f"{scan.ref(i, loop=False)}.reshape(T, B, -1)" for _, i in g.outputs])
        d_inits = _tuple([f"{scan.carry_buf[name]}[:B]" for name, _, _ in g.carries])
        d_params = _tuple([scan.ref(i, loop=False) for _, i in g.reduced])
        w.line(f"return {d_inputs}, {d_inits}, {d_params}")
