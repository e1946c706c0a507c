"""The band of the covariance Sigma = Lambda^-1 (docs/contract.md §1, docs/kernels.md §4): the op
``structlik::covariance_band`` and its fused gradient ``covariance_band_backward``, and the public,
validated ``covariance_band`` and ``variance``.

``covariance_band(log_diag, off_diag, offsets, diagonal_only)`` returns the entries Sigma_{p,p+k},
k = 0..b (b = band_width, the largest flat offset dy*W + dx), as (B, C*L, H, W) with L = b + 1,
channel c*L + k, 0 where p + k is past the image; with ``diagonal_only`` just the variances
Sigma_pp, (B, C, H, W), computed in the same sweep without storing the band. The backward
(the adjoint of the sweep) reads the band: saved when it was the output, recomputed otherwise.

Kernels: the reference (block-Takahashi, ``structlik.reference.covariance_band``), C++
``csrc/covariance_band.cpp`` (CPU), Triton ``structlik/kernels/covariance_band.py`` (CUDA).
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from .. import _checks, reference
from .._dtypes import upcast
from ..interleave import deinterleave, interleave, interleave_weights, interleaved_stencil
from ..stencil import Stencil
from . import _forced, _library


def band_length(offsets: List[int], W: int) -> int:
    """L = b + 1, the band entries per pixel: b is the largest flat offset dy*W + dx (of a volume:
    dz*H*W + dy*W + dx, its tall view's)."""
    return max(dy * W + dx for dy, dx in Stencil.from_flat_offsets(offsets).tall_offsets) + 1


def _reference(log_diag: Tensor, off_diag: Tensor, offsets: List[int], diagonal_only: bool) -> Tensor:
    args = upcast(log_diag, off_diag)
    out = reference.covariance_band(*args, Stencil.from_flat_offsets(offsets), diagonal_only)
    return out.to(log_diag.dtype).contiguous()


def _reference_backward(grad: Tensor, log_diag: Tensor, off_diag: Tensor, band: Tensor, offsets: List[int]):
    args = upcast(grad, log_diag, off_diag, band)
    gs, gw = reference.covariance_band_backward(*args, Stencil.from_flat_offsets(offsets))
    return gs.to(log_diag.dtype).contiguous(), gw.to(off_diag.dtype).contiguous()


def _triton(log_diag, off_diag, offsets, diagonal_only):
    return _library.triton_kernels("covariance_band").launch(log_diag, off_diag, offsets, diagonal_only)


def _triton_backward(grad, log_diag, off_diag, band, offsets):
    return _library.triton_kernels("covariance_band").launch_backward(grad, log_diag, off_diag, band, offsets)


def _fake(log_diag, off_diag, offsets, diagonal_only):
    B, C, H, W = log_diag.shape
    return log_diag.new_empty(B, C * (1 if diagonal_only else band_length(offsets, W)), H, W)


def _fake_backward(grad, log_diag, off_diag, band, offsets):
    return log_diag.new_empty(log_diag.shape), off_diag.new_empty(off_diag.shape)


_covariance_band_backward = _library.define(
    "covariance_band_backward(Tensor grad, Tensor log_diag, Tensor off_diag, Tensor band, int[] offsets) "
    "-> (Tensor, Tensor)", reference=_reference_backward, fake=_fake_backward, triton=_triton_backward)


def _save(ctx, inputs, output):
    log_diag, off_diag, offsets, diagonal_only = inputs
    ctx.save_for_backward(log_diag, off_diag, None if diagonal_only else output)
    ctx.offsets, ctx.diagonal_only = offsets, diagonal_only


def _composed(ctx, G, log_diag, off_diag):
    """The gradient as a graph (create_graph: second order): autograd through the reference."""
    need = ctx.needs_input_grad[:2]
    stencil = Stencil.from_flat_offsets(ctx.offsets)

    def band(s, w):
        return reference.covariance_band(*upcast(s, w), stencil, ctx.diagonal_only)
    # torch.func.vjp, not torch.autograd.grad of a recomputed graph: it composes with the outer
    # autograd (second order) and with torch.func's transforms (jacrev, vmap(grad)), under which the
    # saved tensors are another level's and autograd.grad finds no graph to them.
    out, pullback = torch.func.vjp(band, log_diag, off_diag)
    grads = pullback(G.to(out.dtype))
    return tuple(g.to(t.dtype) if n else None for g, t, n in zip(grads, (log_diag, off_diag), need))


def _formula(ctx, G):
    log_diag, off_diag, band = ctx.saved_tensors
    need = ctx.needs_input_grad
    if not (need[0] or need[1]):
        return None, None, None, None
    if torch.is_grad_enabled():
        gs, gw = _composed(ctx, G, log_diag, off_diag)
    else:
        if ctx.diagonal_only:
            band = covariance_band_op(log_diag, off_diag, ctx.offsets, False)
            B, C, H, W = log_diag.shape
            full = G.new_zeros(B, C, band.shape[1] // C, H, W)
            full[:, :, 0] = G
            G = full.flatten(1, 2)
        gs, gw = _covariance_band_backward(G.contiguous(), log_diag, off_diag, band, ctx.offsets)
    return gs if need[0] else None, gw if need[1] else None, None, None


covariance_band_op = _library.define(
    "covariance_band(Tensor log_diag, Tensor off_diag, int[] offsets, bool diagonal_only) -> Tensor",
    reference=_reference, fake=_fake, triton=_triton, backward=_formula, setup_context=_save)


def _checked(log_diag, off_diag, stencil, diagonal_only, op):
    _checks.check_params(log_diag, off_diag, stencil)
    _forced.prepare(log_diag.device)
    log_diag, off_diag = _checks.promote(log_diag, off_diag)
    folded = [_library.fold(t) for t in upcast(log_diag, off_diag)]
    out = covariance_band_op(*folded, _library.op_offsets(stencil, log_diag), diagonal_only)
    out = _library.unfold(out, log_diag).to(log_diag.dtype)
    _checks.check_result(out, {"log_diag": log_diag, "off_diag": off_diag}, op=op)
    return out


def variance(log_diag: Tensor, off_diag: Tensor, stencil: Stencil, cross: Optional[Tensor] = None) -> Tensor:
    """The exact marginal variances Sigma_pp of Sigma = (U^T U)^-1: (B, C, H, W). One sweep of
    n*b*S multiply-adds per plane (b = stencil's largest flat offset), a window of (b+1)^2 values.
    With ``cross`` (B, C(C-1)/2, H, W), of Sigma = (M^T M)^-1: the sweep runs on the coupled
    channels laid out as one channel of width C*W (structlik.interleave: the same matrix, its
    unknowns permuted), whose band is C times wider."""
    _checks.check_params(log_diag, off_diag, stencil, cross)
    C = log_diag.shape[1]
    if cross is None or C == 1:
        return _checked(log_diag, off_diag, stencil, True, "variance")
    log_diag, off_diag, cross = _checks.promote(log_diag, off_diag, cross)
    nd = stencil.ndim
    with _checks.validation(False):      # named below, against the caller's tensors
        out = _checked(interleave(log_diag, nd), interleave_weights(off_diag, cross, C, stencil),
                       interleaved_stencil(stencil, C), True, "variance")
    out = deinterleave(out, C, nd)
    _checks.check_result(out, {"log_diag": log_diag, "off_diag": off_diag, "cross": cross}, op="variance")
    return out


def covariance_band(log_diag: Tensor, off_diag: Tensor, stencil: Stencil) -> Tensor:
    """Sigma's band: (B, C*L, H, W), channel c*L + k holding Sigma_{p, p+k} (p in raster order;
    0 past the image), L = b + 1 with b = max(dy*W + dx) over the stencil's offsets."""
    return _checked(log_diag, off_diag, stencil, False, "covariance_band")
