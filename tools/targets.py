"""Read the issues' performance targets off the benchmark results of one device.

    python -m tools.targets --device cpu     # the CPU-kernel issue's targets
    python -m tools.targets --device cuda    # the GPU issue's targets

Reads ``results/<family>-<device>.csv`` (written by the bench_*.py scripts),
writes ``results/targets-<device>.md`` and prints it. Nothing is timed here:
every figure is a ratio of two timings taken in the same benchmark run. A
target whose row is missing (a benchmark not run, or run at other sizes) is
reported as "not measured", never as met.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import os
from typing import Callable, List, Optional

from benchmarks import common, harness


@dataclasses.dataclass
class Target:
    text: str
    family: str
    case: str
    mode: str
    value: Callable[[dict], Optional[float]]   # rows of that case and mode by contender -> the measured figure
    met: Callable[[float], bool]
    unit: str = "x"


def _ratio_of(contender: str):
    """How many times slower the contender is than the fused kernel."""
    return lambda rows: _num(rows.get(contender, {}).get("ratio"))


def _column(column: str, contender: str = "fused"):
    return lambda rows: _num(rows.get(contender, {}).get(column))


def _num(v) -> Optional[float]:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _s_planes_of_io(label: str) -> float:
    """(inputs + outputs + S image planes) / (inputs + outputs) for the NLL fwd+bwd at that size:
    the bound "no temporary of S values per pixel beyond the gradients" as a mem_of_io."""
    S = common.SIZES[label][4].S
    io = (3 + S) + (2 + S)          # planes: x, loc, log_diag, off_diag; their gradients but x's
    return (io + S) / io


CPU = [Target("NLL fwd+bwd >= 5x faster than the one-hot convolution", "nll", case, "fwd+bwd",
              _ratio_of("one-hot conv"), lambda v: v >= 5) for case in common.DEFAULT_SIZES[("nll", "cpu")]] + [
    Target("NLL fwd+bwd >= 2x faster than the reference", "nll", case, "fwd+bwd",
           _ratio_of("reference"), lambda v: v >= 2) for case in common.DEFAULT_SIZES[("nll", "cpu")]] + [
    Target("NLL fwd+bwd: no temporary of S values per pixel beyond the gradients (mem_of_io below "
           f"{_s_planes_of_io(case):.2f})", "nll", case, "fwd+bwd", _column("mem_of_io"),
           lambda v, b=_s_planes_of_io(case): v < b, unit="") for case in common.DEFAULT_SIZES[("nll", "cpu")]] + [
    Target("sampling >= 20x faster than scipy (CSR per image)", "solve_upper", case, "sample",
           _ratio_of("scipy spsolve_triangular"), lambda v: v >= 20)
    for case in common.DEFAULT_SIZES[("solve_upper", "cpu")]] + [
    # What users run (the public API on split-head views, validation on):
    Target("public NLL fwd+bwd on split-head views <= 1.15x the fused kernel on contiguous inputs "
           "(nothing subtracted: the split's backward never runs)", "nll", case, "fwd+bwd", _ratio_of("public"),
           lambda v: v <= 1.15) for case in common.DEFAULT_SIZES[("nll", "cpu")]] + [
    # The quick start's path (#41): from_head's default bound, inside the kernel
    Target("from_head (bound 0.9) NLL fwd+bwd <= 1.15x the public call on unbounded split views", "nll", case,
           "fwd+bwd", _column("over_public", "from_head (bound 0.9)"), lambda v: v <= 1.15)
    for case in common.DEFAULT_SIZES[("nll", "cpu")]] + [
    Target("public NLL fwd+bwd >= 8x faster than the one-hot convolution, both on split-head views", "nll", case,
           "fwd+bwd", _column("onehot_over_public", "public"), lambda v: v >= 8)
    for case in common.DEFAULT_SIZES[("nll", "cpu")]] + [
    Target(f"public sampling ({name}) >= 20x faster than scipy per image, float64", "solve_upper_float64",
           "B16-C1-64x64-r2", "sample", _column("scipy_over", name), lambda v: v >= 20)
    for name in ("public solve_upper", "public rsample")] + [
    # Coupled channels (#26) at supn_base's client size, the public path on split-head views:
    Target("coupled NLL fwd+bwd <= 1.15x the same call without cross weights", "cross", "B32-C2-128x128-r4",
           "fwd+bwd", _column("over_no_cross", "public"), lambda v: v <= 1.15),
    Target("coupled NLL fwd+bwd >= 8x faster than one-hot conv + cross term (supn_base)", "cross",
           "B32-C2-128x128-r4", "fwd+bwd", _column("onehot_over_public", "public"), lambda v: v >= 8),
    Target("coupled sampling <= 1.2x the same solve without cross weights", "cross", "B32-C2-128x128-r4", "sample",
           _column("over_no_cross", "public"), lambda v: v <= 1.2)] + [
    # Volumes (#27), the public path on split-head views:
    Target("volume NLL fwd+bwd >= 8x faster than one-hot conv3d (supn_base's use_3d)", "volume", case, "fwd+bwd",
           _column("onehot_over_public", "public"), lambda v: v >= 8)
    for case in ("B4-C1-32x32x32-r1", "B2-C1-24x24x24-r2")] + [
    Target("volume sampling >= 20x faster than scipy's spsolve_triangular per volume, float64", "volume", case,
           "sample", _column("scipy_over_public", "public"), lambda v: v >= 20)
    for case in ("B4-C1-32x32x32-r1", "B2-C1-24x24x24-r2")] + [
    # Low-rank modes (#43), from_head(rank=10) on one head, validation on:
    Target("low-rank log_prob fwd+bwd at rank 10 <= 2.5x rank 0", "low_rank", "B32-C1-64x64-r2", "log_prob fwd+bwd",
           _column("over_rank0", "rank 10"), lambda v: v <= 2.5, unit="x rank 0"),
    Target("low-rank log_prob fwd+bwd at rank 10 faster than LowRankMultivariateNormal (diagonal + rank 10)",
           "low_rank", "B32-C1-64x64-r2", "log_prob fwd+bwd", _column("lowrank_mvn_over", "rank 10"),
           lambda v: v > 1, unit="x")]

CUDA = [
    Target("NLL fwd+bwd >= 80% of the copy bandwidth (fewest-bytes model)", "nll", "B16-C1-256x256-r3", "fwd+bwd",
           _column("of_copy"), lambda v: v >= 0.8, unit=" of copy"),
] + [t for case in ("B64-C1-64x64-r1", "B64-C1-64x64-r3") for t in (
    Target("NLL fwd+bwd >= 10x faster than the one-hot convolution", "nll", case, "fwd+bwd",
           _ratio_of("one-hot conv"), lambda v: v >= 10),
    Target("NLL fwd+bwd >= 2x faster than torch.compile of the reference", "nll", case, "fwd+bwd",
           _ratio_of("compiled reference"), lambda v: v >= 2),
    Target("NLL fwd+bwd peak memory <= 1.1x inputs + gradients", "nll", case, "fwd+bwd",
           _column("mem_of_io"), lambda v: v <= 1.1, unit=""),
)] + [
    Target("sampling >= 100x faster than dense solve_triangular", "solve_upper", "B64-C1-64x64-r2", "sample",
           _ratio_of("dense solve_triangular"), lambda v: v >= 100),
    Target("sampling faster than torch's sparse CSR triangular solve (cuSPARSE)", "solve_upper", "B64-C1-64x64-r2",
           "sample", _ratio_of("torch sparse CSR solve"), lambda v: v > 1),
    Target("sampling no slower than 20x the NLL forward at the same size", "solve_upper", "B64-C1-64x64-r2",
           "sample", _column("of_nll_fwd"), lambda v: v <= 20, unit="x the NLL forward"),
    Target("VAE training step: structured <= 1.25x diagonal (gray)", "vae_step", "gray-64x64-B64", "step",
           _column("of_diagonal", "structured"), lambda v: v <= 1.25, unit="x diagonal"),
    Target("VAE training step: structured <= 1.25x diagonal (YCbCr colour)", "vae_step", "color-64x64-B64", "step",
           _column("of_diagonal", "structured"), lambda v: v <= 1.25, unit="x diagonal"),
]

TARGETS = {"cpu": CPU, "cuda": CUDA}


def read_rows(device_type: str, family: str) -> List[dict]:
    path = os.path.join(harness.RESULTS_DIR, f"{family}-{device_type}.csv")
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def evaluate(device_type: str) -> tuple[List[dict], List[str]]:
    """One row per target: what was measured and whether it meets the target; and the commands behind them."""
    rows, sources = [], []
    for t in TARGETS[device_type]:
        results = read_rows(device_type, t.family)
        here = {r["contender"]: r for r in results if r["case"] == t.case and r["mode"] == t.mode}
        value = t.value(here) if here else None
        if value is None:
            rows.append({"target": t.text, "case": t.case, "measured": "not measured", "met": "—"})
            continue
        meta = next(iter(here.values()))
        source = f"{meta.get('command')} ({meta.get('device')}, {meta.get('date')}, torch {meta.get('torch')})"
        if source not in sources:
            sources.append(source)
        rows.append({"target": t.text, "case": t.case, "measured": f"{harness._fmt(value)}{t.unit}",
                     "met": "yes" if t.met(value) else "**no**"})
    return rows, sources


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=sorted(TARGETS), required=True)
    args = p.parse_args()
    rows, sources = evaluate(args.device)
    title = {"cpu": "The CPU-kernel targets", "cuda": "The GPU targets"}[args.device]
    text = (f"## {title}, read off the tables below\n\n"
            f"Written by `python -m tools.targets --device {args.device}` from these runs:\n\n"
            + ("\n".join(f"- `{s}`" for s in sources) if sources else "- none: no results for this device yet")
            + "\n\nEach figure is a ratio of timings (or memory) taken in the same run; \"ratio\" figures are "
              "how many times slower the alternative is than the fused kernel.\n\n"
            + harness.markdown(rows, ["target", "case", "measured", "met"]) + "\n")
    os.makedirs(harness.RESULTS_DIR, exist_ok=True)
    with open(os.path.join(harness.RESULTS_DIR, f"targets-{args.device}.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
