"""The job behind ``anisoctf refine``: particles + reference → refined CTF and magnification.

Reads a RELION particle STAR file with 3D poses and a reference map (or two half maps), refines
each optics group (:func:`anisoctf.refine.group.refine_group`) and writes into ``DIR``:

* ``particles_ctf_refine.star``: the input file with ``_rlnDefocusU/V/Angle`` (and
  ``_rlnCtfAstigmatism`` when present) rewritten — true-frame values for the new matrix — and
  ``_rlnMagMat00..11`` set in ``data_optics`` (replaced, or appended as new columns). Every other
  line, column and value is copied as text, unchanged. RELION 3.0 files (no ``data_optics``) are
  refused for ``anisomag`` since the matrix has nowhere to go.
* ``anisomag_group<N>.json`` and ``anisomag_group<N>.png`` per optics group: the matrix,
  anisotropy, axis, per-frequency-shell evidence and Gauss–Newton history.

Half maps: with ``half_maps=(H1, H2)`` every particle is compared with the half map of its own
``_rlnRandomSubset`` (1 or 2), as RELION does, so that the comparison is never against a map
that the particle itself helped to build.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from anisoctf._lazy import pandas as pd
from anisoctf.errors import InputError
from anisoctf.io.atomic import atomic_path, write_text_atomic
from anisoctf.io.mrc import read_mrc_header, read_stack
from anisoctf.io.particles import ParticleSet, read_particles
from anisoctf.io.star import read_star_blocks
from anisoctf.io.star_patch import (
    BlockEdit,
    block_index,
    fmt_angle,
    fmt_defocus,
    fmt_exact,
    star_layout,
    write_patched_star,
)
from anisoctf.optics.magmat import RELION_MAGMAT_LABELS
from anisoctf.records.particles import ParticleBatch
from anisoctf.refine.group import GroupResult, RefineSettings, refine_group
from anisoctf.refine.projection import FourierProjector

__all__ = ["OUT_STAR", "RefineReport", "load_map", "run_refine", "write_refined_star"]

OUT_STAR = "particles_ctf_refine.star"


@dataclass
class RefineReport:
    """What :func:`run_refine` did."""

    out_star: Path
    groups: list[GroupResult] = field(default_factory=list)
    json_files: list[Path] = field(default_factory=list)
    png_files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def load_map(
    path: str | os.PathLike[str], pixel_size: float | None = None
) -> tuple[np.ndarray, float]:
    """A cubic map and its pixel size (Å); one-line InputError when it cannot serve.

    The header pixel size is used unless ``pixel_size`` is given; a header without one (0, or
    the placeholder 1.0) needs ``pixel_size``.
    """
    p = Path(path)
    h = read_mrc_header(p)
    if not (h.nx == h.ny == h.nz):
        raise InputError(
            f"the reference is {h.nx}×{h.ny}×{h.nz} voxels, not a cube; give a 3D map "
            "(a refinement's run_class001.mrc or half maps)",
            path=p,
        )
    if h.nx % 2:
        raise InputError(f"the reference box {h.nx} is odd; pad or crop it to an even box", path=p)
    apix = pixel_size
    if apix is None:
        if h.pixel_size is None or abs(h.pixel_size - 1.0) < 1e-9:
            raise InputError(
                f"the map header has no trustworthy pixel size ({h.pixel_size}); pass --ref-apix",
                path=p,
            )
        apix = float(h.pixel_size)
    vol = np.asarray(read_stack(p), dtype=np.float64)
    if not np.all(np.isfinite(vol)):
        raise InputError("NaN or Inf voxels in the map", path=p)
    return vol, float(apix)


def _check_extent(ref_box: int, ref_apix: float, box: int, apix: float, path: Path) -> None:
    ref_extent, extent = ref_box * ref_apix, box * apix
    if not 0.5 <= ref_extent / extent <= 4.0:
        raise InputError(
            f"the reference spans {ref_extent:.0f} Å ({ref_box} × {ref_apix:g} Å) but the "
            f"particles {extent:.0f} Å ({box} × {apix:g} Å): not a reference for these "
            "particles, or a wrong pixel size (--ref-apix)",
            path=path,
        )


def write_refined_star(
    ps: ParticleSet, results: Sequence[GroupResult], dst: Path, write_mag: bool
) -> None:
    """Copy ``ps.path`` to ``dst`` with the refined defocus and matrices (text-level patch)."""
    src = ps.path
    blocks_layout = star_layout(src)
    table = ps.table
    n = len(table)
    new = {
        c: pd.to_numeric(table[c]).to_numpy(dtype=np.float64).copy()
        for c in ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle")
    }
    mask = np.zeros(n, dtype=bool)
    for r in results:
        rows = np.flatnonzero(ps.group == r.group)
        new["rlnDefocusU"][rows] = r.defocus_u
        new["rlnDefocusV"][rows] = r.defocus_v
        new["rlnDefocusAngle"][rows] = r.defocus_angle
        mask[rows] = True
    replace = {
        c: (mask, v, fmt_angle if c == "rlnDefocusAngle" else fmt_defocus) for c, v in new.items()
    }
    if "rlnCtfAstigmatism" in table.columns:
        replace["rlnCtfAstigmatism"] = (mask, new["rlnDefocusU"] - new["rlnDefocusV"], fmt_defocus)
    t_index = block_index(src, blocks_layout, ps.block, table)
    edits = {t_index: BlockEdit(blocks_layout[t_index], table, replace, [])}
    if write_mag:
        optics = read_star_blocks(src)["optics"]
        o_index = block_index(src, blocks_layout, "optics", optics)
        o_groups = pd.to_numeric(optics["rlnOpticsGroup"]).to_numpy(dtype=np.int64)
        by_group = {r.group: r.mag.array for r in results}
        o_mask = np.isin(o_groups, list(by_group))
        o_replace = {}
        o_append = []
        for label, (i, j) in zip(
            RELION_MAGMAT_LABELS, ((0, 0), (0, 1), (1, 0), (1, 1)), strict=True
        ):
            if label in optics.columns:
                old = pd.to_numeric(optics[label]).to_numpy(dtype=np.float64)
            else:
                old = np.full(len(optics), 1.0 if i == j else 0.0)
            vals = np.array(
                [
                    by_group[g][i, j] if g in by_group else old[k]
                    for k, g in enumerate(o_groups.tolist())
                ]
            )
            if label in optics.columns:
                o_replace[label] = (o_mask, vals, fmt_exact)
            else:
                o_append.append((label, vals, fmt_exact))
        edits[o_index] = BlockEdit(blocks_layout[o_index], optics, o_replace, o_append)
    write_patched_star(src, dst, edits)


def _plot(result: GroupResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ev = [e for e in result.evidence if np.isfinite(e.get("anisotropy_percent", np.nan))]
    fig, grid = plt.subplots(2, 3, figsize=(13, 7.6))
    axes = grid[0]
    m = result.mag
    if ev:
        res = np.array([e["resolution"] for e in ev])
        an = np.array([e["anisotropy_along_axis_percent"] for e in ev])
        asd = np.array([e["anisotropy_along_axis_sd"] for e in ev])
        ax_ = np.array([e["axis_deg"] for e in ev])
        axsd = np.array([e["axis_sd"] for e in ev])
        x = 1.0 / res
        axes[0].errorbar(x, an, yerr=asd, fmt="o", capsize=3, label="per shell")
        axes[0].axhline(m.anisotropy_percent, color="C1", label="all shells")
        axes[0].set_xlabel("spatial frequency (1/Å)")
        axes[0].set_ylabel("anisotropy along the axis (%)")
        axes[0].legend(fontsize=8)
        axd = (ax_ - m.axis_deg + 90.0) % 180.0 - 90.0 + m.axis_deg
        axes[1].errorbar(x, axd, yerr=axsd, fmt="o", capsize=3)
        axes[1].axhline(m.axis_deg, color="C1")
        axes[1].set_xlabel("spatial frequency (1/Å)")
        axes[1].set_ylabel("axis (deg)")
    it = result.history
    if it:
        axes[2].plot(range(1, len(it) + 1), [h["anisotropy_percent"] for h in it], "o-")
        axes[2].set_xlabel("Gauss–Newton step")
        axes[2].set_ylabel("anisotropy (%)")
    disp = result.displacement
    if disp is not None:
        obs = np.hypot(
            np.array(disp["observed_x"], dtype=float), np.array(disp["observed_y"], dtype=float)
        )
        mod = np.hypot(
            np.array(disp["model_x"], dtype=float), np.array(disp["model_y"], dtype=float)
        )
        kx = np.array(disp["kx"], dtype=float)
        ky = np.array(disp["ky"], dtype=float)
        ext = [np.nanmin(kx), np.nanmax(kx), np.nanmin(ky), np.nanmax(ky)]
        vmax = np.nanpercentile(mod, 99) * 1.5 if np.any(np.isfinite(mod)) else None
        for ax, img, title in (
            (grid[1, 0], obs, "|displacement| per bin, first step (1/Å)"),
            (grid[1, 1], mod, "|G t| of the fitted matrix (1/Å)"),
        ):
            im = ax.imshow(img, origin="lower", extent=ext, aspect="auto", vmin=0, vmax=vmax)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("kx (1/Å)")
            ax.set_ylabel("ky (1/Å)")
            fig.colorbar(im, ax=ax)
        ox = np.array(disp["observed_x"], dtype=float).ravel()
        oy = np.array(disp["observed_y"], dtype=float).ravel()
        mx = np.array(disp["model_x"], dtype=float).ravel()
        my = np.array(disp["model_y"], dtype=float).ravel()
        grid[1, 2].plot(mx, ox, ".", ms=3, label="x")
        grid[1, 2].plot(my, oy, ".", ms=3, label="y")
        lim = np.nanmax(np.abs(np.concatenate([mx, my]))) if np.any(np.isfinite(mx)) else 1.0
        grid[1, 2].plot([-lim, lim], [-lim, lim], "k-", lw=0.8)
        grid[1, 2].set_xlim(-1.5 * lim, 1.5 * lim)
        grid[1, 2].set_ylim(-3 * lim, 3 * lim)
        grid[1, 2].set_xlabel("model displacement (1/Å)")
        grid[1, 2].set_ylabel("observed displacement (1/Å)")
        grid[1, 2].legend(fontsize=8)
    else:
        for ax in grid[1]:
            ax.axis("off")
    fig.suptitle(
        f"optics group {result.group}: {result.n_particles} particles, "
        f"{m.anisotropy_percent:.3f} % along {m.axis_deg:.1f}°",
        fontsize=10,
    )
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)


def run_refine(
    star: str | os.PathLike[str],
    out: str | os.PathLike[str],
    reference: str | os.PathLike[str] | None = None,
    half_maps: tuple[str, str] | None = None,
    mask: str | os.PathLike[str] | None = None,
    settings: RefineSettings | None = None,
    ref_apix: float | None = None,
    pad: int = 2,
    log: Callable[[str], None] | None = None,
) -> RefineReport:
    """Refine a particle STAR file against a reference and write the outputs into ``out``.

    Raises
    ------
    InputError
        Missing poses, reference, stacks, optics; a reference that cannot match the particles.
    """
    say = log or (lambda _m: None)
    st = settings or RefineSettings()
    # what the user most needs to hear first: poses, then the reference, then the stacks
    ps = read_particles(star, check_stacks=False)
    ps.require_poses()
    if reference is None and half_maps is None:
        raise InputError(
            "no reference map: give --reference MAP.mrc (or --half-maps H1.mrc H2.mrc) from "
            "the refinement that produced the poses",
            path=ps.path,
        )
    ps = read_particles(star)
    if st.fit_anisomag and not any(k == "optics" for k in read_star_blocks_names(ps.path)):
        raise InputError(
            "RELION 3.0 layout (no data_optics): a magnification matrix cannot be stored; "
            "convert with relion_convert_star, or refine with --fit defocus",
            path=ps.path,
        )
    maps: dict[int, tuple[np.ndarray, float, Path]] = {}
    if half_maps is not None:
        subsets = set(np.unique(ps.subset).tolist())
        if not subsets <= {1, 2}:
            raise InputError(
                "half maps need _rlnRandomSubset 1 or 2 on every particle (found "
                f"{sorted(subsets)}); give --reference with one map instead",
                path=ps.path,
            )
        for key, hp in zip((1, 2), half_maps, strict=True):
            v, a = load_map(hp, ref_apix)
            maps[key] = (v, a, Path(hp))
    else:
        assert reference is not None
        v, a = load_map(reference, ref_apix)
        maps[0] = (v, a, Path(reference))
    mask_vol = None
    if mask is not None:
        mask_vol, _ = load_map(mask, next(iter(maps.values()))[1])
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = RefineReport(out_star=out_dir / OUT_STAR)
    projectors: dict[int, FourierProjector] = {}
    for key, (v, a, _p) in maps.items():
        if mask_vol is not None and mask_vol.shape != v.shape:
            raise InputError(f"the mask is {mask_vol.shape} but the map {v.shape}", path=mask)
        projectors[key] = FourierProjector(v, a, pad=pad, mask=mask_vol)
    for g in sorted(ps.optics):
        rows = np.flatnonzero(ps.group == g)
        if rows.size == 0:
            continue
        optics = ps.optics[g]
        box = ps.box(g)
        for _key, (v, a, p) in maps.items():
            _check_extent(v.shape[0], a, box, optics.pixel_size, p)
        which = ps.subset[rows] if half_maps is not None else np.zeros(rows.size, dtype=np.int64)
        say(f"optics group {g}: {rows.size} particles, box {box}, {optics.pixel_size:g} Å/px")

        def images(r: np.ndarray, rows: np.ndarray = rows) -> np.ndarray:
            return ps.images(rows[r])

        particles = ParticleBatch(
            angles=ps.angles[rows],  # type: ignore[index]
            origins_angst=ps.origins[rows],
            defocus_u=ps.defocus_u[rows],
            defocus_v=ps.defocus_v[rows],
            defocus_angle=ps.defocus_angle[rows],
            phase_shift=ps.phase_shift[rows],
            bfactor=ps.bfactor[rows],
            micrograph=np.asarray(ps.micrograph, dtype=object)[rows].astype(str),
            which=which,
        )
        res = refine_group(
            images, particles, optics, box, projectors, settings=st, group=g, log=say
        )
        report.groups.append(res)
        summary = res.summary()
        summary["star"] = str(ps.path)
        summary["reference"] = [str(m[2]) for m in maps.values()]
        jpath = out_dir / f"anisomag_group{g}.json"
        write_text_atomic(jpath, json.dumps(summary, indent=2) + "\n")
        report.json_files.append(jpath)
        ppath = out_dir / f"anisomag_group{g}.png"
        _plot(res, ppath)
        report.png_files.append(ppath)
    write_refined_star(ps, report.groups, report.out_star, write_mag=st.fit_anisomag)
    return report


def read_star_blocks_names(path: Path) -> list[str]:
    """Names of the data blocks of a STAR file, in order."""
    return [b.name for b in star_layout(path)]
