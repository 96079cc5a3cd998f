"""Where the shipped run-time assets live (digits.npz, digits_classifier.*, pipelines/).

A wheel or sdist install carries them as the package data folder ``gensample/_assets/`` (pyproject maps the
repository's ``assets/`` to the package ``gensample._assets``), found through :mod:`importlib.resources`. An editable
install or a checkout on ``sys.path`` reads ``assets/`` at the repository top. ``assets/readme/`` (the repository
README's figures) is not shipped.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["PACKAGE_DATA", "asset_path", "asset_roots"]

#: the package data folder of an installed gensample (``gensample/_assets``)
PACKAGE_DATA = "_assets"


def asset_roots() -> tuple[Path, ...]:
    """The folders searched, in order: the installed package data, then ``assets/`` of the checkout."""
    installed = Path(str(resources.files(__package__) / PACKAGE_DATA))  # a plain folder: wheels install unzipped
    checkout = Path(__file__).resolve().parents[1] / "assets"
    return installed, checkout


def asset_path(*parts: str) -> Path:
    """The path of a shipped asset, e.g. ``asset_path("pipelines", "ict-digits")``; FileNotFoundError if absent."""
    roots = asset_roots()
    for root in roots:
        p = root.joinpath(*parts)
        if p.exists():
            return p
    raise FileNotFoundError(
        f"gensample asset {'/'.join(parts)} not found under {[str(r) for r in roots]}. An installed gensample carries "
        "its assets in gensample/_assets/: reinstall it from a wheel or sdist built from the repository "
        "(`pip wheel --no-deps -w dist .`), or use an editable install of a checkout (`pip install -e .`)."
    )
