"""The overconfident tail of a finished run: which test images, from which source, and why.

    python -m examples.vae.tail runs/vae              # from results.json alone
    python -m examples.vae.tail runs/vae --pixels     # + the structured model's whitened residual

An image is overconfident when its mean whitened-residual square exceeds
``calibration.OVERCONFIDENT_MS`` (the ``overconfident`` column of results.md). For each dataset
this prints, per model, how many test images are, by source; for the structured model against
the diagonal VAE, the NLL difference on its overconfident images and the share of all images
where its NLL is the worse; and its worst images. ``--pixels`` rebuilds the structured model
from its checkpoint (the best-validation weights the evaluation used) and the evaluation's test
images, and reports on those images how much of sum u^2 its 10 largest pixels carry and the
largest |u|, beside the precision's shape at every pixel of every test image: the median of
sum_k w_k / d (near -1: the residual is explained by its smooth part) and of the pixel noise 1 / d.
"""
from __future__ import annotations

import argparse
import json
import statistics
from collections import Counter
from pathlib import Path

import torch

from . import calibration as calib
from .config import Config
from .data import dequantise, load
from .train import build, checkpoint_path

TOP_PIXELS = 10


def overconfident(per_image: dict) -> list[int]:
    """Indices of the images whose mean u^2 exceeds OVERCONFIDENT_MS."""
    return [i for i, ms in enumerate(per_image["whitened_ms"]) if ms > calib.OVERCONFIDENT_MS]


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def report_dataset(name: str, ds: dict, worst: int) -> tuple[list[str], list[int]]:
    """Lines of text for one dataset of results.json, and the structured model's worst images."""
    per_image, n = ds["per_image"], ds["n_test"]
    sources = ds.get("test_sources")
    lines = [f"### {name}: {n} test images, overconfident = mean u^2 > {calib.OVERCONFIDENT_MS:g}", ""]
    for model, v in per_image.items():
        idx = overconfident(v)
        by = ", ".join(f"{s} {k}" for s, k in Counter(sources[i] for i in idx).most_common()) if sources else ""
        lines.append(f"- {model}: {len(idx)} ({len(idx) / n:.3f}){': ' + by if by else ''}")
    if "structured" not in per_image:
        return lines, []
    s = per_image["structured"]
    order = sorted(range(n), key=lambda i: -s["whitened_ms"][i])[:worst]
    if "diagonal" in per_image:
        d = per_image["diagonal"]
        diff = [s["nll"][i] - d["nll"][i] for i in range(n)]
        idx = overconfident(s)
        on = [diff[i] for i in idx]
        lines += ["", f"structured - diagonal NLL (nats): on its {len(idx)} overconfident images median "
                      f"{_median(on):.0f}, max {max(on, default=float('nan')):.0f}; the structured NLL is the "
                      f"worse on {sum(x > 0 for x in diff) / n:.3f} of all images (median difference "
                      f"{_median(diff):.0f})"]
    if order:
        lines += ["", "| image | source | structured mean u^2 | structured NLL | diagonal NLL |", "|---|---|---|---|---|"]
    for i in order:
        diag = f"{per_image['diagonal']['nll'][i]:.0f}" if "diagonal" in per_image else "-"
        lines.append(f"| {i} | {sources[i] if sources else '-'} | {s['whitened_ms'][i]:.2f} | {s['nll'][i]:.0f} | {diag} |")
    return lines, order


def structured_at_test(run: Path, report: dict, name: str, kind: str = "structured"):
    """The structured model (or model ``kind``) as the evaluation used it (best-validation weights from
    its checkpoint) and the evaluation's test images (one dequantisation of the whole set,
    ``evaluate``'s seed + 100)."""
    settings = {**report["settings"], "dilations": tuple(report["settings"]["dilations"])}
    if settings["gamma_prior"] is not None:
        settings["gamma_prior"] = tuple(settings["gamma_prior"])
    cfg, seed = Config(**settings), report["seed"]
    data = load(name, cfg, seed)
    model = build(kind, data, cfg)
    state = torch.load(checkpoint_path(run, data, kind), map_location="cpu", weights_only=False)
    model.load_state_dict(state["best"]["model"])
    model.eval()
    return model, dequantise(data.test, torch.Generator().manual_seed(seed + 100)), cfg


@torch.no_grad()
def pixel_report(run: Path, report: dict, name: str, images: list[int]) -> list[str]:
    """The structured model's whitened residual on ``images`` and its precision's shape on all test images."""
    model, x, cfg = structured_at_test(run, report, name)
    ratios, noise = [], []
    for start in range(0, len(x), cfg.eval_batch):
        luma, _ = luma_and_y(model, x[start:start + cfg.eval_batch])
        d = luma.log_diag.exp()
        ratios.append((luma.off_diag.sum(1, keepdim=True) / d).flatten())
        noise.append((1 / d).flatten())
    lines = ["", f"structured precision over all test pixels: median sum_k w_k / d {torch.cat(ratios).median():.2f}, "
                 f"median pixel noise 1/d {torch.cat(noise).median():.3f}", "",
             f"| image | share of sum u^2 in its {TOP_PIXELS} largest pixels | max \\|u\\| |", "|---|---|---|"]
    for i in images:
        luma, y = luma_and_y(model, x[i:i + 1])
        u2 = calib.whitened(luma, y - luma.mean).square().flatten()
        lines.append(f"| {i} | {u2.topk(TOP_PIXELS).values.sum() / u2.sum():.2f} | {u2.max().sqrt():.1f} |")
    return lines


def luma_and_y(model, x: torch.Tensor):
    """The luminance distribution at the posterior mean (as the calibration measures it) and x's luminance."""
    p = model.decode(model.encode(x).mean)
    return (p.luma, p.split(x)[0]) if model.likelihood.color else (p, x)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m examples.vae.tail", description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="the run's output folder (with results.json and checkpoints/)")
    p.add_argument("--data", nargs="+", help="datasets (default: all in results.json)")
    p.add_argument("--worst", type=int, default=10, help="list this many of the structured model's worst images")
    p.add_argument("--pixels", action="store_true", help="also the whitened residual, from the checkpoint")
    args = p.parse_args(argv)
    report = json.loads((args.run / "results.json").read_text())
    for name in args.data or list(report["datasets"]):
        if name not in report["datasets"]:
            raise ValueError(f"data: {name!r} is not in {args.run / 'results.json'} "
                             f"(it has {sorted(report['datasets'])})")
        lines, worst = report_dataset(name, report["datasets"][name], args.worst)
        if args.pixels and worst:
            lines += pixel_report(args.run, report, name, worst)
        print("\n".join(lines) + "\n", flush=True)


if __name__ == "__main__":
    main()
