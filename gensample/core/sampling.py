"""Samplers and solver steps as plain functions over a model in sigma space (k-diffusion style): the multistep
consistency step (CM Algorithm 1), EDM's Heun step and solve (EDM Algorithm 2) and CTM's gamma-sampling jump target.

Each update is written once here and called by the training methods (teacher solves), the diffusers schedulers and
the kernels' PyTorch references. Sampling schedules (descending sigmas) come from :mod:`gensample.core.sigmas`.

EDM's deterministic Heun sampler (Karras et al. 2022, Algorithm 2 with S_churn = 0, i.e. Algorithm 1):

    x_0 = t_0 * z
    for i = 0 .. N-1:
        d_i     = (x_i - D(x_i, t_i)) / t_i                          (line 7, the ODE derivative dx/dt)
        x_{i+1} = x_i + (t_{i+1} - t_i) d_i                          (line 8, Euler predictor)
        if t_{i+1} != 0:                                             (line 9; the last step stays Euler)
            d'_i    = (x_{i+1} - D(x_{i+1}, t_{i+1})) / t_{i+1}      (line 10)
            x_{i+1} = x_i + (t_{i+1} - t_i) (d_i + d'_i) / 2         (line 11, trapezoidal corrector)

N steps cost 2N - 1 denoiser evaluations (NFE); EDM's CIFAR-10 setting is N = 18 (NFE 35).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from .parametrization import combine, consistency_scalings, per_sample
from .sigmas import SIGMA_DATA, SIGMA_MIN

__all__ = [
    "renoise_std", "consistency_step", "ode_derivative", "euler_step", "heun_correct",
    "heun_step", "heun_solve", "sample_heun", "check_gamma", "ctm_jump_target",
]


# -- consistency models ----------------------------------------------------------------------------------------------
def renoise_std(sigma_next, sigma_min: float = SIGMA_MIN) -> torch.Tensor:
    """Std of the fresh noise that brings a clean estimate to level sigma_next: sqrt(sigma_next^2 - sigma_min^2)
    (CM paper, Algorithm 1, line 5). With ``sigma_min`` = s it is CTM's re-noise from s up to sigma_next."""
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
    denoised = combine(sample, model_output, c_skip, c_out)
    if clip_denoised:
        denoised = denoised.clamp(-1, 1)
    std = renoise_std(sigma_next, sigma_min)
    if noise is None or float(std) == 0.0:
        return denoised, denoised
    return denoised + std.to(sample.dtype) * noise, denoised


# -- EDM Heun ---------------------------------------------------------------------------------------------------------
def _check_sigmas(sigmas: Sequence[float] | torch.Tensor) -> torch.Tensor:
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64).flatten()
    if len(sigmas) < 2:
        raise ValueError(f"sigmas must hold at least a start level and an end level (e.g. [80.0, 0.0]), got "
                         f"{sigmas.tolist()}.")
    if (sigmas[1:] >= sigmas[:-1]).any():
        raise ValueError(f"sigmas must be strictly descending, got {sigmas.tolist()}.")
    if sigmas[-1] < 0:
        raise ValueError(f"sigmas must be >= 0, got {sigmas.tolist()}.")
    return sigmas


def ode_derivative(x: torch.Tensor, denoised: torch.Tensor, sigma) -> torch.Tensor:
    """dx/dsigma = (x - D(x, sigma)) / sigma of the probability-flow ODE (EDM eq. 3 with sigma(t) = t, s(t) = 1;
    Algorithm 2, lines 7 and 10). ``sigma`` must be > 0."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    return (x - denoised) / sigma.to(device=x.device, dtype=x.dtype)


def euler_step(x: torch.Tensor, derivative: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
    """x + (sigma_next - sigma) d  (Algorithm 2, line 8). The step size is formed in float64."""
    dt = torch.as_tensor(sigma_next, dtype=torch.float64) - torch.as_tensor(sigma, dtype=torch.float64)
    return x + dt.to(device=x.device, dtype=x.dtype) * derivative


def heun_correct(x: torch.Tensor, derivative: torch.Tensor, derivative_next: torch.Tensor, sigma,
                 sigma_next) -> torch.Tensor:
    """x + (sigma_next - sigma) (d + d') / 2  (Algorithm 2, line 11), from the step's *start* point x."""
    return euler_step(x, (derivative + derivative_next) / 2, sigma, sigma_next)


def heun_step(denoiser: Callable[..., torch.Tensor], x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor,
              **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """One EDM Heun step from ``sigma`` to ``sigma_next`` (Algorithm 2, lines 7-11), each a float64 scalar or one level
    per sample (B,); a step to 0 stays Euler (line 9). Returns (x_next, D(x, sigma)); 2 denoiser calls (1 to 0)."""
    batch = x.shape[0]
    sigma = torch.as_tensor(sigma, dtype=torch.float64).to(x.device)
    sigma_next = torch.as_tensor(sigma_next, dtype=torch.float64).to(x.device)
    a, b = per_sample(sigma, x), per_sample(sigma_next, x)
    denoised = denoiser(x, sigma.expand(batch), **kwargs)
    d = ode_derivative(x, denoised, a)
    x_next = euler_step(x, d, a, b)
    if (b > 0).all():
        d_next = ode_derivative(x_next, denoiser(x_next, sigma_next.expand(batch), **kwargs), b)
        x_next = heun_correct(x, d, d_next, a, b)
    elif (b > 0).any():
        raise ValueError("a Heun step ends at 0 for all samples or for none (line 9 of EDM's Algorithm 2).")
    return x_next, denoised


def heun_solve(
    denoiser: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigmas: Sequence[float] | torch.Tensor,
    extra_args: dict | None = None,
    callback: Callable[[dict], None] | None = None,
) -> torch.Tensor:
    """Integrate the probability-flow ODE from ``x`` at level sigmas[0] down the levels ``sigmas`` with EDM's Heun
    steps (:func:`heun_step`): the deterministic solver of :func:`sample_heun`, also a teacher solver between two grid
    levels. Gradients are not disabled here; wrap the call in ``torch.no_grad()`` for a frozen teacher.

    Args:
        denoiser: D(x, sigma, **extra_args) with sigma given as a (B,) float64 tensor (e.g. an EDMDenoiser).
        x: the state at sigmas[0].
        sigmas: strictly descending levels; a final 0 is reached by an Euler step (line 9), any other end level by a
            Heun step.
        extra_args: keyword arguments for every denoiser call (e.g. ``class_labels``).
        callback: called after each step with {"i", "sigma", "sigma_next", "x" (the new state), "denoised"}.

    Returns the state at sigmas[-1]; costs 2 denoiser calls per step, 1 for a step to 0.
    """
    sigmas = _check_sigmas(sigmas)
    extra_args = extra_args or {}
    for i in range(len(sigmas) - 1):
        x, denoised = heun_step(denoiser, x, sigmas[i], sigmas[i + 1], **extra_args)
        if callback is not None:
            callback({"i": i, "sigma": sigmas[i], "sigma_next": sigmas[i + 1], "x": x, "denoised": denoised})
    return x


@torch.no_grad()
def sample_heun(
    denoiser: Callable[..., torch.Tensor],
    noise: torch.Tensor,
    sigmas: Sequence[float] | torch.Tensor,
    extra_args: dict | None = None,
    callback: Callable[[dict], None] | None = None,
) -> torch.Tensor:
    """Deterministic EDM Heun sampling (Algorithm 2 with S_churn = 0): :func:`heun_solve` from
    x = sigmas[0] * ``noise``, without gradients; ``sigmas`` usually :func:`gensample.core.sigmas.edm_sigmas`.
    Returns the sample at sigmas[-1], with 2N - 1 denoiser calls when the schedule ends in 0."""
    sigmas = _check_sigmas(sigmas)
    x = noise * sigmas[0].to(device=noise.device, dtype=noise.dtype)
    return heun_solve(denoiser, x, sigmas, extra_args, callback)


# -- CTM gamma-sampling -----------------------------------------------------------------------------------------------
def check_gamma(gamma) -> float:
    """``gamma`` as a float in [0, 1], or a ValueError that names it (NaN, booleans and non-numbers are rejected)."""
    try:
        value = float(gamma)
    except (TypeError, ValueError):
        raise ValueError(f"`gamma` must be a number in [0, 1] (0 = deterministic CTM jumps, 1 = CM multistep), "
                         f"got {gamma!r}.") from None
    if isinstance(gamma, bool) or not 0.0 <= value <= 1.0:  # also rejects NaN
        raise ValueError(f"`gamma` must lie in [0, 1] (0 = deterministic CTM jumps, 1 = CM multistep), got {gamma!r}.")
    return value


def ctm_jump_target(sigma_next, gamma: float, sigma_min: float = SIGMA_MIN) -> torch.Tensor:
    """Intermediate time s of CTM's gamma-sampling (Kim et al., ICLR 2024, sec. 4; sony/ctm ``gamma_multistep``):
    ``s = sqrt(1 - gamma^2) (sigma_next - sigma_min) + sigma_min``, a float64 0-d tensor.

    The lerp keeps both end points exact: ``gamma = 0`` gives ``s = sigma_next`` (deterministic jump) and
    ``gamma = 1`` gives ``s = sigma_min`` (CM multistep sampling).
    """
    gamma = check_gamma(gamma)
    sigma_next = torch.as_tensor(sigma_next, dtype=torch.float64)
    if sigma_next.numel() != 1:
        raise ValueError(f"`sigma_next` must be one noise level, got a tensor of shape {tuple(sigma_next.shape)}.")
    sigma_next = sigma_next.reshape(()).cpu()
    if sigma_next < sigma_min:
        raise ValueError(f"`sigma_next` ({float(sigma_next)}) must be >= sigma_min ({sigma_min}); the last step "
                         "lands on sigma_min.")
    weight = torch.tensor(math.sqrt(1.0 - gamma * gamma), dtype=torch.float64)
    return torch.lerp(torch.tensor(sigma_min, dtype=torch.float64), sigma_next, weight)
