"""A small diffusers ``AutoencoderKL`` for latent consistency training on the embedded digits (or any small image
set), saved in diffusers format so that ``gensample train lct --vae PATH`` (and any diffusers code) can load it.

sLCT itself uses the pretrained ``stabilityai/sd-vae-ft-ema`` (f = 8, 4 latent channels; quandao10/LCT ``prepocess_data.py``); that
VAE cannot be downloaded here, so this trains a same-family stand-in: f = 4 (three encoder levels, two
downsamplings), 32x32x1 -> 4x8x8 latents by default. Objective per batch (a simplification of the LDM/SD
autoencoder loss, without LPIPS and GAN terms):

    loss = mean|x_hat - x| + mean (x_hat - x)^2 + kl_weight * mean_{b, latent elements} KL(q(z|x_b) || N(0, I))

with z ~ q(z|x) (reparameterised) and a small ``kl_weight``. After training, ``scaling_factor`` is set to
1 / std of the posterior samples over the training set (the way SD's 0.18215 was chosen) unless one is given; sLCT's
per-element normalisation (gensample.data.latents) makes the choice irrelevant for training, but it keeps the VAE
usable by diffusers pipelines that expect unit-variance scaled latents.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch
from diffusers import AutoencoderKL
from tqdm.auto import tqdm

__all__ = ["build_vae", "train_vae", "vae_loss"]


def build_vae(in_channels: int = 1, latent_channels: int = 4, block_out_channels: Sequence[int] = (16, 32, 32),
              layers_per_block: int = 1, norm_num_groups: int = 8, sample_size: int = 32,
              scaling_factor: float = 1.0, mid_block_add_attention: bool = True) -> AutoencoderKL:
    """A randomly initialised ``AutoencoderKL`` with ``len(block_out_channels)`` levels: spatial factor
    f = 2^(levels - 1) (3 levels: 32x32 -> 8x8)."""
    levels = len(block_out_channels)
    if levels < 1:
        raise ValueError("block_out_channels needs at least one level.")
    if any(c % norm_num_groups for c in block_out_channels):
        raise ValueError(f"every block_out_channels entry must be divisible by norm_num_groups={norm_num_groups}, "
                         f"got {tuple(block_out_channels)}.")
    factor = 2 ** (levels - 1)
    if sample_size % factor:
        raise ValueError(f"sample_size {sample_size} is not divisible by the VAE's spatial factor {factor}.")
    return AutoencoderKL(
        in_channels=in_channels, out_channels=in_channels, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
        norm_num_groups=norm_num_groups, sample_size=sample_size, scaling_factor=scaling_factor,
        mid_block_add_attention=mid_block_add_attention,
    )


def vae_loss(vae: AutoencoderKL, x: torch.Tensor, kl_weight: float,
             generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """L1 + L2 reconstruction of a posterior sample, plus ``kl_weight`` times the KL per latent element."""
    dist = vae.encode(x).latent_dist
    z = dist.sample(generator=generator)
    recon = vae.decode(z).sample
    err = recon.float() - x.float()
    l1, l2 = err.abs().mean(), err.square().mean()
    kl = dist.kl().mean() / z[0].numel()
    return {"loss": l1 + l2 + kl_weight * kl, "l1": l1.detach(), "l2": l2.detach(), "kl": kl.detach()}


@torch.no_grad()
def _latent_std(vae: AutoencoderKL, data: torch.Tensor, batch_size: int) -> float:
    zs = [vae.encode(data[i:i + batch_size]).latent_dist.sample() for i in range(0, len(data), batch_size)]
    return float(torch.cat(zs).float().std())


def train_vae(data: str | torch.Tensor = "digits", resolution: int = 32, output_dir: str | Path | None = None,
              latent_channels: int = 4, block_out_channels: Sequence[int] = (16, 32, 32), layers_per_block: int = 1,
              norm_num_groups: int = 8, max_steps: int = 500, batch_size: int = 32, learning_rate: float = 1e-3,
              kl_weight: float = 1e-4, scaling_factor: float | None = None, seed: int = 0,
              device: torch.device | str | None = None, progress: bool = True) -> AutoencoderKL:
    """Train a small ``AutoencoderKL`` and (if ``output_dir``) ``save_pretrained`` it there.

    Args:
        data: "digits" (the embedded set, bilinearly upscaled to ``resolution``), a folder of images, or an
            (N, C, H, W) tensor in [-1, 1] of size ``resolution``.
        resolution: image size; the latents are (latent_channels, resolution / f, resolution / f).
        max_steps, batch_size, learning_rate: Adam with a constant LR. The defaults (0.24M parameters, 500 steps
            of 32) take about 3 minutes on one CPU thread and reconstruct held-out digits to a mean |error| of
            ~0.017 (on [-1, 1]; measured at 400 steps); tests use a couple of steps.
        kl_weight: weight of the per-element KL (small: a near-deterministic autoencoder, as SD's VAE).
        scaling_factor: None -> 1 / std of the training latents (SD's rule); a number -> that value.
    Returns the trained VAE in eval mode (on ``device``).
    """
    if max_steps < 1 or batch_size < 1 or learning_rate <= 0 or kl_weight < 0:
        raise ValueError("need max_steps >= 1, batch_size >= 1, learning_rate > 0 and kl_weight >= 0; got "
                         f"{max_steps}, {batch_size}, {learning_rate}, {kl_weight}.")
    if isinstance(data, str):
        from ..data import image_dataset

        images = image_dataset(data, resolution)
    else:
        images = data
    if images.ndim != 4 or images.shape[-1] != resolution or images.shape[-2] != resolution:
        raise ValueError(f"training images must be (N, C, {resolution}, {resolution}), got {tuple(images.shape)}.")
    device = torch.device(device) if device is not None else torch.device("cpu")
    torch.manual_seed(seed)
    vae = build_vae(images.shape[1], latent_channels, block_out_channels, layers_per_block, norm_num_groups,
                    resolution).to(device)
    optimizer = torch.optim.Adam(vae.parameters(), lr=learning_rate)
    gen = torch.Generator().manual_seed(seed)
    vae.train()
    bar = tqdm(range(max_steps), desc="train vae", disable=not progress, dynamic_ncols=True)
    for step in bar:
        idx = torch.randint(0, len(images), (min(batch_size, len(images)),), generator=gen)
        losses = vae_loss(vae, images[idx].to(device), kl_weight)
        if not torch.isfinite(losses["loss"]):
            raise FloatingPointError(f"non-finite VAE loss at step {step}; lower the learning rate.")
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        optimizer.step()
        if step % 10 == 0 or step == max_steps - 1:
            bar.set_postfix(l1=f"{float(losses['l1']):.4f}", kl=f"{float(losses['kl']):.3g}")
    vae.eval()
    if scaling_factor is None:
        std = _latent_std(vae, images.to(device), batch_size)
        scaling_factor = 1.0 / std if math.isfinite(std) and std > 0 else 1.0
    vae.register_to_config(scaling_factor=float(scaling_factor))
    if output_dir is not None:
        vae.save_pretrained(output_dir)
    return vae
