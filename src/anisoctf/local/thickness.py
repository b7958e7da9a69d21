"""Sample thickness from the damping of the rings by ``sinc(λ k² t)``.

A uniform slab of thickness ``t`` spreads the defocus over ``t``; averaging the CTF's
oscillation over it damps the ring modulation by ``sinc(λ k² t)``
(:func:`anisoctf.local.profiles.modulation`; the thickness estimate of CTFFIND5, Elferich et
al., eLife 13, RP97227 (2024)). The thickness maximises the summed tile scores with every tile
at its surface defocus; the envelope is profiled out so that a smooth fading of the rings does
not read as thickness.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from anisoctf.fit.result import FitSettings
from anisoctf.fit.search import profile_scores
from anisoctf.local.plane import peak
from anisoctf.local.profiles import TileProfiles, _ctf2, modulation, tile_profiles
from anisoctf.optics.ctf import Optics
from anisoctf.records.flags import thickness_at_limit_flag
from anisoctf.records.local import DefocusSurface, LocalSettings
from anisoctf.spectrum.tiles import TileSpectra

__all__ = ["fit_thickness", "thickness_curve"]


def thickness_curve(
    prof: TileProfiles,
    optics: Optics,
    offsets: NDArray,
    thick: NDArray,
    phase_deg: float,
    spreads: NDArray,
    weights: NDArray,
    decay: NDArray | None = None,
) -> NDArray:
    """Summed tile score against the sample thickness (each tile at its surface defocus).

    The envelope of the rings is ``(c0 + c1 k) · exp(−b k²)`` with ``c0, c1`` free per tile
    and the Gaussian decay ``b`` (a B-factor, the detector) shared by all tiles and profiled
    out: a smooth fading of the rings must not read as thickness, while the nodes of
    ``sinc(λ k² t)`` and the contrast reversal beyond them can only come from thickness.
    """
    decay = (
        np.concatenate([np.arange(0.0, 100.0, 10.0), np.arange(100.0, 401.0, 25.0)])
        if decay is None
        else decay
    )
    total = np.zeros((thick.size, decay.size))
    for t in range(prof.y.shape[0]):
        ok = prof.n[t] > 0
        if ok.sum() < 16 or weights[t] <= 0:
            continue
        k2 = prof.k2[t]
        rows = np.empty((thick.size, k2.size))
        for i, th in enumerate(thick):
            mod = modulation(k2, optics, float(th), (spreads[t, 0], spreads[t, 1]))
            rows[i] = _ctf2(prof, t, np.array([offsets[t]]), optics, phase_deg, mod)[0]
        damp = np.exp(-decay[:, None] * k2[None, :])  # (n_b, n_bins)
        c2 = (rows[:, None, :] * damp[None, :, :]).reshape(-1, k2.size)
        total += weights[t] * profile_scores(
            np.sqrt(k2), prof.y[t], prof.n[t], c2, prof.k_min, prof.k_max
        ).reshape(thick.size, decay.size)
    return total.max(axis=1)


def fit_thickness(
    tiles: TileSpectra,
    opt: Optics,
    p,
    settings: FitSettings,
    local: LocalSettings,
    surface: DefocusSurface,
    apix: float,
    fit_resolution: float = float("nan"),
) -> tuple[float, float, list[str]]:
    """Sample thickness (Å), its standard error and remarks.

    A thickness at the end of the search range (``local.max_thickness``) is no estimate: it
    comes back as NaN with an infinite error and a flag
    (:func:`anisoctf.records.flags.thickness_at_limit_flag`); no sign of thickness is 0 with
    an infinite error.

    ``tiles`` may be larger than those of the defocus fit: the band reaches as far as a tile
    can sample the rings, beyond the global fit resolution (past the first node of a thick
    sample the rings come back with reversed contrast), and a larger tile samples finer rings.
    Each tile sits at its surface defocus, with the ramp across it in the model.
    """
    warnings: list[str] = []
    lam = opt.wavelength
    z = max(p.defocus_u, 1000.0)
    step_k = 1.0 / (tiles.box * tiles.pixel_size)
    k_min = 1.0 / settings.min_res
    k_max = min(
        1.0 / settings.max_res, 1.0 / (2.0 * lam * z * 3.0 * step_k), 0.5 / tiles.pixel_size
    )
    if np.isfinite(fit_resolution) and fit_resolution > 0:
        # beyond the rings the global fit saw (plus room for the lobe after a node) there is
        # only noise, which a thick-sample model would "explain" by switching the rings off
        k_max = min(k_max, 2.0 / fit_resolution)
    tx, ty = tiles.centres[:, 0], tiles.centres[:, 1]
    z_ref = surface(tx, ty)
    prof = tile_profiles(tiles, opt, p, z_ref, k_min, k_max, apix, exact_window=True)
    side = tiles.tile * 0.9  # pixels (the taper shortens the tile a little)
    spreads = np.stack(
        [
            np.full(tiles.n_tiles, abs(surface.gx) * side),
            np.full(tiles.n_tiles, abs(surface.gy) * side),
        ],
        axis=1,
    )
    # nodes of sinc(λ k² t) move by a ring or so across the band per step
    step = max(10.0, 0.05 / (lam * k_max * k_max))
    thick = np.arange(0.0, local.max_thickness + step, step)
    curve = thickness_curve(
        prof, opt, np.zeros(tiles.n_tiles), thick, p.phase_shift_deg, spreads, tiles.weights
    )
    i = int(np.argmax(curve))
    pos, sd, top = peak(curve, thick)
    gain = float(top - curve[0])
    # thinnest sample whose first ring node (k² = 1/(λt)) lies well inside the band
    t_limit = 1.0 / (lam * (0.7 * k_max) ** 2)
    if i == 0 or gain < 25.0:
        warnings.append(
            f"no sign of sample thickness (detectable from about {t_limit:.0f} Å, when the "
            f"first ring node lies inside {1 / k_max:.1f} Å)"
        )
        return 0.0, float("inf"), warnings
    thickness = float(max(pos, 0.0))
    if thickness >= local.max_thickness - step:
        # the best thickness is where the search ends: the rings do not bound it, and the
        # number says only "at least this thick"; it is no estimate and is not reported
        warnings.append(thickness_at_limit_flag(local.max_thickness))
        return float("nan"), float("inf"), warnings
    if thickness < t_limit:
        warnings.append(
            f"thickness {thickness:.0f} Å is below what the rings show reliably "
            f"(~{t_limit:.0f} Å); treat it as an upper bound"
        )
    return thickness, float(sd), warnings
