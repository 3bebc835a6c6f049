"""Long differential runs: `python -m specc.fuzz --cells 10000 --backends numpy,c,triton`.

Draws cells with hypothesis (specc/fuzz/gen.py), runs each on every backend against the reference
(specc/fuzz/run.py), and prints a summary: cells run, mismatches and crashes per backend and mode,
and for each kind of finding the smallest cell that showed it. Unlike the test in CI it goes on
after a finding, so one run counts everything. Exit status 1 when anything was found.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections import Counter


def _kind(finding) -> str:
    """A finding with its numbers and names taken out, so that one bug counts as one kind."""
    what = re.sub(r"(d |output |final )\S+", r"\1_", finding.what)
    what = re.sub(r"<specc [^>]*>", "<module>", what)
    what = re.sub(r"/\S+/", "", what)  # a cached library's path
    what = re.sub(r"\d+", "N", what.splitlines()[0] if what else what)[:160]
    return f"[{finding.backend} {finding.mode}] {what}"


def _skip_interpreter_overflow_checks() -> None:
    """The interpreter checks every int32 add and multiply of a kernel's index arithmetic for
    overflow, which is a third of a run's time; a fuzz cell's indices stay below 2**16, so the
    check cannot fire. A GPU build drops it anyway unless compiled with debug."""
    try:
        import dataclasses

        from triton.runtime import interpreter
    except ImportError:
        return
    b = interpreter.interpreter_builder
    b.options = dataclasses.replace(b.options, sanitize_overflow=False)


class _OutOfTime(BaseException):
    """--minutes are up. A BaseException, not an Exception: hypothesis lets it through at once
    instead of taking it for a finding and shrinking the cell."""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m specc.fuzz", description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, default=300, help="how many cells to draw (default 300)")
    ap.add_argument("--backends", default="numpy,c,triton", help="comma-separated (default numpy,c,triton)")
    ap.add_argument("--seed", type=int, default=0, help="hypothesis's seed (default 0)")
    ap.add_argument("--show", type=int, default=1, help="cells shown per kind of finding (default 1)")
    ap.add_argument("--minutes", type=float, default=None,
                    help="stop drawing cells after this long and print the summary of those run")
    ap.add_argument("--shrink", metavar="TEXT", help="stop at the first finding whose text contains TEXT "
                    "and let hypothesis shrink its cell to a minimal one")
    args = ap.parse_args(argv)
    if "triton" in args.backends:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        _skip_interpreter_overflow_checks()
    try:
        from hypothesis import HealthCheck, given, seed, settings
    except ImportError:
        print("python -m specc.fuzz needs hypothesis: pip install -e '.[test]'", file=sys.stderr)
        return 2
    from .gen import cells
    from .run import differences

    backends = tuple(b for b in args.backends.split(",") if b)
    counts: Counter = Counter()
    per_mode: Counter = Counter()
    examples: dict[str, list] = {}
    start = time.time()

    @seed(args.seed)
    @settings(max_examples=args.cells, database=None, deadline=None, derandomize=False,
              suppress_health_check=list(HealthCheck))
    @given(cells())
    def one(cell):
        if args.minutes is not None and time.time() - start > 60 * args.minutes:
            raise _OutOfTime  # not `return`: hypothesis would go on drawing up to --cells cells, unrun
        counts["cells"] += 1
        found = differences(cell.text, cell.dims, backends, seed=counts["cells"])
        if args.shrink is not None and any(args.shrink in str(f) for f in found):
            raise AssertionError("\n".join(str(f) for f in found))
        if found:
            counts["cells with findings"] += 1
        if found:  # as they come, so that a long run's findings can be looked at before it ends
            print(f"finding in cell {counts['cells']}: {found[0]}\n{cell!r}", file=sys.stderr, flush=True)
        for f in found:
            per_mode[(f.backend, f.mode, "crash" if f.error != f.error else "mismatch")] += 1
            shown = examples.setdefault(_kind(f), [])
            shown.append((len(cell.text), cell, str(f)))
        if counts["cells"] % 100 == 0:
            print(f"... {counts['cells']} cells, {counts['cells with findings']} with findings, "
                  f"{time.time() - start:.0f} s", file=sys.stderr, flush=True)

    try:
        one()
    except AssertionError as e:  # --shrink: hypothesis has printed the minimal cell
        print(f"\nthe smallest cell found shows:\n{e}")
        return 1
    except _OutOfTime:
        pass
    elapsed = time.time() - start
    stopped = args.minutes is not None and counts["cells"] < args.cells
    print(f"cells: {counts['cells']}{' (stopped at --minutes)' if stopped else ''}  "
          f"backends: {', '.join(backends)}  seed: {args.seed}  "
          f"time: {elapsed:.0f} s ({elapsed / max(counts['cells'], 1):.2f} s a cell)")
    print(f"cells with findings: {counts['cells with findings']}")
    for (backend, mode, what), n in sorted(per_mode.items()):
        print(f"  {backend:7} {mode:9} {what:9} {n}")
    for kind, shown in sorted(examples.items(), key=lambda kv: -len(kv[1])):
        print(f"\n## {len(shown)} x {kind}")
        for _, cell, text in sorted(shown, key=lambda s: s[0])[:args.show]:
            print(f"  {text}\n  dims {cell.dims}\n" + "".join(f"    {line}\n" for line in cell.text.splitlines()))
    return 1 if counts["cells with findings"] else 0


if __name__ == "__main__":
    sys.exit(main())
