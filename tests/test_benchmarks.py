"""The benchmark scripts still run (tiny sizes, results written to a temporary folder).

They check every contender against the reference before timing, so this also
checks the peers (one-hot convolution, unfold, scipy, sparse CSR, dense) agree.
"""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("script", ["bench_nll.py", "bench_solve_upper.py", "bench_nll_basis.py"])
def test_benchmark_script_runs(script, tmp_path):
    pytest.importorskip("scipy")
    env = dict(os.environ, STRUCTLIK_BENCH_RESULTS=str(tmp_path), STRUCTLIK_BACKEND="")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), "--quick", "--device", "cpu",
                           "--min-run-time", "0.01"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    family = script[len("bench_"):-len(".py")]
    assert (tmp_path / f"{family}-cpu.csv").exists() and (tmp_path / f"{family}-cpu.md").exists()
    assert "| fused |" in (tmp_path / f"{family}-cpu.md").read_text()
