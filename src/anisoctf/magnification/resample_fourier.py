"""The ``"fourier"`` method of :func:`anisoctf.magnification.resample.correct_image`.

Exact trigonometric (band-limited) interpolation of every line, in two passes. Each pass
evaluates the line's Fourier series at uniformly spaced points with a chirp-z transform
(Bluestein), so arbitrary scale and sub-pixel offset are exact for each line. The image is padded
by symmetric reflection and the padding tapered to the mean, so the periodic continuation is
smooth and nothing wraps into the image. Slow: the reference the faster methods are measured
against (``benchmarks/bench_resample.py``).
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import NDArray

from anisoctf._lazy import lazy

sfft = lazy("scipy.fft")

__all__ = ["fourier_apply"]

# taper width (pixels) of the padding
_TAPER = 32
# lines per chunk (bounds the memory)
_FOURIER_CHUNK = 256


def _taper_pad(image: NDArray, pad: tuple[int, int, int, int]) -> NDArray[np.float32]:
    """Pad by symmetric reflection, then taper the padding to the mean (raised cosine).

    The taper goes from 1 at the image edge to 0 at the outer edge of the padding, on both
    sides, so the periodic continuation of every row and column is smooth and at the mean.
    """
    top, bottom, left, right = pad
    img = np.asarray(image, dtype=np.float32)
    p = np.pad(img, ((top, bottom), (left, right)), "symmetric")
    mean = np.float32(np.mean(img, dtype=np.float64))
    p -= mean

    def ramp(n_in: int, lo: int, hi: int) -> NDArray[np.float32]:
        w = np.ones(n_in + lo + hi, dtype=np.float32)
        if lo:
            w[:lo] = 0.5 - 0.5 * np.cos(np.pi * (np.arange(lo) + 0.5) / lo)
        if hi:
            w[n_in + lo :] = (0.5 - 0.5 * np.cos(np.pi * (np.arange(hi) + 0.5) / hi))[::-1]
        return w

    p *= ramp(img.shape[0], top, bottom)[:, None]
    p *= ramp(img.shape[1], left, right)[None, :]
    p += mean
    return p


def _fourier_lines(
    src: NDArray, t0: NDArray[np.float64], scale: float, out: NDArray[np.float32]
) -> None:
    """``out[r, m] = f_r(t0[r] + scale m)``, ``f_r`` the trigonometric interpolant of ``src[r]``.

    Rows are periodic with their length ``L``; ``f_r(t) = Re sum_k c_k F_k exp(2 pi i k t / L)``
    over ``k = 0 .. L/2`` (``c_k = 2/L``, ``1/L`` for ``k = 0`` and the Nyquist term). The sum
    at uniformly spaced points is a chirp-z transform, computed with Bluestein's identity
    ``k m = (k² + m² - (m - k)²) / 2`` as one FFT convolution per row; the per-row start ``t0``
    is a phase ramp. ``src`` and ``out`` may be strided views (rows are copied in chunks);
    the arithmetic is in double precision.
    """
    rows, length = src.shape
    n_out = out.shape[1]
    nk = length // 2 + 1
    c = np.full(nk, 2.0 / length)
    c[0] = 1.0 / length
    if length % 2 == 0:
        c[-1] = 1.0 / length
    k = np.arange(nk, dtype=np.float64)
    m = np.arange(n_out, dtype=np.float64)
    nfft = sfft.next_fast_len(nk + n_out - 1)

    def chirp(x: NDArray[np.float64]) -> NDArray[np.complex128]:
        # exp(2 pi i scale x / L), the phase reduced to [0, 1) turns in double precision
        return np.exp(2j * np.pi * np.mod(scale * x / length, 1.0))

    pre = c * chirp(0.5 * k * k)
    post = chirp(0.5 * m * m)
    n = np.arange(-(nk - 1), n_out, dtype=np.float64)
    b = np.zeros(nfft, dtype=np.complex128)
    b[np.mod(n, nfft).astype(np.int64)] = chirp(-0.5 * n * n)
    bf = sfft.fft(b)
    for r0 in range(0, rows, _FOURIER_CHUNK):
        r1 = min(rows, r0 + _FOURIER_CHUNK)
        f = sfft.rfft(np.asarray(src[r0:r1], dtype=np.float64), axis=1)
        f *= np.exp(2j * np.pi * np.mod(np.outer(t0[r0:r1], k) / length, 1.0))
        f *= pre
        conv = sfft.ifft(sfft.fft(f, n=nfft, axis=1) * bf, axis=1)[:, :n_out]
        out[r0:r1] = (conv * post).real


def fourier_apply(
    image: NDArray, a: NDArray[np.float64], centre: tuple[float, float]
) -> NDArray[np.float32]:
    """``O(u) = I(c + A (u - c))`` by two passes of exact trigonometric interpolation
    (``A = B C``: a per-column affine map along y, then a per-row affine map along x); ``c`` is
    ``centre`` = ``(cx, cy)``, vectors ``(x, y)`` = (column, row)."""
    ny, nx = image.shape
    cx, cy = centre
    # A = B C, B = [[1, 0], [p, q]] (per-column map along y), C = [[r, s], [0, 1]] (along x)
    r_, s_ = float(a[0, 0]), float(a[0, 1])
    p_ = float(a[1, 0]) / r_
    q_ = float(np.linalg.det(a)) / r_
    yt = np.arange(ny, dtype=np.float64) - cy
    xt = np.arange(nx, dtype=np.float64) - cx
    # how far outside the image each pass reads
    xs = r_ * xt[[0, -1]][:, None] + s_ * yt[[0, -1]][None, :]
    mx = int(math.ceil(max(0.0, xt[0] - xs.min(), xs.max() - xt[-1]))) + _TAPER + 2
    lx = sfft.next_fast_len(nx + 2 * mx, real=True)
    left = (lx - nx) // 2
    xcols = np.arange(lx, dtype=np.float64) - left - cx  # relative x of every padded column
    ys = p_ * xcols[[0, -1]][:, None] + q_ * yt[[0, -1]][None, :]
    my = int(math.ceil(max(0.0, yt[0] - ys.min(), ys.max() - yt[-1]))) + _TAPER + 2
    ly = sfft.next_fast_len(ny + 2 * my, real=True)
    top = (ly - ny) // 2
    padded = _taper_pad(image, (top, ly - ny - top, left, lx - nx - left))
    # y pass: T(x, y) = I(x, p x + q y), along the columns of the padded image
    t = np.empty((ny, lx), dtype=np.float32)
    _fourier_lines(padded.T, p_ * xcols + q_ * yt[0] + cy + top, q_, t.T)
    del padded
    # x pass: O(x, y) = T(r x + s y, y)
    out = np.empty((ny, nx), dtype=np.float32)
    _fourier_lines(t, r_ * xt[0] + s_ * yt + cx + left, r_, out)
    return out
