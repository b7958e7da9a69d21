"""The global CTF of a tilted micrograph, fitted on its tilt-corrected spectrum.

A tilted specimen's whole-image spectrum is a blur of the rings of every height: the fine rings
fade where the defocus spread over the image reaches about a radian of phase, so the plain
global fit reports a fit resolution set by the tilt, and an astigmatism and defocus fitted to
that blur. Once the local fit (:mod:`anisoctf.local.estimate`) has the plane, CTFFIND 5 (Elferich,
Kong, Grigorieff et al., eLife 2024, "CTFFIND5 provides improved insight into quality, tilt and
thickness of TEM samples") averages tile spectra each rescaled in frequency so that its rings
fall where the micrograph centre's do, and refits the CTF on that average. We do the same:

* every tile (``box`` pixels, half-overlapping on small images) has its periodogram and the
  plane's defocus ``D_t = d0 + δ_t`` at its centre;
* the corrected spectrum at frequency ``k`` takes each tile's periodogram at ``s_t(k)·k``, the
  frequency where the tile's phase equals the centre's,
  ``πλ (D0(θ) + δ_t) s²k² − (π/2) Cs λ³ s⁴k⁴ = πλ D0(θ) k² − (π/2) Cs λ³ k⁴`` (exact with the
  astigmatism and Cs: ``D0(θ)`` is the centre's defocus along the direction of ``k``, the true
  frame with a magnification matrix), by bilinear interpolation;
* the weighted average is fitted as any spectrum is (:func:`anisoctf.fit.estimate.fit_spectrum`):
  the defocus, astigmatism and fit resolution are those of the micrograph's centre.

The phase constants come from the one CTF kernel (:mod:`anisoctf.optics.kernel`).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from numpy.typing import NDArray

from anisoctf.errors import AnisoctfError
from anisoctf.fit.estimate import fit_spectrum
from anisoctf.fit.result import CTFEstimate, FitSettings
from anisoctf.optics.ctf import CTFParams, Optics, frequency_features
from anisoctf.optics.kernel import ctf_constants
from anisoctf.records.local import LocalEstimate
from anisoctf.spectrum.periodogram import Spectrum
from anisoctf.spectrum.tiles import TileSpectra, tile_spectra

__all__ = [
    "corrected_box",
    "corrected_power",
    "needs_tilt_correction",
    "refit_tilt_corrected",
    "tilt_corrected_spectrum",
    "with_global",
]

#: correct when the plane's defocus spread over the image is at least this much phase (rad,
#: half the peak-to-peak spread) at the fit band's high-resolution end: below it the plain
#: whole-image rings are hardly blurred there
MIN_SPREAD_PHASE = 1.0


def _bilinear_half_plane(power: NDArray, fx: NDArray, fy: NDArray) -> NDArray:
    """Values of an rfft2 half-plane ``power`` (box × box//2+1, FFT order) at fractional
    frequency indices ``fx ≥ 0`` (columns) and ``fy`` (rows, periodic)."""
    n, m = power.shape
    flat = power.reshape(-1)
    fx = np.minimum(fx, m - 1.000001)
    x0 = fx.astype(np.int64)  # fx ≥ 0: truncation is the floor
    y0f = np.floor(fy)
    tx = (fx - x0).astype(np.float32)
    ty = (fy - y0f).astype(np.float32)
    y0 = y0f.astype(np.int64) % n
    i00 = y0 * m + x0
    i10 = ((y0 + 1) % n) * m + x0
    top = np.take(flat, i00) * (1 - tx) + np.take(flat, i00 + 1) * tx
    bottom = np.take(flat, i10) * (1 - tx) + np.take(flat, i10 + 1) * tx
    return top * (1 - ty) + bottom * ty


def corrected_power(
    tiles: TileSpectra,
    optics: Optics,
    params: CTFParams,
    offsets: NDArray,
    k_max: float = np.inf,
) -> NDArray[np.float64]:
    """Weighted average of the tile periodograms, each rescaled in frequency so that a tile at
    defocus ``params.mean_defocus + offsets[t]`` has its rings where the centre has them.

    Parameters
    ----------
    tiles
        The tile periodograms (their ``weights`` weight the average).
    optics
        Optics of the micrograph (magnification matrix: the true frame of the defocus).
    params
        The centre's CTF (its astigmatism is shared by every tile).
    offsets
        Defocus of each tile's centre minus the micrograph centre's (Å).
    k_max
        Rescale only up to this frequency (true frame, Å⁻¹); beyond it, the plain average.
    """
    box = tiles.box
    apix = tiles.pixel_size
    ky = np.fft.fftfreq(box, d=apix)[:, None]
    kx = np.fft.rfftfreq(box, d=apix)[None, :]
    mag = optics.M if optics.has_anisomag else None
    f = frequency_features(kx, ky, mag)
    consts = ctf_constants(optics)
    a = consts.defocus_coef_rad  # π λ
    b = consts.cs_coef_rad  # (π/2) Cs λ³
    a1, a2 = params.astig_components
    k2 = np.maximum(f.k2, 1e-30)
    form = params.mean_defocus * f.k2 + a1 * f.c2 + a2 * f.s2  # kᵀ D0 k
    chi0 = a * form - b * f.k2 * f.k2  # the centre's phase (no phase shift: it cancels)
    d_dir = form / k2  # the centre's defocus along each direction
    kxo, kyo = np.broadcast_arrays(kx * box * apix, ky * box * apix)  # frequency indices
    wts = np.asarray(tiles.weights, dtype=np.float64)
    wsum = max(float(wts.sum()), 1e-30)
    # outside the band (and at k = 0) the plain weighted average
    total = np.tensordot(wts, tiles.power, axes=1).astype(np.float64)
    sel = np.flatnonzero((f.k2 <= k_max * k_max).ravel() & (f.k2 > 0).ravel())
    d_sel, chi_sel, k2_sel = d_dir.ravel()[sel], chi0.ravel()[sel], k2.ravel()[sel]
    fx, fy = kxo.ravel()[sel], kyo.ravel()[sel]
    acc = np.zeros(sel.size)
    for t in range(tiles.n_tiles):
        if wts[t] <= 0:
            continue
        ad = a * (d_sel + offsets[t])
        disc = np.maximum(ad * ad - 4.0 * b * chi_sel, 0.0)
        u = 2.0 * chi_sel / (ad + np.sqrt(disc))  # |s k|² where the tile's phase is chi0
        s = np.sqrt(np.maximum(u, 0.0) / k2_sel)
        acc += wts[t] * _bilinear_half_plane(tiles.power[t], s * fx, s * fy)
    total.ravel()[sel] = acc
    return total / wsum


def tilt_corrected_spectrum(
    image: NDArray,
    optics: Optics,
    params: CTFParams,
    plane: tuple[float, float, float],
    box: int = 512,
    fit_pixel_size: float | None = None,
    workers: int = 1,
    k_max: float = np.inf,
) -> Spectrum:
    """The tilt-corrected average spectrum of a micrograph (see the module docstring).

    Parameters
    ----------
    image
        The micrograph (rows = y, columns = x).
    optics
        Its optics (pixel size of ``image``).
    params
        The CTF at the micrograph's centre (mean defocus and astigmatism).
    plane
        ``(d0, gx, gy)``: defocus at the centre ``(nx/2, ny/2)`` and its gradient in Å per
        micrograph pixel (:class:`anisoctf.records.local.DefocusSurface`); only the gradient
        is used (the centre's defocus is ``params``').
    box
        Tile size (pixels at the fitting pixel size).
    fit_pixel_size
        Fourier-crop the tiles to this pixel size.
    workers
        Threads for the FFTs.
    k_max
        Rescale only up to this frequency (Å⁻¹; beyond it the rings are not fitted).
    """
    ny, nx = np.shape(image)
    side = int(box * (fit_pixel_size or optics.pixel_size) / optics.pixel_size)
    # half-overlapping tiles where side-by-side ones would be few (Welch's averaging gain)
    overlap = 0.5 if (ny // side) * (nx // side) < 16 else 0.0
    tiles = tile_spectra(
        image,
        optics.pixel_size,
        box=box,
        overlap=overlap,
        fit_pixel_size=fit_pixel_size,
        workers=workers,
    )
    _, gx, gy = plane
    offsets = gx * (tiles.centres[:, 0] - 0.5 * nx) + gy * (tiles.centres[:, 1] - 0.5 * ny)
    power = corrected_power(tiles, optics.with_pixel_size(tiles.pixel_size), params, offsets, k_max)
    area_frac = (ny * nx) / (tiles.n_tiles * tiles.tile * tiles.tile)
    wsum = float(np.sum(tiles.weights))
    origins = np.round(tiles.centres[:, ::-1] - 0.5 * (tiles.tile - 1)).astype(np.int64)
    return Spectrum(
        power=power,
        pixel_size=tiles.pixel_size,
        n_eff=float(max(wsum * min(1.0, area_frac * 1.5), 1.0)),
        tile_weights=np.asarray(tiles.weights, dtype=np.float64),
        tile_origins=origins,
    )


def needs_tilt_correction(
    glob: CTFEstimate, loc: LocalEstimate, optics: Optics, settings: FitSettings
) -> bool:
    """Whether the plane's defocus spread over the image blurs the whole-image rings within
    the fit band (``MIN_SPREAD_PHASE`` at its high-resolution end) and the tilt is real (three
    standard errors)."""
    sf = loc.surface
    ny, nx = sf.shape
    spread = 0.5 * (abs(sf.gx) * nx + abs(sf.gy) * ny)  # half the corner-to-corner range (Å)
    k = 1.0 / max(settings.max_res, 2.0 * optics.pixel_size)
    phase = ctf_constants(optics).defocus_coef_rad * k * k * spread
    sigma = loc.tilt_sigma if np.isfinite(loc.tilt_sigma) else np.inf
    return bool(phase >= MIN_SPREAD_PHASE and abs(loc.tilt_angle) > 3.0 * sigma)


def refit_tilt_corrected(
    image: NDArray,
    optics: Optics,
    glob: CTFEstimate,
    loc: LocalEstimate,
    settings: FitSettings,
    workers: int = 1,
    name: str | None = None,
) -> CTFEstimate | None:
    """The global CTF fitted on the tilt-corrected spectrum, or None when the tilt does not
    blur the rings (:func:`needs_tilt_correction`) or the refit fails or moves the centre's
    defocus implausibly far from the plane's (then the plain fit stands).

    The search is narrowed to ±30 % around the plain fit's defocus (the rings there are known).
    """
    if not needs_tilt_correction(glob, loc, optics, settings):
        return None
    ny, nx = np.shape(image)
    sf = loc.surface
    grad = float(np.hypot(sf.gx, sf.gy)) / optics.pixel_size
    box, k_seen = _best_box(settings, optics, glob.params.defocus_u, grad, (ny, nx))
    z = glob.params.mean_defocus
    narrow = replace(
        settings,
        df_min=max(settings.df_min, 0.7 * z),
        df_max=min(settings.df_max, 1.3 * z),
        box=box,
    )
    try:
        spec = tilt_corrected_spectrum(
            image,
            optics,
            glob.params,
            (sf.d0, sf.gx, sf.gy),
            box,
            settings.fit_pixel_size,
            workers,
            k_max=min(1.15 / settings.max_res, 1.3 * k_seen),  # a little beyond the rings
        )
        est = fit_spectrum(
            spec, optics, narrow, diagnostics=glob.diagnostics is not None, name=name
        )
    except (AnisoctfError, np.linalg.LinAlgError, ValueError):
        return None
    if abs(est.params.mean_defocus - z) > 0.1 * z + 500.0:
        return None
    if not est.fit_resolution < glob.fit_resolution:  # it must see rings further out
        return None
    return est


def corrected_box(
    settings: FitSettings,
    optics: Optics,
    defocus: float,
    gradient: float,
    shape: tuple[int, int],
) -> int:
    """Tile size (pixels at the fitting pixel size) of the tilt-corrected spectrum.

    Two limits pull apart: a tile of ``L`` Å samples the rings at ``1/L``, so the rings stop
    being resolved where their period ``1/(2λzk)`` falls to 2.5 pixels (``k = L/(5λz)``), while
    the defocus spread across it, ``w = |g|·L``, damps them by ``sinc(λk²w)`` (half at
    ``λk²w = 0.6``). Of ``box/2 … 4·box`` (at least 2 tiles a side) the size whose lower limit
    reaches furthest wins (``--box`` on a tie).
    """
    return _best_box(settings, optics, defocus, gradient, shape)[0]


def _best_box(
    settings: FitSettings,
    optics: Optics,
    defocus: float,
    gradient: float,
    shape: tuple[int, int],
) -> tuple[int, float]:
    """:func:`corrected_box` and the frequency (Å⁻¹) to which its tiles see the rings."""
    apix = settings.fit_pixel_size or optics.pixel_size
    lam = optics.wavelength
    z = max(abs(defocus), 1000.0)
    k_cap = min(1.0 / settings.max_res, 0.5 / apix)
    side_max = min(shape) * optics.pixel_size / (2.0 * apix)  # box that leaves 2 tiles a side
    best, best_k = settings.box, -1.0
    for box in (settings.box, settings.box // 2, 2 * settings.box, 4 * settings.box):
        if box < 128 or box > side_max:
            continue
        extent = box * apix
        k_alias = extent / (5.0 * lam * z)
        k_blur = np.sqrt(0.6 / (lam * max(gradient * extent, 1e-9)))
        k = min(k_alias, k_blur, k_cap)
        if k > 1.02 * best_k:
            best, best_k = box, k
    if best_k < 0:  # a small image: the largest even box with 2 tiles a side
        best, best_k = max(64, int(side_max) // 2 * 2), k_cap
    return best, best_k


def with_global(loc: LocalEstimate, est: CTFEstimate) -> LocalEstimate:
    """``loc`` with the shared astigmatism and angle of the refitted global CTF."""
    return replace(loc, astigmatism=float(est.params.astigmatism), angle_deg=est.params.angle_deg)
