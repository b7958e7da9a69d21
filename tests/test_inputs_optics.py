"""Where ``anisoctf estimate`` takes its optics from, and what it keeps of a RELION pipeline.

Issue 13 items 5–7: no silent 300 kV / 2.7 mm / 0.07 for an MRC file (the voltage comes from
the FEI/EPU extended header or ``--kv``, else a one-line refusal; every value's source is
printed), ``--apix`` checked against a plausible header pixel size, cryoSPARC's own default
amplitude contrast (0.1); the non-dose-weighted sums of a RELION/cryoSPARC table fitted by
default; every column of an input ``corrected_micrographs.star`` kept in
``micrographs_ctf.star``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile
from mrcfile.dtypes import get_ext_header_dtype
from typer.testing import CliRunner

from anisoctf.cli.main import app
from anisoctf.errors import AnisoctfError, UsageError
from anisoctf.io import write_mrc
from anisoctf.io.cryosparc import write_cs
from anisoctf.io.mrc import read_mrc_header
from anisoctf.io.star import read_micrographs_star, read_passthrough
from anisoctf.jobs.inputs import resolve_inputs

runner = CliRunner()
_ONE_THREAD = {k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}


def _fei_mrc(
    path: Path, kv: float, apix: float, header_apix: float | None = None, kind: bytes = b"FEI1"
) -> None:
    """A small MRC file with an FEI extended header saying ``kv`` and ``apix``, as EPU writes."""
    ext = np.zeros(1, dtype=get_ext_header_dtype(kind, "<"))
    ext["Metadata size"] = 768
    ext["Bitmask 1"] = (1 << 5) | (1 << 14) | (1 << 15)  # HT, pixel size X and Y present
    ext["HT"] = kv * 1e3  # volts
    ext["Pixel size X"] = ext["Pixel size Y"] = apix * 1e-10  # metres
    with mrcfile.new(path, overwrite=True) as m:
        m.set_data(np.zeros((64, 64), dtype=np.float32))
        m.set_extended_header(ext)
        m.header.exttyp = kind
        m.voxel_size = apix if header_apix is None else header_apix


# ----------------------------------------------------------------------------- item 5: MRC
def test_real_epu_micrograph_gives_its_voltage_and_pixel_size(shared_real) -> None:
    path = shared_real / "micrographs" / "fei-extended.mrc"
    h = read_mrc_header(path)
    assert h.voltage_kv == 300.0
    assert h.metadata_pixel_size == pytest.approx(0.853776, abs=1e-6)
    r = resolve_inputs([str(path)])
    o = r.optics[1]
    assert (o.voltage_kv, o.pixel_size) == (300.0, pytest.approx(0.853776, abs=2e-6))
    (line,) = r.provenance
    assert "voltage 300 kV (FEI/EPU extended header)" in line
    assert "pixel size 0.853775 Å (MRC header)" in line  # 3167.507 Å / 3710, as float32
    assert "Cs 2.7 mm (default; pass --cs if not)" in line


@pytest.mark.parametrize("kind", [b"FEI1", b"FEI2"])
def test_fei_header_voltage_is_used_not_300(tmp_path, kind) -> None:
    _fei_mrc(tmp_path / "a.mrc", 200.0, 1.1, kind=kind)
    assert read_mrc_header(tmp_path / "a.mrc").voltage_kv == 200.0
    r = resolve_inputs([str(tmp_path / "a.mrc")], cs=2.0, ac=0.1)
    o = r.optics[1]
    assert (o.voltage_kv, o.cs_mm, o.amplitude_contrast) == (200.0, 2.0, 0.1)
    assert o.pixel_size == pytest.approx(1.1)
    assert "Cs 2 mm (command line)" in r.provenance[0]
    # a placeholder 1.0 Å in the main header: the EPU metadata's pixel size is used
    _fei_mrc(tmp_path / "b.mrc", 200.0, 1.1, header_apix=1.0)
    r = resolve_inputs([str(tmp_path / "b.mrc")], cs=2.0, ac=0.1)
    assert r.optics[1].pixel_size == 1.1 and "1.1 Å (FEI/EPU metadata)" in r.provenance[0]
    # the command line wins over the header
    assert resolve_inputs([str(tmp_path / "a.mrc")], kv=300.0).optics[1].voltage_kv == 300.0


def test_fei_field_flagged_absent_is_not_used(tmp_path) -> None:
    _fei_mrc(tmp_path / "a.mrc", 200.0, 1.1)
    with open(tmp_path / "a.mrc", "r+b") as fh:  # clear bit 5 (HT) of Bitmask 1
        fh.seek(1024 + 8)
        mask = int.from_bytes(fh.read(4), "little") & ~(1 << 5)
        fh.seek(1024 + 8)
        fh.write(mask.to_bytes(4, "little"))
    assert read_mrc_header(tmp_path / "a.mrc").voltage_kv is None


def test_mrc_without_voltage_is_refused_with_one_line(tmp_path) -> None:
    write_mrc(tmp_path / "plain.mrc", np.zeros((64, 64), np.float32), 1.3)
    with pytest.raises(UsageError, match="--kv, --cs and --ac"):
        resolve_inputs([str(tmp_path / "plain.mrc")])
    r = runner.invoke(app, ["estimate", str(tmp_path / "plain.mrc"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "plain.mrc: no voltage" in lines[0], r.output
    # given on the command line, the defaults of Cs and amplitude contrast are stated
    ok = resolve_inputs([str(tmp_path / "plain.mrc")], kv=200.0)
    assert ok.optics[1].voltage_kv == 200.0
    assert "voltage 200 kV (command line)" in ok.provenance[0]
    assert "amplitude contrast 0.07 (default; pass --ac if not)" in ok.provenance[0]


@pytest.mark.parametrize("apix, warned", [(1.0, True), (1.28, False), (1.33, True)])
def test_apix_far_from_the_header_pixel_size_is_warned(tmp_path, apix, warned) -> None:
    write_mrc(tmp_path / "a.mrc", np.zeros((64, 64), np.float32), 1.3)
    r = resolve_inputs([str(tmp_path / "a.mrc")], apix=apix, kv=300.0)
    hits = [w for w in r.warnings if "differs by" in w]
    assert bool(hits) is warned, r.warnings
    if warned:
        assert f"{100 * abs(apix / 1.3 - 1):.1f} %" in hits[0] and "1.3 Å" in hits[0]
    # the placeholder 1.0 Å of a header is no measurement: nothing to compare with
    write_mrc(tmp_path / "b.mrc", np.zeros((64, 64), np.float32), 1.0)
    assert not resolve_inputs([str(tmp_path / "b.mrc")], apix=0.8, kv=300.0).warnings


# ---------------------------------------------------------------------------- item 5: .cs
def _exposures(path: Path, rows: list[dict]) -> None:
    names = list(rows[0])
    dtype = [("uid", "<u8")] + [
        (n, "S64") if isinstance(rows[0][n], str) else (n, "<f4") for n in names
    ]
    arr = np.zeros(len(rows), dtype=dtype)
    arr["uid"] = np.arange(1, len(rows) + 1)
    for n in names:
        arr[n] = [r[n] for r in rows]
    write_cs(path, arr)


def test_cs_without_amp_contrast_gets_cryosparcs_01(tmp_path) -> None:
    _exposures(
        tmp_path / "e.cs",
        [
            {
                "micrograph_blob/path": "a.mrc",
                "micrograph_blob/psize_A": 0.9,
                "mscope_params/accel_kv": 200.0,
                "mscope_params/cs_mm": 1.4,
            }
        ],
    )
    r = resolve_inputs([str(tmp_path / "e.cs")])
    o = r.optics[1]
    assert (o.voltage_kv, o.cs_mm, o.amplitude_contrast) == (200.0, pytest.approx(1.4), 0.1)
    assert "amplitude contrast 0.1 (cryoSPARC's default)" in r.provenance[0]
    assert "voltage 200 kV (.cs field mscope_params/accel_kv)" in r.provenance[0]


def test_cs_without_voltage_is_refused_unless_given(tmp_path) -> None:
    _exposures(tmp_path / "e.cs", [{"micrograph_blob/path": "a.mrc", "micrograph_blob/psize_A": 1}])
    with pytest.raises(AnisoctfError, match="--kv, --cs and --ac"):
        resolve_inputs([str(tmp_path / "e.cs")])
    r = resolve_inputs([str(tmp_path / "e.cs")], kv=300.0, cs=2.7)
    assert (r.optics[1].voltage_kv, r.optics[1].cs_mm) == (300.0, 2.7)


# ------------------------------------------------------------------ item 6: non-DW sums
def test_cs_non_dose_weighted_sum_is_read_by_default(tmp_path) -> None:
    row = {
        "micrograph_blob/path": "J2/a_doseweighted.mrc",
        "micrograph_blob_non_dw/path": "J2/a.mrc",
        "micrograph_blob/psize_A": 1.0,
        "ctf/accel_kv": 300.0,
        "ctf/cs_mm": 2.7,
    }
    _exposures(tmp_path / "e.cs", [row])
    t = resolve_inputs([str(tmp_path / "e.cs")]).tasks[0]
    assert t.path.endswith("J2/a.mrc") and t.name == "J2/a_doseweighted.mrc"
    assert t.non_dw and t.stem == "a_doseweighted"  # outputs are named after the DW micrograph
    t = resolve_inputs([str(tmp_path / "e.cs")], use_non_dw=False).tasks[0]
    assert t.path.endswith("J2/a_doseweighted.mrc") and t.name == "J2/a_doseweighted.mrc"
    assert not t.non_dw


# ------------------------------------------------------- items 6 and 7: a RELION pipeline
_STAR = """
# version 30001

data_optics

loop_
_rlnOpticsGroupName #1
_rlnOpticsGroup #2
_rlnMtfFileName #3
_rlnMicrographOriginalPixelSize #4
_rlnVoltage #5
_rlnSphericalAberration #6
_rlnAmplitudeContrast #7
_rlnMicrographPixelSize #8
opticsGroup1 1 mtf_k2_300kV.star 0.500000 300.000000 2.700000 0.070000 1.000000

# version 30001

data_micrographs

loop_
_rlnCtfPowerSpectrum #1
_rlnMicrographName #2
_rlnMicrographMetadata #3
_rlnOpticsGroup #4
_rlnAccumMotionTotal #5
_rlnAccumMotionEarly #6
_rlnAccumMotionLate #7
_rlnMicrographNameNoDW #8
MotionCorr/job002/Movies/m_PS.mrc MotionCorr/job002/Movies/m.mrc MotionCorr/job002/Movies/m.star 1 14.467891 2.368204 12.099687 MotionCorr/job002/Movies/m_noDW.mrc
"""  # noqa: E501


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A RELION project: the dose-weighted sum is NaN (unfittable), the non-DW sum simulated."""
    d = tmp_path_factory.mktemp("project")
    sims = d / "sims"
    r = runner.invoke(
        app,
        ["simulate", "--out", str(sims), "--prefix", "m", "--n", "1", "--size", "512",
         "--apix", "1.0", "--defocus", "15000", "--astig", "400", "--snr", "1.0", "--seed", "2"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    movies = d / "MotionCorr" / "job002" / "Movies"
    movies.mkdir(parents=True)
    shutil.copy(sims / "m_001.mrc", movies / "m_noDW.mrc")
    write_mrc(movies / "m.mrc", np.full((512, 512), np.nan, np.float32), 1.0)
    (d / "MotionCorr" / "job002" / "corrected_micrographs.star").write_text(_STAR)
    return d


def _estimate(project: Path, out: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "anisoctf.cli.main", "estimate",
         "MotionCorr/job002/corrected_micrographs.star", "--out", out, "--box", "256", *extra],
        capture_output=True, text=True, cwd=project, env={**os.environ, **_ONE_THREAD},
        timeout=600, check=False,
    )  # fmt: skip


def test_star_non_dw_is_fitted_and_every_column_kept(project) -> None:
    entries, _ = read_micrographs_star(
        project / "MotionCorr/job002/corrected_micrographs.star", project
    )
    assert entries[0].path_no_dw == project / "MotionCorr/job002/Movies/m_noDW.mrc"
    p = _estimate(project, "CtfFind/job003")
    assert p.returncode == 0, p.stdout + p.stderr  # the NaN dose-weighted sum was not read
    assert "non-dose-weighted" in p.stderr
    assert "optics group 1: pixel size 1 Å (STAR optics table)" in p.stderr
    assert (project / "CtfFind/job003/m.txt").exists()  # named after the DW micrograph
    blocks = starfile.read(project / "CtfFind/job003/micrographs_ctf.star", always_dict=True)
    o, m = blocks["optics"].iloc[0], blocks["micrographs"].iloc[0]
    # the name written is the dose-weighted micrograph's
    assert m["rlnMicrographName"] == "MotionCorr/job002/Movies/m.mrc"
    assert m["rlnMicrographNameNoDW"] == "MotionCorr/job002/Movies/m_noDW.mrc"
    assert m["rlnMicrographMetadata"] == "MotionCorr/job002/Movies/m.star"
    assert m["rlnCtfPowerSpectrum"] == "MotionCorr/job002/Movies/m_PS.mrc"
    assert (m["rlnAccumMotionTotal"], m["rlnAccumMotionEarly"], m["rlnAccumMotionLate"]) == (
        14.467891,
        2.368204,
        12.099687,
    )
    assert o["rlnMtfFileName"] == "mtf_k2_300kV.star"
    assert o["rlnMicrographOriginalPixelSize"] == 0.5  # the input's, not the pixel size
    assert o["rlnMicrographPixelSize"] == 1.0
    assert abs(0.5 * (m["rlnDefocusU"] + m["rlnDefocusV"]) - 15000.0) < 150.0
    # switched off (same output directory: not taken as done), the NaN dose-weighted sum is
    # what gets read, and fails
    p = _estimate(project, "CtfFind/job003", "--no-use-non-dw")
    assert p.returncode == 1 and "m.mrc" in p.stderr and "NaN" in p.stderr, p.stderr


def test_real_relion_columns_are_all_carried_through(shared_real) -> None:
    star = shared_real / "relion_tutorial_metadata" / "corrected_micrographs.star"
    kept = read_passthrough(star)
    assert kept.micrograph_columns == (
        "rlnCtfPowerSpectrum",
        "rlnMicrographMetadata",
        "rlnAccumMotionTotal",
        "rlnAccumMotionEarly",
        "rlnAccumMotionLate",
    )
    assert kept.optics_columns == ("rlnMtfFileName", "rlnMicrographOriginalPixelSize")
    assert kept.optics_values == {1: ("mtf_k2_200kV.star", "0.885")}
    first = kept.micrograph_values["MotionCorr/job002/Movies/20170629_00021_frameImage.mrc"]
    assert first == (
        "MotionCorr/job002/Movies/20170629_00021_frameImage_PS.mrc",
        "MotionCorr/job002/Movies/20170629_00021_frameImage.star",
        "14.467891",
        "2.368204",
        "12.099687",
    )
    assert len(kept.micrograph_values) == 24


def test_relion30_per_row_optics_go_to_the_optics_table_not_the_rows(tmp_path) -> None:
    (tmp_path / "m.star").write_text(
        "data_\nloop_\n_rlnMicrographName #1\n_rlnVoltage #2\n_rlnSphericalAberration #3\n"
        "_rlnAmplitudeContrast #4\n_rlnMicrographPixelSize #5\n_rlnAccumMotionTotal #6\n"
        "_rlnDefocusU #7\n_rlnCtfPowerSpectrum #8\n"
        "a.mrc 200 1.4 0.1 0.885 7.25 12345.6 a_PS.mrc\n"
    )
    kept = read_passthrough(tmp_path / "m.star")
    # optics go to data_optics; an old defocus is replaced by the new fit
    assert kept.micrograph_columns == ("rlnAccumMotionTotal", "rlnCtfPowerSpectrum")
    assert kept.micrograph_values == {"a.mrc": ("7.25", "a_PS.mrc")}
    assert kept.optics_columns == ()
