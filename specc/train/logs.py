"""The run's metrics as data: `metrics.csv` beside the checkpoint (one row a step: the training
loss, and the evaluation's metrics at the steps it ran), rewritten whole at each checkpoint, and
TensorBoard's event files under `tensorboard/` when the tensorboard package is installed."""
from __future__ import annotations

import csv
import io
from pathlib import Path

from ..atomic import write_atomically


def write_metrics_csv(path: str | Path, history: list[float], evals: list[tuple[int, dict]]) -> None:
    at = {step: m for step, m in evals}
    keys = sorted({k for _, m in evals for k in m})
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["step", "train_loss", *(f"eval_{k}" for k in keys)])
    for step, loss in enumerate(history, 1):
        m = at.get(step, {})
        w.writerow([step, f"{loss:.6g}", *(f"{m[k]:.6g}" if k in m else "" for k in keys)])
    data = buf.getvalue().encode("utf-8")
    write_atomically(path, lambda f: f.write(data))


class TensorBoard:
    """Scalars to TensorBoard if it is installed; nothing otherwise."""

    def __init__(self, folder: Path | None):
        self.writer = None
        if folder is None:  # not the main process
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # torch's writer needs the tensorboard package
            return
        self.writer = SummaryWriter(str(folder))

    def step(self, step: int, loss: float) -> None:
        if self.writer is not None:
            self.writer.add_scalar("train/loss", loss, step)

    def eval(self, step: int, metrics: dict) -> None:
        if self.writer is not None:
            for k, v in metrics.items():
                self.writer.add_scalar(f"eval/{k}", v, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
