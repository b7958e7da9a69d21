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
    (about 2x the image's memory). Edges: symmetric reflection (nothing wraps). Where the
    optional compiled kernels are built (:mod:`.sinc_compiled`), each pass is one C loop over
    the same taps (the same numbers); the plan (tap indices and weights) is cached per image
    shape and matrix, so a batch of micrographs or particle boxes builds it once.
``"fourier"``
    Exact trigonometric (band-limited) interpolation of every line, in two passes
    (:mod:`.resample_fourier`). Slow (a reference).
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
from anisoctf.magnification import sinc_compiled
from anisoctf.magnification.resample_fourier import fourier_apply
from anisoctf.optics.magmat import MagMat, as_matrix

ndi = lazy("scipy.ndimage")
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
# the sinc method's passes through the compiled kernels where they are built
# (:mod:`.sinc_compiled`); False: the numpy passes below (the same numbers to float32 rounding)
_USE_COMPILED = sinc_compiled.AVAILABLE


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


def _line_taps(pos: NDArray[np.float64], n_src: int) -> tuple[NDArray, NDArray[np.float32]]:
    """Source lines ``(len(pos), K)`` (reflected, half-sample symmetric, into ``[0, n_src)``)
    and float32 weights that sample the lines at ``pos``."""
    base = np.floor(pos)
    w = _sinc_weights(pos - base).astype(np.float32)
    h = _SINC_TAPS // 2
    cols = base.astype(np.int64)[:, None] + np.arange(-h + 1, h + 1)[None, :]
    return _reflect_index(cols, n_src).astype(np.int32), w


def _line_matrix(pos: NDArray[np.float64], n_src: int) -> sps.csr_matrix:
    """Sparse ``(len(pos), n_src)`` interpolation matrix: row i samples the lines at ``pos[i]``.

    Repeated (reflected) columns in a row are kept as separate entries, which the product sums.
    """
    cols, w = _line_taps(pos, n_src)
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


def _sinc_plan(
    shape: tuple[int, int], a: NDArray[np.float64], count: int = 1, compiled: bool = False
) -> _SincPlan | sinc_compiled.CompiledPlan:
    """The passes of :class:`_SincPlan` for ``count`` images, or with ``compiled`` the
    :class:`~.sinc_compiled.CompiledPlan` of one image shape (the same passes, for the
    compiled kernels)."""
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
    # pass 2, y shear: J2(x, y) = T1(x, y + l x); T1's rows are y1lo..y1hi (relative y)
    shift = l_ * xt
    y1lo = math.floor(yt[0] + shift.min()) - h - 1
    y1hi = math.ceil(yt[-1] + shift.max()) + h + 1
    n1y = y1hi - y1lo + 1
    pos_y = yt[0] + shift - y1lo
    # pass 1, y scale: T1(., y1) = I(., q y1), input rows reflected
    sy_pos = q * np.arange(y1lo, y1hi + 1, dtype=np.float64) + cy
    if compiled:
        sx_pos = r * np.arange(x3lo, x3hi + 1, dtype=np.float64) + cx
        return sinc_compiled.CompiledPlan(
            ny,
            nx,
            n1y,
            n3x,
            _taps(_line_taps(sy_pos, ny)),
            _shear_taps(pos_y),
            _taps(_line_taps(sx_pos, nx)),
            _shear_taps(pos_x),
        )
    sx = _line_matrix(r * np.arange(x3lo, x3hi + 1, dtype=np.float64) + cx, nx)
    sy = _line_matrix(sy_pos, ny)
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


def _taps(line: tuple[NDArray, NDArray[np.float32]]) -> sinc_compiled.LineTaps:
    return sinc_compiled.LineTaps.of(*line)


def _shear_taps(pos0: NDArray[np.float64]) -> sinc_compiled.LineTaps:
    """A shear's first source sample and weights for each row (see :class:`_RowPass`)."""
    base = np.floor(pos0)
    return sinc_compiled.LineTaps.of(base - (_SINC_TAPS // 2 - 1), _sinc_weights(pos0 - base))


@functools.lru_cache(maxsize=16)
def _cached_plan(
    shape: tuple[int, int], a: tuple[float, ...], count: int, compiled: bool
) -> _SincPlan | sinc_compiled.CompiledPlan:
    """:func:`_sinc_plan`, kept for the next call: every micrograph of an optics group, and
    every particle box of a size, shares one matrix (the plan cost 0.8–1.5 ``rfft2`` at
    512²–1024²). ``compiled`` is part of the key so that switching paths rebuilds."""
    return _sinc_plan(shape, np.array(a, dtype=np.float64).reshape(2, 2), count, compiled)


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
        return lambda img: fourier_apply(img, a, image_centre(img.shape))
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
    run = _per_image(method, a)
    key = tuple(float(v) for v in a.ravel())
    for i0 in range(0, n, batch):
        i1 = min(n, i0 + batch)
        part = np.asarray(stack[i0:i1])
        # the sum is NaN/Inf when a pixel is (cheap, no pixel-sized temporary); then look closer
        if not np.isfinite(np.sum(part)) and not np.all(np.isfinite(part)):
            bad = i0 + int(np.flatnonzero(~np.isfinite(part).reshape(i1 - i0, -1).all(1))[0])
            where = "image" if arr.ndim == 2 else f"image {bad + 1} of the stack"
            raise ValueError(f"{where} contains NaN or Inf values")
        if method == "sinc" and _USE_COMPILED:
            plan = _cached_plan((ny, nx), key, 1, True)
            assert isinstance(plan, sinc_compiled.CompiledPlan)
            res = sinc_compiled.apply_plan(plan, part)
        elif method == "sinc":
            plan = _cached_plan((ny, nx), key, i1 - i0, False)
            assert isinstance(plan, _SincPlan)
            res = _sinc_apply(plan, part)
        else:
            res = np.stack([run(img) for img in part])
        if out is None:
            return res[0]
        out[i0:i1] = res
    assert out is not None
    return out
