"""Random cells on every backend against an independent reference (specc/fuzz).

The cells are drawn by hypothesis from every construct of the language (specc/fuzz/gen.py); the
reference evaluates the checked cell op by op in torch with autograd (specc/fuzz/reference.py),
sharing nothing with specc's IR, optimiser, autodiff, scheduler or code generators. A finding
shrinks to a small spec by itself. `python -m specc.fuzz --cells 10000` runs longer.
"""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings

from specc.fuzz import reference
from specc.fuzz.gen import cells
from specc.fuzz.run import differences

CELLS = int(os.environ.get("SPECC_FUZZ_CELLS", "300"))


@pytest.mark.parametrize("backend", ["numpy", "c", "triton"])
def test_random_cells_match_the_reference(backend):
    @settings(max_examples=CELLS, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(cells())
    def one(cell):
        found = differences(cell.text, cell.dims, (backend,))
        assert not found, "\n".join(map(str, found))

    one()
