"""The benchmark scripts still run (tiny sizes, results written to a temporary folder).

They check every contender against the reference before timing, so this also
checks the peers (one-hot convolution, unfold, scipy, sparse CSR, dense) agree.
"""
import csv
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One OpenMP thread in the scripts' processes: on a 2-core Xeon VM the first float64 computations of
# about one process in three came out 1e-8 off (a reference solve, a dense matmul; see
# benchmarks/bench_solve_upper.py: exactness), 0 in 34 runs with one thread. Timings do not matter here.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.mark.parametrize("script", ["bench_nll.py", "bench_solve_upper.py", "bench_nll_basis.py", "bench_vae_step.py",
                                    "bench_cross.py", "bench_volume.py", "bench_low_rank.py"])
def test_benchmark_script_runs(script, tmp_path):
    pytest.importorskip("scipy")
    env = dict(os.environ, STRUCTLIK_BENCH_RESULTS=str(tmp_path), STRUCTLIK_BACKEND="", **ONE_THREAD)
    env.pop("TRITON_INTERPRET", None)
    how = ["-m", "benchmarks." + script[:-3]]      # from the repository's root, as documented
    proc = subprocess.run([sys.executable, *how, "--quick", "--device", "cpu", "--min-run-time", "0.01"], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    family = script[len("bench_"):-len(".py")]
    assert (tmp_path / f"{family}-cpu.csv").exists() and (tmp_path / f"{family}-cpu.md").exists()
    text = (tmp_path / f"{family}-cpu.md").read_text()
    assert {"vae_step": "| diagonal |", "low_rank": "| rank 3 |"}.get(family, "| fused |") in text
    assert "memory child failed" not in proc.stderr and "| nan |" not in text    # peak memory was measured
    assert f"- command: python {' '.join(how)}" in text


def _write_csv(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r}))
        writer.writeheader()
        writer.writerows(rows)


def test_targets_are_read_off_the_results(tmp_path, monkeypatch):
    """Met, missed and missing targets are told apart; a missing row is never reported as met."""
    from benchmarks import harness
    from tools import targets
    monkeypatch.setattr(harness, "RESULTS_DIR", str(tmp_path))
    meta = {"command": "python -m benchmarks.bench_nll", "device": "H100", "date": "d", "torch": "t"}
    nll = [{"case": "B64-C1-64x64-r1", "mode": "fwd+bwd", "contender": "fused", "ratio": 1, "mem_of_io": 1.05, **meta},
           {"case": "B64-C1-64x64-r1", "mode": "fwd+bwd", "contender": "one-hot conv", "ratio": 12.5, **meta},
           {"case": "B64-C1-64x64-r1", "mode": "fwd+bwd", "contender": "compiled reference", "ratio": 1.5, **meta}]
    _write_csv(tmp_path / "nll-cuda.csv", nll)
    rows, sources = targets.evaluate("cuda")
    by_text = {(r["target"], r["case"]): (r["measured"], r["met"]) for r in rows}
    case = "B64-C1-64x64-r1"
    assert by_text[("NLL fwd+bwd >= 10x faster than the one-hot convolution", case)] == ("12.5x", "yes")
    assert by_text[("NLL fwd+bwd >= 2x faster than torch.compile of the reference", case)] == ("1.5x", "**no**")
    assert by_text[("NLL fwd+bwd peak memory <= 1.1x inputs + gradients", case)] == ("1.05", "yes")
    missing = [r for r in rows if r["case"] != case]
    assert missing and all(r["measured"] == "not measured" and r["met"] == "—" for r in missing)
    assert sources == ["python -m benchmarks.bench_nll (H100, d, torch t)"]


def test_condition_benchmark_runs():
    """benchmarks/bench_condition.py --quick: the conditional sample agrees with the dense one."""
    env = dict(os.environ, STRUCTLIK_BACKEND="", **ONE_THREAD)
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_condition", "--quick"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [line.split("|") for line in proc.stdout.splitlines()
            if line.startswith("| ") and ("hole" in line or "random half" in line)]
    assert len(rows) == 4 and all(float(r[-2]) < 1e-8 for r in rows), proc.stdout     # 2 masks x 2 models


def test_variance_benchmark_runs():
    """benchmarks/bench_covariance_band.py --quick: every exact way agrees with the dense inverse."""
    pytest.importorskip("scipy")
    env = dict(os.environ, STRUCTLIK_BACKEND="", **ONE_THREAD)
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_covariance_band", "--quick"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [line.split("|") for line in proc.stdout.splitlines() if line.startswith("| 16x16")]
    exact = [r for r in rows if "Monte Carlo" not in r[3]]
    assert len(exact) >= 6 and all(float(r[-2]) < 1e-10 for r in exact), proc.stdout
