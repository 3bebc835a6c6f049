"""CPU threads for training: torch's and the BLAS library's that numpy's generated code calls.

A recurrent cell multiplies small matrices once per time step; spreading each product over
threads costs more than it saves, and on a busy machine threads that spin waiting for each other
make training many times slower. Training therefore runs single-threaded unless the config says
otherwise (train.threads). numpy offers no call for this, so the BLAS library is found among the
loaded shared objects and told directly, as threadpoolctl does; where that fails nothing changes.
"""
from __future__ import annotations

import ctypes

import torch

_SETTERS = ("openblas_set_num_threads", "scipy_openblas_set_num_threads64_", "openblas_set_num_threads64_",
            "scipy_openblas_set_num_threads", "MKL_Set_Num_Threads")


def _blas_libraries() -> list[str]:
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "blas" in line.lower() or "mkl_rt" in line.lower()}
    except OSError:  # not Linux
        return []
    return sorted(p for p in paths if p.startswith("/"))


def set_threads(n: int) -> int:
    """Use n threads in torch and in every BLAS library found; returns how many libraries were told."""
    import numpy  # noqa: F401  (its BLAS must be loaded to be found)

    torch.set_num_threads(n)
    told = 0
    for path in _blas_libraries():
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in _SETTERS:
            fn = getattr(lib, name, None)
            if fn is not None:
                fn(ctypes.c_int(n))
                told += 1
                break
    return told
