"""Modules imported on first use.

pandas (through starfile) is needed only to read STAR tables, and scipy.ndimage/sparse/special
only to resample images; importing them eagerly costs about 0.45 s in every process, which a
batch of micrographs given as MRC files never needs.
"""

from __future__ import annotations

import importlib
import types
from typing import Any

__all__ = ["lazy", "pandas"]


class _LazyModule(types.ModuleType):
    """Stands in for a module and imports it at the first attribute access."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self._lazy_name = name

    def __getattr__(self, attr: str) -> Any:
        module = importlib.import_module(self._lazy_name)
        self.__dict__.update(module.__dict__)
        return getattr(module, attr)


def lazy(name: str) -> Any:
    """A stand-in for module ``name`` that imports it at the first attribute access."""
    return _LazyModule(name)


pandas: Any = lazy("pandas")
