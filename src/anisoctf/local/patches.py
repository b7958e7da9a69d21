"""The patches of a micrograph: their defocus from the tiles, and the robust surface.

Each of the N×M overlapping patches takes the summed score curves of its tiles, each shifted by
the plane's change of defocus between tile and patch centre, and finds its defocus and standard
error at the peak (:func:`patch_estimates`); patches without significant rings are flagged.
:func:`robust_surface` then flags patches inconsistent with the plane (robust scale, 1.4826 ×
median: Rousseeuw & Croux, J. Am. Stat. Assoc. 88, 1273 (1993)) and keeps a residual spline
only when it explains the patches significantly better (an AIC-like gain against the effective
number of parameters; Akaike, IEEE Trans. Autom. Control 19, 716 (1974)).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from anisoctf.local.band import MIN_PEAK_SCORE
from anisoctf.local.plane import interp_rows, peak
from anisoctf.local.surface import fit_residual_spline
from anisoctf.records.local import DefocusSurface, LocalSettings, PatchEstimate
from anisoctf.spectrum.tiles import TileSpectra

__all__ = ["patch_centres", "patch_estimates", "robust_surface"]


def patch_centres(shape: tuple[int, int], patches: tuple[int, int]) -> tuple[NDArray, NDArray]:
    ny, nx = shape
    npx, npy = patches
    px = (np.arange(npx) + 1.0) * nx / (npx + 1.0)
    py = (np.arange(npy) + 1.0) * ny / (npy + 1.0)
    gy, gx = np.meshgrid(py, px, indexing="ij")
    return gx.ravel(), gy.ravel()


def patch_estimates(
    tiles: TileSpectra,
    plane: NDArray,
    curves: NDArray,
    offsets: NDArray,
    z_ref: NDArray,
    grid_shape: tuple[int, int],
    apix: float,
) -> list[PatchEstimate]:
    """Defocus of every patch of a ``grid_shape = (nx, ny)`` grid (row-major: y outer).

    Parameters
    ----------
    tiles
        The tile spectra (centres in micrograph pixels).
    plane
        ``(d0, gx, gy)``: defocus at the image centre (Å) and gradient (Å per Å).
    curves, offsets
        Each tile's (weighted) score curve over ``offsets`` from its reference defocus.
    z_ref
        Each tile's reference defocus (Å).
    grid_shape
        Patches along x and y; neighbours overlap by half.
    apix
        Micrograph pixel size (Å).
    """
    ny, nx = tiles.image_shape
    cx, cy = 0.5 * nx, 0.5 * ny
    pxs, pys = patch_centres(tiles.image_shape, grid_shape)
    half_x = nx / (grid_shape[0] + 1.0)
    half_y = ny / (grid_shape[1] + 1.0)
    tx, ty = tiles.centres[:, 0], tiles.centres[:, 1]
    patch_list: list[PatchEstimate] = []
    grid = offsets
    for qx, qy in zip(pxs, pys, strict=True):
        member = (np.abs(tx - qx) <= half_x) & (np.abs(ty - qy) <= half_y)
        if not member.any():
            member = np.zeros(tiles.n_tiles, dtype=bool)
            member[int(np.argmin(np.hypot(tx - qx, ty - qy)))] = True
        idx = np.flatnonzero(member)
        d_plane = plane[0] + plane[1] * (qx - cx) * apix + plane[2] * (qy - cy) * apix
        # tile t at patch defocus d_plane + δ has offset (d_plane + δ + ramp) − z_ref_t
        ramp = plane[1] * (tx[idx] - qx) * apix + plane[2] * (ty[idx] - qy) * apix
        q = d_plane + grid[:, None] + ramp[None, :] - z_ref[idx][None, :]
        total = interp_rows(curves[idx], offsets, q).sum(axis=1)
        pos, sd, top = peak(total, grid)
        has_rings = top - float(np.median(total)) > MIN_PEAK_SCORE and np.isfinite(sd)
        patch_list.append(
            PatchEstimate(
                x=float(qx),
                y=float(qy),
                defocus=float(d_plane + pos) if has_rings else float("nan"),
                sigma=float(sd) if has_rings else float("inf"),
                n_tiles=int(idx.size),
                score=float(top),
                outlier=not has_rings,
            )
        )
    return patch_list


def robust_surface(
    plane: DefocusSurface, patches: list[PatchEstimate], local: LocalSettings
) -> tuple[DefocusSurface, list[PatchEstimate]]:
    """Flag inconsistent patches and add a residual spline where the patches demand one."""
    ok = np.array([not pp.outlier for pp in patches])
    if ok.sum() == 0:
        return plane, patches
    x = np.array([pp.x for pp in patches])
    y = np.array([pp.y for pp in patches])
    d = np.array([pp.defocus for pp in patches])
    sd = np.array([pp.sigma for pp in patches])
    # model error floor: the patches are not points, the specimen not a perfect plane
    s = np.sqrt(np.where(ok, sd, 1.0) ** 2 + 10.0**2)
    resid = np.where(ok, d - plane.plane(x, y), 0.0)
    fit = np.zeros_like(resid)
    coef = np.zeros((0, 0))
    npx, npy = local.patches
    ncoef = (min(max(npy - 1, 0), 4), min(max(npx - 1, 0), 4))
    use_spline = local.spline and min(ncoef) >= 4 and ok.sum() >= 9
    good = ok.copy()
    for _ in range(4):
        if use_spline and good.sum() >= 9:
            c, gain, edf = fit_residual_spline(
                x[good], y[good], resid[good], s[good], plane.shape, ncoef
            )
            if gain > 2.0 * edf + 10.0:  # AIC-like: keep only a residual the data support
                coef = c
            else:
                coef = np.zeros((0, 0))
        cand = DefocusSurface(plane.shape, plane.d0, plane.gx, plane.gy, coef)
        fit = cand.residual(x, y)
        z = np.abs(resid - fit) / s
        # robust scale of the standardised residuals (at least 1: the errors are honest)
        scale = max(1.0, 1.4826 * float(np.median(z[good]))) if good.any() else 1.0
        new_good = ok & (z <= 4.0 * scale) | (ok & (np.abs(resid - fit) < 60.0))
        if np.array_equal(new_good, good):
            break
        good = new_good
    surf = DefocusSurface(plane.shape, plane.d0, plane.gx, plane.gy, coef)
    out = [
        PatchEstimate(pp.x, pp.y, pp.defocus, pp.sigma, pp.n_tiles, pp.score, not bool(g))
        for pp, g in zip(patches, good, strict=True)
    ]
    return surf, out
