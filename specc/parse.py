"""Stage 1: spec text -> AST. Lark parses with grammar/rnn.lark; a Transformer builds AST nodes.

Lark's own exceptions are translated here, in one place, into specc's located diagnostics.
"""
from __future__ import annotations

import difflib
import functools
import re

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
_KEYWORDS = ast.KEYWORDS
# Where any of these may come next, an expression (or a size) may start.
_STARTS_EXPR = {"NAME", "NUMBER", "LPAR"}


def _literal(terminal: str) -> str:
    """How a terminal is written, from the grammar: 'input', '->'."""
    try:
        pattern = _parser().get_terminal(terminal).pattern
    except KeyError:
        return repr(terminal.lower())
    if isinstance(pattern, lark.lexer.PatternStr):
        return repr(pattern.value)
    return repr(terminal.lower())


def _describe(expected) -> str:
    expected = set(expected)
    words = []
    if _STARTS_EXPR <= expected:
        words.append("an expression")
        expected -= _STARTS_EXPR | {"SUB", "LSQB"}
    for name in sorted(expected):
        words.append(_TERMINALS.get(name) or _literal(name))
    words = sorted(set(words), key=lambda w: (not w[0].isalpha(), w))  # words first, then symbols
    if not words:
        return ""
    if len(words) > 8:
        words = words[:8] + ["..."]
    return "; expected " + (" or ".join(words) if len(words) == 2 else ", ".join(words))


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

    def const_decl(self, c):
        return ast.Param(str(c[0]), c[1], c[2], self._t(c[0]), const=True)

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
    """The AST of spec text; a SpecError with every syntax error found, each at its line and column."""
    lines = text.splitlines()
    try:
        tree = _parser().parse(text)
    except lark.LarkError as e:
        raise SpecError(_syntax_errors(text, file, e)) from None
    try:
        items = _ToAst(file, lines).transform(tree)
    except RecursionError:
        raise SpecError(Diagnostic(Loc(file, 1, 1, lines[0] if lines else ""),
                                   "an expression is nested too deeply to compile; split it into named values")) from None
    return ast.Spec(file, text, tuple(i for i in items if isinstance(i, ast.Cell)),
                    tuple(i for i in items if isinstance(i, ast.Network)))


def _syntax_errors(text: str, file: str, first: lark.LarkError) -> list[Diagnostic]:
    """The first syntax error, then those found by parsing again without the statement at fault.

    Lark stops at the first error. To report independent errors in other statements too, the
    statement holding the error is blanked out (line numbers kept) and the text parsed again;
    recovery stops at anything it cannot cut out cleanly (a cell header, a brace, a docstring),
    so that no error is reported that the first one caused.
    """
    diagnostics = [_diagnostic(text, file, first)]
    seen_lines = {diagnostics[0].loc.line}
    current, error = text, first
    for _ in range(20):
        blanked = _blank_statement(current, *_error_lines(current, error))
        if blanked is None:
            break
        current = blanked
        try:
            _parser().parse(current)
            break
        except lark.LarkError as e:
            if isinstance(e, lark.UnexpectedEOF) or (isinstance(e, lark.UnexpectedToken) and e.token.type == "$END"):
                break
            d = _diagnostic(current, file, e, original=text)
            # An error where no statement can be cut out (at a '}') is most likely caused by the cut.
            if d.loc.line in seen_lines or _blank_statement(current, *_error_lines(current, e)) is None:
                break
            seen_lines.add(d.loc.line)
            diagnostics.append(d)
            error = e
    return diagnostics


def _error_pos(e: lark.LarkError) -> int | None:
    if isinstance(e, lark.UnexpectedCharacters):
        return e.pos_in_stream
    if isinstance(e, lark.UnexpectedToken) and e.token.start_pos is not None:
        return e.token.start_pos
    return None


def _error_lines(text: str, e: lark.LarkError) -> tuple[int, int]:
    """(first, last) lines of the statement an error is in: from its outermost open bracket, if any."""
    line = getattr(e, "line", 1)
    pos = _error_pos(e)
    if pos is None:
        return line, line
    opened = [b for b in _unclosed(text[:pos]) if b[0] in "(["]
    return (min(opened[0][1], line) if opened else line), line


def _blank_statement(text: str, from_line: int, line: int) -> str | None:
    """`text` with the statement on lines `from_line` to `line` replaced by blank lines, or None
    when that is unsafe.

    A statement runs over several lines when a line ends with an operator, '(' or ',' or the next
    begins with an operator or a closing bracket.
    """
    lines = text.split("\n")
    if not 0 < line <= len(lines):
        return None
    code = [_strip_comment(s).strip() for s in lines]

    def continues(i: int) -> bool:
        """Line i (0-based, not blank) continues the statement of the last non-blank line before it."""
        j = i - 1
        while j >= 0 and not code[j]:
            j -= 1
        if j < 0:
            return False
        return code[j].endswith(tuple("+-*/@(,[=~>:.")) or code[i].startswith(tuple("+-*/@)],.:"))

    first = min(from_line, line) - 1
    while first > 0 and (not code[first] or continues(first)):
        first -= 1
    last = line
    while last < len(lines) and (not code[last] or continues(last)):
        last += 1
    while last > line and not code[last - 1]:
        last -= 1
    region = code[first:last]
    if region[0].startswith(("cell", "network", "}")) or any(ch in s for s in region for ch in '{}"'):
        return None
    return "\n".join(lines[:first] + [""] * (last - first) + lines[last:])


def _strip_comment(s: str) -> str:
    return s.split("#", 1)[0]


def _diagnostic(text: str, file: str, e: lark.LarkError, original: str | None = None) -> Diagnostic:
    """One of lark's exceptions as a located diagnostic; `original` is the text shown for the line."""
    lines = text.splitlines()
    shown = (original if original is not None else text).splitlines()

    def loc(line, col):
        return Loc(file, line, col, shown[line - 1] if 0 < line <= len(shown) else "")

    def end_of_file() -> Loc:
        last = len(lines)
        while last > 1 and not _strip_comment(lines[last - 1]).strip():
            last -= 1
        if not lines:
            return loc(1, 1)
        return loc(last, len(_strip_comment(lines[last - 1]).rstrip()) + 1)

    def eof_message(expected) -> str:
        if not _strip_comment_all(text).strip():
            return "the file holds no cell; a spec starts with: cell name(I, H) { ... }"
        opened = _unclosed(text)
        if opened:
            char, line, col = opened[-1]
            if char != "{":
                return f"unexpected end of file: the '{char}' at line {line}, column {col} is not closed"
            block = None
            for i, s in enumerate(lines[:line]):
                m = re.match(r"\s*(cell|network)\s+([A-Za-z_]\w*)", s)
                if m:
                    block = f"{m.group(1)} '{m.group(2)}' (line {i + 1})"
            return f"unexpected end of file: {block or 'a block'} is not closed with '}}'"
        return "unexpected end of file" + _describe(expected)

    if isinstance(e, lark.UnexpectedCharacters):
        char = text[e.pos_in_stream]
        if text.startswith('"""', e.pos_in_stream):
            return Diagnostic(loc(e.line, e.column), 'unterminated docstring: no closing """')
        if char == '"':
            return Diagnostic(loc(e.line, e.column), 'unexpected character \'"\'; a docstring is written """text"""')
        return Diagnostic(loc(e.line, e.column), f"unexpected character {char!r}")
    if isinstance(e, lark.UnexpectedEOF):
        return Diagnostic(end_of_file(), eof_message(set(e.expected)))
    if isinstance(e, lark.UnexpectedToken):
        expected = set(e.expected)
        if e.token.type == "$END":
            return Diagnostic(end_of_file(), eof_message(expected))
        where = loc(e.line, e.column)
        opened = [b for b in _unclosed(text[:e.token.start_pos]) if b[0] in "(["] if e.token.start_pos else []
        if opened and opened[-1][1] < e.line and _starts_statement(lines[e.line - 1], e.column):
            # A bracket left open on an earlier line: the statement runs on into the next one.
            char, line, col = opened[-1]
            last = e.line - 1
            while last > line and not _strip_comment(lines[last - 1]).strip():
                last -= 1
            end = len(_strip_comment(lines[last - 1]).rstrip()) + 1
            closer = {"(": ")", "[": "]"}[char]
            return Diagnostic(loc(last, end), f"'{closer}' expected: the '{char}' at line {line}, column {col} "
                                              f"is not closed before {e.token.value!r} on line {e.line}")
        keyword = _misspelt_keyword(lines, e.line, e.column)
        if keyword is not None:
            word, col, suggestion = keyword
            return Diagnostic(loc(e.line, col), f"unknown keyword '{word}'; did you mean '{suggestion}'?")
        value = e.token.value
        what = f"unexpected {value!r}" if value else "unexpected token"
        if e.token.type == "NAME" and value in _KEYWORDS:
            what = f"unexpected keyword {value!r}"
        before = lines[e.line - 1][:e.column - 1].strip() if e.line <= len(lines) else ""
        if before in _KEYWORDS and value in ("'", "=", ","):
            line = lines[e.line - 1]
            return Diagnostic(loc(e.line, len(line) - len(line.lstrip()) + 1),
                              f"'{before}' is a keyword of the language; a value cannot take it as its name")
        return Diagnostic(where, what + _describe(expected))
    return Diagnostic(None, f"cannot parse: {e}")


def _unclosed(text: str) -> list[tuple[str, int, int]]:
    """The brackets still open at the end of `text` (comments and docstrings skipped), innermost last."""
    stack: list[tuple[str, int, int]] = []
    pairs = {")": "(", "]": "[", "}": "{"}
    for number, line in enumerate(re.sub(r'"""(.|\n)*?"""', lambda m: re.sub(r"[^\n]", " ", m.group()), text)
                                  .split("\n"), 1):
        for col, ch in enumerate(_strip_comment(line), 1):
            if ch in "([{":
                stack.append((ch, number, col))
            elif ch in pairs and stack and stack[-1][0] == pairs[ch]:
                stack.pop()
    return stack


_STATEMENT = re.compile(r"\s*(?:(?:cell|network|input|state|param|const|output|layer)\b|}|"
                        r"[A-Za-z_]\w*'?\s*(?:,\s*[A-Za-z_]\w*'?\s*)*=(?!=))")


def _starts_statement(line: str, col: int) -> bool:
    """Whether the token at `col` is the first on its line and begins a statement there."""
    return not line[:col - 1].strip() and bool(_STATEMENT.match(line))


def _strip_comment_all(text: str) -> str:
    return "\n".join(_strip_comment(s) for s in text.split("\n"))


def _misspelt_keyword(lines: list[str], line: int, col: int):
    """(word, column, keyword) when the error is in a line whose first word is close to a keyword."""
    if not 0 < line <= len(lines):
        return None
    m = re.match(r"(\s*)([A-Za-z_]\w*)\s+[A-Za-z_]", lines[line - 1])
    # Two names in a row begin a statement only after a keyword: `param W[...]`, `layer enc = ...`.
    if m is None or m.end(2) >= col:
        return None
    word = m.group(2)
    close = difflib.get_close_matches(word, _KEYWORDS, n=1, cutoff=0.6)
    if not close or word in _KEYWORDS:
        return None
    return word, len(m.group(1)) + 1, close[0]
