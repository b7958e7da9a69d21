"""cryoSPARC result groups (``.csg``) beside every ``.cs`` we write, checked with cryosparc-tools.

The ``.cs`` files are loaded with cryosparc-tools' own ``Dataset.load`` (the reader cryoSPARC's
Python tools use) and the ``.csg`` documents with PyYAML; the layout is the one cryoSPARC writes
beside an exported result (``group``/``type``, one ``results`` entry per field prefix with
``metafile`` ``'>name.cs'``, ``num_items`` and ``type`` ``<item>.<prefix>``).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pytest

from anisoctf.errors import InputError
from anisoctf.io.cryosparc import read_cs
from anisoctf.io.cryosparc_csg import (
    csg_path,
    group_type,
    result_group_text,
    results_of,
    write_cs_with_group,
)
from anisoctf.io.cryosparc_ctf import write_ctf_cs
from anisoctf.io.star import MicrographCTFRow
from anisoctf.optics.ctf import Optics

yaml = pytest.importorskip("yaml")
cstools = pytest.importorskip("cryosparc.dataset", reason="cryosparc-tools is not installed")


def _load_group(path: Path) -> dict:
    doc = yaml.safe_load(path.read_text())
    assert set(doc) == {"created", "group", "results", "version"}
    return doc


def _check_group_against_files(csg: Path, kind: str) -> dict:
    """Every result names a loadable .cs beside the .csg with its fields and row count."""
    doc = _load_group(csg)
    assert doc["group"]["type"] == kind
    for name, res in doc["results"].items():
        assert res["type"] == f"{kind}.{name}"
        assert res["metafile"].startswith(">")
        ds = cstools.Dataset.load(str(csg.parent / res["metafile"][1:]))
        assert len(ds) == res["num_items"]
        assert any(f.startswith(name + "/") for f in ds.fields()), name
    return doc


def _rows(n: int) -> list[MicrographCTFRow]:
    return [
        MicrographCTFRow(f"J3/motioncorrected/m{i}.mrc", 1 + i % 2, "", 1.2e4 + i, 1.1e4, 30.0,
                         0.1, 4.0)
        for i in range(n)
    ]  # fmt: skip


def test_micrographs_ctf_cs_has_an_exposure_group_cryosparc_tools_reads(tmp_path: Path) -> None:
    optics = {1: Optics(pixel_size=0.85, voltage_kv=200, cs_mm=1.4), 2: Optics(pixel_size=0.85)}
    rows = _rows(5)
    write_ctf_cs(tmp_path / "micrographs_ctf.cs", rows, optics)
    doc = _check_group_against_files(tmp_path / "micrographs_ctf.csg", "exposure")
    assert set(doc["results"]) == {"micrograph_blob", "mscope_params", "ctf"}
    assert {r["num_items"] for r in doc["results"].values()} == {5}
    ds = cstools.Dataset.load(str(tmp_path / "micrographs_ctf.cs"))
    # the values cryoSPARC reads: paths, defocus, and each exposure's microscope
    assert [p for p in ds["micrograph_blob/path"]] == [r.name for r in rows]
    np.testing.assert_array_equal(ds["ctf/df1_A"], np.float32([r.defocus_u for r in rows]))
    np.testing.assert_array_equal(ds["mscope_params/accel_kv"], [200, 300, 200, 300, 200])
    np.testing.assert_allclose(ds["mscope_params/cs_mm"], [1.4, 2.7, 1.4, 2.7, 1.4], rtol=1e-6)
    np.testing.assert_array_equal(ds["mscope_params/exp_group_id"], [0, 1, 0, 1, 0])
    np.testing.assert_array_equal(ds["ctf/exp_group_id"], ds["mscope_params/exp_group_id"])


def test_real_particles_cs_gets_a_particle_group(shared_real: Path, tmp_path: Path) -> None:
    """A real cryoSPARC particles dataset (alignments3D, blob, ctf, ...): each of its field
    prefixes is one result of type ``particle.<prefix>``, alignments passed through."""
    real = read_cs(shared_real / "cryodrgn" / "cryosparc_P12_J24_001_particles.cs")
    out = write_cs_with_group(tmp_path / "particles.cs", real.array, header=real.header)
    assert out == tmp_path / "particles.csg"
    doc = _check_group_against_files(out, "particle")
    prefixes = {f.split("/")[0] for f in real.fields if "/" in f}
    assert set(doc["results"]) == prefixes
    assert {"blob", "ctf", "alignments3D"} <= prefixes
    assert {r["num_items"] for r in doc["results"].values()} == {len(real)}
    # the .cs itself is byte-identical to the input (header reused, values unchanged)
    assert (tmp_path / "particles.cs").read_bytes() == real.path.read_bytes()


def test_group_text_layout_is_cryosparcs() -> None:
    arr = np.zeros(3, dtype=[("uid", "<u8"), ("blob/path", "S4"), ("ctf/df1_A", "<f4")])
    text = result_group_text(arr, "it's.cs", created=dt.datetime(2026, 12, 7, 12, 0, 0))
    assert text.splitlines()[0] == "created: 2026-12-07 12:00:00.000000"
    doc = yaml.safe_load(text)
    assert doc["group"]["name"] == "particles"
    assert doc["results"]["blob"] == {
        "metafile": ">it's.cs", "num_items": 3, "type": "particle.blob"
    }  # fmt: skip
    assert list(doc["results"]) == ["blob", "ctf"]  # field order, uid is not a result
    assert results_of(arr) == ["blob", "ctf"]


def test_a_dataset_that_is_neither_kind_is_refused_before_writing(tmp_path: Path) -> None:
    arr = np.zeros(2, dtype=[("uid", "<u8"), ("ctf/df1_A", "<f4")])
    with pytest.raises(ValueError, match="result group"):
        group_type(arr)
    with pytest.raises(ValueError, match="result group"):
        write_cs_with_group(tmp_path / "x.cs", arr)
    assert not (tmp_path / "x.cs").exists() and not csg_path(tmp_path / "x.cs").exists()


def test_compressed_csdat_cs_is_read_through_cryosparc_tools(
    shared_real: Path, tmp_path: Path
) -> None:
    """cryoSPARC's newer compressed stream format gives the same array as the NumPy format."""
    src = shared_real / "cryodrgn" / "cryosparc_J2_particles_exported.cs"
    plain = read_cs(src).array
    ds = cstools.Dataset.load(str(src))
    ds.save(str(tmp_path / "c.cs"), format=cstools.CSDAT_FORMAT)
    assert (tmp_path / "c.cs").read_bytes()[:6] == b"\x95CSDAT"
    back = read_cs(tmp_path / "c.cs").array
    assert set(back.dtype.names) == set(plain.dtype.names)
    for name in plain.dtype.names:
        np.testing.assert_array_equal(back[name], plain[name], err_msg=name)
    damaged = tmp_path / "d.cs"
    damaged.write_bytes((tmp_path / "c.cs").read_bytes()[:200])
    with pytest.raises(InputError, match="CSDAT"):
        read_cs(damaged)


def test_aniso_apply_writes_the_csg_beside_the_particles_cs(
    shared_real: Path, tmp_path: Path
) -> None:
    from anisoctf.jobs.apply_tables import ApplyRequest, apply_tables
    from anisoctf.optics.magmat import MagMat

    src = shared_real / "cryodrgn" / "cryosparc_P12_J24_001_particles.cs"
    mag = MagMat.from_anisotropy(1.5, 30.0)
    summary = apply_tables(ApplyRequest(table=src, out=tmp_path / "out.cs", mag=mag))
    assert any("out.csg" in n for n in summary.notes)
    doc = _check_group_against_files(tmp_path / "out.csg", "particle")
    assert {"blob", "ctf", "alignments3D"} <= set(doc["results"])
    ds = cstools.Dataset.load(str(tmp_path / "out.cs"))
    assert np.abs(ds["ctf/anisomag"]).max() > 1e-3  # the matrix went into the passed-on file
