"""Shared fixtures for the numerical test suite.

The references the tests compare against (torch.nn layers, hand-written torch loops, finite
differences) share no code with specc; the helpers here only build random data and compare.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

# Without a GPU, the Triton backend's kernels run in Triton's interpreter. Triton reads this when
# it is first imported, so it is set here, before any test loads a generated module.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parent.parent
SPECS = REPO / "specs"


@pytest.fixture(autouse=True)
def _fixed_seed():
    """Every test starts from the same random state, whatever ran before it."""
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def _choices(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("choices")


@pytest.fixture(autouse=True)
def _quick_probe(monkeypatch, _choices):
    """`auto`'s timing of the two CPU backends waits PROBE_SETTLE seconds into each of its rows of
    calls before it times one (other threads' spinning); the tests of what it chooses set it back,
    the rest of the suite, which only needs a choice, does not wait. Choices timed so are kept in
    the session's own folder, not in the user's cache, where `auto` would go on using them."""
    from specc import runtime

    monkeypatch.setattr(runtime, "PROBE_SETTLE", 0.0)
    monkeypatch.setattr(runtime, "PROBE_FIRST_CALLS", 0)
    monkeypatch.setattr(runtime, "choice_dir", lambda: _choices)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def specs_dir() -> Path:
    return SPECS


class Close:
    """Tolerances per dtype, and a comparison that says what differed."""

    TOL = {torch.float64: 1e-10, torch.float32: 1e-5}

    def __call__(self, got, want, dtype=None, what="", tol=None):
        assert isinstance(got, torch.Tensor), f"{what}: got {type(got).__name__}, not a tensor"
        assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
        dtype = dtype or want.dtype
        assert got.dtype == dtype, f"{what}: dtype {got.dtype} != {dtype}"
        tol = self.TOL[dtype] if tol is None else tol
        torch.testing.assert_close(got.detach(), want.detach().to(got.dtype), rtol=tol, atol=tol,
                                   msg=lambda m: f"{what}: {m}")


@pytest.fixture
def close() -> Close:
    return Close()


@pytest.fixture
def randomize():
    """Fill every parameter of a module with fresh random values (zero-initialised biases
    would hide mistakes in their gradients)."""

    def fill(module, scale=0.5):
        with torch.no_grad():
            for p in module.parameters():
                p.copy_(torch.randn_like(p) * scale)
        return module

    return fill


# --- every cell of every spec in specs/, found when the tests are collected ---------------------

class SpecCell(NamedTuple):
    path: Path
    cell: str
    dims: tuple[str, ...]

    @property
    def id(self) -> str:
        return f"{self.path.stem}:{self.cell}"


def discover_spec_cells() -> list[SpecCell]:
    """Parse and check each specs/*.rnn (so a new spec is tested the day it lands)."""
    from specc.check import check
    from specc.parse import parse

    found = []
    for path in sorted(SPECS.glob("*.rnn")):
        for cell in check(parse(path.read_text(encoding="utf-8"), str(path))):
            found.append(SpecCell(path, cell.name, tuple(cell.dims)))
    return found


def pytest_generate_tests(metafunc):
    """A test taking `spec_cell` runs once per cell of every spec file."""
    if "spec_cell" in metafunc.fixturenames:
        cells = discover_spec_cells()
        metafunc.parametrize("spec_cell", cells, ids=[c.id for c in cells])


def small_dims(spec_cell: SpecCell, dtype=torch.float64):
    """(module, dims): the cell with small, distinct sizes (3, 4, 5, ...), or other small ones if
    the spec needs them (an even H for a split into halves, say)."""
    import specc

    base = [3, 4, 5, 2, 6]
    candidates = [{d: base[(i + k) % len(base)] for i, d in enumerate(spec_cell.dims)} for k in range(len(base))]
    candidates += [{d: v for d in spec_cell.dims} for v in (2, 4, 6, 8, 12)]
    errors = []
    for dims in candidates:
        try:
            return specc.load(spec_cell.path, spec_cell.cell, dtype=dtype, **dims), dims
        except ValueError as e:  # some size would not be a positive whole number
            errors.append(f"{dims}: {e}")
    raise AssertionError(f"{spec_cell.id}: no small binding of its dimensions loads:\n" + "\n".join(errors))


@pytest.fixture(scope="session")
def all_spec_cells() -> list[SpecCell]:
    return discover_spec_cells()


@pytest.fixture(scope="session")
def load_small():
    return small_dims
