"""The loss curve (loss.png), drawn with matplotlib: the training loss of every step, its running
mean, and the evaluation loss at each evaluation, marked; a log scale when the loss spans more
than a decade."""
from __future__ import annotations

import io
import math
from pathlib import Path

from ..atomic import write_atomically


def loss_figure(train: list[tuple[int, float]], evals: list[tuple[int, float]], title: str = "", ylabel: str = "loss"):
    """A matplotlib Figure of the curves (not drawn on any screen: no pyplot, no global state)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(8, 4.8), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    train = [(s, v) for s, v in train if math.isfinite(v)]
    evals = [(s, v) for s, v in evals if math.isfinite(v)]
    if train:
        steps, losses = zip(*train)
        window = max(1, len(losses) // 50)
        ax.plot(steps, losses, color="tab:blue", alpha=0.3 if window > 1 else 1.0, linewidth=0.8 if window > 1 else 1.5,
                marker="" if len(losses) > 1 else ".", label="training loss (each step)")
        if window > 1:  # the trend under the noise of single batches
            run, mean = 0.0, []
            for k, v in enumerate(losses):
                run += v - (losses[k - window] if k >= window else 0.0)
                mean.append(run / min(k + 1, window))
            ax.plot(steps, mean, color="tab:blue", linewidth=1.8, label=f"training loss (mean of {window} steps)")
    if evals:
        steps, losses = zip(*evals)
        ax.plot(steps, losses, color="tab:orange", marker="o", markersize=5, linewidth=1.5, label="evaluation loss")
    values = [v for _, v in train + evals]
    if values and min(values) > 0 and max(values) / min(values) > 10:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    ax.set_title(title or "loss")
    ax.grid(True, alpha=0.3)
    if values:
        ax.legend(loc="best")
    return fig


def write_loss_curve(path: str | Path, train, evals, title: str = "", ylabel: str = "loss") -> None:
    buf = io.BytesIO()
    loss_figure(train, evals, title, ylabel).savefig(buf, format="png")
    data = buf.getvalue()
    write_atomically(path, lambda f: f.write(data))
