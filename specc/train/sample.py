"""Sampling text from a trained language model: prime it, then draw one token at a time."""
from __future__ import annotations

import torch

from . import checkpoint
from .model import SequenceModel, build_model


def load_model(path) -> tuple[SequenceModel, dict]:
    """The model in a training checkpoint, and the checkpoint (its config, vocabulary, ...)."""
    ck = checkpoint.load(path)
    io = ck["io"]
    model_cfg = ck["config"]["model"]
    if "spec" in ck:  # the spec's own text: the file it came from need not exist any more
        model_cfg = dict(model_cfg, spec=ck["spec"]["text"], cell=ck["spec"]["cell"])
    model = build_model(model_cfg, io["n_in"], io["n_out"], io["inputs"])
    try:
        model.load_state_dict(ck["model"])
    except RuntimeError as e:
        raise checkpoint.CheckpointError(f"{path}: its weights do not fit the model it describes "
                                         f"({str(e).splitlines()[0]})") from None
    return model, ck


def generate(model: SequenceModel, vocab: list[str], prime: str, length: int, temperature: float = 0.8,
             seed: int = 0) -> str:
    """`length` characters after `prime`. temperature 0 takes the most likely one each time."""
    index = {ch: k for k, ch in enumerate(vocab)}
    unknown = sorted(set(prime) - set(index))
    if unknown:
        raise ValueError(f"the prime text has characters the model never saw: {''.join(unknown)!r}")
    if not prime:
        raise ValueError("the prime text is empty; give at least one character")
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # no dropout between stacked layers while sampling
    try:
        with torch.no_grad():
            return "".join(_draw(model, [index[ch] for ch in prime], length, temperature, gen, device, vocab))
    finally:
        model.train(was_training)


def _draw(model, prime: list[int], length: int, temperature: float, gen, device, vocab):
    logits, state = model(torch.tensor(prime, device=device).unsqueeze(1))
    last = logits[-1, 0]
    for _ in range(length):
        if temperature <= 0:
            k = int(last.argmax())
        else:
            probs = torch.softmax(last.double().cpu() / temperature, -1)
            k = int(torch.multinomial(probs, 1, generator=gen))
        yield vocab[k]
        logits, state = model(torch.tensor([[k]], device=device), state)
        last = logits[-1, 0]
