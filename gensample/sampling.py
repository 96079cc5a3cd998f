"""Samplers as plain functions over a consistency function f(x, sigma) (k-diffusion style), and the single-step
update that the diffusers scheduler and the kernels share."""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from .parametrization import consistency_scalings
from .sigmas import SIGMA_DATA, SIGMA_MAX, SIGMA_MIN


def renoise_std(sigma_next, sigma_min: float = SIGMA_MIN) -> torch.Tensor:
    """Std of the fresh noise that brings a clean estimate to level sigma_next: sqrt(sigma_next^2 - sigma_min^2)
    (CM paper, Algorithm 1, line 5)."""
    sigma_next = torch.as_tensor(sigma_next, dtype=torch.float64)
    return (sigma_next.clamp(min=sigma_min) ** 2 - sigma_min**2).sqrt()


def consistency_step(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    sigma,
    sigma_next,
    noise: torch.Tensor | None,
    sigma_data: float = SIGMA_DATA,
    sigma_min: float = SIGMA_MIN,
    clip_denoised: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of the multistep consistency sampler (CM Algorithm 1):
    denoised = c_skip(sigma) x + c_out(sigma) F;  next = denoised + sqrt(sigma_next^2 - sigma_min^2) z.

    ``noise`` may be None when sigma_next <= sigma_min (the last step adds nothing). Returns (next, denoised).
    """
    c_skip, c_out = consistency_scalings(torch.as_tensor(sigma, dtype=torch.float64), sigma_data, sigma_min)
    denoised = c_skip.to(sample.dtype) * sample + c_out.to(sample.dtype) * model_output
    if clip_denoised:
        denoised = denoised.clamp(-1, 1)
    std = renoise_std(sigma_next, sigma_min)
    if noise is None or float(std) == 0.0:
        return denoised, denoised
    return denoised + std.to(sample.dtype) * noise, denoised


def sample_consistency(
    consistency_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    noise: torch.Tensor,
    sigmas: Sequence[float] | torch.Tensor,
    generator: torch.Generator | None = None,
    sigma_min: float = SIGMA_MIN,
    clip_denoised: bool = True,
    callback: Callable[[dict], None] | None = None,
) -> torch.Tensor:
    """Multistep consistency sampling (CM paper, Algorithm 1) over a descending list of sampling sigmas.

    x = sigmas[0] * noise; for each sigma_i: x0 = f(x, sigma_i) (clamped); x = x0 + sqrt(sigma_{i+1}^2 - sigma_min^2) z.
    One sigma gives 1-step sampling f(sigma_max z, sigma_max). Fresh noise z is drawn from ``generator`` only between
    steps (openai's ``stochastic_iterative_sampler`` also draws one unused z after the last step).
    """
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64).flatten()
    if len(sigmas) < 1:
        raise ValueError("sigmas must hold at least one noise level.")
    if (sigmas[1:] >= sigmas[:-1]).any():
        raise ValueError(f"sigmas must be strictly descending, got {sigmas.tolist()}.")
    x = noise * sigmas[0].to(noise.dtype)
    denoised = x
    for i, sigma in enumerate(sigmas):
        denoised = consistency_fn(x, sigma.expand(x.shape[0]))
        if clip_denoised:
            denoised = denoised.clamp(-1, 1)
        if callback is not None:
            callback({"i": i, "sigma": sigma, "x": x, "denoised": denoised})
        if i + 1 < len(sigmas):
            z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
            x = denoised + renoise_std(sigmas[i + 1], sigma_min).to(x.dtype) * z
    return denoised


def default_sampling_sigmas(num_inference_steps: int, num_train_timesteps: int, sigma_min: float = SIGMA_MIN,
                            sigma_max: float = SIGMA_MAX, rho: float = 7.0) -> torch.Tensor:
    """The n sampling sigmas diffusers' CMStochasticIterativeScheduler picks for ``num_inference_steps`` = n:
    descending grid indices 0, r, 2r, ... with r = N // n on the N-point Karras grid."""
    from .sigmas import karras_sigma_at_index

    step_ratio = num_train_timesteps // num_inference_steps
    idx = [i * step_ratio for i in range(num_inference_steps)]
    return torch.tensor([karras_sigma_at_index(i, num_train_timesteps, sigma_min, sigma_max, rho) for i in idx],
                        dtype=torch.float64)
