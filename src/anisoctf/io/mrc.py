"""Reading and writing MRC images (micrographs, movie-frame stacks, particle stacks).

The header is parsed here directly (1024 bytes, MRC2014 layout) so that every way a file can be
broken is reported as one :class:`~anisoctf.errors.InputError` line that names the file and
the fix, before any pixel is touched; the pixels are then memory-mapped with :class:`numpy.memmap`
and converted to float32 exactly once. ``mrcfile`` is used for writing.

Conventions: arrays are ``(ny, nx)`` for one image (rows = y, columns = x, as ``mrcfile``
returns them) and ``(n, ny, nx)`` for stacks. Supported data modes: 0 (int8, or uint8 when an
IMOD header says the bytes are unsigned), 1 (int16), 2 (float32), 6 (uint16), 12 (float16).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike, NDArray

from anisoctf.errors import InputError
from anisoctf.io.atomic import atomic_path

__all__ = [
    "MIN_MICROGRAPH_SIZE",
    "MRCHeader",
    "MRCImage",
    "read_micrograph",
    "read_mrc_header",
    "read_stack",
    "read_stack_images",
    "write_mrc",
]

#: Smallest micrograph edge (pixels) that can still be used for CTF fitting.
MIN_MICROGRAPH_SIZE = 64

_HEADER_BYTES = 1024
_MAX_XY = 1 << 20  # no detector is a million pixels wide; anything larger is garbage
_MAX_Z = (1 << 31) - 1
_IMOD_STAMP = 1146047817  # "IMOD" as int32, at byte 152; flags at byte 156
_MODE_NAMES = {
    0: "int8",
    1: "int16",
    2: "float32",
    3: "complex int16",
    4: "complex float32",
    6: "uint16",
    12: "float16",
    101: "4-bit packed",
}
_MODE_DTYPES = {0: "i1", 1: "i2", 2: "f4", 6: "u2", 12: "f2"}
_EXTTYP = slice(104, 108)  # MRC2014 EXTTYP: the extended header's type
_FEI_TYPES = (b"FEI1", b"FEI2")
_FEI_RECORD = 768  # bytes of the FEI1 fields (FEI2 appends more); the first record is read
#: byte offsets and bitmask-1 bits of the FEI1 fields used (Thermo Fisher, "EPU/Velox MRC
#: extended header" v1; the layout of mrcfile.dtypes.get_ext_header_dtype)
_FEI_BITMASK1 = 8
_FEI_HT = (84, 5)
_FEI_PIXEL_X = (156, 14)
_CONVERT_HINT = "convert it to mode 2 (float32), e.g. with IMOD 'newstack -mode 2'"


@dataclass(frozen=True)
class MRCHeader:
    """The parts of an MRC header that anisoctf uses.

    Parameters
    ----------
    nx, ny, nz
        Columns, rows and sections (frames or stacked images).
    mode
        MRC data mode.
    dtype
        NumPy dtype of the stored pixels, with the file's byte order.
    data_offset
        Byte offset of the first pixel (1024 + extended header).
    pixel_size
        Pixel size in Å from ``cella.x / mx``, or None when the header has none (<= 0).
    file_size
        Size of the file in bytes.
    voltage_kv
        Acceleration voltage (kV) from an FEI/EPU extended header (``FEI1``/``FEI2``, field
        ``HT``), or None when the file carries none.
    metadata_pixel_size
        Pixel size (Å) from an FEI/EPU extended header (``Pixel size X``, stored in metres),
        or None.
    """

    nx: int
    ny: int
    nz: int
    mode: int
    dtype: np.dtype
    data_offset: int
    pixel_size: float | None
    file_size: int
    voltage_kv: float | None = None
    metadata_pixel_size: float | None = None

    @property
    def expected_size(self) -> int:
        """Bytes the header promises: header + extended header + pixels."""
        return self.data_offset + self.nx * self.ny * self.nz * self.dtype.itemsize


@dataclass(frozen=True)
class MRCImage:
    """One micrograph read from disk.

    Parameters
    ----------
    data
        float32 array ``(ny, nx)``; movie frames are already summed.
    header_pixel_size
        Pixel size in Å recorded in the header, or None when the header has none (<= 0).
        A value of exactly 1.0 is kept as given but is often a placeholder: prefer the pixel
        size from the STAR file or the command line.
    path
        The file the image came from.
    """

    data: NDArray[np.float32]
    header_pixel_size: float | None
    path: str

    @property
    def shape(self) -> tuple[int, ...]:
        """Array shape ``(ny, nx)``."""
        return tuple(self.data.shape)


def _decode_header(raw: bytes, byteorder: str) -> dict[str, int | float]:
    """Decode the integer and float words of a 1024-byte header in one byte order."""
    i4 = np.frombuffer(raw, dtype=f"{byteorder}i4", count=256)
    f4 = np.frombuffer(raw, dtype=f"{byteorder}f4", count=256)
    return {
        "nx": int(i4[0]),
        "ny": int(i4[1]),
        "nz": int(i4[2]),
        "mode": int(i4[3]),
        "mx": int(i4[7]),
        "cella_x": float(f4[10]),
        "nsymbt": int(i4[23]),
        "imod_stamp": int(i4[38]),
        "imod_flags": int(i4[39]),
    }


def _plausible(h: dict[str, int | float]) -> bool:
    """True when header words look like an MRC header (used to tell byte order and junk)."""
    return (
        h["mode"] in _MODE_NAMES
        and 0 <= h["nx"] <= _MAX_XY
        and 0 <= h["ny"] <= _MAX_XY
        and 0 <= h["nz"] <= _MAX_Z
        and 0 <= h["nsymbt"] < (1 << 31)
    )


def read_mrc_header(path: str | os.PathLike[str]) -> MRCHeader:
    """Read and check an MRC header without touching the pixels.

    Parameters
    ----------
    path
        An ``.mrc`` / ``.mrcs`` / ``.st`` file.

    Returns
    -------
    MRCHeader
        The checked header.

    Raises
    ------
    InputError
        File missing or unreadable; not an MRC file; unsupported mode; no pixels; truncated.
    """
    p = Path(path)
    if not p.exists():
        raise InputError("file not found; check the path (and the project directory)", path=p)
    if p.is_dir():
        raise InputError("is a directory, not an MRC file; give the image file itself", path=p)
    try:
        file_size = p.stat().st_size
        with open(p, "rb") as fh:
            raw = fh.read(_HEADER_BYTES)
    except OSError as exc:
        raise InputError(f"cannot read file ({exc.strerror or exc}); check permissions", p) from exc
    if file_size == 0:
        raise InputError("empty file (0 bytes); re-copy or re-export the file", path=p)
    if len(raw) < _HEADER_BYTES:
        raise InputError(
            f"not an MRC file: only {file_size} bytes, shorter than the 1024-byte MRC header",
            path=p,
        )

    has_map = raw[208:211] == b"MAP"
    stamp = raw[212]
    if stamp == 0x44:
        orders = ["<"]
    elif stamp == 0x11:
        orders = [">"]
    else:  # old files have no machine stamp: take the byte order that makes sense
        orders = ["<", ">"]
    h: dict[str, int | float] | None = None
    order = orders[0]
    for candidate in orders:
        decoded = _decode_header(raw, candidate)
        if _plausible(decoded):
            h, order = decoded, candidate
            break
    if h is None:
        h0 = _decode_header(raw, orders[0])
        if has_map and not (0 <= h0["nx"] <= _MAX_XY and 0 <= h0["ny"] <= _MAX_XY):
            raise InputError(
                f"not an MRC file: corrupt header (nx={h0['nx']}, ny={h0['ny']}, "
                f"nz={h0['nz']}); re-copy or re-export the file",
                path=p,
            )
        if has_map and h0["mode"] not in _MODE_NAMES:
            raise InputError(f"unknown MRC data mode {h0['mode']}; {_CONVERT_HINT}", path=p)
        if has_map:
            raise InputError(
                "not an MRC file: corrupt header; re-copy or re-export the file", path=p
            )
        raise InputError(
            "not an MRC file (no 'MAP ' identifier and the header makes no sense); "
            "check the path or convert the image to MRC",
            path=p,
        )
    mode = int(h["mode"])
    if mode not in _MODE_DTYPES:
        raise InputError(
            f"unsupported MRC data mode {mode} ({_MODE_NAMES[mode]}); {_CONVERT_HINT}", path=p
        )
    nx, ny, nz = int(h["nx"]), int(h["ny"]), int(h["nz"])
    if nx == 0 or ny == 0 or nz == 0:
        raise InputError(
            f"header says the image is empty ({nx}x{ny}x{nz} pixels); re-export the file", path=p
        )
    code = _MODE_DTYPES[mode]
    if mode == 0 and h["imod_stamp"] == _IMOD_STAMP and not (int(h["imod_flags"]) & 1):
        code = "u1"  # IMOD convention: flag bit 0 clear means the bytes are unsigned
    dtype = np.dtype(code).newbyteorder(order) if code not in ("i1", "u1") else np.dtype(code)
    mx, cella_x = int(h["mx"]), float(h["cella_x"])
    apix = cella_x / mx if mx > 0 else 0.0
    pixel_size = float(apix) if np.isfinite(apix) and apix > 0 else None
    nsymbt = int(h["nsymbt"])
    kv, fei_apix = (None, None)
    if raw[_EXTTYP] in _FEI_TYPES and nsymbt >= _FEI_RECORD:
        kv, fei_apix = _fei_optics(p, order)
    header = MRCHeader(
        voltage_kv=kv,
        metadata_pixel_size=fei_apix,
        nx=nx,
        ny=ny,
        nz=nz,
        mode=mode,
        dtype=dtype,
        data_offset=_HEADER_BYTES + nsymbt,
        pixel_size=pixel_size,
        file_size=file_size,
    )
    if file_size < header.expected_size:
        raise InputError(
            f"truncated: header ({nx}x{ny}x{nz} px, mode {mode}) needs {header.expected_size} "
            f"bytes but the file has {file_size}; re-copy or re-export the file",
            path=p,
        )
    return header


def _fei_optics(path: Path, order: str) -> tuple[float | None, float | None]:
    """Voltage (kV) and pixel size (Å) of the first FEI/EPU extended-header record.

    Fields flagged absent in ``Bitmask 1``, or implausible (voltage outside 10–1000 kV,
    pixel size outside 0.01–100 Å), are None. Byte order is the main header's (FEI files are
    little-endian in practice).
    """
    try:
        with open(path, "rb") as fh:
            fh.seek(_HEADER_BYTES)
            rec = fh.read(_FEI_RECORD)
    except OSError:
        return None, None
    if len(rec) < _FEI_RECORD:
        return None, None
    mask = int(np.frombuffer(rec, dtype=f"{order}u4", count=1, offset=_FEI_BITMASK1)[0])

    def value(field: tuple[int, int]) -> float | None:
        offset, bit = field
        if not mask >> bit & 1:
            return None
        v = float(np.frombuffer(rec, dtype=f"{order}f8", count=1, offset=offset)[0])
        return v if np.isfinite(v) else None

    ht, px = value(_FEI_HT), value(_FEI_PIXEL_X)
    kv = ht / 1e3 if ht is not None and 1e4 <= ht <= 1e6 else None
    apix = px * 1e10 if px is not None and 1e-12 <= px <= 1e-8 else None
    return (
        None if kv is None else float(f"{kv:.6g}"),
        None if apix is None else float(f"{apix:.6g}"),
    )


def _memmap(path: Path, header: MRCHeader) -> np.memmap:
    """Read-only memory map of the pixels, shape ``(nz, ny, nx)``."""
    try:
        return np.memmap(
            path,
            dtype=header.dtype,
            mode="r",
            offset=header.data_offset,
            shape=(header.nz, header.ny, header.nx),
        )
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot map the pixel data ({exc}); re-copy the file", path=path) from exc


def _check_finite(data: NDArray[np.floating], path: Path, what: str = "") -> None:
    """Raise InputError when ``data`` holds NaN or Inf values."""
    if data.dtype.kind == "f" and np.isfinite(np.sum(data)):  # NaN/Inf make the sum non-finite
        return  # (an overflowing sum of finite pixels only sends us to the exact count below)
    bad = int(data.size - np.count_nonzero(np.isfinite(data)))
    if bad:
        raise InputError(
            f"{what}contains {bad} NaN/Inf pixels; re-run motion correction or check the export",
            path=path,
        )


def read_micrograph(path: str | os.PathLike[str]) -> MRCImage:
    """Read one micrograph as float32, summing movie frames.

    Parameters
    ----------
    path
        MRC file. A 3D file (nz > 1) is taken as a stack of movie frames and summed.

    Returns
    -------
    MRCImage
        The ``(ny, nx)`` float32 image and the header pixel size.

    Raises
    ------
    InputError
        Missing, not MRC, unsupported mode, truncated, NaN/Inf pixels, all pixels equal,
        or smaller than :data:`MIN_MICROGRAPH_SIZE` pixels on a side.
    """
    p = Path(path)
    header = read_mrc_header(p)
    if header.nx < MIN_MICROGRAPH_SIZE or header.ny < MIN_MICROGRAPH_SIZE:
        raise InputError(
            f"image is only {header.nx}x{header.ny} px; CTF fitting needs at least "
            f"{MIN_MICROGRAPH_SIZE}x{MIN_MICROGRAPH_SIZE} (is this a particle stack?)",
            path=p,
        )
    if header.nz == 1 and header.dtype == np.dtype(np.float32):
        data = _read_float32(p, header)
    else:
        data = _read_converted(p, header)
    if header.dtype.kind == "f" or header.nz > 1:
        _check_finite(data, p)
    if _is_constant(data):
        raise InputError(
            f"all pixels equal ({float(data.flat[0]):g}): empty or blank micrograph; "
            "check the export or drop it from the list",
            path=p,
        )
    return MRCImage(data=data, header_pixel_size=header.pixel_size, path=str(p))


def _is_constant(data: NDArray) -> bool:
    """True when every pixel equals the first (any differing pixel in the first row decides
    at once, so a real micrograph costs one row)."""
    first = data.flat[0]
    if data.ndim >= 2 and np.any(data[0] != first):
        return False
    return bool(data.min() == data.max())


def _read_float32(path: Path, header: MRCHeader) -> NDArray[np.float32]:
    """One native-order float32 image as a private (copy-on-write) map of the file: the pixels
    are the page cache's own, so there is no copy and no fresh 4-byte-per-pixel allocation to
    fault in; writing to the array changes only this process's copy, never the file."""
    try:
        mm = np.memmap(
            path,
            dtype=np.float32,
            mode="c",
            offset=header.data_offset,
            shape=(header.ny, header.nx),
        )
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot map the pixel data ({exc}); re-copy the file", path=path) from exc
    return np.asarray(mm)  # a plain ndarray view (the map lives as long as the array)


def _read_converted(path: Path, header: MRCHeader) -> NDArray[np.float32]:
    """Any other mode or a stack of frames (summed): mapped, converted to float32 once."""
    p = path
    mm = _memmap(p, header)
    try:
        if header.nz == 1:
            data = np.array(mm[0], dtype=np.float32)  # the single read + conversion
        else:
            acc = np.zeros((header.ny, header.nx), dtype=np.float64)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # inf - inf: reported below
                for frame in mm:
                    acc += frame
            data = acc.astype(np.float32)
    except OSError as exc:  # e.g. an I/O error while paging in a network file
        raise InputError(f"cannot read the pixel data ({exc}); re-copy the file", path=p) from exc
    finally:
        del mm
    return data


def read_stack(path: str | os.PathLike[str]) -> np.memmap:
    """Memory-map a particle stack without reading it.

    Parameters
    ----------
    path
        ``.mrcs`` (or ``.mrc``) file; a 2D file gives a stack of one image.

    Returns
    -------
    numpy.memmap
        Read-only ``(n, ny, nx)`` array in the file's own dtype; pixels are read on access.

    Raises
    ------
    InputError
        Missing, not MRC, unsupported mode, or truncated file.
    """
    p = Path(path)
    return _memmap(p, read_mrc_header(p))


def read_stack_images(path: str | os.PathLike[str], indices: Sequence[int] | ArrayLike) -> NDArray:
    """Read selected images of a stack as float32 copies.

    Parameters
    ----------
    path
        ``.mrcs`` file.
    indices
        0-based image numbers (RELION's ``12@stack.mrcs`` is index 11).

    Returns
    -------
    numpy.ndarray
        float32 array ``(len(indices), ny, nx)``.

    Raises
    ------
    InputError
        Bad file (see :func:`read_stack`), an index outside the stack, or NaN/Inf pixels.
    """
    p = Path(path)
    stack = read_stack(p)
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    n = stack.shape[0]
    out_of_range = idx[(idx < 0) | (idx >= n)]
    if out_of_range.size:
        raise InputError(
            f"image {int(out_of_range[0]) + 1} requested but the stack holds {n} images; "
            "the STAR file and the stack do not match",
            path=p,
        )
    try:
        images = np.array(stack[idx], dtype=np.float32)
    except OSError as exc:
        raise InputError(f"cannot read the pixel data ({exc}); re-copy the file", path=p) from exc
    _check_finite(images, p, what="selected images ")
    return images


def write_mrc(
    path: str | os.PathLike[str],
    data: ArrayLike,
    pixel_size: float,
    *,
    stack: bool = True,
) -> None:
    """Write a float32 MRC file atomically.

    Parameters
    ----------
    path
        Target file; replaced only once the new file is complete.
    data
        2D ``(ny, nx)`` image or 3D ``(n, ny, nx)`` array.
    pixel_size
        Pixel size in Å, stored as the voxel size.
    stack
        For 3D data: True writes an image stack (space group 0, as ``.mrcs``), False a volume.

    Raises
    ------
    ValueError
        Data that is not 2D or 3D, or a pixel size that is not a positive number.
    """
    import mrcfile  # imported here: only writers need it

    arr = np.asarray(data, dtype=np.float32)
    if arr.ndim not in (2, 3) or arr.size == 0:
        raise ValueError(f"write_mrc needs a non-empty 2D or 3D array, got shape {arr.shape}")
    if not (np.isfinite(pixel_size) and pixel_size > 0):
        raise ValueError(f"pixel size must be a positive number of Å, got {pixel_size}")
    with atomic_path(path) as tmp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            with mrcfile.new(tmp, overwrite=True) as mrc:
                mrc.set_data(np.ascontiguousarray(arr))
                if arr.ndim == 3 and stack:
                    mrc.set_image_stack()
                mrc.voxel_size = float(pixel_size)
