"""Build of the three optional compiled modules (everything else is in pyproject.toml).

* ``anisoctf.fit._cells``: the pixel loop of :func:`anisoctf.fit.band.compressed_zone`;
* ``anisoctf.spectrum._kernels``: the periodogram's power and its 2×2 binning in one pass,
  and the block sums of the outlier-tile statistics;
* ``anisoctf.magnification._sinc``: the row-mixing and shear passes of the sinc resampling.

All are plain C on Python's headers (no numpy headers). All are optional: where no C compiler
is found the build goes on without them and the package uses the numpy versions of the same
loops, which give the same numbers (``tests/test_spectrum.py``).
"""

import os

from setuptools import Extension, setup

flags = [] if os.name == "nt" else ["-O2", "-ffp-contract=off"]  # the numpy loop's rounding

setup(
    ext_modules=[
        Extension(
            "anisoctf.fit._cells",
            ["src/anisoctf/fit/_cells.c"],
            extra_compile_args=flags,
            optional=True,
        ),
        Extension(
            "anisoctf.spectrum._kernels",
            ["src/anisoctf/spectrum/_kernels.c"],
            extra_compile_args=flags,
            optional=True,
        ),
        Extension(
            "anisoctf.magnification._sinc",
            ["src/anisoctf/magnification/_sinc.c"],
            extra_compile_args=[] if os.name == "nt" else ["-O3"],  # vectorised tap loops
            optional=True,
        ),
    ]
)
