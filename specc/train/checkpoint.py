"""Checkpoints: written atomically (a temporary file renamed over the old one), read with
torch.load(weights_only=True), so loading one runs no code from it."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from ..atomic import write_atomically

FORMAT = "specc-train/1"


def save(path: str | Path, payload: dict) -> None:
    write_atomically(path, lambda f: torch.save(dict(payload, format=FORMAT), f))


def load(path: str | Path) -> dict:
    payload = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path}: not a specc training checkpoint")
    return payload


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
