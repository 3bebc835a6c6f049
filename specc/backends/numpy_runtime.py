"""The few helpers that generated NumPy code calls (imported as `rt`).

Each takes an optional `out`, the array the result is written into (and returned); the time loop
passes one so that a step allocates nothing.
"""
from __future__ import annotations

import os

import numpy as np

_HALF = {np.dtype(np.float32): np.array(0.5, np.float32), np.dtype(np.float64): np.array(0.5, np.float64)}

# Matrices a loop multiplies by, up to this many entries, are copied into contiguous form once per
# pass (a product x @ W.T would otherwise read the transposed view W.T): BLAS multiplies a few rows
# by a small contiguous matrix several times faster than by a transposed view. Larger ones are
# used as views (the copy would cost memory, and gains little).
TRANSPOSE_COPY_MAX = 1 << 22


def sigmoid(x, out=None):
    # tanh form: no overflow warnings for large |x|, and one transcendental per element.
    if out is None:
        return 0.5 * np.tanh(0.5 * x) + 0.5
    half = _HALF.get(out.dtype)
    if half is None:
        half = np.array(0.5, out.dtype)
    np.multiply(x, half, out)
    np.tanh(out, out)
    np.multiply(out, half, out)
    return np.add(out, half, out)


def rows(v, n):
    """n rows of vector v, as a contiguous (n, len(v)) array: a ufunc runs several times faster
    on two arrays of one shape than broadcasting a vector over rows."""
    return np.ascontiguousarray(np.broadcast_to(v, (n,) + v.shape))


def sigmoid_tanh_scales(dtype, n, *parts):
    """(scale, shift), n rows each, for sigmoid_tanh: parts are ("sigmoid" or "tanh", columns)."""
    scale = np.concatenate([np.full(k, 0.5 if op == "sigmoid" else 1.0, dtype=dtype) for op, k in parts])
    shift = np.concatenate([np.full(k, 0.5 if op == "sigmoid" else 0.0, dtype=dtype) for op, k in parts])
    return rows(scale, n), rows(shift, n)


def sigmoid_tanh(x, scales, out):
    """Sigmoid in some columns, tanh in the others, in four NumPy calls whatever their number:
    sigmoid(x) = 0.5 tanh(0.5 x) + 0.5 and tanh(x) = 1 tanh(1 x) + 0 (exactly what sigmoid() and
    np.tanh compute)."""
    scale, shift = scales
    np.multiply(x, scale, out)
    np.tanh(out, out)
    np.multiply(out, scale, out)
    return np.add(out, shift, out)


def step(x, out=None):
    """1 where x > 0, else 0 (relu's derivative)."""
    if out is None:
        return (x > 0).astype(x.dtype)
    return np.greater(x, 0, out=out, casting="unsafe")


def softmax(x, out=None):
    out = np.subtract(x, x.max(axis=-1, keepdims=True), out)
    np.exp(out, out)
    return np.divide(out, out.sum(axis=-1, keepdims=True), out)


def softmax_vjp(g, y, out=None):
    dot = (g * y).sum(axis=-1, keepdims=True)
    out = np.subtract(g, dot, out)
    return np.multiply(y, out, out)


def _one_row(f, *arrays, out=None, **sizes):
    """f on vectors made of parameters alone (one row, no batch axis)."""
    result = f(*(x[None] for x in arrays), **sizes, out=None if out is None else out[None])
    return result[0]


def outer_rows(a, b, out=None):
    """Row-wise outer products, flattened: (R, N), (R, K) -> (R, N*K)."""
    if a.ndim == 1:
        return _one_row(outer_rows, a, b, out=out)
    r, n, k = a.shape[0], a.shape[1], b.shape[1]
    if out is None:
        out = np.empty((r, n * k), dtype=np.result_type(a, b))
    np.multiply(a[:, :, None], b[:, None, :], out.reshape(r, n, k))
    return out


def outer_vjp_a(g, b, n, k, out=None):
    """Gradient of outer_rows(a, b) for a: sum_k g[r, n, k] b[r, k]."""
    if g.ndim == 1:
        return _one_row(outer_vjp_a, g, b, n=n, k=k, out=out)
    r = g.shape[0]
    if out is None:
        out = np.empty((r, n), dtype=g.dtype)
    np.matmul(g.reshape(r, n, k), b[:, :, None], out.reshape(r, n, 1))
    return out


def outer_vjp_b(g, a, n, k, out=None):
    """Gradient of outer_rows(a, b) for b: sum_n g[r, n, k] a[r, n]."""
    if g.ndim == 1:
        return _one_row(outer_vjp_b, g, a, n=n, k=k, out=out)
    r = g.shape[0]
    if out is None:
        out = np.empty((r, k), dtype=g.dtype)
    np.matmul(a[:, None, :], g.reshape(r, n, k), out.reshape(r, 1, k))
    return out


# Bytes of outer products contract_sum makes at a time: the weight gradient of contract(W, a, b) is
# the sum over rows of g (x) (a (x) b), and a (x) b, N * M numbers a row, is made a block of rows at
# a time rather than kept for every step by the forward pass (second_order at 100 x 16 x 128 x 128:
# 105 MB). Each block adds one product into the (K, N * M) result, so blocks below a few MB cost
# passes over it: 8 MB blocks took 20 ms there, against 23 for the product of the kept values.
CONTRACT_BYTES = 8 << 20
# On a GPU, where each block is a launch or two and memory is plentiful: torch.einsum made all of
# (rows, K, N) at once there (second_order at 1000 x 64 x 256 x 256: 17 GB).
CONTRACT_BYTES_GPU = 256 << 20


def contract_rows(rows: int, width: int, itemsize: int, budget: int) -> int:
    """Rows of outer products, `width` numbers each, in one block of `budget` bytes."""
    return max(1, min(rows, budget // max(width * itemsize, 1)))


def contract_sum(g, a, b):
    """The sum over rows r of g[r, k] a[r, n] b[r, m], as a (K, N * M) array. By torch on the arrays'
    memory: NumPy's broadcast product and additions took twice as long (46 against 21 ms at 1600
    rows, K = N = M = 128)."""
    import torch

    dtype = np.result_type(g, a, b)
    out = np.zeros((g.shape[1], a.shape[1] * b.shape[1]), dtype=dtype)
    contract_sum_into(torch.from_numpy(out), *(torch.from_numpy(np.asarray(v, dtype=dtype)) for v in (g, a, b)))
    return out


def contract_sum_tensors(g, a, b):
    """contract_sum of torch tensors, on their device (the Triton host's)."""
    return contract_sum_into(g.new_zeros((g.shape[1], a.shape[1] * b.shape[1])), g, a, b)


def contract_sum_into(total, g, a, b, add=None):
    """total (K, N * M) += the sum over rows r of g[r, k] a[r, n] b[r, m]: torch tensors on any
    device, the outer products a block of rows at a time (CONTRACT_BYTES on the CPU,
    CONTRACT_BYTES_GPU elsewhere). add(total, g_block.T, ab_block) adds one block's product
    (total.addmm_ unless told: the C host's goes through the loops' own BLAS)."""
    import torch

    r, n, m = g.shape[0], a.shape[1], b.shape[1]
    budget = CONTRACT_BYTES if total.device.type == "cpu" else CONTRACT_BYTES_GPU
    step = contract_rows(r, n * m, total.element_size(), budget)
    block = torch.empty((min(step, r), n, m), dtype=total.dtype, device=total.device)
    for lo in range(0, r, step):
        hi = min(lo + step, r)
        ab = torch.mul(a[lo:hi, :, None], b[lo:hi, None, :], out=block[:hi - lo]).view(hi - lo, n * m)
        if add is None:
            total.addmm_(g[lo:hi].T, ab)
        else:
            add(total, g[lo:hi].T, ab)
    return total


# Values made before the loop that only the loop reads are made this many rows (time x batch) at
# a time: enough rows for an efficient matrix product, few enough to stay in cache.
CHUNK_ROWS = 512


def block_diagonal(w):
    """W[N, R, C] as the (N*R, N*C) matrix whose n-th diagonal block is W[n] (scipy.linalg.block_diag
    of the blocks; one broadcast here, so NumPy alone)."""
    n, r, c = w.shape
    return (w[:, :, None, :] * np.eye(n, dtype=w.dtype)[:, None, :, None]).reshape(n * r, n * c)


def diagonal_blocks(g, n):
    """The n diagonal blocks of a (N*R, N*C) matrix, as [N, R, C] (block_diagonal's gradient)."""
    r, c = g.shape[0] // n, g.shape[1] // n
    return np.diagonal(g.reshape(n, r, n, c), axis1=0, axis2=2).transpose(2, 0, 1).copy()  # a view would be read-only


def chunk_steps(T, B):
    """Steps per chunk of input-only values (see CHUNK_ROWS)."""
    return max(1, min(T, CHUNK_ROWS // B))


# Products by a float32 matrix of at least this many entries, a few rows at a time, go through
# oneDNN (which torch ships) with the matrix packed once per pass into oneDNN's blocked layout.
# Measured on a 2-core AMD EPYC (Zen 4) against NumPy's OpenBLAS, (rows, K) @ (K, N) per call:
# 64x256 @ 256x1024 190 us vs 229 us; 8x512 @ 512x2048 128 vs 289; 4x1024 @ 1024x4096 290 vs
# 1213 (OpenBLAS repacks the matrix on every call, which dominates when there are few rows).
# Below these sizes, or with one row, OpenBLAS's lower call overhead wins (64x64 @ 64x256: 20 vs
# 34 us). SPECC_ONEDNN=0 in the environment turns this off (to compare, or to rule it out).
# oneDNN's linear op writes a new array, copied into the loop's buffer: where the result is
# larger than PACK_MAX_RESULT entries the copy leaves the cache and costs more than the packing
# gains (second_order's backward, (64, 256) @ (256, 65536): 20% slower packed).
# The packed copy is held for the whole pass, beside the matrix itself: above PACK_MAX_ENTRIES
# (64 MB of float32) that memory is not spent (second_order with I = H = 512, a 512 MB matrix,
# would have needed 547 MB for an inference pass that needs 10 otherwise).
PACK_MIN_ENTRIES = 1 << 18
PACK_MAX_ENTRIES = 1 << 24
PACK_MIN_ROWS = 4
PACK_MAX_RESULT = 1 << 19

_ONEDNN = None  # (linear, pack) once probed and found to work; False when not available


def _onednn():
    global _ONEDNN
    if _ONEDNN is None:
        _ONEDNN = False
        if os.environ.get("SPECC_ONEDNN", "1") != "0":
            try:
                import torch

                linear = torch.ops.mkldnn._linear_pointwise
                pack = torch.ops.mkldnn._reorder_linear_weight
                if torch.backends.mkldnn.is_available():
                    # These ops are torch's internals (its compiler uses them): check that they
                    # compute a product before trusting them with one.
                    rng = np.random.default_rng(0)
                    a = rng.standard_normal((5, 24)).astype(np.float32)
                    b = rng.standard_normal((24, 40)).astype(np.float32)
                    w = pack(torch.from_numpy(np.ascontiguousarray(b.T)), 5)
                    got = linear(torch.from_numpy(a), w, None, "none", [], "").numpy()
                    if got.shape == (5, 40) and np.allclose(got, a @ b, rtol=1e-4, atol=1e-4):
                        _ONEDNN = (linear, pack)
            except Exception:  # noqa: BLE001 - any failure means: multiply with NumPy
                _ONEDNN = False
    return _ONEDNN


class Packed:
    """The right operand b (K, N) of many products a @ b, packed for oneDNN. Keeps b itself for
    the products oneDNN cannot take (other dtypes, non-contiguous or read-only rows)."""

    __slots__ = ("b", "w", "linear")

    def __init__(self, b, rows, linear, pack):
        import torch

        self.b = b
        self.linear = linear
        self.w = pack(torch.from_numpy(np.ascontiguousarray(b.T)), rows)

    def matmul(self, a, out=None):
        if a.dtype != np.float32 or not a.flags.c_contiguous or not a.flags.writeable:
            return torch_matmul(a, self.b, out)
        import torch

        return _written(self.linear(torch.from_numpy(a), self.w, None, "none", [], "").numpy(), out)


def _written(r, out):
    """oneDNN's result r, copied into out when there is one (its linear op takes no out)."""
    if out is None:
        return r
    np.copyto(out, r)
    return out


def operand(b, rows):
    """b (K, N), the right operand of products a @ b made many times with `rows` rows in a, in
    the form matmul() multiplies fastest: packed for oneDNN (see PACK_MIN_ENTRIES), else
    contiguous when small enough (see TRANSPOSE_COPY_MAX)."""
    if (b.dtype == np.float32 and b.ndim == 2 and PACK_MIN_ENTRIES <= b.size <= PACK_MAX_ENTRIES
            and rows >= PACK_MIN_ROWS and rows * b.shape[1] <= PACK_MAX_RESULT):
        found = _onednn()
        if found:
            return Packed(b, rows, *found)
    return np.ascontiguousarray(b) if b.size <= TRANSPOSE_COPY_MAX else b


# OpenBLAS multiplies on one thread below this many multiply-adds (m * k * n), on all cores above.
ONE_THREAD_PRODUCT = 1 << 18


def matmul_for(*operands):
    """The function a pass makes all its products with, given the operands operand() made: NumPy's,
    or, when oneDNN takes some of them, one that hands every large float32 product to torch (MKL
    and oneDNN, on the same OpenMP threads). One library's threads for the whole pass: OpenBLAS's
    spin for a while after each product, and beside torch's they took the cores from each other
    (the backward pass of a 256-wide LSTM ran 2.5x slower with its products alternating)."""
    return torch_matmul if any(o.__class__ is Packed for o in operands) else np.matmul


def torch_matmul(a, b, out=None):
    """a @ b (into out when given) by oneDNN or torch when large; b may be an operand()."""
    if b.__class__ is Packed:
        return b.matmul(a, out)
    if (a.dtype == np.float32 and b.dtype == np.float32 and a.ndim == 2 and b.ndim == 2
            and a.shape[0] * a.shape[1] * b.shape[1] >= ONE_THREAD_PRODUCT and a.flags.writeable
            and b.flags.writeable and (out is None or out.flags.writeable) and _onednn()):
        import torch

        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        if a.flags.c_contiguous:  # oneDNN's linear op: faster than MKL's products here
            return _written(_ONEDNN[0](ta, tb.T, None, "none", [], "").numpy(), out)
        # A transposed a (the sums over time and batch): MKL takes it as it is.
        if out is None:
            return torch.mm(ta, tb).numpy()
        torch.mm(ta, tb, out=torch.from_numpy(out))
        return out
    return np.matmul(a, b, out)


# Values a step (batch x the states' widths) up to which the chunked scan beats the loop over
# steps. The loop's cost is its NumPy calls, a few a step; the scan's, passes over (T, B x width)
# memory (a and b made whole, copied, scanned, combined), where the loop makes a and b a chunk
# at a time in cache. minGRU forward + backward over 4,096 steps on 2 Zen 5 cores (bench/scan.py
# --numpy; bench/results/scan-cpu-2026-12-02c.md): the scan 1.4-2.0x faster at 64-1,024 values a
# step, 0.6-0.7x at 2,048 and 16,384.
SCAN_MAX_WIDTH = 1024


def scan_pays(B, width):
    """Whether a pass of linear recurrences runs as a chunked scan (linear_scan) or step by step."""
    return B * width <= SCAN_MAX_WIDTH


def linear_scan(a, b, s, T, B, reverse=False):
    """A linear recurrence over the sequence, into the state buffer s ((T + 1) * B, n): s after
    step t is a_t * (s before it) + b_t, for every step (a and b: (T * B, n), or broadcast to
    that). Forward, block 0 of s holds the first state and block t + 1 is written; reverse (a
    backward pass), block T holds it and block t is written, from t = T - 1 down.

    A chunked scan: the steps in chunks of about sqrt(T), each chunk's running (product of a,
    combined b) made for all chunks at once, one step of the chunk at a time; then each chunk's
    first state, chunk after chunk; then every state at once. About 2 sqrt(T) NumPy calls a pass
    instead of several a step. A running product of a that underflows to 0 is a state forgotten,
    as it is step by step (no division by it, no logarithm)."""
    n = s.shape[1]
    width = B * n
    a = np.broadcast_to(a, (T * B, n)).reshape(T, width)
    b = np.broadcast_to(b, (T * B, n)).reshape(T, width)
    if reverse:
        a, b = a[::-1], b[::-1]
    size = max(1, int(np.sqrt(T)))
    chunks = -(-T // size)
    run_a = np.ones((chunks * size, width), dtype=s.dtype)
    run_b = np.zeros((chunks * size, width), dtype=s.dtype)
    run_a[:T], run_b[:T] = a, b  # steps past the end are (1, 0): they leave the state as it is
    run_a = run_a.reshape(chunks, size, width)
    run_b = run_b.reshape(chunks, size, width)
    for k in range(1, size):
        run_b[:, k] += run_a[:, k] * run_b[:, k - 1]  # run_a[:, k] is still a at that step
        run_a[:, k] *= run_a[:, k - 1]
    starts = np.empty((chunks, width), dtype=s.dtype)
    state = (s[T * B:] if reverse else s[:B]).reshape(width)
    for j in range(chunks):
        starts[j] = state
        state = run_a[j, -1] * state + run_b[j, -1]
    run_a *= starts[:, None, :]
    run_a += run_b
    states = run_a.reshape(chunks * size, width)[:T]
    if reverse:
        s[:T * B] = states[::-1].reshape(T * B, n)
    else:
        s[B:] = states.reshape(T * B, n)
    return s
