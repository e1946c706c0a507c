"""Coupled channels as one channel: the permutation that makes M a plain stencil factor.

M = U + X (docs/contract.md §1) is upper-triangular in pixel-interleaved order, unknown p*C + c.
Laid out as one channel of width C*W (column C*x + c holds channel c of pixel x), M is a
one-channel factor with the stencil

    (dy, C*dx) for each offset (dy, dx) of the C-channel stencil   (a volume's (dz, dy, C*dx))
    (0, m) for m = 1..C-1                                          the cross weights, (0, 0, m)

where the weight of (0, m) at column C*x + c is xi_{kappa(c, c+m)} if c + m < C and 0 otherwise
(it would reach the next pixel). A neighbour (dy, C*dx) of column C*x + c is inside the image
exactly when (y + dy, x + dx) is, so the two factors are the same matrix up to this permutation
of the unknowns, and every quantity that is invariant under a permutation applied to both sides
(the KL, log-determinants, marginal variances, the density) can be computed on the one-channel
factor with the kernels of one channel, on every backend.

What it costs: the one-channel band (ops.covariance_band) is C times wider (b = dy*C*W + C*dx),
so the variance of a coupled model costs about C^2 times that of its uncoupled channels. The
native band recurrence over the (pixel, channel) order is issue #40's; until it lands this is the
exact route, used by StructuredNormal.variance and kl_divergence with cross weights.
"""
from __future__ import annotations

import torch

from .stencil import Stencil

__all__ = ["interleaved_stencil", "interleave", "deinterleave", "interleave_weights"]


def interleaved_stencil(stencil: Stencil, C: int) -> Stencil:
    """The one-channel stencil of C coupled channels of ``stencil`` (the module's docstring)."""
    within = [(*o[:-1], C * o[-1]) for o in stencil.offsets]
    zeros = (0,) * (stencil.ndim - 1)
    return Stencil.of_offsets(within + [(*zeros, m) for m in range(1, C)])


def interleave(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """(*batch, C, *space) -> (*batch, 1, *space[:-1], W*C): column C*x + c holds channel c at x."""
    E = ndim + 1
    moved = t.movedim(-E, -1)                                  # (*batch, *space, C)
    return moved.reshape(*moved.shape[:-2], -1).unsqueeze(-E)


def deinterleave(t: torch.Tensor, C: int, ndim: int) -> torch.Tensor:
    """The inverse of :func:`interleave`: (*batch, 1, *space[:-1], W*C) -> (*batch, C, *space)."""
    E = ndim + 1
    flat = t.squeeze(-E)
    return flat.reshape(*flat.shape[:-1], flat.shape[-1] // C, C).movedim(-1, -E)


def interleave_weights(off_diag: torch.Tensor, cross, C: int, stencil: Stencil) -> torch.Tensor:
    """off_diag (*batch, C*S, *space) and cross (*batch, C(C-1)/2, *space) or None as the weights
    of :func:`interleaved_stencil`, (*batch, S + C - 1, *space[:-1], W*C); differentiable."""
    E = stencil.ndim + 1
    w = off_diag.unflatten(-E, (C, stencil.S))                 # (*batch, C, S, *space)
    space = off_diag.shape[-stencil.ndim:]
    batch = off_diag.shape[:-E]
    if cross is None:
        xi = w.new_zeros(*batch, C, C - 1, *space)
    else:
        P = C * (C - 1) // 2
        padded = torch.cat([cross.expand(*batch, P, *space), cross.new_zeros(*batch, 1, *space)], dim=-E)
        # kappa(c, c+m) = c(2C-c-1)/2 + m - 1 where c + m < C; plane P (zeros) elsewhere
        index = [c * (2 * C - c - 1) // 2 + m - 1 if c + m < C else P for c in range(C) for m in range(1, C)]
        xi = padded.index_select(padded.dim() - E, torch.tensor(index, device=padded.device))
        xi = xi.unflatten(-E, (C, C - 1))                      # (*batch, C, C-1, *space)
    full = torch.cat([w, xi.to(w.dtype)], dim=-E)              # (*batch, C, S + C - 1, *space)
    moved = full.movedim(-E - 1, -1)                           # (*batch, S', *space, C)
    return moved.reshape(*moved.shape[:-2], -1)
