"""Built-in tasks and their data, all generated or bundled (no network).

A task says what goes in and what comes out (`inputs`: "tokens" or "vector", `n_in`, `n_out`,
`loss`: "ce" or "mse") and hands out batches. A Batch holds x (T, B) token ids or (T, B, F) values,
y (T, B) token ids or (T, B, O) values, and mask (T, B): the positions that count.

Stream tasks (`corpus`, `hello`) are one long token stream read in chunks for truncated BPTT;
the others generate fresh sequences from a numpy Generator.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

BUNDLED_CORPUS = Path(__file__).resolve().parent.parent / "data" / "tinyshakespeare.txt"


@dataclass
class Batch:
    x: torch.Tensor
    y: torch.Tensor
    mask: torch.Tensor
    extra: dict = field(default_factory=dict)  # per-task extras for evaluation (e.g. legal next symbols)

    def to(self, device) -> "Batch":
        return Batch(self.x.to(device), self.y.to(device), self.mask.to(device),
                     {k: v.to(device) for k, v in self.extra.items()})

    def columns(self, lo: int, hi: int) -> "Batch":
        """Sequences lo..hi-1 of the batch (one process's share under DDP)."""
        pick = lambda t: t[:, lo:hi]
        return Batch(pick(self.x), pick(self.y), pick(self.mask), {k: pick(v) for k, v in self.extra.items()})


class Task:
    name = "task"
    stream = False
    inputs = "tokens"  # or "vector"
    loss = "ce"  # or "mse"
    vocab: list[str] | None = None
    OPTIONS: dict = {}  # option name -> (allowed types, default)
    LIMITS: dict = {}  # option name -> (test of its value, what the value must be)

    def __init__(self, **options):
        self.options = options

    def batch(self, rng: np.random.Generator, size: int) -> Batch:  # generated tasks
        raise NotImplementedError

    def metrics(self, model, batches: list[Batch]) -> dict:
        """Task-specific measures on evaluation batches, beyond the loss."""
        return {}


def _tokens(seqs: list[list[int]], pad: int = 0):
    """Pad token sequences to one length: x (T, B), y (T, B) the next token, mask (T, B)."""
    T = max(len(s) for s in seqs) - 1
    x = np.full((T, len(seqs)), pad, dtype=np.int64)
    y = np.full((T, len(seqs)), pad, dtype=np.int64)
    mask = np.zeros((T, len(seqs)), dtype=bool)
    for b, s in enumerate(seqs):
        n = len(s) - 1
        x[:n, b], y[:n, b], mask[:n, b] = s[:-1], s[1:], True
    return torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(mask)


# ---------------------------------------------------------------- language modelling on a stream


class CorpusTask(Task):
    """Next-character prediction on a text file (by default the bundled Tiny Shakespeare)."""
    name = "corpus"
    stream = True
    OPTIONS = {"path": ((str, type(None)), None), "val_fraction": ((float,), 0.1)}
    LIMITS = {"val_fraction": (lambda v: 0 < v < 1, "between 0 and 1 (some text to train on, some to evaluate on)")}

    def __init__(self, path=None, val_fraction=0.1, text: str | None = None):
        super().__init__(path=path, val_fraction=val_fraction)
        if text is None:
            text = Path(path or BUNDLED_CORPUS).read_text(encoding="utf-8")
        self.vocab = sorted(set(text))
        self.index = {ch: k for k, ch in enumerate(self.vocab)}
        ids = np.array([self.index[ch] for ch in text], dtype=np.int64)
        split = len(ids) - int(len(ids) * val_fraction)
        self.train_ids, self.val_ids = ids[:split], ids[split:]
        self.n_in = self.n_out = len(self.vocab)

    def encode(self, text: str) -> list[int]:
        unknown = sorted(set(text) - set(self.index))
        if unknown:
            raise ValueError(f"characters not in the vocabulary: {''.join(unknown)!r}")
        return [self.index[ch] for ch in text]


class HelloTask(CorpusTask):
    """"hello" repeated: after h-e-l-l the next letter is o, after h-e-l it is l (needs memory)."""
    name = "hello"
    OPTIONS = {"repeats": ((int,), 200)}
    LIMITS = {"repeats": (lambda v: v >= 2, "at least 2")}

    def __init__(self, repeats=200):
        super().__init__(text="hello" * repeats, val_fraction=0.2)
        self.options = {"repeats": repeats}


class Stream:
    """B parallel read heads over a token stream, k steps per chunk (truncated BPTT).

    The stream is cut into B equal segments; chunk i covers steps i*k .. i*k+k of every segment.
    `next()` returns (batch, fresh): fresh is True at the start of an epoch, when carried state
    must be reset. The position is all there is to save and restore.
    """

    def __init__(self, ids: np.ndarray, batch: int, k: int):
        self.seg = (len(ids) - 1) // batch
        if self.seg < k:
            raise ValueError(f"the stream ({len(ids)} tokens) is too short for {batch} segments of at least {k} steps")
        self.ids, self.B, self.k = torch.from_numpy(ids), batch, k
        self.chunks_per_epoch = self.seg // k
        self.chunk, self.epoch = 0, 0

    def state_dict(self) -> dict:
        return {"chunk": self.chunk, "epoch": self.epoch}

    def load_state_dict(self, d: dict) -> None:
        self.chunk, self.epoch = d["chunk"], d["epoch"]

    def next(self) -> tuple[Batch, bool]:
        if self.chunk == self.chunks_per_epoch:
            self.chunk, self.epoch = 0, self.epoch + 1
        fresh = self.chunk == 0
        start = torch.arange(self.B) * self.seg + self.chunk * self.k
        pos = start.unsqueeze(0) + torch.arange(self.k).unsqueeze(1)  # (k, B)
        self.chunk += 1
        x, y = self.ids[pos], self.ids[pos + 1]
        return Batch(x, y, torch.ones_like(x, dtype=torch.bool)), fresh


class Generated:
    """Fresh batches from a task's generator; the generator's state is all there is to save."""

    def __init__(self, task: Task, batch: int, seed: int):
        self.task, self.B = task, batch
        self.rng = np.random.default_rng(seed)
        self.epoch = 0

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, d: dict) -> None:
        self.rng.bit_generator.state = d["rng"]

    def next(self) -> tuple[Batch, bool]:
        return self.task.batch(self.rng, self.B), True


# ---------------------------------------------------------------- Reber grammars

REBER_SYMBOLS = "BTPSXVE"
_SYM = {s: k for k, s in enumerate(REBER_SYMBOLS)}
# Reber (1967) as drawn by Cleeremans et al. (1989): node -> [(symbol, next node)]; node 5 emits E.
REBER_GRAPH = {0: [("T", 1), ("P", 2)], 1: [("S", 1), ("X", 3)], 2: [("T", 2), ("V", 4)],
               3: [("X", 2), ("S", 5)], 4: [("P", 3), ("V", 5)], 5: [("E", None)]}


def reber_string(rng: np.random.Generator) -> tuple[str, list[set[str]]]:
    """A Reber string B...E, each transition taken with probability 1/2, and after each of its
    symbols but the last the set of symbols that may legally follow."""
    out, legal, node = ["B"], [{"T", "P"}], 0
    while node is not None:
        choices = REBER_GRAPH[node]
        sym, node = choices[rng.integers(len(choices))]
        out.append(sym)
        if node is not None:
            legal.append({s for s, _ in REBER_GRAPH[node]})
    return "".join(out), legal


def embedded_reber_string(rng: np.random.Generator) -> tuple[str, list[set[str]]]:
    """B, T or P, a Reber string, the same T or P again, E (Hochreiter & Schmidhuber 1997): the
    second-to-last symbol can only be predicted by remembering the second."""
    branch = "TP"[rng.integers(2)]
    inner, inner_legal = reber_string(rng)
    return "B" + branch + inner + branch + "E", [{"T", "P"}, {"B"}] + inner_legal + [{branch}, {"E"}]


class ReberTask(Task):
    """Predict the next symbol of Reber strings; judged on the sets of legal next symbols."""
    name = "reber"
    generate = staticmethod(reber_string)
    n_in = n_out = len(REBER_SYMBOLS)
    vocab = list(REBER_SYMBOLS)
    OPTIONS = {"threshold": ((float,), 0.3)}
    LIMITS = {"threshold": (lambda v: 0 < v < 1, "between 0 and 1")}

    def __init__(self, threshold=0.3):
        super().__init__(threshold=threshold)
        self.threshold = threshold

    def batch(self, rng, size):
        strings = [self.generate(rng) for _ in range(size)]
        x, y, mask = _tokens([[_SYM[c] for c in s] for s, _ in strings])
        legal = torch.zeros(x.shape + (self.n_out,), dtype=torch.bool)
        for b, (_, sets) in enumerate(strings):
            for t, allowed in enumerate(sets):
                legal[t, b, [_SYM[c] for c in allowed]] = True
        return Batch(x, y, mask, {"legal": legal, "length": torch.tensor([[len(s) - 1 for s, _ in strings]])})

    def metrics(self, model, batches):
        """Fractions of positions and of whole strings at which {outputs > threshold} after a
        softmax is exactly the set of legal next symbols; also at the second-to-last symbol."""
        pos_ok = pos_n = seq_ok = seq_n = pen_ok = 0
        with torch.no_grad():
            for b in batches:
                probs = torch.softmax(model(b.x)[0], -1)
                ok = ((probs > self.threshold) == b.extra["legal"]).all(-1) | ~b.mask  # (T, B)
                pos_ok += int((ok & b.mask).sum())
                pos_n += int(b.mask.sum())
                seq_ok += int(ok.all(0).sum())
                seq_n += ok.shape[1]
                last = b.extra["length"][0] - 2  # the position whose next symbol is the second-to-last
                pen_ok += int(ok[last, torch.arange(ok.shape[1], device=ok.device)].sum())
        return {"positions": pos_ok / pos_n, "sequences": seq_ok / seq_n, "penultimate": pen_ok / seq_n}


class EmbeddedReberTask(ReberTask):
    name = "embedded_reber"
    generate = staticmethod(embedded_reber_string)


# ---------------------------------------------------------------- long-range memory


class AddingTask(Task):
    """The adding problem: values in (0, 1) and a marker channel with two 1s (one in each half);
    after T steps, output the sum of the two marked values. Always answering 1 scores ~0.167."""
    name = "adding"
    inputs, loss = "vector", "mse"
    n_in, n_out = 2, 1
    OPTIONS = {"length": ((int,), 100)}
    LIMITS = {"length": (lambda v: v >= 2, "at least 2 (two numbers are marked for adding)")}

    def __init__(self, length=100):
        super().__init__(length=length)
        self.T = length

    def batch(self, rng, size):
        T = self.T
        values = rng.uniform(0, 1, size=(T, size))
        first = rng.integers(0, T // 2, size=size)
        second = rng.integers(T // 2, T, size=size)
        marks = np.zeros((T, size))
        marks[first, np.arange(size)] = marks[second, np.arange(size)] = 1
        target = values[first, np.arange(size)] + values[second, np.arange(size)]
        x = torch.tensor(np.stack([values, marks], -1), dtype=torch.get_default_dtype())
        y = torch.zeros(T, size, 1)
        y[-1, :, 0] = torch.tensor(target, dtype=y.dtype)
        mask = torch.zeros(T, size, dtype=torch.bool)
        mask[-1] = True
        return Batch(x, y, mask)

    def metrics(self, model, batches):
        with torch.no_grad():
            err = [((model(b.x)[0][-1] - b.y[-1]) ** 2).mean().item() for b in batches]
        return {"mse": float(np.mean(err)), "baseline": 1 / 6}


class CopyTask(Task):
    """The copy task: `symbols` random symbols, a pause of `delay` steps, a go marker; then the
    model must repeat the symbols. Judged on the recalled symbols only."""
    name = "copy"
    OPTIONS = {"symbols": ((int,), 5), "delay": ((int,), 10), "alphabet": ((int,), 8)}
    LIMITS = {"symbols": (lambda v: v >= 1, "at least 1"), "delay": (lambda v: v >= 0, "0 or more"),
              "alphabet": (lambda v: v >= 2, "at least 2")}

    def __init__(self, symbols=5, delay=10, alphabet=8):
        super().__init__(symbols=symbols, delay=delay, alphabet=alphabet)
        self.k, self.delay, self.A = symbols, delay, alphabet
        self.blank, self.go = alphabet, alphabet + 1
        self.n_in, self.n_out = alphabet + 2, alphabet + 1

    def batch(self, rng, size):
        k, d = self.k, self.delay
        data = rng.integers(0, self.A, size=(k, size))
        T = k + d + k
        x = np.full((T, size), self.blank)
        x[:k] = data
        x[k + d - 1] = self.go
        y = np.full((T, size), self.blank)
        y[-k:] = data
        mask = np.zeros((T, size), dtype=bool)
        mask[-k:] = True
        return Batch(torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(mask))

    def metrics(self, model, batches):
        with torch.no_grad():
            right = [(model(b.x)[0].argmax(-1) == b.y)[b.mask].float().mean().item() for b in batches]
        return {"accuracy": float(np.mean(right)), "chance": 1 / self.A}


class MajorityTask(Task):
    """Many-to-one classification: a string of bits, labelled 1 when it has more 1s than 0s."""
    name = "majority"
    n_in, n_out = 2, 2
    OPTIONS = {"length": ((int,), 21)}
    LIMITS = {"length": (lambda v: v >= 1, "at least 1")}

    def __init__(self, length=21):
        super().__init__(length=length)
        self.T = length | 1  # odd, so there are no ties

    def batch(self, rng, size):
        bits = rng.integers(0, 2, size=(self.T, size))
        y = np.zeros((self.T, size), dtype=np.int64)
        y[-1] = bits.sum(0) * 2 > self.T
        mask = np.zeros((self.T, size), dtype=bool)
        mask[-1] = True
        return Batch(torch.from_numpy(bits), torch.from_numpy(y), torch.from_numpy(mask))

    def metrics(self, model, batches):
        with torch.no_grad():
            right = [(model(b.x)[0][-1].argmax(-1) == b.y[-1]).float().mean().item() for b in batches]
        return {"accuracy": float(np.mean(right)), "chance": 0.5}


class ForecastTask(Task):
    """A small time-series forecast: noisy sums of two sine waves of random frequency and phase;
    predict the next value at every step. Compared with repeating the last value."""
    name = "forecast"
    inputs, loss = "vector", "mse"
    n_in, n_out = 1, 1
    OPTIONS = {"length": ((int,), 50), "noise": ((float,), 0.02)}
    LIMITS = {"length": (lambda v: v >= 2, "at least 2"), "noise": (lambda v: v >= 0, "0 or more")}

    def __init__(self, length=50, noise=0.02):
        super().__init__(length=length, noise=noise)
        self.T, self.noise = length, noise

    def batch(self, rng, size):
        t = np.arange(self.T + 1)[:, None]
        f = rng.uniform(0.05, 0.25, size=(2, size))
        p = rng.uniform(0, 2 * np.pi, size=(2, size))
        s = 0.5 * (np.sin(f[0] * 2 * np.pi * t + p[0]) + np.sin(f[1] * 2 * np.pi * t + p[1]))
        s = s + self.noise * rng.standard_normal(s.shape)
        s = torch.tensor(s, dtype=torch.get_default_dtype()).unsqueeze(-1)
        return Batch(s[:-1], s[1:], torch.ones(self.T, size, dtype=torch.bool))

    def metrics(self, model, batches):
        with torch.no_grad():
            err = [((model(b.x)[0] - b.y) ** 2)[5:].mean().item() for b in batches]  # after a short warm-up
            naive = [((b.x - b.y) ** 2)[5:].mean().item() for b in batches]
        return {"mse": float(np.mean(err)), "repeat_last": float(np.mean(naive))}


TASKS = {t.name: t for t in (CorpusTask, HelloTask, ReberTask, EmbeddedReberTask, AddingTask, CopyTask,
                             MajorityTask, ForecastTask)}


def make_task(name: str, **options) -> Task:
    return TASKS[name](**options)
