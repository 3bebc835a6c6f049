"""The progress bar of training: tqdm's, on a terminal; plain log lines every `every` steps when
not (a log file, CI). The same lines, and the evaluations, go to `log` (out/train.log) either way. The fraction done is the larger of steps and time against their limits, so a
run bounded by train.time_limit fills the bar too."""
from __future__ import annotations

import sys
import time


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60:d}:{seconds % 60:02d}"


class Progress:
    def __init__(self, total_steps: int | None, time_limit: float | None, start_step: int = 0,
                 unit: str = "tok", stream=None, every: int = 50, enabled: bool | None = None, log=None):
        self.total, self.time_limit, self.unit = total_steps, time_limit, unit
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if enabled is None else enabled
        self.every = every
        self.log = open(log, "a", encoding="utf-8") if log is not None else None
        self.start = time.perf_counter()
        self.start_step = start_step
        self.items = 0
        self.smooth = None  # the loss shown: an exponential moving average over ~20 steps
        self.bar = None
        if self.tty:
            import shutil

            from tqdm import tqdm

            # Thousandths of the run, so that a time limit and a step count share one bar. The size
            # from shutil, which falls back to 100 x 20 where the terminal says 0 x 0 (tqdm would then
            # draw nothing: a bar below the last of 0 rows is hidden).
            size = shutil.get_terminal_size((100, 20))
            self.bar = tqdm(total=1000, file=self.stream, bar_format="{percentage:3.0f}% |{bar:24}| {desc}",
                            mininterval=0.1, ncols=size.columns, nrows=size.lines, leave=True)

    def fraction(self, step: int) -> float:
        parts = []
        if self.total:
            parts.append((step - self.start_step) / max(self.total - self.start_step, 1))
        if self.time_limit:
            parts.append((time.perf_counter() - self.start) / self.time_limit)
        return min(max(parts), 1.0) if parts else 0.0

    def update(self, step: int, loss: float, items: int, note: str = "") -> None:
        self.items += items
        self.smooth = loss if self.smooth is None else 0.95 * self.smooth + 0.05 * loss
        elapsed = time.perf_counter() - self.start
        rate = self.items / elapsed if elapsed > 0 else 0.0
        frac = self.fraction(step)
        eta = elapsed * (1 - frac) / frac if frac > 0 else 0.0
        total = f"/{self.total}" if self.total else ""
        text = (f"step {step}{total}  loss {self.smooth:.4f}  {rate:,.0f} {self.unit}/s  "
                f"{_clock(elapsed)}<{_clock(eta)}" + (f"  {note}" if note else ""))
        if self.bar is not None:
            self.bar.set_description_str(text, refresh=False)
            self.bar.update(max(int(frac * 1000) - self.bar.n, 0))
        elif step % self.every == 0:
            self.stream.write(text + "\n")
            self.stream.flush()
        if self.log is not None and step % self.every == 0:
            self.log.write(text + "\n")

    def message(self, text: str) -> None:
        """A line of its own, above the bar."""
        if self.log is not None:
            self.log.write(text + "\n")
            self.log.flush()
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.log is not None:
            self.log.close()
