"""CTFFIND-compatible text output: exact layout, round trips, CTFFIND 4 and 5 files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from anisoctf.errors import InputError
from anisoctf.io.ctffind import (
    CTFFindRecord,
    CTFFindSearch,
    ctffind_record,
    read_ctffind_txt,
    tilt_from_ctffind,
    tilt_to_ctffind,
    write_ctffind_txt,
)
from anisoctf.optics.ctf import Optics
from anisoctf.records.micrograph import MicrographCTFRow

HEADER = dict(
    input_file="MotionCorr/job002/Movies/mic_0001.mrc",
    optics=Optics(pixel_size=0.885, voltage_kv=200.0, cs_mm=1.4, amplitude_contrast=0.1),
    search=CTFFindSearch(box=512, min_res=30.0, max_res=5.0, df_min=5000.0, df_max=50000.0),
    run_on="2024-01-02 03:04:05",
)

# Hand-written in the CTFFIND 4.1 layout (numbers invented for this test).
CTFFIND4_TEXT = """\
# Output from CTFFind version 4.1.14, run on 2024-03-01 10:00:00
# Input file: mic_0001.mrc ; Number of micrographs: 1
# Pixel size: 1.060 Angstroms ; acceleration voltage: 300.0 keV ; spherical aberration: 2.70 mm ; amplitude contrast: 0.07
# Box size: 512 pixels ; min. res.: 30.0 Angstroms ; max. res.: 4.0 Angstroms ; min. def.: 5000.0 um; max. def. 50000.0 um
# Columns: #1 - micrograph number; #2 - defocus 1 [Angstroms]; #3 - defocus 2; #4 - azimuth of astigmatism; #5 - additional phase shift [radians]; #6 - cross correlation; #7 - spacing (in Angstroms) up to which CTF rings were fit successfully
1.000000 15234.125000 14876.500000 -37.250000 0.000000 0.123456 3.875000
"""  # noqa: E501

# Hand-written in the CTFFIND 5 layout (numbers invented for this test).
CTFFIND5_TEXT = """\
# Output from CTFFind version 5.0.2, run on 2024-03-01 10:00:00
# Input file: lamella.mrc ; Number of micrographs: 2
# Pixel size: 2.000 Angstroms ; acceleration voltage: 300.0 keV ; spherical aberration: 2.70 mm ; amplitude contrast: 0.07
# Box size: 512 pixels ; min. res.: 30.0 Angstroms ; max. res.: 6.0 Angstroms ; min. def.: 0.0 um; max. def. 50000.0 um
# Columns: #1 - micrograph number; #2 - defocus 1 [Angstroms]; #3 - defocus 2; #4 - azimuth of astigmatism; #5 - additional phase shift [radians]; #6 - cross correlation; #7 - spacing (in Angstroms) up to which CTF rings were fit successfully; #8 - Estimated tilt axis angle; #9 - Estimated tilt angle ; #10 Estimated sample thickness (in Angstroms)
1.000000 30125.500000 29750.250000 12.500000 0.000000 0.210000 6.500000 85.250000 11.750000 1650.500000
2.000000 31000.000000 30500.000000 14.000000 0.000000 0.190000 7.000000 86.000000 12.000000 1700.000000
"""  # noqa: E501


def _one_line_error(exc: pytest.ExceptionInfo[InputError], path: Path, *words: str) -> None:
    message = str(exc.value)
    assert "\n" not in message
    assert path.name in message
    for word in words:
        assert word in message, message


def test_ctffind4_round_trip_and_layout(tmp_path: Path) -> None:
    record = CTFFindRecord(10865.006836, 10571.461914, 79.13018, 0.0, 0.132045, 4.841686)
    out = tmp_path / "mic_0001.txt"
    write_ctffind_txt(out, record, **HEADER)
    assert read_ctffind_txt(out) == [record]
    lines = out.read_text().splitlines()
    assert len(lines) == 6
    assert lines[0] == "# Output from anisoctf 0.1.0, run on 2024-01-02 03:04:05"
    assert (
        lines[1] == "# Input file: MotionCorr/job002/Movies/mic_0001.mrc ; Number of micrographs: 1"
    )
    assert lines[2] == (
        "# Pixel size: 0.885 Angstroms ; acceleration voltage: 200.0 keV ; "
        "spherical aberration: 1.40 mm ; amplitude contrast: 0.10"
    )
    assert lines[3] == (
        "# Box size: 512 pixels ; min. res.: 30.0 Angstroms ; max. res.: 5.0 Angstroms ; "
        "min. def.: 5000.0 um; max. def. 50000.0 um"
    )
    assert lines[4].startswith("# Columns: #1 - micrograph number; #2 - defocus 1 [Angstroms];")
    assert lines[4].endswith(
        "#7 - spacing (in Angstroms) up to which CTF rings were fit successfully"
    )
    assert lines[5] == "1.000000 10865.006836 10571.461914 79.130180 0.000000 0.132045 4.841686"
    assert [p.name for p in tmp_path.iterdir()] == ["mic_0001.txt"]


def test_header_words_sit_where_ctffind_puts_them(tmp_path: Path) -> None:
    """Scripts split CTFFIND headers on whitespace and pick words by position."""
    out = tmp_path / "m.txt"
    write_ctffind_txt(out, CTFFindRecord(1.0, 1.0, 0.0, 0.0, 0.1, 5.0), **HEADER)
    ours = [line.split() for line in out.read_text().splitlines()[1:4]]
    theirs = [line.split() for line in CTFFIND4_TEXT.splitlines()[1:4]]
    ours[0][3] = theirs[0][3] = "<file>"
    for mine, ref in zip(ours, theirs, strict=True):
        assert len(mine) == len(ref)
        assert [w for w in mine if not w[0].isdigit()] == [w for w in ref if not w[0].isdigit()]
    assert float(ours[1][3]) == 0.885 and float(ours[1][8]) == 200.0
    assert float(ours[1][13]) == 1.4 and float(ours[1][18]) == 0.1
    assert int(ours[2][3]) == 512 and float(ours[2][18]) == 5000.0 and float(ours[2][22]) == 50000.0


def test_ctffind5_round_trip(tmp_path: Path) -> None:
    records = [
        CTFFindRecord(30125.5, 29750.25, 12.5, 0.25, 0.21, 6.5, 85.25, 11.75, 1650.5),
        CTFFindRecord(31000.0, 30500.0, 14.0, 0.0, 0.19, 7.0, 86.0, 12.0, 1700.0),
    ]
    out = tmp_path / "lamella.txt"
    write_ctffind_txt(out, records, **HEADER)
    assert read_ctffind_txt(out) == records
    lines = out.read_text().splitlines()
    assert "Number of micrographs: 2" in lines[1]
    assert lines[4].endswith(
        "; #8 - Estimated tilt axis angle; #9 - Estimated tilt angle ; "
        "#10 Estimated sample thickness (in Angstroms)"
    )
    assert lines[6].split()[0] == "2.000000" and len(lines[6].split()) == 10


def test_partial_ctffind5_values_written_as_zero(tmp_path: Path) -> None:
    out = tmp_path / "t.txt"
    write_ctffind_txt(out, CTFFindRecord(2.0, 1.0, 0.0, 0.0, 0.1, 5.0, thickness=900.0), **HEADER)
    (back,) = read_ctffind_txt(out)
    assert (back.tilt_axis, back.tilt_angle, back.thickness) == (0.0, 0.0, 900.0)


def test_reads_ctffind4_file(tmp_path: Path) -> None:
    path = tmp_path / "c4.txt"
    path.write_text(CTFFIND4_TEXT)
    assert read_ctffind_txt(path) == [
        CTFFindRecord(15234.125, 14876.5, -37.25, 0.0, 0.123456, 3.875, None, None, None)
    ]


def test_reads_ctffind5_file(tmp_path: Path) -> None:
    path = tmp_path / "c5.txt"
    path.write_text(CTFFIND5_TEXT)
    records = read_ctffind_txt(path)
    assert len(records) == 2
    # CTFFIND's axis 85.25° with tilt 11.75° is our axis 94.75° with tilt −11.75°
    assert records[0] == CTFFindRecord(
        30125.5, 29750.25, 12.5, 0.0, 0.21, 6.5, 94.75, -11.75, 1650.5
    )
    assert records[1].thickness == 1700.0 and records[1].tilt_axis == 94.0
    assert records[1].tilt_angle == -12.0


def test_writer_refuses_nan(tmp_path: Path) -> None:
    out = tmp_path / "n.txt"
    with pytest.raises(ValueError, match="non-finite"):
        write_ctffind_txt(out, CTFFindRecord(float("nan"), 1.0, 0.0, 0.0, 0.1, 5.0), **HEADER)
    with pytest.raises(ValueError):
        write_ctffind_txt(out, [], **HEADER)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ("", ("no result rows",)),
        (CTFFIND4_TEXT.rsplit("\n", 2)[0] + "\n", ("no result rows",)),
        (CTFFIND4_TEXT[:-20] + "\n", ("columns", "expected 7")),
        (CTFFIND4_TEXT.replace("0.123456", "abc"), ("text where numbers",)),
        (CTFFIND4_TEXT.replace("14876.500000", "nan"), ("NaN",)),
    ],
    ids=["empty", "header-only", "cut-row", "text", "nan"],
)
def test_bad_files(tmp_path: Path, content: str, words: tuple[str, ...]) -> None:
    path = tmp_path / "bad.txt"
    path.write_text(content)
    with pytest.raises(InputError) as exc:
        read_ctffind_txt(path)
    _one_line_error(exc, path, *words)


def test_missing_and_binary_files(tmp_path: Path) -> None:
    missing = tmp_path / "gone.txt"
    with pytest.raises(InputError) as exc:
        read_ctffind_txt(missing)
    _one_line_error(exc, missing, "not found")
    binary = tmp_path / "bin.txt"
    binary.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(InputError) as exc:
        read_ctffind_txt(binary)
    _one_line_error(exc, binary, "not a CTFFIND")


def test_ctffind_record_from_a_micrograph_result(tmp_path: Path) -> None:
    row = MicrographCTFRow(
        "m.mrc", 1, "", 21000.0, 20000.0, 35.0, float("nan"), 4.5, phase_shift=90.0, thickness=800.0
    )
    rec = ctffind_record(row)
    assert (rec.defocus_1, rec.defocus_2, rec.azimuth) == (21000.0, 20000.0, 35.0)
    assert rec.phase_shift_rad == pytest.approx(1.5707963267948966, abs=0)
    assert rec.cross_correlation == 0.0 and rec.fit_resolution == 4.5
    assert rec.thickness == 800.0 and rec.tilt_angle is None
    out = tmp_path / "m.txt"
    write_ctffind_txt(out, rec, **HEADER)
    back = read_ctffind_txt(out)[0]
    assert back.defocus_1 == 21000.0 and back.thickness == 800.0


def _height_ours(axis: float, tilt: float, x, y):
    a, t = math.radians(axis), math.radians(tilt)
    return math.tan(t) * (-x * math.sin(a) + y * math.cos(a))


def _height_ctffind(axis: float, tilt: float, x, y):
    """cisTEM ctffind_tilt.cpp: height = tan(tilt) (x sin(axis) + y cos(axis))."""
    a, t = math.radians(axis), math.radians(tilt)
    return math.tan(t) * (x * math.sin(a) + y * math.cos(a))


@pytest.mark.parametrize("axis", [0.0, 17.5, 90.0, 130.0, 179.25])
@pytest.mark.parametrize("tilt", [-35.0, -4.0, 0.0, 12.5, 40.0])
def test_tilt_conversion_describes_the_same_specimen(axis: float, tilt: float) -> None:
    """Physical invariance: the height of every point agrees between the two conventions."""
    phi, tau = tilt_to_ctffind(axis, tilt)
    assert 0.0 <= phi < 360.0 and tau >= 0.0
    x, y = np.meshgrid(np.linspace(-1000, 1000, 7), np.linspace(-800, 800, 5))
    np.testing.assert_allclose(
        _height_ctffind(phi, tau, x, y), _height_ours(axis, tilt, x, y), atol=1e-9
    )
    back_axis, back_tilt = tilt_from_ctffind(phi, tau)
    if tilt != 0.0:
        assert back_axis == pytest.approx(axis, abs=1e-12)
        assert back_tilt == pytest.approx(tilt, abs=1e-12)
    assert 0.0 <= back_axis < 180.0


def test_written_columns_are_ctffind5s_convention(tmp_path: Path) -> None:
    rec = CTFFindRecord(2.0, 1.0, 0.0, 0.0, 0.1, 5.0, 130.0, 25.0, 0.0)
    out = tmp_path / "t.txt"
    write_ctffind_txt(out, rec, **HEADER)
    fields = out.read_text().splitlines()[-1].split()
    assert (float(fields[7]), float(fields[8])) == (230.0, 25.0)  # 360° − 130°, unsigned
    neg = CTFFindRecord(2.0, 1.0, 0.0, 0.0, 0.1, 5.0, 40.0, -10.0, 0.0)
    write_ctffind_txt(out, neg, **HEADER)
    fields = out.read_text().splitlines()[-1].split()
    assert (float(fields[7]), float(fields[8])) == (140.0, 10.0)  # 180° − 40°, unsigned
    assert read_ctffind_txt(out) == [neg]


def test_real_ctffind5_tilt_convention(shared_real: Path) -> None:
    """CTFFIND 5.0.1's own .txt for a micrograph tilted 25° about our 130° axis."""
    folder = shared_real.parent / "ctffind5"
    truth = json.loads((folder / "tilted_2048.json").read_text())
    (rec,) = read_ctffind_txt(folder / "tilted_2048_ctffind5.txt")
    assert rec.tilt_axis == pytest.approx(truth["tilt_axis_deg"], abs=2.0)  # CTFFIND: 231.15°
    assert rec.tilt_angle == pytest.approx(truth["tilt_deg"], abs=1.0)
    assert rec.defocus_1 == pytest.approx(truth["dfU"], abs=20.0)
    # and a file written by us for the truth reads as CTFFIND's numbers do
    phi, tau = tilt_to_ctffind(truth["tilt_axis_deg"], truth["tilt_deg"])
    assert phi == pytest.approx(231.145706, abs=2.0) and tau == pytest.approx(25.478270, abs=1.0)
