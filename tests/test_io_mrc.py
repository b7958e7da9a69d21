"""MRC reading and writing: every mode, frame sums, stacks, and every kind of broken file."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from anisoctf.errors import InputError
from anisoctf.io.mrc import (
    MRCImage,
    read_micrograph,
    read_mrc_header,
    read_stack,
    read_stack_images,
    write_mrc,
)

NY, NX = 70, 96  # deliberately not square: rows are y, columns are x


def _ramp(dtype: type, ny: int = NY, nx: int = NX) -> np.ndarray:
    """Values that identify their position and fit in every dtype (incl. int8)."""
    y, x = np.mgrid[0:ny, 0:nx]
    values = (y * 3 + x) % 120 - (0 if np.dtype(dtype).kind == "u" else 50)
    return values.astype(dtype)


def _new_mrc(path: Path, data: np.ndarray, voxel: float | None = 1.5) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # mrcfile warns about NaN test data
        with mrcfile.new(path, overwrite=True) as mrc:
            mrc.set_data(data)
            if voxel is not None:
                mrc.voxel_size = voxel
    return path


def _assert_input_error(exc: pytest.ExceptionInfo[InputError], path: Path, *words: str) -> None:
    message = str(exc.value)
    assert "\n" not in message
    assert path.name in message
    for word in words:
        assert word in message, message


# ---------------------------------------------------------------------------------------------
# modes and layout


@pytest.mark.parametrize(
    ("dtype", "mode"),
    [(np.int8, 0), (np.int16, 1), (np.float32, 2), (np.uint16, 6), (np.float16, 12)],
)
def test_each_mode_reads_as_float32(tmp_path: Path, dtype: type, mode: int) -> None:
    data = _ramp(dtype)
    path = _new_mrc(tmp_path / f"mode{mode}.mrc", data, voxel=1.25)
    assert read_mrc_header(path).mode == mode
    image = read_micrograph(path)
    assert isinstance(image, MRCImage)
    assert image.data.dtype == np.float32
    assert image.data.shape == (NY, NX)
    np.testing.assert_array_equal(image.data, data.astype(np.float32))
    assert image.data[2, 5] == float(data[2, 5])  # row = y, column = x
    assert image.header_pixel_size == pytest.approx(1.25)
    assert image.path == str(path)


def test_int8_negative_values_survive(tmp_path: Path) -> None:
    data = _ramp(np.int8)
    data[0, 0], data[0, 1] = -128, 127
    image = read_micrograph(_new_mrc(tmp_path / "s8.mrc", data))
    assert image.data[0, 0] == -128.0 and image.data[0, 1] == 127.0


def test_mode0_unsigned_bytes_with_imod_flag(tmp_path: Path) -> None:
    """IMOD stamp with flag bit 0 clear: mode-0 bytes are unsigned (200 stays 200)."""
    unsigned = ((np.arange(NY * NX) * 7) % 256).reshape(NY, NX).astype(np.uint8)
    path = _new_mrc(tmp_path / "u8.mrc", unsigned.view(np.int8))
    raw = bytearray(path.read_bytes())
    raw[152:160] = np.array([1146047817, 0], dtype="<i4").tobytes()
    path.write_bytes(bytes(raw))
    np.testing.assert_array_equal(read_micrograph(path).data, unsigned.astype(np.float32))
    raw[156:160] = np.array([1], dtype="<i4").tobytes()  # flag bit 0 set: signed
    path.write_bytes(bytes(raw))
    np.testing.assert_array_equal(read_micrograph(path).data, unsigned.view(np.int8))


def _handmade_header(nx: int, ny: int, nz: int, mode: int, order: str, apix: float) -> bytes:
    words = np.zeros(256, dtype=f"{order}i4")
    words[0:4] = [nx, ny, nz, mode]
    words[7:10] = [nx, ny, nz]
    floats = words.view(f"{order}f4")
    floats[10:13] = [apix * nx, apix * ny, apix * nz]
    header = bytearray(words.tobytes())
    header[208:212] = b"MAP "
    header[212:214] = b"\x11\x11" if order == ">" else b"\x44\x44"
    return bytes(header)


def test_big_endian_file(tmp_path: Path) -> None:
    data = _ramp(np.float32) * 0.5
    path = tmp_path / "big.mrc"
    path.write_bytes(_handmade_header(NX, NY, 1, 2, ">", 2.0) + data.astype(">f4").tobytes())
    image = read_micrograph(path)
    np.testing.assert_array_equal(image.data, data)
    assert image.data.dtype == np.float32 and image.data.dtype.isnative
    assert image.header_pixel_size == pytest.approx(2.0)


def test_old_file_without_map_string(tmp_path: Path) -> None:
    """Old RELION stacks have no 'MAP ' identifier and no machine stamp; still readable."""
    data = _ramp(np.float32)
    path = _new_mrc(tmp_path / "old.mrc", data)
    raw = bytearray(path.read_bytes())
    raw[208:216] = bytes(8)
    path.write_bytes(bytes(raw))
    np.testing.assert_array_equal(read_micrograph(path).data, data)


def test_no_pixel_size_in_header(tmp_path: Path) -> None:
    path = _new_mrc(tmp_path / "nopix.mrc", _ramp(np.float32), voxel=None)
    assert read_micrograph(path).header_pixel_size is None


def test_movie_frames_are_summed(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 4, size=(5, NY, NX)).astype(np.uint16)
    path = _new_mrc(tmp_path / "movie.mrc", frames, voxel=0.9)
    image = read_micrograph(path)
    assert image.data.shape == (NY, NX) and image.data.dtype == np.float32
    np.testing.assert_array_equal(image.data, frames.sum(axis=0).astype(np.float32))


def test_extended_header_is_skipped(tmp_path: Path) -> None:
    data = _ramp(np.int16)
    with mrcfile.new(tmp_path / "ext.mrc") as mrc:
        mrc.set_extended_header(np.zeros(300, dtype=np.uint8))
        mrc.set_data(data)
    header = read_mrc_header(tmp_path / "ext.mrc")
    assert header.data_offset == 1024 + 300
    np.testing.assert_array_equal(read_micrograph(tmp_path / "ext.mrc").data, data)


# ---------------------------------------------------------------------------------------------
# writing and stacks


def test_write_mrc_round_trip_2d(tmp_path: Path) -> None:
    data = np.random.default_rng(2).normal(size=(NY, NX)).astype(np.float64)
    path = tmp_path / "out.mrc"
    write_mrc(path, data, pixel_size=1.06)
    image = read_micrograph(path)
    np.testing.assert_array_equal(image.data, data.astype(np.float32))
    assert image.header_pixel_size == pytest.approx(1.06, rel=1e-6)
    with mrcfile.open(path) as mrc:  # a valid file for other programs too
        assert mrc.header.mode == 2
        assert float(mrc.voxel_size.x) == pytest.approx(1.06, rel=1e-6)
    assert [p.name for p in tmp_path.iterdir()] == ["out.mrc"]


def test_write_mrc_overwrites_atomically(tmp_path: Path) -> None:
    path = tmp_path / "out.mrc"
    write_mrc(path, np.ones((NY, NX)) * np.arange(NX), pixel_size=1.0)
    with pytest.raises(ValueError):
        write_mrc(path, np.zeros(5), pixel_size=1.0)  # 1D: refused before touching the file
    with pytest.raises(ValueError):
        write_mrc(path, np.zeros((4, 4)), pixel_size=0.0)
    np.testing.assert_array_equal(read_micrograph(path).data[3], np.arange(NX, dtype=np.float32))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mrc"]


def test_stack_round_trip_and_selection(tmp_path: Path) -> None:
    stack = np.random.default_rng(3).normal(size=(6, 32, 40)).astype(np.float32)
    path = tmp_path / "particles.mrcs"
    write_mrc(path, stack, pixel_size=1.3)
    lazy = read_stack(path)
    assert isinstance(lazy, np.memmap)
    assert lazy.shape == (6, 32, 40)
    np.testing.assert_array_equal(np.asarray(lazy), stack)
    chosen = read_stack_images(path, [4, 0, 4])
    assert chosen.dtype == np.float32 and chosen.shape == (3, 32, 40)
    np.testing.assert_array_equal(chosen, stack[[4, 0, 4]])
    with mrcfile.open(path) as mrc:
        assert mrc.is_image_stack()
    with pytest.raises(InputError) as exc:
        read_stack_images(path, [6])
    _assert_input_error(exc, path, "image 7", "6 images")


def test_stack_of_a_2d_file_has_one_image(tmp_path: Path) -> None:
    data = _ramp(np.int16)
    path = _new_mrc(tmp_path / "one.mrc", data)
    lazy = read_stack(path)
    assert lazy.shape == (1, NY, NX)
    np.testing.assert_array_equal(read_stack_images(path, [0])[0], data.astype(np.float32))


# ---------------------------------------------------------------------------------------------
# bad input: one line naming the file and the fix


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nothere.mrc"
    with pytest.raises(InputError) as exc:
        read_micrograph(path)
    _assert_input_error(exc, path, "not found")


def test_random_bytes_are_not_mrc(tmp_path: Path) -> None:
    path = tmp_path / "noise.mrc"
    path.write_bytes(np.random.default_rng(4).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(InputError) as exc:
        read_micrograph(path)
    _assert_input_error(exc, path, "not an MRC file")
    with pytest.raises(InputError):
        read_stack(path)


def test_text_file_is_not_mrc(tmp_path: Path) -> None:
    path = tmp_path / "list.mrc"
    path.write_text("data_\nloop_\n_rlnMicrographName #1\n" + "x.mrc\n" * 300)
    with pytest.raises(InputError) as exc:
        read_micrograph(path)
    _assert_input_error(exc, path, "not an MRC file")


def test_shorter_than_header(tmp_path: Path) -> None:
    path = tmp_path / "tiny.mrc"
    path.write_bytes(b"\x00" * 100)
    with pytest.raises(InputError) as exc:
        read_micrograph(path)
    _assert_input_error(exc, path, "not an MRC file", "100 bytes")


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.mrc"
    path.write_bytes(b"")
    with pytest.raises(InputError) as exc:
        read_micrograph(path)
    _assert_input_error(exc, path, "empty")


def test_header_with_no_pixels(tmp_path: Path) -> None:
    path = tmp_path / "zero.mrc"
    path.write_bytes(_handmade_header(0, 0, 0, 2, "<", 1.0))
    with pytest.raises(InputError) as exc:
        read_micrograph(path)
    _assert_input_error(exc, path, "empty")


def test_truncated_file(tmp_path: Path) -> None:
    path = _new_mrc(tmp_path / "cut.mrc", _ramp(np.float32))
    full = path.stat().st_size
    os.truncate(path, full - 1000)
    for reader in (read_micrograph, read_stack, read_mrc_header):
        with pytest.raises(InputError) as exc:
            reader(path)
        _assert_input_error(exc, path, "truncated", str(full), str(full - 1000), "re-copy")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_pixels(tmp_path: Path, bad: float) -> None:
    data = _ramp(np.float32)
    data[3, 4] = bad
    data[10, 11] = bad
    path = _new_mrc(tmp_path / "nan.mrc", data)
    with pytest.raises(InputError) as exc:
        read_micrograph(path)
    _assert_input_error(exc, path, "contains 2 NaN/Inf pixels", "motion correction")


def test_all_nan_image(tmp_path: Path) -> None:
    path = _new_mrc(tmp_path / "allnan.mrc", np.full((NY, NX), np.nan, dtype=np.float32))
    with pytest.raises(InputError) as exc:
        read_micrograph(path)
    _assert_input_error(exc, path, f"contains {NY * NX} NaN/Inf")


def test_nan_in_selected_stack_images(tmp_path: Path) -> None:
    stack = np.zeros((3, 16, 16), dtype=np.float32)
    stack[1, 2, 2] = np.nan
    path = tmp_path / "p.mrcs"
    write_mrc(path, stack, pixel_size=1.0)
    assert read_stack_images(path, [0, 2]).shape == (2, 16, 16)
    with pytest.raises(InputError) as exc:
        read_stack_images(path, [1])
    _assert_input_error(exc, path, "NaN/Inf")


def test_constant_image(tmp_path: Path) -> None:
    path = _new_mrc(tmp_path / "flat.mrc", np.full((NY, NX), 7, dtype=np.int16))
    with pytest.raises(InputError) as exc:
        read_micrograph(path)
    _assert_input_error(exc, path, "all pixels equal", "blank micrograph")


def test_image_too_small(tmp_path: Path) -> None:
    path = _new_mrc(tmp_path / "small.mrc", _ramp(np.float32, 40, 128))
    with pytest.raises(InputError) as exc:
        read_micrograph(path)
    _assert_input_error(exc, path, "128x40", "64")
    assert read_stack(path).shape == (1, 40, 128)  # fine as a particle stack


def test_unsupported_mode(tmp_path: Path) -> None:
    path = _new_mrc(tmp_path / "complex.mrc", _ramp(np.float32))
    raw = bytearray(path.read_bytes())
    raw[12:16] = np.array([4], dtype="<i4").tobytes()  # complex64
    path.write_bytes(bytes(raw))
    with pytest.raises(InputError) as exc:
        read_micrograph(path)
    _assert_input_error(exc, path, "mode 4", "mode 2")


def test_directory_instead_of_file(tmp_path: Path) -> None:
    folder = tmp_path / "folder.mrc"
    folder.mkdir()
    with pytest.raises(InputError) as exc:
        read_micrograph(folder)
    _assert_input_error(exc, folder, "directory")


# ---------------------------------------------------------------------------------------------
# real files


def test_real_fei_extended_uint16(shared_real: Path) -> None:
    path = shared_real / "micrographs" / "fei-extended.mrc"
    header = read_mrc_header(path)
    assert (header.nx, header.ny, header.nz, header.mode) == (3710, 3838, 1, 6)
    assert header.data_offset == 1024 + 786432  # FEI1 extended header skipped
    image = read_micrograph(path)
    assert image.data.shape == (3838, 3710)  # (ny, nx)
    assert image.data.dtype == np.float32
    assert image.header_pixel_size == pytest.approx(0.8537755, rel=1e-6)
    with mrcfile.mmap(path, permissive=True) as mrc:
        assert mrc.data.dtype == np.uint16
        np.testing.assert_array_equal(image.data[::97, ::89], mrc.data[::97, ::89])
    assert image.data.min() == 302.0 and image.data.max() == 45804.0


def test_real_ucsf_float32(shared_real: Path) -> None:
    image = read_micrograph(shared_real / "micrographs" / "Ucsf_stack_1142_DW.mrc")
    assert image.data.shape == (927, 959)
    assert image.data.dtype == np.float32
    assert image.header_pixel_size == 1.0  # placeholder in the header, kept as given
    assert 6768.0 < float(image.data.mean()) < 6823.0


def test_real_particle_stacks(shared_real: Path) -> None:
    lazy = read_stack(shared_real / "aspire" / "sample.mrcs")
    assert lazy.shape == (17, 200, 200)
    old = read_stack(shared_real / "cryodrgn" / "relion31.mrcs")  # no 'MAP ' identifier
    assert old.shape == (5, 256, 256)
    images = read_stack_images(shared_real / "cryodrgn" / "relion31.mrcs", [4])
    assert images.shape == (1, 256, 256) and np.isfinite(images).all()


def test_float32_image_is_a_private_writable_copy(tmp_path: Path) -> None:
    data = _ramp(np.float32)
    path = _new_mrc(tmp_path / "f.mrc", data)
    before = path.read_bytes()
    img = read_micrograph(path).data
    np.testing.assert_array_equal(img, data)
    img[0, 0] += 1000.0  # the caller may change its array; the file never changes
    assert path.read_bytes() == before
    np.testing.assert_array_equal(read_micrograph(path).data, data)
