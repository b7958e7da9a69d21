"""Resample recorded images, particle coordinates and shifts into the true (corrected) frame.

Geometry (``docs/correction.md`` has the derivation). With ``k_true = M k_obs`` (RELION's
``_rlnMagMat``, :mod:`anisoctf.optics.magmat`), a plane wave is the same physical wave in
both frames when ``k_true · x_true = k_obs · x_obs``, hence for positions in Å

    x_true = M^-T x_obs.

The corrected image has pixel size ``p_c`` (``p`` is the recorded image's). Positions in pixels
``u = x / p`` then map as ``u_c = (p / p_c) M^-T u_obs = N^-T u_obs`` about the image centre, where

* ``keep_pixel_size=False`` (the default): ``p_c = p / s`` with ``s = sqrt(det M)``, and
  ``N = M / s`` has unit determinant. The isotropic part of ``M`` becomes a pixel-size
  correction; the resampling only removes the area-preserving distortion.
* ``keep_pixel_size=True``: ``p_c = p`` and ``N = M``; the image is also scaled by ``s``.

Either way the corrected image is a true-frame image (``M = I`` at pixel size ``p_c``): its CTF is
the true-frame CTF, with ``D_true = M^-T D_obs M^-1`` in Å
(:func:`~anisoctf.optics.frames.defocus_table_to_true`).

The corrected image is ``O(u) = I(c + A (u - c))`` with the *sampling matrix* ``A = N^T`` (output
pixel → input position), vectors ``(x, y)`` = (column, row) and the centre ``c = (nx // 2,
ny // 2)`` (the FFT centre, and RELION's box centre). A particle seen at ``u`` in the recorded
image is at ``c + A^-1 (u - c)`` in the corrected one (:func:`correct_coordinates`).

Methods (accuracy and speed measured by ``benchmarks/bench_resample.py``):

``"sinc"`` (default)
    Four one-dimensional passes, ``A = diag(1, q) [[1, 0], [l, 1]] diag(r, 1) [[1, u], [0, 1]]``
    (a y scale, a y shear, an x scale, an x shear), each with an 8-tap Kaiser-windowed sinc.
    Each pass is arranged so that its interpolation weights are shared along a whole line: a
    scale has the same weights for every line (one sparse matrix product that mixes rows), a
    shear one fractional offset per line. The shears run on cache-sized strips that are
    transposed on the fly, so every pass reads contiguous memory; two buffers are used in turn
    (about 2x the image's memory). Edges: symmetric reflection (nothing wraps).
``"fourier"``
    Exact trigonometric (band-limited) interpolation of every line, in two passes
    (``A = B C``: a per-column affine map along y, then a per-row affine map along x). Each pass
    evaluates the line's Fourier series at uniformly spaced points with a chirp-z transform
    (Bluestein), so arbitrary scale and sub-pixel offset are exact for each line. The image is
    padded by symmetric reflection and the padding tapered to the mean, so the periodic
    continuation is smooth and nothing wraps into the image. Slow (a reference).
``"spline"``
    :func:`scipy.ndimage.affine_transform`, cubic B-spline (order 3) with its prefilter,
    ``mode="reflect"``.
``"bilinear"``
    The same with ``order=1``; the baseline.

All methods return float32. A separable decomposition treats each line as band-limited on its
own: frequencies within about ``|A - I| / 2`` cycles/pixel of Nyquist are slightly aliased.
Output pixels whose source lies outside the recorded image (a border up to about
``|A - I| · N / 2`` pixels wide) get reflected content.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from anisoctf._lazy import lazy
from anisoctf.optics.magmat import MagMat, as_matrix

ndi = lazy("scipy.ndimage")
sfft = lazy("scipy.fft")
sps = lazy("scipy.sparse")
special = lazy("scipy.special")

__all__ = [
    "DEFAULT_METHOD",
    "METHODS",
    "correct_coordinates",
    "correct_image",
    "correct_shifts",
    "corrected_pixel_size",
    "image_centre",
    "pixel_matrix",
    "sampling_matrix",
]

#: Resampling methods understood by :func:`correct_image`.
METHODS: tuple[str, ...] = ("sinc", "fourier", "spline", "bilinear")
#: The default method (the fastest one that meets 1e-3 relative RMS at 3 % anisotropy).
DEFAULT_METHOD = "sinc"

#: Largest ``max |A - I|`` accepted by the separable methods (anisomag is a few per cent).
_MAX_SEPARABLE_DISTORTION = 0.25

# 8-tap Kaiser-windowed sinc (beta 7): ~1e-4 relative RMS per pass on band-limited images
_SINC_TAPS = 8
_SINC_BETA = 7.0
# fractions tabulated for the kernel lookup
_TABLE_STEPS = 4096
# rows per block of the row passes (64 float32 = four 64-byte cache lines per source row);
# fewer (down to 16) when the shift changes fast, so that a block needs few extra taps
_STRIP = 64
# elements per group of images in a row pass of a stack (keeps the strips in cache)
_GROUP_ELEMENTS = 1 << 18
# largest chunk (elements) of the sparse products' results (1/16 of the image when smaller)
_SPARSE_CHUNK_ELEMENTS = 1 << 19
# pixels per batch when a stack is resampled by the sinc method (bounds its memory)
_BATCH_PIXELS = 1 << 24
# taper width (pixels) of the Fourier method's padding
_TAPER = 32
# lines per chunk in the Fourier method (bounds its memory)
_FOURIER_CHUNK = 256


# ============================================================================ geometry
def _check_keep(keep_pixel_size: bool) -> None:
    if not isinstance(keep_pixel_size, bool | np.bool_):
        raise TypeError(f"keep_pixel_size must be a bool, got {keep_pixel_size!r}")


def pixel_matrix(m: MagMat | ArrayLike, *, keep_pixel_size: bool = False) -> NDArray[np.float64]:
    """The matrix ``N`` that relates pixel positions: ``u_corrected = N^-T u_observed``.

    ``N = M / sqrt(det M)`` (unit determinant; the isotropic part goes into the pixel size,
    see :func:`corrected_pixel_size`), or ``N = M`` with ``keep_pixel_size=True``.
    """
    _check_keep(keep_pixel_size)
    a = as_matrix(m)
    if keep_pixel_size:
        return a
    return a / math.sqrt(float(np.linalg.det(a)))


def sampling_matrix(m: MagMat | ArrayLike, *, keep_pixel_size: bool = False) -> NDArray[np.float64]:
    """``A = N^T``: output pixel ``u`` of the corrected image reads the input at ``c + A (u - c)``.

    Vectors are ``(x, y)`` = (column, row), ``c`` is :func:`image_centre`.
    """
    return pixel_matrix(m, keep_pixel_size=keep_pixel_size).T.copy()


def corrected_pixel_size(
    pixel_size: float, m: MagMat | ArrayLike, *, keep_pixel_size: bool = False
) -> float:
    """Pixel size (Å) of the corrected image: ``p / sqrt(det M)``, or ``p`` when kept."""
    _check_keep(keep_pixel_size)
    if not (np.isfinite(pixel_size) and pixel_size > 0):
        raise ValueError(f"pixel size must be a positive number of Å, got {pixel_size}")
    if keep_pixel_size:
        as_matrix(m)  # validate
        return float(pixel_size)
    a = as_matrix(m)
    return float(pixel_size) / math.sqrt(float(np.linalg.det(a)))


def image_centre(shape: tuple[int, ...]) -> tuple[float, float]:
    """``(cx, cy) = (nx // 2, ny // 2)`` for an image of shape ``(..., ny, nx)``."""
    if len(shape) < 2:
        raise ValueError(f"an image shape needs at least 2 dimensions, got {shape}")
    ny, nx = int(shape[-2]), int(shape[-1])
    if ny < 1 or nx < 1:
        raise ValueError(f"image shape must be positive, got {shape}")
    return float(nx // 2), float(ny // 2)


def correct_coordinates(
    x: ArrayLike,
    y: ArrayLike,
    m: MagMat | ArrayLike,
    shape: tuple[int, ...],
    *,
    keep_pixel_size: bool = False,
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Map positions in the recorded image to the corrected image made by :func:`correct_image`.

    Parameters
    ----------
    x, y
        Pixel positions (``_rlnCoordinateX/Y``): x = column, y = row, 0-based pixel centres.
        Broadcastable arrays or scalars.
    m
        Magnification matrix, ``k_true = M k_obs``.
    shape
        ``(ny, nx)`` of the image (the micrograph for particle coordinates); the map is about
        :func:`image_centre`.
    keep_pixel_size
        As for :func:`correct_image`.

    Returns
    -------
    (x, y)
        ``c + N^-T (u - c)`` as float arrays.
    """
    cx, cy = image_centre(tuple(shape))
    ainv = np.linalg.inv(sampling_matrix(m, keep_pixel_size=keep_pixel_size))
    dx = np.asarray(x, dtype=float) - cx
    dy = np.asarray(y, dtype=float) - cy
    return cx + ainv[0, 0] * dx + ainv[0, 1] * dy, cy + ainv[1, 0] * dx + ainv[1, 1] * dy


def correct_shifts(
    dx: ArrayLike,
    dy: ArrayLike,
    m: MagMat | ArrayLike,
    *,
    unit: str = "angstrom",
    keep_pixel_size: bool = False,
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Map a displacement (e.g. ``_rlnOriginXAngst/YAngst``) into the corrected frame.

    ``unit="angstrom"``: ``v_true = M^-T v_obs`` (physical lengths; the same for either pixel
    size convention). ``unit="pixel"``: ``N^-T v`` in pixels of the recorded and of the corrected
    image (``_rlnOriginX/Y`` of RELION 3.0).
    """
    if unit == "angstrom":
        t = np.linalg.inv(as_matrix(m)).T
    elif unit == "pixel":
        t = np.linalg.inv(sampling_matrix(m, keep_pixel_size=keep_pixel_size))
    else:
        raise ValueError(f"unit must be 'angstrom' or 'pixel', got {unit!r}")
    vx = np.asarray(dx, dtype=float)
    vy = np.asarray(dy, dtype=float)
    return t[0, 0] * vx + t[0, 1] * vy, t[1, 0] * vx + t[1, 1] * vy


# ============================================================================ helpers
def _reflect_index(idx: NDArray[np.integer], n: int) -> NDArray[np.int64]:
    """Symmetric (half-sample) reflection of integer indices into ``[0, n)``: ... b a | a b ..."""
    i = np.mod(np.asarray(idx, dtype=np.int64), 2 * n)
    return np.where(i >= n, 2 * n - 1 - i, i)


def _sinc_kernel(frac: NDArray[np.float64]) -> NDArray[np.float64]:
    """Kaiser-windowed sinc evaluated exactly at taps ``-K/2+1 .. K/2`` minus ``frac``."""
    h = _SINC_TAPS // 2
    j = np.arange(-h + 1, h + 1, dtype=np.float64)
    t = j[None, :] - np.asarray(frac, dtype=np.float64)[:, None]
    x = np.clip(1.0 - (t / h) ** 2, 0.0, None)
    return np.sinc(t) * special.i0(_SINC_BETA * np.sqrt(x)) / special.i0(_SINC_BETA)


@functools.lru_cache(maxsize=1)
def _sinc_table() -> NDArray[np.float64]:
    """The kernel tabulated at ``_TABLE_STEPS + 1`` fractions in [0, 1] (for fast lookup)."""
    return _sinc_kernel(np.linspace(0.0, 1.0, _TABLE_STEPS + 1))


def _sinc_weights(frac: NDArray[np.float64]) -> NDArray[np.float64]:
    """Interpolation weights ``(len(frac), K)`` for taps ``floor + (-K/2+1 .. K/2)``.

    ``frac`` in [0, 1) is the position minus its floor. The kernel is looked up in a table and
    interpolated linearly (error below 1e-7); rows are normalised to sum 1, so constants stay
    exact, and ``frac = 0`` gives the unit impulse (the identity is exact).
    """
    table = _sinc_table()
    f = np.clip(np.asarray(frac, dtype=np.float64), 0.0, 1.0) * _TABLE_STEPS
    i = np.minimum(f.astype(np.int64), _TABLE_STEPS - 1)
    g = (f - i)[:, None]
    w = table[i] * (1.0 - g) + table[i + 1] * g
    return w / w.sum(axis=1, keepdims=True)


def _line_matrix(pos: NDArray[np.float64], n_src: int) -> sps.csr_matrix:
    """Sparse ``(len(pos), n_src)`` interpolation matrix: row i samples the lines at ``pos[i]``.

    Taps outside ``[0, n_src)`` are reflected (half-sample symmetric); repeated columns in a row
    are kept as separate entries, which the product sums.
    """
    base = np.floor(pos)
    w = _sinc_weights(pos - base).astype(np.float32)
    h = _SINC_TAPS // 2
    cols = base.astype(np.int64)[:, None] + np.arange(-h + 1, h + 1)[None, :]
    cols = _reflect_index(cols, n_src).astype(np.int32)
    indptr = np.arange(0, len(pos) * _SINC_TAPS + 1, _SINC_TAPS, dtype=np.int32)
    return sps.csr_matrix((w.ravel(), cols.ravel(), indptr), shape=(len(pos), n_src))


@dataclass(frozen=True)
class _RowPass:
    """Transpose and shift every row by its own sub-pixel amount.

    ``out[i, r, m] = src_i(pos0[r] + m, r)``: row ``r`` of the result is column ``r`` of the
    source image ``i``, interpolated along its length. Rows are handled in blocks of up to
    :data:`_STRIP` (whole cache lines of each source row): a block's columns are copied out
    transposed into a small buffer, then shifted there. Within a block every row reads the same
    source range; a row whose integer shift exceeds the block's smallest has its weights moved
    right by the difference (zeros elsewhere), so a block costs ``taps`` plus the spread of
    integer shifts in it (0 or 1 for anisomag) multiply-adds per pixel.
    """

    n_out: int
    strip: int
    blocks: tuple[tuple[int, int, int, NDArray[np.float32]], ...]  # r0, r1, start, weights


def _row_pass(pos0: NDArray[np.float64], n_src: int, n_out: int) -> _RowPass:
    h = _SINC_TAPS // 2
    base = np.floor(pos0).astype(np.int64)
    if base.min() - h + 1 < 0 or base.max() + n_out + h > n_src:
        raise AssertionError("internal error: the row pass lacks padding")  # pragma: no cover
    w = _sinc_weights(pos0 - base)
    rows = len(pos0)
    slope = float(np.abs(np.diff(pos0)).max()) if rows > 1 else 0.0
    strip = _STRIP
    while strip > 16 and strip * slope > 2.0:
        strip //= 2
    nb = -(-rows // strip)
    padded = np.concatenate([base, np.full(nb * strip - rows, base[-1])]).reshape(nb, strip)
    bmin = padded.min(axis=1)
    off = padded - bmin[:, None]
    spread = off.max(axis=1)
    wext = np.zeros((nb, strip, _SINC_TAPS + int(spread.max())), dtype=np.float32)
    wpad = np.zeros((nb * strip, _SINC_TAPS))
    wpad[:rows] = w
    wpad = wpad.reshape(nb, strip, _SINC_TAPS)
    ib, ir = np.meshgrid(np.arange(nb), np.arange(strip), indexing="ij")
    for j in range(_SINC_TAPS):
        wext[ib, ir, off + j] = wpad[:, :, j]
    blocks = tuple(
        (
            b * strip,
            min(rows, (b + 1) * strip),
            int(bmin[b]) - h + 1,
            wext[b, : min(rows, (b + 1) * strip) - b * strip, : _SINC_TAPS + int(spread[b])],
        )
        for b in range(nb)
    )
    return _RowPass(n_out=n_out, strip=strip, blocks=blocks)


def _apply_row_pass(p: _RowPass, src: NDArray[np.float32], out: NDArray[np.float32]) -> None:
    """``src`` (count, n_src, rows) -> ``out`` (count, rows, n_out); see :class:`_RowPass`."""
    count, n_src, _ = src.shape
    n = p.n_out
    group = max(1, min(count, _GROUP_ELEMENTS // (p.strip * max(n_src, n))))
    cols = np.empty((group, n_src, p.strip), dtype=np.float32)
    strip = np.empty((group, p.strip, n_src), dtype=np.float32)
    tmp = np.empty((group, p.strip, n), dtype=np.float32)
    for g0 in range(0, count, group):
        g1 = min(count, g0 + group)
        ng = g1 - g0
        for r0, r1, start, w in p.blocks:
            k = r1 - r0
            # two copies: the strided column read first (whole cache lines of each source row),
            # then the transpose inside the cache; one transposed copy is 2-3 times slower
            c = cols[:ng, :, :k]
            c[...] = src[g0:g1, :, r0:r1]
            s = strip[:ng, :k]
            s[...] = c.transpose(0, 2, 1)
            o = out[g0:g1, r0:r1]
            t = tmp[:ng, :k]
            np.multiply(s[:, :, start : start + n], w[:, 0:1], out=o)
            for j in range(1, w.shape[1]):
                np.multiply(s[:, :, start + j : start + j + n], w[:, j : j + 1], out=t)
                o += t


def _sparse_pass(
    chunks: tuple[tuple[int, int, sps.csr_matrix], ...],
    src: NDArray,
    out: NDArray[np.float32],
) -> None:
    """``out = S @ src`` by row chunks of ``S`` (no full-size temporary)."""
    for r0, r1, mat in chunks:
        out[r0:r1] = mat @ src


def _row_chunks(mat: sps.csr_matrix, n_cols: int) -> tuple[tuple[int, int, sps.csr_matrix], ...]:
    """Row chunks of a sparse matrix so that each product chunk stays small (no big temporary)."""
    n = mat.shape[0]
    elements = min(_SPARSE_CHUNK_ELEMENTS, max(1 << 16, n * n_cols // 16))
    step = max(1, elements // max(n_cols, 1))
    return tuple((r0, min(n, r0 + step), mat[r0 : r0 + step]) for r0 in range(0, n, step))


def _check_separable(a: NDArray[np.float64], method: str) -> None:
    dev = float(np.abs(a - np.eye(2)).max())
    if dev > _MAX_SEPARABLE_DISTORTION:
        raise ValueError(
            f"method {method!r} handles near-identity matrices only (max |A - I| = {dev:.3f} > "
            f"{_MAX_SEPARABLE_DISTORTION}); use method='spline' for large distortions"
        )


# ============================================================================ sinc method
@dataclass(frozen=True)
class _SincPlan:
    """The four-pass sinc resampling of ``count`` images of one shape with one matrix.

    ``A = F1 F2 F3 F4`` with ``F1 = diag(1, q)``, ``F2 = [[1, 0], [l, 1]]``,
    ``F3 = diag(r, 1)``, ``F4 = [[1, u], [0, 1]]`` (coordinates relative to the centre):

    1. y scale ``T1(x, y) = I(x, q y)``: sparse rows-mixing product, reflected at the edges;
    2. transpose and y shear ``J2(x, y) = T1(x, y + l x)`` (rows of J2 are x): a row pass;
    3. x scale ``J3(x, .) = J2(r x, .)``: sparse rows-mixing product, reflected at the edges;
    4. transpose and x shear ``O(x, y) = J3(x + u y, y)``: a row pass.

    Each pass reads one of two buffers and writes the other (T1 and J3 in one, J2 and O in the
    other), so the extra memory is about twice the images' float32 size.
    """

    count: int
    ny: int
    nx: int
    n1y: int
    n3x: int
    sy: tuple[tuple[int, int, sps.csr_matrix], ...]
    shear_y: _RowPass
    sx: tuple[tuple[int, int, sps.csr_matrix], ...]
    shear_x: _RowPass

    @property
    def size_a(self) -> int:
        return self.count * max(self.n1y * self.nx, self.n3x * self.ny)

    @property
    def size_b(self) -> int:
        return self.count * self.nx * self.ny


def _decompose_passes(a: NDArray[np.float64]) -> tuple[float, float, float, float]:
    """``(q, l, r, u)`` with ``A = diag(1, q) [[1, 0], [l, 1]] diag(r, 1) [[1, u], [0, 1]]``."""
    a00, a01, a10, a11 = (float(v) for v in a.ravel())
    r = a00
    u = a01 / a00
    q = a11 - a10 * a01 / a00
    l_ = a10 / (q * a00)
    return q, l_, r, u


def _sinc_plan(shape: tuple[int, int], a: NDArray[np.float64], count: int = 1) -> _SincPlan:
    ny, nx = shape
    cx, cy = image_centre(shape)
    q, l_, r, u = _decompose_passes(a)
    h = _SINC_TAPS // 2
    yt = np.arange(ny, dtype=np.float64) - cy
    xt = np.arange(nx, dtype=np.float64) - cx
    # pass 4, x shear: O(x, y) = J3(x + u y, y); J3's rows are x3lo..x3hi (relative x)
    shift = u * yt
    x3lo = math.floor(xt[0] + shift.min()) - h - 1
    x3hi = math.ceil(xt[-1] + shift.max()) + h + 1
    n3x = x3hi - x3lo + 1
    pos_x = xt[0] + shift - x3lo
    # pass 3, x scale: J3(x3, .) = J2(r x3, .); J2's rows are the input columns (reflected)
    sx = _line_matrix(r * np.arange(x3lo, x3hi + 1, dtype=np.float64) + cx, nx)
    # pass 2, y shear: J2(x, y) = T1(x, y + l x); T1's rows are y1lo..y1hi (relative y)
    shift = l_ * xt
    y1lo = math.floor(yt[0] + shift.min()) - h - 1
    y1hi = math.ceil(yt[-1] + shift.max()) + h + 1
    n1y = y1hi - y1lo + 1
    pos_y = yt[0] + shift - y1lo
    # pass 1, y scale: T1(., y1) = I(., q y1), input rows reflected
    sy = _line_matrix(q * np.arange(y1lo, y1hi + 1, dtype=np.float64) + cy, ny)
    if count > 1:
        eye = sps.identity(count, dtype=np.float32, format="csr")
        sx = sps.kron(eye, sx, format="csr")
        sy = sps.kron(eye, sy, format="csr")
    return _SincPlan(
        count=count,
        ny=ny,
        nx=nx,
        n1y=n1y,
        n3x=n3x,
        sy=_row_chunks(sy.tocsr(), nx),
        shear_y=_row_pass(pos_y, n1y, ny),
        sx=_row_chunks(sx.tocsr(), ny),
        shear_x=_row_pass(pos_x, n3x, nx),
    )


def _sinc_apply(plan: _SincPlan, images: NDArray) -> NDArray[np.float32]:
    """Resample ``images`` of shape ``(count, ny, nx)``; returns float32 of the same shape."""
    count, ny, nx = plan.count, plan.ny, plan.nx
    n1y, n3x = plan.n1y, plan.n3x
    buf_a = np.empty(plan.size_a, dtype=np.float32)
    buf_b = np.empty(plan.size_b, dtype=np.float32)
    t1 = buf_a[: count * n1y * nx].reshape(count * n1y, nx)
    _sparse_pass(plan.sy, np.asarray(images).reshape(count * ny, nx), t1)
    j2 = buf_b.reshape(count, nx, ny)
    _apply_row_pass(plan.shear_y, t1.reshape(count, n1y, nx), j2)
    j3 = buf_a[: count * n3x * ny].reshape(count * n3x, ny)
    _sparse_pass(plan.sx, j2.reshape(count * nx, ny), j3)
    out = buf_b.reshape(count, ny, nx)
    _apply_row_pass(plan.shear_x, j3.reshape(count, n3x, ny), out)
    return out


# ============================================================================ fourier method
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


def _fourier_apply(image: NDArray, a: NDArray[np.float64]) -> NDArray[np.float32]:
    ny, nx = image.shape
    cx, cy = image_centre(image.shape)
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


# ============================================================================ ndimage methods
def _ndimage_apply(image: NDArray, a: NDArray[np.float64], order: int) -> NDArray[np.float32]:
    cx, cy = image_centre(image.shape)
    # ndimage works in (row, col) = (y, x): swap both axes of A
    arc = a[::-1, ::-1]
    c_rc = np.array([cy, cx])
    offset = c_rc - arc @ c_rc
    out = np.empty(image.shape, dtype=np.float32)
    src = image if image.dtype in (np.float32, np.float64) else image.astype(np.float32)
    ndi.affine_transform(
        src, arc, offset=offset, order=order, mode="reflect", prefilter=order > 1, output=out
    )
    return out


# ============================================================================ public
def _per_image(method: str, a: NDArray[np.float64]) -> Callable[[NDArray], NDArray[np.float32]]:
    if method == "fourier":
        return lambda img: _fourier_apply(img, a)
    if method == "spline":
        return lambda img: _ndimage_apply(img, a, 3)
    return lambda img: _ndimage_apply(img, a, 1)


def correct_image(
    image: ArrayLike,
    m: MagMat | ArrayLike,
    *,
    method: str = DEFAULT_METHOD,
    keep_pixel_size: bool = False,
) -> NDArray[np.float32]:
    """Resample a recorded image (or a stack of them) into the true frame.

    Parameters
    ----------
    image
        ``(ny, nx)`` image, or ``(n, ny, nx)`` stack (each image about its own centre, e.g.
        particle boxes). Real, finite values.
    m
        Magnification matrix with ``k_true = M k_obs`` (:class:`MagMat` or 2×2 array).
    method
        One of :data:`METHODS` (see the module notes); default :data:`DEFAULT_METHOD`.
    keep_pixel_size
        False (default): resample with ``M / sqrt(det M)`` and give the corrected image the
        pixel size ``p / sqrt(det M)`` (:func:`corrected_pixel_size`). True: resample with the
        full ``M`` (including its isotropic scale) and keep the pixel size ``p``.

    Returns
    -------
    numpy.ndarray
        float32, same shape as ``image``: ``O(u) = I(c + A (u - c))``, ``A`` from
        :func:`sampling_matrix`, ``c`` from :func:`image_centre`. Pixel values are interpolated,
        not rescaled by the Jacobian.

    Raises
    ------
    ValueError
        Not a 2D/3D real array, non-finite values, unknown method, an invalid matrix, or (for
        ``"sinc"`` and ``"fourier"``) a matrix far from the identity.
    """
    arr = np.asarray(image)
    if arr.ndim not in (2, 3) or arr.size == 0:
        raise ValueError(f"expected a 2D image or a 3D stack, got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"expected real pixel values, got dtype {arr.dtype}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    a = sampling_matrix(m, keep_pixel_size=keep_pixel_size)
    if method in ("sinc", "fourier"):
        _check_separable(a, method)
    stack = arr if arr.ndim == 3 else arr[None]
    n, ny, nx = stack.shape
    if min(ny, nx) < 2:
        raise ValueError(f"image must be at least 2x2 pixels, got {(ny, nx)}")
    out = np.empty(stack.shape, dtype=np.float32) if arr.ndim == 3 else None
    batch = max(1, _BATCH_PIXELS // (ny * nx)) if method == "sinc" else 1
    plans: dict[int, _SincPlan] = {}
    run = _per_image(method, a)
    for i0 in range(0, n, batch):
        i1 = min(n, i0 + batch)
        part = np.asarray(stack[i0:i1])
        # the sum is NaN/Inf when a pixel is (cheap, no pixel-sized temporary); then look closer
        if not np.isfinite(np.sum(part)) and not np.all(np.isfinite(part)):
            bad = i0 + int(np.flatnonzero(~np.isfinite(part).reshape(i1 - i0, -1).all(1))[0])
            where = "image" if arr.ndim == 2 else f"image {bad + 1} of the stack"
            raise ValueError(f"{where} contains NaN or Inf values")
        if method == "sinc":
            count = i1 - i0
            if count not in plans:
                plans[count] = _sinc_plan((ny, nx), a, count)
            res = _sinc_apply(plans[count], part)
        else:
            res = np.stack([run(img) for img in part])
        if out is None:
            return res[0]
        out[i0:i1] = res
    assert out is not None
    return out
