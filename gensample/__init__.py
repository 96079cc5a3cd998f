"""gensample: fast generative sampling with consistency models, on the diffusers ecosystem."""
from __future__ import annotations

# The one source of the version: pyproject reads it at build time ([tool.setuptools.dynamic]), so the installed
# metadata (importlib.metadata.version("gensample")), `gensample --version` and the version recorded in saved
# checkpoints and pipeline folders all agree. Keep it a plain string literal (setuptools reads it without importing).
__version__ = "0.1.0"

from .loading import load_pipeline  # noqa: E402

__all__ = ["load_pipeline", "__version__"]
