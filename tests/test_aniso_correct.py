"""Correcting images, coordinates and STAR tables for anisotropic magnification.

Truths used here do not come from the code under test: Gaussian sums rendered analytically in
both frames, plane waves whose frequency obeys ``k_true = M k_obs``, and simulated micrographs
whose CTF is known in the true frame.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import starfile
from typer.testing import CliRunner

from anisoctf import CTFParams, MicrographSpec, Optics, estimate_ctf, simulate_micrograph
from anisoctf.cli.main import app
from anisoctf.io.mrc import read_mrc_header, read_stack, write_mrc
from anisoctf.magnification.resample import (
    DEFAULT_METHOD,
    METHODS,
    correct_coordinates,
    correct_image,
    correct_shifts,
    corrected_pixel_size,
    image_centre,
    pixel_matrix,
    sampling_matrix,
)
from anisoctf.optics.frames import defocus_table_to_true, defocus_to_observed
from anisoctf.optics.magmat import MagMat

runner = CliRunner()


# ============================================================================ analytic images
def _rotation(deg: float) -> np.ndarray:
    t = np.deg2rad(deg)
    return np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])


def _gaussians(n: int, count: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0.0, n, (count, 2))  # (x, y) in the true (corrected) image, pixels
    widths = rng.uniform(2.0, 6.0, count)
    amps = rng.uniform(0.5, 1.5, count)
    return centres, widths, amps


def _render(n: int, blobs: tuple, a_map: np.ndarray) -> np.ndarray:
    """``sum_i a_i exp(-|c + A (w - c) - mu_i|^2 / 2 s_i^2)`` at every pixel ``w`` (x = column).

    With ``a_map = I`` this is the true-frame image; with ``a_map = A^-1`` (``A`` the sampling
    matrix of the correction) it is the recorded image whose correction is the true one.
    """
    centres, widths, amps = blobs
    cx, cy = image_centre((n, n))
    x, y = np.meshgrid(np.arange(n) - cx, np.arange(n) - cy)
    out = np.zeros((n, n))
    for (mx, my), s, amp in zip(centres, widths, amps, strict=True):
        vx = a_map[0, 0] * x + a_map[0, 1] * y + cx - mx
        vy = a_map[1, 0] * x + a_map[1, 1] * y + cy - my
        out += amp * np.exp(-(vx * vx + vy * vy) / (2.0 * s * s))
    return out


def _pair(m: MagMat, n: int = 160, keep: bool = False, seed: int = 0):
    """(recorded, true-frame truth) Gaussian-sum images for matrix ``m``."""
    a = sampling_matrix(m, keep_pixel_size=keep)
    blobs = _gaussians(n, 40, seed)
    recorded = _render(n, blobs, np.linalg.inv(a)).astype(np.float32)
    truth = _render(n, blobs, np.eye(2))
    return recorded, truth


def _rel_rms(a: np.ndarray, b: np.ndarray, border: int = 16) -> float:
    s = (slice(border, -border), slice(border, -border))
    return float(np.sqrt(np.sum((a[s] - b[s]) ** 2) / np.sum(b[s] ** 2)))


M3 = MagMat(MagMat.from_anisotropy(3.0, 30.0).array @ _rotation(0.05))  # 3 %, small rotation


@pytest.fixture(scope="module")
def pair3() -> tuple[np.ndarray, np.ndarray]:
    return _pair(M3)


@pytest.mark.parametrize("method", METHODS)
def test_gaussian_sum_is_corrected_to_the_true_frame(pair3, method):
    recorded, truth = pair3
    err = _rel_rms(correct_image(recorded, M3, method=method), truth)
    uncorrected = _rel_rms(recorded, truth)
    assert uncorrected > 0.05  # the distortion is large compared with the tolerances
    if method == "bilinear":
        default = _rel_rms(correct_image(recorded, M3), truth)
        assert err > 5.0 * default  # measurably worse than the default
        assert err < 0.03
    else:
        assert err <= 1e-3


def test_default_method_and_keep_pixel_size_with_an_isotropic_scale():
    assert DEFAULT_METHOD in METHODS
    m = MagMat.from_anisotropy(3.0, 115.0, scale=1.012)
    recorded, truth = _pair(m, keep=True, seed=3)
    assert _rel_rms(correct_image(recorded, m, keep_pixel_size=True), truth) <= 1e-3
    # the default mode only removes M / sqrt(det M): a different image from the same recording
    default = correct_image(recorded, m)
    assert _rel_rms(default, truth) > 0.05
    assert corrected_pixel_size(1.0, m) == pytest.approx(1.0 / 1.012)
    assert corrected_pixel_size(1.0, m, keep_pixel_size=True) == 1.0
    assert np.linalg.det(pixel_matrix(m)) == pytest.approx(1.0)


@pytest.mark.parametrize("method", METHODS)
def test_identity_returns_the_input(method):
    rng = np.random.default_rng(1)
    image = rng.standard_normal((70, 90)).astype(np.float32)
    out = correct_image(image, MagMat.identity(), method=method)
    assert out.dtype == np.float32 and out.shape == image.shape
    assert np.abs(out - image).max() <= 1e-6 * np.abs(image).max()


@pytest.mark.parametrize("method", ["sinc", "fourier", "spline"])
def test_m_then_inverse_round_trip(method):
    recorded, _ = _pair(M3, seed=5)
    back = correct_image(correct_image(recorded, M3, method=method), M3.inverse(), method=method)
    assert _rel_rms(back, recorded.astype(np.float64), border=24) <= 1e-3


def test_plane_wave_frequency_follows_k_true_equals_m_k_obs():
    # independent of the sampling-matrix algebra: the recorded wave has k_obs = M^-1 k_true
    n = 192
    m = np.array([[1.025, 0.012], [0.004, 0.985]])
    cx, cy = image_centre((n, n))
    x, y = np.meshgrid(np.arange(n) - cx, np.arange(n) - cy)
    k_true = np.array([0.09, -0.06])  # cycles per pixel of the corrected image (kept size)
    k_obs = np.linalg.solve(m, k_true)
    recorded = np.cos(2 * np.pi * (k_obs[0] * x + k_obs[1] * y))
    expected = np.cos(2 * np.pi * (k_true[0] * x + k_true[1] * y))
    out = correct_image(recorded, m, keep_pixel_size=True)
    assert np.abs(out - expected)[24:-24, 24:-24].max() < 5e-3
    # the transposed matrix (the other possible reading) would not line up
    wrong = correct_image(recorded, m.T, keep_pixel_size=True)
    assert np.abs(wrong - expected)[24:-24, 24:-24].max() > 0.1


def test_blob_lands_at_the_corrected_coordinate():
    n = 256
    m = MagMat(np.array([[1.03, 0.015], [0.005, 0.975]]))
    cx, cy = image_centre((n, n))
    x, y = np.meshgrid(np.arange(n), np.arange(n))
    x0, y0 = 212.3, 41.7  # far from the centre: the map moves it by several pixels
    blob = np.exp(-((x - x0) ** 2 + (y - y0) ** 2) / (2 * 3.0**2))
    for keep in (False, True):
        out = correct_image(blob, m, keep_pixel_size=keep).astype(np.float64)
        w = np.clip(out, 0.0, None)
        xc, yc = float((w * x).sum() / w.sum()), float((w * y).sum() / w.sum())
        px, py = correct_coordinates(x0, y0, m, (n, n), keep_pixel_size=keep)
        assert np.hypot(px - x0, py - y0) > 2.0
        assert abs(px - xc) < 0.05 and abs(py - yc) < 0.05
        # shifts in pixels are differences of coordinates; in Å they follow M^-T
        sx, sy = correct_shifts(x0 - cx, y0 - cy, m, unit="pixel", keep_pixel_size=keep)
        assert sx == pytest.approx(px - cx) and sy == pytest.approx(py - cy)
    ax, ay = correct_shifts(3.0, -2.0, m)
    assert np.allclose([ax, ay], np.linalg.inv(m.array).T @ [3.0, -2.0])


def test_stack_is_corrected_image_by_image_and_inputs_are_checked():
    rng = np.random.default_rng(2)
    stack = rng.standard_normal((5, 48, 40)).astype(np.float32)
    for method in METHODS:
        whole = correct_image(stack, M3, method=method)
        single = np.stack([correct_image(s, M3, method=method) for s in stack])
        assert np.abs(whole - single).max() < 1e-5
    bad = stack[0].copy()
    bad[3, 4] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        correct_image(bad, M3)
    with pytest.raises(ValueError, match="unknown method"):
        correct_image(stack[0], M3, method="cubic")
    with pytest.raises(ValueError, match="2D image"):
        correct_image(np.zeros(10), M3)
    with pytest.raises(ValueError, match="near-identity"):
        correct_image(stack[0], np.diag([1.5, 1.0]), keep_pixel_size=True)
    assert correct_image(stack[0], np.diag([1.5, 1.0]), method="spline").shape == (48, 40)


# ============================================================================ CTF check
def _angle_error(a: float, b: float) -> float:
    return ((a - b + 90.0) % 180.0) - 90.0


def test_corrected_simulated_micrograph_gives_the_true_frame_ctf():
    m = MagMat.from_anisotropy(3.0, 60.0)
    truth = CTFParams(20150.0, 19850.0, 20.0, 0.0, 60.0)  # 300 Å of real astigmatism
    optics = Optics(1.0, 300.0, 2.7, 0.07, mag_matrix=m.matrix)
    spec = MicrographSpec(shape=(2048, 2048), optics=optics, ctf=truth, seed=7, snr=1.0)
    image = simulate_micrograph(spec).image
    plain = Optics(1.0, 300.0, 2.7, 0.07)
    naive = estimate_ctf(image, plain, diagnostics=False).params
    fixed = estimate_ctf(correct_image(image, m), plain, diagnostics=False).params
    predicted = defocus_to_observed(truth, m)  # what a matrix-blind fit should see
    assert abs(naive.astigmatism - predicted.astigmatism) < 80.0
    assert naive.astigmatism > truth.astigmatism + 600.0  # the false astigmatism
    assert abs(fixed.astigmatism - truth.astigmatism) < 30.0
    assert abs(fixed.mean_defocus - truth.mean_defocus) < 30.0
    assert abs(_angle_error(fixed.angle_deg, truth.angle_deg)) < 3.0


def test_isotropic_scale_goes_into_the_pixel_size():
    m = MagMat.from_anisotropy(2.0, 150.0, scale=1.015)
    truth = CTFParams(15200.0, 14800.0, 70.0, 0.0, 60.0)
    optics = Optics(1.0, 300.0, 2.7, 0.07, mag_matrix=m.matrix)
    spec = MicrographSpec(shape=(1024, 1024), optics=optics, ctf=truth, seed=4, snr=1.5)
    image = simulate_micrograph(spec).image
    fixed = correct_image(image, m)
    p = corrected_pixel_size(1.0, m)
    est = estimate_ctf(fixed, Optics(p, 300.0, 2.7, 0.07), diagnostics=False).params
    assert abs(est.mean_defocus - truth.mean_defocus) < 40.0  # a 1.5 % pixel error: ~450 Å
    assert abs(est.astigmatism - truth.astigmatism) < 50.0


# ============================================================================ command line
_OPTICS = """
# version 30001

data_optics

loop_
_rlnOpticsGroupName #1
_rlnOpticsGroup #2
_rlnMicrographOriginalPixelSize #3
_rlnVoltage #4
_rlnSphericalAberration #5
_rlnAmplitudeContrast #6
_rlnImagePixelSize #7
_rlnImageSize #8
_rlnImageDimensionality #9
opticsGroup1 1 1.250000 300.000000 2.700000 0.100000 1.250000 64 2
"""

_PARTICLES = """
# version 30001

data_particles

loop_
_rlnCoordinateX #1
_rlnCoordinateY #2
_rlnImageName #3
_rlnMicrographName #4
_rlnOpticsGroup #5
_rlnDefocusU #6
_rlnDefocusV #7
_rlnDefocusAngle #8
_rlnOriginXAngst #9
_rlnOriginYAngst #10
100.000000 50.000000 000001@Extract/job1/mic1.mrcs Mics/mic1.mrc 1 20000.0 19000.0 30.0 1.5 -2.0
250.000000 150.000000 000003@Extract/job1/mic1.mrcs Mics/mic1.mrc 1 21000.0 20500.0 100.0 0.0 0.0
20.000000 180.000000 000002@Extract/job1/mic1.mrcs Mics/mic1.mrc 1 19000.0 18500.0 170.0 -3.0 0.5
"""

_MICS = """
# version 30001

data_micrographs

loop_
_rlnMicrographName #1
_rlnOpticsGroup #2
_rlnDefocusU #3
_rlnDefocusV #4
_rlnDefocusAngle #5
_rlnCtfAstigmatism #6
Mics/mic1.mrc 1 20000.0 19000.0 30.0 1000.0
"""

_MATRIX = ("1.02", "0.01", "0.005", "0.99")


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def project(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    (tmp_path / "Extract" / "job1").mkdir(parents=True)
    (tmp_path / "Mics").mkdir()
    write_mrc(tmp_path / "Extract/job1/mic1.mrcs", rng.standard_normal((3, 64, 64)), 1.25)
    write_mrc(tmp_path / "Mics/mic1.mrc", rng.standard_normal((200, 300)), 1.25)
    (tmp_path / "particles.star").write_text(_OPTICS + _PARTICLES)
    (tmp_path / "micrographs.star").write_text(_OPTICS + _MICS)
    return tmp_path


def _invoke(args: list[str], cwd: Path):
    import os

    old = Path.cwd()
    os.chdir(cwd)
    try:
        return runner.invoke(app, ["aniso", "correct", *args])
    finally:
        os.chdir(old)


def test_cli_particles_star(project: Path):
    before = _digest(project)
    res = _invoke(["particles.star", "--mag-matrix", *_MATRIX, "--out", "out"], project)
    assert res.exit_code == 0, res.output
    assert _digest(project / "out") and _digest(project) != before  # outputs exist...
    assert {k: v for k, v in _digest(project).items() if not k.startswith("out")} == before

    m = MagMat(np.array([float(v) for v in _MATRIX]).reshape(2, 2))
    s = m.scale
    new = starfile.read(project / "out/particles.star", always_dict=True)
    old = starfile.read(project / "particles.star", always_dict=True)
    o, p, p0 = new["optics"], new["particles"], old["particles"]
    assert [o[f"rlnMagMat{ij}"].iloc[0] for ij in ("00", "01", "10", "11")] == [1, 0, 0, 1]
    assert o["rlnImagePixelSize"].iloc[0] == pytest.approx(1.25 / s, abs=2e-6)
    assert o["rlnMicrographOriginalPixelSize"].iloc[0] == pytest.approx(1.25 / s, abs=2e-6)
    x, y = correct_coordinates(p0["rlnCoordinateX"], p0["rlnCoordinateY"], m, (200, 300))
    assert np.allclose(p["rlnCoordinateX"], x, atol=2e-6)
    assert np.allclose(p["rlnCoordinateY"], y, atol=2e-6)
    ox, oy = correct_shifts(p0["rlnOriginXAngst"], p0["rlnOriginYAngst"], m)
    assert np.allclose(p["rlnOriginXAngst"], ox, atol=2e-6)
    assert np.allclose(p["rlnOriginYAngst"], oy, atol=2e-6)
    u, v, a = defocus_table_to_true(p0["rlnDefocusU"], p0["rlnDefocusV"], p0["rlnDefocusAngle"], m)
    assert np.allclose(p["rlnDefocusU"], u, atol=2e-6)
    assert np.allclose(p["rlnDefocusAngle"], a, atol=2e-6)
    assert p["rlnImageName"].tolist() == [
        "000001@out/Extract/job1/mic1.mrcs",
        "000003@out/Extract/job1/mic1.mrcs",
        "000002@out/Extract/job1/mic1.mrcs",
    ]
    assert p["rlnMicrographName"].tolist() == ["Mics/mic1.mrc"] * 3  # not corrected here
    h = read_mrc_header(project / "out/Extract/job1/mic1.mrcs")
    assert (h.nz, h.ny, h.nx) == (3, 64, 64)
    assert h.pixel_size == pytest.approx(1.25 / s, rel=1e-6)
    stack = np.asarray(read_stack(project / "Extract/job1/mic1.mrcs"), dtype=np.float32)
    got = np.asarray(read_stack(project / "out/Extract/job1/mic1.mrcs"))
    assert np.allclose(got, correct_image(stack, m), atol=1e-6)


def test_cli_micrographs_star_json_matrix_and_jobs(project: Path):
    m = MagMat(np.array([float(v) for v in _MATRIX]).reshape(2, 2))
    (project / "det.json").write_text(json.dumps({"mag_matrix": m.array.tolist()}))
    args = ["micrographs.star", "--from-json", "det.json", "--out", "o2", "--keep-pixel-size"]
    res = _invoke([*args, "--method", "spline"], project)
    assert res.exit_code == 0, res.output
    new = starfile.read(project / "o2/micrographs.star", always_dict=True)
    mic = new["micrographs"]
    assert mic["rlnMicrographName"].tolist() == ["o2/Mics/mic1.mrc"]
    assert new["optics"]["rlnImagePixelSize"].iloc[0] == pytest.approx(1.25)  # kept
    assert mic["rlnCtfAstigmatism"].iloc[0] == pytest.approx(
        mic["rlnDefocusU"].iloc[0] - mic["rlnDefocusV"].iloc[0], abs=1e-5
    )
    assert read_mrc_header(project / "o2/Mics/mic1.mrc").pixel_size == pytest.approx(1.25)
    # a STAR whose optics already carry the matrix needs no matrix option; its defocus stays
    res = _invoke(["o2/micrographs.star", "--out", "o3"], project)
    assert res.exit_code == 2 and "no magnification matrix" in res.output  # identity now
    # plain MRC inputs (glob), two worker processes
    write_mrc(project / "Mics/mic2.mrc", np.ones((70, 80)) + np.eye(70, 80), 1.1)
    res = _invoke(["Mics/*.mrc", "--mag-matrix", *_MATRIX, "--out", "o4", "-j", "2"], project)
    assert res.exit_code == 0, res.output
    assert read_mrc_header(project / "o4/mic2.mrc").pixel_size == pytest.approx(1.1 / m.scale)
    assert (project / "o4/mic1.mrc").exists()


def test_cli_star_with_its_own_matrix(project: Path):
    text = (project / "particles.star").read_text()
    text = text.replace(
        "_rlnImageDimensionality #9",
        "_rlnImageDimensionality #9\n"
        "_rlnMagMat00 #10\n_rlnMagMat01 #11\n_rlnMagMat10 #12\n_rlnMagMat11 #13",
    )
    text = text.replace("1.250000 64 2\n", "1.250000 64 2 1.02 0.01 0.005 0.99\n")
    (project / "own.star").write_text(text)
    res = _invoke(["own.star", "--out", "o5"], project)
    assert res.exit_code == 0, res.output
    new = starfile.read(project / "o5/own.star", always_dict=True)["particles"]
    old = starfile.read(project / "own.star", always_dict=True)["particles"]
    assert np.allclose(new["rlnDefocusU"], old["rlnDefocusU"])  # already true-frame values
    assert not np.allclose(new["rlnCoordinateX"], old["rlnCoordinateX"])
    res = _invoke(["own.star", "--mag-matrix", "1.01", "0", "0", "0.99", "--out", "o6"], project)
    assert res.exit_code == 2 and "different _rlnMagMat" in res.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["missing.star", "--mag-matrix", *_MATRIX], "file not found"),
        (["Mics/mic1.mrc"], "give the matrix"),
        (["Mics/mic1.mrc", "--mag-matrix", "1", "0", "0", "-1"], "positive determinant"),
        (["Mics/mic1.mrc", "--mag-matrix", *_MATRIX, "--method", "cubic"], "unknown --method"),
        (["particles.star", "--mag-matrix", *_MATRIX, "--out", "."], "overwrite the input"),
        (["particles.star", "Mics/mic1.mrc", "--mag-matrix", *_MATRIX], "one STAR file"),
        (["Mics/mic1.mrc", "--mag-matrix", *_MATRIX, "--from-json", "x.json"], "only one"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(project: Path, args, message):
    before = _digest(project)
    full = args if "--out" in args else [*args, "--out", "bad"]
    res = _invoke(full, project)
    assert res.exit_code == 2
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0]
    assert _digest(project) == before


def test_cli_particles_need_the_micrograph_size(project: Path):
    (project / "Mics/mic1.mrc").unlink()
    res = _invoke(["particles.star", "--mag-matrix", *_MATRIX, "--out", "o7"], project)
    assert res.exit_code == 2 and "--micrograph-size" in res.output
    assert not (project / "o7").exists()
    res = _invoke(
        [
            "particles.star",
            "--mag-matrix",
            *_MATRIX,
            "--out",
            "o7",
            "--micrograph-size",
            "300",
            "200",
        ],
        project,
    )
    assert res.exit_code == 0, res.output
