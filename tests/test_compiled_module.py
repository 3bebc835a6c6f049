"""`specc compile` writes a module that runs on its own and computes what specc.load computes.

For every cell of every spec in specs/: the CLI (a subprocess) compiles it to a file; this
process saves random parameters (a state_dict of specc.load's module), an input, initial states,
and specc.load's outputs and gradients; then a fresh Python process, which never runs the
compiler, imports the file, builds its class, loads the state_dict, runs the saved input and
saves what it got. The two must agree to 1e-12 in float64.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from specc.runtime import own_inputs

F64 = torch.float64
T, B = 4, 3


def specc_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "specc.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


def class_name(cell: str) -> str:
    """CamelCase of the cell's name: lstm -> Lstm, gru_cho -> GruCho, second_order -> SecondOrder."""
    return "".join(part[:1].upper() + part[1:] for part in cell.split("_") if part)


def test_class_name_rule():
    assert [class_name(c) for c in ("lstm", "gru_cho", "second_order", "rnn_tanh")] == \
        ["Lstm", "GruCho", "SecondOrder", "RnnTanh"]


# The fresh process: only the compiled files, torch, and what they import themselves.
RUNNER = textwrap.dedent('''
    import importlib, sys, traceback
    import torch
    folder = sys.argv[1]
    sys.path.insert(0, folder)
    jobs = torch.load(folder + "/jobs.pt")
    results = {}
    for job in jobs:
        try:
            module = importlib.import_module(job["module"])
            cls = getattr(module, job["class"])
            m = cls(dtype=torch.float64, **job["dims"])
            m.load_state_dict(job["state_dict"])
            xs = [x.clone().requires_grad_() for x in job["xs"]]
            states = [s.clone().requires_grad_() for s in job["states"]]
            x_arg = xs[0] if len(xs) == 1 else (tuple(xs) if xs else None)
            torch.manual_seed(0)
            outs, finals = m(x_arg, states[0] if len(states) == 1 else tuple(states),
                             **({} if xs else {"steps": job["T"]}))
            outs = [outs] if isinstance(outs, torch.Tensor) else list(outs)
            finals = [finals] if isinstance(finals, torch.Tensor) else list(finals)
            loss = sum((o * w).sum() for o, w in zip(outs + finals, job["weights"]))
            grads = torch.autograd.grad(loss, [*xs, *states, *m.parameters()])
            results[job["id"]] = {"outs": outs, "finals": finals, "grads": list(grads),
                                  "params": [n for n, _ in m.named_parameters()]}
        except Exception:
            results[job["id"]] = {"error": traceback.format_exc()}
    results["_modules"] = sorted(sys.modules)
    torch.save(results, folder + "/results.pt")
''')


@pytest.fixture(scope="module")
def compiled(tmp_path_factory, all_spec_cells, load_small, repo_root):
    """Compile every cell with the CLI, then run them all in one fresh process."""
    folder = tmp_path_factory.mktemp("compiled")
    (folder / "tmp").mkdir()
    cli, jobs, expected = {}, [], {}
    for k, sc in enumerate(all_spec_cells):
        sp, dims = load_small(sc, F64)
        target = folder / "tmp" / f"{sc.cell}_mod.py"
        # As a person types it, from the repository root: specc compile specs/X.rnn -o tmp/x_mod.py
        # a file of several cells, or of networks beside its cell, needs --cell
        several = sum(c.path == sc.path for c in all_spec_cells) > 1 or "\nnetwork " in sc.path.read_text()
        args = ["compile", sc.path.relative_to(repo_root), "-o", target] + (["--cell", sc.cell] if several else [])
        cli[sc.id] = specc_cli(*args, cwd=repo_root)

        torch.manual_seed(100 + k)
        with torch.no_grad():
            for p in sp.parameters():
                p.copy_(torch.randn_like(p) * 0.5)
        prog = sp.program
        inputs = [torch.randn(T, B, sp.sizes["inputs"][n][0], dtype=F64) for n in own_inputs(prog)]
        states = [torch.randn(B, sp.sizes["states"][n][0], dtype=F64) for n in prog.STATES]
        xs, ss = [x.clone().requires_grad_() for x in inputs], [s.clone().requires_grad_() for s in states]
        x_arg = xs[0] if len(xs) == 1 else (tuple(xs) if xs else None)
        torch.manual_seed(0)  # a cell's own dropout draws its masks; the runner seeds the same
        outs, finals = sp(x_arg, ss[0] if len(ss) == 1 else tuple(ss), **({} if xs else {"steps": T}))
        outs = [outs] if isinstance(outs, torch.Tensor) else list(outs)
        finals = [finals] if isinstance(finals, torch.Tensor) else list(finals)
        weights = [torch.randn_like(o) for o in outs + finals]
        loss = sum((o * w).sum() for o, w in zip(outs + finals, weights))
        grads = torch.autograd.grad(loss, [*xs, *ss, *sp.parameters()])
        expected[sc.id] = {"outs": [o.detach() for o in outs], "finals": [f.detach() for f in finals],
                           "grads": list(grads), "params": [n for n, _ in sp.named_parameters()]}
        jobs.append({"id": sc.id, "module": f"{sc.cell}_mod", "class": class_name(sc.cell), "dims": dims,
                     "state_dict": sp.state_dict(), "xs": inputs, "states": states, "weights": weights, "T": T})
    torch.save(jobs, folder / "tmp" / "jobs.pt")
    (folder / "runner.py").write_text(RUNNER)
    # A fresh interpreter, started away from the repository.
    run = subprocess.run([sys.executable, str(folder / "runner.py"), str(folder / "tmp")], capture_output=True,
                         text=True, cwd=folder, timeout=300)
    assert run.returncode == 0, run.stderr
    results = torch.load(folder / "tmp" / "results.pt")
    return {"cli": cli, "expected": expected, "results": results, "folder": folder / "tmp"}


def test_compiled_module_matches_specc_load(spec_cell, compiled):
    proc = compiled["cli"][spec_cell.id]
    assert proc.returncode == 0, proc.stderr
    assert (compiled["folder"] / f"{spec_cell.cell}_mod.py").is_file()
    got = compiled["results"][spec_cell.id]
    assert "error" not in got, got.get("error")
    want = compiled["expected"][spec_cell.id]
    assert got["params"] == want["params"]
    for kind in ("outs", "finals", "grads"):
        assert len(got[kind]) == len(want[kind])
        for i, (g, w) in enumerate(zip(got[kind], want[kind])):
            assert g.dtype == F64 and g.shape == w.shape, (kind, i, g.dtype, g.shape, w.shape)
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12, msg=lambda m: f"{kind}[{i}]: {m}")


def test_compiled_module_runs_without_the_compiler(compiled):
    """The fresh process imported the compiled files but never the compiler (nor lark)."""
    modules = set(compiled["results"]["_modules"])
    assert "specc.runtime" in modules
    for compiler_part in ("specc.pipeline", "specc.parse", "specc.check", "specc.autodiff", "lark"):
        assert compiler_part not in modules, f"the compiled module pulled in {compiler_part}"


@pytest.mark.parametrize("spec, cell, names", [
    ("lstm", None, ["Lstm", "W_ih", "W_hh", "b_ih", "b_hh", "c'", "sigmoid", "def forward", "def backward"]),
    ("gru_cho", None, ["GruCho", "W_z", "U_r", "b_z", "n = tanh", "def forward", "def backward"]),
    ("elman", "shortcut", None),
    ("elman", "rnn_relu", ["RnnRelu", "W_ih", "relu", "def forward"]),
    ("second_order", None, ["SecondOrder", "contract", "'W'", "def backward"]),
], ids=["lstm", "gru_cho", "elman-wrong-cell", "rnn_relu", "second_order"])
def test_compile_show_prints_the_code(spec, cell, names, repo_root, tmp_path):
    args = ["compile", repo_root / "specs" / f"{spec}.rnn", "--show"] + (["--cell", cell] if cell else [])
    proc = specc_cli(*args, cwd=tmp_path)
    if names is None:  # a cell the file does not define: an error naming the ones it does
        assert proc.returncode == 1
        assert "rnn_tanh" in proc.stderr and "Traceback" not in proc.stderr
        return
    assert proc.returncode == 0, proc.stderr
    for name in names:
        assert name in proc.stdout, f"{name!r} not in the shown code"
    compile(proc.stdout, f"<{spec}>", "exec")  # it is Python
    assert list(tmp_path.iterdir()) == []  # --show alone writes nothing


def test_compile_refuses_to_overwrite_a_foreign_file(repo_root, tmp_path):
    target = tmp_path / "x_mod.py"
    mine = "# my own module\nprint('hello')\n"
    target.write_text(mine)
    proc = specc_cli("compile", repo_root / "specs" / "gru.rnn", "-o", target)
    assert proc.returncode == 1
    assert target.read_text() == mine
    assert str(target.name) in proc.stderr and "Traceback" not in proc.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["x_mod.py"]  # no temporary file left behind
    # A file specc wrote is simply replaced (the refusal is not blanket) ...
    other = tmp_path / "y_mod.py"
    assert specc_cli("compile", repo_root / "specs" / "gru.rnn", "-o", other).returncode == 0
    proc = specc_cli("compile", repo_root / "specs" / "lstm.rnn", "-o", other)
    assert proc.returncode == 0, proc.stderr
    assert "class Lstm" in other.read_text()
    # ... and --force overrides the refusal.
    proc = specc_cli("compile", repo_root / "specs" / "gru.rnn", "-o", target, "--force")
    assert proc.returncode == 0, proc.stderr
    assert "class Gru" in target.read_text()


def test_check_good_specs_exits_0(repo_root, all_spec_cells):
    files = sorted((repo_root / "specs").glob("*.rnn"))
    proc = specc_cli("check", *files, cwd=repo_root)
    assert proc.returncode == 0, proc.stderr
    for sc in all_spec_cells:
        assert f"cell {sc.cell}(" in proc.stdout


def test_check_bad_spec_exits_1_with_location(tmp_path):
    bad = tmp_path / "bad.rnn"
    bad.write_text("cell bad(I, H) {\n    input x[I]\n    state h[H] = zeros\n    param W[H, I]\n"
                   "    h' = tanh(W @ h)\n    output h'\n}\n")
    proc = specc_cli("check", bad)
    assert proc.returncode == 1
    assert "bad.rnn:5:" in proc.stderr and "Traceback" not in proc.stderr
