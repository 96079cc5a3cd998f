"""A tiny AnimateDiff-style video UNet (diffusers ``UNetMotionModel``) for the embedded moving digits.

AnimateDiff (Guo et al. 2024, arXiv 2307.04725) inserts temporal transformers ("motion modules": self-attention over
the frame axis with sinusoidal frame positions) after the spatial layers of an image UNet. ``UNetMotionModel`` is that
architecture in diffusers; here it is built directly from a small config, so nothing is downloaded. Its input layout is
(B, C, F, H, W). The model is unconditional: its cross-attention sees one all-zero token (:func:`null_prompt_embeds`),
in training and in the pipeline alike.
"""
from __future__ import annotations

import torch
from diffusers import UNetMotionModel

__all__ = ["TINY_VIDEO_UNET_DEFAULTS", "null_prompt_embeds", "tiny_video_unet"]

#: The default configuration of :func:`tiny_video_unet` (chosen by measured training speed on one CPU thread).
TINY_VIDEO_UNET_DEFAULTS: dict = {
    "block_out_channels": (8, 16, 32, 32),
    "layers_per_block": 1,
    "cross_attention_dim": 32,
    "num_attention_heads": 2,
    "motion_num_attention_heads": 2,
    "norm_num_groups": 8,
}


def tiny_video_unet(sample_size: int = 32, in_channels: int = 1, *, block_out_channels: tuple[int, ...] | None = None,
                    down_block_types: tuple[str, ...] | None = None, up_block_types: tuple[str, ...] | None = None,
                    layers_per_block: int | None = None, cross_attention_dim: int | None = None,
                    num_attention_heads: int | None = None, motion_num_attention_heads: int | None = None,
                    norm_num_groups: int | None = None, temporal_layers: tuple[int, ...] | None = None,
                    motion_max_seq_length: int = 32) -> UNetMotionModel:
    """A small ``UNetMotionModel`` (AnimateDiff layout) for ``in_channels`` x ``sample_size`` pixel-space videos.

    Default (530k parameters): channels (8, 16, 32, 32) at 32x32, 16x16, 8x8, 4x4; one ResNet layer per block;
    spatial self/cross-attention only at the lowest level and in the mid block (``CrossAttnDownBlockMotion`` /
    ``CrossAttnUpBlockMotion`` there, ``DownBlockMotion`` / ``UpBlockMotion`` elsewhere); motion modules (temporal
    transformers, one layer, 2 heads) at every level but the first (``temporal_layers`` (0, 1, 1, 1)) and in the mid
    block. Why (measured, B = 8 videos of 8 frames, one thread of a shared CPU):
      * a motion module attends over frames at one spatial position, so it can only follow a sprite that stays within
        a few cells: with a 4x4 level (8 px cells; the digits move 10-18 px in 8 frames) the sampled tracks' RMS
        deviation from a straight line was 1.3 px after 500 steps, vs 4.0 px after 400 and 2.4 px after 800 steps
        for (8, 16, 32) (real videos: 0.05 px), at the same step time (~0.9-1.1 steps/s);
      * a step's time goes mostly to the many small ops of attention and motion blocks, not to FLOPs: (16, 32, 64)
        took ~1.3x and (32, 64, 64) ~2x the time of (8, 16, 32); a motion module at full resolution added ~10%;
        the full-resolution level has no spatial attention (1,024 tokens per frame).
    ``down_block_types`` / ``up_block_types`` / ``temporal_layers`` default to that layout for any number of levels.
    ``motion_max_seq_length`` (>= the number of frames) sizes the temporal position table.
    """
    d = TINY_VIDEO_UNET_DEFAULTS
    block_out_channels = tuple(block_out_channels or d["block_out_channels"])
    levels = len(block_out_channels)
    # the default layout for any depth: spatial attention only at the lowest level, no motion module at the first
    down_block_types = tuple(down_block_types or ("DownBlockMotion",) * (levels - 1) + ("CrossAttnDownBlockMotion",))
    up_block_types = tuple(up_block_types or ("CrossAttnUpBlockMotion",) + ("UpBlockMotion",) * (levels - 1))
    norm_num_groups = norm_num_groups or d["norm_num_groups"]
    heads = num_attention_heads or d["num_attention_heads"]
    motion_heads = motion_num_attention_heads or d["motion_num_attention_heads"]
    if sample_size < 1 or in_channels < 1:
        raise ValueError(f"sample_size and in_channels must be >= 1, got {sample_size} and {in_channels}.")
    if sample_size % 2 ** (len(block_out_channels) - 1):
        raise ValueError(f"sample_size={sample_size} must be divisible by 2^(levels-1) = "
                         f"{2 ** (len(block_out_channels) - 1)}; pick a multiple or fewer block_out_channels.")
    for c in block_out_channels:
        if c % norm_num_groups or c % heads or c % motion_heads:
            raise ValueError(f"block_out_channels {block_out_channels} must be divisible by norm_num_groups="
                             f"{norm_num_groups}, num_attention_heads={heads} and motion_num_attention_heads="
                             f"{motion_heads}; change one of them.")
    if temporal_layers is None:
        temporal_layers = (0,) + (1,) * (levels - 1) if levels > 1 else (1,)
    temporal_layers = tuple(temporal_layers)
    if len(temporal_layers) != len(block_out_channels) or min(temporal_layers) < 0:
        raise ValueError(f"temporal_layers needs one count >= 0 per level ({len(block_out_channels)}), got "
                         f"{temporal_layers}.")
    if motion_max_seq_length < 1:
        raise ValueError(f"motion_max_seq_length must be >= the number of frames, got {motion_max_seq_length}.")
    return UNetMotionModel(
        sample_size=sample_size, in_channels=in_channels, out_channels=in_channels,
        down_block_types=down_block_types, up_block_types=up_block_types, block_out_channels=block_out_channels,
        layers_per_block=layers_per_block or d["layers_per_block"], norm_num_groups=norm_num_groups,
        cross_attention_dim=cross_attention_dim or d["cross_attention_dim"], num_attention_heads=heads,
        motion_num_attention_heads=motion_heads, motion_max_seq_length=motion_max_seq_length,
        temporal_transformer_layers_per_block=temporal_layers, use_motion_mid_block=True,
    )


def null_prompt_embeds(unet: UNetMotionModel, batch_size: int, device: torch.device | str | None = None,
                       dtype: torch.dtype | None = None, *, num_frames: int = 1) -> torch.Tensor:
    """The unconditional prompt: zeros of shape (batch_size * num_frames, 1, unet.config.cross_attention_dim).

    ``UNetMotionModel.forward`` (diffusers 0.42) folds frames into the batch before its spatial cross-attention and
    does *not* repeat ``encoder_hidden_states`` itself (``AnimateDiffPipeline`` calls
    ``prompt_embeds.repeat_interleave(num_frames, dim=0)``), so it needs one row per frame: pass the video's
    ``num_frames``. With ``num_frames=1`` the result is (batch_size, 1, dim), the per-video prompt.
    """
    if batch_size < 1 or num_frames < 1:
        raise ValueError(f"batch_size and num_frames must be >= 1, got {batch_size} and {num_frames}.")
    dim = unet.config.cross_attention_dim
    if not isinstance(dim, int):
        dim = int(dim[0])
    return torch.zeros(batch_size * num_frames, 1, dim, device=device if device is not None else unet.device,
                       dtype=dtype if dtype is not None else unet.dtype)
