"""RELION STAR files: real RELION output, round trips, and clear errors for bad tables."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import starfile

from anisoctf.errors import InputError
from anisoctf.io.star import (
    MicrographCTFRow,
    MicrographEntry,
    read_micrographs_ctf_star,
    read_micrographs_star,
    read_optics_group_names,
    read_optics_star,
    write_micrographs_ctf_star,
)
from anisoctf.optics.ctf import Optics


def _one_line_error(exc: pytest.ExceptionInfo[InputError], path: Path, *words: str) -> None:
    message = str(exc.value)
    assert "\n" not in message
    assert path.name in message
    for word in words:
        assert word in message, message


def _rows() -> list[MicrographCTFRow]:
    return [
        MicrographCTFRow(
            "MotionCorr/job002/a.mrc",
            1,
            "anisoctf/a_PS.ctf:mrc",
            10865.006836,
            10571.461914,
            79.13018,
            0.132045,
            4.841686,
        ),
        MicrographCTFRow(
            "MotionCorr/job002/b.mrc",
            2,
            "anisoctf/b_PS.ctf:mrc",
            21000.125,
            20000.0,
            -12.5,
            0.2,
            3.1,
            phase_shift=None,
        ),
        MicrographCTFRow(
            "MotionCorr/job002/c.mrc",
            1,
            "anisoctf/c_PS.ctf:mrc",
            9000.1,
            8999.9,
            0.0,
            0.05,
            7.75,
            phase_shift=None,
        ),
    ]


def _optics() -> dict[int, Optics]:
    return {
        1: Optics(pixel_size=0.885, voltage_kv=200.0, cs_mm=1.4, amplitude_contrast=0.1),
        2: Optics(
            pixel_size=1.0,
            voltage_kv=300.0,
            cs_mm=2.7,
            amplitude_contrast=0.07,
            mag_matrix=((1.011472, 0.004231), (0.00456, 1.008858)),
        ),
    }


# ---------------------------------------------------------------------------------------------
# real RELION files


def test_real_micrographs_ctf_star(shared_real: Path) -> None:
    rows, optics = read_micrographs_ctf_star(
        shared_real / "relion_tutorial_metadata" / "micrographs_ctf.star"
    )
    assert len(rows) == 24
    assert optics == {1: Optics(0.885, 200.0, 1.4, 0.1)}
    first = rows[0]
    assert first.name == "MotionCorr/job002/Movies/20170629_00021_frameImage.mrc"
    assert first.optics_group == 1
    assert first.ctf_image == "CtfFind/job003/Movies/20170629_00021_frameImage_PS.ctf:mrc"
    assert first.defocus_u == 10865.006836
    assert first.defocus_v == 10571.461914
    assert first.defocus_angle == 79.13018
    assert first.figure_of_merit == 0.132045
    assert first.max_resolution == 4.841686
    assert first.phase_shift is None
    assert first.astigmatism == pytest.approx(293.544922, abs=1e-6)
    assert all(r.defocus_u >= r.defocus_v for r in rows)


def test_real_corrected_micrographs(shared_real: Path, tmp_path: Path) -> None:
    star = shared_real / "relion_tutorial_metadata" / "corrected_micrographs.star"
    entries, optics = read_micrographs_star(star, project_dir=tmp_path)
    assert len(entries) == 24
    assert entries[0] == MicrographEntry(
        name="MotionCorr/job002/Movies/20170629_00021_frameImage.mrc",
        optics_group=1,
        path=tmp_path / "MotionCorr/job002/Movies/20170629_00021_frameImage.mrc",
    )
    assert entries[-1].name.endswith("_frameImage.mrc")
    assert optics[1].pixel_size == 0.885 and optics[1].voltage_kv == 200.0


def test_real_project_dir_defaults_to_cwd(
    shared_real: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    star = shared_real / "relion_tutorial_metadata" / "corrected_micrographs.star"
    entries, _ = read_micrographs_star(star)
    assert entries[0].path == tmp_path / entries[0].name


def test_real_particle_optics_with_mag_matrices(shared_real: Path) -> None:
    star = shared_real / "cryodrgn" / "relion31.6opticsgroups.star"
    optics = read_optics_star(star, kind="particles")
    assert sorted(optics) == [1, 2, 3, 4, 5, 6]
    assert optics[1].mag_matrix == ((1.011472, 0.004231), (0.00456, 1.008858))
    assert optics[6].mag_matrix == ((1.006131, -0.00887), (-0.00768, 0.999765))
    assert optics[4].cs_mm == 2.6
    assert optics[6].pixel_size == 1.25  # _rlnImagePixelSize for particles
    assert read_optics_star(star)[6].pixel_size == 1.035  # _rlnMicrographPixelSize
    assert all(o.has_anisomag for o in optics.values())
    assert read_optics_group_names(star)[1] == "opticsGroup5"


def test_real_relion30_detector_pixel_size(shared_real: Path) -> None:
    entries, optics = read_micrographs_star(shared_real / "cryodrgn" / "empiar_10076_7.star")
    assert [e.name for e in entries] == [str(i) for i in range(1, 8)]
    assert list(optics) == [1]
    assert optics[1].pixel_size == pytest.approx(5.0 * 1e4 / 38168)
    assert (optics[1].voltage_kv, optics[1].cs_mm, optics[1].amplitude_contrast) == (
        300.0,
        2.7,
        0.07,
    )


def test_real_file_round_trip(shared_real: Path, tmp_path: Path) -> None:
    rows, optics = read_micrographs_ctf_star(
        shared_real / "relion_tutorial_metadata" / "micrographs_ctf.star"
    )
    out = tmp_path / "micrographs_ctf.star"
    write_micrographs_ctf_star(out, rows, optics)
    assert read_micrographs_ctf_star(out) == (rows, optics)


# ---------------------------------------------------------------------------------------------
# writing


def test_round_trip_is_exact(tmp_path: Path) -> None:
    out = tmp_path / "ctf.star"
    rows, optics = _rows(), _optics()
    write_micrographs_ctf_star(out, rows, optics, optics_names={1: "k2", 2: "falcon"})
    back_rows, back_optics = read_micrographs_ctf_star(out)
    assert back_rows == rows
    assert back_optics == optics
    assert read_optics_group_names(out) == {1: "k2", 2: "falcon"}
    assert [p.name for p in tmp_path.iterdir()] == ["ctf.star"]


def test_written_layout_matches_relion(tmp_path: Path) -> None:
    out = tmp_path / "ctf.star"
    write_micrographs_ctf_star(out, _rows(), _optics())
    text = out.read_text()
    assert text.count("# version 30001") == 2
    assert text.index("data_optics") < text.index("data_micrographs")
    assert "\n_rlnMicrographName #1\n" in text
    blocks = starfile.read(out, always_dict=True)
    assert list(blocks["optics"].columns) == [
        "rlnOpticsGroupName",
        "rlnOpticsGroup",
        "rlnMicrographOriginalPixelSize",
        "rlnVoltage",
        "rlnSphericalAberration",
        "rlnAmplitudeContrast",
        "rlnMicrographPixelSize",
        "rlnMagMat00",
        "rlnMagMat01",
        "rlnMagMat10",
        "rlnMagMat11",
    ]
    assert list(blocks["optics"]["rlnOpticsGroupName"]) == ["opticsGroup1", "opticsGroup2"]
    assert list(blocks["optics"]["rlnMagMat00"]) == [1.0, 1.011472]
    micrographs = blocks["micrographs"]
    assert list(micrographs.columns) == [
        "rlnMicrographName",
        "rlnOpticsGroup",
        "rlnCtfImage",
        "rlnDefocusU",
        "rlnDefocusV",
        "rlnCtfAstigmatism",
        "rlnDefocusAngle",
        "rlnCtfFigureOfMerit",
        "rlnCtfMaxResolution",
    ]
    np.testing.assert_allclose(
        micrographs["rlnCtfAstigmatism"], micrographs["rlnDefocusU"] - micrographs["rlnDefocusV"]
    )
    assert list(micrographs["rlnOpticsGroup"]) == [1, 2, 1]


def test_no_mag_columns_without_anisomag(tmp_path: Path) -> None:
    out = tmp_path / "ctf.star"
    rows = [r for r in _rows() if r.optics_group == 1]
    write_micrographs_ctf_star(out, rows, {1: _optics()[1]})
    assert "rlnMagMat" not in out.read_text()
    assert "rlnPhaseShift" not in out.read_text()


def test_phase_shift_column(tmp_path: Path) -> None:
    rows = _rows()
    rows[1] = MicrographCTFRow(**{**rows[1].__dict__, "phase_shift": 87.5})
    out = tmp_path / "pp.star"
    write_micrographs_ctf_star(out, rows, _optics())
    back, _ = read_micrographs_ctf_star(out)
    assert [r.phase_shift for r in back] == [0.0, 87.5, 0.0]
    assert list(starfile.read(out)["micrographs"]["rlnPhaseShift"]) == [0.0, 87.5, 0.0]


def test_writer_refuses_bad_rows_and_keeps_old_file(tmp_path: Path) -> None:
    out = tmp_path / "ctf.star"
    out.write_text("old\n")
    bad_name = [MicrographCTFRow("has space.mrc", 1, "x.ctf", 1.0, 1.0, 0.0, 0.1, 4.0)]
    with pytest.raises(ValueError, match="space"):
        write_micrographs_ctf_star(out, bad_name, _optics())
    with pytest.raises(ValueError, match="optics group"):
        write_micrographs_ctf_star(out, _rows(), {1: _optics()[1]})
    nan_defocus = [MicrographCTFRow("a.mrc", 1, "x.ctf", float("nan"), 1.0, 0.0, 0.1, 4.0)]
    with pytest.raises(ValueError, match="finite"):
        write_micrographs_ctf_star(out, nan_defocus, _optics())
    assert out.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["ctf.star"]


# ---------------------------------------------------------------------------------------------
# RELION 3.0 tables and partial files


def test_relion30_names_only(tmp_path: Path) -> None:
    star = tmp_path / "mics.star"
    star.write_text("data_\nloop_\n_rlnMicrographName #1\nMics/0003.mrc\nMics/0004.mrc:mrc\n")
    entries, optics = read_micrographs_star(star, project_dir=tmp_path / "proj")
    assert optics == {}
    assert entries == [
        MicrographEntry("Mics/0003.mrc", 1, tmp_path / "proj" / "Mics/0003.mrc"),
        MicrographEntry("Mics/0004.mrc:mrc", 1, tmp_path / "proj" / "Mics/0004.mrc"),
    ]


def test_relion30_per_row_optics_groups(tmp_path: Path) -> None:
    star = tmp_path / "ctf30.star"
    star.write_text(
        "data_\nloop_\n_rlnMicrographName\n_rlnDefocusU\n_rlnDefocusV\n_rlnDefocusAngle\n"
        "_rlnVoltage\n_rlnSphericalAberration\n_rlnAmplitudeContrast\n_rlnMicrographPixelSize\n"
        "a.mrc 10000 9000 10 300 2.7 0.1 1.06\n"
        "b.mrc 12000 11000 20 200 2.7 0.1 1.06\n"
        "c.mrc 14000 13000 30 300 2.7 0.1 1.06\n"
    )
    rows, optics = read_micrographs_ctf_star(star)
    assert [r.optics_group for r in rows] == [1, 2, 1]
    assert optics[1].voltage_kv == 300.0 and optics[2].voltage_kv == 200.0
    assert np.isnan(rows[0].figure_of_merit) and np.isnan(rows[0].max_resolution)
    assert rows[2].defocus_angle == 30.0 and rows[0].ctf_image == ""


def test_absolute_names_stay_absolute(tmp_path: Path) -> None:
    star = tmp_path / "abs.star"
    star.write_text("data_\nloop_\n_rlnMicrographName\n/data/x.mrc\n")
    entries, _ = read_micrographs_star(star, project_dir=tmp_path)
    assert entries[0].path == Path("/data/x.mrc")


# ---------------------------------------------------------------------------------------------
# bad input


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "none.star"
    with pytest.raises(InputError) as exc:
        read_micrographs_star(path)
    _one_line_error(exc, path, "not found")


def test_garbage_file(tmp_path: Path) -> None:
    path = tmp_path / "noise.star"
    path.write_bytes(np.random.default_rng(5).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    with pytest.raises(InputError) as exc:
        read_micrographs_ctf_star(path)
    _one_line_error(exc, path, "not a STAR file")


def test_no_micrograph_name_column(tmp_path: Path) -> None:
    path = tmp_path / "parts.star"
    path.write_text("data_particles\nloop_\n_rlnImageName\n1@a.mrcs\n")
    with pytest.raises(InputError) as exc:
        read_micrographs_star(path)
    _one_line_error(exc, path, "_rlnMicrographName", "data_particles")


def test_missing_optics_columns(tmp_path: Path) -> None:
    path = tmp_path / "mics.star"
    path.write_text(
        "data_optics\nloop_\n_rlnOpticsGroup\n_rlnVoltage\n1 300\n\n"
        "data_micrographs\nloop_\n_rlnMicrographName\n_rlnOpticsGroup\na.mrc 1\n"
    )
    with pytest.raises(InputError) as exc:
        read_micrographs_star(path)
    _one_line_error(
        exc,
        path,
        "_rlnSphericalAberration",
        "_rlnAmplitudeContrast",
        "_rlnMicrographPixelSize",
        "--apix/--kv/--cs/--ac",
    )


def test_partial_per_row_optics(tmp_path: Path) -> None:
    path = tmp_path / "mics30.star"
    path.write_text("data_\nloop_\n_rlnMicrographName\n_rlnVoltage\na.mrc 300\n")
    with pytest.raises(InputError) as exc:
        read_micrographs_star(path)
    _one_line_error(exc, path, "_rlnSphericalAberration", "--apix")


def test_unknown_optics_group(tmp_path: Path) -> None:
    path = tmp_path / "mics.star"
    path.write_text(
        "data_optics\nloop_\n_rlnOpticsGroup\n_rlnVoltage\n_rlnSphericalAberration\n"
        "_rlnAmplitudeContrast\n_rlnMicrographPixelSize\n1 300 2.7 0.1 1.0\n\n"
        "data_micrographs\nloop_\n_rlnMicrographName\n_rlnOpticsGroup\na.mrc 1\nb.mrc 3\n"
    )
    with pytest.raises(InputError) as exc:
        read_micrographs_star(path)
    _one_line_error(exc, path, "optics group(s) [3]")


def test_missing_defocus_column(tmp_path: Path) -> None:
    path = tmp_path / "ctf.star"
    path.write_text("data_\nloop_\n_rlnMicrographName\n_rlnDefocusU\na.mrc 10000\n")
    with pytest.raises(InputError) as exc:
        read_micrographs_ctf_star(path)
    _one_line_error(exc, path, "_rlnDefocusV", "_rlnDefocusAngle")


def test_truncated_row(tmp_path: Path) -> None:
    path = tmp_path / "ctf.star"
    path.write_text(
        "data_\nloop_\n_rlnMicrographName\n_rlnDefocusU\n_rlnDefocusV\n_rlnDefocusAngle\n"
        "a.mrc 10000 9000 5\nb.mrc 12000\n"
    )
    with pytest.raises(InputError) as exc:
        read_micrographs_ctf_star(path)
    _one_line_error(exc, path, "row 2", "_rlnDefocusV", "truncated")


def test_bad_optics_value(tmp_path: Path) -> None:
    path = tmp_path / "mics.star"
    path.write_text(
        "data_optics\nloop_\n_rlnOpticsGroup\n_rlnVoltage\n_rlnSphericalAberration\n"
        "_rlnAmplitudeContrast\n_rlnMicrographPixelSize\n1 300 2.7 0.1 -1.0\n\n"
        "data_micrographs\nloop_\n_rlnMicrographName\n_rlnOpticsGroup\na.mrc 1\n"
    )
    with pytest.raises(InputError) as exc:
        read_micrographs_star(path)
    _one_line_error(exc, path, "optics group 1", "pixel size")
