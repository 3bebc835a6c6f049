"""Backend: scheduled step IR -> NumPy source for the forward and backward passes over a sequence.

Batched values are (rows, features) arrays: rows are the batch inside the time loop and
time x batch outside it, so one spelling serves both. States live in ((T + 1) * B, size)
sequence buffers: block t holds the value before step t.

Outside the time loop, code is a few large array expressions. Inside it, a step costs about one
microsecond per NumPy call when the batch is small, so the generator keeps the calls few and
makes them allocate nothing:

* Every value a step computes is written by its ufunc (the last positional argument, `out`) into
  memory set up before the loop: a state's next value straight into its block of the state
  buffer, a value kept for after the loop into its block of a per-step buffer, anything else into
  a (B, size) scratch buffer, which an elementwise op reuses when one of its arguments dies there.
  Views of scratch buffers (the gates of a split) are made once, before the loop.
* Sibling ops on adjacent columns of the same values are one call over all their columns (a
  `Group`): the sigmoids and tanh of an LSTM's four gates are one tanh between two per-column
  scalings. Constants are 0-d arrays and bias vectors B-row arrays of the working dtype (NumPy
  converts a Python float on every call and broadcasts a vector slowly).
* Values that depend on the inputs only and that only the loop reads (the input products, a
  backward step's derivative factors) are made a chunk of steps at a time inside the loop, so
  they stay in cache and the whole sequence of them never exists at once. In the backward pass,
  products of a step value by such factors are regrouped so that the factors multiply each other
  in the chunk, not in the step (`optimize.hoist_factors`; `schedule.sink_post` is the other pass
  only this backend runs).
* A state whose sequence nothing reads after the loop lives in two blocks used in turn (when not
  training), and a concatenation after the loop that only products and sums read is not made.
* Every batched product of a pass goes through one `matmul`, chosen once before the loop
  (`rt.matmul_for`): NumPy's, or, when a matrix the loop multiplies by is large and float32, one
  that multiplies by it packed for oneDNN and hands the pass's other large products to torch, so
  that a single thread pool works in the pass.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

from ..ir import Graph, Node
from ..ops import ELEMENTS, SPELLINGS
from ..optimize import hoist_factors
from ..scan import Affine, affine_loop
from ..schedule import (Schedule, filled_outside, fills, hoist_delays, needed_by_pass, only_for_inputs, schedule,
                        sink_post)
from ..shapes import Size
from .writer import (Namer, TermSpeller, Writer, after_loop, backward_args, input_gradient, number_code, saved_key,
                     tuple_code, value_names)


INTERNAL = {"np", "rt", "math", "T", "B", "rows", "dtype", "t", "s", "e", "k", "p", "q", "train", "saved",
            "steps", "lo", "hi", "cs", "ce", "last", "matmul", "scan", "scanned", "inputs_grad"}
LEAVES = ("input", "param", "const", "carry")
VIEWS = ("slice", "reshape")

CONST_NAMES = {0.0: "zero", 1.0: "one", -1.0: "minus_one", 0.5: "half", 2.0: "two"}
MIXABLE = ("sigmoid", "tanh")


def _size(s) -> str:
    return str(s)


def _writes_into(node: Node) -> bool:
    return spell_into(node, ["a"] * len(node.args), "out") is not None


def _elementwise(node: Node) -> bool:
    """An op computed element by element, safe to write over one of its arguments."""
    return node.op in ELEMENTS and SPELLINGS[node.op].numpy_into is not None


@dataclass(frozen=True)
class Place:
    """Where a loop value is written during a step: `buf`, the step's rows of it (`rows`; None for a
    scratch buffer, all of whose rows are the step's) and a column range (`cols`; None for all)."""

    buf: str
    rows: str | None = None
    cols: tuple[Size, Size] | None = None

    def code(self) -> str:
        if self.cols is None:
            return f"{self.buf}[{self.rows}]" if self.rows else self.buf
        start, stop = (_size(c) for c in self.cols)
        return f"{self.buf}[{self.rows or ':'}, {'' if start == '0' else start}:{stop}]"

    def part(self, start: Size, stop: Size) -> "Place":
        base = self.cols[0] if self.cols else Size.of(0)
        return Place(self.buf, self.rows, (base + start, base + stop))


@dataclass
class Group:
    """Sibling elementwise ops on adjacent columns of the same values (the sigmoids of the gates
    i and f of one split), computed by one NumPy call over the columns they span."""

    members: list[int]  # in column order
    starts: list[Size]  # each member's first column in the group's buffer
    width: Size
    args: list[tuple]  # per argument: ("cols", base, first column) or ("same", node)
    name: str = ""
    place: Place | None = None
    scales: str = ""  # sigmoids and tanhs mixed: the name of their per-column (scale, shift)


@dataclass
class Scan:
    """What emitting one scan needs: its schedule and the names chosen for its values."""

    sched: Schedule
    reverse: bool
    source_lines: list[str]
    file: str
    names: dict[int, str] = field(default_factory=dict)
    seq: dict[int, str] = field(default_factory=dict)  # kept loop values -> their buffers (or views)
    carry_buf: dict[str, str] = field(default_factory=dict)  # state -> its sequence buffer
    # States whose sequence nothing reads after the loop (only, forward, the backward pass): two
    # blocks used in turn (when not training), blocks p (read) and q (written) of the step.
    alternating: set[str] = field(default_factory=set)
    guarded: frozenset[int] = frozenset()  # kept only for the backward pass: filled when training
    optional: frozenset[int] = frozenset()  # a backward pass's values for its inputs' gradients alone
    # Filled by _plan_loop:
    place: dict[int, Place] = field(default_factory=dict)  # loop values -> where a step writes them
    seq_view: dict[int, Place] = field(default_factory=dict)  # kept values stored inside another's buffer
    scratch: list[int] = field(default_factory=list)  # values that own a (B, size) scratch buffer
    hoisted: list[int] = field(default_factory=list)  # views of scratch buffers, made before the loop
    absorbed: dict[int, int] = field(default_factory=dict)  # concat part -> the concat it is written into
    consts: dict[float, str] = field(default_factory=dict)  # constants the loop uses -> 0-d arrays
    # Products the loop makes (and chunked ones before it) -> the name of their matrix operand, made
    # once a pass by rt.operand (packed for oneDNN where that is faster); operands: name -> code.
    operand_of: dict[int, str] = field(default_factory=dict)
    operands: dict[str, str] = field(default_factory=dict)
    tiled: dict[int, str] = field(default_factory=dict)  # vectors the loop adds or multiplies -> B rows of them
    fresh: set[int] = field(default_factory=set)  # values outside the loop in buffers of their own
    groups: list[Group] = field(default_factory=list)
    chunked: set[int] = field(default_factory=set)  # pre values made a chunk of steps at a time, in the loop
    split: dict[int, list[tuple[str, Size, Size]]] = field(default_factory=dict)  # concatenations never made
    group_of: dict[int, int] = field(default_factory=dict)  # member -> its group's index
    group_seq: list[tuple[str, Size, bool]] = field(default_factory=list)  # (buffer, width, guarded)
    group_at: dict[int, int] = field(default_factory=dict)  # member the group is computed at -> group
    bind: dict[int, set[int]] = field(default_factory=dict)  # group -> members its users read by name
    unused: set[int] = field(default_factory=set)  # views that only grouped ops read
    bound_before: list[tuple[int, str]] = field(default_factory=list)  # (member, view) made before the loop

    @property
    def g(self) -> Graph:
        return self.sched.graph

    def carry_of(self, i: int) -> tuple[str, bool] | None:
        """(state, is_leaf) when node i is a state's carried value, read or written."""
        # Every state's previous value first: in `a' = b`, b's previous value is also a's next.
        for name, leaf, _ in self.g.carries:
            if i == leaf:
                return name, True
        for name, _, nxt in self.g.carries:
            if i == nxt:
                return name, False
        return None

    def ref(self, i: int, loop: bool) -> str:
        node = self.g.nodes[i]
        if node.op == "const":
            v = node.attrs[0]
            if loop and v in self.consts:
                return self.consts[v]
            return number_code(v)
        if loop and i in self.tiled:
            return self.tiled[i]
        carried = self.carry_of(i)
        region = self.sched.region[i]
        # A carried value lives in its state buffer: the value read (always), and the next value
        # when the loop makes it (outside the loop; inside, it goes by its name). A next value
        # made before the loop, from the inputs alone, goes by its own name.
        if carried and (node.op == "carry" or (region == "loop" and not loop)):
            state, is_leaf = carried
            buf = self.carry_buf[state]
            # Forward reads block t and writes block t + 1; backward reads t + 1 and writes t.
            reads_later = is_leaf == self.reverse
            if loop and state in self.alternating:
                return f"{buf}[p:p + B]" if is_leaf else f"{buf}[q:q + B]"
            if loop:
                return f"{buf}[e:e + B]" if reads_later else f"{buf}[s:e]"
            return f"{buf}[B:]" if reads_later else f"{buf}[:rows]"
        if region == "pre" and loop:
            return f"{self.names[i]}[cs:ce]" if i in self.chunked else f"{self.names[i]}[s:e]"
        if region == "loop" and not loop:
            return self.seq[i]
        return self.names[i]


def spell(node: Node, a: list[str], types: list, rows: str) -> str:
    """How NumPy spells one op as an expression, given its arguments' code (ops.SPELLINGS)."""
    return SPELLINGS[node.op].numpy(node, a, types, rows)


def spell_into(node: Node, a: list[str], out: str) -> str | None:
    """How NumPy spells one batched op of the loop writing into `out`; None if it cannot (ops.SPELLINGS)."""
    into = SPELLINGS[node.op].numpy_into
    return None if into is None else into(node, a, out)


def _row_shape(node: Node) -> list[str]:
    return [_size(s) for s in node.type.shape]


def _name_values(scan: Scan, namer: Namer, leaf_names: dict[int, str]) -> None:
    names, carry_buf, seq = value_names(scan.g, scan.sched.kept, namer, leaf_names, scan.reverse)
    scan.names.update(names)
    scan.carry_buf.update(carry_buf)
    scan.seq.update(seq)


def _plan_loop(scan: Scan, namer: Namer) -> None:
    """Decide where each value of the loop body is written (see the module docstring)."""
    g, sched = scan.g, scan.sched
    order = [i for i in sched.nodes_in("loop") if g.nodes[i].op not in LEAVES]
    pos = {i: k for k, i in enumerate(order)}
    users = g.users()

    def last_read(i: int) -> int:
        """The last position in the step that reads value i, directly or through views of it."""
        last = pos[i]
        for u in users[i]:
            if u in pos:
                last = max(last, last_read(u) if g.nodes[u].op in VIEWS else pos[u])
        return last

    computed = {i for i in order if g.nodes[i].op not in VIEWS and g.nodes[i].type.batched}
    written_rows = "s:e" if scan.reverse else "e:e + B"
    # A state's next value goes straight into its block of the state buffer.
    for name, _, nxt in g.carries:
        if nxt in computed and nxt not in scan.place:
            scan.place[nxt] = Place(scan.carry_buf[name], "q:q + B" if name in scan.alternating else written_rows)
    _group_siblings(scan, order, computed, namer)
    # A kept value goes into its block of its sequence buffer.
    for i in order:
        if i in sched.kept and i not in scan.group_of:
            scan.place[i] = Place(scan.seq[i], "k:k + B" if i in scan.guarded else "s:e")
    _place_concatenated(scan, order, computed)
    owner = _place_in_scratch(scan, order, computed, last_read, pos)
    _plan_views_and_constants(scan, order, pos, users, owner, namer)


def _place_concatenated(scan: Scan, order: list[int], computed: set[int]) -> None:
    g, sched = scan.g, scan.sched
    # The parts of a concatenation are written into its columns (outermost concatenation first).
    for c in reversed(order):
        node = g.nodes[c]
        if node.op != "concat" or not node.type.batched:
            continue
        if c not in scan.place:
            scan.place[c] = Place(scan.names[c])
            scan.scratch.append(c)
        start = Size.of(0)
        for a in node.args:
            stop = start + g.nodes[a].type.shape[0]
            if _can_absorb(scan, a, c, computed):
                scan.place[a] = scan.place[c].part(start, stop)
                scan.absorbed[a] = c
                if a in sched.kept:
                    scan.seq_view[a] = _seq_place(scan, c).part(start, stop)
            start = stop


def _place_in_scratch(scan: Scan, order: list[int], computed: set[int], last_read, pos: dict[int, int]) -> dict[int, int]:
    """Returns, for each value in a scratch buffer, the value the buffer is named after."""
    g = scan.g
    # Everything else gets a scratch buffer, or the buffer of an argument that dies here.
    owner: dict[int, int] = {}  # value in a scratch buffer -> the value the buffer is named after
    for c in scan.scratch:
        owner[c] = c
    for i in order:
        node = g.nodes[i]
        if i in scan.place or i not in computed or not _writes_into(node):
            continue
        reuse = None
        if _elementwise(node):
            for a in node.args:
                if a in owner and g.nodes[a].type == node.type and last_read(a) == pos[i] \
                        and scan.place[a].cols is None:
                    reuse = a
                    break
        if reuse is not None:
            scan.place[i] = scan.place[reuse]
            owner[i] = owner[reuse]
        else:
            scan.place[i] = Place(scan.names[i])
            scan.scratch.append(i)
            owner[i] = i
    return owner


def _plan_views_and_constants(scan: Scan, order: list[int], pos: dict[int, int], users, owner: dict[int, int],
                              namer: Namer) -> None:
    g = scan.g
    # A group is computed where its first member was; its members go by name when something
    # outside the groups reads them. Views that only groups read are not made.
    for index, grp in enumerate(scan.groups):
        scan.group_at[min(grp.members, key=pos.get)] = index
        scan.bind[index] = {m for m in grp.members if any(u in pos and u not in scan.group_of for u in users[m])}
    for i in order:
        if g.nodes[i].op in VIEWS and i not in scan.place and users[i] and all(u in scan.group_of for u in users[i]):
            scan.unused.add(i)
    # Views of values in scratch buffers never move: make them once.
    fixed = set(owner)
    for index, grp in enumerate(scan.groups):
        if grp.place.rows is None:
            fixed.update(scan.bind[index])
    for i in order:
        node = g.nodes[i]
        if node.op in VIEWS and node.type.batched and node.args[0] in fixed and i not in scan.unused:
            scan.hoisted.append(i)
            fixed.add(i)
    # Constants of elementwise ops, and the matrices of products, in the form the loop wants.
    for i in order:
        node = g.nodes[i]
        if _elementwise(node):
            for a in node.args:
                v = g.nodes[a]
                if not v.type.batched and len(v.type.shape) == 1 and a not in scan.tiled:
                    scan.tiled[a] = namer(f"{scan.names[a]}_rows")
                if v.op == "const" and v.attrs[0] not in scan.consts:
                    text = CONST_NAMES.get(v.attrs[0], "c_" + repr(v.attrs[0]).replace("-", "minus_").replace(".", "_"))
                    scan.consts[v.attrs[0]] = namer(text)
    for i in order + sorted(scan.chunked):
        _plan_operand(scan, i, namer, "B" if i in pos else "rt.CHUNK_ROWS")


def _plan_operand(scan: Scan, i: int, namer: Namer, rows: str) -> None:
    """A product x @ W.T (matvec) or x @ W (matvec_t) made many times: its W in the form rt.matmul
    wants, made once before the loop."""
    node = scan.g.nodes[i]
    if node.op not in ("matvec", "matvec_t") or not node.type.batched:
        return
    m = scan.names[node.args[0]]
    code = f"rt.operand({m}.T, {rows})" if node.op == "matvec" else f"rt.operand({m}, {rows})"
    name = next((n for n, c in scan.operands.items() if c == code), None)
    if name is None:
        name = namer(f"{m}_T" if node.op == "matvec" else f"{m}_rhs")
        scan.operands[name] = code
    scan.operand_of[i] = name


def _order(size: Size):
    """Where a column offset falls among others (offsets are sums of multiples of dimensions)."""
    return size.evaluate({n: 1 << 20 for n in size.names()})


def _group_siblings(scan: Scan, order: list[int], computed: set[int], namer: Namer) -> None:
    """Find the Groups of the loop body, and give each its buffer."""
    g, sched = scan.g, scan.sched
    users = g.users()
    nexts = {nxt for _, _, nxt in g.carries}
    pos = {i: k for k, i in enumerate(order)}

    def columns(a: int):
        """(base, first column) when value a is some columns of a larger value, else None."""
        node = g.nodes[a]
        if a in scan.group_of:
            grp = scan.group_of[a]
            return ("g", grp), scan.groups[grp].starts[scan.groups[grp].members.index(a)]
        if node.op == "slice" and node.type.batched and sched.region[a] in ("pre", "loop"):
            base = node.args[0]
            if sched.region[base] == "pre" or (sched.region[base] == "loop" and g.nodes[base].op not in LEAVES):
                return ("v", base), node.attrs[0]
        return None

    def candidate(i: int) -> bool:
        node = g.nodes[i]
        return (i in computed and _elementwise(node) and i not in scan.place and i not in nexts
                and not any(g.nodes[u].op == "concat" for u in users[i]) and len(node.type.shape) == 1)

    changed = True
    while changed:
        changed = False
        buckets: dict[tuple, list[tuple[Size, int, list]]] = {}
        for i in order:
            if i in scan.group_of or not candidate(i):
                continue
            node = g.nodes[i]
            # sigmoid and tanh group together: sigmoid(x) = 0.5 tanh(0.5 x) + 0.5, so one tanh over
            # the columns of both, scaled per column before and after, computes either.
            op = "sigmoid|tanh" if node.op in MIXABLE else node.op
            key, cols, first = [op, i in sched.kept, i in scan.guarded], [], None
            for a in node.args:
                if g.nodes[a].type.batched:
                    c = columns(a)
                    if c is None:
                        break
                    key.append(c[0])
                    cols.append(c[1])
                    first = c[1] if first is None else first
                elif g.nodes[a].type.shape == ():
                    key.append(("same", a))
                    cols.append(None)
                else:
                    break
            else:
                if first is not None:
                    buckets.setdefault(tuple(key), []).append((first, i, cols))
        for key, found in buckets.items():
            found.sort(key=lambda f: (_order(f[0]), pos[f[1]]))
            by_start = {}
            for first, i, cols in found:
                by_start.setdefault(first, (i, cols))
            # Chains of members whose columns follow each other in every argument.
            used = set()
            for first, i, cols in found:
                if i in used:
                    continue
                chain, cur_cols = [i], cols
                while True:
                    width = g.nodes[chain[-1]].type.shape[0]
                    nxt_start = next((c + width for c in cur_cols if c is not None), None)
                    nxt = by_start.get(nxt_start)
                    if nxt is None or nxt[0] in used or nxt[0] in chain:
                        break
                    if any((c is None) != (d is None) or (c is not None and c + width != d)
                           for c, d in zip(cur_cols, nxt[1])):
                        break
                    chain.append(nxt[0])
                    cur_cols = nxt[1]
                if len(chain) < 2:
                    continue
                used.update(chain)
                _make_group(scan, chain, key, cols, namer)
                changed = True


def _make_group(scan: Scan, chain: list[int], key: tuple, cols: list, namer: Namer) -> None:
    g = scan.g
    starts, at = [], Size.of(0)
    for m in chain:
        starts.append(at)
        at = at + g.nodes[m].type.shape[0]
    first = g.nodes[chain[0]]
    args = [("cols", base, c) if c is not None else base for base, c in zip(key[3:], cols)]
    names = [scan.names[m] for m in chain]
    prefix = first.op + "_"
    base = next((scan.names[a[1][1]] for a in args if a[0] == "cols" and a[1][0] == "v"), None)
    if all(g.nodes[m].op == first.op for m in chain) and all(n.startswith(prefix) for n in names):
        name = prefix + "_".join(n[len(prefix):] for n in names)
    elif base is not None and first.op in MIXABLE:
        name = f"{base}_activated"
    else:
        name = "_".join(names)
    grp = Group(list(chain), starts, at, args, namer(name))
    if len({g.nodes[m].op for m in chain}) > 1:
        grp.scales = namer(f"{grp.name}_scales")
    index = len(scan.groups)
    scan.groups.append(grp)
    for m in chain:
        scan.group_of[m] = index
    kept, guarded = key[1], key[2]
    if kept:
        buf = namer(f"{grp.name}_seq")
        scan.group_seq.append((buf, at, guarded))
        grp.place = Place(buf, "k:k + B" if guarded else "s:e")
        for m, start in zip(chain, starts):
            scan.seq_view[m] = Place(buf).part(start, start + g.nodes[m].type.shape[0])
    else:
        grp.place = Place(grp.name)
    for m, start in zip(chain, starts):
        scan.place[m] = grp.place.part(start, start + g.nodes[m].type.shape[0])


def _choose_alternating(scan: Scan, protect: frozenset[int]) -> None:
    """States whose sequence is read after the loop only by the backward pass (values in
    `protect`, forward) or not at all (backward) need two blocks, not T + 1, when not training."""
    g, sched = scan.g, scan.sched
    outside = {i for _, i in g.outputs} | {i for _, i in g.reduced}
    for i, node in enumerate(g.nodes):
        if sched.region[i] != "loop" and node.op not in LEAVES:
            outside.update(node.args)
    filled = filled_outside(sched)  # every step's block written outside the loop
    for name, leaf, nxt in g.carries:
        read = {leaf} | ({nxt} if sched.region[nxt] == "loop" else set())
        if not read & outside and name not in filled:
            scan.alternating.add(name)


def _choose_split(scan: Scan, protect: frozenset[int]) -> None:
    """A concatenation after the loop that only matrix products and row sums read is not made:
    each reader works on its parts ([a, b] @ W is a @ W_a + b @ W_b), which saves a copy of every
    step's values. Parts that are adjacent columns of one buffer stay one part."""
    g, sched = scan.g, scan.sched
    users = g.users()
    results = set(g.results())
    for c in sched.nodes_in("post"):
        node = g.nodes[c]
        if node.op != "concat" or not node.type.batched or c in results or c in protect or not users[c]:
            continue
        if not all((g.nodes[u].op == "matvec_t" and g.nodes[u].args[1] == c and g.nodes[u].args[0] != c)
                   or (g.nodes[u].op == "outer_sum" and g.nodes[u].args[0] == c and g.nodes[u].args[1] != c)
                   or g.nodes[u].op == "sum_rows" for u in users[c]):
            continue
        parts: list[tuple[Place | None, str, Size, Size]] = []
        start = Size.of(0)
        for a in node.args:
            stop = start + g.nodes[a].type.shape[0]
            view = scan.seq_view.get(a) if sched.region[a] == "loop" else None
            last = parts[-1] if parts else None
            if (view is not None and last is not None and last[0] is not None and last[0].buf == view.buf
                    and last[0].cols[1] == view.cols[0]):
                merged = Place(view.buf, None, (last[0].cols[0], view.cols[1]))
                parts[-1] = (merged, merged.code(), last[2], stop)
            else:
                parts.append((view, scan.ref(a, loop=False), start, stop))
            start = stop
        scan.split[c] = [(code, a, b) for _, code, a, b in parts]


def _choose_chunked(scan: Scan, protect: frozenset[int]) -> None:
    """Values made before the loop that only the loop reads (the input products W x + b of every
    step, a backward step's derivative factors) are made a chunk of steps at a time inside the
    loop: a few hundred rows stay in cache between being made and being read, and the whole
    sequence of them never exists at once."""
    g, sched = scan.g, scan.sched
    users = g.users()
    results = set(g.results())
    for i in reversed(sched.nodes_in("pre")):
        node = g.nodes[i]
        if node.op in LEAVES or not node.type.batched or i in results or i in protect or not users[i]:
            continue
        if all(sched.region[u] == "loop" or u in scan.chunked for u in users[i]):
            scan.chunked.add(i)


def _can_absorb(scan: Scan, a: int, c: int, computed: set[int]) -> bool:
    """Can part a of concatenation c be written straight into c's columns?"""
    g = scan.g
    node = g.nodes[a]
    if a not in computed or a in scan.absorbed or not (_elementwise(node) or node.op == "concat"):
        return False
    if a not in scan.sched.kept and node.op != "concat":
        # Writing into columns is a strided write, slower than writing a contiguous scratch
        # buffer and concatenating; it pays only by sparing a kept value a buffer of its own.
        return False
    if scan.place.get(a) is not None and a not in scan.sched.kept:
        return False  # a state's next value: it has a place already
    if a in scan.sched.kept:
        # Its sequence buffer becomes columns of c's, so c must be kept whenever a is.
        if c not in scan.sched.kept or (c in scan.guarded and a not in scan.guarded):
            return False
    return True


def _seq_place(scan: Scan, i: int) -> Place:
    return scan.seq_view.get(i) or Place(scan.seq[i])


class _Lines:
    """Emits a spec-line comment whenever the statements move to another spec line."""

    def __init__(self, w: Writer, scan: Scan):
        self.w, self.scan, self.last = w, scan, None

    def emit(self, node: Node, stmt: str) -> None:
        if node.line and node.line != self.last and node.line <= len(self.scan.source_lines):
            self.w.comment(f"{self.scan.file}:{node.line}  {self.scan.source_lines[node.line - 1].strip()}")
            self.last = node.line
        self.w.line(stmt)


_FRESH = set(ELEMENTS) | {"matvec", "matvec_t", "outer", "outer_vjp_a", "outer_vjp_b", "softmax", "softmax_vjp",
                          "concat", "outer_sum"}


def _emit_nodes(w: Writer, scan: Scan, region: str, protect: frozenset[int] = frozenset(),
                chunk: bool = False) -> None:
    """A region outside the loop, as whole-sequence expressions. An elementwise op writes over an
    argument made in this region that nothing reads afterwards (nor `protect`s: values returned).

    With `chunk`, the chunked values of the region, for rows lo:hi of the sequence only."""
    lines = _Lines(w, scan)
    g = scan.g
    users = g.users()
    results = set(g.results())

    def readers(a: int) -> list[int]:
        """What reads value a, directly or through views of it, or through a concatenation that is
        not made (its readers read the parts: the stacked weight gradients after the loop)."""
        out = []
        for u in users[a]:
            out.append(u)
            if g.nodes[u].op in VIEWS or u in scan.split:
                out.extend(readers(u))
        return out

    def ref(a: int) -> str:
        code = scan.ref(a, loop=False)
        if chunk and g.nodes[a].type.batched and a not in scan.chunked:
            return f"{code}[lo:hi]"
        return code

    def here(u: int) -> bool:
        return scan.sched.region[u] == region and (u in scan.chunked) == chunk

    def rows_of(code: str, start: Size, stop: Size) -> str:
        a, b = _size(start), _size(stop)
        return f"{code}[{'' if a == '0' else a}:{b}]"

    filling = fills(scan.sched)
    members = scan.sched.nodes_in(region)
    pending: tuple[int, list[str]] | None = None  # the states the value just made fills
    for i in members:
        if pending:
            _fill(lines, scan, *pending)
        pending = (i, filling[i]) if i in filling and not chunk else None
        node = g.nodes[i]
        if node.op in LEAVES or (i in scan.chunked) != chunk or i in scan.split:
            continue
        # Only an input's gradient needs it (schedule.only_for_inputs): made when one is asked for.
        optional = w.block("if inputs_grad:") if i in scan.optional else contextlib.nullcontext()
        with optional:
            c = next((a for a in node.args if a in scan.split), None)
            if c is not None:
                # A reader of a concatenation that is not made: one product or sum per part.
                name, parts = scan.names[i], scan.split[c]
                if node.op == "matvec_t":
                    w_code = ref(node.args[0])
                    lines.emit(node, f"{name} = matmul({parts[0][0]}, {rows_of(w_code, parts[0][1], parts[0][2])})")
                    for code, a, b in parts[1:]:
                        lines.emit(node, f"{name} += matmul({code}, {rows_of(w_code, a, b)})")
                elif node.op == "outer_sum":
                    v = ref(node.args[1])
                    items = ", ".join(f"matmul({code}.T, {v})" for code, _, _ in parts)
                    lines.emit(node, f"{name} = np.concatenate([{items}])")
                else:
                    items = ", ".join(f"{code}.sum(axis=0)" for code, _, _ in parts)
                    lines.emit(node, f"{name} = np.concatenate([{items}])")
                scan.fresh.add(i)
                continue
            args = [ref(a) for a in node.args]
            stmt = spell(node, args, [g.nodes[a].type for a in node.args], "(hi - lo)" if chunk else "rows")
            if chunk and i in scan.operand_of:
                stmt = f"matmul({args[1]}, {scan.operand_of[i]})"
            if node.type.batched and _elementwise(node):
                for a, code in zip(node.args, args):
                    if (a in scan.fresh and g.nodes[a].type == node.type and a not in results and a not in protect
                            and (a in scan.chunked) == chunk and all(here(u) and u <= i for u in readers(a))):
                        stmt = spell_into(node, args, code)
                        break
            if node.op in _FRESH:
                scan.fresh.add(i)
            lines.emit(node, f"{scan.names[i]} = {stmt}")
    if pending:
        _fill(lines, scan, *pending)


def _fill(lines: "_Lines", scan: Scan, i: int, states: list[str]) -> None:
    """Every step's block of these states' buffers from value i, their next value, made outside
    the loop (schedule.hoist_delays): before it, a delay's sequence; after it, a carried gradient
    the loop never read."""
    rows = ":rows" if scan.reverse else "B:"
    for name in states:
        lines.w.line(f"{scan.carry_buf[name]}[{rows}] = {scan.ref(i, loop=False)}")


def _emit_loop_body(w: Writer, scan: Scan) -> None:
    lines = _Lines(w, scan)
    g = scan.g
    hoisted = set(scan.hoisted)
    for i in scan.sched.nodes_in("loop"):
        node = g.nodes[i]
        if node.op in LEAVES or i in scan.unused:
            continue
        if i in scan.group_of:
            if i in scan.group_at:
                _emit_group(lines, scan, scan.group_at[i])
            continue
        name = scan.names[i]
        place = scan.place.get(i)
        args = [scan.ref(a, loop=True) for a in node.args]
        if i in scan.operand_of:
            args[0] = scan.operand_of[i]
        if i in hoisted:
            if place is not None:
                lines.emit(node, f"{place.code()} = {name}")
            continue
        if node.op == "concat" and node.type.batched:
            start, copies = Size.of(0), []
            for a, code in zip(node.args, args):
                stop = start + g.nodes[a].type.shape[0]
                if scan.absorbed.get(a) != i or scan.place[a] != place.part(start, stop):
                    copies.append((place.part(start, stop).code(), code))
                start = stop
            if len(copies) == len(node.args):
                lines.emit(node, f"np.concatenate([{', '.join(args)}], axis=1, out={place.code()})")
            else:
                for dest, code in copies:
                    lines.emit(node, f"{dest} = {code}")
            if place.code() != name:
                lines.emit(node, f"{name} = {place.code()}")
            continue
        stmt = spell_into(node, args, place.code()) if place is not None else None
        if stmt is not None:
            lines.emit(node, f"{name} = {stmt}")
            continue
        # A view, or an op without an in-place spelling: an expression, copied where it belongs.
        lines.emit(node, f"{name} = {spell(node, args, [g.nodes[a].type for a in node.args], 'B')}")
        if place is not None:
            lines.emit(node, f"{place.code()} = {name}" if place.code() != name else f"{name}[...] = {name}")


def _group_arg(scan: Scan, arg: tuple, width: Size) -> str:
    if arg[0] == "same":
        return scan.ref(arg[1], loop=True)
    _, (kind, base), first = arg
    full = first == Size.of(0) and width == (scan.groups[base].width if kind == "g" else
                                              scan.g.nodes[base].type.shape[0])
    if kind == "g":
        place = scan.groups[base].place
        return place.code() if full else place.part(first, first + width).code()
    if full:
        return scan.ref(base, loop=True)
    if scan.sched.region[base] == "pre":
        rows = "cs:ce" if base in scan.chunked else "s:e"
        return Place(scan.names[base], rows).part(first, first + width).code()
    if base in scan.place:
        return scan.place[base].part(first, first + width).code()
    return Place(scan.names[base]).part(first, first + width).code()


def _emit_group(lines: _Lines, scan: Scan, index: int) -> None:
    grp = scan.groups[index]
    first = scan.g.nodes[grp.members[0]]
    args = [_group_arg(scan, a, grp.width) for a in grp.args]
    if grp.scales:
        lines.emit(first, f"{grp.name} = rt.sigmoid_tanh({args[0]}, {grp.scales}, {grp.place.code()})")
    else:
        lines.emit(first, f"{grp.name} = {spell_into(first, args, grp.place.code())}")
    if grp.place.rows is not None:
        for m in grp.members:
            if m in scan.bind[index]:
                lines.emit(first, f"{scan.names[m]} = {scan.place[m].code()}")


def emit_scan(w: Writer, scan: Scan, carry_init: list[str], namer: Namer, protect: frozenset[int] = frozenset()) -> bool:
    """The body of one pass over the sequence.

    `carry_init`: per state, the code of the value it starts from (the initial state forward, the
    final state's gradient backward). `scan.guarded` buffers are filled only when training.
    Where every state is a linear recurrence (scan.affine_loop), the pass is a chunked scan
    (rt.linear_scan) where that is the faster (narrow states: rt.scan_pays), unless the caller
    asks for the loop over steps (scan=False). Returns whether the pass may scan (`scanned` is set).
    """
    forms = affine_loop(scan.sched)
    if forms is None:
        _emit_steps(w, scan, carry_init, namer, protect)
        return False
    linear = Scan(scan.sched, scan.reverse, scan.source_lines, scan.file, names=dict(scan.names),
                  seq=dict(scan.seq), carry_buf=dict(scan.carry_buf), guarded=scan.guarded,
                  optional=scan.optional)
    width = " + ".join(_size(scan.g.nodes[leaf].type.shape[0]) for _, leaf, _ in scan.g.carries)
    w.line(f"scanned = scan and rt.scan_pays(B, {width})  # else the loop over steps")
    with w.block("if scanned:"):
        _emit_linear_scan(w, linear, carry_init, namer, protect, forms)
    with w.block("else:"):
        _emit_steps(w, scan, carry_init, namer, protect)
    return True


def _emit_linear_scan(w: Writer, scan: Scan, carry_init: list[str], namer: Namer, protect: frozenset[int],
                      forms: dict[int, Affine]) -> None:
    """The pass without a loop over steps: a and b of every state for all steps (array
    expressions), one rt.linear_scan a state, then the loop values kept for every step from the
    states (a * s + b), then what follows the loop, as it always does."""
    g, sched = scan.g, scan.sched
    w.comment("Every state is a linear recurrence s' = a * s + b, with a and b made from the inputs: each")
    w.comment("state's sequence is one chunked scan over time (rt.linear_scan), with no loop over steps here.")
    _emit_state_buffers(w, scan, carry_init)
    w.comment("Fixed for the whole sequence.")
    _emit_nodes(w, scan, "const", protect)
    if any(n.op in ("matvec", "matvec_t", "outer_sum") and any(g.nodes[a].type.batched for a in n.args)
           for n in g.nodes):
        w.line("matmul = np.matmul")
    w.comment("Everything that does not depend on the state, for all steps at once.")
    _emit_nodes(w, scan, "pre", protect)
    spell = TermSpeller(w, lambda i: scan.ref(i, loop=False), namer, lambda i: g.nodes[i].type.batched,
                        lambda i: False, "np.full((rows, {size}), {value}, dtype=dtype)",
                        "np.broadcast_to({code}, (rows, {size}))", "{code}")
    filled = filled_outside(sched)
    for name, leaf, nxt in g.carries:
        if name in filled:
            continue  # filled before the scan or after it
        size = _size(g.nodes[leaf].type.shape[0])
        a = spell.rows(forms[nxt].a, size, f"a_of_{name}")
        b = spell.rows(forms[nxt].b, size, f"b_of_{name}")
        w.line(f"rt.linear_scan({a}, {b}, {scan.carry_buf[name]}, T, B, reverse={scan.reverse})")
    kept = [i for i in scan.seq if sched.region[i] == "loop"]
    if kept:
        w.comment("The loop values kept for every step, from the states: a * s + b.")
    for i in kept:
        buf = scan.seq[i]
        code = spell.rows(forms[i].term(), _size(g.nodes[i].type.shape[0]), buf, exact=True)
        if code != buf:
            w.line(f"{buf} = {code}")
    after_loop(w, sched, lambda region: _emit_nodes(w, scan, region, protect))


def _emit_steps(w: Writer, scan: Scan, carry_init: list[str], namer: Namer, protect: frozenset[int]) -> None:
    """The pass as a loop over steps."""
    sched = scan.sched
    _choose_chunked(scan, protect)
    _choose_alternating(scan, protect)
    _plan_loop(scan, namer)
    _choose_split(scan, protect)
    _emit_state_buffers(w, scan, carry_init)
    _emit_before_loop(w, scan, protect)
    _emit_buffers(w, scan)
    _emit_time_loop(w, scan, protect)
    after_loop(w, sched, lambda region: _emit_nodes(w, scan, region, protect))


def _emit_before_loop(w: Writer, scan: Scan, protect: frozenset[int]) -> None:
    """What is fixed for the sequence, the pass's matmul, and the input-only values for all steps."""
    g, sched = scan.g, scan.sched
    w.comment("Fixed for the whole sequence.")
    _emit_nodes(w, scan, "const", protect)
    for v, cname in scan.consts.items():
        w.line(f"{cname} = np.array({v!r}, dtype=dtype)")
    for name, code in scan.operands.items():
        w.line(f"{name} = {code}")
    if any(n.op in ("matvec", "matvec_t", "outer_sum") and any(g.nodes[a].type.batched for a in n.args)
           for n in g.nodes):
        w.line(f"matmul = rt.matmul_for({', '.join(scan.operands)})  # NumPy's, or oneDNN's for large float32 matrices")
    for v, tname in scan.tiled.items():
        w.line(f"{tname} = rt.rows({scan.ref(v, loop=False)}, B)  # as B rows: faster than broadcasting")
    if any(i not in scan.chunked for i in sched.nodes_in("pre") if g.nodes[i].op not in LEAVES):
        w.comment("Before the loop: everything that does not depend on the state, for all steps at once.")
    _emit_nodes(w, scan, "pre", protect)


def _emit_state_buffers(w: Writer, scan: Scan, carry_init: list[str]) -> None:
    """The states' buffers, holding the first state (forward) or the final state's gradient; before
    anything else, since the host fills some of them outside the loop (schedule.hoist_delays)."""
    g = scan.g
    for (name, leaf, _), init in zip(g.carries, carry_init):
        size = _size(g.nodes[leaf].type.shape[0])
        buf = scan.carry_buf[name]
        if name not in scan.alternating:
            w.line(f"{buf} = np.empty(((T + 1) * B, {size}), dtype=dtype)")
            w.line(f"{buf}[{'T * B:' if scan.reverse else ':B'}] = {init}")
        elif scan.reverse:
            w.line(f"{buf} = np.empty((2 * B, {size}), dtype=dtype)  # two blocks, used in turn")
            w.line(f"{buf}[T % 2 * B:(T % 2 + 1) * B] = {init}")
        else:
            w.line(f"{buf} = np.empty(((T + 1) * B if train else 2 * B, {size}), dtype=dtype)")
            w.line(f"{buf}[:B] = {init}")


def _emit_buffers(w: Writer, scan: Scan) -> None:
    """What the loop keeps, its scratch space, and values set up once for it."""
    g = scan.g
    if scan.seq:
        w.comment("What the loop keeps for later, one block of B rows per step." +
                  (" Values only the backward pass\nreads get a single block when not training."
                   if scan.guarded else ""))
    for i, buf in scan.seq.items():
        if i in scan.seq_view:
            continue
        size = _size(g.nodes[i].type.shape[0])
        rows = "rows if train else B" if i in scan.guarded else "rows"
        w.line(f"{buf} = np.empty(({rows}, {size}), dtype=dtype)")
    for buf, width, guarded in scan.group_seq:
        w.line(f"{buf} = np.empty(({'rows if train else B' if guarded else 'rows'}, {_size(width)}), dtype=dtype)")
    for i, view in scan.seq_view.items():
        w.line(f"{scan.seq[i]} = {view.code()}")
    scratch_groups = [grp for grp in scan.groups if grp.place.rows is None]
    if scan.scratch or scratch_groups:
        w.comment("Scratch space for one step.")
        for i in scan.scratch:
            shape = ", ".join(["B"] + _row_shape(g.nodes[i]))
            w.line(f"{scan.names[i]} = np.empty(({shape}), dtype=dtype)")
        for grp in scratch_groups:
            w.line(f"{grp.name} = np.empty((B, {_size(grp.width)}), dtype=dtype)")
    hl = _Lines(w, scan)
    for grp in scan.groups:
        if grp.scales:
            parts = ", ".join(f'("{g.nodes[m].op}", {_size(g.nodes[m].type.shape[0])})' for m in grp.members)
            hl.emit(g.nodes[grp.members[0]], f"{grp.scales} = rt.sigmoid_tanh_scales(dtype, B, {parts})")
    for index, grp in enumerate(scan.groups):
        if grp.place.rows is None:
            for m in grp.members:
                if m in scan.bind[index]:
                    hl.emit(g.nodes[m], f"{scan.names[m]} = {scan.place[m].code()}")
    if scan.hoisted:
        for i in scan.hoisted:
            node = g.nodes[i]
            arg = scan.names[node.args[0]]
            at = scan.place.get(node.args[0])
            # A whole scratch buffer by its own name; a value written into a step's rows of a
            # sequence buffer moves every step, so its view is of the value's name (made above).
            src = at.buf if at is not None and at.cols is None and at.rows is None else arg
            hl.emit(node, f"{scan.names[i]} = {spell(node, [src], [g.nodes[node.args[0]].type], 'B')}")


def _emit_time_loop(w: Writer, scan: Scan, protect: frozenset[int]) -> None:
    g = scan.g
    steps = "reversed(range(T))" if scan.reverse else "range(T)"
    w.comment("The time loop: only what depends on the state." if not scan.reverse else
              "The time loop, from the last step to the first: only what the carried gradient needs.")
    w.comment("Each op writes into memory set up above: np.add(a, b, out) is out = a + b.")
    if scan.chunked:
        w.line("steps = rt.chunk_steps(T, B)  # how many steps each chunk of input-only values covers")
    with w.block(f"for t in {steps}:"):
        w.line("s, e = t * B, (t + 1) * B")
        if scan.chunked:
            if scan.reverse:
                start, rows = "(T - 1 - t) % steps == 0", "lo, hi = max(t + 1 - steps, 0) * B, e"
            else:
                start, rows = "t % steps == 0", "lo, hi = s, min(t + steps, T) * B"
            with w.block(f"if {start}:"):
                w.comment("What does not depend on the state, for the steps of this chunk (rows lo:hi).")
                w.line(rows)
                _emit_nodes(w, scan, "pre", protect, chunk=True)
            w.line("cs, ce = s - lo, e - lo")
        if any(p.rows == "k:k + B" for p in scan.place.values()):
            w.line("k = s if train else 0")
        if scan.alternating and scan.reverse:
            w.line(f"p, q = (t + 1) % 2 * B, t % 2 * B  # {', '.join(sorted(scan.alternating))}: two blocks in turn")
        elif scan.alternating:
            w.line(f"p, q = (s, e) if train else (t % 2 * B, (t + 1) % 2 * B)  # blocks of "
                   f"{', '.join(sorted(scan.alternating))} read and written")
        _emit_loop_body(w, scan)
        filled = filled_outside(scan.sched)
        for name, _, nxt in g.carries:
            place = scan.place.get(nxt)
            if name not in filled and (place is None or place.buf != scan.carry_buf[name]):
                block = "q:q + B" if name in scan.alternating else "s:e" if scan.reverse else "e:e + B"
                w.line(f"{scan.carry_buf[name]}[{block}] = {scan.ref(nxt, loop=True)}")


def _reshape_in(w: Writer, name: str, size: str) -> None:
    w.line(f"{name} = {name}.reshape(rows, {size})")


def emit_forward(w: Writer, fwd: Schedule, saved_nodes: list[int], dims: tuple[str, ...],
                 source_lines: list[str], file: str) -> dict[int, str]:
    """def forward(...): the pass over the sequence. Returns the names the saved values go by."""
    fwd = hoist_delays(fwd, frozenset(saved_nodes))
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
    with w.block(f"def forward({', '.join(args)}, *, {kw}, train=False, scan=True):"):
        w.line('"""One pass over a sequence of T steps with batch B; inputs are (T, B, size).')
        w.line("")
        w.line("Returns (outputs, final states, saved): saved holds what backward needs when train is set.")
        w.line('"""')
        w.line("rows = T * B")
        first = (leaf_names[g.inputs[0][1]] if g.inputs else init_names[0])
        w.line(f"dtype = {first}.dtype")
        for name, i in g.inputs:
            _reshape_in(w, leaf_names[i], _size(g.nodes[i].type.shape[0]))
        scan.guarded = frozenset(i for i in saved_nodes if i in fwd.kept) - needed_by_pass(fwd)
        may_scan = emit_scan(w, scan, init_names, namer, protect=frozenset(saved_nodes))
        outs = tuple_code([f"{scan.ref(i, loop=False)}.reshape(T, B, -1)" for _, i in g.outputs])
        finals = tuple_code([f"{scan.carry_buf[name]}[last:last + B]" if name in scan.alternating
                         else f"{scan.carry_buf[name]}[T * B:]" for name, _, _ in g.carries])
        if scan.alternating:
            scanned = " or scanned" if may_scan else ""  # a scan keeps every step's state
            w.line(f"last = T * B if train{scanned} else T % 2 * B  # where the final states are")
        key_namer = Namer()  # a gate may be called h_prev too: every key its own
        saved_names = {i: key_namer(saved_key(g, i, scan.names)) for i in saved_nodes}
        if saved_nodes:
            items = ", ".join(f'"{saved_names[i]}": {scan.ref(i, loop=False)}' for i in saved_nodes)
            w.line(f"saved = {{{items}}} if train else None")
        else:
            w.line("saved = {} if train else None")
        w.line(f"return {outs}, {finals}, saved")
    return saved_names


def emit_backward(w: Writer, bwd: Schedule, fwd: Graph, saved_names: dict[int, str],
                  dims: tuple[str, ...], source_lines: list[str], file: str) -> None:
    bwd = sink_post(hoist_delays(schedule(hoist_factors(bwd.graph))))
    g = bwd.graph
    namer = Namer(INTERNAL | set(dims))
    scan = Scan(bwd, reverse=True, source_lines=source_lines, file=file, optional=only_for_inputs(bwd))
    leaves = backward_args(g, fwd, saved_names, namer)
    leaf_names, bind, d_out_args, d_final = leaves.names, leaves.binds, leaves.d_outs, leaves.d_final
    _name_values(scan, namer, leaf_names)
    args = ["saved"] + [leaf_names[i] for i in d_out_args] + d_final + leaves.params
    kw = ", ".join(["T", "B", *dims])
    with w.block(f"def backward({', '.join(args)}, *, {kw}, scan=True, inputs_grad=True):"):
        w.line('"""Backpropagation through time: gradients of the inputs, initial states and parameters."""')
        w.line("rows = T * B")
        w.line(f"dtype = {d_final[0] if d_final else leaf_names[d_out_args[0]]}.dtype")
        w.line("train = True")
        for i in d_out_args:
            _reshape_in(w, leaf_names[i], _size(g.nodes[i].type.shape[0]))
        for local, key in bind:
            w.line(f'{local} = saved["{key}"]')
        emit_scan(w, scan, d_final, namer)
        d_inputs = tuple_code([input_gradient(f"{scan.ref(i, loop=False)}.reshape(T, B, -1)", i in scan.optional)
                               for _, i in g.outputs])
        d_inits = tuple_code([f"{scan.carry_buf[name]}[:B]" for name, _, _ in g.carries])
        d_params = tuple_code([scan.ref(i, loop=False) for _, i in g.reduced])
        w.line(f"return {d_inputs}, {d_inits}, {d_params}")


def write_section(w: Writer, fwd: Schedule, bwd: Schedule, saved: list[int], dims: tuple[str, ...],
                  lines: list[str], file: str, prefix: str) -> None:
    """The NumPy part of a generated module: forward and backward, on arrays."""
    saved_names = emit_forward(w, fwd, saved, dims, lines, file)
    w.line("")
    w.line("")
    emit_backward(w, bwd, fwd.graph, saved_names, dims, lines, file)
