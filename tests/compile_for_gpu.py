"""Compiles (does not run) the Triton kernels of specc cells for an NVIDIA GPU, on a machine without
one: what the interpreter cannot see (a variable whose shape changes inside a loop, a kernel that
needs more shared memory than the GPU has) fails here as it would on the GPU.

Run as a script, without TRITON_INTERPRET (tests/test_triton.py does): each launch of a kernel
whose name ends with SUFFIX is compiled for sm_90 (H100/H200) with the arguments it was given,
and not run; the pass's host code goes on with unfilled buffers. Prints one line a kernel,
"ok NAME shared=BYTES" or "FAIL NAME: why", and exits 1 if any failed.

    python tests/compile_for_gpu.py SUFFIX [--products=bfloat16|float16] [--grid] [CELL or CELL:D=V,D=V ...]
    (default: every library cell; --products: the step's products in that half precision; --grid:
    the persistent loop in slices of 128 features with a barrier across the grid)
"""
from __future__ import annotations

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

import specc  # noqa: E402
from specc.backends import runners  # noqa: E402

SHARED_MEMORY = 232_448  # bytes a program may use on an H100 (sm_90)
FAILED: list[str] = []
SEEN: set[tuple] = set()


def _compile_only(suffix: str):
    def run(self, *args, grid, warmup=False, **kwargs):
        name = self.fn.__name__
        if not name.endswith(suffix):
            return None
        bound = dict(zip(self.arg_names, args)) | {k: v for k, v in kwargs.items() if k in self.arg_names}
        signature, constants = {}, {}
        for p in self.params:
            v = bound[p.name]
            if p.is_constexpr or v is None:
                signature[p.name], constants[p.name] = "constexpr", v
            elif isinstance(v, torch.Tensor):
                signature[p.name] = "*" + {torch.bfloat16: "bf16", torch.float16: "fp16",
                                           torch.int64: "i64"}.get(v.dtype, "fp32")
            elif isinstance(v, bool):
                signature[p.name] = "i1"
            elif isinstance(v, int):
                signature[p.name] = "i32"
            else:
                signature[p.name] = "fp32"
        key = (name, tuple(signature.items()), tuple(constants.items()))
        if key in SEEN:  # a step kernel launched once a step
            return None
        SEEN.add(key)
        try:
            compiled = triton.compile(ASTSource(self, signature, constants), target=GPUTarget("cuda", 90, 32),
                                      options={"num_warps": kwargs.get("num_warps", 4)})
        except Exception as e:  # noqa: BLE001 - what the compiler says is the finding
            FAILED.append(name)
            print(f"FAIL {name}: {type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}")
            return None
        shared = compiled.metadata.shared
        if shared > SHARED_MEMORY:
            FAILED.append(name)
            print(f"FAIL {name}: needs {shared} bytes of shared memory, over {SHARED_MEMORY}")
        else:
            print(f"ok {name} shared={shared}")
        return None

    return run


def main(argv: list[str]) -> int:
    from specc.check import check
    from specc.library import spec_file, spec_names
    from specc.parse import parse
    from specc.runtime import own_inputs

    suffix = argv[0]
    half = [a.split("=")[1] for a in argv[1:] if a.startswith("--products=")]
    if half:  # the step's products in bfloat16 or float16, as autocast or a half-precision module asks
        from specc import runtime

        runtime._half_products = lambda *args: getattr(torch, half[0])
    # CELL or CELL:D=V,D=V (those sizes instead of small ones)
    wanted = {a.split(":")[0]: dict((kv.split("=")[0], int(kv.split("=")[1])) for kv in a.split(":")[1].split(","))
              if ":" in a else None for a in argv[1:] if not a.startswith("--")}
    JITFunction.run = _compile_only(suffix)
    runners.TritonRunner.problem = lambda self, prog, on_cuda: None  # CPU tensors, no interpreter
    for spec in spec_names():
        for cell in check(parse(spec_file(spec).read_text(encoding="utf-8"), spec)):
            if wanted and cell.name not in wanted:
                continue
            dims = wanted.get(cell.name) or {d: 5 + 2 * k for k, d in enumerate(cell.dims)}  # small, odd, different
            m = specc.load(spec, cell.name, backend="triton", **dims)
            m.program.PERSISTENT = suffix == "_steps"
            if "--grid" in argv:  # rows in slices of PERSISTENT_FEATURES, a barrier across the grid
                m.program.persistent = lambda B, features: False
                m.program.grid_slices = lambda B, features, BLOCK_B, dev: triton.cdiv(features, 128)
            xs = tuple(torch.randn(3, 2, m.sizes["inputs"][n][0], requires_grad=True) for n in own_inputs(m.program))
            out = m(xs[0] if len(xs) == 1 else xs) if xs else m(steps=3, batch=2)
            sum(t.sum() for t in torch.utils._pytree.tree_leaves(out) if t.requires_grad).backward()
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
