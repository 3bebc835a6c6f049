"""The first thing to run: compile the LSTM spec, show the code, learn the letters of "hello"."""
from __future__ import annotations

import torch
from torch import nn

WORD = "hello"


def run(steps: int = 300, show: bool = False, seed: int = 0) -> int:
    from . import program
    from .pipeline import compile_spec
    from .runtime import CellModule

    compiled = compile_spec("lstm")
    if show:
        print(compiled.source)
        print("=" * 78)
    else:
        print(f"Compiled specs/lstm.rnn into {len(compiled.source.splitlines())} lines of Python, Triton and C "
              f"(specc demo --show prints them).")
    torch.manual_seed(seed)
    letters = sorted(set(WORD))
    index = {ch: k for k, ch in enumerate(letters)}
    V, H = len(letters), 16
    cell = CellModule(program(compiled), dict(I=V, H=H))
    head = nn.Linear(H, V)
    x = torch.eye(V)[[index[ch] for ch in WORD[:-1]]].unsqueeze(1)  # (T, 1, V): h e l l
    y = torch.tensor([index[ch] for ch in WORD[1:]])  # e l l o
    opt = torch.optim.Adam(list(cell.parameters()) + list(head.parameters()), lr=0.05)
    print(f"Training the compiled lstm (I={V}, H={H}) to predict the next letter of {WORD!r}:")
    for step in range(1, steps + 1):
        out, _ = cell(x)
        loss = nn.functional.cross_entropy(head(out[:, 0]), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == 1 or step % max(steps // 6, 1) == 0:
            print(f"  step {step:4d}  loss {loss.item():.4f}")
    with torch.no_grad():
        out, _ = cell(x)
        guess = "".join(letters[k] for k in head(out[:, 0]).argmax(-1).tolist())
    print(f"given {WORD[:-1]!r} it predicts {guess!r} (target {WORD[1:]!r})")
    return 0 if guess == WORD[1:] else 1
