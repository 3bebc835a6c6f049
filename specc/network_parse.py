"""Stage 1, network blocks: lark trees of `network` (grammar/rnn.lark) -> AST nodes.

These are the Transformer methods for the network rules. They are mixed into parse._ToAst, so
that one Transformer (with its location helpers `_t`, `_m`) turns a whole file into AST nodes and
syntax errors are translated in one place, parse.py.
"""
from __future__ import annotations

import lark
from lark import v_args

from . import ast


class NetworkRules:
    @v_args(meta=True)
    def network(self, meta, children):
        name, dims, doc, *stmts = children
        doc_text = doc[3:-3].strip() if doc is not None else ""
        stmts = [s for s in stmts if s is not None and not isinstance(s, (lark.Token, lark.Tree))]
        return ast.Network(
            str(name), tuple(dims or ()), doc_text,
            tuple(s for s in stmts if isinstance(s, ast.NetInput)),
            tuple(s for s in stmts if isinstance(s, ast.Layer)),
            tuple(s for s in stmts if isinstance(s, ast.Flow)),
            self._t(name))

    def net_input(self, c):
        name, kind, size = c
        return ast.NetInput(str(name), str(kind), size, self._t(name), self._t(kind))

    def net_layer(self, c):
        name, kind, *rest = c
        args = tuple(a for a in rest if isinstance(a, ast.LayerArg))
        stacked, bidirectional, dropout = None, False, 0.0
        for opt in rest:
            if isinstance(opt, tuple):
                if opt[0] == "stacked":
                    stacked = opt[1]
                elif opt[0] == "bidirectional":
                    bidirectional = True
                else:
                    dropout = opt[1]
        return ast.Layer(str(name), str(kind), args, stacked, bidirectional, dropout, self._t(name), self._t(kind))

    @v_args(meta=True)
    def layer_pos(self, meta, c):
        return ast.LayerArg(None, c[0], self._m(meta))

    def layer_kw(self, c):
        return ast.LayerArg(str(c[0]), c[1], self._t(c[0]))

    def opt_stacked(self, c):
        return ("stacked", c[0])

    def opt_bidirectional(self, c):
        return ("bidirectional",)

    def opt_dropout(self, c):
        return ("dropout", float(c[0]), self._t(c[0]))

    @v_args(meta=True)
    def net_output(self, meta, c):
        return ast.Flow(str(c[0]), c[1], True, self._t(c[0]))

    @v_args(meta=True)
    def net_flow(self, meta, c):
        name, chain = c
        return ast.Flow(None if name is None else str(name), chain,
                        False, self._t(name) if name is not None else chain.loc)

    @v_args(meta=True)
    def chain(self, meta, c):
        return ast.Chain(c[0], tuple(c[1:]), c[0].loc)

    def src_name(self, c):
        return ast.Source("name", str(c[0]), loc=self._t(c[0]))

    def src_final(self, c):
        return ast.Source("final", str(c[0]), str(c[1]), loc=self._t(c[0]))

    @v_args(meta=True)
    def src_prev(self, meta, c):
        return ast.Source("prev", str(c[0]), start=c[1], loc=self._m(meta))

    def stage(self, c):
        name, *wires = c
        return ast.Stage(str(name), tuple(wires), self._t(name))

    def wire(self, c):
        return ast.Wire(str(c[0]), c[1], self._t(c[0]))
