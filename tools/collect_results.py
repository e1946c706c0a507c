"""Gather benchmarks/results/*.md into benchmarks/RESULTS.md, under a header that says how they were made.

    python -m tools.collect_results
"""
import glob
import os

HERE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")

HEADER = """# Benchmark results

Each section below was written by the script named in its `command` line, on
the device it names; nothing here is edited by hand but the notes. Re-run with

    python -m benchmarks.bench_nll && python -m benchmarks.bench_solve_upper
    python -m benchmarks.bench_nll_basis && python -m benchmarks.bench_vae_step
    python -m benchmarks.bench_cross          # coupled channels at supn_base's client size
    python -m benchmarks.bench_volume         # volumes: against one-hot conv3d and scipy
    python -m benchmarks.bench_low_rank       # low-rank modes: against rank 0 and LowRankMultivariateNormal
    python -m tools.targets --device cpu      # or --device cuda
    python -m tools.collect_results

(`benchmarks/gpu_session.sh` does all of it on a GPU machine.) Every contender
is checked against the reference before it is timed (the `error` column). See
`benchmarks/harness.py` for how time, bandwidth and peak memory are measured.
"""


def _order(path: str):
    """Targets first, then the tables; GPU results before CPU ones."""
    name = os.path.basename(path)[:-len(".md")]
    device = name.rsplit("-", 1)[-1]
    return (not name.startswith("targets-"), device != "cuda", name)


def main():
    parts = [HEADER]
    notes = os.path.join(HERE, "results", "NOTES.md")
    if os.path.exists(notes):
        parts.append(open(notes).read())
    for path in sorted(glob.glob(os.path.join(HERE, "results", "*.md")), key=_order):
        if os.path.basename(path) != "NOTES.md":
            parts.append(open(path).read())
    with open(os.path.join(HERE, "RESULTS.md"), "w") as f:
        f.write("\n\n".join(p.strip() for p in parts) + "\n")


if __name__ == "__main__":
    main()
