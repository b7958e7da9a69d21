"""Build of the one optional compiled module (everything else is in pyproject.toml).

``anisoctf.fit._cells`` is the pixel loop of :func:`anisoctf.fit.band.compressed_zone` in C
(Python headers only, no numpy headers). It is optional: where no C compiler is found the build
goes on without it and the package uses the numpy version of the same loop.
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
        )
    ]
)
