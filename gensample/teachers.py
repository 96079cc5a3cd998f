"""Kept importable for the documented ``gensample.teachers.as_denoiser``; the adapter lives in
:mod:`gensample.methods.teachers`, next to the distillation methods that use it."""
from .methods.teachers import VPDenoiser, as_denoiser

__all__ = ["VPDenoiser", "as_denoiser"]
