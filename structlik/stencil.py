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
    """Forward half-window of a (2k+1)^ndim neighbourhood, optionally dilated.

    Images (``ndim=2``): for each dilation ``d`` in the order given, the offsets ``(dy, dx)`` are::

        (0, d), (0, 2d), ..., (0, kd),
        then for dy = 1..k, for dx = -k..k:  (dy*d, dx*d)

    Volumes (``ndim=3``, tensors (B, C, D, H, W)): the offsets ``(dz, dy, dx)`` are::

        (0, 0, d), ..., (0, 0, kd),
        then (0, dy*d, dx*d) for dy = 1..k, dx = -k..k,
        then (dz*d, dy*d, dx*d) for dz = 1..k, dy = -k..k, dx = -k..k

    (supn_base's order for its 3-D filters), so S = ((2k+1)^3 - 1)/2 per dilation.

    An offset already listed under an earlier dilation is not listed again.
    Every offset points forward in raster order (the first non-zero component is positive),
    which is what makes U upper-triangular.

    Args:
        radius: k >= 1; the neighbourhood size is n_f = 2k + 1.
        dilations: positive, distinct integers (default ``(1,)``).
        ndim: 2 (images) or 3 (volumes).

    Attributes:
        offsets: tuple of ``(dy, dx)`` (``(dz, dy, dx)`` for volumes) in the order above.
        S: ``len(offsets)``; ``off_diag`` has ``C * S`` channels.
    """

    __slots__ = ("radius", "dilations", "offsets", "ndim", "slice_height", "_tall")

    def __init__(self, radius: int, dilations: Iterable[int] = (1,), ndim: int = 2):
        if not _is_int(radius) or radius < 1:
            raise ValueError(f"Stencil: radius must be an integer >= 1, got {radius!r}")
        if not _is_int(ndim) or ndim not in (2, 3):
            raise ValueError(f"Stencil: ndim must be 2 (images) or 3 (volumes), got {ndim!r}")
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

        offsets: list = []
        seen = set()
        k, dilations = int(radius), tuple(int(d) for d in dilations)
        span = range(-k, k + 1)
        for d in dilations:
            window = [(0, j) for j in range(1, k + 1)] + [(dy, dx) for dy in range(1, k + 1) for dx in span]
            if ndim == 3:
                window = [(0, *o) for o in window] + [(dz, dy, dx) for dz in range(1, k + 1)
                                                      for dy in span for dx in span]
            for off in window:
                off = tuple(v * d for v in off)
                if off not in seen:
                    seen.add(off)
                    offsets.append(off)
        self.radius = k
        self.dilations = dilations
        self.ndim = int(ndim)
        self.offsets: Tuple[Tuple[int, ...], ...] = tuple(offsets)
        self.slice_height = None
        self._tall = None

    @classmethod
    def from_flat_offsets(cls, flat) -> "Stencil":
        """The stencil of the ops' ``offsets`` argument, for the reference kernels behind
        ``torch.ops.structlik_reference``; ``radius`` and ``dilations`` are None.

        Images: ``[dy0, dx0, dy1, dx1, ...]``. Volumes reach the ops as their (B, K, D*H, W) view
        (a volume's memory is a tall image's) with ``[-H, dz0, dy0, dx0, dz1, ...]``: the slice
        height negated, then the (dz, dy, dx) triples (:meth:`op_offsets`). Such a stencil's
        ``offsets`` are the triples and ``slice_height`` is H; ``tall_offsets`` are the flat
        positions (dz*H + dy, dx) in the tall image, which the shifts of the reference use, and
        ``read_mask`` tells which of them stay inside the volume."""
        flat = tuple(int(v) for v in flat)
        out = cls.__new__(cls)
        out.radius = out.dilations = None
        out._tall = None
        if flat and flat[0] < 0:
            out.ndim, out.slice_height = 3, -flat[0]
            if (len(flat) - 1) % 3:
                raise ValueError(f"offsets: a volume's are [-H, dz0, dy0, dx0, ...], got {len(flat)} values")
            out.offsets = tuple(zip(flat[1::3], flat[2::3], flat[3::3]))
        else:
            out.ndim, out.slice_height = 2, None
            if len(flat) % 2:
                raise ValueError(f"offsets: expected [dy0, dx0, dy1, dx1, ...], got {len(flat)} values")
            out.offsets = tuple(zip(flat[::2], flat[1::2]))
        if any(not _forward(o) for o in out.offsets):
            raise ValueError(f"offsets: every offset must point forward in raster order, got {out.offsets}")
        return out

    @classmethod
    def of_offsets(cls, offsets) -> "Stencil":
        """A stencil of these offsets ((dy, dx) pairs, or (dz, dy, dx) triples for volumes), each
        pointing forward in raster order; ``radius`` and ``dilations`` are None."""
        offsets = tuple(tuple(int(v) for v in off) for off in offsets)
        if not offsets or len({len(o) for o in offsets}) != 1 or len(offsets[0]) not in (2, 3):
            raise ValueError(f"offsets: expected (dy, dx) pairs or (dz, dy, dx) triples, got {offsets}")
        if any(not _forward(o) for o in offsets):
            raise ValueError(f"offsets: every offset must point forward in raster order, got {offsets}")
        out = cls.__new__(cls)
        out.radius = out.dilations = None
        out.ndim, out.offsets, out.slice_height, out._tall = len(offsets[0]), offsets, None, None
        return out

    @property
    def S(self) -> int:
        return len(self.offsets)

    @property
    def flat_offsets(self) -> list:
        """``[dy0, dx0, dy1, dx1, ...]``: the form the compiled ops take for images (volumes:
        :meth:`op_offsets`)."""
        if self.ndim != 2:
            raise ValueError("Stencil.flat_offsets: a volume's offsets depend on its slice height: "
                             "use op_offsets(H)")
        return [v for off in self.offsets for v in off]

    def op_offsets(self, H: int) -> list:
        """The ops' ``offsets`` argument for images or volumes of slice height H (see
        :meth:`from_flat_offsets`)."""
        if self.ndim == 2:
            return self.flat_offsets
        return [-int(H)] + [v for off in self.offsets for v in off]

    @property
    def tall_offsets(self) -> Tuple[Tuple[int, int], ...]:
        """(dy, dx) in the image the ops see: the offsets themselves for images; for a volume of
        slice height H (from :meth:`from_flat_offsets`), (dz*H + dy, dx)."""
        if self.ndim == 2:
            return self.offsets
        if self.slice_height is None:
            raise ValueError("Stencil.tall_offsets: a volume's stencil needs its slice height (from_flat_offsets)")
        if self._tall is None:
            self._tall = tuple((dz * self.slice_height + dy, dx) for dz, dy, dx in self.offsets)
        return self._tall

    def reachable(self, i: int) -> bool:
        """Whether offset i can land inside some image or volume of this slice height: a volume's
        (dz, dy, dx) with |dy| >= H never does (its weights are never part of U)."""
        return self.ndim == 2 or self.slice_height is None or abs(self.offsets[i][1]) < self.slice_height

    @property
    def wavefront_slope(self) -> int:
        """Smallest integer a >= 1 with a*dy + dx >= 1 for every offset (of a volume: every
        in-slice one, dz = 0).

        Pixel (y, x) only depends on pixels whose time t = a*(H-1-y) + (W-1-x) is
        strictly smaller, so all pixels with equal t can be solved at once.
        """
        slope = 1
        for off in self.offsets:
            dz, dy, dx = (0, *off) if len(off) == 2 else off
            if dz == 0 and dy > 0:
                slope = max(slope, math.ceil((1 - dx) / dy))
        return slope

    @property
    def depth_slope(self) -> int:
        """A volume's slope across slices: the smallest b >= 1 with b*dz + a*dy + dx >= 1 for
        every offset with dz > 0 (a = ``wavefront_slope``), so that voxel (z, y, x) at time
        t = b*(D-1-z) + a*(H-1-y) + (W-1-x) depends only on earlier times. 1 for images."""
        a, slope = self.wavefront_slope, 1
        for off in self.offsets:
            if len(off) == 3 and off[0] > 0:
                dz, dy, dx = off
                slope = max(slope, math.ceil((1 - a * dy - dx) / dz))
        return slope

    def __len__(self) -> int:
        return self.S

    def __eq__(self, other) -> bool:
        return (isinstance(other, Stencil) and self.offsets == other.offsets
                and self.slice_height == other.slice_height)

    def __hash__(self) -> int:
        return hash((self.offsets, self.slice_height))

    def __repr__(self) -> str:
        dims = "" if self.ndim == 2 else f", ndim={self.ndim}"
        return f"Stencil(radius={self.radius}, dilations={self.dilations}{dims}, S={self.S})"


def _forward(off) -> bool:
    """The first non-zero component is positive (raster order)."""
    for v in off:
        if v:
            return v > 0
    return False
