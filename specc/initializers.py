"""Parameter initialisers named in specs (`param W[H, H] ~ orthogonal`); they fill tensors in place."""
from __future__ import annotations

import torch


@torch.no_grad()
def zeros(t):
    t.zero_()


@torch.no_grad()
def ones(t):
    t.fill_(1.0)


@torch.no_grad()
def constant(t, value):
    t.fill_(float(value))


@torch.no_grad()
def uniform(t, a, b=None):
    """uniform(k) draws from U(-k, k), as torch's recurrent layers do; uniform(a, b) from U(a, b)."""
    low, high = (-a, a) if b is None else (a, b)
    t.uniform_(float(low), float(high))


@torch.no_grad()
def normal(t, a, b=None):
    """normal(std), or normal(mean, std)."""
    mean, std = (0.0, a) if b is None else (a, b)
    t.normal_(float(mean), float(std))


# A parameter of three axes is a stack of matrices (R[N, D, D] @ h multiplies by each block, one a
# head): orthogonal and identity make each matrix so, not the stack flattened into one.

@torch.no_grad()
def orthogonal(t, gain=1.0):
    if t.dim() not in (2, 3):
        raise ValueError("orthogonal needs a matrix parameter, or a stack of them (three axes)")
    for block in (t,) if t.dim() == 2 else t.unbind(0):
        torch.nn.init.orthogonal_(block, gain=float(gain))


@torch.no_grad()
def identity(t, scale=1.0):
    if t.dim() not in (2, 3):
        raise ValueError("identity needs a matrix parameter, or a stack of them (three axes)")
    for block in (t,) if t.dim() == 2 else t.unbind(0):
        torch.nn.init.eye_(block)
    t.mul_(float(scale))
