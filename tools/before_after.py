"""The public loss and the training step, before and after a change, in one run.

    python -m tools.before_after OLD_TREE [NEW_TREE] [--rounds 3]

Each tree is a checkout with its C++ extension built in place (``python setup.py build_ext
--inplace``); NEW_TREE defaults to this repository. The two run in turns, ``--rounds`` times
each, in processes of their own (so each imports its own structlik), alone on the machine: what
users run, with default validation, the parameters as views of one decoder head. Printed: each
case's median over the rounds of each tree's median time, and new / old.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r'''
import json
import torch
from torch.utils.benchmark import Timer
from structlik import Stencil, structured_gaussian_nll

torch.manual_seed(0)
out = {}
for B, H, r in ((64, 64, 1), (64, 64, 3), (16, 128, 3)):
    st = Stencil(r)
    head = (0.1 * torch.randn(B, 2 + st.S, H, H)).requires_grad_()
    x = torch.randn(B, 1, H, H)

    def loss():
        return structured_gaussian_nll(x, *head.split([1, 1, st.S], 1), st)

    def evaluate():
        with torch.no_grad():
            return loss()

    def step():
        loss().backward()
        head.grad = None
    for name, fn in (("loss (no grad)", evaluate), ("loss forward + backward", step)):
        fn()
        out[f"B{B} {H}x{H} radius {r}, {name}"] = Timer("fn()", globals={"fn": fn}).blocked_autorange(
            min_run_time=1.0).median * 1e3
from benchmarks import bench_vae_step
from examples.vae.config import preset
step, _ = bench_vae_step.step_fn("structured", False, preset("cpu"), 64, torch.device("cpu"))
step()
out["reference VAE training step, structured, cpu preset, B64"] = Timer(
    "fn()", globals={"fn": step}).blocked_autorange(min_run_time=2.0).median * 1e3
print(json.dumps(out))
'''


def run(tree: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "STRUCTLIK_BACKEND")}
    env["PYTHONPATH"] = tree
    proc = subprocess.run([sys.executable, "-c", CHILD], cwd=tree, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{tree}: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("old")
    p.add_argument("new", nargs="?", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    times = {"old": [], "new": []}
    for _ in range(args.rounds):
        for which in ("old", "new"):
            times[which].append(run(getattr(args, which)))
    print(f"old: {args.old}\nnew: {args.new}\n")
    print("| case | old ms | new ms | new / old |\n|---|---|---|---|")
    for case in times["old"][0]:
        old = statistics.median(r[case] for r in times["old"])
        new = statistics.median(r[case] for r in times["new"])
        print(f"| {case} | {old:.3f} | {new:.3f} | {new / old:.2f} |")


if __name__ == "__main__":
    main()
