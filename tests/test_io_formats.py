"""The formats layer's shared pieces: labels, the table finder, the optics reader, the STAR patch,
the matrix JSON reader, and the pandas-free shared-astigmatism median pinned to pandas."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from anisoctf.errors import InputError
from anisoctf.io import labels as L
from anisoctf.io.matrix_json import read_mag_matrix_json
from anisoctf.io.star import relion_micrograph_columns, relion_micrograph_row
from anisoctf.io.star_optics import read_optics_star
from anisoctf.io.star_patch import patch_defocus_star
from anisoctf.io.star_tables import find_block, find_table, read_star_blocks
from anisoctf.magnification.tables import share_astigmatism
from anisoctf.optics.magmat import MagMat
from anisoctf.records.defocus import DefocusTable
from anisoctf.records.micrograph import MicrographCTFRow

STAR = """
# version 30001

data_optics

loop_
_rlnOpticsGroupName #1
_rlnOpticsGroup #2
_rlnVoltage #3
_rlnSphericalAberration #4
_rlnAmplitudeContrast #5
_rlnImagePixelSize #6
opticsGroup1 1 300.0 2.7 0.1 1.06
opticsGroup2 2 300.0 2.7 0.1 1.06

# version 30001

data_particles

loop_
_rlnMicrographName #1
_rlnOpticsGroup #2
_rlnDefocusU #3
_rlnDefocusV #4
_rlnDefocusAngle #5
_rlnCtfAstigmatism #6
_rlnCtfFigureOfMerit #7
m1.mrc   1  20000.5  19000.25  10.0  1000.25  0.123   # a comment
m1.mrc   2  21000.0  20500.00  20.0   500.00  0.2
"""


def _pandas_share(u, v, ang, keys):
    """The former implementation (pandas groupby median), kept here as the reference."""
    t = np.deg2rad(2.0 * np.asarray(ang, dtype=float))
    z, h = 0.5 * (u + v), 0.5 * (u - v)
    frame = {"a1": h * np.cos(t), "a2": h * np.sin(t)}
    names = []
    for i, k in enumerate(keys):
        frame[f"key{i}"] = np.asarray(k)
        names.append(f"key{i}")
    med = pd.DataFrame(frame).groupby(names, sort=False, dropna=False)[["a1", "a2"]]
    med = med.transform("median")
    m1, m2 = med["a1"].to_numpy(), med["a2"].to_numpy()
    hm = np.hypot(m1, m2)
    tiny = hm <= 1e-12 * np.maximum(np.abs(z), 1.0)
    hm = np.where(tiny, 0.0, hm)
    a = np.where(tiny, 0.0, np.mod(0.5 * np.rad2deg(np.arctan2(m2, m1)), 180.0))
    return z + hm, z - hm, np.where(a >= 180.0, 0.0, a)


def test_share_astigmatism_is_pandas_groupby_median_bit_for_bit() -> None:
    rng = np.random.default_rng(3)
    n = 2000
    u = rng.uniform(8000.0, 30000.0, n)
    v = u - rng.uniform(0.0, 1500.0, n)
    ang = rng.uniform(0.0, 180.0, n)
    mic = rng.choice([f"Movies/m{i:03d}.mrc" for i in range(150)], n)  # odd and even counts
    grp = rng.integers(1, 4, n)
    got = share_astigmatism(u, v, ang, [grp, mic])
    want = _pandas_share(u, v, ang, [grp, mic])
    for g, w in zip(got, want, strict=True):
        assert np.array_equal(g, w)
    got1 = share_astigmatism(u, v, ang, np.array(mic))
    want1 = _pandas_share(u, v, ang, [mic])
    for g, w in zip(got1, want1, strict=True):
        assert np.array_equal(g, w)
    uid = rng.integers(0, 40, n).astype(np.uint64)  # cryoSPARC micrograph uids
    got2, want2 = share_astigmatism(u, v, ang, uid), _pandas_share(u, v, ang, [uid])
    for g, w in zip(got2, want2, strict=True):
        assert np.array_equal(g, w)


def test_find_table_prefers_named_blocks_and_names_what_is_missing(tmp_path: Path) -> None:
    p = tmp_path / "p.star"
    p.write_text(STAR)
    blocks = read_star_blocks(p)
    assert find_block(blocks, L.DEFOCUS_U, ("micrographs", "")) == ["particles"]
    assert find_block(blocks, L.OPTICS_GROUP) == ["particles"]  # never data_optics
    key, df = find_table(p, blocks, [L.MICROGRAPH_NAME, *L.DEFOCUS], "hint")
    assert key == "particles" and len(df) == 2
    with pytest.raises(InputError, match=r"data_particles lacks _rlnCoordinateX; give it"):
        find_table(p, blocks, [L.MICROGRAPH_NAME, "rlnCoordinateX"], "give it")
    with pytest.raises(InputError, match=r"no _rlnImageName column in any data block \(found "):
        find_table(p, blocks, [L.IMAGE_NAME], "hint")


def test_optics_reader_goes_through_magmat(tmp_path: Path) -> None:
    text = STAR.replace("_rlnImagePixelSize #6\n", "_rlnImagePixelSize #6\n_rlnMagMat00 #7\n"
                        "_rlnMagMat01 #8\n_rlnMagMat10 #9\n_rlnMagMat11 #10\n")  # fmt: skip
    good = text.replace("1.06\nopticsGroup2", "1.06 1.01 0 0 0.99\nopticsGroup2").replace(
        "2 300.0 2.7 0.1 1.06\n", "2 300.0 2.7 0.1 1.06 1 0 0 1\n"
    )
    p = tmp_path / "good.star"
    p.write_text(good)
    optics = read_optics_star(p, "particles")
    assert optics[1].mag_matrix == ((1.01, 0.0), (0.0, 0.99))
    assert optics[2].mag_matrix == ((1.0, 0.0), (0.0, 1.0))
    mirror = good.replace("1.06 1.01 0 0 0.99", "1.06 1 0 0 -1")
    p2 = tmp_path / "mirror.star"
    p2.write_text(mirror)
    with pytest.raises(InputError, match="optics group 1: .*positive determinant"):
        read_optics_star(p2, "particles")


def test_patch_defocus_star_keeps_every_other_byte(tmp_path: Path) -> None:
    src, dst = tmp_path / "in.star", tmp_path / "out.star"
    src.write_text(STAR)
    blocks = read_star_blocks(src)
    table, optics = blocks["particles"], blocks["optics"]
    mask = np.array([True, False])
    u = np.array([20100.0, 0.0])
    v = np.array([19050.0, 0.0])
    a = np.array([180.0, 0.0])  # written as 0.000000, as RELION does
    m = MagMat.from_anisotropy(1.0, 30.0)
    patch_defocus_star(src, dst, "particles", table, mask, (u, v, a), optics, {1: m})
    mm = " ".join(repr(float(x)) for x in m.array.ravel())
    expected = (
        STAR.replace(
            "_rlnImagePixelSize #6\n",
            "_rlnImagePixelSize #6\n_rlnMagMat00 #7\n_rlnMagMat01 #8\n_rlnMagMat10 #9\n"
            "_rlnMagMat11 #10\n",
        )
        .replace("1 300.0 2.7 0.1 1.06\n", f"1 300.0 2.7 0.1 1.06 {mm}\n")
        .replace("2 300.0 2.7 0.1 1.06\n", "2 300.0 2.7 0.1 1.06 1.0 0.0 0.0 1.0\n")
        .replace(
            "m1.mrc   1  20000.5  19000.25  10.0  1000.25  0.123",
            "m1.mrc   1  20100.000000  19050.000000  0.000000  1050.000000  0.123",
        )
    )
    assert dst.read_text() == expected


def test_read_mag_matrix_json(tmp_path: Path) -> None:
    p = tmp_path / "d.json"
    p.write_text(json.dumps({"mag_matrix": [[1.01, 0.0], [0.0, 0.99]]}))
    assert read_mag_matrix_json(p) == MagMat(((1.01, 0.0), (0.0, 0.99)))
    p.write_text(json.dumps({"mag_matrix": [1.01, 0.0, 0.0, 0.99]}))
    assert read_mag_matrix_json(p).matrix == ((1.01, 0.0), (0.0, 0.99))
    p.write_text(json.dumps({"other": 1}))
    with pytest.raises(InputError, match="no 'mag_matrix' key"):
        read_mag_matrix_json(p)
    with pytest.raises(InputError, match="file not found"):
        read_mag_matrix_json(tmp_path / "absent.json")


def test_records() -> None:
    n = np.zeros(3)
    t = DefocusTable(n, n, n, np.ones(3, dtype=np.int64))
    assert len(t) == 3 and t.micrograph is None
    assert np.array_equal(t.with_defocus(n + 1, n, n).defocus_u, n + 1)
    with pytest.raises(ValueError, match="defocus_v has 2 rows, not 3"):
        DefocusTable(n, n[:2], n, np.ones(3, dtype=np.int64))
    r = MicrographCTFRow("a.mrc", 1, "", 2.0, 1.0, 5.0, float("nan"), 4.0, thickness=700.0)
    cols = relion_micrograph_columns([r])
    assert cols[-1] == L.ICE_THICKNESS and L.PHASE_SHIFT not in cols
    cells = ["a.mrc", "1", "2.0", "1.0", "1.0", "5.0", "nan", "4.0", "700.0"]
    assert relion_micrograph_row(r, cols) == cells
