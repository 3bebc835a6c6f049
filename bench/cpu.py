"""CPU benchmark: specc on the CPU (its C loops, or its NumPy backend) against torch, in one run and one table.

    python bench/cpu.py                       # every cell and size, both passes (about 20 minutes)
    python bench/cpu.py --quick               # two small sizes, fewer repetitions (about 3 minutes)
    python bench/cpu.py --cells lstm,gru --sizes 100x64x256x256 --passes fb --rounds 3
    python bench/cpu.py --markdown bench/results/cpu-DATE.md    # also write the results file
    python bench/cpu.py --check               # first check that every peer computes what specc does
    python bench/cpu.py --backend numpy       # specc's NumPy backend rather than its C loops
    SPECC_ONEDNN=0 python bench/cpu.py --backend numpy   # ... with its products in NumPy only
    python bench/cpu.py --march x86-64-v2,x86-64-v3,native   # the C loops compiled for each level,
                                              # beside the NumPy backend and the peers, in one table;
                                              # at v2 and v3 torch.nn too, held to that level (HOLD)

Cells and their peers:
  elman (cell rnn_tanh of specs/elman.rnn), lstm, gru: torch.nn.RNN / nn.LSTM / nn.GRU
  second_order, gru_cho, jordan (O = H), multihead_lstm (H / 32 heads of 32): the same cell written
      by hand as a torch loop (bench/torch_cells.py), run eagerly and with its step under
      torch.compile

What is measured, per cell, size (T, B, I, H), pass and implementation:
  fwd   forward only, under torch.no_grad()
  fb    forward + backward: outputs = m(x); outputs.backward(grad); x and every parameter need
        gradients (parameter .grad set to None before each repetition, as zero_grad does)
  time  the median over repetitions, after warm-up, of wall-clock time (float32, all cores)
  ratio specc's median over this peer's median, both from the same run (below 1: specc faster);
        with --march, on each specc row: its median over the first peer's (torch.nn's) at the same
        level (held, see HOLD), or at the machine's own where none was held
  peak  the peak resident memory of one call above what the process held just before it: the
        worker process frees what it can (gc, malloc_trim), resets the kernel's high-water mark
        (/proc/self/clear_refs), makes one call and reads VmHWM; so it counts every page the
        call touches, whoever allocates it (NumPy, torch, Python), outputs and gradients included
  GF/s  the cell's matrix products (2*m*n flops per matrix-vector product, per example and step,
        counted from specc's step IR; backward counted as twice the forward) over the median time,
        and that as a share of this machine's float32 GEMM peak, measured at the start of the run

Every (cell, size, implementation) runs in a fresh worker process, so that one library's threads
(torch's OpenMP pool, NumPy's OpenBLAS pool) never spin beside another's, and the peak memory
starts from a clean process. With --rounds N the workers of one case run N times, alternating
implementations, and the timings are pooled; the memory is the first round's. The machine may be
shared: a worker during which other processes used more than --noisy of the CPU is run again (at
most --retries times) and the quietest run is kept; the table says how busy the machine was.
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

SIZES = [(100, 64, 256, 256), (50, 32, 512, 512), (100, 16, 128, 128), (200, 8, 64, 64)]
QUICK_SIZES = [(100, 16, 128, 128), (200, 8, 64, 64)]
# cell -> (spec, cell inside the spec file, peers)
CELLS = {
    "elman": ("specs/elman.rnn", "rnn_tanh", ["torch"]),
    "lstm": ("lstm", None, ["torch"]),
    "gru": ("gru", None, ["torch"]),
    "second_order": ("second_order", None, ["eager", "compiled"]),
    "gru_cho": ("gru_cho", None, ["eager", "compiled"]),
    "jordan": ("jordan", None, ["eager", "compiled"]),
    "multihead_lstm": ("multihead_lstm", None, ["eager", "compiled"]),
}
MULTIHEAD_D = 32  # features a head of multihead_lstm: H = N * 32
PEER_NAMES = {"torch": "torch.nn.{}", "eager": "torch eager loop", "compiled": "torch.compile step"}
TORCH_CLASS = {"elman": "RNN", "lstm": "LSTM", "gru": "GRU"}
PASSES = ("fwd", "fb")

# A CPU of an older level, emulated on a newer one (--march): every library held to that level's
# instructions through its own switch, so that a level's rows compare specc with torch as both run
# on such a CPU (issue 13: most laptops and many cloud machines have AVX2 and no AVX-512). torch's
# own kernels (ATEN_CPU_CAPABILITY) and its oneDNN, whose fused LSTM is torch.nn.LSTM's forward
# (ONEDNN_MAX_CPU_ISA); MKL, torch's matrix products elsewhere (nn.GRU, nn.RNN); the OpenBLAS of
# NumPy and of specc's C loops (OPENBLAS_CORETYPE); NumPy's own loops (NPY_DISABLE_CPU_FEATURES).
# MKL_ENABLE_INSTRUCTIONS works on Intel's CPUs only (v2 there: SSE4_2; 2,048^3 sgemm on 2
# Sapphire Rapids cores 60 GFLOP/s, AVX2 146, unheld 219); on others MKL already runs AVX2 code
# (what v3 asks) and honours only MKL_CBWR=COMPATIBLE, SSE2 code: for v2, the same 4-wide vectors
# without FMA (2 Zen 5 cores: 47 GFLOP/s, against OpenBLAS's Nehalem kernels' 73). The worker
# reports what torch and OpenBLAS then run on, and the table names it. Other levels (native,
# aarch64's) run as the machine is.
HOLD = {
    "x86-64-v2": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_CBWR": "COMPATIBLE",
                  "OPENBLAS_CORETYPE": "Nehalem", "NPY_DISABLE_CPU_FEATURES": "X86_V3 X86_V4 AVX512_ICL AVX512_SPR"},
    "x86-64-v3": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
                  "OPENBLAS_CORETYPE": "Haswell", "NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR"},
}


def _intel() -> bool:
    try:
        return "GenuineIntel" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


if _intel():
    HOLD["x86-64-v2"] = {**{k: v for k, v in HOLD["x86-64-v2"].items() if k != "MKL_CBWR"},
                         "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"}


def dims_of(cell: str, T: int, B: int, I: int, H: int) -> dict:
    if cell == "multihead_lstm":  # heads of 32; heads of 2 where H is not a multiple of 32 (the peer check)
        D = MULTIHEAD_D if H % MULTIHEAD_D == 0 else 2
        return dict(I=I, N=H // D, D=D)
    return dict(I=I, H=H, O=H) if cell == "jordan" else dict(I=I, H=H)


# --------------------------------------------------------------------------------------------
# Worker side: one implementation of one case, in its own process.


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def peak_bytes(fn) -> tuple[int, str]:
    """Peak resident memory of one call of fn above the resident memory before it."""
    _trim()
    try:
        before = _status_kb("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident size
        fn()
        return (_status_kb("VmHWM") - before) * 1024, "hwm"
    except OSError:
        import resource

        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        fn()
        return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024, "maxrss"


def build(cell: str, impl: str, dims: dict, backend: str = "auto"):
    import torch

    import specc

    spec, name, _ = CELLS[cell]
    torch.manual_seed(0)
    ours = specc.load(spec, name, backend=backend, **dims)
    if impl == "specc":
        return ours
    if impl == "torch":
        return getattr(torch.nn, TORCH_CLASS[cell])(dims["I"], dims["H"])
    sys.path.insert(0, str(HERE))
    import torch_cells

    return torch_cells.like(ours, compiled=impl == "compiled")


def worker(job: dict) -> dict:
    import torch

    if os.environ.get("SPECC_BENCH_THREADS"):
        torch.set_num_threads(int(os.environ["SPECC_BENCH_THREADS"]))
    if job.get("march"):
        os.environ["SPECC_MARCH"] = job["march"]  # read when the C loops are compiled

    T, B, I, H = job["size"]
    cell, impl = job["cell"], job["impl"]
    out = {}
    try:
        m = build(cell, impl, dims_of(cell, T, B, I, H), job.get("backend", "auto"))
    except Exception as e:  # noqa: BLE001 - reported in the table
        return {p: {"error": f"{type(e).__name__}: {e}"[:200]} for p in job["passes"]}
    params = list(m.parameters())
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(T, B, I, generator=gen)
    xg = x.clone().requires_grad_(not job.get("data_input"))  # --data-input: x asks no gradient
    with torch.no_grad():
        y, _ = m(x)
    grad = torch.randn(y.shape, generator=gen)
    del y
    if impl == "specc":
        out["backend"] = m.backend_choice.split(":")[0]
    if job.get("hold"):  # what the held libraries run on, for the table
        from specc.backends import c_runtime

        mkl = os.environ.get("MKL_CBWR") or os.environ.get("MKL_ENABLE_INSTRUCTIONS")
        products = c_runtime.blas_choice()
        out["held"] = (f"torch {torch.backends.cpu.get_cpu_capability()}, oneDNN {os.environ.get('ONEDNN_MAX_CPU_ISA')}, "
                       f"MKL {mkl}" if impl != "specc"
                       else f"OpenBLAS {c_runtime.blas_kernels()}, products {products.steps} / {products.host}")

    def fwd():
        with torch.no_grad():
            m(x)

    def fb():
        for p in params:
            p.grad = None
        xg.grad = None
        y, _ = m(xg)
        y.backward(grad)

    for p in job["passes"]:
        fn = fwd if p == "fwd" else fb
        try:
            # Warm-up (the first call of a torch.compile step compiles it); slow cases (over a
            # second a call) get one warm-up call, unless compiled, and at least 3 repetitions.
            t0 = time.perf_counter()
            fn()
            slow = time.perf_counter() - t0 > 1.0 and impl != "compiled"
            for _ in range(0 if slow else job["warmup"] - 1):
                fn()
            peak, how = peak_bytes(fn)
            min_reps = min(job["min_reps"], 3) if slow else job["min_reps"]
            times: list[float] = []
            start = time.perf_counter()
            while len(times) < job["max_reps"] and (len(times) < min_reps
                                                    or time.perf_counter() - start < job["min_time"]):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            out[p] = {"times": times, "peak": peak, "peak_method": how}
        except Exception as e:  # noqa: BLE001 - torch.compile may fail on some machines: say so
            out[p] = {"error": f"{type(e).__name__}: {e}".splitlines()[0][:200]}
        _trim()
    return out


def gemm_peak(n: int = 2048, reps: int = 7) -> dict:
    """Float32 GEMM GFLOP/s of NumPy's BLAS and of torch's, the best median of the two."""
    import numpy as np
    import torch

    if os.environ.get("SPECC_BENCH_THREADS"):
        torch.set_num_threads(int(os.environ["SPECC_BENCH_THREADS"]))

    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = a.T.copy()
    res = {}
    for name, mm, args in (("numpy", np.matmul, (a, b)), ("torch", torch.mm, (torch.from_numpy(a), torch.from_numpy(b)))):
        mm(*args)
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            mm(*args)
            ts.append(time.perf_counter() - t0)
        res[name] = 2 * n**3 / statistics.median(ts) / 1e9
    return res


# --------------------------------------------------------------------------------------------
# Driver side.


def _cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs so far, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields) - idle, sum(fields)


def thread_env(threads: int | None) -> dict:
    if not threads:
        return {}
    n = str(threads)
    return {"OMP_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": n, "MKL_NUM_THREADS": n, "SPECC_BENCH_THREADS": n}


def run_worker(job: dict, threads: int | None = None) -> dict:
    """Run one worker; its result gains "others": the share of the machine's CPU time that other
    processes used while it ran (a measure of how noisy the timing is)."""
    import resource

    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)]
    busy0, total0 = _cpu_jiffies()
    child0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    held = HOLD.get(job.get("hold") or "", {})
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **held, **thread_env(threads)})
    busy1, total1 = _cpu_jiffies()
    child1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    ticks = os.sysconf("SC_CLK_TCK")
    ours = (child1.ru_utime + child1.ru_stime - child0.ru_utime - child0.ru_stime) * ticks
    others = max(0.0, (busy1 - busy0 - ours) / max(1, total1 - total0))
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            res = json.loads(line[7:])
            res["others"] = others
            return res
    err = (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]
    return {"error": f"worker failed (exit {proc.returncode}): {err}", "others": others}


def model_flops(cell: str, dims: dict, T: int, B: int) -> float:
    """Forward flops of the cell's matrix products, from specc's optimised step IR."""
    import specc
    from specc.shapes import numel

    spec, name, _ = CELLS[cell]
    g = specc.compile_spec(spec, name).forward
    per_row = 0
    for node in g.nodes:
        if not node.type.batched:
            continue
        if node.op == "matvec":
            per_row += 2 * int(numel(g.nodes[node.args[0]].type.shape).evaluate(dims))
        elif node.op == "outer":  # the products x_j h_k of contract(W, x, h)
            per_row += int(numel(node.type.shape).evaluate(dims))
    return float(per_row * T * B)


def machine() -> str:
    model, cores = platform.processor() or "?", os.cpu_count()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        info = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        model = info.get("Model name", model).strip()
        cores = f"{info.get('CPU(s)', cores).strip()} CPUs, {info.get('Thread(s) per core', '?').strip()} thread(s) per core"
    except OSError:
        pass
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        cores += f", {mem:.0f} GiB memory"
    except (ValueError, OSError):
        pass
    return f"{model} ({cores})"


def cpu_flags() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return "?"
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Flags:")), "?")


def versions() -> str:
    import numpy
    import torch

    cfg = numpy.show_config(mode="dicts") if hasattr(numpy, "show_config") else {}
    try:
        blas = cfg["Build Dependencies"]["blas"]
        blas = f"{blas['name']} {blas['version']}"
    except (KeyError, TypeError):
        blas = "?"
    try:
        import scipy_openblas32

        from specc.backends import c_runtime

        ours = (f", specc's C loops: {scipy_openblas32.get_openblas_config().split(' DYNAMIC')[0]} (scipy-openblas32), "
                f"its {c_runtime.blas_kernels()} kernels; {c_runtime.blas_note()}")
    except ImportError:
        ours = ""
    return f"Python {platform.python_version()}, NumPy {numpy.__version__} ({blas}), torch {torch.__version__}{ours}"


def parse_size(text: str) -> tuple[int, int, int, int]:
    parts = tuple(int(p) for p in text.lower().split("x"))
    if len(parts) != 4:
        raise argparse.ArgumentTypeError(f"size {text!r}: expected TxBxIxH, e.g. 100x64x256x256")
    return parts


def fmt_ms(s: float) -> str:
    ms = s * 1e3
    return f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", default=",".join(CELLS), help=f"comma-separated, from {', '.join(CELLS)}")
    ap.add_argument("--sizes", default=None, help="comma-separated TxBxIxH (default: the four standard sizes)")
    ap.add_argument("--passes", default="fwd,fb", help="fwd, fb or both")
    ap.add_argument("--impls", default=None, help="only these implementations (specc, torch, eager, compiled)")
    ap.add_argument("--quick", action="store_true", help="the two small sizes and fewer repetitions")
    ap.add_argument("--rounds", type=int, default=None, help="worker runs per implementation (default 2, quick 1)")
    ap.add_argument("--min-time", type=float, default=None, help="seconds of timed repetitions per worker")
    ap.add_argument("--threads", type=int, default=None,
                    help="threads for torch and BLAS in the workers (default: the libraries' own, all cores)")
    ap.add_argument("--noisy", type=float, default=0.15,
                    help="a worker during which other processes took more than this share of the CPU is run again")
    ap.add_argument("--retries", type=int, default=2, help="how many times a noisy worker is run again")
    ap.add_argument("--backend", default="auto", choices=["auto", "c", "numpy"],
                    help="specc's backend (default auto: the C loops where a compiler is, else NumPy)")
    ap.add_argument("--march", default=None,
                    help="comma-separated -march levels (x86-64-v2,x86-64-v3,native): a row of specc's C loops "
                         "compiled for each (SPECC_MARCH), and one of its NumPy backend, beside the peers; at a "
                         "level in HOLD, the C loops' OpenBLAS and a row of each peer held to it")
    ap.add_argument("--no-hold", dest="hold", action="store_false",
                    help="with --march, run every library at the machine's own level (only the C loops' code changes)")
    ap.add_argument("--markdown", default=None, help="also write the results as markdown to this file")
    ap.add_argument("--check", action="store_true", help="check the peers against specc first (float64)")
    ap.add_argument("--data-input", action="store_true",
                    help="fb with an input that asks no gradient (a first layer fed data), not one that does")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--gemm", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0
    if args.gemm:
        print("RESULT " + json.dumps(gemm_peak()), flush=True)
        return 0

    cells = [c.strip() for c in args.cells.split(",") if c.strip()]
    unknown = [c for c in cells if c not in CELLS]
    if unknown:
        ap.error(f"unknown cell(s) {', '.join(unknown)}; choose from {', '.join(CELLS)}")
    sizes = [parse_size(s) for s in args.sizes.split(",")] if args.sizes else (QUICK_SIZES if args.quick else SIZES)
    passes = [p.strip() for p in args.passes.split(",") if p.strip()]
    if any(p not in PASSES for p in passes):
        ap.error("--passes takes fwd and/or fb")
    rounds = args.rounds or (1 if args.quick else 2)
    min_time = args.min_time if args.min_time is not None else (0.5 if args.quick else 1.5)
    only = set(args.impls.split(",")) if args.impls else None

    def held(level: str) -> str | None:
        return level if args.hold and level in HOLD else None

    if args.check:
        check_peers(cells)

    command = "python " + " ".join([os.path.relpath(__file__, ROOT)] + (argv if argv is not None else sys.argv[1:]))
    started = datetime.datetime.now().astimezone()
    gemm = run_worker_gemm(args.threads)
    peak_gflops = max(gemm.values())
    header = [
        f"- machine: {machine()}",
        f"- software: {versions()}",
        "- threads: " + (f"{args.threads} (OMP/OPENBLAS/MKL_NUM_THREADS and torch.set_num_threads in every worker)"
                         if args.threads else "the libraries' defaults (one per core)"),
        f"- load average at the start: {' '.join(f'{v:.2f}' for v in os.getloadavg())}",
        f"- date: {started:%Y-%m-%d %H:%M %Z}",
        f"- command: `{command}`",
        f"- float32 GEMM peak (2048^3, median): NumPy {gemm['numpy']:.0f} GFLOP/s, torch {gemm['torch']:.0f} GFLOP/s; "
        f"the % column is against {peak_gflops:.0f}",
    ]
    if args.march:
        header.append(f"- CPU flags (lscpu): {cpu_flags()}")
    if args.data_input:
        header.append("- fb: the input x asks no gradient (a first layer fed data); the parameters' and states' do")
    print("\n".join(header), flush=True)
    cols = ["cell", "T×B×I×H", "pass", "implementation", "median ms", "specc / peer" if not args.march else "time / peer's", "peak MB", "GFLOP/s", "% peak",
            "others' CPU"]
    rows: list[list[str]] = []
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols), flush=True)

    for cell in cells:
        for size in sizes:
            T, B, I, H = size
            # label -> what the worker runs
            variants = {"specc": {"impl": "specc"}}
            if args.march:
                levels = args.march.split(",")
                variants = {f"c {m}": {"impl": "specc", "backend": "c", "march": m, "hold": held(m)} for m in levels}
                variants["numpy"] = {"impl": "specc", "backend": "numpy"}
                # what a user gets without choosing: `auto` at the machine's own level, so that the
                # table shows whether its choice was the faster backend
                variants["auto"] = {"impl": "specc", "backend": "auto"}
            variants.update({p: {"impl": p} for p in CELLS[cell][2]})
            if args.march:  # each peer again at every held level
                variants.update({f"{p} {m}": {"impl": p, "hold": m} for m in levels if held(m) for p in CELLS[cell][2]})
            impls = [i for i in variants if not only or variants[i]["impl"] in only]
            job = {"cell": cell, "size": size, "passes": passes, "warmup": 2, "min_reps": 3 if args.quick else 5,
                   "max_reps": 50, "min_time": min_time, "backend": args.backend, "data_input": args.data_input}
            results: dict[str, dict] = {i: {} for i in impls}
            others: dict[str, list[float]] = {i: [] for i in impls}
            for r in range(rounds):
                order = impls if r % 2 == 0 else impls[::-1]
                for impl in order:
                    res = run_worker({**job, **variants[impl]}, args.threads)
                    # On a shared machine: run again (up to --retries times) while other processes
                    # took more than --noisy of the CPU, and keep the quietest run.
                    for _ in range(args.retries):
                        if res.get("others", 0.0) <= args.noisy:
                            break
                        again = run_worker({**job, **variants[impl]}, args.threads)
                        if again.get("others", 1.0) < res.get("others", 1.0):
                            res = again
                    others[impl].append(res.get("others", 0.0))
                    for key in ("backend", "held"):
                        if key in res:
                            results[impl][key] = res[key]
                    for p in passes:
                        got = res.get(p, {"error": res.get("error", "no result")})
                        have = results[impl].setdefault(p, got)
                        if r and "times" in got and "times" in have:
                            have["times"] = have["times"] + got["times"]
            flops_fwd = model_flops(cell, dims_of(cell, *size), T, B)
            for p in passes:
                flops = flops_fwd * (1 if p == "fwd" else 3)
                ours = results.get("specc", {}).get(p, {})
                ours_t = statistics.median(ours["times"]) if "times" in ours else None
                # the first peer's median at each level it ran at (None: the machine's own)
                peer_at: dict[str | None, float | None] = {}
                for i in impls:
                    if variants[i]["impl"] != "specc":
                        peer_res = results[i][p]
                        peer_at.setdefault(variants[i].get("hold"),
                                           statistics.median(peer_res["times"]) if "times" in peer_res else None)
                for impl in impls:
                    res = results[impl][p]
                    if impl == "specc":
                        name = f"specc ({results[impl].get('backend', '?')})"
                    elif impl == "auto":
                        name = f"specc (auto: {results[impl].get('backend', '?')})"
                    elif variants[impl]["impl"] == "specc":
                        name = f"specc ({impl})"
                    else:
                        name = PEER_NAMES[variants[impl]["impl"]].format(TORCH_CLASS.get(cell, ""))
                    if variants[impl].get("hold"):
                        name += f" [held to {variants[impl]['hold']}: {results[impl].get('held', '?')}]"
                    label = [cell, "×".join(map(str, size)), p, name]
                    noise = f"{100 * max(others[impl]):.0f}%"
                    if "times" not in res:
                        row = label + [f"failed: {res['error']}", "", "", "", "", noise]
                    else:
                        t = statistics.median(res["times"])
                        if args.march:
                            mine = variants[impl]["impl"] == "specc"
                            base = peer_at.get(variants[impl].get("hold"))
                            ratio = f"{t / base:.2f}" if mine and base else ""
                        else:
                            ratio = "" if impl == "specc" or ours_t is None else f"{ours_t / t:.2f}"
                        gf = flops / t / 1e9
                        row = label + [fmt_ms(t), ratio, f"{res['peak'] / 2**20:.1f}", f"{gf:.1f}",
                                       f"{100 * gf / peak_gflops:.0f}%", noise]
                    rows.append(row)
                    print("| " + " | ".join(row) + " |", flush=True)
    elapsed = (datetime.datetime.now().astimezone() - started).total_seconds()
    print(f"\n({elapsed / 60:.1f} minutes)")
    if args.markdown:
        write_markdown(Path(args.markdown), header, cols, rows, elapsed)
    return 0


def run_worker_gemm(threads: int | None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--gemm"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=True,
                          env={**os.environ, **thread_env(threads)})
    return json.loads(proc.stdout.split("RESULT ", 1)[1])


def write_markdown(path: Path, header: list[str], cols: list[str], rows: list[list[str]], elapsed: float) -> None:
    text = ["# specc vs torch on the CPU", ""] + header + [
        f"- run time: {elapsed / 60:.1f} minutes", "",
        "Columns: see the docstring of bench/cpu.py. `specc / peer` is specc's median time over the peer's "
        "(below 1: specc is faster; with --march, `time / peer's` is each specc row's median over the first peer's). `peak MB` is the peak resident memory of one call above what the "
        "process held before it. GFLOP/s counts the cell's matrix products only. `others' CPU` is the "
        "share of the machine's CPU time that other processes used while the worker ran (the most over "
        "its rounds, after up to --retries reruns of noisy workers): where it is high, the timings of "
        "that row are noisy.", "",
        "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    text += ["| " + " | ".join(r) + " |" for r in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(text) + "\n", encoding="utf-8")
    print(f"wrote {path}")


def check_peers(cells: list[str]) -> None:
    """Every peer computes what specc computes (float64, small sizes): outputs and gradients."""
    import torch

    sys.path.insert(0, str(HERE))
    import specc
    import torch_cells

    for cell in cells:
        spec, name, peers = CELLS[cell]
        dims = dims_of(cell, 6, 3, 4, 5)
        m = specc.load(spec, name, dtype=torch.float64, **dims)
        x = torch.randn(6, 3, 4, dtype=torch.float64, requires_grad=True)
        for impl in peers:
            if impl == "torch":
                peer = getattr(torch.nn, TORCH_CLASS[cell])(4, 5).double()
                m = specc.from_torch(peer)
                names = [(n, ours) for n, ours in (("weight_ih_l0", "W_ih"), ("weight_hh_l0", "W_hh"),
                                                   ("bias_ih_l0", "b_ih"), ("bias_hh_l0", "b_hh"))]
            else:
                peer = torch_cells.like(m, compiled=impl == "compiled")
                names = [(n, n) for n, _ in m.named_parameters()]
            y1, _ = m(x)
            y2, _ = peer(x)
            g = torch.randn_like(y1)
            a = torch.autograd.grad(y1, [x] + [getattr(m, o) for _, o in names], g)
            b = torch.autograd.grad(y2, [x] + [getattr(peer, t) for t, _ in names], g)
            err = max([(y1 - y2).abs().max().item()] + [(u - v).abs().max().item() for u, v in zip(a, b)])
            status = "ok" if err < 1e-9 else "MISMATCH"
            print(f"check {cell} vs {impl}: max abs difference {err:.1e} {status}", flush=True)
            if status != "ok":
                raise SystemExit(f"{cell}: the {impl} peer does not compute what specc computes")


if __name__ == "__main__":
    sys.exit(main())
