"""File-level jobs behind the command line: they read and write files and call the science.

* :mod:`anisoctf.jobs.estimate_micrographs`: ``anisoctf estimate`` (micrographs → CTF results);
* :mod:`anisoctf.jobs.simulate_micrographs`: ``anisoctf simulate`` (micrographs with known CTF);
* :mod:`anisoctf.jobs.batch_state`: resumable batches (per-micrograph records, fingerprints, the
  output-directory lock, leftover temporaries);
* :mod:`anisoctf.jobs.backends`: where micrographs are processed (serial, local processes, Dask);
* :mod:`anisoctf.jobs.relion_external`: ``anisoctf relion-external`` (a RELION External job).
* :mod:`anisoctf.jobs.simulate_particles`: ``anisoctf simulate-particles`` (particles with known
  poses, defocus and magnification matrix);
* :mod:`anisoctf.jobs.refine_particles`: ``anisoctf refine`` (particles against a reference).
"""

from anisoctf.jobs.estimate_micrographs import (
    STAR_NAME,
    EstimateReport,
    RowResult,
    UsageError,
    process_one,
    resolve_inputs,
    run_estimate,
)
from anisoctf.jobs.simulate_micrographs import SimulatedFile, SimulationOptions, run_simulate

__all__ = [
    "STAR_NAME",
    "EstimateReport",
    "RowResult",
    "SimulatedFile",
    "SimulationOptions",
    "UsageError",
    "process_one",
    "resolve_inputs",
    "run_estimate",
    "run_simulate",
]
