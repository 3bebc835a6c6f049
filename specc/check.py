"""Stage 2: AST -> checked cell. Every name resolves, every shape agrees, every state gets exactly
one next value, and no value within a step depends on itself. All problems found are reported
together, each at its line and column.
"""
from __future__ import annotations

import builtins
import difflib
import keyword
import math
from dataclasses import dataclass
from fractions import Fraction

from . import ast, ops
from .backends import generated_names
from .errors import Collector, Loc, SpecError
from .ir import Type
from .shapes import Shape, Size, shape_str

# Initialisers and how many scalar arguments each takes.
INITS = {
    "zeros": (0,), "ones": (0,), "constant": (1,), "uniform": (1, 2), "normal": (1, 2),
    "orthogonal": (0, 1), "identity": (0, 1), "learned": (0, 1),
}
# `learned`, `learned(v)`: a parameter NAME_init of the module, starting at 0 (or v), used where the
# caller gives no initial state.
STATE_INITS = ("zeros", "ones", "constant", "learned")
LEARNED_SUFFIX = "_init"
PARAM_INITS = tuple(name for name in INITS if name != "learned")
# Names the generated code uses for itself beside the dimensions, which it takes verbatim as
# keyword arguments (the spec's other names it renames where they clash: a value named T is
# T_2 there). A dimension may not take them.
RESERVED = {"np", "tl", "triton", "torch", "self", "T", "B", "t", "rows", "dims", "specc"}
# Dimensions are also keyword arguments, verbatim, of the generated functions (beside the names
# those functions use) and of specc.load and the generated module class.
RESERVED_DIMS = (
    set(dir(builtins))
    | {"math", "sys", "init", "rt", "p", "s", "e", "dtype", "train", "saved", "CellModule"}
    | {"CELL", "SPEC_FILE", "DOC", "DIMS", "INPUTS", "STATES", "PARAMS", "CONSTS", "LEARNED", "NOISE", "DIM_NAMES", "OUTPUTS",
       "sizes", "init_params", "state_fill", "forward", "backward", "check_sizes", "Fraction", "size"}
    | {"spec", "cell", "batch_first", "backend", "program", "scan"}
    | generated_names()
)
# Dimensions are passed to specc.load and to a compiled module's class as keyword arguments
# beside these (the generated code's own names are no obstacle: dimnames.py renames there).
LOAD_KEYWORDS = {"spec", "cell", "batch_first", "backend", "dtype", "self", "program", "scan"}
# Parameters become attributes of the torch.nn.Module (specc.runtime.CellModule): they may not
# take the name of one of its methods or attributes. tests/test_errors.py checks this list
# against the installed torch.
MODULE_ATTRS = frozenset("""
    T_destination add_module apply backend backend_choice batch_first bfloat16 buffers call_super_init cell_name children
    compile cpu cuda dims double draw_noise dump_patches eval extra_repr float forward get_buffer
    get_extra_state get_parameter get_submodule half initial_state ipu load_state_dict modules mtia
    named_buffers named_children named_modules named_parameters parameters program register_backward_hook scan
    register_buffer register_forward_hook register_forward_pre_hook register_full_backward_hook
    register_full_backward_pre_hook register_load_state_dict_post_hook
    register_load_state_dict_pre_hook register_module register_parameter
    register_state_dict_post_hook register_state_dict_pre_hook requires_grad_ reset_parameters
    set_extra_state set_submodule share_memory sizes state_dict to to_empty train training type
    xpu zero_grad
""".split())


@dataclass(frozen=True)
class Decl:
    name: str
    shape: Shape
    init: ast.Init | None
    loc: Loc


@dataclass(frozen=True)
class Equation:
    targets: tuple[ast.Target, ...]
    expr: ast.Expr
    loc: Loc


@dataclass(frozen=True)
class Noise:
    """A mask the module draws for one call of dropout(v, p) or zoneout(v_next, v, p), handed to
    the step as an extra input `name` (the last inputs of the cell)."""

    name: str
    kind: str  # "dropout" | "zoneout"
    p: float
    loc: Loc  # the call's


@dataclass(frozen=True)
class SizeRule:
    """A size that must come out a positive whole number once the dimensions are bound."""
    size: Size
    what: str  # what has this size, for the message: "parameter W_ih", "each part of split(..., 2)"
    loc: Loc


@dataclass(frozen=True)
class CheckedCell:
    name: str
    doc: str
    file: str
    dims: tuple[str, ...]
    inputs: tuple[Decl, ...]
    states: tuple[Decl, ...]
    params: tuple[Decl, ...]
    equations: tuple[Equation, ...]  # in an order where every value is defined before use
    outputs: tuple[tuple[str, ast.Target], ...]
    loc: Loc
    sizes: tuple[SizeRule, ...] = ()  # what check_dims verifies when the dimensions are bound
    consts: frozenset[str] = frozenset()  # the params declared `const`: buffers, with no gradient
    noise: tuple[Noise, ...] = ()  # their inputs are the last of `inputs`
    dim_names: tuple[tuple[str, str], ...] = ()  # (spec's, generated code's): see dimnames.py

    @property
    def own_inputs(self) -> tuple[Decl, ...]:
        """The inputs a caller hands in (not the masks the module draws)."""
        return self.inputs[:len(self.inputs) - len(self.noise)]


def _number(value: float) -> str:
    return f"{value:g}"


def dim_size(d: ast.Dim, dims: set[str], errors: Collector, what: str = "size") -> Size | None:
    """A shape entry as a polynomial in the dimensions, or None after reporting why not. `what` names
    the quantity in the messages (a network's start token is a whole number written the same way)."""
    if isinstance(d, ast.DimNum):
        if not math.isfinite(d.value) or d.value != int(d.value) or d.value < 0:
            errors.error(d.loc, f"a {what} must be a whole number, got {_number(d.value)}")
            return None
        if d.value >= 2 ** 53:
            errors.error(d.loc, f"the {what} {_number(d.value)} is too large")
            return None
        return Size.of(int(d.value))
    if isinstance(d, ast.DimName):
        if d.name not in dims:
            errors.error(d.loc, f"unknown dimension '{d.name}'" + _suggest(d.name, dims)
                         + (f"; declare it in the cell's header, e.g. cell name({', '.join(sorted(dims) + [d.name])})"))
            return None
        return Size.of(d.name)
    if isinstance(d, ast.DimNeg):
        inner = dim_size(d.arg, dims, errors, what)
        return None if inner is None else -inner
    if isinstance(d, ast.DimCall):
        errors.error(d.loc, f"{d.fn}(...) cannot be used in a " + ("shape" if what == "size" else what))
        return None
    left, right = dim_size(d.left, dims, errors, what), dim_size(d.right, dims, errors, what)
    if left is None or right is None:
        return None
    if d.op == "/":
        k = right.constant
        if k is None or k.denominator != 1 or k <= 0:
            errors.error(d.loc, f"a {what} can only be divided by a positive whole number")
            return None
        return left / int(k)
    return {"+": left + right, "-": left - right, "*": left * right}[d.op]


def _size_problem(size: Size) -> str | None:
    """Why a size can never be a positive whole number, whatever the dimensions; else None."""
    k = size.constant
    if k is not None:
        if k <= 0:
            return f"a size must be positive, got {k}"
        if k.denominator != 1:
            return f"a size must be a whole number, got {k}"
        return None
    if all(c <= 0 for _, c in size.terms):
        return f"the size {size} is never positive"
    return None


class BindError(SpecError, ValueError):
    """A spec that checks, bound to dimensions that make part of it wrong (an initialiser's
    argument, a start token): reported at its line like any SpecError, and a ValueError, as a bad
    argument of specc.load is."""


@dataclass(frozen=True)
class Range:
    """Every value a scalar can take over all bindings of the dimensions (each a whole number from 1
    up): lo to hi, each end included or not. An infinite end is never included, unless the value
    overflows to it."""
    lo: float
    lo_in: bool
    hi: float
    hi_in: bool

    @staticmethod
    def point(v: float) -> "Range":
        return Range(v, True, v, True)

    @property
    def fixed(self) -> bool:
        return self.lo == self.hi and self.lo_in and self.hi_in

    def below(self, x: float) -> bool:
        """Every value is less than x."""
        return self.hi < x or (self.hi == x and not self.hi_in)

    def at_least(self, x: float) -> bool:
        """Every value is x or more."""
        return self.lo >= x

    def holds(self, x: float) -> bool:
        return (self.lo < x or (self.lo == x and self.lo_in)) and (x < self.hi or (x == self.hi and self.hi_in))


_ANY = Range(-math.inf, False, math.inf, False)
_DIM = Range(1.0, True, math.inf, False)


def _float(k) -> float:
    try:
        return float(k)
    except OverflowError:
        return math.inf if k > 0 else -math.inf


def size_range(size: Size) -> Range:
    """The values of a polynomial in the dimensions: each monomial is 1 when every dimension is 1,
    and grows without bound, so the constant term plus the positive coefficients is the least value
    (when no coefficient is negative), and likewise for the greatest."""
    c0 = sum((c for m, c in size.terms if not m), Fraction(0))
    pos = [c for m, c in size.terms if m and c > 0]
    neg = [c for m, c in size.terms if m and c < 0]
    lo = (_float(c0 + sum(pos)), True) if not neg else (-math.inf, False)
    hi = (_float(c0 + sum(neg)), True) if not pos else (math.inf, False)
    return Range(lo[0], lo[1], hi[0], hi[1])


def _polynomial(d: ast.Dim, dims: set[str]) -> Size | None:
    """The argument as a polynomial in the dimensions (exact, so H - H is 0), or None where it takes
    a square root or divides by something other than a number."""
    if isinstance(d, ast.DimNum):
        return Size.of(Fraction(d.value)) if math.isfinite(d.value) else None
    if isinstance(d, ast.DimName):
        return Size.of(d.name) if d.name in dims else None
    if isinstance(d, ast.DimNeg):
        inner = _polynomial(d.arg, dims)
        return None if inner is None else -inner
    if isinstance(d, ast.DimBin):
        left, right = _polynomial(d.left, dims), _polynomial(d.right, dims)
        if left is None or right is None:
            return None
        if d.op == "/":
            k = right.constant
            return None if k is None or k == 0 else Size(tuple((m, c / k) for m, c in left.terms))
        return {"+": left + right, "-": left - right, "*": left * right}[d.op]
    return None


def _ends(r: Range):
    return ((r.lo, r.lo_in), (r.hi, r.hi_in))


def _hull(candidates) -> Range:
    lo = min(v for v, _ in candidates)
    hi = max(v for v, _ in candidates)
    return Range(lo, any(i for v, i in candidates if v == lo), hi, any(i for v, i in candidates if v == hi))


def _by_sign(a: Range, b: Range) -> Range:
    """a * b or a / b (b never 0) from the signs alone."""
    def sign(r):
        if r.lo > 0 or (r.lo == 0 and not r.lo_in):
            return 1, True
        if r.lo >= 0:
            return 1, False
        if r.hi < 0 or (r.hi == 0 and not r.hi_in):
            return -1, True
        if r.hi <= 0:
            return -1, False
        return 0, False
    (sa, strict_a), (sb, strict_b) = sign(a), sign(b)
    if not sa or not sb:
        return _ANY
    strict = strict_a and strict_b
    return Range(0.0, not strict, math.inf, False) if sa == sb else Range(-math.inf, False, 0.0, not strict)


def scalar_range(d: ast.Dim, dims: set[str], problems: list | None = None) -> Range | None:
    """The values an initialiser argument takes over every binding of the dimensions, computed as the
    generated code computes it (in floats, so a number alone comes out exactly as it will at load),
    or None where it names something unknown or has a number too large. What fails whatever the dimensions (a division by
    zero, the square root of a negative number) is appended to `problems` as (loc, message)."""
    problems = [] if problems is None else problems
    if _names(d) - dims:
        return None
    if _names(d):
        poly = _polynomial(d, dims)
        if poly is not None:
            return size_range(poly)
    if isinstance(d, ast.DimNum):
        return Range.point(d.value) if math.isfinite(d.value) else None  # check_scalar reports it
    if isinstance(d, ast.DimName):
        return _DIM
    if isinstance(d, ast.DimNeg):
        r = scalar_range(d.arg, dims, problems)
        return None if r is None else Range(-r.hi, r.hi_in, -r.lo, r.lo_in)
    if isinstance(d, ast.DimCall):
        r = scalar_range(d.arg, dims, problems)
        if r is None or d.fn != "sqrt":
            return None
        if r.below(0):
            problems.append((d.loc, f"sqrt({scalar_text(d.arg)}) is the square root of a negative number"
                                    + ("" if not _names(d.arg) else ": " + _never(d.arg, r, "< 0", lead=""))))
            return None
        if r.lo < 0:
            return Range(0.0, True, math.sqrt(r.hi), r.hi_in)
        return Range(math.sqrt(r.lo), r.lo_in, math.sqrt(r.hi), r.hi_in)
    a, b = scalar_range(d.left, dims, problems), scalar_range(d.right, dims, problems)
    if a is None or b is None:
        return None
    if d.op == "+":
        return Range(a.lo + b.lo, a.lo_in and b.lo_in, a.hi + b.hi, a.hi_in and b.hi_in)
    if d.op == "-":
        return Range(a.lo - b.hi, a.lo_in and b.hi_in, a.hi - b.lo, a.hi_in and b.lo_in)
    if d.op == "*":
        # 0 times an unbounded end: 0 is the bound, included where the 0 is.
        candidates = [(0.0 if x == 0 or y == 0 else x * y, (xi and yi) or (x == 0 and xi) or (y == 0 and yi))
                      for x, xi in _ends(a) for y, yi in _ends(b)]
        if any(math.isnan(v) for v, _ in candidates):
            return _by_sign(a, b)
        return _hull(candidates)
    if b.fixed and b.lo == 0:
        problems.append((d.loc, f"{scalar_text(d)} divides by zero"
                                + ("" if not _names(d.right) else ": " + _never(d.right, b, "= 0", lead=""))))
        return None
    if b.holds(0):
        return _ANY  # a division by zero for some dimensions: found at load, when they are known
    if b.lo <= 0 <= b.hi or any(math.isinf(x) and math.isinf(y) for x, _ in _ends(a) for y, _ in _ends(b)):
        return _by_sign(a, b)  # 0 is an end b never reaches, or inf / inf: the signs still tell
    return _hull([(x / y, (xi and yi) or (x == 0 and xi)) for x, xi in _ends(a) for y, yi in _ends(b)])


def _names(d: ast.Dim) -> set[str]:
    if isinstance(d, ast.DimName):
        return {d.name}
    if isinstance(d, ast.DimBin):
        return _names(d.left) | _names(d.right)
    if isinstance(d, (ast.DimNeg, ast.DimCall)):
        return _names(d.arg)
    return set()


def scalar_text(d: ast.Dim, outer: int = 0) -> str:
    """An initialiser argument written out again, with only the parentheses it needs."""
    if isinstance(d, ast.DimNum):
        return _number(d.value)
    if isinstance(d, ast.DimName):
        return d.name
    if isinstance(d, ast.DimCall):
        return f"{d.fn}({scalar_text(d.arg)})"
    if isinstance(d, ast.DimNeg):
        return "-" + scalar_text(d.arg, 3)
    level = 1 if d.op in "+-" else 2
    text = f"{scalar_text(d.left, level)} {d.op} {scalar_text(d.right, level + 1)}"
    return f"({text})" if level < outer else text


def scalar_start(d: ast.Dim) -> Loc:
    """Where an argument begins (a binary operation's own location is its operator)."""
    return scalar_start(d.left) if isinstance(d, ast.DimBin) else d.loc


def _never(d: ast.Dim, r: Range, relation: str, lead: str = "but ") -> str:
    """'but -1 / sqrt(H) < 0 for every H', or for a number alone, 'got' its value."""
    names = sorted(_names(d))
    if not names:
        return f"got {_number(r.lo)}"
    every = " and ".join(names) if len(names) <= 2 else ", ".join(names[:-1]) + " and " + names[-1]
    return f"{lead}{scalar_text(d)} {relation} for every {every}"


def _check_init_values(init: ast.Init, dims: set[str], errors: Collector) -> None:
    """What the arguments of an initialiser must be, where the text alone decides it: numbers are
    computed as at load, and an argument made with dimensions is reported when it is wrong for every
    binding of them (dimensions are whole numbers from 1 up), so -1 / sqrt(H) is never a valid k.
    What depends on the dimensions' values is checked at load (bind_inits)."""
    problems: list = []
    ranges = [scalar_range(a, dims, problems) for a in init.args]
    for loc, message in problems:
        errors.error(loc, message)
    if init.name in INITS and len(init.args) not in INITS[init.name]:
        return
    for a, r in zip(init.args, ranges):
        if r is not None and r.fixed and math.isinf(r.lo):
            errors.error(scalar_start(a), f"{scalar_text(a)} overflows to infinity")
            return
    args = init.args
    if init.name == "uniform" and len(args) == 1 and ranges[0] is not None and ranges[0].below(0):
        errors.error(scalar_start(args[0]), "uniform(k) draws from U(-k, k): k must be 0 or more, "
                                            + _never(args[0], ranges[0], "< 0"))
    elif init.name == "uniform" and len(args) == 2 and None not in ranges:
        a, b = ranges
        width = scalar_range(ast.DimBin("-", args[1], args[0], init.loc), dims)
        if a.lo > b.hi or (a.lo == b.hi and not (a.lo_in and b.hi_in)) or (width is not None and width.below(0)):
            if _names(args[0]) or _names(args[1]):
                every = " and ".join(sorted(_names(args[0]) | _names(args[1])))
                why = f"but {scalar_text(args[0])} > {scalar_text(args[1])} for every {every}"
            else:
                why = f"got {_number(a.lo)} > {_number(b.lo)}"
            errors.error(init.loc, f"uniform(a, b) draws from U(a, b): a must not exceed b, {why}")
    elif init.name == "normal" and ranges and ranges[-1] is not None and ranges[-1].below(0):
        errors.error(scalar_start(args[-1]), "normal's standard deviation must be 0 or more, "
                                             + _never(args[-1], ranges[-1], "< 0"))


def scalar_value(d: ast.Dim, dims: dict[str, int]):
    """An initialiser argument's value for these dimensions, computed as the generated code computes
    it (assemble.scalar_code); a step that fails (a division by zero, the square root of a negative
    number) raises _Fails at that step."""
    if isinstance(d, ast.DimNum):
        return d.value
    if isinstance(d, ast.DimName):
        return dims[d.name]
    if isinstance(d, ast.DimNeg):
        return -scalar_value(d.arg, dims)
    if isinstance(d, ast.DimCall):
        v = scalar_value(d.arg, dims)
        try:
            return math.sqrt(v)
        except (ValueError, OverflowError):
            raise _Fails(d.loc, f"sqrt({scalar_text(d.arg)}) = sqrt({_number(v)}), the square root of a "
                                "negative number" if v < 0 else f"{scalar_text(d.arg)} is too large") from None
    a, b = scalar_value(d.left, dims), scalar_value(d.right, dims)
    if d.op == "/" and b == 0:
        raise _Fails(d.loc, f"{scalar_text(d)} divides by {scalar_text(d.right)} = 0")
    try:
        return {"+": lambda: a + b, "-": lambda: a - b, "*": lambda: a * b, "/": lambda: a / b}[d.op]()
    except OverflowError:
        raise _Fails(d.loc, f"{scalar_text(d)} is too large") from None


class _Fails(Exception):
    """A step of scalar_value that fails for these dimensions, and where it is written."""

    def __init__(self, loc: Loc, message: str):
        super().__init__(message)
        self.loc, self.message = loc, message


def bind_inits(cell: CheckedCell, values: dict[str, int], dtype=None, context: str = "") -> None:
    """Raise BindError, at the spec's line, for each initialiser that these dimensions give an
    argument torch would refuse (a negative spread, an empty range, a division by zero) or that is
    not a finite number, before the module is made: what the checker could not decide from the
    text alone. `values` are the cell's dimensions, already checked; `dtype` the parameters' (a
    uniform range must fit in it); `context` says where the cell is used (a network's layer)."""
    import torch

    dtype = dtype or torch.get_default_dtype()
    largest = torch.finfo(dtype).max
    bound = ", ".join(f"{d}={values[d]}" for d in cell.dims)
    head = f"with {bound}" + (f" ({context})" if context else "") + ", "
    errors = Collector()
    for decl in (*cell.states, *cell.params):
        init = decl.init
        if init is None or not init.args:
            continue
        try:
            args = [float(scalar_value(a, values)) for a in init.args]
        except _Fails as e:
            errors.error(e.loc, f"{head}{init.name} for {decl.name} cannot be computed: {e.message}")
            continue
        except OverflowError:
            errors.error(init.loc, f"{head}an argument of {init.name} for {decl.name} is too large")
            continue

        def shown(i: int) -> str:
            a = init.args[i]
            return f"{scalar_text(a)} = {_number(args[i])}" if _names(a) else _number(args[i])

        bad = [i for i, v in enumerate(args) if not math.isfinite(v)]
        if bad:
            errors.error(scalar_start(init.args[bad[0]]), f"{head}{init.name}'s argument {shown(bad[0])} for "
                                                          f"{decl.name} is not a finite number")
        elif init.name == "uniform":
            low, high = (-args[0], args[0]) if len(args) == 1 else args
            if low > high:
                what = (f"k must be 0 or more, got {shown(0)}" if len(args) == 1
                        else f"a must not exceed b, got {shown(0)} > {shown(1)}")
                where = scalar_start(init.args[0]) if len(args) == 1 else init.loc
                form = "uniform(k) draws from U(-k, k)" if len(args) == 1 else "uniform(a, b) draws from U(a, b)"
                errors.error(where, f"{head}{form}: {what}")
            elif max(abs(low), abs(high)) > largest or high - low > largest:
                errors.error(init.loc, f"{head}uniform's range [{_number(low)}, {_number(high)}] for {decl.name} "
                                       f"is too wide for {str(dtype).removeprefix('torch.')} (its width and ends "
                                       f"must be at most {_number(largest)})")
        elif init.name == "normal" and args[-1] < 0:
            errors.error(scalar_start(init.args[-1]), f"{head}normal's standard deviation must be 0 or more, "
                                                      f"got {shown(len(args) - 1)}")
    raise_bound(errors)


def raise_bound(errors: Collector) -> None:
    """raise_if_any, as a BindError."""
    try:
        errors.raise_if_any()
    except SpecError as e:
        raise BindError(e.diagnostics) from None


def check_scalar(d: ast.Dim, dims: set[str], errors: Collector) -> None:
    """Initialiser arguments: numbers, dimensions, + - * / and sqrt."""
    if isinstance(d, ast.DimNum) and not math.isfinite(d.value):
        errors.error(d.loc, "this number is too large (it overflows to infinity)")
    elif isinstance(d, ast.DimName) and d.name not in dims:
        errors.error(d.loc, f"unknown dimension '{d.name}'" + _suggest(d.name, dims)
                     + "; an initialiser's arguments are numbers and the cell's dimensions")
    elif isinstance(d, ast.DimCall):
        if d.fn != "sqrt":
            errors.error(d.loc, f"unknown function '{d.fn}' in an initialiser; only sqrt is allowed")
        check_scalar(d.arg, dims, errors)
    elif isinstance(d, ast.DimNeg):
        check_scalar(d.arg, dims, errors)
    elif isinstance(d, ast.DimBin):
        check_scalar(d.left, dims, errors)
        check_scalar(d.right, dims, errors)


def _suggest(name: str, candidates) -> str:
    close = difflib.get_close_matches(name, sorted(set(candidates) - {name}), n=1)
    return f"; did you mean '{close[0]}'?" if close else ""


def check(spec: ast.Spec) -> list[CheckedCell]:
    errors = Collector()
    cells = []
    seen = {}
    for cell in spec.cells:
        if cell.name in seen:
            errors.error(cell.loc, f"cell '{cell.name}' is defined twice (first at line {seen[cell.name].line})")
        else:
            seen[cell.name] = cell.loc
        checked = _check_cell(cell, spec.file, errors)
        if checked is not None:
            cells.append(checked)
    errors.raise_if_any()
    return cells


_ARTICLE = {"input": "an input", "parameter": "a parameter", "value": "a value", "state": "a state",
            "dimension": "a dimension", "output": "an output"}


def _reserved(name: str, what: str) -> str | None:
    """Why `name` may not be used for a `what`, or None."""
    if keyword.iskeyword(name) or keyword.issoftkeyword(name) or name.startswith("__"):
        return "is a reserved name"
    if name in ast.KEYWORDS:
        return "is a keyword of the language (it starts a declaration)"
    if what == "dimension" and name in LOAD_KEYWORDS:
        return "is a reserved name (specc.load and the module take it as a keyword of their own)"
    if what == "parameter" and (name in MODULE_ATTRS or name.startswith("_")):
        return "is a reserved name (parameters become attributes of the torch module, which has one of that name)"
    return None


def _check_cell(cell: ast.Cell, file: str, errors: Collector) -> CheckedCell | None:
    """The checked cell, or None after reporting every problem found in it.

    A name whose declaration or equation is in error is still known afterwards, with no type:
    uses of it are not reported again, so each problem is reported once, where it is.
    """
    start = len(errors.diagnostics)
    c = _CellChecker(errors)
    for name, loc in cell.dims:
        # A refused name is still a dimension of this cell: its uses are not errors of their own.
        c.define(name, loc, "dimension")
        c.dims.add(name)
    assigns, outputs = c.declarations(cell.stmts)
    equations = c.equations(assigns, outputs)
    for d in c.states:
        excused = d.name in c.assigned_unprimed or ((d.name, True) in c.env and c.env[(d.name, True)] is None)
        if (d.name, True) not in c.defs and not excused:
            errors.error(d.loc, f"state '{d.name}' has no next value; add an equation {d.name}' = ...")
    if not outputs:
        errors.error(cell.loc, f"cell '{cell.name}' has no output; add a line such as: output h'")
    for d in c.states:
        if d.init is not None and d.init.name == "learned" and d.name + LEARNED_SUFFIX in c.defined:
            errors.error(d.loc, f"state '{d.name}' is learned, so the module has a parameter "
                                f"'{d.name}{LEARNED_SUFFIX}' for its initial value; rename the other "
                                f"'{d.name}{LEARNED_SUFFIX}'")
    ordered = c.typed(equations)
    output_list = c.outputs(outputs)
    if len(errors.diagnostics) > start:
        return None
    noise = _noise(ordered, c.env)
    masks = tuple(Decl(n.name, shape, None, n.loc) for n, shape in noise)
    return CheckedCell(cell.name, cell.doc, file, tuple(n for n, _ in cell.dims), tuple(c.inputs) + masks,
                       tuple(c.states), tuple(c.params), tuple(ordered), tuple(output_list), cell.loc, tuple(c.rules),
                       frozenset(c.consts), tuple(n for n, _ in noise))


def _calls(expr: ast.Expr):
    yield from (e for e in _subexpressions(expr) if isinstance(e, ast.Call))


def _noise(equations, env) -> list[tuple[Noise, Shape]]:
    """A mask input for each dropout and zoneout call, named after its kind and place (a spec name
    cannot start with two underscores), with the shape of what it masks."""
    found = []
    for eq in equations:
        for call in _calls(eq.expr):
            if call.fn in ("dropout", "zoneout"):
                shape = type_of(call.args[0], env, Collector()).shape
                name = f"__{call.fn}_{call.loc.line}_{call.loc.col}"
                found.append((Noise(name, call.fn, number_written(call.args[-1]), call.loc), shape))
    return found


class _CellChecker:
    """What _check_cell learns of one cell as it reads it: the names defined and their kinds, the
    type of every value a step sees (`env`; None for a value whose definition is in error), and
    the equations defining each value."""

    def __init__(self, errors: Collector):
        self.errors = errors
        self.defined: dict[str, Loc] = {}
        self.kinds: dict[str, str] = {}  # name -> "dimension" | "input" | "state" | "parameter" | "value"
        self.consts: set[str] = set()  # the parameters declared `const`
        self.rules: list[SizeRule] = []
        self.dims: set[str] = set()
        self.env: dict[tuple[str, bool], Type | None] = {}
        self.inputs: list[Decl] = []
        self.states: list[Decl] = []
        self.params: list[Decl] = []
        self.state_names: set[str] = set()
        self.defs: dict[tuple[str, bool], Equation] = {}  # (name, is_next) -> its defining equation
        self.assigned_unprimed: set[str] = set()

    def define(self, name: str, loc: Loc, what: str) -> bool:
        why = _reserved(name, what)
        if why is not None:
            self.errors.error(loc, f"'{name}' {why}; choose another name for this {what}")
            if name not in self.defined:
                self.defined[name], self.kinds[name] = loc, what
            return False
        if name in self.defined:
            self.errors.error(loc, f"'{name}' is defined twice (first as {_ARTICLE[self.kinds[name]]} at line "
                                   f"{self.defined[name].line})")
            return False
        self.defined[name], self.kinds[name] = loc, what
        return True

    def shape_of(self, dims_ast, what: str) -> Shape | None:
        sizes = [dim_size(d, self.dims, self.errors) for d in dims_ast]
        ok = True
        for d, size in zip(dims_ast, sizes):
            if size is None:
                ok = False
                continue
            problem = _size_problem(size)
            if problem is not None:
                self.errors.error(d.loc, problem)
                ok = False
            elif size.constant is None:
                self.rules.append(SizeRule(size, what, d.loc))
        return tuple(sizes) if ok else None

    def check_init(self, init: ast.Init | None, allowed) -> None:
        if init is None:
            return
        if init.name not in allowed:
            hint = _suggest(init.name, allowed)
            self.errors.error(init.loc, f"unknown initialiser '{init.name}'" + (hint or f"; expected one of {', '.join(allowed)}")
                              + ("" if init.name not in INITS else " (a state starts from a constant)"))
            return
        counts = INITS[init.name]
        if len(init.args) not in counts:
            want = " or ".join(str(c) for c in counts)
            self.errors.error(init.loc, f"{init.name} takes {want} argument{'s' if counts[-1] != 1 else ''}, "
                                        f"got {len(init.args)}")
        for a in init.args:
            check_scalar(a, self.dims, self.errors)
        _check_init_values(init, self.dims, self.errors)

    def declarations(self, stmts) -> tuple[list[ast.Assign], list[ast.Output]]:
        """Inputs, states and parameters, declared; the equations and outputs, for later."""
        assigns: list[ast.Assign] = []
        outputs: list[ast.Output] = []
        for s in stmts:
            if isinstance(s, ast.Input):
                self._declare(s, "input", None, self.inputs)
            elif isinstance(s, ast.State):
                fresh = s.name not in self.defined
                ok = self._declare(s, "state", STATE_INITS, self.states)
                if fresh:
                    self.state_names.add(s.name)
                if not ok and (fresh or s.name not in self.state_names):
                    self.env[(s.name, True)] = None  # its next value is not reported missing or misused
            elif isinstance(s, ast.Param):
                if self._declare(s, "parameter", PARAM_INITS, self.params) and s.const:
                    self.consts.add(s.name)
            elif isinstance(s, ast.Assign):
                assigns.append(s)
            elif isinstance(s, ast.Output):
                outputs.append(s)
        return assigns, outputs

    def _declare(self, s, what: str, inits: tuple | None, into: list) -> bool:
        """Declare input, state or parameter s (with an initialiser from `inits`, if any)."""
        shape = self.shape_of(s.shape, f"{what} {s.name}")
        init = getattr(s, "init", None)
        if inits is not None:
            self.check_init(init, inits)
        fresh = s.name not in self.defined
        ok = self.define(s.name, s.loc, what) and shape is not None
        if ok and what != "parameter" and len(shape) != 1:
            self.errors.error(s.loc, f"{what} '{s.name}' must be a vector, got {shape_str(shape)}")
            ok = False
        if ok and what == "parameter" and len(shape) > 3:
            self.errors.error(s.loc, f"parameter '{s.name}' has {len(shape)} axes; at most 3 are supported")
            ok = False
        if ok:
            into.append(Decl(s.name, shape, init, s.loc))
        if fresh:
            self.env[(s.name, False)] = Type(shape, what != "parameter") if ok else None
        return ok

    def equations(self, assigns: list[ast.Assign], outputs: list[ast.Output]) -> list[Equation]:
        """The equations whose targets are well defined, in the order of assigns + outputs."""
        equations: list[Equation] = []
        position: dict[int, int] = {}  # id(equation) -> where it comes in assigns + outputs
        written = assigns + [o for o in outputs if o.expr is not None]
        # In source order, so that "first at line N" is the first; the equations keep the order above.
        for where, a in sorted(enumerate(written), key=lambda p: (p[1].loc.line, p[1].loc.col)):
            targets = a.targets if isinstance(a, ast.Assign) else (a.target,)
            ok, fresh = True, []
            for t in targets:
                if self._target(t):
                    fresh.append(t)
                else:
                    ok = False
            keys = [(t.name, t.next) for t in targets]
            if len(set(keys)) != len(keys):
                dup = next(t for i, t in enumerate(targets) if (t.name, t.next) in keys[:i])
                if ok:
                    self.errors.error(dup.loc, f"'{dup}' is assigned twice in one equation")
                ok = False
            eq = Equation(tuple(targets), a.expr, a.loc)
            if ok:
                for t in targets:
                    self.defs[(t.name, t.next)] = eq
                equations.append(eq)
                position[id(eq)] = where
            else:
                for t in fresh:  # known from here on, with no type: its uses are not errors too
                    self.env[(t.name, t.next)] = None
        return sorted(equations, key=lambda e: position[id(e)])

    def _target(self, t) -> bool:
        """Whether target t of an equation is one it may define (reporting why not)."""
        env, errors = self.env, self.errors
        if t.next:
            if (t.name, True) in env and env[(t.name, True)] is None and (t.name, True) not in self.defs:
                return False  # a state whose declaration is in error, or a misuse reported already
            if t.name not in self.state_names:
                kind = self.kinds.get(t.name)
                what = "is not declared" if kind is None else f"is {_ARTICLE[kind]}, not a state"
                errors.error(t.loc, f"{t.name}' gives a next value, but '{t.name}' {what}; only states have next values")
                env.setdefault((t.name, True), None)
                return False
            if (t.name, True) in self.defs:
                errors.error(t.loc, f"{t.name}' is defined twice (first at line {self.defs[(t.name, True)].loc.line})")
                return False
            return True
        if t.name in self.state_names:
            errors.error(t.loc, f"cannot assign to state '{t.name}'; write {t.name}' = ... for its next value")
            self.assigned_unprimed.add(t.name)
            return False
        if self.define(t.name, t.loc, "value"):
            return True
        if (t.name, False) not in self.defs:  # a reserved name, or another kind's: its uses are not errors too
            env.setdefault((t.name, False), None)
        return False

    def typed(self, equations: list[Equation]) -> list[Equation]:
        """The equations in the order a step computes them, each typed; next values checked against
        their states."""
        env = self.env
        ordered = _order(equations, self.defs, self.errors)
        in_order = {id(eq) for eq in ordered}
        for eq in equations:
            if id(eq) not in in_order:  # on a cycle, reported
                for t in eq.targets:
                    env[(t.name, t.next)] = None
        for eq in ordered:
            _check_equation(eq, env, self.defined, self.errors, self.state_names, kinds=self.kinds, rules=self.rules)
            for t in eq.targets:
                env.setdefault((t.name, t.next), None)
        for d in self.states:
            key = (d.name, True)
            got = env.get(key)
            if got is None:
                continue
            where = self.defs[key].targets[0].loc
            if got.shape != d.shape:
                self.errors.error(where, f"{d.name}' has shape {shape_str(got.shape)}, "
                                         f"but state '{d.name}' is declared {shape_str(d.shape)}")
                env[key] = None
            elif not got.batched:
                self.errors.error(where, f"{d.name}' is made only from parameters and numbers, so it is the "
                                         f"same for every example; a state's next value must depend on an "
                                         f"input or a state")
                env[key] = None
        return ordered

    def outputs(self, outputs: list[ast.Output]) -> list[tuple[str, ast.Target]]:
        output_list = []
        output_names: dict[str, Loc] = {}
        for o in outputs:
            t = o.target
            if o.expr is None and not self._output_refers(t):
                continue
            if t.name in output_names:
                self.errors.error(t.loc, f"output '{t.name}' is declared twice (first at line {output_names[t.name].line})")
                continue
            output_names[t.name] = t.loc
            output_list.append((t.name, t))
            got = self.env.get((t.name, t.next))
            if got is not None and (len(got.shape) != 1 or not got.batched):
                why = ("it is the same for every example (made only from parameters and numbers)" if not got.batched
                       else f"got {shape_str(got.shape)}")
                self.errors.error(t.loc, f"output '{t.name}' must be a per-example vector; {why}")
        return output_list

    def _output_refers(self, t) -> bool:
        """Whether `output t` (no equation) names a per-example value the step has (reporting why not)."""
        kind = self.kinds.get(t.name)
        if (t.name, t.next) not in self.env:
            if t.next and t.name not in self.state_names:
                what = "is not declared" if kind is None else f"is {_ARTICLE[kind]}, not a state"
                self.errors.error(t.loc, f"output {t}: '{t.name}' {what}, so {t} has no meaning")
            elif kind == "dimension":
                self.errors.error(t.loc, f"'{t.name}' is a dimension, not a value; it cannot be an output")
            else:
                known = [k[0] + ("'" if k[1] else "") for k in self.env]
                self.errors.error(t.loc, f"unknown value '{t}' in output" + _suggest(str(t), known))
            return False
        if kind == "parameter" and not t.next:
            self.errors.error(t.loc, f"'{t.name}' is a parameter, the same for every example; an output must be "
                                     f"a per-example vector (computed from an input or a state)")
            return False
        return True


def _subexpressions(expr: ast.Expr):
    """expr and every expression inside it."""
    yield expr
    for a in (expr.args if isinstance(expr, ast.Call) else expr.items if isinstance(expr, ast.Concat)
              else (expr.left, expr.right) if isinstance(expr, ast.BinOp) else (expr.arg,) if isinstance(expr, ast.Neg)
              else ()):
        yield from _subexpressions(a)


def _refs(expr: ast.Expr):
    yield from (e for e in _subexpressions(expr) if isinstance(e, ast.Ref))


def _order(equations: list[Equation], defs, errors: Collector) -> list[Equation]:
    """Equations in dependency order (they may be written in any order), each cycle reported.

    The equations on a cycle, and only they, are left out. Strongly connected components
    (Tarjan) come out with every component after those it depends on; without cycles this is
    the order of a depth-first walk from each equation in source order.
    """
    index: dict[int, int] = {}
    low: dict[int, int] = {}
    stack: list[Equation] = []
    on_stack: set[int] = set()
    ordered: list[Equation] = []

    def deps(eq: Equation) -> list[Equation]:
        out = []
        for r in _refs(eq.expr):
            dep = defs.get((r.name, r.next))
            if dep is not None:
                out.append(dep)
        return out

    def connect(eq: Equation) -> None:
        index[id(eq)] = low[id(eq)] = len(index)
        stack.append(eq)
        on_stack.add(id(eq))
        for dep in deps(eq):
            if id(dep) not in index:
                connect(dep)
                low[id(eq)] = min(low[id(eq)], low[id(dep)])
            elif id(dep) in on_stack:
                low[id(eq)] = min(low[id(eq)], index[id(dep)])
        if low[id(eq)] == index[id(eq)]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(id(top))
                component.append(top)
                if top is eq:
                    break
            if len(component) == 1 and eq not in deps(eq):
                ordered.append(eq)
            else:
                _report_cycle(component, deps, errors)

    for eq in equations:
        if id(eq) not in index:
            connect(eq)
    return ordered


def _report_cycle(component: list[Equation], deps, errors: Collector) -> None:
    """One error for a set of equations that depend on each other, showing one cycle through them."""
    members = {id(e) for e in component}
    first = min(component, key=lambda e: (e.loc.line, e.loc.col))
    # Shortest way from `first` back to itself inside the component.
    paths = {id(first): [first]}
    frontier = [first]
    cycle = None
    while frontier and cycle is None:
        nxt = []
        for e in frontier:
            for d in deps(e):
                if d is first:
                    cycle = paths[id(e)] + [first]
                    break
                if id(d) in members and id(d) not in paths:
                    paths[id(d)] = paths[id(e)] + [d]
                    nxt.append(d)
            if cycle is not None:
                break
        frontier = nxt
    names = [_target_used(cycle[-2], first)] + [_target_used(e, d) for e, d in zip(cycle, cycle[1:])]
    hint = ""
    primes = [t for e in cycle for t in e.targets if t.next]
    if primes:
        t = primes[0]
        hint = f"; {t.name} is the state's value before the step and {t.name}' its value after it"
    errors.error(first.loc, f"{names[0]} depends on itself within one step: "
                            f"{' -> '.join(str(n) for n in names)}{hint}")


def _target_used(reader: Equation, eq: Equation):
    """The target of `eq` that `reader` reads."""
    if len(eq.targets) == 1:
        return eq.targets[0]
    read = {(r.name, r.next) for r in _refs(reader.expr)}
    for t in eq.targets:
        if (t.name, t.next) in read:
            return t
    return eq.targets[0]


def _check_equation(eq: Equation, env, defined, errors: Collector, state_names, kinds=None, rules=None) -> None:
    expr = eq.expr
    if isinstance(expr, ast.Call) and expr.fn == "split":
        if len(expr.args) != 2 or not isinstance(expr.args[1], ast.Num):
            for a in expr.args[:1]:
                type_of(a, env, errors, state_names, kinds=kinds)
            errors.error(expr.loc, "split takes a value and a whole number of parts written as a number: split(v, 4)")
            return
        n = expr.args[1].value
        if not math.isfinite(n) or n != int(n) or n < 1:
            errors.error(expr.args[1].loc, f"split needs a positive whole number of parts, got {_number(n)}")
            return
        n = int(n)
        if n != len(eq.targets):
            errors.error(expr.loc, f"split(..., {n}) gives {n} values but {len(eq.targets)} "
                                   f"name{'s are' if len(eq.targets) != 1 else ' is'} assigned")
            return
        whole = type_of(expr.args[0], env, errors, state_names, kinds=kinds)
        if whole is None:
            return
        if len(whole.shape) != 1:
            errors.error(expr.loc, f"split needs a vector, got {shape_str(whole.shape)}")
            return
        part = whole.shape[0] / n
        k = part.constant
        if k is not None and (k.denominator != 1 or k < 1):
            errors.error(expr.loc, f"split(..., {n}) cannot cut a vector of {whole.shape[0]} entries into "
                                   f"{n} equal parts")
            return
        if k is None and rules is not None:
            rules.append(SizeRule(part, f"each of the {n} parts of split(..., {n})", expr.loc))
        for t in eq.targets:
            env[(t.name, t.next)] = Type((part,), whole.batched)
        return
    if len(eq.targets) != 1:
        type_of(expr, env, errors, state_names, kinds=kinds)
        errors.error(eq.loc, f"{len(eq.targets)} names are assigned but the right side gives one value; "
                             f"use split(v, {len(eq.targets)}) to give several")
        return
    t = type_of(expr, env, errors, state_names, kinds=kinds)
    if t is not None:
        env[(eq.targets[0].name, eq.targets[0].next)] = t


_VERBS = {"+": "add", "-": "subtract", "*": "multiply", "/": "divide"}


def broadcast_one(t: Type, other: Type) -> Type:
    """`t` as the elementwise ops take it beside `other`: a value of one entry ([1]) is a scalar
    beside a vector (a learned scalar written `param a[1]`, a state s[1]), or beside a matrix when
    it is made of parameters alone."""
    if t.shape == (Size.of(1),) and other.shape not in ((), (Size.of(1),)):
        return Type((), t.batched)
    return t


def type_of(expr: ast.Expr, env, errors: Collector, state_names=(), *, kinds=None) -> Type | None:
    """The type of an expression, or None after reporting why it has none.

    A name in `env` with the type None is one whose own definition is in error: it was reported
    there, and its uses are not reported again. `kinds` (name -> what it was declared as) makes
    the messages for misused names more specific.
    """
    kinds = kinds or {}
    if isinstance(expr, ast.Num):
        if not math.isfinite(expr.value):
            errors.error(expr.loc, "this number is too large (it overflows to infinity)")
            return None
        return Type((), False)
    if isinstance(expr, ast.Ref):
        key = (expr.name, expr.next)
        if key in env:
            return env[key]
        kind = kinds.get(expr.name)
        if expr.next and expr.name not in state_names:
            what = f"'{expr.name}' is {_ARTICLE[kind]}, not a state" if kind else f"'{expr.name}' is not a state"
            errors.error(expr.loc, f"{what}, so {expr.name}' has no meaning; only states have next values")
        elif kind == "dimension":
            errors.error(expr.loc, f"'{expr.name}' is a dimension, not a value; dimensions appear only in shapes "
                                   f"and initialisers")
        else:
            known = sorted({k[0] + ("'" if k[1] else "") for k in env})
            errors.error(expr.loc, f"unknown name '{expr.name}{chr(39) if expr.next else ''}'"
                         + _suggest(expr.name, known))
        return None
    if isinstance(expr, ast.Neg):
        return type_of(expr.arg, env, errors, state_names, kinds=kinds)
    if isinstance(expr, ast.BinOp):
        left = type_of(expr.left, env, errors, state_names, kinds=kinds)
        right = type_of(expr.right, env, errors, state_names, kinds=kinds)
        if left is None or right is None:
            return None
        if expr.op == "@":
            return _infer("matvec", [left, right], (), expr.loc, errors)
        return _elementwise_type(f"'{expr.op}'", _VERBS[expr.op], left, right, expr.loc, errors)
    if isinstance(expr, ast.Concat):
        items = [type_of(a, env, errors, state_names, kinds=kinds) for a in expr.items]
        return None if any(i is None for i in items) else _infer("concat", items, (), expr.loc, errors)
    return _call_type(expr, env, errors, state_names, kinds)


def _elementwise_type(what: str, verb: str, left: Type, right: Type, loc, errors: Collector) -> Type | None:
    """Two values combined entry by entry: numbers, [1] parameters and per-example numbers
    broadcast against vectors."""
    left, right = broadcast_one(left, right), broadcast_one(right, left)
    if left.shape != right.shape and left.shape != () and right.shape != ():
        errors.error(loc, f"shape mismatch in {what}: cannot {verb} {shape_str(left.shape)} and {shape_str(right.shape)}")
        return None
    return _infer("add", [left, right], (), loc, errors)


def number_written(e: ast.Expr) -> float | None:
    """The value of a number as written (`0.5`, `-2`), or None for any other expression."""
    if isinstance(e, ast.Num):
        return e.value
    if isinstance(e, ast.Neg) and isinstance(e.arg, ast.Num):
        return -e.arg.value
    return None


# The arguments of these functions that must be numbers written in the spec, by position.
_NUMBER_ARGS = {"leaky_relu": {1: "its slope"}, "pow": {1: "its exponent"},
                "clamp": {1: "its lower bound", 2: "its upper bound"}, "dropout": {1: "its probability"},
                "zoneout": {2: "its probability"}}


def _numbers_in_place(expr: ast.Call, errors: Collector) -> bool:
    ok = True
    for k, what in _NUMBER_ARGS.get(expr.fn, {}).items():
        if number_written(expr.args[k]) is None:
            errors.error(expr.args[k].loc, f"{expr.fn}: {what} must be a number, such as 0.5 or -2")
            ok = False
    if ok and expr.fn == "clamp" and number_written(expr.args[1]) > number_written(expr.args[2]):
        errors.error(expr.loc, "clamp(v, lo, hi) needs lo <= hi")
        ok = False
    if ok and expr.fn == "dropout" and not 0 <= number_written(expr.args[1]) < 1:
        errors.error(expr.args[1].loc, "dropout(v, p) drops with probability p, 0 <= p < 1")
        ok = False
    if ok and expr.fn == "zoneout" and not 0 <= number_written(expr.args[2]) <= 1:
        errors.error(expr.args[2].loc, "zoneout(v_next, v, p) keeps v with probability p, 0 <= p <= 1")
        ok = False
    if ok and expr.fn == "pow" and number_written(expr.args[1]) == 0:
        errors.error(expr.args[1].loc, "pow(v, 0) is 1 for every v; write 1")
        ok = False
    return ok


def _call_type(expr: ast.Call, env, errors: Collector, state_names, kinds) -> Type | None:
    """type_of for a function call."""
    if expr.fn == "split":
        errors.error(expr.loc, "split gives several values; assign them to names: a, b = split(v, 2)")
        return None
    if expr.fn not in ops.FUNCTIONS:
        kind = kinds.get(expr.fn)
        if kind == "parameter":
            hint = f"; '{expr.fn}' is a parameter: write {expr.fn} @ v for a matrix product"
        elif kind is not None:
            hint = f"; '{expr.fn}' is {_ARTICLE[kind]}, not a function"
        else:
            hint = _suggest(expr.fn, ops.FUNCTIONS)
        errors.error(expr.loc, f"unknown function '{expr.fn}'" + hint)
        for a in expr.args:
            type_of(a, env, errors, state_names, kinds=kinds)
        return None
    arity = ops.FUNCTIONS[expr.fn]
    if arity is not None and len(expr.args) != arity:
        errors.error(expr.loc, f"{expr.fn} takes {arity} argument{'s' if arity != 1 else ''}, got {len(expr.args)}")
        return None
    if arity is None and not expr.args:
        errors.error(expr.loc, f"{expr.fn} needs at least one argument")
        return None
    args = [type_of(a, env, errors, state_names, kinds=kinds) for a in expr.args]
    if any(a is None for a in args):
        return None
    if expr.fn == "concat":
        return _infer("concat", args, (), expr.loc, errors)
    if not _numbers_in_place(expr, errors):
        return None
    if expr.fn in ("maximum", "minimum"):
        return _elementwise_type(f"{expr.fn}", "compare", args[0], args[1], expr.loc, errors)
    if expr.fn in ("dropout", "zoneout"):  # a mask per example: what they give is per example
        if len(args[0].shape) != 1 or (expr.fn == "zoneout" and args[1].shape != args[0].shape):
            errors.error(expr.loc, f"{expr.fn} takes " + ("a vector" if expr.fn == "dropout" else
                                   "two vectors of one size") + ", got " + ", ".join(shape_str(a.shape) for a in args[:-1]))
            return None
        return Type(args[0].shape, True)
    if expr.fn in _NUMBER_ARGS:
        return args[0]
    if expr.fn in ops.SCALAR_FUNCTIONS or expr.fn in ("layernorm", "rmsnorm"):
        if len(args[0].shape) != 1:
            errors.error(expr.loc, f"{expr.fn}(v) takes a vector and reduces over its features, "
                                   f"got {shape_str(args[0].shape)}")
            return None
        return Type((), args[0].batched) if expr.fn in ops.SCALAR_FUNCTIONS else args[0]
    if expr.fn == "contract":
        w, a, b = args
        if len(w.shape) != 3 or w.batched:
            errors.error(expr.loc, f"contract(W, a, b) needs a three-axis W, got {w}")
            return None
        outer = _infer("outer", [a, b], (), expr.loc, errors)
        if outer is None:
            return None
        if (w.shape[1], w.shape[2]) != (a.shape[0], b.shape[0]):
            errors.error(expr.loc, f"contract(W, a, b): W is {shape_str(w.shape)} but a is {shape_str(a.shape)} "
                                   f"and b is {shape_str(b.shape)}")
            return None
        return Type((w.shape[0],), outer.batched)
    return _infer(expr.fn, args, (), expr.loc, errors)


def _infer(op, args, attrs, loc, errors: Collector) -> Type | None:
    try:
        return ops.infer(op, args, attrs)
    except ops.ShapeError as e:
        errors.error(loc, str(e))
        return None


def check_dims(cell: CheckedCell, values: dict[str, int]) -> dict[str, int]:
    """Bind the cell's dimensions; every size in it must come out a positive whole number.

    Raises SpecError naming each dimension missing, unknown or not a positive whole number, and
    each size (a parameter's, a state's, a split's parts) that these values make fractional or
    not positive, at the line it comes from.
    """
    errors = Collector()
    for k in values:
        if k not in cell.dims:
            errors.error(None, f"cell '{cell.name}' has no dimension '{k}'; its dimensions are "
                               f"{', '.join(cell.dims) or 'none'}")
    missing = [d for d in cell.dims if d not in values]
    if missing:
        errors.error(cell.loc, f"dimension{'s' if len(missing) > 1 else ''} {', '.join(missing)} of cell "
                               f"'{cell.name}' not bound; pass {', '.join(f'{d}=...' for d in missing)}")
    for k, v in values.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            errors.error(None, f"dimension {k} must be a positive whole number, got {v!r}")
    if not errors.diagnostics:
        bound = ", ".join(f"{d}={values[d]}" for d in cell.dims)
        for rule in cell.sizes:
            value = rule.size.evaluate(values)
            if value.denominator != 1 or value < 1:
                written = str(rule.size).replace("//", "/")  # a fraction here, not floor division
                errors.error(rule.loc, f"with {bound}, {rule.what} would have {written} = {value} entries; "
                                       f"every size must be a positive whole number")
    errors.raise_if_any()
    return dict(values)
