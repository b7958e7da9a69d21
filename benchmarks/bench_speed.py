"""Speed and memory of `anisoctf estimate` on 4096² micrographs, as multiples of one FFT.

Reference: one single-threaded ``scipy.fft.rfft2`` of a 4096² float32 image, timed in the same
run between the jobs (median of 7 transforms each time); each ``--jobs 1`` run is divided by the
references timed just before and after it, and the median of those ratios is reported. Measured:

* whole-process time per micrograph: ``anisoctf estimate`` (a fresh process: start-up, reading
  the MRC files, estimation, all outputs) on a batch of N micrographs with ``--jobs 1``, divided
  by N; reported in FFT units (target ≤ 4; CTFFIND 5 takes about 13.7 here);
* the speed-up of ``--jobs 2`` over ``--jobs 1`` on the same batch (target ≥ 1.6);
* peak resident memory of the process that estimates (target ≤ 1 GiB per worker).

The machine is shared and noisy: each job is run ``--repeats`` times and the median is used.
The package's modules are byte-compiled first (``compileall``, into their ``__pycache__``), as
``pip install`` does: with ``PYTHONDONTWRITEBYTECODE`` set, a source checkout would otherwise
recompile every module in every process, which no installed copy does.

Usage::

    python benchmarks/bench_speed.py --n 8 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.fft as sfft

from anisoctf import CTFParams, MicrographSpec, Optics, simulate_micrograph
from anisoctf.io import write_mrc


def fft_reference(size: int, repeats: int = 7) -> float:
    x = np.random.default_rng(0).standard_normal((size, size)).astype(np.float32)
    sfft.rfft2(x, workers=1)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sfft.rfft2(x, workers=1)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def make_batch(folder: Path, n: int, size: int, seed: int) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        z = rng.uniform(5000, 40000)
        ast = rng.uniform(0, 2000)
        spec = MicrographSpec(
            shape=(size, size),
            optics=Optics(1.0, (200.0, 300.0)[i % 2], 2.7, 0.07),
            ctf=CTFParams(z + ast / 2, z - ast / 2, rng.uniform(0, 180), 0.0, 60.0),
            seed=int(rng.integers(2**31)),
        )
        p = folder / f"mic_{i:03d}.mrc"
        write_mrc(p, simulate_micrograph(spec).image, 1.0)
        paths.append(p)
    return paths


def run_job(paths: list[Path], out: Path, jobs: int) -> tuple[float, float]:
    """Wall time (s) and peak RSS (MiB) of one `anisoctf estimate` process tree."""
    if out.exists():
        shutil.rmtree(out)
    cmd = [
        sys.executable,
        "-m",
        "anisoctf.cli.main",
        "estimate",
        *map(str, paths),
        "--out",
        str(out),
        "--apix",
        "1.0",
        "--kv",
        "300",
        "--jobs",
        str(jobs),
        "--quiet",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    timer = shutil.which("time") or ("/usr/bin/time" if Path("/usr/bin/time").exists() else None)
    if timer:  # GNU time reports the peak RSS of the process that used the most (in KiB)
        cmd = [timer, "-f", "PEAK_KIB %M", *cmd]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if proc.returncode not in (0, 1):
        raise SystemExit(f"estimate failed ({proc.returncode}): {proc.stderr.strip()}")
    peak = float("nan")
    for line in proc.stderr.splitlines():
        if line.startswith("PEAK_KIB"):
            peak = float(line.split()[1]) / 1024.0
    if not timer:
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
    return dt, peak


def precompile() -> None:
    """Byte-compile the anisoctf package being measured, as an install would have it (into its
    ``__pycache__`` folders, which git ignores; a pycache prefix would not do: it hides the
    byte code of numpy and every other installed package as well)."""
    import compileall

    import anisoctf

    compileall.compile_dir(Path(anisoctf.__file__).parent, quiet=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=7)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        precompile()
        paths = make_batch(folder, a.n, a.size, a.seed)
        refs, t1, t2, peaks = [fft_reference(a.size)], [], [], []
        for _ in range(a.repeats):  # the reference is timed between the jobs: the machine's
            dt, peak = run_job(paths, folder / "out1", 1)  # speed drifts over minutes
            t1.append(dt)
            peaks.append(peak)
            refs.append(fft_reference(a.size))
            dt, _ = run_job(paths, folder / "out2", 2)
            t2.append(dt)
            refs.append(fft_reference(a.size))
    # each --jobs 1 run against the references timed just before and after it
    ratios = [t1[i] / a.n / (0.5 * (refs[2 * i] + refs[2 * i + 1])) for i in range(a.repeats)]
    ref = float(np.median(refs))
    per_mic = float(np.median(t1)) / a.n
    print(
        f"reference rfft2 {a.size}² float32, 1 thread: {ref * 1e3:.1f} ms "
        f"(median of {len(refs)} timings, {min(refs) * 1e3:.0f}–{max(refs) * 1e3:.0f} ms)"
    )
    print(
        f"--jobs 1: {np.median(t1):.2f} s for {a.n} micrographs = {per_mic:.3f} s each "
        f"= {np.median(ratios):.2f} FFT-equivalents (median of {a.repeats} runs, each against "
        f"the reference timed beside it: {', '.join(f'{r:.2f}' for r in ratios)}; "
        "target ≤ 4; CTFFIND 5 ≈ 13.7)"
    )
    speedups = [t1[i] / t2[i] for i in range(a.repeats)]
    print(
        f"--jobs 2: {np.median(t2):.2f} s, speed-up {np.median(t1) / np.median(t2):.2f}× "
        f"(runs: {', '.join(f'{r:.2f}' for r in speedups)}; target ≥ 1.6)"
    )
    print(f"peak memory of one estimating process: {max(peaks):.0f} MiB (target ≤ 1024)")


if __name__ == "__main__":
    main()
