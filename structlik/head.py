"""From a decoder's output to U's parameters: the head's channel order and the weight bound.

A decoder that ends in one convolution with ``C * (2 + S)`` channels gives, in this order,
``loc`` (C), ``log_diag`` (C) and the raw off-diagonal weights (C*S, channel c / offset i at
c*S + i). :func:`bound_weights` maps the raw weights so that every row of U is diagonally
dominant, which is what keeps samples finite: unbounded, examples/denoise.py learned rows
with sum|w| / d up to 2.57, and a U with every row at 6 draws samples of 1e5 at 24x24 and
overflows at 36 (README, "Training recipe").
"""
from __future__ import annotations

import math
import numbers
import warnings
from typing import Optional, Tuple

import torch

from . import _bound, _checks
from .reference import cross_pairs
from .stencil import Stencil

__all__ = ["bound_weights", "bound_coupled_weights", "split_head", "head_channels"]

DEFAULT_WEIGHT_BOUND = 0.9


def check_bound(bound, name: str = "bound") -> float:
    """A bound in (0, 1): below 1 every row of U is diagonally dominant (the guarantee), above 0
    some weight is allowed."""
    if isinstance(bound, bool) or not isinstance(bound, numbers.Real) or not (0 < float(bound) < 1):
        raise ValueError(f"{name}: expected a number in (0, 1) (or None for unbounded weights), got {bound!r}")
    return float(bound)


def _check_raw(log_diag: torch.Tensor, raw: torch.Tensor) -> int:
    """log_diag (B, C, H, W) and raw weights (B, C*S, H, W) on its device, or a volume's
    (B, C, D, H, W) and (B, C*S, D, H, W); returns S."""
    sp = "D, H, W" if isinstance(log_diag, torch.Tensor) and log_diag.dim() == 5 else "H, W"
    _checks.check_float_tensor("log_diag", log_diag, f"(B, C, {sp})")
    _checks.check_float_tensor("raw", raw, f"(B, C*S, {sp})")
    B, C = log_diag.shape[:2]
    if C == 0 or raw.shape[1] % C or tuple(raw.shape[2:]) != tuple(log_diag.shape[2:]) or raw.shape[0] != B:
        raise ValueError(f"raw: expected shape (B, C*S, {sp}) with (B, C, {sp}) = {tuple(log_diag.shape)} "
                         f"(log_diag's), got {tuple(raw.shape)}")
    if raw.device != log_diag.device:
        raise ValueError(f"raw: device {raw.device} does not match log_diag's device {log_diag.device}")
    return raw.shape[1] // C


def bound_weights(log_diag: torch.Tensor, raw: torch.Tensor, bound: float = DEFAULT_WEIGHT_BOUND) -> torch.Tensor:
    """Off-diagonal weights with ``sum_i |w_{p,i}| < bound * d_p`` at every pixel and channel.

    ``w = raw * bound * d / (1 + sum_i |raw_i|)`` (d = exp(log_diag), the sum over the S raw
    weights of the pixel's channel). With ``bound < 1`` each row of U is diagonally dominant,
    so ``||U^-1||_inf <= 1 / ((1 - bound) min d)``: a sample ``U^-1 z`` is at most that times
    ``max |z|``, and no direction of the image has a variance above ``1 / ((1 - bound) d)^2``.
    ``raw = 0`` gives ``w = 0`` (U = diag(d)): a freshly initialised head starts at a diagonal
    Gaussian. Differentiable in both arguments.

    Args:
        log_diag: (B, C, H, W).
        raw: (B, C*S, H, W), any real values.
        bound: in (0, 1); 0.9 is what the reference VAE trained with.
    """
    bound = check_bound(bound)
    _check_raw(log_diag, raw)
    return _bound.bounded(log_diag, raw, bound)


def bound_coupled_weights(log_diag: torch.Tensor, raw: torch.Tensor, raw_cross: torch.Tensor,
                          bound: float = DEFAULT_WEIGHT_BOUND) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`bound_weights` for coupled channels: ``(off_diag, cross)`` with every row of M
    diagonally dominant, ``sum_i |w_{c,p,i}| + sum_{j>c} |cross_{kappa(c,j),p}| < bound * d_{c,p}``
    (row (c, p) of M holds channel c's S weights and its cross weights to the channels after it).
    Each weight is ``raw * bound * d / (1 + that row's sum of |raw|)``, as bound_weights; so
    Varah's bound on ||M^-1||_inf, and finite samples, hold as for U.

    Args:
        log_diag: (B, C, H, W); raw: (B, C*S, H, W); raw_cross: (B, C(C-1)/2, H, W).
    """
    bound = check_bound(bound)
    S = _check_raw(log_diag, raw)
    B, C, *rest = log_diag.shape
    layout = _checks.cross_layout(C, len(rest))
    _checks.check_float_tensor("raw_cross", raw_cross, layout)
    _checks.check_same("raw_cross", raw_cross, "log_diag", log_diag, (B, C * (C - 1) // 2, *rest), layout)
    cs, _ = cross_pairs(C, log_diag.device)
    per_channel = raw.unflatten(1, (C, S))
    row_sum = per_channel.abs().sum(2).index_add(1, cs, raw_cross.abs().to(per_channel.dtype))
    scale = bound * log_diag.exp() / (1 + row_sum)
    return (per_channel * scale.unsqueeze(2)).flatten(1, 2), raw_cross * scale[:, cs]


def head_channels(stencil: Stencil, channels: int = 1, *, cross: bool = False, rank: int = 0) -> int:
    """The decoder head's channel count for ``channels`` image channels: C * (2 + S), C(C-1)/2 more
    with cross weights (coupled channels) and R*C more with ``rank=R`` low-rank modes
    (``StructuredNormal.from_head(..., rank=R)``)."""
    _checks.check_stencil(stencil)
    return channels * (2 + stencil.S) + (channels * (channels - 1) // 2 if cross else 0) + rank * channels


def split_head(head: torch.Tensor, stencil: Stencil, *, weight_bound: Optional[float] = DEFAULT_WEIGHT_BOUND,
               cross: bool = False, rank: int = 0) -> Tuple[torch.Tensor, ...]:
    """``(loc, log_diag, off_diag)`` from a decoder head (B, C*(2+S), H, W), channels in that order;
    with ``cross=True`` ``(loc, log_diag, off_diag, cross)`` from (B, C*(2+S) + C(C-1)/2, H, W),
    the cross weights of coupled channels last (supn_base's order); with ``rank=R``, R*C channels
    more, last, and the low-rank modes ``cov_factor`` (B, R, C, H, W) last in the tuple (channel
    r*C + c holds mode r of channel c). :func:`head_channels` counts the channels.

    ``weight_bound`` (default 0.9) passes the raw weights through :func:`bound_weights`
    (:func:`bound_coupled_weights` with cross weights); ``None`` takes them as they are (then the
    parts are views of the head and the loss reads the head in place). ``log_diag`` is
    ``-log(sigma)`` of a pixel's conditional noise, the opposite sign of a log-variance head.
    One ``split`` for every part: its gradient is the head's, written in one piece (nested splits
    wrote it twice: rank 10 log_prob fwd+bwd at B32 64x64 r2 went from 16.5 to 14.8 ms with one,
    benchmarks/bench_low_rank.py, 2-core Xeon).
    """
    _checks.check_stencil(stencil)
    if weight_bound is not None:
        weight_bound = check_bound(weight_bound, "weight_bound")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise ValueError(f"rank: expected an integer >= 0 (the number of low-rank modes), got {rank!r}")
    S = stencil.S
    layout = _checks.layout(stencil, "C*(2+S)" + (" + C(C-1)/2" if cross else "") + (" + R*C" if rank else ""))
    _checks.check_float_tensor("head", head, layout)          # a missing batch dimension: says unsqueeze(0)
    K = head.shape[1]
    C = _channels(K, S, cross, rank)
    if C == 0:
        counts = ", ".join(str(head_channels(stencil, c, cross=cross, rank=rank)) for c in (1, 2, 3, 4))
        what = (f"a multiple of {2 + S} channels (C*(2+S))" if not (cross or rank) else
                f"head_channels(stencil, C, cross={cross}, rank={rank}) channels for some C ({counts}, ...)")
        raise ValueError(f"head: expected shape {layout} with S={S}: {what}, got {tuple(head.shape)}")
    sizes = [C, C, C * S] + ([C * (C - 1) // 2] if cross else []) + ([rank * C] if rank else [])
    parts = list(head.split(sizes, dim=1))
    if rank:
        parts[-1] = parts[-1].unflatten(1, (rank, C))
    if weight_bound is not None:
        if cross:
            parts[2], parts[3] = bound_coupled_weights(parts[1], parts[2], parts[3], weight_bound)
        else:
            parts[2] = bound_weights(parts[1], parts[2], weight_bound)
    return tuple(parts)


def _channels(K: int, S: int, cross: bool, rank: int) -> int:
    """C with head_channels(S, C, cross, rank) = K, or 0 if there is none."""
    C = 1
    while C * (2 + S + rank) + (C * (C - 1) // 2 if cross else 0) < K:
        C += 1
    return C if K and C * (2 + S + rank) + (C * (C - 1) // 2 if cross else 0) == K else 0


def largest_weight_ratio(log_diag: torch.Tensor, off_diag: torch.Tensor, S: int, cross=None) -> float:
    """max over pixels and channels of ``sum_i |w_{p,i}| / d_p`` (one reduction pass and one host
    read; the sampling warning's figure), the cross weights of row (c, p) included when given.
    Rows below 1 are diagonally dominant."""
    C = log_diag.shape[1]                # (B, C, H, W) or a volume's (B, C, D, H, W)
    # abs().sum: 0.09 ms at B16 12x64x64 on a 2-core CPU, where vector_norm(ord=1, dim) took 5 ms
    l1 = off_diag.unflatten(1, (C, S)).abs().sum(2)
    if cross is not None and C > 1:
        l1 = l1.index_add(1, cross_pairs(C, l1.device)[0], cross.abs().to(l1.dtype))
    ratio = (l1.log() - log_diag).amax()           # log: no overflow of sum|w| / d where d is tiny
    value = float(ratio)
    return math.exp(value) if value < 700 else math.inf


ILL_CONDITIONED = ("U is far from diagonally dominant: sum_i |w_{{p,i}}| / d_p reaches {ratio:.3g}, so U^-1 "
                   "amplifies the noise; build the distribution with StructuredNormal.from_head(head, stencil) or "
                   "bound the weights with structlik.bound_weights(log_diag, raw, 0.9)")

_warned = False


def warn_ill_conditioned(message: str) -> None:
    """Warn once per process (as torch's TORCH_WARN_ONCE): a model sampled every step would
    otherwise print it every step. ``reset_warnings()`` re-arms it (tests)."""
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(message, IllConditionedWarning, stacklevel=4)   # the caller of rsample


def reset_warnings() -> None:
    global _warned
    _warned = False


class IllConditionedWarning(UserWarning):
    """Sampling from a U that is not diagonally dominant, whose samples were amplified."""
