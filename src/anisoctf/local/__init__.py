"""Local defocus: patches, specimen tilt, sample thickness and the defocus surface."""
