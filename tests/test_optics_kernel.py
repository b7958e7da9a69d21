"""The one CTF kernel (``anisoctf.optics.kernel``) against the inline formulas it replaced.

Each ``_old_*`` function below is a verbatim copy of an inline CTF formula as it stood before the
kernel existed (module and function named in its docstring); the tests pin the kernel (as the
module now calls it) equal to it on a grid of frequencies, defoci, astigmatism, phase shifts,
amplitude contrasts and magnification matrices.

Tolerances: float64 paths 1e-12 relative (phases) or 1e-12 absolute (CTF and CTF², which are
bounded by 1 and cross zero); float32 fast paths as stated at each test.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from anisoctf.fit.band import Band
from anisoctf.fit.quality import optics_ctf2
from anisoctf.fit.refine import _ctf_terms
from anisoctf.fit.search import _ctf2_1d
from anisoctf.local.profiles import _ctf2
from anisoctf.optics.ctf import CTFParams, Optics, chi, ctf_1d, ctf_2d, frequency_features
from anisoctf.optics.kernel import (
    CTF_SIGN,
    NO_ABERRATIONS,
    AberrationTerms,
    CTFConstants,
    chi_rad,
    ctf2_from_chi,
    ctf_constants,
    ctf_from_chi,
    ctf_from_chi_fast,
    odd_phase_rad,
    true_frequencies,
)
from anisoctf.optics.magmat import MagMat
from anisoctf.refine.model import GridFeatures, batch_chi, batch_ctf, grid_features

MATRICES = [
    np.eye(2),
    MagMat.from_anisotropy(2.0, 30.0).array,
    np.array([[1.01, 0.004], [-0.003, 0.985]]),
]
OPTICS = [
    Optics(pixel_size=1.0, voltage_kv=300.0, cs_mm=2.7, amplitude_contrast=0.07),
    Optics(pixel_size=0.83, voltage_kv=200.0, cs_mm=0.01, amplitude_contrast=0.1),
    Optics(pixel_size=1.3, voltage_kv=300.0, cs_mm=2.7, amplitude_contrast=0.0),
]
#: (z, a1, a2, phase_deg)
PARAMS = [(15000.0, 0.0, 0.0, 0.0), (8000.0, 400.0, -250.0, 90.0), (30000.0, -900.0, 600.0, 33.0)]


def _grid(m: np.ndarray, n: int = 48, apix: float = 1.0):
    ky = np.fft.fftfreq(n, d=apix)[:, None]
    kx = np.fft.rfftfreq(n, d=apix)[None, :]
    return frequency_features(kx, ky, m)


def _close(a, b, rtol=1e-12, atol=0.0):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)


# ---------------------------------------------------------------- the old inline formulas


def _old_chi(features, params, optics):
    """``optics.ctf.chi`` before the kernel."""
    lam = optics.wavelength
    z = params.mean_defocus
    a1, a2 = params.astig_components
    quad = z * features.k2 + a1 * features.c2 + a2 * features.s2
    return (
        np.pi * lam * quad
        - 0.5 * np.pi * optics.cs_angstrom * lam**3 * features.k4
        + np.deg2rad(params.phase_shift_deg)
    )


def _old_ctf_from_chi(x, amplitude_contrast):
    """``optics.ctf._ctf_from_chi``, ``simulate.micrograph`` (twice), ``fit.estimate``.

    With the overall sign switched to RELION's (issue 13 item 4): the inline formula had
    ``-sqrt(1 - w²) sin x - w cos x``, the opposite of RELION's ``getCTF`` (``-sin γ`` with
    ``γ = -(x + asin w)``); the sign was the only thing that was wrong with it.
    """
    w = amplitude_contrast
    return np.sqrt(1.0 - w * w) * np.sin(x) + w * np.cos(x)


def _old_search_ctf2_1d(k, df, phase_rad, optics):
    """``fit.search._ctf2_1d``."""
    lam = optics.wavelength
    cs = optics.cs_angstrom
    w = optics.amplitude_contrast
    k2 = k * k
    x = np.pi * lam * df[:, None] * k2[None, :] - 0.5 * np.pi * cs * lam**3 * (k2 * k2)[None, :]
    x = x + phase_rad[:, None]
    x += np.arctan2(w, np.sqrt(1 - w * w))
    x *= 2.0
    x -= (2 * np.pi) * np.round(x * (0.5 / np.pi))
    c2 = np.cos(x.astype(np.float32))
    c2 *= np.float32(-0.5)
    c2 += np.float32(0.5)
    return c2.astype(np.float64)


def _old_refine_ctf_terms(f, optics, z, a1, a2, ph):
    """``fit.refine._ctf_terms`` (on features ``f`` = ``band.feats``)."""
    lam = optics.wavelength
    x = (
        np.pi * lam * (z * f.k2 + a1 * f.c2 + a2 * f.s2)
        - 0.5 * np.pi * optics.cs_angstrom * lam**3 * f.k4
        + ph
    )
    w = optics.amplitude_contrast
    y = x
    y += np.arctan2(w, np.sqrt(1 - w * w))
    y *= 2.0
    c2 = np.cos(y)
    c2 *= -0.5
    c2 += 0.5
    y -= (2 * np.pi) * np.round(y * (0.5 / np.pi))
    return c2, np.sin(y.astype(np.float32))


def _old_refine_dchi(f, optics):
    """``fit.refine.refine_ml``'s ``dchi``."""
    lam = optics.wavelength
    return [np.pi * lam * f.k2, np.pi * lam * f.c2, np.pi * lam * f.s2]


def _old_quality_ctf2(f, params, optics):
    """``fit.quality.optics_ctf2``."""
    x = _old_chi(f, params, optics)
    w = optics.amplitude_contrast
    x += np.arctan2(w, np.sqrt(1 - w * w))
    x *= 2.0
    c2 = np.cos(x)
    c2 *= -0.5
    c2 += 0.5
    return c2


def _old_batch_chi(f, z, a1, a2, optics, phase_shift_deg):
    """``refine.model.batch_chi``."""
    lam = optics.wavelength
    z, a1, a2, ph = (
        np.atleast_1d(np.asarray(x, dtype=float)) for x in (z, a1, a2, phase_shift_deg)
    )
    z, a1, a2, ph = np.broadcast_arrays(z, a1, a2, ph)
    quad = (
        z[:, None, None] * f.k2[None]
        + a1[:, None, None] * f.c2[None]
        + a2[:, None, None] * f.s2[None]
    )
    cs_term = 0.5 * np.pi * optics.cs_angstrom * lam**3 * f.k4
    return np.pi * lam * quad - cs_term[None] + np.deg2rad(ph)[:, None, None]


def _old_batch_ctf(f, z, a1, a2, optics, phase_shift_deg):
    """``refine.model.batch_ctf`` (no B-factor)."""
    x = _old_batch_chi(f, z, a1, a2, optics, phase_shift_deg)
    x += np.float32(np.arcsin(optics.amplitude_contrast))
    return np.sin(x)  # was -sin(x): RELION's sign since issue 13 item 4


def _old_profiles_ctf2(z_ref, u, k2, k4, offsets, optics, phase_deg, mod_window):
    """``local.profiles._ctf2`` (one tile)."""
    lam = optics.wavelength
    w = optics.amplitude_contrast
    alpha = np.arctan2(w, np.sqrt(1.0 - w * w))
    x = (
        np.pi * lam * (z_ref * u + offsets[:, None] * k2)
        - 0.5 * np.pi * optics.cs_angstrom * lam**3 * k4
        + np.deg2rad(phase_deg)
        + alpha
    )
    return 0.5 - 0.5 * np.cos(2.0 * x) * mod_window


# ---------------------------------------------------------------- the pins


@pytest.mark.parametrize(
    ("m", "optics", "p"), list(itertools.product(MATRICES, OPTICS, PARAMS))
)
def test_chi_and_ctf_equal_the_old_float64_formulas(m, optics, p):
    f = _grid(m)
    params = CTFParams(*_uva(*p[:3]), p[3])
    x_old = _old_chi(f, params, optics)
    x_new = chi(f, params, optics)
    _close(x_new, x_old, rtol=1e-12, atol=1e-12)
    w = optics.amplitude_contrast
    _close(ctf_from_chi(x_new, ctf_constants(optics)), _old_ctf_from_chi(x_old, w), atol=1e-12)
    _close(optics_ctf2(_band(f), params, optics), _old_quality_ctf2(f, params, optics), atol=1e-12)
    # the grid functions: ctf_2d / ctf_1d are the kernel on the FFT grid
    o = Optics(optics.pixel_size, optics.voltage_kv, optics.cs_mm, optics.amplitude_contrast, m)
    ky = np.fft.fftfreq(48, d=o.pixel_size)[:, None]
    kx = np.fft.rfftfreq(48, d=o.pixel_size)[None, :]
    x_grid = _old_chi(frequency_features(kx, ky, m), params, o)
    ref = _old_ctf_from_chi(x_grid, o.amplitude_contrast)
    _close(ctf_2d((48, 48), params, o), ref, atol=1e-12)
    k = np.linspace(0.0, 0.45, 200)
    f1 = frequency_features(k, np.zeros_like(k))
    iso = CTFParams(p[0], p[0], 0.0, p[3])
    ref1 = _old_ctf_from_chi(_old_chi(f1, iso, optics), w)
    _close(ctf_1d(k, p[0], optics, p[3]), ref1, atol=1e-12)


def _uva(z, a1, a2):
    h = float(np.hypot(a1, a2))
    ang = 0.5 * np.rad2deg(np.arctan2(a2, a1)) if h > 0 else 0.0
    return z + h, z - h, ang


def _band(f) -> Band:
    """A stand-in for a Band: the CTF functions read only its ``feats``."""

    class _B:
        feats = f

    return _B()  # type: ignore[return-value]


@pytest.mark.parametrize(("m", "optics"), list(itertools.product(MATRICES, OPTICS)))
def test_refine_terms_equal_the_old_formula(m, optics):
    f = _grid(m)
    for z, a1, a2, ph_deg in PARAMS:
        ph = np.deg2rad(ph_deg)
        c2_old, d_old = _old_refine_ctf_terms(f, optics, z, a1, a2, ph)
        c2_new, d_new = _ctf_terms(_band(f), optics, z, a1, a2, ph)
        _close(c2_new, c2_old, atol=1e-12)  # float64 cosine
        # float32 sine of the exactly reduced double phase: 1e-6 absolute
        _close(d_new, d_old, atol=1e-6)
        assert d_new.dtype == np.float32
    from anisoctf.optics.kernel import defocus_phase_rad

    for new, old in zip(
        [defocus_phase_rad(q, optics.wavelength) for q in (f.k2, f.c2, f.s2)],
        _old_refine_dchi(f, optics),
        strict=True,
    ):
        _close(new, old, rtol=1e-12)


@pytest.mark.parametrize("optics", OPTICS)
def test_search_ctf2_equals_the_old_formula(optics):
    k = np.linspace(0.02, 0.45, 300)
    df = np.linspace(3000.0, 40000.0, 57)
    ph = np.deg2rad(np.linspace(0.0, 180.0, 57))
    old = _old_search_ctf2_1d(k, df, ph, optics)
    new = _ctf2_1d(k, df, ph, optics)
    # float32 cosine of the exactly reduced double phase: 1e-6 absolute
    _close(new, old, atol=1e-6)
    x = chi_rad(
        frequency_features(k, np.zeros_like(k)), ctf_constants(optics), df, phase_shift_rad=ph
    )
    _close(new, ctf2_from_chi(x, ctf_constants(optics)), atol=1e-6)


@pytest.mark.parametrize(("m", "optics"), list(itertools.product(MATRICES, OPTICS)))
def test_particle_batch_equals_the_old_formula(m, optics):
    g = grid_features(40, optics.pixel_size, m)
    rng = np.random.default_rng(3)
    z = rng.uniform(5000, 30000, 7)
    a1, a2 = rng.uniform(-500, 500, (2, 7))
    ph = rng.uniform(0, 120, 7)
    x_old = _old_batch_chi(g.feats, z, a1, a2, optics, ph)
    x_new = batch_chi(g, z, a1, a2, optics, ph)
    _close(x_new, x_old, rtol=1e-12, atol=1e-12)
    # the fast path rounds asin w to float32: within 1e-7 of the float64 CTF
    c_new = batch_ctf(g, z, a1, a2, optics, ph)
    _close(c_new, _old_batch_ctf(g.feats, z, a1, a2, optics, ph), atol=1e-12)
    _close(
        batch_ctf(g, z, a1, a2, optics, ph),
        ctf_from_chi(x_old, ctf_constants(optics)),
        atol=1e-7,
    )
    # a batch of one is the single-parameter chi
    p0 = CTFParams(*_uva(z[0], a1[0], a2[0]), ph[0])
    _close(x_new[0], chi(g.feats, p0, optics), rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("optics", OPTICS)
def test_profiles_ctf2_equals_the_old_formula(optics):
    rng = np.random.default_rng(5)
    nb = 120
    k2 = np.sort(rng.uniform(1e-4, 0.2, nb))
    u = k2 + rng.normal(0, 1e-3, nb)
    k4 = k2 * k2 * (1 + rng.uniform(0, 0.01, nb))
    window = rng.uniform(0.5, 1.0, nb)
    mod = rng.uniform(0.2, 1.0, nb)
    offsets = np.linspace(-2000.0, 2000.0, 41)

    class _P:  # the fields of TileProfiles that _ctf2 reads, one tile
        pass

    prof = _P()
    prof.z_ref = np.array([12000.0])
    prof.u, prof.k2, prof.k4, prof.window = u[None], k2[None], k4[None], window[None]
    for phase in (0.0, 45.0):
        old = _old_profiles_ctf2(12000.0, u, k2, k4, offsets, optics, phase, mod * window)
        new = _ctf2(prof, 0, offsets, optics, phase, mod)  # type: ignore[arg-type]
        _close(new, old, atol=1e-12)


def test_constants_are_relion_k1_k2_k3():
    o = OPTICS[0]
    c = CTFConstants.from_optics(o)
    lam = o.wavelength
    assert c.defocus_coef_rad == pytest.approx(np.pi * lam, rel=1e-15)
    assert c.cs_coef_rad == pytest.approx(0.5 * np.pi * o.cs_angstrom * lam**3, rel=1e-15)
    assert c.amplitude_phase_rad == pytest.approx(np.arcsin(o.amplitude_contrast), rel=1e-15)
    assert ctf_constants(o) is ctf_constants(o)  # cached per optics group


def test_sign_convention():
    # RELION's sign (src/ctf.h, CTF::getCTF: -sin(gamma) with
    # gamma = -pi lam df k² + pi/2 Cs lam³ k⁴ - asin(w) - phase shift = -(chi + asin w)):
    # CTF = +sin(chi + asin w), +w at zero frequency. Until issue 13 this test pinned the
    # opposite sign (-1, CTF(0) = -w), which made `refine` call every RELION stack inverted.
    assert CTF_SIGN == 1.0
    o = OPTICS[0]
    c = ctf_constants(o)
    x = np.linspace(-30, 30, 1001)
    _close(ctf_from_chi(x, c), np.sin(x + np.arcsin(o.amplitude_contrast)), atol=1e-12)
    # RELION's gamma written out, its -sin(gamma) equal to ours
    gamma = -x - np.arcsin(o.amplitude_contrast)
    _close(ctf_from_chi(x, c), -np.sin(gamma), atol=1e-12)
    _close(ctf_from_chi_fast(x.copy(), c), ctf_from_chi(x, c), atol=1e-7)
    _close(ctf2_from_chi(x, c), ctf_from_chi(x, c) ** 2, atol=1e-12)
    assert ctf_2d((8, 8), CTFParams(1e4, 1e4), o)[0, 0] == pytest.approx(+o.amplitude_contrast)


def test_magnification_applied_once_observed_to_true():
    m = MATRICES[2]
    kx, ky = np.array([0.1, 0.0, 0.2]), np.array([0.0, 0.1, -0.15])
    tx, ty = true_frequencies(kx, ky, m)
    _close(np.stack([tx, ty]), m @ np.stack([kx, ky]), rtol=1e-15)
    f = frequency_features(kx, ky, m)
    _close(f.k2, tx**2 + ty**2, rtol=1e-15)


def test_aberration_slot():
    f = _grid(np.eye(2))
    c = ctf_constants(OPTICS[0])
    assert NO_ABERRATIONS.empty
    base = chi_rad(f, c, 10000.0, 50.0, -20.0, 0.3)
    ky = np.fft.fftfreq(48)[:, None]
    kx = np.fft.rfftfreq(48)[None, :]
    k_true = true_frequencies(kx, ky, None)
    even = AberrationTerms(even=(lambda x, y: 2.0 * (x * x + y * y),))
    _close(chi_rad(f, c, 10000.0, 50.0, -20.0, 0.3, even, k_true), base + 2.0 * f.k2, rtol=1e-12)
    with pytest.raises(ValueError, match="true-frame"):
        chi_rad(f, c, 10000.0, aberrations=even)
    assert odd_phase_rad(NO_ABERRATIONS, k_true) is None
    odd = AberrationTerms(odd=(lambda x, y: x * 3.0,))
    _close(odd_phase_rad(odd, k_true), np.broadcast_to(3.0 * kx, f.k2.shape), rtol=1e-15)


def test_mirror_matrix_refused_by_optics_and_magmat():
    mirror = ((1.0, 0.0), (0.0, -1.0))
    with pytest.raises(ValueError, match="positive determinant"):
        MagMat(mirror)
    with pytest.raises(ValueError, match="positive determinant"):
        Optics(pixel_size=1.0, mag_matrix=mirror)
    o = Optics(pixel_size=1.0, mag_matrix=MagMat.from_anisotropy(1.0, 10.0))
    assert isinstance(o.mag_matrix, tuple) and isinstance(o.mag_matrix[0], tuple)
    assert o.magmat == MagMat.from_anisotropy(1.0, 10.0)
    _close(o.M, MagMat.from_anisotropy(1.0, 10.0).array, rtol=0)


def test_grid_features_type():
    g = grid_features(16, 1.0, None)
    assert isinstance(g, GridFeatures)


def test_particle_defocus_fast_path_uses_the_kernel_ctf():
    """refine.defocus splits sin(chi + asin w + δ) into matrix products; on noise-free data made
    with the kernel's CTF it finds the offset and a correlation of 1 (the sign included)."""
    from anisoctf.refine.defocus import defocus_offsets

    optics = OPTICS[0]
    c = ctf_constants(optics)
    rng = np.random.default_rng(11)
    kx = rng.uniform(-0.3, 0.3, 4000)
    ky = rng.uniform(-0.3, 0.3, 4000)
    f = frequency_features(kx[None], ky[None], MATRICES[1])
    z_true = np.array([12000.0, 20000.0, 8000.0])
    a1, a2 = np.array([100.0, -50.0, 0.0]), np.array([30.0, 0.0, -80.0])
    q = rng.normal(size=(3, 1, 4000)) + 1j * rng.normal(size=(3, 1, 4000))
    env = np.exp(-0.25 * 40.0 * f.k2)[None]
    ctf_true = ctf_from_chi(chi_rad(f, c, z_true, a1, a2), c)
    x0 = 2.5 * ctf_true * env * q
    z0 = z_true - np.array([300.0, -420.0, 75.0])
    phi0 = chi_rad(f, c, z0, a1, a2) + c.amplitude_phase_rad
    off, score = defocus_offsets(
        x0, q, phi0, env, np.ones(4000), f.k2[0], optics.wavelength, 1500.0, 25.0
    )
    np.testing.assert_allclose(off, z_true - z0, atol=1.0)
    assert np.all(score > 0.999)
