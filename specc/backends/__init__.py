"""The backends, one registry. Each turns the scheduled step IR of a cell into its part of the
generated module, and runs that part on torch tensors:

    numpy   numpy.py writes forward/backward on arrays; runs on CPU tensors, float32 or float64
    triton  triton.py writes fused kernels for the time loop inside host.py's torch code; CUDA tensors
    c       c.py writes one C function a pass for the time loop, inside the same host code; CPU float32

`assemble` asks each for its section, `check` keeps spec names off the names each uses, and
`runtime` runs a call on the one it picks (backends/runners.py: one runner each, which also says
why it cannot run a module here). The ops they spell are one table, specc.ops.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

from . import c, host, numpy, triton


@dataclass(frozen=True)
class Backend:
    name: str
    runs_on: str  # in words, for errors and the docs
    # (w, fwd, bwd, saved, dims, lines, file, prefix): this backend's section of a generated module;
    # one whose loop cannot run a cell writes <NAME>_UNSUPPORTED with the reason instead
    write: Callable
    generated_names: frozenset[str]  # names its generated code uses for itself
    runner: str  # the class in backends/runners.py that runs a loaded module's code

    def run(self, scan: bool = True, **options):
        """A runner for this backend (imports torch, which generating code never needs). scan=False:
        linear recurrences run as a sequential loop, as every other cell (see specc/scan.py);
        options: the backend's own (Triton's products)."""
        from . import runners

        return getattr(runners, self.runner)(scan, **options)


BACKENDS: dict[str, Backend] = {
    "numpy": Backend("numpy", "CPU tensors, float32 or float64", numpy.write_section,
                     frozenset(numpy.INTERNAL), "NumpyRunner"),
    "triton": Backend("triton", "float32 CUDA tensors (CPU ones under TRITON_INTERPRET=1)", partial(host.write_section, triton.TARGET),
                      triton.GENERATED_NAMES, "TritonRunner"),
    "c": Backend("c", "float32 CPU tensors", partial(host.write_section, c.TARGET), c.GENERATED_NAMES, "CRunner"),
}


def generated_names() -> frozenset[str]:
    """Every name some backend's generated code uses for itself."""
    return frozenset().union(*(b.generated_names for b in BACKENDS.values()))
