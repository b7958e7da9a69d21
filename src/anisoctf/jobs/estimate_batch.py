"""The batch of ``anisoctf estimate``: resolve the inputs, process every micrograph, write the
tables, print the summary.

At the end ``micrographs_ctf.star`` (RELION 3.1+ layout) lists the micrographs that succeeded,
in input order, and ``micrographs_ctf.cs`` holds the same results for cryoSPARC. A micrograph
that fails is reported on one line and the batch goes on.

Batches are resumable (see :mod:`anisoctf.jobs.batch_state` and ``docs/production.md``): each
micrograph's outcome is stored in ``<stem>.record.json`` with a fingerprint of its parameters,
a rerun skips what is done, the output directory is locked while a run writes into it, and
``--watch`` keeps processing new inputs. Where the micrographs run (this process, local worker
processes, Dask) is :mod:`anisoctf.jobs.backends`' business.

The job takes one :class:`~anisoctf.jobs.requests.EstimateRequest` (:func:`run_batch`).
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from anisoctf.errors import InputError, UsageError
from anisoctf.io.cryosparc_ctf import write_ctf_cs
from anisoctf.io.star import write_micrographs_ctf_star
from anisoctf.jobs.backends import Backend, BackendError, make_backend
from anisoctf.jobs.batch_state import (
    BatchLock,
    MicrographRecord,
    flag_summary,
    input_signature,
    lock_output,
    process_and_record,
    read_record,
    record_path,
    remove_stray_temporaries,
    task_fingerprint,
    write_record,
)
from anisoctf.jobs.inputs import MicrographTask, ResolvedInputs, one_line, resolve_inputs
from anisoctf.jobs.micrograph import RowResult, failure_message, process_one
from anisoctf.jobs.requests import EstimateRequest
from anisoctf.optics.ctf import Optics

__all__ = ["CS_NAME", "STAR_NAME", "EstimateReport", "run_batch"]

#: name of the results table written into the output directory
STAR_NAME = "micrographs_ctf.star"
#: the same results as a cryoSPARC dataset (``ctf/*`` fields)
CS_NAME = "micrographs_ctf.cs"


@dataclass
class EstimateReport:
    """Outcome of :func:`run_estimate`.

    Attributes
    ----------
    results
        Successful micrographs in input order.
    failures
        ``(name, one-line message)`` per failed micrograph, in input order.
    star_path
        The STAR file written, or None when nothing succeeded (or it could not be written).
    seconds
        Wall time of the whole job.
    star_error
        Why the STAR file could not be written, if so.
    n_skipped
        Micrographs not processed again because an earlier run had finished them with the
        same parameters (their results are in ``results``).
    """

    results: list[RowResult]
    failures: list[tuple[str, str]]
    star_path: Path | None
    seconds: float
    star_error: str | None = None
    n_skipped: int = 0

    @property
    def n_ok(self) -> int:
        return len(self.results)

    @property
    def n_failed(self) -> int:
        return len(self.failures)

    @property
    def exit_code(self) -> int:
        """0 when every micrograph succeeded and the STAR file was written, else 1."""
        return 0 if not self.failures and self.star_path is not None else 1


def _median(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.median(finite) if finite else float("nan")


def _path_key(path: str) -> str:
    return os.path.normcase(os.path.abspath(path))


def _from_record(name: str, rec: MicrographRecord) -> RowResult:
    assert rec.row is not None
    return RowResult(
        name=name,
        row=rec.row,
        figure_of_merit=rec.figure_of_merit,
        fit_resolution=rec.fit_resolution,
        warnings=rec.warnings,
        outputs=rec.outputs,
        seconds=rec.seconds,
    )


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt inside the block (main thread only), so that a killed
    run removes its temporary files and releases its workers as on Ctrl-C."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _resolve_for_watch(inputs, **kw) -> ResolvedInputs:
    """:func:`resolve_inputs`, but a pattern that matches nothing yet gives no micrographs."""
    try:
        return resolve_inputs(inputs, **kw)
    except UsageError as exc:
        if "no file matches" in str(exc):
            return ResolvedInputs(tasks=[], optics={})
        raise


def _check(request: EstimateRequest) -> None:
    """Refuse options that cannot work, before any file is touched."""
    if request.jobs < 1:
        raise UsageError(f"--jobs must be at least 1, got {request.jobs}")
    if request.watch is not None and not request.watch >= 0:
        raise UsageError(f"--watch must be a number of seconds >= 0, got {request.watch}")
    if any(c.isspace() for c in str(request.out_dir)):
        raise UsageError(
            f"output directory {str(request.out_dir)!r} contains whitespace, which RELION "
            "cannot read"
        )


def _resolve(request: EstimateRequest) -> ResolvedInputs:
    """The request's inputs (in watch mode a pattern may match nothing yet)."""
    try:
        if request.watch is None:
            return resolve_inputs(request.inputs, **request.optics_overrides())
        return _resolve_for_watch(request.inputs, **request.optics_overrides())
    except InputError as exc:  # the STAR file itself is unreadable
        raise UsageError(str(exc)) from None


def _make_out_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create output directory {out}: {exc.strerror or exc}") from None


def _open_backend(
    request: EstimateRequest, out: Path, lock: BatchLock, backend: Backend | None
) -> Backend:
    """Remove leftovers of an earlier run and start the workers unless ``backend`` is given
    (the lock is released when that fails)."""
    try:
        remove_stray_temporaries(out)
        if backend is None:
            backend = make_backend(
                request.jobs,
                request.scheduler,
                close_fds=() if lock.fd is None else (lock.fd,),
                cluster=request.cluster,
            )
        return backend
    except BackendError as exc:
        lock.release()
        raise UsageError(str(exc)) from None
    except BaseException:
        lock.release()
        raise


def _progress(err: Console, quiet: bool) -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        disable=quiet or not err.is_terminal,
        transient=True,
    )


class _Batch:
    """The state of one run: the outcome of every micrograph handled so far, by input path."""

    def __init__(
        self,
        request: EstimateRequest,
        backend: Backend,
        fn: Callable[..., RowResult | str],
        progress: Progress,
    ) -> None:
        self.request = request
        self.out = Path(request.out_dir)
        self.backend = backend
        self.fn = fn
        self.progress = progress
        self.outcome: dict[str, RowResult | str] = {}
        self.n_skipped = 0

    # one micrograph's bookkeeping

    def fingerprint(self, t: MicrographTask, optics: dict[int, Optics]) -> str:
        return task_fingerprint(
            settings=self.request.settings,
            optics=optics[t.optics_group],
            name=t.name,
            optics_group=t.optics_group,
            stem=t.stem,
            input=input_signature(t.path),
            out=str(self.out),  # the rows name their .ctf files by this path
            local=self.request.local,  # --patches/--tilt/--thickness change the outputs
            **({"non_dw": True} if t.non_dw else {}),  # the sum read is not the one named
        )

    def _record_failure(self, t: MicrographTask, message: str) -> None:
        with contextlib.suppress(OSError):
            write_record(
                record_path(self.out, t.stem),
                MicrographRecord(fingerprint="", ok=False, message=message),
            )

    def _print(self, line: str) -> None:
        self.progress.console.print(line, markup=False, highlight=False)

    def _done_before(self, t: MicrographTask, fp: str) -> bool:
        """Take the result of an earlier run with the same fingerprint, if any."""
        if self.request.overwrite:
            return False
        rec = read_record(record_path(self.out, t.stem))
        if rec is not None and rec.ok and rec.fingerprint == fp and rec.outputs_exist():
            self.outcome[_path_key(t.path)] = _from_record(t.name, rec)
            self.n_skipped += 1
            return True
        return False

    # the tables

    def results_of(self, current: ResolvedInputs) -> list[RowResult]:
        return [
            r
            for t in current.tasks
            if isinstance(r := self.outcome.get(_path_key(t.path)), RowResult)
        ]

    def failures_of(self, current: ResolvedInputs) -> list[tuple[str, str]]:
        return [
            (t.name, r)
            for t in current.tasks
            if isinstance(r := self.outcome.get(_path_key(t.path)), str)
        ]

    def write_star(self, current: ResolvedInputs) -> tuple[Path | None, str | None]:
        """Write ``micrographs_ctf.star`` and ``.cs``; return (STAR path, error message)."""
        rows = self.results_of(current)
        if not rows:
            return None, None
        used = {r.row.optics_group for r in rows}
        star = self.out / STAR_NAME
        try:
            write_micrographs_ctf_star(
                star,
                [r.row for r in rows],
                {g: o for g, o in current.optics.items() if g in used},
                current.optics_names,
                current.passthrough,
            )
        except (OSError, ValueError) as exc:
            return None, one_line(f"cannot write {star}: {exc}")
        try:  # the same results for cryoSPARC
            write_ctf_cs(
                self.out / CS_NAME, [r.row for r in rows], current.optics, uids=current.uids
            )
        except (OSError, ValueError) as exc:
            return star, one_line(f"cannot write {self.out / CS_NAME}: {exc}")
        return star, None

    # one pass over the inputs

    def one_pass(
        self, current: ResolvedInputs, bar: TaskID, ready: Callable[[MicrographTask], bool]
    ) -> int:
        """Process the tasks of ``current`` not handled yet in this run; return how many."""
        todo: list[tuple[MicrographTask, str]] = []
        for t in current.tasks:
            key = _path_key(t.path)
            if key in self.outcome or not ready(t):
                continue
            if t.error is not None:
                self.outcome[key] = t.error
                self._record_failure(t, t.error)
                self._print(f"FAILED {t.error}")
                self.progress.advance(bar)
                continue
            fp = self.fingerprint(t, current.optics)
            if self._done_before(t, fp):
                self.progress.advance(bar)
                continue
            todo.append((t, fp))
        if not todo:
            return 0
        by_key = {_path_key(t.path): t for t, _ in todo}
        results = self.backend.run(self._items(todo, current))
        try:
            for key, result in results:
                self._handle(by_key[key], result, bar)
        finally:
            results.close()  # on an interrupt the backend stops its workers here
        return len(todo)

    def _items(self, todo: list[tuple[MicrographTask, str]], current: ResolvedInputs):
        """``(key, fn, args, kwargs)`` of every micrograph to process, for the backend."""
        settings, local = self.request.settings, self.request.local
        for t, fp in todo:
            args = (t.path, t.name, current.optics[t.optics_group], settings, str(self.out))
            kwargs: dict[str, object] = {
                "stem": t.stem,
                "fft_workers": 1,
                "debug": self.request.debug,
            }
            if t.stack:
                kwargs["stack"] = True
            if local is not None:
                kwargs["local"] = local
            yield (
                _path_key(t.path),
                process_and_record,
                (self.fn, str(record_path(self.out, t.stem)), fp, (*args, t.optics_group), kwargs),
                {},
            )

    def _handle(self, t: MicrographTask, result: object, bar: TaskID) -> None:
        if isinstance(result, BaseException):
            result = failure_message(t.name, f"internal error: {type(result).__name__}: {result}")
            self._record_failure(t, result)
        self.outcome[_path_key(t.path)] = result  # type: ignore[assignment]
        if isinstance(result, str):
            self._print(f"FAILED {result}")
        elif not self.request.quiet:
            for w in result.warnings:  # type: ignore[union-attr]
                self.progress.console.print(f"warning: {t.name}: {w}", markup=False)
        self.progress.advance(bar)

    # watch mode and interrupts

    def watch(
        self, resolved: ResolvedInputs, bar: TaskID, star: tuple[Path | None, str | None]
    ) -> tuple[ResolvedInputs, tuple[Path | None, str | None]]:
        """Poll the inputs until ``watch`` seconds pass without a new one; return the last
        inputs processed and the last (STAR path, error)."""
        request = self.request
        assert request.watch is not None
        poll = request.poll_seconds
        poll = max(poll if poll is not None else min(2.0, request.watch / 4), 0.01)
        last_new = time.monotonic()
        seen: dict[str, object] = {}

        def settled(t: MicrographTask) -> bool:
            # a file is taken once its size and mtime did not change between polls
            sig = input_signature(t.path)
            key = _path_key(t.path)
            old = seen.get(key)
            seen[key] = sig
            return sig is not None and old == sig

        while time.monotonic() - last_new < request.watch:
            time.sleep(poll)
            current = _resolve_for_watch(request.inputs, **request.optics_overrides())
            self.progress.update(bar, total=len(current.tasks))
            if any(_path_key(t.path) not in self.outcome for t in current.tasks):
                last_new = time.monotonic()
            if self.one_pass(current, bar, settled):
                resolved = current
                star = self.write_star(resolved)
        return resolved, star

    def finish_interrupted(self, resolved: ResolvedInputs) -> None:
        """After an interrupt: count the micrographs whose record was written just before it,
        and write the tables of what is done."""
        for t in resolved.tasks:
            key = _path_key(t.path)
            if key in self.outcome or t.error is not None:
                continue
            rec = read_record(record_path(self.out, t.stem))
            if rec is not None and rec.ok and rec.outputs_exist():
                if rec.fingerprint == self.fingerprint(t, resolved.optics):
                    self.outcome[key] = _from_record(t.name, rec)
        self.write_star(resolved)


def run_batch(
    request: EstimateRequest,
    *,
    console: Console | None = None,
    err_console: Console | None = None,
    backend: Backend | None = None,
    process_fn: Callable[..., RowResult | str] | None = None,
) -> EstimateReport:
    """Run the whole ``anisoctf estimate`` job (resumable, locked, every output atomic).

    Parameters
    ----------
    request
        What to estimate, where, with which settings (see
        :class:`~anisoctf.jobs.requests.EstimateRequest`).
    console, err_console
        Where the summary and the progress/failure lines go (default stdout and stderr).
    backend
        A ready backend (see :mod:`anisoctf.jobs.backends`); overrides ``request.jobs`` and
        ``request.scheduler``.
    process_fn
        Replacement for :func:`~anisoctf.jobs.micrograph.process_one` (same signature); for
        benchmarks of the batch machinery only.

    Returns
    -------
    EstimateReport
        Results and failures; its ``exit_code`` is 0 when all micrographs succeeded, else 1.

    Raises
    ------
    UsageError
        Bad inputs or options, or the output directory is locked by another run (exit 2).
    KeyboardInterrupt
        On Ctrl-C or SIGTERM, after the finished micrographs were written to the STAR file.
    """
    t_start = time.perf_counter()
    console = console or Console(highlight=False, soft_wrap=True)
    err = err_console or Console(stderr=True, highlight=False, soft_wrap=True)
    _check(request)
    out = Path(request.out_dir)
    resolved = _resolve(request)
    _make_out_dir(out)
    if not request.quiet:
        for line in resolved.provenance:
            err.print(line, markup=False)
        for w in resolved.warnings:
            err.print(f"warning: {w}", markup=False)
    lock = lock_output(out)
    own_backend = backend is None
    backend = _open_backend(request, out, lock, backend)
    batch = _Batch(request, backend, process_fn or process_one, _progress(err, request.quiet))
    star: tuple[Path | None, str | None] = (None, None)
    try:
        with _sigterm_as_interrupt(), batch.progress:
            bar = batch.progress.add_task("CTF estimation", total=len(resolved.tasks))
            try:
                batch.one_pass(resolved, bar, lambda t: True)
                star = batch.write_star(resolved)
                if request.watch is not None:
                    resolved, star = batch.watch(resolved, bar, star)
            except KeyboardInterrupt:
                batch.finish_interrupted(resolved)
                raise
    finally:
        if own_backend:
            backend.close()
        remove_stray_temporaries(out)  # left by workers stopped mid-write; we still hold the lock
        lock.release()
    return _report(batch, resolved, star, time.perf_counter() - t_start, console, err)


def _report(
    batch: _Batch,
    resolved: ResolvedInputs,
    star: tuple[Path | None, str | None],
    seconds: float,
    console: Console,
    err: Console,
) -> EstimateReport:
    """The report of a finished run; the summary printed unless quiet."""
    star_path, star_error = star
    if star_error:
        err.print(f"error: {star_error}", markup=False)
    report = EstimateReport(
        results=batch.results_of(resolved),
        failures=batch.failures_of(resolved),
        star_path=star_path,
        seconds=seconds,
        star_error=star_error,
        n_skipped=batch.n_skipped,
    )
    if not batch.request.quiet:
        _print_summary(console, report)
    return report


def _print_summary(console: Console, report: EstimateReport) -> None:
    n = report.n_ok + report.n_failed
    line = (
        f"{report.n_ok} of {n} micrographs ok, {report.n_failed} failed in {report.seconds:.1f} s"
    )
    if report.n_skipped:
        line += f" ({report.n_skipped} done by an earlier run, not redone)"
    if report.results:
        df = _median([r.mean_defocus for r in report.results])
        res = _median([r.fit_resolution for r in report.results])
        line += f"; median defocus {df:,.0f} Å, median fit resolution {res:.2f} Å"
    console.print(line, markup=False)
    if (flagged := flag_summary(report.results)) is not None:
        console.print(flagged, markup=False)
    if report.star_path is not None:
        console.print(f"results: {report.star_path}", markup=False)
    elif not report.results:
        console.print(f"no micrograph succeeded; {STAR_NAME} was not written", markup=False)
