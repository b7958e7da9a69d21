"""The ``anisoctf`` command line (a thin layer over :mod:`anisoctf.jobs`): see :mod:`.main`."""
