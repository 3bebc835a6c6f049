"""Stage 4: step IR -> backward step IR, by reverse-mode differentiation (specc's own).

The backward step is itself a scan body, run from the last step to the first. Its leaves:
  carry  'h'                 the gradient reaching state h's next value from the later steps
  input  OutputGradient(y)   the gradient of output y at this step
  input  Forward(i)          the forward value of forward node i at this step (saved or recomputed)
  param  Forward(i)          a forward value fixed for the sequence (a parameter, or one made from them)
It yields, per state, the gradient of the state's previous value (its next carry); per input,
that input's gradient at this step (outputs); per parameter, its gradient summed over the batch
(reduced; the scheduler also sums it over time).
"""
from __future__ import annotations

from collections import defaultdict

from . import ops
from .ir import Builder, Forward, Graph, OutputGradient, Type, suggested_names
from .shapes import Size


def differentiate(fwd: Graph, frozen: frozenset[str] = frozenset()) -> Graph:
    b = Builder()
    mirror: dict[int, int] = {}
    fwd_names = suggested_names(fwd)

    def m(i: int) -> int:
        """The forward value i as seen from the backward step."""
        if i not in mirror:
            node = fwd.nodes[i]
            if node.op == "const":
                mirror[i] = b.const(node.attrs[0])
            elif _recomputed(fwd, i):
                # 1 - z: made again in the backward step from z, rather than kept for every step.
                mirror[i] = b.add(node.op, tuple(m(a) for a in node.args), name=fwd_names[i], line=node.line)
            else:
                kind = "input" if node.type.batched else "param"
                mirror[i] = b.add(kind, (), (Forward(i),), name=fwd_names[i], type=node.type)
        return mirror[i]

    grads: dict[int, list[int]] = defaultdict(list)
    slices: dict[int, list[tuple[Size, Size, int]]] = defaultdict(list)

    carries_in = []
    for name, leaf, nxt in fwd.carries:
        d = b.add("carry", (), (name,), name=f"d_{name}_next", type=fwd.nodes[nxt].type)
        carries_in.append((name, d))
        grads[nxt].append(d)
    inputs = []
    for name, n in fwd.outputs:
        d = b.add("input", (), (OutputGradient(name),), name=f"d_{name}", type=fwd.nodes[n].type)
        inputs.append((OutputGradient(name), d))
        grads[n].append(d)

    def total(i: int) -> int | None:
        """The whole gradient of forward value i: its contributions summed, its slices joined."""
        node = fwd.nodes[i]
        parts = list(grads.get(i, ()))
        if slices.get(i):
            parts.insert(0, _join_slices(b, node.type, slices[i]))
        if not parts:
            return None
        g = parts[0]
        for p in parts[1:]:
            g = b.add("add", (g, p))
        if not fwd_names[i].startswith("v"):
            b.name(g, "d_" + fwd_names[i], node.line)
        return g

    for i in reversed(range(len(fwd.nodes))):
        node = fwd.nodes[i]
        if node.op in ("input", "carry", "param", "const"):
            continue
        b.line = node.line
        g = total(i)
        if g is None:
            continue
        if node.op == "slice":
            slices[node.args[0]].append((node.attrs[0], node.attrs[1], g))
            continue
        contribs = ops.VJP[node.op](b, node, [m(a) for a in node.args], m(i), g)
        for a, ga in zip(node.args, contribs):
            if ga is not None and fwd.nodes[a].op != "const":
                grads[a].append(ga)
        b.line = 0

    def zeros_like(i: int) -> int:
        t = fwd.nodes[i].type
        return b.add("zeros", (), (t.shape, t.batched))

    def whole(leaf: int) -> int:
        g = total(leaf)  # node 0 is a gradient too: test for None, not for truth
        return zeros_like(leaf) if g is None else g

    carries = [(name, d, whole(leaf)) for (name, leaf, _), (_, d) in zip(fwd.carries, carries_in)]
    outputs = [(name, whole(leaf)) for name, leaf in fwd.inputs]
    # A `const` gets zeros: what would make its gradient is then unused, and optimize drops it.
    reduced = [(name, zeros_like(leaf) if name in frozen else whole(leaf)) for name, leaf in fwd.params]
    saved = sorted((i for i in mirror if fwd.nodes[i].op != "const" and not _recomputed(fwd, i)),
                   key=lambda i: mirror[i])
    inputs += [(Forward(i), mirror[i]) for i in saved if fwd.nodes[i].type.batched]
    params = [(Forward(i), mirror[i]) for i in saved if not fwd.nodes[i].type.batched]
    return Graph(tuple(b.nodes), tuple(inputs), tuple(carries), tuple(params), tuple(outputs), tuple(reduced))


def _recomputed(fwd: Graph, i: int) -> bool:
    """A value the backward step recomputes instead of keeping: a batched value at most one
    addition or negation away from one other batched value (1 - z, -h, x + b), which never costs
    more to keep than the value itself and often less (z is kept anyway); and an outer product
    a (x) b, N * K numbers a row made from N + K (its one reader, the product of contract(W, a, b),
    then needs only a and b: optimize.contract_sums)."""
    node = fwd.nodes[i]
    if node.type.batched and node.op == "outer":
        return True
    if not node.type.batched or node.op not in ("add", "sub", "neg"):
        return False
    batched = [a for a in node.args if fwd.nodes[a].type.batched]
    return len(batched) == 1 and fwd.nodes[batched[0]].type == node.type and all(
        fwd.nodes[a].op == "const" or not fwd.nodes[a].type.batched for a in node.args if a != batched[0])


def _join_slices(b: Builder, whole: Type, parts: list[tuple[Size, Size, int]]) -> int:
    """The gradient of a value from the gradients of its slices: the VJP of split.

    Disjoint slices become one concatenation (zeros filling any gap); overlapping ones are
    padded separately and summed.
    """
    parts = sorted(parts, key=lambda p: p[0].evaluate(_PROBE))
    disjoint = all(a[1] == c[0] or a[1].evaluate(_PROBE) <= c[0].evaluate(_PROBE) for a, c in zip(parts, parts[1:]))
    size = whole.shape[0]

    def gap(start: Size, stop: Size) -> int:
        return b.add("zeros", (), (((stop - start),) + whole.shape[1:], whole.batched))

    if disjoint:
        pieces, at = [], Size.of(0)
        for start, stop, g in parts:
            if start != at:
                pieces.append(gap(at, start))
            pieces.append(g)
            at = stop
        if at != size:
            pieces.append(gap(at, size))
        return pieces[0] if len(pieces) == 1 else b.add("concat", tuple(pieces))
    total = None
    for start, stop, g in parts:
        pieces = ([gap(Size.of(0), start)] if start != Size.of(0) else []) + [g] + \
                 ([gap(stop, size)] if stop != size else [])
        padded = pieces[0] if len(pieces) == 1 else b.add("concat", tuple(pieces))
        total = padded if total is None else b.add("add", (total, padded))
    return total


# Slice bounds are polynomials in the dimensions; to order them, evaluate at a large generic point.
class _Probe(dict):
    def __missing__(self, key):
        return 1009 + 13 * (hash(key) % 97)


_PROBE = _Probe()
