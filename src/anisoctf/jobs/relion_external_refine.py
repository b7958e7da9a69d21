"""``anisoctf refine`` as a RELION 4/5 *External* job: CtfRefine-like, from RELION's GUI.

RELION runs it from the project directory as::

    anisoctf relion-external-refine --o External/job031/
        --in_parts Refine3D/job029/run_data.star --in_3dref Refine3D/job029/run_class001.mrc
        [--in_mask MaskCreate/job030/mask.mrc] [--j 4] [--<label> <value> ...]

It refines the particles against the reference (:func:`~anisoctf.jobs.refine_particles.run_refine`)
into the job directory: ``particles_ctf_refine.star`` (true-frame defocus, the optics groups'
``_rlnMagMat``, every other column as it was), and per optics group
``anisomag_group<N>.json``/``.png``. Then, following RELION's contract for External jobs (as
:mod:`anisoctf.jobs.relion_external` does for CTF estimation):

* ``RELION_OUTPUT_NODES.star`` names ``particles_ctf_refine.star`` as a
  ``ParticleGroupMetadata.star.relion`` node, so a later Refine3D or Polish job takes it;
* ``RELION_JOB_EXIT_SUCCESS`` when it was written, else ``RELION_JOB_EXIT_FAILURE`` (the
  reason on stderr); ``RELION_JOB_ABORT_NOW`` stops the job with ``RELION_JOB_EXIT_ABORTED``.

Parameters (the Params tab's ``--label value`` pairs, dashes or underscores alike): ``fit``
(comma-separated ``defocus``, ``astigmatism``, ``anisomag``; default ``defocus,anisomag``),
``min_res``, ``max_res``, ``rounds``, ``defocus_range`` (± Å) and ``ref_apix``. ``--j`` is the
number of threads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from anisoctf.errors import AnisoctfError, UsageError
from anisoctf.jobs.refine_particles import OUT_STAR, run_refine
from anisoctf.jobs.relion_external import run_external_job
from anisoctf.jobs.requests import RefineSettings

__all__ = ["PARTICLES_NODE_TYPE", "parse_refine_params", "run_relion_external_refine"]

#: RELION 4/5 node type label of a particles table
PARTICLES_NODE_TYPE = "ParticleGroupMetadata.star.relion"

_FITS = ("defocus", "astigmatism", "anisomag")
_FLOATS = {"min_res": "min_res", "max_res": "max_res", "defocus_range": "defocus_search"}
_IGNORED = {"pipeline_control"}


def parse_refine_params(args: Sequence[str]) -> tuple[RefineSettings, float | None]:
    """The Params tab's ``--label value`` pairs as refine settings and the reference pixel size.

    Raises
    ------
    UsageError
        An unknown label, a label without value, a value of the wrong type, an unknown fit.
    """
    kw: dict[str, object] = {}
    fits = {"defocus", "anisomag"}
    ref_apix: float | None = None
    items = list(args)
    if len(items) % 2:
        raise UsageError(f"parameters are '--label value' pairs, got {' '.join(items)!r}")
    for token, value in zip(items[::2], items[1::2], strict=True):
        if not token.startswith("--"):
            raise UsageError(f"unexpected argument {token!r}; parameters are '--label value'")
        label = token[2:].replace("-", "_")
        if label in _IGNORED:
            continue
        try:
            if label == "fit":
                fits = {f.strip() for f in value.split(",") if f.strip()}
                if not fits or fits - set(_FITS):
                    raise UsageError(f"--fit takes {', '.join(_FITS)}, got {value!r}")
            elif label in _FLOATS:
                kw[_FLOATS[label]] = float(value)
            elif label == "rounds":
                kw["rounds"] = int(value)
            elif label == "ref_apix":
                ref_apix = float(value)
            else:
                known = ", ".join(["fit", *_FLOATS, "rounds", "ref_apix"])
                raise UsageError(f"unknown parameter --{label}; known: {known}")
        except ValueError:
            raise UsageError(f"--{label} needs a number, got {value!r}") from None
    try:
        settings = RefineSettings(
            fit_defocus="defocus" in fits,
            fit_astigmatism="astigmatism" in fits,
            fit_anisomag="anisomag" in fits,
            **kw,  # type: ignore[arg-type]
        )
    except (TypeError, ValueError) as exc:
        raise UsageError(f"bad parameters: {exc}") from None
    return settings, ref_apix


def run_relion_external_refine(
    in_parts: str,
    job_dir: str,
    *,
    in_3dref: str | None,
    in_mask: str | None = None,
    threads: int = 1,
    params: Sequence[str] = (),
    err_console: Console | None = None,
) -> int:
    """Run the External job; return the exit status (0 success, 2 bad input or parameters,
    130 aborted). The ``RELION_JOB_EXIT_*`` file is written in every case."""
    err = err_console or Console(stderr=True, highlight=False, soft_wrap=True)

    def body(out: Path) -> list[tuple[str, str]]:
        settings, ref_apix = parse_refine_params(params)
        if in_3dref is None:
            raise UsageError(
                "no reference: give the refinement's map as the job's 3D reference (--in_3dref)"
            )
        settings = dataclasses.replace(settings, threads=max(1, int(threads)))
        report = run_refine(
            in_parts,
            out,
            reference=in_3dref,
            mask=in_mask,
            settings=settings,
            ref_apix=ref_apix,
            log=lambda m: err.print(m, markup=False),
        )
        for r in report.groups:
            err.print(f"optics group {r.group}: {r.mag.describe()}", markup=False)
        return [((out / OUT_STAR).as_posix(), PARTICLES_NODE_TYPE)]

    return run_external_job(
        job_dir,
        err,
        body,
        abort_hint="rerun the job to refine again",
        catch=(AnisoctfError, ValueError),
    )
