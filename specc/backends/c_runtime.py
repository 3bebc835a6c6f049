"""What a generated module's C loops need at run time: a compiler, a cache, and the call.

A module's C_SOURCE is compiled once per set of dimensions (they are constants in the C, so
the compiler unrolls and vectorises for them) with the system's C compiler, `cc` or $CC, and
kept in a cache directory ($SPECC_CACHE, else ~/.cache/specc) under a digest of everything that
went into it: the source, the dimensions, the flags and this machine's CPU. Several processes
compiling the same library at once each write their own file and rename it into place.

SPECC_C=0 turns the C loops off (backend "auto" then uses NumPy on the CPU).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from .c import c_dim

FLAGS = ["-O3", "-march=native", "-shared", "-fPIC", "-fno-strict-aliasing", "-fopenmp"]
# What to drop, in turn, for a compiler that refuses a flag (Apple's clang has no -fopenmp, some
# compilers no -march=native): the loops then run on one thread, or for a generic CPU.
FALLBACKS = [(), ("-fopenmp",), ("-fopenmp", "-march=native")]

CHUNK = 2048  # rows of w a host product (specc_gemm) packs at a time

# Helpers every generated file starts with: vectorisable exp / tanh / sigmoid (Cephes' float
# polynomials; libm's scalar calls would cost more than the whole matrix product at small
# sizes) and the product of a (M, K) block by a (K, N) matrix, tiled in 8 rows x 32 columns of
# registers. GCC's vector extensions compile to AVX-512, AVX2 or SSE, whichever -march=native has.
PRELUDE = f"#define SP_CHUNK {CHUNK}L\n" + r"""#include <math.h>
#include <stdint.h>
#include <string.h>

#ifndef SP_PARALLEL_WORK
#define SP_PARALLEL_WORK (1L << 18)  /* multiply-adds below which one thread does a product alone */
#endif
#ifndef SP_PARALLEL_ELEMENTS
#define SP_PARALLEL_ELEMENTS 65536  /* elements below which one thread runs an elementwise loop alone */
#endif

typedef float sp_vec __attribute__((vector_size(64), aligned(4)));  /* 16 floats */

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

static inline float sp_sigmoid(float x) { return 1.0f / (1.0f + sp_exp(-x)); }

static inline float sp_tanh(float x) {
    float ax = fabsf(x), z = x * x;
    float small = ((((-5.70498872745e-3f * z + 2.06390887954e-2f) * z - 5.37397155531e-2f) * z
                    + 1.33314422036e-1f) * z - 3.33332819422e-1f) * z * x + x;
    float big = 1.0f - 2.0f / (sp_exp(2.0f * ax) + 1.0f);
    big = x < 0.0f ? -big : big;
    return ax < 0.625f ? small : big;
}

static inline float sp_softplus(float x) { return fmaxf(x, 0.0f) + log1pf(sp_exp(-fabsf(x))); }

/* One tile of o: R rows (up to 8) x V vectors of 16 columns (up to 2), in registers while k runs:
   8 x 32 takes 16 of AVX-512's 32 registers and makes 16 multiply-adds per 2 loads of w (4 x 64
   ran at half the speed: its 4 loads of w a step leave the loads, not the multiply-adds, the limit).
   a's element (r, k) is a[r * lda + k * ldk]; with add, the tile is added to what o holds. */
static inline __attribute__((always_inline)) void sp_tile(const long R, const long V, long K, const float *a,
                                                           long lda, long ldk, const float *w, long ldw, float *o,
                                                           long ldo, int add) {
    sp_vec acc[8][2];
    for (long r = 0; r < R; r++)
        for (long v = 0; v < V; v++)
            acc[r][v] = (sp_vec){0};
    for (long k = 0; k < K; k++) {
        sp_vec wv[2];
        for (long v = 0; v < V; v++)
            memcpy(&wv[v], w + k * ldw + 16 * v, sizeof(sp_vec));
        for (long r = 0; r < R; r++) {
            float av = a[r * lda + k * ldk];
            for (long v = 0; v < V; v++)
                acc[r][v] += av * wv[v];
        }
    }
    for (long r = 0; r < R; r++)
        for (long v = 0; v < V; v++) {
            if (add) {
                sp_vec old;
                memcpy(&old, o + r * ldo + 16 * v, sizeof(sp_vec));
                acc[r][v] += old;
            }
            memcpy(o + r * ldo + 16 * v, &acc[r][v], sizeof(sp_vec));
        }
}

/* A (K, N) matrix as the products read it: per block of 32 columns, K rows of 32 floats, the last
   block padded with zeros. Read in place, a block's rows would be N floats apart: for N = 1024,
   4 KB, so that every row of it falls in the same L1 cache set. w's element (k, n) is
   w[k * ldk + n * ldn]. */
static long sp_packed_size(long K, long N) { return (N + 31) / 32 * 32 * K; }

static void sp_pack_block(long K, long N, const float *w, long ldk, long ldn, long n0, float *p) {
    for (long k = 0; k < K; k++)
        for (long j = 0; j < 32; j++)
            *p++ = n0 + j < N ? w[k * ldk + (n0 + j) * ldn] : 0.0f;
}

static void sp_pack(long K, long N, const float *w, float *p) {
    for (long n0 = 0; n0 < N; n0 += 32)
        sp_pack_block(K, N, w, N, 1, n0, p + n0 * K);
}

/* M rows of one block of `width` (up to 32) columns of o: tiles of 8 rows, then 4, then 1; a
   partial block goes through a buffer. */
static inline __attribute__((always_inline)) void sp_block(long M, long K, const float *a, long lda, long ldk,
                                                            const float *w, float *o, long ldo, long width, int add) {
    if (width == 32) {
        long m = 0;
        for (; m + 8 <= M; m += 8)
            sp_tile(8, 2, K, a + m * lda, lda, ldk, w, 32, o + m * ldo, ldo, add);
        for (; m + 4 <= M; m += 4)
            sp_tile(4, 2, K, a + m * lda, lda, ldk, w, 32, o + m * ldo, ldo, add);
        for (; m < M; m++)
            sp_tile(1, 2, K, a + m * lda, lda, ldk, w, 32, o + m * ldo, ldo, add);
        return;
    }
    float part[8 * 32];
    for (long m = 0; m < M; m += 8) {
        long rows = M - m < 8 ? M - m : 8;
        for (long r = 0; r < rows; r++)
            for (long j = 0; j < 32; j++)
                part[32 * r + j] = add && j < width ? o[(m + r) * ldo + j] : 0.0f;
        for (long r = 0; r < rows; r++)
            sp_tile(1, 2, K, a + (m + r) * lda, lda, ldk, w, 32, part + 32 * r, 32, 1);
        for (long r = 0; r < rows; r++)
            memcpy(o + (m + r) * ldo, part + 32 * r, sizeof(float) * width);
    }
}

/* o (M, N) = a (M, K) @ w (K, N), w packed; rows of a and o lda and ldo floats apart. Column
   blocks are shared among OpenMP's threads when the product is large enough to pay for waking them. */
static void sp_gemm(long M, long K, long N, const float *a, long lda, const float *p, float *o, long ldo) {
    long blocks = (N + 31) / 32;
    #pragma omp parallel for schedule(static) if (M * K * N >= SP_PARALLEL_WORK && blocks > 1)
    for (long nb = 0; nb < blocks; nb++) {
        long n = nb * 32;
        sp_block(M, K, a, lda, 1, p + n * K, o + n, ldo, N - n < 32 ? N - n : 32, 0);
    }
}

/* The host's large products (W @ x and W^T @ g for all steps at once): o (M, N) = a @ w, with any
   strides (in floats), so that transposed views need no copy. K is taken in chunks of SP_CHUNK rows
   of w, each chunk packed once (into `packed`, sp_packed_size(SP_CHUNK, N) floats) and shared by
   every row of a; the work is shared among threads by column block and by 64 rows. */
void specc_gemm(long M, long K, long N, const float *a, long a_row, long a_col, const float *w, long w_row,
                long w_col, float *o, float *packed) {
    long blocks = (N + 31) / 32, groups = (M + 63) / 64;
    int parallel = M * K * N >= SP_PARALLEL_WORK;
    for (long k0 = 0; k0 < K; k0 += SP_CHUNK) {
        long kc = K - k0 < SP_CHUNK ? K - k0 : SP_CHUNK;
        #pragma omp parallel for schedule(static) if (parallel && blocks > 1)
        for (long nb = 0; nb < blocks; nb++)
            sp_pack_block(kc, N, w + k0 * w_row, w_row, w_col, nb * 32, packed + nb * 32 * kc);
        #pragma omp parallel for collapse(2) schedule(static) if (parallel)
        for (long nb = 0; nb < blocks; nb++)
            for (long mg = 0; mg < groups; mg++) {
                long n = nb * 32, m = mg * 64;
                sp_block(M - m < 64 ? M - m : 64, kc, a + m * a_row + k0 * a_col, a_row, a_col,
                         packed + n * kc, o + m * N + n, N, N - n < 32 ? N - n : 32, k0 > 0);
            }
    }
}
"""


class CompileError(RuntimeError):
    pass


_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL] = {}
_failed: dict[str, str] = {}


def compiler() -> str | None:
    cc = os.environ.get("CC") or "cc"
    return shutil.which(cc)


def problem() -> str | None:
    """Why the C loops cannot run on this machine, or None."""
    if os.environ.get("SPECC_C", "1") == "0":
        return "the C loops are turned off (SPECC_C=0)"
    if compiler() is None:
        return "no C compiler found (install gcc or clang, or set CC)"
    return None


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
    memo = (source, tuple(sorted(dims.items())), os.environ.get("CC"))
    lib = _by_source.get(memo)
    if lib is None:
        lib = _by_source[memo] = _library(source, dims)
    return lib


def _library(source: str, dims: dict[str, int]) -> ctypes.CDLL:
    text = full_source(source, dims)
    cc = compiler()
    if cc is None:
        raise CompileError(problem() or "no C compiler")
    key = hashlib.sha256("\0".join([text, cc, *FLAGS, _cpu()]).encode()).hexdigest()[:32]
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
                _loaded[key] = ctypes.CDLL(str(path))
            except OSError as e:
                if path.exists() or attempt:
                    _failed[key] = f"the compiled loops ({path}) do not load: {e}"
                    raise CompileError(_failed[key]) from None
                continue  # another process pruned it between our look and our load: compile it again
            if fresh:
                prune(path.parent, KEEP, spare=path)
            return _loaded[key]


def _compile(cc: str, text: str, path: Path, key: str) -> None:
    """Compile `text` into `path`, through a temporary file renamed into place (atomic)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            src, out = Path(tmp) / "loops.c", Path(tmp) / "loops.so"
            src.write_text(text)
            first = None
            for dropped in FALLBACKS:
                flags = [f for f in FLAGS if f not in dropped]
                try:
                    done = subprocess.run([cc, *flags, "-o", str(out), str(src), "-lm"], capture_output=True,
                                          text=True, timeout=300)
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


def matmul(lib: ctypes.CDLL, a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """a @ w for float32 CPU matrices (any strides, views included) with the library's products."""
    M, K = a.shape
    N = w.shape[1]
    if a.dtype != torch.float32 or w.dtype != torch.float32 or w.shape[0] != K:
        raise AssertionError(f"matmul of {tuple(a.shape)} {a.dtype} by {tuple(w.shape)} {w.dtype}")
    if M == 0 or N == 0 or K == 0:
        return torch.zeros((M, N), dtype=torch.float32)
    out = torch.empty((M, N), dtype=torch.float32)
    packed = torch.empty((N + 31) // 32 * 32 * max(min(K, CHUNK), 1), dtype=torch.float32)
    lg = ctypes.c_long
    lib.specc_gemm(lg(M), lg(K), lg(N), ctypes.c_void_p(a.data_ptr()), lg(a.stride(0)), lg(a.stride(1)),
                   ctypes.c_void_p(w.data_ptr()), lg(w.stride(0)), lg(w.stride(1)), ctypes.c_void_p(out.data_ptr()),
                   ctypes.c_void_p(packed.data_ptr()))
    return out


def run(lib: ctypes.CDLL, fn: str, T: int, B: int, train: bool, tensors: list, scratch: int,
        views: tuple[int, ...] = ()) -> None:
    """Call one pass's loop on the host's tensors (float32 on the CPU; None where the pass writes
    nothing). Each is contiguous but those in `views`, which the loop reads at the distance between
    their rows that it is handed (their columns must be adjacent)."""
    work = torch.empty(max(int(scratch), 1), dtype=torch.float32)
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
    getattr(lib, fn)(ctypes.c_long(T), ctypes.c_long(B), ctypes.c_int(int(train)), ptrs, rows)
