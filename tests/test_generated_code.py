"""What a spec and its file name can put into generated code: names and text, never code.

Generated modules are executed; the spec's identifiers are checked by the grammar and the checker,
and everything else from the user (docstrings, file names, quoted source lines) must arrive as
text: in comments, docstrings or string literals that it cannot leave.
"""
from __future__ import annotations

import copy
import io
import pickle
import sys
from pathlib import Path

import pytest
import torch

import specc
from specc.assemble import class_name

CELL = '''cell c(I, H) {
    """%s"""
    input x[I]
    state h[H] = zeros
    param W[H, I]
    h' = tanh(W @ x + h)
    output h'
}
'''


def test_a_file_name_cannot_run_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    name = "evil\nimport os; os.system('touch PWNED')\n#.rnn"
    Path(name).write_text(CELL % "doc", encoding="utf-8")
    module = specc.load(Path(name), I=2, H=3)
    module(torch.randn(2, 1, 2))
    assert not (tmp_path / "PWNED").exists()
    # the name still shows, flattened to one line, where the code says where it came from
    assert "evil?import os" in module.program.__doc__


@pytest.mark.parametrize("doc", ['ends with a backslash \\', "quotes ' and \" inside", "a NUL \x00 byte"])
def test_docstrings_stay_docstrings(doc):
    module = specc.load(CELL % doc, I=2, H=3)
    assert module.program.DOC == doc  # the exact text, as data
    assert module(torch.randn(2, 1, 2))[0].shape == (2, 1, 3)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("dim", ["BLOCK_B", "offs_b", "pid_b", "k0", "operand", "weight", "dev", "Fraction",
                                 "check_sizes", "mask_f"])
def test_dimensions_may_take_the_generated_codes_names(dim):
    """The generated code renames such a dimension for itself (specc/dimnames.py); the spec, load
    and the module keep its name. Every backend against NumPy's."""
    from helpers import assert_text_spec_matches_numpy

    text = f"cell c({dim}) {{\n  input x[{dim}]\n  state h[{dim}]\n  param W[{dim}, {dim}]\n  h' = tanh(W @ h + x)\n  output h'\n}}\n"
    for backend in ("c", "triton"):
        module = assert_text_spec_matches_numpy(text, backend, **{dim: 3})
        assert module.dims == {dim: 3}


@pytest.mark.parametrize("cell, expected", [("none", "NoneCell"), ("true", "TrueCell"), ("fraction", "FractionCell"),
                                            ("gru_cho", "GruCho"), ("cell_module", "CellModuleCell")])
def test_class_names_are_never_keywords_or_module_names(cell, expected):
    assert class_name(cell) == expected
    text = CELL.replace("cell c(", f"cell {cell}(") % "doc"
    module = specc.load(text, I=2, H=3)
    assert getattr(module.program, expected).__name__ == expected


def test_modules_deepcopy_and_pickle():
    module = specc.load("gru", I=3, H=4)
    x = torch.randn(5, 2, 3)
    want, _ = module(x)
    twin = copy.deepcopy(module)
    assert torch.equal(twin(x)[0], want)
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    assert torch.equal(torch.load(buffer, weights_only=False)(x)[0], want)
    # and in a process that never compiled it
    import subprocess

    blob = pickle.dumps(module)
    code = ("import pickle, sys, torch; m = pickle.loads(sys.stdin.buffer.read()); "
            "torch.manual_seed(0); print(m(torch.ones(2, 1, 3))[0].sum().item())")
    out = subprocess.run([sys.executable, "-c", code], input=blob, capture_output=True, check=True)
    assert float(out.stdout) == pytest.approx(module(torch.ones(2, 1, 3))[0].sum().item(), abs=1e-6)


def test_networks_deepcopy():
    net = specc.load("reverse", V=12, E=4, H=8)
    twin = copy.deepcopy(net)
    src = torch.randint(1, 12, (5, 2))
    torch.testing.assert_close(twin(src, target=src), net(src, target=src))
