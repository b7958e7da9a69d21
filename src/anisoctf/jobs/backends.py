"""Where the micrographs of a batch are processed: in this process, a local process pool, or Dask.

A backend takes an iterable of work items ``(key, function, args, kwargs)`` and yields
``(key, outcome)`` as each item ends, in completion order; ``outcome`` is the function's return
value, or the exception it raised (as an object, never re-raised), so that one failure never
stops the batch. Items are pulled from the iterable lazily and at most a few per worker are in
flight, so memory does not grow with the number of micrographs.

* :class:`SerialBackend`: one item after the other in this process (``--jobs 1``).
* :class:`LocalPoolBackend`: ``--jobs N`` single-threaded worker processes (fork on Linux).
  Workers die with their parent (``PR_SET_PDEATHSIG``), so a killed run leaves no orphan that
  would go on writing into the output directory.
* :class:`DaskBackend`: a ``dask.distributed`` client (``--scheduler ADDRESS``, ``local``, or
  ``slurm`` for workers submitted as SLURM jobs through dask-jobqueue,
  :mod:`anisoctf.jobs.cluster`). The workers must see the input and output paths (a shared
  file system on a cluster). dask is optional (``pip install 'anisoctf[dask]'``, and
  ``'anisoctf[slurm]'`` for SLURM).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Any, Protocol

from anisoctf.errors import AnisoctfError
from anisoctf.jobs.cluster import SLURM, ClusterError, ClusterSpec, start_slurm

__all__ = [
    "Backend",
    "BackendError",
    "DaskBackend",
    "LocalPoolBackend",
    "SerialBackend",
    "WorkItem",
    "make_backend",
    "process_pool",
]

#: ``(key, function, args, kwargs)``
WorkItem = tuple[Any, Callable[..., Any], tuple, dict]

_BLAS_THREAD_VARS = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "BLIS_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)


class BackendError(AnisoctfError):
    """The requested backend cannot be used (e.g. dask not installed, scheduler unreachable)."""


class Backend(Protocol):
    """Runs work items and yields ``(key, result or exception)`` as they end."""

    workers: int

    def run(self, items: Iterable[WorkItem]) -> Iterator[tuple[Any, Any]]: ...

    def close(self) -> None: ...


#: OpenBLAS and OpenMP read these once, when numpy loads them: when the process started with
#: both at 1, BLAS is single-threaded already (forked workers inherit that) and importing
#: threadpoolctl (~30 ms) can be skipped
_STARTED_SINGLE_THREADED = all(os.environ.get(k) == "1" for k in _BLAS_THREAD_VARS[:2])


def _blas_single_thread() -> contextlib.AbstractContextManager:
    if _STARTED_SINGLE_THREADED:
        return contextlib.nullcontext()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl is a dependency
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _single_threaded_call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` with one BLAS thread: a Dask worker's results then match a serial
    run's to the last bit (BLAS sums in another order with more threads)."""
    with _blas_single_thread():
        return fn(*args, **kwargs)


class SerialBackend:
    """Everything in this process, one item at a time, with one BLAS thread."""

    workers = 1

    def run(self, items: Iterable[WorkItem]) -> Iterator[tuple[Any, Any]]:
        with _blas_single_thread():
            for key, fn, args, kwargs in items:
                try:
                    outcome = fn(*args, **kwargs)
                except Exception as exc:  # noqa: BLE001 - reported as this item's failure
                    outcome = exc
                yield key, outcome

    def close(self) -> None:
        pass


def _die_with_parent() -> None:
    """Linux: ask the kernel to SIGKILL this process when its parent dies."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent is already gone
            os._exit(1)
    except (OSError, AttributeError):  # pragma: no cover - best effort
        pass


def _init_pool_worker(close_fds: tuple[int, ...]) -> None:
    """Pool initializer: die with the parent, drop inherited lock descriptors, 1 BLAS thread.

    Ctrl-C is ignored (it reaches the whole process group; the parent handles it and stops the
    workers) and SIGTERM ends the worker at once (the default, whatever the parent installed).
    """
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _die_with_parent()
    for fd in close_fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    if _STARTED_SINGLE_THREADED:
        return
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover
        return
    threadpool_limits(limits=1, user_api="blas")


@contextlib.contextmanager
def _single_threaded_children() -> Iterator[None]:
    """Environment inherited by worker processes started inside the block: 1 BLAS thread."""
    saved = {k: os.environ.get(k) for k in _BLAS_THREAD_VARS}
    os.environ.update({k: "1" for k in _BLAS_THREAD_VARS})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def process_pool(max_workers: int, **kwargs: Any) -> ProcessPoolExecutor:
    """The one process pool of the jobs: a :class:`ProcessPoolExecutor` of ``max_workers``
    processes, forked on Linux (the workers share the parent's imported modules), spawned
    elsewhere; ``kwargs`` go to the executor (``initializer``, ``initargs``)."""
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context(
        "fork" if sys.platform == "linux" and "fork" in methods else "spawn"
    )
    return ProcessPoolExecutor(max_workers=max_workers, mp_context=ctx, **kwargs)


class LocalPoolBackend:
    """``jobs`` single-threaded worker processes on this machine.

    Parameters
    ----------
    jobs
        Number of worker processes.
    close_fds
        Descriptors the workers must close at start (the batch lock).
    per_worker
        Items kept in flight per worker (enough to keep the workers busy, few enough for flat
        memory).
    """

    def __init__(self, jobs: int, close_fds: tuple[int, ...] = (), per_worker: int = 2) -> None:
        self.workers = int(jobs)
        self.close_fds = tuple(close_fds)
        self.per_worker = max(1, int(per_worker))

    def run(self, items: Iterable[WorkItem]) -> Iterator[tuple[Any, Any]]:
        pool = process_pool(
            self.workers, initializer=_init_pool_worker, initargs=(self.close_fds,)
        )
        pending: dict[Future, Any] = {}
        source = iter(items)
        limit = self.workers * self.per_worker
        try:
            exhausted = False
            while True:
                with _single_threaded_children():  # workers start lazily, at submit
                    while not exhausted and len(pending) < limit:
                        try:
                            key, fn, args, kwargs = next(source)
                        except StopIteration:
                            exhausted = True
                            break
                        pending[pool.submit(fn, *args, **kwargs)] = key
                if not pending:
                    break
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    key = pending.pop(fut)
                    try:
                        outcome = fut.result()
                    except Exception as exc:  # noqa: BLE001 - e.g. a worker killed by the OS
                        outcome = exc
                    yield key, outcome
        except BaseException:  # interrupted (or the consumer stopped early): stop the workers
            _stop_workers(pool)
            raise
        pool.shutdown(wait=True)

    def close(self) -> None:
        pass


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """Terminate the pool's worker processes now and wait until they are gone.

    Work in progress is abandoned; a worker killed in the middle of a write leaves at most a
    hidden temporary file, which the batch removes while it still holds its lock.
    """
    procs = list((getattr(pool, "_processes", None) or {}).values())
    for proc in procs:
        with contextlib.suppress(Exception):
            proc.terminate()
    for proc in procs:
        with contextlib.suppress(Exception):
            proc.join(timeout=10)
    pool.shutdown(wait=False, cancel_futures=True)


class DaskBackend:
    """Items run as ``dask.distributed`` tasks.

    Parameters
    ----------
    scheduler
        Scheduler address (``tcp://host:8786``), ``"local"`` for a ``LocalCluster`` of
        ``jobs`` single-threaded workers on this machine, or ``"slurm"`` for workers submitted
        as SLURM jobs (:mod:`anisoctf.jobs.cluster`, resources from ``cluster``).
    jobs
        Workers of a local cluster; ignored for a remote scheduler.
    processes
        Local cluster only: worker processes (default) or threads of this process.
    per_worker
        Items kept in flight per worker.
    cluster
        SLURM resources (``scheduler="slurm"`` only; default: one job of one core).
    """

    def __init__(
        self,
        scheduler: str,
        jobs: int = 1,
        *,
        processes: bool = True,
        per_worker: int = 2,
        cluster: ClusterSpec | None = None,
    ) -> None:
        try:
            from dask.distributed import Client, LocalCluster
        except ImportError:
            raise BackendError(
                "--scheduler needs dask.distributed, which is not installed; "
                "pip install 'anisoctf[dask]' (or drop --scheduler)"
            ) from None
        self.cluster = None
        expected = 1
        try:
            if scheduler == SLURM:
                spec = cluster or ClusterSpec()
                try:
                    self.cluster, self.client = start_slurm(spec)
                except ClusterError as exc:
                    raise BackendError(str(exc)) from None
                expected = spec.workers * spec.cores
            elif scheduler == "local":
                self.cluster = LocalCluster(
                    n_workers=max(1, int(jobs)),
                    threads_per_worker=1,
                    processes=processes,
                    dashboard_address=None,
                )
                self.client = Client(self.cluster)
            else:
                self.client = Client(scheduler, timeout=10)
        except (OSError, TimeoutError, ValueError) as exc:
            if self.cluster is not None:
                self.cluster.close()
            raise BackendError(
                f"cannot connect to the Dask scheduler {scheduler}: {' '.join(str(exc).split())}"
            ) from None
        n = len(self.client.scheduler_info().get("workers", {}))
        self.workers = max(1, n, expected)  # SLURM workers may still be starting
        self.per_worker = max(1, int(per_worker))

    def run(self, items: Iterable[WorkItem]) -> Iterator[tuple[Any, Any]]:
        from dask.distributed import as_completed

        source = iter(items)
        keys: dict[Any, Any] = {}
        limit = max(1, self.workers) * self.per_worker

        def submit_one() -> Any | None:
            try:
                key, fn, args, kwargs = next(source)
            except StopIteration:
                return None
            fut = self.client.submit(_single_threaded_call, fn, *args, pure=False, **kwargs)
            keys[fut.key] = key
            return fut

        first = []
        for _ in range(limit):
            fut = submit_one()
            if fut is None:
                break
            first.append(fut)
        if not first:
            return
        queue = as_completed(first)
        for fut in queue:
            key = keys.pop(fut.key)
            try:
                outcome = fut.result()
            except Exception as exc:  # noqa: BLE001 - reported as this item's failure
                outcome = exc
            fut.release()
            yield key, outcome
            nxt = submit_one()
            if nxt is not None:
                queue.add(nxt)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.close()
        if self.cluster is not None:
            with contextlib.suppress(Exception):
                self.cluster.close()


def make_backend(
    jobs: int,
    scheduler: str | None = None,
    close_fds: tuple[int, ...] = (),
    cluster: ClusterSpec | None = None,
) -> SerialBackend | LocalPoolBackend | DaskBackend:
    """The backend for ``--jobs`` / ``--scheduler`` (``cluster``: SLURM resources)."""
    if scheduler:
        return DaskBackend(scheduler, jobs, cluster=cluster)
    if jobs <= 1:
        return SerialBackend()
    return LocalPoolBackend(jobs, close_fds=close_fds)
