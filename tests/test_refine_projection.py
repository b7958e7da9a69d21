"""RELION projection conventions: Euler matrix, Fourier-slice projection, origins, anisomag."""

from __future__ import annotations

import numpy as np
import pytest

from anisoctf.refine.projection import FourierProjector, euler_to_matrix

N = 48
SIGMA = 2.0
# an asymmetric set of Gaussians (voxels from the centre, x, y, z) and their amplitudes
CENTRES = np.array([[8.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 11.0], [-6.0, -7.0, 3.0]])
AMPS = np.array([1.0, 0.6, 0.8, 0.4])


def gaussian_map(n: int = N) -> np.ndarray:
    """vol[z, y, x] = sum of isotropic Gaussians at CENTRES (position = index - n/2)."""
    r = np.arange(n) - n // 2
    z, y, x = np.meshgrid(r, r, r, indexing="ij")
    vol = np.zeros((n, n, n))
    for (cx, cy, cz), a in zip(CENTRES, AMPS, strict=True):
        vol += a * np.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / (2 * SIGMA**2))
    return vol


def analytic_projection(
    a: np.ndarray, origin_px=(0.0, 0.0), n: int = N, distort: np.ndarray | None = None
) -> np.ndarray:
    """Sum along z of the Gaussians moved to A c: 2D Gaussians of weight sqrt(2 pi) sigma.

    ``distort`` maps a true image position to the observed one (``x_obs = Mᵀ x_true``).
    """
    r = np.arange(n) - n // 2
    yy, xx = np.meshgrid(r, r, indexing="ij")
    img = np.zeros((n, n))
    for c, amp in zip(CENTRES, AMPS, strict=True):
        p = (a @ c)[:2]
        if distort is not None:
            p = distort @ p
            # a Gaussian blob seen through x_obs = T x_true has covariance T T^T sigma^2
            cov = distort @ distort.T * SIGMA**2
        else:
            cov = np.eye(2) * SIGMA**2
        p = p - np.asarray(origin_px)
        d = np.stack([xx - p[0], yy - p[1]], axis=-1)
        icov = np.linalg.inv(cov)
        q = np.einsum("...i,ij,...j->...", d, icov, d)
        w = amp * np.sqrt(2 * np.pi) * SIGMA * 2 * np.pi * SIGMA**2
        img += w * np.exp(-0.5 * q) / (2 * np.pi * np.sqrt(np.linalg.det(cov)))
    return img


@pytest.fixture(scope="module")
def projector() -> FourierProjector:
    return FourierProjector(gaussian_map(), pixel_size=1.5, pad=2)


def test_euler_matrix_is_relion_zyz() -> None:
    """A = Rz(-psi) Ry(-tilt) Rz(-rot), orthonormal, det +1; rot = 90 sends +x to -y."""

    def rz(t):
        c, s = np.cos(np.deg2rad(t)), np.sin(np.deg2rad(t))
        return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])

    def ry(t):
        c, s = np.cos(np.deg2rad(t)), np.sin(np.deg2rad(t))
        return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])

    rot, tilt, psi = 37.0, 64.0, -121.0
    a = euler_to_matrix(rot, tilt, psi)
    np.testing.assert_allclose(a, rz(-psi) @ ry(-tilt) @ rz(-rot), atol=1e-12)
    np.testing.assert_allclose(a @ a.T, np.eye(3), atol=1e-12)
    assert np.linalg.det(a) == pytest.approx(1.0)
    np.testing.assert_allclose(euler_to_matrix(90, 0, 0) @ [1, 0, 0], [0, -1, 0], atol=1e-12)
    # tilt = 90 looks along x: +z of the map goes to -x in the image (A[0, 2] = -cos psi sin tilt)
    np.testing.assert_allclose(euler_to_matrix(0, 90, 0) @ [0, 0, 1], [-1, 0, 0], atol=1e-12)
    batch = euler_to_matrix([rot, 0.0], [tilt, 0.0], [psi, 0.0])
    assert batch.shape == (2, 3, 3)
    np.testing.assert_allclose(batch[1], np.eye(3), atol=1e-12)


@pytest.mark.parametrize(
    ("rot", "tilt", "psi"), [(0.0, 0.0, 0.0), (30.0, 50.0, -70.0), (-140.0, 110.0, 15.0)]
)
def test_projection_matches_rotated_gaussians(projector, rot, tilt, psi) -> None:
    """Fourier-slice projection = analytic sum along z of the Gaussians at A c."""
    img = projector.project(rot, tilt, psi)[0]
    ref = analytic_projection(euler_to_matrix(rot, tilt, psi))
    err = np.abs(img - ref).max() / ref.max()
    assert err < 0.04  # pad-2 aliasing; a wrong convention gives > 0.2
    # a mirrored pose (handedness) must not match
    wrong = analytic_projection(euler_to_matrix(-rot, tilt, -psi))
    if rot or psi:
        assert np.abs(img - wrong).max() / ref.max() > 0.2


def test_origin_shift_moves_the_particle_by_minus_origin(projector) -> None:
    """RELION: the particle centre sits at box/2 - origin (rlnOriginXAngst / pixel size)."""
    o_angst = np.array([[4.5, -7.5]])  # 3 px, -5 px at 1.5 Å/px
    img = projector.project(20.0, 40.0, 60.0, origins_angst=o_angst)[0]
    ref = analytic_projection(euler_to_matrix(20.0, 40.0, 60.0), origin_px=(3.0, -5.0))
    assert np.abs(img - ref).max() / ref.max() < 0.04
    plus = analytic_projection(euler_to_matrix(20.0, 40.0, 60.0), origin_px=(-3.0, 5.0))
    assert np.abs(img - plus).max() / ref.max() > 0.2


def test_mag_matrix_distorts_the_image_as_k_true_is_m_k_obs(projector) -> None:
    """Sampling at k_true = M k_obs gives the image distorted by x_obs = Mᵀ x_true."""
    m = np.array([[1.03, 0.01], [0.02, 0.98]])
    img = projector.project(10.0, 70.0, -30.0, mag_matrix=m)[0]
    # a plane wave: k_true . x_true = (M k_obs) . x_true = k_obs . (Mᵀ x_true)
    # amplitude scales by 1/det(M) (the Jacobian of the coordinate change)
    ref = analytic_projection(euler_to_matrix(10.0, 70.0, -30.0), distort=m.T)
    ref /= np.linalg.det(m)
    assert np.abs(img - ref).max() / ref.max() < 0.04
    other = analytic_projection(euler_to_matrix(10.0, 70.0, -30.0), distort=np.linalg.inv(m))
    assert np.abs(img - other).max() / ref.max() > 0.02


def test_projector_rejects_bad_maps() -> None:
    with pytest.raises(ValueError, match="cubic"):
        FourierProjector(np.zeros((8, 8, 16)), 1.0)
    with pytest.raises(ValueError, match="even"):
        FourierProjector(np.zeros((9, 9, 9)), 1.0)
