"""A compiled cell's whole sequence as one torch custom op, for the tracers (issue 16).

torch.compile, torch.export and torch.jit.trace cannot look inside the generated code (ctypes
calls, Triton launches, NumPy): they need an op that says what shapes it returns and how to take
its gradient. `specc::scan` is that op: one call runs one cell over a sequence on any backend;
its fake implementation gives the shapes from the module's sizes; its gradient is the op
`specc::scan_backward`, which runs the generated forward again (keeping what backward reads) and
then the generated backward. Eager calls do not come here: they keep the forward's values for
backward (runtime._Scan) and run no forward twice; only a traced graph pays for the second forward,
since an op's outputs must be tensors whose shapes are known before it runs, and what the
generated forward keeps differs by cell and backend.

An op names its cell by a key: the generated module's name (a digest of its source, the same in
every process), the dimensions and the backend. The cell must have been loaded in the process that
runs the traced graph (specc.load or a module `specc compile` wrote, imported), and these ops
registered before torch.export.load reads a saved program: `import torch` before `import specc`
(or `import specc.torch_ops`).
"""
from __future__ import annotations

import sys
import weakref

import torch

_CELLS: "weakref.WeakValueDictionary[str, torch.nn.Module]" = weakref.WeakValueDictionary()
_MADE: dict[str, torch.nn.Module] = {}  # cells rebuilt from a key alone (a graph loaded from a file)
MAKE_CELL: list = [None]  # runtime.CellModule, set by runtime (which imports this module, not the reverse)


def traced(tensors) -> bool:
    """Whether this call is being traced (torch.compile, torch.export, torch.jit.trace), so that the
    tensors may hold no data and the call must be one op in the graph."""
    if torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export():
        return True
    from torch._guards import detect_fake_mode

    return detect_fake_mode(list(tensors)) is not None


def check_no_transform(name: str) -> None:
    """One line instead of torch's internals, inside torch.func.grad, vmap, jacrev, ..."""
    if torch._C._functorch.peek_interpreter_stack() is not None:
        raise RuntimeError(f"cell '{name}': specc's generated passes do not run under torch.func transforms "
                           f"(grad, vmap, jacrev, jvp, ...); use torch.autograd.grad, or loop over the batch "
                           f"instead of vmap (torch.func.functional_call works)")


def key_of(module) -> str:
    dims = ",".join(f"{k}={v}" for k, v in module.dims.items())
    return f"{module.program.__name__}|{dims}|{module.backend}"


def register(module) -> None:
    """Let ops of `module`'s key find it (called as it is made: not while a graph is traced)."""
    _CELLS[key_of(module)] = module


def _cell(key: str):
    found = _CELLS.get(key) or _MADE.get(key)
    if found is not None:
        return found
    name, dims, backend = key.split("|")
    prog = sys.modules.get(name)
    if prog is None:
        raise RuntimeError(f"specc::scan: the cell of this graph ({name}) is not loaded in this process; "
                           f"load it (specc.load, or import the module specc compile wrote) before running the graph")
    made = MAKE_CELL[0](prog, {k: int(v) for k, v in (d.split("=") for d in dims.split(",") if d)}, backend=backend)
    _MADE[key] = made
    return made


def _sizes(tensors, n_inputs: int, steps: int) -> tuple[int, int]:
    """(T, B): from the first input, else `steps` and the first state."""
    if n_inputs:
        return tensors[0].shape[0], tensors[0].shape[1]
    return steps, tensors[0].shape[0]


def refuse_double_backward(name: str) -> None:
    """Autograd runs a backward with gradients on only for create_graph=True: a gradient of the
    gradient (a penalty on it, a Hessian-vector product), which the generated code does not have.
    Said in one line, instead of torch's error at the second pass."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"cell '{name}': specc computes the gradient of a cell but not the gradient of "
                           f"that gradient (create_graph=True, double backward)")


def result_gradients(module, grads, T: int, B: int, like: torch.Tensor) -> tuple[list, list]:
    """(gradients of the outputs, of the final states) as the generated backward takes them:
    zeros where autograd hands None (a result the loss does not read)."""
    prog, n_out = module.program, len(module.program.OUTPUTS)
    d_outs = [torch.zeros((T, B, module.sizes["outputs"][n][0]), dtype=like.dtype, device=like.device)
              if g is None else g for g, n in zip(grads[:n_out], prog.OUTPUTS)]
    d_finals = [torch.zeros((B, module.sizes["states"][n][0]), dtype=like.dtype, device=like.device)
                if g is None else g for g, n in zip(grads[n_out:], prog.STATES)]
    return d_outs, d_finals


def _dtype(cell, tensors) -> torch.dtype:
    """What the cell's call computes in, as eager's: the tensors are widened before the op, but a
    half-precision module's products still take its precision (on Triton)."""
    own = cell._dtype()
    return own if own in (torch.float16, torch.bfloat16) else tensors[-1].dtype


@torch.library.custom_op("specc::scan", mutates_args=())
def scan(key: str, n_inputs: int, n_states: int, steps: int, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The cell's outputs (T, B, O) and final states (B, H) for `tensors`: inputs, states, parameters."""
    cell = _cell(key)
    T, B = _sizes(tensors, n_inputs, steps)
    backend, _ = cell._backend_for(list(tensors), _dtype(cell, tensors), n_inputs=n_inputs, steps=T, batch=B,
                                   autocast=False)
    outs, finals, _ = backend.forward(cell.program, list(tensors), T, B, cell._dim_args, train=False)
    # An op's outputs share no memory with its inputs or with each other.
    seen = {t.untyped_storage().data_ptr() for t in tensors}
    result = []
    for t in (*outs, *finals):
        if t.untyped_storage().data_ptr() in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        result.append(t)
    return result


@scan.register_fake
def _(key, n_inputs, n_states, steps, tensors):
    cell = _cell(key)
    T, B = _sizes(tensors, n_inputs, steps)
    like = tensors[0]
    prog = cell.program
    return ([like.new_empty((T, B, cell.sizes["outputs"][n][0])) for n in prog.OUTPUTS]
            + [like.new_empty((B, cell.sizes["states"][n][0])) for n in prog.STATES])


@torch.library.custom_op("specc::scan_backward", mutates_args=())
def scan_backward(key: str, n_inputs: int, n_states: int, steps: int, tensors: list[torch.Tensor],
                  grads: list[torch.Tensor], inputs_grad: bool = True) -> list[torch.Tensor]:
    """The gradients of every tensor of `scan`, given those of its results (`grads`); zeros for the
    inputs, and what only their gradients need left out, unless `inputs_grad` (runtime._Scan says
    why)."""
    cell = _cell(key)
    prog = cell.program
    T, B = _sizes(tensors, n_inputs, steps)
    tensors = list(tensors)
    backend, _ = cell._backend_for(tensors, _dtype(cell, tensors), n_inputs=n_inputs, steps=T, batch=B,
                                   autocast=False)
    _, _, saved = backend.forward(prog, tensors, T, B, cell._dim_args, train=True)
    n_out = len(prog.OUTPUTS)
    params = tensors[n_inputs + n_states:]
    out = backend.backward(prog, saved, list(grads[:n_out]), list(grads[n_out:]), params, T, B, cell._dim_args,
                           inputs_grad)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(tensors, out)]


@scan_backward.register_fake
def _(key, n_inputs, n_states, steps, tensors, grads, inputs_grad=True):
    return [t.new_empty(t.shape) for t in tensors]


def _setup(ctx, inputs, output):
    key, n_inputs, n_states, steps, tensors = inputs
    ctx.args = (key, n_inputs, n_states, steps)
    ctx.save_for_backward(*tensors)


def _backward(ctx, grads):
    key, n_inputs, n_states, steps = ctx.args
    cell = _cell(key)
    refuse_double_backward(cell.cell_name)
    tensors = ctx.saved_tensors
    d_outs, d_finals = result_gradients(cell, grads, *_sizes(tensors, n_inputs, steps), like=tensors[-1])
    inputs_grad = any(ctx.needs_input_grad[4][:n_inputs])  # one flag a tensor of the list
    grads = scan_backward(key, n_inputs, n_states, steps, list(tensors), d_outs + d_finals, inputs_grad)
    return None, None, None, None, grads


scan.register_autograd(_backward, setup_context=_setup)


# ONNX functions the graph being exported calls: their op name -> the cell (onnx_export.py
# defines each, from the cell's step IR, into the exported model).
ONNX_CELLS: dict[str, torch.nn.Module] = {}


def onnx_name(module) -> str:
    import hashlib

    return "cell_" + hashlib.sha256(key_of(module).encode()).hexdigest()[:16]


def run(module, n_inputs: int, n_states: int, steps: int, tensors: list) -> tuple:
    """The cell's outputs and final states as one `specc::scan` in the graph being traced (under
    torch.onnx.export, a call of the ONNX function specc.cell_<digest>, defined afterwards)."""
    if torch.onnx.is_in_onnx_export():
        name = onnx_name(module)
        ONNX_CELLS[name] = module
        prog, like = module.program, tensors[0]
        T, B = _sizes(tensors, n_inputs, steps)
        shapes = ([(T, B, module.sizes["outputs"][n][0]) for n in prog.OUTPUTS]
                  + [(B, module.sizes["states"][n][0]) for n in prog.STATES])
        return tuple(torch.onnx.ops.symbolic_multi_out(f"specc::{name}", list(tensors), {},
                                                       dtypes=[like.dtype] * len(shapes), shapes=shapes, version=1))
    return tuple(torch.ops.specc.scan(key_of(module), n_inputs, n_states, steps, list(tensors)))
