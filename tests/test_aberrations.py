"""RELION 3.1+ higher-order aberrations: Zernike definitions, beam tilt, and RELION's own numbers.

The reference data (``../shared/data/relion_ctfrefine``) are 500 particles simulated with known
anisomag, beam tilt, trefoil and a quartic even phase, and what RELION 5 CtfRefine fitted from
them, pass by pass, with the per-pixel phase images it wrote (``docs/aberrations.md``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from anisoctf.io import labels as L
from anisoctf.io.star_tables import read_star_blocks
from anisoctf.optics.aberrations import (
    Aberrations,
    aberration_terms,
    even_index_to_mn,
    even_phase_rad,
    extract_tilt,
    insert_tilt,
    n_even_coeffs,
    n_odd_coeffs,
    odd_index_to_mn,
    odd_phase_rad,
    phase_image,
    zernike,
)
from anisoctf.optics.ctf import electron_wavelength
from anisoctf.optics.kernel import (
    CTF_SIGN,
    CTFConstants,
    chi_rad,
    ctf_from_chi,
    frequency_features,
    true_frequencies,
)
from anisoctf.optics.kernel import (
    odd_phase_rad as kernel_odd_phase,
)

CS_MM = 2.7


def relion_wavelength(kv: float) -> float:
    """RELION's electron wavelength (Å), ``CTF::initialise`` in ``src/ctf.cpp``."""
    v = kv * 1e3
    return 12.2643247 / math.sqrt(v * (1.0 + v * 0.978466e-6))


LAM = relion_wavelength(300.0)


@pytest.fixture(scope="module")
def ctfrefine() -> Path:
    folder = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "relion_ctfrefine"
    if not folder.is_dir():
        pytest.skip(f"RELION CtfRefine reference data not found at {folder}")
    return folder


def _vector(text: object) -> list[float]:
    return [float(v) for v in str(text).strip().strip("[]").split(",")]


def _optics(folder: Path, name: str):
    blocks = read_star_blocks(folder / "relion" / name / "particles_ctf_refine.star")
    return blocks["optics"].iloc[0]


def _matrix(row) -> np.ndarray:
    return np.array([[row.rlnMagMat00, row.rlnMagMat01], [row.rlnMagMat10, row.rlnMagMat11]])


def _relion_grid(size: int, angpix: float, mag: np.ndarray):
    """True-frame frequencies of RELION's decentred (full, origin at ``size/2``) phase images."""
    c = (np.arange(size) - size // 2) / (size * angpix)
    kx, ky = np.meshgrid(c, c)
    inner = np.abs(np.arange(size) - size // 2) < size // 2 - 1  # RELION cannot trust Nyquist
    return true_frequencies(kx, ky, mag), inner[:, None] & inner[None, :]


# ------------------------------------------------------------------ definitions


def test_index_orders_are_relions():
    assert [odd_index_to_mn(i) for i in range(12)] == [
        (-1, 1), (1, 1), (-3, 3), (-1, 3), (1, 3), (3, 3),
        (-5, 5), (-3, 5), (-1, 5), (1, 5), (3, 5), (5, 5),
    ]  # fmt: skip
    assert [even_index_to_mn(i) for i in range(16)] == [
        (0, 0), (-2, 2), (0, 2), (2, 2), (-4, 4), (-2, 4), (0, 4), (2, 4), (4, 4),
        (-6, 6), (-4, 6), (-2, 6), (0, 6), (2, 6), (4, 6), (6, 6),
    ]  # fmt: skip
    assert (n_odd_coeffs(3), n_odd_coeffs(5), n_even_coeffs(4), n_even_coeffs(6)) == (6, 12, 9, 16)


def test_unnormalised_zernike_closed_forms():
    rng = np.random.default_rng(0)
    kx, ky = rng.uniform(-0.6, 0.6, (2, 200))
    r2 = kx**2 + ky**2
    closed = {
        (0, 0): np.ones_like(kx),
        (-1, 1): ky,
        (1, 1): kx,
        (-2, 2): 2 * kx * ky,
        (0, 2): 2 * r2 - 1,
        (2, 2): kx**2 - ky**2,
        (-1, 3): (3 * r2 - 2) * ky,
        (1, 3): (3 * r2 - 2) * kx,
        (-3, 3): 3 * kx**2 * ky - ky**3,
        (3, 3): kx**3 - 3 * kx * ky**2,
        (0, 4): 6 * r2**2 - 6 * r2 + 1,
        (4, 4): kx**4 - 6 * kx**2 * ky**2 + ky**4,
        (-4, 4): 4 * kx**3 * ky - 4 * kx * ky**3,
    }
    for (m, n), want in closed.items():
        np.testing.assert_allclose(zernike(m, n, kx, ky), want, atol=1e-13, err_msg=f"Z{n}^{m}")
    assert float(zernike(0, 2, 0.0, 0.0)) == -1.0  # defined at the origin (phi = 0)


def test_truth_even_vector_is_purely_quartic():
    """Z0^0 = −3, Z2^0 = −4.5, Z4^0 = −1.5 cancel every power but |k|⁴: −9|k|⁴ (+ Z4^±4)."""
    even = [-3.0, 0.0, -4.5, 0.0, 4.0, 0.0, -1.5, 0.0, -6.0]
    rng = np.random.default_rng(1)
    kx, ky = rng.uniform(-0.5, 0.5, (2, 100))
    want = -9 * (kx**2 + ky**2) ** 2 + 4 * (4 * kx**3 * ky - 4 * kx * ky**3)
    want += -6 * (kx**4 - 6 * kx**2 * ky**2 + ky**4)
    np.testing.assert_allclose(even_phase_rad(even, kx, ky), want, atol=1e-12)


def test_beam_tilt_is_the_cs_coma_of_a_tilted_beam():
    """Inserted tilt τ gives the odd phase −2π·Cs·λ²·|k|²(k·τ) (Cs in Å, τ in rad), exactly."""
    tx, ty = -0.3, 0.2
    odd = insert_tilt([], tx, ty, CS_MM, LAM)
    rng = np.random.default_rng(2)
    kx, ky = rng.uniform(-0.5, 0.5, (2, 100))
    want = -2 * np.pi * (CS_MM * 1e7) * LAM**2 * (kx**2 + ky**2) * (kx * tx + ky * ty) * 1e-3
    np.testing.assert_allclose(odd_phase_rad(odd, kx, ky), want, rtol=1e-12, atol=1e-14)
    rest, ex, ey = extract_tilt(
        insert_tilt([1.0, 2.0, 3.0, 0, 0, 4.0], tx, ty, CS_MM, LAM), CS_MM, LAM
    )
    np.testing.assert_allclose(rest, [1.0, 2.0, 3.0, 0.0, 0.0, 4.0], atol=1e-12)
    assert (ex, ey) == pytest.approx((tx, ty), abs=1e-12)


def test_kernel_terms_give_relions_ctf_and_phase_factor():
    """chi with the even terms reproduces RELION's ``−sin(gamma + Σ e Z)`` (up to CTF_SIGN)."""
    ab = Aberrations(beam_tilt_mrad=(-0.3, 0.2), odd=(0, 0, -5, 0, 0, 3), even=(-3, 0, -4.5, 0, 4))
    terms = aberration_terms(ab, CS_MM, LAM)
    c = np.fft.fftfreq(32, 1.0)
    kx, ky = np.meshgrid(c, c)
    mag = np.array([[1.01, 0.004], [0.003, 0.995]])
    feats = frequency_features(kx, ky, mag)
    k_true = true_frequencies(kx, ky, mag)
    const = CTFConstants(LAM, CS_MM * 1e7, 0.1)
    dfu, dfv, az = 12000.0, 11000.0, np.deg2rad(30.0)
    z, a = (dfu + dfv) / 2, (dfu - dfv) / 2
    chi = chi_rad(feats, const, z, a * np.cos(2 * az), a * np.sin(2 * az), 0.0, terms, k_true)
    # RELION (src/ctf.cpp, src/ctf.h): gamma = K1·kᵀAk + K2·|k|⁴ − K3 + offset, A from −Δf
    q = np.array([[np.cos(az), np.sin(az)], [-np.sin(az), np.cos(az)]])
    a_mat = q.T @ np.diag([-dfu, -dfv]) @ q
    kxt, kyt = k_true
    gamma = (
        np.pi * LAM * (a_mat[0, 0] * kxt**2 + 2 * a_mat[0, 1] * kxt * kyt + a_mat[1, 1] * kyt**2)
    )
    gamma += 0.5 * np.pi * CS_MM * 1e7 * LAM**3 * (kxt**2 + kyt**2) ** 2
    gamma -= math.atan(0.1 / math.sqrt(0.99))
    gamma += even_phase_rad(ab.even, kxt, kyt)
    np.testing.assert_allclose(CTF_SIGN * ctf_from_chi(chi, const), -np.sin(gamma), atol=1e-9)
    odd = kernel_odd_phase(terms, k_true)
    want = odd_phase_rad(insert_tilt(ab.odd, -0.3, 0.2, CS_MM, LAM), kxt, kyt)
    np.testing.assert_allclose(odd, want, atol=1e-12)
    np.testing.assert_allclose(odd_phase_rad(ab.odd_with_tilt(CS_MM, LAM), -kxt, -kyt), -odd)
    assert aberration_terms(Aberrations(), CS_MM, LAM).empty


def test_aberrations_record_validates():
    with pytest.raises(ValueError, match="finite"):
        Aberrations(odd=(float("nan"),))
    with pytest.raises(ValueError, match="2 values"):
        Aberrations(beam_tilt_mrad=(1.0,))  # type: ignore[arg-type]
    assert Aberrations(odd=(0.0, 0.0)).empty


# ------------------------------------------------------------------ RELION's own numbers


def test_insert_tilt_reproduces_truth_odd_vector(ctfrefine):
    truth = json.loads((ctfrefine / "truth.json").read_text())
    got = insert_tilt(truth["odd_zernike_input"], *truth["beam_tilt_mrad"], CS_MM, LAM)
    np.testing.assert_allclose(got, truth["odd_zernike_with_tilt"], atol=1e-8)
    # this package's wavelength differs from RELION's by ~6e-6 relative; the vector by < 2e-4
    ours = insert_tilt(truth["odd_zernike_input"], *truth["beam_tilt_mrad"], CS_MM,
                       electron_wavelength(300.0))  # fmt: skip
    np.testing.assert_allclose(ours, truth["odd_zernike_with_tilt"], atol=2e-4)


def test_odd_phase_matches_relions_fit_image(ctfrefine):
    """pass3's iter-fit image = Σ c Z(M k) of its STAR odd vector with its STAR tilt inserted."""
    row = _optics(ctfrefine, "pass3_tilt_odd")
    mag = _matrix(_optics(ctfrefine, "pass2_aniso"))  # the matrix pass 3 ran with
    img = mrcfile.read(
        ctfrefine / "relion/pass3_tilt_odd/beamtilt_delta-phase_iter-fit_optics-group_1_N-3.mrc"
    ).astype(float)
    odd_star = _vector(row.rlnOddZernike)
    assert odd_star[3] == odd_star[4] == 0.0  # RELION stores Z3^±1 as beam tilt
    odd = insert_tilt(odd_star, row.rlnBeamTiltX, row.rlnBeamTiltY, CS_MM, LAM)
    (kx, ky), inner = _relion_grid(img.shape[0], 1.0, mag)
    diff = (img - odd_phase_rad(odd, kx, ky))[inner]
    assert np.abs(img[inner]).max() > 5.0
    assert np.abs(diff).max() < 2e-4  # STAR's 6 digits and the float32 image
    # without the matrix, or with the tilt left out, it is far off
    unmagnified = odd_phase_rad(odd, *_relion_grid(96, 1.0, np.eye(2))[0])
    assert np.abs(img[inner] - unmagnified[inner]).max() > 0.05
    assert np.abs(img[inner] - odd_phase_rad(odd_star, kx, ky)[inner]).max() > 1.0


def test_even_phase_matches_relions_fit_image(ctfrefine):
    row = _optics(ctfrefine, "pass4_even")
    mag = _matrix(_optics(ctfrefine, "pass3_tilt_odd"))
    img = mrcfile.read(
        ctfrefine / "relion/pass4_even/aberr_delta-phase_iter-fit_optics-group_1_N-4.mrc"
    ).astype(float)
    (kx, ky), inner = _relion_grid(img.shape[0], 1.0, mag)
    got = even_phase_rad(_vector(row.rlnEvenZernike), kx, ky)
    np.testing.assert_allclose(img[inner], got[inner], atol=1e-6)
    assert np.abs(img[inner]).max() > 0.5
    drawn = phase_image(_vector(row.rlnEvenZernike), "even", 96, 1.0, mag)
    np.testing.assert_allclose(drawn[inner], img[inner], atol=1e-6)


def test_phase_image_draws_relions_odd_layout(ctfrefine):
    row = _optics(ctfrefine, "pass3_tilt_odd")
    mag = _matrix(_optics(ctfrefine, "pass2_aniso"))
    img = mrcfile.read(
        ctfrefine / "relion/pass3_tilt_odd/beamtilt_delta-phase_lin-fit_optics-group_1_N-3.mrc"
    ).astype(float)
    # the linear fit's own coefficients are not written; the iter-fit's are: they differ a bit
    odd = insert_tilt(_vector(row.rlnOddZernike), row.rlnBeamTiltX, row.rlnBeamTiltY, CS_MM, LAM)
    drawn = phase_image(odd, "odd", 96, 1.0, mag)
    inner = _relion_grid(96, 1.0, mag)[1]
    assert drawn.shape == img.shape
    corr = np.corrcoef(drawn[inner], img[inner])[0, 1]
    assert corr > 0.999  # measured 0.99995
    np.testing.assert_allclose(drawn[48, 48], 0.0)  # the origin sits at size/2


def test_relions_fits_agree_with_truth_read_our_way(ctfrefine):
    """Truth's vectors read in RELION's order give RELION's fitted phases over 20–3 Å."""
    truth = json.loads((ctfrefine / "truth.json").read_text())
    mag_t = np.asarray(truth["mag_matrix"])
    row3, row4 = _optics(ctfrefine, "pass3_tilt_odd"), _optics(ctfrefine, "pass4_even")
    c = np.fft.fftfreq(96, 1.0)
    kx, ky = np.meshgrid(c, c)
    band = (np.hypot(kx, ky) >= 1 / 20) & (np.hypot(kx, ky) <= 1 / 3)
    kt = true_frequencies(kx, ky, mag_t)
    kr = true_frequencies(kx, ky, _matrix(row4))
    odd_r = insert_tilt(
        _vector(row3.rlnOddZernike), row3.rlnBeamTiltX, row3.rlnBeamTiltY, CS_MM, LAM
    )
    d_odd = odd_phase_rad(truth["odd_zernike_with_tilt"], *kt) - odd_phase_rad(odd_r, *kr)
    even_r = _vector(row4.rlnEvenZernike)
    d_even = even_phase_rad(truth["even_zernike"], *kt) - even_phase_rad(even_r, *kr)
    d_even -= d_even[band].mean()  # a constant even phase is not identifiable from particles
    assert np.sqrt(np.mean(d_odd[band] ** 2)) < 0.005  # measured 0.0020
    assert np.sqrt(np.mean(d_even[band] ** 2)) < 0.02  # measured 0.0100


# ------------------------------------------------------------------ STAR columns


def test_read_aberrations_from_real_relion_stars(shared_real):
    from anisoctf.io.star_optics import read_optics_aberrations, read_optics_star

    ab = read_optics_aberrations(shared_real / "cryodrgn" / "relion31.6opticsgroups.star")
    assert sorted(ab) == [1, 2, 3, 4, 5, 6]
    assert ab[1].beam_tilt_mrad == (0.657334, 0.884982)
    assert ab[1].odd == (1.70554063513, 1.2131261042, 2.54522458134, 0.0, 0.0, 3.56183614819)
    assert len(ab[6].even) == 9 and ab[6].even[0] == 0.917037189491
    assert ab[6].beam_tilt_mrad == (-1.28823, 2.446621)
    isecc = read_optics_aberrations(shared_real / "isecc" / "test.star")
    assert isecc[1].odd[2] == 34.3861477546 and isecc[1].even[-1] == -16.9851856858
    assert isecc[1].beam_tilt_mrad == (0.0, 0.0)
    # the optics record itself is unchanged by the new columns
    assert read_optics_star(shared_real / "isecc" / "test.star", "particles")[1].cs_mm == 0.0


def test_aberration_columns_round_trip_through_a_star(tmp_path, ctfrefine):
    from anisoctf.io.star_optics import (
        format_zernike_vector,
        read_optics_aberrations,
        set_aberration_columns,
    )
    from anisoctf.io.star_tables import write_star_tables

    src = ctfrefine / "particles.star"
    blocks = read_star_blocks(src)
    assert read_optics_aberrations(src)[1].empty  # the input carries no aberration
    want = Aberrations((-0.3, 0.2), (0.0, 0.0, -5.0, 0.0, 0.0, 3.0), (-3.0, 0.0, -4.5, 0.1 / 3))
    blocks["optics"] = set_aberration_columns(blocks["optics"], {1: want})
    out = tmp_path / "with_aberrations.star"
    write_star_tables(out, blocks)
    text = out.read_text()
    assert "[0,0,-5,0,0,3]" in text and "[-3,0,-4.5,0.0333333333333]" in text
    got = read_optics_aberrations(out)[1]
    assert got.beam_tilt_mrad == want.beam_tilt_mrad and got.odd == want.odd
    np.testing.assert_allclose(got.even, want.even, rtol=1e-11)
    # RELION's own output reads back to what it wrote
    row = _optics(ctfrefine, "pass4_even")
    ab = read_optics_aberrations(ctfrefine / "relion/pass4_even/particles_ctf_refine.star")[1]
    assert format_zernike_vector(list(ab.even)) == str(row.rlnEvenZernike).strip()
    assert ab.beam_tilt_mrad == (row.rlnBeamTiltX, row.rlnBeamTiltY)
    # an empty group is written as zeros of RELION's default lengths, not "[]"
    empty = set_aberration_columns(read_star_blocks(src)["optics"], {1: Aberrations()})
    assert empty[L.ODD_ZERNIKE].iloc[0] == "[0,0,0,0,0,0]"


def test_bad_aberration_columns_are_one_line_errors(tmp_path):
    from anisoctf.errors import InputError
    from anisoctf.io.star_optics import parse_zernike_vector, read_optics_aberrations

    assert parse_zernike_vector("[1,2.5,-3]") == (1.0, 2.5, -3.0)
    assert parse_zernike_vector(4.0) == (4.0,) and parse_zernike_vector("[]") == ()
    head = "data_optics\n\nloop_\n_rlnOpticsGroup\n_rlnVoltage\n"
    bad = tmp_path / "bad.star"
    bad.write_text(head + "_rlnOddZernike\n1 300 [1,x,3]\n")
    with pytest.raises(InputError, match="rlnOddZernike.*fix the file"):
        read_optics_aberrations(bad)
    half = tmp_path / "half.star"
    half.write_text(head + "_rlnBeamTiltX\n1 300 0.5\n")
    with pytest.raises(InputError, match="rlnBeamTiltY"):
        read_optics_aberrations(half)
    with pytest.raises(ValueError, match="Cs = 0"):
        extract_tilt([0, 0, 0, 1.0, 1.0, 0], 0.0, LAM)


# ------------------------------------------------------------------ Cs ⇄ even Zernikes


def test_cs_change_as_even_zernikes_is_physically_invariant():
    """CTF phase with Cs + ΔCs equals the phase with Cs and the even vector, to 1e-6 rad."""
    from anisoctf.optics.aberrations import cs_change_to_even, even_to_cs_change

    c = np.fft.fftfreq(64, 0.8)
    kx, ky = np.meshgrid(c, c)
    mag = np.array([[1.01, 0.004], [0.003, 0.995]])
    feats, k_true = frequency_features(kx, ky, mag), true_frequencies(kx, ky, mag)
    for d_cs in (-0.0751, 0.3, 1.2):
        refined = CTFConstants(LAM, (CS_MM + d_cs) * 1e7, 0.1)
        nominal = CTFConstants(LAM, CS_MM * 1e7, 0.1)
        terms = aberration_terms(Aberrations(even=cs_change_to_even(d_cs, LAM)), CS_MM, LAM)
        a = chi_rad(feats, refined, 15000.0, 300.0, -200.0)
        b = chi_rad(feats, nominal, 15000.0, 300.0, -200.0, 0.0, terms, k_true)
        assert np.abs(a - b).max() < 1e-6
        back, rest = even_to_cs_change(cs_change_to_even(d_cs, LAM), LAM)
        assert back == pytest.approx(d_cs, rel=1e-12) and np.abs(rest).max() < 1e-12


def test_truth_even_phase_is_a_cs_change_plus_tetrafoil(ctfrefine):
    """truth.json's 'purely quartic' even vector is ΔCs = −0.0751 mm plus Z4^±4, nothing else."""
    from anisoctf.optics.aberrations import even_to_cs_change

    truth = json.loads((ctfrefine / "truth.json").read_text())
    d_cs, rest = even_to_cs_change(truth["even_zernike"], LAM)
    assert d_cs == pytest.approx(-9.0 / (0.5 * np.pi * 1e7 * LAM**3), rel=1e-12)
    assert d_cs == pytest.approx(-0.0751, abs=5e-5)
    np.testing.assert_allclose(rest, [0, 0, 0, 0, 4.0, 0, 0, 0, -6.0], atol=1e-12)
    # RELION's pass-4 fit read the same way: ΔCs within 2 % of the truth
    fitted = _vector(_optics(ctfrefine, "pass4_even").rlnEvenZernike)
    assert even_to_cs_change(fitted, LAM)[0] == pytest.approx(d_cs, rel=0.02)
