"""Atomic training checkpoints: written to a temporary folder, fsynced, verified, then renamed into place.

Layout of ``checkpoint-00001234/``: ``networks.safetensors`` (every network of the method), ``ema.safetensors``,
``optimizers.pt`` (optimizer + LR-schedule state, read back with ``weights_only=True``), ``rng-rank{r}.json`` per
process, ``trainer_state.json``, and ``MANIFEST.json`` last, holding the sha256 of every file. A checkpoint without a
valid manifest is incomplete or corrupt and is never loaded; it is also never the reason an older one is deleted.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
MANIFEST = "MANIFEST.json"
FORMAT = "gensample-checkpoint-v1"


class CheckpointError(RuntimeError):
    pass


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def new_staging_dir(root: Path, step: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".tmp-checkpoint-{step:08d}-", dir=root))


def finalize(staging: Path, root: Path, step: int) -> Path:
    """Write the manifest into ``staging`` and rename it to ``root/checkpoint-{step}`` (atomic on one filesystem)."""
    files = {}
    for p in sorted(staging.iterdir()):
        with open(p, "rb") as f:
            os.fsync(f.fileno())
        files[p.name] = _sha256(p)
    manifest = {"format": FORMAT, "step": step, "files": files}
    with open(staging / MANIFEST, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    final = root / f"checkpoint-{step:08d}"
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    _fsync_dir(root)
    return final


def verify(path: Path) -> dict:
    """Raise CheckpointError if ``path`` is not a complete, uncorrupted gensample checkpoint; return its manifest."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint folder. Pass a checkpoint-N folder or the run's output dir.")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{path}: no {MANIFEST}, so the checkpoint is incomplete (the run stopped while writing "
                              "it) or not a gensample checkpoint. Resume from an earlier checkpoint-N folder.")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{manifest_path} is corrupt ({e}); resume from an earlier checkpoint.") from e
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} checkpoint (format={manifest.get('format')!r}).")
    for name, digest in manifest["files"].items():
        f = path / name
        if not f.is_file() or _sha256(f) != digest:
            raise CheckpointError(f"{f} is missing or corrupt (checksum mismatch); resume from an earlier checkpoint.")
    return manifest


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = CHECKPOINT_RE.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_valid_checkpoint(root: Path, warn=print) -> Path | None:
    """Newest checkpoint that verifies; corrupt newer ones are reported and skipped (never deleted)."""
    for step, path in reversed(list_checkpoints(root)):
        try:
            verify(path)
            return path
        except CheckpointError as e:
            warn(f"skipping {path.name}: {e}")
    return None


def prune(root: Path, keep: int) -> None:
    """Keep the ``keep`` newest *valid* checkpoints; leftover staging folders of crashed writes are removed."""
    if keep is None or keep <= 0:
        return
    valid = []
    for step, path in list_checkpoints(root):
        try:
            verify(path)
            valid.append(path)
        except CheckpointError:
            pass
    for path in valid[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
    for p in Path(root).glob(".tmp-checkpoint-*"):
        shutil.rmtree(p, ignore_errors=True)
