"""What a generated module's C loops need at run time: a compiler, a cache, and the call.

A module's C_SOURCE is compiled once per set of dimensions (they are constants in the C, so
the compiler unrolls and vectorises for them) with the system's C compiler, `cc` or $CC, linked
to OpenBLAS (the scipy-openblas32 package) for its products, and kept in a cache directory ($SPECC_CACHE, else ~/.cache/specc) under a digest of everything that
went into it: the source, the dimensions, the flags, OpenBLAS's path and this machine's CPU. Several processes
compiling the same library at once each write their own file and rename it into place. Where
MKL's products were measured faster here (blas_choice), a library is handed their addresses
in torch's own MKL as it loads, and a step's products, or those around the loop, use them.

SPECC_C=0 turns the C loops off (backend "auto" then uses NumPy on the CPU).
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..atomic import write_atomically
from ..ops import ACTIVATIONS
from .c import c_dim
from .memory import empty
from .numpy_runtime import contract_sum_into

# The flags that tune the code: -march=native lets the compiler vectorise the elementwise loops for
# this CPU. SPECC_MARCH=x86-64-v3 (or armv8.2-a, ...) compiles for another level instead, and
# SPECC_CFLAGS replaces both (e.g. "-O3 -march=x86-64-v2"): the benchmark compiles the loops for
# several levels of one machine. Nothing in the generated C is particular to one architecture.
# Without a GEMM of its own to compile, an LSTM's library takes ~0.3 s at -O3 (2.3-2.5 s before,
# gcc 12; -O2 is no quicker).
DEFAULT_TUNING = ["-O3", "-march=native"]
# -fno-trapping-math: without it GCC keeps each `x > a ? a : x` of the activations' helpers (sp_exp,
# sp_tanh) a branch, since a comparison may raise a floating-point exception that nothing here
# reads, and leaves every elementwise loop with an activation unvectorised on AVX2 and SSE (AVX-512's
# masked instructions vectorised it anyway, which is how the loops were fast on the machine they
# were written on and 2-3x slower elsewhere: issue 13). It changes no result, only the exception
# flags. -fno-math-errno: sqrtf of a negative number would otherwise keep a call of the C library
# (to set errno, which nothing reads) in the loop and stop it vectorising. -fno-strict-aliasing:
# the loops read one buffer through pointers of several names.
BASE_FLAGS = ["-shared", "-fPIC", "-fno-strict-aliasing", "-fno-trapping-math", "-fno-math-errno", "-fopenmp"]


def tuning() -> list[str]:
    custom = os.environ.get("SPECC_CFLAGS")
    if custom is not None and custom.strip():
        return custom.split()
    march = os.environ.get("SPECC_MARCH")
    return ["-O3", f"-march={march}"] if march else list(DEFAULT_TUNING)


def flags() -> list[str]:
    """The compiler's flags, without the file names and the libraries."""
    return tuning() + BASE_FLAGS


def _dropped(flag: str, what: str) -> bool:
    return flag == what or (what.endswith("=") and flag.startswith(what))


# What to drop, in turn, for a compiler that refuses a flag (Apple's clang has no -fopenmp, some
# compilers no -march=native): the loops then run on one thread, or for a generic CPU.
FALLBACKS = [(), ("-fopenmp",), ("-fopenmp", "-march=")]

# The step's products go to OpenBLAS: it picks its kernels for the CPU when it starts (AVX-512,
# AVX2, NEON, ...), where a GEMM written here would be tuned for one machine and slow on the next
# (issue 13: an 8x32 tile of 16-float vectors, sized for AVX-512's 32 registers, spilled on AVX2's
# 16 and ran at 0.3-1.5 GFLOP/s where OpenBLAS runs at 50-65 per core). The scipy-openblas32 wheel
# is a dependency because it ships the headers and a shared library with prefixed symbols
# (scipy_cblas_sgemm), which cannot clash with the copies NumPy and torch bring. It runs on one
# thread: see blas().
BLAS_PREFIX = "scipy_"

# Helpers every generated file starts with: a vectorisable exp and the activations' own helpers
# (ops.ACTIVATIONS: tanh, sigmoid, ...; Cephes' float polynomials, as libm's scalar calls would
# cost more than the whole matrix product at small sizes) and the call of OpenBLAS for
# o (M, N) = a (M, K) @ w (K, N), rows lda, N and ldo floats apart.
PRELUDE = r"""#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <cblas.h>

#ifdef _OPENMP
#include <omp.h>
static inline long sp_thread(void) { return omp_get_thread_num(); }
static inline long sp_threads(void) { return omp_get_num_threads(); }
#else
static inline long sp_thread(void) { return 0; }
static inline long sp_threads(void) { return 1; }
#endif

#ifndef SP_PARALLEL_ELEMENTS
#define SP_PARALLEL_ELEMENTS 65536  /* elements below which one thread runs an elementwise loop alone */
#endif

static inline float sp_exp(float x) {
    float y = x > 88.7228391f ? 88.7228391f : (x < -104.0f ? -104.0f : x);
    float n = rintf(y * 1.44269504088896341f);  /* floorf(v + 0.5f) would not vectorise */
    float z = y - n * 0.693359375f + n * 2.12194440e-4f;
    float p = ((((( 1.9875691500e-4f * z + 1.3981999507e-3f) * z + 8.3334519073e-3f) * z
                 + 4.1665795894e-2f) * z + 1.6666665459e-1f) * z + 5.0000001201e-1f) * z * z + z + 1.0f;
    /* 2^n as two factors, each a normal float, so that results down to the subnormals are exact */
    int32_t k = (int32_t)n, half = k >> 1;
    int32_t bits1 = (half + 127) << 23, bits2 = (k - half + 127) << 23;
    float s1, s2;
    memcpy(&s1, &bits1, sizeof s1);
    memcpy(&s2, &bits2, sizeof s2);
    float e = p * s1 * s2;
    return x > 88.7228391f ? INFINITY : e;  /* NaN fails every test above and stays NaN */
}

""" + "\n".join(a.c_helper for a in ACTIVATIONS.values() if a.c_helper) + r"""
/* MKL's packed products (cblas_sgemm_pack, cblas_sgemm_compute: LP64, MKL's own enums), taken
   from the MKL inside torch's library where the runtime found them faster than OpenBLAS on a
   step's product on this machine (c_runtime.blas_choice) and handed their addresses in. OpenBLAS
   packs the weight again at every call; MKL packs it once for the whole loop. */
typedef size_t (*sp_pack_size_fn)(int, int, int, int);
typedef void (*sp_pack_fn)(int, int, int, int, int, int, float, const float *, int, float *);
typedef void (*sp_compute_fn)(int, int, int, int, int, int, const float *, int, const float *, int, float, float *, int);
typedef int (*sp_local_threads_fn)(int);
typedef void (*sp_sgemm_fn)(const char *, const char *, const int *, const int *, const int *, const float *,
                            const float *, const int *, const float *, const int *, const float *, float *, const int *);
static sp_pack_size_fn sp_mkl_pack_size;
static sp_pack_fn sp_mkl_pack;
static sp_compute_fn sp_mkl_compute;
static sp_local_threads_fn sp_mkl_local_threads;
static sp_sgemm_fn sp_mkl_sgemm;  /* MKL's sgemm_ for the products around the loop, where chosen */
enum { SP_MKL_ROW_MAJOR = 101, SP_MKL_NO_TRANS = 111, SP_MKL_PACKED = 151, SP_MKL_B_MATRIX = 162 };

/* How many weights this library packed by MKL, and products around the loop it made by MKL: what
   the tests read to know MKL ran, not only that it was offered. */
long specc_mkl_counts[2];

void specc_use_mkl(void *pack_size, void *pack, void *compute, void *local_threads, void *sgemm, int host) {
    sp_mkl_pack_size = (sp_pack_size_fn)pack_size;
    sp_mkl_pack = (sp_pack_fn)pack;
    sp_mkl_compute = (sp_compute_fn)compute;
    sp_mkl_local_threads = (sp_local_threads_fn)local_threads;
    sp_mkl_sgemm = host ? (sp_sgemm_fn)sgemm : NULL;
}

/* MKL on this thread alone while the loop runs (its threads are the loop's); the setting before. */
static inline int sp_mkl_one_thread(int packed) {
    return packed && sp_mkl_local_threads ? sp_mkl_local_threads(1) : 0;
}

static inline void sp_mkl_restore(int packed, int before) {
    if (packed && sp_mkl_local_threads)
        sp_mkl_local_threads(before);
}

/* One block of o = op(a) @ op(w) + beta o (CBLAS's flags and row-major distances): by MKL's sgemm_ where
   chosen (Fortran's column-major convention: o^T = op(w)^T @ op(a)^T, each read as it lies), else
   by OpenBLAS. */
static inline void sp_block(long M, long N, long K, const float *a, long lda, int ta, const float *w, long ldw, int tw,
                            float *o, long ldo, int mkl, float beta) {
    if (mkl && sp_mkl_sgemm) {
        __atomic_fetch_add(&specc_mkl_counts[1], 1, __ATOMIC_RELAXED);
        const int m = (int)M, n = (int)N, k = (int)K, la = (int)lda, lw = (int)ldw, lo = (int)ldo;
        const float one = 1.0f;
        sp_mkl_sgemm(tw == CblasTrans ? "T" : "N", ta == CblasTrans ? "T" : "N", &n, &m, &k, &one, w, &lw, a, &la,
                     &beta, o, &lo);
    } else {
        """ + BLAS_PREFIX + r"""cblas_sgemm(CblasRowMajor, ta, tw, (blasint)M, (blasint)N, (blasint)K, 1.0f, a, (blasint)lda,
                          w, (blasint)ldw, beta, o, (blasint)ldo);
    }
}

/* o (M, N) = a @ w (each transposed as CBLAS's flag says) on `threads` threads, each one call of
   OpenBLAS (or MKL, where chosen) on its block of o's rows, or of its columns when it has fewer
   rows than columns: the host's products around the loop, on the loop's threads (see
   c_runtime.pass_threads). threads 0: a forked child, where MKL's OpenMP would wait as ours would.
   beta 1: o += a @ w (contract_sum's blocks of rows). */
void specc_matmul(long M, long N, long K, const float *a, long lda, int ta, const float *w, long ldw, int tw,
                  float *o, int threads, float beta) {
    const int mkl = threads > 0 && sp_mkl_sgemm != NULL;
    #pragma omp parallel num_threads(threads > 1 ? threads : 1) if (threads > 1)
    {
        long id = sp_thread(), nt = sp_threads();
        const int before = sp_mkl_one_thread(mkl);
        if (M >= N) {
            long m0 = M * id / nt, m1 = M * (id + 1) / nt;
            if (m1 > m0)
                sp_block(m1 - m0, N, K, ta == CblasTrans ? a + m0 : a + m0 * lda, lda, ta, w, ldw, tw, o + m0 * N, N, mkl, beta);
        } else {
            long n0 = N * id / nt, n1 = N * (id + 1) / nt;
            if (n1 > n0)
                sp_block(M, n1 - n0, K, a, lda, ta, tw == CblasTrans ? w + n0 * ldw : w + n0, ldw, tw, o + n0, N, mkl, beta);
        }
        sp_mkl_restore(mkl, before);
    }
}

/* This thread's block [n0, n1) of N columns, a multiple of 16 wide (sp_gemm_cols). */
static inline void sp_cols(long N, long *n0, long *n1) {
    long id = sp_thread(), nt = sp_threads();
    *n0 = id == 0 ? 0 : (N * id / nt) & ~15L;
    *n1 = id == nt - 1 ? N : (N * (id + 1) / nt) & ~15L;
}

#ifndef SP_PACK_MIN_MACS
/* multiply-adds of a thread's product a step below which MKL's packing does not pay: each call of
   it costs a few microseconds more than OpenBLAS's inside the loop (LSTM 200x8x64x64, a (4, 64)
   @ (64, 256) product a thread: 4.4 -> 5.4 ms forward + backward), and small products gain
   nothing from the packing ((8, 64) @ (64, 256): 21 GFLOP/s in both, one thread) */
#define SP_PACK_MIN_MACS 1048576L
#endif

/* w (K, N) packed by MKL for products of M rows: all its columns (cols 0, a thread's rows of the
   batch) or this thread's block of them (cols 1, as sp_gemm_cols multiplies); NULL where MKL is
   not in use or the product is too small to gain, and the products then call OpenBLAS. free() it after. */
static inline float *sp_pack(int cols, long M, long K, long N, const float *w) {
    long n0 = 0, n1 = N;
    if (cols)
        sp_cols(N, &n0, &n1);
    if (!sp_mkl_compute || M <= 0 || n1 <= n0 || K <= 0 || M * K * (n1 - n0) < SP_PACK_MIN_MACS)
        return NULL;
    /* malloc's alignment (16 bytes) is enough for MKL; aligned_alloc is not declared under -std=c99 */
    size_t bytes = sp_mkl_pack_size(SP_MKL_B_MATRIX, (int)M, (int)(n1 - n0), (int)K);
    float *p = bytes ? (float *)malloc(bytes) : NULL;
    if (p) {
        __atomic_fetch_add(&specc_mkl_counts[0], 1, __ATOMIC_RELAXED);
        sp_mkl_pack(SP_MKL_ROW_MAJOR, SP_MKL_B_MATRIX, SP_MKL_NO_TRANS, (int)M, (int)(n1 - n0), (int)K, 1.0f,
                    w + n0, (int)N, p);
    }
    return p;
}

/* o (M, N) = a (M, K) @ w (K, N): by MKL from w packed (sp_pack), else by OpenBLAS. */
static inline void sp_gemm(long M, long K, long N, const float *a, long lda, const float *w, const float *packed,
                           float *o, long ldo) {
    if (packed && M > 0)
        sp_mkl_compute(SP_MKL_ROW_MAJOR, SP_MKL_NO_TRANS, SP_MKL_PACKED, (int)M, (int)N, (int)K, a, (int)lda,
                       packed, (int)N, 0.0f, o, (int)ldo);
    else
        """ + BLAS_PREFIX + r"""cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (blasint)M, (blasint)N, (blasint)K, 1.0f,
                          a, (blasint)lda, w, (blasint)N, 0.0f, o, (blasint)ldo);
}

/* This thread's block of o's columns (sp_cols), for every row: OpenBLAS packs the weight it reads
   at every call, so the threads share that packing instead of each packing all of it for its own
   rows (see c_runtime.pass_threads); `packed`: MKL's packing of this thread's block (sp_pack). */
static inline void sp_gemm_cols(long M, long K, long N, const float *a, long lda, const float *w,
                                const float *packed, float *o, long ldo) {
    long n0, n1;
    sp_cols(N, &n0, &n1);
    if (n1 <= n0)
        return;
    if (packed)
        sp_mkl_compute(SP_MKL_ROW_MAJOR, SP_MKL_NO_TRANS, SP_MKL_PACKED, (int)M, (int)(n1 - n0), (int)K, a,
                       (int)lda, packed, (int)(n1 - n0), 0.0f, o + n0, (int)ldo);
    else
        """ + BLAS_PREFIX + r"""cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (blasint)M, (blasint)(n1 - n0), (blasint)K,
                          1.0f, a, (blasint)lda, w + n0, (blasint)N, 0.0f, o + n0, (blasint)ldo);
}
"""


class CompileError(RuntimeError):
    pass


_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL] = {}
_failed: dict[str, str] = {}


def compiler() -> str | None:
    return _which(os.environ.get("CC") or "cc", os.environ.get("PATH"))


@functools.lru_cache(maxsize=8)
def _which(cc: str, path: str | None) -> str | None:
    """Looked up once for each CC and PATH: every call of a module asks (30-70 us a search)."""
    return shutil.which(cc, path=path)


def problem() -> str | None:
    """Why the C loops cannot run on this machine, or None."""
    if os.environ.get("SPECC_C", "1") == "0":
        return "the C loops are turned off (SPECC_C=0)"
    if compiler() is None:
        return "no C compiler found (install gcc or clang, or set CC)"
    if openblas() is None:
        return "the C loops need OpenBLAS's scipy-openblas32 package (pip install scipy-openblas32)"
    return None


@functools.lru_cache(maxsize=1)
def openblas() -> tuple[str, str, str] | None:
    """OpenBLAS from the scipy-openblas32 wheel: (its headers' folder, its library's folder, the
    library's name for -l), or None where the package is not installed."""
    try:
        import scipy_openblas32
    except ImportError:
        return None
    return scipy_openblas32.get_include_dir(), scipy_openblas32.get_lib_dir(), scipy_openblas32.get_library()


@functools.lru_cache(maxsize=1)
def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return "".join(line for line in f if line.startswith(("model name", "flags")))[:4096]
    except OSError:
        import platform

        return platform.processor() + platform.machine()


def _cache_dir() -> Path:
    root = os.environ.get("SPECC_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "specc")
    return Path(root) / "c"


def full_source(source: str, dims: dict[str, int]) -> str:
    consts = "".join(f"static const long {c_dim(k)} = {int(v)};\n" for k, v in sorted(dims.items()))
    return PRELUDE + "\n" + consts + "\n" + source


_warned: set[tuple] = set()


def first_failure(source: str, dims: dict[str, int]) -> bool:
    """True the first time it is asked about a library that failed to compile."""
    key = (source, tuple(sorted(dims.items())))
    first = key not in _warned
    _warned.add(key)
    return first


_by_source: dict[tuple, ctypes.CDLL] = {}


def library(source: str, dims: dict[str, int]) -> ctypes.CDLL:
    """The compiled C loops of one module for these dimensions (compiled at most once)."""
    memo = (source, tuple(sorted(dims.items())), os.environ.get("CC"), tuple(flags()))
    lib = _by_source.get(memo)
    if lib is None:
        lib = _by_source[memo] = _library(source, dims)
    return lib


def _library(source: str, dims: dict[str, int]) -> ctypes.CDLL:
    text = full_source(source, dims)
    cc = compiler()
    if cc is None:
        raise CompileError(problem() or "no C compiler")
    if openblas() is None:
        raise CompileError(problem() or "no OpenBLAS")
    key = cache_key(text, cc)
    with _lock:
        if key in _loaded:
            return _loaded[key]
        if key in _failed:
            raise CompileError(_failed[key])
        path = _cache_dir() / f"{key}.so"
        for attempt in range(2):
            fresh = not path.exists()
            if fresh:
                _compile(cc, text, path, key)
            else:
                try:
                    os.utime(path)  # used now: pruning keeps the libraries used last
                except OSError:
                    pass
            try:
                blas()  # first: its thread count is set before any loop calls it
                _loaded[key] = _with_blas_choice(ctypes.CDLL(str(path)))
            except OSError as e:
                if path.exists() or attempt:
                    _failed[key] = f"the compiled loops ({path}) do not load: {e}"
                    raise CompileError(_failed[key]) from None
                continue  # another process pruned it between our look and our load: compile it again
            if fresh:
                prune(path.parent, KEEP, spare=path)
            return _loaded[key]


def cache_key(text: str, cc: str) -> str:
    """The digest a library is cached under: everything that went into it (the OpenBLAS it links
    to by path, so that another installation of it is another library)."""
    return hashlib.sha256("\0".join([text, cc, *flags(), *(openblas() or ()), _cpu()]).encode()).hexdigest()[:32]


@functools.lru_cache(maxsize=1)
def _first_cpu() -> str:
    """/proc/cpuinfo's first processor, read once: `auto` asks _core_type() at every call."""
    try:
        with open("/proc/cpuinfo") as f:
            return f.read(1 << 16).split("\n\n")[0]
    except OSError:
        return ""


def _core_type(cpuinfo: str | None = None) -> str | None:
    """The kernels OpenBLAS should use where its own choice is known to be wrong: AMD's Zen 5
    (family 26) has AVX-512, but the OpenBLAS of scipy-openblas32 0.3.34 takes it for a Haswell
    (OpenBLAS issue 6029, fixed after that release) and runs AVX2 kernels. Its SkylakeX kernels
    there, one thread, 2-core EPYC: sgemm (6400, 256) @ (256, 1024) 94 -> 180 GFLOP/s, (1600, 128)
    @ (128, 512) 99 -> 197, (16, 128) @ (128, 512) 58 -> 85. A user's OPENBLAS_CORETYPE wins."""
    if os.environ.get("OPENBLAS_CORETYPE"):
        return None
    return _core_type_of(_first_cpu() if cpuinfo is None else cpuinfo)


@functools.lru_cache(maxsize=4)
def _core_type_of(cpuinfo: str) -> str | None:
    head = cpuinfo.split("\n\n")[0]  # the first processor's
    fields = dict(line.split(":", 1) for line in head.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    try:
        family = int(fields.get("cpu family", "0"))
    except ValueError:
        return None
    avx512 = {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}
    if fields.get("vendor_id") == "AuthenticAMD" and family >= 26 and avx512 <= flags:
        return "SkylakeX"
    return None


@functools.lru_cache(maxsize=1)
def blas() -> ctypes.CDLL:
    """OpenBLAS's library itself, the one the loops link to (a library whose loop has no product may
    not name it at all): for its thread count. It runs on one thread: the loops and specc_matmul
    split every product among their own threads (see pass_threads). This copy of OpenBLAS is
    specc's alone (NumPy, SciPy and torch bring their own), so the setting, which is the whole
    process's, touches nobody else's products."""
    include, libdir, name = openblas()
    found = sorted(Path(libdir).glob(f"lib{name}.*"))
    if not found:
        raise CompileError(f"no lib{name} in {libdir}")
    core = _core_type()
    if core:  # read once, as the library loads; the process's environment is left as it was
        os.environ["OPENBLAS_CORETYPE"] = core
    try:
        lib = ctypes.CDLL(str(found[0]))
    finally:
        if core:
            del os.environ["OPENBLAS_CORETYPE"]
    getattr(lib, BLAS_PREFIX + "openblas_set_num_threads")(ctypes.c_int(1))
    return lib


def blas_kernels() -> str:
    """The kernels OpenBLAS chose (Haswell, SkylakeX, ...), and why, for the benchmarks' headers."""
    name = getattr(blas(), BLAS_PREFIX + "openblas_get_corename")
    name.restype = ctypes.c_char_p
    why = ("OPENBLAS_CORETYPE in the environment" if os.environ.get("OPENBLAS_CORETYPE")
           else "chosen by specc for this CPU" if _core_type() else "OpenBLAS's own choice")
    return f"{name().decode()} ({why})"


# How a pass uses the cores (torch.get_num_threads() of them), measured on 2-core AMD EPYCs:
#
# * The loop splits the batch: each thread runs every step on its own rows (SPLIT_ROWS or more),
#   its products one-thread OpenBLAS calls, with no barrier between steps. LSTM 100x16x128x128
#   (Zen 5, AVX-512): a loop 2.5 -> 1.0 ms. Before this the loop ran on one thread, or OpenBLAS
#   shared each product of a step among its threads, which lost below a few million multiply-adds
#   a product (idle AVX2 EPYC, LSTM forward + backward, one thread against two: 36 / 76 ms at
#   100x16x128x128, 14 / 48 ms at 200x8x64x64: waking a thread for each small product costs more
#   than it saves, and OpenBLAS's threads left spinning took the core the elementwise loops wanted).
# * Where a step's weights are large (COLS_WEIGHT_FLOATS floats or more: 1 MiB, a core's L2 on
#   Zen 5), each product is split by columns instead, with a barrier before and after it, and the
#   elementwise work by rows. OpenBLAS packs the weight it reads at every call (it has no API to
#   keep a packed matrix): split by rows, each thread packs all of it each step for a few rows;
#   by columns, each packs its share, and multiplies the whole batch. One-thread sgemm of
#   (16, 512) @ (512, 2048): 65 GFLOP/s, against 180 for large products. Zen 5, LSTM forward /
#   forward + backward: 50x32x512x512 35 / 85 -> 29 / 75 ms, 50x1x1024x1024 (OpenBLAS sharing
#   each product before) 49 / 147 -> 37 / 87 ms; below the threshold the barriers cost more than
#   the packing (100x16x128x128 forward 2.3 -> 7.5 ms on a noisy run).
# * The host's products around the loop (W @ x over all steps, the gradients) are split the same
#   way in specc_matmul, one OpenBLAS call a thread: one pool of threads, the loops', and none of
#   OpenBLAS's spinning beside it. OpenBLAS itself stays on one thread.
SPLIT_ROWS = 4
COLS_WEIGHT_FLOATS = 1 << 18
MATMUL_SPLIT_MACS = 1 << 20  # a host product smaller than this runs on one thread
_loop = [1]  # threads of the pass's loop and host products
_cols = [False]  # whether the loop's products are split by columns (see pass_threads)


# In a process forked from one that ran OpenMP regions (a multiprocessing or DataLoader worker),
# GCC's OpenMP waits forever for the parent's threads at the next region it starts: there the
# loops run without any (threads 0), as torch runs its own ops on one thread in such a child.
_forked = [False]
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=lambda: _forked.__setitem__(0, True))


def pass_threads(B: int, step_macs: int) -> None:
    """Choose the threads of a pass over B examples whose loop multiplies `step_macs` a step, and
    whether they split the batch or each product's columns."""
    forced = os.environ.get("SPECC_LOOP_THREADS")  # the benchmark's comparisons
    n = max(1, int(forced)) if forced else torch.get_num_threads()
    mode = os.environ.get("SPECC_LOOP_SPLIT")  # rows or cols: the benchmark's comparisons
    if mode not in ("rows", "cols"):
        mode = "cols" if step_macs // max(B, 1) >= COLS_WEIGHT_FLOATS else "rows"
    _loop[0] = n
    _cols[0] = mode == "cols" and n > 1


def loop_threads(B: int) -> int:
    """Threads for a loop over B examples: each takes SPLIT_ROWS rows or more (0: no OpenMP)."""
    if _forked[0]:
        return 0
    return _loop[0] if _cols[0] else max(1, min(_loop[0], B // SPLIT_ROWS))


def _compile(cc: str, text: str, path: Path, key: str) -> None:
    """Compile `text` into `path`, through a temporary file renamed into place (atomic)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            src, out = Path(tmp) / "loops.c", Path(tmp) / "loops.so"
            src.write_text(text)
            first = None
            include, libdir, name = openblas()
            # rpath: the library finds OpenBLAS where pip put it, whatever LD_LIBRARY_PATH says.
            # --no-as-needed: the host code calls OpenBLAS through this library (its products
            # over all steps), also when the loops themselves make no product.
            link = [f"-L{libdir}", f"-Wl,-rpath,{libdir}", "-Wl,--no-as-needed", f"-l{name}", "-lm"]
            for dropped in FALLBACKS:
                used = [f for f in flags() if not any(_dropped(f, d) for d in dropped)]
                try:
                    done = subprocess.run([cc, *used, f"-I{include}", "-o", str(out), str(src), *link],
                                          capture_output=True, text=True, timeout=300)
                except (OSError, subprocess.TimeoutExpired) as e:
                    done = subprocess.CompletedProcess([cc], 1, "", str(e))
                if done.returncode == 0:
                    break
                first = first or done.stderr
            else:
                _failed[key] = f"the C compiler ({cc}) failed on the generated loops:\n{first[-2000:]}"
                raise CompileError(_failed[key])
            os.replace(out, path)
    except OSError as e:  # the cache folder cannot be made or written (set SPECC_CACHE elsewhere)
        _failed[key] = f"cannot write the compiled loops into {path.parent}: {e}"
        raise CompileError(_failed[key]) from None


KEEP = 512  # compiled libraries the cache keeps (each ~30 KB); the least recently used go first


def prune(folder: Path, keep: int, spare: Path | None = None) -> None:
    """Delete all but the `keep` most recently used libraries, never `spare` (the one just made,
    whatever the files' clocks say). One that a process has loaded stays mapped in it after its
    file is gone; another process needing it compiles it again."""
    try:
        found = [(p.stat().st_mtime, p) for p in folder.glob("*.so") if p != spare]
    except OSError:
        return
    for _, p in sorted(found, reverse=True)[max(keep - (spare is not None), 0):]:
        try:
            p.unlink()
        except OSError:
            pass


def _blas_layout(t: torch.Tensor) -> tuple[int, int, torch.Tensor]:
    """(CBLAS transpose flag, distance between rows, tensor) of a matrix as sgemm reads it: a
    transposed view as it is (its rows are the columns of what it views), else contiguous."""
    rows, cols = t.shape
    if t.stride(1) == 1 and t.stride(0) >= max(1, cols):
        return 111, t.stride(0), t  # CblasNoTrans
    if t.stride(0) == 1 and t.stride(1) >= max(1, rows):
        return 112, t.stride(1), t  # CblasTrans
    return 111, max(1, cols), t.contiguous()


def matmul(lib: ctypes.CDLL, a: torch.Tensor, w: torch.Tensor, add_to: torch.Tensor | None = None) -> torch.Tensor:
    """a @ w for float32 CPU matrices (transposed views need no copy): the host's products around
    the loop (W @ x for all steps, the gradients), by the OpenBLAS the loop calls, split among the
    threads pass_threads() chose (specc_matmul in the prelude): one pool, not torch's beside
    OpenBLAS's. (With torch's,
    on 2 cores another process shared, each product waited for the core it held: a GRU at
    20x4x16x16 took 87-150 ms a forward + backward, 6 ms with these.) add_to, a contiguous (M, N)
    matrix: a @ w is added to it, and it is returned."""
    M, K = a.shape
    N = w.shape[1]
    if a.dtype != torch.float32 or w.dtype != torch.float32 or w.shape[0] != K:
        raise AssertionError(f"matmul of {tuple(a.shape)} {a.dtype} by {tuple(w.shape)} {w.dtype}")
    if add_to is not None and (add_to.shape != (M, N) or not add_to.is_contiguous()):
        raise AssertionError(f"matmul adding to {tuple(add_to.shape)}, not a contiguous ({M}, {N})")
    out = empty((M, N)) if add_to is None else add_to
    if M == 0 or N == 0 or K == 0:
        return out if add_to is not None else out.zero_()
    ta, lda, a = _blas_layout(a)
    tw, ldw, w = _blas_layout(w)
    threads = 0 if _forked[0] else _loop[0] if M * N * K >= MATMUL_SPLIT_MACS else 1
    lib.specc_matmul(ctypes.c_long(M), ctypes.c_long(N), ctypes.c_long(K), ctypes.c_void_p(a.data_ptr()),
                     ctypes.c_long(lda), ctypes.c_int(ta), ctypes.c_void_p(w.data_ptr()), ctypes.c_long(ldw),
                     ctypes.c_int(tw), ctypes.c_void_p(out.data_ptr()), ctypes.c_int(threads),
                     ctypes.c_float(0.0 if add_to is None else 1.0))
    return out


def contract_sum(lib: ctypes.CDLL, g: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The sum over rows r of g[r, k] a[r, n] b[r, m], as a (K, N * M) matrix (contract(W, a, b)'s
    weight gradient), each block of rows' product through the loops' own BLAS."""
    out = empty((g.shape[1], a.shape[1] * b.shape[1])).zero_()
    return contract_sum_into(out, g, a, b, add=lambda total, gt, ab: matmul(lib, gt, ab, add_to=total))


def run(lib: ctypes.CDLL, fn: str, T: int, B: int, train: bool, tensors: list, scratch: int,
        views: tuple[int, ...] = ()) -> None:
    """Call one pass's loop on the host's tensors (float32 on the CPU; None where the pass writes
    nothing). Each is contiguous but those in `views`, which the loop reads at the distance between
    their rows that it is handed (their columns must be adjacent)."""
    work = empty((max(int(scratch), 1),))
    ptrs = (ctypes.c_void_p * (len(tensors) + 1))()
    rows = (ctypes.c_long * max(len(tensors), 1))()
    for k, t in enumerate(tensors):
        if t is None:
            continue
        if k in views:
            laid_out = t.dim() == 2 and (t.shape[1] <= 1 or t.stride(1) == 1)
            what = "a float32 CPU matrix with adjacent columns"
        else:
            laid_out, what = t.is_contiguous(), "a contiguous float32 CPU tensor"
        if t.dtype != torch.float32 or t.device.type != "cpu" or not laid_out:
            raise AssertionError(f"argument {k} of {fn} is not {what}")
        ptrs[k] = t.data_ptr()
        rows[k] = t.stride(0) if t.dim() == 2 else 0
    ptrs[len(tensors)] = work.data_ptr()
    threads = loop_threads(B)
    # MKL packs each weight once a pass (about one step's product): not for a few steps, and not
    # in a forked child (threads 0), where MKL's OpenMP would wait as the loops' would.
    packed = getattr(lib, "specc_mkl", False) and threads > 0 and T >= PACK_MIN_STEPS
    getattr(lib, fn)(ctypes.c_long(T), ctypes.c_long(B), ctypes.c_int(int(train)), ctypes.c_int(threads),
                     ctypes.c_int(int(_cols[0] and threads > 1)), ctypes.c_int(int(packed)), ptrs, rows)


# ---------------------------------------------------------------------------------------------
# The products: OpenBLAS, or the MKL inside torch's library where it is faster on this machine.
#
# OpenBLAS packs its operand again at every call, and a step's product is small (the batch's
# rows): one thread, (32, 512) @ (512, 2048), a Sapphire Rapids core ran it at 64-75 GFLOP/s in
# OpenBLAS and 120-126 in MKL from a weight MKL packed once (cblas_sgemm_pack / _compute); (8,
# 256) @ (256, 768) 36 against 85; held to AVX2 67 / 85, to SSE4.2 22 / 26; only (8, 64) @ (64,
# 256) tied. The products around the loop there, (1600, 512) @ (512, 2048) on one thread: 136
# against MKL's sgemm 155, held to AVX2 92 / 94, to SSE4.2 28 / 35. torch's x86-64 library
# carries MKL and exports both (sgemm_ in Fortran's convention), so the loops use the copy torch
# already loaded: no second MKL to install. MKL favours Intel's CPUs (on others it runs its AVX2
# code at best, where OpenBLAS runs AVX-512), so which library each kind of product uses is
# measured, once per machine and setting, not assumed: blas_choice().
PACK_MIN_STEPS = 8
MKL_SYMBOLS = ("cblas_sgemm_pack_get_size", "cblas_sgemm_pack", "cblas_sgemm_compute", "MKL_Set_Num_Threads_Local",
               "sgemm_")
# The products blas_choice() times, (rows, K, N): a small, a middling and a large step's; one
# around the loop.
STEP_SHAPES = ((8, 128, 512), (16, 256, 1024), (32, 512, 2048))
HOST_SHAPES = ((2048, 256, 1024),)


@dataclass(frozen=True)
class BlasChoice:
    steps: str  # "mkl" (packed once a pass) or "openblas": a step's products, in the loop
    host: str  # "mkl" or "openblas": the products around the loop (specc_matmul)
    why: str = "measured on this machine"


@functools.lru_cache(maxsize=1)
def mkl() -> tuple[ctypes.CDLL, tuple[int, ...]] | None:
    """torch's own library and the addresses of MKL_SYMBOLS in it, or None where this torch has
    no MKL (aarch64, macOS), does not export them, or they do not compute a product as this
    file calls them (an MKL of 64-bit integers would read our 32-bit ones wrongly)."""
    import numpy as np

    if _forked[0]:  # MKL's OpenMP in a forked child would wait as the loops' would: OpenBLAS there
        return None
    try:
        found = _torch_mkl()
        if found is None:
            return None
        lib = found[0]
        # An MKL of 64-bit integers reads a register's upper half, which these 32-bit ones leave
        # as they find it: the same size with garbage above the number, or it is not ours.
        high = lambda v: ctypes.c_int64((0x5A5A << 32) | v)  # noqa: E731
        if lib.cblas_sgemm_pack_get_size(high(162), high(5), high(19), high(7)) != \
                lib.cblas_sgemm_pack_get_size(162, 5, 19, 7):
            return None
        with _one_mkl_thread(lib):
            for step in (True, False):
                once, (a, w, o, *_) = _product("mkl", 5, 7, 19, step, lib)
                o.fill(np.nan)
                once()
                if not np.allclose(o, a.astype(np.float64) @ w, rtol=1e-4, atol=1e-4):
                    return None
        return found
    except Exception:  # whatever this torch's library is, the loops still have OpenBLAS
        return None


@contextlib.contextmanager
def _one_mkl_thread(lib: ctypes.CDLL):
    """MKL on the calling thread alone (its thread-local setting), as the loops call it; then as before."""
    before = lib.MKL_Set_Num_Threads_Local(1)
    try:
        yield
    finally:
        lib.MKL_Set_Num_Threads_Local(before)


@functools.lru_cache(maxsize=1)
def _torch_mkl() -> tuple[ctypes.CDLL, tuple[int, ...]] | None:
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    found = sorted((Path(torch.__file__).parent / "lib").glob("libtorch_cpu.*"))
    try:
        lib = ctypes.CDLL(str(found[0]))
        addresses = tuple(ctypes.cast(getattr(lib, name), ctypes.c_void_p).value for name in MKL_SYMBOLS)
    except (IndexError, OSError, AttributeError):
        return None
    lib.cblas_sgemm_pack_get_size.restype = ctypes.c_size_t
    return lib, addresses


def _product(which: str, M: int, K: int, N: int, step: bool, lib: ctypes.CDLL | None = None) -> tuple:
    """One (M, K) @ (K, N) product by `which` library, as the loops (step) or specc_matmul make it:
    (the call, the arrays it reads and writes, which must outlive it)."""
    import numpy as np

    lib = lib or (mkl()[0] if which == "mkl" else blas())
    f, i = ctypes.c_float, ctypes.c_int
    a = np.random.default_rng(0).standard_normal((M, K), dtype=np.float32)
    w = np.random.default_rng(1).standard_normal((K, N), dtype=np.float32)
    o = np.empty((M, N), np.float32)
    pa, pw, po = (ctypes.c_void_p(x.ctypes.data) for x in (a, w, o))
    keep = [a, w, o]
    if which == "openblas":
        sgemm = getattr(lib, BLAS_PREFIX + "cblas_sgemm")
        return lambda: sgemm(101, 111, 111, M, N, K, f(1.0), pa, K, pw, N, f(0.0), po, N), keep
    if step:
        packed = np.empty(lib.cblas_sgemm_pack_get_size(162, M, N, K) // 4 + 16, np.float32)
        pp = ctypes.c_void_p(packed.ctypes.data)
        lib.cblas_sgemm_pack(101, 162, 111, M, N, K, f(1.0), pw, N, pp)
        keep.append(packed)
        return lambda: lib.cblas_sgemm_compute(101, 111, 151, M, N, K, pa, K, pp, N, f(0.0), po, N), keep
    # Fortran's column-major convention: o^T (N, M) = w^T (N, K) @ a^T (K, M), each read as it lies.
    n, m, k, one, zero, no = (ctypes.byref(v) for v in (i(N), i(M), i(K), f(1.0), f(0.0), ctypes.c_char(b"N")))
    return lambda: lib.sgemm_(no, no, n, m, k, one, pw, n, pa, k, zero, po, n), keep


def _seconds(which: str, shapes: tuple, step: bool) -> float:
    """Seconds for one of each of `shapes` on one thread, the fastest of a few tries."""
    total = 0.0
    for M, K, N in shapes:
        once, _arrays = _product(which, M, K, N, step)
        reps = max(3, int(2e7 // (M * K * N)))
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(reps):
                once()
            best = min(best, (time.perf_counter() - t0) / reps)
        total += best
    return total


def _choice_file() -> Path:
    settings = [_cpu(), torch.__version__, *(openblas() or ()), str(_core_type())]
    settings += [f"{k}={os.environ.get(k, '')}" for k in
                 ("MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR", "OPENBLAS_CORETYPE", "ATEN_CPU_CAPABILITY")]
    digest = hashlib.sha256(chr(0).join(settings).encode()).hexdigest()[:24]
    return _cache_dir() / "choices" / f"blas-{digest}.txt"


@functools.lru_cache(maxsize=1)
def blas_choice() -> BlasChoice:
    """The library of a step's products and of those around the loop, here. SPECC_BLAS=openblas
    or mkl decides both; else each is the faster on its shapes (STEP_SHAPES, HOST_SHAPES), on one
    thread, MKL only by at least 5 %, measured once and kept in the cache folder under this CPU
    and the libraries' settings."""
    wanted = os.environ.get("SPECC_BLAS", "").strip().lower()
    if wanted == "openblas":  # before mkl(): this also keeps torch's MKL from being called at all
        return BlasChoice("openblas", "openblas", "SPECC_BLAS")
    if mkl() is None:
        return BlasChoice("openblas", "openblas", "no usable MKL in this torch")
    if wanted == "mkl":
        return BlasChoice("mkl", "mkl", "SPECC_BLAS")
    path = _choice_file()
    try:
        kept = path.read_text().split()
        if len(kept) >= 2 and {kept[0], kept[1]} <= {"mkl", "openblas"}:
            return BlasChoice(kept[0], kept[1], "measured on this machine earlier")
    except OSError:
        pass
    times = {}
    with _one_mkl_thread(mkl()[0]):
        for _ in range(2):  # in turns, the fastest of each: a neighbour's burst hits both
            for kind, shapes in (("steps", STEP_SHAPES), ("host", HOST_SHAPES)):
                for which in ("openblas", "mkl"):
                    t = _seconds(which, shapes, kind == "steps")
                    times[kind, which] = min(times.get((kind, which), t), t)
    chosen = BlasChoice(*("mkl" if times[kind, "mkl"] < 0.95 * times[kind, "openblas"] else "openblas"
                          for kind in ("steps", "host")))
    text = (f"{chosen.steps} {chosen.host}\n# one thread, ms: a step's {STEP_SHAPES}: OpenBLAS "
            f"{1e3 * times['steps', 'openblas']:.3f}, MKL packed {1e3 * times['steps', 'mkl']:.3f}; "
            f"around the loop {HOST_SHAPES}: OpenBLAS {1e3 * times['host', 'openblas']:.3f}, "
            f"MKL {1e3 * times['host', 'mkl']:.3f}\n")
    try:
        write_atomically(path, lambda f: f.write(text.encode("utf-8")))
    except OSError:
        pass  # an unwritable cache: the choice is this process's alone
    return chosen


def _with_blas_choice(lib: ctypes.CDLL) -> ctypes.CDLL:
    """A just-loaded library of loops, told MKL's addresses where blas_choice() chose MKL for
    either kind of product (`lib.specc_mkl`: for a step's)."""
    choice = blas_choice()
    lib.specc_mkl = choice.steps == "mkl"
    if "mkl" in (choice.steps, choice.host):
        lib.specc_use_mkl(*(ctypes.c_void_p(a) for a in mkl()[1]), ctypes.c_int(choice.host == "mkl"))
    return lib


def blas_note() -> str:
    """Which library each kind of product uses, and why: for the benchmarks' headers."""
    choice = blas_choice()
    name = {"mkl": "MKL (torch's)", "openblas": "OpenBLAS"}
    return f"a step's products {name[choice.steps]}, those around the loop {name[choice.host]} ({choice.why})"
