"""Run configurations: ``tiny`` (tests), ``cpu`` (the README's main job), ``cpu-long``, ``gpu`` and ``paper`` (one GPU).

``gpu`` is the ``paper`` network and data (wider, latent 64, 20,000 photo crops
per epoch, IWAE S = 500) for 30 epochs instead of the paper's 110, so that both
datasets train and evaluate in about one 10-minute run on one GPU. That figure
is an estimate from the step's FLOPs (57-72 GFLOP per step at 32x32, B = 64),
not yet a measurement: ``benchmarks/bench_vae_step.py`` measures the step.
"""
from __future__ import annotations

import dataclasses

# The three models of the paper's comparison: (beta, structured likelihood?, variance minimiser?)
MODELS = {
    "diagonal": dict(beta=None, structured=False),     # beta = 1
    "beta": dict(beta="beta", structured=False),       # beta = Config.beta (the paper's 30)
    "structured": dict(beta=None, structured=True),    # structlik + the variance-minimiser schedule
}


@dataclasses.dataclass
class Config:
    epochs: int = 30
    batch: int = 64                  # per process
    lr: float = 1e-3
    grad_clip: float = float("inf")  # max gradient norm per step (off, as in the paper; norms are logged)
    lr_warmup: float = 0.0           # epochs of linear learning-rate warm-up (0: none, as in the paper)
    lr_schedule: str = "constant"    # or "cosine": lr decays as (1 + cos(pi t / T)) / 2 to 0 at the last step
    latent: int = 32
    base_width: int = 32
    size: int = 32                   # mnist / photo crops; a folder uses folder_size
    folder_size: int = 64
    n_train: int = 4000              # photos: crops per epoch; mnist: at most the digits the splits leave
    n_test: int = 1000
    n_valid: int = 250               # held out from training; picks the epoch whose model is evaluated
    iwae_samples: int = 100          # S of the importance-weighted bound (the paper uses 500)
    mi_samples: int = 10             # z samples per image for the mutual information
    eval_batch: int = 50
    radius: int = 2
    dilations: tuple = (1,)
    factor: int = 4                  # chroma down-sampling
    beta: float = 30.0               # the paper found 30 better than beta-VAE's 62.5
    warmup_weight: float = 5e3       # variance minimiser alpha: the paper's 5e3 ...
    weight: float = 10.0             # ... then 10
    warmup_fraction: float = 10 / 110   # ... for the first 10 of 110 epochs
    gamma_prior: tuple | None = None     # (concentration, rate) of eq. 13; off, as in the paper's runs
    weight_bound: float | None = None    # structured: sum_k |w_k| < weight_bound * d (None: unbounded, the paper)
    flips: bool = True               # left-right flips (not for digits: a flipped digit is another shape)
    n_figure: int = 8

    @property
    def warmup_epochs(self) -> int:
        return max(1, round(self.epochs * self.warmup_fraction))


PRESETS = {
    "tiny": Config(epochs=2, batch=16, latent=4, base_width=8, n_train=64, n_test=32, n_valid=16, iwae_samples=4,
                   mi_samples=2, eval_batch=16, radius=1, n_figure=4, folder_size=16),
    # weight_bound: without it the photo crops' structured noise was 1.6x the residual and saturated 5% of
    # the pixels (right quarters held out, 20 epochs);
    # a one-epoch learning-rate warm-up with gradient clipping (without them the norm peaks at up
    # to 131x its epoch's median on digits) then a cosine decay: the structured test NLL 240-350 nats lower on photos and 380-390 on
    # digits than 50 epochs without them (examples/vae/README.md, "What we tried"); 50: the variance heads improve to there
    "cpu": Config(epochs=50, base_width=16, n_test=500, weight_bound=0.9, lr_warmup=1.0, grad_clip=3000.0,
                  lr_schedule="cosine"),
    "paper": Config(epochs=110, n_train=20000, iwae_samples=500, eval_batch=20, latent=64, base_width=64),
}
PRESETS["gpu"] = dataclasses.replace(PRESETS["paper"], epochs=30)
# A closer look at the paper's ordering on the CPU (the cpu preset's training for 100 epochs, 1,000 test images,
# the paper's S = 500 importance samples; examples/vae/README.md gives its measured time)
PRESETS["cpu-long"] = dataclasses.replace(PRESETS["cpu"], epochs=100, n_test=1000, iwae_samples=500)


def preset(name: str, **overrides) -> Config:
    if name not in PRESETS:
        raise ValueError(f"config: expected one of {sorted(PRESETS)}, got {name!r}")
    return dataclasses.replace(PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})
