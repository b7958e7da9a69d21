"""cryoSPARC ``ctf/anisomag`` and defocus fields against physics, not against our own writer.

Convention read (``docs/anisomag.md``, sources: cryosparc-tools ``magnification`` example and
the cryoSPARC developers' posts): ``A = I + anisomag`` (row-major) maps the true frequency to
the observed one, ``k_obs = A k_true``; ``ctf/df1_A``, ``ctf/df2_A``, ``ctf/df_angle_rad`` are
the true-frame defocus along the two axes, the df1 axis at ``df_angle_rad`` from +x. cryoSPARC's
phase at an observed frequency is then its textbook formula applied to those fields at
``k_true = A^-1 k_obs``:

    chi = pi λ |k|² (df1 + df2)/2 + pi λ |k|² (df1 − df2)/2 · cos 2(φ_k − angle)
          − (pi/2) Cs λ³ |k|⁴,

written out here (not through anisoctf). The invariant: the phase the *observed* image carries
at ``k_obs`` — fixed by the observed-frame defocus a CTF fit without anisomag finds — is the
same whichever frame the numbers are written in. The truth is therefore the observed-frame
defocus of a real ``.cs`` (``empiar_10076_7.cs``, imported into cryoSPARC) and an anisotropic,
non-symmetric ``M``; our conversions must give cryoSPARC fields whose cryoSPARC phase equals it.
"""

from __future__ import annotations

import numpy as np
import pytest

from anisoctf.jobs.apply_tables import apply_to_cryosparc, undo_cryosparc
from anisoctf.optics.ctf import Optics
from anisoctf.optics.frames import defocus_table_to_true
from anisoctf.optics.kernel import chi_rad, ctf_constants, frequency_features
from anisoctf.optics.magmat import MagMat, from_cryosparc_anisomag, to_cryosparc_anisomag

# anisotropic (1.9 %) and not symmetric (a 0.3° rotation part): M^-1 and M^-T differ
M = MagMat(((1.0104, 0.0071), (-0.0018, 0.9917)))
OPTICS = Optics(pixel_size=1.0, voltage_kv=300.0, cs_mm=2.7, amplitude_contrast=0.1)


def _grid(n: int = 48, apix: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    f = np.fft.fftfreq(n, d=apix)
    return np.meshgrid(f, f, indexing="xy")


def _chi_cryosparc(df1, df2, angle_rad, anisomag, kx_obs, ky_obs) -> np.ndarray:
    """cryoSPARC's phase from its own fields (see the module notes), independent of anisoctf."""
    a = np.eye(2) + np.asarray(anisomag, dtype=float).reshape(2, 2)
    inv = np.linalg.inv(a)
    kx = inv[0, 0] * kx_obs + inv[0, 1] * ky_obs
    ky = inv[1, 0] * kx_obs + inv[1, 1] * ky_obs
    lam = OPTICS.wavelength  # the electron wavelength is not a convention
    k2 = kx * kx + ky * ky
    phi = np.arctan2(ky, kx)
    df = 0.5 * (df1 + df2) + 0.5 * (df1 - df2) * np.cos(2.0 * (phi - angle_rad))
    return np.pi * lam * k2 * df - 0.5 * np.pi * OPTICS.cs_mm * 1e7 * lam**3 * k2 * k2


def _dmat(u, v, angle_deg) -> np.ndarray:
    """The defocus matrix ``D`` (``kᵀDk``) of U, V and the U-axis angle."""
    t = np.deg2rad(angle_deg)
    r = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    return r @ np.diag([u, v]) @ r.T


def _chi_physical(d_true: np.ndarray, kx, ky) -> np.ndarray:
    """The phase the image carries at observed ``k_obs``: the true-frame defocus matrix and Cs
    at ``k_true = M k_obs`` (anisoctf's kernel, no table conversion involved)."""
    return chi_rad(
        frequency_features(kx, ky, M.array), ctf_constants(OPTICS),
        0.5 * (d_true[0, 0] + d_true[1, 1]), 0.5 * (d_true[0, 0] - d_true[1, 1]), d_true[0, 1],
    )  # fmt: skip


def _uva(d: np.ndarray) -> tuple[float, float, float]:
    """U >= V and the U-axis angle (degrees) of a defocus matrix (eigen-decomposition)."""
    w, vec = np.linalg.eigh(d)
    return float(w[1]), float(w[0]), float(np.rad2deg(np.arctan2(vec[1, 1], vec[0, 1])))


def _float64_ctf(arr: np.ndarray) -> np.ndarray:
    """The dataset with its defocus and anisomag fields as float64 (no float32 rounding)."""
    wide = {"ctf/df1_A", "ctf/df2_A", "ctf/df_angle_rad", "ctf/anisomag"}
    descr = [
        (n, np.dtype("<f8") if n in wide else arr.dtype.fields[n][0].base, arr.dtype[n].shape)
        for n in arr.dtype.names
    ]
    out = np.zeros(arr.shape, dtype=np.dtype([(n, t, s) if s else (n, t) for n, t, s in descr]))
    for n in arr.dtype.names:
        out[n] = arr[n]
    return out


def test_cryosparc_phase_of_converted_fields_equals_the_observed_phase():
    """Synthetic: observed defocus → our cryoSPARC numbers → cryoSPARC's formula, to 1e-6 rad."""
    kx, ky = _grid()
    rng = np.random.default_rng(2)
    for _ in range(5):
        # the physics: a true-frame defocus; a fit without anisomag sees D_obs = Mᵀ D_true M
        u = rng.uniform(8000, 30000)
        d_true = _dmat(u, u - rng.uniform(0, 1500), rng.uniform(-90, 180))
        u_obs, v_obs, ang_obs = _uva(M.array.T @ d_true @ M.array)
        tu, tv, ta = defocus_table_to_true(u_obs, v_obs, ang_obs, M)
        fields = (float(tu), float(tv), np.deg2rad(float(ta)), to_cryosparc_anisomag(M))
        chi_cs = _chi_cryosparc(*fields, kx, ky)
        chi_obs = _chi_physical(d_true, kx, ky)
        assert np.max(np.abs(chi_cs - chi_obs)) < 1e-6
        assert np.max(np.abs(chi_obs)) > 50.0  # a grid with many rings, not a trivial one
        # and the convention matters: M^-T, or no inverse, would be off by whole radians
        wrong = _chi_cryosparc(*fields[:3], (np.linalg.inv(M.array).T - np.eye(2)), kx, ky)
        assert np.max(np.abs(wrong - chi_obs)) > 0.05


def _true_of_real(real: np.ndarray, i: int) -> np.ndarray:
    """The real row read as an observed-frame fit: ``D_true = M^-T D_obs M^-1``."""
    d_obs = _dmat(
        float(real["ctf/df1_A"][i]), float(real["ctf/df2_A"][i]),
        np.rad2deg(float(real["ctf/df_angle_rad"][i])),
    )  # fmt: skip
    inv = np.linalg.inv(M.array)
    return inv.T @ d_obs @ inv


def test_real_cs_apply_keeps_the_observed_phase_and_reads_back(shared_real):
    """Real ``.cs``: apply an anisotropic M, cryoSPARC's formula on the written fields gives the
    phase of the original (observed-frame) row; our reader recovers M and the row."""
    path = shared_real / "cryodrgn" / "empiar_10076_7.cs"
    if not path.exists():
        pytest.skip(f"{path} not found")
    real = np.load(path)
    assert np.all(real["ctf/anisomag"] == 0.0)  # imported from RELION: no matrix yet
    arr = _float64_ctf(real)
    out = apply_to_cryosparc(arr, M)
    kx, ky = _grid()
    for i in range(len(arr)):
        chi_cs = _chi_cryosparc(
            out["ctf/df1_A"][i], out["ctf/df2_A"][i], out["ctf/df_angle_rad"][i],
            out["ctf/anisomag"][i], kx, ky,
        )  # fmt: skip
        chi_obs = _chi_physical(_true_of_real(real, i), kx, ky)
        assert np.max(np.abs(chi_cs - chi_obs)) < 1e-6
        np.testing.assert_allclose(
            from_cryosparc_anisomag(out["ctf/anisomag"][i]).array, M.array, atol=1e-12
        )
    # the stored float32 file: the same to float32 precision (~1e-7 relative of chi)
    out32 = apply_to_cryosparc(real, M)
    chi32 = _chi_cryosparc(
        float(out32["ctf/df1_A"][0]), float(out32["ctf/df2_A"][0]),
        float(out32["ctf/df_angle_rad"][0]), out32["ctf/anisomag"][0], kx, ky,
    )  # fmt: skip
    chi0 = _chi_physical(_true_of_real(real, 0), kx, ky)
    assert np.max(np.abs(chi32 - chi0)) < 2e-6 * np.max(np.abs(chi0))
    # undo returns the real values the file held (float32 rounding)
    back = undo_cryosparc(out32, drop_anisomag=False)
    for f in ("ctf/df1_A", "ctf/df2_A"):
        np.testing.assert_allclose(back[f], real[f], atol=0.02)
    np.testing.assert_allclose(back["ctf/df_angle_rad"], real["ctf/df_angle_rad"], atol=2e-6)
