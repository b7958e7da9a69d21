"""The reference's weighting (issue 15 item 3): FSC from half maps or a post-process STAR,
RELION's FSC weight, and the radial amplitude match, checked against known truth.

The matched simulation: particles whose true defocus change is zero, refined against noisy,
FSC-filtered half maps of a lower resolution; the refined per-micrograph defocus must stay.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.fft as sfft
from typer.testing import CliRunner

from anisoctf.cli.main import app
from anisoctf.errors import InputError
from anisoctf.io.postprocess_star import read_fsc_star
from anisoctf.jobs.refine_particles import run_refine
from anisoctf.jobs.simulate_particles import run_simulate_particles
from anisoctf.optics.ctf import Optics
from anisoctf.records.fsc import FscCurve
from anisoctf.records.particles import ParticleBatch
from anisoctf.refine.fsc import fsc_weight, half_map_fsc
from anisoctf.refine.group import RefineSettings, refine_group
from anisoctf.refine.projection import FourierProjector
from anisoctf.simulate.particles import ParticleSimSpec, blob_map, simulate_particles

SHARED_FSC = Path(__file__).resolve().parents[2] / "shared/data/relion_ctfrefine/postprocess.star"


def _shells(n: int, apix: float) -> tuple[np.ndarray, np.ndarray]:
    k = np.fft.fftfreq(n) / apix
    kz, ky, kx = np.meshgrid(k, k, np.fft.rfftfreq(n) / apix, indexing="ij")
    kr = np.sqrt(kx**2 + ky**2 + kz**2)
    return kr, np.rint(kr * n * apix).astype(np.int64)


def _noisy_halves(vol: np.ndarray, apix: float, fsc_half, seed: int, filtered: bool):
    """Two half maps ``vol + noise_i`` whose expected FSC is ``fsc_half(k)``; ``filtered``
    multiplies both by RELION's FSC filter ``sqrt(2 FSC / (1 + FSC))`` of the full map."""
    n = vol.shape[0]
    kr, shell = _shells(n, apix)
    f = sfft.rfftn(vol)
    power = np.bincount(shell.ravel(), (np.abs(f) ** 2).ravel())
    power /= np.maximum(np.bincount(shell.ravel()), 1)
    fh = fsc_half(kr)
    noise_var = power[shell] * (1 - fh) / np.maximum(fh, 1e-6)
    rng = np.random.default_rng(seed)
    full = 2 * fh / (1 + fh)
    filt = np.sqrt(2 * full / (1 + full)) if filtered else 1.0
    halves = []
    for _ in range(2):
        e = (rng.normal(size=f.shape) + 1j * rng.normal(size=f.shape)) * np.sqrt(noise_var / 2)
        halves.append(sfft.irfftn((f + e) * filt, s=vol.shape))
    return halves


def test_half_map_fsc_identities_and_known_snr() -> None:
    n, apix = 64, 1.5
    vol = blob_map(n, seed=2)
    same = half_map_fsc(vol, vol, apix)
    inside = same.k_inv_A <= 0.5 / apix
    np.testing.assert_allclose(same.fsc[inside], 1.0, atol=1e-9)
    np.testing.assert_allclose(half_map_fsc(vol, -vol, apix).fsc[inside], -1.0, atol=1e-9)
    assert same.k_inv_A[1] == pytest.approx(1 / (n * apix))
    # noise of known spectrum: the FSC follows the expected curve shell by shell
    h1, h2 = _noisy_halves(vol, apix, lambda k: 1 / (1 + np.exp((k - 1 / 6.0) / 0.01)), 0, False)
    c = half_map_fsc(h1, h2, apix)
    k = c.k_inv_A
    expect = 1 / (1 + np.exp((k - 1 / 6.0) / 0.01))
    band = (k > 5 / (n * apix)) & (k < 0.45 / apix)  # shells of ≥ 300 voxels
    assert np.max(np.abs(c.fsc[band] - expect[band])) < 0.08
    assert c.resolution_A(0.5) == pytest.approx(6.0, rel=0.06)
    with pytest.raises(ValueError, match="cubes of one size"):
        half_map_fsc(vol, vol[:-2, :-2, :-2], apix)


def test_fsc_weight_is_relions() -> None:
    k = np.arange(10) * 0.02
    f = np.array([1.0, 0.9, 0.8, 0.5, 0.2, 0.05, -0.01, 0.3, 0.2, 0.1])
    curve = FscCurve(k, f, "t")
    w = fsc_weight(curve, np.array([0.0, 0.01, 0.04, 0.05, 0.11, 0.12, 0.14, 0.3]))
    # linear between shells, and zero from the first shell where the FSC is ≤ 0 (0.12 1/Å)
    np.testing.assert_allclose(w, [1.0, 0.95, 0.8, 0.65, 0.02, 0, 0, 0])
    assert curve.resolution_A(0.143) == pytest.approx(1 / (0.08 + 0.02 * (0.2 - 0.143) / 0.15))
    with pytest.raises(ValueError, match="increasing"):
        FscCurve(k[::-1], f)


def test_postprocess_star_is_read_as_relion_writes_it(tmp_path) -> None:
    if SHARED_FSC.exists():
        c = read_fsc_star(SHARED_FSC)
        assert c.k_inv_A[0] == 0 and c.k_inv_A[1] == pytest.approx(0.010417, abs=1e-6)
        np.testing.assert_allclose(c.fsc, 1.0)
    p = tmp_path / "postprocess.star"
    p.write_text(
        "data_general\n\n_rlnFinalResolution 4.0\n\ndata_fsc\n\nloop_\n_rlnSpectralIndex #1\n"
        "_rlnAngstromResolution #2\n_rlnFourierShellCorrelationCorrected #3\n"
        "0 999.0 1.0\n1 20.0 0.9\n2 10.0 0.4\n3 6.666667 -0.02\n"
    )
    c = read_fsc_star(p)
    np.testing.assert_allclose(c.k_inv_A, [0.0, 0.05, 0.1, 0.15], atol=1e-6)
    np.testing.assert_allclose(c.fsc, [1.0, 0.9, 0.4, -0.02])
    p.write_text(p.read_text().replace("Corrected", "UnmaskedMaps"))
    with pytest.raises(InputError, match="postprocess.star.*_rlnFourierShellCorrelationCorrected"):
        read_fsc_star(p)


def _no_change_case(n: int = 1500, res_a: float = 15.0):
    """Particles at their true defocus; half maps of FSC 0.5 at ``res_a``, FSC-filtered."""
    box = 128
    spec = ParticleSimSpec(
        n=n, box=box, snr=0.05, seed=11, height_sigma=1e-3, n_micrographs=10,
        anisotropy_percent=0.0,
    )  # fmt: skip
    vol = blob_map(box, seed=12)
    sim = simulate_particles(spec, FourierProjector(vol, spec.apix))
    halves = _noisy_halves(
        vol, spec.apix, lambda k: 1 / (1 + np.exp((k - 1 / res_a) / 0.01)), 5, True
    )
    projs = {i: FourierProjector(h, spec.apix) for i, h in enumerate(halves)}
    pb = ParticleBatch(
        angles=sim.angles, origins_angst=sim.origins, defocus_u=sim.obs_u, defocus_v=sim.obs_v,
        defocus_angle=sim.obs_angle, bfactor=np.full(n, spec.bfactor),
        micrograph=sim.micrograph.astype(str), which=(np.arange(n) % 2).astype(np.int64),
    )  # fmt: skip
    optics = Optics(spec.apix, spec.kv, spec.cs, spec.ac)
    truth = 0.5 * (sim.true_u + sim.true_v)
    return sim, spec, halves, projs, pb, optics, truth


def test_a_filtered_low_resolution_reference_does_not_move_defocus() -> None:
    sim, spec, halves, projs, pb, optics, truth = _no_change_case()
    curve = half_map_fsc(halves[0], halves[1], spec.apix)
    mic = sim.micrograph

    def worst(match: bool, fsc) -> float:
        st = RefineSettings(fit_anisomag=False, rounds=1, match_amplitudes=match)
        r = refine_group(lambda rows: sim.images[rows], pb, optics, spec.box, projs, st, fsc=fsc)
        err = 0.5 * (r.defocus_u + r.defocus_v) - truth
        means = [np.mean(err[mic == k]) for k in range(spec.n_micrographs)]
        return float(np.max(np.abs(means)))

    plain = worst(False, None)
    matched = worst(True, None)
    # measured: 147 Å plain, 6.5 Å matched, 144 Å with RELION's FSC weight alone
    assert plain > 100.0  # the problem: the filter moves micrograph defocus (truth: no change)
    assert matched < 15.0  # the radial gain removes it
    assert worst(False, curve) > 3 * matched  # RELION's FSC weight alone does not


def test_refine_cli_takes_an_fsc(tmp_path) -> None:
    spec = ParticleSimSpec(n=48, box=32, apix=2.0, n_micrographs=4, snr=1.0, seed=5)
    files = run_simulate_particles(spec, tmp_path / "sim")
    post = tmp_path / "postprocess.star"
    post.write_text(
        "data_fsc\n\nloop_\n_rlnResolution #1\n_rlnFourierShellCorrelationCorrected #2\n"
        + "".join(f"{i / 64:.6f} {max(1 - i / 12, -0.1):.4f}\n" for i in range(17))
    )
    st = RefineSettings(rounds=1, mag_iterations=1, defocus_search=300.0)
    rep = run_refine(
        files.star, tmp_path / "o", half_maps=(str(files.reference),) * 2, settings=st,
        fsc="half-maps",
    )  # fmt: skip
    js = json.loads((tmp_path / "o" / "anisomag_group1.json").read_text())
    assert js["reference_weighting"]["fsc"]["source"].startswith("half maps")
    assert len(js["reference_weighting"]["amplitude_gain"]["gain"]) > 3
    assert rep.groups[0].reference == js["reference_weighting"]
    rep = run_refine(files.star, tmp_path / "p", reference=files.reference, settings=st, fsc=post)
    band_end = rep.groups[0].reference["fsc"]["band_end_A"]
    assert band_end >= 64 / 12 - 1e-6  # the FSC is ≤ 0 from 12/64 1/Å: the band stops before
    r = CliRunner().invoke(
        app,
        ["refine", str(files.star), "--reference", str(files.reference), "--out",
         str(tmp_path / "q"), "--fsc", "half-maps"],
    )  # fmt: skip
    assert r.exit_code == 2 and "--fsc half-maps needs --half-maps" in r.output
    assert r.output.count("\n") <= 2
