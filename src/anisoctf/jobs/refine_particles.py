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

from anisoctf.errors import InputError
from anisoctf.io import labels as L
from anisoctf.io.atomic import write_text_atomic
from anisoctf.io.mrc import read_mrc_header, read_stack
from anisoctf.io.particles import ParticleSet, read_particles
from anisoctf.io.postprocess_star import read_fsc_star
from anisoctf.io.star_patch import fmt_defocus, patch_defocus_star, star_layout
from anisoctf.io.star_tables import read_star_blocks
from anisoctf.jobs.batch_state import lock_output, remove_stray_temporaries
from anisoctf.jobs.refine_state import STATE_DIR, group_fingerprint, load_group, save_group
from anisoctf.records.fsc import FscCurve
from anisoctf.records.particles import ParticleBatch
from anisoctf.refine.fsc import half_map_fsc
from anisoctf.refine.group import GroupResult, RefineSettings, refine_group
from anisoctf.refine.projection import FourierProjector
from anisoctf.report.refine_plots import plot_refined_group

__all__ = ["OUT_STAR", "RefineReport", "load_map", "run_refine", "write_refined_star"]

OUT_STAR = "particles_ctf_refine.star"
#: ``fsc`` value that computes the FSC from the half maps
HALF_MAPS_FSC = "half-maps"


@dataclass
class RefineReport:
    """What :func:`run_refine` did."""

    out_star: Path
    groups: list[GroupResult] = field(default_factory=list)
    json_files: list[Path] = field(default_factory=list)
    png_files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    resumed: list[int] = field(default_factory=list)  # optics groups taken from saved state


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
    """Copy ``ps.path`` to ``dst`` with the refined defocus and matrices (text-level patch,
    :func:`~anisoctf.io.star_patch.patch_defocus_star`)."""
    u, v, ang = (ps.defocus_u.copy(), ps.defocus_v.copy(), ps.defocus_angle.copy())
    mask = np.zeros(len(ps.table), dtype=bool)
    sd = np.zeros(len(ps.table))
    for r in results:
        rows = np.flatnonzero(ps.group == r.group)
        u[rows] = r.defocus_u
        v[rows] = r.defocus_v
        ang[rows] = r.defocus_angle
        mask[rows] = True
        if r.defocus_sd is not None:
            sd[rows] = r.defocus_sd
    # the posterior SD of each refined defocus; 0 where a group had none (ml mode)
    columns = (
        {L.DEFOCUS_ERROR: (sd, fmt_defocus)}
        if any(r.defocus_sd is not None for r in results)
        else None
    )
    if not write_mag:
        patch_defocus_star(ps.path, dst, ps.block, ps.table, mask, (u, v, ang), columns=columns)
        return
    optics = read_star_blocks(ps.path)["optics"]
    mags = {r.group: r.mag for r in results}
    patch_defocus_star(
        ps.path, dst, ps.block, ps.table, mask, (u, v, ang), optics, mags, columns=columns
    )


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
    resume: bool = True,
    fsc: str | os.PathLike[str] | None = None,
) -> RefineReport:
    """Refine a particle STAR file against a reference and write the outputs into ``out``.

    With ``resume`` (``--continue``, the default) an optics group that an earlier run into the
    same ``out`` already refined with the same inputs and settings is taken from its saved
    state instead of being refined again (:mod:`anisoctf.jobs.refine_state`), so a killed run
    resumes at its first unfinished group.

    ``fsc`` weights the comparison by the reference's FSC (RELION CtfRefine's ``--f``): the
    path of a RELION post-process STAR, or ``"half-maps"`` to compute it from ``half_maps``
    (multiplied by ``mask`` when given); see :mod:`anisoctf.refine.fsc`.

    Raises
    ------
    InputError
        Missing poses, reference, stacks, optics; a reference that cannot match the particles;
        ``fsc="half-maps"`` without half maps; an unreadable post-process STAR.
    """
    say = log or (lambda _m: None)
    st = settings or RefineSettings()
    # what the user most needs to hear first: poses, then the reference, then the stacks
    ps = read_particles(star, check_stacks=False)
    ps.require_poses()
    _refuse_premultiplied(ps)
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
    curve = _fsc_curve(fsc, maps, half_maps, mask_vol, mask, ps.path)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = lock_output(out_dir)
    try:
        for folder in (out_dir, out_dir / STATE_DIR):
            remove_stray_temporaries(folder)  # left by a killed run; we hold the lock
        return _refine_groups(
            ps, maps, mask, mask_vol, out_dir, st, pad, ref_apix, half_maps, resume, say, curve
        )
    finally:
        lock.release()


def _refine_groups(
    ps: ParticleSet,
    maps: dict[int, tuple[np.ndarray, float, Path]],
    mask: str | os.PathLike[str] | None,
    mask_vol: np.ndarray | None,
    out_dir: Path,
    st: RefineSettings,
    pad: int,
    ref_apix: float | None,
    half_maps: tuple[str, str] | None,
    resume: bool,
    say: Callable[[str], None],
    curve: FscCurve | None = None,
) -> RefineReport:
    """Refine every optics group of ``ps`` into ``out_dir`` (under the directory's lock)."""
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
        key = group_fingerprint(
            ps.path, [m[2] for m in maps.values()] + ([] if mask is None else [Path(mask)]),
            st, g, pad=pad, ref_apix=ref_apix, half_maps=half_maps is not None,
            fsc=None if curve is None else [curve.source, curve.fsc.tolist()],
        )  # fmt: skip
        res = load_group(out_dir, g, key) if resume else None
        if res is not None:
            say(f"optics group {g}: already refined by an earlier run (--overwrite redoes it)")
            report.resumed.append(g)
        else:
            res = refine_group(
                images, particles, optics, box, projectors, settings=st, group=g, log=say,
                fsc=curve,
            )  # fmt: skip
            save_group(out_dir, res, key)
        report.groups.append(res)
        summary = res.summary()
        summary["star"] = str(ps.path)
        summary["reference"] = [str(m[2]) for m in maps.values()]
        jpath = out_dir / f"anisomag_group{g}.json"
        write_text_atomic(jpath, json.dumps(summary, indent=2) + "\n")
        report.json_files.append(jpath)
        ppath = out_dir / f"anisomag_group{g}.png"
        plot_refined_group(res, ppath)
        report.png_files.append(ppath)
    write_refined_star(ps, report.groups, report.out_star, write_mag=st.fit_anisomag)
    return report


def _fsc_curve(
    fsc: str | os.PathLike[str] | None,
    maps: dict[int, tuple[np.ndarray, float, Path]],
    half_maps: tuple[str, str] | None,
    mask_vol: np.ndarray | None,
    mask: str | os.PathLike[str] | None,
    star: Path,
) -> FscCurve | None:
    """The FSC that weights the comparison: read, computed from the half maps, or none."""
    if fsc is None:
        return None
    if str(fsc) == HALF_MAPS_FSC:
        if half_maps is None:
            raise InputError(
                "--fsc half-maps needs --half-maps H1.mrc H2.mrc (or give --fsc "
                "postprocess.star)",
                path=star,
            )
        (v1, a1, p1), (v2, _a2, p2) = maps[1], maps[2]
        if v1.shape != v2.shape:
            raise InputError(
                f"the half maps are {v1.shape} and {v2.shape}; give two of one size", path=p2
            )
        if mask_vol is not None and mask_vol.shape != v1.shape:
            raise InputError(
                f"the mask is {mask_vol.shape} but the half maps {v1.shape}", path=mask
            )
        curve = half_map_fsc(v1, v2, a1, mask_vol)
        return FscCurve(curve.k_inv_A, curve.fsc, source=f"half maps {p1.name}, {p2.name}")
    return read_fsc_star(fsc)


def read_star_blocks_names(path: Path) -> list[str]:
    """Names of the data blocks of a STAR file, in order."""
    return [b.name for b in star_layout(path)]


def _refuse_premultiplied(ps: ParticleSet) -> None:
    """Refuse stacks that RELION marks as already multiplied by the CTF.

    ``_rlnCtfDataAreCtfPremultiplied = 1`` (optics table, or a particle column in the 3.0
    layout) means each image carries CTF², not CTF (RELION ``ctffind``/``extract`` with
    ``--premultiply_ctf``, used for subtomogram averaging); the particle model here predicts
    ``CTF · projection``, so fitting such images would be wrong (issue 13 item 9).
    """
    if ps.premultiplied_in is not None:
        raise InputError(
            f"_rlnCtfDataAreCtfPremultiplied = 1 in data_{ps.premultiplied_in}: the images "
            "are already multiplied by the CTF, which refine cannot model; re-extract the "
            "particles without CTF premultiplication",
            path=ps.path,
        )
