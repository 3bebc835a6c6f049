"""specc: recurrent cells written as equations, compiled to forward and BPTT code.

    import specc
    lstm = specc.load("lstm", I=10, H=20)        # a library spec, a path, or spec text
    outputs, (h, c) = lstm(x)                     # x: (T, B, I)
"""
from __future__ import annotations

from . import torch_ops  # noqa: F401  (the ops a saved torch.export program calls: registered on import)
from .api import compile_spec, load, program
from .errors import SpecError

__all__ = ["load", "from_torch", "to_torch", "compile_spec", "program", "SpecError"]
__version__ = "0.1.0"


def from_torch(m, **kwargs):
    from .interop import from_torch as _from_torch

    return _from_torch(m, **kwargs)


def to_torch(m):
    from .interop import to_torch as _to_torch

    return _to_torch(m)


def __getattr__(name: str):
    # Modules written by `specc compile` before the initialisers' module was renamed import
    # `from specc import init`: they keep working.
    if name == "init":
        from . import initializers

        return initializers
    raise AttributeError(f"module 'specc' has no attribute {name!r}")
