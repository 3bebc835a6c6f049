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


def _matrices(t, what: str):
    """The matrices of a parameter: itself, or each of a stack of them (three axes: R[N, D, D] @ h
    multiplies by each block, one a head, so each is made orthogonal or the identity, not the stack
    flattened into one)."""
    if t.dim() not in (2, 3):
        raise ValueError(f"{what} needs a matrix parameter, or a stack of them (three axes)")
    return (t,) if t.dim() == 2 else t.unbind(0)


@torch.no_grad()
def orthogonal(t, gain=1.0):
    for block in _matrices(t, "orthogonal"):
        torch.nn.init.orthogonal_(block, gain=float(gain))


@torch.no_grad()
def identity(t, scale=1.0):
    for block in _matrices(t, "identity"):
        torch.nn.init.eye_(block)
    t.mul_(float(scale))
