"""Backend: scheduled step IR -> Triton kernels for the time loop, torch for everything else.

What runs outside the time loop (the hoisted input products, the output layer, the weight
gradients) is a few large tensor operations, so it is spelled in torch and runs as cuBLAS GEMMs.
The loop body becomes fused kernels, one launch per step each:

* A kernel computes a tile of BLOCK_B examples x BLOCK_F features of the values it stores. Each
  value is computed where it is needed, at the feature offset it is needed at ("demand"): the
  LSTM's gate i is rows [0, H) of W_hh @ h, f rows [H, 2H), and so on, so one program computes
  the four gate pre-activations for its features, applies every elementwise op in registers and
  writes only h', c' and what backward keeps. No gate activation goes to memory and back.
* A matrix product needs its whole vector operand. When that operand is itself made inside the
  step (U @ (r * h) in Cho's GRU, W_hh^T @ dgates in every backward step), the operand is stored
  and the product runs in the next "stage", a second kernel launched after the first. A softmax, and
  its gradient, need a whole row of their operand (its maximum and sum) and are staged the same way.
* Kernels launch once per step and stage instead of one persistent kernel looping over time: a
  step needs every feature of the previous state, which would need a grid-wide barrier between
  steps; Triton has none, and spinning on global flags is fragile. Measured on an H200
  (bench/results/gpu-2026-11-26.md): replaying a whole pass as a CUDA graph, i.e. without the
  CPU's launch work, saves 3-10% at the fastrnns sizes, so launches are not what costs.
* The tile depends on the batch (`tiles()` in the generated module, TILES overrides it): small
  batches want narrow tiles, so that a step has enough programs to fill the GPU; large ones want
  wide tiles, which load each weight fewer times. The numbers are from that table.

Everything is computed in float32; half-precision inputs are widened on the way in. Products
multiply in float32 ("ieee"), or in TF32 on tensor cores where torch is allowed to do the same
for its own matmuls (`torch.set_float32_matmul_precision("high")`).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

from ..ir import Forward, Graph, Node, suggested_names
from ..ops import ACTIVATIONS, ELEMENTS, ROW_REDUCTIONS, helper_name, helper_names
from ..scan import Affine, affine_loop
from ..schedule import Schedule, filled_outside
from ..shapes import Size
from .host import (HOST_NAMES, VIEWS, Host, HostNames, LoopTarget, Unsupported, emit_after,
                   emit_buffers, fused_into_loop, torch_spell)
from .writer import Namer, TermSpeller, Writer

# (BLOCK_B, BLOCK_F, BLOCK_K) for batches up to SMALL_BATCH and above, by product precision: the
# best of those measured at the fastrnns sizes on an H200 (bench/results/gpu-2026-11-26.md). TF32
# tiles may be wider, as tensor cores make each product cheap. tl.dot needs sides >= 16.
_TENSOR_CORES = ((16, 32, 32), (32, 64, 32))
# bf16 and fp16 (not yet measured) take tf32's, as they also run on tensor cores.
TILES_BY_PRECISION = {"ieee": ((16, 16, 32), (32, 32, 32)), "tf32": _TENSOR_CORES, "bf16": _TENSOR_CORES,
                      "fp16": _TENSOR_CORES}
SMALL_BATCH = 64

# Names the kernels, and the Triton host code around them, use for themselves.
KERNEL_NAMES = frozenset({
    "offs_b", "offs_f", "offs_k", "mask_b", "mask_f", "mask_k", "mask", "pid_b", "pid_f", "k0", "n0", "TRAIN",
    "BLOCK_B", "BLOCK_F", "BLOCK_K", "grid", "acc", "operand", "weight", "PRECISION", "precision", "TILES", "tiles",
    "dot_precision", "WIDE", "wide", "WIDE_ELEMENTS", "NUM_WARPS", "linear_scan", "affine_then", "SCAN_BLOCKS",
    "scan_t", "scan_n", "scan", "step", "widest", "persistent", "PERSISTENT", "PERSISTENT_FEATURES", "f0", "f_last",
    "k_lo", "k_hi", "k_base", "part", "f_end", "n_features", "heads", "dot", "products", "dot_weight",
    "GRID_SYNC", "TUNE", "grid_slices", "slices", "counter", "programs", "arrived", "room", "grid_sync"})


def _p(code: str) -> str:
    """A size's code, safe to multiply by."""
    return code if code.replace("*", "").replace("_", "").isalnum() else f"({code})"


def _atom(code: str) -> str:
    """A size's code, safe to divide by or take a remainder by: `j // 2*I` is (j // 2) * I."""
    return code if code.isidentifier() or code.isdigit() else f"({code})"


def _off(base: str, o: Size) -> str:
    return base if o == Size.of(0) else f"({o} + {base})"


# --- the loop, in stages -----------------------------------------------------------------------

@dataclass
class LoopPlan:
    stage: dict[int, int]  # loop node -> the kernel stage computing it
    stored: set[int]  # loop nodes written to memory (for a later stage, a kept buffer or a state)
    scratch: set[int]  # stored nodes that only a later stage of the same step reads
    n_stages: int
    fused_pre: set[int]  # elementwise values of the pre region that the kernels compute instead
    cross: set[int]  # values a later stage of the step reads: always stored, even when not training


def plan_loop(s: Schedule, keep: set[int]) -> LoopPlan:
    """`keep`: values needed after the pass (outputs, saved values), which must be in memory."""
    g = s.graph
    carried_next = {nxt for _, _, nxt in g.carries}
    fused_pre = fused_into_loop(s, keep)
    # A tile covers BLOCK_F features of the stored value it was launched for. Where one reads a
    # concatenation across the boundary of its parts (2H features of [a, b], the gradient of a
    # split read whole), no one part can be computed for it; such a concatenation is stored, and
    # what reads it runs in a later stage and loads it. Which tiles read what is known only once
    # the stages are, so the two are found together, until no tile straddles a part it computes.
    whole: set[int] = set()
    while True:
        stage, cross = _stages(s, whole)
        stored = cross | set(s.kept) | {i for i in carried_next if _in_loop(s, i)}
        straddled = _straddled(s, stage, cross, stored, fused_pre)
        if straddled <= whole:
            break
        whole |= straddled
    scratch = {i for i in cross if i not in s.kept and i not in carried_next}
    n_stages = max(stage.values(), default=0) + 1
    return LoopPlan(stage, stored, scratch, n_stages, fused_pre, cross)


def _in_loop(s: Schedule, i: int) -> bool:
    return s.region[i] == "loop" and s.graph.nodes[i].op != "carry"


def _stages(s: Schedule, whole: set[int]) -> tuple[dict[int, int], set[int]]:
    """The kernel stage of each loop value, and the values a later stage of the step reads from
    memory. `whole`: concatenations that are read across their parts, so from memory."""
    g = s.graph
    stage: dict[int, int] = {}
    cross: set[int] = set()

    def in_loop(i: int) -> bool:
        return _in_loop(s, i)

    def operand_stage(v: int) -> int:
        """The first stage that can read a product's operand v at any feature index."""
        if not in_loop(v):
            return 0
        if g.nodes[v].op == "outer":
            # The second-order operand x (x) h is never stored: each block of it is recomputed.
            return max(operand_stage(a) for a in g.nodes[v].args)
        cross.add(v)
        return stage[v] + 1

    for i in s.nodes_in("loop"):
        node = g.nodes[i]
        if node.op == "carry":
            continue
        if node.op == "reshape":
            raise Unsupported(f"{node.op} inside the recurrence (spec line {node.line})")
        if node.op in ("matvec", "matvec_t"):
            st = operand_stage(node.args[1])
        elif node.op in ("softmax", "softmax_vjp", "outer", "expand", *ROW_REDUCTIONS):
            # A row's sum runs over all its features, as a product's does over its operand's; x (x) h
            # reads its factors at any feature index (feature j of it is x[j // H] h[j % H]).
            st = max(operand_stage(a) for a in node.args)
        elif node.op in ("outer_vjp_a", "outer_vjp_b"):
            # Each output feature sums over the whole gradient operand, and reads the other at any
            # feature index: recomputed there where it can be (KernelWriter.gather), else stored.
            other = node.args[1]
            st = max(operand_stage(node.args[0]), 0 if not in_loop(other) else
                     stage[other] if _gatherable(g, s, other) else operand_stage(other))
        else:
            st = max((stage[a] + (a in whole) for a in node.args if in_loop(a)), default=0)
        stage[i] = st
    for i in stage:
        for a in g.nodes[i].args:
            if in_loop(a) and stage[a] < stage[i] and not (g.nodes[a].op == "outer" and
                                                          g.nodes[i].op in ("matvec", "matvec_t")):
                cross.add(a)
    return stage, cross


def _gatherable(g, s: Schedule, i: int, memo: dict[int, bool] | None = None) -> bool:
    """Whether KernelWriter.gather can make loop value i at any feature index from what it reads
    (elementwise ops, slices and outer products of values in memory); a softmax or a product
    cannot be. (`memo`: a value read twice, z * z, is looked at once.)"""
    memo = {} if memo is None else memo
    if i not in memo:
        node = g.nodes[i]
        memo[i] = not _in_loop(s, i) or (node.op in ELEMENTS or node.op in ("slice", "outer")) and \
            all(_gatherable(g, s, a, memo) for a in node.args)
    return memo[i]


def _straddled(s: Schedule, stage: dict[int, int], cross: set[int], stored: set[int],
               fused_pre: set[int]) -> set[int]:
    """Concatenations made in the loop that some kernel would have to compute at a tile which is
    not one of their parts: the demand walk of KernelWriter.value, on sizes alone."""
    g = s.graph
    leaves = {leaf for _, leaf, _ in g.carries}
    found: set[int] = set()
    seen: set[tuple] = set()

    def walk(i: int, offset: Size, tile: Size, st: int) -> None:
        key = (i, str(offset), str(tile), st)
        if key in seen:
            return
        seen.add(key)
        node = g.nodes[i]
        if node.op == "const" or not node.type.batched or i in leaves:
            return
        if s.region[i] == "pre":
            if node.op == "slice":
                walk(node.args[0], offset + node.attrs[0], tile, st)
            elif i in fused_pre:
                for a in node.args:
                    walk(a, offset, tile, st)
            return
        if s.region[i] != "loop" or (i in cross and stage[i] < st):
            return  # in memory
        if node.op == "slice":
            walk(node.args[0], offset + node.attrs[0], tile, st)
        elif node.op == "concat":
            at = Size.of(0)
            for a in node.args:
                size = g.nodes[a].type.shape[0]
                if at == offset and size == tile:
                    walk(a, Size.of(0), tile, st)
                    return
                at = at + size
            found.add(i)
        elif node.op in ELEMENTS or node.op in ("softmax", "softmax_vjp"):
            for a in node.args:
                walk(a, offset, tile, st)

    for i in stored:
        if i in stage:
            for part, _ in _parts(g, i, Size.of(0)):
                walk(part, Size.of(0), g.nodes[part].type.shape[0], stage[i])
    return found


def _parts(g: Graph, i: int, column: Size):
    """(value, first column) of what is stored for node i: a concatenation part by part."""
    node = g.nodes[i]
    if node.op == "concat":
        for a in node.args:
            yield from _parts(g, a, column)
            column = column + g.nodes[a].type.shape[0]
    else:
        yield i, column


def _blocks(g: Graph, w: int, forward: Graph | None) -> tuple[tuple[Size, Size, Size], int] | None:
    """((N, D, E), parts) where weight w is `parts` per-head weights stacked, each N blocks of D rows
    that read E columns: a parameter's blocks, or several (fuse_products); None for any other
    weight. A backward pass's weight is a forward value: looked up in the forward step."""
    for key, leaf in g.params if forward is not None else ():
        if leaf == w and isinstance(key, Forward):
            return _blocks(forward, key.node, None)
    node = g.nodes[w]
    parts = node.args if node.op == "concat" else (w,)
    shapes = {g.nodes[g.nodes[p].args[0]].type.shape if g.nodes[p].op == "blockdiag" else None for p in parts}
    if len(shapes) != 1 or None in shapes:
        return None
    return shapes.pop(), len(parts)


class KernelWriter:
    """Writes one kernel: a tile of the values of one stage that share a feature size."""

    def __init__(self, s: Schedule, plan: LoopPlan, host: HostNames, reverse: bool, tile: Size, stage: int,
                 source: tuple[list[str], str], namer: Namer, forward: Graph | None = None,
                 weights: dict[str, str] | None = None):
        self.s, self.g, self.plan, self.host, self.reverse = s, s.graph, plan, host, reverse
        # each product weight's host name -> its copy as the products read it (dot_weight), shared
        # by the pass's kernels
        self.weights = {} if weights is None else weights
        self.forward = forward  # a backward pass's forward step, where its saved weights were made
        self.tile, self.stage = tile, stage
        self.lines, self.file = source
        self.body = Writer()
        self.body._depth = 1
        self.namer = namer
        self.suggested = suggested_names(self.g)
        self.memo: dict[tuple[int, str], str] = {}
        self.args: dict[str, None] = {}  # tensors the kernel reads or writes, in first-use order
        self.scalars: set[str] = set()  # those of them that are numbers, passed by value
        self.uses_train = False
        self.last_line = 0

    # where a value lives in memory: (buffer, row base) for batched values
    def _home(self, i: int) -> tuple[str, str] | None:
        for name, leaf, nxt in self.g.carries:
            if i == leaf:  # the forward pass reads block t; the backward pass, block t + 1
                return self.host.carry_buf[name], self.host.carry_rows(name, self.reverse)
        region = self.s.region[i]
        if region == "pre":
            if i in self.plan.fused_pre:
                return None
            return self.host.names[i], "t * B"
        if region == "loop" and i in self.plan.cross and self.plan.stage[i] < self.stage:
            if i in self.plan.scratch:
                return self.host.seq[i], "0"
            if i in self.host.seq:
                return self.host.seq[i], "t * B"
            for name, leaf, nxt in self.g.carries:
                if i == nxt:
                    return self.host.carry_buf[name], self.host.carry_rows(name, not self.reverse)
        return None

    def _arg(self, name: str) -> str:
        self.args.setdefault(name, None)
        return name

    def _comment(self, node: Node) -> None:
        if node.line and node.line != self.last_line and node.line <= len(self.lines):
            self.body.comment(f"{self.file}:{node.line}  {self.lines[node.line - 1].strip()}")
            self.last_line = node.line

    def _emit(self, node: Node, value: str, wanted: str) -> str:
        self._comment(node)
        name = self.namer(wanted)
        self.body.line(f"{name} = {value}")
        return name

    def load(self, i: int, cols: str, cmask: str, row_axis: bool = True) -> str | None:
        """Code loading node i at feature indices `cols` (a 1-D index), or None if it is not in memory."""
        node = self.g.nodes[i]
        width = str(node.type.shape[0]) if node.type.shape else "1"
        if node.op == "const":
            v = node.attrs[0]
            return repr(v) if v >= 0 else f"({v!r})"
        if not node.type.batched:
            if self.s.region[i] not in ("const",):
                return None
            if i in self.host.numbers:
                self.scalars.add(self.host.names[i])
                return self._arg(self.host.names[i])
            ptr = self._arg(self.host.names[i])
            if node.type.shape == ():
                return f"tl.load({ptr})"
            return f"tl.load({ptr} + {cols}, mask={cmask}, other=0.0)[None, :]"
        if node.op == "slice" and self.s.region[i] == "pre":
            return None  # read through to the sliced value, which is contiguous
        home = self._home(i)
        if home is None:
            return None
        buf, row = home
        ptr = self._arg(buf)
        rows = "offs_b" if row == "0" else f"({row} + offs_b)"
        return (f"tl.load({ptr} + {rows}[:, None] * {_p(width)} + {cols}[None, :], "
                f"mask=mask_b[:, None] & {cmask}[None, :], other=0.0)")

    def value(self, i: int, offset: Size) -> str:
        """A tile of node i at feature offset `offset`: (BLOCK_B, BLOCK_F), or a scalar."""
        key = (i, str(offset))
        if key in self.memo:
            return self.memo[key]
        node = self.g.nodes[i]
        cols = _off("offs_f", offset)
        loaded = self.load(i, cols, "mask_f")
        if loaded is not None:
            out = loaded if node.op == "const" or not node.type.shape else self._emit(node, loaded, self._wanted(i, offset))
        else:
            out = self._compute(i, node, offset)
        self.memo[key] = out
        return out

    def _wanted(self, i: int, offset: Size) -> str:
        base = self.suggested[i]
        if offset != Size.of(0):
            base += "_at_" + "".join(ch for ch in str(offset) if ch.isalnum())
        return base

    def _compute(self, i: int, node: Node, offset: Size) -> str:
        op = node.op
        if op == "slice":
            return self.value(node.args[0], offset + node.attrs[0])
        if op == "concat":
            at = Size.of(0)
            for a in node.args:
                size = self.g.nodes[a].type.shape[0]
                if at == offset and size == self.tile:
                    return self.value(a, Size.of(0))
                at = at + size
            # plan_loop stages every concatenation read across its parts: reaching here is its mistake.
            if not self.reverse:
                raise Unsupported(f"a tile straddles the parts of a concatenation (spec line {node.line})")
            # In the backward pass a concatenation is the gradient of a value read in parts. Its own
            # line is that value's; the parts' gradients carry the line of the split that made them.
            line = next((self.g.nodes[a].line for a in node.args
                         if self.g.nodes[a].op != "zeros" and self.g.nodes[a].line), node.line)
            raise Unsupported(f"a tile straddles the parts of the gradient of a split, or of products stacked "
                              f"into one (spec line {line})")
        if op == "zeros":
            return "0.0"
        if op in ELEMENTS:
            args = [self.value(a, offset) for a in node.args]
            return self._emit(node, ELEMENTS[op].spell("triton", args), self._wanted(i, offset))
        if op in ("matvec", "matvec_t"):
            return self._product(i, node, offset)
        if op == "outer":
            return self._emit(node, self.gather(i, _off("offs_f", offset), "mask_f"), self._wanted(i, offset))
        if op in ("outer_vjp_a", "outer_vjp_b"):
            return self._outer_vjp(i, node, offset)
        if op in ("softmax", "softmax_vjp"):
            return self._softmax(i, node, offset)
        if op in ROW_REDUCTIONS:
            total = self._row_reduce(i, node)
            return self._emit(node, f"{total}[:, None] + tl.zeros((BLOCK_B, BLOCK_F), dtype=tl.float32)",
                              self._wanted(i, offset))
        if op == "expand":  # each row's one number (column 0 of its argument), at every column
            one = self.gather(node.args[0], "(offs_f * 0)", "mask_f")
            divisor = node.attrs[1]
            return one if divisor == Size.of(1) else self._emit(node, f"{one} / ({divisor})", self._wanted(i, offset))
        raise Unsupported(f"{op} inside the recurrence (spec line {node.line})")

    def _product(self, i: int, node: Node, offset: Size) -> str:
        self.products([(i, offset)])
        return self.memo[(i, str(offset))]

    def products(self, wanted: list[tuple[int, Size]]) -> None:
        """Matrix products (rows `offset + j` of W @ v, or of W^T @ v) into accumulators.

        Products that read the same operand share one loop over it, so the LSTM's four gate
        products load each block of h once.
        """
        groups: dict[tuple, list[tuple[int, Size]]] = {}
        for i, offset in wanted:
            if (i, str(offset)) in self.memo:
                continue
            node = self.g.nodes[i]
            w, v = node.args
            rows_w, cols_w = (str(s) for s in self.g.nodes[w].type.shape)
            extent = cols_w if node.op == "matvec" else rows_w
            groups.setdefault((v, extent), []).append((i, offset))
        b = self.body
        for (v, extent), members in groups.items():
            accs = []
            for i, offset in members:
                self._comment(self.g.nodes[i])
                acc = self.namer(self._wanted(i, offset))
                b.line(f"{acc} = tl.zeros((BLOCK_B, BLOCK_F), dtype=tl.float32)")
                accs.append(acc)
            spans = {self._span(i, offset) for i, offset in members}
            span = spans.pop() if len(spans) == 1 else None
            with contextlib.ExitStack() as loops:
                if span is None:
                    loops.enter_context(b.block(f"for k0 in range(0, {extent}, BLOCK_K):"))
                    end = extent
                else:
                    end = self._enter_span(span, loops)
                b.line("offs_k = k0 + tl.arange(0, BLOCK_K)")
                b.line(f"mask_k = offs_k < {end}")
                saved_memo, self.memo = self.memo, {}
                operand = self.gather(v, "offs_k", "mask_k")
                self.memo = saved_memo
                b.line(f"operand = tl.where(mask_b[:, None] & mask_k[None, :], {operand}, 0.0)")
                for (i, offset), acc in zip(members, accs):
                    node = self.g.nodes[i]
                    w = node.args[0]
                    cols_w = str(self.g.nodes[w].type.shape[1])
                    whole = self.host.names[w]
                    if whole not in self.weights:
                        self.weights[whole] = self.namer(f"{whole}_dot")
                    wptr = self._arg(self.weights[whole])
                    rows = _off("offs_f", offset)
                    if node.op == "matvec":  # rows offset + j of W, columns k
                        addr = f"{wptr} + {rows}[None, :] * {_p(cols_w)} + offs_k[:, None]"
                    else:  # W^T: rows k of W, columns offset + j
                        addr = f"{wptr} + offs_k[:, None] * {_p(cols_w)} + {rows}[None, :]"
                    b.line(f"weight = tl.load({addr}, mask=mask_k[:, None] & mask_f[None, :], other=0.0)")
                    b.line(f"{acc} += dot(operand, weight, PRECISION)")
            for (i, offset), acc in zip(members, accs):
                self.memo[(i, str(offset))] = acc

    def _span(self, i: int, offset: Size) -> tuple | None:
        """Where product i's weight is per-head (N blocks of D rows each reading E columns, or
        several such stacked), the columns its tile's rows read: ("rows", D, E) for W @ v, whose
        tile's rows read the columns of their own blocks; ("columns", D, E, P, parts) for W^T @ v,
        whose tile's columns are read from their blocks' rows in each of the `parts` stacked weights
        of P rows. None: every column (a dense weight, or a tile not aligned with the blocks)."""
        node = self.g.nodes[i]
        blocks = _blocks(self.g, node.args[0], self.forward)
        if blocks is None:
            return None
        (n, d, e), parts = blocks
        if node.op == "matvec":
            aligned = any(offset == n * d * k for k in range(parts)) and self.tile == n * d
            return ("rows", str(d), str(e)) if aligned else None
        aligned = offset == Size.of(0) and self.tile == n * e
        return ("columns", str(e), str(d), str(n * d), parts) if aligned else None

    def _enter_span(self, span: tuple, loops: contextlib.ExitStack) -> str:
        """Opens the loops over k0 for a per-head weight, over only the blocks that the tile's
        features (f0 to f_last) meet; returns the end of the last block, for mask_k."""
        b = self.body
        kind, d, e = span[:3]
        b.comment(f"a per-head weight: features f0 to f_last lie in blocks f0 // {d} to f_last // {d}, "
                  f"each of which reads {e} of the operand's features")
        b.line(f"f_last = tl.minimum(f_end, {self.tile}) - 1")
        b.line(f"k_lo = (f0 // {_atom(d)}) * {_p(e)}")
        b.line(f"k_hi = (f_last // {_atom(d)} + 1) * {_p(e)}")
        if kind == "rows":
            loops.enter_context(b.block("for k0 in range(k_lo, k_hi, BLOCK_K):"))
            return "k_hi"
        rows, parts = span[3], span[4]
        if parts > 1:  # stacked weights: the same blocks' rows in each
            loops.enter_context(b.block(f"for part in range({parts}):"))
            b.line(f"k_base = part * {_p(rows)}")
        else:
            b.line("k_base = 0")
        loops.enter_context(b.block("for k0 in range(k_base + k_lo, k_base + k_hi, BLOCK_K):"))
        return "k_base + k_hi"

    def demanded_products(self, roots: list[int]) -> list[tuple[int, Size]]:
        """The products that computing `roots` (at offset 0) needs, found without writing code."""
        seen: set[tuple[int, str]] = set()
        found: list[tuple[int, Size]] = []

        def walk(i: int, offset: Size) -> None:
            key = (i, str(offset))
            if key in seen:
                return
            seen.add(key)
            node = self.g.nodes[i]
            if node.op == "const" or self._in_memory(i):
                return
            if node.op == "slice":
                walk(node.args[0], offset + node.attrs[0])
            elif node.op == "concat":
                at = Size.of(0)
                for a in node.args:
                    if at == offset:
                        walk(a, Size.of(0))
                    at = at + self.g.nodes[a].type.shape[0]
            elif node.op in ("matvec", "matvec_t"):
                found.append((i, offset))
            elif node.op in ELEMENTS:
                for a in node.args:
                    walk(a, offset)

        for r in roots:
            walk(r, Size.of(0))
        return found

    def _in_memory(self, i: int) -> bool:
        node = self.g.nodes[i]
        if not node.type.batched:
            return self.s.region[i] == "const"
        if node.op == "slice" and self.s.region[i] == "pre":
            return False
        return self._home(i) is not None

    def _row_sums(self, i: int, node: Node) -> tuple[str, str]:
        """Per example, over all features, in one pass of BLOCK_K columns: for softmax(v) the
        maximum of v and the sum of exp(v - maximum) (kept up to date as the maximum grows); for
        softmax_vjp(g, y) the sum of g * y, and a second name left unused."""
        key = (i, "row sums")
        if key in self.memo:
            return self.memo[key].split(",")
        self._comment(node)
        b = self.body
        base = self._wanted(i, Size.of(0))
        extent = str(self.g.nodes[node.args[0]].type.shape[0])
        if node.op == "softmax":
            top, total = self.namer(f"{base}_max"), self.namer(f"{base}_sum")
            b.line(f"{top} = tl.full((BLOCK_B,), float(\"-inf\"), dtype=tl.float32)")
        else:
            top, total = "", self.namer(f"{base}_dot")
        b.line(f"{total} = tl.zeros((BLOCK_B,), dtype=tl.float32)")
        with b.block(f"for k0 in range(0, {extent}, BLOCK_K):"):
            b.line("offs_k = k0 + tl.arange(0, BLOCK_K)")
            b.line(f"mask_k = offs_k < {extent}")
            saved_memo, self.memo = self.memo, {}
            parts = [self.gather(a, "offs_k", "mask_k") for a in node.args]
            self.memo = saved_memo
            if node.op == "softmax":
                # Columns past the end take -inf, which exp() makes 0; recomputed values there are not.
                b.line(f"operand = tl.where(mask_k[None, :], {parts[0]}, float(\"-inf\"))")
                grown, shift = self.namer(f"{base}_max_k"), self.namer(f"{base}_shift")
                b.line(f"{grown} = tl.maximum({top}, tl.max(operand, axis=1))")
                # Rows whose columns so far are all -inf: shifting by -inf would make exp(-inf + inf) NaN.
                b.line(f"{shift} = tl.where({grown} == float(\"-inf\"), 0.0, {grown})")
                b.line(f"{total} = {total} * tl.exp({top} - {shift})"
                       f" + tl.sum(tl.exp(operand - {shift}[:, None]), axis=1)")
                b.line(f"{top} = {grown}")
            else:
                b.line(f"operand = tl.where(mask_k[None, :], {parts[0]} * {parts[1]}, 0.0)")
                b.line(f"{total} += tl.sum(operand, axis=1)")
        self.memo[key] = f"{top},{total}"
        return [top, total]

    def _row_reduce(self, i: int, node: Node) -> str:
        """sum(v) or max(v) of each example's row, in one pass of BLOCK_K columns: (BLOCK_B,)."""
        key = (i, "row reduce")
        if key in self.memo:
            return self.memo[key]
        self._comment(node)
        b = self.body
        total = self.namer(self._wanted(i, Size.of(0)))
        extent = str(self.g.nodes[node.args[0]].type.shape[0])
        summed = node.op == "rowsum"
        lowest = 'float("-inf")'
        b.line(f"{total} = " + ("tl.zeros((BLOCK_B,), dtype=tl.float32)" if summed
                                else f"tl.full((BLOCK_B,), {lowest}, dtype=tl.float32)"))
        with b.block(f"for k0 in range(0, {extent}, BLOCK_K):"):
            b.line("offs_k = k0 + tl.arange(0, BLOCK_K)")
            b.line(f"mask_k = offs_k < {extent}")
            saved_memo, self.memo = self.memo, {}
            part = self.gather(node.args[0], "offs_k", "mask_k")
            self.memo = saved_memo
            if summed:
                b.line(f"{total} += tl.sum(tl.where(mask_k[None, :], {part}, 0.0), axis=1)")
            else:
                b.line(f"{total} = tl.maximum({total}, tl.max(tl.where(mask_k[None, :], {part}, {lowest}), axis=1))")
        self.memo[key] = total
        return total

    def _softmax(self, i: int, node: Node, offset: Size) -> str:
        top, total = self._row_sums(i, node)
        if node.op == "softmax":
            v = self.value(node.args[0], offset)
            return self._emit(node, f"tl.exp({v} - {top}[:, None]) / {total}[:, None]", self._wanted(i, offset))
        g, y = (self.value(a, offset) for a in node.args)
        return self._emit(node, f"{y} * ({g} - {total}[:, None])", self._wanted(i, offset))

    def _outer_vjp(self, i: int, node: Node, offset: Size) -> str:
        # outer_vjp_a: out[n] = sum_k G[n*K + k] b[k]; outer_vjp_b: out[k] = sum_n G[n*K + k] a[n]
        g_node, other = node.args
        n, k = (str(s) for s in node.attrs)
        acc = self.namer(self._wanted(i, offset))
        self._comment(node)
        b = self.body
        b.line(f"{acc} = tl.zeros((BLOCK_B, BLOCK_F), dtype=tl.float32)")
        loop_extent = k if node.op == "outer_vjp_a" else n
        with b.block(f"for n0 in range({loop_extent}):"):
            idx = _off("offs_f", offset)
            cols = f"({idx} * {_p(k)} + n0)" if node.op == "outer_vjp_a" else f"(n0 * {_p(k)} + {idx})"
            saved_memo, self.memo = self.memo, {}
            gv = self.load(g_node, cols, "mask_f")
            if gv is None:
                raise Unsupported("the gradient of an outer product must be stored first")
            scalar_idx = "(n0 + offs_f * 0)"
            ov = self.gather(other, scalar_idx, "mask_f")
            self.memo = saved_memo
            b.line(f"{acc} += {gv} * {ov}")
        return acc

    def gather(self, i: int, cols: str, cmask: str) -> str:
        """Node i at arbitrary feature indices `cols` (a product's operand), recomputed if need be."""
        key = (i, "gather:" + cols)
        if key in self.memo:
            return self.memo[key]
        node = self.g.nodes[i]
        loaded = self.load(i, cols, cmask)
        if loaded is not None:
            out = loaded
        elif node.op == "slice":
            out = self.gather(node.args[0], f"({cols} + {node.attrs[0]})", cmask)
        elif node.op == "outer":
            a, bb = node.args
            kk = str(self.g.nodes[bb].type.shape[0])
            left = self.gather(a, f"({cols} // {_atom(kk)})", cmask)
            right = self.gather(bb, f"({cols} % {_atom(kk)})", cmask)
            out = f"({left} * {right})"
        elif node.op in ELEMENTS:
            out = ELEMENTS[node.op].spell("triton", [self.gather(a, cols, cmask) for a in node.args])
        else:
            raise Unsupported(f"cannot read {node.op} at arbitrary features (spec line {node.line})")
        if node.op != "const" and node.type.shape:
            out = self._emit(node, out, self._wanted(i, Size.of(0)) + "_k")
        self.memo[key] = out
        return out

    def store(self, i: int, buf: str, row: str, width: str, column: Size, guarded: bool) -> None:
        value = self.value(i, Size.of(0))
        ptr = self._arg(buf)
        cols = _off("offs_f", column)
        rows = "offs_b" if row == "0" else f"({row} + offs_b)"
        stmt = (f"tl.store({ptr} + {rows}[:, None] * {_p(width)} + {cols}[None, :], {value}, "
                f"mask=mask_b[:, None] & mask_f[None, :])")
        if guarded:
            self.uses_train = True
            with self.body.block("if TRAIN:"):
                self.body.line(stmt)
        else:
            self.body.line(stmt)


@dataclass
class StoreTask:
    node: int
    buf: str
    row: str
    width: str
    column: Size
    guarded: bool


def _store_tasks(s: Schedule, plan: LoopPlan, host: HostNames, reverse: bool, stage: int,
                 guard: frozenset[int]) -> list[StoreTask]:
    g = s.graph
    tasks: list[StoreTask] = []

    for i in sorted(plan.stored):
        if plan.stage.get(i, 0) != stage:
            continue
        width = str(g.nodes[i].type.shape[0])
        targets = []
        if i in plan.scratch:
            targets.append((host.seq[i], "0", False))
        elif i in host.seq:
            targets.append((host.seq[i], "t * B", i in guard and i not in plan.cross))
        for name, _, nxt in g.carries:
            if nxt == i:
                targets.append((host.carry_buf[name], host.carry_rows(name, not reverse), False))
        for buf, row, guarded in targets:
            for part, column in _parts(g, i, Size.of(0)):
                tasks.append(StoreTask(part, buf, row, width, column, guarded))
    if stage == plan.n_stages - 1:
        # A state whose next value is made outside the loop (h' = x, h' = c) is copied here,
        # unless the host fills its buffer (schedule.hoist_delays).
        filled = filled_outside(s)
        for name, _, nxt in g.carries:
            if (s.region[nxt] != "loop" or g.nodes[nxt].op == "carry") and name not in filled:
                width = str(g.nodes[nxt].type.shape[0])
                tasks.append(StoreTask(nxt, host.carry_buf[name], host.carry_rows(name, not reverse), width,
                                       Size.of(0), False))
    return tasks


def _emit_scan(w: Writer, kernels_out: Writer, host: Host, fn: str, carry_init: list[str], guard: frozenset[int],
               taken: set[str], dims: tuple[str, ...], keep: set[int]) -> None:
    """The body of one pass: torch before the loop, kernel launches in it, torch after it. Where
    every state is a linear recurrence (scan.affine_loop), the loop is a parallel scan instead,
    unless the caller asks for the sequential loop (scan=False: to compare, or to rule it out)."""
    forms = affine_loop(host.s)
    if forms is None:
        _emit_steps(w, kernels_out, host, fn, carry_init, guard, taken, dims, keep)
        return
    with w.block("if scan:"):
        _emit_linear_scan(w, kernels_out, host, carry_init, guard, forms)
    with w.block("else:"):
        _emit_steps(w, kernels_out, host, fn, carry_init, guard, taken, dims, keep)


def _emit_linear_scan(w: Writer, kernels_out: Writer, host: Host, carry_init: list[str], guard: frozenset[int],
                      forms: dict[int, Affine]) -> None:
    """The loop as one scan per state over (a_t, b_t), made before it as torch operations; the loop
    values kept for every step then follow from the states, a * s + b, all steps at once."""
    s, g, names = host.s, host.s.graph, host.names
    if LINEAR_SCAN not in kernels_out.lines:
        kernels_out.lines.extend(["", ""] + LINEAR_SCAN_KERNEL.split("\n"))
    w.comment("Every state is a linear recurrence s' = a * s + b, with a and b made before the loop: each")
    w.comment("state's sequence is one parallel scan over time, with no loop over steps here.")
    if names.wrapped:
        w.line("wrap = T + 1  # the scan writes every step's state")
    emit_buffers(w, host, carry_init, guard, set(), kept=False)
    kept = names.seq
    spell = TermSpeller(w, host.ref, host.names.namer, lambda i: g.nodes[i].type.batched,
                        lambda i: g.nodes[i].op in VIEWS, "torch.full((rows, {size}), {value}, device=dev, dtype=dtype)",
                        "{code}.expand(rows, {size}).contiguous()", "{code}.contiguous()")
    w.comment("Blocks no larger than the sequence and the state: lanes past them would be scanned for nothing.")
    w.line("scan_t = min(SCAN_BLOCKS[0], triton.next_power_of_2(T))")
    filled = filled_outside(s)
    for name, leaf, nxt in g.carries:
        if name in filled:
            continue  # filled by the host, before the scan or after it
        size = g.nodes[leaf].type.shape[0]
        a = spell.rows(forms[nxt].a, size, f"a_of_{name}")
        b = spell.rows(forms[nxt].b, size, f"b_of_{name}")
        n = f"B * {_p(str(size))}"
        w.line(f"scan_n = min(SCAN_BLOCKS[1], triton.next_power_of_2({n}))")
        w.line(f"linear_scan[(triton.cdiv({n}, scan_n),)]({a}, {b}, {names.carry_buf[name]}, T, {n}, "
               f"REVERSE={host.reverse}, WIDE=(T + 1) * {n} >= WIDE_ELEMENTS, BLOCK_T=scan_t, BLOCK_N=scan_n, "
               f"num_warps=NUM_WARPS)")
    if kept:
        w.comment("The loop values kept for every step, from the states: a * s + b.")
    # Values only backward reads (made when training) last: a part they share with another is then
    # made outside `if train:` first.
    for i, buf in sorted(kept.items(), key=lambda item: item[0] in guard):
        if i in guard:
            w.line(f"{buf} = None")
        with w.block("if train:") if i in guard else contextlib.nullcontext():
            code = spell.rows(forms[i].term(), g.nodes[i].type.shape[0], buf, exact=True)
            if code != buf:
                w.line(f"{buf} = {code}")
    emit_after(w, host)


LINEAR_SCAN = "def linear_scan(a, b, s, T, N, REVERSE: tl.constexpr, WIDE: tl.constexpr, BLOCK_T: tl.constexpr,"
LINEAR_SCAN_KERNEL = \
    """@triton.jit
def affine_then(a1, b1, a2, b2):
    # Step (a1, b1) then step (a2, b2): s -> a2 * (a1 * s + b1) + b2. Associative, so a block of
    # steps is combined in log-depth.
    return a1 * a2, a2 * b1 + b2


@triton.jit
""" + LINEAR_SCAN + """
                BLOCK_N: tl.constexpr):
    \"\"\"s_{t+1} = a_t * s_t + b_t for t = 0 .. T-1 (REVERSE: s_t = a_t * s_{t+1} + b_t, from t = T-1
    down), over N values a step: a and b are (T, N), s is (T + 1, N) and holds the first state.
    A program owns BLOCK_N values and scans BLOCK_T steps at a time, carrying the last state over.\"\"\"
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    lanes = tl.arange(0, BLOCK_T)
    if WIDE:  # 2**31 elements or more: int32 offsets would wrap around
        offs_n = offs_n.to(tl.int64)
        lanes = lanes.to(tl.int64)
    mask_n = offs_n < N
    state = tl.load(s + (T if REVERSE else 0) * N + offs_n, mask=mask_n, other=0.0)
    for t0 in range(0, T, BLOCK_T):
        steps = t0 + lanes
        mask = (steps < T)[:, None] & mask_n[None, :]
        if REVERSE:
            steps = T - 1 - steps
        at = steps[:, None] * N + offs_n[None, :]
        # Steps past the end are (1, 0), which leave the state as it is.
        a_block = tl.load(a + at, mask=mask, other=1.0)
        b_block = tl.load(b + at, mask=mask, other=0.0)
        a_run, b_run = tl.associative_scan((a_block, b_block), axis=0, combine_fn=affine_then)
        states = a_run * state[None, :] + b_run
        written = steps + (0 if REVERSE else 1)
        tl.store(s + written[:, None] * N + offs_n[None, :], states, mask=mask)
        state = tl.sum(tl.where((lanes == BLOCK_T - 1)[:, None], states, 0.0), axis=0)"""


def _emit_steps(w: Writer, kernels_out: Writer, host: Host, fn: str, carry_init: list[str], guard: frozenset[int],
                taken: set[str], dims: tuple[str, ...], keep: set[int]) -> None:
    """The loop as fused kernels launched once per step (and stage)."""
    s, g, names = host.s, host.s.graph, host.names
    plan = plan_loop(s, keep)
    for i in sorted(plan.stored):
        if i in plan.scratch:
            names.seq.setdefault(i, f"{names.names[i]}_scratch")
    emit_buffers(w, host, carry_init, guard, plan.fused_pre, plan.scratch, plan.cross)

    launches = []
    every_tensor: dict[str, None] = {}
    made: list[tuple[int, Size, KernelWriter]] = []  # every kernel's (stage, tile, body), for the persistent one
    # One namer for all the pass's kernels: the persistent kernel runs their bodies in one loop, where
    # a name two bodies gave values of different shapes would be one variable (Triton refuses a
    # loop-carried value whose shape changes).
    namer = Namer(taken | HOST_NAMES | KERNEL_NAMES)
    weights: dict[str, str] = {}
    forward = host.forward.graph if host.forward else None  # where a backward pass's saved weights were made
    for stage in range(plan.n_stages):
        tasks = _store_tasks(s, plan, names, host.reverse, stage, guard)
        by_tile: dict[str, list[StoreTask]] = {}
        for task in tasks:
            by_tile.setdefault(str(g.nodes[task.node].type.shape[0]), []).append(task)
        for tile_key, group in by_tile.items():
            tile = g.nodes[group[0].node].type.shape[0]
            kname = f"{fn}_step{stage}" + (f"_{len(launches)}" if len(by_tile) > 1 else "")
            kw = KernelWriter(s, plan, names, host.reverse, tile, stage, host.source, namer, forward, weights)
            kw.products(kw.demanded_products([task.node for task in group]))
            for task in group:
                kw.store(task.node, task.buf, task.row, task.width, task.column, task.guarded)
            tensors = list(kw.args)
            params = tensors + ["t", "B", *dims] + (["wrap"] if names.wrapped else [])
            consts, extra = _constants([kw])
            every_tensor.update(dict.fromkeys(t for t in tensors if t not in kw.scalars))
            kernels_out.line("")
            kernels_out.line("")
            # t changes every step: specialising on it would compile the kernel again for t = 1.
            kernels_out.line('@triton.jit(do_not_specialize=["t"])')
            kernels_out.line(f"def {kname}({', '.join(params + consts)}):")
            # Named as the body names them: the buffers it stores into.
            kernels_out.line(f'    """Stage {stage} of a step: {tile} features a row, stored into '
                             + ", ".join(dict.fromkeys(t.buf for t in group)) + '."""')
            _program_offsets(kernels_out, persistent=False)
            kernels_out.line(f"    mask_f = offs_f < {tile}")
            kernels_out.lines.extend(kw.body.lines)
            grid = f"(triton.cdiv(B, BLOCK_B), triton.cdiv({tile}, BLOCK_F))"
            launches.append(f"{kname}[{grid}]({', '.join(params + extra)})")
            made.append((stage, tile, kw))
    w.line("precision = dot_precision(dev, products)")
    for whole, copy in weights.items():
        w.line(f"{copy} = dot_weight({whole}, precision)")
    w.line("BLOCK_B, BLOCK_F, BLOCK_K = tiles(B, precision)")
    if every_tensor:
        w.line(f"wide = max(a.numel() for a in ({', '.join(every_tensor)},) if a is not None) >= WIDE_ELEMENTS")
    else:
        w.line("wide = False")
    if launches:  # none where the host fills every state's buffer (schedule.hoist_delays)
        launch = _emit_persistent(kernels_out, made, f"{fn}_steps", host.reverse, dims, names.wrapped)
        tiles_ = list(dict.fromkeys(str(tile) for _, tile, _ in made))
        w.line(f"widest = {tiles_[0] if len(tiles_) == 1 else f'max({chr(44).join(tiles_)})'}")
        heads = _heads(s, plan, [tile for _, tile, _ in made], forward)
        if heads is None:
            w.line("heads = 1")
        else:
            w.line(f"heads = {heads}  # independent heads: each reads only its own features, step after step")
        with w.block("if persistent(B, widest // heads):"):
            w.line("slices, grid_sync = heads, False")
        with w.block("else:"):
            w.line("slices, grid_sync = grid_slices(B, widest, BLOCK_B, dev), True")
        with w.block("if slices:"):
            w.comment("The whole time loop in one launch: a program keeps its examples' features (every one, one "
                      "head's, or a slice of them, with a barrier across the grid), step after step.")
            w.line("n_features = triton.cdiv(widest, slices)")
            w.line("BLOCK_F = max(16, triton.next_power_of_2(n_features))")
            w.line("counter, programs = torch.zeros(1, dtype=torch.int64, device=dev), triton.cdiv(B, BLOCK_B) * slices")
            w.line(launch)
        with w.block("else:"):
            w.comment("The time loop: one launch of each fused kernel per step." if not host.reverse else
                      "The time loop, from the last step to the first: one launch of each fused kernel per step.")
            with w.block(f"for t in {'reversed(range(T))' if host.reverse else 'range(T)'}:"):
                for launch in launches:
                    w.line(launch)
    emit_after(w, host)


def _constants(bodies: list[KernelWriter]) -> tuple[list[str], list[str]]:
    """The constexpr parameters of a kernel made of these bodies, and what its launch passes for them."""
    names = (["TRAIN"] if any(kw.uses_train for kw in bodies) else []) \
        + (["PRECISION"] if any(" dot(" in line for kw in bodies for line in kw.body.lines) else []) \
        + ["WIDE", "BLOCK_B", "BLOCK_F", "BLOCK_K"]
    host = {"TRAIN": "train", "PRECISION": "precision", "WIDE": "wide"}
    return [f"{n}: tl.constexpr" for n in names], [f"{n}={host.get(n, n)}" for n in names] + ["num_warps=NUM_WARPS"]


def _program_offsets(k: Writer, persistent: bool) -> None:
    """A kernel's first lines: the examples and features its program owns, features f0 to f_end
    (exclusive): a tile of BLOCK_F by the grid's second axis, or, in the persistent kernel,
    n_features of them (all of them, or one head's)."""
    width = "n_features" if persistent else "BLOCK_F"
    k.line("    pid_b = tl.program_id(0)")
    k.line("    pid_f = tl.program_id(1)")
    k.line("    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)")
    k.line(f"    f0 = pid_f * {width}")
    k.line(f"    f_end = f0 + {width}")
    k.line("    offs_f = f0 + tl.arange(0, BLOCK_F)")
    k.line("    mask_b = offs_b < B")
    k.line("    if WIDE:  # a tensor of 2**31 elements or more: int32 offsets would wrap around")
    k.line("        offs_b = offs_b.to(tl.int64)")
    k.line("        offs_f = offs_f.to(tl.int64)")


def _emit_persistent(kernels_out: Writer, made: list[tuple[int, Size, KernelWriter]], kname: str, reverse: bool,
                     dims: tuple[str, ...], wrapped: bool) -> str:
    """The step kernels as one kernel that loops over the steps itself, each program owning BLOCK_B
    examples and n_features features: every feature (one program a batch tile), one head's where
    the loop's heads are independent (_heads), or a slice of a row too wide for one program. In the
    first two, what a step's later stage, or the next step, reads from memory this program wrote,
    so a barrier among its own threads orders them, and the kernel runs under Triton's interpreter,
    which runs programs one after another. Slices read each other's features: GRID_SYNC adds a
    barrier across the grid after each stage (a counter every program adds to and waits on), which
    only a grid whose programs are all resident at once can pass (grid_slices()); under the
    interpreter, a grid of one. No launch per step; each step still reads the weights (from cache).
    Returns the launch's code."""
    tensors: dict[str, None] = {}
    for _, _, kw in made:
        tensors.update(dict.fromkeys(kw.args))
    params = list(tensors) + ["T", "B", *dims] + (["wrap"] if wrapped else []) + ["n_features", "counter", "programs"]
    consts, extra = _constants([kw for _, _, kw in made])
    consts, extra = consts + ["GRID_SYNC: tl.constexpr"], extra + ["GRID_SYNC=grid_sync"]
    k = kernels_out
    k.line("")
    k.line("")
    k.line('@triton.jit(do_not_specialize=["T"])')
    k.line(f"def {kname}({', '.join(params + consts)}):")
    k.line(f'    """Every step{" from the last to the first" if reverse else ""}, each stage of it as its kernel '
           'of one step computes it, for BLOCK_B examples and n_features of their features."""')
    _program_offsets(k, persistent=True)
    k.line("    arrived = tl.full((), 0, tl.int64)  # programs * stages passed, for GRID_SYNC's barrier (int32 would")
    k.line("    # wrap after some millions of steps)")
    k.line("    for step in range(0, T):")
    k.line(f"        t = {'T - 1 - step' if reverse else 'step'}")
    for n, (stage, tile, kw) in enumerate(made):
        k.line(f"        # stage {stage}: {tile} features a row")
        k.line(f"        mask_f = (offs_f < {tile}) & (offs_f < f_end)")
        k.lines.extend("    " + line if line.strip() else line for line in kw.body.lines)
        # The next stage, or the next step, reads what this one stored, from other threads.
        if n + 1 == len(made) or made[n + 1][0] != stage:
            k.line("        tl.debug_barrier()")
            k.line("        if GRID_SYNC:  # and from other programs: a barrier across the grid, all of it resident")
            k.line("            arrived += programs")
            k.line('            tl.atomic_add(counter, 1, sem="release")')
            k.line('            while tl.atomic_add(counter, 0, sem="acquire") < arrived:')
            k.line("                pass")
            k.line("            tl.debug_barrier()")
    return f"{kname}[(triton.cdiv(B, BLOCK_B), slices)]({', '.join(params + extra)})"


# Ops inside the loop whose feature j reads other features than the matching one of its arguments.
_ACROSS_FEATURES = ("softmax", "softmax_vjp", "outer", "outer_vjp_a", "outer_vjp_b", "expand", "reshape",
                    *ROW_REDUCTIONS)


def _heads(s: Schedule, plan: LoopPlan, tiles: list[Size], forward: Graph | None) -> Size | None:
    """N where the loop is N independent heads: each head's features, step after step, read only
    that head's features (so a persistent program may own one head, with no barrier across them).
    Sufficient, and checked on sizes alone: every kernel tiles P = N * D features; every product in
    the loop has a per-head weight of N blocks of D by D (W @ v: rows k*P + n*D + i read v's n-th
    block; W^T @ g, its transpose); and every loop value, concatenation part and slice start is a
    multiple of P, so feature j of any value read at any offset is in head (j mod P) // D. None if
    any of that fails, or the loop has no per-head product."""
    g = s.graph
    if len({str(t) for t in tiles}) != 1:
        return None
    whole = tiles[0]

    def multiple(size: Size) -> bool:
        return any(size == whole * k for k in range(64))

    heads = None
    for i in plan.stage:
        node = g.nodes[i]
        if node.op in _ACROSS_FEATURES:
            return None
        if node.type.batched and node.type.shape and not multiple(node.type.shape[0]):
            return None
        if node.op == "slice" and not multiple(node.attrs[0]):
            return None
        if node.op == "concat" and not all(multiple(g.nodes[a].type.shape[0]) for a in node.args):
            return None
        if node.op in ("matvec", "matvec_t"):
            blocks = _blocks(g, node.args[0], forward)
            if blocks is None:
                return None
            (n, d, e), _ = blocks
            if not (n * d == whole and n * e == whole) or heads is not None and heads != n:
                return None
            heads = n
    return heads


# The generated module's settings, which a user (or bench/gpu.py) may change after loading it.
SETTINGS = '''TILES = None  # (BLOCK_B, BLOCK_F, BLOCK_K) for every batch, instead of tiles()'s choice
WIDE_ELEMENTS = 2 ** 31  # tensors this large take int64 offsets in the kernels
PERSISTENT_FEATURES = 128  # the most features a persistent program keeps (an LSTM's H = 256
# needs 268 KB of shared memory compiled for an H100, over its 227 KB)
SCAN_BLOCKS = (32, 64)  # (steps, values) a program of linear_scan takes at once (not yet measured on a GPU)
NUM_WARPS = 4  # warps a program runs on (Triton's default; bench/gpu.py --warps measures others)
PERSISTENT = False  # True: the whole time loop in one launch, where persistent() allows (not yet timed on a GPU)
GRID_SYNC = True  # with PERSISTENT, rows wider than PERSISTENT_FEATURES in slices (grid_slices())
TUNE = False  # True: the tile, warps and persistence timed on first use of a batch (specc/backends/tuning.py)'''

# How a pass launches its loop: persistent, in slices across the grid, or a launch a step.
LAUNCH_HELPERS = '''def persistent(B, features):
    """Whether a pass runs its time loop as one kernel (each program its examples' features, step
    after step) rather than kernels launched once a step: where asked for (PERSISTENT) and the
    features a program keeps (a row of the widest stored value, or one head's) fit it
    (PERSISTENT_FEATURES)."""
    return bool(PERSISTENT) and features <= PERSISTENT_FEATURES


def grid_slices(B, features, BLOCK_B, dev):
    """Where a row is wider than a persistent program keeps (PERSISTENT_FEATURES): the slices of it that
    programs of one persistent loop own, with a barrier across the grid after each stage of a step,
    or 0 for a launch a step. Only where every program is resident at once, or the barrier would
    wait forever: one a multiprocessor of the GPU (not yet timed), and one in all under Triton's
    interpreter, which runs programs one after another."""
    if not PERSISTENT or not GRID_SYNC:
        return 0
    slices = triton.cdiv(features, PERSISTENT_FEATURES)
    room = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 1
    return slices if triton.cdiv(B, BLOCK_B) * slices <= room else 0'''

# How the step's products multiply, and the weights as they read them.
PRECISION_HELPERS = '''def dot_precision(dev, products=None):
    """How the step's products multiply: in bfloat16 or float16 where asked (products: autocast's
    dtype, or a half-precision module's; float32 sums either way); else in float32, or in TF32 on
    tensor cores where torch allows that for its own float32 matmuls (torch.set_float32_matmul_precision(
    "high" or "medium")) and the GPU has them (Ampere on)."""
    if products is not None:
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}[products]
    if torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32" if dev.type != "cuda" or torch.cuda.get_device_capability(dev)[0] >= 8 else "ieee"


def dot_weight(weight, precision):
    """A weight as the step's products read it: rounded to bfloat16 or float16 once a pass where they
    multiply so (each step then reads half the bytes), else the weight itself."""
    return weight.to({"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, weight.dtype))'''


def _finish(w: Writer, kernels: Writer, body: Writer) -> None:
    w.lines.extend(SETTINGS.split("\n"))
    w.line("")
    w.line("")
    w.lines.extend(LAUNCH_HELPERS.split("\n"))
    w.line("")
    w.line("")
    with w.block("def tiles(B, precision):"):
        w.line('"""Examples, features and reduction width of a tile. Small batches take narrow tiles, so that a')
        w.line("step has enough programs to fill the GPU; large ones wide tiles, which load each weight fewer")
        w.line('times (measured on an H200: bench/results/gpu-2026-11-26.md)."""')
        with w.block("if TILES:"):
            w.line("return TILES")
        for precision, (small, large) in TILES_BY_PRECISION.items():
            with w.block(f'if precision == "{precision}":'):
                w.line(f"return {small} if B <= {SMALL_BATCH} else {large}")
        w.line('raise ValueError(f"no tiles for products in {precision}")')
    w.line("")
    w.line("")
    w.lines.extend(PRECISION_HELPERS.split("\n"))
    w.lines.extend(kernels.lines)
    w.line("")
    w.line("")
    w.lines.extend(body.lines)


def _helpers_used(code: str) -> list[str]:
    """The activations' Triton helpers that `code` calls, and those they call, in the table's order
    (which defines a helper before those that call it)."""
    helpers = [a.triton_helper for a in ACTIVATIONS.values() if a.triton_helper]
    used: set[str] = set()
    while True:
        text = code + "".join(used)
        more = {h for h in helpers if h not in used and f"{helper_name(h)}(" in text}
        if not more:
            return [h for h in helpers if h in used]
        used |= more


DOT = '''@triton.jit
def dot(a, b, PRECISION: tl.constexpr):
    """a @ b, summed in float32: the factors rounded to bfloat16 or float16 first where PRECISION says
    so (tensor cores at half the bits), else multiplied in float32 ("ieee") or TF32 ("tf32")."""
    if PRECISION == "bf16":
        out = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    elif PRECISION == "fp16":
        out = tl.dot(a.to(tl.float16), b.to(tl.float16))
    else:
        out = tl.dot(a, b, input_precision=PRECISION)
    return out'''


def _preamble(w: Writer, code: str) -> None:
    w.line("try:")
    w.line("    import torch")
    w.line("    import triton")
    w.line("    import triton.language as tl")
    w.line("except ImportError:  # the module still imports; the runtime then says triton is missing")
    w.line("    from specc.backends.triton_missing import triton, tl")
    w.line("")
    w.line("")
    if " dot(" in code:
        w.lines.extend(DOT.split("\n"))
        w.line("")
        w.line("")
    for helper in _helpers_used(code):
        w.line("@triton.jit")
        w.lines.extend(helper.rstrip("\n").split("\n"))
        w.line("")
        w.line("")


TARGET = LoopTarget(
    "triton", _emit_scan, _finish, torch_spell,
    ("forward, with the time loop as fused Triton kernels; tensors are float32 on one device.",
     "backward, with the time loop as fused Triton kernels."),
    reserved=KERNEL_NAMES, copy_saved_views=True, extra_args=("scan=True", "products=None"),
    title="--- Triton backend: the time loop as fused GPU kernels, the rest in torch ---", preamble=_preamble)
# Every name the Triton part of a generated module uses for itself; check.py keeps spec names off them.
GENERATED_NAMES = HOST_NAMES | KERNEL_NAMES | helper_names("triton_helper") | {"forward_triton", "backward_triton",
                                                                             "TRITON_UNSUPPORTED"}
