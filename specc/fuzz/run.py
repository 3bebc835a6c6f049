"""One cell on every backend against the reference (specc/fuzz/reference.py).

`differences(text, dims, backends)` loads the cell on each backend, runs it on random data and
returns what disagrees with the reference: outputs, final states and the gradients of every
input, initial state and parameter, in training, without gradients (the inference paths: states
kept in two blocks, long sequences in chunks), with `lengths` (masking) and after `.to(float64)`.
An exception after the checker accepted the cell is reported too: a crash is a bug.

Tolerances: float64 (NumPy) 1e-9 and float32 (C, Triton) 1e-4, relative to the largest entry of
the reference tensor, plus a few times what the reference itself moves between float32 and
float64, so that a cell whose gradient is ill-conditioned in float32 is not a mismatch.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .. import program
from ..check import check, check_dims
from ..errors import SpecError
from ..parse import parse
from ..pipeline import compile_cell
from ..runtime import own_inputs
from . import reference

BACKENDS = ("numpy", "c", "triton")
TOL = {torch.float64: 1e-9, torch.float32: 1e-4}
F32, F64 = torch.float32, torch.float64
# Values past this are taken as a cell that diverges on its random data: not compared.
LARGE = 1e4


@dataclass(frozen=True)
class Finding:
    backend: str
    mode: str  # train, no_grad, data (inputs asking no gradient), chunked, lengths, float64, load, check
    what: str  # "output y", "d W_ih", ... or the exception
    error: float = float("nan")  # largest difference, relative to the reference's scale

    def __str__(self) -> str:
        err = "" if self.error != self.error else f": off by {self.error:.3g} of scale"
        return f"[{self.backend} {self.mode}] {self.what}{err}"


@dataclass
class Data:
    T: int
    B: int
    inputs: dict
    states: dict
    params: dict
    d_outs: dict
    d_finals: dict
    lengths: list[int]


def _data(cell, dims, gen: torch.Generator, T: int, B: int) -> Data:
    """Random data, drawn in float32 so that every backend gets exactly the same numbers."""
    def randn(*shape, scale=1.0):
        return (torch.randn(shape, generator=gen) * scale).to(F32)  # shape () too: a learned scalar

    inputs = {d.name: randn(T, B, *reference.size(d.shape, dims)) for d in cell.own_inputs}
    states = {d.name: randn(B, *reference.size(d.shape, dims), scale=0.5) for d in cell.states}
    params = {d.name: randn(*reference.size(d.shape, dims), scale=0.5) for d in cell.params}
    sizes = {}
    probe = reference.step(cell, {**{(k, False): v[0] for k, v in inputs.items()},
                                  **{(k, False): v for k, v in states.items()},
                                  **{(k, False): v for k, v in params.items()}})
    for name, t in cell.outputs:
        sizes[name] = probe[(t.name, t.next)].shape[-1]
    d_outs = {n: randn(T, B, k) for n, k in sizes.items()}
    d_finals = {d.name: randn(B, *reference.size(d.shape, dims)) for d in cell.states}
    lengths = sorted((int(torch.randint(1, T + 1, (1,), generator=gen)) for _ in range(B)), reverse=True)
    lengths[0] = T
    perm = torch.randperm(B, generator=gen).tolist()
    return Data(T, B, inputs, states, params, d_outs, d_finals, [lengths[i] for i in perm])


def _nudged(data: Data, gen: torch.Generator) -> Data:
    """The data with each input, state and parameter scaled by 1 + u * 2^-21, |u| <= 1 (a few ulps)."""
    def nudge(d: dict) -> dict:
        return {k: v * (1 + (torch.rand(v.shape, generator=gen) * 2 - 1) * 2.0 ** -21) for k, v in d.items()}

    return Data(data.T, data.B, nudge(data.inputs), nudge(data.states), nudge(data.params), data.d_outs,
                data.d_finals, data.lengths)


def _reference(cell, data: Data, dtype, lengths=None, grads=True):
    """(values by name, gradients by name) from the reference loop in `dtype`."""
    leaves = {}
    for kind in ("inputs", "states", "params"):
        for k, v in getattr(data, kind).items():
            # a `const` is not trained: no gradient to compare
            leaves[(kind, k)] = v.to(dtype, copy=True).requires_grad_(grads and not (kind == "params" and k in cell.consts))
    inputs = {k: leaves[("inputs", k)] for k in data.inputs}
    states = {k: leaves[("states", k)] for k in data.states}
    params = {k: leaves[("params", k)] for k in data.params}
    outs, finals = reference.run(cell, inputs, states, params, lengths)
    values = {f"output {k}": v for k, v in outs.items()} | {f"final {k}": v for k, v in finals.items()}
    if not grads:
        return {k: v.detach() for k, v in values.items()}, {}
    loss = _loss(outs, finals, data, dtype)
    wrt = [(k, v) for k, v in leaves.items() if v.requires_grad]
    got = torch.autograd.grad(loss, [v for _, v in wrt], allow_unused=True)
    gradients = {f"d {k[1]}": (torch.zeros_like(v) if g is None else g) for (k, v), g in zip(wrt, got)}
    return {k: v.detach() for k, v in values.items()}, gradients


def _loss(outs, finals, data: Data, dtype):
    loss = 0.0
    for k, v in outs.items():
        if k in data.d_outs:
            loss = loss + (v * data.d_outs[k].to(dtype)).sum()
    for k, v in finals.items():
        loss = loss + (v * data.d_finals[k].to(dtype)).sum()
    return loss


def _scale(t: torch.Tensor) -> float:
    return max(float(t.abs().max()) if t.numel() else 0.0, 1e-3)


def _compare(findings, backend, mode, got: dict, want64: dict, want32: dict | None, dtype) -> None:
    for key, want in want64.items():
        g = got.get(key)
        if g is None:
            findings.append(Finding(backend, mode, f"{key} missing"))
            continue
        if tuple(g.shape) != tuple(want.shape):
            findings.append(Finding(backend, mode, f"{key} has shape {tuple(g.shape)}, want {tuple(want.shape)}"))
            continue
        if not torch.isfinite(g.double()).all():
            findings.append(Finding(backend, mode, f"{key} is not finite"))
            continue
        diff = float((g.double() - want.double()).abs().max()) if want.numel() else 0.0
        slack = TOL[dtype] * _scale(want)
        if want32 is not None and want.numel():
            # What float32 itself costs on this cell, by the reference's own float32 runs, times 8:
            # a softmax of logits 10 apart has a float32 gradient good to ~1e-3 whoever computes it,
            # and where the reference's rounding happens to be lucky another order of the same sums
            # lands up to ~5x further (seed 303, cell 32: torch 0.18% off, specc 0.9%; with 4x it was
            # a finding). A wrong formula is off by far more than rounding.
            slack += 8 * max(float((w[key].double() - want.double()).abs().max())
                             for w in (want32 if isinstance(want32, list) else [want32]))
        if dtype == torch.float32:
            # A few ulps of the O(1) numbers the data is drawn as: a gradient that cancels to zero
            # exactly in the reference's order of sums is an ulp or two off in another order, and
            # the nudged runs cannot show it (seed 808, cell 2232: d a1 of h1' = a1 - h1 over four
            # steps is 0 in the reference, one ulp of 1.0 in the C loops; the scale's floor, 1e-3,
            # made that 1.2e-4 of "scale").
            slack = max(slack, 16 * torch.finfo(torch.float32).eps)
        if diff > slack:
            findings.append(Finding(backend, mode, key, diff / _scale(want)))


@contextlib.contextmanager
def _setting(*changes):
    """Attributes set to values for the block, and put back after: (object, name, value) each."""
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in changes]
    for obj, name, value in changes:
        setattr(obj, name, value)
    try:
        yield
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)


def _small(prog):
    """Long-sequence inference split into chunks of two steps, so that a short sequence takes the
    chunked path (the generated module's CHUNK_ROWS and CHUNK_STEPS, and NumPy's CHUNK_ROWS)."""
    from ..backends import numpy_runtime

    return _setting((prog, "CHUNK_ROWS", 1), (prog, "CHUNK_STEPS", 2), (numpy_runtime, "CHUNK_ROWS", 1))


def _persistent(prog):
    """Triton's time loop as one kernel a pass (the generated module's PERSISTENT), not a launch a
    step, at any width (the interpreter has no shared memory to fill)."""
    return _setting((prog, "PERSISTENT", True), (prog, "PERSISTENT_FEATURES", 1 << 30))


def _module(prog, dims, backend, dtype, data: Data):
    from ..runtime import CellModule

    m = CellModule(prog, dims, backend=backend, dtype=dtype)
    m.eval()  # dropout and zoneout then use their expectations, which the reference computes too
    with torch.no_grad():
        for k, v in data.params.items():
            getattr(m, k).copy_(v)
    return m


def _run_module(m, prog, data: Data, dtype, grads: bool, input_grads: bool = True):
    """Outputs, final states and (grads) the gradients of the initial states, the parameters and
    (input_grads) the inputs; without input_grads the inputs are data no gradient is asked of,
    which the generated backward is told (it leaves out what only their gradients need)."""
    given = own_inputs(prog)
    xs = tuple(data.inputs[k].to(dtype, copy=True).requires_grad_(grads and input_grads) for k in given)
    hs = tuple(data.states[k].to(dtype, copy=True).requires_grad_(grads) for k in prog.STATES)
    with contextlib.nullcontext() if grads else torch.no_grad():
        outs, finals = m(xs if len(xs) != 1 else xs[0], hs if len(hs) != 1 else hs[0])
    outs = outs if isinstance(outs, tuple) else (outs,)
    finals = finals if isinstance(finals, tuple) else (finals,)
    values = {f"output {k}": v for k, v in zip(prog.OUTPUTS, outs)}
    values |= {f"final {k}": v for k, v in zip(prog.STATES, finals)}
    if not grads:
        return {k: v.detach() for k, v in values.items()}
    loss = _loss(dict(zip(prog.OUTPUTS, outs)), dict(zip(prog.STATES, finals)), data, dtype)
    trained = [k for k in prog.PARAMS if k not in getattr(prog, "CONSTS", ())]
    params = [getattr(m, k) for k in trained]
    asked = [*(xs if input_grads else ()), *hs, *params]
    # (A loss of inputs alone, with `data`'s inputs, asks nothing: every gradient is zero.)
    got = torch.autograd.grad(loss, asked, allow_unused=True) if loss.requires_grad else [None] * len(asked)
    names = [*(given if input_grads else ()), *prog.STATES, *trained]
    grads_ = {f"d {k}": (torch.zeros_like(t) if g is None else g) for k, t, g in zip(names, asked, got)}
    return {k: v.detach() for k, v in values.items()} | grads_


def _finite(*dicts) -> bool:
    return all(v.numel() == 0 or (bool(torch.isfinite(v).all()) and float(v.abs().max()) < LARGE)
               for d in dicts for v in d.values())


def differences(text: str, dims: dict, backends=BACKENDS, seed: int = 0, modes=None) -> list[Finding]:
    """Everything on which a backend disagrees with the reference, for one cell."""
    modes = set(modes or ("train", "no_grad", "data", "chunked", "lengths", "float64", "persistent"))
    findings: list[Finding] = []
    try:
        cells = check(parse(text, "<fuzz>"))
        cell = cells[0]
        check_dims(cell, dims)
    except SpecError as e:
        return [Finding("-", "check", f"the checker refused a generated cell: {e}")]
    try:
        prog = program(compile_cell(cell, text, "<fuzz>"))
    except Exception as e:  # noqa: BLE001 - a crash after the checker is what is looked for
        return [Finding("-", "compile", f"{type(e).__name__}: {e}")]
    gen = torch.Generator().manual_seed(seed)
    T = int(torch.randint(1, 5, (1,), generator=gen))
    B = int(torch.randint(1, 4, (1,), generator=gen))
    data = _data(cell, dims, gen, T, B)
    ref64 = _reference(cell, data, F64)
    ref32 = _reference(cell, data, F32)
    # The same in float32 on data nudged by a few ulps: how much float32 rounding moves each result
    # (ref32 alone can land close by luck where the computation is ill-conditioned).
    ref32n = _reference(cell, _nudged(data, gen), F32)
    if not _finite(*ref64):
        return []  # diverges on this data: nothing to compare
    for backend in backends:
        dtype = F64 if backend == "numpy" else F32
        want32 = None if dtype == F64 else [{**ref32[0], **ref32[1]}, {**ref32n[0], **ref32n[1]}]
        try:
            m = _module(prog, dims, backend, dtype, data)
        except Exception as e:  # noqa: BLE001
            findings.append(Finding(backend, "load", f"{type(e).__name__}: {e}"))
            continue
        for mode in ("train", "no_grad", "data", "persistent"):
            if mode not in modes or mode == "persistent" and backend != "triton":
                continue
            try:
                with _persistent(prog) if mode == "persistent" else contextlib.nullcontext():
                    got = _run_module(m, prog, data, dtype, grads=mode != "no_grad", input_grads=mode != "data")
            except Exception as e:  # noqa: BLE001
                findings.append(Finding(backend, mode, f"{type(e).__name__}: {e}"))
                continue
            want = ref64[0] if mode == "no_grad" else {**ref64[0], **ref64[1]}
            if mode == "data":  # inputs that ask for no gradient get none
                want = {k: v for k, v in want.items() if k not in {f"d {x}" for x in own_inputs(prog)}}
            _compare(findings, backend, mode, got, want, want32, dtype)
        if "float64" in modes and backend == "numpy":
            _float64_after_to(findings, prog, dims, data, ref64)
        if "chunked" in modes:
            _chunked(findings, cell, prog, dims, backend, dtype, gen)
        if "lengths" in modes and data.B > 1:
            _lengths(findings, cell, text, dims, backend, dtype, data, ref32)
    return findings


def _float64_after_to(findings, prog, dims, data, ref64) -> None:
    """A module made in float32 and moved with .to(float64) computes in float64."""
    try:
        m = _module(prog, dims, "auto", F32, data).to(F64)
        got = _run_module(m, prog, data, F64, grads=True)
    except Exception as e:  # noqa: BLE001
        findings.append(Finding("auto", "float64", f"{type(e).__name__}: {e}"))
        return
    _compare(findings, "auto", "float64", got, {**ref64[0], **ref64[1]}, None, F64)


def _chunked(findings, cell, prog, dims, backend, dtype, gen) -> None:
    """Inference over a sequence long enough to be cut into chunks (and an odd number of steps,
    for states kept in two blocks used in turn)."""
    T, B = 7, int(torch.randint(1, 3, (1,), generator=gen))
    data = _data(cell, dims, gen, T, B)
    want64 = _reference(cell, data, F64, grads=False)[0]
    if not _finite(want64):
        return
    want32 = _reference(cell, data, F32, grads=False)[0] if dtype == F32 else None
    try:
        m = _module(prog, dims, backend, dtype, data)
        with _small(prog):
            got = _run_module(m, prog, data, dtype, grads=False)
    except Exception as e:  # noqa: BLE001
        findings.append(Finding(backend, "chunked", f"{type(e).__name__}: {e}"))
        return
    _compare(findings, backend, "chunked", got, want64, want32, dtype)


def _lengths(findings, cell, text, dims, backend, dtype, data: Data, ref32) -> None:
    """Padded sequences of different lengths, as a recurrent layer runs them (the masked cell)."""
    from ..masking import compile_masked
    from ..network import Recurrent

    lengths = data.lengths
    try:
        prog = program(compile_masked(cell, text, "<fuzz>"))
        layer = Recurrent(prog, [dims], len(cell.own_inputs), dtype=dtype, backend=backend).eval()
        with torch.no_grad():
            for k, v in data.params.items():
                getattr(layer.cell(), k).copy_(v)
        names = [d.name for d in cell.own_inputs]
        xs = {k: data.inputs[k].to(dtype, copy=True).requires_grad_() for k in names}
        hs = {k: data.states[k].to(dtype, copy=True).requires_grad_() for k in data.states}
        out, final = layer(xs[names[0]], hx={k: v[None] for k, v in hs.items()}, lengths=lengths,
                           inputs={k: xs[k] for k in names[1:]})
        finals = final if isinstance(final, tuple) else (final,)
        first = cell.outputs[0][0]
        outs = {first: out}
        fin = {s: f[0] for s, f in zip(layer.state_names, finals)}
        loss = _loss(outs, fin, data, dtype)
        trained = [k for k in data.params if k not in cell.consts]
        params = [getattr(layer.cell(), k) for k in trained]
        leaves = [*xs.values(), *hs.values(), *params]
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        keys = [*(f"d {k}" for k in xs), *(f"d {k}" for k in hs), *(f"d {k}" for k in trained)]
        got = {k: (torch.zeros_like(t) if g is None else g) for k, t, g in zip(keys, leaves, grads)}
        got |= {f"output {first}": out.detach()} | {f"final {k}": v.detach() for k, v in fin.items()}
    except Exception as e:  # noqa: BLE001
        findings.append(Finding(backend, "lengths", f"{type(e).__name__}: {e}"))
        return
    # The layer hands out its first output only, and the loss above reads that one alone.
    data_first = Data(data.T, data.B, data.inputs, data.states, data.params, {first: data.d_outs[first]},
                      data.d_finals, lengths)
    want64 = _first_only(_reference(cell, data_first, F64, lengths=lengths), first)
    if not _finite(want64):
        return
    want32 = None if dtype == F64 else _first_only(_reference(cell, data_first, F32, lengths=lengths), first)
    _compare(findings, backend, "lengths", got, want64, want32, dtype)


def _first_only(ref, first: str) -> dict:
    values, grads = ref
    return {k: v for k, v in values.items() if not k.startswith("output ") or k == f"output {first}"} | grads
