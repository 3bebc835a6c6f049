"""A one-line progress bar: steps, loss, throughput, time left. Plain log lines when not a terminal."""
from __future__ import annotations

import sys
import time


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60:d}:{seconds % 60:02d}"


class Progress:
    def __init__(self, total_steps: int | None, time_limit: float | None, start_step: int = 0,
                 unit: str = "tok", stream=None, every: int = 50, enabled: bool | None = None):
        self.total, self.time_limit, self.unit = total_steps, time_limit, unit
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if enabled is None else enabled
        self.every = every
        self.start = self.last_draw = time.perf_counter()
        self.start_step = start_step
        self.items = 0
        self.smooth = None  # the loss shown: an exponential moving average over ~20 steps

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
        now = time.perf_counter()
        elapsed = now - self.start
        rate = self.items / elapsed if elapsed > 0 else 0.0
        frac = self.fraction(step)
        eta = elapsed * (1 - frac) / frac if frac > 0 else 0.0
        total = f"/{self.total}" if self.total else ""
        text = (f"step {step}{total}  loss {self.smooth:.4f}  {rate:,.0f} {self.unit}/s  "
                f"{_clock(elapsed)}<{_clock(eta)}" + (f"  {note}" if note else ""))
        if self.tty:
            if now - self.last_draw >= 0.1 or frac >= 1.0:
                width = 24
                filled = int(frac * width)
                bar = "█" * filled + "·" * (width - filled)
                self.stream.write(f"\r{int(frac * 100):3d}% {bar} {text}\x1b[K")
                self.stream.flush()
                self.last_draw = now
        elif step % self.every == 0:
            self.stream.write(text + "\n")
            self.stream.flush()

    def message(self, text: str) -> None:
        """A line of its own, above the bar."""
        self.stream.write(("\r\x1b[K" if self.tty else "") + text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
