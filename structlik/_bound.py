"""The weight bound's formula and its chain rule, in plain PyTorch (differentiable): what
:func:`structlik.bound_weights` computes, and what the NLL's reference and Triton kernels apply
around the unbounded ones when the op's ``bound`` flag asks the kernel to bound raw weights
(the C++ kernel does both inside its sweep, csrc/nll.cpp's BoundedWeights).

    w_{p,i} = a_{p,i} f_p,  f_p = bound d_p / A_p,  A_p = 1 + sum_i |a_{p,i}|,  d = exp(log_diag)

and, from gw = d/dw:  d/da_i = f (gw_i - sign(a_i) T / A),  T = sum_j a_j gw_j,  d/dlog_diag += f T.
"""
from __future__ import annotations

from typing import Tuple

from torch import Tensor


def _factor(log_diag: Tensor, per_channel: Tensor, bound: float) -> Tuple[Tensor, Tensor]:
    """(f, A) per pixel and channel, shaped (B, C, 1, *space) to broadcast over the S weights."""
    A = 1 + per_channel.abs().sum(2, keepdim=True)
    return bound * log_diag.exp().unsqueeze(2) / A, A


def bounded(log_diag: Tensor, raw: Tensor, bound: float) -> Tensor:
    """The bounded weights (B, C*S, ...) of raw weights (B, C*S, ...) and log_diag (B, C, ...)."""
    C = log_diag.shape[1]
    per_channel = raw.unflatten(1, (C, -1))
    f, _ = _factor(log_diag, per_channel, bound)
    return (per_channel * f).flatten(1, 2)


def chain(grad_w: Tensor, log_diag: Tensor, raw: Tensor, bound: float) -> Tuple[Tensor, Tensor]:
    """(d/draw, the share of d/dlog_diag that flows through w) from d/dw, per pixel."""
    C = log_diag.shape[1]
    a, gw = raw.unflatten(1, (C, -1)), grad_w.unflatten(1, (C, -1))
    f, A = _factor(log_diag, a, bound)
    T = (a * gw).sum(2, keepdim=True)
    return (f * (gw - a.sign() * (T / A))).flatten(1, 2), (f * T).squeeze(2)
