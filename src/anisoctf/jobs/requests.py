"""What a command asks a job to do: the request objects, and the option types the CLI needs.

The command line (:mod:`anisoctf.cli`) only parses options, builds one request and calls one
job. The option types it needs to build a request (:class:`FitSettings`, :class:`LocalSettings`,
:class:`RefineSettings`, :class:`ParticleSimSpec`) are re-exported here, so that the CLI imports
jobs and never the science packages (the import contract in ``pyproject.toml``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from anisoctf.errors import UsageError
from anisoctf.fit.result import FitSettings
from anisoctf.jobs.cluster import ClusterSpec
from anisoctf.local.estimate import LocalSettings
from anisoctf.refine.group import RefineSettings
from anisoctf.simulate.particles import ParticleSimSpec

__all__ = [
    "EstimateRequest",
    "FitSettings",
    "LocalSettings",
    "ParticleSimSpec",
    "RefineSettings",
    "UsageError",
    "mag_matrix_rows",
]

#: a 2×2 matrix as rows, ``((M00, M01), (M10, M11))``
MatrixRows = tuple[tuple[float, float], tuple[float, float]]


def mag_matrix_rows(values: Sequence[float] | None) -> MatrixRows | None:
    """The four numbers of ``--mag-matrix M00 M01 M10 M11`` as the rows of the 2×2 matrix.

    The one converter of the four-number option (RELION's ``_rlnMagMat00..11`` order,
    ``k_true = M k_obs``); None stays None. Validation is the matrix type's
    (:class:`~anisoctf.optics.magmat.MagMat`), where the matrix is used.

    Raises
    ------
    UsageError
        Not exactly four numbers.
    """
    if values is None:
        return None
    v = tuple(float(x) for x in values)
    if len(v) != 4:
        raise UsageError(f"--mag-matrix takes four numbers M00 M01 M10 M11, got {len(v)}")
    return ((v[0], v[1]), (v[2], v[3]))


@dataclass(frozen=True)
class EstimateRequest:
    """One ``anisoctf estimate`` job (see :func:`anisoctf.jobs.estimate_batch.run_batch`).

    Attributes
    ----------
    inputs
        MRC files / glob patterns, one RELION micrographs ``.star`` file or one cryoSPARC
        exposures ``.cs`` file.
    out_dir
        Output directory (created if needed); locked for the duration of the run.
    settings
        Fit settings.
    apix, kv, cs, ac
        Optics from the command line (see :func:`anisoctf.jobs.inputs.resolve_inputs`).
    mag_matrix
        Magnification matrix (2×2, ``k_true = M k_obs``) for every micrograph, or None.
    jobs
        Micrographs processed at once (separate processes when > 1; Dask workers of a local
        cluster with ``scheduler="local"``).
    quiet
        No progress bar, warnings or summary; failures are still printed.
    debug
        Print tracebacks of unexpected errors.
    local
        Also fit each micrograph's local defocus (``--patches``, ``--tilt``, ``--thickness``).
    overwrite
        Redo every micrograph. By default (``--continue``) a micrograph whose record in the
        output directory has the same parameters and input file is not processed again.
    watch
        Keep polling the inputs for new micrographs and stop after this many seconds without
        any (None: one pass).
    scheduler
        Dask scheduler address, ``"local"`` for a local Dask cluster or ``"slurm"`` for
        workers submitted as SLURM jobs; None for local processes.
    cluster
        SLURM resources for ``scheduler="slurm"`` (:class:`~anisoctf.jobs.cluster.ClusterSpec`).
    poll_seconds
        Watch mode: time between polls (default min(2 s, watch / 4)).
    use_non_dw
        Fit the non-dose-weighted sums that a STAR (``_rlnMicrographNameNoDW``) or ``.cs``
        (``micrograph_blob_non_dw/path``) input lists; the output names the dose-weighted
        micrographs either way.
    mag_from
        ``--mag-from``: a refined particles STAR, cryoSPARC particles ``.cs`` or refine/detect
        JSON whose matrices go to the optics groups (:mod:`anisoctf.jobs.mag_from`).
    """

    inputs: tuple[str, ...]
    out_dir: Path
    settings: FitSettings = field(default_factory=FitSettings)
    apix: float | None = None
    kv: float | None = None
    cs: float | None = None
    ac: float | None = None
    mag_matrix: object | None = None
    jobs: int = 1
    quiet: bool = False
    debug: bool = False
    local: LocalSettings | None = None
    overwrite: bool = False
    watch: float | None = None
    scheduler: str | None = None
    poll_seconds: float | None = None
    use_non_dw: bool = True
    cluster: ClusterSpec | None = None
    mag_from: str | None = None

    @classmethod
    def of(
        cls,
        inputs: Sequence[str | os.PathLike[str]],
        out_dir: str | os.PathLike[str],
        settings: FitSettings,
        **options: object,
    ) -> EstimateRequest:
        """The request for ``inputs`` → ``out_dir`` with ``settings`` and keyword options."""
        return cls(tuple(str(x) for x in inputs), Path(out_dir), settings, **options)

    def optics_overrides(self) -> dict[str, object]:
        """The keywords of :func:`~anisoctf.jobs.inputs.resolve_inputs`: the command line's
        optics (``apix``, ``kv``, ``cs``, ``ac``, ``mag_matrix``) and ``use_non_dw``."""
        return {
            "use_non_dw": self.use_non_dw,
            "apix": self.apix,
            "kv": self.kv,
            "cs": self.cs,
            "ac": self.ac,
            "mag_matrix": self.mag_matrix,
            "mag_from": self.mag_from,
        }
