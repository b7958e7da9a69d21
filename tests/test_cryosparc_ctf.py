"""cryoSPARC exposures/particles ``.cs`` as input, CTF results as ``.cs`` output."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest

from anisoctf.fit.result import FitSettings
from anisoctf.io.cryosparc import read_cs
from anisoctf.io.cryosparc_ctf import (
    CTF_FIELDS,
    ctf_results_array,
    name_uid,
    read_cs_micrographs,
    write_ctf_cs,
)
from anisoctf.io.star import MicrographCTFRow, read_micrographs_ctf_star
from anisoctf.jobs.estimate_micrographs import CS_NAME, run_estimate
from anisoctf.jobs.simulate_micrographs import SimulationOptions, run_simulate
from anisoctf.optics.ctf import Optics
from anisoctf.optics.magmat import from_cryosparc_anisomag


def test_real_particles_cs_gives_stacks_and_optics(shared_real: Path) -> None:
    found = read_cs_micrographs(shared_real / "cryodrgn" / "empiar_10076_7.cs")
    assert found.kind == "particles"
    assert [m.name for m in found.micrographs] == ["empiar_10076_7.mrc"]
    assert found.micrographs[0].path.is_file()  # resolved next to the .cs file
    (o,) = found.optics.values()
    assert (o.pixel_size, o.voltage_kv, o.cs_mm, o.amplitude_contrast) == (1.31, 300, 2.7, 0.07)

    big = shared_real / "cryodrgn" / "cryosparc_P12_J24_001_particles.cs"
    arr = read_cs(big).array
    found = read_cs_micrographs(big)
    assert len(found.micrographs) == len(np.unique(arr["blob/path"]))
    assert {(o.voltage_kv, o.cs_mm, o.pixel_size) for o in found.optics.values()} == {
        (200.0, 2.0, 2.95)
    }
    first = arr[arr["blob/path"] == found.micrographs[0].name.encode()]
    assert found.micrographs[0].uid == int(first["uid"][0])


def test_output_fields_have_the_real_cryosparc_types(shared_real: Path) -> None:
    real = read_cs(shared_real / "cryodrgn" / "cryosparc_J2_particles_exported.cs").array
    row = MicrographCTFRow("J3/motioncorrected/a.mrc", 1, "", 15301.1, 14916.4, 5.28, 0.1, 3.5)
    out = ctf_results_array([row], {1: Optics(pixel_size=1.31)})
    shared = [f[0] for f in CTF_FIELDS if f[0] in real.dtype.names]
    assert len(shared) == len(CTF_FIELDS) - 1  # all but ctf/ctf_fit_to_A (exposure-only)
    for name in shared:
        assert out.dtype[name] == real.dtype[name], name
    assert out["ctf/df1_A"][0] == np.float32(15301.1)
    assert out["ctf/df_angle_rad"][0] == np.float32(math.radians(5.28))
    assert out["uid"][0] == name_uid("J3/motioncorrected/a.mrc")
    assert not out["ctf/anisomag"].any()


def test_anisomag_round_trip_and_file(tmp_path: Path) -> None:
    m = np.array([[1.012, 0.004], [0.004, 0.991]])
    optics = {3: Optics(pixel_size=0.85, mag_matrix=tuple(map(tuple, m)))}
    rows = [MicrographCTFRow(f"m{i}.mrc", 3, "", 1e4 + i, 9e3, 30.0, 0.1, 4.0) for i in range(3)]
    write_ctf_cs(tmp_path / "r.cs", rows, optics, uids={"m1.mrc": 42})
    back = read_cs(tmp_path / "r.cs").array
    assert list(back["uid"][:2]) == [name_uid("m0.mrc"), 42]
    np.testing.assert_allclose(
        from_cryosparc_anisomag(back["ctf/anisomag"][0]).matrix, m, atol=1e-6
    )
    assert list(back["ctf/exp_group_id"]) == [0, 0, 0]


def _exposures_cs(path: Path, names: list[str], psize: float) -> None:
    """An exposures dataset with cryoSPARC's field layout (cryosparc-tools' exposure fields)."""
    width = max(len(n) for n in names)
    dtype = np.dtype(
        [
            ("uid", "<u8"),
            ("mscope_params/accel_kv", "<f4"),
            ("mscope_params/cs_mm", "<f4"),
            ("mscope_params/exp_group_id", "<u4"),
            ("micrograph_blob/path", f"S{width}"),
            ("micrograph_blob/idx", "<u4"),
            ("micrograph_blob/shape", "<u4", (2,)),
            ("micrograph_blob/psize_A", "<f4"),
        ]
    )
    arr = np.zeros(len(names), dtype=dtype)
    arr["uid"] = np.arange(len(names)) + 1000
    arr["mscope_params/accel_kv"] = 300
    arr["mscope_params/cs_mm"] = 2.7
    arr["micrograph_blob/path"] = [n.encode() for n in names]
    arr["micrograph_blob/psize_A"] = psize
    buf = io.BytesIO()
    np.save(buf, arr)
    path.write_bytes(buf.getvalue())


def test_estimate_from_exposures_cs_writes_ctf_cs(tmp_path: Path, monkeypatch) -> None:
    project = tmp_path / "P1"
    opts = SimulationOptions(n=3, size=512, apix=1.0, df_range=(9000.0, 14000.0), seed=31)
    run_simulate(opts, project / "J2" / "motioncorrected", "mic")
    names = [f"J2/motioncorrected/mic_{i:03d}.mrc" for i in range(1, 4)]
    _exposures_cs(project / "J2" / "J2_exposures.cs", names, 1.0)
    monkeypatch.chdir(tmp_path)  # not the project dir: paths resolve from the .cs location
    report = run_estimate(
        [str(project / "J2" / "J2_exposures.cs")], tmp_path / "out", FitSettings(box=128),
        quiet=True,
    )  # fmt: skip
    assert report.n_ok >= 2
    rows, _ = read_micrographs_ctf_star(tmp_path / "out" / "micrographs_ctf.star")
    cs = read_cs(tmp_path / "out" / CS_NAME).array
    assert (tmp_path / "out" / CS_NAME).with_suffix(".csg").is_file()  # for Import Result Group
    assert [r.name for r in rows] == [n.decode() for n in cs["micrograph_blob/path"]]
    uid_of = {n: 1000 + i for i, n in enumerate(names)}
    assert list(cs["uid"]) == [uid_of[r.name] for r in rows]
    np.testing.assert_array_equal(cs["ctf/df1_A"], np.float32([r.defocus_u for r in rows]))
    np.testing.assert_array_equal(cs["ctf/df2_A"], np.float32([r.defocus_v for r in rows]))


def test_cs_without_paths_is_one_line(tmp_path: Path) -> None:
    from anisoctf.errors import InputError

    arr = np.zeros(2, dtype=[("uid", "<u8"), ("ctf/df1_A", "<f4")])
    buf = io.BytesIO()
    np.save(buf, arr)
    (tmp_path / "x.cs").write_bytes(buf.getvalue())
    with pytest.raises(InputError, match="neither micrograph_blob/path"):
        read_cs_micrographs(tmp_path / "x.cs")


def test_estimate_from_real_particles_cs_matches_its_ctf(shared_real: Path, tmp_path: Path) -> None:
    """The 7 real EMPIAR-10076 particles (a ``.mrc`` stack named in ``blob/path``) are pooled
    as one stack; the defocus agrees with the file's own ``ctf/*`` within 150 Å."""
    src = shared_real / "cryodrgn" / "empiar_10076_7.cs"
    report = run_estimate([str(src)], tmp_path / "out", FitSettings(box=128), quiet=True)
    assert report.n_ok == 1
    ref = read_cs(src).array[0]
    row = report.results[0].row
    assert abs(row.defocus_u - float(ref["ctf/df1_A"])) < 150
    assert abs(row.defocus_v - float(ref["ctf/df2_A"])) < 150
    out = read_cs(tmp_path / "out" / CS_NAME).array
    assert int(out["uid"][0]) == int(ref["uid"])
