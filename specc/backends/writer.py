"""A small indented writer for generated code, and the names generated code gives values."""
from __future__ import annotations

import builtins
import keyword
from contextlib import contextmanager


class Writer:
    def __init__(self):
        self.lines: list[str] = []
        self._depth = 0

    def line(self, text: str = "") -> None:
        self.lines.append(("    " * self._depth + text) if text else "")

    def comment(self, text: str) -> None:
        # Comments quote the spec and its file name: keep them one printable line each.
        for part in text.splitlines():
            part = "".join(ch if ch.isprintable() else "?" for ch in part)
            self.line("# " + part if part else "#")

    @contextmanager
    def block(self, header: str):
        self.line(header)
        self._depth += 1
        yield
        self._depth -= 1

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


class Namer:
    """Hands out unique identifiers, preferring the spec's own names.

    Only identifiers that the grammar accepted, or that this module builds from them, reach
    generated code; clashes with Python keywords, builtins and the code's own names are
    resolved by a suffix.
    """

    def __init__(self, taken=()):
        self.taken = set(taken) | set(keyword.kwlist) | set(dir(builtins))

    def __call__(self, wanted: str) -> str:
        base = wanted if wanted.isidentifier() else "v"
        name, k = base, 1
        while name in self.taken:
            k += 1
            name = f"{base}_{k}"
        self.taken.add(name)
        return name
