"""End-to-end tests of the ``anisoctf`` command line (simulate → estimate → files).

Small images (1024², 256-pixel boxes) keep the whole file to well under a minute. Commands
that fit run in a subprocess with one BLAS thread (as ``--jobs N`` workers do), which keeps them
fast on a busy machine and makes ``--jobs 1`` and ``--jobs 2`` bit-comparable; option errors
are checked in-process with typer's CliRunner.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile
from typer.testing import CliRunner

from anisoctf.cli.main import app
from anisoctf.io import read_ctffind_txt, write_mrc

runner = CliRunner()

SIZE = 1024
BOX = 256
TOLERANCE = 100.0  # Å: defocus error allowed against the simulated truth
#: the simulator's optics, given explicitly (MRC files carry no voltage)
OPTICS = ["--kv", "300", "--cs", "2.7", "--ac", "0.07"]
FAST = ["--apix", "1.0", "--box", str(BOX), *OPTICS]
STAR_COLUMNS = {
    "rlnMicrographName",
    "rlnOpticsGroup",
    "rlnCtfImage",
    "rlnDefocusU",
    "rlnDefocusV",
    "rlnCtfAstigmatism",
    "rlnDefocusAngle",
    "rlnCtfFigureOfMerit",
    "rlnCtfMaxResolution",
}
NUMBERS = ["rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnCtfFigureOfMerit"]
_ONE_THREAD = {k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}


@dataclass
class Run:
    """Outcome of one command."""

    exit_code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def invoke(*args) -> Run:
    """Run the CLI in-process (for commands that do not fit)."""
    r = runner.invoke(app, [str(a) for a in args])
    return Run(r.exit_code, r.stdout, r.stderr)


def cli(*args, cwd: Path | None = None) -> Run:
    """Run ``anisoctf ARGS`` in a subprocess with one BLAS thread."""
    p = subprocess.run(
        [sys.executable, "-m", "anisoctf.cli.main", *(str(a) for a in args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, **_ONE_THREAD},
        timeout=600,
        check=False,
    )
    return Run(p.returncode, p.stdout, p.stderr)


def failure_lines(result: Run) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("FAILED")]


def read_table(path: Path):
    blocks = starfile.read(path, always_dict=True)
    return blocks["optics"], blocks["micrographs"]


@pytest.fixture(scope="module")
def sims(tmp_path_factory) -> Path:
    """Two simulated micrographs: mean defocus ~15,000 and ~22,000 Å, astigmatism 600 Å."""
    d = tmp_path_factory.mktemp("sims")
    # SNR 1.0 (the simulator's default is 0.4): with only 1024² pixels the fit's defocus error is
    # then ~30 Å rms, well inside the 100 Å the test allows; this file tests the files, not the
    # accuracy limits (benchmarks/bench_accuracy.py does that).
    for prefix, defocus, angle, seed in (("lo", 15000, 30, 1), ("hi", 22000, 120, 3)):
        r = invoke(
            "simulate", "--out", d, "--prefix", prefix, "--n", "1", "--size", SIZE,
            "--apix", "1.0", "--defocus", defocus, "--astig", "600", "--angle", angle,
            "--snr", "1.0", "--seed", seed,
        )  # fmt: skip
        assert r.exit_code == 0, r.output
    return d


@pytest.fixture(scope="module")
def estimated(sims, tmp_path_factory):
    """``anisoctf estimate`` of both micrographs with one job."""
    out = tmp_path_factory.mktemp("est") / "ctf"
    result = cli("estimate", f"{sims}/*.mrc", "--out", out, *FAST)
    return result, out


def test_estimate_writes_star_txt_png_ctf(sims, estimated):
    result, out = estimated
    assert result.exit_code == 0, result.output
    assert "2 of 2 micrographs ok" in result.stdout
    optics, mics = read_table(out / "micrographs_ctf.star")
    assert len(mics) == 2
    assert STAR_COLUMNS <= set(mics.columns)
    assert "rlnPhaseShift" not in mics.columns  # only with --phase-plate
    assert float(optics["rlnMicrographPixelSize"].iloc[0]) == 1.0
    # input order: the sorted glob
    assert [Path(n).name for n in mics["rlnMicrographName"]] == ["hi_001.mrc", "lo_001.mrc"]
    for _, row in mics.iterrows():
        mrc = Path(row["rlnMicrographName"])
        stem = mrc.stem
        truth = json.loads(mrc.with_suffix(".json").read_text())["ctf"]
        assert abs(row["rlnDefocusU"] - truth["defocus_u"]) < TOLERANCE, (stem, row, truth)
        assert abs(row["rlnDefocusV"] - truth["defocus_v"]) < TOLERANCE, (stem, row, truth)
        assert row["rlnCtfAstigmatism"] == pytest.approx(row["rlnDefocusU"] - row["rlnDefocusV"])

        (rec,) = read_ctffind_txt(out / f"{stem}.txt")
        assert rec.defocus_1 == pytest.approx(row["rlnDefocusU"], abs=1e-5)
        assert rec.defocus_2 == pytest.approx(row["rlnDefocusV"], abs=1e-5)
        assert rec.azimuth == pytest.approx(row["rlnDefocusAngle"], abs=1e-5)
        assert rec.cross_correlation == pytest.approx(row["rlnCtfFigureOfMerit"], abs=1e-5)
        assert rec.fit_resolution == pytest.approx(row["rlnCtfMaxResolution"], abs=1e-5)
        assert rec.phase_shift_rad == 0.0

        assert (out / f"{stem}_ctf.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert row["rlnCtfImage"] == f"{(out / stem).as_posix()}.ctf:mrc"
        with mrcfile.open(out / f"{stem}.ctf", permissive=False) as m:
            assert m.data.dtype == np.float32
            assert m.data.ndim == 2 and m.data.shape[0] == m.data.shape[1]
            assert np.all(np.isfinite(m.data)) and float(m.data.std()) > 0
            assert float(m.voxel_size.x) > 0
    assert not list(out.rglob("*.tmp")) and not list(sims.rglob("*.tmp"))


def test_batch_with_bad_files_reports_each_failure_on_one_line(sims, tmp_path):
    batch = tmp_path / "batch"
    batch.mkdir()
    shutil.copy(sims / "lo_001.mrc", batch / "good.mrc")
    write_mrc(batch / "nan.mrc", np.full((256, 256), np.nan, dtype=np.float32), pixel_size=1.0)
    (batch / "junk.mrc").write_text("this is not an MRC file\n" * 100)
    out = tmp_path / "out"
    result = cli("estimate", batch / "good.mrc", batch / "nan.mrc", batch / "junk.mrc",
                    "--out", out, *FAST)  # fmt: skip
    assert result.exit_code == 1, result.output
    lines = failure_lines(result)
    assert len(lines) == 2, result.stderr
    assert sum("nan.mrc" in line for line in lines) == 1
    assert sum("junk.mrc" in line for line in lines) == 1
    assert "NaN" in next(line for line in lines if "nan.mrc" in line)
    assert "Traceback" not in result.output
    assert "1 of 3 micrographs ok, 2 failed" in result.stdout
    _, mics = read_table(out / "micrographs_ctf.star")
    assert list(mics["rlnMicrographName"]) == [str(batch / "good.mrc")]
    assert not (out / "nan.txt").exists() and not (out / "junk.txt").exists()
    assert not list(out.rglob("*.tmp"))


def test_jobs_2_gives_the_same_numbers_as_jobs_1(sims, estimated, tmp_path):
    result1, out1 = estimated
    assert result1.exit_code == 0, result1.output
    out2 = tmp_path / "ctf"
    result2 = cli("estimate", f"{sims}/*.mrc", "--out", out2, "--jobs", "2", *FAST)
    assert result2.exit_code == 0, result2.output
    _, m1 = read_table(out1 / "micrographs_ctf.star")
    _, m2 = read_table(out2 / "micrographs_ctf.star")
    assert list(m1["rlnMicrographName"]) == list(m2["rlnMicrographName"])
    np.testing.assert_array_equal(m1[NUMBERS].to_numpy(), m2[NUMBERS].to_numpy())


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["MRC", "--apix", "1.0", "--min-res", "3", "--max-res", "8"], "min-res"),
        (["--apix", "1.0"], "no input"),
        (["MRC", "--apix", "1.0", "--jobs", "0"], "--jobs"),
        (["NOTHING_MATCHES_*.mrc", "--apix", "1.0"], "no file matches"),
        (["MRC"], "--apix is required"),  # the simulated header says 1.0 Å: a placeholder
    ],
    ids=["min-res<max-res", "no-inputs", "jobs-0", "empty-glob", "no-apix"],
)
def test_bad_options_exit_2_with_one_line(sims, tmp_path, args, fragment):
    args = [str(sims / "lo_001.mrc") if a == "MRC" else a for a in args]
    result = invoke("estimate", *args, "--out", tmp_path / "out")
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert fragment in lines[0]
    assert not (tmp_path / "out" / "micrographs_ctf.star").exists()


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
myGroup 1 1.000000 300.000000 2.700000 0.100000 1.000000
"""
_MICROGRAPHS = """
# version 30001

data_micrographs

loop_
_rlnCtfPowerSpectrum #1
_rlnMicrographName #2
_rlnMicrographMetadata #3
_rlnOpticsGroup #4
MotionCorr/job002/Movies/lo_001_PS.mrc MotionCorr/job002/Movies/lo_001.mrc MotionCorr/job002/Movies/lo_001.star 1
"""  # noqa: E501


def test_relion_star_input_takes_optics_from_the_optics_table(sims, tmp_path):
    project = tmp_path / "project"
    movies = project / "MotionCorr" / "job002" / "Movies"
    movies.mkdir(parents=True)
    shutil.copy(sims / "lo_001.mrc", movies / "lo_001.mrc")
    (project / "MotionCorr" / "job002" / "corrected_micrographs.star").write_text(
        _OPTICS + _MICROGRAPHS
    )
    # RELION paths are relative to the project directory, where RELION runs its jobs. The MRC
    # header says 1.0 Å (a placeholder) and no --apix is given: the STAR's optics decide.
    result = cli(
        "estimate", "MotionCorr/job002/corrected_micrographs.star", "--out", "CtfFind/job003",
        "--box", BOX, cwd=project,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    optics, mics = read_table(project / "CtfFind/job003/micrographs_ctf.star")
    assert list(optics["rlnOpticsGroupName"]) == ["myGroup"]
    assert float(optics["rlnAmplitudeContrast"].iloc[0]) == pytest.approx(0.1)
    assert float(optics["rlnVoltage"].iloc[0]) == 300.0
    assert float(optics["rlnSphericalAberration"].iloc[0]) == 2.7
    assert list(mics["rlnMicrographName"]) == ["MotionCorr/job002/Movies/lo_001.mrc"]
    assert list(mics["rlnCtfImage"]) == ["CtfFind/job003/lo_001.ctf:mrc"]
    assert "amplitude contrast: 0.10" in (project / "CtfFind/job003/lo_001.txt").read_text()
    truth = json.loads((sims / "lo_001.json").read_text())["ctf"]
    assert abs(float(mics["rlnDefocusU"].iloc[0]) - truth["defocus_u"]) < TOLERANCE

    # a STAR file without optics and no optics on the command line: one line naming them
    (project / "bare.star").write_text(
        "data_\nloop_\n_rlnMicrographName #1\nMotionCorr/job002/Movies/lo_001.mrc\n"
    )
    result = cli("estimate", "bare.star", "--apix", "1.0", "--out", "x", cwd=project)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "--kv, --cs, --ac" in lines[0], result.output


def test_demo_passes(tmp_path):
    result = cli("demo", "--out", tmp_path / "demo")
    assert result.exit_code == 0, result.output
    assert "PASS" in result.stdout
    assert (tmp_path / "demo" / "ctf" / "micrographs_ctf.star").is_file()
    assert len(list((tmp_path / "demo" / "micrographs").glob("*.json"))) == 3
    assert len(list((tmp_path / "demo" / "ctf").glob("*_ctf.png"))) == 3


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.stdout.startswith("anisoctf ")
