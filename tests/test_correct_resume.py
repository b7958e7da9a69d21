"""``aniso correct`` resumes after kill -9: complete files are kept, the rest is redone, and the
outputs equal those of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from anisoctf.io.mrc import write_mrc
from anisoctf.jobs.correct_images import CorrectRequest, correct_images
from anisoctf.jobs.correct_state import STATE_DIR

N = 8
M = ["1.01", "0.004", "0.004", "0.992"]


@pytest.fixture(scope="module")
def stacks(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("stacks")
    rng = np.random.default_rng(4)
    for i in range(N):
        write_mrc(root / f"s{i}.mrcs", rng.normal(size=(60, 128, 128)).astype(np.float32), 1.2)
    return root


def _cmd(stacks: Path, out: Path, *extra: str) -> list[str]:
    files = sorted(str(p) for p in stacks.glob("*.mrcs"))
    return [sys.executable, "-m", "anisoctf.cli.main", "aniso", "correct", *files,
            "--mag-matrix", *M, "--out", str(out), *extra]  # fmt: skip


def _data(folder: Path) -> dict[str, np.ndarray]:
    out = {}
    for p in sorted(folder.glob("*.mrcs")):
        with mrcfile.open(p) as f:
            out[p.name] = np.array(f.data)
    return out


def test_kill_9_then_rerun_gives_the_uninterrupted_outputs(stacks: Path, tmp_path: Path) -> None:
    ref = subprocess.run(_cmd(stacks, tmp_path / "ref"), capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "out"
    p = subprocess.Popen(_cmd(stacks, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and p.poll() is None:
        if len(list((out / STATE_DIR).glob("*.json")) if (out / STATE_DIR).is_dir() else []) >= 2:
            break
        time.sleep(0.01)
    if p.poll() is not None:
        pytest.skip("the run ended before it could be killed")
    os.kill(p.pid, signal.SIGKILL)
    p.communicate()
    n_before = len(list((out / STATE_DIR).glob("*.json")))
    assert 2 <= n_before < N
    again = subprocess.run(_cmd(stacks, out), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert f"{n_before} file(s) already done" in again.stdout
    a, b = _data(tmp_path / "ref"), _data(out)
    assert list(a) == list(b) and len(a) == N
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    leftovers = [q for q in out.rglob("*") if q.is_file() and ".tmp" in q.name]
    assert not leftovers


def test_what_is_redone(stacks: Path, tmp_path: Path) -> None:
    from anisoctf.optics.magmat import from_relion

    mag = from_relion(*map(float, M))
    files = tuple(sorted(str(p) for p in stacks.glob("*.mrcs")))[:3]
    req = CorrectRequest(inputs=files, out_dir=tmp_path / "o", mag=mag)
    first = correct_images(req)
    assert first.n_skipped == 0 and first.n_images == 3 * 60
    assert correct_images(req).n_skipped == 3  # all complete: nothing redone
    # an output that was changed (or removed) is redone
    victim = tmp_path / "o" / Path(files[0]).name
    victim.write_bytes(victim.read_bytes()[:1000])
    assert correct_images(req).n_skipped == 2
    # another matrix, or --overwrite, redoes all
    other = CorrectRequest(inputs=files, out_dir=tmp_path / "o", mag=from_relion(1.0, 0, 0, 1.02))
    assert correct_images(other).n_skipped == 0
    import dataclasses

    assert correct_images(dataclasses.replace(other, resume=False)).n_skipped == 0
    assert correct_images(other).n_skipped == 3


def test_a_second_run_into_the_same_directory_is_refused(stacks: Path, tmp_path: Path) -> None:
    from anisoctf.errors import UsageError
    from anisoctf.jobs.batch_state import BatchLock
    from anisoctf.optics.magmat import from_relion

    (tmp_path / "o").mkdir()
    with BatchLock(tmp_path / "o"):
        req = CorrectRequest(
            inputs=(str(next(stacks.glob("*.mrcs"))),), out_dir=tmp_path / "o",
            mag=from_relion(*map(float, M)),
        )  # fmt: skip
        with pytest.raises(UsageError, match="lock|in use|another"):
            correct_images(req)
