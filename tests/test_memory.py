"""The C loops' large buffers on huge pages (specc/backends/memory.py): ordinary tensors to every
reader, freed with their last view, and the loops' numbers unchanged when every buffer is one."""
from __future__ import annotations

import gc
import mmap
import weakref

import pytest
import torch

import specc
from specc.backends import memory
from helpers import TORCH_LAYERS, TorchLayer, assert_matches_references, assert_same, run

linux = pytest.mark.skipif(not hasattr(mmap, "MADV_HUGEPAGE"), reason="huge pages are asked for on Linux only")


@linux
def test_a_large_buffer_is_a_tensor_on_its_own_huge_pages():
    n = memory.HUGE_MIN // 4
    a = memory.empty((n // 1024, 1024))
    b = memory.empty((n,), device="cpu")
    assert a.shape == (n // 1024, 1024) and a.dtype == torch.float32 and a.is_contiguous()
    assert a.data_ptr() % memory.HUGE_PAGE == 0 and b.data_ptr() % memory.HUGE_PAGE == 0
    a.fill_(1.5)
    b.fill_(-2.0)  # neither overlaps the other
    assert a.sum().item() == 1.5 * n and b.sum().item() == -2.0 * n
    assert (a.T @ a[:, :3]).shape == (1024, 3)


@linux
def test_a_buffer_is_unmapped_with_its_last_view(monkeypatch):
    made = []
    real = mmap.mmap

    def recorded(*args, **kwargs):
        pages = real(*args, **kwargs)
        made.append(weakref.ref(pages))
        return pages

    monkeypatch.setattr(mmap, "mmap", recorded)
    t = memory.empty((memory.HUGE_MIN // 8,), dtype=torch.float64)
    view = t[10:20]
    del t
    gc.collect()
    assert len(made) == 1 and made[0]() is not None  # the view still holds it
    view.fill_(3.0)
    del view
    gc.collect()
    assert made[0]() is None


def test_small_or_other_devices_or_no_huge_pages_are_torch_empty(monkeypatch):
    small = memory.empty((16, 16))
    assert small.untyped_storage().resizable()  # torch's own allocation
    assert memory.empty((memory.HUGE_MIN,), device="meta").device.type == "meta"
    monkeypatch.setattr(memory, "_ADVICE", None)
    assert memory.empty((memory.HUGE_MIN // 4,)).untyped_storage().resizable()


@linux
@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_every_buffer_on_huge_pages_gives_torchs_numbers(monkeypatch, name):
    """HUGE_MIN = 0: each buffer around the C loops (states, kept values, products' results, the
    loop's scratch) is a mapping of its own, so an offset or a size wrong by a row shows here."""
    monkeypatch.setattr(memory, "HUGE_MIN", 0)
    make, _ = TORCH_LAYERS[name]
    ref = make(24, 40)
    ours = specc.from_torch(ref, backend="c")
    x = torch.randn(7, 5, 24)
    state = [torch.randn(5, 40) * 0.5 for _ in ours.program.STATES]
    assert_same(run(ours, x, state), run(TorchLayer(ref), x, state))


@linux
def test_every_buffer_on_huge_pages_gives_the_hand_written_cells_numbers(monkeypatch):
    monkeypatch.setattr(memory, "HUGE_MIN", 0)
    assert_matches_references("c")
