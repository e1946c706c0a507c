"""Benchmarks against the naive ways people compute the structured NLL and sample today.

The scripts run from the repository's root as modules, ``python -m benchmarks.bench_nll``, and
import their neighbours one way, ``from benchmarks import common, harness`` (one copy of each
module; bench_vae_step also imports ``examples``). Scripts that are not benchmarks are in tools/.
Results go to benchmarks/results/.
"""
