"""Particle I/O, the particle simulator, anisomag and defocus refinement, outputs and errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from anisoctf.cli.main import app
from anisoctf.errors import InputError
from anisoctf.io.mrc import write_mrc
from anisoctf.io.particles import parse_image_name, read_particles
from anisoctf.io.star import read_star_blocks
from anisoctf.jobs.refine_particles import OUT_STAR, run_refine
from anisoctf.jobs.simulate_particles import run_simulate_particles
from anisoctf.optics.ctf import Optics
from anisoctf.optics.frames import defocus_table_to_observed
from anisoctf.optics.magmat import MagMat
from anisoctf.records.particles import ParticleBatch
from anisoctf.refine.agreement import compare_matrices
from anisoctf.refine.group import RefineSettings, refine_group
from anisoctf.refine.projection import FourierProjector
from anisoctf.simulate.particles import ParticleSimSpec, blob_map, simulate_particles

BOX = 48
APIX = 1.3


@pytest.fixture(scope="module")
def projector() -> FourierProjector:
    return FourierProjector(blob_map(BOX, seed=3), APIX)


def _noiseless(projector, n=60, height=0.0, seed=1):
    spec = ParticleSimSpec(n=n, box=BOX, apix=APIX, n_micrographs=6, height_sigma=height, seed=seed)
    return spec, simulate_particles(spec, projector, noise=False)


def _refine(sim, projector, m0=None, **kw):
    spec = sim.spec
    optics = Optics(APIX, spec.kv, spec.cs, spec.ac, mag_matrix=np.eye(2) if m0 is None else m0)
    particles = ParticleBatch(
        angles=sim.angles,
        origins_angst=sim.origins,
        defocus_u=kw.pop("u", sim.obs_u),
        defocus_v=kw.pop("v", sim.obs_v),
        defocus_angle=kw.pop("a", sim.obs_angle),
        bfactor=np.full(spec.n, spec.bfactor),
        micrograph=sim.micrograph,
    )
    return refine_group(
        lambda r: sim.images[r],
        particles,
        optics,
        BOX,
        {0: projector},
        settings=RefineSettings(whiten=False, **kw),
    )


def test_parse_image_name() -> None:
    assert parse_image_name("12@Particles/a.mrcs") == (11, "Particles/a.mrcs")
    assert parse_image_name("single.mrc") == (0, "single.mrc")
    with pytest.raises(ValueError, match="start at 1"):
        parse_image_name("0@a.mrcs")
    with pytest.raises(ValueError, match="not an image number"):
        parse_image_name("x@a.mrcs")


def test_simulator_truth_is_consistent(projector) -> None:
    """Observed-frame input defocus = Mᵀ D_mic M; heights only in the truth; origins used."""
    spec = ParticleSimSpec(n=30, box=BOX, apix=APIX, n_micrographs=3, height_sigma=100.0, seed=4)
    sim = simulate_particles(spec, projector, noise=False)
    m = spec.mag.array
    assert spec.mag.anisotropy_percent == pytest.approx(1.5)
    # micrograph-level input: the same for all particles of a micrograph
    for k in range(3):
        rows = sim.micrograph == k
        assert np.ptp(sim.obs_u[rows]) == 0.0
    # the true defocus of a particle minus its height is the micrograph's; to the observed frame
    mean_true = 0.5 * (sim.true_u + sim.true_v)
    heights = mean_true - sim.mic_true_mean[sim.micrograph]
    u0, v0, a0 = sim.true_u - heights, sim.true_v - heights, sim.true_angle
    ou, ov, oa = defocus_table_to_observed(u0, v0, a0, m)
    np.testing.assert_allclose(ou, sim.obs_u, atol=1e-6)
    np.testing.assert_allclose(ov, sim.obs_v, atol=1e-6)
    assert np.std(heights) > 30.0
    assert sim.images.shape == (30, BOX, BOX) and sim.images.dtype == np.float32
    # the image power is snr (signal only, noise=False)
    assert np.mean(sim.images.astype(float) ** 2) == pytest.approx(spec.snr, rel=1e-4)


def test_noiseless_anisomag_is_recovered_exactly(projector) -> None:
    """Noiseless particles with a known 1.5 % matrix: recovered to 1e-3 relative and better."""
    spec, sim = _noiseless(projector)
    res = _refine(sim, projector, fit_defocus=False, rounds=1, mag_iterations=4)
    truth = spec.mag
    assert abs(res.mag.anisotropy_percent - 1.5) / 1.5 < 1e-3
    assert abs(res.mag.axis_deg - truth.axis_deg) < 0.05
    np.testing.assert_allclose(res.mag.array, truth.array, atol=1e-5)
    # the first step's displacement per bin follows the fitted matrix (noiseless data)
    d = res.displacement
    obs = np.array(d["observed_x"], dtype=float), np.array(d["observed_y"], dtype=float)
    mod = np.array(d["model_x"], dtype=float), np.array(d["model_y"], dtype=float)
    ok = np.isfinite(obs[0]) & (np.hypot(*mod) > 0)
    r = np.corrcoef(
        np.concatenate([obs[0][ok], obs[1][ok]]), np.concatenate([mod[0][ok], mod[1][ok]])
    )[0, 1]
    assert r > 0.9
    # the defocus came back into the true frame with the matrix
    np.testing.assert_allclose(res.defocus_u, sim.true_u, atol=0.5)
    np.testing.assert_allclose(res.defocus_v, sim.true_v, atol=0.5)
    # a negative control: with the matrix fixed at identity nothing changes
    fixed = _refine(sim, projector, fit_anisomag=False, fit_defocus=False, rounds=1)
    assert fixed.mag.is_identity


def test_per_particle_defocus_is_recovered(projector) -> None:
    """Known matrix, per-micrograph start: per-particle heights (SD 200 Å) found to < 5 Å."""
    spec, sim = _noiseless(projector, n=40, height=200.0, seed=7)
    u, v, a = (np.asarray(x) for x in (sim.obs_u, sim.obs_v, sim.obs_angle))
    from anisoctf.optics.frames import defocus_table_to_true

    tu, tv, ta = defocus_table_to_true(u, v, a, spec.mag.array)
    res = _refine(sim, projector, m0=spec.mag.array, u=tu, v=tv, a=ta, fit_anisomag=False, rounds=1)
    err = 0.5 * (res.defocus_u + res.defocus_v) - 0.5 * (sim.true_u + sim.true_v)
    assert np.sqrt(np.mean(err**2)) < 5.0
    start = 0.5 * (tu + tv) - 0.5 * (sim.true_u + sim.true_v)
    assert np.sqrt(np.mean(start**2)) > 100.0


def test_per_micrograph_astigmatism_is_recovered(projector) -> None:
    """Known matrix, astigmatism of each micrograph off by (120, −80) Å: found to < 12 Å."""
    from anisoctf.refine.model import uva_to_zaa, zaa_to_uva

    spec, sim = _noiseless(projector, n=36, height=0.0, seed=9)
    z, a1, a2 = uva_to_zaa(sim.true_u, sim.true_v, sim.true_angle)
    u, v, a = zaa_to_uva(z, a1 + 120.0, a2 - 80.0)
    res = _refine(
        sim,
        projector,
        m0=spec.mag.array,
        u=u,
        v=v,
        a=a,
        fit_anisomag=False,
        fit_defocus=False,
        fit_astigmatism=True,
        rounds=1,
    )
    _, r1, r2 = uva_to_zaa(res.defocus_u, res.defocus_v, res.defocus_angle)
    assert np.max(np.abs(r1 - a1)) < 12.0 and np.max(np.abs(r2 - a2)) < 12.0
    # one astigmatism per micrograph
    for k in range(spec.n_micrographs):
        rows = sim.micrograph == k
        assert np.ptp(r1[rows] - a1[rows]) < 1e-9


@pytest.fixture(scope="module")
def sim_files(tmp_path_factory):
    out = tmp_path_factory.mktemp("psim")
    spec = ParticleSimSpec(n=48, box=32, apix=2.0, n_micrographs=4, snr=1.0, seed=5)
    return run_simulate_particles(spec, out)


def test_particle_star_reads_back(sim_files) -> None:
    ps = read_particles(sim_files.star)
    sim = sim_files.sim
    assert len(ps) == 48 and ps.block == "particles"
    assert ps.optics[1].pixel_size == 2.0 and ps.optics[1].amplitude_contrast == 0.1
    assert ps.box() == 32
    np.testing.assert_allclose(ps.angles, sim.angles, atol=1e-6)
    np.testing.assert_allclose(ps.origins, sim.origins, atol=1e-6)
    np.testing.assert_allclose(ps.defocus_u, sim.obs_u, atol=1e-6)
    rows = np.array([0, 5, 47, 13])
    np.testing.assert_array_equal(ps.images(rows), sim.images[rows])
    assert set(ps.subset.tolist()) == {1, 2}
    truth = read_particles(sim_files.truth_star)
    np.testing.assert_allclose(truth.optics[1].M, sim.spec.mag.array, atol=1e-12)


def test_refine_writes_star_with_other_columns_unchanged(sim_files, tmp_path) -> None:
    st = RefineSettings(rounds=1, mag_iterations=1, defocus_search=300.0)
    rep = run_refine(sim_files.star, tmp_path, reference=sim_files.reference, settings=st)
    # simulate-particles writes RELION's contrast: refine (pinned to RELION's sign on
    # RELION-made particles, test_relion_made_particles_have_normal_contrast) finds it normal
    assert not rep.groups[0].flipped_contrast
    src = read_star_blocks(sim_files.star, names_as_strings=True)
    dst = read_star_blocks(rep.out_star, names_as_strings=True)
    changed = {"rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"}
    p0, p1 = src["particles"], dst["particles"]
    # one column added: each particle's posterior SD of its refined mean defocus
    assert list(p1.columns) == list(p0.columns) + ["anisoctfDefocusError"]
    np.testing.assert_allclose(
        p1["anisoctfDefocusError"].astype(float), rep.groups[0].defocus_sd, atol=1e-6
    )
    assert np.all(rep.groups[0].defocus_sd > 0)
    for c in p0.columns:
        if c not in changed:
            assert p0[c].tolist() == p1[c].tolist(), c
    assert not np.allclose(p0["rlnDefocusU"], p1["rlnDefocusU"])
    o0, o1 = src["optics"], dst["optics"]
    assert list(o1.columns) == list(o0.columns) + [
        "rlnMagMat00",
        "rlnMagMat01",
        "rlnMagMat10",
        "rlnMagMat11",
    ]
    for c in o0.columns:
        assert o0[c].tolist() == o1[c].tolist()
    m = np.array(
        [[o1["rlnMagMat00"][0], o1["rlnMagMat01"][0]], [o1["rlnMagMat10"][0], o1["rlnMagMat11"][0]]]
    )
    np.testing.assert_allclose(m, rep.groups[0].mag.array, rtol=0, atol=1e-15)
    # defocus written is the refined, true-frame value
    np.testing.assert_allclose(p1["rlnDefocusU"].astype(float), rep.groups[0].defocus_u, atol=1e-5)
    js = json.loads((tmp_path / "anisomag_group1.json").read_text())
    assert js["n_particles"] == 48 and len(js["per_frequency"]) == st.n_shells
    assert len(js["displacement_field"]["observed_x"]) == 32 // 8
    assert (tmp_path / "anisomag_group1.png").stat().st_size > 1000
    # half maps: with both halves equal to the map, the answer is the same
    rep2 = run_refine(
        sim_files.star, tmp_path / "h", half_maps=(str(sim_files.reference),) * 2, settings=st
    )
    np.testing.assert_allclose(rep2.groups[0].mag.array, rep.groups[0].mag.array, atol=1e-9)


def test_refine_errors_are_one_line(sim_files, tmp_path) -> None:
    runner = CliRunner()
    r = runner.invoke(app, ["refine", str(sim_files.star), "--out", str(tmp_path / "a")])
    assert r.exit_code == 2 and "no reference map" in r.output and r.output.count("\n") <= 2
    # no poses
    text = sim_files.star.read_text()
    for c in ("_rlnAngleRot", "_rlnAngleTilt", "_rlnAnglePsi"):
        text = text.replace(c + " ", "_rlnX" + c[4:] + " ")
    nopose = sim_files.star.parent / "nopose.star"
    nopose.write_text(text)
    r = runner.invoke(
        app,
        [
            "refine",
            str(nopose),
            "--reference",
            str(sim_files.reference),
            "--out",
            str(tmp_path / "b"),
        ],
    )
    assert r.exit_code == 2 and "no 3D poses" in r.output
    # a reference that is not a cube, and one of the wrong size
    bad = tmp_path / "flat.mrc"
    write_mrc(bad, np.zeros((8, 16, 16), np.float32), 2.0, stack=False)
    with pytest.raises(InputError, match="not a cube"):
        run_refine(sim_files.star, tmp_path / "c", reference=bad)
    small = tmp_path / "small.mrc"
    write_mrc(small, np.ones((8, 8, 8), np.float32), 2.0, stack=False)
    with pytest.raises(InputError, match="not a reference for these particles"):
        run_refine(sim_files.star, tmp_path / "d", reference=small)
    with pytest.raises(InputError, match="half maps need _rlnRandomSubset"):
        star = sim_files.star.parent / "nosubset.star"
        star.write_text(sim_files.star.read_text().replace("_rlnRandomSubset", "_rlnXSubset"))
        run_refine(star, tmp_path / "e", half_maps=(str(small), str(small)))


def test_wrong_reference_pixel_size_is_refused(sim_files, tmp_path) -> None:
    """A reference with a 30 % wrong pixel size asks for a huge step: one-line FitError."""
    from anisoctf.errors import FitError

    with pytest.raises(FitError, match="does not match these particles"):
        run_refine(sim_files.star, tmp_path, reference=sim_files.reference, ref_apix=2.6)


def test_simulate_particles_cli(tmp_path) -> None:
    r = CliRunner().invoke(
        app,
        [
            "simulate-particles",
            "--out",
            str(tmp_path),
            "--n",
            "6",
            "--box",
            "32",
            "--micrographs",
            "2",
            "--anisotropy",
            "2",
        ],
    )
    assert r.exit_code == 0, r.output
    truth = json.loads((tmp_path / "truth.json").read_text())
    assert truth["anisotropy_percent"] == pytest.approx(2.0)
    assert len(read_particles(tmp_path / "particles.star")) == 6


def test_compare_matrices_side_by_side(tmp_path) -> None:
    mic = MagMat.from_anisotropy(1.5, 30.0)
    par = MagMat(1.01 * MagMat.from_anisotropy(1.4, 32.0).array)  # with a scale
    c = compare_matrices(mic, par, {"anisotropy_ci": [1.3, 1.7], "axis_ci": [25.0, 35.0]}, {})
    assert c["difference"]["anisotropy_percent"] == pytest.approx(-0.1, abs=1e-9)
    assert c["difference"]["axis_deg"] == pytest.approx(2.0, abs=1e-9)
    assert c["within_micrograph_ci"] is True
    np.testing.assert_allclose(
        c["particle"]["symmetric_unit"], MagMat.from_anisotropy(1.4, 32.0).array, atol=1e-12
    )
    a = tmp_path / "a.json"
    b = tmp_path / "b.json"
    a.write_text(json.dumps({"mag_matrix": mic.array.tolist()}))
    b.write_text(json.dumps({"mag_matrix": par.array.tolist()}))
    r = CliRunner().invoke(
        app, ["aniso", "compare", str(a), str(b), "--json", str(tmp_path / "c.json")]
    )
    assert r.exit_code == 0, r.output
    assert "anisotropy" in r.output
    assert json.loads((tmp_path / "c.json").read_text())["difference"]["axis_deg"] == (
        pytest.approx(2.0, abs=1e-9)
    )


def test_real_particles_run_end_to_end(shared_real, tmp_path) -> None:
    """Real RELION 3.1 particles (cryoDRGN relion31.star/.mrcs) through refine --fit defocus.

    No matching reference exists in shared/ (its maps are not cubes), so a blob map spanning the
    same 718 Å is used: this exercises the real STAR and stacks end to end, not the science.
    """
    star = shared_real / "cryodrgn" / "relion31.star"
    spike = shared_real / "cryodrgn" / "spike-vol.mrc"
    with pytest.raises(InputError, match="not a cube"):
        run_refine(star, tmp_path / "x", reference=spike)
    ref = tmp_path / "blob.mrc"
    write_mrc(ref, blob_map(32, seed=1).astype(np.float32), 256 * 2.806 / 32, stack=False)
    st = RefineSettings(fit_anisomag=False, rounds=1, defocus_search=200.0, defocus_step=50.0)
    rep = run_refine(star, tmp_path / "out", reference=ref, settings=st)
    src = read_star_blocks(star, names_as_strings=True)["particles"]
    dst = read_star_blocks(tmp_path / "out" / OUT_STAR, names_as_strings=True)["particles"]
    assert list(dst.columns) == list(src.columns) + ["anisoctfDefocusError"] and len(dst) == 5
    for c in src.columns:
        if c not in ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"):
            assert src[c].tolist() == dst[c].tolist(), c
    # The defocus written is the STAR's own plus the reported change, exactly (6 decimals in
    # the STAR), and the angle is kept: this replaced |change| <= 200, which the search range
    # guaranteed and so could not fail. Its accuracy is not checked here (a blob is no
    # reference for these particles: the fit runs to the search limit); that is pinned on the
    # RELION-made set with its truth (test_relion_made_particles_have_normal_contrast).
    g = rep.groups[0]
    for c in ("rlnDefocusU", "rlnDefocusV"):
        np.testing.assert_allclose(
            dst[c].astype(float) - src[c].astype(float), g.defocus_change, rtol=0, atol=2e-6
        )
    turn = dst["rlnDefocusAngle"].astype(float) - src["rlnDefocusAngle"].astype(float)
    np.testing.assert_allclose(np.mod(turn + 1.0, 180.0) - 1.0, 0.0, atol=1e-6)  # [0, 180)
    # a STAR without poses says so
    with pytest.raises(InputError, match="no 3D poses"):
        run_refine(shared_real / "cryodrgn" / "empiar_10076_7.star", tmp_path / "y", reference=ref)


def test_relion_made_particles_have_normal_contrast(shared_real, tmp_path) -> None:
    """RELION's CTF sign (issue 13 item 4) on particles made with it, against their truth.

    ``../shared/data/relion_ctfrefine`` was simulated with RELION's sign (``CTF::getCTF``,
    +w at k = 0) from ``reference.mrc``; 40 of its particles are refined here. With the old
    sign (−1) ``refine`` said "image contrast is inverted" and the defocus ran to the ±300 Å
    search limit on every particle; with RELION's the contrast is normal and the STAR's
    perturbed defocus (RMS 91 Å from the truth) comes back to an RMS of 15 Å (measured).
    """
    d = shared_real.parent / "relion_ctfrefine"
    if not (d / "particles.star").is_file():
        pytest.skip(f"RELION-made particles not found at {d}")
    lines, n = [], 0
    for line in (d / "particles.star").read_text().splitlines():
        if "@Particles/" in line:
            n += 1
            if n > 40:
                continue
            line = line.replace("@Particles/", f"@{d}/Particles/")
        lines.append(line)
    star = tmp_path / "sub.star"
    star.write_text("\n".join(lines) + "\n")
    said: list[str] = []
    st = RefineSettings(
        fit_anisomag=False, rounds=1, defocus_search=300.0, defocus_step=50.0, threads=1
    )
    rep = run_refine(
        star,
        tmp_path / "out",
        reference=d / "reference.mrc",
        settings=st,
        ref_apix=1.0,
        log=said.append,
    )
    g = rep.groups[0]
    assert not g.flipped_contrast
    assert not any("inverted" in m for m in said)
    truth = json.loads((d / "truth.json").read_text())["particles"][:40]
    true_mean = np.array([0.5 * (t["dfU"] + t["dfV"]) for t in truth])
    got = 0.5 * (g.defocus_u + g.defocus_v)
    start = got - g.defocus_change
    assert np.sqrt(np.mean((start - true_mean) ** 2)) > 60.0  # the STAR's values are off
    err = got - true_mean
    # 50 Å grid + parabola; the truth's 1.2 % anisomag and aberrations are not fitted here
    assert np.sqrt(np.mean(err**2)) < 30.0 and np.max(np.abs(err)) < 60.0
    assert np.max(np.abs(g.defocus_change)) < 299.0  # nothing at the search limit


def test_premultiplied_particles_are_refused(sim_files, tmp_path) -> None:
    """``_rlnCtfDataAreCtfPremultiplied = 1`` (images carry CTF²) is refused in one line."""
    text = sim_files.star.read_text()
    head, sep, rest = text.partition("data_particles")
    labels = [ln for ln in head.splitlines() if ln.startswith("_rln")]
    after = head.splitlines()[head.splitlines().index(labels[-1]) + 1 :]
    rows = [ln for ln in after if ln.strip() and not ln.startswith("#")]
    assert labels and len(rows) == 1
    head = head.replace(labels[-1], labels[-1] + "\n_rlnCtfDataAreCtfPremultiplied")
    head = head.replace(rows[0], rows[0] + " 1")
    star = sim_files.star.parent / "premultiplied.star"  # beside the stacks
    star.write_text(head + sep + rest)
    r = CliRunner().invoke(
        app,
        ["refine", str(star), "--reference", str(sim_files.reference), "--out", str(tmp_path)],
    )
    assert r.exit_code == 2, r.output
    assert "_rlnCtfDataAreCtfPremultiplied = 1" in r.output and "re-extract" in r.output
    assert r.output.count("\n") <= 2
    # the same file with the flag 0 is accepted as before
    star.write_text(head.replace(rows[0] + " 1", rows[0] + " 0") + sep + rest)
    st = RefineSettings(fit_anisomag=False, rounds=1, defocus_search=100.0)
    assert run_refine(star, tmp_path / "ok", reference=sim_files.reference, settings=st).groups
