"""Simulation of micrographs with known CTF (and their Cramér–Rao bounds)."""

from anisoctf.simulate.bounds import crlb
from anisoctf.simulate.micrograph import (
    MicrographSpec,
    SimulatedMicrograph,
    expected_power,
    simulate_micrograph,
)

__all__ = ["MicrographSpec", "SimulatedMicrograph", "crlb", "expected_power", "simulate_micrograph"]
