"""specc: recurrent cells written as equations, compiled to forward and BPTT code.

    import specc
    lstm = specc.load("lstm", I=10, H=20)        # a library spec, a path, or spec text
    outputs, (h, c) = lstm(x)                     # x: (T, B, I)
"""
from __future__ import annotations

import sys as _sys

from .api import compile_spec, load, program
from .errors import SpecError

__all__ = ["load", "load_checkpoint", "from_torch", "to_torch", "export_onnx", "compile_spec", "program", "SpecError"]
__version__ = "0.1.0"

# The ops a saved torch.export program calls (specc::scan), registered as specc is imported after
# torch, so that torch.export.load finds them; not otherwise: importing torch would add ~1.5 s to
# every `specc check` (0.4 s without). Making a cell registers them too (runtime imports them).
if "torch" in _sys.modules:
    from . import torch_ops  # noqa: F401


def from_torch(m, **kwargs):
    from .interop import from_torch as _from_torch

    return _from_torch(m, **kwargs)


def load_checkpoint(path):
    """The trained model in a checkpoint of `specc train` (checkpoint.pt), rebuilt from the spec
    text it carries: no config and no spec file needed."""
    from .train.sample import load_model

    return load_model(path)[0]


def export_onnx(module, path, example_input=None, example_kwargs=None):
    from .onnx_export import export_onnx as _export

    return _export(module, path, example_input, example_kwargs)


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
