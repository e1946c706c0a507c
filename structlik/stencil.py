"""The sparsity pattern of U: which forward neighbours each pixel couples to."""
from __future__ import annotations

import math
import numbers
from typing import Iterable, Tuple

__all__ = ["Stencil"]


def _is_int(value) -> bool:
    # Any integer type (numpy's too); bool is an int subclass, and Stencil(radius=True) is almost
    # certainly a bug.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


class Stencil:
    """Forward half-window of a (2k+1)x(2k+1) neighbourhood, optionally dilated.

    For each dilation ``d`` in the order given, the offsets ``(dy, dx)`` are::

        (0, d), (0, 2d), ..., (0, kd),
        then for dy = 1..k, for dx = -k..k:  (dy*d, dx*d)

    An offset already listed under an earlier dilation is not listed again.
    Every offset points forward in raster order (dy > 0, or dy == 0 and dx > 0),
    which is what makes U upper-triangular.

    Args:
        radius: k >= 1; the neighbourhood size is n_f = 2k + 1.
        dilations: positive, distinct integers (default ``(1,)``).

    Attributes:
        offsets: tuple of ``(dy, dx)`` in the order above.
        S: ``len(offsets)``; ``off_diag`` has ``C * S`` channels.
    """

    __slots__ = ("radius", "dilations", "offsets")

    def __init__(self, radius: int, dilations: Iterable[int] = (1,)):
        if not _is_int(radius) or radius < 1:
            raise ValueError(f"Stencil: radius must be an integer >= 1, got {radius!r}")
        try:
            dilations = tuple(dilations)
        except TypeError:
            raise TypeError(
                f"Stencil: dilations must be a sequence of positive integers, got {dilations!r}"
            ) from None
        if not dilations:
            raise ValueError("Stencil: dilations must not be empty")
        for d in dilations:
            if not _is_int(d) or d < 1:
                raise ValueError(f"Stencil: dilations must be positive integers, got {dilations!r}")
        if len(set(dilations)) != len(dilations):
            raise ValueError(f"Stencil: dilations must be unique, got {dilations!r}")

        offsets: list[Tuple[int, int]] = []
        seen = set()
        radius, dilations = int(radius), tuple(int(d) for d in dilations)
        for d in dilations:
            window = [(0, j * d) for j in range(1, radius + 1)]
            window += [(dy * d, dx * d) for dy in range(1, radius + 1) for dx in range(-radius, radius + 1)]
            for off in window:
                if off not in seen:
                    seen.add(off)
                    offsets.append(off)
        self.radius = int(radius)
        self.dilations = tuple(int(d) for d in dilations)
        self.offsets: Tuple[Tuple[int, int], ...] = tuple(offsets)

    @classmethod
    def from_flat_offsets(cls, flat) -> "Stencil":
        """The stencil of ``[dy0, dx0, dy1, dx1, ...]`` (the form the ops take), for the
        reference kernels behind ``torch.ops.structlik_reference``. It has the offsets,
        S and the wavefront slope; ``radius`` and ``dilations`` are None."""
        flat = tuple(int(v) for v in flat)
        out = cls.__new__(cls)
        out.radius = out.dilations = None
        out.offsets = tuple(zip(flat[::2], flat[1::2]))
        if any(not (dy > 0 or (dy == 0 and dx > 0)) for dy, dx in out.offsets):
            raise ValueError(f"offsets: every (dy, dx) must point forward in raster order, got {out.offsets}")
        return out

    @property
    def S(self) -> int:
        return len(self.offsets)

    @property
    def flat_offsets(self) -> list:
        """``[dy0, dx0, dy1, dx1, ...]``: the form the compiled ops take."""
        return [v for off in self.offsets for v in off]

    @property
    def wavefront_slope(self) -> int:
        """Smallest integer a >= 1 with a*dy + dx >= 1 for every offset.

        Pixel (y, x) only depends on pixels whose time t = a*(H-1-y) + (W-1-x) is
        strictly smaller, so all pixels with equal t can be solved at once.
        """
        slope = 1
        for dy, dx in self.offsets:
            if dy > 0:
                slope = max(slope, math.ceil((1 - dx) / dy))
        return slope

    def __len__(self) -> int:
        return self.S

    def __eq__(self, other) -> bool:
        return isinstance(other, Stencil) and self.offsets == other.offsets

    def __hash__(self) -> int:
        return hash(self.offsets)

    def __repr__(self) -> str:
        return f"Stencil(radius={self.radius}, dilations={self.dilations}, S={self.S})"
