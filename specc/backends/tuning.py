"""The Triton backend's launch plan, chosen by measurement (issue #17): the tile a program computes,
the warps it runs on, and whether a pass's time loop is one persistent kernel or a launch a step.
Which is fastest depends on the cell, its sizes, the batch, the products' precision and the GPU,
and no rule of ours predicts it, so where the generated module asks for it (its TUNE setting)
each plan runs a short forward + backward on the caller's own tensors on first use, and the
fastest is kept for the process (per cell, sizes, batch, precision and device). bench/gpu.py
times the same plans one by one (--tiles, --warps, --persistent).

Not yet timed on a GPU: TUNE is off by default, and the plans are the generated module's own
settings (TILES, NUM_WARPS, PERSISTENT), set for the length of each call.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch

PROBE_STEPS = 32  # steps of a timed forward + backward (fewer if the sequence is shorter)
PROBE_RUNS = 2  # timed calls a plan, after one untimed one (which compiles its kernels)
CLOCK = time.perf_counter  # what times a call (tests give their own times)


@dataclass(frozen=True)
class Plan:
    tiles: tuple[int, int, int] | None = None  # (BLOCK_B, BLOCK_F, BLOCK_K); None: tiles()'s choice
    warps: int | None = None  # None: NUM_WARPS
    persistent: bool = False

    def label(self) -> str:
        parts = ["x".join(map(str, self.tiles)) if self.tiles else "default tiles",
                 f"{self.warps or 'default'} warps", "persistent" if self.persistent else "a launch a step"]
        return ", ".join(parts)


# The module's own choice first (the fallback where every other fails), then one change at a time:
# the tiles bench/results/gpu-2026-11-26.md found best at some size, more warps, the persistent loop.
PLANS = (Plan(), Plan(tiles=(16, 16, 32)), Plan(tiles=(32, 32, 32)), Plan(tiles=(16, 64, 32)), Plan(warps=8),
         Plan(persistent=True))
_CHOSEN: dict[tuple, tuple[Plan, str]] = {}


@contextlib.contextmanager
def applied(prog, plan: Plan | None):
    """The generated module `prog` launching its kernels as `plan` says, for the length of the block."""
    if plan is None:
        yield
        return
    before = prog.TILES, prog.NUM_WARPS, prog.PERSISTENT
    prog.TILES = plan.tiles or prog.TILES
    prog.NUM_WARPS = plan.warps or prog.NUM_WARPS
    prog.PERSISTENT = plan.persistent or prog.PERSISTENT
    try:
        yield
    finally:
        prog.TILES, prog.NUM_WARPS, prog.PERSISTENT = before


def choose(module, runner, tensors: list, n_inputs: int, n_states: int, T: int, B: int) -> tuple[Plan, str]:
    """The fastest of PLANS for this call's cell, sizes, batch, precision and device, and why; timed
    once a process."""
    prog = module.program
    device = tensors[0].device
    # What the timing depends on: the cell, its sizes and batch, the scan option, the module's own
    # launch settings (the default plan, and what the persistent one does), precision, device.
    settings = (prog.TILES, prog.NUM_WARPS, prog.PERSISTENT, prog.PERSISTENT_FEATURES, prog.GRID_SYNC)
    key = (prog.__name__, tuple(sorted(module.dims.items())), B, module.scan, settings, runner.products,
           torch.get_float32_matmul_precision(), str(device),
           torch.cuda.get_device_name(device) if device.type == "cuda" else "interpreter")
    if key in _CHOSEN:
        return _CHOSEN[key]
    steps = min(T, PROBE_STEPS)
    once = probe(module, tensors, n_inputs, n_states, steps, B)
    seconds: dict[Plan, float] = {}
    for plan in PLANS:
        try:
            with applied(prog, plan), torch.no_grad():
                for call in range(1 + PROBE_RUNS):
                    _sync(device)
                    start = CLOCK()
                    once(runner)
                    _sync(device)
                    if call:
                        seconds[plan] = min(seconds.get(plan, float("inf")), CLOCK() - start)
        except Exception:  # noqa: BLE001 - a plan the GPU cannot run (too much shared memory) is not a choice
            seconds.pop(plan, None)
    best = min(seconds, key=seconds.get) if seconds else Plan()
    timings = ", ".join(f"{p.label()} {1e3 * t:.2f} ms" for p, t in sorted(seconds.items(), key=lambda kv: kv[1]))
    why = (f"{best.label()}: the fastest of {len(seconds)} launch plans timed on first use with batch {B} "
           f"(forward + backward of {steps} steps: {timings})")
    _CHOSEN[key] = (best, why)
    return _CHOSEN[key]


def probe(module, tensors: list, n_inputs: int, n_states: int, T: int, B: int):
    """A forward + backward of the first T steps of the caller's own tensors, to be timed: a function
    that runs it on a runner (gradients of ones; no autograd). Also what `auto` times the C loops
    against NumPy with (runtime.time_backends)."""
    prog, dims = module.program, module._dim_args
    device = tensors[0].device
    work = [t.detach().float() for t in tensors]  # half-precision tensors are widened for the real call too
    work[:n_inputs] = [x[:T] for x in work[:n_inputs]]
    params = work[n_inputs + n_states:]
    d_outs = [torch.ones((T, B, module.sizes["outputs"][n][0]), device=device) for n in prog.OUTPUTS]
    d_finals = [torch.ones((B, module.sizes["states"][n][0]), device=device) for n in prog.STATES]

    def once(runner) -> None:
        _, _, saved = runner.forward(prog, work, T, B, dims, train=True)
        runner.backward(prog, saved, d_outs, d_finals, params, T, B, dims)

    return once


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
