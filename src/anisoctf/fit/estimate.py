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

import numpy as np
from numpy.typing import NDArray

from anisoctf.errors import FitError, InputError
from anisoctf.fit.band import Band, make_band
from anisoctf.fit.quality import (
    equiphase_radius,
    figure_of_merit,
    optics_ctf2,
    ring_statistics,
)
from anisoctf.fit.refine import RefineResult, refine_ml
from anisoctf.fit.result import CTFEstimate, FitDiagnostics, FitSettings
from anisoctf.fit.search import coarse_search
from anisoctf.optics.ctf import (
    CTFParams,
    Optics,
    chi,
    frequency_features,
    frequency_grid,
    params_from_astig,
)
from anisoctf.spectrum.periodogram import Spectrum, tile_periodogram

__all__ = ["check_image", "estimate_ctf", "fit_spectrum"]

#: the coarse search never looks beyond this resolution (Å): rings there are faint and fine
COARSE_MAX_RES = 5.0


def check_image(image: NDArray, name: str | None = None) -> None:
    """Raise :class:`InputError` for images no fit can use (empty, NaN/Inf, constant)."""
    a = np.asarray(image)
    if a.size == 0:
        raise InputError("the image is empty (0 pixels)", path=name)
    if a.ndim != 2:
        raise InputError(f"expected one 2D image, got shape {a.shape}", path=name)
    if not np.issubdtype(a.dtype, np.number) or np.iscomplexobj(a):
        raise InputError(f"image has non-real pixel type {a.dtype}", path=name)
    bad = int(a.size - np.count_nonzero(np.isfinite(a)))
    if bad:
        raise InputError(
            f"{bad} pixels are NaN or Inf; re-run motion correction or re-export the micrograph",
            path=name,
        )
    if float(np.ptp(a)) == 0.0:
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


def fit_spectrum(
    spectrum: Spectrum,
    optics: Optics,
    settings: FitSettings = FitSettings(),
    diagnostics: bool = True,
    name: str | None = None,
) -> CTFEstimate:
    """Fit the CTF to an averaged power spectrum.

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
    opt = optics.with_pixel_size(spectrum.pixel_size)
    warnings: list[str] = []
    max_res, w = _nyquist_limited(settings, spectrum.pixel_size)
    warnings += w
    k_min = 1.0 / settings.min_res
    k_max = 1.0 / max_res
    k_coarse = 1.0 / max(max_res, COARSE_MAX_RES)

    coarse_band = make_band(spectrum, opt, k_min, k_coarse)
    if coarse_band.size < 200:
        raise FitError(
            f"too few spectrum pixels between {settings.min_res} and {max(max_res, 5.0)} Å; "
            "use a larger --box or check --apix",
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
    if not search.candidates:
        raise FitError("the coarse search found no candidate", path=name)

    full_band = make_band(spectrum, opt, k_min, k_max)
    best: RefineResult | None = None
    for cand in search.candidates:
        try:
            r1 = refine_ml(
                coarse_band,
                opt,
                cand,
                n_eff=spectrum.n_eff,
                fit_phase=settings.phase_plate,
                astig_sigma=settings.astig_restraint,
                n_bg=8,
                n_env=4,
            )
            start = (r1.z, r1.a1, r1.a2, r1.phase_deg)
            r2 = refine_ml(
                full_band,
                opt,
                start,
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

    params = params_from_astig(best.z, best.a1, best.a2, best.phase_deg if settings.phase_plate else 0.0)
    grid_step = float(search.defocus_grid[1] - search.defocus_grid[0])
    if search.significance < 4.0:
        raise FitError(
            f"no Thon rings found between df-min {settings.df_min:.0f} and df-max "
            f"{settings.df_max:.0f} Å (significance {search.significance:.1f}); check the pixel "
            "size (--apix) and the defocus range",
            path=name,
        )
    if params.mean_defocus < settings.df_min - grid_step or params.mean_defocus > settings.df_max + grid_step:
        raise FitError(
            f"best defocus {params.mean_defocus:.0f} Å lies outside df-min {settings.df_min:.0f} .. "
            f"df-max {settings.df_max:.0f} Å; widen the range or check --apix",
            path=name,
        )
    edge = min(params.mean_defocus - settings.df_min, settings.df_max - params.mean_defocus)
    if edge < 2 * grid_step:
        warnings.append("defocus at the edge of the search range")

    fom = figure_of_merit(full_band.values, best.background, best.envelope * best.ctf2)
    nyq_band = make_band(spectrum, opt, k_min, 0.5 / spectrum.pixel_size)
    rings = ring_statistics(nyq_band, params, opt)
    diag = _diagnostics(spectrum, opt, params, nyq_band, rings, (k_min, k_max)) if diagnostics else None
    return CTFEstimate(
        params=params,
        optics=optics,
        figure_of_merit=fom,
        fit_resolution=rings.fit_resolution,
        n_tiles=spectrum.n_eff,
        diagnostics=diag,
        warnings=tuple(warnings),
    )


def _diagnostics(
    spectrum: Spectrum,
    optics: Optics,
    params: CTFParams,
    band: Band,
    rings,
    fit_band: tuple[float, float],
) -> FitDiagnostics:
    box = spectrum.box
    # 2D: spectrum with its local background removed and local amplitude divided out, per ring
    w = rings.window
    amp = np.maximum(rings.amplitude, 0.0)
    good = amp > 0
    amp_s = np.interp(rings.k, rings.k[good], amp[good]) if good.any() else np.ones_like(amp)
    amp_s = np.maximum(amp_s, 1e-12)
    obs = (band.values - rings.intercept[w] - rings.slope[w] * (band.rho_true - rings.rho_mean[w]))
    obs = obs / amp_s[w]
    model = optics_ctf2(band, params, optics)
    spec2d = np.zeros(box * (box // 2 + 1), dtype=np.float32)
    mod2d = np.zeros_like(spec2d)
    spec2d[band.index] = obs
    mod2d[band.index] = model
    # the kx = 0 column was halved in the band: mirror it back for display
    spec2d = spec2d.reshape(box, box // 2 + 1)
    mod2d = mod2d.reshape(box, box // 2 + 1)
    col = spec2d[:, 0].copy()
    spec2d[1:, 0] = col[1:] + col[1:][::-1]
    colm = mod2d[:, 0].copy()
    mod2d[1:, 0] = colm[1:] + colm[1:][::-1]
    # 1D equiphase profile
    keq = equiphase_radius(band, params, optics)
    nb = int(np.ceil((band.k_max - band.k_min) / (0.5 * band.pixel_step)))
    edges = np.linspace(band.k_min, band.k_max, nb + 1)
    i = np.clip(np.searchsorted(edges, keq) - 1, 0, nb - 1)
    cnt = np.bincount(i, minlength=nb)
    prof = np.bincount(i, weights=obs, minlength=nb) / np.maximum(cnt, 1)
    kc = 0.5 * (edges[1:] + edges[:-1])
    feats = frequency_features(kc, np.zeros_like(kc))
    x = chi(feats, CTFParams(params.mean_defocus, params.mean_defocus, 0.0, params.phase_shift_deg), optics)
    wc = optics.amplitude_contrast
    fit1d = (-np.sqrt(1 - wc * wc) * np.sin(x) - wc * np.cos(x)) ** 2
    order = np.argsort(rings.k)
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
    settings: FitSettings = FitSettings(),
    diagnostics: bool = True,
    workers: int = 1,
    name: str | None = None,
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
        Box, resolution band, defocus range, phase plate, astigmatism restraint.
    diagnostics
        Also return the arrays for the diagnostic picture.
    workers
        Threads for the FFTs.
    name
        File name for error messages.

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
    check_image(image, name)
    try:
        spectrum = tile_periodogram(
            image,
            optics.pixel_size,
            box=settings.box,
            overlap=settings.overlap,
            fit_pixel_size=settings.fit_pixel_size,
            workers=workers,
        )
    except InputError as e:
        raise InputError(str(e), path=name) from None
    return fit_spectrum(spectrum, optics, settings, diagnostics=diagnostics, name=name)
