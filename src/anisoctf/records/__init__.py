"""Typed records that cross the layers: plain, frozen values with no file layout in them.

Readers in :mod:`anisoctf.io` turn files into these records and writers turn them back; the
science packages take and return them. They import only the physics layer
(:mod:`anisoctf.optics`). See ``docs/architecture.md``.
"""
