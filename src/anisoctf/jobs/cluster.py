"""Dask workers on a SLURM cluster (``--scheduler slurm``), through dask-jobqueue.

``anisoctf estimate|correct ... --scheduler slurm --slurm workers=4 --slurm cores=8 --slurm
memory=16GB --slurm partition=cpu --slurm walltime=02:00:00`` starts a Dask scheduler in this
process and submits ``workers`` SLURM jobs (``sbatch``), each running ``cores`` single-threaded
Dask workers with ``memory`` for the job, in ``partition``, for at most ``walltime``
(:func:`parse_slurm_options`). The work items then run on those workers exactly as on a local
Dask cluster (:class:`~anisoctf.jobs.backends.DaskBackend`): a worker whose job is cancelled,
pre-empted or runs out of time loses its items to the others (Dask reschedules them), and the
batch state of ``estimate`` writes every micrograph's outputs atomically, so the batch ends with
every micrograph exactly once.

Resources can also come from a dask-jobqueue configuration file (``--slurm
config=jobqueue.yaml``, the ``jobqueue: slurm:`` section that dask-jobqueue documents: ``queue``,
``account``, ``cores``, ``memory``, ``walltime``, ``job-extra-directives``, ``interface``, …);
options given on the command line take precedence. The workers must see the input and output
paths (a shared file system) and run this Python (``sys.executable``, so the same environment).

dask-jobqueue is optional (``pip install 'anisoctf[slurm]'``). Reference: dask-jobqueue,
``SLURMCluster`` (jobqueue.dask.org).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from anisoctf.errors import UsageError

__all__ = [
    "ClusterError",
    "ClusterSpec",
    "SLURM",
    "parse_slurm_options",
    "slurm_available",
    "start_slurm",
]

#: The ``--scheduler`` value that asks for SLURM.
SLURM = "slurm"


class ClusterError(UsageError):
    """The cluster cannot be used as asked (no dask-jobqueue, no SLURM, no worker started):
    a usage error (exit status 2), since nothing was processed."""


@dataclass(frozen=True)
class ClusterSpec:
    """Resources of the SLURM jobs that run the Dask workers.

    Parameters
    ----------
    workers
        SLURM jobs submitted (each one node's share: ``cores`` worker processes).
    cores
        Cores per job; one single-threaded Dask worker process per core.
    memory
        Memory per job, as SLURM and dask-jobqueue write it (``"8GB"``); None: the config's,
        else 2 GB per core.
    partition
        SLURM partition (``--partition``); None: the config's, else the cluster's default.
    walltime
        Time limit per job (``HH:MM:SS``); None: the config's, else ``01:00:00``.
    account
        SLURM account, if the cluster needs one.
    config
        A dask-jobqueue YAML configuration (its ``jobqueue: slurm:`` section) read first.
    extra_directives
        More ``#SBATCH`` lines (e.g. ``"--qos=short"``).
    start_timeout
        Seconds to wait for the first worker before giving up with a message.
    log_directory
        Where the SLURM jobs write their output (None: dask-jobqueue's default, the current
        directory).
    """

    workers: int = 1
    cores: int = 1
    memory: str | None = None
    partition: str | None = None
    walltime: str | None = None
    account: str | None = None
    config: Path | None = None
    extra_directives: tuple[str, ...] = field(default_factory=tuple)
    start_timeout: float = 300.0
    log_directory: Path | None = None

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ClusterError(f"--slurm-workers must be at least 1, got {self.workers}")
        if self.cores < 1:
            raise ClusterError(f"--slurm-cores must be at least 1, got {self.cores}")

    def cluster_kwargs(self, config: dict[str, Any]) -> dict[str, Any]:
        """Keyword arguments of ``SLURMCluster``: the options, else the config, else defaults."""
        cores = self.cores
        kwargs: dict[str, Any] = {
            "cores": cores,
            "processes": cores,  # single-threaded workers, as --jobs uses
            "memory": self.memory or config.get("memory") or f"{2 * cores}GB",
            "walltime": self.walltime or config.get("walltime") or "01:00:00",
            "python": sys.executable,
            "job_name": "anisoctf",
        }
        if self.partition or config.get("queue"):
            kwargs["queue"] = self.partition or config.get("queue")
        if self.account or config.get("account"):
            kwargs["account"] = self.account or config.get("account")
        extra = [*(config.get("job-extra-directives") or ()), *self.extra_directives]
        if extra:
            kwargs["job_extra_directives"] = extra
        if self.log_directory is not None:
            kwargs["log_directory"] = str(self.log_directory)
        return kwargs


def _read_config(path: Path | None) -> dict[str, Any]:
    """The ``jobqueue: slurm:`` section of a dask-jobqueue YAML file ({} without a file)."""
    if path is None:
        return {}
    import yaml  # a dependency of dask

    try:
        doc = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ClusterError(f"{path}: file not found; check --cluster-config") from None
    except (OSError, yaml.YAMLError) as exc:
        raise ClusterError(f"{path}: not a dask-jobqueue YAML file ({exc})") from None
    section = ((doc or {}).get("jobqueue") or {}).get("slurm") if isinstance(doc, dict) else None
    if not isinstance(section, dict):
        raise ClusterError(
            f"{path}: no 'jobqueue: slurm:' section (see the dask-jobqueue configuration docs)"
        )
    return section


def _squeue_line() -> str:
    """What SLURM says of our worker jobs (for the message when none starts)."""
    try:
        run = subprocess.run(
            ["squeue", "-h", "-n", "anisoctf", "-o", "%i %T %R"],
            capture_output=True, text=True, timeout=10, check=False,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return "squeue did not answer"
    return "; ".join(run.stdout.split("\n")[:3]).strip() or "no anisoctf job in squeue"


def start_slurm(spec: ClusterSpec) -> tuple[Any, Any]:
    """Start the Dask scheduler here and the workers as SLURM jobs; wait for the first one.

    Returns
    -------
    (cluster, client)
        The ``SLURMCluster`` and a ``distributed.Client`` connected to it.

    Raises
    ------
    ClusterError
        dask-jobqueue is not installed, ``sbatch`` is not found, the config file is bad, or no
        worker started within ``spec.start_timeout`` seconds (the message says what squeue
        shows). Always one line.
    """
    try:
        from dask.distributed import Client
        from dask_jobqueue import SLURMCluster
    except ImportError:
        raise ClusterError(
            "--scheduler slurm needs dask-jobqueue, which is not installed; "
            "pip install 'anisoctf[slurm]'"
        ) from None
    if shutil.which("sbatch") is None:
        raise ClusterError(
            "--scheduler slurm: sbatch is not on PATH; run on a SLURM login node or use "
            "--jobs N / --scheduler local"
        )
    config = _read_config(spec.config)
    try:
        cluster = SLURMCluster(**spec.cluster_kwargs(config))
    except (OSError, ValueError, TypeError) as exc:
        why = " ".join(str(exc).split())
        raise ClusterError(f"cannot start the SLURM cluster: {why}") from None
    client = Client(cluster)
    try:
        cluster.scale(jobs=spec.workers)
        deadline = time.monotonic() + spec.start_timeout
        while not client.scheduler_info().get("workers"):
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"no SLURM worker started within {spec.start_timeout:g} s "
                    f"({_squeue_line()}); check --slurm-partition, --slurm-memory and "
                    "--slurm-walltime, or the cluster's queue"
                )
            time.sleep(0.5)
    except BaseException:
        client.close()
        cluster.close()
        raise
    return cluster, client


def slurm_available() -> str | None:
    """None when a SLURM controller answers here, else why not (for tests and ``--help``)."""
    if shutil.which("sinfo") is None:
        return "no sinfo on PATH (SLURM is not installed)"
    try:
        run = subprocess.run(
            ["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10, check=False,
            env={**os.environ},
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"sinfo failed: {exc}"
    if run.returncode != 0:
        return f"sinfo failed: {run.stderr.strip() or run.returncode}"
    if not any(s in run.stdout for s in ("idle", "mix", "alloc")):
        return f"no usable SLURM node ({run.stdout.strip() or 'none'})"
    return None


#: ``--slurm KEY=VALUE`` keys → (ClusterSpec field, converter)
_KEYS: dict[str, tuple[str, Any]] = {
    "workers": ("workers", int),
    "cores": ("cores", int),
    "memory": ("memory", str),
    "partition": ("partition", str),
    "walltime": ("walltime", str),
    "account": ("account", str),
    "config": ("config", Path),
    "extra": ("extra_directives", None),
    "timeout": ("start_timeout", float),
    "logs": ("log_directory", Path),
}


def parse_slurm_options(items: list[str] | tuple[str, ...] | None) -> ClusterSpec | None:
    """``--slurm KEY=VALUE`` options (repeatable) as a :class:`ClusterSpec`; None without any.

    Keys: ``workers`` (SLURM jobs), ``cores`` (per job), ``memory`` (per job, e.g. ``8GB``),
    ``partition``, ``walltime`` (``HH:MM:SS``), ``account``, ``config`` (a dask-jobqueue YAML
    file), ``extra`` (one more ``#SBATCH`` option, repeatable), ``timeout`` (seconds to wait
    for the first worker), ``logs`` (folder for the jobs' output).

    Raises
    ------
    ClusterError
        An item without ``=``, an unknown key or a value of the wrong type (one line).
    """
    if not items:
        return None
    values: dict[str, Any] = {}
    extra: list[str] = []
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().lower()
        if not sep or key not in _KEYS:
            raise ClusterError(
                f"--slurm {item!r}: expected KEY=VALUE with KEY one of {', '.join(_KEYS)}"
            )
        name, convert = _KEYS[key]
        if convert is None:
            extra.append(value)
            continue
        try:
            values[name] = convert(value)
        except ValueError:
            raise ClusterError(f"--slurm {item!r}: {value!r} is not a valid {key}") from None
    return ClusterSpec(**values, extra_directives=tuple(extra))
