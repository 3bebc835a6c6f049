"""The C loops' large buffers on huge pages (specc/backends/memory.py): torch's own tensors, with
huge pages asked for inside them only, and the loops' numbers unchanged when every buffer is so."""
from __future__ import annotations

import mmap

import pytest
import torch

import specc
from specc.backends import memory
from helpers import TORCH_LAYERS, TorchLayer, assert_matches_references, assert_same, run

linux = pytest.mark.skipif(not hasattr(mmap, "MADV_HUGEPAGE"), reason="huge pages are asked for on Linux only")


def _recorded(monkeypatch):
    """memory's madvise, recording each call and what the kernel answered."""
    calls = []
    real = memory._madvise

    def recorded(start, length, advice):
        calls.append((start, length, advice, real(start, length, advice)))
        return calls[-1][-1]

    monkeypatch.setattr(memory, "_madvise", recorded)
    return calls


@linux
def test_a_large_buffer_is_torchs_tensor_with_huge_pages_asked_for_inside_it(monkeypatch):
    calls = _recorded(monkeypatch)
    n = memory.HUGE_MIN // 4 + 3 * 1024 + 5  # not a whole number of pages
    t = memory.empty((n,))
    assert t.shape == (n,) and t.dtype == torch.float32 and t.untyped_storage().resizable()
    [(start, length, advice, answer)] = calls
    assert advice == mmap.MADV_HUGEPAGE and answer == 0
    assert start % memory.HUGE_PAGE == 0 and length % memory.HUGE_PAGE == 0
    assert t.data_ptr() <= start and start + length <= t.data_ptr() + t.nbytes  # nothing outside it
    assert length >= t.nbytes - 2 * memory.HUGE_PAGE  # all of it but the two partial pages
    t.fill_(1.5)
    assert t.double().sum().item() == 1.5 * n
    t.resize_(2 * n)  # an ordinary tensor: its storage grows as torch's do


def test_small_or_other_devices_or_no_huge_pages_are_left_as_torch_makes_them(monkeypatch):
    calls = _recorded(monkeypatch) if memory._madvise is not None else []
    assert memory.empty((16, 16)).shape == (16, 16)
    assert memory.empty((memory.HUGE_MIN,), device="meta").device.type == "meta"
    assert calls == []
    monkeypatch.setattr(memory, "_madvise", None)
    assert memory.empty((memory.HUGE_MIN // 4,)).untyped_storage().resizable()


@linux
@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_every_buffer_on_huge_pages_gives_torchs_numbers(monkeypatch, name):
    """HUGE_MIN = 0: huge pages asked for behind every buffer around the C loops (states, kept
    values, products' results, the loop's scratch), small ones from glibc's heap included."""
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
