"""What `import specc` offers: compile a spec, load it as a torch.nn.Module, run its generated module.

The stages are imported on first use, so that `import specc` stays light.
"""
from __future__ import annotations

import types
from pathlib import Path


def compile_spec(spec, cell=None):
    from .pipeline import compile_spec as _compile

    return _compile(spec, cell)


def program(compiled) -> types.ModuleType:
    """The generated module, executed: its forward/backward functions and metadata."""
    from .runtime import load_program

    return load_program(compiled.source, compiled.cell.name)


def load(spec: str | Path, cell: str | None = None, *, batch_first: bool = False, backend: str = "auto",
         dtype=None, scan: bool = True, **dims):
    """A torch.nn.Module for a cell: `spec` is a library name ("lstm"), a path, or spec text.

    For a spec holding a `network` block (or a library network's name), the network's module
    (specc.network.Network); `cell` then picks a network or cell by name. Every keyword means the
    same for both: batch_first puts the batch first in every sequence going in and coming out,
    backend is every compiled cell's, dtype every parameter's, and the dimensions are the spec's.
    scan=False runs a cell whose states are all linear recurrences (minGRU, QRNN's pooling: `specc
    check` says "parallel scan") step by step on Triton and NumPy, as any other cell, not as a scan.
    """
    import torch

    from .check import bind_inits
    from .network import load_network
    from .runtime import CellModule, check_dims

    if not isinstance(batch_first, bool):
        raise TypeError(f"batch_first must be True or False, got {batch_first!r}")
    if not isinstance(scan, bool):
        raise TypeError(f"scan must be True or False, got {scan!r}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating-point torch.dtype (torch.float32, torch.float64, ...), "
                        f"got {dtype!r}")
    network = load_network(spec, cell, batch_first=batch_first, backend=backend, dtype=dtype, **dims)
    if network is not None:
        for module in network.modules():
            if isinstance(module, CellModule):
                module.scan = scan
        return network

    compiled = compile_spec(spec, cell)
    check_dims(f"cell '{compiled.cell.name}'", compiled.cell.dims, dims)
    # What the checker could not decide without the dimensions' values, at the spec's line.
    bind_inits(compiled.cell, dims, dtype)
    return CellModule(program(compiled), dims, batch_first=batch_first, backend=backend, dtype=dtype, scan=scan)
