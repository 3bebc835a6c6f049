"""specc: recurrent cells written as equations, compiled to forward and BPTT code.

    import specc
    lstm = specc.load("lstm", I=10, H=20)        # a library spec, a path, or spec text
    outputs, (h, c) = lstm(x)                     # x: (T, B, I)
"""
from __future__ import annotations

import types
from pathlib import Path

from .errors import SpecError

__all__ = ["load", "from_torch", "compile_spec", "SpecError"]
__version__ = "0.1.0"


def compile_spec(spec, cell=None):
    from .pipeline import compile_spec as _compile

    return _compile(spec, cell)


def program(compiled) -> types.ModuleType:
    """The generated module, executed: its forward/backward functions and metadata."""
    from .runtime import load_program

    return load_program(compiled.source, compiled.cell.name)


def load(spec: str | Path, cell: str | None = None, *, batch_first: bool = False, backend: str = "auto",
         dtype=None, **dims):
    """A torch.nn.Module for a cell: `spec` is a library name ("lstm"), a path, or spec text.

    For a spec holding a `network` block (or a library network's name), the network's module
    (specc.network.Network); `cell` then picks a network or cell by name.
    """
    from .network import load_network
    from .runtime import CellModule

    network = load_network(spec, cell, dtype=dtype, **dims)
    if network is not None:
        return network

    return CellModule(program(compile_spec(spec, cell)), dims, batch_first=batch_first, backend=backend, dtype=dtype)


def from_torch(m, **kwargs):
    from .interop import from_torch as _from_torch

    return _from_torch(m, **kwargs)
