"""The library's custom cells written by hand as torch loops: the peers specc is measured against.

Each module has the spec's parameters under the spec's names (so weights copy one to one from a
specc module) and computes what the spec says, the way a careful person writes it in torch: the
input projection of all steps is one matrix product before the loop, stacked weights are
concatenated once per call, and the loop calls `self.step`, a function of tensors only. With
`compiled=True` that step function goes through torch.compile (the loop stays in Python, as it
does in eager mode; compiling the whole unrolled loop takes minutes at T = 200).

    forward(x) -> (outputs (T, B, size), final state (B, size)), like the specc modules.
"""
from __future__ import annotations

import torch
from torch import nn


def _params(module: nn.Module, shapes: dict[str, tuple[int, ...]]) -> None:
    for name, shape in shapes.items():
        module.register_parameter(name, nn.Parameter(torch.zeros(shape)))


class _Loop(nn.Module):
    def __init__(self, compiled: bool):
        super().__init__()
        self.step = torch.compile(self._step, fullgraph=True, dynamic=False) if compiled else self._step

    def _run(self, xs: torch.Tensor, h: torch.Tensor, *weights) -> tuple[torch.Tensor, torch.Tensor]:
        outs = []
        for t in range(xs.shape[0]):
            h = self.step(xs[t], h, *weights)
            outs.append(h)
        return torch.stack(outs), h


class SecondOrder(_Loop):
    """h' = sigmoid(contract(W, x, h) + b), contract(W, x, h)_i = sum_jk W_ijk x_j h_k."""

    def __init__(self, I: int, H: int, compiled: bool = False):
        super().__init__(compiled)
        self.I, self.H = I, H
        _params(self, {"W": (H, I, H), "b": (H,)})

    @staticmethod
    def _step(x_t, h, W2, b):
        # The outer products x_j h_k of each example, flattened, against W as an (H, I*H) matrix.
        xh = (x_t.unsqueeze(2) * h.unsqueeze(1)).flatten(1)
        return torch.sigmoid(torch.addmm(b, xh, W2.t()))

    def forward(self, x, h0=None):
        h = x.new_zeros(x.shape[1], self.H) if h0 is None else h0
        return self._run(x, h, self.W.reshape(self.H, self.I * self.H), self.b)


class GruCho(_Loop):
    """z, r = sigmoid(W_z x + U_z h + b_z), sigmoid(W_r x + U_r h + b_r);
    n = tanh(W x + U (r * h) + b); h' = (1 - z) * h + z * n."""

    def __init__(self, I: int, H: int, compiled: bool = False):
        super().__init__(compiled)
        self.H = H
        _params(self, {"W_z": (H, I), "W_r": (H, I), "W": (H, I), "U_z": (H, H), "U_r": (H, H), "U": (H, H),
                       "b_z": (H,), "b_r": (H,), "b": (H,)})

    @staticmethod
    def _step(xp_t, h, U_zr, U):
        H = h.shape[1]
        zr = torch.sigmoid(xp_t[:, :2 * H] + h @ U_zr.t())
        z, r = zr[:, :H], zr[:, H:]
        n = torch.tanh(xp_t[:, 2 * H:] + (r * h) @ U.t())
        return (1 - z) * h + z * n

    def forward(self, x, h0=None):
        T, B, I = x.shape
        h = x.new_zeros(B, self.H) if h0 is None else h0
        W = torch.cat([self.W_z, self.W_r, self.W])
        bias = torch.cat([self.b_z, self.b_r, self.b])
        xp = torch.addmm(bias, x.reshape(T * B, I), W.t()).view(T, B, 3 * self.H)
        return self._run(xp, h, torch.cat([self.U_z, self.U_r]), self.U)


class Jordan(_Loop):
    """h = tanh(W_xh x + W_yh y + b_h); y' = W_hy h + b_y, y fed back."""

    def __init__(self, I: int, H: int, O: int, compiled: bool = False):
        super().__init__(compiled)
        self.H, self.O = H, O
        _params(self, {"W_xh": (H, I), "W_yh": (H, O), "b_h": (H,), "W_hy": (O, H), "b_y": (O,)})

    @staticmethod
    def _step(xp_t, y, W_yh, W_hy, b_y):
        h = torch.tanh(torch.addmm(xp_t, y, W_yh.t()))
        return torch.addmm(b_y, h, W_hy.t())

    def forward(self, x, y0=None):
        T, B, I = x.shape
        y = x.new_zeros(B, self.O) if y0 is None else y0
        xp = torch.addmm(self.b_h, x.reshape(T * B, I), self.W_xh.t()).view(T, B, self.H)
        return self._run(xp, y, self.W_yh, self.W_hy, self.b_y)


class MultiheadLSTM(nn.Module):
    """An LSTM of N heads of D features: gate g of head n reads head n of h through R_g[n] alone.
    The four gates' blocks are one (N, D, 4D) batch of matrices, multiplied per head with bmm."""

    def __init__(self, I: int, N: int, D: int, compiled: bool = False):
        super().__init__()
        self.N, self.D = N, D
        _params(self, {"W": (4 * N * D, I), "R_i": (N, D, D), "R_f": (N, D, D), "R_g": (N, D, D),
                       "R_o": (N, D, D), "b": (4 * N * D,)})
        self.step = torch.compile(self._step, fullgraph=True, dynamic=False) if compiled else self._step

    @staticmethod
    def _step(xp_t, h, c, R):
        B, (N, D, _) = h.shape[0], R.shape
        # (N, B, D) @ (N, D, 4D) -> (N, B, 4, D), laid out as the spec's gates: gate, head, feature
        hh = torch.bmm(h.view(B, N, D).transpose(0, 1), R).view(N, B, 4, D).permute(1, 2, 0, 3).reshape(B, 4 * N * D)
        i, f, g, o = (xp_t + hh).chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c

    def forward(self, x, state=None):
        T, B, I = x.shape
        h, c = (x.new_zeros(B, self.N * self.D),) * 2 if state is None else state
        xp = torch.addmm(self.b, x.reshape(T * B, I), self.W.t()).view(T, B, -1)
        # R[n] = [R_i[n]^T | R_f[n]^T | R_g[n]^T | R_o[n]^T]: h_n @ R[n] is the four gates' products
        R = torch.cat([self.R_i, self.R_f, self.R_g, self.R_o], dim=1).transpose(1, 2)
        outs = []
        for t in range(T):
            h, c = self.step(xp[t], h, c, R)
            outs.append(h)
        return torch.stack(outs), (h, c)


CELLS = {"second_order": SecondOrder, "gru_cho": GruCho, "jordan": Jordan, "multihead_lstm": MultiheadLSTM}


def like(specc_module: nn.Module, compiled: bool = False) -> nn.Module:
    """The hand-written peer of a specc module of a custom cell, with its weights copied."""
    cls = CELLS[specc_module.program.CELL]
    peer = cls(**specc_module.dims, compiled=compiled).to(next(specc_module.parameters()).dtype)
    with torch.no_grad():
        for name, p in peer.named_parameters():
            p.copy_(getattr(specc_module, name))
    return peer
