"""Differential testing: random cells (gen.py), an independent torch reference (reference.py), and
every backend compared with it (run.py); `python -m specc.fuzz --cells N` for long runs."""
