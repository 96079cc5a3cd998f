"""gensample: fast generative sampling with consistency models, on the diffusers ecosystem."""
from __future__ import annotations

__version__ = "0.1.0"

from .loading import load_pipeline  # noqa: E402

__all__ = ["load_pipeline", "__version__"]
