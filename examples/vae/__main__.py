"""Train a diagonal VAE, a beta-VAE and a structured VAE; write the paper's tables and figures.

    python -m examples.vae                          # CPU configuration: MNIST + colour photo crops
    python -m examples.vae --config gpu --device cuda  # 30 epochs; --config paper: the paper's 110
    python -m examples.vae --data folder --folder ~/celeba --config gpu --device cuda
    torchrun --nproc_per_node 2 -m examples.vae --config tiny      # DistributedDataParallel

Checkpoints go to OUT/checkpoints after every epoch; a second run with the same
training settings resumes from them (``--fresh`` starts over; other settings are
refused). Results: OUT/results.md, OUT/results.json,
OUT/*.png.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time
from pathlib import Path

import torch
import torch.distributed as dist

import structlik

from . import data as data_mod
from . import figures
from .config import MODELS, PRESETS, preset
from . import calibration as calib
from .evaluate import METRICS, evaluate, summarise, table
from .train import rank_world, train


def parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m examples.vae", description=__doc__.splitlines()[0])
    p.add_argument("--config", default="cpu", choices=list(PRESETS),
                   help="tiny (tests), cpu (default), cpu-long (100 epochs, S = 500), gpu (30 epochs, wider) or paper "
                        "(the paper's 110 epochs)")
    p.add_argument("--data", nargs="+", default=["mnist", "photos"], help="mnist, photos and/or folder")
    p.add_argument("--folder", help="a folder of images (e.g. CelebA or LSUN churches) for --data folder")
    p.add_argument("--folder-gray", action="store_true", help="train on the folder's luminance (Table 1)")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--out", help="output folder (default: runs/vae for --config cpu, runs/vae-CONFIG otherwise, "
                                 "so that one configuration never resumes another's checkpoints)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--fresh", action="store_true", help="ignore existing checkpoints")
    p.add_argument("--epochs", type=int)
    p.add_argument("--iwae-samples", type=int)
    p.add_argument("--n-train", type=int)
    p.add_argument("--n-test", type=int)
    p.add_argument("--beta", type=float)
    p.add_argument("--batch", type=int, help="images per process and step")
    p.add_argument("--latent", type=int)
    p.add_argument("--base-width", type=int)
    p.add_argument("--radius", type=int)
    p.add_argument("--dilations", type=int, nargs="+")
    p.add_argument("--lr", type=float)
    p.add_argument("--gamma-prior", type=float, nargs=2, metavar=("CONCENTRATION", "RATE"),
                   help="add the Gamma prior of eq. 13 on the precision diagonal (structured model)")
    p.add_argument("--weight-bound", type=float,
                   help="structured model: keep sum_k |w_k| below this times the diagonal (U well conditioned)")
    p.add_argument("--variance-weights", type=float, nargs=2, metavar=("WARMUP", "AFTER"),
                   help="variance minimiser alpha during the warm-up epochs and after (eq. 14)")
    p.add_argument("--warmup-fraction", type=float, help="share of the epochs with the warm-up alpha")
    p.add_argument("--lr-warmup", type=float, help="epochs of linear learning-rate warm-up")
    p.add_argument("--grad-clip", type=float, help="clip each step's gradient norm to this")
    p.add_argument("--lr-schedule", choices=("constant", "cosine"), help="learning rate after the warm-up")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def setup_distributed(device: str) -> torch.device:
    """Under torchrun: one process per rank, gloo on CPU, nccl on CUDA."""
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1 and not dist.is_initialized():
        backend = "nccl" if device == "cuda" else "gloo"
        dist.init_process_group(backend)
        if device == "cuda":
            local = int(os.environ.get("LOCAL_RANK", 0))
            torch.cuda.set_device(local)
            return torch.device("cuda", local)
    return torch.device(device)


def main(argv=None):
    args = parse(argv)
    cfg = preset(args.config, epochs=args.epochs, iwae_samples=args.iwae_samples, n_train=args.n_train,
                 n_test=args.n_test, beta=args.beta, batch=args.batch, latent=args.latent,
                 base_width=args.base_width, lr=args.lr, radius=args.radius,
                 dilations=tuple(args.dilations) if args.dilations else None,
                 gamma_prior=tuple(args.gamma_prior) if args.gamma_prior else None,
                 weight_bound=args.weight_bound, warmup_fraction=args.warmup_fraction,
                 warmup_weight=args.variance_weights[0] if args.variance_weights else None,
                 weight=args.variance_weights[1] if args.variance_weights else None,
                 lr_warmup=args.lr_warmup, grad_clip=args.grad_clip,
                 lr_schedule=args.lr_schedule)
    device = setup_distributed(args.device)
    rank, world = rank_world()
    out = Path(args.out or ("runs/vae" if args.config == "cpu" else f"runs/vae-{args.config}"))
    out.mkdir(parents=True, exist_ok=True)
    report = {"config": args.config, "settings": dataclasses.asdict(cfg), "seed": args.seed, "world_size": world,
              "versions": {"torch": torch.__version__, "structlik": structlik.__version__,
                           "python": platform.python_version()},
              "device": str(device), "backend": structlik.backends.name_of(device), "datasets": {}}
    if rank == 0:
        print(f"structlik {structlik.__version__}, torch {torch.__version__}, device {device} "
              f"(backend {report['backend']}), {world} process(es), config {args.config}", flush=True)
    markdown = []
    t_start = time.perf_counter()
    for name in args.data:
        data = data_mod.load(name, cfg, args.seed, args.folder, args.folder_gray)
        if rank == 0:
            print(f"== {data}", flush=True)
        models, histories, per_image = {}, {}, {}
        for model_name in args.models:
            models[model_name], histories[model_name] = train(
                model_name, data, cfg, out, args.seed, device, resume=not args.fresh,
                progress=not args.no_progress)
        if rank != 0:
            continue
        for model_name, model in models.items():
            t0 = time.perf_counter()
            per_image[model_name] = evaluate(model, data.test, cfg, args.seed + 100, device)
            print(f"  evaluated {model_name} in {time.perf_counter() - t0:.0f} s", flush=True)
        rows = {f"{m} ({models[m].likelihood.describe()})": summarise(v) for m, v in per_image.items()}
        text = table(rows)
        n_test = len(data.test)
        caption = (f"### {data}\n\n{cfg.epochs} epochs, IWAE S = {cfg.iwae_samples}, beta-VAE beta = {cfg.beta}; "
                   f"mean ± std over the {n_test} test images; the mutual information is at most "
                   f"log N = {per_image[args.models[0]]['log_n']:.2f}.\n\n")
        calibration = {m: calib.summarise(v["calibration"]) for m, v in per_image.items()}
        cal_text = ("\n\nCalibration of the luminance noise (one sample e per test image at the posterior mean "
                    "mu, against r = x - mu; see examples/vae/calibration.py):\n\n"
                    + calib.table({f"{m} ({models[m].likelihood.describe()})": c for m, c in calibration.items()}))
        if data.test_sources is not None:
            sources = {m: calib.by_source(v["calibration"], data.test_sources) for m, v in per_image.items()}
            cal_text += ("\n\nBy source (test images in brackets; median std(e)/std(r) / share in [0.5, 2]):\n\n"
                         + calib.source_table(sources))
            for m in per_image:
                calibration[m]["by_source"] = {k: {"n": n, "median_noise_ratio": med, "share_ratio_in_0.5_2": share}
                                               for k, (n, med, share) in sources[m].items()}
        markdown.append(caption + text + cal_text)
        print(caption + text + cal_text, flush=True)
        seed = args.seed + 200
        figures.reconstructions(models, data.test, cfg.n_figure, out / f"{data.name}_reconstructions.png", seed, device)
        figures.prior_samples(models, cfg.n_figure, out / f"{data.name}_samples.png", seed, device)
        figures.uncertainty(models, data.test, cfg.n_figure, out / f"{data.name}_uncertainty.png", seed, device)
        figures.nll_histogram(per_image, out / f"{data.name}_nll_hist.png", f"{data.name}: per-image test NLL")
        figures.residual_correlations(models, data.test, out / f"{data.name}_residual_correlations.png", seed,
                                      device)
        report["datasets"][data.name] = {
            "color": data.color, "size": data.size, "n_test": n_test, "test_sources": data.test_sources,
            # training time from the epochs' own clocks, so a resumed run reports the whole training
            "models": {m: {"summary": summarise(v), "train_seconds": sum(h["seconds"] for h in histories[m]),
                           "history": histories[m],
                           "likelihood": models[m].likelihood.describe(),
                           "calibration": calibration[m],
                           "parameters": sum(p.numel() for p in models[m].parameters())}
                       for m, v in per_image.items()},
            "per_image": {m: {**{k: [round(x, 3) for x in v[k].tolist()] for k, _, _ in METRICS},
                              **{k: [round(x, 4) for x in v["calibration"][k].tolist()] for k in calib.MEASURES}}
                          for m, v in per_image.items()},
        }
    if rank == 0:
        report["seconds"] = time.perf_counter() - t_start
        (out / "results.md").write_text("\n\n".join(markdown) + "\n")
        (out / "results.json").write_text(json.dumps(report, indent=1))
        print(f"wrote {out / 'results.md'}, {out / 'results.json'} and figures in {out} "
              f"({report['seconds']:.0f} s)", flush=True)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
