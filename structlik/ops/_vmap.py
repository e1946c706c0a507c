"""vmap rules for every op (``torch.func.vmap``, and ``vmap(grad(...))`` for per-sample gradients).

Every op works on a batch of images already, so the rule folds the vmapped
dimension into that batch: (V, B, ...) -> (V*B, ...), one call, and the
outputs unfolded. It calls the op once per vmapped slice instead where folding
would change the meaning: a batched argument that is not per image (the
learned basis), an op with an output that is not per image (the basis
gradient), or operands whose batches differ (a solve's parameters repeated
over samples, weight_grad summing repeated images into its ``batch``).
"""
from __future__ import annotations

import torch

# Arguments with no image batch dimension.
_SHARED = {"basis", "offsets", "c0", "store_u"}


def _per_slice(op, size, in_dims, args):
    outs = []
    for v in range(size):
        outs.append(op(*(a.select(d, v) if isinstance(a, torch.Tensor) and d is not None else a
                         for a, d in zip(args, in_dims))))
    if isinstance(outs[0], tuple):
        return tuple(torch.stack(parts) for parts in zip(*outs)), tuple(0 for _ in outs[0])
    return torch.stack(outs), 0


def _placeholder(a, d) -> bool:
    """An empty (0,) tensor standing for an absent operand (the NLL's u when it was not stored)."""
    return a.dim() == (1 if d is None else 2) and a.shape[-1 if d == 0 or d is None else 0] == 0


def rule(op, arg_names, per_slice_op):
    """The vmap rule of ``op`` (argument names ``arg_names``); ``per_slice_op``: always one call
    per slice (an op with an output that is not per image: the basis gradient), or a function of
    the arguments by name saying when."""
    def rule(info, in_dims, *args):
        size = info.batch_size
        named = dict(zip(arg_names, args))
        per_slice = per_slice_op(named) if callable(per_slice_op) else per_slice_op
        shared_batched = any(isinstance(a, torch.Tensor) and d is not None
                             for n, a, d in zip(arg_names, args, in_dims) if n in _SHARED)
        images = [a.shape[0 if d is None else (1 if d == 0 else 0)] for n, a, d in zip(arg_names, args, in_dims)
                  if isinstance(a, torch.Tensor) and n not in _SHARED and not _placeholder(a, d)]
        # weight_grad's output batch: foldable when it is the images' (no repeats summed), times size
        summed = "batch" in named and images and named["batch"] != images[0]
        if per_slice or shared_batched or len(set(images)) > 1 or summed:
            return _per_slice(op, size, in_dims, args)
        folded = []
        for name, a, d in zip(arg_names, args, in_dims):
            if isinstance(a, torch.Tensor) and name not in _SHARED and not _placeholder(a, d):
                a = a.unsqueeze(0).expand(size, *a.shape) if d is None else a.movedim(d, 0)
                a = a.reshape(size * a.shape[1], *a.shape[2:])
            elif name == "batch":
                a = a * size
            folded.append(a)
        out = op(*folded)

        def unfold(t):       # (a placeholder output stays one, shared by every slice)
            return t.unsqueeze(0).expand(size, *t.shape) if t.dim() == 1 and t.shape[0] == 0 else \
                t.reshape(size, t.shape[0] // size, *t.shape[1:])
        if isinstance(out, tuple):
            return tuple(unfold(t) for t in out), tuple(0 for _ in out)
        return unfold(out), 0
    return rule
