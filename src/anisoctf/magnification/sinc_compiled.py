"""The sinc resampling's four passes through the compiled kernels of :mod:`._sinc`.

:mod:`anisoctf.magnification.resample` decomposes the sampling matrix into a y scale, a y shear
(with a transpose), an x scale and an x shear (with a transpose), each an 8-tap Kaiser-windowed
sinc along one axis. Its numpy path does the scales as sparse matrix products and the shears as
one multiply and one add per tap over blocks of rows. At 512²–2048² those calls, their
temporaries and the plan's construction cost more than the arithmetic (3.7–21 single-threaded
``rfft2`` of the same size, ``benchmarks/bench_resample.py``). Here every pass is one call of a
C loop that forms each output value as one dot product of the taps, in the order numpy uses; the
plan holds only the tap indices and weights, and is cached per shape and matrix by the caller.

The compiled module is optional (``setup.py``): :data:`AVAILABLE` says whether it was built;
without it the numpy path gives the same numbers to float32 rounding
(``tests/test_resample_compiled.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

try:  # the compiled passes (optional: see setup.py)
    from anisoctf.magnification import _sinc
except ImportError:  # pragma: no cover - depends on the build
    _sinc = None

__all__ = ["AVAILABLE", "CompiledPlan", "LineTaps", "apply_plan"]

#: whether the compiled kernels were built
AVAILABLE: bool = _sinc is not None


@dataclass(frozen=True)
class LineTaps:
    """One pass: for output line ``i``, the source ``index[i]`` (rows of a scale: ``(n, K)``
    source rows; shears: ``(n,)`` first source sample) and the ``K`` float32 ``weights[i]``."""

    index: NDArray[np.int32]
    weights: NDArray[np.float32]

    @classmethod
    def of(cls, index: NDArray, weights: NDArray) -> LineTaps:
        return cls(
            np.ascontiguousarray(index, dtype=np.int32),
            np.ascontiguousarray(weights, dtype=np.float32),
        )


@dataclass(frozen=True)
class CompiledPlan:
    """The four passes for images of shape ``(ny, nx)``; ``n1y`` and ``n3x`` are the lengths of
    the intermediate images (the scales' outputs, with room for the shears' taps)."""

    ny: int
    nx: int
    n1y: int
    n3x: int
    sy: LineTaps
    shear_y: LineTaps
    sx: LineTaps
    shear_x: LineTaps


def apply_plan(plan: CompiledPlan, images: NDArray) -> NDArray[np.float32]:
    """Resample ``images`` ``(count, ny, nx)`` by the four passes; float32 of the same shape."""
    assert _sinc is not None
    ny, nx, n1y, n3x = plan.ny, plan.nx, plan.n1y, plan.n3x
    taps = plan.sy.weights.shape[1]
    count = images.shape[0]
    out = np.empty((count, ny, nx), dtype=np.float32)
    buf = np.empty(max(n1y * nx, n3x * ny), dtype=np.float32)
    t1, j3 = buf[: n1y * nx], buf[: n3x * ny]
    for i in range(count):
        img = np.ascontiguousarray(images[i], dtype=np.float32)
        o = out[i]
        # 1. y scale: T1[y1] = sum_j w I[row_j]; 2. transpose and y shear: J2 (nx, ny), held
        # in the output image's memory until pass 4 overwrites it
        _sinc.mix_rows(img, ny, nx, t1, n1y, plan.sy.index, plan.sy.weights, taps)
        _sinc.shear_transpose(t1, n1y, nx, o, ny, plan.shear_y.index, plan.shear_y.weights, taps)
        # 3. x scale: J3[x3] = sum_j w J2[row_j]; 4. transpose and x shear into O (ny, nx)
        _sinc.mix_rows(o, nx, ny, j3, n3x, plan.sx.index, plan.sx.weights, taps)
        _sinc.shear_transpose(j3, n3x, ny, o, nx, plan.shear_x.index, plan.shear_x.weights, taps)
    return out
