"""SCott's discriminator D(x_s, sigma, c) (Liu et al., AAAI 2025, sec. "adversarial loss"): conditioned on the noise
level and the condition, scoring noised images with patch logits for the hinge losses of
:mod:`gensample.models.discriminator`.

Structure: the encoder half of a diffusers ``UNet2DModel`` (conv_in, the sinusoidal time projection and time MLP, the
class embedding, the down blocks and the mid block), evaluated on EDM's preconditioned input c_in(sigma) x_s with
c_noise(sigma) as its timestep (:mod:`gensample.core.parametrization`), then a head GroupNorm -> SiLU -> 1x1 conv
giving one logit per position of the lowest resolution. The condition reaches every residual block through the
time + class embedding, as in the UNet.

Two builds (the paper's choice and a small one):

* :meth:`SCottDiscriminator.from_teacher`: a copy of the teacher UNet's encoder, **frozen**, with LoRA adapters
  (peft; Hu et al. 2021) of rank ``lora_rank`` on its convolutions and linear layers -- the paper's "LoRA
  discriminator initialised from the teacher U-Net" ([2nd-hand]: LoRA on the U-Net, rank 64 on attention). The head
  is trained in full. ``lora_rank=None`` trains the copied encoder in full (the paper's "full-parameter D" ablation).
* :meth:`SCottDiscriminator.standalone`: the same structure on a fresh UNet preset (e.g. "tiny"), trained in full.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from diffusers import UNet2DModel
from torch import nn

from ..core.parametrization import input_scaling, noise_conditioning, per_sample
from ..core.sigmas import SIGMA_DATA

__all__ = ["LORA_TARGET_MODULES", "SCottDiscriminator"]

#: the encoder layers that get LoRA adapters: the residual blocks' convolutions and time projections, the
#: downsampling convolutions and the attention projections (names as diffusers' blocks have them)
LORA_TARGET_MODULES = r".*(conv1|conv2|time_emb_proj|downsamplers\.\d+\.conv|to_q|to_k|to_v|to_out\.0)$"


class SCottDiscriminator(nn.Module):
    """D(x_s, sigma, class_labels=None) -> [logits (B, h*w)] (see the module docstring).

    Args:
        unet: the ``UNet2DModel`` whose encoder half is used (taken as is: pass a copy to keep the original).
        lora_rank: None: every encoder weight trains; r >= 1: the encoder is frozen and LoRA adapters of rank r
            (alpha = r) are trained (needs ``pip install peft``).
        sigma_data: of the input preconditioning c_in(sigma) = 1 / sqrt(sigma^2 + sigma_data^2).
    """

    def __init__(self, unet: UNet2DModel, lora_rank: int | None = None, sigma_data: float = SIGMA_DATA):
        super().__init__()
        if unet.config.time_embedding_type != "positional":
            raise ValueError("SCottDiscriminator needs a UNet with time_embedding_type='positional'.")
        self.sigma_data = float(sigma_data)
        self.lora_rank = None if lora_rank is None else int(lora_rank)
        self.config = dict(lora_rank=self.lora_rank, sigma_data=self.sigma_data,
                           unet_config={k: v for k, v in dict(unet.config).items() if not k.startswith("_")})
        self.class_embed_type = unet.config.class_embed_type
        encoder = nn.ModuleDict(dict(conv_in=unet.conv_in, time_proj=unet.time_proj,
                                     time_embedding=unet.time_embedding, down_blocks=unet.down_blocks))
        if unet.class_embedding is not None:
            encoder["class_embedding"] = unet.class_embedding
        if unet.mid_block is not None:
            encoder["mid_block"] = unet.mid_block
        self.encoder = encoder
        channels = unet.config.block_out_channels[-1]
        groups = unet.config.norm_num_groups
        self.head = nn.Sequential(nn.GroupNorm(groups, channels), nn.SiLU(), nn.Conv2d(channels, 1, 1))
        if self.lora_rank is not None:
            self._add_lora(self.lora_rank)

    def _add_lora(self, rank: int) -> None:
        if rank < 1:
            raise ValueError(f"lora_rank must be >= 1 (None: train the encoder in full), got {rank}.")
        try:
            from peft import LoraConfig, inject_adapter_in_model
        except ImportError:
            raise ValueError("a LoRA discriminator needs peft: `pip install peft` (or pass lora_rank=None to train "
                             "the encoder in full).") from None
        self.encoder.requires_grad_(False)
        config = LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGET_MODULES, lora_dropout=0.0)
        inject_adapter_in_model(config, self.encoder)
        for name, p in self.encoder.named_parameters():
            p.requires_grad_("lora_" in name)

    @classmethod
    def from_teacher(cls, teacher_unet: UNet2DModel, lora_rank: int | None = 8,
                     sigma_data: float = SIGMA_DATA) -> "SCottDiscriminator":
        """The teacher's encoder (a copy; the teacher is untouched), frozen with LoRA adapters of ``lora_rank``."""
        return cls(copy.deepcopy(teacher_unet), lora_rank=lora_rank, sigma_data=sigma_data)

    @classmethod
    def standalone(cls, preset: str = "tiny", sample_size: int = 8, in_channels: int = 1,
                   num_class_embeds: int | None = None, sigma_data: float = SIGMA_DATA,
                   **overrides: Any) -> "SCottDiscriminator":
        """A fresh encoder of a UNet preset (:func:`gensample.models.unet.build_unet`), trained in full."""
        from .unet import build_unet

        unet = build_unet(preset, sample_size=sample_size, in_channels=in_channels,
                          num_class_embeds=num_class_embeds, **overrides)
        return cls(unet, lora_rank=None, sigma_data=sigma_data)

    def forward(self, x: torch.Tensor, sigma, class_labels: torch.Tensor | None = None) -> list[torch.Tensor]:
        s = per_sample(sigma, x).to(torch.float64)
        timesteps = noise_conditioning(s.flatten()).to(device=x.device, dtype=torch.float32)
        enc = self.encoder
        emb = enc["time_embedding"](enc["time_proj"](timesteps).to(x.dtype))
        if "class_embedding" in enc:
            if class_labels is None:
                raise ValueError("this discriminator is class-conditional: pass class_labels.")
            labels = enc["time_proj"](class_labels) if self.class_embed_type == "timestep" else class_labels
            emb = emb + enc["class_embedding"](labels).to(x.dtype)
        elif class_labels is not None:
            raise ValueError("class_labels given, but this discriminator is unconditional.")
        h = enc["conv_in"](input_scaling(s, self.sigma_data).to(x.dtype) * x)
        for block in enc["down_blocks"]:
            h = block(hidden_states=h, temb=emb)[0]
        if "mid_block" in enc:
            h = enc["mid_block"](h, emb)
        return [self.head(h).flatten(1)]
