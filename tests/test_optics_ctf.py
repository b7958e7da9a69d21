"""The CTF model against analytic truth: every convention of docs/conventions.md §1–§4.

Units: Å, Å⁻¹, kV, mm (Cs), degrees (angles, phase shift). Arrays are (row = y, column = x).
"""

from __future__ import annotations

import numpy as np
import pytest

from anisoctf.optics.ctf import (
    CTFParams,
    Optics,
    chi,
    ctf_1d,
    ctf_2d,
    defocus_matrix,
    electron_wavelength,
    frequency_features,
    frequency_grid,
    params_from_astig,
)


def _ctf_formula(x: np.ndarray, w: float) -> np.ndarray:
    """RELION's CTF, written out independently of the library.

    RELION ``CTF::getCTF`` (``src/ctf.h``): ``-sin(gamma)`` with
    ``gamma = -pi lam df k² + pi/2 Cs lam³ k⁴ - asin(w) - phase shift = -(chi + asin w)``, i.e.
    ``CTF = sqrt(1 - w²) sin(chi) + w cos(chi)``, ``+w`` at zero frequency. Until issue 13 these
    tests pinned the opposite sign (``-sqrt(1 - w²) sin chi - w cos chi``), which made
    ``refine`` report every RELION stack as contrast-inverted.
    """
    gamma = -x - np.arcsin(w)
    return -np.sin(gamma)


def _random_mag(rng: np.random.Generator) -> np.ndarray:
    """A well-conditioned, non-symmetric 2x2 matrix near the identity (a few % anisomag)."""
    return np.eye(2) + rng.uniform(-0.06, 0.06, size=(2, 2))


def _params_from_matrix(d: np.ndarray, phase_deg: float = 0.0) -> CTFParams:
    """CTFParams whose defocus quadratic form is the symmetric matrix ``d``."""
    return params_from_astig(
        0.5 * (d[0, 0] + d[1, 1]), 0.5 * (d[0, 0] - d[1, 1]), d[0, 1], phase_deg
    )


# ---------------------------------------------------------------------------------------------
# wavelength and units


@pytest.mark.parametrize(
    ("kv", "angstrom"), [(300.0, 0.019687), (200.0, 0.025079), (100.0, 0.037014)]
)
def test_relativistic_wavelength(kv: float, angstrom: float) -> None:
    assert electron_wavelength(kv) == pytest.approx(angstrom, abs=1e-5)
    assert Optics(pixel_size=1.0, voltage_kv=kv).wavelength == electron_wavelength(kv)


def test_wavelength_is_relativistic_not_classical() -> None:
    # classical h / sqrt(2 m e V) at 300 kV is 0.022407 Å: the correction is ~12 %
    assert electron_wavelength(300.0) < 0.0200


def test_units_cs_mm_to_angstrom() -> None:
    assert Optics(pixel_size=1.0, cs_mm=2.7).cs_angstrom == pytest.approx(2.7e7)
    assert Optics(pixel_size=1.0, cs_mm=0.01).cs_angstrom == pytest.approx(1.0e5)


# ---------------------------------------------------------------------------------------------
# CTF zeros and the amplitude-contrast / phase-shift terms


def test_zeros_without_cs_or_amplitude_contrast() -> None:
    optics = Optics(pixel_size=1.0, voltage_kv=300.0, cs_mm=0.0, amplitude_contrast=0.0)
    lam, df = optics.wavelength, 12000.0
    n = np.arange(1, 40)
    k_zero = np.sqrt(n / (lam * df))  # pi*lam*df*k^2 = n*pi
    np.testing.assert_allclose(ctf_1d(k_zero, df, optics), 0.0, atol=1e-9)
    # in between, CTF = sin(pi*lam*df*k^2) = (-1)^(n-1) at the half-way phase (n - 1/2) pi
    # (RELION's sign: positive in the first lobe; it was pinned negative before issue 13)
    k_mid = np.sqrt((n - 0.5) / (lam * df))
    np.testing.assert_allclose(ctf_1d(k_mid, df, optics), (-1.0) ** (n - 1), atol=1e-9)


def test_zeros_with_cs() -> None:
    optics = Optics(pixel_size=1.0, voltage_kv=200.0, cs_mm=2.7, amplitude_contrast=0.0)
    lam, cs, df = optics.wavelength, 2.7e7, 8000.0
    n = np.arange(1, 30)
    # chi = pi lam df u - pi/2 Cs lam^3 u^2 = n pi with u = k^2: the smaller root
    a = 0.5 * cs * lam**3
    u = (lam * df - np.sqrt((lam * df) ** 2 - 4.0 * a * n)) / (2.0 * a)
    k_zero = np.sqrt(u)
    np.testing.assert_allclose(ctf_1d(k_zero, df, optics), 0.0, atol=1e-8)
    # the Cs = 0 zeros are *not* zeros here (the test can fail if Cs were ignored)
    assert np.max(np.abs(ctf_1d(np.sqrt(n / (lam * df)), df, optics))) > 0.5


def test_amplitude_contrast_sign_and_zeros() -> None:
    w = 0.1
    optics = Optics(pixel_size=1.0, cs_mm=0.0, amplitude_contrast=w)
    lam, df = optics.wavelength, 10000.0
    # RELION: CTF(0) = -sin(-asin w) = +w (pinned -w before issue 13, the wrong sign)
    assert ctf_1d(np.array([0.0]), df, optics)[0] == pytest.approx(+w)
    # CTF = sin(chi + asin(w)): zeros at chi = n pi - asin(w)
    n = np.arange(1, 20)
    k_zero = np.sqrt((n * np.pi - np.arcsin(w)) / (np.pi * lam * df))
    np.testing.assert_allclose(ctf_1d(k_zero, df, optics), 0.0, atol=1e-9)


def test_phase_shift_90_turns_sine_into_cosine() -> None:
    optics = Optics(pixel_size=1.0, cs_mm=2.7, amplitude_contrast=0.0)
    lam, df = optics.wavelength, 5000.0
    k = np.linspace(0.0, 0.4, 300)
    gamma = np.pi * lam * df * k**2 - 0.5 * np.pi * 2.7e7 * lam**3 * k**4
    # RELION's sign (issue 13; pinned -cos / -sin before): sin(chi + 90°) = cos(chi)
    np.testing.assert_allclose(
        ctf_1d(k, df, optics, phase_shift_deg=90.0), np.cos(gamma), atol=1e-9
    )
    np.testing.assert_allclose(ctf_1d(k, df, optics), np.sin(gamma), atol=1e-9)


def test_chi_formula_with_defocus_matrix() -> None:
    rng = np.random.default_rng(1)
    optics = Optics(pixel_size=1.1, voltage_kv=300.0, cs_mm=2.7, amplitude_contrast=0.07)
    params = CTFParams(16000.0, 13500.0, 37.0, phase_shift_deg=25.0)
    kx, ky = rng.uniform(-0.45, 0.45, (2, 500))
    d = defocus_matrix(16000.0, 13500.0, 37.0)
    quad = d[0, 0] * kx * kx + 2 * d[0, 1] * kx * ky + d[1, 1] * ky * ky
    lam = optics.wavelength
    k2 = kx * kx + ky * ky
    expect = np.pi * lam * quad - 0.5 * np.pi * 2.7e7 * lam**3 * k2 * k2 + np.deg2rad(25.0)
    np.testing.assert_allclose(chi(frequency_features(kx, ky), params, optics), expect, rtol=1e-12)
    np.testing.assert_allclose(params.matrix(), d)


def test_bfactor_envelope_on_amplitude() -> None:
    optics = Optics(pixel_size=1.0)
    k = np.linspace(0.0, 0.5, 50)
    ratio = ctf_1d(k, 9000.0, optics, bfactor=80.0) / ctf_1d(k, 9000.0, optics)
    np.testing.assert_allclose(ratio, np.exp(-80.0 * k**2 / 4.0), rtol=1e-9)
    shape = (64, 64)
    with_b = ctf_2d(shape, CTFParams(9000.0, 8000.0, 20.0, 0.0, 80.0), optics)
    without = ctf_2d(shape, CTFParams(9000.0, 8000.0, 20.0, 0.0, 0.0), optics)
    kx, ky = frequency_grid(shape, 1.0)
    np.testing.assert_allclose(with_b, without * np.exp(-20.0 * (kx**2 + ky**2)), atol=1e-12)


# ---------------------------------------------------------------------------------------------
# astigmatism: direction and sense of the angle


@pytest.mark.parametrize("angle", [0.0, 30.0, 75.0, 121.0, 163.0])
def test_u_axis_direction_gives_defocus_u(angle: float) -> None:
    optics = Optics(pixel_size=1.0, cs_mm=2.7, amplitude_contrast=0.07)
    u, v = 14000.0, 11000.0
    params = CTFParams(u, v, angle)
    k = np.linspace(0.0, 0.45, 400)
    t = np.deg2rad(angle)
    w = optics.amplitude_contrast

    def along(direction: float) -> np.ndarray:
        f = frequency_features(k * np.cos(direction), k * np.sin(direction))
        return _ctf_formula(chi(f, params, optics), w)

    np.testing.assert_allclose(along(t), ctf_1d(k, u, optics), atol=1e-9)
    np.testing.assert_allclose(along(t + np.pi / 2), ctf_1d(k, v, optics), atol=1e-9)
    np.testing.assert_allclose(along(t + np.pi), ctf_1d(k, u, optics), atol=1e-9)
    if angle % 90.0:  # the mirror direction -angle is not the U axis (sense +x -> +y)
        assert np.max(np.abs(along(-t) - ctf_1d(k, u, optics))) > 0.5


def test_u_axis_on_the_grid() -> None:
    """angle 0: U along kx (row 0 of the half plane), V along ky (column 0); 45°: diagonal."""
    optics = Optics(pixel_size=1.0, cs_mm=2.7, amplitude_contrast=0.07)
    n = 256
    kx, ky = frequency_grid((n, n), 1.0)
    u, v = 15000.0, 12000.0
    c0 = ctf_2d((n, n), CTFParams(u, v, 0.0), optics)
    np.testing.assert_allclose(c0[0, :], ctf_1d(kx[0], u, optics), atol=1e-9)
    np.testing.assert_allclose(c0[:, 0], ctf_1d(np.abs(ky[:, 0]), v, optics), atol=1e-9)
    c90 = ctf_2d((n, n), CTFParams(u, v, 90.0), optics)
    np.testing.assert_allclose(c90[0, :], ctf_1d(kx[0], v, optics), atol=1e-9)
    np.testing.assert_allclose(c90[:, 0], ctf_1d(np.abs(ky[:, 0]), u, optics), atol=1e-9)
    c45 = ctf_2d((n, n), CTFParams(u, v, 45.0), optics)
    i = np.arange(n // 2)  # (kx, ky) = (i, i)/n: the +45° direction, +x towards +y
    np.testing.assert_allclose(c45[i, i], ctf_1d(np.sqrt(2.0) * i / n, u, optics), atol=1e-9)
    # (kx, ky) = (i, -i)/n lies at -45°, i.e. along V
    np.testing.assert_allclose(
        c45[(n - i) % n, i], ctf_1d(np.sqrt(2.0) * i / n, v, optics), atol=1e-9
    )


@pytest.mark.parametrize("angle", [0.0, 20.0, 66.0, 135.0])
def test_rotating_by_90_degrees_adds_90_to_the_angle(angle: float) -> None:
    """np.rot90(a, k=-1) maps +x (columns) onto +y (rows) in (row = y, col = x) indexing.

    On a centred, odd-sized full grid it rotates the content by +90° (x -> y), so the CTF of
    angle theta rotated that way is exactly the CTF of angle theta + 90°.
    """
    marker = np.zeros((5, 5))
    marker[2, 3] = 1.0  # one pixel on +x of the centre
    assert np.argwhere(np.rot90(marker, k=-1)).tolist() == [[3, 2]]  # now on +y

    optics = Optics(pixel_size=1.3, cs_mm=2.7, amplitude_contrast=0.07)
    n = 127  # odd: the fftshifted grid is symmetric about its centre
    a = np.fft.fftshift(ctf_2d((n, n), CTFParams(12000.0, 9000.0, angle), optics, rfft=False))
    b = np.fft.fftshift(
        ctf_2d((n, n), CTFParams(12000.0, 9000.0, angle + 90.0), optics, rfft=False)
    )
    np.testing.assert_allclose(np.rot90(a, k=-1), b, atol=1e-9)
    # the other rotation direction gives angle - 90°: the same up to the 180° period ...
    np.testing.assert_allclose(np.rot90(a, k=1), b, atol=1e-9)
    # ... so pin the sense with a non-90° step via the transpose (mirror about y = x):
    # mirroring maps the U axis at theta onto 90° - theta
    c = np.fft.fftshift(
        ctf_2d((n, n), CTFParams(12000.0, 9000.0, 90.0 - angle), optics, rfft=False)
    )
    np.testing.assert_allclose(a.T, c, atol=1e-9)


def test_rotating_a_simulated_image_rotates_its_power() -> None:
    """The same relation on real-space data: rot90(k=-1) of an image gives a periodogram whose
    CTF angle is 90° larger; compared through correlation with the two model spectra."""
    rng = np.random.default_rng(5)
    n = 255
    optics = Optics(pixel_size=1.5, cs_mm=2.7, amplitude_contrast=0.07)
    theta = 25.0
    c = ctf_2d((n, n), CTFParams(11000.0, 7000.0, theta), optics, rfft=False)
    img = np.fft.ifft2(np.fft.fft2(rng.standard_normal((n, n))) * c).real
    rot = np.rot90(img, k=-1)
    p = np.abs(np.fft.fft2(rot)) ** 2
    model_plus = ctf_2d((n, n), CTFParams(11000.0, 7000.0, theta + 90.0), optics, rfft=False) ** 2
    model_minus = ctf_2d((n, n), CTFParams(11000.0, 7000.0, -theta), optics, rfft=False) ** 2
    corr_plus = np.corrcoef(p.ravel(), model_plus.ravel())[0, 1]
    corr_minus = np.corrcoef(p.ravel(), model_minus.ravel())[0, 1]
    # an exponential periodogram correlates with its mean at about 1/sqrt(2) at best
    assert corr_plus > 0.4
    assert corr_plus > corr_minus + 0.2
    assert np.corrcoef(np.abs(np.fft.fft2(img)).ravel() ** 2, (c**2).ravel())[0, 1] > 0.4


# ---------------------------------------------------------------------------------------------
# normalisation of (U, V, angle)


def test_normalised_keeps_the_quadratic_form() -> None:
    rng = np.random.default_rng(3)
    for _ in range(200):
        u, v = rng.uniform(2000.0, 40000.0, 2)
        angle = rng.uniform(-400.0, 400.0)
        phase = rng.uniform(-360.0, 720.0)
        p = CTFParams(u, v, angle, phase)
        q = p.normalised()
        assert q.defocus_u >= q.defocus_v
        assert 0.0 <= q.angle_deg < 180.0
        assert 0.0 <= q.phase_shift_deg < 360.0
        assert q.mean_defocus == pytest.approx(p.mean_defocus, rel=1e-12)
        assert q.defocus_u == pytest.approx(max(u, v), rel=1e-12)
        assert q.defocus_v == pytest.approx(min(u, v), rel=1e-12)
        np.testing.assert_allclose(q.matrix(), defocus_matrix(u, v, angle), rtol=0, atol=1e-7)
        assert np.cos(np.deg2rad(q.phase_shift_deg - phase)) == pytest.approx(1.0)


def test_swapped_axes_turn_the_angle_by_90() -> None:
    q = CTFParams(10000.0, 12000.0, 10.0).normalised()
    assert (q.defocus_u, q.defocus_v) == pytest.approx((12000.0, 10000.0))
    assert q.angle_deg == pytest.approx(100.0)
    q = CTFParams(12000.0, 10000.0, -30.0).normalised()
    assert q.angle_deg == pytest.approx(150.0)
    assert CTFParams(9000.0, 9000.0, 77.0).normalised().angle_deg == 0.0


def test_params_from_astig_cartesian_components() -> None:
    p = params_from_astig(10000.0, 0.0, 500.0)  # h = 500 along 2 theta = 90°
    assert (p.defocus_u, p.defocus_v, p.angle_deg) == pytest.approx((10500.0, 9500.0, 45.0))
    p = params_from_astig(10000.0, -500.0, 0.0)  # 2 theta = 180°
    assert (p.defocus_u, p.defocus_v, p.angle_deg) == pytest.approx((10500.0, 9500.0, 90.0))
    p = params_from_astig(10000.0, 0.0, -500.0)  # 2 theta = -90° -> 135°
    assert p.angle_deg == pytest.approx(135.0)
    assert p.astig_components == pytest.approx((0.0, -500.0), abs=1e-9)


# ---------------------------------------------------------------------------------------------
# magnification matrix


def test_mag_features_are_true_frame_features() -> None:
    rng = np.random.default_rng(7)
    m = _random_mag(rng)
    kx, ky = rng.uniform(-0.4, 0.4, (2, 1000))
    f = frequency_features(kx, ky, m)
    tx, ty = m @ np.stack([kx, ky])  # k_true = M k_obs
    np.testing.assert_allclose(f.k2, tx * tx + ty * ty, rtol=1e-12)
    np.testing.assert_allclose(f.c2, tx * tx - ty * ty, rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(f.s2, 2 * tx * ty, rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(f.k4, (tx * tx + ty * ty) ** 2, rtol=1e-12)  # Cs at |M k|^4


def test_observed_defocus_matrix_is_mt_d_m() -> None:
    """k_obs^T (M^T D M) k_obs == (M k_obs)^T D (M k_obs): chi both ways (Cs = 0)."""
    rng = np.random.default_rng(11)
    optics = Optics(pixel_size=1.0, cs_mm=0.0, amplitude_contrast=0.07)
    for _ in range(20):
        m = _random_mag(rng)
        true = CTFParams(*rng.uniform(5000.0, 30000.0, 2), rng.uniform(0.0, 180.0), 30.0)
        d_obs = m.T @ true.matrix() @ m
        obs = _params_from_matrix(d_obs, 30.0)
        kx, ky = rng.uniform(-0.4, 0.4, (2, 300))
        quad_obs = np.einsum("in,ij,jn->n", np.stack([kx, ky]), d_obs, np.stack([kx, ky]))
        kt = m @ np.stack([kx, ky])
        quad_true = np.einsum("in,ij,jn->n", kt, true.matrix(), kt)
        np.testing.assert_allclose(quad_obs, quad_true, rtol=1e-10)
        chi_true_frame = chi(frequency_features(kx, ky, m), true, optics)
        chi_obs_frame = chi(frequency_features(kx, ky), obs, optics)
        np.testing.assert_allclose(chi_true_frame, chi_obs_frame, rtol=1e-10, atol=1e-9)
        # and the inverse relation D_true = M^-T D_obs M^-1
        mi = np.linalg.inv(m)
        np.testing.assert_allclose(mi.T @ obs.matrix() @ mi, true.matrix(), rtol=1e-9)


def test_ctf_2d_applies_the_mag_matrix() -> None:
    m = np.array([[1.03, 0.012], [-0.008, 0.975]])
    shape = (96, 128)
    params = CTFParams(14000.0, 12500.0, 50.0, 0.0, 40.0)
    # Cs = 0: the anisomag CTF equals an isotropic-mag CTF with D_obs = M^T D M (no B-factor,
    # which is evaluated at |M k|)
    aniso0 = Optics(pixel_size=1.2, cs_mm=0.0, mag_matrix=m)
    iso0 = Optics(pixel_size=1.2, cs_mm=0.0)
    obs = _params_from_matrix(m.T @ params.matrix() @ m)
    flat = CTFParams(params.defocus_u, params.defocus_v, params.angle_deg)
    np.testing.assert_allclose(ctf_2d(shape, flat, aniso0), ctf_2d(shape, obs, iso0), atol=1e-9)
    # and it differs from ignoring M (the test can fail)
    assert np.max(np.abs(ctf_2d(shape, flat, iso0) - ctf_2d(shape, obs, iso0))) > 0.5
    # Cs and envelope are evaluated at |M k|
    aniso = Optics(pixel_size=1.2, cs_mm=2.7, amplitude_contrast=0.07, mag_matrix=m)
    kx, ky = frequency_grid(shape, 1.2)
    kx, ky = np.broadcast_arrays(kx, ky)
    tx, ty = m[0, 0] * kx + m[0, 1] * ky, m[1, 0] * kx + m[1, 1] * ky
    k2 = tx * tx + ty * ty
    lam = aniso.wavelength
    d = params.matrix()
    quad = d[0, 0] * tx * tx + 2 * d[0, 1] * tx * ty + d[1, 1] * ty * ty
    x = np.pi * lam * quad - 0.5 * np.pi * 2.7e7 * lam**3 * k2 * k2
    expect = _ctf_formula(x, 0.07) * np.exp(-40.0 * k2 / 4.0)
    np.testing.assert_allclose(ctf_2d(shape, params, aniso), expect, atol=1e-9)


def test_identity_mag_is_no_anisomag() -> None:
    assert not Optics(pixel_size=1.0).has_anisomag
    assert Optics(pixel_size=1.0, mag_matrix=((1.0, 0.0), (0.0, 1.01))).has_anisomag
    o = Optics(pixel_size=1.0, mag_matrix=np.array([[1.02, 0.01], [0.0, 0.99]]))
    assert o.mag_matrix == ((1.02, 0.01), (0.0, 0.99))
    np.testing.assert_array_equal(o.M, [[1.02, 0.01], [0.0, 0.99]])
    assert hash(o) == hash(Optics(pixel_size=1.0, mag_matrix=((1.02, 0.01), (0.0, 0.99))))


# ---------------------------------------------------------------------------------------------
# FFT layout


def test_frequency_grid_layout() -> None:
    kx, ky = frequency_grid((6, 8), 2.0)
    assert kx.shape == (1, 5) and ky.shape == (6, 1)
    np.testing.assert_allclose(kx[0], [0.0, 1 / 16, 2 / 16, 3 / 16, 4 / 16])
    np.testing.assert_allclose(ky[:, 0], [0.0, 1 / 12, 2 / 12, -3 / 12, -2 / 12, -1 / 12])
    kx, ky = frequency_grid((6, 8), 2.0, rfft=False)
    assert kx.shape == (1, 8)
    assert kx[0, 5] == pytest.approx(-3 / 16)
    assert ctf_2d((6, 8), CTFParams(1e4, 1e4), Optics(pixel_size=2.0)).shape == (6, 5)
    assert ctf_2d((6, 8), CTFParams(1e4, 1e4), Optics(pixel_size=2.0), rfft=False).shape == (6, 8)


def test_frequency_grid_matches_rfft2_of_a_cosine() -> None:
    ny, nx, apix = 48, 64, 1.7
    y, x = np.mgrid[0:ny, 0:nx]
    img = np.cos(2 * np.pi * (5 * x / nx + 3 * y / ny))  # (kx, ky) = (5/nx, 3/ny) px^-1
    p = np.abs(np.fft.rfft2(img)) ** 2
    r, c = np.unravel_index(np.argmax(p), p.shape)
    kx, ky = frequency_grid((ny, nx), apix)
    assert (r, c) == (3, 5)
    assert kx[0, c] == pytest.approx(5 / (nx * apix))
    assert ky[r, 0] == pytest.approx(3 / (ny * apix))


# ---------------------------------------------------------------------------------------------
# validation


@pytest.mark.parametrize(
    "kwargs",
    [
        {"pixel_size": -1.0},
        {"pixel_size": 0.0},
        {"pixel_size": float("nan")},
        {"pixel_size": 1.0, "voltage_kv": 0.0},
        {"pixel_size": 1.0, "voltage_kv": float("inf")},
        {"pixel_size": 1.0, "amplitude_contrast": 1.0},
        {"pixel_size": 1.0, "amplitude_contrast": -0.1},
        {"pixel_size": 1.0, "mag_matrix": ((1.0, 2.0), (0.5, 1.0))},  # singular
        {"pixel_size": 1.0, "mag_matrix": ((0.0, 0.0), (0.0, 0.0))},
        {"pixel_size": 1.0, "mag_matrix": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0))},
        {"pixel_size": 1.0, "mag_matrix": ((1.0, float("nan")), (0.0, 1.0))},
    ],
)
def test_optics_validation(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        Optics(**kwargs)
