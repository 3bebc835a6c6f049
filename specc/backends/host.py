"""The torch code around a compiled time loop, shared by the Triton and C backends.

A pass (forward or backward) is three parts: before the loop, the input-only values for all
steps at once (the LSTM's W_ih @ x as one product) and the buffers the loop reads and writes;
the loop itself, which a `LoopTarget` writes (Triton kernel launches, or one call of a compiled C
function); after it, what the carried values do not need and the sums over time and batch (the
weight gradients), again as a few large torch operations. Only the loop differs between the two
backends, so everything else is written here once: `emit` writes forward_<target> and
backward_<target>, and calls the target for the loop.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ..ir import LEAVES, Forward, Graph, Node
from ..ops import ELEMENTS, SPELLINGS
from ..schedule import Schedule, fills, hoist_delays, needed_by_pass, only_for_inputs
from .writer import (Namer, Writer, after_loop, backward_args, input_gradient, number_code, saved_key, tuple_code,
                     value_names)

# Ops a loop can recompute at any feature index from their operands, so that nothing need store them.
RECOMPUTABLE = (*ELEMENTS, "slice", "outer")
# Ops whose torch spelling outside the loop may be a strided view of their operand, not rows of their own.
VIEWS = ("slice", "reshape")
# Names the host functions use for themselves: no value of the spec may be given one of them.
HOST_NAMES = frozenset({"np", "tl", "triton", "torch", "math", "rt", "T", "B", "rows", "dtype", "dev", "t", "train",
                        "saved", "wrap", "CHUNK_ROWS", "CHUNK_STEPS", "chunk", "chunk_start", "chunk_len",
                        "chunk_outs", "chunk_state", "chunk_out", "whole", "part", "inputs_grad"})


class Unsupported(Exception):
    """The cell uses something this backend cannot put inside the time loop yet."""


def torch_spell(node: Node, a: list[str], types: list) -> str:
    """How torch spells an op over all rows at once, outside the loop (ops.SPELLINGS)."""
    return SPELLINGS[node.op].torch(node, a, types, "-1")


def fused_into_loop(s: Schedule, keep: set[int]) -> set[int]:
    """Elementwise input-only values that the loop computes from their operands instead of the
    host making them before it. Such a value read only inside the loop costs a full pass over
    memory to make before the loop and another to read; computed in the loop, neither.
    `keep`: values needed after the pass (outputs, saved values), which must be in memory."""
    g = s.graph
    users = g.users()
    fused_pre: set[int] = set()
    carried_next = {nxt for _, _, nxt in g.carries}
    for i in reversed(range(len(g.nodes))):
        node = g.nodes[i]
        if (s.region[i] == "pre" and node.type.batched and node.op in RECOMPUTABLE and node.op != "outer"
                and i not in keep and i not in carried_next and users[i]
                and all((s.region[u] == "loop" and g.nodes[u].op not in ("matvec", "matvec_t")) or u in fused_pre
                        for u in users[i])):
            fused_pre.add(i)
    return fused_pre


@dataclass
class HostNames:
    """Names of what the host code holds: values, kept buffers, state buffers, scratch buffers."""

    names: dict[int, str] = field(default_factory=dict)
    seq: dict[int, str] = field(default_factory=dict)
    carry_buf: dict[str, str] = field(default_factory=dict)
    # States (or carried gradients) nothing outside the loop reads but their last value: their
    # buffer is `wrap` blocks used in turn, the host's and the loop's `wrap` = 2, or T + 1 in a
    # forward pass that trains (backward reads every step's state).
    wrapped: set[str] = field(default_factory=set)
    # Scalars made of numbers alone (-0.5 is neg(0.5)), and the backward pass's copies of them: the
    # host holds Python floats, not tensors, so kernels take them by value.
    numbers: set[int] = field(default_factory=set)
    # What made these names: a later buffer's name (the C loops' kept parts) comes from it too, so
    # that it cannot take one already given (a kept d_h0 beside the carried gradient d_h0_seq).
    namer: Namer | None = None

    def carry_rows(self, name: str, later: bool) -> str:
        """The first row of a state's block for step t (later: t + 1) in its buffer."""
        step = "(t + 1)" if later else "t"
        return f"{step} % wrap * B" if name in self.wrapped else f"{step} * B"


@dataclass
class Host:
    s: Schedule
    reverse: bool
    names: HostNames
    source: tuple[list[str], str]
    spell: Callable = torch_spell  # how the host code spells an op (the C backend: its own products)
    forward: Schedule | None = None  # a backward pass's forward step, whose values its Forward leaves are
    empty: str = "torch.empty"  # how the host code allocates a buffer (LoopTarget.empty)
    # A backward pass's values that only its inputs' gradients need (schedule.only_for_inputs):
    # made under `if inputs_grad:`
    optional: frozenset[int] = frozenset()

    def ref(self, i: int) -> str:
        """Node i over all steps, from the host code after (or before) the loop."""
        g = self.s.graph
        node = g.nodes[i]
        if node.op == "const":
            return number_code(node.attrs[0])
        for name, leaf, nxt in g.carries:
            # A next value made before the loop (h' = tanh(W @ x)) is read where it was made.
            if i == leaf or (i == nxt and self.s.region[i] == "loop"):
                buf = self.names.carry_buf[name]
                later = (i == leaf) == self.reverse
                return f"{buf}[B:]" if later else f"{buf}[:rows]"
        if self.s.region[i] == "loop":
            return self.names.seq[i]
        return self.names.names[i]

    def saved_ref(self, i: int) -> str:
        """Node i as the forward pass hands it to the Triton backward pass.

        The backward kernels address a saved value as rows of exactly its width. A slice made
        outside the loop is a view with the rows of what it slices (a stacked product's 2H or 5H),
        so it is saved as a copy of its own; that also lets the stacked value go rather than be
        held, whole, until backward. (The C loops read such views at their own row stride.)
        """
        node = self.s.graph.nodes[i]
        ref = self.ref(i)
        if node.type.batched and node.op in VIEWS and ref == self.names.names.get(i):
            return f"{ref}.contiguous()"
        return ref


def emit_region(w: Writer, host: Host, region: str, skip: frozenset[int] = frozenset()) -> None:
    g = host.s.graph
    lines, file = host.source
    last = 0
    filling = fills(host.s)
    for i in host.s.nodes_in(region):
        node = g.nodes[i]
        if not (node.op in ("input", "param", "const", "carry") or i in skip):
            if node.line and node.line != last and node.line <= len(lines):
                w.comment(f"{file}:{node.line}  {lines[node.line - 1].strip()}")
                last = node.line
            args = [host.ref(a) for a in node.args]
            line = f"{host.names.names[i]} = {host.spell(node, args, [g.nodes[a].type for a in node.args])}"
            if i in host.optional:
                with w.block("if inputs_grad:"):
                    w.line(line)
            else:
                w.line(line)
        for name in filling.get(i, ()):
            # A state the loop does not carry (schedule.hoist_delays): its buffer, every step at once.
            rows = ":rows" if host.reverse else "B:"
            w.line(f"{host.names.carry_buf[name]}[{rows}] = {host.ref(i)}")


def emit_buffers(w: Writer, host: Host, carry_init: list[str], guard: frozenset[int], fused_pre: set[int],
                 scratch: set[int] = frozenset(), cross: set[int] = frozenset(), kept: bool = True) -> None:
    """Before the loop: the host's values and every buffer the loop reads or writes. `scratch`:
    buffers of one step's values (a Triton stage's output that the next stage reads), B rows;
    `cross`: kept values a later stage reads, made even when not training. kept=False: no buffers for
    the kept loop values (a scan makes them whole after it)."""
    g, names = host.s.graph, host.names
    for (name, leaf, _), init in zip(g.carries, carry_init):
        size = str(g.nodes[leaf].type.shape[0])
        buf = names.carry_buf[name]
        if name in names.wrapped:  # `wrap` blocks used in turn (see HostNames.wrapped)
            w.line(f"{buf} = {host.empty}((wrap * B, {size}), device=dev, dtype=dtype)")
            first = "T % wrap * B:(T % wrap + 1) * B" if host.reverse else ":B"
        else:
            w.line(f"{buf} = {host.empty}(((T + 1) * B, {size}), device=dev, dtype=dtype)")
            first = "T * B:" if host.reverse else ":B"
        w.line(f"{buf}[{first}] = {init}")
    w.comment("Fixed for the whole sequence.")
    emit_region(w, host, "const")
    w.comment("Before the loop: the input-only values the loop reads, for all steps at once.")
    emit_region(w, host, "pre", skip=frozenset(fused_pre))
    for i, buf in names.seq.items() if kept else ():
        size = str(g.nodes[i].type.shape[0])
        rows = "B" if i in scratch else "rows"
        alloc = f"{host.empty}(({rows}, {size}), device=dev, dtype=dtype)"
        guarded = i in guard and i not in cross
        w.line(f"{buf} = {alloc} if train else None" if guarded else f"{buf} = {alloc}")


def emit_after(w: Writer, host: Host, skip: frozenset[int] = frozenset()) -> None:
    after_loop(w, host.s, lambda region: emit_region(w, host, region, skip if region != "final" else frozenset()))


def numbers(g: Graph, given: set[int] = frozenset()) -> set[int]:
    """The scalars of g made of numbers alone, or of those `given`."""
    out: set[int] = set()
    for i, node in enumerate(g.nodes):
        if node.type.batched or node.type.shape != ():
            continue
        if node.op == "const" or i in given or (node.op not in LEAVES and node.args and all(a in out for a in node.args)):
            out.add(i)
    return out


def name_values(s: Schedule, namer: Namer, leaf_names: dict[int, str], reverse: bool) -> HostNames:
    names = HostNames(namer=namer)
    names.names, names.carry_buf, names.seq = value_names(s.graph, s.kept, namer, leaf_names, reverse)
    return names


@dataclass(frozen=True)
class LoopTarget:
    """What a backend writes of a pass: the time loop, and the module section around the functions."""

    name: str  # the generated functions are forward_<name> and backward_<name>
    # (w, loops_out, host, fn, carry_init, guard, taken, dims, keep): one pass's body from the
    # buffers to the end (emit_buffers, the loop, emit_after); the loop's own code goes to loops_out
    scan: Callable
    finish: Callable  # (w, loops, body): the module section, from the loops' code and the host functions
    spell: Callable  # how the host code spells an op (torch_spell, or the C backend's own products)
    docs: tuple[str, str]  # the docstrings of forward_<name> and backward_<name>
    reserved: frozenset[str]  # names the loop's code uses, which no host value may take
    # keyword arguments of both functions beyond the sizes (c_lib), with a default where given (scan=True)
    extra_args: tuple[str, ...] = ()
    # The Triton kernels address a saved value as rows of exactly its width: a slice made outside the
    # loop is saved as a copy (Host.saved_ref). The C loops read it at its own row stride.
    copy_saved_views: bool = False
    title: str = ""  # the comment that opens the section
    # (w, code): what the section needs before its functions (imports, helpers), given their code
    preamble: Callable = lambda w, code: None
    # Each pass's schedule as this target runs it (the C loops make more in the loop): the forward
    # pass's given the values it saves for backward, which must stay kept
    forward_schedule: Callable = lambda s, saved: s
    backward_schedule: Callable = lambda s: s
    # Whether a delay's buffer is filled outside the loop and what reads it made there too
    # (schedule.hoist_delays): one product over the sequence instead of one a step
    fill_delays: bool = True
    # How the host code allocates the buffers around the loop (the C loops': on huge pages when large)
    empty: str = "torch.empty"


def write_section(target: LoopTarget, w: Writer, fwd: Schedule, bwd: Schedule, saved: list[int],
                  dims: tuple[str, ...], lines: list[str], file: str, prefix: str) -> None:
    """A backend's part of a generated module: its loops and host functions, or <NAME>_UNSUPPORTED
    saying why the loop cannot run this cell (the runtime then says so, and `auto` passes it by)."""
    flag = f"{target.name.upper()}_UNSUPPORTED"
    w.comment(target.title)
    w.line("")
    try:
        part = Writer()
        emit(part, fwd, bwd, saved, dims, lines, file, prefix, target)
    except Unsupported as e:
        w.line(f"{flag} = {str(e)!r}")
        return
    w.line(f"{flag} = None")
    target.preamble(w, "\n".join(part.lines))
    w.lines.extend(part.lines)


def emit(w: Writer, fwd: Schedule, bwd: Schedule, saved_nodes: list[int], dims: tuple[str, ...],
         source_lines: list[str], file: str, prefix: str, target: LoopTarget) -> None:
    """forward_<target>, backward_<target> and their loops, in the module section `target` writes.
    Raises Unsupported for what the target's loop cannot run."""
    kernels = Writer()
    body = Writer()
    source = (source_lines, file)
    if target.fill_delays:
        fwd = hoist_delays(fwd, frozenset(saved_nodes))
    fwd = target.forward_schedule(fwd, frozenset(saved_nodes))
    saved_keys, fwd_numbers = _emit_forward(body, kernels, fwd, saved_nodes, dims, source, prefix, target)
    body.line("")
    body.line("")
    _emit_backward(body, kernels, bwd, fwd, saved_keys, fwd_numbers, dims, source, prefix, target)
    target.finish(w, kernels, body)


def _emit_forward(body: Writer, kernels: Writer, fwd: Schedule, saved_nodes: list[int], dims: tuple[str, ...],
                  source: tuple[list[str], str], prefix: str, target: LoopTarget) -> tuple[dict[int, str], set[int]]:
    """forward_<target>; returns the keys of the values it saves for backward, and the forward
    nodes that are numbers (Python floats in the host code)."""
    g = fwd.graph
    namer = Namer(HOST_NAMES | target.reserved | set(dims))
    leaf_names = {i: namer(name) for name, i in g.inputs}
    init_names = [namer(f"{name}0") for name, _, _ in g.carries]
    leaf_names.update({i: namer(name) for name, i in g.params})
    names = name_values(fwd, namer, leaf_names, reverse=False)
    names.numbers = numbers(g)
    fwd_numbers = names.numbers
    host = Host(fwd, False, names, source, target.spell, empty=target.empty)
    args = [leaf_names[i] for _, i in g.inputs] + init_names + [leaf_names[i] for _, i in g.params]
    kw = ", ".join(["T", "B", *dims])
    guard = frozenset(i for i in saved_nodes if i in fwd.kept) - needed_by_pass(fwd)
    extra = "".join(f", {a}" for a in target.extra_args)
    with body.block(f"def forward_{target.name}({', '.join(args)}, *, {kw}, train=False{extra}):"):
        body.line(f'"""{target.docs[0]}"""')
        body.line("rows = T * B")
        first = leaf_names[g.inputs[0][1]] if g.inputs else init_names[0]
        body.line(f"dtype, dev = {first}.dtype, {first}.device")
        for name, i in g.inputs:
            body.line(f"{leaf_names[i]} = {leaf_names[i]}.reshape(rows, {g.nodes[i].type.shape[0]})")
        if g.inputs:
            emit_chunks(body, target, [leaf_names[i] for _, i in g.inputs], init_names,
                         [leaf_names[i] for _, i in g.params], dims)
        taken_here = set(dims) | set(namer.taken)
        keep = set(saved_nodes) | {i for _, i in g.outputs}
        names.wrapped = wrapped_states(fwd)
        if names.wrapped:
            body.comment("States only the loop reads: one block a step when training (backward reads them), else two.")
            body.line("wrap = T + 1 if train else 2")
        target.scan(body, kernels, host, f"{prefix}_forward", init_names, guard, taken_here, dims, keep)
        outs = tuple_code([f"{host.ref(i)}.reshape(T, B, -1)" for _, i in g.outputs])
        finals = tuple_code([f"{names.carry_buf[name]}[T % wrap * B:(T % wrap + 1) * B]" if name in names.wrapped
                         else f"{names.carry_buf[name]}[T * B:]" for name, _, _ in g.carries])
        key_namer = Namer()  # a gate may be called h_prev too: every key its own
        saved_keys = {i: key_namer(saved_key(g, i, names.names)) for i in saved_nodes}
        saved_ref = host.saved_ref if target.copy_saved_views else host.ref
        items = ", ".join(f'"{saved_keys[i]}": {saved_ref(i)}' for i in saved_nodes)
        body.line(f"saved = {{{items}}} if train else None")
        body.line(f"return {outs}, {finals}, saved")
    return saved_keys, fwd_numbers


def _emit_backward(body: Writer, kernels: Writer, bwd: Schedule, fwd: Schedule, saved_keys: dict[int, str],
                   fwd_numbers: set[int], dims: tuple[str, ...], source: tuple[list[str], str], prefix: str,
                   target: LoopTarget) -> None:
    """backward_<target>: it reads the saved values by the keys forward_<target> gave them."""
    bwd = target.backward_schedule(hoist_delays(bwd) if target.fill_delays else bwd)
    g = fwd.graph
    kw = ", ".join(["T", "B", *dims])
    extra = "".join(f", {a}" for a in target.extra_args)
    gb = bwd.graph
    namer = Namer(HOST_NAMES | target.reserved | set(dims))
    leaves = backward_args(gb, g, saved_keys, namer)
    leaf_names, binds, d_outs, d_final = leaves.names, leaves.binds, leaves.d_outs, leaves.d_final
    names = name_values(bwd, namer, leaf_names, reverse=True)
    names.numbers = numbers(gb, {i for key, i in gb.params if isinstance(key, Forward) and key.node in fwd_numbers})
    host = Host(bwd, True, names, source, target.spell, forward=fwd, empty=target.empty,
                optional=only_for_inputs(bwd))
    args = ["saved"] + [leaf_names[i] for i in d_outs] + d_final + leaves.params
    with body.block(f"def backward_{target.name}({', '.join(args)}, *, {kw}{extra}, inputs_grad=True):"):
        body.line(f'"""{target.docs[1]}"""')
        body.line("rows = T * B")
        ref = d_final[0] if d_final else leaf_names[d_outs[0]]
        body.line(f"dtype, dev = {ref}.dtype, {ref}.device")
        body.line("train = True")
        for i in d_outs:
            body.line(f"{leaf_names[i]} = {leaf_names[i]}.reshape(rows, {gb.nodes[i].type.shape[0]})")
        for local, key in binds:
            body.line(f'{local} = saved["{key}"]')
        keep = {i for _, i in gb.outputs} | {i for _, i in gb.reduced}
        target.scan(body, kernels, host, f"{prefix}_backward", d_final, frozenset(), set(dims) | set(namer.taken), dims,
                    keep)
        d_inputs = tuple_code([input_gradient(f"{host.ref(i)}.reshape(T, B, -1)", i in host.optional)
                               for _, i in gb.outputs])
        d_inits = tuple_code([f"{names.carry_buf[name]}[:B]" for name, _, _ in gb.carries])
        d_params = tuple_code([host.ref(i) for _, i in gb.reduced])
        body.line(f"return {d_inputs}, {d_inits}, {d_params}")


def emit_chunks(body: Writer, target: LoopTarget, inputs: list[str], inits: list[str], params: list[str],
                 dims: tuple[str, ...]) -> None:
    """Inference over a long sequence, a chunk of steps at a time, by this same function: what the
    loop reads of the inputs (the LSTM's W_ih @ x, 4H values a step) is then made for one chunk,
    not for every step at once; outputs are joined, the last chunk's final states returned."""
    body.comment("A long sequence without training: a chunk of steps at a time (see CHUNK_ROWS).")
    body.line("chunk = max(CHUNK_STEPS, CHUNK_ROWS // max(B, 1))")
    with body.block("if not train and T > 2 * chunk:"):
        body.line(f"chunk_outs, chunk_state = None, {tuple_code(inits)}")
        with body.block("for chunk_start in range(0, T, chunk):"):
            body.line("chunk_len = min(chunk, T - chunk_start)")
            rows = [f"{x}[chunk_start * B:(chunk_start + chunk_len) * B]" for x in inputs]
            kw = ", ".join(["T=chunk_len", "B=B", *(f"{d}={d}" for d in dims)]
                           + [f"{a.split('=')[0]}={a.split('=')[0]}" for a in target.extra_args])
            body.line(f"chunk_out, chunk_state, _ = forward_{target.name}({', '.join([*rows, '*chunk_state', *params, kw])})")
            with body.block("if chunk_outs is None:"):
                body.line(f"chunk_outs = tuple({target.empty}((T, *part.shape[1:]), device=dev, dtype=part.dtype) "
                          "for part in chunk_out)")
            with body.block("for whole, part in zip(chunk_outs, chunk_out):"):
                body.line("whole[chunk_start:chunk_start + chunk_len] = part")
        body.line("return chunk_outs, chunk_state, None")


def wrapped_states(s: Schedule, in_loop: frozenset[int] = frozenset()) -> set[str]:
    """The carried values (states, or a backward pass's carried gradients) that nothing after the
    loop reads but their last value: made in the loop, read only in it (or by `in_loop`, values
    outside the loop's region that the loop computes anyway), and not an output of the pass (h' = x
    makes d_x the carried d_h' of every step)."""
    g = s.graph
    users = g.users()
    outputs = {i for _, i in g.outputs}
    return {name for name, leaf, nxt in g.carries
            if s.region[nxt] == "loop" and g.nodes[nxt].op != "carry" and not {leaf, nxt} & outputs
            and all(s.region[u] == "loop" or u in in_loop for v in (leaf, nxt) for u in users[v])}
