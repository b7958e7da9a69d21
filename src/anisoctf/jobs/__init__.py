"""File-level jobs behind the command line: they read and write files and call the science.

Each command's job takes one request object; the command line only builds it and prints.

* :mod:`anisoctf.jobs.requests`: the request objects and the option types the CLI needs;
* ``anisoctf estimate``: :mod:`anisoctf.jobs.inputs` (inputs → micrographs with optics),
  :mod:`anisoctf.jobs.micrograph` (one micrograph and its outputs),
  :mod:`anisoctf.jobs.ctf_image` (the diagnostic ``.ctf`` image),
  :mod:`anisoctf.jobs.estimate_batch` (the resumable batch); the names others import are
  re-exported by :mod:`anisoctf.jobs.estimate_micrographs`;
* :mod:`anisoctf.jobs.simulate_micrographs`: ``anisoctf simulate`` (micrographs with known CTF);
* :mod:`anisoctf.jobs.demo`: ``anisoctf demo`` (simulate, estimate, compare with the truth);
* :mod:`anisoctf.jobs.detect`: ``anisoctf aniso detect`` (CTF tables → anisomag);
* :mod:`anisoctf.jobs.compare`: ``anisoctf aniso compare``;
* :mod:`anisoctf.jobs.batch_state`: resumable batches (per-micrograph records, fingerprints, the
  output-directory lock, leftover temporaries);
* :mod:`anisoctf.jobs.backends`: where micrographs are processed (serial, the one local process
  pool, Dask);
* :mod:`anisoctf.jobs.process_exit`: how a command process ends (fast exit);
* :mod:`anisoctf.jobs.relion_external`: ``anisoctf relion-external`` (a RELION External job).
* :mod:`anisoctf.jobs.simulate_particles`: ``anisoctf simulate-particles`` (particles with known
  poses, defocus and magnification matrix);
* :mod:`anisoctf.jobs.refine_particles`: ``anisoctf refine`` (particles against a reference).
"""

from anisoctf.jobs.estimate_batch import run_batch
from anisoctf.jobs.estimate_micrographs import (
    STAR_NAME,
    EstimateReport,
    RowResult,
    UsageError,
    process_one,
    resolve_inputs,
    run_estimate,
)
from anisoctf.jobs.requests import EstimateRequest
from anisoctf.jobs.simulate_micrographs import SimulatedFile, SimulationOptions, run_simulate

__all__ = [
    "STAR_NAME",
    "EstimateReport",
    "EstimateRequest",
    "RowResult",
    "SimulatedFile",
    "SimulationOptions",
    "UsageError",
    "process_one",
    "resolve_inputs",
    "run_batch",
    "run_estimate",
    "run_simulate",
]
