"""CTMUNet2DModel: a diffusers ``UNet2DModel`` with a second time input s, the backbone F(x, t, s) of CTM's
trajectory function G(x, t, s) = (s/t) x + (1 - s/t) g(x, t, s), g = c_skip(t) x + c_out(t) F(c_in(t) x, c_noise(t),
c_noise(s)) with EDM's scalings at t (Kim et al. 2024, "Consistency Trajectory Models", sec. 3; sony/ctm
``get_denoised_and_G``).

Design (what we chose, and how it differs from the CTM code):

* s goes through the **same** sinusoidal projection as t (``time_proj``) and then through its **own**
  ``TimestepEmbedding`` MLP ``s_embedding`` (same structure as ``time_embedding``); the result is **added to the
  t-embedding** before it reaches the blocks: emb = time_embedding(proj(t)) + s_embedding(proj(s)) [+ class emb].
  The CTM code sums per block instead (``emb_layers(emb) + emb_layers_s(emb_s)`` in the ADM ResBlock,
  ``affine(emb) + affine_s(emb_s)`` in DDPM++), i.e. each block has a separate s projection. Adding the embeddings
  shares the per-block projections between t and s, which keeps every ``UNet2DModel`` block unchanged, so a
  teacher's weights load by name and diffusers' blocks are reused as they are. It is not parameter-for-parameter
  identical to CTM.
* ``s_embedding.linear_2`` starts at zero (weight and bias), so the s-branch outputs 0 and a student initialised from
  a teacher (:func:`init_from_teacher`) computes exactly the teacher's output for every s: g(x, t, s) = D(x, t).
  CTM initialises its s-branch with the ordinary non-zero init; the zero output is the better start for
  distillation (the student starts as the teacher's denoiser) and still trains (linear_2 receives gradients at once).
* ``s_timestep=None`` means s = t: the model is then the CTM student's denoiser g(x, t, t) and can stand in for a
  plain ``UNet2DModel`` (e.g. in ``EDMPipeline``).

Saved with ``save_pretrained`` as a diffusers model whose config is the ``UNet2DModel`` config (``_class_name``
CTMUNet2DModel); ``from_pretrained`` restores it, s-branch included.
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

__all__ = ["CTMUNet2DModel", "init_from_teacher", "zero_s_embedding_output"]

# save_pretrained / from_pretrained come from these bases of UNet2DModel (checked at import time, so a diffusers
# release that restructured them fails here and not at the first save).
if not (issubclass(UNet2DModel, ModelMixin) and issubclass(UNet2DModel, ConfigMixin)):
    raise ImportError("this diffusers release's UNet2DModel is not a ModelMixin + ConfigMixin; "
                      "CTMUNet2DModel needs both.")


class CTMUNet2DModel(UNet2DModel):
    """``UNet2DModel`` + ``s_embedding``: F(x, t, s) with the s-embedding added to the t-embedding.

    Takes the same constructor arguments as ``UNet2DModel`` (its config is the UNet2DModel config); only
    ``time_embedding_type="positional"`` is supported, since CTM's noise conditionings c_noise = 250 ln(sigma) are
    negative for sigma < 1 (the Fourier projection takes their log and a learned table needs integers).
    """

    # functools.wraps keeps UNet2DModel's signature visible through __wrapped__: ConfigMixin reads the init keys
    # with inspect.signature (from_config / from_pretrained), and the parent's @register_to_config records them.
    @functools.wraps(UNet2DModel.__init__)
    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self.config.time_embedding_type != "positional":
            raise ValueError(
                f"CTMUNet2DModel needs time_embedding_type='positional', got {self.config.time_embedding_type!r}.")
        self.s_embedding = TimestepEmbedding(self.time_embedding.linear_1.in_features,
                                             self.time_embedding.linear_2.out_features)
        zero_s_embedding_output(self)

    @classmethod
    def from_teacher(cls, teacher: UNet2DModel) -> "CTMUNet2DModel":
        """A CTM backbone with ``teacher``'s configuration and weights (see :func:`init_from_teacher`)."""
        student = build_from_teacher(cls, teacher)
        init_from_teacher(student, teacher)
        return student

    def _timesteps(self, timestep, sample: torch.Tensor) -> torch.Tensor:
        """As UNet2DModel.forward: a number or 0-d tensor broadcast to the batch."""
        timesteps = timestep
        if not torch.is_tensor(timesteps):
            timesteps = torch.tensor([timesteps], dtype=torch.long, device=sample.device)
        elif len(timesteps.shape) == 0:
            timesteps = timesteps[None].to(sample.device)
        return timesteps * torch.ones(sample.shape[0], dtype=timesteps.dtype, device=timesteps.device)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        class_labels: torch.Tensor | None = None,
        return_dict: bool = True,
        s_timestep: torch.Tensor | float | int | None = None,
    ) -> UNet2DOutput | tuple:
        r"""F(sample, t, s).

        Args:
            sample (`torch.Tensor`): (batch, channel, height, width).
            timestep: the noise conditioning of t (c_noise(t) = 250 ln t in gensample), a number or one per sample.
            class_labels (`torch.Tensor`, *optional*): for a class-conditional model (added to the t-branch sum).
            return_dict (`bool`, defaults to True): return a ``UNet2DOutput`` rather than a tuple.
            s_timestep: the noise conditioning of the jump target s; None means s = t (the denoiser g(x, t, t)).
        """
        # Steps 0, 2-6 are UNet2DModel.forward (diffusers 0.42.1) unchanged; step 1 adds the s-embedding.
        # 0. center input if necessary
        if self.config.center_input_sample:
            sample = 2 * sample - 1.0

        # 1. time: emb = MLP_t(proj(t)) + MLP_s(proj(s))
        timesteps = self._timesteps(timestep, sample)
        t_emb = self.time_proj(timesteps).to(dtype=self.dtype)
        emb = self.time_embedding(t_emb)
        s_emb = t_emb if s_timestep is None else self.time_proj(self._timesteps(s_timestep, sample)).to(self.dtype)
        emb = emb + self.s_embedding(s_emb)

        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError("class_labels should be provided when doing class conditioning")
            if self.config.class_embed_type == "timestep":
                class_labels = self.time_proj(class_labels)
            class_emb = self.class_embedding(class_labels).to(dtype=self.dtype)
            emb = emb + class_emb
        elif class_labels is not None:
            raise ValueError("class_embedding needs to be initialized in order to use class conditioning")

        # 2. pre-process
        skip_sample = sample
        sample = self.conv_in(sample)

        # 3. down
        down_block_res_samples = (sample,)
        for downsample_block in self.down_blocks:
            if hasattr(downsample_block, "skip_conv"):
                sample, res_samples, skip_sample = downsample_block(
                    hidden_states=sample, temb=emb, skip_sample=skip_sample)
            else:
                sample, res_samples = downsample_block(hidden_states=sample, temb=emb)
            down_block_res_samples += res_samples

        # 4. mid
        if self.mid_block is not None:
            sample = self.mid_block(sample, emb)

        # 5. up
        skip_sample = None
        for upsample_block in self.up_blocks:
            res_samples = down_block_res_samples[-len(upsample_block.resnets):]
            down_block_res_samples = down_block_res_samples[: -len(upsample_block.resnets)]
            if hasattr(upsample_block, "skip_conv"):
                sample, skip_sample = upsample_block(sample, res_samples, emb, skip_sample)
            else:
                sample = upsample_block(sample, res_samples, emb)

        # 6. post-process
        sample = self.conv_norm_out(sample)
        sample = self.conv_act(sample)
        sample = self.conv_out(sample)
        if skip_sample is not None:
            sample += skip_sample

        if not return_dict:
            return (sample,)
        return UNet2DOutput(sample=sample)


def zero_s_embedding_output(model: CTMUNet2DModel) -> None:
    """Set ``s_embedding.linear_2`` to zero (weight and bias): the s-branch then adds exactly 0."""
    with torch.no_grad():
        model.s_embedding.linear_2.weight.zero_()
        model.s_embedding.linear_2.bias.zero_()


def init_from_teacher(ctm_unet: CTMUNet2DModel, teacher_unet: nn.Module) -> dict[str, list[str]]:
    """Copy ``teacher_unet``'s parameters and buffers into ``ctm_unet`` wherever the names match (CTM, ``cm_train.py
    main``: the student starts from the teacher), and zero the s-branch output, so that the student's
    g(x, t, s) equals the teacher's EDM denoiser D(x, t) for every s.

    Every teacher tensor must have a same-named, same-shaped tensor in the student (a ValueError names the
    mismatches: build the student with ``CTMUNet2DModel.from_teacher`` or from ``teacher.config``). Returns
    {"copied": [...], "not_in_teacher": [...]} (the latter: the s-branch).
    """
    if not isinstance(ctm_unet, CTMUNet2DModel):
        raise ValueError(f"ctm_unet must be a CTMUNet2DModel, got {type(ctm_unet).__name__}.")
    report = copy_teacher_weights(ctm_unet, teacher_unet)
    zero_s_embedding_output(ctm_unet)
    return report
