"""The main job works end to end: compile the LSTM spec and learn "hello"."""
from specc.demo import run


def test_demo_learns_hello(capsys):
    assert run(steps=150, show=False) == 0
    assert "predicts 'ello'" in capsys.readouterr().out
