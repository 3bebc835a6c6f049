"""What a new user tries on the command line, run as they run it (a subprocess): each mistake is
one line on stderr saying what is wrong, and a non-zero exit; never a traceback (issue 18)."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from specc.train import checkpoint


def specc(*args, cwd=None):
    done = subprocess.run([sys.executable, "-m", "specc.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600, cwd=cwd)
    return done.returncode, done.stdout, done.stderr


def one_line_error(rc, err, *words):
    assert rc != 0
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    for w in words:
        assert w in lines[0], lines[0]


@pytest.fixture(scope="module")
def reber_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("reber")
    cfg = out / "reber.yaml"
    cfg.write_text(f"model: {{spec: elman, dims: {{H: 8}}, head: false}}\ntask: {{name: reber}}\n"
                   f"train: {{batch_size: 4, steps: 2}}\nout: {out / 'run'}\n")
    rc, _, err = specc("train", cfg, "--no-progress")
    assert rc == 0, err
    return out / "run" / "checkpoint.pt"


def test_sample_of_a_model_not_trained_on_text(reber_checkpoint):
    rc, _, err = specc("sample", reber_checkpoint)
    one_line_error(rc, err, "not a language model (task reber)")


def test_unreadable_checkpoints(tmp_path, reber_checkpoint):
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    text = tmp_path / "text.pt"
    text.write_text("hello, not a checkpoint\n")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(reber_checkpoint.read_bytes()[:2000])

    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    code = tmp_path / "code.pt"
    torch.save({"format": checkpoint.FORMAT, "x": Payload()}, code)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.ones(2)}, other)
    for path, words in ((empty, ["empty file"]), (text, ["not a checkpoint file"]), (truncated, ["truncated"]),
                        (code, ["specc does not load such files"]), (other, ["not a specc training checkpoint"]),
                        (tmp_path, ["is a directory"])):
        rc, out, err = specc("sample", path)
        one_line_error(rc, err, str(path), *words)
        assert "weights_only" not in err and "must never run" not in out + err


def test_config_with_an_unknown_dimension_is_located(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model:\n  spec: lstm\n  dims:\n    H: 8\n    Q: 3\ntask: {{name: hello}}\ntrain: {{steps: 2}}\n"
                   f"out: {tmp_path / 'run'}\n")
    rc, _, err = specc("train", cfg, "--no-progress")
    one_line_error(rc, err, f"{cfg}:5:", "no dimension Q")


def test_sizes_beyond_memory_are_refused_before_allocating(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {{spec: lstm, dims: {{H: 1000000000}}}}\ntask: {{name: hello}}\ntrain: {{steps: 2}}\n"
                   f"out: {tmp_path / 'run'}\n")
    rc, _, err = specc("train", cfg, "--no-progress")
    one_line_error(rc, err, "W_hh", "more than this machine's memory")


def test_compile_mistakes(tmp_path):
    two = tmp_path / "two.rnn"
    two.write_text("cell a(H) {\n state h[H] = zeros\n h' = h\n output h'\n}\n"
                   "cell b(H) {\n state h[H] = zeros\n h' = h\n output h'\n}\n")
    rc, _, err = specc("compile", two)  # several cells: which one?
    one_line_error(rc, err, "--cell")
    rc, _, err = specc("compile", "specs/networks.rnn", "-o", tmp_path / "x.py")
    assert rc != 0 and "network" in err and "Traceback" not in err and not (tmp_path / "x.py").exists()
    rc, _, err = specc("compile", "lstm", "-o", tmp_path)
    one_line_error(rc, err, "is a directory")
    rc, _, err = specc("check", "/dev/zero")
    one_line_error(rc, err, "/dev/zero")


def test_library_names_work_on_the_command_line(tmp_path):
    rc, out, err = specc("check", "lstm", cwd=tmp_path)  # no specs/ folder here
    assert rc == 0 and "lstm" in out, err


def test_sample_of_a_hello_model_without_a_sample_section(tmp_path):
    """The default prime is "\\n", which "hello" never has: sampling starts from a letter it knows."""
    cfg = tmp_path / "hello.yaml"
    cfg.write_text(f"model: {{spec: lstm, dims: {{H: 8}}}}\ntask: {{name: hello}}\n"
                   f"train: {{batch_size: 4, seq_len: 10, steps: 3}}\nout: {tmp_path / 'run'}\n")
    rc, out, err = specc("train", cfg, "--no-progress")
    assert rc == 0 and "A sample" in out, err
    rc, out, err = specc("sample", tmp_path / "run" / "checkpoint.pt", "--length", "10")
    assert rc == 0 and len(out.strip()) == 11 and set(out.strip()) <= set("helo"), err


def test_a_network_fed_back_names_the_keyword_and_prints_the_users_cell():
    import specc as lib

    net = lib.load("char_lm", V=5, E=3, H=4)
    with pytest.raises(TypeError, match=r"pass the targets by name, net\(next=\.\.\.\)"):
        net(torch.zeros(3, 2, dtype=torch.long))
    shown = str(net)
    assert "CellModule(lstm, I=3, H=4)" in shown and "masked" not in shown


def test_a_network_layer_beyond_memory_is_refused_before_allocating():
    import specc as lib

    with pytest.raises(ValueError, match="layer embed's weight .* more than this machine's memory"):
        lib.load("classifier", V=10**10, E=64, H=8, C=3)
