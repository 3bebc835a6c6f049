"""Multi-process training: 2 CPU processes with gloo, as torchrun starts them."""
import os
import socket
import subprocess
import sys

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

from specc.train import checkpoint, config_from_dict, train


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(tmp_path, task: dict, out: str) -> dict:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("It is the east, and Juliet is the sun.\nArise, fair sun, and kill the envious moon.\n" * 6)
    if task["name"] == "corpus":
        task = dict(task, path=str(corpus))
    return {"model": {"spec": "lstm", "dims": {"H": 10}}, "task": task,
            "train": {"batch_size": 8, "seq_len": 6, "steps": 12, "lr": 0.02, "clip": 0.5, "threads": 1,
                      "eval_every": 5, "checkpoint_every": 4},
            "out": str(tmp_path / out)}


def _worker(rank: int, world: int, port: int, raws: list, dump: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    for k, raw in enumerate(raws):
        result = train(config_from_dict(raw), progress=False)
        torch.save({"model": result.model.state_dict(), "history": result.history}, f"{dump}/run{k}-rank{rank}.pt")
    dist.destroy_process_group()


def test_two_processes_stay_identical_and_match_one_process(tmp_path):
    # Reber strings have different lengths, so each process's share has its own number of counted
    # positions; the corpus is read in chunks with the state carried across them.
    # The third: two stacked layers with dropout between them, whose masks the processes draw as one would.
    tasks = [{"name": "reber"}, {"name": "corpus"}, {"name": "corpus"}]
    raws = [_config(tmp_path, task, f"ddp{k}") for k, task in enumerate(tasks)]
    raws[2]["model"].update(layers=2, dropout=0.3)
    mp.spawn(_worker, args=(2, _free_port(), raws, str(tmp_path)), nprocs=2, join=True)
    for k, task in enumerate(tasks):
        a, b = (torch.load(tmp_path / f"run{k}-rank{r}.pt", weights_only=True) for r in range(2))
        one = _config(tmp_path, task, f"single{k}")
        one["model"] = raws[k]["model"]
        single = train(config_from_dict(one), progress=False)
        assert all(torch.equal(a["model"][n], b["model"][n]) for n in a["model"])  # the replicas never drift apart
        assert a["history"] == b["history"]
        # One process on the same global batch: the same losses and weights, up to summation order.
        assert np.allclose(a["history"], single.history, rtol=1e-5, atol=1e-6)
        mine = single.model.state_dict()
        assert all(torch.allclose(a["model"][n], mine[n], atol=1e-5) for n in mine)
    # Rank 0's checkpoint holds the carried state of all 8 streams, gathered from both processes.
    carry = checkpoint.load(tmp_path / "ddp1" / "checkpoint.pt")["carry"]
    mine = checkpoint.load(tmp_path / "single1" / "checkpoint.pt")["carry"]
    assert carry[0].shape == (8, 10) and all(torch.allclose(x, y, atol=1e-5) for x, y in zip(carry, mine))


def test_torchrun_runs_specc_train(tmp_path):
    raw = _config(tmp_path, {"name": "reber"}, "torchrun")
    raw["train"]["steps"] = 4
    cfg = tmp_path / "ddp.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(_free_port()), "-m", "specc.cli", "train", str(cfg), "--no-progress"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("step 4: checkpoint") == 1  # printed by rank 0 only
    assert checkpoint.load(tmp_path / "torchrun" / "checkpoint.pt")["step"] == 4
