"""anisoctf as a RELION 4/5 *External* job: CTF estimation inside a RELION pipeline.

RELION runs an External job's program from the project directory as::

    anisoctf relion-external --o External/job012/
        --in_mics MotionCorr/job002/corrected_micrographs.star --j 4 [--<label> <value> ...]

:func:`run_relion_external` estimates the CTF of every micrograph of ``--in_mics`` into the
job directory (the files of ``anisoctf estimate``: ``micrographs_ctf.star`` and per micrograph
``.txt``, ``_ctf.png``, ``.ctf``) and then, following RELION's contract for External jobs:

* writes ``RELION_OUTPUT_NODES.star`` (RELION 4/5 layout: a ``data_output_nodes`` loop of
  ``_rlnPipeLineNodeName`` and ``_rlnPipeLineNodeTypeLabel``) naming ``micrographs_ctf.star`` as a
  ``MicrographGroupMetadata.star.relion.ctf`` node, so that later jobs can take it as input;
* creates ``RELION_JOB_EXIT_SUCCESS`` when the STAR file was written (micrographs that failed
  are listed on stderr, as RELION's own CTF job does), else ``RELION_JOB_EXIT_FAILURE``;
* when RELION asks to abort (it creates ``RELION_JOB_ABORT_NOW``), stops, removes that file and
  creates ``RELION_JOB_EXIT_ABORTED``.

A rerun of the job continues where it stopped (``--continue`` of ``anisoctf estimate``).
The job's parameters (RELION's ``param1_label`` … on the External job's Params tab) are passed
as ``--<label> <value>`` with the names of ``anisoctf estimate``'s options, dashes or
underscores alike: ``apix kv cs ac box min_res max_res df_min df_max max_astig astig_restraint
fit_apix phase_plate overwrite``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from rich.console import Console

from anisoctf.errors import AnisoctfError, UsageError
from anisoctf.fit.result import FitSettings
from anisoctf.io.atomic import write_text_atomic
from anisoctf.jobs.estimate_batch import STAR_NAME, run_batch
from anisoctf.jobs.requests import EstimateRequest

__all__ = [
    "ABORTED",
    "ABORT_NOW",
    "CTF_NODE_TYPE",
    "FAILURE",
    "OUTPUT_NODES",
    "SUCCESS",
    "abort_watcher",
    "parse_params",
    "run_external_job",
    "run_relion_external",
    "touch",
    "write_output_nodes",
]

OUTPUT_NODES = "RELION_OUTPUT_NODES.star"
SUCCESS = "RELION_JOB_EXIT_SUCCESS"
FAILURE = "RELION_JOB_EXIT_FAILURE"
ABORTED = "RELION_JOB_EXIT_ABORTED"
ABORT_NOW = "RELION_JOB_ABORT_NOW"
#: RELION 4/5 node type label of a micrographs table with CTF results
CTF_NODE_TYPE = "MicrographGroupMetadata.star.relion.ctf"

_FLOAT_PARAMS = {
    "apix": "apix",
    "kv": "kv",
    "cs": "cs",
    "ac": "ac",
    "min_res": "min_res",
    "max_res": "max_res",
    "df_min": "df_min",
    "df_max": "df_max",
    "max_astig": "max_astig",
    "astig_restraint": "astig_restraint",
    "fit_apix": "fit_pixel_size",
}
_INT_PARAMS = {"box": "box"}
_BOOL_PARAMS = {"phase_plate", "overwrite"}
_IGNORED = {"pipeline_control"}  # added by RELION's scheduler; nothing to do with it
_TRUE = {"yes", "true", "1", "on", "y"}
_FALSE = {"no", "false", "0", "off", "n"}


def parse_params(args: Sequence[str]) -> dict[str, object]:
    """``--label value`` pairs of an External job's parameters, checked and converted.

    Returns
    -------
    dict
        ``{"settings": {...FitSettings fields}, "optics": {apix/kv/cs/ac}, "overwrite": bool}``.

    Raises
    ------
    UsageError
        An unknown label, a label without value, a value of the wrong type.
    """
    settings: dict[str, object] = {}
    optics: dict[str, float] = {}
    flags: dict[str, bool] = {"overwrite": False}
    items = list(args)
    i = 0
    while i < len(items):
        token = items[i]
        if not token.startswith("--") or len(token) <= 2:
            raise UsageError(f"unexpected argument {token!r}; parameters are '--label value'")
        label = token[2:].replace("-", "_")
        value = items[i + 1] if i + 1 < len(items) else None
        if value is not None and value.startswith("--"):
            value = None
        i += 1 if value is None else 2
        if label in _IGNORED:
            continue
        if label in _BOOL_PARAMS:
            v = "yes" if value is None else value.lower()
            if v not in _TRUE | _FALSE:
                raise UsageError(f"--{label} takes yes or no, got {value!r}")
            if label == "overwrite":
                flags["overwrite"] = v in _TRUE
            else:
                settings[label] = v in _TRUE
            continue
        if value is None:
            raise UsageError(f"--{label} needs a value")
        try:
            if label in _FLOAT_PARAMS:
                target = optics if label in ("apix", "kv", "cs", "ac") else settings
                target[_FLOAT_PARAMS[label]] = float(value)
            elif label in _INT_PARAMS:
                settings[_INT_PARAMS[label]] = int(value)
            else:
                known = sorted({*_FLOAT_PARAMS, *_INT_PARAMS, *_BOOL_PARAMS})
                raise UsageError(f"unknown parameter --{label}; known: {', '.join(known)}")
        except ValueError:
            raise UsageError(f"--{label} needs a number, got {value!r}") from None
    return {"settings": settings, "optics": optics, "overwrite": flags["overwrite"]}


def write_output_nodes(job_dir: str | os.PathLike[str], nodes: Sequence[tuple[str, str]]) -> Path:
    """Write ``RELION_OUTPUT_NODES.star`` (RELION 4/5 layout) listing ``(path, type label)``."""
    lines = [
        "",
        "# version 50001",
        "",
        "data_output_nodes",
        "",
        "loop_",
        "_rlnPipeLineNodeName #1",
        "_rlnPipeLineNodeTypeLabel #2",
    ]
    lines += [f"{name} {label}" for name, label in nodes]
    path = Path(job_dir) / OUTPUT_NODES
    write_text_atomic(path, "\n".join(lines) + "\n \n")
    return path


def touch(path: Path) -> None:
    """Create an (empty) ``RELION_JOB_EXIT_*`` file, atomically."""
    write_text_atomic(path, "")


@contextlib.contextmanager
def abort_watcher(job_dir: Path, period: float = 1.0):
    """Sends this process SIGTERM (an interrupt inside the estimate batch) when RELION creates
    ``RELION_JOB_ABORT_NOW`` in the job directory."""
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(period):
            if (job_dir / ABORT_NOW).exists():
                os.kill(os.getpid(), signal.SIGTERM)
                return

    thread = threading.Thread(target=watch, name="relion-abort-watcher", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()


def run_external_job(
    job_dir: str | os.PathLike[str],
    err: Console,
    body: Callable[[Path], Sequence[tuple[str, str]] | None],
    *,
    abort_hint: str,
    catch: tuple[type[BaseException], ...] = (AnisoctfError,),
) -> int:
    """Run one External job's ``body`` with RELION's job-directory protocol around it.

    Creates ``job_dir``, removes a previous run's ``RELION_JOB_EXIT_*`` files, runs
    ``body(job_dir)`` while watching for ``RELION_JOB_ABORT_NOW`` and writes exactly one exit
    file. ``body`` returns the output nodes ``[(path, type), ...]`` of a success, or ``None``
    for a failure it has already reported.

    Returns
    -------
    int
        0 success, 1 failure reported by ``body``, 2 bad input (an exception in ``catch``,
        printed as one line), 130 aborted.
    """
    out = Path(job_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        err.print(f"error: cannot create {out}: {exc.strerror or exc}", markup=False)
        return 2
    for name in (SUCCESS, FAILURE, ABORTED):
        with contextlib.suppress(OSError):
            (out / name).unlink()
    try:
        with abort_watcher(out):
            nodes = body(out)
    except KeyboardInterrupt:
        with contextlib.suppress(OSError):
            (out / ABORT_NOW).unlink()
        touch(out / ABORTED)
        err.print(f"aborted; {abort_hint}", markup=False)
        return 130
    except catch as exc:
        err.print(f"error: {' '.join(str(exc).split())}", markup=False)
        touch(out / FAILURE)
        return 2
    if nodes is None:
        touch(out / FAILURE)
        return 1
    write_output_nodes(out, nodes)
    touch(out / SUCCESS)
    return 0


def run_relion_external(
    in_mics: str,
    job_dir: str,
    *,
    jobs: int = 1,
    params: Sequence[str] = (),
    console: Console | None = None,
    err_console: Console | None = None,
) -> int:
    """Run the External job; return the exit status (0 success, 1 failure, 2 bad parameters,
    130 aborted). The ``RELION_JOB_EXIT_*`` file is written in every case."""
    err = err_console or Console(stderr=True, highlight=False, soft_wrap=True)

    def body(out: Path) -> list[tuple[str, str]] | None:
        parsed = parse_params(params)
        try:
            settings = FitSettings(**parsed["settings"])  # type: ignore[arg-type]
        except (TypeError, ValueError) as exc:
            raise UsageError(f"bad parameters: {exc}") from None
        request = EstimateRequest.of(
            [in_mics],
            out,
            settings,
            jobs=max(1, int(jobs)),
            overwrite=bool(parsed["overwrite"]),
            **parsed["optics"],  # type: ignore[arg-type]
        )
        report = run_batch(request, console=console, err_console=err)
        if report.star_path is None:
            return None
        return [((out / STAR_NAME).as_posix(), CTF_NODE_TYPE)]

    return run_external_job(job_dir, err, body, abort_hint="rerun the job to continue")
