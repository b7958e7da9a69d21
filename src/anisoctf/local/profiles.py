"""Equiphase profiles of tile periodograms and their defocus score curves.

With the micrograph's astigmatism known (it is shared by all regions), each tile's 2D
periodogram collapses into a 1D profile without blurring its rings: pixels are binned by the
*defocus-normalised squared frequency*

    u = k² + (a1·c2 + a2·s2) / z_ref,

so that the defocus term of the CTF phase is ``π λ z_ref u`` for every pixel of a bin (with
``k² = |k_true|²``, ``c2 = kx² − ky²``, ``s2 = 2 kx ky`` in the true frame and ``(a1, a2)`` the
Cartesian astigmatism). A tile whose defocus is ``z_ref + δ`` has phase
``π λ (z_ref u + δ k²) − π/2 Cs λ³ k⁴``; each bin keeps the means of ``u``, ``k²`` and ``k⁴``,
which is exact to first order (the phase is linear in them). ``z_ref`` is the tile's best guess
(the micrograph's defocus, then the fitted plane), so ``δ`` stays small.

A tile is short, so its periodogram sees each Thon ring through the tile's window: the
oscillation of CTF² at frequency ``k`` is the interference of image points ``τ = ∇(2χ)/2π =
2λ(D k − Cs λ² |k|² k)`` apart (the delocalisation of the CTF), and the window keeps only the
fraction ``R(τ)/R(0)`` of such pairs, ``R`` being the window's autocorrelation. Each bin keeps
the mean of that factor, and the CTF² model multiplies its oscillating part by it: without it,
the faster-than-expected fading of fine rings in small tiles would read as sample thickness.

Each profile is scored against the CTF² of a grid of defocus offsets by variable projection
(:func:`anisoctf.fit.search.profile_scores`): the drop of the noise-weighted residual when a
smooth background plus a smooth envelope times CTF² replaces the background alone. For an
exponential periodogram this is a log-likelihood ratio (×2), so the curves of independent tiles
add, and the curvature at a peak gives the variance of the defocus.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from anisoctf.fit.band import radial_basis
from anisoctf.optics.ctf import CTFParams, Optics, frequency_features
from anisoctf.optics.kernel import chi_from_form_rad, ctf2_from_chi, ctf_constants
from anisoctf.spectrum.tiles import TileSpectra

__all__ = [
    "TileProfiles",
    "batch_profile_scores",
    "modulation",
    "score_curves",
    "tile_profiles",
    "window_autocorrelation",
]

#: CTF phase width (rad) of one profile bin
BIN_PHASE = 0.3


@dataclass(frozen=True)
class TileProfiles:
    """1D equiphase profiles, one row per tile (bins beyond a tile's range have ``n = 0``).

    Attributes
    ----------
    y
        Mean power of each bin.
    n
        Number of periodogram pixels in each bin.
    u, k2, k4
        Means of ``u`` (see the module docstring), ``|k_true|²`` and ``|k_true|⁴`` (Å⁻², Å⁻⁴).
    window
        Mean attenuation of the ring oscillation by the tile window in each bin (0–1).
    z_ref
        Reference defocus of each tile (Å).
    k_min, k_max
        Band (Å⁻¹, true frame).
    """

    y: NDArray[np.float64]
    n: NDArray[np.float64]
    u: NDArray[np.float64]
    k2: NDArray[np.float64]
    k4: NDArray[np.float64]
    window: NDArray[np.float64]
    z_ref: NDArray[np.float64]
    k_min: float
    k_max: float


def tile_profiles(
    tiles: TileSpectra,
    optics: Optics,
    params: CTFParams,
    z_ref: NDArray[np.float64],
    k_min: float,
    k_max: float,
    pixel_size: float | None = None,
    exact_window: bool = False,
    row_stride: int = 1,
) -> TileProfiles:
    """Bin every tile's periodogram into its equiphase profile.

    Parameters
    ----------
    tiles
        The tile periodograms.
    optics
        Optics of the micrograph (its magnification matrix defines the true frame).
    params
        The micrograph's CTF: its astigmatism (``astig_components``) is used.
    z_ref
        Reference defocus of each tile (Å), shape ``(n_tiles,)``.
    k_min, k_max
        Band in Å⁻¹ (true frame).
    pixel_size
        Å per pixel of the micrograph (the tiles' real-space pixels); default the spectra's.
    exact_window
        Compute the window attenuation at each tile's own reference defocus (else at their
        median: cheaper, and the factor changes by only a few % across a tilted micrograph).
    row_stride
        Use every ``row_stride``-th row of the periodograms only.
    """
    pixel_size = float(pixel_size or tiles.pixel_size)
    box = tiles.box
    ky = np.fft.fftfreq(box, d=tiles.pixel_size)[:, None]
    kx = np.fft.rfftfreq(box, d=tiles.pixel_size)[None, :]
    mag = optics.M if optics.has_anisomag else np.eye(2)
    f = frequency_features(kx, ky, mag)
    inside = (f.k2 >= k_min * k_min) & (f.k2 <= k_max * k_max)
    inside &= (kx > 0) | (ky > 0)  # the kx = 0 column holds each frequency twice
    if row_stride > 1:  # every row_stride-th row only (a cheaper, coarser first look)
        inside &= (np.arange(box) % row_stride == 0)[:, None]
    sel = np.flatnonzero(inside.ravel())
    k2 = f.k2.ravel()[sel]
    a1, a2 = params.astig_components
    astig = (a1 * f.c2 + a2 * f.s2).ravel()[sel]
    kxo, kyo = np.broadcast_arrays(kx, ky)
    kxo, kyo = kxo.ravel()[sel], kyo.ravel()[sel]
    ktx = mag[0, 0] * kxo + mag[0, 1] * kyo  # true-frame frequency of each pixel
    kty = mag[1, 0] * kxo + mag[1, 1] * kyo
    z_ref = np.asarray(z_ref, dtype=np.float64)
    zr = np.maximum(np.abs(z_ref), 1000.0)
    nt = tiles.n_tiles
    # bins of equal phase width in u for each tile's own reference defocus
    du = BIN_PHASE / (np.pi * optics.wavelength * zr)  # (nt,)
    u = k2[None, :] + astig[None, :] / zr[:, None]  # (nt, npix)
    u0 = u.min(axis=1)
    idx = ((u - u0[:, None]) / du[:, None]).astype(np.int64)
    nb = int(idx.max()) + 1
    flat = (idx + (np.arange(nt) * nb)[:, None]).ravel()
    vals = tiles.power.reshape(nt, -1)[:, sel].astype(np.float64).ravel()
    size = nt * nb

    def sums(w: NDArray | None) -> NDArray:
        return np.bincount(flat, weights=w, minlength=size).reshape(nt, nb)

    n = sums(None)
    safe = np.maximum(n, 1.0)
    y = sums(vals) / safe
    um = sums(u.ravel()) / safe
    k2m = sums(np.broadcast_to(k2, (nt, k2.size)).ravel()) / safe
    # within a bin k² varies by a fraction ~|a|/z, so mean(k⁴) = mean(k²)² to that squared
    k4m = k2m * k2m
    # delocalisation lag of each pixel's ring oscillation (true frame, then image frame, px),
    # at each tile's reference defocus (exact_window) or at their median (a few % apart)
    lam = optics.wavelength
    zw = z_ref[:, None] if exact_window else np.array([[float(np.median(z_ref))]])
    cterm = optics.cs_angstrom * lam * lam * k2
    tx = 2.0 * lam * ((zw + a1) * ktx + a2 * kty - cterm * ktx)
    ty = 2.0 * lam * (a2 * ktx + (zw - a1) * kty - cterm * kty)
    ox = (mag[0, 0] * tx + mag[1, 0] * ty) / pixel_size
    oy = (mag[0, 1] * tx + mag[1, 1] * ty) / pixel_size
    auto = window_autocorrelation(tiles.tile)
    lags = np.arange(auto.size, dtype=np.float64)
    att = np.interp(np.abs(ox), lags, auto, right=0.0) * np.interp(
        np.abs(oy), lags, auto, right=0.0
    )
    att = np.broadcast_to(att, (nt, k2.size))
    win = sums(att.ravel()) / safe
    return TileProfiles(
        y=y,
        n=n,
        u=um,
        k2=k2m,
        k4=k4m,
        window=win,
        z_ref=z_ref.copy(),
        k_min=k_min,
        k_max=k_max,
    )


def window_autocorrelation(tile: int, edge: float = 0.1) -> NDArray[np.float64]:
    """Normalised autocorrelation ``R(j)/R(0)`` (j = 0..tile−1 pixels) of the 1D taper of
    :func:`anisoctf.spectrum.periodogram.taper_window`."""
    m = max(1, int(round(edge * tile)))
    w = np.ones(tile)
    ramp = 0.5 - 0.5 * np.cos(np.pi * (np.arange(m) + 0.5) / m)
    w[:m] = ramp
    w[tile - m :] = ramp[::-1]
    r = np.correlate(w, w, mode="full")[tile - 1 :]
    return r / r[0]


def modulation(
    k2: NDArray, optics: Optics, thickness: float = 0.0, spread: tuple[float, float] = (0.0, 0.0)
) -> NDArray:
    """Factor on the oscillating part of CTF² from a spread of defocus within a region.

    A specimen slab of ``thickness`` Å (defocus uniform over ±thickness/2) and a linear defocus
    ramp across a square tile (uniform spreads of ``spread = (|gx| L, |gy| L)`` Å along the
    tile's two sides) average ``cos 2χ`` over independent uniform offsets; the average is the
    product of their characteristic functions, ``sinc(λ k² w)`` for a width ``w``
    (``numpy.sinc(x) = sin(πx)/(πx)``).
    """
    lam = optics.wavelength
    out = np.sinc(lam * k2 * thickness) if thickness else np.ones_like(k2)
    for w in spread:
        if w:
            out = out * np.sinc(lam * k2 * w)
    return out


def _ctf2(
    prof: TileProfiles,
    t: int,
    offsets: NDArray,
    optics: Optics,
    phase_deg: float,
    mod: NDArray,
) -> NDArray:
    """CTF² (candidates × bins) of tile ``t`` for defocus ``z_ref + offsets``."""
    consts = ctf_constants(optics)
    # k^T D k of each candidate: the tile's reference form plus the offset's isotropic part
    form = prof.z_ref[t] * prof.u[t] + offsets[:, None] * prof.k2[t]
    x = chi_from_form_rad(form, prof.k4[t], consts, np.deg2rad(phase_deg))
    return ctf2_from_chi(x, consts, modulation=mod * prof.window[t], overwrite=True)


def score_curves(
    prof: TileProfiles,
    optics: Optics,
    offsets: NDArray[np.float64],
    phase_deg: float = 0.0,
    thickness: float = 0.0,
    spreads: NDArray[np.float64] | None = None,
) -> NDArray[np.float64]:
    """Score of each tile's profile against defocus ``z_ref + offsets`` (tiles × offsets).

    Parameters
    ----------
    prof
        Tile profiles.
    optics
        Optics of the micrograph.
    offsets
        Defocus offsets from each tile's ``z_ref`` (Å).
    phase_deg
        Phase shift of the CTF (phase plate).
    thickness
        Specimen thickness (Å) assumed in the CTF² model.
    spreads
        ``(n_tiles, 2)`` defocus spreads across each tile from a known tilt (Å), or None.
    """
    nt = prof.y.shape[0]
    out = np.zeros((nt, offsets.size))
    live = np.flatnonzero((prof.n > 0).sum(axis=1) >= 16)
    if live.size == 0:
        return out
    c2 = np.empty((live.size, offsets.size, prof.y.shape[1]))
    for i, t in enumerate(live):
        sp = (0.0, 0.0) if spreads is None else (float(spreads[t, 0]), float(spreads[t, 1]))
        mod = modulation(prof.k2[t], optics, thickness, sp)
        c2[i] = _ctf2(prof, t, offsets, optics, phase_deg, mod)
    out[live] = batch_profile_scores(
        np.sqrt(prof.k2[live]), prof.y[live], prof.n[live], c2, prof.k_min, prof.k_max
    )
    return out


def batch_profile_scores(
    k: NDArray,
    y: NDArray,
    n: NDArray,
    ctf2: NDArray,
    k_min: float,
    k_max: float,
    n_bg: int = 5,
    n_env: int = 2,
) -> NDArray:
    """:func:`anisoctf.fit.search.profile_scores` for many profiles at once.

    ``k, y, n`` are ``(P, bins)`` (empty bins have ``n = 0`` and simply carry no weight) and
    ``ctf2`` is ``(P, candidates, bins)``; returns ``(P, candidates)``. The same variable
    projection: a smooth background (``n_bg`` B-splines) is projected out with noise weights
    from the profile's own smooth fit, then a smooth envelope (``n_env`` powers of k) times each
    candidate CTF² is fitted; the score is the drop of the weighted residual (0 where the
    fitted envelope is negative).
    """
    p_, nb = y.shape
    kk = np.where(n > 0, k, k_min)
    phi = radial_basis(kk.ravel(), k_min, k_max, n_bg).reshape(p_, nb, -1)
    sn = np.sqrt(n)
    a = phi * sn[..., None]
    gram = np.einsum("pib,pic->pbc", a, a)
    gram += 1e-9 * np.trace(gram, axis1=1, axis2=2)[:, None, None] * np.eye(gram.shape[-1])
    coef = np.linalg.solve(gram, np.einsum("pib,pi->pb", a, y * sn)[..., None])[..., 0]
    ys = np.einsum("pib,pb->pi", phi, coef)
    ys = np.maximum(ys, 1e-3 * np.max(np.abs(ys), axis=1, keepdims=True) + 1e-30)
    sw = sn / ys
    q, _ = np.linalg.qr(phi * sw[..., None])  # (P, bins, n_bg)
    yw = y * sw
    yp = yw - np.einsum("pib,pb->pi", q, np.einsum("pib,pi->pb", q, yw))
    if n_env <= 1:
        psi = np.ones((p_, nb, 1))
    else:
        psi = np.stack([(kk / k_max) ** i for i in range(n_env)], axis=2)
    u = sw[..., None] * psi  # (P, bins, A)
    qu = np.einsum("pib,pia->piab", q, u).reshape(p_, nb, -1)  # (P, bins, A*B)
    proj = (ctf2 @ qu).reshape(p_, ctf2.shape[1], u.shape[2], -1)  # batched BLAS products
    uu = np.einsum("pia,pic->piac", u, u).reshape(p_, nb, -1)
    g = ((ctf2 * ctf2) @ uu).reshape(p_, ctf2.shape[1], u.shape[2], -1)
    g = g - np.einsum("pjab,pjcb->pjac", proj, proj)
    h = ctf2 @ (u * yp[..., None])
    eye = np.eye(g.shape[-1])
    g = g + 1e-9 * np.trace(g, axis1=2, axis2=3)[..., None, None] * eye
    c = np.linalg.solve(g, h[..., None])[..., 0]
    drop = np.einsum("pja,pja->pj", h, c)
    w = np.where(n > 0, 1.0, 0.0)
    psi_mean = np.einsum("pia,pi->pa", psi, w) / np.maximum(w.sum(axis=1), 1.0)[:, None]
    amp = np.einsum("pja,pa->pj", c, psi_mean)
    return np.where(amp > 0, drop, 0.0)
