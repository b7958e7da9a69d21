"""Tests for ``anisoctf aniso apply``: magnification.tables, io.cryosparc and the command."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import starfile
from typer.testing import CliRunner

from anisoctf.cli.main import app
from anisoctf.errors import InputError
from anisoctf.io.cryosparc import CSDAT_MAGIC, read_cs, require_fields, write_cs
from anisoctf.io.matrix_json import read_mag_matrix_json as load_detect_json
from anisoctf.io.star_optics import from_relion_table
from anisoctf.jobs.apply_tables import (
    CRYOSPARC_DEFOCUS_FIELDS,
    RELION_DEFOCUS_COLUMNS,
    apply_to_cryosparc,
    apply_to_relion,
    run_apply,
    share_astigmatism,
    undo_cryosparc,
    undo_relion,
    with_anisomag_field,
)
from anisoctf.magnification import (
    MagMat,
    apparent_astigmatism,
    defocus_table_to_observed,
    from_cryosparc_anisomag,
)

runner = CliRunner()

#: a general matrix: 1.5 % along 30 deg, 0.4 % pixel-size error and a 0.05 deg rotation
_ROT = np.deg2rad(0.05)
M_GENERAL = MagMat(
    np.array([[np.cos(_ROT), -np.sin(_ROT)], [np.sin(_ROT), np.cos(_ROT)]])
    @ MagMat.from_anisotropy(1.5, 30.0, 1.004).array
)
M_ARGS = [f"{x!r}" for row in M_GENERAL.matrix for x in row]

#: real STAR files without a magnification matrix (file, block with the defocus)
STAR_FILES = [
    ("relion_tutorial_metadata/run_it025_data.star", "particles"),
    ("relion_tutorial_metadata/particles_1k.star", "particles"),
    ("relion_tutorial_metadata/micrographs_ctf.star", "micrographs"),
    ("aspire/sample_particles_relion30.star", "model_class_1"),
    ("aspire/sample_particles_relion31.star", "particles"),
    ("cryodrgn/relion31.star", "particles"),
    ("cryodrgn/empiar_10076_7.star", ""),
]
CS_FILES = [
    "cryodrgn/cryosparc_P12_J24_001_particles.cs",
    "cryodrgn/cryosparc_J2_particles_exported.cs",
    "cryodrgn/empiar_10076_7.cs",
]
DEFOCUS_COLUMNS = [*RELION_DEFOCUS_COLUMNS, "rlnCtfAstigmatism"]


def invoke(*args):
    r = runner.invoke(app, ["aniso", "apply", *(str(a) for a in args)])
    return r


def dmat(u, v, angle_deg):
    """Entries (xx, xy, yy) of the defocus matrix ``R diag(U, V) R^T`` (vectorised)."""
    u, v = np.asarray(u, dtype=float), np.asarray(v, dtype=float)
    t = np.deg2rad(2.0 * np.asarray(angle_deg, dtype=float))
    z, h = 0.5 * (u + v), 0.5 * (u - v)
    return np.stack([z + h * np.cos(t), h * np.sin(t), z - h * np.cos(t)], axis=-1)


def assert_same_defocus(u0, v0, a0, u1, v1, a1, rtol):
    """Same defocus matrices relative to the mean defocus (angles compared through them)."""
    d0, d1 = dmat(u0, v0, a0), dmat(u1, v1, a1)
    scale = np.abs(0.5 * (np.asarray(u0) + np.asarray(v0)))[:, None]
    assert np.max(np.abs(d1 - d0) / scale) < rtol


def random_table(rng: np.random.Generator, n: int = 200, groups=(1, 2)) -> pd.DataFrame:
    u = rng.uniform(5000.0, 40000.0, n)
    v = u - rng.uniform(0.0, 2000.0, n)
    return pd.DataFrame(
        {
            "rlnMicrographName": [f"mic{i // 10:03d}.mrc" for i in range(n)],
            "rlnOpticsGroup": rng.choice(np.array(groups), n),
            "rlnDefocusU": u,
            "rlnDefocusV": v,
            "rlnDefocusAngle": rng.uniform(-180.0, 180.0, n),
            "rlnCtfAstigmatism": u - v,
            "rlnCtfFigureOfMerit": rng.uniform(0, 1, n),
        }
    )


def optics_table(groups=(1, 2)) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "rlnOpticsGroupName": [f"opticsGroup{g}" for g in groups],
            "rlnOpticsGroup": list(groups),
            "rlnVoltage": [300.0] * len(groups),
            "rlnImagePixelSize": [1.1] * len(groups),
        }
    )


# =========================================================================== exact maths
def test_quadratic_form_identity_per_row() -> None:
    """k_obs^T D_obs k_obs = (M k_obs)^T D_true (M k_obs) for every row and random k."""
    rng = np.random.default_rng(1)
    table = random_table(rng)
    mags = {1: M_GENERAL, 2: MagMat(np.eye(2) + rng.uniform(-0.03, 0.03, (2, 2)))}
    new_optics, new = apply_to_relion(optics_table(), table, mags)
    d_obs = dmat(table.rlnDefocusU, table.rlnDefocusV, table.rlnDefocusAngle)
    d_true = dmat(new.rlnDefocusU, new.rlnDefocusV, new.rlnDefocusAngle)
    stored = from_relion_table(new_optics)
    for i in range(len(table)):
        m = stored[int(table.rlnOpticsGroup[i])].array
        assert np.allclose(m, mags[int(table.rlnOpticsGroup[i])].array, rtol=0, atol=0)
        for k in rng.normal(size=(3, 2)):
            a, b, c = d_obs[i]
            lhs = k @ np.array([[a, b], [b, c]]) @ k
            kt = m @ k
            a, b, c = d_true[i]
            rhs = kt @ np.array([[a, b], [b, c]]) @ kt
            assert rhs == pytest.approx(lhs, rel=1e-12)
    assert np.all(new.rlnDefocusU >= new.rlnDefocusV)
    assert np.all((new.rlnDefocusAngle >= 0) & (new.rlnDefocusAngle < 180))
    assert np.allclose(new.rlnCtfAstigmatism, new.rlnDefocusU - new.rlnDefocusV, rtol=0, atol=0)
    pd.testing.assert_series_equal(new.rlnCtfFigureOfMerit, table.rlnCtfFigureOfMerit)


def test_known_answer_round_ctf_becomes_minus_apparent_astigmatism() -> None:
    """U = V = 20000 Å under 1.5 % at 30°: the true frame carries -(apparent astigmatism)."""
    m = MagMat.from_anisotropy(1.5, 30.0)
    app = apparent_astigmatism(20000.0, m)
    assert app.defocus_u - app.defocus_v == pytest.approx(600.034, abs=1e-3)
    table = pd.DataFrame(
        {"rlnDefocusU": [20000.0], "rlnDefocusV": [20000.0], "rlnDefocusAngle": [0.0]}
    )
    _, new = apply_to_relion(None, table, m)
    u, v, a = (float(new[c].iloc[0]) for c in RELION_DEFOCUS_COLUMNS)
    # symmetric M with det 1: the change is exactly the negative of the apparent astigmatism
    assert u - v == pytest.approx(app.defocus_u - app.defocus_v, rel=1e-12)
    assert a == pytest.approx((app.angle_deg + 90.0) % 180.0, abs=1e-9)  # U across the axis
    assert a == pytest.approx(120.0, abs=1e-9)
    h_app = 0.5 * (app.defocus_u - app.defocus_v)
    h_true = 0.5 * (u - v)
    cart_app = h_app * np.array([np.cos(np.deg2rad(2 * app.angle_deg)), np.sin(np.deg2rad(60))])
    cart_true = h_true * np.array([np.cos(np.deg2rad(2 * a)), np.sin(np.deg2rad(2 * a))])
    assert np.allclose(cart_true, -cart_app, rtol=0, atol=1e-9)
    # the same through the cryoSPARC path
    arr = np.zeros(1, dtype=[(f, "<f4") for f in CRYOSPARC_DEFOCUS_FIELDS])
    arr["ctf/df1_A"] = arr["ctf/df2_A"] = 20000.0
    cs = apply_to_cryosparc(arr, m)
    assert float(cs["ctf/df1_A"][0] - cs["ctf/df2_A"][0]) == pytest.approx(600.034, abs=5e-3)
    assert np.rad2deg(float(cs["ctf/df_angle_rad"][0])) == pytest.approx(120.0, abs=1e-4)
    assert from_cryosparc_anisomag(cs["ctf/anisomag"][0]).array == pytest.approx(m.array, abs=1e-6)


def test_observed_from_known_true_set_returns_it() -> None:
    rng = np.random.default_rng(7)
    n = 300
    u = rng.uniform(5000.0, 40000.0, n)
    v = u - rng.uniform(0.0, 2000.0, n)
    ang = rng.uniform(0.0, 180.0, n)
    groups = rng.choice([1, 2], n)
    mags = {1: M_GENERAL, 2: MagMat.from_anisotropy(2.5, 140.0, 0.995)}
    stack = np.stack([mags[int(g)].array for g in groups])
    ou, ov, oa = defocus_table_to_observed(u, v, ang, stack)
    table = pd.DataFrame(
        {"rlnOpticsGroup": groups, "rlnDefocusU": ou, "rlnDefocusV": ov, "rlnDefocusAngle": oa}
    )
    _, new = apply_to_relion(optics_table(), table, mags)
    assert np.allclose(new.rlnDefocusU, u, rtol=1e-12, atol=0)
    assert np.allclose(new.rlnDefocusV, v, rtol=1e-12, atol=0)
    big = (u - v) > 1.0  # the axis is defined
    assert np.allclose(new.rlnDefocusAngle[big], ang[big], rtol=0, atol=1e-6)


def test_undo_is_the_exact_inverse_in_memory() -> None:
    rng = np.random.default_rng(3)
    table = random_table(rng)
    optics = optics_table()
    mags = {1: M_GENERAL, 2: MagMat.from_anisotropy(1.0, 80.0)}
    o1, t1 = apply_to_relion(optics, table, mags)
    o2, t2 = undo_relion(o1, t1)
    pd.testing.assert_frame_equal(o2, optics)
    assert_same_defocus(
        table.rlnDefocusU,
        table.rlnDefocusV,
        table.rlnDefocusAngle,
        t2.rlnDefocusU,
        t2.rlnDefocusV,
        t2.rlnDefocusAngle,
        1e-12,
    )
    for c in table.columns:
        if c not in DEFOCUS_COLUMNS:
            pd.testing.assert_series_equal(t2[c], table[c])
    # RELION 3.0 layout: no optics, the matrix must be given back
    _, t3 = apply_to_relion(None, table, M_GENERAL)
    with pytest.raises(InputError, match="stores no matrix"):
        undo_relion(None, t3)
    _, t4 = undo_relion(None, t3, M_GENERAL)
    assert np.allclose(t4.rlnDefocusU, np.maximum(table.rlnDefocusU, table.rlnDefocusV), rtol=1e-12)


# =========================================================================== real STAR files
def _read_blocks(path: Path) -> dict[str, pd.DataFrame]:
    return {k: v for k, v in starfile.read(path, always_dict=True).items()}


@pytest.mark.parametrize(("name", "block"), STAR_FILES)
def test_real_star_apply_keeps_every_other_column(
    shared_real: Path, tmp_path: Path, name: str, block: str
) -> None:
    src = shared_real / name
    before_bytes = src.read_bytes()
    out = tmp_path / "out.star"
    r = invoke(src, "--mag-matrix", *M_ARGS, "--out", out)
    assert r.exit_code == 0, r.output
    assert src.read_bytes() == before_bytes  # the input is never touched
    before, after = _read_blocks(src), _read_blocks(out)
    assert list(after) == list(before)
    t0, t1 = before[block], after[block]
    assert list(t1.columns) == list(t0.columns)
    assert len(t1) == len(t0)
    for c in t0.columns:
        if c in DEFOCUS_COLUMNS:
            continue
        assert t1[c].dtype == t0[c].dtype, c
        pd.testing.assert_series_equal(t1[c], t0[c], check_exact=True)
    # the file holds what the table function computes (6 decimals, like RELION)
    optics = before.get("optics")
    _, expected = apply_to_relion(optics, t0, M_GENERAL)
    for c in DEFOCUS_COLUMNS:
        if c in t0.columns:
            assert np.allclose(t1[c], expected[c], rtol=0, atol=1.5e-6)
    assert np.all(t1.rlnDefocusU >= t1.rlnDefocusV)
    assert np.all((t1.rlnDefocusAngle >= 0) & (t1.rlnDefocusAngle < 180))
    if optics is not None:
        o1 = after["optics"]
        assert list(o1.columns) == [
            *optics.columns,
            "rlnMagMat00",
            "rlnMagMat01",
            "rlnMagMat10",
            "rlnMagMat11",
        ]
        for c in optics.columns:
            pd.testing.assert_series_equal(o1[c], optics[c], check_exact=True)
        stored = from_relion_table(o1)
        assert all(np.array_equal(m.array, M_GENERAL.array) for m in stored.values())
        assert "warning" not in r.stderr
    else:
        assert "RELION 3.0 layout" in r.stderr and "could not be stored" in r.stderr
    # the exact inverse, from the written file: back to the input within 1e-6 relative
    _, undone = undo_relion(after.get("optics"), t1, None if optics is not None else M_GENERAL)
    u0, v0 = t0.rlnDefocusU.to_numpy(), t0.rlnDefocusV.to_numpy()
    assert np.allclose(undone.rlnDefocusU, np.maximum(u0, v0), rtol=1e-6, atol=0)
    assert np.allclose(undone.rlnDefocusV, np.minimum(u0, v0), rtol=1e-6, atol=0)
    assert_same_defocus(
        u0,
        v0,
        t0.rlnDefocusAngle,
        undone.rlnDefocusU,
        undone.rlnDefocusV,
        undone.rlnDefocusAngle,
        1e-6,
    )
    # text: only the rewritten rows, the optics rows and the 4 new column lines differ
    old_lines = src.read_text().splitlines()
    new_lines = out.read_text().splitlines()
    n_optics = len(optics) if optics is not None else 0
    assert len(new_lines) == len(old_lines) + (4 if optics is not None else 0)
    changed = sum(
        a != b
        for a, b in zip(
            old_lines, [ln for ln in new_lines if not ln.startswith("_rlnMagMat")], strict=True
        )
    )
    assert changed == len(t0) + n_optics


def test_real_star_optics_group_selection(shared_real: Path, tmp_path: Path) -> None:
    src = shared_real / "aspire" / "sample_particles_relion31.star"
    out = tmp_path / "g2.star"
    r = invoke(src, "--mag-matrix", *M_ARGS, "--out", out, "--optics-group", 2)
    assert r.exit_code == 0, r.output
    before, after = _read_blocks(src), _read_blocks(out)
    t0, t1 = before["particles"], after["particles"]
    g2 = (t0.rlnOpticsGroup == 2).to_numpy()
    assert 0 < g2.sum() < len(t0)
    assert f"{g2.sum()} of {len(t0)} rows" in r.stdout
    for c in RELION_DEFOCUS_COLUMNS:
        assert np.array_equal(t1[c][~g2], t0[c][~g2])
        assert not np.allclose(t1[c][g2], t0[c][g2], rtol=0, atol=1e-3) or c == "rlnDefocusAngle"
    stored = from_relion_table(after["optics"])
    assert stored[1].is_identity
    assert np.array_equal(stored[2].array, M_GENERAL.array)
    r = invoke(src, "--mag-matrix", *M_ARGS, "--out", tmp_path / "g7.star", "--optics-group", 7)
    assert r.exit_code == 2 and "optics group(s) [7]" in r.stderr


# =========================================================================== shared astigmatism
def test_share_astigmatism_median_of_cartesian_components() -> None:
    # three particles of one micrograph: astigmatism 100, 200, 300 Å along 10°, 20°, 30°
    u = np.array([10050.0, 12100.0, 14150.0])
    v = u - np.array([100.0, 200.0, 300.0])
    ang = np.array([10.0, 20.0, 30.0])
    su, sv, sa = share_astigmatism(u, v, ang, np.array(["a", "a", "a"]))
    h = 0.5 * (u - v)
    a1 = np.median(h * np.cos(np.deg2rad(2 * ang)))
    a2 = np.median(h * np.sin(np.deg2rad(2 * ang)))
    assert np.allclose(0.5 * (su + sv), 0.5 * (u + v), rtol=0, atol=1e-9)
    assert np.allclose(su - sv, 2 * np.hypot(a1, a2), rtol=1e-12)
    assert np.allclose(sa, 0.5 * np.rad2deg(np.arctan2(a2, a1)), rtol=1e-12)
    # axis wrap: 179° and 1° are the same orientation; the shared axis stays near 0/180
    su, sv, sa = share_astigmatism([1000.0, 1000.0], [900.0, 900.0], [179.0, 1.0], ["m", "m"])
    assert np.allclose(su - sv, 100.0 * np.cos(np.deg2rad(2.0)))
    assert np.allclose(sa, 0.0, atol=1e-9)


def test_shared_astigmatism_relion(shared_real: Path, tmp_path: Path) -> None:
    src = shared_real / "cryodrgn" / "relion31.star"
    t0 = _read_blocks(src)["particles"]
    assert t0.rlnMicrographName.nunique() == 1 and t0.rlnDefocusU.nunique() == len(t0)
    for flag, shared in (("--per-particle", False), ("--shared-astigmatism", True)):
        out = tmp_path / f"{flag}.star"
        r = invoke(src, "--mag-matrix", *M_ARGS, "--out", out, flag)
        assert r.exit_code == 0, r.output
        t1 = _read_blocks(out)["particles"]
        astig = (t1.rlnDefocusU - t1.rlnDefocusV).to_numpy()
        spread = np.ptp(astig)
        if shared:
            assert spread < 3e-6 and np.ptp(t1.rlnDefocusAngle) < 2e-6
        else:
            assert spread > 1.0  # anisomag adds astigmatism in proportion to each defocus
    # each particle keeps its own transformed mean defocus
    _, per = apply_to_relion(None, t0, M_GENERAL)
    _, sh = apply_to_relion(None, t0, M_GENERAL, shared_astigmatism=True)
    assert np.allclose(
        per.rlnDefocusU + per.rlnDefocusV, sh.rlnDefocusU + sh.rlnDefocusV, rtol=1e-14
    )


def test_shared_astigmatism_cryosparc(shared_real: Path) -> None:
    arr = read_cs(shared_real / "cryodrgn" / "cryosparc_P12_J24_001_particles.cs").array
    # give every particle a micrograph (10 micrographs) and its own defocus
    rng = np.random.default_rng(5)
    descr = [*arr.dtype.descr, ("location/micrograph_uid", "<u8")]
    a = np.zeros(arr.shape, dtype=descr)
    for n in arr.dtype.names:
        a[n] = arr[n]
    a["location/micrograph_uid"] = np.arange(len(a)) % 10
    shift = rng.uniform(-500, 500, len(a)).astype(np.float32)
    a["ctf/df1_A"] += shift
    a["ctf/df2_A"] += shift
    per = apply_to_cryosparc(a, M_GENERAL)
    sh = apply_to_cryosparc(a, M_GENERAL, shared_astigmatism=True)
    for out, shared in ((per, False), (sh, True)):
        for mic in range(10):
            rows = out[a["location/micrograph_uid"] == mic]
            astig = rows["ctf/df1_A"].astype(float) - rows["ctf/df2_A"].astype(float)
            if shared:
                assert np.ptp(astig) < 0.02  # float32 rounding of ~45000 Å
                assert np.ptp(rows["ctf/df_angle_rad"]) < 1e-5
            else:
                assert np.ptp(astig) > 1.0
    with pytest.raises(InputError, match="location/micrograph_uid"):
        apply_to_cryosparc(arr, M_GENERAL, shared_astigmatism=True)


# =========================================================================== cryoSPARC
@pytest.mark.parametrize("name", CS_FILES)
def test_real_cs_read_write_is_byte_identical(shared_real: Path, tmp_path: Path, name) -> None:
    cs = read_cs(shared_real / name)
    write_cs(tmp_path / "same.cs", cs.array, header=cs.header)
    assert (tmp_path / "same.cs").read_bytes() == (shared_real / name).read_bytes()
    np.save(tmp_path / "np.npy", cs.array)  # and numpy reads what we read
    assert np.array_equal(np.load(tmp_path / "np.npy"), cs.array)


@pytest.mark.parametrize("name", CS_FILES)
def test_real_cs_apply_keeps_every_other_field(shared_real: Path, tmp_path: Path, name) -> None:
    src = shared_real / name
    raw = src.read_bytes()
    out = tmp_path / "out.cs"
    r = invoke(src, "--mag-matrix", *M_ARGS, "--out", out)
    assert r.exit_code == 0, r.output
    assert src.read_bytes() == raw
    a0, a1 = read_cs(src).array, read_cs(out).array
    had = "ctf/anisomag" in a0.dtype.names
    if had:
        assert a1.dtype == a0.dtype and a1.dtype.descr == a0.dtype.descr
        assert out.read_bytes()[: len(read_cs(src).header)] == read_cs(src).header
    else:
        assert "added the ctf/anisomag field" in r.stdout
        names = list(a1.dtype.names)
        assert names.index("ctf/anisomag") == names.index("ctf/scale_const") + 1
        assert [n for n in names if n != "ctf/anisomag"] == list(a0.dtype.names)
    for n in a0.dtype.names:
        assert a1.dtype[n] == a0.dtype[n], n
        if n in CRYOSPARC_DEFOCUS_FIELDS or n == "ctf/anisomag":
            continue
        assert a1[n].tobytes() == a0[n].tobytes(), n  # bit-identical
    # anisomag holds (M^-1 - I), row-major, float32
    expected = (np.linalg.inv(M_GENERAL.array) - np.eye(2)).reshape(4).astype(np.float32)
    assert np.array_equal(a1["ctf/anisomag"], np.tile(expected, (len(a1), 1)))
    assert np.all(a1["ctf/df1_A"] >= a1["ctf/df2_A"])
    ang = a1["ctf/df_angle_rad"].astype(float)
    assert np.all((ang >= 0) & (ang <= np.pi))
    # quadratic-form identity through the file (float32 precision)
    d_obs = dmat(a0["ctf/df1_A"], a0["ctf/df2_A"], np.rad2deg(a0["ctf/df_angle_rad"]))
    d_true = dmat(a1["ctf/df1_A"], a1["ctf/df2_A"], np.rad2deg(a1["ctf/df_angle_rad"]))
    m = M_GENERAL.array
    for k in np.random.default_rng(0).normal(size=(4, 2)):
        kt = m @ k
        lhs = d_obs[:, 0] * k[0] ** 2 + 2 * d_obs[:, 1] * k[0] * k[1] + d_obs[:, 2] * k[1] ** 2
        rhs = (
            d_true[:, 0] * kt[0] ** 2 + 2 * d_true[:, 1] * kt[0] * kt[1] + d_true[:, 2] * kt[1] ** 2
        )
        assert np.allclose(rhs, lhs, rtol=1e-6)
    # the exact inverse (each row's own anisomag): back within 1e-6 relative
    back = undo_cryosparc(a1, drop_anisomag=not had)
    assert back.dtype == a0.dtype
    assert not np.any(back["ctf/anisomag"]) if had else True
    u0, v0 = a0["ctf/df1_A"].astype(float), a0["ctf/df2_A"].astype(float)
    assert np.allclose(back["ctf/df1_A"], u0, rtol=1e-6, atol=0)
    assert np.allclose(back["ctf/df2_A"], v0, rtol=1e-6, atol=0)
    assert_same_defocus(
        u0,
        v0,
        np.rad2deg(a0["ctf/df_angle_rad"]),
        back["ctf/df1_A"],
        back["ctf/df2_A"],
        np.rad2deg(back["ctf/df_angle_rad"]),
        1e-6,
    )
    for n in a0.dtype.names:
        if n not in CRYOSPARC_DEFOCUS_FIELDS:
            assert back[n].tobytes() == a0[n].tobytes(), n


def test_cs_exposure_group_selection(shared_real: Path) -> None:
    arr = read_cs(shared_real / "cryodrgn" / "empiar_10076_7.cs").array.copy()
    arr["ctf/exp_group_id"][:3] = 5
    new = apply_to_cryosparc(arr, M_GENERAL, exposure_groups=[5])
    assert np.any(new["ctf/df1_A"][:3] != arr["ctf/df1_A"][:3])
    assert new[3:].tobytes() == arr[3:].tobytes()
    assert np.all(new["ctf/anisomag"][3:] == 0) and np.all(new["ctf/anisomag"][:3] != 0)
    with pytest.raises(InputError, match=r"exposure group\(s\) \[9\]"):
        apply_to_cryosparc(arr, M_GENERAL, exposure_groups=[9])


def test_with_anisomag_field_keeps_big_endian() -> None:
    a = np.zeros(2, dtype=[("uid", ">u8"), ("ctf/df1_A", ">f4"), ("blob/idx", ">u4")])
    b = with_anisomag_field(a)
    assert b.dtype.names == ("uid", "ctf/df1_A", "ctf/anisomag", "blob/idx")
    assert b.dtype["ctf/anisomag"].base == np.dtype(">f4")


# =========================================================================== refusals
def _one_line_error(r, *needles: str) -> None:
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.mark.parametrize("name", ["cryodrgn/relion31.6opticsgroups.star", "cryodrgn/relion5.star"])
def test_refuses_table_with_a_magnification_matrix(shared_real: Path, tmp_path, name) -> None:
    src = shared_real / name
    blocks = _read_blocks(src)
    with pytest.raises(InputError, match="already carry a magnification matrix"):
        apply_to_relion(blocks["optics"], blocks["particles"], M_GENERAL)
    out = tmp_path / "x.star"
    r = invoke(src, "--mag-matrix", *M_ARGS, "--out", out)
    _one_line_error(r, "already carry a magnification matrix", "true frame")
    assert not out.exists()


def test_refuses_nonzero_anisomag(shared_real: Path, tmp_path: Path) -> None:
    cs = read_cs(shared_real / "cryodrgn" / "cryosparc_J2_particles_exported.cs")
    a = cs.array.copy()
    a["ctf/anisomag"][4] = [0.01, 0.0, 0.0, -0.01]
    with pytest.raises(InputError, match="already carry a non-zero ctf/anisomag"):
        apply_to_cryosparc(a, M_GENERAL)
    src = tmp_path / "with_mag.cs"
    write_cs(src, a, header=cs.header)
    r = invoke(src, "--mag-matrix", *M_ARGS, "--out", tmp_path / "x.cs")
    _one_line_error(r, "row 5", "ctf/anisomag")
    # applying twice is the same refusal
    ok = tmp_path / "ok.cs"
    assert (
        invoke(
            shared_real / "cryodrgn" / "empiar_10076_7.cs", "--mag-matrix", *M_ARGS, "--out", ok
        ).exit_code
        == 0
    )
    _one_line_error(
        invoke(ok, "--mag-matrix", *M_ARGS, "--out", tmp_path / "twice.cs"), "already carry"
    )


def test_refuses_out_equal_to_input(shared_real: Path, tmp_path: Path) -> None:
    for name in ("cryodrgn/relion31.star", "cryodrgn/empiar_10076_7.cs"):
        src = tmp_path / Path(name).name
        shutil.copy(shared_real / name, src)
        raw = src.read_bytes()
        _one_line_error(invoke(src, "--mag-matrix", *M_ARGS, "--out", src), "names the input")
        link = tmp_path / ("link" + src.suffix)
        link.symlink_to(src)
        _one_line_error(invoke(src, "--mag-matrix", *M_ARGS, "--out", link), "names the input")
        assert src.read_bytes() == raw
        with pytest.raises(InputError, match="names the input"):
            run_apply(src, tmp_path / "." / src.name, M_GENERAL)


def test_refuses_missing_defocus(shared_real: Path, tmp_path: Path) -> None:
    src = shared_real / "relion_tutorial_metadata" / "corrected_micrographs.star"
    _one_line_error(
        invoke(src, "--mag-matrix", *M_ARGS, "--out", tmp_path / "x.star"), "_rlnDefocusU"
    )
    blocks = _read_blocks(shared_real / "cryodrgn" / "relion31.star")
    with pytest.raises(InputError, match="lacks _rlnDefocusV"):
        apply_to_relion(
            blocks["optics"], blocks["particles"].drop(columns="rlnDefocusV"), M_GENERAL
        )
    # a STAR whose table has U but not V
    text = (shared_real / "cryodrgn" / "empiar_10076_7.star").read_text()
    bad = tmp_path / "noV.star"
    bad.write_text(text.replace("_rlnDefocusV", "_rlnSomethingElse"))
    _one_line_error(
        invoke(bad, "--mag-matrix", *M_ARGS, "--out", tmp_path / "y.star"), "lacks _rlnDefocusV"
    )
    # a .cs without ctf/ fields (as a particles.cs whose CTF sits in the passthrough file)
    arr = read_cs(shared_real / "cryodrgn" / "empiar_10076_7.cs").array
    keep = [n for n in arr.dtype.names if not n.startswith("ctf/")]
    slim = np.zeros(arr.shape, dtype=[(n, arr.dtype[n]) for n in keep])
    for n in keep:
        slim[n] = arr[n]
    src = tmp_path / "noctf.cs"
    write_cs(src, slim)
    _one_line_error(
        invoke(src, "--mag-matrix", *M_ARGS, "--out", tmp_path / "z.cs"), "ctf/df1_A", "passthrough"
    )
    with pytest.raises(InputError, match="ctf/df1_A"):
        require_fields(slim, CRYOSPARC_DEFOCUS_FIELDS)


def test_refuses_unreadable_cs(shared_real: Path, tmp_path: Path) -> None:
    raw = (shared_real / "cryodrgn" / "empiar_10076_7.cs").read_bytes()
    cases = {
        "truncated.cs": (raw[:-10], "truncated"),
        "header.cs": (raw[:40], "header"),
        "empty.cs": (b"", "empty file"),
        "csdat.cs": (CSDAT_MAGIC + b"\x00" * 40, "CSDAT"),
        "trailing.cs": (raw + b"xx", "unexpected bytes"),
    }
    for name, (data, needle) in cases.items():
        p = tmp_path / name
        p.write_bytes(data)
        with pytest.raises(InputError, match=needle):
            read_cs(p)
        if name != "empty.cs":  # an empty file is taken for a STAR file by the command
            _one_line_error(invoke(p, "--mag-matrix", *M_ARGS, "--out", tmp_path / "o.cs"), needle)
    p = tmp_path / "objects.npy"
    np.save(p, np.array([(1, "x")], dtype=[("uid", "<u8"), ("blob/path", "O")]), allow_pickle=True)
    with pytest.raises(InputError, match="Python objects"):
        read_cs(p)
    with pytest.raises(InputError, match="file not found"):
        read_cs(tmp_path / "missing.cs")


def test_command_options(shared_real: Path, tmp_path: Path) -> None:
    src = shared_real / "cryodrgn" / "relion31.star"
    _one_line_error(invoke(src, "--out", tmp_path / "a.star"), "exactly one of")
    det = tmp_path / "det.json"
    det.write_text(json.dumps({"mag_matrix": [list(r) for r in M_GENERAL.matrix], "n": 3}))
    _one_line_error(
        invoke(src, "--mag-matrix", *M_ARGS, "--from-json", det, "--out", tmp_path / "b.star"),
        "exactly one of",
    )
    out_json = tmp_path / "json.star"
    r = invoke(src, "--from-json", det, "--out", out_json)
    assert r.exit_code == 0, r.output
    out_args = tmp_path / "args.star"
    assert invoke(src, "--mag-matrix", *M_ARGS, "--out", out_args).exit_code == 0
    assert out_json.read_bytes() == out_args.read_bytes()
    line = r.stdout.strip()
    assert "\n" not in line and "5 of 5 rows" in line
    assert "anisotropy 1.500 % along" in line
    assert load_detect_json(det) == M_GENERAL
    bad = tmp_path / "bad.json"
    for text, needle in (
        ("{", "not valid JSON"),
        ('{"x": 1}', "mag_matrix"),
        ('{"mag_matrix": [[1, 0], [0, -1]]}', "not a valid"),
    ):
        bad.write_text(text)
        _one_line_error(invoke(src, "--from-json", bad, "--out", tmp_path / "c.star"), needle)
    _one_line_error(
        invoke(src, "--mag-matrix", 1, 0, 0, 0, "--out", tmp_path / "d.star"), "--mag-matrix"
    )
    _one_line_error(
        invoke(src, "--mag-matrix", *M_ARGS, "--out", tmp_path / "no" / "e.star"),
        "output directory does not exist",
    )
    _one_line_error(invoke(src, "--mag-matrix", *M_ARGS, "--out", tmp_path / "f.cs"), ".cs")
    _one_line_error(
        invoke(tmp_path / "missing.star", "--mag-matrix", *M_ARGS, "--out", tmp_path / "g.star"),
        "file not found",
    )
    q = invoke(src, "--mag-matrix", *M_ARGS, "--out", tmp_path / "h.star", "-q")
    assert q.exit_code == 0 and q.stdout == "" and q.stderr == ""


def test_star_text_edge_cases(tmp_path: Path) -> None:
    """CRLF endings, quoted names, no final newline, simple (non-loop) blocks are kept."""
    crlf = tmp_path / "crlf.star"
    crlf.write_bytes(
        b"data_\r\nloop_\r\n_rlnMicrographName #1\r\n_rlnDefocusU #2\r\n_rlnDefocusV #3\r\n"
        b"_rlnDefocusAngle #4\r\n\"my mic.mrc\" 20000 19000 10\r\n'x y' 21000 19000 -10"
    )
    out = tmp_path / "crlf_out.star"
    r = invoke(crlf, "--mag-matrix", *M_ARGS, "--out", out)
    assert r.exit_code == 0, r.output
    lines = out.read_bytes().split(b"\r\n")
    assert lines[:6] == crlf.read_bytes().split(b"\r\n")[:6]
    assert lines[6].startswith(b'"my mic.mrc" ') and lines[7].startswith(b"'x y' ")
    assert not out.read_bytes().endswith(b"\n")
    t1 = starfile.read(out)
    assert list(t1.rlnMicrographName) == ["my mic.mrc", "x y"]
    simple = tmp_path / "simple.star"
    simple.write_text(
        "# one micrograph\ndata_optics\n\n_rlnOpticsGroup 1\n_rlnVoltage 300.0\n\n"
        "data_micrographs\n\n_rlnMicrographName a.mrc\n_rlnOpticsGroup 1\n"
        "_rlnDefocusU 20000.0\n_rlnDefocusV 19000.0\n_rlnDefocusAngle 45.0\n"
    )
    out = tmp_path / "simple_out.star"
    assert invoke(simple, "--mag-matrix", *M_ARGS, "--out", out).exit_code == 0
    after = starfile.read(out, always_dict=True)
    m = MagMat([[after["optics"][f"rlnMagMat{i}{j}"] for j in (0, 1)] for i in (0, 1)])
    assert np.array_equal(m.array, M_GENERAL.array)
    expected = defocus_table_to_observed([20000.0], [19000.0], [45.0], M_GENERAL.inverse())
    got = [after["micrographs"][c] for c in RELION_DEFOCUS_COLUMNS]
    assert np.allclose(got, np.ravel(expected), rtol=0, atol=1e-6)
    assert out.read_text().startswith("# one micrograph\ndata_optics\n\n_rlnOpticsGroup 1\n")
    # two CTF tables in one file: refused rather than half rewritten
    both = tmp_path / "both.star"
    text = simple.read_text().split("data_micrographs")[1]
    both.write_text(simple.read_text() + "\ndata_particles" + text)
    _one_line_error(
        invoke(both, "--mag-matrix", *M_ARGS, "--out", tmp_path / "b.star"), "one CTF table"
    )
