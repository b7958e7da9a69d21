"""CTF estimation of one micrograph (or one pooled spectrum): search, refine, judge.

This is the engine that whole micrographs, patches and particle pools share:

1. the averaged periodogram (:mod:`anisoctf.spectrum.periodogram`);
2. an exhaustive coarse search over defocus, astigmatism and phase (:mod:`.search`) in a
   low-resolution band;
3. maximum-likelihood refinement of the candidates (:mod:`.refine`), first in that band, then in
   the full band; the candidate with the best likelihood wins;
4. figure of merit, fit resolution and diagnostics (:mod:`.quality`).

With a magnification matrix in the optics every step works on true-frame frequencies, so the
answer is the true-frame defocus and astigmatism.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from anisoctf.errors import FitError, InputError
from anisoctf.fit.band import Band, compressed_zone, concat_bands, make_band
from anisoctf.fit.quality import (
    RingStats,
    equiphase_radius,
    optics_ctf2,
    ring_resolution,
    ring_statistics,
)
from anisoctf.fit.refine import RefineResult, background_only_nll, refine_ml
from anisoctf.fit.result import CTFEstimate, FitDiagnostics, FitSettings
from anisoctf.fit.search import coarse_search
from anisoctf.optics.ctf import (
    CTFParams,
    Optics,
    chi,
    frequency_features,
    params_from_astig,
)
from anisoctf.optics.kernel import ctf_constants, ctf_from_chi
from anisoctf.spectrum.periodogram import Spectrum, micrograph_spectrum

__all__ = ["check_image", "estimate_ctf", "fit_spectrum"]

#: the coarse search never looks beyond this resolution (Å): rings there are faint and fine
COARSE_MAX_RES = 5.0
#: a fit must explain the spectrum this much better than a smooth background (deviance;
#: pure noise after the search gives a few tens, visible Thon rings give thousands)
MIN_DEVIANCE = 150.0
#: and at least this many Thon rings in the fit band must agree with it significantly
MIN_AGREEING_RINGS = 3


def check_image(image: NDArray, name: str | None = None) -> None:
    """Raise :class:`InputError` for images no fit can use (empty, NaN/Inf, constant)."""
    a = np.asarray(image)
    if a.size == 0:
        raise InputError("the image is empty (0 pixels)", path=name)
    if a.ndim != 2:
        raise InputError(f"expected one 2D image, got shape {a.shape}", path=name)
    if not np.issubdtype(a.dtype, np.number) or np.iscomplexobj(a):
        raise InputError(f"image has non-real pixel type {a.dtype}", path=name)
    # NaN or Inf make the sum non-finite (one cheap pass); count them only then
    bad = 0 if np.isfinite(np.sum(a)) else int(a.size - np.count_nonzero(np.isfinite(a)))
    if bad:
        raise InputError(
            f"{bad} pixels are NaN or Inf; re-run motion correction or re-export the micrograph",
            path=name,
        )
    first = a.flat[0]  # a differing pixel in the first row settles it without a full pass
    if not np.any(a[0] != first) and float(np.ptp(a)) == 0.0:
        raise InputError("all pixels have the same value (blank image)", path=name)


def _nyquist_limited(settings: FitSettings, apix: float) -> tuple[float, list[str]]:
    """The usable max resolution at this pixel size (and a warning if we had to change it)."""
    nyq = 2.0 * apix
    if settings.max_res >= nyq * 1.05:
        return settings.max_res, []
    new = nyq * 1.05
    if new >= settings.min_res * 0.6:
        raise FitError(
            f"pixel size {apix:.3f} Å leaves no usable band between min-res {settings.min_res} Å "
            f"and Nyquist {nyq:.2f} Å; check --apix or lower --min-res"
        )
    return new, [f"max-res {settings.max_res} Å is beyond Nyquist; fitted to {new:.2f} Å"]


def _bin_factor(spectrum: Spectrum, search_box: int) -> int:
    """The binning that brings ``spectrum`` to about ``search_box`` pixels (a power of two)."""
    f = 1
    ny, nx = spectrum.shape
    while spectrum.box // (2 * f) >= search_box and ny % (4 * f) == 0 and nx % (4 * f) == 0:
        f *= 2
    return f


def _mixed_band(
    spectrum: Spectrum,
    optics: Optics,
    k_min: float,
    k_max: float,
    max_bin: int,
    z_far: float,
    defocus: float = 0.0,
    half_astig: float = 0.0,
    min_period: float = 6.0,
    max_pixels: int | None = None,
    astig: tuple[float, float] | None = None,
) -> Band:
    """Each radial zone binned as coarsely as its Thon rings allow (≥ ``min_period`` pixels of
    the finest grid per ring period for every binned pixel), and nothing beyond where the
    spectrum can no longer resolve the rings (2.5 pixels per period). Zones with many pixels
    are gathered straight into cells of equal phase (:func:`compressed_zone`); with ``max_pixels``,
    zones are row-subsampled to about that many pixels first. With ``astig`` (the current
    estimate's ``(a1, a2)``) the cells follow its elliptical rings and ``half_astig`` is how far
    the astigmatism may still move; without it, ``half_astig`` is the astigmatism itself."""
    step = 1.0 / (spectrum.box * spectrum.pixel_size)
    # radial frequency at which the ring period is p fine pixels
    lam = optics.wavelength
    z = max(z_far, 1.0)

    def k_at(p: float) -> float:
        return 1.0 / (2.0 * lam * z * p * step)

    k_hi = min(k_max, max(k_at(2.5), k_min * 1.5))
    bands: list[Band] = []
    lo = k_min
    b = max_bin
    while lo < k_hi:
        hi = k_hi if b == 1 else min(k_hi, k_at(min_period * b))
        if hi > lo:
            est = 0.5 * np.pi * (hi * hi - lo * lo) / (b * step) ** 2  # pixels in the zone
            stride = max(1, int(round(est / max_pixels))) if max_pixels else 1
            if est / stride >= 20000 and defocus > 0:  # many pixels: straight into phase cells
                bands.append(
                    compressed_zone(
                        spectrum,
                        optics,
                        lo,
                        hi,
                        b,
                        defocus,
                        half_astig,
                        row_stride=stride,
                        astig=astig,
                    )
                )
            else:
                bands.append(make_band(spectrum, optics, lo, hi, b, row_stride=stride))
            lo = hi
        if b == 1:
            break
        b //= 2
    out = bands[0]
    for extra in bands[1:]:
        out = concat_bands(out, extra)
    return out


@dataclass(frozen=True)
class _Search:
    stage1: list[RefineResult]
    grid_step: float
    k_min: float
    k_max: float
    warnings: list[str]


def search_spectrum(
    spectrum: Spectrum, optics: Optics, settings: FitSettings, name: str | None = None
) -> _Search:
    """Coarse search and a first likelihood refinement in the low-resolution band."""
    opt = optics.with_pixel_size(spectrum.pixel_size)
    max_res, warnings = _nyquist_limited(settings, spectrum.pixel_size)
    k_min = 1.0 / settings.min_res
    k_coarse = 1.0 / max(max_res, COARSE_MAX_RES)
    bin_ = _bin_factor(spectrum, settings.box)
    coarse_band = make_band(spectrum, opt, k_min, k_coarse, bin_)
    if coarse_band.size < 200:
        raise FitError(
            f"too few spectrum pixels between {settings.min_res} and "
            f"{max(max_res, COARSE_MAX_RES)} Å; use a larger --box or check --apix",
            path=name,
        )
    search = coarse_search(
        coarse_band,
        opt,
        settings.df_min,
        settings.df_max,
        settings.max_astig,
        phase_plate=settings.phase_plate,
    )
    if search.significance < 4.0 or not search.candidates:
        raise FitError(
            f"no Thon rings found between df-min {settings.df_min:.0f} and df-max "
            f"{settings.df_max:.0f} Å (significance {search.significance:.1f}); check the pixel "
            "size (--apix) and the defocus range",
            path=name,
        )
    stage1: list[RefineResult] = []
    step = float(search.defocus_grid[1] - search.defocus_grid[0])
    for cand in search.candidates:
        if any(_same_basin(cand, r, step) for r in stage1):
            continue  # it would only converge to an optimum already found
        try:
            stage1.append(
                refine_ml(
                    coarse_band,
                    opt,
                    cand,
                    n_eff=spectrum.n_eff,
                    fit_phase=settings.phase_plate,
                    astig_sigma=settings.astig_restraint,
                    n_bg=8,
                    n_env=4,
                    tol=0.1,  # a starting point for the full band: coarser convergence is enough
                )
            )
        except (np.linalg.LinAlgError, ValueError, FloatingPointError):
            continue
    if not stage1:
        raise FitError("the refinement failed for every candidate", path=name)
    stage1.sort(key=lambda r: r.nll)
    # keep the runner-up only if it is a distinct answer that the data do not rule out
    keep = [stage1[0]]
    scale = spectrum.n_eff * float(coarse_band.weights.sum())
    for r in stage1[1:]:
        sd = np.sqrt(np.maximum(np.diag(stage1[0].covariance)[:3], 1e-12))
        diff = np.array([r.z - keep[0].z, r.a1 - keep[0].a1, r.a2 - keep[0].a2])
        distinct = bool(np.any(np.abs(diff) > 3 * sd))
        if distinct and (r.nll - keep[0].nll) * scale < 20.0:
            keep.append(r)
            break
    return _Search(keep, step, k_min, 1.0 / max_res, warnings)


#: a search candidate this close to a refined optimum (|Δz| + |Δa|, in search grid steps, i.e.
#: quarter radians of phase at the coarse band edge) lies in that optimum's basin: the runners-up
#: of the search are mostly the next grid points of the same peak (4–6.5 steps away), and they
#: were found to converge to the same optimum every time
SAME_BASIN_STEPS = 8.0


def _same_basin(cand: tuple[float, float, float, float], r: RefineResult, step: float) -> bool:
    dz = abs(cand[0] - r.z)
    da = float(np.hypot(cand[1] - r.a1, cand[2] - r.a2))
    return (dz + da) < SAME_BASIN_STEPS * step and abs(cand[3] - r.phase_deg) < 30.0


def _astig_margin(top: RefineResult, other: RefineResult, n_sd: float = 4.0) -> float:
    """How far (Å, in ``(a1, a2)``) the astigmatism refined from ``other`` may end up from
    ``top``'s: their distance plus ``n_sd`` standard errors of ``top``'s astigmatism."""
    cov = np.asarray(top.covariance)
    sd = float(np.sqrt(max(cov[1, 1], 0.0) + max(cov[2, 2], 0.0))) if cov.shape[0] > 2 else 0.0
    return float(np.hypot(other.a1 - top.a1, other.a2 - top.a2)) + n_sd * sd


def refine_spectrum(
    spectrum: Spectrum,
    optics: Optics,
    settings: FitSettings,
    found: _Search,
    diagnostics: bool = True,
    name: str | None = None,
) -> CTFEstimate:
    """Full-band likelihood refinement from the search's best candidates, then quality."""
    opt = optics.with_pixel_size(spectrum.pixel_size)
    k_min, k_max = found.k_min, found.k_max
    bin_ = _bin_factor(spectrum, settings.box)
    z_far = max(abs(r.z) + np.hypot(r.a1, r.a2) for r in found.stage1)
    top = found.stage1[0]
    # cells follow the best candidate's elliptical rings, wide enough in angle for the
    # astigmatism still to move by a few standard errors or to reach any other candidate's
    band = _mixed_band(
        spectrum,
        opt,
        k_min,
        k_max,
        bin_,
        z_far,
        top.z,
        max(_astig_margin(top, r) for r in found.stage1),
        astig=(top.a1, top.a2),
    )
    best: RefineResult | None = None
    for r1 in found.stage1:
        try:
            r2 = refine_ml(
                band,
                opt,
                (r1.z, r1.a1, r1.a2, r1.phase_deg),
                n_eff=spectrum.n_eff,
                fit_phase=settings.phase_plate,
                astig_sigma=settings.astig_restraint,
            )
        except (np.linalg.LinAlgError, ValueError, FloatingPointError):
            continue
        if best is None or r2.nll < best.nll:
            best = r2
    if best is None:
        raise FitError("the refinement failed for every candidate", path=name)

    deviance = 2.0 * (background_only_nll(band) - best.nll) * spectrum.n_eff * band.weights.sum()
    if not deviance > MIN_DEVIANCE:
        raise FitError(
            f"no Thon rings found (the best CTF explains the spectrum no better than a smooth "
            f"background: deviance {deviance:.0f}); check the pixel size (--apix), the defocus "
            "range and that the image is a micrograph",
            path=name,
        )
    phase = best.phase_deg if settings.phase_plate else 0.0
    params = params_from_astig(best.z, best.a1, best.a2, phase)
    warnings = list(found.warnings)
    step = found.grid_step
    if not settings.df_min - step <= params.mean_defocus <= settings.df_max + step:
        raise FitError(
            f"best defocus {params.mean_defocus:.0f} Å lies outside df-min "
            f"{settings.df_min:.0f} .. df-max {settings.df_max:.0f} Å; widen the range or "
            "check --apix",
            path=name,
        )
    if min(params.mean_defocus - settings.df_min, settings.df_max - params.mean_defocus) < 2 * step:
        warnings.append("defocus at the edge of the search range")

    nyq = 0.5 / spectrum.pixel_size
    rings = ring_statistics(
        _mixed_band(
            spectrum,
            opt,
            k_min,
            nyq,
            bin_,
            z_far,
            best.z,
            _astig_margin(best, best),
            min_period=3.0,
            max_pixels=100_000,
            astig=(best.a1, best.a2),
        ),
        params,
        opt,
    )
    # where the rings stop following the fit: every pixel of the spectrum, whatever the box
    resolution = ring_resolution(spectrum, params, opt, k_min)
    n_agree = resolution.agreeing(k_min, k_max)
    if n_agree < MIN_AGREEING_RINGS:
        raise FitError(
            f"no Thon rings agree with the best fit ({n_agree} significant ring(s) between "
            f"{1 / k_min:.1f} and {1 / k_max:.1f} Å); check the pixel size (--apix), the "
            "defocus range and that the image is a micrograph",
            path=name,
        )
    fom = rings.figure_of_merit(k_min, k_max)
    diag = None
    if diagnostics:
        shown = make_band(spectrum, opt, k_min, nyq, bin_)
        diag = _diagnostics(spectrum, opt, params, shown, (k_min, k_max), rings)
    return CTFEstimate(
        params=params,
        optics=optics,
        figure_of_merit=fom,
        fit_resolution=resolution.fit_resolution,
        n_tiles=spectrum.n_eff,
        diagnostics=diag,
        warnings=tuple(warnings),
    )


def fit_spectrum(
    spectrum: Spectrum,
    optics: Optics,
    settings: FitSettings | None = None,
    diagnostics: bool = True,
    name: str | None = None,
) -> CTFEstimate:
    """Fit the CTF to an averaged power spectrum (search, then refinement).

    Parameters
    ----------
    spectrum
        Averaged periodogram (from micrograph tiles, a patch, or a particle stack).
    optics
        Optics of the image; ``optics.mag_matrix`` selects the true frame of the answer.
    settings
        Search ranges and options.
    diagnostics
        Also return arrays for the diagnostic plot.
    name
        File name used in error messages.
    """
    settings = settings or FitSettings()
    found = search_spectrum(spectrum, optics, settings, name)
    return refine_spectrum(spectrum, optics, settings, found, diagnostics, name)


def _square_display(
    spectrum: Spectrum, band: Band, obs: NDArray, model: NDArray
) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """Put band values on a square half-plane grid for display (nearest frequency); the grid
    spans the spectrum's full frequency range (Nyquist of ``spectrum.pixel_size``)."""
    gy, gx = band.grid_shape
    ny, nx = spectrum.shape
    fy, fx = ny // gy, nx // (2 * (gx - 1))  # binning of each axis
    n = min(gy, 2 * (gx - 1))
    out_s = np.zeros((n, n // 2 + 1), dtype=np.float32)
    out_m = np.zeros_like(out_s)
    # frequency of each band pixel in units of the display step
    iy, ix = np.divmod(band.index, gx)
    ky = np.where(iy < gy // 2, iy, iy - gy) * fy / ny
    kx = ix * fx / nx
    dstep = 1.0 / n
    ry = np.round(ky / dstep).astype(np.int64)
    rx = np.round(kx / dstep).astype(np.int64)
    ok = (np.abs(ry) < n // 2) & (rx <= n // 2)
    flat = (ry[ok] % n) * (n // 2 + 1) + rx[ok]
    cnt = np.bincount(flat, minlength=out_s.size)
    for dst, v in ((out_s, obs), (out_m, model)):
        acc = np.bincount(flat, weights=v[ok], minlength=dst.size)
        dst.ravel()[:] = np.where(cnt > 0, acc / np.maximum(cnt, 1), 0.0)
        # the kx = 0 column holds each point once: mirror it for display
        col = dst[:, 0].copy()
        dst[1:, 0] = np.where(col[1:] != 0, col[1:], col[1:][::-1])
    return out_s, out_m


def _diagnostics(
    spectrum: Spectrum,
    optics: Optics,
    params: CTFParams,
    band: Band,
    fit_band: tuple[float, float],
    rings: RingStats,
) -> FitDiagnostics:
    """Display arrays on the (binned) half-plane grid of ``band``, with the local background
    and ring amplitude of the ring windows measured for the fit resolution (``rings``)."""
    fit_resolution = rings.fit_resolution
    # 2D: spectrum with its local background removed and local amplitude divided out, per ring
    w = rings.windows_of(band, params, optics)
    amp = np.maximum(rings.amplitude, 0.0)
    good = amp > 0
    order = np.argsort(rings.k)
    ko, ampo, goodo = rings.k[order], amp[order], good[order]
    amp_s = np.interp(rings.k, ko[goodo], ampo[goodo]) if goodo.any() else np.ones_like(amp)
    # beyond the fit resolution the amplitude is noise: hold the last trustworthy value
    k_fit = 1.0 / fit_resolution
    hold = np.interp(k_fit, ko[goodo], ampo[goodo]) if goodo.any() else 1.0
    amp_s = np.where(rings.k > k_fit, hold, amp_s)
    amp_s = np.maximum(amp_s, 1e-12)
    obs = band.values - rings.intercept[w] - rings.slope[w] * (band.rho_true - rings.rho_mean[w])
    obs = obs / amp_s[w]
    model = optics_ctf2(band, params, optics)
    spec2d, mod2d = _square_display(spectrum, band, obs, model)
    # 1D equiphase profile
    keq = equiphase_radius(band, params, optics)
    nb = int(np.ceil((band.k_max - band.k_min) / (0.5 * band.pixel_step)))
    edges = np.linspace(band.k_min, band.k_max, nb + 1)
    i = np.clip(((keq - band.k_min) * (nb / (band.k_max - band.k_min))).astype(np.int64), 0, nb - 1)
    cnt = np.bincount(i, minlength=nb)
    prof = np.bincount(i, weights=obs, minlength=nb) / np.maximum(cnt, 1)
    kc = 0.5 * (edges[1:] + edges[:-1])
    feats = frequency_features(kc, np.zeros_like(kc))
    iso = CTFParams(params.mean_defocus, params.mean_defocus, 0.0, params.phase_shift_deg)
    fit1d = ctf_from_chi(chi(feats, iso, optics), ctf_constants(optics)) ** 2
    quality = np.interp(kc, rings.k[order], np.clip(rings.r[order], -1, 1))
    keep = cnt > 0
    return FitDiagnostics(
        pixel_size=spectrum.pixel_size,
        spectrum=spec2d,
        model=mod2d,
        k=kc[keep],
        profile=prof[keep],
        profile_fit=fit1d[keep],
        quality=quality[keep],
        fit_band=fit_band,
    )


def estimate_ctf(
    image: NDArray,
    optics: Optics,
    settings: FitSettings | None = None,
    diagnostics: bool = True,
    workers: int = 1,
    name: str | None = None,
    *,
    check: bool = True,
) -> CTFEstimate:
    """Estimate the CTF of one micrograph.

    Parameters
    ----------
    image
        2D micrograph (rows = y, columns = x), any real dtype.
    optics
        Pixel size, voltage, Cs, amplitude contrast and (optionally) magnification matrix;
        with a non-identity matrix the returned defocus is in the true frame.
    settings
        Box, resolution band, defocus range, phase plate, astigmatism restraint
        (``FitSettings()`` if None).
    diagnostics
        Also return the arrays for the diagnostic picture.
    workers
        Threads for the FFTs.
    name
        File name for error messages.
    check
        Run :func:`check_image` first (one pass over the image). False only for an image that
        has passed the same checks already, as every image from
        :func:`anisoctf.io.read_micrograph` has.

    Returns
    -------
    CTFEstimate

    Raises
    ------
    InputError
        The image cannot be used (empty, NaN/Inf, constant, smaller than one tile).
    FitError
        No trustworthy CTF was found (e.g. rings outside the defocus range).

    Examples
    --------
    >>> from anisoctf import Optics, estimate_ctf
    >>> est = estimate_ctf(image, Optics(pixel_size=1.0, voltage_kv=300))  # doctest: +SKIP
    >>> est.params.defocus_u, est.params.defocus_v, est.params.angle_deg  # doctest: +SKIP
    """
    settings = settings or FitSettings()
    if check:
        check_image(image, name)
    try:
        spectrum = micrograph_spectrum(
            image,
            optics.pixel_size,
            box=settings.box,
            fit_pixel_size=settings.fit_pixel_size,
            workers=workers,
        )
    except InputError as e:
        raise InputError(str(e), path=name) from None
    return fit_spectrum(spectrum, optics, settings, diagnostics=diagnostics, name=name)
