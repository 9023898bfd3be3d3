"""AQUA calibration: record a model's post-RoPE queries and keys, and compute its orthogonal bases."""

from .calibrate import calibrate

__all__ = ["calibrate"]
