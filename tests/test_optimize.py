"""The optimised IR, inspected: each optimisation can be seen to have happened.

(1) input-only terms (W_ih @ x and the biases added to it) are hoisted before the time loop;
(2) products that share their vector are fused into one product of stacked weights;
(3) weight gradients are reductions after the backward loop, not sums inside it;
(4) common subexpressions are computed once;
(5) dead values are removed.
These are structural tests: the numbers are checked elsewhere.
"""
from __future__ import annotations

from collections import Counter

import pytest

from specc.ir import Forward, Graph
from specc.ops import REDUCTIONS
from specc.pipeline import compile_spec
from specc.schedule import Schedule


def compiled(spec: str, cell: str | None = None):
    return compile_spec(spec, cell)


def leaf(g: Graph, op: str, name: str) -> int:
    [i] = [i for i, n in enumerate(g.nodes) if n.op == op and n.attrs[0] == name]
    return i


def reaches(g: Graph, i: int) -> set[int]:
    """Every node that node i is computed from, i included."""
    seen, stack = set(), [i]
    while stack:
        j = stack.pop()
        if j not in seen:
            seen.add(j)
            stack.extend(g.nodes[j].args)
    return seen


def ops_in(s: Schedule, region: str) -> Counter:
    return Counter(s.graph.nodes[i].op for i in s.nodes_in(region))


def param_names(g: Graph, i: int) -> list[str]:
    """The parameters a weight operand is: [W] for a parameter, [W1, W2, ...] for a stack of them."""
    node = g.nodes[i]
    if node.op == "param":
        return [node.attrs[0]]
    assert node.op == "concat", node
    return [name for a in node.args for name in param_names(g, a)]


def matvecs(g: Graph) -> list[int]:
    return [i for i, n in enumerate(g.nodes) if n.op == "matvec"]


# --- (1) hoisting ------------------------------------------------------------------------------

RECURRENT = [("lstm", None, "b_ih"), ("gru", None, "b_ih"), ("elman", "elman", "b_h"), ("elman", "rnn_tanh", "b_ih"),
             ("gru_cho", None, "b_z")]


@pytest.mark.parametrize("spec, cell, bias", RECURRENT)
def test_input_only_terms_are_hoisted_before_the_loop(spec, cell, bias):
    c = compiled(spec, cell)
    g, s = c.forward, c.forward_schedule
    carries = {leaf_id for _, leaf_id, _ in g.carries}
    inputs = {i for _, i in g.inputs}
    for i, node in enumerate(g.nodes):
        deps = reaches(g, i)
        if deps & inputs and not deps & carries:
            assert s.region[i] == "pre", f"%{i} {node.op} depends only on inputs but is in {s.region[i]}"
    # W @ x for the input is one product over the whole sequence, before the loop
    x = leaf(g, "input", "x")
    products = [i for i in matvecs(g) if g.nodes[i].args[1] == x]
    assert products and all(s.region[i] == "pre" for i in products)
    # the bias is added to it before the loop too: no loop value reads it directly
    b = leaf(g, "param", bias)
    assert all(b not in g.nodes[i].args for i in s.nodes_in("loop"))
    assert any(b in reaches(g, i) and products[0] in reaches(g, i) for i in s.nodes_in("pre"))
    # inside the loop, only the recurrent products
    loop_products = [i for i in matvecs(g) if s.region[i] == "loop"]
    assert loop_products and all(reaches(g, i) & carries for i in loop_products)
    assert not any(g.nodes[i].args[1] == x for i in loop_products)


def test_lstm_adds_both_biases_and_the_input_product_before_the_loop():
    c = compiled("lstm")
    g, s = c.forward, c.forward_schedule
    x, b_ih, b_hh = leaf(g, "input", "x"), leaf(g, "param", "b_ih"), leaf(g, "param", "b_hh")
    # W_ih @ x + b_ih + b_hh: one pre value holding all three, which the loop reads
    hoisted = [i for i in s.nodes_in("pre") if {x, b_ih, b_hh} <= reaches(g, i) and g.nodes[i].op == "add"]
    assert hoisted
    assert any(hoisted[-1] in g.nodes[i].args for i in s.nodes_in("loop"))
    # the loop does one product and one add per step before the gates
    assert ops_in(s, "loop")["matvec"] == 1
    # b_ih + b_hh is fixed for the sequence: computed once, up front
    assert any(g.nodes[i].op == "add" and set(g.nodes[i].args) == {b_ih, b_hh} for i in s.nodes_in("const"))


def test_output_layer_runs_after_the_loop():
    c = compiled("elman", "elman")
    g, s = c.forward, c.forward_schedule
    [(_, y)] = g.outputs
    assert s.region[y] == "post"
    w_hy = leaf(g, "param", "W_hy")
    [product] = [i for i in matvecs(g) if g.nodes[i].args[0] == w_hy]
    assert s.region[product] == "post"


# --- (2) fusion --------------------------------------------------------------------------------

def test_products_sharing_a_vector_are_fused_in_gru_cho():
    c = compiled("gru_cho")
    g, s = c.forward, c.forward_schedule
    x, h = leaf(g, "input", "x"), leaf(g, "carry", "h")
    by_vector = {}
    for i in matvecs(g):
        w, v = g.nodes[i].args
        by_vector.setdefault(v, []).append((i, param_names(g, w)))
    [(on_x, w_x)] = by_vector.pop(x)
    [(on_h, w_h)] = by_vector.pop(h)
    assert sorted(w_x) == ["W", "W_r", "W_z"] and sorted(w_h) == ["U_r", "U_z"]
    # the remaining product is U @ (r * h), which has a vector of its own
    [[(_, w_rest)]] = by_vector.values()
    assert w_rest == ["U"]
    assert len(matvecs(g)) == 3
    # the stacked weights are made once per sequence; the fused input product is hoisted
    assert s.region[g.nodes[on_x].args[0]] == "const" and s.region[on_x] == "pre"
    assert s.region[on_h] == "loop"
    assert g.nodes[on_x].type.shape[0] == g.nodes[leaf(g, "param", "W")].type.shape[0] * 3
    # each gate reads its slice of the fused products
    slices = [i for i, n in enumerate(g.nodes) if n.op == "slice" and n.args[0] in (on_x, on_h)]
    assert len(slices) == 5


def test_fused_weights_get_their_gradients_by_slicing_one_reduction():
    c = compiled("gru_cho")
    b, s = c.backward, c.backward_schedule
    reduced = dict(b.reduced)
    for group in (["W_z", "W_r", "W"], ["U_z", "U_r"]):
        sources = set()
        for name in group:
            node = b.nodes[reduced[name]]
            assert node.op == "slice" and s.region[reduced[name]] == "final"
            sources.add(node.args[0])
        [source] = sources
        assert b.nodes[source].op == "outer_sum" and s.region[source] == "reduce"


def test_products_of_different_heights_are_fused():
    text = """cell two(I, H, O) {
        input x[I]
        state h[H]
        param P[H, I]
        param Q[O, I]
        h' = tanh(P @ x + h)
        output y = Q @ x
    }"""
    g = compiled(text).forward
    [product] = matvecs(g)
    assert param_names(g, g.nodes[product].args[0]) == ["P", "Q"]
    assert str(g.nodes[product].type.shape[0]) == "H + O"


def test_products_with_different_vectors_are_not_fused():
    c = compiled("elman", "rnn_tanh")
    g = c.forward
    assert sorted(tuple(param_names(g, g.nodes[i].args[0])) for i in matvecs(g)) == [("W_hh",), ("W_ih",)]


# --- (3) weight gradients ----------------------------------------------------------------------

LIBRARY = [("lstm", None), ("gru", None), ("gru_cho", None), ("elman", "elman"), ("elman", "rnn_tanh"),
           ("elman", "rnn_relu"), ("jordan", None), ("shortcut", None), ("second_order", None)]


@pytest.mark.parametrize("spec, cell", LIBRARY)
def test_weight_gradients_are_reductions_after_the_backward_loop(spec, cell):
    c = compiled(spec, cell)
    b, s = c.backward, c.backward_schedule
    assert [name for name, _ in b.reduced] == [name for name, _ in c.forward.params]
    for name, i in b.reduced:
        node = b.nodes[i]
        while node.op in ("slice", "reshape"):  # a stacked or a three-axis weight's part of a reduction
            assert s.region[i] == "final"
            i, node = node.args[0], b.nodes[node.args[0]]
        assert node.op in REDUCTIONS and s.region[i] == "reduce", (name, node.op, s.region[i])
    # no reduction over the batch inside the loop: dW is one product over time x batch
    assert not [i for i in s.nodes_in("loop") if b.nodes[i].op in REDUCTIONS]
    assert ops_in(s, "reduce")["outer_sum" if spec != "second_order" else "contract_sum"] >= 1
    for i, node in enumerate(b.nodes):
        if node.op in ("outer_sum", "contract_sum"):
            assert s.region[i] == "reduce"


def test_contract_keeps_no_outer_products_for_the_backward_pass():
    """contract(W, x, h)'s weight gradient is made from x and h after the loop (contract_sum), so
    the forward pass keeps nothing of I * H numbers a row for any step, where x and h are I + H."""
    c = compiled("second_order")
    fwd, b = c.forward, c.backward
    saved = {k.node for k, _ in b.inputs + b.params if isinstance(k, Forward)}
    wide = [i for i in saved | c.forward_schedule.kept if fwd.nodes[i].type.batched
            and str(fwd.nodes[i].type.shape[0]) not in ("H", "I")]
    assert wide == [], [fwd.nodes[i] for i in wide]
    assert not [n for n in b.nodes if n.op in ("outer", "outer_sum")]
    (i,) = [i for i, n in enumerate(b.nodes) if n.op == "contract_sum"]
    assert b.nodes[dict(b.reduced)["W"]].args[0] == i


def test_contract_multiplies_the_state_by_the_weight_first():
    """contract(W, x, h) in the forward pass: W as an (H * I, H) matrix times h, then each example's
    (H, I) block of that times x, not W as (H, H * I) times x (x) h: a product with a wide result
    (the loop's threads share it by columns); the backward pass's own product, W^T g, is wide as
    it was. Where the second vector is known before the loop (contract(W, h, x)), the first form
    stays: its product is of a (x) b, which depends on the state; W x for every step would be a
    (T * B, H * H) value. So does a W whose first axis M is longer than b (M numbers of W b for
    each of a (x) b's)."""
    c = compiled("second_order")
    fwd, b = c.forward, c.backward
    [mv] = matvecs(fwd)
    w, h = fwd.nodes[mv].args
    assert fwd.nodes[w].op == "reshape" and [str(d) for d in fwd.nodes[w].type.shape] == ["H*I", "H"]
    assert fwd.nodes[h].op == "carry"
    [user] = fwd.users()[mv]
    assert fwd.nodes[user].op == "outer_vjp_a" and fwd.nodes[fwd.nodes[user].args[1]].op == "input"
    assert not [n for n in fwd.nodes if n.op == "outer"]
    [back] = [n for n in b.nodes if n.op == "matvec_t"]
    assert [str(d) for d in b.nodes[back.args[0]].type.shape] == ["H", "H*I"]

    for text in (SWAPPED, WIDE):  # b known before the loop; M > K
        other = compile_spec(text).forward
        assert "outer" in [other.nodes[other.nodes[i].args[1]].op for i in matvecs(other)]
        assert not [n for n in other.nodes if n.op == "outer_vjp_a"]


WIDE = """
cell wide(I, H) {
    input x[I]
    state h[H] = zeros
    param W[4*H, I, H]
    param U[H, 4*H]
    h' = tanh(U @ contract(W, x, h))
    output h'
}
"""

SWAPPED = """
cell swapped(I, H) {
    input x[I]
    state h[H] = zeros
    param W[H, H, I]
    h' = tanh(contract(W, h, x))
    output h'
}
"""


@pytest.mark.parametrize("spec, cell", [("elman", "elman"), ("lstm", None), ("gru", None)])
def test_input_gradients_are_computed_after_the_backward_loop(spec, cell):
    c = compiled(spec, cell)
    b, s = c.backward, c.backward_schedule
    [(name, d_x)] = b.outputs
    assert name == "x" and s.region[d_x] == "post" and b.nodes[d_x].op == "matvec_t"


def test_bias_gradients_are_row_sums():
    c = compiled("lstm")
    b = c.backward
    reduced = dict(b.reduced)
    assert b.nodes[reduced["b_ih"]].op == "sum_rows"
    # b_ih and b_hh enter the sum the same way: one gradient shared by both
    assert reduced["b_ih"] == reduced["b_hh"]
    assert b.nodes[reduced["W_ih"]].op == "outer_sum"


# --- (4) common subexpressions -----------------------------------------------------------------

CSE = """cell twice(I, H) {
    input x[I]
    state h[H]
    param W[H, I]
    param U[H, H]
    a = sigmoid(W @ x) * h
    b = sigmoid(W @ x) + U @ h
    h' = tanh(a + b) + sigmoid(W @ x)
    output h'
}"""


def test_common_subexpressions_are_computed_once():
    c = compiled(CSE)
    g = c.forward
    ops = Counter(n.op for n in g.nodes)
    assert ops["sigmoid"] == 1
    w = leaf(g, "param", "W")
    assert len([i for i in matvecs(g) if w in reaches(g, g.nodes[i].args[0])]) == 1
    # and the shared value is computed before the loop, once for all steps
    [sig] = [i for i, n in enumerate(g.nodes) if n.op == "sigmoid"]
    assert c.forward_schedule.region[sig] == "pre"
    # the backward pass shares it too: it reads the one saved sigmoid
    saved = [key for key, _ in c.backward.inputs if key == Forward(sig)]
    assert saved == [Forward(sig)]


def test_parenthesised_copies_are_shared_too():
    c = compiled(CSE.replace("sigmoid(W @ x) * h", "(sigmoid(W @ x) * h)"))
    assert Counter(n.op for n in c.forward.nodes)["sigmoid"] == 1


# --- (5) dead values ---------------------------------------------------------------------------

LIVE = """cell live(I, H) {
    input x[I]
    state h[H]
    param W[H, I]
    param U[H, H]
    param V[H, I]
    z = sigmoid(W @ x + U @ h)
    h' = z * h + (1 - z) * tanh(W @ x)
    output h'
}"""
DEAD = LIVE.replace("    output h'", "    unused = tanh(V @ x) * z\n    also = sigmoid(unused)\n    output h'")


def test_dead_values_are_removed():
    live, dead = compiled(LIVE), compiled(DEAD)
    g = dead.forward
    assert not [n for n in g.nodes if n.name in ("unused", "also")]
    ops, live_ops = Counter(n.op for n in g.nodes), Counter(n.op for n in live.forward.nodes)
    assert ops["sigmoid"] == live_ops["sigmoid"] == 1  # sigmoid(unused) is gone
    assert ops["tanh"] == live_ops["tanh"] == 1  # tanh(V @ x) is gone
    assert [name for name, _ in g.params] == ["W", "U", "V"]  # V stays a parameter of the cell
    # nothing in the generated code computes the dead gates (it quotes each line it computes; the
    # spec itself, SPEC_TEXT at the end, holds them as data)
    code = dead.source.split("\nSPEC_TEXT = ")[0]
    assert "unused" not in code and "unused" in DEAD and "SPEC_TEXT" in dead.source


def test_dead_products_are_not_fused_into_live_ones():
    live, dead = compiled(LIVE), compiled(DEAD)
    g = dead.forward
    v = leaf(g, "param", "V")
    assert not [i for i, n in enumerate(g.nodes) if v in n.args]
    assert Counter(n.op for n in g.nodes) == Counter(n.op for n in live.forward.nodes)
    # V has a zero gradient, and no work is done to get it
    b = dead.backward
    assert b.nodes[dict(b.reduced)["V"]].op == "zeros"
    extra = Counter(n.op for n in b.nodes) - Counter(n.op for n in live.backward.nodes)
    assert set(extra) <= {"zeros"} and extra["zeros"] <= 1  # at most V's zero gradient, shared if it can be


def test_backward_drops_what_no_gradient_needs():
    # the output y is linear in h': the backward pass needs no saved tanh derivative for it
    c = compiled("elman", "elman")
    b = c.backward
    assert not [n for n in b.nodes if n.op in ("tanh", "sigmoid")]
    live_nodes = set().union(*(reaches(b, j) for j in b.results()))
    for i, node in enumerate(b.nodes):
        assert i in live_nodes or node.op in ("input", "param", "carry"), (i, node)
