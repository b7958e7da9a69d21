"""Every RELION STAR label and cryoSPARC ``.cs`` field name anisoctf reads or writes, once.

RELION labels are spelled as ``starfile`` returns them (no leading underscore); a STAR file
writes them with one (``_rlnDefocusU``). Definitions: RELION's ``src/metadata_label.h``
(RELION 3.1-5.0) and the cryoSPARC field names of its ``.cs`` datasets (cryosparc-tools
``cryosparc/dataset.py``; the real files in ``shared/data/real/cryodrgn``). anisoctf's own
labels start with ``anisoctf`` (RELION keeps unknown labels as they are).
"""

from __future__ import annotations

from anisoctf.optics.magmat import RELION_MAGMAT_LABELS

__all__ = [
    "ABERRATION_COLUMNS",
    "ANGLES",
    "CS_ANISOMAG",
    "CS_DEFOCUS",
    "CS_EXP_GROUP",
    "CS_MICROGRAPH",
    "DEFOCUS",
    "MAGMAT",
    "STRING_COLUMNS",
]

# ------------------------------------------------------------------------------ RELION: CTF
DEFOCUS_U = "rlnDefocusU"
DEFOCUS_V = "rlnDefocusV"
DEFOCUS_ANGLE = "rlnDefocusAngle"
#: the three defocus labels, in (U, V, angle) order
DEFOCUS: tuple[str, str, str] = (DEFOCUS_U, DEFOCUS_V, DEFOCUS_ANGLE)
#: ``U - V`` in Å (recomputed whenever the defocus is rewritten)
ASTIGMATISM = "rlnCtfAstigmatism"
PHASE_SHIFT = "rlnPhaseShift"
CTF_IMAGE = "rlnCtfImage"
CTF_POWER_SPECTRUM = "rlnCtfPowerSpectrum"
FIGURE_OF_MERIT = "rlnCtfFigureOfMerit"
MAX_RESOLUTION = "rlnCtfMaxResolution"
CTF_BFACTOR = "rlnCtfBfactor"
#: RELION 5's label for the sample thickness estimated by CTFFIND 5
ICE_THICKNESS = "rlnCtfIceThickness"

# ------------------------------------------------------------------------------ RELION: optics
OPTICS_GROUP = "rlnOpticsGroup"
OPTICS_GROUP_NAME = "rlnOpticsGroupName"
VOLTAGE = "rlnVoltage"
SPHERICAL_ABERRATION = "rlnSphericalAberration"
AMPLITUDE_CONTRAST = "rlnAmplitudeContrast"
#: voltage, Cs, amplitude contrast: the optics every group needs besides a pixel size
BASE_OPTICS: tuple[str, str, str] = (VOLTAGE, SPHERICAL_ABERRATION, AMPLITUDE_CONTRAST)
MICROGRAPH_PIXEL_SIZE = "rlnMicrographPixelSize"
IMAGE_PIXEL_SIZE = "rlnImagePixelSize"
MICROGRAPH_ORIGINAL_PIXEL_SIZE = "rlnMicrographOriginalPixelSize"
#: RELION 3.0: the pixel size is ``_rlnDetectorPixelSize`` (µm) over ``_rlnMagnification``
DETECTOR_PIXEL_SIZE = "rlnDetectorPixelSize"
MAGNIFICATION = "rlnMagnification"
IMAGE_SIZE = "rlnImageSize"
IMAGE_DIMENSIONALITY = "rlnImageDimensionality"
MTF_FILE_NAME = "rlnMtfFileName"
#: ``_rlnMagMat00``, ``01``, ``10``, ``11`` (``M[i, j]``, ``k_true = M k_obs``)
MAGMAT: tuple[str, str, str, str] = RELION_MAGMAT_LABELS
#: beam tilt (mrad) and the odd/even Zernike vectors (``"[a,b,c]"`` text), RELION 3.1+
#: (``anisoctf.optics.aberrations``)
BEAM_TILT_X = "rlnBeamTiltX"
BEAM_TILT_Y = "rlnBeamTiltY"
ODD_ZERNIKE = "rlnOddZernike"
EVEN_ZERNIKE = "rlnEvenZernike"
ABERRATION_COLUMNS: tuple[str, str, str, str] = (
    BEAM_TILT_X,
    BEAM_TILT_Y,
    ODD_ZERNIKE,
    EVEN_ZERNIKE,
)

# ------------------------------------------------------------------------------ RELION: rows
MICROGRAPH_NAME = "rlnMicrographName"
MICROGRAPH_MOVIE_NAME = "rlnMicrographMovieName"
MICROGRAPH_METADATA = "rlnMicrographMetadata"
#: the sum without dose weighting (RELION motion correction with "save non-dose-weighted")
MICROGRAPH_NAME_NO_DW = "rlnMicrographNameNoDW"
IMAGE_NAME = "rlnImageName"
IMAGE_ORIGINAL_NAME = "rlnImageOriginalName"
RECONSTRUCT_IMAGE_NAME = "rlnReconstructImageName"
COORDINATE_X = "rlnCoordinateX"
COORDINATE_Y = "rlnCoordinateY"
ORIGIN_X_ANGST = "rlnOriginXAngst"
ORIGIN_Y_ANGST = "rlnOriginYAngst"
#: RELION 3.0 origins, in pixels
ORIGIN_X = "rlnOriginX"
ORIGIN_Y = "rlnOriginY"
ANGLE_ROT = "rlnAngleRot"
ANGLE_TILT = "rlnAngleTilt"
ANGLE_PSI = "rlnAnglePsi"
ANGLES: tuple[str, str, str] = (ANGLE_ROT, ANGLE_TILT, ANGLE_PSI)
RANDOM_SUBSET = "rlnRandomSubset"
CTF_PREMULTIPLIED = "rlnCtfDataAreCtfPremultiplied"
FINAL_RESOLUTION = "rlnFinalResolution"

#: text columns, never parsed as numbers (file names can look like numbers)
STRING_COLUMNS: tuple[str, ...] = (
    MICROGRAPH_NAME,
    MICROGRAPH_MOVIE_NAME,
    MICROGRAPH_METADATA,
    MICROGRAPH_NAME_NO_DW,
    CTF_IMAGE,
    CTF_POWER_SPECTRUM,
    OPTICS_GROUP_NAME,
    IMAGE_NAME,
    MTF_FILE_NAME,
    IMAGE_ORIGINAL_NAME,
    RECONSTRUCT_IMAGE_NAME,
)

# ------------------------------------------------------------------------------ anisoctf's own
TILT_ANGLE = "anisoctfTiltAngle"
TILT_AXIS_ANGLE = "anisoctfTiltAxisAngle"
#: the JSON file of a micrograph's defocus surface (see docs/local.md)
DEFOCUS_SURFACE = "anisoctfDefocusSurface"
#: posterior SD (Å) of a particle's refined mean defocus (``refine``, see docs/refine.md)
DEFOCUS_ERROR = "anisoctfDefocusError"

# ------------------------------------------------------------------------------ cryoSPARC
#: RELION's DefocusU, DefocusV and DefocusAngle (the angle in radians)
CS_DEFOCUS: tuple[str, str, str] = ("ctf/df1_A", "ctf/df2_A", "ctf/df_angle_rad")
#: ``(M^-1 - I)`` row-major, 4 float32 per row
CS_ANISOMAG = "ctf/anisomag"
#: the exposure group (cryoSPARC's counterpart of RELION's optics group)
CS_EXP_GROUP = "ctf/exp_group_id"
#: fields naming a particle's micrograph, in order of preference
CS_MICROGRAPH: tuple[str, str] = ("location/micrograph_uid", "location/micrograph_path")
CS_VOLTAGE = "ctf/accel_kv"
CS_CS = "ctf/cs_mm"
CS_AMP_CONTRAST = "ctf/amp_contrast"
CS_PHASE_SHIFT = "ctf/phase_shift_rad"
CS_TYPE = "ctf/type"
CS_SCALE = "ctf/scale"
CS_FIT_TO = "ctf/ctf_fit_to_A"
CS_BFACTOR = "ctf/bfactor"
CS_SCALE_CONST = "ctf/scale_const"
CS_SHIFT = "ctf/shift_A"
CS_TETRA = "ctf/tetra_A"
CS_TILT = "ctf/tilt_A"
CS_TREFOIL = "ctf/trefoil_A"
#: the exposure's image file
CS_BLOB_PATH = "blob/path"
