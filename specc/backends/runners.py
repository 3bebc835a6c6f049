"""How a loaded module's generated code runs: torch tensors in, the generated forward and backward
of one backend, torch tensors out. One runner a backend; specc.backends.BACKENDS names them, and
runtime.CellModule picks one per call.
"""
from __future__ import annotations

import contextlib
import os

import numpy as np
import torch

from .tuning import applied


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    # Shares memory with t when t is a contiguous CPU tensor: no copy on the way in.
    return t.detach().contiguous().numpy()


def _unshared(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Gradients that own their memory. The generated backward hands out one array for two
    parameters whose gradients are equal (an LSTM's b_ih and b_hh); accumulating or clipping one
    in place must not change the other."""
    seen, out = set(), []
    for t in tensors:
        if t is None:  # an input's gradient left out
            out.append(t)
            continue
        ptr = t.untyped_storage().data_ptr()
        out.append(t.clone() if ptr in seen else t)
        seen.add(ptr)
    return out


class Runner:
    name = ""

    def __init__(self, scan: bool = True):
        self.scan = scan  # False: a loop of linear recurrences runs step by step, not as a scan

    def _options(self) -> dict:
        """Keyword arguments of the generated functions that are not their defaults (a module that
        `specc compile` wrote before they existed still runs where they are not asked for)."""
        return {} if self.scan else {"scan": False}


def _skip_inputs(prog, inputs_grad: bool) -> dict:
    """backward's keyword leaving the inputs' gradients out, where the module has it."""
    return {} if inputs_grad or not getattr(prog, "SKIPS_INPUT_GRADIENTS", False) else {"inputs_grad": False}


def _tensors(grads) -> list:
    """A backward function's (inputs', initial states', parameters') gradients as one list; an
    input's is None where it was left out."""
    return [g if g is None else g.contiguous() for part in grads for g in part]


class NumpyRunner(Runner):
    """Runs the generated NumPy code on CPU tensors, sharing their memory."""

    name = "numpy"

    def problem(self, prog, on_cuda: bool) -> str | None:
        """Why this backend cannot run the loaded module `prog` here, or None if it can."""
        return None

    def forward(self, prog, tensors, T, B, dims, train):
        arrays = [_to_numpy(t) for t in tensors]
        outs, finals, saved = prog.forward(*arrays, T=T, B=B, train=train, **self._options(), **dims)
        # An output that is an input (`output x`) is a view of the caller's tensor: a copy, so that
        # changing one in place leaves the other (and what backward reads) alone.
        outs = [a.copy() if any(np.may_share_memory(a, i) for i in arrays) else a for a in outs]
        # Final states are views into the state buffers that backward reads: hand out copies.
        return ([torch.from_numpy(a) for a in outs], [torch.from_numpy(a.copy()) for a in finals], saved)

    def backward(self, prog, saved, d_outs, d_finals, params, T, B, dims, inputs_grad=True):
        d_inputs, d_inits, d_params = prog.backward(
            saved, *(_to_numpy(g) for g in d_outs), *(_to_numpy(g) for g in d_finals),
            *(_to_numpy(p) for p in params), T=T, B=B, **self._options(), **_skip_inputs(prog, inputs_grad), **dims)
        return _unshared([a if a is None else torch.from_numpy(np.ascontiguousarray(a))
                          for a in (*d_inputs, *d_inits, *d_params)])


def _on(device: torch.device):
    """Kernels launch on the tensors' GPU, not on whichever is current (cuda:1, say)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


class TorchHostRunner(Runner):
    """Runs the host functions of backends/host.py (forward_<name>, backward_<name>) on float32 tensors."""

    def _extra(self, prog, dims) -> dict:
        """Keyword arguments of this backend's generated functions beyond the sizes."""
        return {}

    def forward(self, prog, tensors, T, B, dims, train):
        work = [t.detach().contiguous() for t in tensors]
        with _on(tensors[0].device):
            outs, finals, saved = getattr(prog, f"forward_{self.name}")(*work, T=T, B=B, train=train,
                                                                        **self._extra(prog, dims), **dims)
        # As in NumpyRunner: no output shares memory with an input.
        inputs = {t.untyped_storage().data_ptr() for t in tensors}
        outs = [o.clone() if o.untyped_storage().data_ptr() in inputs else o for o in outs]
        # Final states are views into the state buffers that backward reads: hand out copies.
        return outs, [f.clone() for f in finals], saved

    def backward(self, prog, saved, d_outs, d_finals, params, T, B, dims, inputs_grad=True):
        with _on(d_outs[0].device):
            grads = getattr(prog, f"backward_{self.name}")(
                saved, *(g.contiguous() for g in d_outs), *(g.contiguous() for g in d_finals),
                *(p.detach().contiguous() for p in params), T=T, B=B, **self._extra(prog, dims),
                **_skip_inputs(prog, inputs_grad), **dims)
        return _unshared(_tensors(grads))


class TritonRunner(TorchHostRunner):
    """Runs the generated Triton kernels on float32 CUDA tensors (CPU ones under TRITON_INTERPRET=1)."""

    name = "triton"

    def problem(self, prog, on_cuda: bool) -> str | None:
        if getattr(prog, "TRITON_UNSUPPORTED", "this module has no Triton code") is not None:
            return f"cell '{prog.CELL}' cannot use the Triton backend: {prog.TRITON_UNSUPPORTED}"
        try:
            import triton  # noqa: F401
        except ImportError:
            return "the Triton backend needs the triton package (pip install triton)"
        if not on_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            return ("the Triton backend runs on CUDA tensors; for CPU tensors set TRITON_INTERPRET=1 (Triton's "
                    "interpreter, slow) or use backend='numpy'")
        return None

    def __init__(self, scan: bool = True, products=None):
        super().__init__(scan)
        # bfloat16 / float16: the step's products multiply in it (autocast's dtype, or a half-precision
        # module's); None: in float32 (or TF32). The same for a forward pass and its backward.
        self.products = products
        self.plan = None  # a launch plan chosen by measurement (tuning.py), else the module's settings

    def _extra(self, prog, dims) -> dict:
        return self._options() | ({"products": self.products} if self.products is not None else {})

    def forward(self, prog, tensors, T, B, dims, train):
        with applied(prog, self.plan):
            return super().forward(prog, tensors, T, B, dims, train)

    def backward(self, prog, saved, d_outs, d_finals, params, T, B, dims, inputs_grad=True):
        with applied(prog, self.plan):
            return super().backward(prog, saved, d_outs, d_finals, params, T, B, dims, inputs_grad)


class CRunner(TorchHostRunner):
    """Runs the generated C loops (compiled on first use) on float32 CPU tensors."""

    name = "c"

    def problem(self, prog, on_cuda: bool = False) -> str | None:
        from . import c_runtime

        if getattr(prog, "C_UNSUPPORTED", "this module has no C code") is not None:
            return f"cell '{prog.CELL}' cannot use the C backend: {prog.C_UNSUPPORTED}"
        return c_runtime.problem()

    def _extra(self, prog, dims) -> dict:
        from . import c_runtime

        return {"c_lib": c_runtime.library(prog.C_SOURCE, dims)}
