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
CPU, measured in a child process (see ``_cpu_peaks_in_child``), the rise of
the peak resident set (``VmHWM`` in /proc/self/status, reset through
/proc/self/clear_refs) over the resident set before the call. Temporaries
under 64 KiB are not seen.
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

# STRUCTLIK_BENCH_RESULTS redirects the output (the test that smoke-runs the scripts uses it).
RESULTS_DIR = os.environ.get("STRUCTLIK_BENCH_RESULTS",
                             os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
# alternating timing rounds per contender (README figures: the median of at least 5, with the range)
ROUNDS = int(os.environ.get("STRUCTLIK_BENCH_ROUNDS", "5"))


@dataclasses.dataclass
class Contender:
    name: str
    fn: Callable[[], object]            # the timed call; returns what the check compares
    note: str = ""
    skip: Optional[str] = None          # reason it cannot run at this size
    # What users run: timed with Distribution validation on, asserted (any torch.compile in
    # the process turns it off for good: torch/_dynamo/eval_frame.py).
    validated: bool = False
    # Runs torch.compile: timed in a second phase, after every other contender of every case.
    compiles: bool = False
    # Compared with the reference before timing (False for a part of a path, e.g. one backward).
    checked: bool = True


@dataclasses.dataclass
class Case:
    label: str                          # e.g. "B64 C1 64x64 r1"
    mode: str                           # e.g. "fwd+bwd"
    contenders: List[Contender]
    check: Callable[[object, object], str]   # (got, expected) -> error description, raises if wrong
    fused: str                          # name of the contender the ratios refer to
    reference: str                      # name of the contender the others are checked against
    input_bytes: int = 0                # the inputs' size, and the outputs' (gradients included): the fewest
    output_bytes: int = 0               # bytes the op must move is their sum (each read or written once)

    @property
    def min_bytes(self) -> int:
        return self.input_bytes + self.output_bytes


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


def copy_bandwidth_gbs(device: torch.device) -> float:
    """Device-to-device copy of 256 MiB: bytes read + written per second."""
    src = torch.empty(64 * 2**20, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, min_run_time=0.5)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


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
        # The kernel's RSS counters are batched per CPU (~0.25 MiB of jitter): clamp at 0.
        return max(0.0, (_status_kb("VmHWM") - base) / 1024)
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


def _phases(cases: List[Case]):
    """(case, contender) in timing order: every contender that does not compile, case by case,
    then those that do, so that validated contenders run before dynamo switches validation off."""
    for compiles in (False, True):
        for case in cases:
            for c in case.contenders:
                if c.compiles == compiles:
                    yield case, c


def _assert_validation_on(c: Contender) -> None:
    if c.validated and not torch.distributions.Distribution._validate_args:
        raise AssertionError(f"{c.name} must be timed with Distribution validation on (the default); something "
                             f"turned it off in this process (torch.compile does)")


def run(family: str, cases: List[Case], device: torch.device, min_run_time: float = 1.0,
        extra_columns: Optional[Callable[[Case, Contender, float], Dict[str, str]]] = None,
        notes: str = "", derive: Optional[Callable[[Dict[str, dict]], None]] = None,
        derive_all: Optional[Callable[[List[dict]], None]] = None) -> List[dict]:
    """Check, time, then measure memory; report and return the rows (also written to results/).

    ``derive(rows_by_contender)`` may add columns computed from several rows of one case,
    ``derive_all(rows)`` from rows of several cases (e.g. the same call with and without an option)."""
    if os.environ.get(_CHILD_ENV):
        _measure_cpu_peaks(cases, os.environ[_CHILD_ENV])
        sys.exit(0)
    copy_gbs = copy_bandwidth_gbs(device)
    notes = (notes + "\n\n" if notes else "") + (
        f"Device-to-device copy measured in this run: {copy_gbs:.1f} GB/s (read + write). GB/s: the fewest bytes "
        f"the op must move (each input read once, each output written once) / time; of_copy: that / the copy's.")
    timed = []
    row_of = {}
    for case in cases:
        for c in case.contenders:
            row_of[(case.label, case.mode, c.name)] = {"family": family, "case": case.label, "mode": case.mode,
                                                      "contender": c.name, "note": c.note}
    expected = {}

    def prepare(case, c):
        """Check c against the reference (this also warms it up: compiles, caches); False if skipped."""
        row = row_of[(case.label, case.mode, c.name)]
        if c.skip:
            row.update(status=f"skipped: {c.skip}")
            return False
        key = (case.label, case.mode)
        if key not in expected:
            expected[key] = next(r for r in case.contenders if r.name == case.reference).fn()
        _assert_validation_on(c)
        got = c.fn()
        row["error"] = "-"
        if c.checked:
            try:
                row["error"] = case.check(got, expected[key])
            except AssertionError as err:
                raise AssertionError(f"{family} {case.label}: {c.name} disagrees with {case.reference}: {err}")
        return True

    # Timings move by 20% between runs and more within one: each case's contenders are timed in
    # ROUNDS alternating rounds (a, b, c, a, b, c, ...), each round a median of blocked_autorange;
    # ms is the median round, ms_min and ms_max the range. The contenders that compile form a
    # second phase (validation is off after the first torch.compile).
    for compiles in (False, True):
        for case in cases:
            group = [c for c in case.contenders if c.compiles == compiles and prepare(case, c)]
            samples = {c.name: [] for c in group}
            for _ in range(ROUNDS):
                for c in group:
                    samples[c.name].append(median_ms(c.fn, device, min_run_time / ROUNDS))
                    _assert_validation_on(c)
            for c in group:
                row = row_of[(case.label, case.mode, c.name)]
                times = sorted(samples[c.name])
                ms = times[len(times) // 2]
                row.update(status="ok", ms=ms, ms_min=times[0], ms_max=times[-1], rounds=len(times))
                if case.min_bytes and c.checked:
                    gbs = case.min_bytes / (ms * 1e-3) / 1e9
                    row.update(GBps=gbs, of_copy=gbs / copy_gbs)
                if extra_columns:
                    row.update(extra_columns(case, c, ms))
                timed.append((row, c))
                print(f"  {case.label:24s} {case.mode:8s} {c.name:26s} {ms:10.3f} ms "
                      f"({times[0]:.3f}-{times[-1]:.3f}, {len(times)} rounds)", file=sys.stderr, flush=True)
    rows = []
    for case in cases:
        case_rows = {c.name: row_of[(case.label, case.mode, c.name)] for c in case.contenders}
        fused_ms = case_rows[case.fused].get("ms")
        for row in case_rows.values():
            if row.get("status") == "ok" and fused_ms:
                row["ratio"] = row["ms"] / fused_ms
        if derive:
            derive(case_rows)
        rows += case_rows.values()
    if device.type == "cpu":
        peaks = _cpu_peaks_in_child()
        for row, c in timed:
            row["peak_mb"] = peaks.get(f"{row['case']}|{row['mode']}|{c.name}", float("nan"))
    else:
        for row, c in timed:
            row["peak_mb"] = peak_memory_mb(c.fn, device)
    by_label = {(case.label, case.mode): case for case in cases}
    for row, c in timed:
        case = by_label[(row["case"], row["mode"])]
        if case.min_bytes:     # (inputs + peak) / (inputs + outputs), 1 at best
            row["mem_of_io"] = (case.input_bytes + row["peak_mb"] * 2**20) / case.min_bytes
    if derive_all:
        derive_all(rows)
    _write(family, rows, device, notes)
    return rows


_CHILD_ENV = "STRUCTLIK_BENCH_MEMORY_OUT"


def _cpu_peaks_in_child() -> Dict[str, float]:
    """Peak memory of every contender, measured by this script re-run in a child process.

    The child starts with glibc's mmap threshold fixed at 64 KiB, so every block
    of that size or more is mapped on allocation and unmapped on free (by
    default glibc keeps freed blocks, and a later call reuses them without the
    resident set rising), and with one thread (Linux adds other threads' page
    faults to the resident set lazily).
    """
    import json
    import subprocess
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "peaks.json")
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536",
                   OMP_NUM_THREADS="1", **{_CHILD_ENV: out})
        # started as this process was (python -m benchmarks.x: as a module, from the repository's root)
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        how = ["-m", spec.name] if spec is not None else [sys.argv[0]]
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "") if env.get("PYTHONPATH") else root
        proc = subprocess.run([sys.executable, *how, *sys.argv[1:]], env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not os.path.exists(out):
            print(f"memory child failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
            return {}
        with open(out) as f:
            return json.load(f)


def _measure_cpu_peaks(cases: List[Case], out_path: str) -> None:
    import json
    torch.set_num_threads(1)
    peaks = {}
    for case, c in _phases(cases):
        if c.skip:
            continue
        c.fn()                                       # warm up: compile, caches, lazy imports
        peaks[f"{case.label}|{case.mode}|{c.name}"] = peak_memory_mb(c.fn, torch.device("cpu"))
    with open(out_path, "w") as f:
        json.dump(peaks, f)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def markdown(rows: List[dict], columns: List[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def command() -> str:
    """How this process was started: ``python -m benchmarks.x ...`` (or a script's path)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    script = ["-m", spec.name] if spec is not None else [sys.argv[0]]
    return " ".join([os.path.basename(sys.executable)] + script + sys.argv[1:])


def _write(family: str, rows: List[dict], device: torch.device, notes: str = "") -> None:
    os.makedirs(RESULTS_DIR, exist_ok=True)
    meta = {"device": device_name(device), "date": datetime.date.today().isoformat(), **versions(),
            "command": command()}
    columns = ["case", "mode", "contender", "ms", "ms_min", "ms_max", "rounds", "ratio", "GBps", "of_copy", "peak_mb", "mem_of_io", "error", "status",
               "note"]
    present = {k for r in rows for k in r}
    columns = [c for c in columns if c in present] + sorted(present - set(columns) - {"family"})
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
                "ms: the median of `rounds` alternating rounds (each a blocked_autorange median), ms_min-ms_max "
                "their range; ratio: time / the fused kernel's (higher is slower); peak_mb: memory one call "
                "allocates beyond its inputs (MiB); mem_of_io: (inputs + peak) / (inputs + outputs, gradients "
                "included), 1 when nothing but the outputs is allocated; error: max abs deviation from the reference "
                "contender / that relative to the reference's largest entry.\n\n"
                + (f"{notes}\n\n" if notes else "") + f"{table}\n")
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
