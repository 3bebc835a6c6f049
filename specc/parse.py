"""Stage 1: spec text -> AST. Lark parses with grammar/rnn.lark; a Transformer builds AST nodes.

Lark's own exceptions are translated here, in one place, into specc's located diagnostics.
"""
from __future__ import annotations

import functools

import lark
from lark import Transformer, v_args

from . import ast
from .errors import Diagnostic, Loc, SpecError
from .library import grammar_text
from .network_parse import NetworkRules


@functools.lru_cache(maxsize=1)
def _parser() -> lark.Lark:
    return lark.Lark(grammar_text(), parser="lalr", propagate_positions=True, maybe_placeholders=True)


# Terminal names as a person would write them, for "expected ..." messages.
_TERMINALS = {
    "NAME": "a name", "NUMBER": "a number", "LPAR": "'('", "RPAR": "')'", "LSQB": "'['", "RSQB": "']'",
    "LBRACE": "'{'", "RBRACE": "'}'", "COMMA": "','", "EQUAL": "'='", "TILDE": "'~'", "PRIME": "'",
    "ADD": "'+'", "SUB": "'-'", "MUL": "'*'", "DIV": "'/'", "MATMUL": "'@'", "SEMICOLON": "';'",
    "DOCSTRING": "a docstring", "$END": "end of file",
}


def _describe(expected) -> str:
    words = []
    for name in sorted(expected):
        if name.startswith("__ANON") or name.startswith("_"):
            continue
        words.append(_TERMINALS.get(name, repr(name.lower())))
    words = sorted(set(words))
    if not words:
        return ""
    if len(words) > 6:
        words = words[:6] + ["..."]
    return "; expected " + ", ".join(words)


class _ToAst(NetworkRules, Transformer):
    def __init__(self, file: str, lines: list[str]):
        super().__init__()
        self.file = file
        self.lines = lines

    def _loc(self, line: int, col: int) -> Loc:
        text = self.lines[line - 1] if 0 < line <= len(self.lines) else ""
        return Loc(self.file, line, col, text)

    def _m(self, meta) -> Loc:
        return self._loc(meta.line, meta.column)

    def _t(self, tok) -> Loc:
        return self._loc(tok.line, tok.column)

    # cells
    @v_args(meta=True)
    def start(self, meta, cells):
        return tuple(cells)

    @v_args(meta=True)
    def cell(self, meta, children):
        name, dims, doc, *stmts = children
        doc_text = doc[3:-3].strip() if doc is not None else ""
        stmts = tuple(s for s in stmts if s is not None and not isinstance(s, lark.Token))
        return ast.Cell(str(name), tuple(dims or ()), doc_text, stmts, self._t(name))

    def names(self, toks):
        return tuple((str(t), self._t(t)) for t in toks)

    # declarations
    @v_args(meta=True)
    def input_decl(self, meta, c):
        return ast.Input(str(c[0]), c[1], self._t(c[0]))

    @v_args(meta=True)
    def state_decl(self, meta, c):
        return ast.State(str(c[0]), c[1], c[2], self._t(c[0]))

    @v_args(meta=True)
    def param_decl(self, meta, c):
        return ast.Param(str(c[0]), c[1], c[2], self._t(c[0]))

    @v_args(meta=True)
    def output_decl(self, meta, c):
        return ast.Output(c[0], c[1], self._m(meta))

    @v_args(meta=True)
    def assign(self, meta, c):
        return ast.Assign(tuple(c[:-1]), c[-1], self._m(meta))

    def target(self, c):
        name, prime = c
        return ast.Target(str(name), prime is not None, self._t(name))

    def shape(self, c):
        return tuple(d for d in c if d is not None)

    def init(self, c):
        name, *args = c
        return ast.Init(str(name), tuple(a for a in args if a is not None), self._t(name))

    # dimension arithmetic
    def dim_num(self, c):
        return ast.DimNum(float(c[0]), self._t(c[0]))

    def dim_name(self, c):
        return ast.DimName(str(c[0]), self._t(c[0]))

    def dim_call(self, c):
        return ast.DimCall(str(c[0]), c[1], self._t(c[0]))

    def dim_neg(self, c):
        return ast.DimNeg(c[1], self._t(c[0]))

    def dim_bin(self, c):
        left, op, right = c
        return ast.DimBin(str(op), left, right, self._t(op))

    # expressions
    def number(self, c):
        return ast.Num(float(c[0]), self._t(c[0]))

    def ref(self, c):
        t = c[0]
        return ast.Ref(t.name, t.next, t.loc)

    def binop(self, c):
        left, op, right = c
        return ast.BinOp(str(op), left, right, self._t(op))

    def neg(self, c):
        return ast.Neg(c[1], self._t(c[0]))

    def call(self, c):
        name, *args = c
        return ast.Call(str(name), tuple(a for a in args if a is not None), self._t(name))

    @v_args(meta=True)
    def concat(self, meta, c):
        return ast.Concat(tuple(c), self._m(meta))


def parse(text: str, file: str = "<spec>") -> ast.Spec:
    lines = text.splitlines()

    def loc(line, col):
        return Loc(file, line, col, lines[line - 1] if 0 < line <= len(lines) else "")

    try:
        tree = _parser().parse(text)
    except lark.UnexpectedCharacters as e:
        raise SpecError(Diagnostic(loc(e.line, e.column), f"unexpected character {text[e.pos_in_stream]!r}")) from None
    except lark.UnexpectedEOF as e:
        last = max(len(lines), 1)
        raise SpecError(Diagnostic(loc(last, len(lines[-1]) + 1 if lines else 1),
                                   "unexpected end of file" + _describe(e.expected))) from None
    except lark.UnexpectedToken as e:
        if e.token.type == "$END":
            last = max(len(lines), 1)
            where = loc(last, (len(lines[-1]) if lines else 0) + 1)
            what = "unexpected end of file"
        else:
            where = loc(e.line, e.column)
            what = f"unexpected {e.token.value!r}" if e.token.value else "unexpected token"
        raise SpecError(Diagnostic(where, what + _describe(e.expected))) from None
    items = _ToAst(file, lines).transform(tree)
    return ast.Spec(file, text, tuple(i for i in items if isinstance(i, ast.Cell)),
                    tuple(i for i in items if isinstance(i, ast.Network)))
