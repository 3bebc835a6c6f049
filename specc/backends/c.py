"""Backend: scheduled step IR -> one C function per pass that runs the whole time loop.

On a CPU the time loop is where NumPy loses: every op of a step is a call from Python on a small
array (a batch of 16 x 128 features), a few microseconds each, a dozen per step, while torch's
nn.LSTM runs the whole step inside oneDNN. Here the loop itself is compiled, one call per pass:

    void specc_lstm_forward(long T, long B, int train, int threads, int cols, int packed, float *const *arg,
                            const long *row)

`arg` holds the host's tensors in a fixed order (`row`, the distance between the rows of each,
for those the host may hand in as views); the dimensions are compile-time constants, so one
compiled library serves one set of sizes. Per step:

* the batch is split among `threads` threads, each running every step on its own rows with no
  barrier between steps (no example reads another's inside the loop); or, where the weights are
  large and the batch small (`cols`), each product is split by columns among the threads, with a
  barrier before and after it, and the elementwise work by rows;
* each product of the state by a weight is one call of OpenBLAS's sgemm (sp_gemm in
  c_runtime.PRELUDE) on a thread's rows, on that thread: a (B, K) @ (K, N) product a step is too
  small for OpenBLAS to share out itself; or, where the runtime measured MKL's packed products
  faster on this machine (`packed`), of MKL's, on the weight each thread packed once before the loop;
* the elementwise ops of one width run in one loop over the batch and the features, each value a
  local named after the spec's, written to memory only where something outside that loop reads it
  (a later product, the backward pass, the next step);
* an elementwise value read only through slices (the LSTM's 4H-wide gate sum, split four ways) is
  never made whole: each slice is computed from the operands' columns where it is read.

Values live where the host put them: a state's block of its (T + 1) * B row buffer, a kept
value's block of its T * B row buffer, the host's input-only values at row t * B; what the pass
does not keep, in scratch memory the host hands in. The host code around the call is host.py's
(torch, shared with the Triton backend), with OpenBLAS's products for W @ x over all steps and the
gradients (c_spell), and its buffers on huge pages where they are large (memory.py). What the
host would make elementwise before the loop from the inputs alone (minGRU's gate) is made in the
loop at its step (schedule.sink_pre), as what it would make after it is (sink_elementwise).

Every identifier the C takes from the spec carries a prefix: v_ for values and buffers (v_h_seq,
v_sigmoid_f), d_ for dimensions (d_H). A spec may then name anything as it likes (linux, errno,
EOF, M_PI, int, main are all macros, keywords or the library's names in C), and the C still
reads as the spec does. Constants are C literals, and so is any number made of constants alone
(-0.5, tanh(0.5)), which the host holds as a Python number rather than as memory.

Ops the loop cannot run yet (reshape inside the recurrence) raise Unsupported, and such a cell
runs on the NumPy backend. Only float32 runs here.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ..ir import Forward, Graph, Node, suggested_names
from ..ops import ACTIVATIONS, ELEMENTS, ROW_REDUCTIONS
from ..schedule import Schedule, filled_after, filled_outside, sink_elementwise, sink_pre
from ..shapes import Size
from .host import (HOST_NAMES, Host, HostNames, LoopTarget, Unsupported, emit_after, emit_buffers, fused_into_loop,
                   torch_spell, wrapped_states)
from .writer import Namer, Writer

# Prefixes of the identifiers made from the spec's names: no keyword, macro or name of the C
# library or of PRELUDE starts with either, so no spec name can clash with one.
VALUE_PREFIX = "v_"
DIM_PREFIX = "d_"

_C_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
# The ops of one loop write only memory they do not read (each value has its own block), so the
# compiler need not check for overlap before it vectorises.
IVDEP = "#pragma GCC ivdep"
# A row's sum in vector registers: without leave to reorder its additions (strict IEEE order, no
# -ffast-math) GCC keeps a float reduction scalar, one dependent add at a time: contract's
# input gradient (outer_vjp_a) was ~10 % of second_order's backward so. Partial sums change
# only the rounding, as BLAS's own do.
SIMD_SUM = "#pragma omp simd reduction(+:{})"

def c_comment(text: str) -> str:
    """A C comment quoting spec text: printable, one line, and unable to end itself early."""
    text = "".join(ch if ch.isprintable() else "?" for ch in text).replace("*/", "* /")
    return f"/* {text} */"


def c_dim(name: str) -> str:
    """The C constant holding a dimension (c_runtime.full_source defines it)."""
    return DIM_PREFIX + name


def c_size(s: Size) -> str:
    """A size as a C expression in the dimension constants."""
    code = str(Size(tuple((tuple(c_dim(n) for n in m), c) for m, c in s.terms))).replace("//", "/")
    return code if code.replace("*", "").replace("_", "").isalnum() else f"({code})"


def c_float(v: float) -> str:
    """A number as a C float literal; parenthesised when negative, so that it reads as one operand."""
    if v != v:
        return "NAN"
    text = "INFINITY" if math.isinf(v) else f"{abs(float(v))!r}f"
    return f"(-{text})" if math.copysign(1.0, v) < 0 else text


def _may_be_a_view(s: Schedule, i: int) -> bool:
    """Whether the forward pass's host code may hold its batched value i as a view of a wider one:
    a slice or reshape made before or after the loop (a part of a stacked product), or a part of
    a concatenation made after it (which the loop writes into its columns: _concatenated_after)."""
    g = s.graph
    if s.region[i] in ("pre", "post") and g.nodes[i].op in ("slice", "reshape"):
        return True
    if s.region[i] == "pre":
        return False
    return any(g.nodes[u].op == "concat" and s.region[u] == "post" for u in g.users()[i])


def c_constant(g: Graph, i: int, forward: Graph | None = None) -> str | None:
    """Node i as a C expression when it is made of constants alone (-0.5, 2 * 3, tanh(0.5)), else
    None. The host holds such a number as a Python float, which is not memory the C could read.
    In a backward pass (`forward` given), a forward value handed in (a Forward leaf) is followed there."""
    node = g.nodes[i]
    if node.op == "const":
        return c_float(node.attrs[0])
    if node.type.shape != () or node.type.batched:
        return None
    if node.op == "param" and forward is not None and isinstance(node.attrs[0], Forward):
        return c_constant(forward, node.attrs[0].node)
    if node.op not in ELEMENTS:
        return None
    args = [c_constant(g, a, forward) for a in node.args]
    if any(a is None for a in args):
        return None
    return ELEMENTS[node.op].spell("c", args)


@dataclass(frozen=True)
class Place:
    """Where a (B, width) value lives during step t: `ptr` points at its row 0, column 0."""

    ptr: str  # a C expression
    row: str  # the distance between its rows, in floats; "0" for a value shared by every example
    scalar: bool = False  # one number (per example, or in all): read at column 0 whatever the column
    literal: bool = False  # ptr is a number, not memory


@dataclass
class LoopSource:
    """One pass's loop as C: the function, and what the host must hand it, in order."""

    name: str
    text: list[str]
    args: list[str]  # host expressions, one per pointer the function reads
    scratch: str  # a Python expression in B and the dimensions: floats of scratch memory
    views: list[int]  # the arguments read at their own rows' distance (`row`): they may be views


class CLoop:
    """Writes the C function running one pass's time loop (forward, or backward when `reverse`)."""

    def __init__(self, s: Schedule, host: HostNames, reverse: bool, guard: frozenset[int], fn: str,
                 source: tuple[list[str], str], weights: dict[int, str], fused: set[int] = frozenset(),
                 columns: dict[int, tuple[str, Size, Size]] | None = None, forward: Schedule | None = None):
        self.s, self.g, self.host, self.reverse, self.guard = s, s.graph, host, reverse, guard
        self.fn, (self.lines, self.file) = fn, source
        self.weights = weights  # matvec node -> host name of its weight, laid out (K, N)
        self.fused = fused  # input-only values computed in the loop
        self.columns = columns or {}  # kept value -> (host buffer, its width, first column) it is written to
        self.forward = forward.graph if forward else None  # a backward pass's forward step
        # A backward pass's per-step forward values come from the forward pass's host code, which
        # may hold one as a view: a part of a stacked product (W_x[:, :H]), a part of a
        # concatenation the loop wrote in place. Those are read at the distance between their
        # rows that the host hands in; everything else is contiguous, and read as such.
        self.views = {i for key, i in self.g.inputs
                      if isinstance(key, Forward) and (forward is None or _may_be_a_view(forward, key.node))}
        self.namer = Namer()
        # The spec's names of values, as the host's (int_2, where Python has a builtin int) need not be.
        self.suggested = suggested_names(self.g)
        self.args: dict[str, str] = {}  # host expression -> C name
        self.view_rows: dict[str, str] = {}  # host expression of a view -> the C name of its rows' distance
        self.decls: list[str] = []
        self.body: list[str] = []
        self.place: dict[int, Place] = {}
        self.scratch: list[Size] = []  # widths of the scratch blocks handed out so far (B rows each)
        self.last_line = 0
        self.users = self.g.users()
        self.todo: list[int] = []
        self.absorbed: dict[int, set[int]] = {}  # concat -> parts written straight into it
        self.virtual: set[int] = set()  # values never made whole (see _find_virtual)
        self.body_indent = ""
        self.packs: dict[str, tuple[str, str, str]] = {}  # a step's weight -> (its MKL packing, K, N)

    # names
    def cname(self, wanted: str) -> str:
        """A C identifier for a value: its own name, prefixed (see VALUE_PREFIX), made unique."""
        return self.namer(VALUE_PREFIX + (wanted if _C_IDENT.match(wanted) else "v"))

    def arg(self, host_expr: str, const: bool, view: bool = False) -> str:
        if host_expr not in self.args:
            name = self.cname(host_expr)
            k = len(self.args)
            self.args[host_expr] = name
            qual = "const float *" if const else "float *"
            self.decls.append(f"    {qual}{name} = {'(const float *)' if const else ''}arg[{k}];"
                              + ("" if name == VALUE_PREFIX + host_expr else f"  {c_comment(host_expr)}"))
            if view:
                self.view_rows[host_expr] = self.cname(f"{host_expr}_row")
                self.decls.append(f"    const long {self.view_rows[host_expr]} = row[{k}];")
        return self.args[host_expr]

    def _scratch_block(self, width: Size, i: int | None = None) -> str:
        offset = " + ".join(c_size(w) for w in self.scratch)
        self.scratch.append(width)
        block = f"scratch + B * ({offset})" if offset else "scratch"
        if i is not None and any(self.g.nodes[u].op in ("matvec", "matvec_t") and self.g.nodes[u].args[1] == i
                                 for u in self.users[i]):
            # A product's operand, which every thread may read whole (sp_gemm_cols): two blocks used
            # in turn, as the states' are. Rewritten in place each step, the threads' rows of it
            # went back and forth between the cores' caches: second_order's x (x) h at 200 x 8 x 64 x
            # 64, forward, 7.4 ms in one block, 5.8 in two (or in a fresh block every step).
            self.scratch.append(width)
            block = f"{block} + (t & 1) * B * {c_size(width)}"
        return block

    # where values are
    def _carry_rows(self, name: str, leaf: bool) -> str:
        """The first row of step t's block of a state buffer: the state read (leaf) or written."""
        later = leaf == self.reverse  # forward reads block t, writes t + 1; backward the other way
        return self.host.carry_rows(name, later)

    def where(self, i: int) -> Place:
        if i in self.place:
            if self.place[i] is None:
                raise AssertionError(f"value %{i} read outside the fused loop that made it")
            return self.place[i]
        g, node = self.g, self.g.nodes[i]
        width = c_size(node.type.shape[0]) if node.type.shape else "1"
        scalar = not node.type.shape
        number = c_constant(g, i, self.forward)
        if number is not None:
            return Place(number, "0", True, literal=True)
        for name, leaf, _ in g.carries:
            if i == leaf:
                buf = self.arg(self.host.carry_buf[name], const=False)
                return Place(f"{buf} + {self._carry_rows(name, True)} * {width}", width, scalar)
        region = self.s.region[i]
        if region == "const":
            return Place(self.arg(self.host.names[i], const=True), "0", scalar)
        if region == "pre":
            if node.op == "slice":
                src = self.where(node.args[0])
                return Place(f"{src.ptr} + {c_size(node.attrs[0])}", src.row, scalar)
            name = self.host.names[i]
            buf = self.arg(name, const=True, view=i in self.views)
            row = self.view_rows.get(name, width)
            return Place(f"{buf} + t * B * {row}", row, scalar)
        raise AssertionError(f"value %{i} ({node.op}) read before it was computed")

    # code
    def line(self, text: str) -> None:
        self.body.append("        " + self.body_indent + text)

    def comment(self, node: Node) -> None:
        if node.line and node.line != self.last_line and node.line <= len(self.lines):
            self.line(c_comment(f"{self.file}:{node.line}  {self.lines[node.line - 1].strip()}"))
            self.last_line = node.line

    def element(self, p: Place, width: str) -> str:
        """The element at row r, column c of a value (broadcast as the op's type says)."""
        if p.literal:
            return p.ptr
        col = "0" if p.scalar else "c"
        index = col if p.row == "0" else (f"r * {p.row}" if col == "0" else f"r * {p.row} + {col}")
        return f"{p.ptr}[{index}]" if p.ptr.isidentifier() else f"({p.ptr})[{index}]"

    def target(self, i: int, suffix: str = "") -> Place:
        """Where node i is written: its kept buffer, its state buffer, or scratch memory."""
        g, node = self.g, self.g.nodes[i]
        width = c_size(node.type.shape[0]) if node.type.shape else "1"
        name = self.cname(self.suggested[i] + suffix)
        for sname, _, nxt in g.carries:
            if nxt == i:
                buf = self.arg(self.host.carry_buf[sname], const=False)
                self.line(f"float *{name} = {buf} + {self._carry_rows(sname, False)} * {width};")
                return Place(name, width, not node.type.shape)
        if i in self.columns:  # a part of a concatenation the host reads after the loop: in its columns
            whole, total, column = self.columns[i]
            buf = self.arg(whole, const=False)
            self.line(f"float *{name} = {buf} + t * B * {c_size(total)} + {c_size(column)};")
            return Place(name, c_size(total), not node.type.shape)
        if i in self.host.seq:
            buf = self.arg(self.host.seq[i], const=False)
            if i in self.guard:  # kept only for a backward pass: scratch when there is none
                self.line(f"float *{name} = train ? {buf} + t * B * {width} : "
                          f"{self._scratch_block(node.type.shape[0] if node.type.shape else Size.of(1), i)};")
            else:
                self.line(f"float *{name} = {buf} + t * B * {width};")
            return Place(name, width, not node.type.shape)
        block = self._scratch_block(node.type.shape[0] if node.type.shape else Size.of(1), i)
        self.line(f"float *{name} = {block};")
        return Place(name, width, not node.type.shape)

    def also_kept(self, i: int, p: Place, local: str | None = None) -> None:
        """A state's next value that backward also keeps: written into its kept buffer too; and
        one that is the next value of several states (c' = z, d' = z): into each one's buffer
        (target() wrote the first)."""
        node = self.g.nodes[i]
        width = c_size(node.type.shape[0]) if node.type.shape else "1"

        def copy(dest: str) -> str:
            if local is not None:  # inside a fused loop: this element
                return f"{self.element(Place(dest, width, p.scalar), width)} = {local};"
            return f"memcpy({dest} + r0 * {width}, {p.ptr} + r0 * {width}, sizeof(float) * (r1 - r0) * {width});"

        sharing = [name for name, _, nxt in self.g.carries if nxt == i]
        for name in sharing[1:]:
            buf = self.arg(self.host.carry_buf[name], const=False)
            self.line(copy(f"{buf} + {self._carry_rows(name, False)} * {width}"))
        if i in self.host.seq and sharing:
            buf = self.arg(self.host.seq[i], const=False)
            line = copy(f"{buf} + t * B * {width}")
            self.line(f"if (train) {line}" if i in self.guard else line)

    def elementwise(self, out: Place, width: str, expr: str) -> None:
        self.line(f"#pragma omp parallel for if (threads == 1 && B * {width} >= SP_PARALLEL_ELEMENTS)")
        self.line("for (long r = r0; r < r1; r++)")
        self.line("    " + IVDEP)
        self.line(f"    for (long c = 0; c < {width}; c++)")
        self.line(f"        {self.element(out, width)} = {expr};")

    # fusion: the elementwise ops of a step that share a width run in one loop, in registers
    def _kind(self, i: int) -> str:
        node = self.g.nodes[i]
        if i in self.virtual:
            return "virtual"
        if node.op == "slice" and node.args[0] in self.virtual:
            return "ew"  # computed where it is read, from its source's operands at its columns
        if node.op == "slice" and not self._owns(i):
            return "view"
        if node.op in ELEMENTS or node.op in ("zeros", "slice", "expand"):
            return "ew"
        return "other"

    def _owns(self, i: int) -> bool:
        return i in self.host.seq or any(nxt == i for _, _, nxt in self.g.carries)

    def _width(self, i: int) -> str:
        node = self.g.nodes[i]
        return c_size(node.type.shape[0]) if node.type.shape else "1"

    def fusion_order(self, todo: list[int]) -> list[int]:
        """A topological order of `todo` that puts elementwise ops of one width next to each other."""
        pending, done, order = list(todo), set(), []
        inside = set(todo)
        width = None
        while pending:
            ready = [i for i in pending if all(a in done or a not in inside for a in self.g.nodes[i].args)]
            same = [i for i in ready if self._kind(i) == "ew" and self._width(i) == width]
            views = [i for i in ready if self._kind(i) in ("view", "virtual")]
            # A product before a new elementwise loop: the loop may then take in what the product
            # feeds, where starting it first would close it at the product.
            other = [i for i in ready if self._kind(i) == "other"]
            pick = (same or views or other or ready)[0]
            if self._kind(pick) not in ("view", "virtual"):
                width = self._width(pick) if self._kind(pick) == "ew" else None
            order.append(pick)
            done.add(pick)
            pending.remove(pick)
        return order

    def group(self, members: list[int]) -> None:
        """One loop over the batch and the features computing `members`, each a local float,
        stored where something outside the loop reads it."""
        g, users = self.g, self.users
        inside = set(members)
        width = self._width(members[0])
        stored: dict[int, Place] = {}
        for m in members:
            outside = [u for u in users[m] if u not in inside]
            absorb = (not self._owns(m) and len(users[m]) == 1 and g.nodes[users[m][0]].op == "concat"
                      and users[m][0] in self.todo)
            if absorb:  # its only reader is a concat: written straight into the concat's columns
                c = users[m][0]
                if c not in self.place:
                    self.comment(g.nodes[c])
                    self.place[c] = self.target(c)
                    self.absorbed[c] = set()
                column = Size.of(0)
                for a in g.nodes[c].args:
                    if a == m:
                        break
                    column = column + g.nodes[a].type.shape[0]
                stored[m] = Place(f"{self.place[c].ptr} + {c_size(column)}", self.place[c].row)
                self.absorbed[c].add(m)
            elif self._owns(m) or outside:
                self.comment(g.nodes[m])
                stored[m] = self.target(m, "_out")
        self.line(f"#pragma omp parallel for if (threads == 1 && B * {width} >= SP_PARALLEL_ELEMENTS)")
        self.line("for (long r = r0; r < r1; r++) {")
        self.line("    " + IVDEP)
        self.line(f"    for (long c = 0; c < {width}; c++) {{")
        self.body_indent = "        "
        last = self.last_line
        self.last_line = 0
        for m in members:
            node = g.nodes[m]
            self.comment(node)
            local = self.cname(self.suggested[m])
            self.line(f"float {local} = {self.expr(m)};")
            self.place[m] = Place(local, "0", True, literal=True)
            if m in stored:
                self.line(f"{self.element(stored[m], width)} = {local};")
                self.also_kept(m, stored[m], local)
        self.body_indent = ""
        self.last_line = last
        self.line("    }")
        self.line("}")
        for m, p in stored.items():  # later groups and products read it from memory
            self.place[m] = p
        for m in members:
            if m not in stored:
                self.place[m] = None  # lives only inside the loop above

    def expr(self, i: int) -> str:
        node = self.g.nodes[i]
        op, width = node.op, self._width(i)
        if op == "slice" and node.args[0] in self.virtual:
            return self.inline(node.args[0], node.attrs[0], width)
        args = [self.where(a) for a in node.args]
        if op in ELEMENTS:
            return ELEMENTS[op].spell("c", [self.element(p, width) for p in args], nested=False)
        if op == "slice":
            return self.element(Place(f"{args[0].ptr} + {c_size(node.attrs[0])}", args[0].row), width)
        if op == "zeros":
            return "0.0f"
        if op == "expand":  # each row's one number, at every column
            (p,) = args
            one = self.element(Place(p.ptr, p.row, True, p.literal), width)
            divisor = node.attrs[1]
            return one if divisor == Size.of(1) else f"{one} / (float)({c_size(divisor)})"
        raise AssertionError(op)

    def outer(self, i: int, args: list[Place], out: Place) -> None:
        """contract(W, a, b)'s operand a (x) b, one row per example (entry [i * k + j] = a[i] b[j]),
        and the two halves of its gradient: G's rows as (n, k) matrices times b, and times a."""
        g, node = self.g, self.g.nodes[i]

        def at(p: Place, col: str) -> str:
            return self.element(Place(f"{p.ptr} + {col}" if not p.scalar else p.ptr, p.row, p.scalar), "1")

        if node.op == "outer":
            n, k = (c_size(g.nodes[a].type.shape[0]) for a in node.args)
            a, b = args
            self.line(f"#pragma omp parallel for if (threads == 1 && B * {n} * {k} >= SP_PARALLEL_ELEMENTS)")
            self.line("for (long r = r0; r < r1; r++)")
            self.line(f"    for (long i = 0; i < {n}; i++) {{")
            self.line(f"        float a_ri = {at(a, 'i').replace('[r', '[r').replace('c]', '0]')};")
            self.line("        " + IVDEP)
            self.line(f"        for (long c = 0; c < {k}; c++)")
            self.line(f"            ({out.ptr} + i * {k})[r * {out.row} + c] = a_ri * {self.element(b, k)};")
            self.line("    }")
            return
        n, k = (c_size(x) for x in node.attrs)
        grad, other = args
        width = n if node.op == "outer_vjp_a" else k
        self.line(f"#pragma omp parallel for if (threads == 1 && B * {n} * {k} >= SP_PARALLEL_ELEMENTS)")
        self.line("for (long r = r0; r < r1; r++) {")
        if node.op == "outer_vjp_a":  # out[i] = sum_j G[i * k + j] b[j]
            self.line(f"    for (long i = 0; i < {n}; i++) {{")
            self.line("        float sum = 0.0f;")
            self.line("        " + SIMD_SUM.format("sum"))
            self.line(f"        for (long c = 0; c < {k}; c++)")
            self.line(f"            sum += ({grad.ptr} + i * {k})[r * {grad.row} + c] * {self.element(other, k)};")
            self.line(f"        {out.ptr}[r * {out.row} + i] = sum;")
            self.line("    }")
        else:  # out[j] = sum_i G[i * k + j] a[i]
            self.line(f"    for (long c = 0; c < {width}; c++)")
            self.line(f"        {out.ptr}[r * {out.row} + c] = 0.0f;")
            self.line(f"    for (long i = 0; i < {n}; i++) {{")
            self.line(f"        float a_ri = {at(other, 'i').replace('c]', '0]')};")
            self.line("        " + IVDEP)
            self.line(f"        for (long c = 0; c < {k}; c++)")
            self.line(f"            {out.ptr}[r * {out.row} + c] += a_ri * ({grad.ptr} + i * {k})[r * {grad.row} + c];")
            self.line("    }")
        self.line("}")

    def softmax(self, i: int, args: list[Place], out: Place) -> None:
        """softmax(v) of each example's row (its maximum taken out first, so exp cannot overflow),
        or its gradient softmax_vjp(g, y) = y * (g - sum(g * y))."""
        width = self._width(i)

        def at(p: Place) -> str:
            return self.element(p, width)

        self.line(f"#pragma omp parallel for if (threads == 1 && B * {width} >= SP_PARALLEL_ELEMENTS)")
        self.line("for (long r = r0; r < r1; r++) {")
        if self.g.nodes[i].op == "softmax":
            v = args[0]
            self.line("    float top = -INFINITY, sum = 0.0f;")
            self.line(f"    for (long c = 0; c < {width}; c++)")
            self.line(f"        top = {at(v)} > top ? {at(v)} : top;")
            self.line("    " + SIMD_SUM.format("sum"))
            self.line(f"    for (long c = 0; c < {width}; c++) {{")
            self.line(f"        float e = sp_exp({at(v)} - top);")
            self.line(f"        {at(out)} = e;")
            self.line("        sum += e;")
            self.line("    }")
            self.line(f"    for (long c = 0; c < {width}; c++)")
            self.line(f"        {at(out)} /= sum;")
        else:
            grad, y = args
            self.line("    float sum = 0.0f;")
            self.line("    " + SIMD_SUM.format("sum"))
            self.line(f"    for (long c = 0; c < {width}; c++)")
            self.line(f"        sum += {at(grad)} * {at(y)};")
            self.line(f"    for (long c = 0; c < {width}; c++)")
            self.line(f"        {at(out)} = {at(y)} * ({at(grad)} - sum);")
        self.line("}")

    def reduce_row(self, i: int, v: Place, out: Place) -> None:
        """sum(v) or max(v) of each example's row: one number a row."""
        width = self._width(self.g.nodes[i].args[0])
        at = self.element(v, width)
        self.line(f"#pragma omp parallel for if (threads == 1 && B * {width} >= SP_PARALLEL_ELEMENTS)")
        self.line("for (long r = r0; r < r1; r++) {")
        if self.g.nodes[i].op == "rowsum":
            self.line("    float acc = 0.0f;")
            self.line("    " + SIMD_SUM.format("acc"))
            self.line(f"    for (long c = 0; c < {width}; c++)")
            self.line(f"        acc += {at};")
        else:  # NaN wins, as in torch.amax
            self.line("    float acc = -INFINITY;")
            self.line(f"    for (long c = 0; c < {width}; c++)")
            self.line(f"        acc = ({at} > acc || {at} != {at}) ? {at} : acc;")
        self.line(f"    {self.element(Place(out.ptr, out.row, True), '1')} = acc;")
        self.line("}")

    def _find_virtual(self) -> None:
        """Elementwise values read only through slices (the LSTM's four gates' pre-activations,
        split from one 4H-wide sum) are never made whole: each slice is computed from the
        operands' columns where it is read, as the Triton kernels do, which spares writing and
        reading back a (B, 4H) block a step."""
        g = self.g
        todo = set(self.todo)
        for i in reversed(self.todo):
            node = g.nodes[i]
            if (self._kind(i) == "ew" and node.op not in ("slice", "zeros", "expand") and not self._owns(i)
                    and self.users[i] and all(u in todo and (g.nodes[u].op == "slice" or u in self.virtual)
                                              for u in self.users[i])):
                self.virtual.add(i)

    def inline(self, i: int, offset: Size, width: str) -> str:
        """The element at row r, column c + offset of value i, as an expression."""
        node = self.g.nodes[i]
        if i in self.virtual:
            return ELEMENTS[node.op].spell("c", [self.inline(x, offset, width) for x in node.args])
        if node.op == "slice" and node.args[0] in self.virtual:
            return self.inline(node.args[0], offset + node.attrs[0], width)
        p = self.where(i)
        if not (p.literal or p.scalar) and offset != Size.of(0):
            p = Place(f"{p.ptr} + {c_size(offset)}", p.row)
        return self.element(p, width)

    def compute(self, i: int) -> None:
        """A value that is not elementwise: a view, a concatenation, a product, x (x) h."""
        g, node = self.g, self.g.nodes[i]
        op = node.op
        self.comment(node)
        width = self._width(i)
        if op == "slice" and not self._owns(i):
            src = self.where(node.args[0])
            self.place[i] = Place(f"{src.ptr} + {c_size(node.attrs[0])}", src.row, not node.type.shape)
            return
        if op == "reshape":
            raise Unsupported(f"{op} inside the recurrence (spec line {node.line})")
        # A product's weight is handed in laid out for the loop (self.weights), not read in place.
        absorbed = self.absorbed.get(i, set())
        args = [None if a in absorbed else self.where(a) for a in node.args[op in ("matvec", "matvec_t"):]]
        args = [None] + args if op in ("matvec", "matvec_t") else args
        out = self.place[i] if i in self.place else self.target(i)
        self.place[i] = out
        # Elementwise ops never come here: write() hands them to group(), one loop per width.
        if op == "concat":
            column = Size.of(0)
            for a, p in zip(node.args, args):
                part = c_size(g.nodes[a].type.shape[0])
                if a not in self.absorbed.get(i, ()):
                    dest = Place(f"{out.ptr} + {c_size(column)}", out.row)
                    self.elementwise(dest, part, self.element(p, part))
                column = column + g.nodes[a].type.shape[0]
        elif op in ("outer", "outer_vjp_a", "outer_vjp_b"):
            self.outer(i, args, out)
        elif op in ("softmax", "softmax_vjp"):
            self.softmax(i, args, out)
        elif op in ROW_REDUCTIONS:
            self.reduce_row(i, args[0], out)
        elif op in ("matvec", "matvec_t"):
            vec = args[1]
            if vec.row == "0" or vec.literal:  # BLAS wants rows at least K apart; schedule() hoists these
                raise Unsupported(f"a product of a vector shared by every example in the loop (spec line {node.line})")
            k = c_size(g.nodes[node.args[1]].type.shape[0])
            weight = self.arg(self.weights[i], const=True)
            if weight not in self.packs:  # MKL's packing of it, made before the loop (see write())
                self.packs[weight] = (self.cname(f"{self.weights[i]}_packed"), k, width)
            packed = self.packs[weight][0]
            # This thread's rows of the batch, or its columns of the product for every row (see write()).
            self.line("if (cols) {")
            self.line("    #pragma omp barrier")
            self.line(f"    sp_gemm_cols(B, {k}, {width}, {vec.ptr}, {vec.row}, {weight}, {packed}, {out.ptr}, "
                      f"{out.row});")
            self.line("    #pragma omp barrier")
            self.line("} else {")
            self.line(f"    sp_gemm(r1 - r0, {k}, {width}, {vec.ptr} + r0 * {vec.row}, {vec.row}, {weight}, {packed}, "
                      f"{out.ptr} + r0 * {out.row}, {out.row});")
            self.line("}")
        else:
            raise Unsupported(f"{op} inside the recurrence (spec line {node.line})")
        self.also_kept(i, out)

    def write(self) -> LoopSource:
        g, s = self.g, self.s
        self.todo = [i for i, region in enumerate(s.region)
                     if (region == "loop" and g.nodes[i].op != "carry") or i in self.fused]  # fused: see emit_scan
        self._find_virtual()
        order = self.fusion_order(self.todo)
        k = 0
        while k < len(order):
            i = order[k]
            if self._kind(i) == "virtual":
                k += 1
                continue
            if self._kind(i) != "ew":
                self.compute(i)
                k += 1
                continue
            run = [i]
            while k + len(run) < len(order) and self._kind(order[k + len(run)]) == "ew" \
                    and self._width(order[k + len(run)]) == self._width(i):
                run.append(order[k + len(run)])
            self.group(run)
            k += len(run)
        # A state whose next value is made outside the loop (h' = x, h' = c) is copied each step,
        # unless the host fills its buffer (schedule.hoist_delays).
        filled = filled_outside(s)
        for name, _, nxt in g.carries:
            if (s.region[nxt] != "loop" or g.nodes[nxt].op == "carry") and name not in filled:
                width = c_size(g.nodes[nxt].type.shape[0])
                src = self.where(nxt)
                buf = self.arg(self.host.carry_buf[name], const=False)
                dest = Place(f"{buf} + {self._carry_rows(name, False)} * {width}", width)
                self.elementwise(dest, width, self.element(src, width))
        head = [f"void {self.fn}(long T, long B, int train, int threads, int cols, int packed, float *const *arg, "
                "const long *row) {"]
        if self.host.wrapped:  # see HostNames.wrapped
            wrap = "2" if self.reverse else "train ? T + 1 : 2"
            head.append(f"    const long wrap = {wrap};  /* blocks of the states only this loop reads */")
        head += self.decls
        widths = " + ".join(c_size(w) for w in self.scratch) or "0"
        head.append(f"    float *scratch = arg[{len(self.args)}];  /* B * ({widths}) floats */")
        steps = "for (long t = T - 1; t >= 0; t--) {" if self.reverse else "for (long t = 0; t < T; t++) {"
        # No example reads another's within the loop (sums over the batch come after it), so the
        # threads split the batch and each runs every step on its own rows, with no barrier
        # between steps; a thread's products are OpenBLAS calls on one thread. (`threads == 1`:
        # the whole batch on one, with the wide elementwise loops shared instead; 0: no OpenMP
        # region at all, in a forked child, where GCC's OpenMP would wait for its parent's threads.)
        split = ["    #pragma omp parallel num_threads(threads > 1 ? threads : 1) if (threads > 1)", "    {",
                 "        const long r0 = B * sp_thread() / sp_threads(), r1 = B * (sp_thread() + 1) / sp_threads();"]
        # `packed`: the runtime chose MKL for a step's products (c_runtime.blas_choice). Each thread
        # packs its share of each weight once, for all steps: all of it for its rows, or its columns.
        if self.packs:
            split.append("        const int mkl_before = sp_mkl_one_thread(packed);")
        for weight, (name, k, width) in self.packs.items():
            split.append(f"        float *{name} = packed ? sp_pack(cols, cols ? B : r1 - r0, {k}, {width}, {weight}) "
                         ": NULL;")
        split.append("        " + steps)
        after = [f"        free({name});" for name, _, _ in self.packs.values()]
        after += ["        sp_mkl_restore(packed, mkl_before);"] if self.packs else []
        text = head + ["    (void)train;", "    (void)cols;", "    (void)packed;"] \
            + ([] if self.view_rows else ["    (void)row;"]) + split \
            + ["    " + line for line in self.body] + ["        }", *after, "    }", "}"]
        scratch = f"B * ({' + '.join(f'({w})' for w in self.scratch)})" if self.scratch else "0"
        views = [k for k, host_expr in enumerate(self.args) if host_expr in self.view_rows]
        return LoopSource(self.fn, text, list(self.args), scratch, views)


def emit_scan(w: Writer, c_out: Writer, host: Host, fn: str, carry_init: list[str], guard: frozenset[int],
              taken: set[str], dims: tuple[str, ...], keep: set[int]) -> None:
    """The body of one pass: torch before the loop, one call of the C loop, torch after it."""
    s, g = host.s, host.s.graph
    cfn = f"specc_{fn}"
    if not _C_IDENT.match(cfn):
        raise Unsupported(f"cell name {fn!r} is not usable in C")
    products = [f"{g.nodes[node.args[1]].type.shape[0]} * {node.type.shape[0]}" for node in
                (g.nodes[i] for i in s.nodes_in("loop")) if node.op in ("matvec", "matvec_t")]
    w.line(f"rt_c.pass_threads(B, B * ({' + '.join(products)}))  # the batch split among threads, or each product's columns"
           if products else "rt_c.pass_threads(B, 0)  # no product in the loop: the batch split among threads")
    # Elementwise input-only values that only the loop reads are computed in it, at step t, as the
    # Triton kernels do. The loop has one stage, so nothing else of the Triton plan applies.
    fused = fused_into_loop(s, keep)
    split = _reduced_by_parts(s, host, guard)
    sunk = _sunk_into_loop(s, host)
    columns, joined = _concatenated_after(s, host, guard)
    for c in joined:
        total = str(g.nodes[c].type.shape[0])
        w.line(f"{host.names.names[c]} = {host.empty}((rows, {total}), device=dev, dtype=dtype)")
    # The backward pass's carried gradients: only the last block (the initial states' gradients)
    # is read after the loop, unless something after it reads them all.
    if host.reverse:
        host.names.wrapped = wrapped_states(s, frozenset(fused) | frozenset(sunk))
        if host.names.wrapped:
            w.line("wrap = 2  # carried gradients only the loop reads: two blocks used in turn")
    emit_buffers(w, host, carry_init, guard, fused)
    for i, (whole, _, column) in columns.items():
        stop = column + g.nodes[i].type.shape[0]
        host.names.seq[i] = host.names.namer(f"{host.names.names[i]}_seq")
        w.line(f"{host.names.seq[i]} = {whole}[:, {column}:{stop}]")
    namer = Namer(taken)
    weights: dict[int, str] = {}
    laid_out: dict[tuple[int, str], str] = {}
    for i in s.nodes_in("loop"):
        node = g.nodes[i]
        if node.op in ("matvec", "matvec_t"):
            key = (node.args[0], node.op)
            if key not in laid_out:
                src = host.ref(node.args[0])
                # The loop's products read the weight as (K, N) rows: W.T for W @ h, W for W^T @ g.
                if node.op == "matvec":
                    laid_out[key] = namer(f"{src}_T")
                    w.line(f"{laid_out[key]} = {src}.T.contiguous()")
                else:
                    laid_out[key] = namer(f"{src}_rows")
                    w.line(f"{laid_out[key]} = {src}.contiguous()")
            weights[i] = laid_out[key]
    loop = CLoop(s, host.names, host.reverse, guard, cfn, host.source, weights, fused | set(sunk), columns,
                 host.forward).write()
    c_out.lines.extend(["", *loop.text])
    w.comment("The time loop, " + ("from the last step to the first, " if host.reverse else "")
              + f"in C: {cfn} in C_SOURCE.")
    views = f", views={tuple(loop.views)}" if loop.views else ""
    w.line(f"rt_c.run(c_lib, {cfn!r}, T, B, train, [{', '.join(loop.args)}], {loop.scratch}{views})")
    for i in sunk:
        w.line(f"{host.names.names[i]} = {host.names.seq[i]}")
    if split:
        w.comment("Sums over time and batch of a concatenation the loop did not keep, part by part.")
    for i in split:
        node = g.nodes[i]
        parts = [host.ref(p) for p in g.nodes[node.args[0]].args]
        if node.op == "sum_rows":
            w.line(f"{host.names.names[i]} = torch.cat([{', '.join(f'{p}.sum(0)' for p in parts)}])")
        else:
            v = host.ref(node.args[1])
            w.line(f"{host.names.names[i]} = torch.cat([{', '.join(f'rt_c.matmul(c_lib, {p}.T, {v})' for p in parts)}])")
    emit_after(w, host, frozenset(joined) | frozenset(split) | frozenset(sunk))


def _sunk_into_loop(s: Schedule, host: Host) -> list[int]:
    """The halves of a second-order product's gradient that nothing in the loop needs (d_x) are
    made in the loop anyway, step by step: after it, they would need the (T * B, I * H) gradient of
    x (x) h kept for every step, where in it a (B, I * H) block a step is enough."""
    g, names = s.graph, host.names
    users = g.users()
    late = filled_after(s)
    sunk = [i for i in s.nodes_in("post") if g.nodes[i].op in ("outer_vjp_a", "outer_vjp_b")
            and all(s.region[a] in ("loop", "pre", "const") and a not in late for a in g.nodes[i].args)]
    for i in sunk:
        names.seq[i] = names.namer(f"{names.names[i]}_seq")
    for big in {g.nodes[i].args[0] for i in sunk}:
        if big in names.seq and s.region[big] == "loop" and all(u in sunk or s.region[u] == "loop"
                                                                 for u in users[big]):
            del names.seq[big]
    return sunk


def _reduced_by_parts(s: Schedule, host: Host, guard: frozenset[int]) -> list[int]:
    """A concatenation the loop makes for a product (a GRU's gate gradients, for W_hh^T @ d) and
    that only weight gradients read after the loop is not kept for every step: its parts are (most
    of them already are, for other uses), and each gradient is summed part by part. The GRU keeps
    one (T * B, H) block instead of a (T * B, 3H) one that repeated two of its parts."""
    g, names = s.graph, host.names
    users = g.users()
    split: list[int] = []
    for c in sorted(names.seq):
        node = g.nodes[c]
        after = [u for u in users[c] if s.region[u] != "loop"]
        if (node.op != "concat" or s.region[c] != "loop" or c in guard or not after
                or any(c == nxt for _, _, nxt in g.carries)
                or any(s.region[p] != "loop" or g.nodes[p].op == "carry" for p in node.args)
                or not all(s.region[u] == "reduce" and (g.nodes[u].op == "sum_rows" or (
                    g.nodes[u].op == "outer_sum" and g.nodes[u].args[0] == c and g.nodes[u].args[1] != c
                    and s.region[g.nodes[u].args[1]] in ("loop", "pre", "const"))) for u in after)):
            continue
        del names.seq[c]
        for p in node.args:
            if p not in names.seq:
                names.seq[p] = names.namer(f"{names.names[p]}_seq")
        split += after
    return split


def _concatenated_after(s: Schedule, host: Host, guard: frozenset[int]):
    """Concatenations after the loop of values the loop keeps (a GRU's gate gradients, joined for
    d_W_ih): the loop writes each part into its columns of the whole, which is then not copied
    together, and the parts need no buffers of their own."""
    g, names = s.graph, host.names
    columns: dict[int, tuple[str, Size, Size]] = {}
    joined = []
    for c in s.nodes_in("post"):
        node = g.nodes[c]
        parts = node.args
        if (node.op != "concat" or not node.type.batched or len(set(parts)) != len(parts)
                or any(p in columns or p not in names.seq or p in guard or s.region[p] != "loop"
                       or any(p == nxt for _, _, nxt in g.carries) for p in parts)):
            continue
        column = Size.of(0)
        for p in parts:
            columns[p] = (names.names[c], node.type.shape[0], column)
            del names.seq[p]
            column = column + g.nodes[p].type.shape[0]
        joined.append(c)
    return columns, joined


def finish(w: Writer, c_text: Writer, body: Writer) -> None:
    w.line("from specc.backends import c_runtime as rt_c  # noqa: E402")
    w.line("")
    w.comment("The time loops, compiled on first use for the dimensions of a module (see rt_c.PRELUDE).")
    text = "\n".join(c_text.lines).strip("\n") + "\n"
    if '"""' in text or "\\" in text:
        w.line(f"C_SOURCE = {text!r}")
    else:
        w.line('C_SOURCE = """\\')
        w.lines.extend(text.rstrip("\n").split("\n"))
        w.line('"""')
    w.line("")
    w.line("")
    w.lines.extend(body.lines)


def c_spell(node: Node, a: list[str], types: list) -> str:
    """The host's ops as torch spells them (host.torch_spell), but the products over all steps (W @ x,
    W^T @ g, the weight gradients g^T @ x) by the OpenBLAS the loop calls (rt_c.matmul, which says
    why not torch's)."""
    if node.op == "matvec" and node.type.batched and not types[0].batched:
        return f"rt_c.matmul(c_lib, {a[1]}, {a[0]}.T)"
    if node.op == "matvec_t" and node.type.batched and not types[0].batched:
        return f"rt_c.matmul(c_lib, {a[1]}, {a[0]})"
    if node.op == "outer_sum" and types[0].batched and types[1].batched:
        return f"rt_c.matmul(c_lib, {a[0]}.T, {a[1]})"
    if node.op == "contract_sum":
        return f"rt_c.contract_sum(c_lib, {', '.join(a)})"
    if node.op in ACTIVATIONS and not node.type.batched and node.type.shape == ():
        # Of a number made of constants alone (tanh(0.5)), which the host holds as a Python float
        # and torch's functions refuse; the loop has it as a C literal (c_constant).
        return torch_spell(node, [f"torch.as_tensor({a[0]}, dtype=dtype)"], types)
    return torch_spell(node, a, types)


TARGET = LoopTarget(
    "c", emit_scan, finish, c_spell,
    ("forward, with the time loop as one call of compiled C (C_SOURCE); float32 CPU tensors.",
     "backward, with the time loop as one call of compiled C (C_SOURCE)."),
    reserved=frozenset({"c_lib", "rt_c"}), extra_args=("c_lib",),
    title="--- C backend: the time loop as one compiled C function per pass, the rest in torch ---",
    preamble=lambda w, code: w.line("import torch  # the host code around the C loops (also where the Triton part is missing)"),
    forward_schedule=lambda s, saved: sink_pre(sink_elementwise(s, saved), saved),
    backward_schedule=lambda s: sink_pre(sink_elementwise(s)),
    # QRNN's V @ xp a step, in cache, beat one product over the sequence and the (T * B, 3H) passes
    # over memory around it: 527 against 718 ms forward + backward at 4096 x 8 x 256, 78 against 124
    # at 1024 x 8 x 256 (2 Zen 5 cores). The NumPy backend, which makes such values a chunk of steps
    # at a time, gains from it (917 -> 484 ms), as Triton does (the loop becomes a scan).
    fill_delays=False, empty="rt_c.empty")
# Every name the C part of a generated module uses for itself; check.py keeps spec names off them.
GENERATED_NAMES = HOST_NAMES | TARGET.reserved | {"forward_c", "backward_c", "C_SOURCE", "C_UNSUPPORTED"}
