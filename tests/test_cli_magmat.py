"""``anisoctf estimate --mag-matrix`` and ``_rlnMagMat`` in a STAR file's optics table.

With a magnification matrix the fit works on true-frame frequencies, so the defoci it returns
are true-frame values (those the simulator was given), and ``micrographs_ctf.star`` carries the
matrix in ``data_optics``. Fits run in a subprocess with one BLAS thread, as in test_cli.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import starfile
from typer.testing import CliRunner

from anisoctf.cli.main import app
from anisoctf.jobs.simulate_micrographs import write_specs
from anisoctf.magnification import MagMat, defocus_to_observed
from anisoctf.optics.ctf import CTFParams, Optics
from anisoctf.simulate.micrograph import MicrographSpec

runner = CliRunner()
_ONE_THREAD = {k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
MAG = MagMat.from_anisotropy(1.2, 35.0)
BIG = MagMat.from_anisotropy(5.0, 35.0)
#: the simulator's optics, given explicitly (MRC files carry no voltage)
OPTICS = ("--kv", "300", "--cs", "2.7", "--ac", "0.07")
MAG_LABELS = ("rlnMagMat00", "rlnMagMat01", "rlnMagMat10", "rlnMagMat11")


def cli(*args, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "anisoctf.cli.main", *(str(a) for a in args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, **_ONE_THREAD},
        timeout=600,
        check=False,
    )


def matrix_args(m: MagMat) -> list[str]:
    return [repr(x) for row in m.matrix for x in row]


def angle_error(a: float, b: float) -> float:
    return (a - b + 90.0) % 180.0 - 90.0


@pytest.fixture(scope="module")
def sims(tmp_path_factory) -> Path:
    """2048² micrographs with anisomag: 1.2 % (mean 20000 Å, 1000 Å at 120°) and 5 %."""
    d = tmp_path_factory.mktemp("magsims")
    for prefix, mag, z, astig, angle, seed in (
        ("aniso", MAG, 20000.0, 1000.0, 120.0, 1),
        ("big", BIG, 35000.0, 1000.0, 60.0, 2),
    ):
        spec = MicrographSpec(
            shape=(2048, 2048),
            optics=Optics(pixel_size=1.0, mag_matrix=mag.matrix),
            ctf=CTFParams(z + astig / 2, z - astig / 2, angle, 0.0, 60.0),
            snr=1.5,
            seed=seed,
        )
        write_specs([spec], d, prefix=prefix)
    return d


def truth_of(json_path: Path) -> CTFParams:
    c = json.loads(json_path.read_text())["ctf"]
    return CTFParams(c["defocus_u"], c["defocus_v"], c["angle_deg"])


def first_row(star: Path):
    blocks = starfile.read(star, always_dict=True)
    return blocks["optics"], blocks["micrographs"].iloc[0]


def test_mag_matrix_gives_true_frame_defocus_and_is_written(sims, tmp_path):
    out = tmp_path / "ctf"
    r = cli("estimate", sims / "aniso_001.mrc", "--apix", "1.0", *OPTICS, "--out", out,
            "--mag-matrix", *matrix_args(MAG))  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    optics, row = first_row(out / "micrographs_ctf.star")
    truth = truth_of(sims / "aniso_001.json")
    du = float(row["rlnDefocusU"]) - truth.defocus_u
    dv = float(row["rlnDefocusV"]) - truth.defocus_v
    da = angle_error(float(row["rlnDefocusAngle"]), truth.angle_deg)
    print(f"\nwith the matrix: ΔU {du:+.1f} Å, ΔV {dv:+.1f} Å, Δangle {da:+.2f}°")
    assert abs(du) < 15.0 and abs(dv) < 15.0 and abs(da) < 1.0
    # the optics table carries the matrix, exactly
    for label, value in zip(MAG_LABELS, (x for row_ in MAG.matrix for x in row_), strict=True):
        assert float(optics[label].iloc[0]) == value
    # without the matrix the same image gives the observed-frame CTF (the apparent astigmatism)
    out2 = tmp_path / "plain"
    r = cli("estimate", sims / "aniso_001.mrc", "--apix", "1.0", *OPTICS, "--out", out2, "-q")
    assert r.returncode == 0, r.stdout + r.stderr
    optics2, row2 = first_row(out2 / "micrographs_ctf.star")
    assert not any(label in optics2.columns for label in MAG_LABELS)
    observed = defocus_to_observed(truth, MAG)
    assert abs(float(row2["rlnDefocusU"]) - observed.defocus_u) < 30.0
    assert abs(float(row2["rlnDefocusU"]) - truth.defocus_u) > 150.0


def test_large_anisomag_stays_inside_the_search_range(sims, tmp_path):
    # 5 % at 35000 Å: about 3500 Å of apparent astigmatism, beyond --max-astig 1500; the fit
    # searches the true frame, where the astigmatism is 1000 Å
    truth = truth_of(sims / "big_001.json")
    observed = defocus_to_observed(truth, BIG)
    assert observed.astigmatism > 3000.0
    out = tmp_path / "ctf"
    r = cli("estimate", sims / "big_001.mrc", "--apix", "1.0", *OPTICS, "--out", out,
            "--max-astig", "1500", "--mag-matrix", *matrix_args(BIG))  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    _, row = first_row(out / "micrographs_ctf.star")
    du = float(row["rlnDefocusU"]) - truth.defocus_u
    dv = float(row["rlnDefocusV"]) - truth.defocus_v
    da = angle_error(float(row["rlnDefocusAngle"]), truth.angle_deg)
    print(f"\n5 % anisomag with the matrix: ΔU {du:+.1f} Å, ΔV {dv:+.1f} Å, Δangle {da:+.2f}°")
    assert abs(du) < 15.0 and abs(dv) < 15.0 and abs(da) < 1.0


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
_rlnMicrographPixelSize #7
_rlnMagMat00 #8
_rlnMagMat01 #9
_rlnMagMat10 #10
_rlnMagMat11 #11
anisoGroup 1 1.0 300.0 2.7 0.07 1.0 {m00!r} {m01!r} {m10!r} {m11!r}

# version 30001

data_micrographs

loop_
_rlnMicrographName #1
_rlnOpticsGroup #2
MotionCorr/job002/Movies/aniso_001.mrc 1
"""


def test_star_magmat_is_used_and_the_option_overrides_it(sims, tmp_path):
    project = tmp_path / "project"
    movies = project / "MotionCorr" / "job002" / "Movies"
    movies.mkdir(parents=True)
    shutil.copy(sims / "aniso_001.mrc", movies / "aniso_001.mrc")
    (m00, m01), (m10, m11) = MAG.matrix
    star = project / "MotionCorr" / "job002" / "corrected_micrographs.star"
    star.write_text(_OPTICS.format(m00=m00, m01=m01, m10=m10, m11=m11))
    truth = truth_of(sims / "aniso_001.json")

    r = cli("estimate", "MotionCorr/job002/corrected_micrographs.star", "--out", "CtfFind/job003",
            cwd=project)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    optics, row = first_row(project / "CtfFind/job003/micrographs_ctf.star")
    assert list(optics["rlnOpticsGroupName"]) == ["anisoGroup"]
    assert [float(optics[c].iloc[0]) for c in MAG_LABELS] == [m00, m01, m10, m11]
    assert abs(float(row["rlnDefocusU"]) - truth.defocus_u) < 15.0
    assert abs(float(row["rlnDefocusV"]) - truth.defocus_v) < 15.0

    # --mag-matrix wins over the STAR's matrix: the identity gives the observed frame back
    r = cli("estimate", "MotionCorr/job002/corrected_micrographs.star", "--out", "CtfFind/job004",
            "--mag-matrix", "1", "0", "0", "1", cwd=project)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    optics, row = first_row(project / "CtfFind/job004/micrographs_ctf.star")
    assert not any(c in optics.columns for c in MAG_LABELS)
    observed = defocus_to_observed(truth, MAG)
    assert abs(float(row["rlnDefocusU"]) - observed.defocus_u) < 30.0


@pytest.mark.parametrize(
    "values, fragment",
    [(["1", "0", "0", "-1"], "positive determinant"), (["1", "0", "0", "nan"], "finite")],
)
def test_bad_mag_matrix_exits_2_with_one_line(sims, tmp_path, values, fragment):
    r = runner.invoke(
        app,
        ["estimate", str(sims / "aniso_001.mrc"), "--apix", "1.0", *OPTICS,
         "--out", str(tmp_path / "o"), "--mag-matrix", *values],
    )  # fmt: skip
    assert r.exit_code == 2, r.output
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--mag-matrix" in lines[0] and fragment in lines[0], r.stderr
    assert not (tmp_path / "o").exists()
