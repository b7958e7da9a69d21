"""``--mag-from``: a refinement's matrices given to micrograph CTF estimation, per optics group.

Real sources: the 6-optics-group RELION 3.1 STAR of cryoDRGN's tests (group numbers and names
in different orders: group 1 is 'opticsGroup5'), RELION 5 CtfRefine's own refined STAR
(``_rlnMagMat`` 1.002518 −0.00556 −0.00572 0.998475), and cryoSPARC's exported J2 particles
(``ctf/anisomag`` zero; an anisotropic copy with two exposure groups is written here).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import starfile

from anisoctf.errors import InputError, UsageError
from anisoctf.io.cryosparc import read_cs, write_cs
from anisoctf.jobs.apply_tables import matrix_from_options
from anisoctf.jobs.inputs import resolve_inputs
from anisoctf.jobs.mag_from import assign_matrices, read_mag_source, single_matrix
from anisoctf.jobs.simulate_micrographs import write_specs
from anisoctf.optics.ctf import CTFParams, Optics
from anisoctf.optics.magmat import MagMat, from_relion, to_cryosparc_anisomag
from anisoctf.simulate.micrograph import MicrographSpec

CTFREFINE = ("1.002518", "-0.00556", "-0.00572", "0.998475")
_ONE_THREAD = {k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}


@pytest.fixture(scope="module")
def six(shared_real) -> Path:
    return shared_real / "cryodrgn" / "relion31.6opticsgroups.star"


@pytest.fixture(scope="module")
def refined(shared_real) -> Path:
    p = (
        shared_real.parent
        / "relion_ctfrefine"
        / "relion"
        / "pass2_aniso"
        / "particles_ctf_refine.star"
    )
    if not p.is_file():
        pytest.skip(f"{p} not found")
    return p


@pytest.fixture(scope="module")
def j2(shared_real) -> Path:
    return shared_real / "cryodrgn" / "cryosparc_J2_particles_exported.cs"


def _micrographs_star(path: Path, groups: list[tuple[int, str | None]]) -> Path:
    named = all(n is not None for _, n in groups)
    head = "_rlnOpticsGroupName\n" if named else ""
    rows = "\n".join((f"{n} " if named else "") + f"{g} 1.0 300 2.7 0.07 1.0" for g, n in groups)
    mics = "\n".join(f"mics/m{g}_{i}.mrc {g}" for g, _ in groups for i in range(2))
    path.write_text(
        f"data_optics\n\nloop_\n{head}_rlnOpticsGroup\n_rlnMicrographOriginalPixelSize\n"
        "_rlnVoltage\n_rlnSphericalAberration\n_rlnAmplitudeContrast\n_rlnMicrographPixelSize\n"
        f"{rows}\n\ndata_micrographs\n\nloop_\n_rlnMicrographName\n_rlnOpticsGroup\n{mics}\n"
    )
    return path


def test_six_groups_are_matched_by_name_not_number(six, tmp_path):
    star = _micrographs_star(tmp_path / "mics.star", [(g, f"opticsGroup{g}") for g in range(1, 7)])
    r = resolve_inputs([str(star)], mag_from=str(six))
    table = starfile.read(six, always_dict=True)["optics"]
    for g in range(1, 7):
        src = table[table["rlnOpticsGroupName"] == f"opticsGroup{g}"].iloc[0]
        want = [src[f"rlnMagMat{ij}"] for ij in ("00", "01", "10", "11")]
        got = [x for row in r.optics[g].mag_matrix for x in row]
        assert got == want  # exact: the STAR's own numbers
    # micrographs' group 1 'opticsGroup1' is the source's group 4
    line = next(x for x in r.provenance if x.startswith("optics group 1 "))
    assert (
        "(2 micrographs: mics/m1_0.mrc, mics/m1_1.mrc)" in line
        and "optics group 4 'opticsGroup1'" in line
    )
    assert "matched by optics-group name" in line
    assert r.optics[1].mag_matrix == ((1.020955, 0.012392), (0.01307, 1.019583))


def test_without_names_groups_are_matched_by_number(six, tmp_path):
    star = _micrographs_star(tmp_path / "mics.star", [(1, None), (6, None)])
    r = resolve_inputs([str(star)], mag_from=str(six))
    assert r.optics[1].mag_matrix == ((1.011472, 0.004231), (0.00456, 1.008858))
    assert r.optics[6].mag_matrix == ((1.006131, -0.00887), (-0.00768, 0.999765))
    assert any("matched by optics-group number" in x for x in r.provenance)


def test_unmatched_or_ambiguous_groups_are_refused(six, tmp_path):
    star = _micrographs_star(tmp_path / "mics.star", [(7, None)])
    with pytest.raises(UsageError, match="no matrix for the micrographs' optics group 7") as e:
        resolve_inputs([str(star)], mag_from=str(six))
    assert "\n" not in str(e.value) and "--mag-matrix" in str(e.value)
    star = _micrographs_star(tmp_path / "named.star", [(1, "other")])
    with pytest.raises(UsageError, match="no optics group named 'other'"):
        resolve_inputs([str(star)], mag_from=str(six))
    with pytest.raises(UsageError, match="MRC inputs have no optics groups"):
        resolve_inputs([str(tmp_path / "x.mrc")], apix=1.0, kv=300, mag_from=str(six))
    with pytest.raises(UsageError, match="only one of --mag-matrix and --mag-from"):
        resolve_inputs([str(star)], mag_from=str(six), mag_matrix=np.eye(2))
    with pytest.raises(UsageError, match="6 different matrices"):
        single_matrix(six)


def test_one_matrix_goes_to_every_group(refined, tmp_path):
    star = _micrographs_star(tmp_path / "mics.star", [(1, "a"), (2, "b")])
    r = resolve_inputs([str(star)], mag_from=str(refined))
    want = from_relion(*(float(x) for x in CTFREFINE)).matrix
    assert r.optics[1].mag_matrix == want and r.optics[2].mag_matrix == want
    assert sum("the source's only matrix" in x for x in r.provenance) == 2
    # and aniso apply / correct take it as their one matrix
    assert matrix_from_options(None, None, refined).matrix == want


def _anisotropic_j2(j2: Path, out: Path, mats: dict[int, MagMat], groups: bool = True) -> Path:
    arr = read_cs(j2).array.copy()
    n = len(arr)
    ids = np.arange(n) % len(mats)
    arr["ctf/exp_group_id"] = ids
    for e, m in mats.items():
        arr["ctf/anisomag"][ids == e] = to_cryosparc_anisomag(m).astype(np.float32)
    if not groups:
        names = [x for x in arr.dtype.names if x != "ctf/exp_group_id"]
        arr = arr[names]
        arr = np.array(arr.tolist(), dtype=[(x, arr.dtype[x]) for x in names])
    write_cs(out, arr)
    return out


def test_cryosparc_anisomag_by_exposure_group(j2, tmp_path):
    m0, m1 = MagMat.from_anisotropy(1.5, 30.0), MagMat.from_anisotropy(0.8, 120.0, 1.002)
    cs = _anisotropic_j2(j2, tmp_path / "p.cs", {0: m0, 1: m1})
    src = read_mag_source(cs)
    assert sorted(src.matrices) == [1, 2]  # exp_group_id 0, 1 → RELION groups 1, 2
    # float32 storage: 1e-7 relative
    assert np.allclose(src.matrices[1].array, m0.array, atol=2e-7)
    assert np.allclose(src.matrices[2].array, m1.array, atol=2e-7)
    star = _micrographs_star(tmp_path / "mics.star", [(1, None), (2, None)])
    r = resolve_inputs([str(star)], mag_from=str(cs))
    assert np.allclose(r.optics[2].mag_matrix, m1.array, atol=2e-7)
    assert any("exp_group_id 1" in x and "optics group 2 " in x for x in r.provenance)
    # the real exported file: ctf/anisomag zero → identity
    assert read_mag_source(j2).matrices == {1: MagMat.identity()}


def test_cryosparc_several_matrices_without_group_ids_are_refused(j2, tmp_path):
    mats = {0: MagMat.from_anisotropy(1.5, 30.0), 1: MagMat.from_anisotropy(0.8, 120.0)}
    cs = _anisotropic_j2(j2, tmp_path / "p.cs", mats, groups=False)
    with pytest.raises(UsageError, match="no ctf/exp_group_id") as e:
        read_mag_source(cs)
    assert "\n" not in str(e.value)


def test_refine_json_and_bad_sources(tmp_path):
    m = MagMat.from_anisotropy(1.0, 10.0)
    p = tmp_path / "anisomag_group2.json"
    p.write_text(json.dumps({"optics_group": 2, "mag_matrix": [list(r) for r in m.matrix]}))
    src = read_mag_source(p)
    assert src.matrices == {2: m}
    mats, lines = assign_matrices(src, [1, 2, 2])
    assert mats == {1: m, 2: m} and "(2 micrographs)" in lines[1]
    bad = tmp_path / "x.txt"
    bad.write_text("")
    with pytest.raises(UsageError, match="give a RELION refined particles .star"):
        read_mag_source(bad)
    nomag = tmp_path / "n.star"
    nomag.write_text("data_optics\n\nloop_\n_rlnOpticsGroup\n_rlnVoltage\n1 300\n")
    with pytest.raises(InputError, match="no _rlnMagMat"):
        read_mag_source(nomag)


def _cli(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "anisoctf.cli.main", *(str(a) for a in args)],
        capture_output=True, text=True, cwd=cwd, env={**os.environ, **_ONE_THREAD},
        timeout=600, check=False,
    )  # fmt: skip


def test_estimate_with_mag_from_equals_mag_matrix(refined, tmp_path):
    # a micrograph simulated with CtfRefine's refined matrix: --mag-from the refined STAR gives
    # exactly what --mag-matrix with its numbers gives, and the true-frame defocus
    m = from_relion(*(float(x) for x in CTFREFINE))
    spec = MicrographSpec(
        shape=(1024, 1024),
        optics=Optics(pixel_size=1.0, mag_matrix=m.matrix),
        ctf=CTFParams(15500.0, 14500.0, 70.0, 0.0, 60.0),
        snr=1.5,
        seed=5,
    )
    write_specs([spec], tmp_path, prefix="sim")
    common = ("estimate", "sim_001.mrc", "--apix", "1.0", "--kv", "300", "--cs", "2.7",
              "--ac", "0.07", "-q")  # fmt: skip
    a = _cli(*common, "--out", "a", "--mag-matrix", *CTFREFINE, cwd=tmp_path)
    b = _cli(*common, "--out", "b", "--mag-from", refined, cwd=tmp_path)
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    ra = starfile.read(tmp_path / "a" / "micrographs_ctf.star", always_dict=True)
    rb = starfile.read(tmp_path / "b" / "micrographs_ctf.star", always_dict=True)
    # every number identical (only the image path names the output folder)
    ma, mb = (r["micrographs"].drop(columns="rlnCtfImage") for r in (ra, rb))
    assert ma.equals(mb)
    assert ra["optics"].equals(rb["optics"])
    row = rb["micrographs"].iloc[0]
    print(f"\n--mag-from: U {row['rlnDefocusU']:.1f} V {row['rlnDefocusV']:.1f} (15500/14500)")
    assert abs(row["rlnDefocusU"] - 15500.0) < 20 and abs(row["rlnDefocusV"] - 14500.0) < 20
