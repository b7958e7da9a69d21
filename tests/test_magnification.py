"""Tests for anisoctf.magnification: the matrix, the converters and the defocus transforms."""

from __future__ import annotations

import numpy as np
import pytest

from anisoctf.io.star_optics import from_relion_row, from_relion_table
from anisoctf.magnification import (
    MagMat,
    apparent_astigmatism,
    defocus_table_to_observed,
    defocus_table_to_true,
    defocus_to_observed,
    defocus_to_true,
    from_cistem,
    from_cryosparc_anisomag,
    from_motioncor2,
    from_relion,
    isotropic_scale,
    matrices_from_cryosparc_anisomag,
    to_cistem,
    to_cryosparc_anisomag,
    to_motioncor2,
    to_relion,
    transform_defocus_matrix,
    true_pixel_size,
)
from anisoctf.optics.ctf import (
    CTFParams,
    Optics,
    chi,
    defocus_matrix,
    frequency_features,
    frequency_grid,
)

TOL = 1e-9


def random_near_identity(rng: np.random.Generator, size: float = 0.03) -> MagMat:
    """A general (non-symmetric) matrix within ``size`` of the identity, det > 0."""
    return MagMat(np.eye(2) + rng.uniform(-size, size, (2, 2)))


def random_params(rng: np.random.Generator) -> CTFParams:
    u = rng.uniform(5000.0, 40000.0)
    v = u - rng.uniform(0.0, 2000.0)
    return CTFParams(u, v, rng.uniform(0.0, 180.0), rng.uniform(0.0, 90.0), rng.uniform(0, 80))


def angle_diff(a: float, b: float) -> float:
    """Distance between two axis angles modulo 180 degrees."""
    d = (a - b) % 180.0
    return min(d, 180.0 - d)


# --------------------------------------------------------------------------- MagMat


class TestMagMat:
    def test_validation(self) -> None:
        with pytest.raises(ValueError, match="2x2"):
            MagMat(np.eye(3))
        with pytest.raises(ValueError, match="finite"):
            MagMat([[1.0, np.nan], [0.0, 1.0]])
        with pytest.raises(ValueError, match="determinant"):
            MagMat([[1.0, 0.0], [0.0, -1.0]])  # a mirror
        with pytest.raises(ValueError, match="determinant"):
            MagMat([[1.0, 2.0], [0.5, 1.0]])  # singular

    def test_hashable_and_array(self) -> None:
        m = MagMat([[1.01, 0.002], [0.003, 0.99]])
        assert m == MagMat(np.array([[1.01, 0.002], [0.003, 0.99]]))
        assert len({m, MagMat(m.array)}) == 1
        np.testing.assert_array_equal(np.asarray(m), m.array)
        # the tuple layout plugs straight into Optics
        assert Optics(pixel_size=1.0, mag_matrix=m.matrix).M.tolist() == m.array.tolist()

    def test_identity(self) -> None:
        m = MagMat.identity()
        assert m.is_identity
        assert m.anisotropy_percent == 0.0
        assert m.axis_deg == 0.0
        assert m.scale == 1.0
        assert m.rotation_deg == 0.0

    @pytest.mark.parametrize(
        ("percent", "axis", "scale"),
        [(1.5, 30.0, 1.0), (0.2, 0.0, 0.98), (4.0, 179.0, 1.03), (1.0, 200.0, 1.0), (50, 95, 2.0)],
    )
    def test_from_anisotropy_round_trip(self, percent: float, axis: float, scale: float) -> None:
        m = MagMat.from_anisotropy(percent, axis, scale)
        assert m.anisotropy_percent == pytest.approx(percent, abs=TOL)
        assert angle_diff(m.axis_deg, axis % 180.0) < TOL
        assert m.scale == pytest.approx(scale, abs=TOL)
        assert m.rotation_deg == pytest.approx(0.0, abs=TOL)
        np.testing.assert_allclose(m.array, m.array.T, atol=1e-15)

    def test_from_anisotropy_random(self) -> None:
        rng = np.random.default_rng(1)
        for _ in range(200):
            p, ax, s = rng.uniform(0.01, 10), rng.uniform(0, 180), rng.uniform(0.9, 1.1)
            m = MagMat.from_anisotropy(p, ax, s)
            assert m.anisotropy_percent == pytest.approx(p, abs=TOL)
            assert angle_diff(m.axis_deg, ax) < 1e-7
            assert m.scale == pytest.approx(s, abs=TOL)

    def test_from_anisotropy_first_order_form(self) -> None:
        # to first order M = R diag(1 + a/2, 1 - a/2) R^T
        a = 0.015
        m = MagMat.from_anisotropy(100 * a, 0.0).array
        np.testing.assert_allclose(np.diag(m), [1 + a / 2, 1 - a / 2], atol=a**2)

    def test_from_anisotropy_rejects(self) -> None:
        with pytest.raises(ValueError):
            MagMat.from_anisotropy(-1.0, 0.0)
        with pytest.raises(ValueError):
            MagMat.from_anisotropy(1.0, 0.0, scale=0.0)

    def test_axis_is_most_stretched_observed_direction(self) -> None:
        rng = np.random.default_rng(2)
        for _ in range(50):
            m = random_near_identity(rng)
            t = np.deg2rad(np.arange(0.0, 180.0, 0.01))
            gain = np.linalg.norm(m.array @ np.stack([np.cos(t), np.sin(t)]), axis=0)
            best = float(np.rad2deg(t[np.argmax(gain)]))
            assert angle_diff(m.axis_deg, best) < 0.02
            s1, s2 = m.singular_values
            assert gain.max() == pytest.approx(s1, rel=1e-8)
            assert gain.min() == pytest.approx(s2, rel=1e-8)

    def test_polar_decomposition(self) -> None:
        rng = np.random.default_rng(3)
        for _ in range(50):
            m = random_near_identity(rng, 0.2)
            r, s = m.rotation_part, m.symmetric_part
            np.testing.assert_allclose(r @ s, m.array, atol=1e-14)
            np.testing.assert_allclose(r.T @ r, np.eye(2), atol=1e-14)
            assert np.linalg.det(r) == pytest.approx(1.0)
            np.testing.assert_allclose(s, s.T, atol=1e-14)
            assert np.all(np.linalg.eigvalsh(s) > 0)
            # the axis is the principal direction of S with the larger eigenvalue
            w, v = np.linalg.eigh(s)
            vec_angle = np.rad2deg(np.arctan2(v[1, 1], v[0, 1])) % 180
            assert angle_diff(m.axis_deg, vec_angle) < 1e-7

    def test_rotation_deg(self) -> None:
        t = np.deg2rad(7.0)
        rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
        sym = MagMat.from_anisotropy(2.0, 40.0, 1.01)
        m = MagMat(rot @ sym.array)
        assert m.rotation_deg == pytest.approx(7.0, abs=TOL)
        np.testing.assert_allclose(m.symmetric_part, sym.array, atol=1e-14)
        assert m.anisotropy_percent == pytest.approx(2.0, abs=TOL)
        assert angle_diff(m.axis_deg, 40.0) < TOL  # right polar factor: observed frame

    def test_normalised_inverse_compose(self) -> None:
        rng = np.random.default_rng(4)
        m = random_near_identity(rng)
        n = m.normalised()
        assert np.linalg.det(n.array) == pytest.approx(1.0, abs=1e-14)
        assert n.anisotropy_percent == pytest.approx(m.anisotropy_percent, abs=TOL)
        np.testing.assert_allclose((m @ m.inverse()).array, np.eye(2), atol=1e-14)
        assert m.inverse().scale == pytest.approx(1.0 / m.scale)
        assert "anisotropy" in m.describe()


# --------------------------------------------------------------------------- converters


class TestRelion:
    def test_identity_mapping(self) -> None:
        m = from_relion(1.011472, 0.004231, 0.004560, 1.008858)
        assert m.matrix == ((1.011472, 0.004231), (0.004560, 1.008858))
        assert to_relion(m) == {
            "rlnMagMat00": 1.011472,
            "rlnMagMat01": 0.004231,
            "rlnMagMat10": 0.004560,
            "rlnMagMat11": 1.008858,
        }

    def test_round_trip_random(self) -> None:
        rng = np.random.default_rng(5)
        for _ in range(100):
            m = random_near_identity(rng)
            back = from_relion_row(to_relion(m))
            np.testing.assert_allclose(back.array, m.array, atol=TOL, rtol=0)

    def test_row_spellings(self) -> None:
        row = {"_rlnMagMat00": 1.01, "_rlnMagMat01": 0.0, "_rlnMagMat10": 0.0, "_rlnMagMat11": 0.99}
        assert from_relion_row(row).matrix == ((1.01, 0.0), (0.0, 0.99))
        assert from_relion_row({"rlnVoltage": 300.0}).is_identity  # RELION's default
        with pytest.raises(ValueError, match="missing"):
            from_relion_row({"rlnMagMat00": 1.0, "rlnMagMat11": 1.0})


class TestCryosparc:
    def test_zero_is_identity(self) -> None:
        assert from_cryosparc_anisomag([0.0, 0.0, 0.0, 0.0]).is_identity
        np.testing.assert_array_equal(to_cryosparc_anisomag(MagMat.identity()), np.zeros(4))

    def test_pixel_relabel_example(self) -> None:
        # cryosparc-tools docs/examples/magnification.ipynb: particles of pixel 0.876667 Å
        # relabelled 0.6575 Å get anisomag (I + 0) * 0.876667/0.6575 - I = 0.33333 I.
        # RELION's M for images of true pixel p2 labelled p1 is (p1/p2) I (k_true = M k_obs).
        p1, p2 = 0.6575, 0.876667
        m_relion = MagMat(np.eye(2) * p1 / p2)
        np.testing.assert_allclose(
            to_cryosparc_anisomag(m_relion), [p2 / p1 - 1, 0, 0, p2 / p1 - 1], atol=1e-12
        )
        assert to_cryosparc_anisomag(m_relion)[0] == pytest.approx(0.33333337, abs=1e-6)
        # and the true pixel size of those images is recovered from M
        assert true_pixel_size(p1, m_relion) == pytest.approx(p2)

    def test_row_major_layout(self) -> None:
        # A = I + anisomag is read in C order: element [1] is A[0, 1]
        m = from_cryosparc_anisomag([0.0, 0.01, 0.0, 0.0])
        np.testing.assert_allclose(np.linalg.inv(m.array), [[1.0, 0.01], [0.0, 1.0]], atol=1e-15)

    def test_round_trip_random(self) -> None:
        rng = np.random.default_rng(6)
        for _ in range(100):
            m = random_near_identity(rng)
            back = from_cryosparc_anisomag(to_cryosparc_anisomag(m))
            np.testing.assert_allclose(back.array, m.array, atol=TOL, rtol=0)

    def test_vectorised(self) -> None:
        rng = np.random.default_rng(7)
        mats = [random_near_identity(rng) for _ in range(20)]
        table = np.stack([to_cryosparc_anisomag(m) for m in mats])
        got = matrices_from_cryosparc_anisomag(table)
        np.testing.assert_allclose(got, np.stack([m.array for m in mats]), atol=TOL)
        with pytest.raises(ValueError):
            matrices_from_cryosparc_anisomag(np.zeros(4))

    def test_rejects(self) -> None:
        with pytest.raises(ValueError):
            from_cryosparc_anisomag([0.0, 0.0, 0.0])
        with pytest.raises(ValueError):
            from_cryosparc_anisomag([-1.0, 0.0, 0.0, 0.0])  # I + A singular


def cistem_sample_position(x: float, y: float, angle_deg: float, major: float, minor: float):
    """Where cisTEM's CorrectMagnificationDistortion reads the input for output pixel (x, y).

    The arithmetic of the loop body in ``Image::CorrectMagnificationDistortion`` with the box
    centre at the origin: rotate with sin(-θ)/cos(-θ), scale by 1/major, 1/minor, rotate back.
    """
    t = np.deg2rad(angle_deg)
    nx = y * np.sin(-t) + x * np.cos(-t)
    ny = y * np.cos(-t) - x * np.sin(-t)
    nx /= major
    ny /= minor
    fx = ny * np.sin(t) + nx * np.cos(t)
    fy = ny * np.cos(t) - nx * np.sin(t)
    return fx, fy


class TestCistemMotioncor2:
    def test_matrix_matches_cistem_sampling(self) -> None:
        # corrected(p) = observed(C p); M must equal C (derivation in from_cistem)
        angle, major, minor = 25.0, 1.012, 0.993
        m = from_cistem(angle, major, minor).array
        for x, y in [(1.0, 0.0), (0.0, 1.0), (3.0, -2.0)]:
            np.testing.assert_allclose(
                cistem_sample_position(x, y, angle, major, minor), m @ [x, y], atol=1e-14
            )

    def test_plane_wave_is_restored(self) -> None:
        # a true plane wave recorded through M (k_obs = M^-1 k_true) comes back out of cisTEM's
        # correction with the true frequency
        angle, major, minor = 63.0, 1.02, 0.99
        m = from_cistem(angle, major, minor)
        k_true = np.array([0.07, -0.03])
        k_obs = np.linalg.solve(m.array, k_true)
        rng = np.random.default_rng(8)
        for x, y in rng.uniform(-50, 50, (10, 2)):
            sx, sy = cistem_sample_position(x, y, angle, major, minor)
            corrected = np.cos(2 * np.pi * (k_obs @ [sx, sy]))
            assert corrected == pytest.approx(np.cos(2 * np.pi * (k_true @ [x, y])), abs=1e-9)

    def test_major_axis_direction(self) -> None:
        # the major axis (image stretched by `major`) is (cos θ, -sin θ): M has 1/major there,
        # and anisoctf's axis_deg (largest singular value) is perpendicular to it
        angle, major, minor = 20.0, 1.02, 1.0
        m = from_cistem(angle, major, minor)
        u = np.array([np.cos(np.deg2rad(angle)), -np.sin(np.deg2rad(angle))])
        np.testing.assert_allclose(m.array @ u, u / major, atol=1e-15)
        assert angle_diff(m.axis_deg, -angle + 90.0) < TOL
        assert m.anisotropy_percent == pytest.approx(200 * (1.02 - 1) / (1.02 + 1), abs=TOL)

    def test_round_trip(self) -> None:
        rng = np.random.default_rng(9)
        for _ in range(100):
            ang = rng.uniform(0, 180)
            major = rng.uniform(1.0, 1.05)
            minor = rng.uniform(0.95, major)
            got = to_cistem(from_cistem(ang, major, minor))
            assert angle_diff(got[0], ang) < 1e-7
            assert got[1] == pytest.approx(major, abs=TOL)
            assert got[2] == pytest.approx(minor, abs=TOL)
            # MagMat -> cisTEM -> MagMat for symmetric matrices
            m = MagMat.from_anisotropy(
                rng.uniform(0.1, 5), rng.uniform(0, 180), rng.uniform(0.97, 1.03)
            )
            np.testing.assert_allclose(from_cistem(*to_cistem(m)).array, m.array, atol=TOL)
            np.testing.assert_allclose(from_motioncor2(*to_motioncor2(m)).array, m.array, atol=TOL)

    def test_motioncor2_argument_order(self) -> None:
        assert from_motioncor2(1.02, 0.99, 33.0) == from_cistem(33.0, 1.02, 0.99)
        assert to_motioncor2(from_cistem(33.0, 1.02, 0.99)) == pytest.approx((1.02, 0.99, 33.0))

    def test_pixel_ratio_and_rotation_guard(self) -> None:
        m = from_cistem(10.0, 1.01, 1.0, pixel_ratio=1.02)
        assert m.scale == pytest.approx(1.02 / np.sqrt(1.01))
        t = np.deg2rad(3.0)
        rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
        with pytest.raises(ValueError, match="rotation"):
            to_cistem(rot @ MagMat.from_anisotropy(1.0, 0.0).array)
        with pytest.raises(ValueError):
            from_cistem(0.0, 0.0, 1.0)


# --------------------------------------------------------------------------- defocus transforms


class TestDefocusTransforms:
    def test_round_trip_random(self) -> None:
        rng = np.random.default_rng(10)
        for _ in range(300):
            p = random_params(rng).normalised()
            m = random_near_identity(rng)
            t = defocus_to_true(p, m)
            back = defocus_to_observed(t, m)
            assert back.defocus_u == pytest.approx(p.defocus_u, abs=TOL * 1e4)
            assert back.defocus_v == pytest.approx(p.defocus_v, abs=TOL * 1e4)
            if p.astigmatism > 1.0:
                assert angle_diff(back.angle_deg, p.angle_deg) < 1e-7
            assert back.phase_shift_deg == p.phase_shift_deg
            assert back.bfactor == p.bfactor
            assert t.defocus_u >= t.defocus_v and 0.0 <= t.angle_deg < 180.0
            # matrices agree to rounding (Å)
            np.testing.assert_allclose(back.matrix(), p.matrix(), atol=1e-7)

    def test_quadratic_form_identity(self) -> None:
        rng = np.random.default_rng(11)
        for _ in range(50):
            p = random_params(rng)
            m = random_near_identity(rng).array
            t = defocus_to_true(p, m)
            k = rng.normal(size=(2, 100)) * 0.1
            lhs = np.einsum("in,ij,jn->n", k, p.matrix(), k)
            mk = m @ k
            rhs = np.einsum("in,ij,jn->n", mk, t.matrix(), mk)
            np.testing.assert_allclose(lhs, rhs, rtol=1e-12, atol=1e-9)

    def test_matches_matrix_formula(self) -> None:
        rng = np.random.default_rng(12)
        p = random_params(rng)
        m = random_near_identity(rng).array
        expected = np.linalg.inv(m).T @ p.matrix() @ np.linalg.inv(m)
        np.testing.assert_allclose(defocus_to_true(p, m).matrix(), expected, atol=1e-8)
        np.testing.assert_allclose(transform_defocus_matrix(p.matrix(), m, "true"), expected)
        np.testing.assert_allclose(
            transform_defocus_matrix(expected, m, "observed"), p.matrix(), atol=1e-8
        )
        with pytest.raises(ValueError):
            transform_defocus_matrix(expected, m, "sideways")

    def test_ctf_phase_agrees_with_optics_model(self) -> None:
        # with Cs = 0 the CTF phase of (true params, M) equals that of (observed params, I)
        rng = np.random.default_rng(13)
        m = random_near_identity(rng)
        p_true = CTFParams(21000.0, 19500.0, 31.0, 20.0)
        p_obs = defocus_to_observed(p_true, m)
        optics_m = Optics(pixel_size=1.1, cs_mm=0.0, mag_matrix=m.matrix)
        optics_i = Optics(pixel_size=1.1, cs_mm=0.0)
        kx, ky = frequency_grid((64, 64), 1.1)
        chi_m = chi(frequency_features(kx, ky, m.array), p_true, optics_m)
        chi_i = chi(frequency_features(kx, ky), p_obs, optics_i)
        np.testing.assert_allclose(chi_m, chi_i, atol=1e-9)

    def test_degenerate_no_astigmatism(self) -> None:
        # scale + rotation only: a round CTF stays round, angle reported as 0
        t = np.deg2rad(12.0)
        m = 1.01 * np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
        got = defocus_to_true(CTFParams(15000.0, 15000.0, 77.0), m)
        assert got.defocus_u == pytest.approx(15000.0 / 1.01**2, abs=TOL * 1e4)
        assert got.defocus_v == pytest.approx(15000.0 / 1.01**2, abs=TOL * 1e4)
        assert got.angle_deg == 0.0
        # identity leaves everything alone (angle of a round CTF normalised to 0)
        same = defocus_to_true(CTFParams(15000.0, 15000.0, 77.0, 5.0, 30.0), MagMat.identity())
        assert same == CTFParams(15000.0, 15000.0, 0.0, 5.0, 30.0)
        # a round observed CTF seen through an anisotropic M is astigmatic in the true frame
        aniso = defocus_to_true(CTFParams(15000.0, 15000.0, 0.0), MagMat.from_anisotropy(1.0, 60))
        r2 = 1.005 / 0.995  # squared singular-value ratio of from_anisotropy(1 %)
        assert aniso.astigmatism == pytest.approx(15000.0 * (r2 - 1 / r2), rel=1e-12)
        assert angle_diff(aniso.angle_deg, 150.0) < 1e-7

    def test_table_matches_scalar(self) -> None:
        rng = np.random.default_rng(14)
        n = 500
        u = rng.uniform(5000, 40000, n)
        v = u - rng.uniform(0, 2000, n)
        ang = rng.uniform(-180, 360, n)
        v[:5] = u[:5]  # include round CTFs
        m = random_near_identity(rng)
        tu, tv, ta = defocus_table_to_true(u, v, ang, m)
        for i in range(0, n, 17):
            s = defocus_to_true(CTFParams(u[i], v[i], ang[i]), m)
            assert tu[i] == pytest.approx(s.defocus_u, abs=1e-7)
            assert tv[i] == pytest.approx(s.defocus_v, abs=1e-7)
            assert angle_diff(ta[i], s.angle_deg) < 1e-7
        assert np.all(tu >= tv) and np.all((ta >= 0) & (ta < 180))
        ou, ov, oa = defocus_table_to_observed(tu, tv, ta, m)
        d_in = np.stack([defocus_matrix(a, b, c) for a, b, c in zip(u, v, ang, strict=True)])
        d_out = np.stack([defocus_matrix(a, b, c) for a, b, c in zip(ou, ov, oa, strict=True)])
        np.testing.assert_allclose(d_out, d_in, atol=1e-7)

    def test_table_per_row_matrices(self) -> None:
        rng = np.random.default_rng(15)
        mats = np.stack([random_near_identity(rng).array for _ in range(30)])
        u = rng.uniform(8000, 30000, 30)
        v = u - 300.0
        ang = rng.uniform(0, 180, 30)
        tu, tv, ta = defocus_table_to_true(u, v, ang, mats)
        for i in range(30):
            s = defocus_to_true(CTFParams(u[i], v[i], ang[i]), mats[i])
            assert (tu[i], tv[i]) == pytest.approx((s.defocus_u, s.defocus_v), abs=1e-7)
        with pytest.raises(ValueError):
            defocus_table_to_true(u, v, ang, mats[:, :, ::-1])  # column swap: a mirror
        with pytest.raises(ValueError):
            defocus_table_to_true(u, v, ang, np.zeros((30, 3, 3)))

    def test_isotropic_scale(self) -> None:
        s = 1.013
        m = MagMat(np.eye(2) * s)
        assert isotropic_scale(m) == pytest.approx(s)
        p = CTFParams(20000.0, 18000.0, 40.0)
        t = defocus_to_true(p, m)
        assert t.defocus_u == pytest.approx(20000.0 / s**2, abs=TOL * 1e4)
        assert t.defocus_v == pytest.approx(18000.0 / s**2, abs=TOL * 1e4)
        assert t.angle_deg == pytest.approx(40.0, abs=1e-9)
        assert true_pixel_size(1.0, m) == pytest.approx(1.0 / s)
        # the scale of a general matrix is its det's square root; normalised() removes it
        g = MagMat.from_anisotropy(2.0, 10.0, s)
        assert isotropic_scale(g) == pytest.approx(s)
        assert isotropic_scale(g.normalised()) == pytest.approx(1.0)
        with pytest.raises(ValueError):
            true_pixel_size(-1.0, m)


class TestApparentAstigmatism:
    def test_worked_number(self) -> None:
        df, pct, axis = 20000.0, 1.5, 30.0
        m = MagMat.from_anisotropy(pct, axis)
        p = apparent_astigmatism(df, m)
        s1, s2 = m.singular_values
        exact = df * (s1**2 - s2**2)
        assert p.astigmatism == pytest.approx(exact, abs=1e-8)
        # exact identity: U - V = 2 Δf a s̄²
        assert p.astigmatism == pytest.approx(2 * df * pct / 100 * ((s1 + s2) / 2) ** 2, rel=1e-12)
        # the textbook approximation 2·Δf·a = 600 Å, within 1 %
        assert p.astigmatism == pytest.approx(600.0, rel=0.01)
        # U lies along the axis (the observed direction M stretches most), not axis + 90
        assert angle_diff(p.angle_deg, axis) < 1e-9
        assert p.mean_defocus == pytest.approx(df * (s1**2 + s2**2) / 2)
        print(f"\nΔf=20000 Å, 1.5 % along 30°: U-V = {p.astigmatism:.4f} Å at {p.angle_deg:.6f}°")

    def test_random_matrices(self) -> None:
        rng = np.random.default_rng(16)
        for _ in range(100):
            m = random_near_identity(rng)
            df = rng.uniform(5000, 40000)
            p = apparent_astigmatism(df, m)
            d = df * m.array.T @ m.array
            np.testing.assert_allclose(p.matrix(), d, atol=1e-7)
            assert angle_diff(p.angle_deg, m.axis_deg) < 1e-6

    def test_overfocus_flips_axis(self) -> None:
        m = MagMat.from_anisotropy(2.0, 50.0)
        p = apparent_astigmatism(-10000.0, m)
        assert angle_diff(p.angle_deg, 140.0) < 1e-9

    def test_no_anisotropy_no_astigmatism(self) -> None:
        p = apparent_astigmatism(12000.0, MagMat(1.02 * np.eye(2)))
        assert p.astigmatism == 0.0 and p.angle_deg == 0.0
        assert p.mean_defocus == pytest.approx(12000.0 * 1.02**2)


# --------------------------------------------------------------------------- real files


def _read_optics(path):
    starfile = pytest.importorskip("starfile")
    return starfile.read(path)["optics"]


def _check_real_group(name: str, m: MagMat) -> None:
    pct, axis = m.anisotropy_percent, m.axis_deg
    u1 = apparent_astigmatism(10000.0, m).astigmatism
    u3 = apparent_astigmatism(30000.0, m).astigmatism
    print(
        f"{name}: {pct:.3f} % along {axis:.1f}°, scale {m.scale:.5f}, "
        f"rotation {m.rotation_deg:+.4f}°, apparent U-V {u1:.0f} Å @1 µm, {u3:.0f} Å @3 µm"
    )
    assert 0.3 < pct < 5.0
    assert 0.0 <= axis < 180.0
    # the axis and amount, independently of the SVD: the observed direction that M stretches
    # most (|M u(θ)| over a 0.005° grid) and the relative spread of |M u|
    theta = np.deg2rad(np.arange(0.0, 180.0, 0.005))
    stretch = np.linalg.norm(m.array @ np.stack([np.cos(theta), np.sin(theta)]), axis=0)
    best = float(np.rad2deg(theta[np.argmax(stretch)]))
    assert abs((axis - best + 90.0) % 180.0 - 90.0) < 0.01
    spread = 100 * (stretch.max() - stretch.min()) / (0.5 * (stretch.max() + stretch.min()))
    assert pct == pytest.approx(spread, abs=1e-4)
    assert 0.95 < m.scale < 1.05
    assert abs(m.rotation_deg) < 0.5
    # RELION -> MagMat -> cryoSPARC -> MagMat
    back = from_cryosparc_anisomag(to_cryosparc_anisomag(m))
    np.testing.assert_allclose(back.array, m.array, atol=1e-12, rtol=0)
    back_relion = from_relion_row(to_relion(back))
    np.testing.assert_allclose(back_relion.array, m.array, atol=1e-12, rtol=0)
    # cisTEM keeps the symmetric part exactly
    np.testing.assert_allclose(from_cistem(*to_cistem(m)).array, m.symmetric_part, atol=1e-12)
    assert u3 == pytest.approx(3 * u1, rel=1e-12)


def test_real_relion31_six_optics_groups(shared_real) -> None:
    optics = _read_optics(shared_real / "cryodrgn" / "relion31.6opticsgroups.star")
    mats = from_relion_table(optics)
    assert sorted(mats) == [1, 2, 3, 4, 5, 6]
    # spot-check the file's first row against the identity mapping
    assert mats[1].matrix == ((1.011472, 0.004231), (0.004560, 1.008858))
    for g, m in mats.items():
        _check_real_group(f"relion31.6opticsgroups group {g}", m)
    pcts = [m.anisotropy_percent for m in mats.values()]
    assert 0.5 < min(pcts) and max(pcts) < 3.0


def test_real_isecc(shared_real) -> None:
    optics = _read_optics(shared_real / "isecc" / "test.star")
    mats = from_relion_table(optics)
    assert list(mats) == [1]
    _check_real_group("isecc test.star group 1", mats[1])
    # the file's nearly symmetric matrix: axis from tan 2θ = (M01 + M10) / (M00 − M11)
    a = mats[1].array
    expected = 0.5 * np.rad2deg(np.arctan2(a[0, 1] + a[1, 0], a[0, 0] - a[1, 1]))
    assert mats[1].axis_deg == pytest.approx(expected, abs=0.1)
    assert mats[1].axis_deg == pytest.approx(24.4, abs=0.2)


def test_real_cryosparc_anisomag_is_identity(shared_real) -> None:
    # exported particle files store [0, 0, 0, 0] — the identity under the I-subtracted layout.
    # Zeros cannot tell conventions apart; the anisotropic physics check (cryoSPARC's phase from
    # its own fields = the physical phase) is tests/test_io_cryosparc_anisomag.py.
    path = shared_real / "cryodrgn" / "cryosparc_J2_particles_exported.cs"
    if not path.exists():
        pytest.skip(f"{path} not found")
    cs = np.load(path)
    mats = matrices_from_cryosparc_anisomag(cs["ctf/anisomag"])
    assert mats.shape == (len(cs), 2, 2)
    np.testing.assert_array_equal(mats, np.broadcast_to(np.eye(2), mats.shape))
