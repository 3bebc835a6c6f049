"""Large CPU buffers on transparent huge pages.

A pass over a long sequence allocates a few buffers of (T * B, features) values: minGRU at
4096 x 8 x 256 makes 32-64 MB ones. glibc hands an allocation that large straight from the kernel
(mmap) and gives it back on free, so each pass takes it fresh, one page fault per 4 KB on first
touch: 15 ms for 32 MB on a 2-core Zen 5 VM, about half of minGRU's forward + backward (200 ms,
of which the arithmetic is ~100). On 2 MB pages the same buffer costs 2-3 ms. Below glibc's
largest mmap threshold (32 MB) freed memory is reused from the heap and costs nothing, so
smaller buffers are left as they are.

torch does this itself only with THP_MEM_ALLOC_ENABLE=1 in the environment before it starts
(it then aligns large allocations to 2 MB and asks for huge pages); a library cannot set that for
its user's process. So the C loops' host code (its buffers, the host products' results) takes
torch's own tensor and asks the kernel, before anything touches it, to back the 2 MB-aligned part
of it with huge pages (madvise). The tensor stays torch's in every way (its allocator, its errors,
a resizable storage); only the pages behind it are larger.
"""
from __future__ import annotations

import ctypes
import mmap

import torch

HUGE_PAGE = 1 << 21
# Bytes from which huge pages are asked for: glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit
# systems, below which it reuses freed memory (see above).
HUGE_MIN = 32 << 20
_ADVICE = getattr(mmap, "MADV_HUGEPAGE", None)  # Linux only


def _libc_madvise():
    if _ADVICE is None:
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_madvise = _libc_madvise()


def empty(shape, device=None, dtype=torch.float32) -> torch.Tensor:
    """torch.empty(shape, device=device, dtype=dtype), on huge pages where large and on the CPU."""
    t = torch.empty(shape, device=device, dtype=dtype)
    if t.device.type == "cpu" and t.nbytes >= HUGE_MIN and _madvise is not None:
        start = -(-t.data_ptr() // HUGE_PAGE) * HUGE_PAGE  # the first 2 MB boundary in it
        end = (t.data_ptr() + t.nbytes) // HUGE_PAGE * HUGE_PAGE
        if end > start:
            _madvise(start, end - start, _ADVICE)  # a refusal leaves ordinary pages, as torch's
    return t
