"""``anisoctf refine`` resumes after kill -9 at its first unfinished optics group, and ends with
the outputs of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import starfile

from anisoctf.jobs.refine_particles import OUT_STAR, run_refine
from anisoctf.jobs.refine_state import STATE_DIR
from anisoctf.jobs.requests import RefineSettings
from anisoctf.jobs.simulate_particles import run_simulate_particles
from anisoctf.simulate.particles import ParticleSimSpec

SETTINGS = RefineSettings(rounds=1, mag_iterations=1, defocus_search=300.0, threads=1)


@pytest.fixture(scope="module")
def two_groups(tmp_path_factory) -> tuple[Path, Path]:
    """Simulated particles split into two optics groups (same optics)."""
    root = tmp_path_factory.mktemp("refine_resume")
    spec = ParticleSimSpec(n=240, box=48, apix=1.5, n_micrographs=4, snr=2.0, seed=13)
    files = run_simulate_particles(spec, root)
    blocks = starfile.read(files.star, always_dict=True)
    optics = blocks["optics"]
    two = optics.loc[[0, 0]].reset_index(drop=True)
    two["rlnOpticsGroup"] = [1, 2]
    two["rlnOpticsGroupName"] = ["opticsGroup1", "opticsGroup2"]
    parts = blocks["particles"]
    parts["rlnOpticsGroup"] = [1 + (i % 2) for i in range(len(parts))]
    star = root / "two_groups.star"
    starfile.write({"optics": two, "particles": parts}, star)
    return star, files.reference


def _cmd(star: Path, ref: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "anisoctf.cli.main", "refine", str(star), "--reference",
            str(ref), "--out", str(out), "--rounds", "1", "--mag-iterations", "1",
            "--defocus-range", "300", *extra]  # fmt: skip


def test_rerun_takes_the_finished_groups_and_gives_the_same_star(two_groups, tmp_path) -> None:
    star, ref = two_groups
    first = run_refine(star, tmp_path / "o", reference=ref, settings=SETTINGS)
    assert first.resumed == [] and [r.group for r in first.groups] == [1, 2]
    text = (tmp_path / "o" / OUT_STAR).read_text()
    again = run_refine(star, tmp_path / "o", reference=ref, settings=SETTINGS)
    assert again.resumed == [1, 2]
    assert (tmp_path / "o" / OUT_STAR).read_text() == text
    for a, b in zip(first.groups, again.groups, strict=True):
        assert a.mag == b.mag and (a.defocus_u == b.defocus_u).all()
    # other settings (or --overwrite) refine again; the thread count does not matter
    other = run_refine(
        star,
        tmp_path / "o",
        reference=ref,
        settings=RefineSettings(rounds=1, mag_iterations=1, defocus_search=200.0),
    )
    assert other.resumed == []
    threads = run_refine(star, tmp_path / "o", reference=ref,
                         settings=RefineSettings(rounds=1, mag_iterations=1, defocus_search=200.0,
                                                 threads=2))  # fmt: skip
    assert threads.resumed == [1, 2]
    assert run_refine(star, tmp_path / "o", reference=ref, settings=SETTINGS,
                      resume=False).resumed == []  # fmt: skip


def test_kill_9_resumes_at_the_unfinished_group(two_groups, tmp_path) -> None:
    star, ref = two_groups
    ref_run = subprocess.run(_cmd(star, ref, tmp_path / "ref", "-q"), capture_output=True,
                             text=True)  # fmt: skip
    assert ref_run.returncode == 0, ref_run.stderr
    out = tmp_path / "out"
    p = subprocess.Popen(_cmd(star, ref, out, "-q"), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and p.poll() is None:
        if (out / STATE_DIR / "group1.json").is_file():
            break
        time.sleep(0.005)
    if p.poll() is not None:
        pytest.skip("the run ended before it could be killed")
    os.kill(p.pid, signal.SIGKILL)
    p.communicate()
    assert not (out / STATE_DIR / "group2.json").exists()
    again = subprocess.run(_cmd(star, ref, out), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert "optics group 1: already refined by an earlier run" in again.stdout
    assert "optics group 2: already refined" not in again.stdout
    assert (out / OUT_STAR).read_text() == (tmp_path / "ref" / OUT_STAR).read_text()
    assert not [q for q in out.rglob("*") if q.is_file() and ".tmp" in q.name]


def test_a_rerun_removes_the_temporaries_of_a_killed_run_and_a_second_run_is_refused(
    two_groups, tmp_path
) -> None:
    """A kill -9 mid-write leaves ``.<name>.<random>.tmp``; the next run deletes it under the
    directory's lock, and a second run on the same directory meanwhile gets one line."""
    from anisoctf.errors import UsageError
    from anisoctf.jobs.batch_state import BatchLock

    star, ref = two_groups
    out = tmp_path / "o"
    (out / STATE_DIR).mkdir(parents=True)
    stray = [
        out / ".anisomag_group1.json.k3j9x2ab.tmp",
        out / STATE_DIR / ".group2.json.q1w2e3r4.tmp",
    ]
    for s in stray:
        s.write_text("half-writ")
    keep = out / "notes.tmp"  # not one of ours: left alone
    keep.write_text("user file")
    lock = BatchLock(out)
    lock.acquire()
    try:
        with pytest.raises(UsageError, match="lock|another|running"):
            run_refine(star, out, reference=ref, settings=SETTINGS)
        assert all(s.exists() for s in stray)
    finally:
        lock.release()
    run_refine(star, out, reference=ref, settings=SETTINGS)
    assert not any(s.exists() for s in stray)
    assert keep.read_text() == "user file"
    assert not [q for q in out.rglob("*") if q.is_file() and q.name.endswith(".tmp") and q != keep]
