"""specc's Triton backend against cuDNN, torch eager and torch.compile, on one GPU.

    python bench/gpu.py                      # the whole table (about ten minutes on an H100)
    python bench/gpu.py --quick              # one size per cell
    python bench/gpu.py --out bench/results/gpu-YYYY-MM-DD.md
    python bench/gpu.py --tiles 16x64x32,32x32x32    # also specc with other tiles (BLOCK_B x BLOCK_F x BLOCK_K)
    python bench/gpu.py --tf32 --graphed --skip torch.compile
    python bench/gpu.py --warps 1,2,8                # also specc with other numbers of warps a program

For LSTM and GRU at the sizes of PyTorch's fastrnns benchmarks (seq 100, batch 64, input =
hidden = 512; hidden 256 and 1024; batch 1, 16 and 256): forward (under no_grad) and forward +
backward time, tokens/s and peak memory of specc-Triton, cuDNN (nn.LSTM / nn.GRU), the same cell
as a torch-eager loop, and that loop's step under torch.compile; ratios against cuDNN in the same
run. For second_order and gru_cho (no cuDNN layer) the ratios are against the eager loop.
Times are medians of CUDA-event-timed runs after warm-up. cuDNN runs as torch configures it by
default (TF32 tensor cores allowed); "cudnn-fp32" is the same layer with TF32 off, as specc's
kernels multiply in float32 by default (`input_precision="ieee"`); "specc-triton tf32" runs under
`torch.set_float32_matmul_precision("high")`, where they use TF32. "specc-triton graphed" replays the pass
captured as a CUDA graph: the time left without the CPU's launch work (its peak memory is not
measured).

The table is written after every size, and sizes are taken in rounds (the first size of every
cell, then the second, ...), so a run cut short still has a row for each cell.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import platform
import statistics
import sys
from dataclasses import dataclass
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


@contextlib.contextmanager
def tf32(allowed: bool):
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = before


@dataclass(frozen=True)
class Variant:
    """specc run otherwise than by default: another tile ("16x64x32": BLOCK_B x BLOCK_F x BLOCK_K),
    TF32 products, another number of warps a program, or replayed as a CUDA graph."""
    tile: str | None = None
    tf32: bool = False
    warps: int | None = None
    graphed: bool = False
    persistent: bool = False  # the whole time loop as one kernel a pass (the generated module's PERSISTENT)
    tuned: bool = False  # the launch plan timed on first use (TUNE; specc/backends/tuning.py), not in the time

    def label(self) -> str:
        parts = [self.tile, "tf32" if self.tf32 else None, f"{self.warps} warps" if self.warps else None,
                 "graphed" if self.graphed else None, "persistent" if self.persistent else None,
                 "tuned" if self.tuned else None]
        return " ".join(["specc-triton", *(p for p in parts if p)])


@contextlib.contextmanager
def launched_on(module, variant: Variant | None):
    """specc's kernels as `variant` says. The tile and the warps are globals of the generated
    module, which every module of the cell shares: put back after."""
    if variant is None:
        yield
        return
    prog, precision = module.program, torch.get_float32_matmul_precision()
    before = prog.TILES, prog.NUM_WARPS, prog.PERSISTENT, prog.grid_slices, prog.TUNE
    prog.TUNE = variant.tuned
    prog.TILES = tuple(int(n) for n in variant.tile.split("x")) if variant.tile else None
    prog.NUM_WARPS = variant.warps or prog.NUM_WARPS
    prog.PERSISTENT = variant.persistent
    chose = before[3]

    def grid_slices(B, features, BLOCK_B, dev):  # a row labelled persistent must have run so
        slices = chose(B, features, BLOCK_B, dev)
        if variant.persistent and not slices:
            raise ValueError(f"not run: {features} features in slices need more programs than the GPU holds")
        return slices

    prog.grid_slices = grid_slices
    torch.set_float32_matmul_precision("high" if variant.tf32 else "highest")
    try:
        yield
    finally:
        prog.TILES, prog.NUM_WARPS, prog.PERSISTENT, prog.grid_slices, prog.TUNE = before
        torch.set_float32_matmul_precision(precision)


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


def timed_graph(fn, backward: bool, reps: int) -> tuple[float, int]:
    """timed(), with fn (and its backward) captured once as a CUDA graph and replayed: what is left
    when the CPU's launch work is taken out of the time."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            _run(fn, backward)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _run(fn, backward)
    return timed(graph.replay, None, reps)


def _run(fn, backward: bool | None):
    if backward is None:
        return fn()
    if backward:
        out = fn()
        out.float().sum().backward()
    else:
        with torch.no_grad():
            fn()


def peers(cell: str, T: int, B: int, I: int, H: int, variants: list[Variant], head: int = 32):
    """[(name, make module, TF32 allowed in cuDNN, specc variant)] for one cell: specc-Triton
    first (as it runs by default, then each of `variants`), then its peers, all with the same weights."""
    dev = "cuda"
    if cell in ("lstm", "gru"):
        ref = (nn.LSTM if cell == "lstm" else nn.GRU)(I, H).to(dev)
        ours = specc.from_torch(ref, backend="triton")
        eager_cls = EagerLSTM if cell == "lstm" else EagerGRU
        others = [("cudnn", lambda: ref, True, None), ("cudnn-fp32", lambda: ref, False, None),
                  ("eager", lambda: eager_cls(ref), True, None),
                  ("torch.compile", lambda: eager_cls(ref, compiled=True), True, None)]
    else:
        dims = dict(I=I, N=H // head, D=head) if cell == "multihead_lstm" else dict(I=I, H=H)
        ours = specc.load(cell, **dims, backend="triton").to(dev)
        others = [("eager", lambda: torch_cells.like(ours).to(dev), True, None),
                  ("torch.compile", lambda: torch_cells.like(ours, compiled=True).to(dev), True, None)]
    mine = [(v.label(), lambda: ours, True, v) for v in variants]
    return [("specc-triton", lambda: ours, True, None)] + mine + others


SIZES = [(100, 64, 512, 512), (100, 64, 256, 256), (100, 64, 1024, 1024), (100, 1, 512, 512), (100, 16, 512, 512),
         (100, 256, 512, 512)]
# W of the second-order cell is H x I x H: the fastrnns sizes would need gigabytes of it.
CUSTOM_SIZES = {"second_order": [(100, 64, 64, 64), (100, 64, 128, 128)], "gru_cho": SIZES,
                # FlashRNN's size (T = 1024, B = 16, H = 768), and the fastrnns one
                "multihead_lstm": [(1024, 16, 768, 768), (100, 64, 512, 512)]}


def measure(cell, T, B, I, H, variants, skip, reps, head=32) -> list[list]:
    torch._dynamo.reset()  # torch.compile's step would hit its recompile limit after eight sizes
    x = torch.randn(T, B, I, device="cuda")
    results = []
    for name, make, allow_tf32, variant in peers(cell, T, B, I, H, variants, head):
        if name in skip:
            continue
        try:
            module = make()
            time = timed_graph if variant and variant.graphed else timed
            with tf32(allow_tf32), launched_on(module, variant):
                f_ms, _ = time(lambda: module(x)[0], False, reps)
                xg = x.clone().requires_grad_()
                b_ms, peak = time(lambda: module(xg)[0], True, reps)
            results.append((name, f_ms, b_ms, peak))
        except Exception as e:  # a peer that fails (torch.compile, say) is reported, not fatal
            results.append((name, None, None, f"{type(e).__name__}: {str(e).splitlines()[0][:60]}"))
    base = next((r for r in results if r[0] == ("cudnn" if cell in ("lstm", "gru") else "eager")), None)
    rows = []
    for name, f_ms, b_ms, peak in results:
        if f_ms is None or base is None or base[1] is None:
            rows.append([cell, T, B, I, H, name, "failed" if f_ms is None else f"{f_ms:.3f}", "", "", "", "",
                         peak if f_ms is None else f"{peak / 2**20:.1f}"])
        else:
            rows.append([cell, T, B, I, H, name, f"{f_ms:.3f}", f"{f_ms / base[1]:.2f}",
                         f"{b_ms:.3f}", f"{b_ms / base[2]:.2f}", f"{T * B / (b_ms / 1e3):,.0f}",
                         f"{peak / 2**20:.1f}"])
        print(" | ".join(str(c) for c in rows[-1]), flush=True)
    return rows


def markdown(header, rows) -> str:
    table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(table + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def write(path, header, rows, argv) -> None:
    note = (f"# specc on {torch.cuda.get_device_name()}\n\n- date: {datetime.date.today()}\n"
            f"- command: `python bench/gpu.py {' '.join(argv or sys.argv[1:])}`\n"
            f"- torch {torch.__version__}, triton {__import__('triton').__version__}, "
            f"Python {platform.python_version()}\n"
            f"- ratios: time / cuDNN's (TF32 allowed, torch's default) for lstm and gru, time / the eager "
            f"loop's for the custom cells (below 1.0 is faster); times are medians in milliseconds\n\n")
    Path(path).write_text(note + markdown(header, rows) + "\n", encoding="utf-8")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", default="lstm,gru,gru_cho,second_order,multihead_lstm")
    ap.add_argument("--quick", action="store_true", help="only the first size of each cell")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--tiles", default="", help="comma-separated BLOCK_BxBLOCK_FxBLOCK_K tiles to time specc with too")
    ap.add_argument("--tf32", action="store_true", help="also time specc with TF32 products (its tiles and --tiles)")
    ap.add_argument("--graphed", action="store_true", help="also time specc replayed as a CUDA graph")
    ap.add_argument("--warps", default="", help="comma-separated numbers of warps a program to time specc with too")
    ap.add_argument("--sizes", default="", help="comma-separated TxBxIxH, instead of each cell's sizes")
    ap.add_argument("--persistent", action="store_true",
                    help="also time specc with the whole time loop as one kernel a pass (PERSISTENT)")
    ap.add_argument("--tune", action="store_true",
                    help="also time specc with its launch plan chosen by measurement on first use (TUNE)")
    ap.add_argument("--head", type=int, default=32,
                    help="features a head of multihead_lstm (FlashRNN's Triton kernel: 3.47 / 4.1 ms forward + "
                         "backward at heads of 16 / 32, H = 768, T = 1024, B = 16, bf16, H100)")
    ap.add_argument("--skip", default="", help="comma-separated peers not to run (e.g. torch.compile)")
    ap.add_argument("--out", help="also write the table as markdown here (after every size)")
    args = ap.parse_args(argv)
    tiles = [t for t in args.tiles.split(",") if t]
    variants = [Variant(tile=t) for t in tiles] + [Variant(graphed=True)] * args.graphed
    variants += [Variant(warps=int(n)) for n in args.warps.split(",") if n]
    variants += [Variant(persistent=True), Variant(persistent=True, tf32=True)] if args.persistent else []
    variants += [Variant(tuned=True), Variant(tuned=True, tf32=True)] if args.tune else []
    variants += [Variant(tile=t, tf32=True) for t in [None, *tiles]] if args.tf32 else []
    skip = set(args.skip.split(","))
    if not torch.cuda.is_available():
        print("bench/gpu.py needs a CUDA GPU; for the CPU see bench/cpu.py", file=sys.stderr)
        return 1
    header = ["cell", "T", "B", "I", "H", "impl", "fwd ms", "fwd ratio", "fwd+bwd ms", "fwd+bwd ratio",
              "tokens/s (fwd+bwd)", "peak MiB (fwd+bwd)"]
    rows = []
    cells = args.cells.split(",")
    given = [tuple(int(n) for n in size.split("x")) for size in args.sizes.split(",") if size]
    todo = {cell: (given or CUSTOM_SIZES.get(cell, SIZES))[:1 if args.quick else None] for cell in cells}
    for k in range(max(len(sizes) for sizes in todo.values())):
        for cell in cells:
            if k >= len(todo[cell]):
                continue
            T, B, I, H = todo[cell][k]
            rows += measure(cell, T, B, I, H, variants, skip, args.reps, args.head)
            if args.out:
                write(args.out, header, sorted(rows, key=lambda r: cells.index(r[0])), argv)
    print(markdown(header, sorted(rows, key=lambda r: cells.index(r[0]))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
