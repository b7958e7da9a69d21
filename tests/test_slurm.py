"""``--scheduler slurm``: Dask workers submitted as SLURM jobs, end to end on a real SLURM.

``.ci/run`` installs a single-node SLURM (Debian's slurm-wlm with munge) as root when it can
(``.ci/slurm_setup.sh``); the tests that need it skip with the reason where it is absent. The
option parsing and the refusals are tested everywhere.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from anisoctf.io.star import read_micrographs_ctf_star
from anisoctf.jobs.cluster import ClusterError, ClusterSpec, parse_slurm_options, slurm_available
from anisoctf.jobs.simulate_micrographs import SimulationOptions, run_simulate

N = 10


def _slurm_or_skip() -> None:
    pytest.importorskip("dask_jobqueue", reason="dask-jobqueue is not installed")
    why = slurm_available()
    if why is not None:
        pytest.skip(f"no SLURM here: {why}")


def _cli(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "anisoctf.cli.main", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw,
    )  # fmt: skip


def _our_jobs(name: str) -> list[str]:
    run = subprocess.run(
        ["squeue", "-h", "-n", name, "-o", "%i %T"], capture_output=True, text=True, check=False
    )
    return [line.split()[0] for line in run.stdout.splitlines() if "RUNNING" in line]


def test_slurm_options_parse_into_the_job_resources(tmp_path: Path) -> None:
    spec = parse_slurm_options(
        ["workers=3", "cores=4", "memory=16GB", "partition=cpu", "walltime=02:00:00",
         "extra=--qos=short", "extra=--exclusive"]
    )  # fmt: skip
    assert spec == ClusterSpec(
        workers=3, cores=4, memory="16GB", partition="cpu", walltime="02:00:00",
        extra_directives=("--qos=short", "--exclusive"),
    )  # fmt: skip
    kw = spec.cluster_kwargs({})
    assert (kw["cores"], kw["processes"], kw["memory"], kw["queue"]) == (4, 4, "16GB", "cpu")
    assert kw["job_extra_directives"] == ["--qos=short", "--exclusive"]
    assert kw["python"] == sys.executable
    # a dask-jobqueue config supplies what the options do not; options win
    cfg = {"queue": "big", "account": "lab", "memory": "64GB", "job-extra-directives": ["-C x"]}
    kw = ClusterSpec(cores=2, partition="cpu").cluster_kwargs(cfg)
    assert (kw["queue"], kw["account"], kw["memory"]) == ("cpu", "lab", "64GB")
    assert kw["job_extra_directives"] == ["-C x"]
    assert ClusterSpec(cores=3).cluster_kwargs({})["memory"] == "6GB"
    assert parse_slurm_options(None) is None


@pytest.mark.parametrize(
    ("items", "needle"),
    [
        (["workers"], "KEY=VALUE"),
        (["nodes=2"], "KEY=VALUE"),
        (["cores=many"], "not a valid cores"),
        (["workers=0"], "at least 1"),
    ],
)
def test_bad_slurm_options_are_one_line(items: list[str], needle: str) -> None:
    with pytest.raises(ClusterError, match=needle) as info:
        parse_slurm_options(items)
    assert "\n" not in str(info.value)


def test_bad_cluster_config_is_one_line(tmp_path: Path) -> None:
    pytest.importorskip("dask_jobqueue", reason="dask-jobqueue is not installed")
    from anisoctf.jobs.cluster import _read_config

    (tmp_path / "q.yaml").write_text("jobqueue:\n  pbs:\n    cores: 2\n")
    with pytest.raises(ClusterError, match="no 'jobqueue: slurm:' section"):
        _read_config(tmp_path / "q.yaml")
    with pytest.raises(ClusterError, match="file not found"):
        _read_config(tmp_path / "missing.yaml")
    good = tmp_path / "good.yaml"
    good.write_text("jobqueue:\n  slurm:\n    queue: cpu\n    memory: 8GB\n")
    assert _read_config(good) == {"queue": "cpu", "memory": "8GB"}


def test_cli_scheduler_slurm_without_sbatch_is_one_line(tmp_path: Path) -> None:
    pytest.importorskip("dask_jobqueue", reason="dask-jobqueue is not installed")
    opts = SimulationOptions(n=1, size=256, apix=1.0, seed=3)
    run_simulate(opts, tmp_path / "m", "mic")
    env = {**os.environ, "PATH": os.path.dirname(sys.executable)}  # no sbatch on PATH
    p = _cli("estimate", str(tmp_path / "m" / "mic_001.mrc"), "--apix", "1", "--kv", "300",
             "--out", str(tmp_path / "o"), "--scheduler", "slurm", env=env)  # fmt: skip
    out, err = p.communicate(timeout=120)
    assert p.returncode == 2, err
    assert "sbatch is not on PATH" in err and "Traceback" not in err
    assert len([x for x in err.splitlines() if x.startswith("error:")]) == 1


@pytest.fixture(scope="module")
def micrographs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("slurm")
    opts = SimulationOptions(n=N, size=768, apix=1.0, df_range=(9000.0, 16000.0), seed=5)
    run_simulate(opts, root / "mics", "mic")
    return root


def _rows(out: Path) -> list:
    rows, _ = read_micrographs_ctf_star(out / "micrographs_ctf.star")
    return rows


def test_estimate_on_slurm_matches_the_local_run(micrographs: Path, tmp_path: Path) -> None:
    _slurm_or_skip()
    files = sorted(str(p) for p in (micrographs / "mics").glob("*.mrc"))[:4]
    common = ["--apix", "1", "--kv", "300", "--box", "256", "-q"]
    local = _cli("estimate", *files, *common, "--out", str(tmp_path / "local"))
    local.communicate(timeout=300)
    p = _cli("estimate", *files, *common, "--out", str(tmp_path / "slurm"),
             "--scheduler", "slurm", "--slurm", "workers=2", "--slurm", "memory=2GB",
             "--slurm", "timeout=120", "--slurm", f"logs={tmp_path / 'logs'}")  # fmt: skip
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    a, b = _rows(tmp_path / "local"), _rows(tmp_path / "slurm")
    assert [r.name for r in a] == [r.name for r in b]
    np.testing.assert_array_equal([r.defocus_u for r in a], [r.defocus_u for r in b])
    assert list((tmp_path / "logs").glob("*.out"))  # the work ran in SLURM jobs


def test_killing_a_slurm_worker_loses_nothing(micrographs: Path, tmp_path: Path) -> None:
    """scancel one of two worker jobs in the middle of the batch: the other finishes it, and
    every micrograph is in the results exactly once."""
    _slurm_or_skip()
    out = tmp_path / "out"
    files = sorted(str(p) for p in (micrographs / "mics").glob("*.mrc"))
    p = _cli("estimate", *files, "--apix", "1", "--kv", "300", "--box", "256", "-q",
             "--out", str(out), "--scheduler", "slurm", "--slurm", "workers=2",
             "--slurm", "memory=2GB", "--slurm", "timeout=120",
             "--slurm", f"logs={tmp_path / 'logs'}")  # fmt: skip
    killed = None
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and p.poll() is None:
        done = list(out.glob("*.record.json")) if out.is_dir() else []
        jobs = _our_jobs("anisoctf")
        if 1 <= len(done) < N and len(jobs) == 2:
            killed = jobs[0]
            subprocess.run(["scancel", "--signal=KILL", "--full", killed], check=False)
            print(f"killed SLURM job {killed} after {len(done)} of {N} micrographs")
            break
        time.sleep(0.05)
    stdout, err = p.communicate(timeout=300)
    if killed is None:
        pytest.skip("the batch ended before a worker could be killed (machine too fast)")
    assert p.returncode == 0, err
    names = [Path(r.name).name for r in _rows(out)]
    assert sorted(names) == sorted(Path(f).name for f in files)  # each exactly once
    assert len(set(names)) == N


@pytest.mark.parametrize("scheduler", ["local", "slurm"])
def test_correct_on_dask_and_slurm_writes_the_serial_files(
    micrographs: Path, tmp_path: Path, scheduler: str
) -> None:
    """``aniso correct --scheduler local|slurm`` writes the images and pixel sizes of
    ``--jobs 1`` (bit for bit; the header's time-stamped label may differ)."""
    import mrcfile

    pytest.importorskip("dask.distributed")
    if scheduler == "slurm":
        _slurm_or_skip()
    files = sorted(str(p) for p in (micrographs / "mics").glob("*.mrc"))[:3]
    m = ["--mag-matrix", "1.01", "0.004", "0.004", "0.992", "--apix", "1", "-q"]
    serial = _cli("aniso", "correct", *files, *m, "--out", str(tmp_path / "serial"))
    serial.communicate(timeout=300)
    extra = ["--slurm", "workers=2", "--slurm", "memory=2GB", "--slurm", "timeout=120",
             "--slurm", f"logs={tmp_path / 'logs'}"] if scheduler == "slurm" else ["--jobs", "2"]
    p = _cli("aniso", "correct", *files, *m, "--out", str(tmp_path / "dist"),
             "--scheduler", scheduler, *extra)  # fmt: skip
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    a = sorted((tmp_path / "serial").glob("*.mrc"))
    b = sorted((tmp_path / "dist").glob("*.mrc"))
    assert [x.name for x in a] == [x.name for x in b] and len(a) == 3
    for x, y in zip(a, b, strict=True):
        with mrcfile.open(x) as fa, mrcfile.open(y) as fb:
            np.testing.assert_array_equal(fa.data, fb.data, err_msg=x.name)
            assert fa.voxel_size == fb.voxel_size
