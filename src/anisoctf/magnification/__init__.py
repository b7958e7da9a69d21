"""Anisotropic magnification: the matrix ``M`` (``k_true = M k_obs``) and its effect on defocus.

:mod:`~anisoctf.optics.magmat` holds :class:`MagMat` (anisotropy, axis, scale, polar
decomposition) and the converters to and from RELION, cryoSPARC, cisTEM and MotionCor2;
:mod:`~anisoctf.optics.frames` moves defocus between the observed and the true frame
and predicts the astigmatism that anisomag alone produces; :mod:`~anisoctf.magnification.detect`
estimates ``M`` from many micrographs' astigmatism against defocus (the robust line in
:mod:`~anisoctf.magnification.robust_line`, the result in
:mod:`~anisoctf.magnification.detection`; its JSON file is :mod:`anisoctf.io.detection_json`,
its plot :mod:`anisoctf.report.detection_plot`);
:mod:`~anisoctf.magnification.tables` rewrites RELION and cryoSPARC tables into the true
frame. Conventions and sources are in ``docs/anisomag.md``.
"""

from anisoctf.magnification.detect import (
    AnisoDetection,
    detect_anisomag,
    residual_report,
)
from anisoctf.optics.frames import (
    apparent_astigmatism,
    defocus_table_to_observed,
    defocus_table_to_true,
    defocus_to_observed,
    defocus_to_true,
    isotropic_scale,
    transform_defocus_matrix,
    true_pixel_size,
)
from anisoctf.optics.magmat import (
    RELION_MAGMAT_LABELS,
    MagMat,
    as_matrix,
    from_cistem,
    from_cryosparc_anisomag,
    from_motioncor2,
    from_relion,
    matrices_from_cryosparc_anisomag,
    to_cistem,
    to_cryosparc_anisomag,
    to_motioncor2,
    to_relion,
)

__all__ = [
    "RELION_MAGMAT_LABELS",
    "AnisoDetection",
    "detect_anisomag",
    "residual_report",
    "MagMat",
    "apparent_astigmatism",
    "as_matrix",
    "defocus_table_to_observed",
    "defocus_table_to_true",
    "defocus_to_observed",
    "defocus_to_true",
    "from_cistem",
    "from_cryosparc_anisomag",
    "from_motioncor2",
    "from_relion",
    "isotropic_scale",
    "matrices_from_cryosparc_anisomag",
    "to_cistem",
    "to_cryosparc_anisomag",
    "to_motioncor2",
    "to_relion",
    "transform_defocus_matrix",
    "true_pixel_size",
]
