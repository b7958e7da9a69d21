"""The package version, written once: ``anisoctf --version``, the ``.txt`` result headers and
``anisoctf.__version__`` all read it from here."""

__all__ = ["__version__"]

__version__ = "0.1.0"
