"""CPU threads for training: torch's, and those of every BLAS library in the process (NumPy's,
which the NumPy backend's products run on), through threadpoolctl.

A recurrent cell multiplies small matrices once per time step; spreading each product over
threads costs more than it saves, and on a busy machine threads that spin waiting for each other
make training many times slower. train.threads sets the count for the run.
"""
from __future__ import annotations

import torch


def set_threads(n: int) -> int:
    """Use n threads in torch and in every BLAS library loaded; returns how many libraries were told."""
    import numpy  # noqa: F401  (its BLAS is loaded, so threadpoolctl finds it)
    from threadpoolctl import threadpool_info, threadpool_limits

    torch.set_num_threads(n)
    threadpool_limits(limits=n, user_api="blas")  # not as a context: for the rest of the run
    return sum(1 for lib in threadpool_info() if lib.get("user_api") == "blas")
