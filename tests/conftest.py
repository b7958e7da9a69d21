"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def shared_real() -> Path:
    """Folder of real cryo-EM test files, ``<repo>/../shared/data/real`` (skip if absent)."""
    folder = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real"
    if not folder.is_dir():
        pytest.skip(f"real test data not found at {folder} (the shared/ folder beside the repo)")
    return folder
