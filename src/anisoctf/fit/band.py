"""The spectrum pixels inside a resolution band, with everything the fit evaluates on them.

A :class:`Band` is built once per spectrum and band; the search, the refinement and the
quality measures all work on its flat arrays (no Python loops over pixels).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from anisoctf.optics.ctf import FrequencyFeatures, Optics, frequency_features
from anisoctf.optics.kernel import true_frequencies
from anisoctf.spectrum.periodogram import POWER_BIN2, Spectrum

try:  # the compiled pixel loop of compressed_zone (optional: see _accumulate_cells)
    from anisoctf.fit import _cells
except ImportError:  # pragma: no cover - built without a C compiler
    _cells = None

__all__ = [
    "Band",
    "CellLayout",
    "binned_power",
    "compressed_zone",
    "concat_bands",
    "make_band",
    "polar_compress",
    "radial_basis",
]


@dataclass(frozen=True)
class Band:
    """Spectrum pixels with ``k_min <= |k_true| <= k_max``.

    Attributes
    ----------
    values
        Observed power at each pixel (mean over the pixel's ``weights`` fine pixels).
    weights
        Number of spectrum pixels each value averages (1, or 4 for 2×2-binned pixels).
    index
        Flat indices of the pixels in the half-plane grid of ``grid_shape`` (0 for mixed bands).
    kx, ky
        Observed-frame frequency of each pixel (Å⁻¹).
    rho
        ``|k_obs|`` (Å⁻¹): the detector's radial frequency (background lives here).
    rho_true
        ``|k_true|`` (Å⁻¹): the specimen's radial frequency (envelope lives here).
    theta_true
        Direction of ``k_true`` in radians, in [0, pi).
    feats
        True-frame frequency features for the CTF.
    k_min, k_max
        Band limits (Å⁻¹, true frame).
    pixel_step
        Radial frequency step of one (binned) pixel of this band (Å⁻¹).
    grid_shape
        Shape of the half-plane grid ``index`` refers to ((0, 0) for mixed bands).
    """

    values: NDArray[np.float64]
    weights: NDArray[np.float64]
    index: NDArray[np.int64]
    kx: NDArray[np.float64]
    ky: NDArray[np.float64]
    rho: NDArray[np.float64]
    rho_true: NDArray[np.float64]
    theta_true: NDArray[np.float64]
    feats: FrequencyFeatures
    k_min: float
    k_max: float
    pixel_step: float
    grid_shape: tuple[int, int]

    @property
    def size(self) -> int:
        """Number of pixels in the band."""
        return int(self.values.size)


def binned_power(spectrum: Spectrum, factor: int) -> tuple[NDArray, NDArray, NDArray]:
    """Half-plane power binned ``factor × factor``, with the mean frequency of each bin.

    Results are cached on the spectrum.

    Returns
    -------
    power
        Array of shape ``(ny // factor, nx // (2 * factor) + 1)``; the last column holds the
        Nyquist column (binned along y only).
    kx, ky
        1D frequencies (Å⁻¹) of the columns and rows.
    """
    cache = spectrum.cache
    if factor in cache:
        return cache[factor]
    ny, nx = spectrum.shape
    if factor == 1:
        p = spectrum.power
    else:
        if ny % (2 * factor) or nx % (2 * factor):
            raise ValueError(f"spectrum of shape {spectrum.shape} cannot be binned by {factor}")
        if factor % 4 == 0:  # bin the half-binned spectrum (cached too): far less to read
            p = _bin_half_plane(binned_power(spectrum, factor // 2)[0], 2)
        elif factor == 2 and POWER_BIN2 in cache:  # made with the power (full_periodogram)
            p = cache.pop(POWER_BIN2)
        else:
            p = _bin_half_plane(spectrum.power, factor)
    # mean frequency of the fine pixels in each bin (FFT order is contiguous within a bin)
    fy = np.fft.fftfreq(ny, d=spectrum.pixel_size)
    ky = fy.reshape(ny // factor, factor).mean(axis=1)
    fx = np.fft.rfftfreq(nx, d=spectrum.pixel_size)
    nb_col = (fx.size - 1) // factor
    kx = np.concatenate([fx[: nb_col * factor].reshape(nb_col, factor).mean(axis=1), fx[-1:]])
    out = (p, kx, ky)
    cache[factor] = out
    return out


def _bin_half_plane(a: NDArray, f: int) -> NDArray:
    """Bin an rfft half-plane array by ``f`` in both directions (FFT order is contiguous in
    frequency within each bin, the Nyquist row starting one); the Nyquist column stays on its
    own (binned along y only)."""
    rows, ncol = a.shape
    nb_col = (ncol - 1) // f
    r = a[0::f].copy()  # strided adds: far faster than a reduction over a 4D reshape
    for i in range(1, f):
        r += a[i::f]
    out = np.empty((rows // f, nb_col + 1), dtype=a.dtype)
    c = out[:, :nb_col]
    c[:] = r[:, 0 : nb_col * f : f]
    for i in range(1, f):
        c += r[:, i : nb_col * f : f]
    c *= 1.0 / (f * f)
    out[:, nb_col] = r[:, -1] * (1.0 / f)
    return out


def _annulus_segments(
    kx: NDArray, ky: NDArray, gram: NDArray, k_min: float, k_max: float
) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.int64]]:
    """Runs of columns of the half-plane grid (rows ``ky``, uniform columns ``kx`` without the
    Nyquist column) with ``k_min <= sqrt(k^T G k) <= k_max``, found row by row analytically
    (an elliptical annulus cuts each row in at most two segments), plus a one-pixel margin.

    Returns
    -------
    rows, starts, lengths
        Row (index into ``ky``), first column and length of each non-empty run.
    """
    nc = kx.size
    x0, dx = float(kx[0]), float(kx[1] - kx[0])
    g00, g01, g11 = float(gram[0, 0]), float(gram[0, 1]), float(gram[1, 1])

    def roots(r: float) -> tuple[NDArray, NDArray, NDArray]:
        disc = (g01 * ky) ** 2 - g00 * (g11 * ky * ky - r * r)
        sq = np.sqrt(np.maximum(disc, 0.0))
        return disc > 0, (-g01 * ky - sq) / g00, (-g01 * ky + sq) / g00

    ok_o, lo_o, hi_o = roots(k_max)
    ok_i, lo_i, hi_i = roots(k_min)

    def to_j(x: NDArray, up: bool) -> NDArray:
        j = (x - x0) / dx
        return (np.floor(j) + 2 if up else np.ceil(j) - 1).astype(np.int64)

    # segment A: outer-left .. inner-left (whole outer chord when the inner ellipse misses)
    a_start = to_j(lo_o, False)
    a_end = np.where(ok_i, to_j(lo_i, True), to_j(hi_o, True))
    # segment B: inner-right .. outer-right (only when the inner ellipse cuts the row)
    b_start = np.where(ok_i, to_j(hi_i, False), 0)
    b_end = np.where(ok_i, to_j(hi_o, True), 0)
    rows = np.arange(ky.size)
    starts = np.concatenate([a_start, b_start])
    ends = np.concatenate([a_end, b_end])
    rr = np.concatenate([rows, rows])
    valid = np.concatenate([ok_o, ok_o & ok_i])
    starts = np.clip(starts, 0, nc)
    ends = np.clip(ends, 0, nc)
    # segments A and B may overlap after the margins: clip B to start after A
    half = ky.size
    starts[half:] = np.maximum(starts[half:], ends[:half])
    lengths = np.where(valid, np.maximum(ends - starts, 0), 0)
    used = np.flatnonzero(lengths)
    return rr[used], starts[used], lengths[used]


def _annulus_indices(
    kx: NDArray, ky: NDArray, gram: NDArray, k_min: float, k_max: float
) -> NDArray[np.int64]:
    """Flat indices of the half-plane grid in the annulus (see :func:`_annulus_segments`)."""
    rr, starts, lengths = _annulus_segments(kx, ky, gram, k_min, k_max)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    nc = kx.size
    first = np.repeat(rr * nc + starts - np.cumsum(lengths) + lengths, lengths)
    return first + np.arange(total, dtype=np.int64)


def _half_turn(angle: NDArray) -> NDArray:
    """Angles folded into [0, pi) (np.mod can round a tiny negative angle up to pi itself)."""
    out = np.mod(angle, np.pi)
    out[out >= np.pi] = 0.0
    return out


def _gather(
    spectrum: Spectrum,
    optics: Optics,
    k_min: float,
    k_max: float,
    bin_factor: int,
    row_stride: int,
) -> tuple[NDArray, int, NDArray, NDArray, NDArray, NDArray, NDArray, NDArray, NDArray | None]:
    """Candidate pixels of an annulus (one-pixel margin) on a binned grid.

    Returns the binned power, its column count, each pixel's row and column, observed and
    true-frame frequencies, and the magnification matrix (None for the identity).
    """
    power, kx1, ky1 = binned_power(spectrum, bin_factor)
    m = optics.M if optics.has_anisomag else None
    gram = np.eye(2) if m is None else m.T @ m
    ncol = power.shape[1]
    rows_used = np.arange(0, ky1.size, max(1, int(row_stride)))
    idx = _annulus_indices(kx1[:-1], ky1[rows_used], gram, k_min, k_max)
    row, col = np.divmod(idx, ncol - 1)
    row = rows_used[row]
    kx, ky = kx1[col], ky1[row]
    if m is None:
        kxt, kyt = kx, ky
    else:
        kxt = m[0, 0] * kx + m[0, 1] * ky
        kyt = m[1, 0] * kx + m[1, 1] * ky
    return power, ncol, row, col, kx, ky, kxt, kyt, m


def make_band(
    spectrum: Spectrum,
    optics: Optics,
    k_min: float,
    k_max: float,
    bin_factor: int = 1,
    row_stride: int = 1,
) -> Band:
    """Collect the pixels of ``spectrum`` (optionally binned) whose true-frame frequency lies
    in [k_min, k_max] (the Nyquist column is left out). ``row_stride > 1`` keeps every n-th
    row only (a cheap, unbiased subsample for statistics that need no full efficiency)."""
    power, ncol, row, col, kx_s, ky_s, kxt_s, kyt_s, m = _gather(
        spectrum, optics, k_min, k_max, bin_factor, row_stride
    )
    rt = np.hypot(kxt_s, kyt_s)
    keep = (rt >= k_min) & (rt <= k_max)
    if bin_factor == 1:  # kx = 0 holds +ky and -ky, the same point: keep one
        keep &= (col > 0) | (ky_s >= 0)
    row, col = row[keep], col[keep]
    kx_s, ky_s, kxt_s, kyt_s, rt = kx_s[keep], ky_s[keep], kxt_s[keep], kyt_s[keep], rt[keep]
    flat = row * ncol + col
    return Band(
        values=power.ravel()[flat].astype(np.float64),
        weights=np.full(flat.size, float(bin_factor * bin_factor)),
        index=flat,
        kx=kx_s,
        ky=ky_s,
        rho=np.hypot(kx_s, ky_s),
        rho_true=rt,
        theta_true=_half_turn(np.arctan2(kyt_s, kxt_s)),
        feats=frequency_features(kx_s, ky_s, m),
        k_min=float(k_min),
        k_max=float(k_max),
        pixel_step=bin_factor / (spectrum.box * spectrum.pixel_size),
        grid_shape=power.shape,
    )


def concat_bands(a: Band, b: Band) -> Band:
    """One band made of the pixels of two (e.g. binned low-k and full-resolution high-k)."""

    def cat(x: NDArray, y: NDArray) -> NDArray:
        return np.concatenate([x, y])

    fa, fb = a.feats, b.feats
    return Band(
        values=cat(a.values, b.values),
        weights=cat(a.weights, b.weights),
        index=np.zeros(a.size + b.size, dtype=np.int64),
        kx=cat(a.kx, b.kx),
        ky=cat(a.ky, b.ky),
        rho=cat(a.rho, b.rho),
        rho_true=cat(a.rho_true, b.rho_true),
        theta_true=cat(a.theta_true, b.theta_true),
        feats=FrequencyFeatures(
            k2=cat(fa.k2, fb.k2), c2=cat(fa.c2, fb.c2), s2=cat(fa.s2, fb.s2), k4=cat(fa.k4, fb.k4)
        ),
        k_min=min(a.k_min, b.k_min),
        k_max=max(a.k_max, b.k_max),
        pixel_step=min(a.pixel_step, b.pixel_step),
        grid_shape=(0, 0),
    )


def polar_compress(
    band: Band,
    optics: Optics,
    defocus: float,
    half_astig: float,
    dchi: float = 0.4,
    min_pixels: int = 20000,
) -> Band:
    """Average the band's pixels in small cells of equal CTF phase and direction.

    Cells are ``dchi`` radians of phase wide radially (uniform in ``|k|^2``, so narrow where
    rings are fine) and narrow enough in angle that astigmatism ``half_astig`` changes the
    phase by less than ``dchi`` across them. Within a cell the expected power is nearly
    constant, so the average keeps (almost) all the information of its pixels, with weight
    equal to their number, at a fraction of the cost.
    """
    if band.size < min_pixels or defocus <= 0:
        return band
    lam = optics.wavelength
    q = band.feats.k2
    r_idx = np.floor(np.pi * lam * defocus * q / dchi).astype(np.int64)
    r_idx -= r_idx.min()
    kmax2 = float(q.max())
    n_ang = int(
        np.clip(
            np.ceil(np.pi * 2 * np.pi * lam * (abs(half_astig) + 100.0) * kmax2 / dchi), 16, 1440
        )
    )
    a_idx = np.minimum((band.theta_true * (n_ang / np.pi)).astype(np.int64), n_ang - 1)
    cell = r_idx * n_ang + a_idx
    n_cells = int(cell.max()) + 1
    w = band.weights
    cnt = np.bincount(cell, weights=w, minlength=n_cells)
    used = np.flatnonzero(cnt)
    cnt = cnt[used]

    def mean(v: NDArray) -> NDArray:
        return np.bincount(cell, weights=v * w, minlength=n_cells)[used] / cnt

    # average the quadratic/quartic features themselves: the CTF phase is linear in them, so
    # the cell mean is exact to first order (the features of the mean k would be biased)
    f = band.feats
    feats = FrequencyFeatures(k2=mean(f.k2), c2=mean(f.c2), s2=mean(f.s2), k4=mean(f.k4))
    return Band(
        values=mean(band.values),
        weights=cnt,
        index=np.zeros(used.size, dtype=np.int64),
        kx=mean(band.kx),
        ky=mean(band.ky),
        rho=np.sqrt(mean(band.rho * band.rho)),
        rho_true=np.sqrt(feats.k2),
        theta_true=_half_turn(0.5 * np.arctan2(feats.s2, feats.c2)),
        feats=feats,
        k_min=band.k_min,
        k_max=band.k_max,
        pixel_step=band.pixel_step,
        grid_shape=(0, 0),
    )


#: fewest angular sectors (over 180°) of cells that follow elliptical rings: a cell keeps the
#: information of its pixels' spread in direction only when that spread is small (the
#: astigmatism derivatives ∝ cos 2θ, sin 2θ vary across it); 48 sectors lose < 0.2 % of it
ELLIPTICAL_MIN_SECTORS = 48


def compressed_zone(
    spectrum: Spectrum,
    optics: Optics,
    k_min: float,
    k_max: float,
    bin_factor: int,
    defocus: float,
    half_astig: float,
    dchi: float = 0.4,
    row_stride: int = 1,
    chunk: int = 1 << 16,
    astig: tuple[float, float] | None = None,
) -> Band:
    """:func:`make_band` followed by :func:`polar_compress`, in one pass without per-pixel
    feature arrays (the cells only need sums of a few products of ``kx``, ``ky``).

    The angular cells use a pseudo-angle (monotonic in the direction, no arctangent); its
    spacing varies by at most √2 from uniform, well inside the margin of the cell-width rule.
    The pixels are visited in runs of whole rows of about ``chunk`` pixels, so every
    intermediate array stays in the processor's cache; the cell sums accumulate across runs.

    Without ``astig`` the cells are uniform in ``|k_true|²`` (circles) and must be narrow
    enough in angle that an astigmatism ``half_astig`` changes the phase by less than ``dchi``
    across one. With ``astig = (a1, a2)`` (the current estimate's Cartesian astigmatism, Å)
    the cells follow its elliptical rings instead: uniform in the defocus phase
    ``z k² + a1 c2 + a2 s2`` of that estimate, so ``half_astig`` is only how far the fitted
    astigmatism may still move from it, and cells can be far wider in angle (a fraction of the
    cells for an astigmatic micrograph, with the same phase width).
    """
    power, kx1, ky1 = binned_power(spectrum, bin_factor)
    m = optics.M if optics.has_anisomag else None
    gram = np.eye(2) if m is None else m.T @ m
    rows_used = np.arange(0, ky1.size, max(1, int(row_stride)))
    seg_row, seg_start, seg_len = _annulus_segments(kx1[:-1], ky1[rows_used], gram, k_min, k_max)
    if seg_len.size == 0:
        return make_band(spectrum, optics, k_min, k_max, bin_factor, row_stride)
    seg_row = rows_used[seg_row]
    lam = optics.wavelength
    z_ref = max(defocus, 1.0)
    scale = np.pi * lam * z_ref / dchi
    # elliptical cells: u = k² + (a1 c2 + a2 s2) / z lies within k² (1 ± h / z)
    ell = 0.0 if astig is None else float(np.hypot(*astig)) / z_ref
    if ell >= 0.5:  # rings far from elliptical (an axis near focus): circular cells, narrow
        half_astig = abs(half_astig) + float(np.hypot(*astig))  # enough for the astigmatism
        astig, ell = None, 0.0
    ca1 = 0.0 if astig is None else float(astig[0]) / z_ref
    ca2 = 0.0 if astig is None else 2.0 * float(astig[1]) / z_ref
    r0 = int(np.floor(k_min * k_min * (1.0 - ell) * scale))
    n_r = int(np.floor(k_max * k_max * (1.0 + ell) * scale * (1 + 1e-12))) - r0 + 2
    n_ang = int(
        np.clip(
            np.ceil(np.pi * 2 * np.pi * lam * (abs(half_astig) + 100.0) * k_max**2 / dchi),
            16 if astig is None else ELLIPTICAL_MIN_SECTORS,
            1440,
        )
    )
    n_cells = n_r * n_ang + 1  # the last cell takes the pixels outside the band (dropped)
    lo2, hi2 = k_min * k_min, k_max * k_max
    acc, cnt = _accumulate_cells(
        power,
        (seg_row, seg_start, seg_len),
        kx1,
        ky1,
        m,
        CellLayout((lo2, hi2, scale, ca1, ca2), astig is not None, r0, n_ang, n_cells),
        bin_factor == 1,
        chunk,
    )
    used = np.flatnonzero(cnt[:-1])
    if used.size == 0:
        return make_band(spectrum, optics, k_min, k_max, bin_factor, row_stride)
    c = cnt[used]
    mean = acc[:, used] / c
    ex2, ey2, exy = mean[1], mean[2], mean[3]
    feats = FrequencyFeatures(k2=ex2 + ey2, c2=ex2 - ey2, s2=2.0 * exy, k4=mean[4])
    rho2 = feats.k2 if m is None else mean[5]
    # mean direction: float32 is plenty (cells are far wider in angle than its rounding)
    theta = _half_turn(
        0.5 * np.arctan2(feats.s2.astype(np.float32), feats.c2.astype(np.float32)).astype(float)
    )
    # the cells' observed-frame frequency (kx, ky): their mean |k_obs| along the mean
    # direction, from cos 2θ without trigonometry (θ in [0, π): sin θ ≥ 0)
    rho = np.sqrt(rho2)
    cos2 = np.clip(feats.c2 / np.maximum(np.hypot(feats.c2, feats.s2), 1e-300), -1.0, 1.0)
    cos_t = np.copysign(np.sqrt(0.5 * (1.0 + cos2)), feats.s2)
    sin_t = np.sqrt(0.5 * (1.0 - cos2))
    if m is None:
        kx_c, ky_c = rho * cos_t, rho * sin_t
    else:
        kt = np.linalg.solve(m, np.stack([cos_t, sin_t]))
        kt *= rho / np.maximum(np.hypot(kt[0], kt[1]), 1e-300)
        kx_c, ky_c = kt[0], kt[1]
    return Band(
        values=mean[0],
        weights=c * float(bin_factor * bin_factor),
        index=np.zeros(used.size, dtype=np.int64),
        kx=kx_c,
        ky=ky_c,
        rho=rho,
        rho_true=np.sqrt(feats.k2),
        theta_true=theta,
        feats=feats,
        k_min=float(k_min),
        k_max=float(k_max),
        pixel_step=bin_factor / (spectrum.box * spectrum.pixel_size),
        grid_shape=(0, 0),
    )


@dataclass(frozen=True)
class CellLayout:
    """The phase cells of :func:`compressed_zone`.

    Attributes
    ----------
    bounds
        ``k_min²``, ``k_max²``, the radial scale (cells per unit of ``k²``) and the ellipse
        coefficients ``a1 / z``, ``2 a2 / z``.
    elliptical
        Cells follow the elliptical rings (else circular).
    r0
        Index of the first radial cell.
    n_ang
        Number of angular sectors.
    n_cells
        Number of cells, the last one taking the pixels outside the band (dropped).
    """

    bounds: tuple[float, float, float, float, float]
    elliptical: bool
    r0: int
    n_ang: int
    n_cells: int


def _accumulate_cells(
    power: NDArray,
    segments: tuple[NDArray, NDArray, NDArray],
    kx1: NDArray,
    ky1: NDArray,
    m: NDArray | None,
    cells: CellLayout,
    bin1: bool,
    chunk: int,
    compiled: bool | None = None,
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Per-cell sums of the pixels of ``segments`` (rows, first columns, lengths): the count,
    and the power, ``x²``, ``y²``, ``xy``, ``k⁴`` (and ``|k_obs|²`` with ``m``) of the true-frame
    frequency ``(x, y) = M k`` (:func:`anisoctf.optics.kernel.true_frequencies`; the compiled
    loop writes the same two lines). ``cells`` is the layout of the phase cells.

    The compiled loop (:mod:`anisoctf.fit._cells`, built with the package when a C compiler
    is there) and the numpy one give the same cells; ``compiled`` picks one (None: the
    compiled loop when it was built).
    """
    seg_row, seg_start, seg_len = segments
    lo2, hi2, scale, ca1, ca2 = cells.bounds
    elliptical, r0, n_ang, n_cells = cells.elliptical, cells.r0, cells.n_ang, cells.n_cells
    ncol = power.shape[1]
    n_sums = 5 if m is None else 6
    acc = np.zeros((n_sums, n_cells))
    cnt = np.zeros(n_cells)
    if compiled is None:
        compiled = _cells is not None
    if compiled:
        if _cells is None:
            raise RuntimeError("the compiled cell loop (anisoctf.fit._cells) is not built")
        # the power in its own precision (float32 from micrographs, float64 from tile and
        # stack periodograms): no copy, and the same sums as the numpy loop
        dtype = power.dtype if power.dtype in (np.float32, np.float64) else np.float64
        power_c = np.ascontiguousarray(power, dtype=dtype)
        bad = _cells.accumulate(
            power_c,
            power_c.itemsize,
            int(ncol),
            np.ascontiguousarray(seg_row, dtype=np.int64),
            np.ascontiguousarray(seg_start, dtype=np.int64),
            np.ascontiguousarray(seg_len, dtype=np.int64),
            np.ascontiguousarray(kx1, dtype=np.float64),
            np.ascontiguousarray(ky1, dtype=np.float64),
            np.zeros(0) if m is None else np.ascontiguousarray(m, dtype=np.float64).ravel(),
            float(lo2),
            float(hi2),
            float(scale),
            float(ca1),
            float(ca2),
            int(elliptical),
            int(r0),
            int(n_ang),
            int(n_cells),
            int(bin1),
            acc,
            cnt,
        )
        if bad:
            raise ValueError(f"{bad} band pixels fell outside the phase cells")
        return acc, cnt
    dump = n_cells - 1  # pixels outside the band go here and are dropped
    flat_power = power.ravel()
    ends = np.cumsum(seg_len)
    i0 = 0
    while i0 < seg_len.size:
        i1 = max(int(np.searchsorted(ends, ends[i0] - seg_len[i0] + chunk, "right")), i0 + 1)
        lens = seg_len[i0:i1]
        n = int(lens.sum())
        rr = np.repeat(seg_row[i0:i1], lens)
        cc = np.arange(n, dtype=np.int64)
        cc -= np.repeat(np.cumsum(lens) - lens - seg_start[i0:i1], lens)
        kx, ky = kx1[cc], ky1[rr]
        kxt, kyt = true_frequencies(kx, ky, m)
        x2, y2, xy = kxt * kxt, kyt * kyt, kxt * kyt
        k2 = x2 + y2
        out = (k2 < lo2) | (k2 > hi2)
        if bin1:  # kx = 0 holds +ky and -ky, the same point: keep one
            out |= (cc == 0) & (ky < 0)
        if not elliptical:
            r_idx = (k2 * scale).astype(np.int64)  # k2 >= 0: truncation is the floor
        else:  # u >= k2 (1 - ell) >= 0: truncation is the floor
            u = x2 - y2
            u *= ca1
            u += k2
            u += ca2 * xy
            u *= scale
            r_idx = u.astype(np.int64)
        r_idx -= r0
        np.maximum(r_idx, 0, out=r_idx)
        # direction folded to the upper half plane, then the pseudo-angle 1 - x / (|x| + y)
        flip = kyt < 0
        ux = np.where(flip, -kxt, kxt)
        den = np.abs(ux)
        den += np.abs(kyt)
        np.maximum(den, 1e-300, out=den)
        pa = np.divide(ux, den, out=ux)
        pa *= -0.5 * n_ang
        pa += 0.5 * n_ang
        a_idx = pa.astype(np.int64)
        np.minimum(a_idx, n_ang - 1, out=a_idx)
        r_idx *= n_ang
        r_idx += a_idx
        cell = r_idx
        cell[out] = dump
        cnt += np.bincount(cell, minlength=n_cells)
        acc[0] += np.bincount(cell, weights=flat_power[rr * ncol + cc], minlength=n_cells)
        acc[1] += np.bincount(cell, weights=x2, minlength=n_cells)
        acc[2] += np.bincount(cell, weights=y2, minlength=n_cells)
        acc[3] += np.bincount(cell, weights=xy, minlength=n_cells)
        acc[4] += np.bincount(cell, weights=k2 * k2, minlength=n_cells)
        if m is not None:
            acc[5] += np.bincount(cell, weights=kx * kx + ky * ky, minlength=n_cells)
        i0 = i1
    cnt[dump] = 0.0  # as the compiled loop, which never counts them
    acc[:, dump] = 0.0
    return acc, cnt


def radial_basis(
    rho: NDArray[np.float64], k_min: float, k_max: float, n: int
) -> NDArray[np.float64]:
    """Uniform cubic B-spline basis (``len(rho) × n``) on [k_min, k_max] in ``sqrt(k)``.

    Sqrt spacing puts more flexibility at low frequency, where the background changes fast.
    Each row has four non-zero entries that sum to one.
    """
    n = max(int(n), 4)
    lo, hi = np.sqrt(k_min), np.sqrt(k_max)
    h = (hi - lo) / (n - 3)
    t = (np.sqrt(np.clip(rho, k_min, k_max)) - lo) / h
    i = np.minimum(t.astype(np.int64), n - 4)
    f = t - i
    f2 = f * f
    f3 = f2 * f
    out = np.zeros(rho.size * n)
    at = np.arange(0, rho.size * n, n)  # flat index of each row's first entry
    at += i
    out[at] = (1.0 - f) ** 3 / 6.0
    at += 1
    out[at] = (3.0 * f3 - 6.0 * f2 + 4.0) / 6.0
    at += 1
    out[at] = (-3.0 * f3 + 3.0 * f2 + 3.0 * f + 1.0) / 6.0
    at += 1
    out[at] = f3 / 6.0
    return out.reshape(rho.size, n)
