"""The built-in tasks' data, checked against independent descriptions of each task."""
import hashlib
import re
from collections import defaultdict

import numpy as np
import pytest
import torch

from specc.train.tasks import (BUNDLED_CORPUS, REBER_SYMBOLS, AddingTask, CopyTask, CorpusTask, EmbeddedReberTask,
                               ForecastTask, MajorityTask, ReberTask, Stream, embedded_reber_string, reber_string)

# The Reber grammar as a regular expression, derived by hand from the graph in Cleeremans et al.
# (1989, fig. 1): from the node after P the loop T*VPX may repeat, then T*V and either V or PS.
_AFTER_P = r"(?:T*VPX)*T*V(?:V|PS)"
REBER_RE = rf"B(?:TS*X(?:S|X{_AFTER_P})|P{_AFTER_P})E"


def test_bundled_corpus_is_tiny_shakespeare():
    data = BUNDLED_CORPUS.read_bytes()
    assert len(data) == 1_115_394
    assert hashlib.sha256(data).hexdigest() == "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
    task = CorpusTask()
    assert task.n_in == task.n_out == 65
    assert len(task.train_ids) + len(task.val_ids) == len(data.decode())


@pytest.mark.parametrize("gen, pattern", [(reber_string, REBER_RE),
                                          (embedded_reber_string, rf"B(?:T{REBER_RE}T|P{REBER_RE}P)E")])
def test_reber_strings_are_in_the_language_and_legal_sets_are_the_continuations(gen, pattern):
    rng = np.random.default_rng(0)
    seen = defaultdict(set)  # prefix -> symbols observed to follow it
    count = defaultdict(int)
    claimed = {}
    for _ in range(3000):
        s, legal = gen(rng)
        assert re.fullmatch(pattern, s), s
        assert len(legal) == len(s) - 1
        for t in range(len(s) - 1):
            seen[s[:t + 1]].add(s[t + 1])
            count[s[:t + 1]] += 1
            assert claimed.setdefault(s[:t + 1], legal[t]) == legal[t]
            assert s[t + 1] in legal[t]
    # Prefixes seen often enough have shown every continuation (each is taken with probability 1/2).
    common = [p for p in seen if count[p] >= 40]
    assert len(common) > 10
    for p in common:
        assert seen[p] == claimed[p], p


def test_embedded_reber_second_to_last_symbol_repeats_the_second():
    rng = np.random.default_rng(1)
    for _ in range(200):
        s, legal = embedded_reber_string(rng)
        assert s[-2] == s[1] and legal[-2] == {s[1]} and legal[0] == {"T", "P"}


def test_reber_batch_targets_and_legal_sets_line_up():
    task = EmbeddedReberTask()
    b = task.batch(np.random.default_rng(2), 16)
    for col in range(16):
        n = int(b.mask[:, col].sum())
        assert not b.mask[n:, col].any()
        x = "".join(REBER_SYMBOLS[k] for k in b.x[:n, col])
        y = "".join(REBER_SYMBOLS[k] for k in b.y[:n, col])
        assert x[1:] == y[:-1] and y[-1] == "E" and x[0] == "B"
        for t in range(n):
            assert b.extra["legal"][t, col, REBER_SYMBOLS.index(y[t])]


def test_reber_metrics_judge_sets_with_the_threshold():
    task = ReberTask()
    b = task.batch(np.random.default_rng(3), 8)

    class Oracle(torch.nn.Module):  # puts equal probability on exactly the legal symbols
        def forward(self, x, state=None):
            legal = b.extra["legal"].double()
            return torch.log(legal / legal.sum(-1, keepdim=True).clamp(min=1) + 1e-12), None

    assert task.metrics(Oracle(), [b]) == {"positions": 1.0, "sequences": 1.0, "penultimate": 1.0}

    class Unigram(torch.nn.Module):  # ignores the input: cannot be right everywhere
        def forward(self, x, state=None):
            return torch.zeros(x.shape + (7,)), None

    assert task.metrics(Unigram(), [b])["positions"] == 0.0


def test_adding_problem():
    task = AddingTask(length=50)
    b = task.batch(np.random.default_rng(4), 4096)
    values, marks = b.x[..., 0], b.x[..., 1]
    assert (marks.sum(0) == 2).all()
    assert (marks[:25].sum(0) == 1).all() and (marks[25:].sum(0) == 1).all()
    assert torch.allclose(b.y[-1, :, 0], (values * marks).sum(0))
    assert b.mask[-1].all() and not b.mask[:-1].any()
    always_one = ((b.y[-1, :, 0] - 1) ** 2).mean().item()
    assert abs(always_one - 1 / 6) < 0.01


def test_copy_task():
    task = CopyTask(symbols=4, delay=6, alphabet=5)
    b = task.batch(np.random.default_rng(5), 32)
    assert b.x.shape == (4 + 6 + 4, 32)
    assert torch.equal(b.y[-4:], b.x[:4])
    assert (b.x[:4] < 5).all() and (b.x[9] == task.go).all()
    assert b.mask.sum() == 4 * 32 and b.mask[-4:].all()


def test_majority_labels():
    task = MajorityTask(length=9)
    b = task.batch(np.random.default_rng(6), 64)
    for col in range(64):
        bits = b.x[:, col].tolist()
        assert b.y[-1, col].item() == int(bits.count(1) > bits.count(0))


def test_forecast_targets_are_the_next_value():
    b = ForecastTask(length=30).batch(np.random.default_rng(7), 8)
    assert torch.equal(b.x[1:], b.y[:-1]) and b.x.shape == (30, 8, 1)


def test_stream_chunks_tile_each_segment_and_wrap_into_a_new_epoch():
    ids = np.arange(103)
    s = Stream(ids, batch=3, k=5)  # segments of 34: 6 chunks each
    xs, fresh = [], []
    for _ in range(7):
        b, f = s.next()
        xs.append(b.x)
        fresh.append(f)
        assert torch.equal(b.y, b.x + 1)
    assert fresh == [True, False, False, False, False, False, True]
    x = torch.cat(xs[:6])
    for col in range(3):
        assert x[:, col].tolist() == list(range(34 * col, 34 * col + 30))
    assert torch.equal(xs[6], xs[0]) and s.epoch == 1


@pytest.mark.parametrize("task, spec, steps, measure, good", [
    ({"name": "majority", "length": 11}, "lstm", 300, "accuracy", lambda m: m["accuracy"] >= 0.9),
    ({"name": "forecast", "length": 30}, "gru", 200, "mse", lambda m: m["mse"] < 0.3 * m["repeat_last"]),
    ({"name": "copy", "symbols": 3, "delay": 5, "alphabet": 4}, "lstm", 400, "accuracy",
     lambda m: m["accuracy"] >= 0.6),
])
def test_compiled_cells_learn_the_small_tasks(tmp_path, task, spec, steps, measure, good):
    from specc.train import config_from_dict, train

    cfg = config_from_dict({"model": {"spec": spec, "dims": {"H": 32 if task["name"] == "copy" else 16}},
                            "task": task, "out": str(tmp_path),
                            "train": {"steps": steps, "lr": 0.01, "eval_every": 10**6, "checkpoint_every": 10**6}})
    metrics = train(cfg, progress=False).evals[-1][1]
    assert good(metrics), metrics
