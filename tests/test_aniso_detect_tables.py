"""``aniso detect`` on particle tables and CTFFIND 5 files; ``aniso apply`` of its verdict.

A particle STAR repeats each micrograph's CTF on every particle; the detection must count
micrographs, not particles (issue 13 item 8). Truth: the RELION tutorial's own 24-micrograph
CTF table, and synthetic tables with a known matrix.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from anisoctf.cli.main import app
from anisoctf.io.ctffind import CTFFindRecord, CTFFindSearch, write_ctffind_txt
from anisoctf.io.star import MicrographCTFRow, write_micrographs_ctf_star
from anisoctf.jobs.detect import DetectRequest, load_ctf_table, run_detect
from anisoctf.magnification import MagMat, defocus_table_to_observed
from anisoctf.magnification.tables import one_ctf_per_micrograph
from anisoctf.optics.ctf import Optics

runner = CliRunner()
MAG = MagMat.from_anisotropy(1.2, 35.0)


def _observed(n: int, seed: int, mag: MagMat = MAG):
    rng = np.random.default_rng(seed)
    z = rng.uniform(5000.0, 30000.0, n)
    h = rng.uniform(0.0, 20.0, n)
    ang = rng.uniform(0.0, 180.0, n)
    return defocus_table_to_observed(z + h, z - h, ang, mag.array)


def test_real_particle_table_gives_the_micrograph_answer(shared_real):
    meta = shared_real / "relion_tutorial_metadata"
    mics = run_detect(DetectRequest((str(meta / "micrographs_ctf.star"),), bootstrap=50))
    parts = run_detect(DetectRequest((str(meta / "run_it025_data.star"),), bootstrap=50))
    # before: 4,786 "micrographs", Wald p = 1e-22, "significant"
    assert parts.detection.n_micrographs == mics.detection.n_micrographs == 24
    for d in (mics.detection, parts.detection):
        assert not d.significant
        assert d.p_value == pytest.approx(0.78, abs=0.03)
    assert parts.detection.p_value == pytest.approx(mics.detection.p_value, abs=1e-9)
    np.testing.assert_allclose(
        parts.detection.mag_matrix.array, mics.detection.mag_matrix.array, atol=1e-9
    )
    assert any("4786 rows of 24 micrographs" in n for n in parts.table.notes)
    assert parts.table.warnings == []  # one CTFFIND result per micrograph: rows agree


def test_one_ctf_per_micrograph_median_and_disagreement():
    u = np.array([12000.0, 12000.0, 12000.0, 8000.0, 8100.0, 8300.0])
    v = np.array([11800.0, 11800.0, 11800.0, 7900.0, 8000.0, 8100.0])
    a = np.array([30.0, 30.0, 30.0, 10.0, 10.0, 10.0])
    keys = np.array(["b", "b", "b", "a", "a", "a"])
    first, (uu, vv, aa), n_bad = one_ctf_per_micrograph(u, v, a, keys)
    assert first.tolist() == [0, 3] and n_bad == 1
    np.testing.assert_allclose([uu[0], vv[0], aa[0]], [12000.0, 11800.0, 30.0], atol=1e-9)
    # "a": median mean defocus 8050, median half-astigmatism 50 Å at 10°
    np.testing.assert_allclose([uu[1], vv[1], aa[1]], [8100.0, 8000.0, 10.0], atol=1e-9)


def _particle_star(path: Path, u, v, a, per_mic: int, jitter: float = 0.0) -> None:
    rng = np.random.default_rng(0)
    rows = [
        MicrographCTFRow(
            f"mic_{i:03d}.mrc", 1, "", float(u[i] + jitter * rng.normal()),
            float(v[i] + jitter * rng.normal()), float(a[i]), 0.1, 4.0,
        )
        for i in range(len(u))
        for _ in range(per_mic)
    ]  # fmt: skip
    write_micrographs_ctf_star(path, rows, {1: Optics(pixel_size=1.0)})


def test_particle_rows_count_once_and_disagreement_is_warned(tmp_path):
    u, v, a = _observed(20, seed=3)
    _particle_star(tmp_path / "one.star", u, v, a, per_mic=1)
    _particle_star(tmp_path / "many.star", u, v, a, per_mic=30)
    one = run_detect(DetectRequest((str(tmp_path / "one.star"),), bootstrap=0)).detection
    many = run_detect(DetectRequest((str(tmp_path / "many.star"),), bootstrap=0)).detection
    assert many.n_micrographs == 20
    assert many.p_value == pytest.approx(one.p_value, rel=1e-9)
    _particle_star(tmp_path / "jit.star", u, v, a, per_mic=5, jitter=20.0)
    r = runner.invoke(app, ["aniso", "detect", str(tmp_path / "jit.star")])
    assert r.exit_code == 0, r.output
    warn = [line for line in r.output.splitlines() if line.startswith("warning:")]
    assert len(warn) == 1 and "20 of 20 micrographs have rows with different CTFs" in warn[0]


def test_detect_reads_ctffind5_txt_with_tilt_columns(tmp_path, shared_real):
    folder = shared_real.parent / "ctffind5"
    t = load_ctf_table([str(folder / "tilted_2048_ctffind5.txt")])  # CTFFIND 5.0.1's own file
    truth = json.loads((folder / "tilted_2048.json").read_text())
    assert t.defocus_u.size == 1
    np.testing.assert_allclose(
        [t.defocus_u[0], t.defocus_v[0]], [truth["dfU"], truth["dfV"]], atol=10.0
    )
    assert t.angle_deg[0] == pytest.approx(truth["angle_deg"], abs=1.0)
    u, v, a = _observed(20, seed=5)
    for i in range(20):
        rec = CTFFindRecord(float(u[i]), float(v[i]), float(a[i]), 0.0, 0.1, 4.0,
                            tilt_axis=130.0, tilt_angle=20.0, thickness=900.0)  # fmt: skip
        write_ctffind_txt(
            tmp_path / f"m{i}.txt", rec, input_file=f"m{i}.mrc",
            optics=Optics(pixel_size=1.0, voltage_kv=300.0, cs_mm=2.7, amplitude_contrast=0.07),
            search=CTFFindSearch(box=512, min_res=30.0, max_res=5.0, df_min=5e3, df_max=5e4),
        )  # fmt: skip
    assert len((tmp_path / "m0.txt").read_text().splitlines()[-1].split()) == 10
    d = run_detect(DetectRequest((str(tmp_path),), bootstrap=0)).detection
    assert d.n_micrographs == 20 and d.significant
    assert d.anisotropy_percent == pytest.approx(1.2, abs=0.2)


def _detection_json(tmp_path: Path, seed: int, mag: MagMat) -> Path:
    u, v, a = _observed(24, seed=seed, mag=mag)
    _particle_star(tmp_path / f"t{seed}.star", u, v, a, per_mic=1)
    out = tmp_path / f"d{seed}.json"
    run_detect(DetectRequest((str(tmp_path / f"t{seed}.star"),), bootstrap=0, json_out=out))
    return out


def test_apply_refuses_a_detection_that_was_not_significant(tmp_path):
    det = _detection_json(tmp_path, 7, MagMat.identity())
    assert json.loads(det.read_text())["significant"] is False
    table = tmp_path / "t7.star"
    r = runner.invoke(
        app, ["aniso", "apply", str(table), "--from-json", str(det), "--out", str(tmp_path / "o")]
    )
    assert r.exit_code == 2
    lines = [x for x in r.output.splitlines() if x.strip()]
    assert len(lines) == 1 and "not significant" in lines[0] and "--force" in lines[0]
    assert not (tmp_path / "o").exists()
    out = tmp_path / "o.star"
    r = runner.invoke(
        app,
        ["aniso", "apply", str(table), "--from-json", str(det), "--out", str(out), "--force"],
    )
    assert r.exit_code == 0, r.output
    assert out.exists()
    sig = _detection_json(tmp_path, 8, MAG)
    assert json.loads(sig.read_text())["significant"] is True
    r = runner.invoke(
        app,
        ["aniso", "apply", str(table), "--from-json", str(sig), "--out", str(tmp_path / "s.star")],
    )
    assert r.exit_code == 0, r.output
