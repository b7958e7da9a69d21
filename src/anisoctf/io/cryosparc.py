"""cryoSPARC ``.cs`` files: NumPy structured arrays, read and written without loss.

A ``.cs`` file (particles, exposures, ...) is a one-dimensional NumPy structured array saved in
the ``.npy`` format (``numpy.save``), one field per column: ``uid`` (``<u8``), ``blob/path``
(fixed-length bytes ``|S…``), ``blob/shape`` (``<u4``, (2,)), ``ctf/df1_A``, ``ctf/df2_A``,
``ctf/df_angle_rad``, ``ctf/anisomag`` (``<f4``, (4,)), ``ctf/exp_group_id`` (``<u4``) and so on.
This is the "NUMPY_FORMAT" of cryosparc-tools, still its default when saving; cryosparc-tools
also knows a newer compressed stream format whose files start with ``b"\\x95CSDAT"``: it is
read through cryosparc-tools where that is installed (an optional dependency) and refused with a
line naming the fix where it is not. No field is ever unpickled: files whose dtype holds Python
objects are refused.

The array is kept exactly as stored: field order, byte order, offsets, string widths and
sub-array shapes. :func:`write_cs` writes the data bytes of the array and, when the dtype and the
length are unchanged, the very header bytes the file was read with (older NumPy versions pad the
header to 16 bytes, newer ones to 64), so a rewritten file differs from the original only in the
bytes of the values that were changed. The real files in ``shared/data/real/cryodrgn`` round-trip
byte for byte (a test checks it).

cryosparc-tools (``Dataset``) is not a run-time dependency (it pulls in httpx and pydantic);
plain NumPy reads the NumPy format, and cryosparc-tools is imported only for a CSDAT file.
"""

from __future__ import annotations

import importlib.util
import io
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from anisoctf.errors import InputError
from anisoctf.io.atomic import atomic_write

__all__ = [
    "CSDAT_MAGIC",
    "NUMPY_MAGIC",
    "is_cryosparc_file",
    "CSFile",
    "read_cs",
    "require_fields",
    "write_cs",
]

#: First bytes of a ``.cs`` file in NumPy ``.npy`` format.
NUMPY_MAGIC = b"\x93NUMPY"
#: First bytes of cryosparc-tools' compressed stream format (read through cryosparc-tools).
CSDAT_MAGIC = b"\x95CSDAT"


@dataclass(frozen=True, eq=False)
class CSFile:
    """A ``.cs`` file as read: the structured array and the header bytes it came with.

    Parameters
    ----------
    array
        One-dimensional structured array (a private, writeable copy of the file's rows).
    header
        The file's bytes before the data: magic string, version, header length and the header
        dictionary with its padding. :func:`write_cs` reuses them when the array still has the
        same dtype and length.
    path
        Where it was read from.
    """

    array: np.ndarray
    header: bytes
    path: Path

    @property
    def fields(self) -> tuple[str, ...]:
        """Field names in file order."""
        return tuple(self.array.dtype.names or ())

    def __len__(self) -> int:
        return int(self.array.shape[0])


def _parse_header(fh: io.BufferedIOBase | io.BytesIO) -> tuple[tuple[int, ...], bool, np.dtype]:
    """``(shape, fortran_order, dtype)`` of an ``.npy`` header (file positioned at its start)."""
    version = np.lib.format.read_magic(fh)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(fh)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(fh)
    # version 3.0 (UTF-8 field names) has no public reader; numpy's own np.load uses this one
    reader = getattr(np.lib.format, "_read_array_header", None)
    if reader is None:  # pragma: no cover - depends on the numpy version
        raise ValueError(f"unsupported .npy format version {version}")
    return reader(fh, version)


def is_cryosparc_file(path: Path) -> bool:
    """True when ``path`` starts like a ``.cs`` file (NumPy or CSDAT magic); a file that
    cannot be opened is judged by its suffix."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(len(NUMPY_MAGIC))
    except OSError:
        return path.suffix.lower() == ".cs"
    return head in (NUMPY_MAGIC, CSDAT_MAGIC)


def read_cs(path: str | os.PathLike[str]) -> CSFile:
    """Read a cryoSPARC ``.cs`` file (NumPy format) into a structured array.

    Parameters
    ----------
    path
        The ``.cs`` file (particles, exposures, ...).

    Returns
    -------
    CSFile
        The array (writeable copy, dtype exactly as stored) and the original header bytes.

    Raises
    ------
    InputError
        Missing file, a directory, a compressed (CSDAT) file without cryosparc-tools, not an
        ``.npy`` file, a header that cannot be parsed, a dtype that is not a one-dimensional
        structured array of plain values (Python objects are refused, never unpickled), or a
        data section shorter or longer than the header announces (a truncated or damaged
        file). Always one line.
    """
    p = Path(path)
    if not p.exists():
        raise InputError("file not found; check the path", path=p)
    if p.is_dir():
        raise InputError("is a directory, not a cryoSPARC .cs file", path=p)
    try:
        fh = open(p, "rb")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise InputError(f"cannot open ({exc.strerror or exc}); check permissions", path=p) from exc
    with fh:
        magic = fh.read(len(NUMPY_MAGIC))
        if magic == CSDAT_MAGIC:
            return CSFile(array=_read_csdat(p), header=b"", path=p)
        if magic != NUMPY_MAGIC:
            what = "empty file" if not magic else "no NumPy header"
            raise InputError(f"not a cryoSPARC .cs file ({what}); check the path", path=p)
        fh.seek(0)
        try:
            shape, fortran_order, dtype = _parse_header(fh)
        except Exception as exc:  # numpy raises ValueError/SyntaxError/EOFError on bad headers
            raise InputError(
                f"damaged or truncated .cs header ({type(exc).__name__}: {exc})", path=p
            ) from exc
        data_start = fh.tell()
        fh.seek(0)
        header = fh.read(data_start)
        if dtype.names is None:
            raise InputError(
                f"not a cryoSPARC dataset: plain {dtype} array without named fields", path=p
            )
        if dtype.hasobject:
            raise InputError(
                "holds Python objects (pickled fields), which anisoctf does not load; re-export "
                "the dataset from cryoSPARC",
                path=p,
            )
        if len(shape) != 1:
            raise InputError(
                f"not a cryoSPARC dataset: array of shape {shape}, expected 1-D", path=p
            )
        n = int(shape[0])
        expected = n * dtype.itemsize
        size = os.fstat(fh.fileno()).st_size - data_start
        if size < expected:
            raise InputError(
                f"truncated: the header announces {n} rows ({expected} bytes) but only {size} "
                "bytes follow; copy the file again",
                path=p,
            )
        if size > expected:
            raise InputError(
                f"damaged: {size - expected} unexpected bytes after the {n} rows the header "
                "announces",
                path=p,
            )
        fh.seek(data_start)
        array = np.fromfile(fh, dtype=dtype, count=n) if n else np.zeros(0, dtype=dtype)
    if fortran_order:  # irrelevant for 1-D data, but keep the array as numpy would return it
        array = np.asfortranarray(array)
    return CSFile(array=array, header=header, path=p)


#: Converts a CSDAT file to the NumPy format in a child process (argv: source, destination).
_CSDAT_TO_NUMPY = (
    "import sys\n"
    "from cryosparc.dataset import NUMPY_FORMAT, Dataset\n"
    "Dataset.load(sys.argv[1]).save(sys.argv[2], format=NUMPY_FORMAT)\n"
)


def _read_csdat(p: Path) -> np.ndarray:
    """A compressed (CSDAT) dataset, converted by cryosparc-tools in a child process.

    cryosparc-tools' decoder is compiled code that crashes the whole interpreter (SIGSEGV) on
    some damaged streams (the fuzz test found it), so it runs in a child process that writes the
    NumPy format to a temporary file, which is then read and checked like any ``.cs``. Without
    cryosparc-tools the file is refused with a line naming the fix.
    """
    if importlib.util.find_spec("cryosparc") is None:
        raise InputError(
            "cryoSPARC compressed (CSDAT) dataset: install cryosparc-tools "
            "(pip install cryosparc-tools) to read it, or save it in the NumPy format "
            "(Dataset.save(path, format=NUMPY_FORMAT))",
            path=p,
        )
    with tempfile.TemporaryDirectory(prefix="anisoctf-csdat-") as tmp:
        out = Path(tmp) / "converted.cs"
        try:
            run = subprocess.run(
                [sys.executable, "-c", _CSDAT_TO_NUMPY, str(p), str(out)],
                capture_output=True,
                text=True,
                timeout=3600,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise InputError(f"cannot convert the compressed (CSDAT) .cs: {exc}", path=p) from exc
        if run.returncode != 0 or not out.is_file():
            lines = (run.stderr or "").strip().splitlines()
            why = lines[-1] if lines else f"cryosparc-tools exited with status {run.returncode}"
            raise InputError(
                f"damaged or truncated compressed (CSDAT) .cs ({why}); copy it again", path=p
            )
        try:
            return read_cs(out).array
        except InputError as exc:  # name the user's file, not the temporary one
            why = str(exc).removeprefix(f"{exc.path}: ") if exc.path else str(exc)
            raise InputError(f"compressed (CSDAT) .cs: {why}", path=p) from None


def require_fields(
    array: np.ndarray,
    fields: Iterable[str],
    path: str | os.PathLike[str] | None = None,
    *,
    hint: str = "",
) -> None:
    """Raise a one-line :class:`InputError` naming every field of ``fields`` the array lacks.

    Parameters
    ----------
    array
        A structured array (e.g. :attr:`CSFile.array`).
    fields
        Field names that must be present.
    path
        File named in the message.
    hint
        What to do about it, appended to the message.
    """
    names = set(array.dtype.names or ())
    missing = [f for f in fields if f not in names]
    if missing:
        message = f"no {', '.join(missing)} field{'s' if len(missing) > 1 else ''} in the dataset"
        raise InputError(f"{message}; {hint}" if hint else message, path=path)


def _header_fits(header: bytes, array: np.ndarray) -> bool:
    """True when ``header`` is an ``.npy`` header for exactly this dtype and length."""
    try:
        shape, fortran_order, dtype = _parse_header(io.BytesIO(header))
    except Exception:
        return False
    return (
        tuple(shape) == tuple(array.shape)
        and not fortran_order
        and dtype == array.dtype
        and dtype.descr == array.dtype.descr
    )


def write_cs(
    path: str | os.PathLike[str], array: np.ndarray, *, header: bytes | None = None
) -> None:
    """Write a structured array as a cryoSPARC ``.cs`` file (NumPy format), atomically.

    Parameters
    ----------
    path
        Output file; replaced only once it is complete.
    array
        One-dimensional structured array; written with its own dtype, unchanged.
    header
        Header bytes to reuse (e.g. :attr:`CSFile.header` of the file the array came from). Used
        only when it describes exactly this dtype and length; otherwise NumPy writes a new
        header. Reusing it makes an unchanged array produce a byte-identical file.

    Raises
    ------
    ValueError
        The array is not one-dimensional or has no named fields, or holds Python objects.
    """
    a = np.asarray(array)
    if a.ndim != 1 or a.dtype.names is None:
        raise ValueError("a .cs dataset must be a one-dimensional structured array")
    if a.dtype.hasobject:
        raise ValueError("a .cs dataset cannot hold Python objects")
    a = np.ascontiguousarray(a)
    with atomic_write(path, "wb") as fh:
        if header is not None and _header_fits(header, a):
            fh.write(header)
            if a.size:
                fh.write(memoryview(a.view(np.uint8)))
        else:
            np.lib.format.write_array(fh, a, allow_pickle=False)
