"""Checkpoints: written atomically (a temporary file renamed over the old one), read with
torch.load(weights_only=True), so loading one runs no code from it."""
from __future__ import annotations

import pickle
import random
import zipfile
from pathlib import Path

import numpy as np
import torch

from ..atomic import write_atomically

FORMAT = "specc-train/1"


def save(path: str | Path, payload: dict) -> None:
    write_atomically(path, lambda f: torch.save(dict(payload, format=FORMAT), f))


class CheckpointError(ValueError):
    """A file that is not a readable specc checkpoint: one line saying what is wrong with it."""


def load(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory; give its checkpoint.pt")
    if path.exists() and path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file, not a checkpoint")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError:
        # torch's message advises weights_only=False, which would run any code the file holds.
        raise CheckpointError(f"{path}: holds objects other than tensors and plain data; specc does not load "
                              f"such files (unpickling them could run code from them)") from None
    except Exception as e:  # a text file, a truncated zip, another format: torch's errors say little
        what = "truncated or damaged" if zipfile.is_zipfile(path) or _starts_like_zip(path) else "not a checkpoint file"
        raise CheckpointError(f"{path}: {what} ({type(e).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a specc training checkpoint (a torch file of something else)")
    return payload


def _starts_like_zip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def rng_states() -> dict:
    """Every random number generator in play, in types that weights_only loading accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                      "has_gauss": has_gauss, "gauss": gauss}}


def set_rng_states(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    n = s["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
