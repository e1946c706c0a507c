"""Shared benchmark machinery: check every contender against the reference, then time it.

A benchmark file (one per op family) builds ``Case`` objects, each a size plus
contenders; ``run`` checks each contender's outputs against the reference
contender, times it (CPU: ``torch.utils.benchmark.Timer``, median of
``blocked_autorange``; GPU: ``triton.testing.do_bench``, median), measures its
peak memory, and prints a markdown table with the ratio of each contender's
time to the fused kernel's. Results are also written as CSV and markdown under
``benchmarks/results/`` with the device and versions.

Peak memory is what one call allocates beyond its inputs: on CUDA,
``torch.cuda.max_memory_allocated`` minus the allocation before the call; on
CPU, the rise of the process's peak resident set (``VmHWM`` in
/proc/self/status, reset through /proc/self/clear_refs before the call) over
its resident set before it, so it also counts allocator slack.
"""
from __future__ import annotations

import csv
import dataclasses
import datetime
import os
import platform
import re
import sys
from typing import Callable, Dict, List, Optional

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


@dataclasses.dataclass
class Contender:
    name: str
    fn: Callable[[], object]            # the timed call; returns what the check compares
    note: str = ""
    skip: Optional[str] = None          # reason it cannot run at this size


@dataclasses.dataclass
class Case:
    label: str                          # e.g. "B64 C1 64x64 r1"
    mode: str                           # e.g. "fwd+bwd"
    contenders: List[Contender]
    check: Callable[[object, object], str]   # (got, expected) -> error description, raises if wrong
    fused: str                          # name of the contender the ratios refer to
    reference: str                      # name of the contender the others are checked against


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            model = re.search(r"model name\s*:\s*(.*)", f.read()).group(1)
    except (OSError, AttributeError):
        pass
    return f"{model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def versions() -> Dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import triton
        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = "-"
    if torch.version.cuda:
        out["cuda"] = torch.version.cuda
    return out


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(key + r":\s+(\d+) kB", f.read()).group(1))


def peak_memory_mb(fn: Callable, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                 # reset VmHWM to the current RSS
        base = _status_kb("VmRSS")
        fn()
        return (_status_kb("VmHWM") - base) / 1024
    except OSError:
        return float("nan")


def median_ms(fn: Callable, device: torch.device, min_run_time: float) -> float:
    if device.type == "cuda":
        import triton.testing
        return float(triton.testing.do_bench(fn, return_mode="median"))
    from torch.utils.benchmark import Timer
    m = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=min_run_time)
    return m.median * 1e3


def run(family: str, cases: List[Case], device: torch.device, min_run_time: float = 1.0,
        extra_columns: Optional[Callable[[Case, Contender, float], Dict[str, str]]] = None) -> List[dict]:
    """Check, time and report; returns the rows (also written to results/)."""
    rows = []
    for case in cases:
        by_name = {c.name: c for c in case.contenders}
        expected = by_name[case.reference].fn()
        timings = {}
        for c in case.contenders:
            row = {"family": family, "case": case.label, "mode": case.mode, "contender": c.name, "note": c.note}
            if c.skip:
                row.update(status=f"skipped: {c.skip}", ms="", ratio="", peak_mb="", error="")
                rows.append(row)
                continue
            try:
                error = case.check(c.fn(), expected)   # also warms up (compiles, caches)
            except AssertionError as err:
                raise AssertionError(f"{family} {case.label}: {c.name} disagrees with {case.reference}: {err}")
            ms = median_ms(c.fn, device, min_run_time)
            timings[c.name] = ms
            row.update(status="ok", ms=ms, peak_mb=peak_memory_mb(c.fn, device), error=error)
            rows.append(row)
            print(f"  {case.label:24s} {case.mode:8s} {c.name:26s} {ms:10.3f} ms", file=sys.stderr, flush=True)
        fused_ms = timings.get(case.fused)
        for row in rows:
            if row["case"] == case.label and row["mode"] == case.mode and row["status"] == "ok" and fused_ms:
                row["ratio"] = row["ms"] / fused_ms
            if extra_columns and row["case"] == case.label and row["status"] == "ok":
                row.update(extra_columns(case, by_name[row["contender"]], row["ms"]))
    _write(family, rows, device)
    return rows


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def markdown(rows: List[dict], columns: List[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def _write(family: str, rows: List[dict], device: torch.device) -> None:
    os.makedirs(RESULTS_DIR, exist_ok=True)
    meta = {"device": device_name(device), "date": datetime.date.today().isoformat(), **versions(),
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv)}
    columns = ["case", "mode", "contender", "ms", "ratio", "peak_mb", "error", "status", "note"]
    extra = sorted({k for r in rows for k in r} - set(columns) - {"family"})
    columns += extra
    tag = f"{family}-{device.type}"
    with open(os.path.join(RESULTS_DIR, f"{tag}.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["family"] + columns + list(meta))
        writer.writeheader()
        for r in rows:
            writer.writerow({**r, **meta})
    header = "\n".join(f"- {k}: {v}" for k, v in meta.items())
    table = markdown(rows, columns)
    with open(os.path.join(RESULTS_DIR, f"{tag}.md"), "w") as f:
        f.write(f"## {family} on {device.type}\n\n{header}\n\n"
                "ms: median time; ratio: time / the fused kernel's (higher is slower); peak_mb: memory one call "
                "allocates beyond its inputs; error: max deviation from the reference contender.\n\n"
                f"{table}\n")
    print(f"\n## {family} on {device.type}\n\n{header}\n\n{table}\n")


def assert_close_report(got, expected, rtol: float, atol: float) -> str:
    """Compare (tuples of) tensors; return 'max abs error / that relative to max |expected|' as text."""
    got = got if isinstance(got, (tuple, list)) else (got,)
    expected = expected if isinstance(expected, (tuple, list)) else (expected,)
    worst_abs, worst_rel = 0.0, 0.0
    for g, e in zip(got, expected):
        g, e = g.detach().double().cpu(), e.detach().double().cpu()
        assert torch.isfinite(g).all(), "non-finite output"
        torch.testing.assert_close(g, e, rtol=rtol, atol=atol)
        diff = (g - e).abs()
        worst_abs = max(worst_abs, diff.max().item())
        worst_rel = max(worst_rel, diff.max().item() / max(e.abs().max().item(), 1e-300))
    return f"{worst_abs:.1e} / {worst_rel:.1e}"
