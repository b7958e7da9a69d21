"""Per-particle defocus against a reference: maximise the weighted correlation over ΔU.

For particle ``p`` with observed spectrum ``X`` (origin at pixel 0), reference slice ``Q``,
weights ``w(k)``, envelope ``E`` and CTF phase ``φ₀(k) = chi(k) + asin(w_ac)`` at its current
defocus, a mean-defocus offset ``Δz`` adds ``δ(k) = π λ Δz |M k|²`` to the phase and

    CC(Δz) = Σ w Re(X̄ Q) C(Δz) / sqrt(Σ w |Q|² C(Δz)²),   C = CTF_SIGN E sin(φ₀ + δ)

is the correlation of the data with the scaled prediction (the likelihood with a free scale).
Because ``sin(φ₀ + δ) = sin φ₀ cos δ + cos φ₀ sin δ`` and ``δ`` depends on the pixel and
``Δz`` only, every candidate of every particle comes from five matrix products
``(P × pixels) @ (pixels × candidates)``: a coarse grid over the search range, a fine grid
around the best, then a parabola through the best three. ``CTF_SIGN`` (+1, RELION's) and the phase
``π λ Δz |k|²`` are :mod:`anisoctf.optics.kernel`'s; the split of the sine is this module's fast
path (pinned against the kernel in ``tests/test_optics_kernel.py``).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from anisoctf.optics.kernel import CTF_SIGN, defocus_phase_rad
from anisoctf.refine.peak import parabola_peak

__all__ = ["astigmatism_scores", "defocus_offsets", "defocus_scores"]


def _scores(
    qs: NDArray, qc: NDArray, es: NDArray, esc: NDArray, ec: NDArray, delta: NDArray
) -> NDArray[np.float64]:
    cd, sd = np.cos(delta), np.sin(delta)
    num = CTF_SIGN * (qs @ cd + qc @ sd)  # C = CTF_SIGN E sin(phi0 + delta)
    den = es @ (cd * cd) + 2.0 * (esc @ (cd * sd)) + ec @ (sd * sd)
    return num / np.sqrt(np.maximum(den, 1e-300))


#: Trigonometric tables of the coarse defocus grid, shared by the batches of one pass.
_TABLES: dict[tuple, tuple[NDArray, ...]] = {}


def _trig_tables(a: NDArray[np.float64], grid: NDArray[np.float64]) -> tuple[NDArray, ...]:
    """``cos δ, sin δ, cos 2δ, sin 2δ`` for ``δ = a ⊗ grid``, ``(pixels, candidates)``."""
    delta = a[:, None] * grid[None, :]
    return np.cos(delta), np.sin(delta), np.cos(2 * delta), np.sin(2 * delta)


def _coarse_tables(a: NDArray[np.float64], coarse: NDArray[np.float64]) -> tuple[NDArray, ...]:
    """Single-precision :func:`_trig_tables` of the coarse grid and, per candidate (rows),
    ``cos δ`` and ``sin δ`` in double precision; cached for the batches of a pass."""
    key = (a.tobytes(), coarse.tobytes())
    hit = _TABLES.get(key)
    if hit is None:
        tabs = _trig_tables(a, coarse)
        hit = tuple(np.ascontiguousarray(t, dtype=np.float32) for t in tabs) + (
            np.ascontiguousarray(tabs[0].T),
            np.ascontiguousarray(tabs[1].T),
        )
        _TABLES.clear()
        _TABLES[key] = hit
    return hit


def _num_den(
    qn: NDArray,
    en: NDArray,
    s0: NDArray,
    c0: NDArray,
    tables: tuple[NDArray, ...],
    dtype: type = np.float64,
) -> tuple[NDArray, NDArray]:
    """Numerator ``Σ w Re(X̄ Q) C`` and denominator ``Σ w |Q|² C²`` of every candidate of
    ``tables`` (:func:`_trig_tables`).

    ``Σ en (s0 cos δ + c0 sin δ)² = Σ en/2 − Σ (en cos 2φ₀ / 2) cos 2δ + Σ (en sin 2φ₀ / 2)
    sin 2δ`` (with ``s0 = sin φ₀``, ``c0 = cos φ₀``): four matrix products instead of five.
    """
    cd, sd, c2d, s2d = tables[:4]
    num = CTF_SIGN * ((qn * s0).astype(dtype) @ cd + (qn * c0).astype(dtype) @ sd)
    half = 0.5 * en
    den = (
        np.sum(half, axis=1, dtype=np.float64)[:, None].astype(dtype)
        + (half * (s0 * s0 - c0 * c0)).astype(dtype) @ c2d
        + (en * (s0 * c0)).astype(dtype) @ s2d
    )
    tiny = 1e-30 if dtype == np.float32 else 1e-300
    return num, np.maximum(den, dtype(tiny))


def _scores_sc(
    qn: NDArray,
    en: NDArray,
    s0: NDArray,
    c0: NDArray,
    tables: tuple[NDArray, ...],
    dtype: type = np.float64,
) -> NDArray:
    """Correlations ``num / sqrt(den)`` for the candidates of ``tables`` (:func:`_num_den`)."""
    num, den = _num_den(qn, en, s0, c0, tables, dtype)
    return num / np.sqrt(den)


def _band_terms(
    x0: NDArray[np.complexfloating],
    q: NDArray[np.complexfloating],
    phi0: NDArray[np.floating],
    envelope: NDArray[np.floating],
    weight: NDArray[np.floating],
    *per_pixel: NDArray[np.floating],
) -> tuple[NDArray, ...]:
    """The weighted pixels of a batch, flattened: ``xs, ph, qn, en, w`` and ``per_pixel``.

    ``qn = w Re(X̄ Q) E`` and ``en = w |Q|² E²`` are what every score of this module is made
    of; ``per_pixel`` arrays (broadcastable to one particle's pixels) are cut to the same
    pixels. Arguments as :func:`defocus_offsets`.
    """
    p = x0.shape[0]
    w = np.broadcast_to(weight, phi0.shape[1:]).reshape(-1)
    keep = w > 0
    xs = x0.reshape(p, -1)[:, keep]
    qs_ = q.reshape(p, -1)[:, keep]
    ph = phi0.reshape(p, -1)[:, keep]
    env = np.broadcast_to(envelope, phi0.shape).reshape(p, -1)[:, keep]
    w = w[keep]
    qn = w * (xs.real * qs_.real + xs.imag * qs_.imag) * env
    en = w * (qs_.real**2 + qs_.imag**2) * env * env
    extra = tuple(np.broadcast_to(a, phi0.shape[1:]).reshape(-1)[keep] for a in per_pixel)
    return (xs, ph, qn, en, w, *extra)


def defocus_offsets(
    x0: NDArray[np.complexfloating],
    q: NDArray[np.complexfloating],
    phi0: NDArray[np.floating],
    envelope: NDArray[np.floating],
    weight: NDArray[np.floating],
    k2_true: NDArray[np.floating],
    wavelength: float,
    search: float = 1500.0,
    step: float = 25.0,
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Best mean-defocus offset (Å) and its correlation for each particle of a batch.

    Parameters
    ----------
    x0, q
        Observed spectra (origin at pixel 0) and reference slices, ``(P, ...)`` over the same
        pixels (any layout; typically the band pixels, flattened).
    phi0
        ``chi + asin(amplitude contrast)`` at the current defocus, ``(P, ...)``.
    envelope
        CTF envelope ``E`` (broadcastable to ``phi0``).
    weight
        Per-pixel weight (broadcastable), zero outside the band.
    k2_true
        ``|M k|²`` in Å⁻² per pixel (broadcastable to one particle's pixels).
    wavelength
        Electron wavelength (Å).
    search, step
        Offsets searched: ``-search .. +search`` in steps of ``step`` Å, then refined; the
        result stays inside ``±search``.
    """
    _, ph, qn, en, _, k2 = _band_terms(x0, q, phi0, envelope, weight, k2_true)
    a = defocus_phase_rad(k2, wavelength)  # d(chi)/d(z)

    coarse = np.arange(-search, search + 0.5 * step, step)
    tables = _coarse_tables(a, coarse)
    s0, c0 = np.sin(ph), np.cos(ph)
    # single precision is enough to pick the coarse candidate; the fine grid is double
    jb = np.argmax(_scores_sc(qn, en, s0, c0, tables, np.float32), axis=1)
    best = coarse[jb]
    # fine grid around each particle's best: fold the best into the phase, so that the
    # relative candidates are shared again and the same matrix products serve; the phase
    # φ₀ + a·best is rotated with the coarse grid's cos/sin of a·best (no new sin/cos)
    cb, sb = tables[4][jb], tables[5][jb]
    s1 = s0 * cb + c0 * sb
    c1 = c0 * cb - s0 * sb
    fine_step = step / 5.0
    rel = np.arange(-step, step + 0.5 * fine_step, fine_step)
    sf = _scores_sc(qn, en, s1, c1, _trig_tables(a, rel))
    j, frac, _, top = parabola_peak(sf)
    off = np.clip(best + rel[j] + frac * fine_step, -search, search)
    return off, top


def defocus_scores(
    x0: NDArray[np.complexfloating],
    q: NDArray[np.complexfloating],
    phi0: NDArray[np.floating],
    envelope: NDArray[np.floating],
    weight: NDArray[np.floating],
    k2_true: NDArray[np.floating],
    wavelength: float,
    offsets: NDArray[np.float64],
    centres: NDArray[np.float64] | None = None,
) -> tuple[NDArray[np.float32], NDArray[np.float32], NDArray[np.float64]]:
    """Numerator and denominator of every particle's correlation at every candidate offset,
    and its data power.

    The candidates of particle ``p`` are ``centres[p] + offsets`` (Å, relative to the defocus
    in ``phi0``; ``centres`` zero when not given). With weights ``w = 1/σ²`` the
    log-likelihood of a candidate at scale ``a`` is ``2 a num − a² den`` up to a constant
    (:func:`anisoctf.refine.height_prior.candidate_loglik` integrates ``a`` out), and
    ``Σ w |X|²`` is what the temperature of that likelihood is calibrated with
    (:func:`anisoctf.refine.height_prior.likelihood_temperature`). Arguments as
    :func:`defocus_offsets`.

    Returns
    -------
    num, den : numpy.ndarray
        ``(P, J)`` float32 ``Σ w Re(X̄ Q) C`` and ``Σ w |Q|² C²``.
    data_power : numpy.ndarray
        ``(P,)`` ``Σ w |X|²`` over the weighted pixels.
    """
    xs, ph, qn, en, w, k2 = _band_terms(x0, q, phi0, envelope, weight, k2_true)
    xr, xi = xs.real.astype(np.float64), xs.imag.astype(np.float64)
    power = np.sum(w * (xr * xr + xi * xi), axis=1)
    a = defocus_phase_rad(k2, wavelength)
    if centres is not None:
        ph = ph + np.asarray(centres, dtype=np.float64)[:, None] * a[None, :]
    s0, c0 = np.sin(ph), np.cos(ph)
    grid = np.asarray(offsets, dtype=np.float64)
    tables = _coarse_tables(a, grid)
    num, den = _num_den(qn, en, s0, c0, tables, np.float32)
    return num, den, power


def astigmatism_scores(
    x0: NDArray[np.complexfloating],
    q: NDArray[np.complexfloating],
    phi0: NDArray[np.floating],
    envelope: NDArray[np.floating],
    weight: NDArray[np.floating],
    c2_true: NDArray[np.floating],
    s2_true: NDArray[np.floating],
    wavelength: float,
    candidates: NDArray[np.float64],
) -> NDArray[np.float64]:
    """Correlation of each particle for astigmatism changes ``(Δa1, Δa2)`` (Å, Cartesian).

    The phase change of a candidate is ``δ = πλ (Δa1 (kx² − ky²) + Δa2 · 2 kx ky)`` at the true
    frequency, shared by all particles, so the same five matrix products as for the defocus
    give every candidate (``candidates``: ``(J, 2)``). Sum the rows of a micrograph's particles
    to score a per-micrograph astigmatism. Arguments as :func:`defocus_offsets`.

    Returns
    -------
    numpy.ndarray
        ``(P, J)`` correlations.
    """
    _, ph, qn, en, _, c2, s2 = _band_terms(x0, q, phi0, envelope, weight, c2_true, s2_true)
    s0, c0 = np.sin(ph), np.cos(ph)
    mats = (qn * s0, qn * c0, en * s0 * s0, en * s0 * c0, en * c0 * c0)
    mats = tuple(np.ascontiguousarray(m, dtype=np.float64) for m in mats)
    cand = np.asarray(candidates, dtype=np.float64).reshape(-1, 2)
    delta = defocus_phase_rad(
        c2[:, None] * cand[None, :, 0] + s2[:, None] * cand[None, :, 1], wavelength
    )
    return _scores(*mats, delta)
