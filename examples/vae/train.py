"""Training with checkpoints, exact resume and optional DistributedDataParallel.

Every random draw of epoch e on rank r comes from generators seeded by
(seed, e, r), so a run resumed from the checkpoint of epoch e-1 continues
exactly as the uninterrupted run would have.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

import structlik

from .config import MODELS, Config
from .data import ImageData, dequantise, flip_half
from .likelihoods import Likelihood
from .model import ConvVAE


def rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def build(model_name: str, data: ImageData, cfg: Config) -> ConvVAE:
    if model_name not in MODELS:
        raise ValueError(f"model: expected one of {sorted(MODELS)}, got {model_name!r}")
    stencil = structlik.Stencil(cfg.radius, dilations=cfg.dilations) if MODELS[model_name]["structured"] else None
    likelihood = Likelihood(color=data.color, stencil=stencil, factor=cfg.factor,
                            weight_bound=cfg.weight_bound if stencil is not None else None)
    return ConvVAE(likelihood, size=data.size, latent=cfg.latent, base_width=cfg.base_width)


def beta_of(model_name: str, cfg: Config) -> float:
    return cfg.beta if MODELS[model_name]["beta"] == "beta" else 1.0


def alpha_of(model_name: str, cfg: Config, epoch: int) -> float:
    if not MODELS[model_name]["structured"]:
        return 0.0
    return structlik.variance_weight(epoch, cfg.warmup_epochs, cfg.warmup_weight, cfg.weight)


def learning_rate(cfg: Config, step: int, steps_per_epoch: int) -> float:
    """The learning rate of global step ``step`` (0-based): the linear warm-up over ``cfg.lr_warmup``
    epochs, counted in steps so it is smooth within an epoch, times the schedule's factor."""
    t = (step + 1) / steps_per_epoch                       # epochs done after this step
    factor = min(1.0, t / cfg.lr_warmup) if cfg.lr_warmup > 0 else 1.0
    if cfg.lr_schedule == "cosine":
        factor *= 0.5 * (1 + math.cos(math.pi * step / (cfg.epochs * steps_per_epoch)))
    elif cfg.lr_schedule != "constant":
        raise ValueError(f"lr_schedule: expected 'constant' or 'cosine', got {cfg.lr_schedule!r}")
    return cfg.lr * factor


def _seed(*parts: int) -> int:
    s = 0
    for p in parts:
        s = (s * 1_000_003 + p) % (2 ** 62)
    return s


def checkpoint_path(out: Path, data: ImageData, model_name: str) -> Path:
    return Path(out) / "checkpoints" / f"{data.name}-{model_name}.pt"


# settings that only change the evaluation: a finished model may be evaluated again with others
EVALUATION_ONLY = frozenset({"iwae_samples", "mi_samples", "eval_batch", "n_figure"})   # (n_test also splits MNIST)


def check_resumable(state: dict, cfg: Config, seed: int, path: Path) -> None:
    """Refuse to resume a checkpoint trained with other settings or another seed: its next epochs
    would follow another schedule (the cosine decay and the variance minimiser's warm-up depend on
    the number of epochs), other random draws or another model. More epochs of a constant schedule
    with the same warm-up continue it exactly and are allowed."""
    saved, now = {**state.get("config", {}), "seed": state.get("seed")}, {**dataclasses.asdict(cfg), "seed": seed}
    differ = sorted(k for k in (now.keys() | saved.keys()) - EVALUATION_ONLY if saved.get(k) != now.get(k))
    if differ == ["epochs"]:
        old = dataclasses.replace(cfg, epochs=saved["epochs"])     # its variance-minimiser warm-up
        if cfg.lr_schedule == "constant" and old.warmup_epochs == cfg.warmup_epochs:
            return
    if differ:
        changes = ", ".join(f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in differ)
        raise ValueError(f"{path}: trained with other settings ({changes}); pass --fresh to start over or "
                         f"--out to train elsewhere")


def _save(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)     # never leave a half-written checkpoint behind


def train(model_name: str, data: ImageData, cfg: Config, out: Path, seed: int, device: torch.device,
          resume: bool = True, progress: bool = True) -> tuple[ConvVAE, dict]:
    """Train one model (or finish a started run); returns the model and its history."""
    rank, world = rank_world()
    torch.manual_seed(_seed(seed, 7))            # same initial weights on every rank
    model = build(model_name, data, cfg).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    path = checkpoint_path(out, data, model_name)
    history, start, best = [], 0, None
    if resume and path.exists():
        state = torch.load(path, map_location=device, weights_only=False)
        check_resumable(state, cfg, seed, path)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        history, start, best = state["history"], state["epoch"] + 1, state["best"]
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    beta = beta_of(model_name, cfg)
    for epoch in range(start, cfg.epochs):
        alpha = alpha_of(model_name, cfg, epoch)
        shared = torch.Generator().manual_seed(_seed(seed, epoch))           # same on all ranks
        mine = torch.Generator().manual_seed(_seed(seed, epoch, rank + 1))    # this rank's noise
        torch.manual_seed(_seed(seed, epoch, rank + 1, 3))                    # the reparameterisation
        images = data.epoch_data(shared)
        order = torch.randperm(len(images), generator=shared)
        steps = len(order) // (cfg.batch * world)       # equal steps on every rank (DDP needs it)
        if steps == 0:
            raise ValueError(f"batch: {cfg.batch} x {world} processes exceeds the {len(order)} training images")
        order = order[:steps * cfg.batch * world][rank::world]
        sums, norms, t0 = {}, [], time.perf_counter()
        bar = range(steps)
        if progress and rank == 0:
            from tqdm import tqdm
            bar = tqdm(bar, desc=f"{data.name}/{model_name} epoch {epoch + 1}/{cfg.epochs}", leave=False,
                       dynamic_ncols=True)
        net.train()
        for step in bar:
            batch = images[order[step * cfg.batch:(step + 1) * cfg.batch]]
            if data.flips:
                batch = flip_half(batch, mine)
            x = dequantise(batch, mine).to(device)
            loss, parts = net(x, beta=beta, alpha=alpha,
                              gamma_prior=cfg.gamma_prior if MODELS[model_name]["structured"] else None)
            loss = loss.mean()
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{data.name}/{model_name}: loss is {loss.item()} at epoch {epoch}, "
                                         f"step {step}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for group in opt.param_groups:      # from (epoch, step) alone, so a resumed run continues exactly
                group["lr"] = learning_rate(cfg, epoch * steps + step, steps)
            norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip).detach())
            opt.step()
            # kept on the device; read back once per epoch, not once per metric and step
            for k, v in {"loss": loss.detach(), **{k: v.mean() for k, v in parts.items()}}.items():
                sums[k] = sums.get(k, 0.0) + v
            if progress and rank == 0 and step % 10 == 0:
                bar.set_postfix(loss=f"{loss.item():.1f}", nll=f"{float(parts['nll'].mean()):.1f}",
                                kl=f"{float(parts['kl'].mean()):.1f}")
        norms_t = torch.stack(norms).cpu()
        sums = {k: float(v) for k, v in sums.items()}
        # without validation images, the last epoch is the one evaluated
        valid = validation_nelbo(model, data, seed, device) if data.valid is not None else float("-inf")
        if best is None or valid <= best["valid_nelbo"]:
            best = {"epoch": epoch, "valid_nelbo": valid,
                    "model": {k: v.detach().clone() for k, v in model.state_dict().items()}}
        record = {"epoch": epoch, "alpha": alpha, "seconds": time.perf_counter() - t0, "valid_nelbo": valid,
                  "grad_norm_median": norms_t.median().item(), "grad_norm_max": norms_t.max().item(),
                  **{k: v / steps for k, v in sums.items()}}
        history.append(record)
        if rank == 0:
            print(f"  {data.name}/{model_name} epoch {epoch + 1}/{cfg.epochs}: loss {record['loss']:.1f}  "
                  f"nll {record['nll']:.1f}  kl {record['kl']:.1f}  grad norm median {record['grad_norm_median']:.3g} "
                  f"max {record['grad_norm_max']:.3g}  valid -ELBO {valid:.1f}  ({record['seconds']:.1f} s)", flush=True)
        if rank == 0:
            _save(path, {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch,
                         "history": history, "best": best, "config": vars(cfg).copy(), "seed": seed})
        if world > 1:
            dist.barrier()
    if world > 1:
        _check_in_sync(model, f"{data.name}/{model_name}")
    # evaluate the epoch with the best held-out ELBO: a heteroscedastic decoder's loss spikes, and
    # the last epoch may sit on one
    model.load_state_dict(best["model"])
    if rank == 0:
        print(f"  {data.name}/{model_name}: using epoch {best['epoch'] + 1} (best validation -ELBO "
              f"{best['valid_nelbo']:.1f})", flush=True)
    model.eval()
    return model, history


@torch.no_grad()
def validation_nelbo(model: ConvVAE, data: ImageData, seed: int, device: torch.device) -> float:
    """Mean -ELBO (beta = 1, one z sample) over the validation images, with fixed noise."""
    was_training = model.training
    model.eval()
    g = torch.Generator().manual_seed(_seed(seed, 11))
    x = dequantise(data.valid, g).to(device)
    state = torch.get_rng_state()
    torch.manual_seed(_seed(seed, 13))
    total = sum(model(x[i:i + 250])[0].sum().item() for i in range(0, len(x), 250))
    torch.set_rng_state(state)     # validation must not shift the training run's random stream
    model.train(was_training)
    return total / len(x)


def _check_in_sync(model: torch.nn.Module, what: str) -> None:
    """DDP keeps replicas identical; say so, or fail loudly if they drifted apart."""
    rank, world = rank_world()
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    if not all(torch.equal(gathered[0], g) for g in gathered[1:]):
        raise RuntimeError(f"{what}: parameters differ between ranks after training")
    if rank == 0:
        print(f"  {what}: parameters identical on all {world} ranks", flush=True)
