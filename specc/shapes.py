"""Symbolic sizes: polynomials over the cell's dimension names (4*H, H + I, I*H).

Shapes are checked and code is generated with sizes kept symbolic, so a compiled cell works for
any binding of its dimensions and the generated code reads `g[:, H:2*H]`, not `g[:, 20:40]`.
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

Monomial = tuple[str, ...]  # sorted names, repeated for powers; () is the constant term


@dataclass(frozen=True)
class Size:
    terms: tuple[tuple[Monomial, Fraction], ...]  # sorted, no zero coefficients

    @staticmethod
    def of(value: "int | str | Size") -> "Size":
        if isinstance(value, Size):
            return value
        if isinstance(value, str):
            return Size((((value,), Fraction(1)),))
        return Size((((), Fraction(value)),) if value else ())

    @staticmethod
    def _make(acc: dict) -> "Size":
        return Size(tuple(sorted((m, c) for m, c in acc.items() if c != 0)))

    def __add__(self, other) -> "Size":
        acc = dict(self.terms)
        for m, c in Size.of(other).terms:
            acc[m] = acc.get(m, 0) + c
        return Size._make(acc)

    __radd__ = __add__

    def __neg__(self) -> "Size":
        return Size(tuple((m, -c) for m, c in self.terms))

    def __sub__(self, other) -> "Size":
        return self + (-Size.of(other))

    def __rsub__(self, other) -> "Size":
        return Size.of(other) - self

    def __mul__(self, other) -> "Size":
        acc: dict = {}
        for m1, c1 in self.terms:
            for m2, c2 in Size.of(other).terms:
                m = tuple(sorted(m1 + m2))
                acc[m] = acc.get(m, 0) + c1 * c2
        return Size._make(acc)

    __rmul__ = __mul__

    def __truediv__(self, k: int) -> "Size":
        return Size(tuple((m, c / k) for m, c in self.terms))

    @property
    def constant(self) -> Fraction | None:
        """The value when no dimension name occurs in it, else None."""
        if not self.terms:
            return Fraction(0)
        if len(self.terms) == 1 and self.terms[0][0] == ():
            return self.terms[0][1]
        return None

    def names(self) -> set[str]:
        return {n for m, _ in self.terms for n in m}

    def evaluate(self, dims: dict[str, int]) -> Fraction:
        total = Fraction(0)
        for m, c in self.terms:
            term = c
            for n in m:
                term *= dims[n]
            total += term
        return total

    def __repr__(self) -> str:
        return str(self)

    def __str__(self) -> str:
        if not self.terms:
            return "0"
        parts = []
        # Highest degree first, then by name, so 4*H + I reads as a person writes it.
        for m, c in sorted(self.terms, key=lambda mc: (-len(mc[0]), mc[0])):
            mono = "*".join(m)
            if not mono:
                body = str(abs(c))
            elif abs(c) == 1:
                body = mono
            elif c.denominator == 1:
                body = f"{abs(c)}*{mono}"
            else:
                num = abs(c.numerator)
                body = f"{mono}//{c.denominator}" if num == 1 else f"{num}*{mono}//{c.denominator}"
            parts.append(("- " if c < 0 else "+ ") + body)
        text = " ".join(parts)
        return text[2:] if text.startswith("+ ") else "-" + text[2:]


Shape = tuple[Size, ...]


def shape_str(shape: Shape) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def numel(shape: Shape) -> Size:
    total = Size.of(1)
    for s in shape:
        total = total * s
    return total


@dataclass(frozen=True)
class Type:
    shape: Shape
    batched: bool  # one value per example (x, h, gates) rather than one per sequence (W, b)

    def __str__(self) -> str:
        return ("batched " if self.batched else "") + shape_str(self.shape)
