"""Where the shipped assets live: assets/ at the repository top (editable installs), installed as gensample.assets."""
from __future__ import annotations

from pathlib import Path

_CANDIDATES = (Path(__file__).resolve().parents[1] / "assets", Path(__file__).resolve().parent / "assets")


def asset_path(*parts: str) -> Path:
    for root in _CANDIDATES:
        p = root.joinpath(*parts)
        if p.exists():
            return p
    raise FileNotFoundError(f"gensample asset {'/'.join(parts)} not found under {[str(c) for c in _CANDIDATES]}.")
