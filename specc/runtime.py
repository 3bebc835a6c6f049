"""The runtime: a compiled cell as a torch.nn.Module whose gradients come from the generated BPTT.

This module and the generated code are all that a module written by `specc compile` imports.
"""
from __future__ import annotations

import hashlib
import linecache
import math
import os
import sys
import types
from pathlib import Path

import torch
from torch import nn

from . import torch_ops
from .atomic import write_atomically
from .backends import BACKENDS

_NUMPY_DTYPES = (torch.float32, torch.float64)
_HALF = (torch.float16, torch.bfloat16)


def load_program(source: str, cell: str) -> types.ModuleType:
    """Execute a generated module's source (generated code, never spec text) as a module.

    Its name is a digest of the source, so the same cell is the same module in every process:
    modules pickle and deepcopy by carrying the source and finding or re-making the module.
    """
    # Triton decides when a kernel is defined whether it runs compiled or interpreted.
    mode = os.environ.get("TRITON_INTERPRET", "0")
    digest = hashlib.sha256(f"{mode}\0{source}".encode()).hexdigest()[:16]
    name = f"specc_generated_{cell}_{digest}"
    if name not in sys.modules:
        module = types.ModuleType(name)
        # One file name per source: Triton's interpreter reads kernels back through linecache, and
        # two modules of one cell (masked and not, say) must not read each other's lines.
        module.__file__ = f"<specc {cell} {digest[:8]}>"
        module.__specc_source__ = source
        sys.modules[name] = module  # so the module's own class can find it
        # Triton reads a kernel's source through inspect, which reads it through linecache.
        linecache.cache[module.__file__] = (len(source), None, source.splitlines(True), module.__file__)
        try:
            exec(compile(source, module.__file__, "exec"), module.__dict__)
        except BaseException:
            # Not left half-made for the next load of the same source to find.
            del sys.modules[name]
            raise
    return sys.modules[name]


def own_inputs(prog) -> tuple[str, ...]:
    """The inputs a caller hands a compiled cell: all but the dropout and zoneout masks it draws."""
    noise = getattr(prog, "NOISE", {})
    return tuple(n for n in prog.INPUTS if n not in noise)


def spec_dims(prog) -> tuple[str, ...]:
    """The cell's dimensions as its spec names them (the generated code may rename some: DIM_NAMES)."""
    back = {v: k for k, v in getattr(prog, "DIM_NAMES", {}).items()}
    return tuple(back.get(d, d) for d in prog.DIMS)


def code_dims(prog, dims: dict) -> dict:
    """Dimensions by the spec's names, as the generated functions take them."""
    names = getattr(prog, "DIM_NAMES", {})
    return {names.get(k, k): v for k, v in dims.items()}


def check_backend(backend) -> None:
    """A backend a cell or network may be asked to run on: one of the registry's, or "auto"."""
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected 'auto', 'numpy', 'c' or 'triton'")


def check_dims(what: str, declared, dims: dict) -> None:
    """Every declared dimension bound to a positive whole number, and no other."""
    missing = [d for d in declared if d not in dims]
    unknown = [d for d in dims if d not in declared]
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"dimension{'s' if len(missing) > 1 else ''} {', '.join(missing)} not bound; "
                         f"pass {', '.join(d + '=...' for d in missing)}")
        if unknown:
            parts.append(f"no dimension {', '.join(unknown)} (the dimensions are {', '.join(declared)})")
        raise TypeError(f"{what}: " + "; ".join(parts))
    for k, v in dims.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{what}: dimension {k} must be a positive whole number, got {v!r}")


def _c_unusable(prog, dims) -> str | None:
    """Why backend "auto" cannot run this cell's loops in C on the CPU, or None: a compiler is
    there, the cell's loop is one the C backend writes, and its library compiles. A compiler's
    failure is reported once (a warning) and the NumPy backend runs instead."""
    from .backends import c_runtime

    problem = BACKENDS["c"].run().problem(prog)
    if problem is not None:
        return problem
    try:
        c_runtime.library(prog.C_SOURCE, dims)
    except c_runtime.CompileError as e:
        import warnings

        if c_runtime.first_failure(prog.C_SOURCE, dims):
            warnings.warn(f"cell '{prog.CELL}': {e}\nusing the NumPy backend instead", RuntimeWarning, stacklevel=5)
        return f"the C loops did not compile ({str(e).splitlines()[0]})"
    return None


# Backend "auto" on float32 CPU tensors times the C loops and the NumPy backend on the first call
# of a cell with its dimensions and batch size, and runs the faster from then on: which one wins
# depends on the CPU (its vector width, its cores, who else uses them), not only on the sizes, and
# issue 13 had the C loops 10-20x slower than NumPy on an AVX2 machine that no rule of sizes would
# have caught. The choice is kept in _CHOICES, and on disk beside the compiled loops, so that
# every process on this machine makes the same one (a run resumed from a checkpoint computes on
# the backend the first run did, bit for bit).
PROBE_STEPS = 32  # steps of the timed forward + backward (fewer if the sequence is shorter)
PROBE_RUNS = 2  # timed calls of a backend in a row, after PROBE_SETTLE seconds of untimed ones
PROBE_SETTLE = 0.15  # OpenBLAS's threads spin 2^28 cycles (~0.1 s) after their last product
# Rows of each backend, in turn. Two were not enough on a VM whose noise comes in bursts of half a
# second that no process of its own shows (a 2-core Xeon, 2026-12-03: one forward + backward of
# second_order's C loops took 45-105 ms from call to call, and a choice timed with both of the C
# loops' rows in a burst kept NumPy, 25 % slower, for good); a third row is run unless the first
# two made one backend PROBE_CLEAR times faster.
PROBE_ROWS = 3
PROBE_CLEAR = 1.5
# In a backend's first row, each length's calls are timed only after this many (or this many
# seconds) of them: on a 2-core Xeon VM the huge-page buffers (backends/memory.py) of a process's
# first 5-9 allocations of a size took 43-48 ms for 33 MB, then 3-4 ms, and second_order's C loops
# (a 33.5 MB buffer at 32 steps) ran 61-85 ms a probe call against 33-35 once warm: auto kept NumPy.
PROBE_FIRST_CALLS = 8
PROBE_FIRST_SECONDS = 1.0
# In the choice files' key: choices a former way of timing made are timed again (2: two lengths,
# 3: a first row that waits for its calls to settle).
PROBE_METHOD = 3
_CHOICES: dict[tuple, tuple[str, str]] = {}


def probe_lengths(T: int) -> list[int]:
    """The steps time_backends times a sequence of T steps at: all of them, or for a longer one
    PROBE_STEPS and a quarter of that."""
    long = min(T, PROBE_STEPS)
    return [long] if T == long else [max(1, long // 4), long]


def time_backends(module, tensors: list, n_inputs: int, n_states: int, T: int, B: int) -> dict[str, float]:
    """Seconds of one forward + backward of T steps on each of the C loops and the NumPy backend
    (the best of timed calls), on the caller's own tensors: timed on T steps, or for a longer
    sequence on its first PROBE_STEPS and a quarter of that, the time of T steps drawn through the
    two. The C loops cost more than NumPy once a call and less a step: an Elman cell at 200 x 8 x
    64 x 64 took the same 0.5 ms on both for 32 steps, and 1.6 ms against 2.9 for its 200 steps.

    Each backend runs a row of calls, PROBE_ROWS times in turn (C, NumPy, C, NumPy, ...), and only
    the calls that start PROBE_SETTLE seconds or more into a row are timed (PROBE_RUNS of them for
    each length; the first call of a length in a row is never timed: first-touch memory, oneDNN's
    plans): a backend leaves thread pools spinning for a while after its products (NumPy's
    OpenBLAS ~0.1 s, torch's), which slow whatever runs next on a machine of few cores (an LSTM at
    100x16x128x128 on 2 cores: the C loops 3 ms a probe alone, 8 ms right after NumPy's), and what
    `auto` chooses is the backend that then runs alone. With one untimed call a row, a process
    that had just run NumPy's products had the C loops of an Elman cell at 100x64x256x256 timed
    slower than NumPy (42.8 ms a call chosen against 19.8).
    With 8 steps a probe and all of one backend's calls before the other's, `auto` picked the
    slower at half the sizes of bench/cpu.py on an idle AVX2 machine."""
    import time
    import warnings

    from .backends.tuning import probe

    lengths = probe_lengths(T)
    long = lengths[-1]
    once = {n: probe(module, tensors, n_inputs, n_states, n, B) for n in lengths}
    runners = [BACKENDS["c"].run(), BACKENDS["numpy"].run(scan=module.scan)]
    best = {(r.name, n): float("inf") for r in runners for n in lengths}

    def of_T(name: str) -> float:
        if T == long:
            return best[name, long]
        short = lengths[0]
        per_step = max(0.0, (best[name, long] - best[name, short]) / (long - short))
        return best[name, long] + (T - long) * per_step

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # what the real call warns of, it warns of itself
        for n, runner in enumerate(runners * PROBE_ROWS):
            seconds = {r.name: of_T(r.name) for r in runners}
            if n == 2 * len(runners) and max(seconds.values()) > PROBE_CLEAR * min(seconds.values()):
                break
            row = time.perf_counter()
            first = n < len(runners)  # a backend's first row: see PROBE_FIRST_CALLS
            for steps in lengths:
                calls = timed = 0
                begun = time.perf_counter()
                while timed < PROBE_RUNS:
                    start = time.perf_counter()
                    once[steps](runner)
                    warm = not first or calls >= PROBE_FIRST_CALLS or start - begun >= PROBE_FIRST_SECONDS
                    if calls and start - row >= PROBE_SETTLE and warm:
                        best[runner.name, steps] = min(best[runner.name, steps], time.perf_counter() - start)
                        timed += 1
                    calls += 1
    return {r.name: of_T(r.name) for r in runners}


def choice_dir() -> Path:
    """Where `auto`'s choices are kept: beside the compiled loops."""
    from .backends import c_runtime

    return c_runtime._cache_dir() / "choices"


def _auto_choice(module, tensors: list, n_inputs: int, n_states: int, T: int, B: int) -> tuple[str, str]:
    """("c" or "numpy", why) for a float32 cell whose C loops compile."""
    from .backends import c_runtime

    # What the timing depends on: the generated code, its sizes and batch, the compiler's flags, the
    # threads a pass splits its batch among, and the kernels OpenBLAS runs.
    key = (module.program.__name__, tuple(sorted(module.dims.items())), B, tuple(c_runtime.flags()),
           torch.get_num_threads(), os.environ.get("OPENBLAS_CORETYPE") or c_runtime._core_type(), module.scan)
    if key in _CHOICES:
        return _CHOICES[key]
    blas = c_runtime.blas_choice()  # which library the loops' products use (MKL's packing or not)
    text = repr((key, c_runtime.openblas(), c_runtime._cpu(), blas.steps, blas.host, PROBE_METHOD))
    path = choice_dir() / f"{hashlib.sha256(text.encode()).hexdigest()[:32]}.txt"
    try:
        name, why = path.read_text(encoding="utf-8").split("\n", 1)
        if name in ("c", "numpy"):
            _CHOICES[key] = (name, f"{why} (timed by an earlier process; deleting {path} times it again)")
    except (OSError, ValueError):
        pass
    if key not in _CHOICES:
        seconds = time_backends(module, tensors, n_inputs, n_states, T, B)
        name = min(seconds, key=seconds.get)
        timings = ", ".join(f"{n} {1e3 * t:.2f} ms" for n, t in sorted(seconds.items(), key=lambda kv: kv[1]))
        lengths = probe_lengths(T)
        how = "" if len(lengths) == 1 else f", from calls of {' and '.join(map(str, lengths))}"
        _CHOICES[key] = (name, f"the faster on this CPU, timed on first use with batch {B} "
                               f"(forward + backward of {T} steps{how}: {timings})")
        try:  # through a file of its own renamed into place, as the compiled loops are
            text = "\n".join(_CHOICES[key])
            write_atomically(path, lambda f: f.write(text.encode("utf-8")))
        except OSError:
            pass  # an unwritable cache: the choice is this process's alone
    return _CHOICES[key]


def _machine_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not a POSIX system that says
        return None


def _check_memory(what: str, shapes: dict, dtype: torch.dtype) -> None:
    """Refuse, before allocating, parameters larger than this machine's memory, naming the largest
    (torch's allocator would fail with its own message, or the machine would start swapping)."""
    total = _machine_memory()
    if total is None:
        return
    size = torch.empty((), dtype=dtype).element_size()
    need = {name: size * math.prod(shape) for name, shape in shapes.items()}
    if sum(need.values()) > total:
        name = max(need, key=need.get)
        raise ValueError(f"{what}: the parameters would take {sum(need.values()) / 2**30:,.1f} GiB "
                         f"({name} alone {tuple(shapes[name])}, {need[name] / 2**30:,.1f} GiB of {dtype}), more than "
                         f"this machine's memory ({total / 2**30:,.1f} GiB)")


def _half_products(device: torch.device, dtype: torch.dtype, autocast: bool = True) -> torch.dtype | None:
    """The half precision the Triton kernels' step products take, or None for float32: autocast's
    dtype where it is on for the device (and `autocast`), else the module's own (bfloat16 or
    float16 parameters). States, sums and every other operation stay float32. Triton's interpreter
    multiplies bfloat16 wrongly (its NumPy has no such type), so on CPU tensors only float16 is
    taken."""
    if autocast and _autocast_on(device.type):
        dtype = _autocast_dtype(device.type)
    if dtype not in _HALF or dtype == torch.bfloat16 and device.type != "cuda":
        return None
    return dtype


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: no device argument; the GPU's autocast, and the CPU's apart
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def _autocast_dtype(device_type: str) -> torch.dtype:
    if hasattr(torch, "get_autocast_dtype"):
        return torch.get_autocast_dtype(device_type)
    return torch.get_autocast_cpu_dtype() if device_type == "cpu" else torch.get_autocast_gpu_dtype()


class _Scan(torch.autograd.Function):
    """The whole sequence as one autograd node: forward and backward are the generated code."""

    @staticmethod
    def forward(ctx, module, backend, n_inputs, n_states, *tensors):
        prog, dims = module.program, module._dim_args
        T, B = module._steps_and_batch(tensors[:n_inputs], tensors[n_inputs:n_inputs + n_states])
        outs, finals, saved = backend.forward(prog, tensors, T, B, dims, train=True)
        ctx.module, ctx.backend, ctx.saved_values, ctx.sizes = module, backend, saved, (T, B)
        ctx.n_params = len(tensors) - n_inputs - n_states
        ctx.n_inputs = n_inputs
        # What backward reads shares memory with the inputs and the outputs. Saving them here lets
        # torch's version counters catch an in-place change made before backward, as for its own ops.
        ctx.save_for_backward(*tensors, *outs)
        return (*outs, *finals)

    @staticmethod
    def backward(ctx, *grads):
        module = ctx.module
        torch_ops.refuse_double_backward(module.cell_name)
        prog = module.program
        T, B = ctx.sizes
        saved_tensors = ctx.saved_tensors  # raises if any was modified in place since forward
        n_out = len(prog.OUTPUTS)
        params = saved_tensors[len(saved_tensors) - n_out - ctx.n_params:len(saved_tensors) - n_out]
        like = params[0] if params else grads[0]
        d_outs, d_finals = torch_ops.result_gradients(module, grads, T, B, like)
        # No input wants a gradient (a first layer fed data): the generated backward leaves out
        # what only the inputs' gradients need, as torch's autograd does for its own ops.
        inputs_grad = any(ctx.needs_input_grad[4:4 + ctx.n_inputs])
        out = ctx.backend.backward(prog, ctx.saved_values, d_outs, d_finals, params, T, B, module._dim_args,
                                   inputs_grad)
        return (None, None, None, None, *out)


class CellModule(nn.Module):
    """A compiled cell over whole sequences: `outputs, final_state = module(x, state)`, as nn.LSTM.

    x is (T, B, I), or (B, T, I) with batch_first, or (T, I) for one unbatched sequence.
    outputs is a (T, B, O) tensor (a tuple of them when the cell has several outputs);
    final_state is a (B, H) tensor (a tuple, in the spec's order, when it has several states).
    """

    def __init__(self, program: types.ModuleType, dims: dict, batch_first: bool = False,
                 backend: str = "auto", dtype: torch.dtype | None = None, scan: bool = True):
        super().__init__()
        check_dims(f"cell '{program.CELL}'", spec_dims(program), dims)
        check_backend(backend)
        self.program = program
        # The name in messages and print(module): the user's cell, which a network's layer sets
        # (its program is masking's variant of the cell, named CELL_masked).
        self.cell_name = program.CELL
        self.dims = dict(dims)
        self.batch_first = batch_first
        self.backend = backend
        # False: a cell whose states are all linear recurrences (specc check says "parallel scan")
        # runs them step by step (Triton, NumPy), as any other cell; for comparing, and for ruling
        # the scan out. The C loops run such a cell as one fused loop over steps either way.
        self.scan = scan
        # Which backend the last call ran on, and why ("c: the faster on this CPU, ..."): set by
        # each call, since what "auto" picks depends on the tensors (device, dtype, batch size).
        self.backend_choice: str | None = None
        program.check_sizes(**self._dim_args)
        self.sizes = program.sizes(**self._dim_args)
        for kind in ("params", "states", "inputs", "outputs"):
            for name, shape in self.sizes[kind].items():
                if any(int(s) != s or s < 1 for s in shape):
                    raise ValueError(f"cell '{program.CELL}': with {self._dims_text()}, {name} would have shape "
                                     f"{tuple(shape)}; every size must be a positive whole number")
        self.sizes = {k: {n: tuple(int(s) for s in shape) for n, shape in v.items()} for k, v in self.sizes.items()}
        dtype = dtype or torch.get_default_dtype()
        _check_memory(f"cell '{program.CELL}' with {self._dims_text()}", self.sizes["params"], dtype)
        self._default_dtype = dtype  # what a cell without parameters computes in
        consts = getattr(program, "CONSTS", ())  # a module compiled before `const` had none
        for name, shape in self.sizes["params"].items():
            if name in consts:
                self.register_buffer(name, torch.empty(shape, dtype=dtype))
            else:
                self.register_parameter(name, nn.Parameter(torch.empty(shape, dtype=dtype)))
        for name in self._learned():  # `state h[H] = learned`: h's initial value is trained too
            self.register_parameter(name + "_init", nn.Parameter(torch.empty(self.sizes["states"][name], dtype=dtype)))
        self.reset_parameters()
        torch_ops.register(self)

    def _learned(self) -> tuple[str, ...]:
        return getattr(self.program, "LEARNED", ())  # a module compiled before learned states had none

    @property
    def _dim_args(self) -> dict:
        """self.dims as the generated functions take them (see specc/dimnames.py)."""
        return code_dims(self.program, self.dims)

    def _dims_text(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.dims.items())

    def extra_repr(self) -> str:
        return (f"{self.cell_name}, {self._dims_text()}" + (", batch_first=True" if self.batch_first else "")
                + ("" if self.scan else ", scan=False"))

    def reset_parameters(self) -> None:
        try:
            self.program.init_params({n: getattr(self, n) for n in self.program.PARAMS}, **self._dim_args)
        except (ValueError, ArithmeticError, RuntimeError) as e:
            raise ValueError(f"cell '{self.cell_name}': an initialiser cannot be applied with "
                             f"{self._dims_text()}: {e}") from None
        fill = self.program.state_fill(**self._dim_args)
        with torch.no_grad():
            for name in self._learned():
                getattr(self, name + "_init").fill_(fill[name])

    def __getstate__(self):
        # The generated module is code: carry its source (or, for a module `specc compile` wrote,
        # its importable name) and make it again on the other side.
        state = self.__dict__.copy()
        prog = state.pop("program")
        source = getattr(prog, "__specc_source__", None)
        state["_program_ref"] = ("source", source, prog.CELL) if source is not None else ("module", prog.__name__)
        return state

    def __setstate__(self, state):
        ref = state.pop("_program_ref")
        state.setdefault("backend_choice", None)  # a module pickled before it had one
        state.setdefault("scan", True)
        if ref[0] == "source":
            state["program"] = load_program(ref[1], ref[2])
        else:
            import importlib

            state["program"] = importlib.import_module(ref[1])
        state.setdefault("cell_name", state["program"].CELL)  # a module pickled before it had one
        self.__dict__.update(state)
        torch_ops.register(self)

    def _steps_and_batch(self, inputs, states):
        if inputs:
            return inputs[0].shape[0], inputs[0].shape[1]
        return self._steps, states[0].shape[0]

    def initial_state(self, batch: int, dtype=None, device=None) -> tuple[torch.Tensor, ...]:
        fill = self.program.state_fill(**self._dim_args)
        dtype = dtype or self._dtype()
        learned = self._learned()

        def start(n):
            if n in learned:  # one row broadcast over the batch; its gradient sums over it
                return getattr(self, n + "_init").to(dtype=dtype, device=device).expand(batch, -1).contiguous()
            return torch.full((batch, self.sizes["states"][n][0]), fill[n], dtype=dtype, device=device)
        return tuple(start(n) for n in self.program.STATES)

    def draw_noise(self, T: int, B: int, dtype=None, device=None) -> list[torch.Tensor]:
        """The masks of the cell's dropout and zoneout calls for one call of the module, from
        torch's generator: while training, dropout(v, p) keeps each unit of each sequence with
        probability 1 - p for all T steps, scaled by 1 / (1 - p) (variational dropout), and
        zoneout(v_next, v, p) keeps v with probability p at each step; in eval, dropout is the
        identity and zoneout keeps the expectation p v + (1 - p) v_next. Drawn on the CPU and moved
        to `device`, so that a seed gives the same masks on every device and backend."""
        dtype = dtype or self._dtype()
        masks = []
        for name, (kind, p) in getattr(self.program, "NOISE", {}).items():
            n = self.sizes["inputs"][name][0]
            if kind == "dropout":
                if self.training and p > 0:
                    keep = torch.empty((B, n), dtype=dtype).bernoulli_(1 - p).div_(1 - p).to(device)
                    masks.append(keep.expand(T, B, n).contiguous())
                else:
                    masks.append(torch.ones((T, B, n), dtype=dtype, device=device))
            elif self.training:
                masks.append(torch.empty((T, B, n), dtype=dtype).bernoulli_(p).to(device))
            else:
                masks.append(torch.full((T, B, n), p, dtype=dtype, device=device))
        return masks

    def _dtype(self):
        for p in self.parameters():
            return p.dtype
        for b in self.buffers():  # a cell whose only parameters are `const`
            return b.dtype
        return self._default_dtype

    def forward(self, x=None, state=None, steps: int | None = None):
        """x: the input sequence (a tuple of them for a cell with several inputs, None for none)."""
        prog = self.program
        name = self.cell_name
        if x is not None and not isinstance(x, (torch.Tensor, tuple, list)):
            raise TypeError(f"cell '{name}': x must be a tensor (or a tuple of them), got {type(x).__name__}")
        inputs = () if x is None else ((x,) if isinstance(x, torch.Tensor) else tuple(x))
        noise = getattr(prog, "NOISE", {})
        given = own_inputs(prog)
        if len(inputs) != len(given):
            raise TypeError(f"cell '{name}' takes {len(given)} input sequence(s) "
                            f"({', '.join(given) or 'none'}), got {len(inputs)}")
        dtype = self._dtype()
        if not self.program.PARAMS and inputs and inputs[0].dtype in _NUMPY_DTYPES:
            # Nothing of its own fixes the precision of a cell without parameters: the inputs do,
            # as for torch's own parameterless modules.
            dtype = inputs[0].dtype
        unbatched = bool(inputs) and inputs[0].dim() == 2
        xs = []
        for x, iname in zip(inputs, given):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"input {iname} must be a tensor, got {type(x).__name__}")
            if x.dim() == 2 and unbatched:
                x = x.unsqueeze(1)
            elif x.dim() == 3 and self.batch_first:
                x = x.transpose(0, 1)
            if x.dim() != 3:
                raise ValueError(f"input {iname} must be (T, B, {self.sizes['inputs'][iname][0]})"
                                 f"{' with batch_first=False' if not self.batch_first else ''}, got shape {tuple(x.shape)}")
            want = self.sizes["inputs"][iname][0]
            if x.shape[2] != want:
                raise ValueError(f"input {iname} has {x.shape[2]} features; cell '{name}' was made with "
                                 f"{want} ({self._dims_text()})")
            xs.append(x)
        if xs and any(x.shape[:2] != xs[0].shape[:2] for x in xs):
            raise ValueError("all input sequences must have the same length and batch size")
        if not xs and steps is None:
            raise TypeError(f"cell '{name}' has no inputs: pass steps=T (and a state, for the batch size)")
        if xs and steps is not None:
            raise TypeError(f"cell '{name}' takes its number of steps from its inputs; steps= is for cells without")
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise ValueError(f"cell '{name}': steps must be a positive whole number, got {steps!r}")
        self._steps = steps
        batch = xs[0].shape[1] if xs else None
        states = self._check_state(state, batch, unbatched, xs[0].device if xs else None)
        if batch is None:
            batch = states[0].shape[0]
        if xs and xs[0].shape[0] == 0:
            raise ValueError("the input sequence is empty (T = 0)")
        if batch == 0:
            raise ValueError("the batch is empty (B = 0)")
        T = xs[0].shape[0] if xs else steps
        if noise:
            device = xs[0].device if xs else states[0].device
            xs += self.draw_noise(T, batch, xs[0].dtype if xs else dtype, device)
        tensors = [*xs, *states, *(getattr(self, p) for p in prog.PARAMS)]
        traced = torch_ops.traced(tensors)
        if traced:  # the tensors may hold no data: the backend is chosen when the graph runs
            work = self._traced_dtype(tensors, dtype)
        else:
            torch_ops.check_no_transform(name)
            backend, work = self._backend_for(tensors, dtype, n_inputs=len(xs), steps=T, batch=batch)
        out_dtype = xs[0].dtype if xs and xs[0].dtype in _HALF else work
        # Half-precision tensors (from autocast, or a module in bfloat16) are widened here, outside
        # the autograd node, so their gradients come back narrowed by autograd itself.
        tensors = [t.to(work) if t.dtype != work else t for t in tensors]
        if traced:
            results = torch_ops.run(self, len(xs), len(states), 0 if xs else T, tensors)
        elif torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            results = _Scan.apply(self, backend, len(xs), len(states), *tensors)
        else:
            # Inference: nothing is kept for a backward pass.
            outs, finals, _ = backend.forward(prog, tensors, T, batch, self._dim_args, train=False)
            results = (*outs, *finals)
        outs, finals = results[:len(prog.OUTPUTS)], results[len(prog.OUTPUTS):]
        if out_dtype != work:
            outs = tuple(o.to(out_dtype) for o in outs)
            finals = tuple(f.to(out_dtype) for f in finals)
        if unbatched:
            outs = tuple(o.squeeze(1) for o in outs)
            finals = tuple(f.squeeze(0) for f in finals)
        elif self.batch_first:
            outs = tuple(o.transpose(0, 1) for o in outs)
        return (outs[0] if len(outs) == 1 else outs), (finals[0] if len(finals) == 1 else finals)

    def _traced_dtype(self, tensors, dtype) -> torch.dtype:
        """What a traced call computes in: float32 on the C loops and Triton, else the module's
        float32 or float64 (the choice between the C loops and NumPy, both float32, waits for
        the real tensors)."""
        if self.backend in ("c", "triton") or tensors[0].device.type != "cpu":
            return torch.float32
        return dtype if dtype in _NUMPY_DTYPES else torch.float32

    def _backend_for(self, tensors, dtype, n_inputs: int | None = None, steps: int | None = None,
                     batch: int | None = None, autocast: bool = True):
        """The backend for these tensors, and the dtype it computes in; the sizes (inputs, T, B)
        let "auto" time the C loops against NumPy, and by default are read off the tensors.
        autocast: whether torch.autocast's dtype may set the Triton products' (not in a traced
        graph, whose backward op recomputes the forward where autocast is off)."""
        backend, work, why = self._choose(tensors, dtype, n_inputs, steps, batch, autocast)
        self.backend_choice = f"{backend.name}: {why}"
        if backend.name == "c":  # which library makes its products, and why (c_runtime.blas_choice)
            from .backends.c_runtime import blas_note

            self.backend_choice += f"; {blas_note()}"
        return backend, work

    def _choose(self, tensors, dtype, n_inputs, steps, batch, autocast=True):
        name = self.cell_name
        devices = {t.device for t in tensors}
        if len(devices) > 1:
            raise RuntimeError(f"cell '{name}': all tensors must be on one device, got {sorted(map(str, devices))}")
        on_cuda = tensors[0].is_cuda
        use_triton = self.backend == "triton" or (self.backend == "auto" and on_cuda)
        full = {t.dtype for t in tensors if t.dtype not in _HALF}
        if use_triton:
            products = _half_products(tensors[0].device, dtype, autocast)
            runner = BACKENDS["triton"].run(scan=self.scan, products=products)
            problem = runner.problem(self.program, on_cuda)
            if problem:
                raise RuntimeError(problem)
            if full - {torch.float32}:
                raise TypeError(f"the Triton backend computes in float32 (float16 and bfloat16 are widened), not "
                                f"{sorted(map(str, full - {torch.float32}))[0]}; use backend='numpy' on the CPU "
                                f"for float64")
            why = ("asked for" if self.backend == "triton" else "CUDA tensors") + \
                (f", {str(products).removeprefix('torch.')} products" if products else "")
            if getattr(self.program, "TUNE", False):  # the launch plan too, by measurement
                from .backends import tuning

                runner.plan, tuned = tuning.choose(self, runner, tensors, *self._call_sizes(tensors, n_inputs, steps,
                                                                                            batch))
                why += f"; {tuned}"
            return runner, torch.float32, why
        if on_cuda or tensors[0].device.type != "cpu":
            raise RuntimeError(f"the {self.backend if self.backend == 'c' else 'numpy'} backend runs on the CPU, "
                               f"but got tensors on {tensors[0].device}; "
                               f"use backend='triton' (or 'auto') for GPU tensors")
        if self.backend == "c":
            runner = BACKENDS["c"].run()
            problem = runner.problem(self.program)
            if problem:
                raise RuntimeError(problem)
            if full - {torch.float32}:
                raise TypeError(f"the C backend computes in float32 (float16 and bfloat16 are widened), not "
                                f"{sorted(map(str, full - {torch.float32}))[0]}; use backend='numpy' for float64")
            return runner, torch.float32, "asked for"
        work = dtype if dtype in _NUMPY_DTYPES else torch.float32
        if len(full) > 1 or (full and full != {work}):
            other = sorted(map(str, full - {work}))[0] if full - {work} else str(work)
            raise TypeError(f"cell '{name}' has {dtype} parameters but got a {other} tensor; "
                            f"convert one to the other (module.double() or x.float())")
        if self.backend == "numpy":
            return BACKENDS["numpy"].run(scan=self.scan), work, "asked for"
        if work != torch.float32:
            return BACKENDS["numpy"].run(scan=self.scan), work, f"{work} (the C loops compute in float32)"
        unusable = _c_unusable(self.program, self._dim_args)
        if unusable is not None:
            return BACKENDS["numpy"].run(scan=self.scan), work, unusable
        name, why = _auto_choice(self, tensors, *self._call_sizes(tensors, n_inputs, steps, batch))
        return BACKENDS[name].run(scan=self.scan), work, why

    def _call_sizes(self, tensors, n_inputs, steps, batch) -> tuple[int, int, int, int]:
        """(inputs, states, T, B) of a call, from the tensors where not given."""
        n_states = len(self.program.STATES)
        if n_inputs is None:
            n_inputs = len(self.program.INPUTS)
        if batch is None or steps is None:
            steps, batch = self._steps_and_batch(tensors[:n_inputs], tensors[n_inputs:n_inputs + n_states])
        return n_inputs, n_states, steps, batch

    def _check_state(self, state, batch, unbatched, device):
        prog = self.program
        if state is None:
            if batch is None:
                raise TypeError(f"cell '{self.cell_name}' has no inputs: pass its initial state")
            return list(self.initial_state(batch, device=device))
        states = [state] if isinstance(state, torch.Tensor) else list(state)
        if len(states) != len(prog.STATES):
            raise ValueError(f"cell '{self.cell_name}' has {len(prog.STATES)} state(s) ({', '.join(prog.STATES)}), "
                             f"got {len(states)}")
        out = []
        for s, sname in zip(states, prog.STATES):
            size = self.sizes["states"][sname][0]
            if unbatched and s.dim() == 1:
                s = s.unsqueeze(0)
            if s.dim() != 2 or s.shape[1] != size or (batch is not None and s.shape[0] != batch):
                raise ValueError(f"state {sname} must be ({batch if batch is not None else 'B'}, {size}), "
                                 f"got shape {tuple(s.shape)}")
            out.append(s)
        return out


torch_ops.MAKE_CELL[0] = CellModule  # an op rebuilds a cell from its key with it
