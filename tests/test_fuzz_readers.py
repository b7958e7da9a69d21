"""Property-based and fuzz tests of the readers (hypothesis): MRC, STAR, cryoSPARC .cs, CTFFIND
and Gctf. Random bytes, truncated and corrupted real files: every reader either returns or
raises :class:`~anisoctf.errors.InputError` with one line that names the file, never anything
else. Example counts are modest to keep the suite fast."""

from __future__ import annotations

import atexit
import io
import math
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from anisoctf.errors import InputError
from anisoctf.io.cryosparc import read_cs
from anisoctf.io.ctffind import read_ctffind_txt
from anisoctf.io.gctf import read_gctf_log, read_gctf_star
from anisoctf.io.mrc import read_micrograph, read_mrc_header, read_stack, write_mrc
from anisoctf.io.star import read_micrographs_ctf_star, read_micrographs_star

FUZZ = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

_DIR = Path(tempfile.mkdtemp(prefix="anisoctf-fuzz-"))
atexit.register(shutil.rmtree, _DIR, ignore_errors=True)


def _check(reader: Callable, data: bytes, suffix: str):
    """Write ``data`` to a file and read it: returns the result or None after an InputError."""
    path = _DIR / f"fuzz{suffix}"
    path.write_bytes(data)
    try:
        return reader(path)
    except InputError as exc:
        msg = str(exc)
        assert "\n" not in msg and msg.strip(), repr(msg)
        assert str(path) in msg, msg
        return None


def _mrc_bytes(shape=(64, 64), mode_dtype=np.float32) -> bytes:
    path = _DIR / "base.mrc"
    write_mrc(path, np.random.default_rng(0).normal(size=shape).astype(mode_dtype), pixel_size=1.5)
    return path.read_bytes()


MRC = _mrc_bytes()

CTFFIND = (
    "# Output from CTFFIND version 4.1.14, run on 2020-01-01 10:00:00\n"
    "# Input file: a.mrc ; Number of micrographs: 1\n"
    "# Pixel size: 1.000 Angstroms ; acceleration voltage: 300.0 keV ; spherical aberration: "
    "2.70 mm ; amplitude contrast: 0.07\n"
    "# Columns: #1 - micrograph number; #2 - defocus 1 [Angstroms]; ...\n"
    "1.000000 12000.50 11500.25 33.10 0.000000 0.120000 4.500000\n"
)

GCTF = (
    "   Defocus_U   Defocus_V       Angle         CCC\n"
    "    21395.27    20943.89       73.60    0.086544  Final Values\n"
    "Resolution limit estimated by EPA: RES_LIMIT 3.567\n"
)

STAR = (
    "\n# version 30001\n\ndata_optics\n\nloop_\n_rlnOpticsGroupName #1\n_rlnOpticsGroup #2\n"
    "_rlnMicrographPixelSize #3\n_rlnVoltage #4\n_rlnSphericalAberration #5\n"
    "_rlnAmplitudeContrast #6\nopticsGroup1 1 0.885 200 1.4 0.1\n\n# version 30001\n\n"
    "data_micrographs\n\nloop_\n_rlnMicrographName #1\n_rlnOpticsGroup #2\n_rlnDefocusU #3\n"
    "_rlnDefocusV #4\n_rlnDefocusAngle #5\n_rlnCtfMaxResolution #6\n"
    "Movies/a.mrc 1 10865.0 10571.4 79.1 4.8\nMovies/b.mrc 1 9839.1 9586.3 70.5 3.5\n"
)


def _cs_bytes() -> bytes:
    dtype = np.dtype(
        [("uid", "<u8"), ("blob/path", "S20"), ("ctf/df1_A", "<f4"), ("ctf/anisomag", "<f4", (4,))]
    )
    arr = np.zeros(3, dtype=dtype)
    arr["uid"] = [1, 2, 3]
    arr["blob/path"] = [b"a.mrc", b"b.mrc", b"c.mrc"]
    arr["ctf/df1_A"] = [1e4, 2e4, 3e4]
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


CS = _cs_bytes()

# --------------------------------------------------------------------------------------------
# random bytes


@FUZZ
@given(st.binary(max_size=3000))
@example(b"")
@example(MRC[:1024])
@example(b"\x93NUMPY")
def test_random_bytes_never_crash_any_reader(data: bytes) -> None:
    _check(read_mrc_header, data, ".mrc")
    _check(read_micrograph, data, ".mrc")
    _check(read_stack, data, ".mrcs")
    _check(read_cs, data, ".cs")
    _check(read_ctffind_txt, data, ".txt")
    _check(read_gctf_log, data, "_gctf.log")
    _check(read_micrographs_star, data, ".star")
    _check(read_micrographs_ctf_star, data, ".star")


@FUZZ
@given(st.text(max_size=800))
def test_random_text_never_crashes_text_readers(text: str) -> None:
    data = text.encode("utf-8", "surrogatepass")
    _check(read_ctffind_txt, data, ".txt")
    _check(read_gctf_log, data, "_gctf.log")
    _check(read_micrographs_ctf_star, data, ".star")
    _check(read_gctf_star, data, ".star")


# --------------------------------------------------------------------------------------------
# truncated and corrupted valid files


def _corrupt(base: bytes, data) -> bytes:
    """Truncate ``base`` and/or overwrite a few bytes at random positions."""
    cut = data.draw(st.integers(0, len(base)))
    out = bytearray(base[:cut] if data.draw(st.booleans()) else base)
    for _ in range(data.draw(st.integers(0, 6))):
        if not out:
            break
        pos = data.draw(st.integers(0, len(out) - 1))
        out[pos] = data.draw(st.integers(0, 255))
    return bytes(out)


@FUZZ
@given(st.data())
def test_corrupted_mrc(data) -> None:
    blob = _corrupt(MRC, data)
    img = _check(read_micrograph, blob, ".mrc")
    if img is not None:  # whatever was accepted is a finite 2-D image
        assert img.data.ndim == 2 and np.isfinite(img.data).all()
    _check(read_mrc_header, blob, ".mrc")


@FUZZ
@given(st.data())
def test_corrupted_cs(data) -> None:
    blob = _corrupt(CS, data)
    cs = _check(read_cs, blob, ".cs")
    if cs is not None:
        assert cs.array.ndim == 1


def _csdat_bytes() -> bytes:
    """The same dataset in cryoSPARC's compressed stream format (needs cryosparc-tools)."""
    cstools = pytest.importorskip("cryosparc.dataset", reason="cryosparc-tools is not installed")
    buf = io.BytesIO()
    cstools.Dataset(np.load(io.BytesIO(CS))).save(buf, format=cstools.CSDAT_FORMAT)
    return buf.getvalue()


@FUZZ
@given(st.data())
def test_corrupted_compressed_cs(data) -> None:
    """Damaged CSDAT streams (read through cryosparc-tools) end in a one-line InputError."""
    blob = _corrupt(_csdat_bytes(), data)
    cs = _check(read_cs, blob, ".cs")
    if cs is not None:
        assert cs.array.ndim == 1


@FUZZ
@given(st.data())
def test_corrupted_text_results(data) -> None:
    for base, reader, suffix in (
        (CTFFIND, read_ctffind_txt, ".txt"),
        (GCTF, read_gctf_log, "_gctf.log"),
        (STAR, read_micrographs_ctf_star, ".star"),
        (STAR, read_micrographs_star, ".star"),
    ):
        out = _check(reader, _corrupt(base.encode(), data), suffix)
        if reader is read_ctffind_txt and out is not None:
            assert all(math.isfinite(r.defocus_1) for r in out)


@settings(max_examples=25, deadline=None)
@given(
    st.floats(1000, 80000, allow_nan=False),
    st.floats(1000, 80000, allow_nan=False),
    st.floats(-180, 180, allow_nan=False),
)
def test_ctffind_round_trip_property(d1: float, d2: float, az: float) -> None:
    text = CTFFIND.replace("12000.50 11500.25 33.10", f"{d1!r} {d2!r} {az!r}")
    (rec,) = _check(read_ctffind_txt, text.encode(), ".txt")
    assert (rec.defocus_1, rec.defocus_2, rec.azimuth) == (d1, d2, az)


# --------------------------------------------------------------------------------------------
# real files


@pytest.mark.parametrize(
    "name",
    [
        "cryodrgn/empiar_10076_7.cs",
        "cryodrgn/cryosparc_J2_particles_exported.cs",
        "cryodrgn/relion31.mrcs",
        "relion_tutorial_metadata/micrographs_ctf.star",
    ],
)
def test_truncated_real_files(shared_real: Path, name: str) -> None:
    """Every prefix length class of a real file (header only, mid-header, mid-data) is refused
    with one line, or read consistently; never a traceback."""
    base = (shared_real / name).read_bytes()
    suffix = Path(name).suffix
    readers = {
        ".cs": [read_cs],
        ".mrcs": [read_stack, read_mrc_header],
        ".star": [read_micrographs_ctf_star, read_micrographs_star],
    }[suffix]
    rng = np.random.default_rng(1)
    cuts = sorted({0, 1, 6, 10, 100, 1023, 1024, 1025, *rng.integers(0, len(base), 12).tolist()})
    for cut in cuts:
        for reader in readers:
            _check(reader, base[:cut], suffix)
    for reader in readers:  # the whole file still reads
        assert _check(reader, base, suffix) is not None
