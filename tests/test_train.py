"""specc train / sample: the loop against a hand-written torch reference, resume, checkpoints, NaN."""
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from specc.cli import main
from specc.train import checkpoint, config_from_dict, train
from specc.train import loop as loop_module
from specc.train.sample import generate, load_model

TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
        "First Citizen:\nYou are all resolved rather to die than to famish?\n") * 4


def corpus_config(tmp_path, **train):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    settings = dict(batch_size=2, seq_len=8, steps=6, optimizer="sgd", lr=0.5, clip=0.1, eval_every=1000,
                    checkpoint_every=1000, threads=1)
    settings.update(train)
    return config_from_dict({"model": {"spec": "lstm", "dims": {"H": 12}},
                             "task": {"name": "corpus", "path": str(path)},
                             "train": settings, "out": str(tmp_path / "run")})


def torch_reference_run(cfg, layers: int, steps: int):
    """torch's own LSTM (num_layers=layers), stream slicing, state carrying and reset, clipping and
    SGD written out by hand, from the initial weights train() starts from (it seeds torch, then
    builds the model). The LSTM, the head and the losses."""
    vocab = sorted(set(TEXT))
    ids = torch.tensor([vocab.index(c) for c in TEXT])
    ids = ids[:len(ids) - int(len(ids) * 0.1)]
    V, H, B, k = len(vocab), 12, 2, 8
    torch.manual_seed(0)
    init = loop_module.build_model(cfg["model"], V, V, "tokens")
    lstm, head = nn.LSTM(V, H, num_layers=layers), nn.Linear(H, V)
    cells = [init.cell] if layers == 1 else [init.cell.cell(layer) for layer in range(layers)]
    with torch.no_grad():
        for layer, cell in enumerate(cells):
            for theirs, ours in (("weight_ih", "W_ih"), ("weight_hh", "W_hh"), ("bias_ih", "b_ih"),
                                 ("bias_hh", "b_hh")):
                getattr(lstm, f"{theirs}_l{layer}").copy_(getattr(cell, ours))
        head.load_state_dict(init.head.state_dict())
    params = list(lstm.parameters()) + list(head.parameters())
    seg = (len(ids) - 1) // B
    chunks = seg // k
    state, losses = None, []
    for step in range(steps):
        c = step % chunks
        if c == 0:
            state = None
        x = torch.stack([ids[b * seg + c * k: b * seg + c * k + k] for b in range(B)], 1)
        y = torch.stack([ids[b * seg + c * k + 1: b * seg + c * k + k + 1] for b in range(B)], 1)
        out, state = lstm(nn.functional.one_hot(x, V).float(), state)
        loss = nn.functional.cross_entropy(head(out).reshape(-1, V), y.reshape(-1))
        grads = torch.autograd.grad(loss, params)
        norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
        scale = min(1.0, 0.1 / (norm.item() + 1e-6))
        with torch.no_grad():
            for p, g in zip(params, grads):
                p -= 0.5 * scale * g
        state = tuple(s.detach() for s in state)
        losses.append(loss.item())
    return lstm, head, losses


def test_truncated_bptt_with_clipping_matches_a_torch_reference(tmp_path):
    cfg = corpus_config(tmp_path, steps=30)  # 30 chunks: past the end of an epoch (state reset)
    result = train(cfg, progress=False)
    lstm, head, losses = torch_reference_run(cfg, 1, 30)
    assert np.allclose(result.history, losses, atol=1e-5)
    got = result.model
    assert torch.allclose(got.cell.W_hh, lstm.weight_hh_l0, atol=1e-5)
    assert torch.allclose(got.cell.W_ih, lstm.weight_ih_l0, atol=1e-5)
    assert torch.allclose(got.head.weight, head.weight, atol=1e-5)


def test_stacked_layers_match_a_two_layer_torch_lstm(tmp_path):
    """model.layers: 2 -> the cell stacked (the upper layer reads the lower), its states carried
    between chunks and reset at each epoch, against nn.LSTM(num_layers=2) trained by hand."""
    cfg = corpus_config(tmp_path, steps=30)
    cfg["model"]["layers"] = 2
    result = train(cfg, progress=False)
    lstm, head, losses = torch_reference_run(cfg, 2, 30)
    assert np.allclose(result.history, losses, atol=1e-5)
    for layer in range(2):
        assert torch.allclose(result.model.cell.cell(layer).W_hh, getattr(lstm, f"weight_hh_l{layer}"), atol=1e-5)
    assert torch.allclose(result.model.head.weight, head.weight, atol=1e-5)


def test_stacked_layers_with_dropout_resume_bit_for_bit_and_sample(tmp_path):
    def config(out, steps):
        cfg = corpus_config(tmp_path, steps=steps, optimizer="adam", lr=0.01, checkpoint_every=2)
        cfg["model"].update(layers=3, dropout=0.3)
        cfg["out"] = str(tmp_path / out)
        return cfg

    straight = train(config("a", 9), progress=False)
    train(config("b", 5), progress=False)
    resumed = train(config("b", 9), resume=True, progress=False)
    assert resumed.history == straight.history
    assert resumed.model.cell.batch_share is None  # the model handed back trains on any batch
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    model, ck = load_model(tmp_path / "b" / "checkpoint.pt")
    text = generate(model, ck["io"]["vocab"], "First", 20, temperature=0.0)
    assert len(text) == 20 and set(text) <= set(TEXT)
    # dropout while training only
    x = torch.randint(0, len(ck["io"]["vocab"]), (5, 2))
    model.train()
    assert not torch.equal(model(x)[0], model(x)[0])
    model.eval()
    assert torch.equal(model(x)[0], model(x)[0])


def test_a_cell_with_its_own_dropout_trains_resumes_bit_for_bit_and_evaluates_without_it(tmp_path):
    """specs/lstm_dropout.rnn (dropout() inside the cell): its masks come from torch's generator,
    so a resumed run is the straight one; in eval the cell is the plain LSTM with the same weights."""
    def config(out, steps):
        cfg = corpus_config(tmp_path, steps=steps, optimizer="adam", lr=0.01, checkpoint_every=2)
        cfg["model"]["spec"] = "lstm_dropout"
        cfg["out"] = str(tmp_path / out)
        return cfg

    straight = train(config("a", 7), progress=False)
    train(config("b", 4), progress=False)
    resumed = train(config("b", 7), resume=True, progress=False)
    assert resumed.history == straight.history
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)

    import specc

    cell = straight.model.cell
    plain = specc.load("lstm", I=cell.dims["I"], H=12, dtype=torch.float32)
    plain.load_state_dict(cell.state_dict())
    x = torch.randn(5, 2, cell.dims["I"])
    cell.eval()
    torch.testing.assert_close(cell(x)[0], plain(x)[0])
    cell.train()
    assert not torch.equal(cell(x)[0], plain(x)[0])


@pytest.mark.parametrize("model, message", [
    ({"layers": 0}, "model.layers: must be at least 1"),
    ({"dropout": 0.2}, "model.dropout: applies between stacked layers"),
    ({"layers": 2, "dropout": 1.0}, "model.dropout: must be at least 0 and less than 1"),
])
def test_stacking_options_are_checked(tmp_path, model, message):
    cfg = corpus_config(tmp_path)
    with pytest.raises(ValueError, match=message):
        config_from_dict({**cfg, "model": {**cfg["model"], **model}})


def test_a_cell_that_cannot_be_stacked_says_why(tmp_path):
    text = "cell wide(I, H) {\n  input x[I]\n  state h[H] = zeros\n  param W[H, H]\n  h' = tanh(W @ h)\n" \
           "  output y = concat(h', x)\n}\n"
    cfg = corpus_config(tmp_path)
    cfg["model"].update(spec=text, layers=2)
    with pytest.raises(ValueError, match="cannot be stacked.*input x\\[I\\]"):
        train(cfg, progress=False)


@pytest.mark.parametrize("task", ["corpus", "reber"])
def test_resume_continues_bit_for_bit(tmp_path, task):
    def config(out, steps):
        cfg = corpus_config(tmp_path, steps=steps, optimizer="adam", lr=0.01, eval_every=3, checkpoint_every=2)
        if task == "reber":
            cfg["task"] = {"name": "reber", "threshold": 0.3}
        cfg["out"] = str(tmp_path / out)
        return cfg

    straight = train(config("a", 31), progress=False)  # corpus: 30 chunks an epoch, so this wraps
    train(config("b", 13), progress=False)
    resumed = train(config("b", 31), resume=True, progress=False)
    assert resumed.step == straight.step == 31
    assert resumed.history == straight.history
    assert resumed.evals == straight.evals  # not the eval that ended the 13-step run
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ck_a, ck_b = checkpoint.load(tmp_path / "a" / "checkpoint.pt"), checkpoint.load(tmp_path / "b" / "checkpoint.pt")
    assert ck_a["data"] == ck_b["data"]
    assert ck_a["carry"] is None if task == "reber" else all(torch.equal(x, y) for x, y in zip(ck_a["carry"], ck_b["carry"]))


def test_resume_keeps_the_evals_of_an_earlier_schedule(tmp_path):
    def config(steps, every):
        return config_from_dict({"model": {"spec": "lstm", "dims": {"H": 6}}, "task": {"name": "hello"},
                                 "train": dict(batch_size=4, seq_len=5, steps=steps, eval_every=every, eval_batches=2,
                                               threads=1, checkpoint_every=2),
                                 "out": str(tmp_path / "r")})

    train(config(7, 3), progress=False)  # evals at 3, 6 and 7 (the end, off the schedule)
    resumed = train(config(9, 4), resume=True, progress=False)
    assert [at for at, _ in resumed.evals] == [3, 6, 8, 9]


def test_resume_refuses_a_different_model(tmp_path):
    cfg = corpus_config(tmp_path, steps=2)
    train(cfg, progress=False)
    cfg["model"]["dims"]["H"] = 13
    with pytest.raises(ValueError, match="model section differs"):
        train(cfg, resume=True, progress=False)


def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    cfg = corpus_config(tmp_path, steps=20, checkpoint_every=4)
    good = train(dict(cfg, out=str(tmp_path / "good"), train=dict(cfg["train"], steps=8)), progress=False)
    real, calls = loop_module.loss_sum, []

    def poisoned(task, pred, batch):
        value = real(task, pred, batch)
        if torch.is_grad_enabled():
            calls.append(1)
            if len(calls) == 10:
                return value * float("nan")
        return value

    monkeypatch.setattr(loop_module, "loss_sum", poisoned)
    result = train(cfg, progress=False)
    assert result.status == "diverged" and result.step == 9
    assert "loss is nan at step 10" in result.message and "from step 8" in result.message
    kept = checkpoint.load(tmp_path / "run" / "checkpoint.pt")
    assert kept["step"] == 8
    assert all(torch.equal(v, good.model.state_dict()[k]) for k, v in kept["model"].items())


def test_checkpoints_load_safely_and_are_replaced_atomically(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    checkpoint.save(path, {"step": 1, "w": torch.ones(3)})
    assert checkpoint.load(path)["step"] == 1

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        checkpoint.save(path, {"step": 2})
    monkeypatch.undo()
    assert checkpoint.load(path)["step"] == 1  # the old one, whole
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temporary files left

    class Payload:  # arbitrary objects are refused, not unpickled
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"format": checkpoint.FORMAT, "x": Payload()}, path)
    with pytest.raises(checkpoint.CheckpointError, match="specc does not load such files") as e:
        checkpoint.load(path)
    assert "weights_only" not in str(e.value)  # torch's advice, which would run the file's code


def _read_png(path):
    """The image as (H, W, 3) uint8, decoded by Pillow (matplotlib's own reader), not by us."""
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_cli_train_then_sample_hello(tmp_path, capsys):
    cfg = tmp_path / "hello.yaml"
    cfg.write_text(f"""
model:
  spec: lstm
  dims: {{H: 16}}
task:
  name: hello
train:
  batch_size: 4
  seq_len: 10
  steps: 150
  lr: 0.02
  eval_every: 50
sample:
  prime: h
  length: 14
  temperature: 0
out: {tmp_path / 'run'}
""")
    assert main(["train", str(cfg), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "hellohellohello" in out
    ckpt = str(tmp_path / "run" / "checkpoint.pt")
    assert main(["sample", ckpt, "--prime", "hel", "--length", "7", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.strip() == "hellohello"
    assert main(["sample", ckpt, "--temperature", "1.5", "--seed", "3", "--length", "40"]) == 0
    first = capsys.readouterr().out
    assert main(["sample", ckpt, "--temperature", "1.5", "--seed", "3", "--length", "40"]) == 0
    assert capsys.readouterr().out == first
    img = _read_png(tmp_path / "run" / "loss.png")
    assert img.shape[2] == 3 and (img == [31, 119, 180]).all(-1).any()  # the training curve is drawn


def test_loss_figure_has_axes_titles_legend_and_marked_evaluations():
    from specc.train.plot import loss_figure

    train_curve = [(s, 4.0 * 0.99 ** s) for s in range(1, 400)]
    ax = loss_figure(train_curve, [(400, 0.1)], "lstm on hello", "loss (cross-entropy, nats)").axes[0]
    assert ax.get_xlabel() == "step" and ax.get_ylabel() == "loss (cross-entropy, nats)"
    assert ax.get_title() == "lstm on hello"
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any("training" in t for t in labels) and "evaluation loss" in labels
    evals = [line for line in ax.get_lines() if line.get_label() == "evaluation loss"][0]
    assert evals.get_marker() == "o"  # a single evaluation is a visible point
    assert ax.get_yscale() == "log"  # 4.0 down to 0.07: more than a decade


def test_sample_refuses_unknown_characters(tmp_path):
    cfg = corpus_config(tmp_path, steps=1)
    train(cfg, progress=False)
    model, ck = load_model(tmp_path / "run" / "checkpoint.pt")
    with pytest.raises(ValueError, match="never saw"):
        generate(model, ck["io"]["vocab"], "Zq", 5)


def test_config_errors_name_the_key_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  spec: lstm\n  dims: {H: 8}\ntask:\n  name: hello\ntrain:\n  steps: 10\n  lr_rate: 0.1\n")
    assert main(["train", str(bad)]) == 2
    assert f"{bad}:8: train.lr_rate: unknown key" in capsys.readouterr().err
    bad.write_text("model:\n  spec: lstm\ntask:\n  name: hello\ntrain:\n  steps: ten\n")
    assert main(["train", str(bad)]) == 2
    assert f"{bad}:6: train.steps: expected a whole number or null, got 'ten'" in capsys.readouterr().err
    bad.write_text("model:\n  spec: lstm\ntask:\n  name: adding\n  lenght: 5\ntrain:\n  steps: 1\n")
    assert main(["train", str(bad)]) == 2
    assert f"{bad}:5: task.lenght: unknown key" in capsys.readouterr().err
    bad.write_text("model:\n  dims: {H: 8}\ntask: {name: hello}\ntrain: {steps: 1}\n")
    assert main(["train", str(bad)]) == 2
    assert f"{bad}:1: model.spec: required" in capsys.readouterr().err
    bad.write_text("model: {spec: lstm}\ntask: {name: adding}\ntrain: {epochs: 2, clip: true}\n")
    assert main(["train", str(bad)]) == 2
    assert f"{bad}:3: train.clip: expected a number or null, got True" in capsys.readouterr().err


@pytest.mark.parametrize("task, line", [
    ("{name: corpus, val_fraction: 0.0}", "task.val_fraction: must be between 0 and 1"),
    ("{name: corpus, val_fraction: 1.0}", "task.val_fraction: must be between 0 and 1"),
    ("{name: adding, length: 0}", "task.length: must be at least 2"),
    ("{name: copy, alphabet: 1}", "task.alphabet: must be at least 2"),
    ("{name: reber, threshold: 1.5}", "task.threshold: must be between 0 and 1"),
])
def test_task_options_out_of_range_are_config_errors(tmp_path, capsys, task, line):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"model: {{spec: lstm, dims: {{H: 4}}}}\ntask: {task}\ntrain: {{steps: 1}}\n")
    assert main(["train", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2: {line}" in err, err


def test_configs_in_the_repository_are_valid():
    from specc.train import load_config

    files = sorted(Path(__file__).resolve().parent.parent.joinpath("configs").glob("*.yaml"))
    assert files
    for f in files:
        cfg = load_config(f)
        assert cfg["train"]["lr"] > 0 and cfg["model"]["spec"]


def test_ctrl_c_saves_after_the_step_and_resume_finishes_the_run(tmp_path, monkeypatch):
    import os
    import signal

    straight = train(corpus_config(tmp_path, steps=10, optimizer="adam", lr=0.01), progress=False)
    real, calls = loop_module.loss_sum, []

    def interrupting(task, pred, batch):
        if torch.is_grad_enabled():
            calls.append(1)
            if len(calls) == 5:
                os.kill(os.getpid(), signal.SIGINT)  # in the middle of step 5
        return real(task, pred, batch)

    cfg = corpus_config(tmp_path, steps=10, optimizer="adam", lr=0.01)
    cfg["out"] = str(tmp_path / "stopped")
    monkeypatch.setattr(loop_module, "loss_sum", interrupting)
    stopped = train(cfg, progress=False)
    monkeypatch.undo()
    assert stopped.status == "interrupted" and stopped.step == 5
    assert checkpoint.load(tmp_path / "stopped" / "checkpoint.pt")["step"] == 5
    resumed = train(cfg, resume=True, progress=False)
    assert resumed.history == straight.history
    assert all(torch.equal(v, straight.model.state_dict()[k]) for k, v in resumed.model.state_dict().items())


def test_device_cuda_trains_as_on_the_cpu_or_says_there_is_none(tmp_path):
    from specc.train import ConfigError

    cpu = corpus_config(tmp_path, steps=5)
    gpu = corpus_config(tmp_path, steps=5, device="cuda")
    gpu["out"] = str(tmp_path / "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="train.device: cuda, but torch sees no CUDA device"):
            train(gpu, progress=False)
        return
    a, b = train(cpu, progress=False), train(gpu, progress=False)  # NumPy backend, Triton backend
    assert np.allclose(a.history, b.history, atol=1e-4)
    model, _ = load_model(tmp_path / "cuda" / "checkpoint.pt")  # a CUDA checkpoint samples on the CPU
    assert len(generate(model, sorted(set(TEXT)), "F", 10)) == 10


def test_a_fresh_run_does_not_replace_an_existing_checkpoint(tmp_path, capsys):
    cfg = corpus_config(tmp_path, steps=2)
    train(cfg, progress=False)
    ckpt = tmp_path / "run" / "checkpoint.pt"
    before = ckpt.read_bytes()
    cfg_file = tmp_path / "again.yaml"
    cfg_file.write_text(f"model: {{spec: lstm, dims: {{H: 12}}}}\ntask: {{name: corpus, path: {tmp_path / 'corpus.txt'}}}\n"
                        f"train: {{batch_size: 2, seq_len: 8, steps: 1, threads: 1}}\nout: {tmp_path / 'run'}\n")
    assert main(["train", str(cfg_file), "--no-progress"]) == 2
    assert "--resume" in capsys.readouterr().err and ckpt.read_bytes() == before
    assert main(["train", str(cfg_file), "--no-progress", "--force"]) == 0
    assert checkpoint.load(ckpt)["step"] == 1


def test_metrics_csv_has_a_row_a_step_and_the_evaluations(tmp_path):
    import csv

    cfg = corpus_config(tmp_path, steps=6)
    result = train(cfg, progress=False)
    rows = list(csv.DictReader((tmp_path / "run" / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows] == list(range(1, 7))
    assert [float(r["train_loss"]) for r in rows] == pytest.approx(result.history, rel=1e-5)
    evals = {int(r["step"]): float(r["eval_loss"]) for r in rows if r["eval_loss"]}
    assert evals == pytest.approx({s: m["loss"] for s, m in result.evals}, rel=1e-5)
    log = (tmp_path / "run" / "train.log").read_text()
    assert "step 6: eval loss" in log


def test_schedules_follow_their_formulas_after_a_linear_warmup():
    import math

    lr, warm, total, floor = 0.1, 3, 13, 0.01
    t = dict(schedule="cosine", warmup=warm, min_lr=floor, decay_every=4, decay=0.5)

    def rates(t, total):
        opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
        sched = loop_module.make_scheduler(opt, t, total)
        out = []
        for _ in range(total):
            out.append(opt.param_groups[0]["lr"])  # the rate of this update
            opt.step()
            sched.step()
        return out

    want = [lr * (k + 1) / (warm + 1) for k in range(warm)]
    want += [floor + (lr - floor) * (1 + math.cos(math.pi * k / (total - warm))) / 2 for k in range(total - warm)]
    assert rates(t, total) == pytest.approx(want, rel=1e-6)
    assert rates(dict(t, schedule="step", warmup=0), 9) == pytest.approx([lr] * 4 + [lr / 2] * 4 + [lr / 4])
    assert rates(dict(t, schedule="constant", warmup=0), 5) == pytest.approx([lr] * 5)


def test_a_resumed_run_continues_its_schedule(tmp_path):
    def config(out, steps):
        cfg = corpus_config(tmp_path, steps=steps, optimizer="adam", lr=0.01, checkpoint_every=2, schedule="cosine",
                            warmup=2, min_lr=0.001)
        cfg["out"] = str(tmp_path / out)
        return cfg

    straight = train(config("a", 8), progress=False)
    # an interrupted run: stop after 4 updates of the 8-step schedule, then resume it
    cfg = config("b", 8)
    original = loop_module._Training.steps_done
    loop_module._Training.steps_done = lambda self: self.step >= 4 or original(self)
    try:
        train(cfg, progress=False)
    finally:
        loop_module._Training.steps_done = original
    resumed = train(config("b", 8), resume=True, progress=False)
    assert resumed.history == straight.history
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_accumulated_batches_make_the_update_of_their_mean_loss(tmp_path):
    """accumulate=2: one SGD update by the gradient of the mean of two batches' losses, against a
    hand-written update on the same two batches (same seed, so the same data and weights)."""
    raw = {"model": {"spec": "gru", "dims": {"H": 6}}, "task": {"name": "adding", "length": 5},
           "train": {"batch_size": 4, "steps": 1, "optimizer": "sgd", "lr": 0.5, "clip": None, "accumulate": 2,
                     "eval_every": 1000, "checkpoint_every": 1000, "threads": 1}, "out": str(tmp_path / "run")}
    cfg = config_from_dict(raw)
    result = train(cfg, progress=False)

    from specc.train.model import build_model
    from specc.train.tasks import Generated

    loop_module.seed_everything(0)
    task = loop_module.task_from_config(cfg)
    model = build_model(cfg["model"], task.n_in, task.n_out, task.inputs)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    source = Generated(task, 4, 0)
    losses = []
    for _ in range(2):
        batch, _ = source.next()
        pred, _ = model(batch.x)
        losses.append(((pred - batch.y) ** 2).mean(-1).mul(batch.mask).sum() / batch.mask.sum())
    (sum(losses) / 2).backward()
    with torch.no_grad():
        want = {k: before[k] - 0.5 * p.grad for k, p in model.named_parameters()}
    got = result.model.state_dict()
    assert result.history == pytest.approx([float(sum(losses).detach() / 2)], rel=1e-5)
    for k, v in want.items():
        assert torch.allclose(got[k], v, atol=1e-6), k


def test_early_stopping_on_the_evaluation_loss(tmp_path):
    assert loop_module.early_stop_due([(1, {"loss": 2.0}), (2, {"loss": 1.0}), (3, {"loss": 1.5})], 2) == ""
    why = loop_module.early_stop_due([(1, {"loss": 2.0}), (2, {"loss": 1.0}), (3, {"loss": 1.5}), (4, {"loss": 1.2})], 2)
    assert "best 1.0000 at step 2" in why
    # a learning rate too small to move a float32 weight: the evaluation loss never improves
    cfg = corpus_config(tmp_path, steps=50, optimizer="sgd", lr=1e-12, eval_every=1, early_stop=2)
    result = train(cfg, progress=False)
    assert result.status == "done" and result.step == 3 and "stopped early" in result.message


def test_training_options_are_checked(tmp_path):
    with pytest.raises(loop_module.ConfigError, match="cosine decays to min_lr"):
        corpus_config(tmp_path, steps=None, time_limit=5.0, schedule="cosine")
    with pytest.raises(loop_module.ConfigError, match="unknown schedule"):
        corpus_config(tmp_path, schedule="linear")
    with pytest.raises(loop_module.ConfigError, match="bf16 autocasts on CUDA"):
        corpus_config(tmp_path, precision="bf16")
    with pytest.raises(loop_module.ConfigError, match="accumulate: must be at least 1"):
        corpus_config(tmp_path, accumulate=0)
