"""Where the grammar and the spec library are found.

Both live at the top of the repository (grammar/, specs/) and are packaged as specc.grammar and
specc.specs in a wheel. An editable install does not map those folders into the package, so a
checkout falls back to the folders beside the package.
"""
from __future__ import annotations

import importlib.resources
from pathlib import Path

_REPO = Path(__file__).resolve().parent.parent


def _folder(package: str, repo_dir: str):
    try:
        return importlib.resources.files(package)
    except ModuleNotFoundError:
        return _REPO / repo_dir


def grammar_text() -> str:
    return (_folder("specc.grammar", "grammar") / "rnn.lark").read_text(encoding="utf-8")


def spec_names() -> list[str]:
    return sorted(p.name[:-4] for p in _folder("specc.specs", "specs").iterdir() if p.name.endswith(".rnn"))


def spec_file(name: str):
    """The library spec called `name` (as in `specc.load("lstm", ...)`), or None."""
    path = _folder("specc.specs", "specs") / f"{name}.rnn"
    return path if path.is_file() else None
