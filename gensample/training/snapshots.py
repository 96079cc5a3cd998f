"""Light weight-only snapshots of a training run, for combining checkpoints afterwards (LCSC, Liu et al., ICLR 2025).

``TrainConfig.snapshot_every = N`` makes the Trainer keep, every N steps and at the last step, the RAW (not EMA)
weights of the method's ``ema_modules()`` as ``RUN/snapshots/snapshot-{step:08d}.safetensors``: keys
``"{module_name}.{state_dict_key}"`` (the module names are the exported pipeline's component names, e.g. ``unet``),
metadata ``{"format": "gensample-snapshot", "step": "N", "method": method_name}``. No optimizer state: a snapshot
costs one copy of the weights. Each file is written to a temporary name, fsynced and renamed, so a crash never
leaves a half-written snapshot under the final name.
"""
from __future__ import annotations

import os
import re
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .checkpoint import _fsync_dir

__all__ = ["SNAPSHOT_FORMAT", "list_snapshots", "load_snapshot", "save_snapshot", "snapshot_dir"]

SNAPSHOT_FORMAT = "gensample-snapshot"
_NAME_RE = re.compile(r"^snapshot-(\d{8})\.safetensors$")


def snapshot_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "snapshots"


def save_snapshot(run_dir: str | Path, step: int, modules: dict[str, nn.Module], method_name: str) -> Path:
    """Write the raw weights of ``modules`` at ``step`` atomically; returns the file's path."""
    folder = snapshot_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"{name}.{k}": v.detach().to("cpu").contiguous().clone()
               for name, m in modules.items() for k, v in m.state_dict().items()}
    if not tensors:
        raise ValueError(f"method {method_name!r} has no ema_modules() to snapshot.")
    final = folder / f"snapshot-{step:08d}.safetensors"
    tmp = folder / f".tmp-{final.name}"
    save_file(tensors, tmp, metadata={"format": SNAPSHOT_FORMAT, "step": str(step), "method": method_name})
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    _fsync_dir(folder)
    return final


def list_snapshots(run_dir: str | Path) -> list[tuple[int, Path]]:
    """``[(step, path)]`` of the run's snapshots, ascending by step (temporary and moved-aside files excluded)."""
    folder = snapshot_dir(run_dir)
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = _NAME_RE.match(p.name)
        if m and p.is_file() and not p.is_symlink():
            found.append((int(m.group(1)), p))
    return sorted(found)


def load_snapshot(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of one snapshot; a ValueError naming the file if it is not a readable gensample snapshot."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            if metadata.get("format") != SNAPSHOT_FORMAT:
                raise ValueError(f"{path} is not a gensample snapshot (metadata format {metadata.get('format')!r}); "
                                 "snapshots are written by `gensample train ... --snapshot-every N`.")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except ValueError:
        raise
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        raise ValueError(f"{path} cannot be read as a safetensors snapshot ({e}); it is corrupt or not a "
                         "snapshot: move it out of the snapshots/ folder.") from e
    return tensors, metadata


def move_aside_after(run_dir: str | Path, step: int) -> list[str]:
    """Rename snapshots past ``step`` (left by a run this one resumes before its end, or by a run it replaces) to
    ``snapshot-N.safetensors.superseded-<UTC time>``; returns the new names. Nothing is deleted."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    moved = []
    for s, p in list_snapshots(run_dir):
        if s > step:
            target = p.with_name(f"{p.name}.superseded-{stamp}")
            os.replace(p, target)
            moved.append(target.name)
    return moved
