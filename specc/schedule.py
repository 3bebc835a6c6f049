"""Stage 6: where each value of a scan body is computed, relative to the time loop.

  const   fixed for the sequence (parameters and values made only from them): once, up front
  pre     depends on the inputs but not on the carried state: for all steps at once, before the
          loop, as (T*B, features) arrays, so W @ x over the sequence is one matrix product
  loop    depends on the carried state and feeds the next carried value: inside the loop
  post    depends on the carried state but feeds no carried value (an output layer, the input
          gradient): for all steps at once, after the loop, from values the loop kept
  reduce  a sum over batch of per-step values (a weight gradient): after the loop, over time and
          batch at once, so dW = sum_t g_t v_t^T is one matrix product, not T small ones
  final   fixed-size values made from reductions (the slices of a stacked weight's gradient)

A loop value is `kept` (written into a (T*B, features) buffer) when something outside the loop
needs it: a post or reduce value, a per-step output, or the backward pass.
"""
from __future__ import annotations

from dataclasses import dataclass

from .ir import LEAVES, Graph
from .ops import ELEMENTS, REDUCTIONS
from .shapes import Size

REGIONS = ("const", "pre", "loop", "post", "reduce", "final")


@dataclass(frozen=True)
class Schedule:
    graph: Graph
    region: tuple[str, ...]  # one per node
    kept: frozenset[int]  # loop values written to per-step buffers

    def nodes_in(self, region: str) -> list[int]:
        return [i for i, r in enumerate(self.region) if r == region]


def schedule(g: Graph, also_keep: frozenset[int] = frozenset()) -> Schedule:
    """`also_keep`: values the caller needs for every step (the backward pass's saved values)."""
    region = _regions(g, frozenset(), frozenset())
    return Schedule(g, tuple(region), _kept(g, region, also_keep))


def _regions(g: Graph, known: frozenset[int], after: frozenset[int]) -> list[str]:
    """Each node's region. `known`: carry leaves whose sequence is known before the loop (pre);
    `after`: carry leaves whose next values nothing in the loop needs (made after it, if no
    other carried value needs them)."""
    region: list[str] = []
    for i, node in enumerate(g.nodes):
        arg_regions = {region[a] for a in node.args}
        if node.op == "carry":
            r = "pre" if i in known else "loop"
        elif node.op == "input":
            r = "pre"
        elif node.op in REDUCTIONS and any(g.nodes[a].type.batched for a in node.args):
            r = "reduce"
        elif not node.type.batched:
            r = "final" if arg_regions & {"reduce", "final"} else "const"
        else:
            r = "loop" if "loop" in arg_regions else "pre"
        region.append(r)

    # Loop values that no carried value needs move after the loop.
    needed: set[int] = set()
    stack = [nxt for _, leaf, nxt in g.carries if leaf not in after]
    while stack:
        i = stack.pop()
        if i in needed or region[i] != "loop":
            continue
        needed.add(i)
        stack.extend(g.nodes[i].args)
    for i, r in enumerate(region):
        if r == "loop" and i not in needed and g.nodes[i].op != "carry":
            region[i] = "post"
    return region


def hoist_delays(s: Schedule, also_keep: frozenset[int] = frozenset()) -> Schedule:
    """Carried values the loop need not make, for a loop whose host fills their buffers outside it
    (backends/host.py: right after the next value is made, before any reader of the state):

    * a delay, a state whose next value depends on no state (QRNN's xp' = x): its sequence is the
      initial value then the next values, known before the loop, so what reads it is made before
      the loop too (QRNN's V @ xp: one product over the sequence, not one a step);
    * the dual, a carried value the loop never reads (the backward pass's gradient of that delay):
      its next values are made after the loop, for all steps at once (V^T @ dgates: one product).

    A state is taken only where its next value comes before every reader of the state in the
    graph's order, so that the buffer is filled before it is read."""
    g = s.graph
    users = g.users()
    # A state that is another's next value (xpp' = xp) is read where that one's buffer is filled.
    copied = {nxt for _, _, nxt in g.carries}

    def fill_first(leaf: int, nxt: int) -> bool:
        return nxt != leaf and all(nxt < u for u in users[leaf]) and (leaf not in copied or nxt < leaf)

    known: frozenset[int] = frozenset()
    after: frozenset[int] = frozenset()
    while True:
        region = _regions(g, known, after)
        more_known = {leaf for _, leaf, nxt in g.carries
                      if leaf not in known and region[nxt] in ("pre", "const") and fill_first(leaf, nxt)}
        more_after = {leaf for _, leaf, nxt in g.carries
                      if leaf not in after | known and region[nxt] == "loop" and g.nodes[nxt].op != "carry"
                      and leaf not in copied and fill_first(leaf, nxt)
                      and not any(region[u] == "loop" for u in users[leaf])}
        if not more_known and not more_after:
            break
        known, after = known | more_known, after | more_after
    # A carried value kept in the loop after all (another's next needs it) is written there, as before.
    return _moved(s, region, also_keep)


def filled_after(s: Schedule) -> frozenset[int]:
    """The carry leaves whose buffers are filled after the loop (hoist_delays): nothing may move
    into the loop that reads them."""
    return frozenset(leaf for _, leaf, nxt in s.graph.carries if s.region[nxt] == "post")


def filled_outside(s: Schedule) -> dict[str, int]:
    """State -> its next value, for the states whose buffers the host fills outside the loop
    (hoist_delays): the state read before the loop, or its next value made after it."""
    return {name: nxt for name, leaf, nxt in s.graph.carries
            if s.region[leaf] == "pre" or s.region[nxt] == "post"}


def fills(s: Schedule) -> dict[int, list[str]]:
    """Next value -> the states whose buffers the host fills from it outside the loop, right after
    making it (several: h' = c' = tanh(x) is one value)."""
    out: dict[int, list[str]] = {}
    for name, nxt in filled_outside(s).items():
        out.setdefault(nxt, []).append(name)
    return out


_ROWWISE = {*ELEMENTS, "matvec", "matvec_t", "outer", "outer_vjp_a", "outer_vjp_b", "softmax", "softmax_vjp"}


def _row_size(g: Graph, i: int):
    """Entries per row of value i, for comparing sizes (dimensions taken large)."""
    total = Size.of(1)
    for d in g.nodes[i].type.shape:
        total = total * d
    return total.evaluate({n: 1 << 20 for n in total.names()})


def sink_post(s: Schedule) -> Schedule:
    """A value the scheduler puts after the loop is made in the loop instead, step by step, when
    that spares keeping, for every step, loop values bigger than it (the gradient of contract's
    outer products, H*I entries a row, for the input's gradient, I a row)."""
    g = s.graph
    region = list(s.region)
    users = g.users()
    outputs = {i for _, i in g.outputs}
    late = filled_after(s)
    for n in range(len(g.nodes)):
        node = g.nodes[n]
        if region[n] != "post" or node.op not in _ROWWISE or not node.type.batched:
            continue
        if any(region[a] not in ("loop", "pre", "const") or a in late for a in node.args):
            continue
        freed = [a for a in set(node.args) if region[a] == "loop" and g.nodes[a].op != "carry" and a not in outputs
                 and all(u == n or region[u] == "loop" for u in users[a])]
        if freed and sum(_row_size(g, a) for a in freed) > _row_size(g, n):
            region[n] = "loop"
    return _moved(s, region)


def sink_elementwise(s: Schedule, also_keep: frozenset[int] = frozenset()) -> Schedule:
    """For a loop that fuses each step's elementwise work (the C loops): every elementwise value
    the scheduler puts after the loop, whose operands are made in the loop or before it, is made
    in the loop instead, where its operands are still in registers; only what the host reads
    after the loop is written to memory. After the loop, each such value is a pass over (T*B,
    features) memory that reads the loop's kept values back: minGRU's backward at 4096 x 8 x 256
    made six of them (86 of its 191 ms) from the carried gradient the loop wrote for them.
    `also_keep`: values another pass reads for every step (a forward pass's saved values), kept
    wherever they are made, as schedule() keeps them."""
    g = s.graph
    region = list(s.region)
    late = filled_after(s)
    for n, node in enumerate(g.nodes):
        if (region[n] == "post" and (node.op in ELEMENTS or node.op == "slice") and node.type.batched
                and all(region[a] in ("loop", "pre", "const") and a not in late for a in node.args)):
            region[n] = "loop"
    return _moved(s, region, also_keep)


def sink_pre(s: Schedule, also_keep: frozenset[int] = frozenset()) -> Schedule:
    """For a loop that fuses each step's elementwise work (the C loops): an elementwise value the
    scheduler puts before the loop, read only in the loop, is made in the loop instead, from the
    rows of its operands at that step. Before the loop, each such value is a pass over (T*B,
    features) memory that writes what the loop reads back: minGRU's forward at 4096 x 8 x 256 made
    its gate's bias sum and sigmoid so (21 of its 97 ms). Products stay before the loop (one over
    the sequence), and so does a value read after the loop or by a product. Unlike the values a
    loop recomputes from their operands where it reads them (backends/host.fused_into_loop, which
    must be needed by nothing else), such a value may be one backward keeps: the loop writes it.
    `also_keep`: values another pass reads for every step, written by the loop where made there."""
    g = s.graph
    region = list(s.region)
    users = g.users()
    outputs = {i for _, i in g.outputs}
    for n in range(len(g.nodes) - 1, -1, -1):
        node = g.nodes[n]
        # A slice another pass keeps stays a view before the loop, not a copy the loop writes.
        if (region[n] == "pre" and (node.op in ELEMENTS or node.op == "slice" and n not in also_keep)
                and node.type.batched and n not in outputs and users[n]
                and all(region[u] == "loop" for u in users[n])):
            region[n] = "loop"
    return _moved(s, region, also_keep)


def _moved(s: Schedule, region: list[str], also_keep: frozenset[int] = frozenset()) -> Schedule:
    """s with its nodes in `region` (s itself when nothing moved), the kept values made again."""
    if tuple(region) == s.region:
        return s
    return Schedule(s.graph, tuple(region), _kept(s.graph, region, also_keep))


def _kept(g: Graph, region: list[str], also_keep: frozenset[int] = frozenset()) -> frozenset[int]:
    """The loop values something outside the loop reads: a post or reduce value, an output, or
    `also_keep` (another pass)."""
    kept = set()
    for i, node in enumerate(g.nodes):
        if region[i] in ("post", "reduce"):
            kept.update(a for a in node.args if region[a] == "loop")
    kept.update(i for _, i in g.outputs if region[i] == "loop")
    kept.update(i for i in also_keep if region[i] == "loop")
    # Carried values live in the state sequence buffer already.
    kept -= {leaf for _, leaf, _ in g.carries} | {nxt for _, _, nxt in g.carries}
    return frozenset(kept)


def needed_by_pass(s: Schedule) -> frozenset[int]:
    """Kept loop values that the pass itself needs after its loop (not only the backward pass):
    what the post and reduce regions read, and the outputs."""
    g = s.graph
    need = {i for _, i in g.outputs}
    for i, node in enumerate(g.nodes):
        if s.region[i] in ("post", "reduce"):
            need.update(node.args)
    return frozenset(need & s.kept)


def only_for_inputs(s: Schedule) -> frozenset[int]:
    """A backward pass's values made outside its loop that only the gradients of its inputs need
    (an LSTM's d_x = W_ih^T @ d_gates after the loop, a fifth of its products): the host code
    makes them only when some input asks for a gradient (a first layer fed data does not, as
    torch's autograd then skips its own)."""
    g = s.graph
    wanted = [i for _, i in g.reduced] + [nxt for _, _, nxt in g.carries] + list(fills(s))
    wanted += [i for i in range(len(g.nodes)) if s.region[i] in ("loop", "reduce", "final")]
    needed: set[int] = set()
    while wanted:
        i = wanted.pop()
        if i not in needed:
            needed.add(i)
            wanted.extend(g.nodes[i].args)
    return frozenset(i for i in range(len(g.nodes))
                     if s.region[i] in ("pre", "post") and i not in needed and g.nodes[i].op not in LEAVES)
