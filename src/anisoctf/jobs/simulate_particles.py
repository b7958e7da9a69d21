"""The job behind ``anisoctf simulate-particles``: particle stacks, STAR files and the truth.

Writes into ``DIR``:

* ``Particles/mic_NNN.mrcs``: the images of micrograph ``NNN`` (float32 stacks);
* ``reference.mrc``: the map the particles were projected from (the one given, or a blob map
  built by :func:`anisoctf.simulate.particles.blob_map`);
* ``particles.star``: RELION 3.1 layout, poses and origins, and the defocus a per-micrograph
  CTFFIND fit would give (observed frame, one value per micrograph, no ``_rlnMagMat``) — the
  input to ``anisoctf refine``;
* ``particles_truth.star``: the same with the true per-particle, true-frame defocus and the true
  ``_rlnMagMat`` in ``data_optics``;
* ``truth.json``: the spec, the matrix, anisotropy, axis and per-micrograph true mean defocus.

Everything is written atomically.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from anisoctf.errors import InputError
from anisoctf.io import labels as L
from anisoctf.io.atomic import write_text_atomic
from anisoctf.io.mrc import write_mrc
from anisoctf.io.star_tables import fmt_float as _fmt_float
from anisoctf.io.star_tables import format_loop as _loop
from anisoctf.simulate.particles import (
    ParticleSimSpec,
    SimulatedParticles,
    blob_map,
    simulate_particles,
)

__all__ = ["SimulatedParticleFiles", "run_simulate_particles", "write_particles_star"]


@dataclass(frozen=True)
class SimulatedParticleFiles:
    """Paths written by :func:`run_simulate_particles` and the simulation itself."""

    star: Path
    truth_star: Path
    truth_json: Path
    reference: Path
    stacks: list[Path]
    sim: SimulatedParticles


def write_particles_star(
    path: Path,
    sim: SimulatedParticles,
    image_names: list[str],
    truth: bool,
) -> None:
    """Write a RELION 3.1 particle STAR file for ``sim`` (observed input or the truth)."""
    spec = sim.spec
    o_cols = [
        L.OPTICS_GROUP,
        L.OPTICS_GROUP_NAME,
        L.AMPLITUDE_CONTRAST,
        L.SPHERICAL_ABERRATION,
        L.VOLTAGE,
        L.IMAGE_PIXEL_SIZE,
        L.IMAGE_SIZE,
        L.IMAGE_DIMENSIONALITY,
    ]
    o_row = [
        "1",
        "opticsGroup1",
        _fmt_float(spec.ac),
        _fmt_float(spec.cs),
        _fmt_float(spec.kv),
        _fmt_float(spec.apix),
        str(spec.box),
        "2",
    ]
    if truth:
        m = spec.mag.array
        o_cols += list(L.MAGMAT)
        o_row += [
            _fmt_float(m[0, 0]),
            _fmt_float(m[0, 1]),
            _fmt_float(m[1, 0]),
            _fmt_float(m[1, 1]),
        ]
    u, v, a = (
        (sim.true_u, sim.true_v, sim.true_angle) if truth else (sim.obs_u, sim.obs_v, sim.obs_angle)
    )
    p_cols = [
        L.IMAGE_NAME,
        L.MICROGRAPH_NAME,
        L.OPTICS_GROUP,
        *L.DEFOCUS,
        L.CTF_BFACTOR,
        *L.ANGLES,
        L.ORIGIN_X_ANGST,
        L.ORIGIN_Y_ANGST,
        L.RANDOM_SUBSET,
    ]
    rows = []
    for i in range(len(u)):
        rows.append(
            [
                image_names[i],
                f"Micrographs/mic_{sim.micrograph[i] + 1:03d}.mrc",
                "1",
                f"{u[i]:.6f}",
                f"{v[i]:.6f}",
                f"{a[i]:.6f}",
                _fmt_float(spec.bfactor),
                f"{sim.angles[i, 0]:.6f}",
                f"{sim.angles[i, 1]:.6f}",
                f"{sim.angles[i, 2]:.6f}",
                f"{sim.origins[i, 0]:.6f}",
                f"{sim.origins[i, 1]:.6f}",
                str(1 + i % 2),
            ]
        )
    lines = _loop("optics", o_cols, [o_row]) + _loop("particles", p_cols, rows)
    write_text_atomic(path, "\n".join(lines) + "\n")


def run_simulate_particles(
    spec: ParticleSimSpec,
    out: str | os.PathLike[str],
    map_path: str | os.PathLike[str] | None = None,
    map_apix: float | None = None,
) -> SimulatedParticleFiles:
    """Simulate ``spec`` and write the files listed in the module notes."""
    from anisoctf.jobs.refine_particles import load_map  # the map rules live there
    from anisoctf.refine.projection import FourierProjector

    out_dir = Path(out)
    (out_dir / "Particles").mkdir(parents=True, exist_ok=True)
    if map_path is not None:
        vol, apix = load_map(map_path, map_apix)
    else:
        vol, apix = blob_map(spec.box, seed=spec.seed + 1), spec.apix
    try:
        projector = FourierProjector(vol, apix)
        sim = simulate_particles(spec, projector)
    except ValueError as exc:
        raise InputError(str(exc), path=map_path) from None
    ref = out_dir / "reference.mrc"
    write_mrc(ref, vol.astype(np.float32), apix, stack=False)
    names = [""] * spec.n
    stacks = []
    for m in range(spec.n_micrographs):
        rows = np.flatnonzero(sim.micrograph == m)
        if rows.size == 0:
            continue
        rel = f"Particles/mic_{m + 1:03d}.mrcs"
        write_mrc(out_dir / rel, sim.images[rows], spec.apix)
        stacks.append(out_dir / rel)
        for j, r in enumerate(rows.tolist()):
            names[r] = f"{j + 1:06d}@{rel}"
    star = out_dir / "particles.star"
    truth_star = out_dir / "particles_truth.star"
    write_particles_star(star, sim, names, truth=False)
    write_particles_star(truth_star, sim, names, truth=True)
    tj = out_dir / "truth.json"
    write_text_atomic(tj, json.dumps(sim.truth_json(), indent=2) + "\n")
    return SimulatedParticleFiles(star, truth_star, tj, ref, stacks, sim)
