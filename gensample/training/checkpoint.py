"""Atomic training checkpoints: written to a temporary folder, fsynced, verified, then renamed into place.

Layout of ``checkpoint-00001234/``: ``networks.safetensors`` (every network of the method), ``ema.safetensors``,
``optimizers.pt`` (optimizer + LR-schedule state, read back with ``weights_only=True``), ``rng-rank{r}.json`` per
process, ``trainer_state.json``, and ``MANIFEST.json`` last, holding the sha256 of every file and the gensample version
that wrote it. A checkpoint without a valid manifest is incomplete or corrupt and is never loaded; it is also never the
reason an older one is deleted.

Nothing that is not ours is deleted: :func:`prune` removes only valid ``checkpoint-N`` folders (real folders, never
symbolic links) beyond the retention limit and leftover staging folders of our own name and contents; a checkpoint
that must make way (a corrupt one, or one superseded by a resume from an earlier step) is renamed by
:func:`move_aside` to ``checkpoint-N.corrupt-<UTC time>`` / ``checkpoint-N.superseded-<UTC time>``.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
#: staging folders: ``.tmp-checkpoint-00001234`` (Trainer) or ``.tmp-checkpoint-00001234-<random>`` (new_staging_dir)
STAGING_RE = re.compile(r"^\.tmp-checkpoint-\d{8}(-[A-Za-z0-9_]+)?$")
#: the files a checkpoint writer puts in a staging folder; a staging-named folder holding anything else is not ours
STAGING_FILE_RE = re.compile(r"^(networks\.safetensors|ema\.safetensors|optimizers\.pt|trainer_state\.json|"
                             r"rng-rank\d+\.json|MANIFEST\.json)$")
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
    from .. import __version__

    # gensample_version: the writer's version, informational only (verify ignores it, so older manifests load too)
    manifest = {"format": FORMAT, "step": step, "gensample_version": __version__, "files": files}
    with open(staging / MANIFEST, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    final = root / f"checkpoint-{step:08d}"
    if os.path.lexists(final):  # never deleted: moved aside under a name that says why
        try:
            verify(final)
            reason = "superseded"
        except CheckpointError:
            reason = "corrupt"
        move_aside(final, reason)
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
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{manifest_path} is corrupt ({e}); resume from an earlier checkpoint.") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        fmt = manifest.get("format") if isinstance(manifest, dict) else None
        raise CheckpointError(f"{path} is not a {FORMAT} checkpoint (format={fmt!r}).")
    files, step = manifest.get("files"), manifest.get("step")
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        raise CheckpointError(f"{manifest_path} has no valid 'files' table (name -> sha256), so nothing in {path} can "
                              "be checked; it is treated as corrupt. Resume from an earlier checkpoint.")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"{manifest_path} records no valid step ({step!r}); it is treated as corrupt.")
    m = CHECKPOINT_RE.match(path.name)
    if m and int(m.group(1)) != step:
        raise CheckpointError(f"{path.name} holds the state of step {step} (its manifest says so), not of step "
                              f"{int(m.group(1))} as its name says; refusing a checkpoint whose name and recorded "
                              "step disagree (a renamed or linked folder?).")
    for name, digest in files.items():
        f = path / name
        if "/" in name or "\\" in name or name in ("", ".", ".."):
            raise CheckpointError(f"{manifest_path} lists {name!r}, which is not a file of the checkpoint folder.")
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


def linked_checkpoints(root: Path) -> list[Path]:
    """The ``checkpoint-N`` entries of ``root`` that are symbolic links (not followed: see :func:`prune`)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if CHECKPOINT_RE.match(p.name) and p.is_symlink())


def latest_valid_checkpoint(root: Path, warn=print) -> Path | None:
    """Newest checkpoint that verifies; corrupt newer ones are reported and skipped (never deleted here). Symbolic
    links are reported and skipped too: a run's checkpoint folder holds real folders only."""
    for step, path in reversed(list_checkpoints(root)):
        if path.is_symlink():
            warn(f"skipping {path.name}: a symbolic link (to {os.readlink(path)}); links are not followed in a run's "
                 "checkpoint folder.")
            continue
        try:
            verify(path)
            return path
        except CheckpointError as e:
            warn(f"skipping {path.name}: {e}")
    return None


def move_aside(path: Path, reason: str) -> Path:
    """Rename ``path`` to ``<name>.<reason>-<UTC time>`` next to it (nothing is deleted); returns the new path."""
    path = Path(path)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = path.with_name(f"{path.name}.{reason}-{stamp}")
    n = 1
    while os.path.lexists(target):
        n += 1
        target = path.with_name(f"{path.name}.{reason}-{stamp}-{n}")
    os.rename(path, target)
    _fsync_dir(path.parent)
    return target


def is_own_staging_dir(path: Path) -> bool:
    """True for a leftover staging folder of a checkpoint write: our name pattern, a real folder, and only the files
    a checkpoint writer creates (a user's ``.tmp-checkpoint-mine`` or a folder with other content is not ours)."""
    path = Path(path)
    if not STAGING_RE.match(path.name) or path.is_symlink() or not path.is_dir():
        return False
    return all(p.is_file() and not p.is_symlink() and STAGING_FILE_RE.match(p.name) for p in path.iterdir())


def prune(root: Path, keep: int) -> None:
    """Keep the ``keep`` newest *valid* checkpoints (``keep`` None or 0: all); leftover staging folders of crashed
    writes are removed. Only what is ours goes: corrupt checkpoints, symbolic links, moved-aside folders and folders
    we did not write are never deleted."""
    if keep is not None and keep > 0:
        valid = []
        for step, path in list_checkpoints(root):
            if path.is_symlink():
                continue
            try:
                verify(path)
                valid.append(path)
            except CheckpointError:
                pass
        for path in valid[:-keep]:
            shutil.rmtree(path, ignore_errors=True)
    if Path(root).is_dir():
        for p in Path(root).iterdir():
            if is_own_staging_dir(p):
                shutil.rmtree(p, ignore_errors=True)
