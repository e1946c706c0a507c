"""Time per training step of the reference VAE: structured likelihood vs the diagonal one.

    python -m benchmarks.bench_vae_step              # 64x64, B=64, the VAE's gpu configuration's network
    python -m benchmarks.bench_vae_step --quick      # 16x16, B=4, a narrow network: checks the script runs

From the repository's root, as a module (like the main job, ``python -m examples.vae``), so that
both ``benchmarks`` and ``examples`` are importable without editing ``sys.path``.

One step is what ``examples/vae/train.py`` does per batch: encoder, decoder,
the likelihood's log_prob (+ KL, + the variance minimiser for the structured
model, whose weight is on during warm-up), backward and an Adam update, on one
batch already on the device. The paper's claim is a "minimal increase in
complexity": ``of_diagonal`` is each model's time over the diagonal model's,
measured in the same run; on a GPU, also the memory one step allocates. The
beta-VAE differs from the diagonal model by a constant factor in the loss, so
it is not timed separately.
"""
from __future__ import annotations

import dataclasses
import sys

import torch

from benchmarks import common, harness
from examples.vae.config import preset
from examples.vae.data import ImageData
from examples.vae.train import alpha_of, build

MODELS = ("diagonal", "structured")


def step_fn(model_name: str, color: bool, cfg, batch: int, device: torch.device):
    """One training step of that model on a fixed batch, as a closure; and its parameter count."""
    C = 3 if color else 1
    shape_only = ImageData("bench", torch.zeros(1, C, cfg.size, cfg.size, dtype=torch.uint8))
    torch.manual_seed(0)
    model = build(model_name, shape_only, cfg).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    g = torch.Generator().manual_seed(1)
    x = ((torch.randint(0, 256, (batch, C, cfg.size, cfg.size), generator=g) + torch.rand(
        batch, C, cfg.size, cfg.size, generator=g)) / 256).to(device)
    alpha = alpha_of(model_name, cfg, epoch=0)      # the warm-up's weight: the minimiser's cost is included

    def step():
        loss, _ = model(x, beta=1.0, alpha=alpha)
        loss = loss.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    return step, sum(p.numel() for p in model.parameters())


def main():
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=64)
    args = p.parse_args()
    device = torch.device(args.device)
    if args.quick:
        cfg, batch = dataclasses.replace(preset("tiny"), size=16), 4
    else:
        cfg, batch = dataclasses.replace(preset("gpu"), size=args.size), args.batch
    rows = []
    for color in (False, True):
        label = f"{'color' if color else 'gray'}-{cfg.size}x{cfg.size}-B{batch}"
        times = {}
        for name in MODELS:
            step, n_params = step_fn(name, color, cfg, batch, device)
            for _ in range(3):
                step()                                # warm up: kernels compiled, allocator and Adam state filled
            ms = harness.median_ms(step, device, args.min_run_time)
            times[name] = ms
            row = {"case": label, "mode": "step", "contender": name, "ms": ms}
            if device.type == "cuda":    # in-process CPU peaks hide behind the allocator's cache
                row["peak_mb"] = harness.peak_memory_mb(step, device)
            rows.append({**row, "status": "ok",
                         "note": f"{n_params / 1e6:.2f} M parameters; latent {cfg.latent}, base width "
                                 f"{cfg.base_width}, radius {cfg.radius}"})
            print(f"  {label:20s} {name:12s} {ms:10.3f} ms", file=sys.stderr, flush=True)
        for row in rows:
            if row["case"] == label:
                row["of_diagonal"] = row["ms"] / times["diagonal"]
    notes = ("One training step (forward, backward, Adam) on a batch already on the device. of_diagonal: time / "
             "the diagonal model's. peak_mb (GPU only): memory one step allocates beyond what is held between "
             "steps.")
    harness._write("vae_step", rows, device, notes)


if __name__ == "__main__":
    main()
