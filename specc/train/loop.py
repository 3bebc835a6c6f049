"""The training loop behind `specc train`, also run under torchrun as DistributedDataParallel.

One step: the next batch (a chunk of every stream, or fresh sequences), the loss on this process's
share of it, backpropagation (through the compiled cell's generated BPTT), gradient clipping by
global norm, an optimiser step. Streams are read by truncated BPTT: the cell's state is carried
from one chunk to the next, detached, and reset at the start of each pass over the stream.

Under torchrun every process builds the same global batch from the same generator state and takes
its own columns; the loss is scaled so that DDP's averaged gradient is the gradient of the mean
loss over the global batch, as one process computing all of it would get.
"""
from __future__ import annotations

import collections
import math
import os
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from . import checkpoint
from .config import ConfigError, model_section
from .model import SequenceModel, build_model, spec_of
from .logs import TensorBoard, write_metrics_csv
from .plot import write_loss_curve
from .progress import Progress
from .threads import set_threads
from .tasks import Generated, Stream, Task, make_task

EVAL_SEED_OFFSET = 1_000_003  # evaluation data comes from its own generator: it never moves the training data

# The tensors this process last handed to a collective, kept referenced from Python. gloo's worker
# thread may let go of a finished collective after Python has (a barrier holds the collectives
# still in flight when it began); torch then frees the tensors' Python objects from that thread,
# which must take the GIL, and at interpreter exit a thread taking the GIL is ended inside a C++
# destructor: "terminate called without an active exception", SIGABRT, in a process whose work
# was done (tests/test_ddp.py, one run in five; gdb: ~AsyncAllgatherWork under ~AsyncBarrierWork
# in ProcessGroupGloo::runLoop, while Py_FinalizeEx ran). Referenced here, they are freed by
# Python itself, after gloo is done with them; older ones than these were released long before.
_HANDED: collections.deque = collections.deque(maxlen=8)


def _handed(*tensors: torch.Tensor) -> None:
    _HANDED.append(tensors)


class TrainingDiverged(RuntimeError):
    pass


@dataclass
class Result:
    status: str  # "done", "interrupted" or "diverged"
    step: int
    model: SequenceModel
    task: Task
    out: Path
    history: list = field(default_factory=list)  # training loss per step (step k at index k-1)
    evals: list = field(default_factory=list)  # (step, {"loss": ..., task metrics})
    message: str = ""


def _distributed(device: str) -> tuple[int, int, torch.device]:
    """This process's rank, the number of processes (torchrun sets WORLD_SIZE), and its device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    where = torch.device("cpu")
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("train.device: cuda, but torch sees no CUDA device")
        where = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(where)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return (dist.get_rank(), dist.get_world_size(), where) if world > 1 else (0, 1, where)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_optimizer(params, t: dict) -> torch.optim.Optimizer:
    name, lr, wd = t["optimizer"], t["lr"], t["weight_decay"]
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=t["momentum"], weight_decay=wd)
    return torch.optim.RMSprop(params, lr=lr, momentum=t["momentum"], weight_decay=wd)


def make_scheduler(opt: torch.optim.Optimizer, t: dict, total_steps: int | None):
    """train.schedule as torch's schedulers, stepped once an update: `warmup` updates rising
    linearly to lr, then constant, cosine (to min_lr at the last update) or step (times `decay`
    every `decay_every` updates)."""
    from torch.optim import lr_scheduler as sched

    warm = t["warmup"]
    if t["schedule"] == "cosine":
        main = sched.CosineAnnealingLR(opt, T_max=max(total_steps - warm, 1), eta_min=t["min_lr"])
    elif t["schedule"] == "step":
        main = sched.StepLR(opt, step_size=t["decay_every"], gamma=t["decay"])
    else:
        main = sched.ConstantLR(opt, factor=1.0, total_iters=0)
    if not warm:
        return main
    rise = sched.LinearLR(opt, start_factor=1 / (warm + 1), end_factor=1.0, total_iters=warm)
    return sched.SequentialLR(opt, [rise, main], milestones=[warm])


def early_stop_due(evals: list, patience: int | None) -> str:
    """Why to stop, or "": the last `patience` evaluations were none better than the best before."""
    if patience is None or len(evals) <= patience:
        return ""
    losses = [m["loss"] for _, m in evals]
    best = min(range(len(losses)), key=losses.__getitem__)
    if len(losses) - 1 - best < patience:
        return ""
    return (f"stopped early: the evaluation loss has not improved for {patience} evaluations "
            f"(best {losses[best]:.4f} at step {evals[best][0]})")


def task_from_config(cfg: dict) -> Task:
    options = dict(cfg["task"])
    return make_task(options.pop("name"), **options)


def loss_sum(task: Task, pred: torch.Tensor, batch) -> torch.Tensor:
    """The summed loss over the positions that count (mask)."""
    if task.loss == "ce":
        per = nn.functional.cross_entropy(pred.reshape(-1, pred.shape[-1]), batch.y.reshape(-1),
                                          reduction="none").reshape(batch.mask.shape)
    else:
        per = ((pred - batch.y) ** 2).mean(-1)
    return (per * batch.mask).sum()


def _as_tuple(state) -> tuple:
    return state if isinstance(state, tuple) else (state,)


def evaluate(task: Task, model: SequenceModel, cfg: dict) -> dict:
    """Loss on held-out data (the validation stream, or fresh sequences from a fixed generator),
    and the task's own measures, with the model in eval mode (no dropout, so it draws no random
    numbers either: a run evaluated at other steps trains the same)."""
    was_training = model.training
    model.eval()
    try:
        return _evaluate(task, model, cfg)
    finally:
        model.train(was_training)


def _evaluate(task: Task, model: SequenceModel, cfg: dict) -> dict:
    t = cfg["train"]
    device = next(model.parameters()).device
    n = t["eval_batches"]
    with torch.no_grad():
        if task.stream:
            k = min(t["seq_len"], len(task.val_ids) - 1)
            stream = Stream(task.val_ids, min(t["batch_size"], (len(task.val_ids) - 1) // k), k)
            chunks = stream.chunks_per_epoch if n is None else min(n, stream.chunks_per_epoch)
            total = count = 0.0
            state = None
            for _ in range(chunks):
                batch = stream.next()[0].to(device)
                pred, state = model(batch.x, state)
                total += loss_sum(task, pred, batch).item()
                count += batch.mask.sum().item()
            return {"loss": total / count}
        rng = np.random.default_rng(t["seed"] + EVAL_SEED_OFFSET)
        batches = [task.batch(rng, t["batch_size"]).to(device) for _ in range(n or 20)]
        total = sum(loss_sum(task, model(b.x)[0], b).item() for b in batches)
        count = sum(b.mask.sum().item() for b in batches)
        return {"loss": total / count, **task.metrics(model, batches)}


def format_metrics(m: dict) -> str:
    return "  ".join(f"{k} {v:.4f}" for k, v in m.items())


def train(cfg: dict, resume: bool = False, progress: bool | None = None, stream=None,
          overwrite: bool = False) -> Result:
    """Train as the config says; with resume, continue from the checkpoint in cfg["out"].

    A fresh run refuses to replace an existing checkpoint unless `overwrite` is set."""
    return _Training(cfg, resume, overwrite).run(progress, stream)


class _Training:
    """One run of train(): the model, optimiser and data of this process, and where it stands."""

    def __init__(self, cfg: dict, resume: bool, overwrite: bool):
        self.cfg = cfg
        t = self.t = cfg["train"]
        self.rank, self.world, self.device = _distributed(t["device"])
        self.out = Path(cfg["out"])
        self.ckpt_path = self.out / "checkpoint.pt"
        if not resume and not overwrite and self.ckpt_path.exists():
            raise ConfigError(f"{self.ckpt_path} exists: continue it with --resume, or start afresh over it with "
                              f"--force (or choose another out directory)")
        B = self.B = t["batch_size"]
        if B % self.world:
            raise ConfigError(f"train.batch_size: {B} does not split evenly across {self.world} processes")
        self.lo, self.hi = self.rank * B // self.world, (self.rank + 1) * B // self.world
        if t["threads"] is not None:
            set_threads(t["threads"])
        seed_everything(t["seed"])
        task = self.task = task_from_config(cfg)
        self.model = build_model(cfg["model"], task.n_in, task.n_out, task.inputs).to(self.device)
        self.spec = spec_of(cfg["model"])
        # Dropout masks are drawn for the global batch by every process (each keeping its columns), as
        # one process would draw them; in one process too, so that both draw the same numbers.
        self.model.share_of_batch((B, self.lo, self.hi))
        self.opt = make_optimizer(self.model.parameters(), t)
        self.source = Stream(task.train_ids, B, t["seq_len"]) if task.stream else Generated(task, B, t["seed"])
        self.step, self.history, self.evals, self.carry, self.saved_step = 0, [], [], None, None
        self.total_steps = t["steps"]
        if t["epochs"] is not None:
            by_epochs = math.ceil(t["epochs"] * self.source.chunks_per_epoch)
            self.total_steps = by_epochs if self.total_steps is None else min(self.total_steps, by_epochs)
        # Made before a resume loads the optimiser's state (its learning rate as saved), then its own.
        self.sched = make_scheduler(self.opt, t, self.total_steps)
        if resume:
            self._resume()
        self.stop_requested = False
        self.early = ""  # why training stopped early (train.early_stop), once it has

    def _resume(self) -> None:
        if not self.ckpt_path.exists():
            raise FileNotFoundError(f"{self.ckpt_path}: no checkpoint to resume from")
        ck = checkpoint.load(self.ckpt_path)
        for section in ("model", "task"):
            theirs = model_section(ck["config"][section]) if section == "model" else ck["config"][section]
            if theirs != self.cfg[section]:
                raise ConfigError(f"--resume: the config's {section} section differs from the checkpoint's "
                                  f"({ck['config'][section]} there)")
        self.model.load_state_dict(ck["model"])
        self.opt.load_state_dict(ck["optimizer"])
        if "scheduler" in ck:  # a checkpoint from before schedules had a constant rate
            self.sched.load_state_dict(ck["scheduler"])
        checkpoint.set_rng_states(ck["rng"])
        self.source.load_state_dict(ck["data"])
        self.step = self.saved_step = ck["step"]
        self.history = list(ck["history"])
        # The eval that ended the earlier run (interrupted, or out of time) when it was off that run's
        # schedule: an uninterrupted run would not have made it, so the resumed run does not keep it.
        off_schedule = ck["step"] % ck["config"]["train"]["eval_every"] != 0
        self.evals = [(at, m) for at, m in ck["evals"] if not (off_schedule and at == ck["step"])]
        self.carry = None if ck["carry"] is None else tuple(c[self.lo:self.hi].to(self.device) for c in ck["carry"])

    def save(self) -> None:
        carry, world = self.carry, self.world
        if carry is not None and world > 1:
            parts = [[torch.empty_like(c) for _ in range(world)] for c in carry]
            mine = [c.contiguous() for c in carry]
            _handed(*(t for p in parts for t in p), *mine)
            for p, c in zip(parts, mine):
                dist.all_gather(p, c)
            carry = tuple(torch.cat(p, 0) for p in parts)
        carry = None if carry is None else tuple(c.cpu() for c in carry)
        if self.rank == 0:
            task = self.task
            checkpoint.save(self.ckpt_path, {
                "config": self.cfg, "step": self.step, "model": self.model.state_dict(),
                "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                "rng": checkpoint.rng_states(), "data": self.source.state_dict(),
                "carry": carry, "history": self.history, "evals": self.evals,
                "io": {"n_in": task.n_in, "n_out": task.n_out, "inputs": task.inputs, "vocab": task.vocab},
                "spec": self.spec,
            })
            ylabel = "loss (cross-entropy, nats)" if task.loss == "ce" else "loss (mean squared error)"
            spec = self.cfg["model"]["spec"]
            cell = spec if len(spec) < 60 and "{" not in spec else "the config's cell"
            title = f"{cell} on {self.cfg['task']['name']}"
            write_loss_curve(self.out / "loss.png", list(enumerate(self.history, 1)),
                             [(s, m["loss"]) for s, m in self.evals], title, ylabel)
            write_metrics_csv(self.out / "metrics.csv", self.history, self.evals)
        self.saved_step = self.step

    def steps_done(self) -> bool:
        return self.total_steps is not None and self.step >= self.total_steps

    def run(self, progress: bool | None, stream) -> Result:
        t, main = self.t, self.rank == 0
        net = self.model
        if self.world > 1:
            net = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device] if self.device.type == "cuda" else None)
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
        self.bar = Progress(self.total_steps, t["time_limit"], start_step=self.step,
                            unit="tok" if self.task.stream else "seq", stream=stream if main else _Silent(),
                            every=t["log_every"], enabled=progress if main else False,
                            log=self.out / "train.log" if main else None)

        def on_sigint(signum, frame):
            self.stop_requested = True

        old_handler = signal.signal(signal.SIGINT, on_sigint) if _main_thread() else None
        status, message = "done", ""
        self.board = TensorBoard(self.out / "tensorboard" if main else None)
        try:
            done = self.steps_done()
            while not done:
                done, stop_now, diverged = self.one_step(net)
                if diverged:
                    status, message = "diverged", diverged
                    break
                if stop_now:
                    status, message = "interrupted", f"interrupted at step {self.step}; checkpoint {self.ckpt_path}"
                    break
        finally:
            self.bar.close()
            self.board.close()
            self.model.share_of_batch(None)  # the model handed back takes any batch
            if old_handler is not None:
                signal.signal(signal.SIGINT, old_handler)
        if status == "done" and self.early:
            message = f"{self.early}; checkpoint {self.ckpt_path}"
        if status == "done" and self.saved_step != self.step:
            self.save()  # e.g. a resumed run that was already finished
        if self.world > 1:
            # Every process returns once rank 0 has written its checkpoint: one that went on to tear
            # down the process group meanwhile aborted in gloo ("terminate called without an active
            # exception"), and one that read the checkpoint would have raced rank 0's write.
            dist.barrier()
        return Result(status, self.step, self.model, self.task, self.out, self.history, self.evals, message)

    def one_step(self, net) -> tuple[bool, bool, str]:
        """One optimiser step over train.accumulate batches: (done, stop now, why it diverged or "")."""
        t, task = self.t, self.task
        self.opt.zero_grad(set_to_none=True)
        parts, items, stop_now, out_of_time = [], 0, False, False
        for _ in range(t["accumulate"]):
            loss_value, count, stop, late = self._backward_one(net)
            stop_now, out_of_time = stop_now or stop, out_of_time or late
            if not math.isfinite(loss_value):
                return True, False, _diverged(loss_value, "loss", self.step + 1, self.ckpt_path, self.saved_step)
            parts.append(loss_value)
            items += int(count) if task.stream else self.B
        loss_value = sum(parts) / len(parts)
        # Clipped by global norm; measured even without clipping, so that a NaN never reaches the weights.
        norm = nn.utils.clip_grad_norm_(self.model.parameters(), t["clip"] if t["clip"] is not None else math.inf)
        if not math.isfinite(norm.item()):
            return True, False, _diverged(norm.item(), "gradient norm", self.step + 1, self.ckpt_path, self.saved_step)
        self.opt.step()
        self.sched.step()
        self.step += 1
        self.history.append(loss_value)
        self.board.step(self.step, loss_value)
        self.bar.update(self.step, loss_value, items)
        done = self.steps_done() or out_of_time
        last = done or stop_now
        if self.step % t["eval_every"] == 0 or last:
            metrics = evaluate(task, self.model, self.cfg)
            self.evals.append((self.step, metrics))
            self.board.eval(self.step, metrics)
            self.bar.message(f"step {self.step}: eval {format_metrics(metrics)}")
            self.early = early_stop_due(self.evals, t["early_stop"])
            if self.early:
                self.bar.message(self.early)
                done = last = True
        if self.step % t["checkpoint_every"] == 0 or last:
            self.save()
        return done, stop_now, ""

    def _backward_one(self, net) -> tuple[float, torch.Tensor, bool, bool]:
        """The gradient of one batch added to the parameters' (scaled so that the update's is the
        mean over its batches): (its mean loss, its count, stop now, out of time)."""
        t, task, device, world = self.t, self.task, self.device, self.world
        batch, fresh = self.source.next()
        count = batch.mask.sum()
        mine = batch.columns(self.lo, self.hi).to(device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=t["precision"] == "bf16"):
            pred, state = net(mine.x, None if fresh or self.carry is None else self.carry)
            local = loss_sum(task, pred.float(), mine)
        # The loss, and whether to stop: decided together, so that all processes stop at one step.
        time_up = t["time_limit"] is not None and time.perf_counter() - self.bar.start >= t["time_limit"]
        seen = torch.tensor([local.item() / count.item(), float(self.stop_requested), float(time_up)],
                            dtype=torch.float64, device=device)
        if world > 1:
            _handed(seen)
            dist.all_reduce(seen)
        loss_value = seen[0].item()
        if math.isfinite(loss_value):
            # Every process divides by the global count; DDP averages over processes, hence * world.
            (local / count.to(device) * world / t["accumulate"]).backward()
            self.carry = tuple(s.detach() for s in _as_tuple(state)) if task.stream else None
        return loss_value, count, seen[1].item() > 0, seen[2].item() > 0


def _diverged(value: float, what: str, step: int, ckpt: Path, saved_step: int | None) -> str:
    kept = (f"the last good checkpoint, from step {saved_step}, is kept at {ckpt}" if saved_step is not None
            else "no checkpoint had been written yet")
    return (f"training stopped: the {what} is {value} at step {step}; {kept}. "
            f"Try a lower train.lr or a smaller train.clip.")


class _Silent:
    """Where the other processes' progress goes under torchrun."""

    def write(self, text: str) -> None:
        pass

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
