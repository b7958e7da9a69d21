"""Averaged periodograms: overlapping tiles of a micrograph, or a pooled stack of images.

The spectrum is kept in ``rfft2`` half-plane layout (``box × (box // 2 + 1)``, FFT order, zero
frequency at ``[0, 0]``), normalised as a power spectral density per pixel: a white image of
variance ``s^2`` has a spectrum of ``s^2`` everywhere. Tiles are tapered at their edges, so
strong low-frequency content (ice gradients, carbon edges) does not leak into the rings.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from anisoctf._lazy import lazy
from anisoctf.errors import InputError
from anisoctf.spectrum._rfft import rfft2

try:  # the compiled power and 2×2 binning (optional: see _power_in_place)
    from anisoctf.spectrum import _kernels
except ImportError:  # pragma: no cover - built without a C compiler
    _kernels = None

sfft = lazy("scipy.fft")  # imported on first use (see anisoctf.spectrum._rfft)

__all__ = [
    "Spectrum",
    "full_periodogram",
    "micrograph_spectrum",
    "outlier_tile_weights",
    "stack_periodogram",
    "taper_window",
    "tile_layout",
    "tile_periodogram",
    "tile_starts",
]


@dataclass(frozen=True)
class Spectrum:
    """An averaged power spectrum.

    Attributes
    ----------
    power
        Half-plane power spectral density (float64), shape ``(box, box // 2 + 1)``.
    pixel_size
        Pixel size (Å) of the real-space tiles the spectrum was computed from.
    n_eff
        Effective number of independent periodograms averaged (after outlier weighting).
    tile_weights
        Weight of each tile (1 for a normal tile, < 1 for down-weighted outliers).
    tile_origins
        (row, col) of each tile's corner in the original image's pixels.
    shape
        Real-space (ny, nx) of the transformed tiles (or of the whole image).
    cache
        Derived arrays (binned versions) computed on demand by the fit.
    """

    power: NDArray[np.float64]
    pixel_size: float
    n_eff: float
    tile_weights: NDArray[np.float64]
    tile_origins: NDArray[np.int64]
    shape: tuple[int, int] = (0, 0)
    cache: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.shape == (0, 0):  # square tiles: the shape follows from the power array
            n = int(self.power.shape[0])
            object.__setattr__(self, "shape", (n, n))

    @property
    def box(self) -> int:
        """Smaller real-space side (pixels of ``pixel_size``) of the tiles or image."""
        return int(min(self.shape))


def taper_window(n: int, edge: float = 0.1) -> NDArray[np.float32]:
    """Separable 2D window: 1 in the middle, a raised-cosine edge of ``edge * n`` pixels."""
    m = max(1, int(round(edge * n)))
    w = np.ones(n)
    ramp = 0.5 - 0.5 * np.cos(np.pi * (np.arange(m) + 0.5) / m)
    w[:m] = ramp
    w[n - m :] = ramp[::-1]
    return np.outer(w, w).astype(np.float32)


def tile_starts(length: int, tile: int, overlap: float) -> NDArray[np.int64]:
    """Start positions of tiles of size ``tile`` covering ``length`` with the given overlap.

    The first tile starts at 0 and the last ends at ``length``; the spacing is as even as
    possible and never more than ``tile * (1 - overlap)``.
    """
    if length < tile:
        raise ValueError(f"image of {length} px is smaller than a tile of {tile} px")
    step = max(1.0, tile * (1.0 - overlap))
    n = int(np.ceil((length - tile) / step)) + 1
    return np.round(np.linspace(0, length - tile, n)).astype(np.int64)


def _robust_weights(
    features: NDArray[np.float64], cut: float = 3.5, floors: NDArray | None = None
) -> NDArray[np.float64]:
    """Down-weight rows whose robust z-score exceeds ``cut`` in any feature column.

    ``floors`` (per column) is the smallest deviation that matters in practice, divided by
    ``cut``: a clean micrograph's tiles differ by tiny but statistically significant
    amounts, which must not make them outliers.
    """
    med = np.median(features, axis=0)
    mad = 1.4826 * np.median(np.abs(features - med), axis=0)
    floor = 1e-3 * (np.abs(med) + 1e-12) + 1e-12
    if floors is not None:
        floor = np.maximum(floor, np.asarray(floors, dtype=float))
    mad = np.maximum(mad, floor)
    z = np.max(np.abs(features - med) / mad, axis=1)
    w = np.ones(len(features))
    out = z > cut
    w[out] = np.exp(-((z[out] - cut) ** 2) / 2.0)
    return w


def _crop_half_plane(f: NDArray, box: int) -> NDArray:
    """Keep the central ``box`` frequencies of an rfft2 half-plane (Fourier cropping)."""
    h = box // 2
    return np.concatenate([f[..., :h, : h + 1], f[..., -h:, : h + 1]], axis=-2)


def tile_layout(
    shape: tuple[int, ...],
    pixel_size: float,
    box: int,
    overlap: float,
    fit_pixel_size: float | None,
) -> tuple[bool, int, NDArray[np.int64], NDArray[np.float32], float]:
    """The tile grid of an image: ``(crop, tile, origins, window, norm)``.

    ``tile`` is the tile side in image pixels (larger than ``box`` when Fourier cropping to
    ``fit_pixel_size``), ``origins`` the (row, col) corner of each tile, ``window`` the taper and
    ``norm`` the periodogram normalisation (the window's energy, scaled when cropping keeps
    ``|F|²`` of a tile of ``tile²`` pixels). Raises :class:`InputError` when no tile fits.
    """
    crop = fit_pixel_size is not None and fit_pixel_size > pixel_size * (1 + 1e-6)
    tile = int(round(box * fit_pixel_size / pixel_size / 2)) * 2 if crop else int(box)
    ny, nx = shape
    if ny < tile or nx < tile:
        raise InputError(
            f"image of {nx}x{ny} px is smaller than one {tile}-px tile; use a smaller --box"
        )
    rows = tile_starts(ny, tile, overlap)
    cols = tile_starts(nx, tile, overlap)
    origins = np.array([(r, c) for r in rows for c in cols], dtype=np.int64)
    win = taper_window(tile)
    norm = float(np.sum(win.astype(np.float64) ** 2))
    if crop:
        norm *= (tile / box) ** 2
    return crop, tile, origins, win, norm


def tile_periodogram(
    image: NDArray,
    pixel_size: float,
    box: int = 512,
    overlap: float = 0.2,
    fit_pixel_size: float | None = None,
    reject_outliers: bool = True,
    workers: int = 1,
    chunk: int = 16,
) -> Spectrum:
    """Average the periodograms of overlapping, tapered tiles of one image.

    Parameters
    ----------
    image
        2D micrograph (any real dtype), rows = y, columns = x.
    pixel_size
        Å per pixel of ``image``.
    box
        Size of the output spectrum (pixels at the fitting pixel size).
    overlap
        Fractional overlap of neighbouring tiles.
    fit_pixel_size
        If larger than ``pixel_size``, tiles of ``box * fit_pixel_size / pixel_size`` pixels are
        Fourier-cropped to ``box`` (same as binning the micrograph to that pixel size).
    reject_outliers
        Down-weight tiles whose mean, variance or low-frequency power is far from the rest
        (carbon, contamination, edges of the exposure).
    workers
        Threads for ``scipy.fft``.
    chunk
        Tiles transformed at once (bounds memory).

    Returns
    -------
    Spectrum
    """
    img = np.asarray(image)
    if img.ndim != 2:
        raise InputError(f"expected a 2D image, got an array of shape {img.shape}")
    crop, tile, origins, win, norm = tile_layout(
        img.shape, pixel_size, box, overlap, fit_pixel_size
    )
    out_apix = pixel_size * tile / box
    ny, nx = img.shape
    mean = float(np.mean(img, dtype=np.float64))

    nt = len(origins)
    # low-pass view of the image (blocks of bin_ px) for the tiles' outlier features
    bin_ = max(1, tile // 32)
    by, bx = ny // bin_, nx // bin_
    small = (
        img[: by * bin_, : bx * bin_]
        .reshape(by, bin_, bx, bin_)
        .mean(axis=(1, 3), dtype=np.float64)
    )
    feats = np.zeros((nt, 3))
    for j, (r, c) in enumerate(origins // bin_):
        blk = small[r : r + tile // bin_, c : c + tile // bin_]
        feats[j, 0] = blk.mean() - mean
        feats[j, 2] = blk.var()
    total = np.zeros((box, 2 * (box // 2 + 1)), dtype=np.float64)
    buf = np.empty((min(chunk, nt), tile, tile), dtype=np.float32)
    dc = (win * np.float32(mean)).astype(np.float32)

    def spectra(sel: NDArray[np.int64]) -> NDArray[np.float32]:
        """Tapered, mean-removed tiles -> their half-plane FFTs viewed as (re, im) float32."""
        b = buf[: len(sel)]
        for i, j in enumerate(sel):
            r, c = origins[j]
            np.multiply(img[r : r + tile, c : c + tile], win, out=b[i])
            b[i] -= dc
        f = sfft.rfft2(b, workers=workers, overwrite_x=True)
        if crop:
            f = _crop_half_plane(f, box)
        return np.ascontiguousarray(f).view(np.float32)

    # one pass: sum of all tiles' periodograms, and each tile's total power
    for start in range(0, nt, chunk):
        sel = np.arange(start, min(start + chunk, nt))
        fv = spectra(sel)
        total += np.einsum("tij,tij->ij", fv, fv)
        feats[sel, 1] = np.einsum("tij,tij->t", fv, fv)
    feats[:, 1:] = np.log(np.maximum(feats[:, 1:], 1e-30))
    w = _robust_weights(feats) if (reject_outliers and nt >= 5) else np.ones(nt)
    # outliers are rare: take their share back out instead of keeping every tile's spectrum
    bad = np.flatnonzero(w < 1.0)
    for start in range(0, len(bad), chunk):
        sel = bad[start : start + chunk]
        fv = spectra(sel)
        total -= np.einsum("t,tij,tij->ij", (1.0 - w[sel]).astype(np.float32), fv, fv)
    total = (total[:, 0::2] + total[:, 1::2]) / norm
    wsum = float(w.sum())
    power = total / wsum
    # effective number of independent periodograms: overlapping tapered tiles share pixels
    area_frac = (ny * nx) / (nt * tile * tile)
    n_eff = wsum * min(1.0, max(area_frac, 0.0) * 1.5)
    return Spectrum(
        power=power,
        pixel_size=out_apix,
        n_eff=float(max(n_eff, 1.0)),
        tile_weights=w,
        tile_origins=origins,
    )


def stack_periodogram(
    stack: NDArray,
    pixel_size: float,
    box: int | None = None,
    workers: int = 1,
) -> Spectrum:
    """Pool the periodograms of a stack of images (e.g. the particles of one micrograph).

    Each image is mean-subtracted and tapered; images are zero-padded to ``box`` before the
    transform, or centre-cropped to it when ``box`` is smaller (default: the image size).
    """
    s = np.asarray(stack)
    if s.ndim == 2:
        s = s[None]
    if s.ndim != 3 or s.shape[0] == 0:
        raise InputError(f"expected a stack of 2D images, got shape {s.shape}")
    n, ny, nx = s.shape
    size = min(ny, nx)
    box = int(box or size)
    crop = min(size, box)  # a smaller box takes the centre of each image
    oy, ox = (ny - crop) // 2, (nx - crop) // 2
    win = taper_window(crop)
    norm = float(np.sum(win.astype(np.float64) ** 2))
    total = np.zeros((box, box // 2 + 1), dtype=np.float64)
    for start in range(0, n, 64):
        b = np.asarray(s[start : start + 64, oy : oy + crop, ox : ox + crop], dtype=np.float32)
        b = b - b.mean(axis=(1, 2), keepdims=True)
        b *= win
        f = sfft.rfft2(b, s=(box, box), workers=workers)  # zero-pads when box > crop
        total += (f.real**2 + f.imag**2).sum(axis=0, dtype=np.float64)
    power = total / (n * norm)
    return Spectrum(
        power=power,
        pixel_size=pixel_size,
        n_eff=float(n) * min(1.0, (size / box) ** 2),
        tile_weights=np.ones(n),
        tile_origins=np.zeros((n, 2), dtype=np.int64),
    )


def _smooth_len_below(n: int, multiple: int = 16) -> int:
    """Largest ``m <= n`` divisible by ``multiple`` whose cofactor has no prime above 11
    (fast FFT sizes that also bin evenly)."""
    for m in range(n - n % multiple, multiple - 1, -multiple):
        q = m // multiple
        for p in (2, 3, 5, 7, 11):
            while q % p == 0:
                q //= p
        if q == 1:
            return m
    return multiple


def _crop_sizes(ny: int, nx: int, ratio: float) -> tuple[int, int]:
    """Fourier-crop sizes ``(cy, cx)`` at most ``ratio`` of ``(ny, nx)`` with ``cy/ny == cx/nx``
    exactly (one pixel size for both axes) and both divisible by 16 (so they bin evenly)."""
    g = math.gcd(ny, nx)
    a, b = ny // g, nx // g  # cy = k*a, cx = k*b for an integer k
    step = math.lcm(16 // math.gcd(16, a), 16 // math.gcd(16, b))
    k = int(g * ratio) // step * step
    if k < step or k < 0.8 * g * ratio:  # no exact crop near the request: keep everything
        return ny, nx
    return k * a, k * b


def _edge_taper(n: int, width: int) -> NDArray[np.float32]:
    w = np.ones(n, dtype=np.float32)
    m = max(1, min(width, n // 4))
    ramp = (0.5 - 0.5 * np.cos(np.pi * (np.arange(m) + 0.5) / m)).astype(np.float32)
    w[:m] = ramp
    w[n - m :] = ramp[::-1]
    return w


def outlier_tile_weights(image: NDArray, tile: int = 512) -> tuple[NDArray, NDArray]:
    """Robust weights of the image's non-overlapping tiles from real-space statistics.

    Features per tile: mean, variance, and variance of the 16×-binned tile (low-frequency
    content). Carbon, contamination and exposure edges stand out in at least one of them.

    Returns
    -------
    weights, origins
        Weight (≤ 1) and (row, col) corner of each tile.
    """
    img = np.asarray(image)
    ny, nx = img.shape
    tile = min(tile, ny, nx)
    rows = tile_starts(ny, tile, 0.0)
    cols = tile_starts(nx, tile, 0.0)
    origins = np.array([(r, c) for r in rows for c in cols], dtype=np.int64)
    b = max(1, tile // 32)
    nb = tile // b
    step = 4  # every 4th row is plenty for these statistics
    grid = (
        b % step == 0
        and np.array_equal(rows, np.arange(rows.size) * tile)
        and np.array_equal(cols, np.arange(cols.size) * tile)
    )
    feats = (
        _grid_tile_features(img, rows.size, cols.size, tile, b, step)
        if grid
        else np.zeros((len(origins), 3))
    )
    for i, (r, c) in enumerate([] if grid else origins):
        t = img[r : r + nb * b : step, c : c + nb * b]
        small = (
            t.reshape(nb, b // step if b >= step else 1, nb, b).mean(axis=(1, 3), dtype=np.float64)
            if b >= step
            else t.reshape(t.shape[0], nb, b).mean(axis=2, dtype=np.float64)
        )
        m = float(small.mean())
        var = float(np.mean(np.square(t, dtype=np.float32), dtype=np.float64)) - m * m
        feats[i] = (m, var, float(small.var()))
    feats[:, 1:] = np.log(np.maximum(feats[:, 1:], 1e-30))
    if len(origins) < 5:
        return np.ones(len(origins)), origins
    pixel_sd = float(np.exp(0.5 * np.median(feats[:, 1])))
    cut = 3.5
    floors = np.array([0.25 * pixel_sd, np.log(1.25), np.log(1.25)]) / cut
    return _robust_weights(feats, cut, floors), origins


def _grid_tile_features(
    img: NDArray, nty: int, ntx: int, tile: int, b: int, step: int
) -> NDArray[np.float64]:
    """(mean, pixel variance, variance of the b×b block means) of the tiles of a regular grid
    of ``nty × ntx`` adjacent tiles from the corner, from every ``step``-th row, in a few
    whole-image passes (row-major order of tiles, as :func:`tile_starts` gives them)."""
    hb, wb = nty * tile // b, ntx * tile // b  # blocks
    rb = b // step  # sampled rows per block
    per_block = rb * b
    if _kernels is not None and img.dtype == np.float32 and img.flags.c_contiguous:
        # one pass, float64 sums and sums of squares of each block's sampled pixels
        s1, s2 = np.empty((hb, wb)), np.empty((hb, wb))
        _kernels.block_moments(img, img.shape[1], nty * tile, ntx * tile, step, b, s1, s2)
        small = s1 / per_block  # block means
        mean0 = float(small.mean())
        sq = s2 - (2.0 * mean0) * s1 + per_block * mean0 * mean0  # Σ (x - mean0)²
    else:
        s = img[: nty * tile : step, : ntx * tile]  # (rows sampled, columns)

        def block_sums(a: NDArray) -> NDArray[np.float64]:
            rows = a[0::rb].copy()  # the few rows of a block: plain float32 adds (fast,
            for i in range(1, rb):  # exact enough for 4 terms), then float64 across columns
                rows += a[i::rb]
            return rows.reshape(hb, wb, b).sum(axis=2, dtype=np.float64)

        small = block_sums(s) / per_block  # block means
        mean0 = float(small.mean())
        d = s - np.float32(mean0)  # centred, so the float32 squares lose nothing that matters
        d *= d
        sq = block_sums(d)
    nb = tile // b
    small_t = small.reshape(nty, nb, ntx, nb).transpose(0, 2, 1, 3).reshape(nty * ntx, -1)
    sq_t = sq.reshape(nty, nb, ntx, nb).transpose(0, 2, 1, 3).reshape(nty * ntx, -1)
    m = small_t.mean(axis=1)
    var = sq_t.sum(axis=1) / (per_block * nb * nb) - (m - mean0) ** 2
    return np.column_stack([m, var, small_t.var(axis=1)])


def full_periodogram(
    image: NDArray,
    pixel_size: float,
    fit_pixel_size: float | None = None,
    taper: int = 64,
    workers: int = 1,
    weight_map: NDArray | None = None,
    mean: float | None = None,
) -> Spectrum:
    """Periodogram of the whole image at full frequency resolution (``n_eff = 1``).

    The image is cropped to an FFT-friendly size divisible by 16 (so it bins evenly), its
    mean removed and its edges tapered over ``taper`` pixels. Fitting then bins this spectrum
    as coarsely as the Thon rings allow, which averages neighbouring ordinates exactly as
    averaging tiles would, without losing resolution where the rings are fine.

    Parameters
    ----------
    image
        2D micrograph.
    pixel_size
        Å per pixel.
    fit_pixel_size
        Fourier-crop to this pixel size (Å) if it is larger than ``pixel_size``.
    taper
        Width (pixels) of the raised-cosine edge taper.
    workers
        Threads for ``scipy.fft``.
    weight_map
        Optional smooth real-space weights (same shape as ``image``, 0..1) that fade out
        outlier regions; a mask only blurs the rings a little (it never shifts them).
    mean
        The image mean, if already known (saves a pass over the image).
    """
    img = np.asarray(image)
    if img.ndim != 2:
        raise InputError(f"expected a 2D image, got an array of shape {img.shape}")
    ny0, nx0 = img.shape
    ny, nx = _smooth_len_below(ny0), _smooth_len_below(nx0)
    if min(ny, nx) < 64:
        raise InputError(f"image of {nx0}x{ny0} px is too small for CTF estimation (< 64 px)")
    oy, ox = (ny0 - ny) // 2, (nx0 - nx) // 2
    sub = img[oy : oy + ny, ox : ox + nx]
    wy, wx = _edge_taper(ny, taper), _edge_taper(nx, taper)
    a = _work_buffer((ny, nx))
    if weight_map is None:
        # every 4th row gives the mean far better than the noise needs (and saves a pass)
        if mean is None:  # row sums (pairwise, float32) added in float64: fast and exact enough
            rows = sub[::4]
            m0 = float(rows.sum(axis=1).sum(dtype=np.float64)) / rows.size
        else:
            m0 = float(mean)
        np.subtract(sub, np.float32(m0), out=a, casting="unsafe")
        t = min(taper, ny // 4, nx // 4)  # the taper is 1 except near the edges
        a[:t] *= wy[:t, None]
        a[ny - t :] *= wy[ny - t :, None]
        a[:, :t] *= wx[None, :t]
        a[:, nx - t :] *= wx[None, nx - t :]
        norm = float(np.sum(wy.astype(np.float64) ** 2) * np.sum(wx.astype(np.float64) ** 2))
    else:
        wm = np.asarray(weight_map, dtype=np.float32)[oy : oy + ny, ox : ox + nx]
        wm = wm * wy[:, None] * wx[None, :]
        mean_w = float(
            np.sum(sub * wm, dtype=np.float64) / max(np.sum(wm, dtype=np.float64), 1e-30)
        )
        np.subtract(sub, np.float32(mean_w), out=a, casting="unsafe")
        a *= wm
        norm = float(np.sum(np.square(wm, dtype=np.float64)))
    f = rfft2(a, workers=workers)
    del a
    apix = pixel_size
    if fit_pixel_size is not None and fit_pixel_size > pixel_size * (1 + 1e-6):
        cy, cx = _crop_sizes(ny, nx, pixel_size / fit_pixel_size)
        if cy < ny:
            f = np.concatenate([f[: cy // 2, : cx // 2 + 1], f[ny - cy // 2 :, : cx // 2 + 1]])
            norm *= (ny * nx) / (cy * cx)
            apix = pixel_size * ny / cy  # == pixel_size * nx / cx exactly
            ny, nx = cy, cx
    bin2 = ny % 4 == 0 and nx % 4 == 0  # the fit will bin it 2×2 (fit.band.binned_power)
    power, binned = _power_in_place(np.ascontiguousarray(f), np.float32(1.0 / norm), bin2)
    out = Spectrum(
        power=power,
        pixel_size=apix,
        n_eff=1.0,
        tile_weights=np.ones(1),
        tile_origins=np.array([[oy, ox]], dtype=np.int64),
        shape=(ny, nx),
    )
    if binned is not None:
        out.cache[POWER_BIN2] = binned
    return out


_WORK = threading.local()


def _work_buffer(shape: tuple[int, int]) -> NDArray[np.float32]:
    """A float32 scratch array of ``shape``, kept per thread for the next call: a fresh array
    of this size would be new memory that the kernel must fault in and zero every time."""
    buf = getattr(_WORK, "buf", None)
    if buf is None or buf.shape != shape:
        buf = _WORK.buf = None  # let the old one go first
        buf = _WORK.buf = np.empty(shape, dtype=np.float32)
    return buf


#: key of :attr:`Spectrum.cache` under which :func:`full_periodogram` leaves the power binned
#: 2×2 (as :func:`anisoctf.fit.band.binned_power` bins it), when it was made in the same pass
POWER_BIN2 = "power_bin2"


def _power_in_place(
    f: NDArray[np.complex64], scale: np.float32, bin2: bool = False
) -> tuple[NDArray[np.float32], NDArray[np.float32] | None]:
    """``scale * |f|^2`` written over the first half of ``f``'s own memory (no new array), and,
    with ``bin2`` and the compiled loop (:mod:`anisoctf.spectrum._kernels`), its 2×2 binning made
    in the same pass (else None: the fit bins it when it needs it).

    Row block ``[r0, r1)`` of the result occupies the floats ``[r0 n, r1 n)`` and is computed
    from those of ``f``'s rows, ``[2 r0 n, 2 r1 n)``: at or after what it overwrites, so
    blocks that go forward and never reach past ``r1 <= 2 r0`` read nothing already written.
    """
    rows, n = f.shape
    flat = f.reshape(-1).view(np.float32)  # (re, im) pairs, row after row
    out = flat[: rows * n].reshape(rows, n)
    if _kernels is not None and f.dtype == np.complex64 and f.flags.c_contiguous:
        binned = np.empty((rows // 2, (n - 1) // 2 + 1), np.float32) if bin2 else np.zeros(0)
        _kernels.power_bin2(flat, rows, n, float(scale), binned)
        return out, (binned if bin2 else None)
    first = np.abs(f[0]) ** 2  # row 0 overlaps itself: a small copy
    out[0] = first * scale
    r0 = 1
    while r0 < rows:
        r1 = min(rows, 2 * r0, r0 + 64)
        src = flat[2 * r0 * n : 2 * r1 * n].reshape(r1 - r0, n, 2)
        dst = out[r0:r1]
        np.multiply(src[:, :, 0], src[:, :, 0], out=dst)
        dst += src[:, :, 1] * src[:, :, 1]
        dst *= scale
        r0 = r1
    return out, None


def micrograph_spectrum(
    image: NDArray,
    pixel_size: float,
    box: int = 512,
    fit_pixel_size: float | None = None,
    workers: int = 1,
) -> Spectrum:
    """The spectrum a micrograph's CTF fit starts from: its full-resolution periodogram.

    ``box``-sized regions that are outliers (carbon, contamination, the exposure edge; see
    :func:`outlier_tile_weights`) are faded out by a smooth weight map before the transform.
    """
    w, origins = outlier_tile_weights(image, box)
    if np.all(w >= 0.999):
        return full_periodogram(image, pixel_size, fit_pixel_size, workers=workers)
    return full_periodogram(
        image,
        pixel_size,
        fit_pixel_size,
        workers=workers,
        weight_map=_tile_weight_map(np.shape(image), w, origins, min(box, *np.shape(image))),
    )


def _tile_weight_map(
    shape: tuple[int, int], weights: NDArray, origins: NDArray, tile: int
) -> NDArray[np.float32]:
    """Smooth real-space weight map from per-tile weights (transitions of about tile/8 px)."""
    from scipy.ndimage import gaussian_filter

    ny, nx = shape
    c = 16  # work on a 16× coarser grid, then expand
    small = np.ones((-(-ny // c), -(-nx // c)), dtype=np.float32)
    for wt, (r, col) in zip(weights, origins, strict=True):
        blk = small[r // c : (r + tile) // c, col // c : (col + tile) // c]
        np.minimum(blk, wt, out=blk)
    small = gaussian_filter(small, sigma=max(1.0, tile / (8 * c)), mode="nearest")
    return np.repeat(np.repeat(small, c, axis=0), c, axis=1)[:ny, :nx]
