"""A convolutional VAE with a mean head and a covariance head (the paper's Fig. 2).

The encoder halves the resolution down to 4x4; the decoder mirrors it. The
last decoder features feed two branches: the mean and the covariance. The
covariance branch outputs 1 channel per image channel for the diagonal model
and 1 + S (log-diagonal and the S stencil weights) for the structured one:
the only difference between the architectures. Colour models take their Cb,
Cr heads from the decoder features at 1/factor resolution.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .likelihoods import Likelihood


def _widths(size: int, base: int) -> list[int]:
    n = int(math.log2(size // 4))
    if 4 * 2 ** n != size:
        raise ValueError(f"size: expected 4 * 2^k (8, 16, 32, 64, ...), got {size}")
    return [min(base * 2 ** i, 4 * base) for i in range(n)]


def _branch(width: int, out: int, zero_init: bool) -> nn.Sequential:
    last = nn.Conv2d(width, out, 3, padding=1)
    if zero_init:   # start from the identity precision: no correlation, unit variance
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
    return nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ELU(), last)


class ConvVAE(nn.Module):
    """VAE over (B, C, size, size) images in [0, 1].

    ``forward(x, beta, alpha)`` returns the per-image training loss
    ``-log p(x|z) + beta KL(q(z|x) || p(z)) + alpha ||x - mu||^2`` (z one
    reparameterised sample) and a dict of its parts, so that
    DistributedDataParallel sees the whole computation.
    """

    def __init__(self, likelihood: Likelihood, size: int = 32, latent: int = 32, base_width: int = 32):
        super().__init__()
        self.likelihood, self.size, self.latent = likelihood, size, latent
        widths = _widths(size, base_width)
        C = likelihood.image_channels
        enc, c_in = [], C
        for w in widths:
            enc += [nn.Conv2d(c_in, w, 4, stride=2, padding=1), nn.ELU()]
            c_in = w
        self.encoder = nn.Sequential(*enc, nn.Flatten(), nn.Linear(c_in * 16, 2 * latent))
        self.top = widths[-1]
        self.project = nn.Linear(latent, self.top * 16)
        self.up = nn.ModuleList()
        c_in = self.top
        for w in reversed(widths):
            self.up.append(nn.Sequential(nn.ConvTranspose2d(c_in, w, 4, stride=2, padding=1), nn.ELU()))
            c_in = w
        mean_ch, cov_ch = likelihood.full_res_channels
        self.mean_head = nn.Conv2d(c_in, mean_ch, 3, padding=1)
        self.cov_head = _branch(c_in, cov_ch, zero_init=True)
        if likelihood.color:
            # decoder features at size / factor: the input of up-block k has size 4 * 2^k
            self.low_index = int(math.log2(size // likelihood.factor // 4))
            if not 0 <= self.low_index < len(self.up) or 4 * 2 ** self.low_index * likelihood.factor != size:
                raise ValueError(f"size: {size} / factor {likelihood.factor} must be a power of two >= 4")
            low_w = self.top if self.low_index == 0 else widths[len(widths) - self.low_index]
            low_mean, low_cov = likelihood.low_res_channels
            self.low_mean_head = nn.Conv2d(low_w, low_mean, 3, padding=1)
            self.low_cov_head = _branch(low_w, low_cov, zero_init=True)

    def encode(self, x: torch.Tensor) -> torch.distributions.Normal:
        mu, log_var = self.encoder(x - 0.5).chunk(2, dim=1)
        return torch.distributions.Normal(mu, (0.5 * log_var).exp())

    def decode(self, z: torch.Tensor):
        h = self.project(z).view(-1, self.top, 4, 4)
        low = None
        for k, block in enumerate(self.up):
            if self.likelihood.color and k == self.low_index:
                low = h
            h = block(h)
        # the mean is predicted around mid-grey so that a zero-initialised head starts sensibly
        heads = [self.mean_head(h) + 0.5, self.cov_head(h)]
        if low is not None:
            heads += [self.low_mean_head(low) + 0.5, self.low_cov_head(low)]   # Cb, Cr centre on 0.5 too
        return self.likelihood(*heads)

    def forward(self, x: torch.Tensor, beta: float = 1.0, alpha: float = 0.0,
                gamma_prior: tuple[float, float] | None = None):
        q = self.encode(x)
        z = q.rsample()
        p_x = self.decode(z)
        rec = p_x.log_prob(x)
        kl = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).sum(1)
        loss = -rec + beta * kl
        parts = {"nll": -rec.detach(), "kl": kl.detach()}
        if alpha:
            sq = self.likelihood.squared_error(p_x, x)
            loss = loss + alpha * sq
            parts["sq_error"] = sq.detach()
        if gamma_prior is not None:
            prior = self.likelihood.gamma_prior(p_x, *gamma_prior)
            loss = loss - prior
            parts["gamma_prior"] = prior.detach()
        return loss, parts
