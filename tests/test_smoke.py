"""The main job works end to end: compile the LSTM spec and learn "hello"."""
from specc.demo import run


def test_demo_learns_hello(capsys):
    assert run(steps=150) == 0
    out = capsys.readouterr().out
    assert "predicts 'ello'" in out and len(out.splitlines()) < 20, "quiet unless --show"
