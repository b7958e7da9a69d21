"""Local defocus of one micrograph: specimen tilt, patch defocus, the surface and thickness.

The micrograph's global fit (:func:`anisoctf.fit.estimate_ctf`) comes first and is never
changed here: its astigmatism and phase shift are shared by every region, and a region that
fails cannot spoil it. Then:

1. each tile of a grid (``box`` pixels, side by side) gets its periodogram and its 1D
   equiphase profile (:mod:`.profiles`), scored against a grid of defocus offsets;
2. the **plane** ``D = d0 + g·(r − centre)`` maximises the summed tile scores: an exhaustive
   search over the gradient disc (up to ``max_tilt``), then a continuous refinement;
3. the profiles are rebuilt around the plane (each tile's own reference defocus, the blur of
   the ramp across a tile in the model) and the plane is refined again;
4. each of the N×M overlapping **patches** takes the summed scores of its tiles, each shifted
   by the plane's change between tile and patch centre, and finds its defocus and standard
   error; patches without significant rings (carbon, contamination, empty) are flagged;
5. a smooth **residual** spline through the patches' departures from the plane is kept when it
   explains them significantly better (robust weights; outlier patches get zero weight);
6. optionally the **sample thickness**: the rings' oscillation is damped by
   ``sinc(λ k² t)`` (a uniform slab of thickness ``t``); the thickness maximises the summed
   tile scores with every tile at its surface defocus.

Everything is in the true frame when the optics carry a magnification matrix.

The steps live in their own modules: the band in :mod:`.band`, the plane search and refinement
in :mod:`.plane`, the patches and the robust surface in :mod:`.patches`, the thickness in
:mod:`.thickness`; the records (:class:`LocalSettings`, :class:`PatchEstimate`,
:class:`LocalEstimate`) in :mod:`anisoctf.records.local`. This module runs them in order.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from anisoctf.errors import FitError
from anisoctf.fit.result import CTFEstimate, FitSettings
from anisoctf.local.band import (
    LOCAL_RES,
    MIN_PEAK_SCORE,
    PASS1_RES,
    k_pass2,
    k_rings,
    k_window,
    local_band,
)
from anisoctf.local.patches import patch_estimates, robust_surface
from anisoctf.local.plane import (
    consensus_outliers,
    refine_plane,
    robust_tile_weights,
    search_plane,
    tilt_standard_error,
    vote_caps,
)
from anisoctf.local.profiles import score_curves, tile_profiles
from anisoctf.local.thickness import fit_thickness
from anisoctf.local.tilt import tilt_from_gradient
from anisoctf.optics.ctf import CTFParams, Optics
from anisoctf.records.local import DefocusSurface, LocalEstimate, LocalSettings, PatchEstimate
from anisoctf.spectrum.tiles import TileSpectra, tile_spectra

__all__ = [
    "LOCAL_RES",
    "MIN_PEAK_SCORE",
    "PASS1_RES",
    "LocalEstimate",
    "LocalSettings",
    "PatchEstimate",
    "estimate_local",
    "fit_local",
]


def _first_plane(
    tiles: TileSpectra,
    opt: Optics,
    p: CTFParams,
    band: tuple[float, float],
    xs: NDArray,
    ys: NDArray,
    max_grad: float,
    apix: float,
    name: str | None,
) -> tuple[NDArray, NDArray]:
    """Pass 1: the plane with every tile referred to the global defocus, in a lower band
    (coarser defocus steps over the wide range the tilt allows). Returns the plane
    ``(d0, gx, gy)`` and each tile's vote factor (cap × consensus)."""
    k_min, k_max = band
    lam = opt.wavelength
    z_glob = p.mean_defocus
    w = tiles.weights
    k_max1 = max(min(k_max, 1.0 / PASS1_RES), min(2.0 * k_min, k_max))
    h1 = 0.125 / (np.pi * lam * k_max1 * k_max1)
    reach = max_grad * float(np.max(np.hypot(xs, ys))) + 6.0 * 2.0 * h1 + 200.0
    reach = min(reach, 0.9 * z_glob)
    offsets = np.arange(-np.ceil(reach / h1), np.ceil(reach / h1) + 1) * h1
    z_ref = np.full(tiles.n_tiles, z_glob)
    prof = tile_profiles(tiles, opt, p, z_ref, k_min, k_max1, apix, row_stride=2)
    curves = score_curves(prof, opt, offsets, p.phase_shift_deg) * w[:, None]
    peaks = curves.max(axis=1) - np.median(curves, axis=1)
    if not np.any(peaks > MIN_PEAK_SCORE):
        raise FitError("no tile of the micrograph shows Thon rings on its own", path=name)
    # votes, not just evidence: a tile's weight is capped at twice the typical tile's, so a
    # region with much stronger rings (carbon at another height) cannot carry the plane alone
    cap = vote_caps(peaks)
    curves = curves * cap[:, None]
    plane = search_plane(curves, offsets, z_ref, xs, ys, z_glob, max_grad)
    plane = refine_plane(curves, offsets, z_ref, xs, ys, plane)
    # consensus: the plane through the most tiles' own peaks (RANSAC over tile triples); tiles
    # outside it (carbon at another height, contamination) are faded out and the plane searched
    # again, so that a minority with strong rings cannot tilt it
    outside = consensus_outliers(curves, offsets, z_ref, xs, ys, h1)
    if outside is not None and outside.any():
        keep = np.where(outside, 0.02, 1.0)
        plane = search_plane(curves * keep[:, None], offsets, z_ref, xs, ys, z_glob, max_grad)
        plane = refine_plane(curves * keep[:, None], offsets, z_ref, xs, ys, plane)
        cap = cap * keep
    return plane, cap


def _final_plane(
    tiles: TileSpectra,
    opt: Optics,
    p: CTFParams,
    band: tuple[float, float],
    plane: NDArray,
    cap: NDArray,
    xs: NDArray,
    ys: NDArray,
    apix: float,
) -> tuple[NDArray, NDArray, NDArray, NDArray]:
    """Pass 2: profiles around the plane, with the ramp's blur across each tile in the model,
    over ``band`` (which ends where the global fit lost the rings, unless the tilt itself
    blurred them there: :func:`~anisoctf.local.band.k_pass2`).

    Returns the refined plane, each tile's reference defocus, the weighted score curves and
    their offsets.
    """
    k_min, k_max = band
    lam = opt.wavelength
    h = 0.125 / (np.pi * lam * k_max * k_max)  # ≤ 1/8 rad of phase per step at the band edge
    z_ref = plane[0] + plane[1] * xs + plane[2] * ys
    side = tiles.tile * apix * 0.9  # the taper shortens the tile a little
    spreads = np.stack(
        [np.full_like(xs, abs(plane[1]) * side), np.full_like(xs, abs(plane[2]) * side)], axis=1
    )
    prof = tile_profiles(tiles, opt, p, z_ref, k_min, k_max, apix)
    n2 = int(np.ceil(max(600.0, 12.0 * h) / h))
    offsets2 = np.arange(-n2, n2 + 1) * h
    curves2 = score_curves(prof, opt, offsets2, p.phase_shift_deg, spreads=spreads)
    # robust final plane (IRLS): tiles whose own peak disagrees with the plane (carbon at
    # another height, contamination, a tile half on each) lose their vote by Tukey's biweight
    # of the disagreement in units of the peak's own standard error, and the plane is refined
    # again until the weights settle
    w0 = tiles.weights * np.minimum(cap, 1.0)
    wt = w0
    for it in range(5):
        plane = refine_plane(curves2 * wt[:, None], offsets2, z_ref, xs, ys, plane)
        new = w0 * robust_tile_weights(curves2, offsets2, z_ref, xs, ys, plane)
        if it == 4 or np.allclose(new, wt, atol=0.02):
            break
        wt = new
    return plane, z_ref, curves2 * wt[:, None], offsets2


def fit_local(
    tiles: TileSpectra,
    optics: Optics,
    glob: CTFEstimate,
    settings: FitSettings | None = None,
    local: LocalSettings | None = None,
    name: str | None = None,
    thickness_tiles: TileSpectra | None = None,
) -> LocalEstimate:
    """Fit the defocus plane, the patches, the surface (and the thickness) from tile spectra.

    Parameters
    ----------
    tiles
        Per-tile periodograms of the micrograph (:func:`anisoctf.spectrum.tiles.tile_spectra`).
    optics
        Optics of the micrograph (pixel size of the micrograph).
    glob
        The micrograph's global CTF estimate (astigmatism and phase are shared).
    settings
        The fit settings of the global estimate (resolution band).
    local
        Patch grid and options.
    name
        File name for messages.
    thickness_tiles
        Tiles for the thickness (larger ones sample finer rings); default ``tiles``.
    """
    settings = settings or FitSettings()
    local = local or LocalSettings()
    opt = optics.with_pixel_size(tiles.pixel_size)
    p = glob.params
    phase = p.phase_shift_deg
    k_min, k_max = local_band(settings, glob, tiles, opt)
    apix = optics.pixel_size  # micrograph pixels
    ny, nx = tiles.image_shape
    cx, cy = 0.5 * nx, 0.5 * ny
    xs = (tiles.centres[:, 0] - cx) * apix  # Å from the centre (observed frame)
    ys = (tiles.centres[:, 1] - cy) * apix
    warnings: list[str] = []
    max_grad = float(np.tan(np.deg2rad(local.max_tilt_deg)))

    plane, cap = _first_plane(tiles, opt, p, (k_min, k_max), xs, ys, max_grad, apix, name)
    k_max = min(k_max, k_pass2(glob, plane, xs, ys, opt.wavelength))
    plane, z_ref, curves2, offsets2 = _final_plane(
        tiles, opt, p, (k_min, k_max), plane, cap, xs, ys, apix
    )
    # uncertainty of the gradient: curvature of the summed score around the optimum
    tilt_sigma = tilt_standard_error(curves2, offsets2, z_ref, xs, ys, plane)

    patch_list = patch_estimates(tiles, plane, curves2, offsets2, z_ref, local.patches, apix)
    gx_pix, gy_pix = plane[1] * apix, plane[2] * apix
    surface = DefocusSurface(shape=(ny, nx), d0=float(plane[0]), gx=float(gx_pix), gy=float(gy_pix))
    surface, patch_list = robust_surface(surface, patch_list, local)
    n_out = sum(pp.outlier for pp in patch_list)
    if n_out:
        warnings.append(f"{n_out} of {len(patch_list)} patches left out of the surface")

    tilt, axis = tilt_from_gradient(gx_pix, gy_pix, apix, optics.M if optics.has_anisomag else None)

    thickness = None
    thickness_sigma = float("inf")
    if local.thickness:
        th_tiles = thickness_tiles or tiles
        thickness, thickness_sigma, more = fit_thickness(
            th_tiles,
            optics.with_pixel_size(th_tiles.pixel_size),
            p,
            settings,
            local,
            surface,
            apix,
            glob.fit_resolution,
        )
        warnings += more

    return LocalEstimate(
        surface=surface,
        tilt_angle=float(tilt),
        tilt_axis=float(axis),
        tilt_sigma=float(tilt_sigma),
        patches=tuple(patch_list),
        thickness=thickness,
        thickness_sigma=float(thickness_sigma),
        astigmatism=float(p.astigmatism),
        angle_deg=float(p.angle_deg),
        phase_shift_deg=float(phase),
        n_tiles=tiles.n_tiles,
        tile=tiles.tile,
        warnings=tuple(warnings),
    )


def _tiles_for_band(
    image: NDArray,
    optics: Optics,
    glob: CTFEstimate,
    settings: FitSettings,
    box: int,
    workers: int,
) -> TileSpectra:
    """The tile periodograms, from the micrograph binned 2×2 when the local band ends well
    below the binned Nyquist frequency (a quarter of the FFT work, the same tiles in Å).

    Binning by block means folds frequencies above the new Nyquist back into the band, damped
    by the block filter (to a third or less of their power at 0.3 cycles/pixel, where the CTF
    envelope has faded too); the margin kept below the new Nyquist keeps that off the band.
    """
    apix = optics.pixel_size
    ny, nx = np.shape(image)
    if settings.fit_pixel_size is None and box >= 256:
        extent = box * apix
        z = max(glob.params.defocus_u, 1000.0)
        k_sample = k_window(optics, z, extent)
        k_max = min(1.0 / settings.max_res, k_sample, k_rings(glob))
        if k_max <= 0.8 * 0.25 / apix:
            a = np.asarray(image)
            h, w = ny // 2, nx // 2
            binned = a[: 2 * h, : 2 * w].reshape(h, 2, w, 2).mean(axis=(1, 3), dtype=np.float32)
            t = tile_spectra(binned, 2.0 * apix, box=box // 2, workers=workers)
            return TileSpectra(
                power=t.power,
                centres=2.0 * t.centres + 0.5,
                pixel_size=t.pixel_size,
                tile=2 * t.tile,
                image_shape=(int(ny), int(nx)),
                weights=t.weights,
            )
    return tile_spectra(
        image, apix, box=box, fit_pixel_size=settings.fit_pixel_size, workers=workers
    )


def estimate_local(
    image: NDArray,
    optics: Optics,
    glob: CTFEstimate,
    settings: FitSettings | None = None,
    local: LocalSettings | None = None,
    workers: int = 1,
    name: str | None = None,
) -> LocalEstimate:
    """Local defocus of a micrograph whose global CTF ``glob`` is known.

    Parameters
    ----------
    image
        The micrograph (rows = y, columns = x).
    optics
        Its optics (pixel size of ``image``; magnification matrix for the true frame).
    glob
        Its global estimate (from :func:`anisoctf.fit.estimate_ctf`).
    settings
        Fit settings of the global estimate (band, fit pixel size).
    local
        Patch grid and options (``LocalSettings()`` if None).
    workers
        Threads for the FFTs.
    name
        File name for messages.

    Returns
    -------
    LocalEstimate
    """
    settings = settings or FitSettings()
    local = local or LocalSettings()
    ny, nx = np.shape(image)
    box = local.box
    while box > 128 and min(ny, nx) < 2 * box:  # at least 2×2 tiles
        box //= 2
    tiles = _tiles_for_band(image, optics, glob, settings, box, workers)
    if tiles.n_tiles < 4:
        raise FitError(
            f"image of {nx}x{ny} px is too small for local defocus (needs 2x2 tiles of {box} px)",
            path=name,
        )
    th_tiles = None
    if local.thickness and min(ny, nx) >= 4 * box:  # larger tiles sample finer rings
        th_tiles = tile_spectra(
            image,
            optics.pixel_size,
            box=2 * box,
            fit_pixel_size=settings.fit_pixel_size,
            workers=workers,
        )
    return fit_local(tiles, optics, glob, settings, local, name, thickness_tiles=th_tiles)
