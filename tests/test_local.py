"""Local defocus: tilt conventions, profiles, the surface, thickness, the job, ``assign``.

Simulated 2048² micrographs at 1 Å per pixel (16 tiles of 512 px) with known tilt, thickness
and defocus are shared by the tests through module fixtures; the 4096² targets are checked by
benchmarks/bench_local.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from anisoctf import CTFParams, MicrographSpec, Optics, estimate_ctf, simulate_micrograph
from anisoctf.cli.main import app
from anisoctf.errors import InputError
from anisoctf.fit.result import FitSettings
from anisoctf.io import read_ctffind_txt, write_mrc
from anisoctf.io.star import MicrographCTFRow, read_micrographs_ctf_star, write_micrographs_ctf_star
from anisoctf.io.surface import read_surface_json, write_surface_json
from anisoctf.jobs.assign_particles import run_assign
from anisoctf.jobs.estimate_micrographs import run_estimate
from anisoctf.local.corrected import corrected_power, refit_tilt_corrected
from anisoctf.local.estimate import LocalEstimate, LocalSettings, PatchEstimate, estimate_local
from anisoctf.local.plane import robust_tile_weights
from anisoctf.local.profiles import modulation, window_autocorrelation
from anisoctf.local.surface import DefocusSurface
from anisoctf.local.tilt import gradient_from_tilt, tilt_from_gradient
from anisoctf.simulate.micrograph import _defocus_levels
from anisoctf.spectrum.periodogram import taper_window
from anisoctf.spectrum.tiles import TileSpectra

runner = CliRunner()
SIZE = 2048
OPTICS = Optics(pixel_size=1.0, voltage_kv=300.0)
#: the simulator's optics as ``estimate`` options (MRC files carry no voltage)
GIVEN = {"apix": 1.0, "kv": OPTICS.voltage_kv, "cs": OPTICS.cs_mm, "ac": OPTICS.amplitude_contrast}
CTF = CTFParams(16000.0, 15000.0, 30.0, 0.0, 60.0)


def _spec(**kw) -> MicrographSpec:
    base = dict(shape=(SIZE, SIZE), optics=OPTICS, ctf=CTF, seed=3, tilt_max_res=3.0)
    base.update(kw)
    return MicrographSpec(**base)


def _truth(spec: MicrographSpec, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    gx, gy = gradient_from_tilt(spec.tilt_angle_deg, spec.tilt_axis_deg, spec.optics.pixel_size)
    ny, nx = spec.shape
    return spec.ctf.mean_defocus + gx * (x - nx / 2) + gy * (y - ny / 2)


@pytest.fixture(scope="module")
def tilted() -> tuple[MicrographSpec, np.ndarray]:
    spec = _spec(tilt_angle_deg=30.0, tilt_axis_deg=70.0)
    return spec, simulate_micrograph(spec).image


@pytest.fixture(scope="module")
def flat() -> tuple[MicrographSpec, np.ndarray]:
    spec = _spec()
    return spec, simulate_micrograph(spec).image


# ------------------------------------------------------------------------------- conventions
@pytest.mark.parametrize("mag", [None, [[1.015, 0.004], [0.004, 0.99]]])
def test_tilt_convention_roundtrip(mag) -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        tilt, axis = rng.uniform(-70, 70), rng.uniform(0, 180)
        gx, gy = gradient_from_tilt(tilt, axis, 1.3, mag)
        t2, a2 = tilt_from_gradient(gx, gy, 1.3, mag)
        assert t2 == pytest.approx(tilt, abs=1e-9)
        assert a2 == pytest.approx(axis, abs=1e-9)


def test_tilt_convention_sign_and_axis() -> None:
    # axis along +x, the +y side (rows further down) more underfocused: positive tilt
    gx, gy = gradient_from_tilt(20.0, 0.0, 1.0)
    assert gx == pytest.approx(0.0, abs=1e-12)
    assert gy == pytest.approx(math.tan(math.radians(20.0)))
    # the same plane described with the axis turned by 180° is the opposite tilt sign
    assert tilt_from_gradient(0.0, -gy, 1.0) == pytest.approx((-20.0, 0.0))
    # a gradient along +x: axis along y (90°), the −x side (axis +90°) lower, so tilt < 0
    assert tilt_from_gradient(0.5, 0.0, 1.0) == pytest.approx((-math.degrees(math.atan(0.5)), 90.0))
    # pixel size: Å of defocus per pixel over Å per pixel
    assert tilt_from_gradient(0.0, 2.0, 2.0)[0] == pytest.approx(45.0)


def test_tilt_convention_matches_the_simulator() -> None:
    spec = _spec(shape=(64, 96), tilt_angle_deg=25.0, tilt_axis_deg=130.0)
    offset, _ = _defocus_levels(spec)
    y, x = np.mgrid[0:64, 0:96].astype(float)
    plane = _truth(spec, x, y) - spec.ctf.mean_defocus
    np.testing.assert_allclose(offset, plane, atol=1e-9)


def test_tilt_in_true_frame_with_a_magnification_matrix() -> None:
    # a tilt measured on image positions is reported for specimen positions r_true = M^-T r_obs
    m = np.array([[1.02, 0.0], [0.0, 0.98]])
    g_true = np.array([0.0, math.tan(math.radians(30.0))])
    g_obs = np.linalg.solve(m, g_true)
    tilt, axis = tilt_from_gradient(g_obs[0], g_obs[1], 1.0, m)
    assert (tilt, axis) == pytest.approx((30.0, 0.0))
    r_obs = np.array([3.0, 7.0])
    r_true = np.linalg.solve(m.T, r_obs)
    assert g_obs @ r_obs == pytest.approx(g_true @ r_true)


def test_window_autocorrelation_matches_the_taper() -> None:
    tile = 128
    w = taper_window(tile)[tile // 2].astype(np.float64)
    r = window_autocorrelation(tile)
    for lag in (0, 1, 17, 64, 127):
        direct = np.dot(w[: tile - lag], w[lag:]) / np.dot(w, w)
        assert r[lag] == pytest.approx(direct, rel=1e-9)
    assert np.all(np.diff(r) <= 1e-12)


def test_thickness_modulation_is_the_average_over_the_slab() -> None:
    lam = OPTICS.wavelength
    k2 = np.linspace(0.0, 0.1, 7)
    t, spread = 800.0, (300.0, 120.0)
    # average cos(2πλk²·offset) over independent uniform offsets (midpoint quadrature)
    n = 400
    o = (np.arange(n) + 0.5) / n - 0.5
    avg = np.ones_like(k2)
    for width in (t, *spread):
        avg = avg * np.mean(np.cos(2 * np.pi * lam * k2[:, None] * width * o[None, :]), axis=1)
    np.testing.assert_allclose(modulation(k2, OPTICS, t, spread), avg, atol=2e-5)


# ------------------------------------------------------------------------------- surface
def test_surface_evaluation_and_json_roundtrip(tmp_path: Path) -> None:
    coef = np.random.default_rng(1).normal(0, 20, (4, 5))
    s = DefocusSurface(shape=(300, 400), d0=12000.0, gx=0.3, gy=-0.2, coef=coef)
    assert float(s.plane(200.0, 150.0)) == pytest.approx(12000.0)
    assert float(s.plane(210.0, 150.0)) == pytest.approx(12003.0)
    s2 = DefocusSurface.from_dict(json.loads(json.dumps(s.to_dict())))
    x, y = np.random.default_rng(2).uniform(0, 400, (2, 50))
    np.testing.assert_array_equal(s(x, y), s2(x, y))
    local = LocalEstimate(
        surface=s,
        tilt_angle=10.0,
        tilt_axis=20.0,
        tilt_sigma=0.1,
        patches=(PatchEstimate(10.0, 20.0, float("nan"), float("inf"), 1, 3.0, True),),
        thickness=None,
        thickness_sigma=float("inf"),
        astigmatism=500.0,
        angle_deg=33.0,
        phase_shift_deg=0.0,
        n_tiles=4,
        tile=128,
    )
    path = tmp_path / "m_surface.json"
    write_surface_json(path, local, "m.mrc", 1.1)
    rec = read_surface_json(path)
    np.testing.assert_array_equal(rec.surface(x, y), s(x, y))
    assert (rec.astigmatism, rec.angle_deg, rec.micrograph) == (500.0, 33.0, "m.mrc")
    assert rec.meta["patches"][0]["defocus"] is None  # NaN is written as null
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(InputError, match="bad.json"):
        read_surface_json(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text('{"format": "something else"}')
    with pytest.raises(InputError, match="not an anisoctf defocus surface"):
        read_surface_json(tmp_path / "other.json")


def test_star_local_columns_roundtrip(tmp_path: Path) -> None:
    rows = [
        MicrographCTFRow(
            "a.mrc",
            1,
            "",
            15000.0,
            14000.0,
            30.0,
            0.2,
            4.0,
            None,
            25.5,
            120.0,
            830.0,
            "out/a_surface.json",
        ),
        MicrographCTFRow("b.mrc", 1, "", 15500.0, 14500.0, 35.0, 0.2, 4.0),
    ]
    path = tmp_path / "m.star"
    write_micrographs_ctf_star(path, rows, {1: OPTICS})
    back, _ = read_micrographs_ctf_star(path)
    assert back[0] == rows[0]
    assert back[1] == rows[1]
    text = path.read_text()
    assert "_rlnCtfIceThickness" in text and "_anisoctfTiltAngle" in text


# ------------------------------------------------------------------------------- estimation
def test_tilted_micrograph(tilted) -> None:
    spec, img = tilted
    g = estimate_ctf(img, OPTICS)
    loc = estimate_local(img, OPTICS, g)
    assert abs(loc.tilt_angle - 30.0) < 1.5
    assert abs(loc.tilt_axis - 70.0) < 5.0
    rng = np.random.default_rng(5)
    x, y = rng.uniform(0, SIZE, (2, 200))
    err = loc.surface(x, y) - _truth(spec, x, y)
    assert np.sqrt(np.mean(err**2)) < 40.0
    ok = [p for p in loc.patches if not p.outlier]
    assert len(ok) >= 20
    perr = np.array([p.defocus - float(_truth(spec, p.x, p.y)) for p in ok])
    assert np.sqrt(np.mean(perr**2)) < 60.0
    # the shared astigmatism comes from the global fit
    assert loc.astigmatism == pytest.approx(g.params.astigmatism)


def test_untilted_micrograph(flat) -> None:
    spec, img = flat
    g = estimate_ctf(img, OPTICS)
    loc = estimate_local(img, OPTICS, g)
    assert abs(loc.tilt_angle) < 2.5
    assert abs(loc.surface.d0 - g.params.mean_defocus) < 30.0
    assert abs(loc.surface.d0 - spec.ctf.mean_defocus) < 40.0


def test_blank_region_patches_are_left_out(tilted) -> None:
    spec, img = tilted
    img = img.copy()
    rng = np.random.default_rng(9)
    # a third of the image without any specimen (e.g. over the carbon hole edge): pure noise
    img[:, : SIZE // 3] = rng.poisson(float(img.mean()), (SIZE, SIZE // 3)).astype(np.float32)
    g = estimate_ctf(img, OPTICS)
    loc = estimate_local(img, OPTICS, g)
    left = [p for p in loc.patches if p.x < SIZE / 3 - 300]
    assert left and all(p.outlier for p in left)
    assert abs(loc.tilt_angle - 30.0) < 2.0
    assert abs(loc.tilt_axis - 70.0) < 6.0


def test_thickness() -> None:
    spec = _spec(thickness=1500.0, seed=4)
    img = simulate_micrograph(spec).image
    g = estimate_ctf(img, OPTICS)
    loc = estimate_local(img, OPTICS, g, local=LocalSettings(thickness=True))
    assert loc.thickness == pytest.approx(1500.0, abs=150.0)
    assert loc.thickness_sigma < 200.0


def test_thin_sample_reports_no_thickness(flat) -> None:
    _, img = flat
    g = estimate_ctf(img, OPTICS)
    loc = estimate_local(img, OPTICS, g, local=LocalSettings(thickness=True))
    assert loc.thickness == 0.0
    assert any("no sign of sample thickness" in w for w in loc.warnings)


# ------------------------------------------------------------------------------- job and assign
@pytest.fixture(scope="module")
def estimated(tilted, flat, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("local_job")
    write_mrc(root / "tilted.mrc", tilted[1], 1.0)
    write_mrc(root / "flat.mrc", flat[1], 1.0)
    out = root / "est"
    report = run_estimate(
        [str(root / "tilted.mrc"), str(root / "flat.mrc")],
        out,
        FitSettings(),
        **GIVEN,
        quiet=True,
        local=LocalSettings(patches=(4, 3), thickness=True),
    )
    assert report.exit_code == 0
    plain = run_estimate(
        [str(root / "flat.mrc")], root / "plain", FitSettings(), **GIVEN, quiet=True
    )
    assert plain.exit_code == 0
    return root


def test_job_outputs(estimated: Path) -> None:
    out = estimated / "est"
    rows, _ = read_micrographs_ctf_star(out / "micrographs_ctf.star")
    by = {Path(r.name).name: r for r in rows}
    t = by["tilted.mrc"]
    assert t.tilt_angle == pytest.approx(30.0, abs=1.5)
    assert t.thickness is not None
    assert Path(t.surface).name == "tilted_surface.json"
    rec = read_surface_json(Path(t.surface))
    assert len(rec.meta["patches"]) == 12
    # CTFFIND 5 columns 8-10: tilt axis, tilt angle, thickness
    txt = read_ctffind_txt(out / "tilted.txt")[0]
    assert txt.tilt_axis == pytest.approx(t.tilt_axis, abs=1e-4)
    assert txt.tilt_angle == pytest.approx(t.tilt_angle, abs=1e-4)
    png = (out / "tilted_defocus.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    # the global estimate does not change when local defocus is asked for
    plain, _ = read_micrographs_ctf_star(estimated / "plain" / "micrographs_ctf.star")
    f = by["flat.mrc"]
    assert (f.defocus_u, f.defocus_v, f.defocus_angle) == (
        plain[0].defocus_u,
        plain[0].defocus_v,
        plain[0].defocus_angle,
    )


def _particles_star(path: Path, names: list[str], xy: np.ndarray, with_defocus: bool) -> None:
    cols = ["rlnCoordinateX", "rlnCoordinateY", "rlnMicrographName", "rlnOpticsGroup"]
    if with_defocus:
        cols += ["rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnCtfAstigmatism"]
    cols += ["rlnClassNumber"]
    lines = [
        "",
        "data_optics",
        "",
        "loop_",
        "_rlnOpticsGroup #1",
        "_rlnVoltage #2",
        "1   300.000000",
        "",
        "data_particles",
        "",
        "loop_",
    ]
    lines += [f"_{c} #{i + 1}" for i, c in enumerate(cols)]
    for n, (x, y) in zip(names, xy, strict=True):
        row = [f"{x:.6f}", f"{y:.6f}", n, "1"]
        if with_defocus:
            row += ["10000.000000", "9000.000000", "5.000000", "1000.000000"]
        row += ["7"]
        lines.append("  ".join(row))
    path.write_text("\n".join(lines) + "\n")


def test_assign(estimated: Path, tilted) -> None:
    spec, _ = tilted
    root = estimated
    rng = np.random.default_rng(3)
    xy = rng.uniform(0, SIZE, (7, 2))
    names = [str(root / "tilted.mrc")] * 4 + [str(root / "flat.mrc")] * 2 + ["gone.mrc"]
    src = root / "particles.star"
    _particles_star(src, names, xy, with_defocus=True)
    dst = root / "assigned.star"
    s = run_assign(src, root / "est", dst)
    assert (s.n_particles, s.n_from_surface, s.n_missing) == (7, 6, 1)
    assert s.missing_micrographs == ("gone.mrc",)
    rec = read_surface_json(root / "est" / "tilted_surface.json")
    old = src.read_text().splitlines()
    new = dst.read_text().splitlines()
    assert len(old) == len(new)
    body = [i for i, line in enumerate(old) if line.endswith("  7")]
    for k, i in enumerate(body):
        a, b = old[i].split(), new[i].split()
        assert a[:4] == b[:4] and a[-1] == b[-1]  # every other column untouched
        if k < 4:
            d = float(rec.surface(xy[k, 0], xy[k, 1]))
            u, v, ang, ast = (float(t) for t in b[4:8])
            assert u == pytest.approx(d + rec.astigmatism / 2, abs=1e-5)
            assert v == pytest.approx(d - rec.astigmatism / 2, abs=1e-5)
            assert ang == pytest.approx(rec.angle_deg, abs=1e-5)
            assert ast == pytest.approx(u - v, abs=1e-5)
            assert abs(d - float(_truth(spec, xy[k, 0], xy[k, 1]))) < 60.0
        if k == 6:
            assert a == b  # no estimate: kept
    # lines outside the particle rows are identical
    assert [old[i] for i in range(len(old)) if i not in body] == [
        new[i] for i in range(len(new)) if i not in body
    ]
    # columns are appended when the input had no defocus
    src2 = root / "particles_nodf.star"
    _particles_star(src2, names[:6], xy[:6], with_defocus=False)
    s2 = run_assign(src2, root / "est", root / "assigned2.star")
    assert s2.n_missing == 0
    assert "_rlnDefocusU #6" in (root / "assigned2.star").read_text()


def test_assign_cli_and_bad_input(estimated: Path) -> None:
    root = estimated
    src = root / "particles_cli.star"
    _particles_star(src, [str(root / "tilted.mrc"), "gone.mrc"], np.array([[5, 5], [6, 6]]), True)
    r = runner.invoke(
        app, ["assign", str(src), "--ctf", str(root / "est"), "--out", str(root / "a.star")]
    )
    assert r.exit_code == 1
    assert "gone.mrc" in r.output
    r = runner.invoke(app, ["assign", str(src), "--ctf", str(root), "--out", str(root / "b.star")])
    assert r.exit_code == 2 and "micrographs_ctf.star" in r.output
    assert not (root / "b.star").exists()
    nocoord = root / "nocoord.star"
    nocoord.write_text("data_particles\nloop_\n_rlnMicrographName\n_rlnCoordinateX\na.mrc 1\n")
    with pytest.raises(InputError, match="rlnCoordinateY"):
        run_assign(nocoord, root / "est", root / "c.star")


def test_cli_patches_option_errors(tmp_path: Path) -> None:
    r = runner.invoke(app, ["estimate", "x.mrc", "--patches", "5by5", "--out", str(tmp_path)])
    assert r.exit_code == 2
    assert "--patches must look like 5x5" in r.output
    r = runner.invoke(app, ["estimate", "x.mrc", "--patches", "0x3", "--out", str(tmp_path)])
    assert r.exit_code == 2


def test_tilt_and_surface_with_a_magnification_matrix() -> None:
    mag = ((1.015, 0.005), (0.005, 0.99))
    optics = Optics(pixel_size=1.0, voltage_kv=300.0, mag_matrix=mag)
    spec = _spec(optics=optics, tilt_angle_deg=25.0, tilt_axis_deg=40.0, seed=8)
    img = simulate_micrograph(spec).image
    g = estimate_ctf(img, optics)
    loc = estimate_local(img, optics, g)
    # the simulator tilts in image coordinates; the estimate reports the specimen's tilt
    gx, gy = gradient_from_tilt(25.0, 40.0, 1.0)
    tilt_true, axis_true = tilt_from_gradient(gx, gy, 1.0, mag)
    assert abs(loc.tilt_angle - tilt_true) < 1.5
    assert abs(loc.tilt_axis - axis_true) < 5.0
    # and the surface, on image pixels, is the simulator's plane around the true-frame defocus
    rng = np.random.default_rng(2)
    x, y = rng.uniform(0, SIZE, (2, 100))
    err = loc.surface(x, y) - _truth(spec, x, y)
    assert np.sqrt(np.mean(err**2)) < 50.0
    # the shared astigmatism is the global fit's (true frame; the tilt blurs its rings a little)
    assert loc.astigmatism == pytest.approx(g.params.astigmatism)
    assert loc.astigmatism == pytest.approx(spec.ctf.astigmatism, abs=150.0)


def test_carbon_corner_does_not_tilt_the_plane(tilted) -> None:
    spec, img = tilted
    img = img.copy()
    # strong rings at another height (carbon, 1.3 µm further from focus) in one corner
    carbon = simulate_micrograph(
        _spec(ctf=CTFParams(17300.0, 16300.0, 30.0, 0.0, 60.0), snr=3.0, seed=5)
    ).image
    img[:700, :700] = carbon[:700, :700] * (img.mean() / carbon.mean())
    g = estimate_ctf(img, OPTICS)
    loc = estimate_local(img, OPTICS, g)
    # the tile half on the carbon (255, 767) has its own peak 450 Å (8 SD) above the plane: the
    # robust (biweight) final plane takes its vote away (29.8° / 69.9° here, the clean
    # micrograph gives 29.8° / 69.2°); without it the plane leaned to 31.7° / 74.9°
    assert abs(loc.tilt_angle - 30.0) < 0.6
    assert abs(loc.tilt_axis - 70.0) < 1.5
    corner = [p for p in loc.patches if p.x < 500 and p.y < 500]
    assert corner and all(p.outlier for p in corner)
    rng = np.random.default_rng(4)
    x, y = rng.uniform(0, SIZE, (2, 400))
    m = (x > 800) | (y > 800)
    err = loc.surface(x[m], y[m]) - _truth(spec, x[m], y[m])
    assert np.sqrt(np.mean(err**2)) < 20.0  # 6.5 Å (37 Å before the robust plane)


def test_robust_tile_weights_drop_a_peak_off_the_plane() -> None:
    offsets = np.arange(-600.0, 601.0, 10.0)
    xs = np.array([-500.0, 0.0, 500.0, 0.0])
    ys = np.zeros(4)
    z_ref = np.full(4, 10000.0)
    sd = 40.0
    # Δχ² curves peaked at the plane for three tiles, 400 Å (10 SD) above it for the fourth
    centres = np.array([0.0, 0.0, 0.0, 400.0])
    curves = 200.0 - (offsets[None, :] - centres[:, None]) ** 2 / sd**2
    curves = np.maximum(curves, 0.0)
    w = robust_tile_weights(curves, offsets, z_ref, xs, ys, np.array([10000.0, 0.0, 0.0]))
    assert w[:3] == pytest.approx(np.ones(3), abs=1e-6)
    assert w[3] == 0.0
    # in units of sqrt(SD² + 30²) = 50 Å: 2 units off keeps its whole vote, 4.5 units off
    # (1.5 beyond the flat top of 3) gets the biweight (1 − (1.5/3)²)²
    for off, want in ((100.0, 1.0), (225.0, (1 - 0.5**2) ** 2)):
        centres[3] = off
        curves = np.maximum(200.0 - (offsets[None, :] - centres[:, None]) ** 2 / sd**2, 0.0)
        w = robust_tile_weights(curves, offsets, z_ref, xs, ys, np.array([10000.0, 0.0, 0.0]))
        assert w[3] == pytest.approx(want, abs=0.02)


# ------------------------------------------------------------------------------- tilt-corrected
def test_corrected_power_moves_each_tiles_rings_to_the_centres() -> None:
    """A tile at defocus D0 + δ, rescaled, has the centre's CTF² (with Cs, astigmatism and a
    magnification matrix): the exact phase-matching map, checked against the kernel's CTF²."""
    mag = ((1.02, 0.01), (0.01, 0.985))
    opt = Optics(pixel_size=1.0, voltage_kv=300.0, mag_matrix=mag)
    box = 256
    ky = np.fft.fftfreq(box)[:, None]
    kx = np.fft.rfftfreq(box)[None, :]
    centre = CTFParams(10300.0, 9700.0, 25.0)
    offsets = np.array([-1500.0, 0.0, 1200.0])

    def ctf2(p: CTFParams) -> np.ndarray:
        from anisoctf.optics.ctf import chi, frequency_features
        from anisoctf.optics.kernel import ctf_constants, ctf_from_chi

        return ctf_from_chi(chi(frequency_features(kx, ky, mag), p, opt), ctf_constants(opt)) ** 2

    power = np.stack(
        [ctf2(CTFParams(centre.defocus_u + d, centre.defocus_v + d, 25.0)) for d in offsets]
    ).astype(np.float32)
    tiles = TileSpectra(power, np.zeros((3, 2)), 1.0, box, (box, box), np.ones(3))
    out = corrected_power(tiles, opt, centre, offsets)
    k = np.hypot(kx, ky)
    band = (k > 1 / 30) & (k < 1 / 10)  # ≥ 10 pixels per ring period: bilinear is exact enough
    assert np.max(np.abs(out - ctf2(centre))[band]) < 0.03
    # without the rescaling, a tile's rings are far from the centre's
    assert np.max(np.abs(power[0] - ctf2(centre))[band]) > 0.5
    # offsets 0: the plain weighted average, exactly
    same = corrected_power(tiles, opt, centre, np.zeros(3))
    np.testing.assert_allclose(same, power.astype(np.float64).mean(axis=0), atol=1e-6)


def test_tilted_global_fit_is_the_centres(tilted, flat) -> None:
    spec, img = tilted
    g = estimate_ctf(img, OPTICS)
    loc = estimate_local(img, OPTICS, g)
    c = refit_tilt_corrected(img, OPTICS, g, loc, FitSettings())
    assert c is not None
    # the micrograph's centre: U/V 16000/15000 Å at 30° (8 / 11 Å off, 1.6° closer than plain)
    assert c.params.defocus_u == pytest.approx(16000.0, abs=40.0)
    assert c.params.defocus_v == pytest.approx(15000.0, abs=40.0)
    assert c.params.angle_deg == pytest.approx(30.0, abs=1.0)
    # the whole-image rings of the 30° tilt fade at 4.9 Å; the corrected ones reach 3.8 Å
    assert c.fit_resolution < g.fit_resolution - 0.6
    # an untilted micrograph keeps its plain global fit
    _, img0 = flat
    g0 = estimate_ctf(img0, OPTICS)
    loc0 = estimate_local(img0, OPTICS, g0)
    assert refit_tilt_corrected(img0, OPTICS, g0, loc0, FitSettings()) is None


def test_real_tilted_micrograph_reports_its_centre(shared_real: Path, tmp_path: Path) -> None:
    """``../shared`` tilted_2048.mrc (25° about 130°, U/V 16200/15800 Å at 35°, 1.2 Å/px):
    CTFFIND 5 with its tilt search reports 16197/15797 Å, fit 2.91 Å. Plain global fit: 4.52 Å."""
    folder = shared_real.parent / "ctffind5"
    truth = json.loads((folder / "tilted_2048.json").read_text())
    report = run_estimate(
        [str(folder / "tilted_2048.mrc")],
        tmp_path / "est",
        FitSettings(),
        apix=1.2,
        kv=300.0,
        cs=2.7,
        ac=0.07,
        quiet=True,
        local=LocalSettings(),
    )
    assert report.exit_code == 0
    (row,), _ = read_micrographs_ctf_star(tmp_path / "est" / "micrographs_ctf.star")
    assert row.defocus_u == pytest.approx(truth["dfU"], abs=40.0)
    assert row.defocus_v == pytest.approx(truth["dfV"], abs=40.0)
    assert row.defocus_angle == pytest.approx(truth["angle_deg"], abs=1.0)
    assert row.max_resolution < 3.4  # 3.12 Å (CTFFIND 5: 2.91 Å; plain fit 4.52 Å)
    assert row.tilt_angle == pytest.approx(truth["tilt_deg"], abs=0.5)
    assert row.tilt_axis == pytest.approx(truth["tilt_axis_deg"], abs=1.5)
    # the surface shares the refitted astigmatism
    rec = read_surface_json(Path(row.surface))
    assert rec.astigmatism == pytest.approx(row.defocus_u - row.defocus_v, abs=1e-3)


def test_rerun_continues_only_with_the_same_local_settings(estimated: Path) -> None:
    root = estimated
    inputs = [str(root / "flat.mrc")]
    out = root / "rerun"
    local = LocalSettings(patches=(3, 3))
    first = run_estimate(inputs, out, FitSettings(), **GIVEN, quiet=True, local=local)
    assert (first.exit_code, first.n_skipped) == (0, 0)
    again = run_estimate(inputs, out, FitSettings(), **GIVEN, quiet=True, local=local)
    assert again.n_skipped == 1  # same parameters: continued, not redone
    plain = run_estimate(inputs, out, FitSettings(), **GIVEN, quiet=True)
    assert plain.n_skipped == 0  # other outputs asked for: redone
    rows, _ = read_micrographs_ctf_star(out / "micrographs_ctf.star")
    assert rows[0].tilt_angle is None and rows[0].surface == ""


def test_batch_profile_scores_equal_the_single_profile_scores() -> None:
    from anisoctf.fit.search import profile_scores
    from anisoctf.local.profiles import batch_profile_scores

    rng = np.random.default_rng(0)
    p, nb, j = 4, 120, 25
    k = np.sort(rng.uniform(0.03, 0.2, (p, nb)), axis=1)
    n = rng.integers(0, 50, (p, nb)).astype(float)
    n[:, :5] = 0.0  # empty bins carry no weight
    y = rng.exponential(1.0, (p, nb)) + 1.0
    c2 = rng.uniform(0.0, 1.0, (p, j, nb))
    batch = batch_profile_scores(k, y, n, c2, 1 / 30, 0.2)
    for i in range(p):
        single = profile_scores(k[i], y[i], n[i], c2[i], 1 / 30, 0.2)
        np.testing.assert_allclose(batch[i], single, rtol=1e-4, atol=1e-6 * np.abs(single).max())
