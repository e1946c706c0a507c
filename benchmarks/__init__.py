"""Benchmarks against the naive ways people compute the structured NLL and sample today.

The scripts run from the repository's root: ``python benchmarks/bench_nll.py`` (they import their
neighbours ``common`` and ``harness`` as the script's folder is on the path), and, because it also
imports ``examples``, ``python -m benchmarks.bench_vae_step``. Results go to benchmarks/results/.
"""
