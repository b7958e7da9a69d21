"""``anisoctf relion-external-refine``: refine as a RELION 4/5 External job (CtfRefine-like)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from anisoctf.cli.main import app
from anisoctf.errors import UsageError
from anisoctf.io.star_tables import read_star_blocks
from anisoctf.jobs.relion_external import FAILURE, OUTPUT_NODES, SUCCESS
from anisoctf.jobs.relion_external_refine import PARTICLES_NODE_TYPE, parse_refine_params
from anisoctf.jobs.simulate_particles import run_simulate_particles
from anisoctf.simulate.particles import ParticleSimSpec

runner = CliRunner()


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> tuple[Path, object]:
    root = tmp_path_factory.mktemp("relion_refine")
    spec = ParticleSimSpec(
        n=400, box=48, apix=1.5, n_micrographs=4, snr=2.0, anisotropy_percent=2.0,
        axis_deg=30.0, seed=9,
    )  # fmt: skip
    files = run_simulate_particles(spec, root / "Refine3D" / "job020")
    return root, files


def _run(root: Path, *args: str):
    cwd = os.getcwd()
    os.chdir(root)  # RELION runs External jobs from the project directory
    try:
        return runner.invoke(app, ["relion-external-refine", *args])
    finally:
        os.chdir(cwd)


def test_external_refine_writes_the_particles_node_and_success(project) -> None:
    root, files = project
    rel = lambda p: str(Path(p).relative_to(root))  # noqa: E731
    r = _run(root, "--o", "External/job031/", "--in_parts", rel(files.star),
             "--in_3dref", rel(files.reference), "--j", "1",
             "--fit", "anisomag", "--rounds", "1", "--min_res", "20")  # fmt: skip
    assert r.exit_code == 0, r.output
    job = root / "External" / "job031"
    assert (job / SUCCESS).is_file() and not (job / FAILURE).exists()
    nodes = read_star_blocks(job / OUTPUT_NODES, names_as_strings=True)
    (table,) = nodes.values()
    assert table["rlnPipeLineNodeName"].tolist() == ["External/job031/particles_ctf_refine.star"]
    assert table["rlnPipeLineNodeTypeLabel"].tolist() == [PARTICLES_NODE_TYPE]
    out = read_star_blocks(job / "particles_ctf_refine.star", names_as_strings=True)
    m = out["optics"][["rlnMagMat00", "rlnMagMat01", "rlnMagMat10", "rlnMagMat11"]]
    got = m.to_numpy(dtype=float).reshape(2, 2)
    np.testing.assert_allclose(got, files.sim.spec.mag.array, atol=2e-3)  # the known matrix
    assert (job / "anisomag_group1.json").is_file()


def test_external_refine_failures_write_the_failure_file(project, tmp_path: Path) -> None:
    root, files = project
    r = _run(root, "--o", "External/job032/", "--in_parts", str(files.star))
    assert r.exit_code == 2
    job = root / "External" / "job032"
    assert (job / FAILURE).is_file() and not (job / SUCCESS).exists()
    assert "--in_3dref" in r.output
    r = _run(root, "--o", "External/job033/", "--in_parts", str(files.star),
             "--in_3dref", str(files.reference), "--bogus", "1")  # fmt: skip
    assert r.exit_code == 2 and "unknown parameter --bogus" in r.output
    assert (root / "External" / "job033" / FAILURE).is_file()


def test_refine_params_are_checked() -> None:
    st, apix = parse_refine_params(["--fit", "defocus,astigmatism", "--max-res", "4",
                                    "--ref_apix", "1.1", "--pipeline_control", "x"])  # fmt: skip
    assert (st.fit_defocus, st.fit_astigmatism, st.fit_anisomag) == (True, True, False)
    assert st.max_res == 4.0 and apix == 1.1
    for bad, needle in ((["--fit", "tilt"], "--fit takes"), (["--rounds", "x"], "number"),
                        (["--min_res"], "pairs")):  # fmt: skip
        with pytest.raises(UsageError, match=needle):
            parse_refine_params(bad)
