"""Large CPU buffers on transparent huge pages.

A pass over a long sequence allocates a few buffers of (T * B, features) values: minGRU at
4096 x 8 x 256 makes 32-64 MB ones. glibc hands an allocation that large straight from the kernel
(mmap) and gives it back on free, so each pass takes it fresh, one page fault per 4 KB on first
touch: 15 ms for 32 MB on a 2-core Zen 5 VM, about half of minGRU's forward + backward (200 ms,
of which the arithmetic is ~100). On 2 MB pages the same buffer costs 1.7 ms. Below glibc's
largest mmap threshold (32 MB) freed memory is reused from the heap and costs nothing, so
smaller buffers stay with torch.

torch does this itself only with THP_MEM_ALLOC_ENABLE=1 in the environment before it starts;
a library cannot set that for its user's process, so the buffers the C loops' host code makes
(and the host's products' results) come from here. The tensors are ordinary CPU tensors whose
memory is an anonymous mapping, unmapped when the last tensor using it is freed; their storage
cannot be resized (as a tensor from NumPy's cannot).
"""
from __future__ import annotations

import mmap

import torch

HUGE_PAGE = 1 << 21
# Bytes from which a buffer is mapped on huge pages: glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit
# systems, below which it reuses freed memory (see above).
HUGE_MIN = 32 << 20
_ADVICE = getattr(mmap, "MADV_HUGEPAGE", None)  # Linux only


def empty(shape, device=None, dtype=torch.float32) -> torch.Tensor:
    """torch.empty(shape, device=device, dtype=dtype), on huge pages when large and on the CPU."""
    shape = tuple(int(d) for d in shape)
    count = 1
    for d in shape:
        count *= d
    nbytes = count * dtype.itemsize
    cpu = device is None or torch.device(device).type == "cpu"
    if not cpu or _ADVICE is None or nbytes < HUGE_MIN:
        return torch.empty(shape, device=device, dtype=dtype)
    # A 2 MB page needs a 2 MB-aligned address: map one page more and start at the first boundary
    # (the part before it is never touched, so it takes no memory).
    pages = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        pages.madvise(_ADVICE)
    except OSError:  # a kernel without transparent huge pages: ordinary pages, as torch's
        pass
    raw = torch.frombuffer(pages, dtype=torch.uint8)  # holds `pages` until the last view is freed
    start = -raw.data_ptr() % HUGE_PAGE
    return raw[start:start + nbytes].view(dtype).view(shape)
