"""Resumable, locked, atomic batches: ``anisoctf estimate`` killed and rerun, lock, --overwrite.

Small simulated micrographs (512², 128-pixel boxes) keep this file at a few seconds.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from anisoctf.fit.result import FitSettings
from anisoctf.io.star import MicrographCTFRow
from anisoctf.jobs.batch_state import (
    BatchLock,
    MicrographRecord,
    canonical_json,
    read_record,
    record_path,
    task_fingerprint,
    write_record,
)
from anisoctf.jobs.estimate_micrographs import UsageError, run_estimate
from anisoctf.jobs.simulate_micrographs import SimulationOptions, run_simulate

#: the simulator's optics, given explicitly (MRC files carry no voltage)
OPTICS = {"apix": 1.0, "kv": 300.0, "cs": 2.7, "ac": 0.07}

N_MICS = 8
SETTINGS = FitSettings(box=128)
ARGS = ["--apix", "1.0", "--kv", "300", "--cs", "2.7", "--ac", "0.07", "--box", "128", "--quiet"]
_ONE_THREAD = {k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}


@pytest.fixture(scope="module")
def mics(tmp_path_factory) -> Path:
    """A project folder with ``mics/micrograph_NNN.mrc`` (known CTF)."""
    root = tmp_path_factory.mktemp("batch")
    opts = SimulationOptions(n=N_MICS, size=512, apix=1.0, df_range=(9000.0, 16000.0), seed=11)
    run_simulate(opts, root / "mics", "micrograph")
    return root


def _estimate_cmd(*extra: str) -> list[str]:
    return [sys.executable, "-m", "anisoctf.cli.main", "estimate", "mics/*.mrc", *ARGS, *extra]


def _run(cwd: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        _estimate_cmd(*extra),
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, **_ONE_THREAD},
        timeout=300,
        check=False,
    )


def _star_rows(path: Path) -> list[str]:
    lines = path.read_text().splitlines()
    start = lines.index("data_micrographs")
    return [ln for ln in lines[start:] if ln.startswith("mics/")]


def _strays(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_kill9_and_rerun_gives_the_uninterrupted_table(mics: Path, tmp_path: Path) -> None:
    ref = _run(mics, "--out", "ref", "-j", "2")
    assert ref.returncode in (0, 1), ref.stderr
    ref_rows = _star_rows(mics / "ref" / "micrographs_ctf.star")
    assert len(ref_rows) >= N_MICS - 1  # a micrograph may fail; it then fails in both runs

    out = mics / "killed"
    rng = random.Random(5)
    kills = 0
    for _ in range(2):  # kill -9 twice, at a random moment after the first record appeared
        p = subprocess.Popen(
            _estimate_cmd("--out", "killed", "-j", "2"),
            cwd=mics,
            env={**os.environ, **_ONE_THREAD},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        t0 = time.monotonic()
        while time.monotonic() - t0 < 60 and p.poll() is None:
            done = list(out.glob("*.record.json")) if out.is_dir() else []
            if done:
                break
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.3))
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            kills += 1
        p.wait()
    assert kills >= 1
    n_before = len(list(out.glob("*.record.json")))
    rerun = _run(mics, "--out", "killed", "-j", "2")
    assert rerun.returncode == ref.returncode, rerun.stderr
    rows = [r.replace("killed/", "ref/") for r in _star_rows(out / "micrographs_ctf.star")]
    assert rows == ref_rows  # one row per micrograph, identical to the uninterrupted run
    assert _strays(out) == []
    assert n_before <= N_MICS


@pytest.mark.parametrize(
    ("sig", "jobs"), [(signal.SIGTERM, 1), (signal.SIGINT, 2)], ids=["sigterm-j1", "ctrl-c-j2"]
)
def test_interrupt_stops_cleanly_with_the_finished_rows(mics: Path, sig, jobs: int) -> None:
    """SIGTERM to the process, or Ctrl-C (SIGINT to the whole process group, workers included):
    exit 130 with one line, the STAR file holds exactly the finished micrographs, no temporary
    file is left."""
    name = f"int{jobs}"
    out = mics / name
    p = subprocess.Popen(
        _estimate_cmd("--out", name, "-j", str(jobs)),
        cwd=mics,
        env={**os.environ, **_ONE_THREAD},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    t0 = time.monotonic()
    while time.monotonic() - t0 < 60 and p.poll() is None:
        if out.is_dir() and list(out.glob("*.record.json")):
            break
        time.sleep(0.005)
    if sig == signal.SIGINT:
        os.killpg(p.pid, sig)
    else:
        p.send_signal(sig)
    _, stderr = p.communicate(timeout=60)
    if p.returncode in (0, 1):
        pytest.skip("the batch finished before SIGTERM arrived")
    assert p.returncode == 130, stderr
    assert "interrupted" in stderr and "run the same command again" in stderr
    assert "Traceback" not in stderr
    records = [read_record(f) for f in out.glob("*.record.json")]
    n_ok = sum(r is not None and r.ok for r in records)
    assert 0 < n_ok < N_MICS
    assert len(_star_rows(out / "micrographs_ctf.star")) == n_ok
    assert _strays(out) == []


def test_continue_skips_done_and_overwrite_redoes(mics: Path) -> None:
    out = mics / "resume"
    first = run_estimate([str(mics / "mics" / "*.mrc")], out, SETTINGS, **OPTICS, quiet=True)
    assert first.n_skipped == 0 and first.n_ok >= N_MICS - 1
    # a stray temporary from a killed run is cleaned; a record lost means only that one is redone
    (out / ".micrograph_001.txt.abcd1234.tmp").write_text("half")
    ok_stem = Path(first.results[0].name).stem
    record_path(out, ok_stem).unlink()
    again = run_estimate([str(mics / "mics" / "*.mrc")], out, SETTINGS, **OPTICS, quiet=True)
    assert again.n_skipped == first.n_ok - 1
    assert [r.row for r in again.results] == [r.row for r in first.results]
    assert _strays(out) == []
    redo = run_estimate(
        [str(mics / "mics" / "*.mrc")], out, SETTINGS, **OPTICS, quiet=True, overwrite=True
    )
    assert redo.n_skipped == 0
    # other parameters: a different fingerprint, everything redone
    other = run_estimate(
        [str(mics / "mics" / "*.mrc")], out, FitSettings(box=128, max_res=5.0), **OPTICS, quiet=True
    )
    assert other.n_skipped == 0


def test_second_run_on_a_locked_directory_fails_with_one_line(mics: Path) -> None:
    out = mics / "locked"
    out.mkdir()
    with BatchLock(out):
        with pytest.raises(UsageError, match="another anisoctf run .pid") as info:
            run_estimate([str(mics / "mics" / "*.mrc")], out, SETTINGS, **OPTICS, quiet=True)
        assert "\n" not in str(info.value)
        r = _run(mics, "--out", "locked")
        assert r.returncode == 2
        assert r.stderr.strip().count("\n") == 0 and "another anisoctf run" in r.stderr
    # released: the lock file left behind does not block
    assert run_estimate([str(mics / "mics" / "*.mrc")], out, SETTINGS, **OPTICS, quiet=True).n_ok


def test_fingerprint_and_record_round_trip(tmp_path: Path) -> None:
    a = task_fingerprint(settings=SETTINGS, name="x", input={"size": 1, "mtime_ns": 2})
    b = task_fingerprint(settings=FitSettings(box=128), name="x", input={"size": 1, "mtime_ns": 2})
    c = task_fingerprint(settings=SETTINGS, name="x", input={"size": 1, "mtime_ns": 3})
    assert a == b != c
    assert canonical_json({"b": 1.0, "a": [1, 2]}) == '{"a":[1,2],"b":1.0}'
    row = MicrographCTFRow("m.mrc", 1, "o/m.ctf:mrc", 12345.678901234, 12000.1, 33.3, 0.1, 4.2)
    rec = MicrographRecord(a, True, row, 0.1, float("nan"), ("w",), ("o/m.txt",), "", 1.5)
    write_record(tmp_path / "m.record.json", rec)
    back = read_record(tmp_path / "m.record.json")
    assert back is not None and back.row == row and back.fingerprint == a
    assert back.fit_resolution != back.fit_resolution  # NaN survives
    (tmp_path / "bad.record.json").write_text("{not json")
    assert read_record(tmp_path / "bad.record.json") is None
