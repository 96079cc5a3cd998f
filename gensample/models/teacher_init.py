"""Students initialised from their teacher (consistency distillation, CM paper sec. 6; CTM ``cm_train.py main``; LCM):
the student is the teacher's UNet plus a new branch (CTM's s-embedding, SCott's guidance projection), so every teacher
tensor is copied into the same-named student tensor and only the new branch keeps its own initialisation."""
from __future__ import annotations

import torch
from diffusers import UNet2DModel
from torch import nn

__all__ = ["build_from_teacher", "copy_teacher_weights"]


def build_from_teacher(cls: type[UNet2DModel], teacher: UNet2DModel) -> UNet2DModel:
    """A ``cls`` student with ``teacher``'s configuration, dtype and device (weights not yet copied)."""
    config = {k: v for k, v in dict(teacher.config).items() if not k.startswith("_")}
    student = cls(**config)
    if student.dtype != teacher.dtype:
        student = student.to(dtype=teacher.dtype)
    return student.to(teacher.device)


def copy_teacher_weights(student: nn.Module, teacher: nn.Module) -> dict[str, list[str]]:
    """Copy every parameter and buffer of ``teacher`` into the same-named tensor of ``student``. A teacher tensor with
    no same-named, same-shaped student tensor is a ValueError naming the mismatches. Returns
    {"copied": [...], "not_in_teacher": [...]} (the latter: the student's new branch)."""
    name = type(student).__name__
    mine, theirs = student.state_dict(), teacher.state_dict()
    missing = sorted(k for k in theirs if k not in mine)
    shapes = sorted(f"{k}: teacher {tuple(v.shape)} vs student {tuple(mine[k].shape)}"
                    for k, v in theirs.items() if k in mine and mine[k].shape != v.shape)
    if missing or shapes:
        raise ValueError(
            f"the teacher's architecture differs from the {name}'s; build the student with {name}.from_teacher("
            f"teacher) (or from teacher.config). Teacher tensors absent in the student: {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''}; shape mismatches: {shapes[:8]}{' ...' if len(shapes) > 8 else ''}.")
    with torch.no_grad():
        for k, v in theirs.items():
            mine[k].copy_(v)
    return {"copied": sorted(theirs), "not_in_teacher": sorted(k for k in mine if k not in theirs)}
