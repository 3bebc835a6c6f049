"""Stage 2, networks: AST -> checked network. Names resolve, sizes connect, nothing depends on
itself except through prev(y), and every problem is reported at its line and column.

A checked network is a plan: `ops`, in an order where every op comes after its arguments, each
producing one value. A value is a sequence of vectors (T, B, n), one vector per example (B, n),
a sequence of token ids (T, B) or one token id per example (B,); its size n (for tokens, the
vocabulary size) is a polynomial in the network's dimensions, so `2*H` meets `2*H` whatever H is
bound to. The runtime (specc/network.py) interprets the plan.

Ops:
  input   (name,)                   a network input
  prev    (output, start)           output y at the step before: the target shifted right, the
                                    start token first (teacher forcing), or the token chosen at the
                                    step before (generating)
  final   (layer, state)            a recurrent layer's final state (its top layer; directions
                                    concatenated)
  layer   (layer, wires)            an embedding, a linear layer or a recurrent layer applied to its
                                    argument; wires: ((name, "input" | "state", op id), ...)
  fn      (name,)                   tanh, sigmoid, relu, softmax, log_softmax at every step
  pool    (name,)                   last (each sequence's own last step), mean, max: sequence -> vector
  repeat  ()                        a vector at every step; first: at the first step, zeros after
"""
from __future__ import annotations

import difflib
import functools
from dataclasses import dataclass

from . import ast
from .check import CheckedCell, check, dim_size, scalar_start, size_range
from .errors import Collector, Loc, SpecError
from .lower import lower
from .shapes import Size

INPUT_KINDS = {"sequence": "sequence", "vector": "vector", "tokens": "tokens", "token": "token"}
FUNCTIONS = ("tanh", "sigmoid", "relu", "softmax", "log_softmax")
POOLS = ("last", "mean", "max")
SPREADS = ("repeat", "first")
BUILTIN_LAYERS = ("embedding", "linear")
STAGES = FUNCTIONS + POOLS + SPREADS


@dataclass(frozen=True)
class Value:
    kind: str  # sequence, vector, tokens, token
    size: Size | None  # None only for prev(y) before y's size is known


@dataclass(frozen=True)
class RecurrentSpec:
    cell: CheckedCell
    text: str  # the spec text and file the cell comes from, for compiling it
    file: str
    dims: tuple[tuple[str, Size], ...]  # the cell's dimensions for the first layer, in network terms
    input_dim: str | None  # the dimension a layer above the first rebinds to the size below it
    layers: Size
    bidirectional: bool
    dropout: float
    output: Size  # one direction's output size


@dataclass(frozen=True)
class LayerSpec:
    name: str
    kind: str  # embedding, linear, recurrent
    sizes: tuple[Size, ...]  # embedding: (V, E); linear: (in, out); recurrent: ()
    recurrent: RecurrentSpec | None
    loc: Loc


@dataclass(frozen=True)
class Op:
    op: str
    args: tuple[int, ...]
    attrs: tuple
    value: Value
    loc: Loc
    stepwise: bool = False  # depends on prev(y): run one step at a time when generating


@dataclass(frozen=True)
class CheckedNetwork:
    name: str
    doc: str
    file: str
    dims: tuple[str, ...]
    inputs: tuple[tuple[str, str, Size], ...]  # (name, kind, size)
    layers: tuple[LayerSpec, ...]
    ops: tuple[Op, ...]
    outputs: tuple[tuple[str, int], ...]
    prev: tuple[str, int, Size] | None  # (output fed back, its prev op, start token)
    loc: Loc
    start_loc: Loc | None = None  # where the start token is written, for errors at load


def describe(v: Value) -> str:
    if v.kind == "sequence":
        return f"a sequence of {v.size}-vectors"
    if v.kind == "vector":
        return f"one {v.size}-vector per example"
    vocab = f" (vocabulary {v.size})" if v.size is not None else ""
    return ("a sequence of token ids" if v.kind == "tokens" else "one token id per example") + vocab


def substitute(size: Size, values: dict[str, Size]) -> Size:
    """A size written in a cell's dimensions, in the network's (each name replaced by its value)."""
    total = Size.of(0)
    for mono, coef in size.terms:
        term = Size(((( ), coef),))
        for name in mono:
            term = term * values[name]
        total = total + term
    return total


@functools.lru_cache(maxsize=None)
def _library_cells() -> dict[str, tuple[CheckedCell, str, str]]:
    """Every cell of the library (specs/), by name, with its text and file."""
    from .library import spec_file, spec_names
    from .parse import parse

    found = {}
    for name in spec_names():
        path = spec_file(name)
        text = path.read_text(encoding="utf-8")
        file = f"specs/{name}.rnn"
        try:
            cells = check(parse(text, file))
        except SpecError:
            continue
        for c in cells:
            found.setdefault(c.name, (c, text, file))
    return found


@functools.lru_cache(maxsize=None)
def _cell_output_and_states(cell: CheckedCell) -> tuple[Size, tuple[tuple[str, Size], ...]]:
    g = lower(cell)
    first = g.outputs[0][1]
    return g.nodes[first].type.shape[0], tuple((name, g.nodes[nxt].type.shape[0]) for name, _, nxt in g.carries)


def input_dim(cell: CheckedCell) -> str | None:
    """The dimension that the size of the cell's first input is, when it is one dimension alone:
    a layer binds it to the size of what feeds it (a stacked layer, to the layer below)."""
    if not cell.own_inputs:
        return None
    first = cell.own_inputs[0].shape[0]
    if len(first.terms) == 1 and len(first.terms[0][0]) == 1 and first.terms[0][1] == 1:
        return first.terms[0][0][0]
    return None


def stackable(cell: CheckedCell) -> bool:
    """A layer above the first reads the one below: its input size must be a dimension of its own,
    one its output size does not depend on."""
    dim = input_dim(cell)
    out, _ = _cell_output_and_states(cell)
    return dim is not None and dim not in out.names()


def cannot_stack(cell: CheckedCell) -> str:
    return (f"cell '{cell.name}' cannot be stacked: a layer above the first reads the one below, so its "
            f"input size must be a dimension of its own (input {cell.own_inputs[0].name}[{cell.own_inputs[0].shape[0]}])")


def _suggest(name: str, candidates) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1)
    return f"; did you mean '{close[0]}'?" if close else ""


def check_network(net: ast.Network, spec: ast.Spec, cells: list[CheckedCell]) -> CheckedNetwork:
    """`cells`: the checked cells of the same file, which a layer may name as well as the library's."""
    return _Checker(net, spec, cells).run()


def check_networks(spec: ast.Spec, cells: list[CheckedCell]) -> list[CheckedNetwork]:
    errors = Collector()
    out = []
    for net in spec.networks:
        try:
            out.append(check_network(net, spec, cells))
        except SpecError as e:
            errors.diagnostics.extend(e.diagnostics)
    errors.raise_if_any()
    return out


class _Checker:
    def __init__(self, net: ast.Network, spec: ast.Spec, cells: list[CheckedCell]):
        self.net, self.spec = net, spec
        self.local_cells = {c.name: c for c in cells}
        self.errors = Collector()
        self.dims = {n for n, _ in net.dims}
        self.ops: list[Op] = []
        self.layers: dict[str, LayerSpec] = {}
        self.layer_ast: dict[str, ast.Layer] = {}
        self.inputs: dict[str, ast.NetInput] = {}
        self.flows: dict[str, int] = {}  # name -> index in net.flows
        self.flow_value: dict[int, int | None] = {}
        self.visiting: list[int] = []
        self.runs: dict[str, list[int]] = {}  # recurrent layer -> flows that run it
        self.run_op: dict[str, int] = {}
        self.prev: tuple[str, int, Size] | None = None
        self.start_loc: Loc | None = None
        self.pending_vocab: list[tuple[Size, Loc]] = []  # embeddings reading prev(y): their V
        self.current: int | None = None

    # --- sizes ---

    def size(self, d: ast.Dim, what: str = "size") -> Size | None:
        for name_loc in _dim_names(d):
            name, loc = name_loc
            if name not in self.dims:
                self.errors.error(loc, f"unknown dimension '{name}'" + _suggest(name, self.dims)
                                  + f"; declare it in the network's header: network "
                                    f"{self.net.name}({', '.join([n for n, _ in self.net.dims] + [name])})")
                return None
        return dim_size(d, self.dims, self.errors, what)

    # --- declarations ---

    def declare(self) -> None:
        taken: dict[str, Loc] = {}

        def define(name: str, loc: Loc, what: str) -> bool:
            if name in taken:
                self.errors.error(loc, f"'{name}' is defined twice (first at line {taken[name].line})")
                return False
            if name in STAGES or name in BUILTIN_LAYERS or name == "prev":
                self.errors.error(loc, f"'{name}' is a built-in name; choose another name for this {what}")
                return False
            taken[name] = loc
            return True

        for name, loc in self.net.dims:
            define(name, loc, "dimension")
        for i in self.net.inputs:
            if i.kind not in INPUT_KINDS:
                self.errors.error(i.kind_loc, f"unknown kind of input '{i.kind}'" + _suggest(i.kind, INPUT_KINDS)
                                  + "; an input is a sequence[n], a vector[n], tokens[V] or a token[V]")
                continue
            if define(i.name, i.loc, "input"):
                self.inputs[i.name] = i
        for layer in self.net.layers:
            if define(layer.name, layer.loc, "layer"):
                spec = self.declare_layer(layer)
                if spec is not None:
                    self.layers[layer.name] = spec
                    self.layer_ast[layer.name] = layer
        for k, f in enumerate(self.net.flows):
            if f.name is not None and define(f.name, f.loc, "output" if f.output else "value"):
                self.flows[f.name] = k
        if not any(f.output for f in self.net.flows):
            self.errors.error(self.net.loc, f"network '{self.net.name}' has no output; "
                                            f"add a line such as: output y = x -> layer")
        for k, f in enumerate(self.net.flows):
            for stage in _stages(f.chain):
                spec = self.layers.get(stage.name)
                if spec is not None and spec.kind == "recurrent":
                    self.runs.setdefault(stage.name, []).append(k)

    def declare_layer(self, layer: ast.Layer) -> LayerSpec | None:
        if layer.kind in BUILTIN_LAYERS:
            if layer.stacked is not None or layer.bidirectional or layer.dropout:
                self.errors.error(layer.kind_loc, f"{layer.kind} is not recurrent: stacked, bidirectional and "
                                                  f"dropout apply to layers made of cells")
            named = [a for a in layer.args if a.name is not None]
            if named:
                self.errors.error(named[0].loc, f"{layer.kind} takes sizes in order, not by name")
                return None
            sizes = [self.size(a.value) for a in layer.args]
            if any(s is None for s in sizes):
                return None
            want = (2,) if layer.kind == "embedding" else (1, 2)
            if len(sizes) not in want:
                usage = "embedding(V, E): V token ids, E features" if layer.kind == "embedding" else \
                    "linear(out) or linear(in, out)"
                self.errors.error(layer.kind_loc, f"{layer.kind} takes {' or '.join(map(str, want))} sizes, "
                                                  f"got {len(sizes)}: {usage}")
                return None
            return LayerSpec(layer.name, layer.kind, tuple(sizes), None, layer.loc)
        found = self.find_cell(layer.kind)
        if found is None:
            known = list(self.local_cells) + list(_library_cells()) + list(BUILTIN_LAYERS)
            self.errors.error(layer.kind_loc, f"unknown layer '{layer.kind}'" + _suggest(layer.kind, known)
                              + "; a layer is embedding(V, E), linear(in, out), or a cell of this file or specs/")
            return None
        cell, text, file = found
        dims: dict[str, Size] = {}
        positional = [a for a in layer.args if a.name is None]
        if len(positional) > len(cell.dims):
            self.errors.error(positional[len(cell.dims)].loc,
                              f"cell '{cell.name}' has {len(cell.dims)} dimensions ({', '.join(cell.dims)}), "
                              f"got {len(positional)} in order")
            return None
        ok = True
        for name, a in zip(cell.dims, positional):
            dims[name] = self.size(a.value)
        for a in layer.args:
            if a.name is None:
                continue
            if a.name not in cell.dims:
                self.errors.error(a.loc, f"cell '{cell.name}' has no dimension '{a.name}'"
                                  + _suggest(a.name, cell.dims) + f"; its dimensions are {', '.join(cell.dims)}")
                ok = False
            elif a.name in dims:
                self.errors.error(a.loc, f"dimension {a.name} of '{cell.name}' is given twice")
                ok = False
            else:
                dims[a.name] = self.size(a.value)
        if any(v is None for v in dims.values()) or not ok:
            return None
        stacked = Size.of(1) if layer.stacked is None else self.size(layer.stacked)
        if stacked is None:
            return None
        if not 0.0 <= layer.dropout < 1.0:
            self.errors.error(layer.loc, f"dropout must be at least 0 and less than 1, got {layer.dropout:g}")
        if not cell.own_inputs:
            self.errors.error(layer.kind_loc, f"cell '{cell.name}' has no input, so nothing can feed it")
            return None
        if stacked != Size.of(1) and not stackable(cell):
            self.errors.error(layer.kind_loc, cannot_stack(cell))
            return None
        spec = RecurrentSpec(cell, text, file, tuple(dims.items()), input_dim(cell), stacked, layer.bidirectional,
                             layer.dropout, Size.of(0))
        return LayerSpec(layer.name, "recurrent", (), spec, layer.loc)

    def find_cell(self, name: str):
        if name in self.local_cells:
            return self.local_cells[name], self.spec.text, self.spec.file
        return _library_cells().get(name)

    # --- values ---

    def add(self, op: str, args, attrs, value: Value, loc: Loc) -> int:
        stepwise = op == "prev" or any(self.ops[a].stepwise for a in args)
        self.ops.append(Op(op, tuple(args), tuple(attrs), value, loc, stepwise))
        return len(self.ops) - 1

    def value_of_flow(self, k: int, loc: Loc) -> int | None:
        if k in self.flow_value:
            return self.flow_value[k]
        if k in self.visiting:
            cycle = self.visiting[self.visiting.index(k):] + [k]
            names = " -> ".join(self.net.flows[i].name or f"line {self.net.flows[i].loc.line}" for i in cycle)
            flow = self.net.flows[k]
            hint = (f"; the output at the step before is written prev({flow.name})"
                    if flow.output and len(cycle) == 2 else "")
            self.errors.error(loc, f"'{flow.name or 'this chain'}' depends on itself: a cycle {names}{hint}")
            return None
        self.visiting.append(k)
        outer, self.current = self.current, k
        v = self.chain(self.net.flows[k].chain)
        self.current = outer
        self.visiting.pop()
        self.flow_value[k] = v
        return v

    def chain(self, chain: ast.Chain) -> int | None:
        v = self.source(chain.source)
        for stage in chain.stages:
            if v is None:
                return None
            v = self.stage(stage, v)
        return v

    def source(self, s: ast.Source) -> int | None:
        if s.kind == "name":
            if s.name in self.inputs:
                i = self.inputs[s.name]
                size = self.size(i.size)
                if size is None:
                    return None
                return self.add("input", (), (s.name,), Value(INPUT_KINDS[i.kind], size), s.loc)
            if s.name in self.flows:
                return self.value_of_flow(self.flows[s.name], s.loc)
            if s.name in self.layers or s.name in STAGES:
                self.errors.error(s.loc, f"'{s.name}' is a layer: a chain starts from a value "
                                         f"(an input, a named value, prev(y) or a final state), e.g. x -> {s.name}")
                return None
            known = list(self.inputs) + list(self.flows)
            self.errors.error(s.loc, f"unknown name '{s.name}'" + _suggest(s.name, known))
            return None
        if s.kind == "final":
            spec = self.layers.get(s.name)
            if spec is None or spec.kind != "recurrent":
                what = "is not a recurrent layer" if s.name in self.layers else "is not a layer"
                self.errors.error(s.loc, f"'{s.name}' {what}, so {s.name}.{s.state} is no final state"
                                  + ("" if s.name in self.layers else _suggest(s.name, self.layers)))
                return None
            states = dict(_cell_output_and_states(spec.recurrent.cell)[1])
            if s.state not in states:
                self.errors.error(s.loc, f"cell '{spec.recurrent.cell.name}' of layer '{s.name}' has no state "
                                         f"'{s.state}'; its states are {', '.join(states)}")
                return None
            if s.name not in self.runs:
                self.errors.error(s.loc, f"'{s.name}' is not run on any input, so {s.name}.{s.state} has no value "
                                         f"(a decoder without an encoder); run it, e.g. source -> {s.name}")
                return None
            self.value_of_flow(self.runs[s.name][0], s.loc)
            run = self.run_op.get(s.name)
            if run is None:
                return None
            spec = self.layers[s.name]
            rec = spec.recurrent
            width = substitute(states[s.state], self._top_dims(spec))
            if rec.bidirectional:
                width = width * 2
            return self.add("final", (run,), (s.name, s.state), Value("vector", width), s.loc)
        # prev(y)
        flow = self.flows.get(s.name)
        if flow is None or not self.net.flows[flow].output:
            self.errors.error(s.loc, f"prev({s.name}): '{s.name}' is not an output of this network; prev(y) is "
                                     f"output y at the step before")
            return None
        if self.current != flow:
            self.errors.error(s.loc, f"prev({s.name}) can only start {s.name}'s own chain: "
                                     f"output {s.name} = prev({s.name}) -> ...")
            return None
        if self.prev is not None:
            self.errors.error(s.loc, "a network feeds back one output; prev(...) is used twice")
            return None
        start = Size.of(0) if s.start is None else self.size(s.start, "token id")
        if start is None:
            return None
        self.start_loc = None if s.start is None else scalar_start(s.start)
        op = self.add("prev", (), (s.name, start), Value("tokens", None), s.loc)
        self.prev = (s.name, op, start)
        return op

    def check_start(self, y: str, start: Size, vocab: Size) -> None:
        """The start token is a token id of y, from 0 to its vocabulary size - 1: reported here where
        no binding of the dimensions (whole numbers from 1 up) could make it one, else at load."""
        if self.start_loc is None:
            return  # the default, 0, is always a token id
        names = sorted(start.names() | vocab.names())
        every = f" for every {' and '.join(names)}" if names else ""
        shown, size = (str(v).replace("//", "/") for v in (start, vocab))
        k = start.constant
        if k is not None and k.denominator != 1:
            why = f"got {shown}"
        elif size_range(start).below(0):
            why = f"got {shown}" if k is not None else f"but {shown} < 0{every}"
        elif size_range(start - vocab).at_least(0):
            why = f"but {shown} is not below {size}{every}"
        else:
            return
        self.errors.error(self.start_loc, f"the start token of prev({y}) must be a token id of {y}, a whole "
                                          f"number from 0 to {size} - 1 ({y} scores {size} tokens), {why}")

    def _top_dims(self, spec: LayerSpec) -> dict[str, Size]:
        rec = spec.recurrent
        dims = dict(rec.dims)
        if rec.layers != Size.of(1) and rec.input_dim is not None:
            dims[rec.input_dim] = rec.output * (2 if rec.bidirectional else 1)
        return dims

    def stage(self, stage: ast.Stage, v: int) -> int | None:
        value = self.ops[v].value
        name = stage.name
        if stage.wires and (name not in self.layers or self.layers[name].kind != "recurrent"):
            self.errors.error(stage.loc, f"only a layer made of a cell takes wires (name = value); "
                                         f"'{name}' is not one")
            return None
        if name in FUNCTIONS or name in POOLS or name in SPREADS:
            want = "sequence" if name in POOLS else "vector" if name in SPREADS else None
            if value.kind not in ("sequence", "vector") or (want and value.kind != want):
                need = {"sequence": "a sequence of vectors", "vector": "one vector per example"}.get(want, "vectors")
                self.errors.error(stage.loc, f"{name} needs {need}, but its input is {describe(value)}")
                return None
            if name in FUNCTIONS:
                return self.add("fn", (v,), (name,), value, stage.loc)
            if name in POOLS:
                if self.ops[v].stepwise:
                    self.errors.error(stage.loc, f"{name} pools a whole sequence, but this one depends on "
                                                 f"prev(...) and is made one step at a time")
                    return None
                return self.add("pool", (v,), (name,), Value("vector", value.size), stage.loc)
            return self.add(name, (v,), (), Value("sequence", value.size), stage.loc)
        spec = self.layers.get(name)
        if spec is None:
            if name in self.inputs or name in self.flows:
                self.errors.error(stage.loc, f"'{name}' is a value, not a layer; a chain reads value -> layer -> layer")
            else:
                known = list(self.layers) + list(STAGES)
                self.errors.error(stage.loc, f"unknown layer '{name}'" + _suggest(name, known))
            return None
        if spec.kind == "embedding":
            vocab, width = spec.sizes
            if value.kind not in ("tokens", "token"):
                self.errors.error(stage.loc, f"embedding '{name}' reads token ids, but its input is {describe(value)}")
                return None
            if value.size is None:
                self.pending_vocab.append((vocab, stage.loc))
            elif value.size != vocab:
                self.errors.error(stage.loc, f"sizes do not connect: embedding '{name}' reads token ids below {vocab}, "
                                             f"but its input is {describe(value)}")
                return None
            kind = "sequence" if value.kind == "tokens" else "vector"
            return self.add("layer", (v,), (name, ()), Value(kind, width), stage.loc)
        if spec.kind == "linear":
            if value.kind not in ("sequence", "vector"):
                self.errors.error(stage.loc, f"linear layer '{name}' reads vectors, but its input is "
                                             f"{describe(value)}; token ids need an embedding first")
                return None
            if len(spec.sizes) == 1:
                spec = LayerSpec(spec.name, spec.kind, (value.size, spec.sizes[0]), None, spec.loc)
                self.layers[name] = spec
            elif spec.sizes[0] != value.size:
                self.errors.error(stage.loc, f"sizes do not connect: linear layer '{name}' takes {spec.sizes[0]} "
                                             f"features, but its input is {describe(value)}")
                return None
            return self.add("layer", (v,), (name, ()), Value(value.kind, spec.sizes[1]), stage.loc)
        return self.recurrent(stage, spec, v, value)

    def recurrent(self, stage: ast.Stage, spec: LayerSpec, v: int, value: Value) -> int | None:
        name, rec = spec.name, spec.recurrent
        cell = rec.cell
        if value.kind != "sequence":
            hint = "; make one with repeat (at every step) or first (at the first step)" if value.kind == "vector" \
                else "; token ids need an embedding first" if value.kind == "tokens" else ""
            self.errors.error(stage.loc, f"recurrent layer '{name}' reads a sequence of vectors, but its input is "
                                         f"{describe(value)}{hint}")
            return None
        if name in self.run_op:
            self.errors.error(stage.loc, f"recurrent layer '{name}' is run twice; declare another layer "
                                         f"for the second use")
            return None
        dims = dict(rec.dims)
        if rec.input_dim is not None and rec.input_dim not in dims:
            dims[rec.input_dim] = value.size
        missing = [d for d in cell.dims if d not in dims]
        if missing:
            self.errors.error(self.layer_ast[name].kind_loc,
                              f"dimension{'s' if len(missing) > 1 else ''} {', '.join(missing)} of cell "
                              f"'{cell.name}' not given; write {cell.name}({', '.join(d + '=...' for d in missing)})")
            return None
        want = substitute(cell.own_inputs[0].shape[0], dims)
        if want != value.size:
            self.errors.error(stage.loc, f"sizes do not connect: layer '{name}' (cell {cell.name}) reads "
                                         f"{cell.own_inputs[0].name}[{want}], but its input is {describe(value)}")
            return None
        if self.ops[v].stepwise and rec.bidirectional:
            self.errors.error(stage.loc, f"layer '{name}' depends on prev(...), so it runs one step at a time "
                                         f"when generating; it cannot be bidirectional")
            return None
        out, states = _cell_output_and_states(cell)
        states = dict(states)
        inputs = {d.name: d for d in cell.own_inputs[1:]}
        wires, given = [], set()
        for w in stage.wires:
            if w.name in given:
                self.errors.error(w.loc, f"'{w.name}' is wired twice")
                continue
            given.add(w.name)
            if w.name not in states and w.name not in inputs:
                other = ", ".join(inputs) or "none"
                self.errors.error(w.loc, f"cell '{cell.name}' has no state or other input '{w.name}'; its states "
                                         f"are {', '.join(states)}, its other inputs {other}")
                continue
            wv = self.chain(w.chain)
            if wv is None:
                continue
            got = self.ops[wv].value
            if w.name in states:
                size = substitute(states[w.name], dims)
                if got.kind != "vector" or got.size != size:
                    self.errors.error(w.loc, f"sizes do not connect: state '{w.name}' of '{cell.name}' starts from "
                                             f"one {size}-vector per example, but it is given {describe(got)}")
                    continue
                wires.append((w.name, "state", wv))
            else:
                size = substitute(inputs[w.name].shape[0], dims)
                if got.kind not in ("vector", "sequence") or got.size != size:
                    self.errors.error(w.loc, f"sizes do not connect: input '{w.name}' of '{cell.name}' takes "
                                             f"{size}-vectors, but it is given {describe(got)}")
                    continue
                wires.append((w.name, "input", wv))
        for d in cell.own_inputs[1:]:
            if d.name not in given:
                self.errors.error(stage.loc, f"input '{d.name}' of cell '{cell.name}' is not wired; "
                                             f"write {name}({d.name} = ...)")
        width = substitute(out, dims)
        spec = LayerSpec(name, "recurrent", (), RecurrentSpec(
            cell, rec.text, rec.file, tuple((d, dims[d]) for d in cell.dims), rec.input_dim, rec.layers,
            rec.bidirectional, rec.dropout, width), spec.loc)
        self.layers[name] = spec
        directions = 2 if rec.bidirectional else 1
        op = self.add("layer", (v, *(w[2] for w in wires)), (name, tuple(wires)),
                      Value("sequence", width * directions), stage.loc)
        self.run_op[name] = op
        return op

    # --- the whole network ---

    def run(self) -> CheckedNetwork:
        self.declare()
        if self.errors.diagnostics:
            self.errors.raise_if_any()
        for k, f in enumerate(self.net.flows):
            self.value_of_flow(k, f.loc)
        outputs = []
        for k, f in enumerate(self.net.flows):
            if f.output and self.flow_value.get(k) is not None:
                outputs.append((f.name, self.flow_value[k]))
        if self.prev is not None:
            name, op, start = self.prev
            k = self.flows[name]
            fed = self.flow_value.get(k)
            if fed is not None:
                value = self.ops[fed].value
                flow = self.net.flows[k]
                if value.kind != "sequence":
                    self.errors.error(flow.loc, f"output {name} is fed back with prev({name}), so it must be a "
                                                f"sequence of scores over tokens, but it is {describe(value)}")
                for vocab, loc in self.pending_vocab:
                    if vocab != value.size:
                        self.errors.error(loc, f"sizes do not connect: prev({name}) gives token ids below "
                                               f"{value.size} (the size of {name}), but this embedding reads "
                                               f"ids below {vocab}")
                self.ops[op] = Op("prev", (), (name, start), Value("tokens", value.size), self.ops[op].loc, True)
                if value.kind == "sequence":
                    self.check_start(name, start, value.size)
        self.errors.raise_if_any()
        inputs = tuple((i.name, INPUT_KINDS[i.kind], dim_size(i.size, self.dims, Collector()))
                       for i in self.inputs.values())
        return CheckedNetwork(self.net.name, self.net.doc, self.spec.file, tuple(n for n, _ in self.net.dims),
                              inputs, tuple(self.layers[layer.name] for layer in self.net.layers
                                            if layer.name in self.layers),
                              tuple(self.ops), tuple(outputs), self.prev, self.net.loc, self.start_loc)


def _dim_names(d: ast.Dim):
    if isinstance(d, ast.DimName):
        yield d.name, d.loc
    elif isinstance(d, ast.DimBin):
        yield from _dim_names(d.left)
        yield from _dim_names(d.right)
    elif isinstance(d, (ast.DimNeg, ast.DimCall)):
        yield from _dim_names(d.arg)


def _stages(chain: ast.Chain):
    for stage in chain.stages:
        yield stage
        for w in stage.wires:
            yield from _stages(w.chain)
