"""The file-level job behind ``anisoctf estimate``: micrographs in, CTF results out.

The job is split by concern; this module keeps the names other modules import:

* :mod:`anisoctf.jobs.inputs`: the command line's inputs as micrographs with optics (globs,
  STAR, cryoSPARC ``.cs``, ``.mrcs``, optics overrides, the magnification matrix);
* :mod:`anisoctf.jobs.micrograph`: one micrograph (:func:`process_one`) and its outputs;
* :mod:`anisoctf.jobs.ctf_image`: the diagnostic ``.ctf`` image;
* :mod:`anisoctf.jobs.estimate_batch`: the batch (resumable, locked, watch mode), its progress
  and summary, taking one :class:`~anisoctf.jobs.requests.EstimateRequest`.

A magnification matrix (``--mag-matrix``, else the ``_rlnMagMat00..11`` of a STAR file's optics
group) is passed to the fit, which then works on true-frame frequencies: the defoci written are
true-frame values, and ``micrographs_ctf.star`` carries the matrix in its optics table.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from anisoctf.errors import UsageError
from anisoctf.fit.result import FitSettings
from anisoctf.jobs.ctf_image import ctf_image_array
from anisoctf.jobs.estimate_batch import (
    CS_NAME,
    STAR_NAME,
    EstimateReport,
    _sigterm_as_interrupt,  # noqa: F401 - imported from here by tests
    run_batch,
)
from anisoctf.jobs.inputs import (
    DEFAULT_AMPLITUDE_CONTRAST,
    DEFAULT_CS_MM,
    DEFAULT_VOLTAGE_KV,
    MicrographTask,
    ResolvedInputs,
    resolve_inputs,
)
from anisoctf.jobs.micrograph import RowResult, process_one
from anisoctf.jobs.requests import EstimateRequest

__all__ = [
    "DEFAULT_AMPLITUDE_CONTRAST",
    "DEFAULT_CS_MM",
    "DEFAULT_VOLTAGE_KV",
    "CS_NAME",
    "STAR_NAME",
    "EstimateReport",
    "EstimateRequest",
    "MicrographTask",
    "ResolvedInputs",
    "RowResult",
    "UsageError",
    "ctf_image_array",
    "process_one",
    "resolve_inputs",
    "run_batch",
    "run_estimate",
]

#: keywords of :func:`run_estimate` that are not part of the request
_RUNTIME = ("console", "err_console", "backend", "process_fn")


def run_estimate(
    inputs: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    settings: FitSettings,
    **options: object,
) -> EstimateReport:
    """Compatibility form of :func:`~anisoctf.jobs.estimate_batch.run_batch` for tests and
    benchmarks: the request's fields (``apix``, ``jobs``, ``quiet``, ``watch``, ...) and
    ``run_batch``'s keywords (``console``, ``err_console``, ``backend``, ``process_fn``) as
    keyword arguments."""
    runtime = {k: options.pop(k) for k in _RUNTIME if k in options}
    request = EstimateRequest.of(inputs, out_dir, settings, **options)
    return run_batch(request, **runtime)  # type: ignore[arg-type]

