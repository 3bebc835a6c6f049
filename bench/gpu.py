"""specc's Triton backend against cuDNN, torch eager and torch.compile, on one GPU.

    python bench/gpu.py                      # the whole table (about ten minutes on an H100)
    python bench/gpu.py --quick              # one size per cell
    python bench/gpu.py --out bench/results/gpu-YYYY-MM-DD.md

For LSTM and GRU at the sizes of PyTorch's fastrnns benchmarks (seq 100, batch 64, input =
hidden = 512; hidden 256 and 1024; batch 1, 16 and 256): forward (under no_grad) and forward +
backward time, tokens/s and peak memory of specc-Triton, cuDNN (nn.LSTM / nn.GRU), the same cell
as a torch-eager loop, and that loop's step under torch.compile; ratios against cuDNN in the same
run. For second_order and gru_cho (no cuDNN layer) the ratios are against the eager loop.
Times are medians of CUDA-event-timed runs after warm-up.
"""
from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch_cells  # noqa: E402  (the hand-written custom cells, shared with bench/cpu.py)

import specc  # noqa: E402


class EagerLSTM(torch_cells._Loop):
    """nn.LSTM's equations as a loop, input projection hoisted, gates in torch's order."""

    def __init__(self, ref: nn.LSTM, compiled: bool = False):
        super().__init__(compiled)
        self.ref = ref

    @staticmethod
    def _step(xp_t, hc, W_hh):
        h, c = hc.chunk(2, dim=1)
        i, f, g, o = (xp_t + h @ W_hh.t()).chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return torch.cat([h, c], dim=1)

    def forward(self, x):
        T, B, I = x.shape
        r = self.ref
        xp = torch.addmm(r.bias_ih_l0 + r.bias_hh_l0, x.reshape(T * B, I), r.weight_ih_l0.t()).view(T, B, -1)
        hc = x.new_zeros(B, 2 * r.hidden_size)
        out, hc = self._run(xp, hc, r.weight_hh_l0)
        return out[..., :r.hidden_size], hc


class EagerGRU(torch_cells._Loop):
    """nn.GRU's equations ("reset after") as a loop, input projection hoisted."""

    def __init__(self, ref: nn.GRU, compiled: bool = False):
        super().__init__(compiled)
        self.ref = ref

    @staticmethod
    def _step(xp_t, h, W_hh, b_hh):
        x_r, x_z, x_n = xp_t.chunk(3, dim=1)
        h_r, h_z, h_n = torch.addmm(b_hh, h, W_hh.t()).chunk(3, dim=1)
        r, z = torch.sigmoid(x_r + h_r), torch.sigmoid(x_z + h_z)
        n = torch.tanh(x_n + r * h_n)
        return (1 - z) * n + z * h

    def forward(self, x):
        T, B, I = x.shape
        r = self.ref
        xp = torch.addmm(r.bias_ih_l0, x.reshape(T * B, I), r.weight_ih_l0.t()).view(T, B, -1)
        return self._run(xp, x.new_zeros(B, r.hidden_size), r.weight_hh_l0, r.bias_hh_l0)


def timed(fn, backward: bool, reps: int) -> tuple[float, int]:
    """Median milliseconds of fn (and backward through its output), and peak bytes allocated."""
    for _ in range(3):
        _run(fn, backward)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        _run(fn, backward)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), torch.cuda.max_memory_allocated() - base


def _run(fn, backward: bool):
    if backward:
        out = fn()
        out.float().sum().backward()
    else:
        with torch.no_grad():
            fn()


def peers(cell: str, T: int, B: int, I: int, H: int):
    """[(name, module)] for one cell: specc-Triton first, then its peers, all with the same weights."""
    dev = "cuda"
    if cell in ("lstm", "gru"):
        ref = (nn.LSTM if cell == "lstm" else nn.GRU)(I, H).to(dev)
        eager_cls = EagerLSTM if cell == "lstm" else EagerGRU
        return [("specc-triton", specc.from_torch(ref, backend="triton")), ("cudnn", ref),
                ("eager", eager_cls(ref)), ("torch.compile", eager_cls(ref, compiled=True))]
    ours = specc.load(cell, I=I, H=H, backend="triton").to(dev)
    return [("specc-triton", ours), ("eager", torch_cells.like(ours).to(dev)),
            ("torch.compile", torch_cells.like(ours, compiled=True).to(dev))]


SIZES = [(100, 64, 512, 512), (100, 64, 256, 256), (100, 64, 1024, 1024), (100, 1, 512, 512), (100, 16, 512, 512),
         (100, 256, 512, 512)]
# W of the second-order cell is H x I x H: the fastrnns sizes would need gigabytes of it.
CUSTOM_SIZES = {"second_order": [(100, 64, 64, 64), (100, 64, 128, 128)], "gru_cho": SIZES}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", default="lstm,gru,gru_cho,second_order")
    ap.add_argument("--quick", action="store_true", help="only the first size of each cell")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", help="also write the table as markdown here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/gpu.py needs a CUDA GPU; for the CPU see bench/cpu.py", file=sys.stderr)
        return 1
    header = ["cell", "T", "B", "I", "H", "impl", "fwd ms", "fwd ratio", "fwd+bwd ms", "fwd+bwd ratio",
              "tokens/s (fwd+bwd)", "peak MiB (fwd+bwd)"]
    rows = []
    for cell in args.cells.split(","):
        sizes = CUSTOM_SIZES.get(cell, SIZES)
        for T, B, I, H in sizes[:1] if args.quick else sizes:
            x = torch.randn(T, B, I, device="cuda")
            results = []
            for name, module in peers(cell, T, B, I, H):
                try:
                    f_ms, _ = timed(lambda: module(x)[0], False, args.reps)
                    xg = x.clone().requires_grad_()
                    b_ms, peak = timed(lambda: module(xg)[0], True, args.reps)
                    results.append((name, f_ms, b_ms, peak))
                except Exception as e:  # a peer that fails (torch.compile, say) is reported, not fatal
                    results.append((name, None, None, f"{type(e).__name__}: {str(e).splitlines()[0][:60]}"))
            base = next((r for r in results if r[0] == ("cudnn" if cell in ("lstm", "gru") else "eager")), None)
            for name, f_ms, b_ms, peak in results:
                if f_ms is None:
                    rows.append([cell, T, B, I, H, name, "failed", "", "", "", "", peak])
                    continue
                rows.append([cell, T, B, I, H, name, f"{f_ms:.3f}", f"{f_ms / base[1]:.2f}" if base[1] else "",
                             f"{b_ms:.3f}", f"{b_ms / base[2]:.2f}" if base[2] else "",
                             f"{T * B / (b_ms / 1e3):,.0f}", f"{peak / 2**20:.1f}"])
            for r in rows[-len(results):]:
                print(" | ".join(str(c) for c in r), flush=True)
    table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    table += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    print("\n".join(table))
    if args.out:
        note = (f"# specc on {torch.cuda.get_device_name()}\n\n- date: {datetime.date.today()}\n"
                f"- command: `python bench/gpu.py {' '.join(argv or sys.argv[1:])}`\n"
                f"- torch {torch.__version__}, triton {__import__('triton').__version__}, {platform.python_version()}\n"
                f"- ratios: time / cuDNN's for lstm and gru, time / eager loop's for the custom cells "
                f"(below 1.0 is faster)\n\n")
        Path(args.out).write_text(note + "\n".join(table) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
