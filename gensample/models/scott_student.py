"""SCottStudentUNet: a diffusers ``UNet2DModel`` that also takes the classifier-free guidance scale w, the backbone of
SCott's digits student f_theta(x, sigma, w, c) (Liu et al., AAAI 2025, arXiv 2403.01505; the w input follows LCM,
Luo et al. 2023, sec. 4.2 "one-stage guided distillation").

Design:

* w enters LCM-style: the scale is embedded like a timestep, ``time_proj((w - 1) * 1000)`` (diffusers'
  ``LatentConsistencyModelPipeline`` embeds ``guidance_scale - 1`` scaled by 1000 the same way), and a bias-free linear
  ``time_embedding.cond_proj`` adds it to the sinusoidal time projection before the time MLP -- diffusers'
  ``TimestepEmbedding(cond_proj_dim=...)``, i.e. ``UNet2DConditionModel``'s ``time_cond_proj_dim`` path. The embedding
  width is the time projection's (``block_out_channels[0]``), so the config stays the ``UNet2DModel`` config.
* ``cond_proj`` starts at zero, so a student initialised from a teacher (:func:`init_from_teacher`, every tensor
  copied by name) computes exactly the teacher's network output F(x, t, c) for every w: the student starts as the
  teacher's conditional denoiser (w = 1). It still trains at once (cond_proj receives gradients from step one). LCM
  leaves this layer at its random init; zero is the better start for distillation.
* The teacher's class embedding is kept whole (K + 1 rows: label K is the teacher's null label), so the tensors load
  by name and shape; the student is never asked for label K.
* ``guidance_scale=None`` means w = 1.

Saved with ``save_pretrained`` as a diffusers model (``_class_name`` SCottStudentUNet, the UNet2DModel config);
``from_pretrained`` restores it, w-branch included.
"""
from __future__ import annotations

import functools
from typing import Any

import torch
from diffusers import ConfigMixin, ModelMixin, UNet2DModel
from diffusers.models.embeddings import TimestepEmbedding
from diffusers.models.unets.unet_2d import UNet2DOutput
from torch import nn

from .teacher_init import build_from_teacher, copy_teacher_weights

__all__ = ["GUIDANCE_EMBEDDING_SCALE", "SCottStudentUNet", "init_from_teacher"]

if not (issubclass(UNet2DModel, ModelMixin) and issubclass(UNet2DModel, ConfigMixin)):
    raise ImportError("this diffusers release's UNet2DModel is not a ModelMixin + ConfigMixin; "
                      "SCottStudentUNet needs both.")

#: (w - 1) is multiplied by this before the sinusoidal embedding (LCM: ``get_guidance_scale_embedding``, w * 1000)
GUIDANCE_EMBEDDING_SCALE = 1000.0


class _GuidedTimestepEmbedding(TimestepEmbedding):
    """diffusers' ``TimestepEmbedding`` with ``cond_proj``; ``UNet2DModel.forward`` calls it without a condition, so
    the owning :class:`SCottStudentUNet` hands the w-embedding over in ``pending_condition`` for one forward call."""

    pending_condition: torch.Tensor | None = None

    def forward(self, sample: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        if condition is None:
            condition = self.pending_condition
        return super().forward(sample, condition)


class SCottStudentUNet(UNet2DModel):
    """``UNet2DModel`` + the guidance-scale input w (see the module docstring).

    Takes the same constructor arguments as ``UNet2DModel``; only ``time_embedding_type="positional"`` is supported
    (gensample's c_noise = 250 ln sigma is negative below sigma = 1).
    """

    @functools.wraps(UNet2DModel.__init__)
    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self.config.time_embedding_type != "positional":
            raise ValueError(
                f"SCottStudentUNet needs time_embedding_type='positional', got {self.config.time_embedding_type!r}.")
        old = self.time_embedding
        dim = old.linear_1.in_features
        self.time_embedding = _GuidedTimestepEmbedding(dim, old.linear_2.out_features, cond_proj_dim=dim)
        self.time_embedding.load_state_dict(old.state_dict(), strict=False)
        zero_guidance_projection(self)

    @classmethod
    def from_teacher(cls, teacher: UNet2DModel) -> "SCottStudentUNet":
        """A student with ``teacher``'s configuration and weights (:func:`init_from_teacher`)."""
        student = build_from_teacher(cls, teacher)
        init_from_teacher(student, teacher)
        return student

    def guidance_embedding(self, guidance_scale: torch.Tensor | float | None, sample: torch.Tensor) -> torch.Tensor:
        """time_proj((w - 1) * 1000) per sample, (B, block_out_channels[0]); None means w = 1."""
        w = torch.ones((), device=sample.device) if guidance_scale is None else torch.as_tensor(
            guidance_scale, device=sample.device)
        w = w.to(torch.float32).reshape(-1).expand(sample.shape[0])
        return self.time_proj((w - 1.0) * GUIDANCE_EMBEDDING_SCALE).to(dtype=self.dtype)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        class_labels: torch.Tensor | None = None,
        return_dict: bool = True,
        guidance_scale: torch.Tensor | float | None = None,
    ) -> UNet2DOutput | tuple:
        r"""F(sample, t, c, w): ``UNet2DModel.forward`` with the w-embedding added to the time projection.

        Args:
            sample (`torch.Tensor`): (batch, channel, height, width).
            timestep: the noise conditioning (c_noise = 250 ln sigma in gensample), a number or one per sample.
            class_labels (`torch.Tensor`, *optional*): for a class-conditional model.
            return_dict (`bool`, defaults to True): return a ``UNet2DOutput`` rather than a tuple.
            guidance_scale: w, a number or one per sample; None means 1 (no guidance).
        """
        self.time_embedding.pending_condition = self.guidance_embedding(guidance_scale, sample)
        try:
            return super().forward(sample, timestep, class_labels=class_labels, return_dict=return_dict)
        finally:
            self.time_embedding.pending_condition = None


def zero_guidance_projection(model: SCottStudentUNet) -> None:
    """Set ``time_embedding.cond_proj`` to zero: the w-branch then adds exactly 0."""
    with torch.no_grad():
        model.time_embedding.cond_proj.weight.zero_()


def init_from_teacher(student: SCottStudentUNet, teacher_unet: nn.Module) -> dict[str, list[str]]:
    """Copy ``teacher_unet``'s parameters and buffers into ``student`` wherever the names match (consistency
    distillation's initialisation, CM paper sec. 6 / LCM) and zero the w-projection, so that the student's network
    output equals the teacher's for every w.

    Every teacher tensor must have a same-named, same-shaped tensor in the student (a ValueError names the
    mismatches: build the student with ``SCottStudentUNet.from_teacher`` or from ``teacher.config``). Returns
    {"copied": [...], "not_in_teacher": [...]} (the latter: the w-projection).
    """
    if not isinstance(student, SCottStudentUNet):
        raise ValueError(f"student must be a SCottStudentUNet, got {type(student).__name__}.")
    report = copy_teacher_weights(student, teacher_unet)
    zero_guidance_projection(student)
    return report
