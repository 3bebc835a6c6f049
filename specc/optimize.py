"""Stage 5: graph -> optimised graph. Each pass is a function from a Graph to a Graph.

- fuse_products: matrix products that share their vector operand become one product with the
  matrices stacked (W_ir @ x, W_iz @ x, W_in @ x -> [W_ir; W_iz; W_in] @ x), then sliced.
- reassociate_sums: a chain of additions is reordered so that the terms fixed for the sequence
  come first, then those that depend only on the inputs, then those that depend on the state;
  the scheduler can then hoist the largest input-only partial sum (W x + b_ih + b_hh) out of
  the time loop.
- contract_sums: the weight gradient of contract(W, a, b) made from a and b, not from a (x) b
  kept for every step.
- contract_products (the forward pass, after it is differentiated): contract(W, a, b) as W times
  b, then summed against a, a product with a wide result instead of one with a long sum.
- common subexpressions are shared by the Builder as any graph is rebuilt; dead values are
  dropped by `eliminate_dead`.
Hoisting itself (what runs before, inside and after the time loop) is decided in schedule.py.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import replace

from .ir import LEAVES, Builder, Forward, Graph
from .shapes import Size


def rebuild(g: Graph, visit=None, keep=None) -> Graph:
    """Copy `g` node by node through a Builder; `visit(b, i, node, new)` may replace a node.

    `new` maps the old ids copied so far to their new ids. `keep` (a set of old ids) limits the
    copy to those nodes; roles pointing elsewhere are dropped.
    """
    return rebuild_mapped(g, visit, keep)[0]


def rebuild_mapped(g: Graph, visit=None, keep=None) -> tuple[Graph, dict[int, int]]:
    """rebuild, and where each old id went."""
    b = Builder()
    new: dict[int, int] = {}
    for i, node in enumerate(g.nodes):
        if keep is not None and i not in keep:
            continue
        args = tuple(new[a] for a in node.args)
        out = visit(b, i, node, new) if visit else None
        if out is None:
            out = b.add(node.op, args, node.attrs, node.name, node.line,
                        type=node.type if node.op in LEAVES else None)
            if node.name:
                b.name(out, node.name, node.line)
        new[i] = out

    def keep_pairs(pairs):
        return tuple((name, new[i]) for name, i in pairs if i in new)

    return Graph(tuple(b.nodes), keep_pairs(g.inputs),
                 tuple((name, new[leaf], new[nxt]) for name, leaf, nxt in g.carries),
                 keep_pairs(g.params), keep_pairs(g.outputs), keep_pairs(g.reduced)), new


def eliminate_dead(g: Graph, keep_leaves: bool = True) -> Graph:
    return eliminate_dead_mapped(g, keep_leaves)[0]


def eliminate_dead_mapped(g: Graph, keep_leaves: bool = True, also=()) -> tuple[Graph, dict[int, int]]:
    """eliminate_dead keeping the values `also` too, and where each kept id went."""
    live = set()
    stack = g.results() + [leaf for _, leaf, _ in g.carries] + list(also)
    if keep_leaves:
        stack += [i for _, i in g.inputs] + [i for _, i in g.params]
    while stack:
        i = stack.pop()
        if i not in live:
            live.add(i)
            stack.extend(g.nodes[i].args)
    return rebuild_mapped(g, keep=live)


def depends_on_carry(g: Graph) -> list[bool]:
    dep = []
    for node in g.nodes:
        dep.append(node.op == "carry" or any(dep[a] for a in node.args))
    return dep


def reassociate_sums(g: Graph) -> Graph:
    users = g.users()
    dep = depends_on_carry(g)

    def interior(i: int) -> bool:
        node = g.nodes[i]
        if node.op != "add" or node.name or len(users[i]) != 1:
            return False
        parent = g.nodes[users[i][0]]
        return parent.op == "add" and parent.type == node.type

    def terms(i: int) -> list[int]:
        node = g.nodes[i]
        out = []
        for a in node.args:
            out.extend(terms(a) if interior(a) else [a])
        return out

    def rank(i: int) -> int:
        t = g.nodes[i].type
        return 0 if not t.batched else (2 if dep[i] else 1)

    def visit(b: Builder, i, node, new):
        if node.op != "add" or interior(i):
            return None
        old_terms = terms(i)
        if len(old_terms) < 3 and [rank(t) for t in old_terms] == sorted(rank(t) for t in old_terms):
            return None
        ordered = sorted(old_terms, key=rank)
        acc = new[ordered[0]]
        for t in ordered[1:]:
            acc = b.add("add", (acc, new[t]), line=node.line)
        b.name(acc, node.name, node.line)
        return acc

    return eliminate_dead(rebuild(g, visit))


def fuse_products(g: Graph) -> Graph:
    groups: dict[int, list[int]] = defaultdict(list)
    for i, node in enumerate(g.nodes):
        if node.op != "matvec":
            continue
        w = g.nodes[node.args[0]]
        # a per-head weight stacks when it is a parameter's blocks (blockdiag of an expression of
        # parameters, (R * 2) @ h, is made where it is written, maybe after this product)
        if w.op == "param" or w.op == "blockdiag" and g.nodes[w.args[0]].op == "param":
            groups[node.args[1]].append(i)
    fused = {}
    for v, members in groups.items():
        weights = list(dict.fromkeys(g.nodes[m].args[0] for m in members))
        if len(weights) > 1:
            for m in members:
                fused[m] = weights
    if not fused:
        return g
    made: dict[tuple, tuple[int, dict[int, tuple[Size, Size]]]] = {}

    def visit(b: Builder, i, node, new):
        if i not in fused:
            return None
        weights = fused[i]
        key = (node.args[1], tuple(weights))
        if key not in made:
            # A parameter's blocks may come after this product in the graph: made here from the
            # parameter (the builder makes it once; rebuild finds it made when it gets there).
            made_weights = tuple(new[w] if w in new else b.add(g.nodes[w].op, tuple(new[a] for a in g.nodes[w].args),
                                                               g.nodes[w].attrs, line=g.nodes[w].line)
                                 for w in weights)
            stacked = b.add("concat", made_weights, line=node.line)
            product = b.add("matvec", (stacked, new[node.args[1]]), line=node.line)
            offsets, at = {}, Size.of(0)
            for w in weights:
                rows = g.nodes[w].type.shape[0]
                offsets[w] = (at, at + rows)
                at = at + rows
            made[key] = (product, offsets)
        product, offsets = made[key]
        out = b.add("slice", (product,), offsets[node.args[0]], node.name, node.line)
        b.name(out, node.name, node.line)
        return out

    return eliminate_dead(rebuild(g, visit))


def hoist_factors(g: Graph) -> Graph:
    """Products of a loop value by factors fixed for the step are regrouped so that the factors
    multiply each other before the loop: (x * a) * b -> x * (a * b), x depending on the carried
    state and a, b not. Backward steps are chains of such products (g * y * (1 - y)); each
    regrouping moves one elementwise op per step out of the loop, into one op over all steps."""
    users = g.users()
    dep: list[bool] = []  # per node of the graph being built: does it depend on a carried value?

    def depends(b: Builder, j: int) -> bool:
        while len(dep) < len(b.nodes):
            node = b.nodes[len(dep)]
            dep.append(node.op == "carry" or any(dep[a] for a in node.args))
        return dep[j]

    def visit(b: Builder, i, node, new):
        if node.op != "mul" or not node.type.batched:
            return None
        for p, q in (node.args, node.args[::-1]):
            inner = b.nodes[new[p]]
            if len(users[p]) != 1 or depends(b, new[q]) or inner.op != "mul" or not depends(b, new[p]):
                continue
            x, a = inner.args
            if depends(b, a):
                x, a = a, x
            if depends(b, a) or not depends(b, x):
                continue
            factor = b.add("mul", (a, new[q]), line=node.line)
            out = b.add("mul", (x, factor), name=node.name, line=node.line)
            if node.name:
                b.name(out, node.name, node.line)
            return out
        return None

    return eliminate_dead(rebuild(g, visit), keep_leaves=False)


def contract_sums(g: Graph) -> Graph:
    """The weight gradient of contract(W, a, b), the sum over rows of g (x) (a (x) b), is made from a
    and b (contract_sum), not from the outer products a (x) b: those are N * K numbers a row, which
    the backward pass would otherwise need for every step (second_order at 100 x 16 x 128 x 128:
    105 MB kept by the forward pass). The backends make it a block of rows at a time."""
    def visit(b: Builder, i, node, new):
        if node.op != "outer_sum" or not node.type.shape or not b.type(new[node.args[0]]).batched:
            return None
        v = b.nodes[new[node.args[1]]]
        if v.op != "outer" or not all(b.type(a).batched for a in v.args):
            return None
        out = b.add("contract_sum", (new[node.args[0]], *v.args), name=node.name, line=node.line)
        if node.name:
            b.name(out, node.name, node.line)
        return out

    return rebuild(g, visit)


def contract_products(g: Graph, keep: frozenset[int]) -> tuple[Graph, dict[int, int]]:
    """The forward pass's contract(W, a, b), for a b made in the loop: W as an (M * N, K) matrix times
    b, then each example's (M, N) block of that times a (outer_vjp_a), instead of W as an
    (M, N * K) matrix times a (x) b, where M <= K. The same multiply-adds, but a product with a wide result,
    which the loop's threads share by columns better than one with a long sum: second_order at
    100 x 16 x 128 x 128, (16, 128) @ (128, 16384) a step took 0.24 ms a thread against 0.27 for
    (16, 16384) @ (16384, 128), as the backward pass's product already is.

    Made after the forward pass is differentiated (pipeline.compile_cell): its backward pass keeps
    the first form's gradient, whose product (W^T g, N * K numbers a row, a's and b's gradients
    summed from it) is wide too and needs neither a (x) b nor the (M, N) blocks kept. `keep`: the
    forward values the backward pass reads. Returns the graph and where each kept value went."""
    dep = depends_on_carry(g)
    users = g.users()

    def visit(b: Builder, i, node, new):
        if node.op != "matvec" or not node.type.batched:
            return None
        w, v = (g.nodes[a] for a in node.args)
        if w.op != "reshape" or v.op != "outer" or len(users[node.args[1]]) != 1 or node.args[1] in keep:
            return None
        a, k = v.args
        if not dep[k] or not g.nodes[k].type.batched:
            return None  # b fixed, or known before the loop: the first form's product is the one to hoist
        m, n, size_k = w.type.shape[0], g.nodes[a].type.shape[0], g.nodes[k].type.shape[0]
        if any(c < 0 for _, c in (size_k - m).terms):
            # M numbers of W b for every one of a (x) b's: M may exceed K, and with it the product's
            # result and the sum after it (W[1024, 128, 8]: 3-4x slower, 400 MB for an output
            # made after the loop). Rewritten only where M <= K at every size of the dimensions.
            return None
        rows = b.add("reshape", (new[w.args[0]],), ((m * n, size_k),), line=w.line)
        blocks = b.add("matvec", (rows, new[k]), line=node.line)
        out = b.add("outer_vjp_a", (blocks, new[a]), (m, n), name=node.name, line=node.line)
        if node.name:
            b.name(out, node.name, node.line)
        return out

    g1, first = rebuild_mapped(g, visit)
    g2, second = eliminate_dead_mapped(g1, also=[first[i] for i in keep])
    return g2, {i: second[first[i]] for i in keep}


def forward_renumbered(g: Graph, moved: dict[int, int]) -> Graph:
    """A backward graph whose leaves name forward values by the ids `moved` gives them."""
    def key(k):
        return Forward(moved[k.node]) if isinstance(k, Forward) else k

    nodes = tuple(replace(n, attrs=(key(n.attrs[0]),)) if n.op in LEAVES and n.attrs else n for n in g.nodes)
    return replace(g, nodes=nodes, inputs=tuple((key(k), i) for k, i in g.inputs),
                   params=tuple((key(k), i) for k, i in g.params))


def optimize(g: Graph, keep_leaves: bool = True) -> Graph:
    # Dead values go first: a product nobody reads must not be stacked into one that somebody does.
    g = eliminate_dead(g, keep_leaves=keep_leaves)
    g = fuse_products(g)
    g = reassociate_sums(g)
    g = contract_sums(g)
    return eliminate_dead(g, keep_leaves=keep_leaves)
