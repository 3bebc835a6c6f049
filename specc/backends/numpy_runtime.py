"""The few helpers that generated NumPy code calls (imported as `rt`).

Each takes an optional `out`, the array the result is written into (and returned); the time loop
passes one so that a step allocates nothing.
"""
from __future__ import annotations

import numpy as np

_HALF = {np.dtype(np.float32): np.array(0.5, np.float32), np.dtype(np.float64): np.array(0.5, np.float64)}

# Matrices up to this many entries are copied into transposed, contiguous form once per pass:
# BLAS multiplies a few rows by a small contiguous matrix several times faster than by a
# transposed view. Larger ones are used as views (the copy would cost memory, and gains little).
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


def outer_rows(a, b, out=None):
    """Row-wise outer products, flattened: (R, N), (R, K) -> (R, N*K)."""
    r, n, k = a.shape[0], a.shape[1], b.shape[1]
    if out is None:
        out = np.empty((r, n * k), dtype=np.result_type(a, b))
    np.multiply(a[:, :, None], b[:, None, :], out.reshape(r, n, k))
    return out


def outer_vjp_a(g, b, n, k, out=None):
    """Gradient of outer_rows(a, b) for a: sum_k g[r, n, k] b[r, k]."""
    r = g.shape[0]
    if out is None:
        out = np.empty((r, n), dtype=g.dtype)
    np.matmul(g.reshape(r, n, k), b[:, :, None], out.reshape(r, n, 1))
    return out


def outer_vjp_b(g, a, n, k, out=None):
    """Gradient of outer_rows(a, b) for b: sum_n g[r, n, k] a[r, n]."""
    r = g.shape[0]
    if out is None:
        out = np.empty((r, k), dtype=g.dtype)
    np.matmul(a[:, None, :], g.reshape(r, n, k), out.reshape(r, 1, k))
    return out


# Values made before the loop that only the loop reads are made this many rows (time x batch) at
# a time: enough rows for an efficient matrix product, few enough to stay in cache.
CHUNK_ROWS = 512


def chunk_steps(T, B):
    """Steps per chunk of input-only values (see CHUNK_ROWS)."""
    return max(1, min(T, CHUNK_ROWS // B))


def transposed(w):
    """w.T, contiguous when w is small enough (see TRANSPOSE_COPY_MAX)."""
    return np.ascontiguousarray(w.T) if w.size <= TRANSPOSE_COPY_MAX else w.T
