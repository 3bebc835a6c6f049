"""Training configs: YAML read into plain dicts, every key and type checked against SCHEMA.

Errors name the file, the line and the key: `run.yaml:7: train.lr: expected a number, got 'fast'`.
"""
from __future__ import annotations

import copy
from pathlib import Path

import yaml
from yaml.constructor import SafeConstructor

from .tasks import TASKS

NONE = type(None)
# section -> key -> (allowed types, default); REQUIRED marks a key without a default.
REQUIRED = object()
SCHEMA = {
    "model": {
        "spec": ((str,), REQUIRED),           # a library name, a path to a .rnn file, or spec text
        "cell": ((str, NONE), None),          # which cell, when the spec file defines several
        "dims": ((dict,), {}),                # the cell's dimensions, e.g. {H: 128}; I (and O) are filled in
        "embed": ((int, NONE), None),         # token inputs: an embedding of this size instead of one-hot
        "head": ((bool,), True),              # a linear layer from the cell's output to the task's outputs
        "layers": ((int,), 1),                # stacked copies of the cell, each reading the one below
        "dropout": ((float,), 0.0),           # between stacked layers, while training
    },
    "task": {
        "name": ((str,), REQUIRED),           # one of TASKS; the task's own options sit beside it
    },
    "train": {
        "optimizer": ((str,), "adam"),        # adam, adamw, sgd, rmsprop
        "lr": ((float,), 0.002),
        "momentum": ((float,), 0.0),          # sgd and rmsprop
        "weight_decay": ((float,), 0.0),
        "batch_size": ((int,), 32),           # the global batch, split across processes under torchrun
        "seq_len": ((int,), 100),             # streams: steps per truncated-BPTT chunk
        "steps": ((int, NONE), None),         # stop after this many updates ...
        "epochs": ((float, NONE), None),      # ... or passes over a stream ...
        "time_limit": ((float, NONE), None),  # ... or seconds of training in this run, whichever comes first
        "clip": ((float, NONE), 5.0),         # gradient clipping by global norm; null turns it off
        "schedule": ((str,), "constant"),     # the learning rate: constant, cosine (to min_lr at the last step) or step
        "warmup": ((int,), 0),                # steps of linear warmup to lr, before the schedule
        "min_lr": ((float,), 0.0),            # cosine: the learning rate at the last step
        "decay_every": ((int,), 1000),        # step: multiply the learning rate by `decay` every this many steps
        "decay": ((float,), 0.5),
        "accumulate": ((int,), 1),            # batches whose gradients one update sums (a batch of accumulate * batch_size)
        "early_stop": ((int, NONE), None),    # stop after this many evaluations without a better evaluation loss
        "precision": ((str,), "float32"),     # float32, or bf16 (autocast on CUDA)
        "seed": ((int,), 0),
        "device": ((str,), "cpu"),            # cpu (the faster of the C loops and NumPy) or cuda (Triton backend; nccl under torchrun)
        "threads": ((int, NONE), 1),          # CPU threads for torch and BLAS (null: leave them as they are)
        "eval_every": ((int,), 200),          # steps between evaluations
        "eval_batches": ((int, NONE), 20),    # batches per evaluation (null: the whole validation stream)
        "checkpoint_every": ((int,), 500),
        "log_every": ((int,), 50),            # steps between log lines when there is no progress bar
    },
    "sample": {                               # language models: printed after training, defaults of `specc sample`
        "prime": ((str,), "\n"),
        "length": ((int,), 500),
        "temperature": ((float,), 0.8),
        "seed": ((int,), 0),
    },
    "out": ((str,), "runs/run"),              # the directory for checkpoints, the loss curve and the log
}
OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop")
SCHEDULES = ("constant", "cosine", "step")
TYPE_NAMES = {str: "a string", int: "a whole number", float: "a number", bool: "true or false",
              dict: "a mapping", NONE: "null"}


class ConfigError(ValueError):
    pass


def _describe(types) -> str:
    return " or ".join(TYPE_NAMES[t] for t in types)


def _fits(value, types) -> bool:
    if isinstance(value, bool):
        return bool in types
    if isinstance(value, int) and float in types:
        return True
    return isinstance(value, types)


class _Reader:
    def __init__(self, source: str):
        self.source = source
        self.construct = SafeConstructor()

    def where(self, node) -> str:
        return f"{self.source}:{node.start_mark.line + 1}"

    def error(self, node, msg: str):
        raise ConfigError(f"{self.where(node)}: {msg}")

    def value(self, node):
        return self.construct.construct_object(node, deep=True)

    def mapping(self, node, what: str) -> dict:
        """key -> (key node, value node), refusing duplicates and non-string keys."""
        if not isinstance(node, yaml.MappingNode):
            self.error(node, f"{what}: expected a mapping of keys to values")
        out = {}
        for k, v in node.value:
            key = self.value(k)
            if not isinstance(key, str):
                self.error(k, f"{what}: keys must be names, got {key!r}")
            if key in out:
                self.error(k, f"{what}.{key}: given twice")
            out[key] = (k, v)
        return out

    def section(self, node, name: str, schema: dict, at=None) -> dict:
        """A section's entries checked against its schema; `at` is its key, where a missing
        entry is reported."""
        entries = self.mapping(node, name)
        out = {}
        for key, (knode, vnode) in entries.items():
            if key not in schema:
                self.error(knode, f"{name}.{key}: unknown key (known: {', '.join(schema)})")
            types, _ = schema[key]
            value = self.value(vnode)
            if not _fits(value, types):
                self.error(vnode, f"{name}.{key}: expected {_describe(types)}, got {value!r}")
            if float in types and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            out[key] = value
        for key, (types, default) in schema.items():
            if key not in out:
                if default is REQUIRED:
                    self.error(at or node, f"{name}.{key}: required")
                out[key] = copy.deepcopy(default)
        return out


def parse_config(text: str, source: str = "<config>") -> dict:
    """Checked config dict with every default filled in."""
    r = _Reader(source)
    try:
        root = yaml.compose(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{source}{line}: not valid YAML: {getattr(e, 'problem', e)}") from None
    if root is None:
        raise ConfigError(f"{source}: the config is empty")
    top = r.mapping(root, "config")
    cfg = {}
    for key, (knode, vnode) in top.items():
        if key not in SCHEMA:
            r.error(knode, f"{key}: unknown section (known: {', '.join(SCHEMA)})")
        if key == "task":
            cfg[key] = _task(r, knode, vnode)
        elif isinstance(SCHEMA[key], dict):
            cfg[key] = r.section(vnode, key, SCHEMA[key], at=knode)
        else:
            value, (types, _) = r.value(vnode), SCHEMA[key]
            if not _fits(value, types):
                r.error(vnode, f"{key}: expected {_describe(types)}, got {value!r}")
            cfg[key] = value
    for key, spec in SCHEMA.items():
        if key not in cfg:
            if isinstance(spec, dict):
                if any(d is REQUIRED for _, d in spec.values()):
                    r.error(root, f"{key}: required section")
                cfg[key] = {k: copy.deepcopy(d) for k, (_, d) in spec.items()}
            else:
                cfg[key] = spec[1]
    _check_values(r, cfg, top)
    return cfg


def _task(r: _Reader, at, node) -> dict:
    entries = r.mapping(node, "task")
    if "name" not in entries:
        r.error(at, "task.name: required (one of " + ", ".join(TASKS) + ")")
    knode, vnode = entries["name"]
    name = r.value(vnode)
    if name not in TASKS:
        r.error(vnode, f"task.name: unknown task {name!r} (known: {', '.join(TASKS)})")
    schema = dict(SCHEMA["task"], **TASKS[name].OPTIONS)
    return r.section(node, "task", schema, at=at)


def _check_values(r: _Reader, cfg: dict, top: dict) -> None:
    def node_of(section, key):
        entries = r.mapping(top[section][1], section) if section in top else {}
        return entries[key][1] if key in entries else (top[section][1] if section in top else None)

    def fail(section, key, msg):
        node = node_of(section, key)
        prefix = r.where(node) if node is not None else r.source
        raise ConfigError(f"{prefix}: {section}.{key}: {msg}")

    for name, size in cfg["model"]["dims"].items():
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            fail("model", "dims", f"dimension {name} must be a positive whole number, got {size!r}")
    m = cfg["model"]
    declared = _cell_dims(m)
    for name in m["dims"]:
        if declared is not None and name not in declared[1]:
            dims_node = node_of("model", "dims")
            keys = r.mapping(dims_node, "model.dims") if isinstance(dims_node, yaml.MappingNode) else {}
            at = r.where(keys[name][0]) if name in keys else r.source
            raise ConfigError(f"{at}: model.dims: cell '{declared[0]}' has no dimension {name} (its dimensions: "
                              f"{', '.join(declared[1]) or 'none'}; I, and O without a head, come from the task)")
    if m["layers"] < 1:
        fail("model", "layers", f"must be at least 1, got {m['layers']}")
    if not 0.0 <= m["dropout"] < 1.0:
        fail("model", "dropout", f"must be at least 0 and less than 1, got {m['dropout']}")
    if m["dropout"] and m["layers"] == 1:
        fail("model", "dropout", "applies between stacked layers; with it, set model.layers to 2 or more")
    task = cfg["task"]
    for key, (ok, what) in TASKS[task["name"]].LIMITS.items():
        if key in task and not ok(task[key]):
            fail("task", key, f"must be {what}, got {task[key]!r}")
    t = cfg["train"]
    if t["device"] not in ("cpu", "cuda"):
        fail("train", "device", f"expected cpu or cuda, got {t['device']!r}")
    if t["schedule"] not in SCHEDULES:
        fail("train", "schedule", f"unknown schedule {t['schedule']!r} (known: {', '.join(SCHEDULES)})")
    if t["schedule"] == "cosine" and t["steps"] is None and t["epochs"] is None:
        fail("train", "schedule", "cosine decays to min_lr at the last step: give train.steps or train.epochs")
    for key in ("warmup", "min_lr"):
        if t[key] < 0:
            fail("train", key, f"must not be negative, got {t[key]}")
    if not 0 < t["decay"] <= 1:
        fail("train", "decay", f"must be in (0, 1], got {t['decay']}")
    if t["precision"] not in ("float32", "bf16"):
        fail("train", "precision", f"expected float32 or bf16, got {t['precision']!r}")
    if t["precision"] == "bf16" and t["device"] != "cuda":
        fail("train", "precision", "bf16 autocasts on CUDA; on the CPU train in float32")
    if t["optimizer"] not in OPTIMIZERS:
        fail("train", "optimizer", f"unknown optimizer {t['optimizer']!r} (known: {', '.join(OPTIMIZERS)})")
    for key in ("threads", "batch_size", "seq_len", "eval_every", "checkpoint_every", "log_every", "steps", "eval_batches",
                "decay_every", "accumulate", "early_stop"):
        if t[key] is not None and t[key] < 1:
            fail("train", key, f"must be at least 1, got {t[key]}")
    for key in ("lr", "epochs", "time_limit", "clip"):
        if t[key] is not None and t[key] <= 0:
            fail("train", key, f"must be positive, got {t[key]}")
    if t["steps"] is None and t["epochs"] is None and t["time_limit"] is None:
        fail("train", "steps", "say when to stop: steps, epochs or time_limit")
    if t["epochs"] is not None and not TASKS[cfg["task"]["name"]].stream:
        fail("train", "epochs", f"task {cfg['task']['name']} generates fresh data without end; use steps")


def model_cell(m: dict) -> str | None:
    """The cell a model section names: its `cell`, else for a library name the file's cell of that
    name (elman.rnn also holds rnn_tanh, ...), else None (the spec's only cell)."""
    spec, cell = m["spec"], m.get("cell")
    return spec if cell is None and spec.isidentifier() else cell


def _cell_dims(m: dict) -> tuple[str, tuple[str, ...]] | None:
    """(name, dimensions) of the cell the model section names; None when the spec does not read
    (its own error, at its own line, comes when the model is built)."""
    from ..check import check
    from ..errors import SpecError
    from ..parse import parse
    from ..pipeline import pick_cell, read_spec

    try:
        text, file = read_spec(m["spec"])
        found = pick_cell(check(parse(text, file)), model_cell(m), file)
    except (SpecError, OSError, ValueError):
        return None
    return found.name, tuple(found.dims)


def model_section(model: dict) -> dict:
    """A model section with every key, as read today: a checkpoint's from before a key existed
    gets the key's default."""
    return {**{k: copy.deepcopy(d) for k, (_, d) in SCHEMA["model"].items() if d is not REQUIRED}, **model}


def load_config(path: str | Path) -> dict:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    return parse_config(text, str(path))


def config_from_dict(d: dict, source: str = "<dict>") -> dict:
    """The same checks for a config built in code (experiments, tests)."""
    return parse_config(yaml.safe_dump(d, sort_keys=False), source)
