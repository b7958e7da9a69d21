"""Atomic writes: complete file or untouched target, never a stray temp file."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from anisoctf.io.atomic import atomic_path, atomic_write, write_bytes_atomic, write_text_atomic


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_write_text_creates_file(tmp_path: Path) -> None:
    target = tmp_path / "a.star"
    write_text_atomic(target, "data_\nline ü\n")
    assert target.read_text(encoding="utf-8") == "data_\nline ü\n"
    assert _leftovers(tmp_path) == []


def test_write_bytes_replaces_file(tmp_path: Path) -> None:
    target = tmp_path / "b.bin"
    target.write_bytes(b"old contents that are longer")
    write_bytes_atomic(target, b"\x00\x01new")
    assert target.read_bytes() == b"\x00\x01new"
    assert _leftovers(tmp_path) == []


def test_exception_keeps_old_file_and_removes_temp(tmp_path: Path) -> None:
    target = tmp_path / "result.txt"
    target.write_text("old\n")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_write(target) as fh:
            fh.write("half a new fi")
            raise RuntimeError("boom")
    assert target.read_text() == "old\n"
    assert _leftovers(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.txt"]


def test_exception_creates_nothing_when_no_old_file(tmp_path: Path) -> None:
    target = tmp_path / "new.txt"
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(target, "wb") as fh:
            fh.write(b"partial")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_temp_file_is_hidden_in_same_directory(tmp_path: Path) -> None:
    target = tmp_path / "out.mrc"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path
        assert tmp.name.startswith(".") and tmp.name.endswith(".tmp")
        assert tmp.exists() and not target.exists()
        tmp.write_bytes(b"xyz")
    assert target.read_bytes() == b"xyz"
    assert not tmp.exists()


def test_new_file_permissions_follow_umask(tmp_path: Path) -> None:
    mask = os.umask(0o022)
    os.umask(mask)
    target = tmp_path / "perm.txt"
    write_text_atomic(target, "x")
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask


def test_replaced_file_keeps_its_permissions(tmp_path: Path) -> None:
    target = tmp_path / "perm.txt"
    target.write_text("old")
    target.chmod(0o640)
    write_text_atomic(target, "new")
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert target.read_text() == "new"


def test_bad_mode_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mode"):
        with atomic_write(tmp_path / "x", "a"):
            pass
    assert list(tmp_path.iterdir()) == []


def test_missing_directory_raises_oserror(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        write_text_atomic(tmp_path / "no" / "such" / "dir.txt", "x")
