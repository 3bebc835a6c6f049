"""Linear recurrences (issue 15): minGRU and QRNN compiled by specc against torch, CPU or GPU.

    python bench/scan.py                          # the default sizes on the CPU (a few minutes)
    python bench/scan.py --sizes 4096x8x256 --passes fb --markdown bench/results/scan-DATE.md
    python bench/scan.py --device cuda --sizes 1024x8x256,4096x8x256,4096x64x1024

Per cell, size (T x B x H, I = H) and pass (fwd: forward under no_grad; fb: forward + backward of
the sum of the outputs, input and parameters needing gradients), the median wall-clock time of:

  specc            specc.load(cell) on backend "auto" (the C loops or NumPy, whichever it timed faster;
                   on CUDA Triton, a cell whose states are all linear recurrences as one scan a pass)
  specc scan=False on CUDA: the same cell forced sequential (one launch of its step kernel a step)
  numpy (scan)     with --numpy: backend "numpy", its chunked scan (rt.linear_scan), and the same
  numpy scan=False   forced sequential (a Python loop over steps)
  torch loop       the same cell by hand in torch: the input products for all steps at once, then a
                   Python loop over time of the elementwise update (how people write it, with the
                   steps taken by unbind: indexing z[t] makes the backward quadratic in T)
  torch.compile    that loop with its step under torch.compile
  log-space scan   minGRU only: the parallel form of Feng et al. 2024 (their code's log_g and
                   logcumsumexp), which computes h~ through g (x + 0.5 above 0, sigmoid below), so
                   its values differ from the plain cell's; timed as the formulation people reach for

Ratios are each row's time over specc's, in the same run. One process, threads as torch sets them.
"""
from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import specc  # noqa: E402

SIZES = [(256, 8, 256), (4096, 8, 256), (16384, 8, 256), (256, 64, 256), (4096, 64, 256)]


def mingru_loop(x, p, step):
    z = torch.sigmoid(F.linear(x, p["W_z"], p["b_z"]))
    c = F.linear(x, p["W_h"], p["b_h"])
    h = x.new_zeros(x.shape[1], p["W_z"].shape[0])
    out = []
    for z_t, c_t in zip(z.unbind(0), c.unbind(0)):  # unbind: z[t]'s backward would write a whole z a step
        h = step(h, z_t, c_t)
        out.append(h)
    return torch.stack(out)


def mingru_step(h, z, c):
    return (1 - z) * h + z * c


def qrnn_loop(x, p, step):
    xp = torch.cat([torch.zeros_like(x[:1]), x[:-1]])
    zz, ff, oo = (F.linear(x, p["W"], p["b"]) + F.linear(xp, p["V"])).chunk(3, -1)
    z, f, o = torch.tanh(zz), torch.sigmoid(ff), torch.sigmoid(oo)
    c = x.new_zeros(x.shape[1], z.shape[-1])
    out = []
    for f_t, z_t, o_t in zip(f.unbind(0), z.unbind(0), o.unbind(0)):
        c = step(c, f_t, z_t)
        out.append(o_t * c)
    return torch.stack(out)


def qrnn_step(c, f, z):
    return f * c + (1 - f) * z


def mingru_log_space(x, p, step=None):
    """Feng et al. 2024, minGRU's parallel mode: log h_t by logcumsumexp over time."""
    k = F.linear(x, p["W_z"], p["b_z"])
    h_tilde = F.linear(x, p["W_h"], p["b_h"])
    log_z = -F.softplus(-k)
    log_coeffs = -F.softplus(k)
    log_values = log_z + torch.where(h_tilde >= 0, (F.relu(h_tilde) + 0.5).log(), -F.softplus(-h_tilde))
    a_star = log_coeffs.cumsum(0)
    return torch.exp(a_star + torch.logcumsumexp(log_values - a_star, 0))


CELLS = {"mingru": (mingru_loop, mingru_step, True), "qrnn": (qrnn_loop, qrnn_step, False)}


def timed(fn, min_time: float, device: str) -> float:
    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    fn()  # warm-up (compiles on first use)
    sync()
    times, end = [], time.perf_counter() + min_time
    while time.perf_counter() < end or len(times) < 3:
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def case(cell: str, T: int, B: int, H: int, passes, min_time: float, device: str = "cpu",
         numpy: bool = False) -> list[tuple]:
    loop, step, has_log = CELLS[cell]
    torch.manual_seed(0)
    m = specc.load(cell, I=H, H=H).to(device)
    params = {n: p.detach().clone().requires_grad_() for n, p in m.named_parameters()}
    x = torch.randn(T, B, H, device=device)
    compiled = torch.compile(step)
    impls = [("specc", lambda x: m(x)[0])]
    if device == "cuda":
        sequential = specc.load(cell, I=H, H=H, scan=False).to(device)
        sequential.load_state_dict(m.state_dict())
        impls.append(("specc scan=False", lambda x: sequential(x)[0]))
    if numpy:
        for scan in (True, False):
            other = specc.load(cell, I=H, H=H, backend="numpy", scan=scan)
            other.load_state_dict(m.state_dict())
            impls.append((f"numpy{'' if scan else ' scan=False'}", lambda x, other=other: other(x)[0]))
    impls += [("torch loop", lambda x: loop(x, params, step)),
              ("torch.compile step", lambda x: loop(x, params, compiled))]
    if has_log:
        impls.append(("log-space scan", lambda x: mingru_log_space(x, params)))
    rows = []
    for kind in passes:
        base = None
        for name, f in impls:
            if kind == "fwd":
                def run(f=f):
                    with torch.no_grad():
                        f(x)
            else:
                xg = x.clone().requires_grad_()

                def run(f=f, xg=xg):
                    f(xg).sum().backward()
            t = timed(run, min_time, device)
            base = base or t
            rows.append((cell, f"{T}x{B}x{H}", kind, name, 1e3 * t, t / base,
                         m.backend_choice.split(":")[0] if name.startswith("specc") else ""))
            print(f"{cell} {T}x{B}x{H} {kind} {name}: {1e3 * t:.1f} ms ({t / base:.2f}x specc's)", flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cells", default="mingru,qrnn")
    ap.add_argument("--sizes", default=",".join(f"{T}x{B}x{H}" for T, B, H in SIZES))
    ap.add_argument("--passes", default="fwd,fb")
    ap.add_argument("--min-time", type=float, default=1.0)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--numpy", action="store_true", help="also the NumPy backend, scan and scan=False")
    ap.add_argument("--markdown", help="also write the table to this file")
    args = ap.parse_args(argv)
    rows = []
    for cell in args.cells.split(","):
        for size in args.sizes.split(","):
            T, B, H = map(int, size.split("x"))
            rows += case(cell, T, B, H, args.passes.split(","), args.min_time, args.device, args.numpy)
    lines = ["| cell | T×B×H | pass | implementation | median ms | time / specc's | specc's backend |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {c} | {s} | {k} | {n} | {ms:.1f} | {r:.2f} | {b} |" for c, s, k, n, ms, r, b in rows]
    table = "\n".join(lines)
    print(table)
    if args.markdown:
        machine = (torch.cuda.get_device_name() if args.device == "cuda"
                   else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads")
        head = (f"# Linear recurrences on the {args.device.upper()}: specc against torch (issue 15), "
                f"{datetime.date.today()}\n\n"
                f"- machine: {machine}\n"
                f"- software: Python {platform.python_version()}, torch {torch.__version__}\n"
                f"- command: `python bench/scan.py {' '.join(argv if argv is not None else sys.argv[1:])}`\n\n")
        Path(args.markdown).write_text(head + table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
