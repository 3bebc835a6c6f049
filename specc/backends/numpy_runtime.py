"""The few helpers that generated NumPy code calls (imported as `rt`)."""
from __future__ import annotations

import numpy as np


def sigmoid(x):
    # tanh form: no overflow warnings for large |x|, and one transcendental per element.
    return 0.5 * np.tanh(0.5 * x) + 0.5


def softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def softmax_vjp(g, y):
    return y * (g - (g * y).sum(axis=-1, keepdims=True))


def outer_rows(a, b):
    """Row-wise outer products, flattened: (R, N), (R, K) -> (R, N*K)."""
    return (a[:, :, None] * b[:, None, :]).reshape(a.shape[0], -1)


def outer_vjp_a(g, b, n, k):
    return np.einsum("rnk,rk->rn", g.reshape(-1, n, k), b)


def outer_vjp_b(g, a, n, k):
    return np.einsum("rnk,rn->rk", g.reshape(-1, n, k), a)
