"""Particle CTF refinement against a reference map (projection, defocus, anisomag)."""
