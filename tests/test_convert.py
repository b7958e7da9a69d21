"""``anisoctf convert``: the magnification matrix in RELION, cryoSPARC, cisTEM and MotionCor2 forms.

Each conversion is proven by physical invariance, not by a round trip: the defocus phase
``π λ k_true^T D k_true`` of a true-frame defocus matrix ``D`` at observed frequencies ``k`` is
computed once from RELION's numbers (``k_true = M k_obs``, through
:func:`anisoctf.optics.frames.transform_defocus_matrix`) and once from the other tool's numbers
in that tool's own convention, written out here from its description:

* cryoSPARC: ``A = I + anisomag`` (row-major) maps true to observed frequency, so
  ``k_true = A^-1 k_obs``;
* cisTEM ``mag_distortion_correct``: the corrected image reads the input at ``C p`` with
  ``C = R(θ)^T diag(1/major, 1/minor) R(θ)``, so ``x_obs = C x_true`` and a plane wave gives
  ``k_true = C^T k_obs``; MotionCor2 ``-Mag major minor angle`` is the same stretch.

Both phases must agree to 1e-6 rad over a frequency grid out to 2 Å.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from anisoctf.cli.main import app
from anisoctf.errors import UsageError
from anisoctf.jobs.convert import cryosparc_group, mag_forms, matrix_from_form, relion_group
from anisoctf.optics.ctf import Optics
from anisoctf.optics.frames import transform_defocus_matrix
from anisoctf.optics.magmat import MagMat, from_relion

runner = CliRunner()
LAMBDA = Optics(pixel_size=1.0, voltage_kv=300.0).wavelength
#: RELION 5 CtfRefine's refined matrix (shared/data/relion_ctfrefine pass2_aniso)
CTFREFINE = from_relion(1.002518, -0.00556, -0.00572, 0.998475)
#: the six groups of cryoDRGN's relion31.6opticsgroups.star
SIX = [
    from_relion(1.011472, 0.004231, 0.00456, 1.008858),
    from_relion(0.993895, 0.010413, 0.008515, 0.99473),
    from_relion(1.022378, 0.011659, 0.010491, 1.02031),
    from_relion(1.020955, 0.012392, 0.01307, 1.019583),
    from_relion(1.011485, 0.008544, 0.010843, 1.007989),
    from_relion(1.006131, -0.00887, -0.00768, 0.999765),
]
SYMMETRIC = [MagMat.from_anisotropy(1.5, 30.0), MagMat.from_anisotropy(3.0, 137.0, 0.995)]


def _grid() -> np.ndarray:
    """Observed frequencies (1/Å), a 41×41 grid out to 1/(2 Å)."""
    k = np.linspace(-0.5, 0.5, 41)
    kx, ky = np.meshgrid(k, k)
    return np.stack([kx.ravel(), ky.ravel()])


def _defocus(u: float, v: float, angle_deg: float) -> np.ndarray:
    t = np.deg2rad(angle_deg)
    r = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    return r @ np.diag([u, v]) @ r.T


def _phase_obs(d_obs: np.ndarray, k: np.ndarray) -> np.ndarray:
    return np.pi * LAMBDA * np.einsum("in,ij,jn->n", k, d_obs, k)


def _phase_true(d_true: np.ndarray, k_true: np.ndarray) -> np.ndarray:
    return np.pi * LAMBDA * np.einsum("in,ij,jn->n", k_true, d_true, k_true)


def _relion_phase(m: MagMat, d: np.ndarray, k: np.ndarray) -> np.ndarray:
    return _phase_obs(transform_defocus_matrix(d, m, to="observed"), k)


def _cryosparc_phase(anisomag, d, k):
    a = np.eye(2) + np.asarray(anisomag, dtype=float).reshape(2, 2)
    return _phase_true(d, np.linalg.solve(a, k))


def _cistem_phase(angle, major, minor, d, k):
    t = np.deg2rad(angle)
    r = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    c = r.T @ np.diag([1.0 / major, 1.0 / minor]) @ r
    return _phase_true(d, c.T @ k)


ASTIG = _defocus(15500.0, 14500.0, 70.0)
ISO = _defocus(15000.0, 15000.0, 0.0)


@pytest.mark.parametrize("m", [CTFREFINE, *SIX, *SYMMETRIC])
def test_cryosparc_form_gives_the_same_phase(m):
    k = _grid()
    cs = mag_forms(m)["cryosparc"]
    err = np.abs(_cryosparc_phase(cs, ASTIG, k) - _relion_phase(m, ASTIG, k)).max()
    assert err < 1e-6
    # and back from the cryoSPARC numbers
    back = matrix_from_form("cryosparc", cs)
    assert np.abs(_relion_phase(back, ASTIG, k) - _relion_phase(m, ASTIG, k)).max() < 1e-6


@pytest.mark.parametrize("m", SYMMETRIC)
def test_cistem_and_motioncor2_forms_give_the_same_phase(m):
    k = _grid()
    f = mag_forms(m)
    angle, major, minor = f["cistem"]
    ref = _relion_phase(m, ASTIG, k)
    assert np.abs(_cistem_phase(angle, major, minor, ASTIG, k) - ref).max() < 1e-6
    mj, mn, ang = f["motioncor2"]
    assert (mj, mn, ang) == (major, minor, angle)
    back = matrix_from_form("motioncor2", (mj, mn, ang))
    assert np.abs(_relion_phase(back, ASTIG, k) - ref).max() < 1e-6


@pytest.mark.parametrize("m", [CTFREFINE, *SIX])
def test_cistem_form_of_refined_matrices(m):
    # cisTEM/MotionCor2 hold only the symmetric part; RELION's refined matrices carry rotations
    # of hundredths of a degree, which an isotropic defocus does not see (|R S k| = |S k|)
    k = _grid()
    angle, major, minor = mag_forms(m)["cistem"]
    assert (
        np.abs(_cistem_phase(angle, major, minor, ISO, k) - _relion_phase(m, ISO, k)).max() < 1e-6
    )


def test_forms_parse_and_refuse():
    m = matrix_from_form("cistem", (30.0, 1.01, 0.99))
    assert np.allclose(m.array, matrix_from_form("motioncor2", (1.01, 0.99, 30.0)).array)
    with pytest.raises(UsageError, match="takes 4 numbers"):
        matrix_from_form("relion", (1.0, 0.0, 0.0))
    with pytest.raises(UsageError, match="unknown form"):
        matrix_from_form("gctf", (1.0, 0.0, 0.0, 1.0))
    with pytest.raises(UsageError, match="does not describe a valid magnification"):
        matrix_from_form("cryosparc", (-1.0, 0.0, 0.0, 0.0))


def test_group_numbers():
    assert cryosparc_group(1) == 0 and relion_group(0) == 1
    assert all(relion_group(cryosparc_group(n)) == n for n in range(1, 10))
    with pytest.raises(UsageError, match="count from 1"):
        cryosparc_group(0)
    with pytest.raises(UsageError, match="count from 0"):
        relion_group(-1)


def test_cli_mag_and_group(shared_real):
    r = runner.invoke(app, ["convert", "mag", "--relion", "1.002518", "-0.00556", "-0.00572",
                            "0.998475", "--json"])  # fmt: skip
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["relion"] == [1.002518, -0.00556, -0.00572, 0.998475]
    k = _grid()
    ref = _relion_phase(CTFREFINE, ASTIG, k)
    assert np.abs(_cryosparc_phase(doc["cryosparc"], ASTIG, k) - ref).max() < 1e-6
    r = runner.invoke(app, ["convert", "mag", "--cryosparc", *map(str, doc["cryosparc"])])
    assert r.exit_code == 0 and "1.002518 -0.00556 -0.00572 0.998475" in r.output
    r = runner.invoke(app, ["convert", "group", "--relion", "3"])
    assert r.exit_code == 0 and "exp_group_id 2" in r.output
    r = runner.invoke(app, ["convert", "group", "--cryosparc", "0"])
    assert r.exit_code == 0 and "_rlnOpticsGroup 1" in r.output
    six = shared_real / "cryodrgn" / "relion31.6opticsgroups.star"
    r = runner.invoke(app, ["convert", "mag", "--from", str(six)])
    assert r.exit_code == 0 and r.output.count("# _rlnMagMat of optics group") == 6
    r = runner.invoke(app, ["convert", "mag"])
    assert r.exit_code == 2
