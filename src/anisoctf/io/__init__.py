"""File formats at the edge of anisoctf: MRC images, RELION STAR files, cryoSPARC .cs files,
CTFFIND text (and, in their own modules, Gctf results :mod:`anisoctf.io.gctf` and cryoSPARC CTF
input/output :mod:`anisoctf.io.cryosparc_ctf`).

Every RELION label and cryoSPARC field name is written once, in :mod:`anisoctf.io.labels`.
STAR files: :mod:`~anisoctf.io.star_tables` parses them (the only caller of ``starfile``),
finds the table holding a column and writes loops; :mod:`~anisoctf.io.star_optics` is the one
optics reader (the matrix through :class:`~anisoctf.optics.magmat.MagMat`);
:mod:`~anisoctf.io.star` reads and writes micrograph tables;
:mod:`~anisoctf.io.star_patch` rewrites chosen columns keeping every other byte
(:func:`~anisoctf.io.star_patch.patch_defocus_star` for defocus and ``_rlnMagMat``);
:mod:`~anisoctf.io.relion_defocus` and :mod:`~anisoctf.io.cryosparc_defocus` turn tables into
:class:`~anisoctf.records.defocus.DefocusTable` records and back;
:mod:`~anisoctf.io.matrix_json` reads a matrix from JSON.

Everything inside the package works on plain arrays and frozen records; only these modules
open files. Readers turn every kind of bad input into one-line
:class:`~anisoctf.errors.InputError` messages; writers replace their target atomically.
"""

from anisoctf.io.atomic import atomic_path, atomic_write, write_bytes_atomic, write_text_atomic
from anisoctf.io.cryosparc import CSFile, read_cs, write_cs
from anisoctf.io.ctffind import CTFFindRecord, CTFFindSearch, read_ctffind_txt, write_ctffind_txt
from anisoctf.io.mrc import (
    MIN_MICROGRAPH_SIZE,
    MRCHeader,
    MRCImage,
    read_micrograph,
    read_mrc_header,
    read_stack,
    read_stack_images,
    write_mrc,
)
from anisoctf.io.star import (
    MicrographCTFRow,
    MicrographEntry,
    read_micrographs_ctf_star,
    read_micrographs_star,
    read_optics_group_names,
    read_optics_star,
    write_micrographs_ctf_star,
)

__all__ = [
    "MIN_MICROGRAPH_SIZE",
    "CSFile",
    "CTFFindRecord",
    "CTFFindSearch",
    "MRCHeader",
    "MRCImage",
    "MicrographCTFRow",
    "MicrographEntry",
    "atomic_path",
    "atomic_write",
    "read_cs",
    "read_ctffind_txt",
    "read_micrograph",
    "read_micrographs_ctf_star",
    "read_micrographs_star",
    "read_mrc_header",
    "read_optics_group_names",
    "read_optics_star",
    "read_stack",
    "read_stack_images",
    "write_bytes_atomic",
    "write_cs",
    "write_ctffind_txt",
    "write_micrographs_ctf_star",
    "write_mrc",
    "write_text_atomic",
]
