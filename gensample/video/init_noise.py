"""Initial noise that carries a reference video's motion: DDIM inversion and FreeInit's low-frequency mixing.

* DDIM inversion (Song et al. 2021, eq. 13 run backwards; the reference-video control of the MCL paper, Zhang et al.
  2025, arXiv 2501.07563): the reference latent is walked from t = 0 up the sampler's timesteps with the
  deterministic DDIM update, using diffusers' :class:`~diffusers.DDIMInverseScheduler` built from the sampling
  scheduler's config.
* Low-frequency mixing (FreeInit, Wu et al. 2023, eqs. 3-5): keep the low spatio-temporal frequencies of one latent
  and take the high ones from fresh Gaussian noise, with a Butterworth low-pass filter of order n and normalised
  cut-offs d_s (space) and d_t (time), both 0.25 by default.
"""
from __future__ import annotations

from typing import Callable

import torch

__all__ = ["butterworth_low_pass", "lowfreq_mix", "ddim_invert", "INIT_NOISE_MODES"]

INIT_NOISE_MODES = ("random", "ddim_inversion", "lowfreq_mix", "ddim_inversion+lowfreq_mix")


def butterworth_low_pass(num_frames: int, height: int, width: int, spatial_cutoff: float = 0.25,
                         temporal_cutoff: float = 0.25, order: int = 4) -> torch.Tensor:
    """FreeInit's 3-D Butterworth low-pass mask over (F, H, W), on the centred (fftshift-ed) spectrum:

        d^2 = ((d_s / d_t) (2f/F - 1))^2 + (2h/H - 1)^2 + (2w/W - 1)^2,   mask = 1 / (1 + (d^2 / d_s^2)^n).
    """
    if not (0 < spatial_cutoff <= 1 and 0 < temporal_cutoff <= 1):
        raise ValueError(f"cut-offs must be in (0, 1], got spatial {spatial_cutoff}, temporal {temporal_cutoff}.")
    f = torch.arange(num_frames, dtype=torch.float64)[:, None, None]
    h = torch.arange(height, dtype=torch.float64)[None, :, None]
    w = torch.arange(width, dtype=torch.float64)[None, None, :]
    d2 = (((spatial_cutoff / temporal_cutoff) * (2 * f / num_frames - 1)) ** 2
          + (2 * h / height - 1) ** 2 + (2 * w / width - 1) ** 2)
    return (1.0 / (1.0 + (d2 / spatial_cutoff**2) ** order)).float()


def lowfreq_mix(low_source: torch.Tensor, high_source: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """IFFT( mask * FFT(low_source) + (1 - mask) * FFT(high_source) ) over the last three dims (F, H, W).

    Latents are (B, C, F, H, W); ``mask`` is (F, H, W) from :func:`butterworth_low_pass`.
    """
    if low_source.shape != high_source.shape:
        raise ValueError(f"low and high sources must have one shape, got {tuple(low_source.shape)} and "
                         f"{tuple(high_source.shape)}.")
    if tuple(mask.shape) != tuple(low_source.shape[-3:]):
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match the latents' (F, H, W) "
                         f"{tuple(low_source.shape[-3:])}.")
    dims = (-3, -2, -1)
    mask = mask.to(low_source.device)
    low = torch.fft.fftshift(torch.fft.fftn(low_source.float(), dim=dims), dim=dims)
    high = torch.fft.fftshift(torch.fft.fftn(high_source.float(), dim=dims), dim=dims)
    mixed = low * mask + high * (1 - mask)
    return torch.fft.ifftn(torch.fft.ifftshift(mixed, dim=dims), dim=dims).real.to(low_source.dtype)


@torch.no_grad()
def ddim_invert(eps_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], latents: torch.Tensor, scheduler,
                num_inference_steps: int, progress: Callable | None = None) -> dict[int, torch.Tensor]:
    """Deterministic DDIM inversion of clean ``latents`` to the sampler's largest timestep.

    ``eps_fn(x, t)`` returns the noise prediction; ``scheduler`` is the sampling scheduler (its config builds the
    inverse one, so the same timesteps are visited). Returns {timestep: latent at that timestep} for every
    timestep of the sampler, from which DDIM sampling would start at the largest.
    """
    from diffusers import DDIMInverseScheduler

    inverse = DDIMInverseScheduler.from_config(scheduler.config)
    inverse.set_timesteps(num_inference_steps, device=latents.device)
    trajectory = {}
    x = latents
    steps = inverse.timesteps
    for t in (progress(steps) if progress else steps):
        x = inverse.step(eps_fn(x, t), t, x).prev_sample
        trajectory[int(t)] = x
    return trajectory
