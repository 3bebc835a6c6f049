"""Errors are values with a location, collected and reported together.

Every stage that can reject a spec appends `Diagnostic`s and raises one `SpecError` holding all
of them; the CLI prints them without a traceback, in the `FILE:LINE:COL: error: message` form
followed by the source line and a caret under the spot.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Loc:
    file: str
    line: int
    col: int
    text: str = field(default="", repr=False, compare=False)  # the source line, for printing

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"


@dataclass(frozen=True)
class Diagnostic:
    loc: Loc | None
    message: str

    def format(self) -> str:
        if self.loc is None:
            return f"error: {self.message}"
        out = f"{self.loc}: error: {self.message}"
        text = self.loc.text.rstrip("\r\n")
        if text.strip():
            # The caret keeps the line's tabs, so it sits under the spot however tabs are shown.
            before = text[:max(self.loc.col - 1, 0)]
            caret = "".join("\t" if ch == "\t" else " " for ch in before)
            caret += " " * (self.loc.col - 1 - len(before)) + "^"
            out += f"\n    {text.rstrip()}\n    {caret}"
        return out


class SpecError(Exception):
    """One or more problems with a spec, or with how it was instantiated."""

    def __init__(self, diagnostics: list[Diagnostic] | Diagnostic | str):
        if isinstance(diagnostics, str):
            diagnostics = [Diagnostic(None, diagnostics)]
        elif isinstance(diagnostics, Diagnostic):
            diagnostics = [diagnostics]
        self.diagnostics = list(diagnostics)
        super().__init__(self.format())

    def format(self) -> str:
        return "\n".join(d.format() for d in self.diagnostics)


class Collector:
    """Accumulates diagnostics inside one stage; `raise_if_any` ends the stage."""

    def __init__(self):
        self.diagnostics: list[Diagnostic] = []

    def error(self, loc: Loc | None, message: str) -> None:
        self.diagnostics.append(Diagnostic(loc, message))

    def raise_if_any(self) -> None:
        if self.diagnostics:
            unique = list(dict.fromkeys(self.diagnostics))  # the same problem found twice is reported once
            ordered = sorted(unique, key=lambda d: (d.loc.line, d.loc.col) if d.loc else (0, 0))
            raise SpecError(ordered)
