"""RELION External job, Gctf results, ``aniso detect`` on result folders, the HTML report
(checked in headless Chromium when it is installed), --watch and the Dask backend."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import starfile
from typer.testing import CliRunner

from anisoctf.cli.main import app
from anisoctf.errors import InputError
from anisoctf.fit.result import FitSettings
from anisoctf.io.gctf import read_gctf_log, read_gctf_star
from anisoctf.jobs.detect import load_ctf_table
from anisoctf.jobs.estimate_micrographs import run_estimate
from anisoctf.jobs.relion_external import (
    CTF_NODE_TYPE,
    FAILURE,
    OUTPUT_NODES,
    SUCCESS,
    parse_params,
)
from anisoctf.jobs.report_job import run_report
from anisoctf.jobs.simulate_micrographs import SimulationOptions, run_simulate
from anisoctf.report.html import collect_report_data

#: the simulator's optics, given explicitly (MRC files carry no voltage)
OPTICS = {"apix": 1.0, "kv": 300.0, "cs": 2.7, "ac": 0.07}

runner = CliRunner()
SETTINGS = FitSettings(box=128)
N = 6


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A RELION-like project: ``Movies/micrograph_NNN.mrc`` and ``corrected_micrographs.star``."""
    root = tmp_path_factory.mktemp("project")
    opts = SimulationOptions(n=N, size=512, apix=1.0, df_range=(9000.0, 16000.0), seed=21)
    files = run_simulate(opts, root / "Movies", "micrograph")
    optics = pd.DataFrame(
        {
            "rlnOpticsGroupName": ["opticsGroup1"],
            "rlnOpticsGroup": [1],
            "rlnMicrographPixelSize": [1.0],
            "rlnVoltage": [300.0],
            "rlnSphericalAberration": [2.7],
            "rlnAmplitudeContrast": [0.07],
        }
    )
    mics = pd.DataFrame(
        {
            "rlnMicrographName": [f"Movies/{f.mrc.name}" for f in files],
            "rlnOpticsGroup": [1] * len(files),
        }
    )
    starfile.write({"optics": optics, "micrographs": mics}, root / "corrected_micrographs.star")
    return root


def _in(cwd: Path):
    class _Cwd:
        def __enter__(self):
            self.old = os.getcwd()
            os.chdir(cwd)

        def __exit__(self, *a):
            os.chdir(self.old)

    return _Cwd()


# --------------------------------------------------------------------------------------------
# RELION External job


def test_relion_external_job_writes_nodes_and_exit_file(project: Path) -> None:
    job = "External/job005/"
    with _in(project):
        r = runner.invoke(
            app,
            ["relion-external", "--o", job, "--in_mics", "corrected_micrographs.star", "--j", "1",
             "--box", "128", "--max_res", "5"],
        )  # fmt: skip
    assert r.exit_code == 0, r.output
    d = project / job
    assert (d / SUCCESS).is_file() and not (d / FAILURE).exists()
    nodes = starfile.read(d / OUTPUT_NODES)
    assert list(nodes["rlnPipeLineNodeName"]) == ["External/job005/micrographs_ctf.star"]
    assert list(nodes["rlnPipeLineNodeTypeLabel"]) == [CTF_NODE_TYPE]
    rows, _ = read_gctf_star(d / "micrographs_ctf.star")
    assert len(rows) >= N - 1
    assert all(r.name.startswith("Movies/") for r in rows)
    assert all(r.ctf_image.startswith("External/job005/") for r in rows)  # relative to project


def test_relion_external_bad_parameter_fails_cleanly(project: Path) -> None:
    with _in(project):
        r = runner.invoke(
            app,
            ["relion-external", "--o", "External/job006/", "--in_mics",
             "corrected_micrographs.star", "--frobnicate", "3"],
        )  # fmt: skip
    assert r.exit_code == 2
    assert "unknown parameter --frobnicate" in r.output
    assert (project / "External/job006" / FAILURE).is_file()
    assert parse_params(["--min-res", "25", "--phase_plate", "yes", "--apix", "1.1"]) == {
        "settings": {"min_res": 25.0, "phase_plate": True},
        "optics": {"apix": 1.1},
        "overwrite": False,
    }


def test_relion_abort_file_interrupts_the_run(tmp_path: Path) -> None:
    from anisoctf.jobs.estimate_micrographs import _sigterm_as_interrupt
    from anisoctf.jobs.relion_external import ABORT_NOW, abort_watcher

    with pytest.raises(KeyboardInterrupt):
        with _sigterm_as_interrupt(), abort_watcher(tmp_path, period=0.02):
            (tmp_path / ABORT_NOW).write_text("")
            time.sleep(5)  # interrupted long before


# --------------------------------------------------------------------------------------------
# Gctf

GCTF_LOG = """\
 Gctf v1.06 ...
   Defocus_U   Defocus_V       Angle         CCC
    21400.00    20900.00       73.00    0.080000  Local refine
   Defocus_U   Defocus_V       Angle         CCC
    21395.27    20943.89       73.60    0.086544  Final Values

Resolution limit estimated by EPA: RES_LIMIT 3.567
Estimated Bfactor: B_FACTOR  78.34
"""

GCTF_PHASE_LOG = """\
   Defocus_U   Defocus_V       Angle     Phase_shift         CCC
    15000.00    14000.00       10.00       88.50      0.100000  Final Values
"""


def test_gctf_log_and_star(tmp_path: Path) -> None:
    (tmp_path / "a_gctf.log").write_text(GCTF_LOG)
    g = read_gctf_log(tmp_path / "a_gctf.log")
    assert (g.defocus_u, g.defocus_v, g.angle, g.cross_correlation) == (
        21395.27,
        20943.89,
        73.60,
        0.086544,
    )
    assert g.resolution == 3.567 and g.phase_shift is None
    (tmp_path / "b_gctf.log").write_text(GCTF_PHASE_LOG)
    b = read_gctf_log(tmp_path / "b_gctf.log")
    assert b.phase_shift == 88.5 and np.isnan(b.resolution)
    (tmp_path / "bad_gctf.log").write_text(GCTF_LOG.replace("Final Values", "Fnal"))
    with pytest.raises(InputError, match="no 'Final Values' line"):
        read_gctf_log(tmp_path / "bad_gctf.log")
    star = tmp_path / "micrographs_all_gctf.star"
    star.write_text(
        "data_\n\nloop_\n_rlnMicrographName #1\n_rlnCtfImage #2\n_rlnDefocusU #3\n"
        "_rlnDefocusV #4\n_rlnDefocusAngle #5\n_rlnVoltage #6\n_rlnSphericalAberration #7\n"
        "_rlnAmplitudeContrast #8\n_rlnMagnification #9\n_rlnDetectorPixelSize #10\n"
        "_rlnCtfFigureOfMerit #11\n_rlnFinalResolution #12\n"
        "Micrographs/a.mrc Micrographs/a.ctf:mrc 21395.27 20943.89 73.60 300 2.7 0.1 10000 "
        "1.0 0.086544 3.567\n"
        "Micrographs/b.mrc Micrographs/b.ctf:mrc 15000.0 14000.0 10.0 300 2.7 0.1 10000 "
        "1.0 0.1 4.25\n"
    )
    rows, _ = read_gctf_star(star)
    assert [r.max_resolution for r in rows] == [3.567, 4.25]
    assert rows[0].defocus_u == 21395.27 and rows[1].defocus_angle == 10.0


def test_aniso_detect_reads_a_folder_of_ctffind_and_gctf_results(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    truth = []
    for i in range(12):
        u, v, a = 10000 + 1000 * i + 300, 10000 + 1000 * i - 300, float(rng.uniform(0, 180))
        truth.append((u, v, a))
        if i % 2:
            text = GCTF_LOG.replace("21395.27    20943.89       73.60", f"{u:.2f} {v:.2f} {a:.2f}")
            (tmp_path / f"m{i:02d}_gctf.log").write_text(text)
        else:
            (tmp_path / f"m{i:02d}.txt").write_text(
                "# Output from CTFFIND version 4.1.14\n# Columns: ...\n"
                f"1.000000 {u:.2f} {v:.2f} {a:.2f} 0.000000 0.100000 4.000000\n"
            )
    (tmp_path / "m00_avrot.txt").write_text("not a result\n")
    table = load_ctf_table([str(tmp_path)])
    assert len(table.names) == 12
    order = np.argsort(table.names)
    np.testing.assert_allclose(table.defocus_u[order], [t[0] for t in truth], atol=0.01)
    np.testing.assert_allclose(table.angle_deg[order], [t[2] for t in truth], atol=0.01)
    r = runner.invoke(app, ["aniso", "detect", str(tmp_path), "--bootstrap", "0"])
    assert r.exit_code == 0, r.output


# --------------------------------------------------------------------------------------------
# report


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def estimated(project: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report") / "ctf"
    report = run_estimate([str(project / "Movies" / "*.mrc")], out, SETTINGS, **OPTICS, quiet=True)
    assert report.n_ok >= 3
    # one broken input so that the report has a failure to show
    bad = project / "broken" / "bad.mrc"
    bad.parent.mkdir(exist_ok=True)
    bad.write_bytes(b"\x00" * 100)
    run_estimate([str(bad)], out, SETTINGS, **OPTICS, quiet=True)
    return out


def test_report_page_content(estimated: Path) -> None:
    data = collect_report_data(estimated)
    assert len(data.rows) >= 3 and len(data.thumbnails) == len(data.rows)
    assert any(name == "bad" for name, _ in data.failures)
    path = run_report(estimated)
    text = path.read_text()
    assert text.count('<img class="thumb"') == len(data.rows)
    assert 'id="histograms"' in text and "http://" not in text and "https://" not in text
    # one row per micrograph and per failure, plus the two header rows
    assert text.count("<tr>") == len(data.rows) + len(data.failures) + 2
    r = runner.invoke(app, ["report", str(estimated), "--out", str(estimated / "r2.html")])
    assert r.exit_code == 0 and (estimated / "r2.html").is_file()
    r = runner.invoke(app, ["report", str(estimated / "nope")])
    assert r.exit_code == 2 and "not a folder" in r.output and "Traceback" not in r.output


def test_report_in_headless_chromium(estimated: Path, tmp_path: Path) -> None:
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    page = run_report(estimated, tmp_path / "report.html")
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    env = {**os.environ, "HOME": str(tmp_path)}
    dom = subprocess.run(
        [*flags, "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120, env=env, check=False,
    )  # fmt: skip
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert 'data-ready="1"' in html  # the inline script ran to its end without an error
    # the table was sorted by fit resolution (ascending) by the script
    body = html.split('id="micrographs"', 1)[1].split("</table>", 1)[0]
    values = [float(x.split('"', 1)[0]) for x in body.split('data-v="')[1:]]
    assert len(values) >= 3 and values == sorted(values)
    shot = tmp_path / "shot.png"
    r = subprocess.run(
        [*flags, "--window-size=1200,1400", f"--screenshot={shot}", page.as_uri()],
        capture_output=True, text=True, timeout=120, env=env, check=False,
    )  # fmt: skip
    assert r.returncode == 0 and shot.is_file(), r.stderr[-2000:]
    from matplotlib.image import imread

    img = imread(shot)[..., :3]
    assert img.shape[0] >= 1000 and img.shape[1] >= 1000
    # not blank: plots put many coloured (non-grey) pixels on the page
    coloured = np.ptp(img, axis=2) > 0.2
    assert coloured.mean() > 0.01


# --------------------------------------------------------------------------------------------
# --watch and Dask


def test_watch_picks_up_new_micrographs(project: Path, tmp_path: Path) -> None:
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    sources = sorted((project / "Movies").glob("*.mrc"))
    shutil.copy(sources[0], incoming / sources[0].name)

    def later() -> None:
        time.sleep(0.6)
        for s in sources[1:3]:
            shutil.copy(s, incoming / s.name)

    t = threading.Thread(target=later)
    t.start()
    report = run_estimate(
        [str(incoming / "*.mrc")], tmp_path / "ctf", SETTINGS, **OPTICS, quiet=True,
        watch=1.5, poll_seconds=0.2,
    )  # fmt: skip
    t.join()
    assert report.n_ok + report.n_failed == 3
    rows, _ = read_gctf_star(tmp_path / "ctf" / "micrographs_ctf.star")
    assert [Path(r.name).name for r in rows] == sorted(Path(r.name).name for r in rows)
    assert len(rows) == report.n_ok


def test_dask_local_cluster_gives_the_same_rows(project: Path, tmp_path: Path) -> None:
    pytest.importorskip("dask.distributed")
    from anisoctf.jobs.backends import DaskBackend

    files = [str(p) for p in sorted((project / "Movies").glob("*.mrc"))[:3]]
    serial = run_estimate(files, tmp_path / "serial", SETTINGS, **OPTICS, quiet=True)
    backend = DaskBackend("local", jobs=1, processes=False)
    try:
        dask = run_estimate(
            files, tmp_path / "dask", SETTINGS, **OPTICS, quiet=True, backend=backend
        )
    finally:
        backend.close()
    assert [r.name for r in dask.results] == [r.name for r in serial.results]
    for a, b in zip(dask.results, serial.results, strict=True):
        assert a.row.defocus_u == b.row.defocus_u and a.row.defocus_angle == b.row.defocus_angle


def test_scheduler_without_dask_is_one_line(monkeypatch, tmp_path: Path) -> None:
    import builtins

    real_import = builtins.__import__

    def fake(name, *a, **k):
        if name.startswith("dask"):
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    from anisoctf.jobs.backends import BackendError, DaskBackend

    with pytest.raises(BackendError, match=r"pip install 'anisoctf\[dask\]'"):
        DaskBackend("local")


def test_cli_help_lists_the_new_commands() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "anisoctf.cli.main", "--help"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert "relion-external" in r.stdout and "report" in r.stdout
