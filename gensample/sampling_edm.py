"""EDM's deterministic 2nd-order (Heun) sampler over a denoiser D(x, sigma), k-diffusion style, and the two update
rules that :class:`gensample.schedulers.scheduling_edm_heun.EDMHeunScheduler` shares with it.

Karras et al. 2022 ("Elucidating the Design Space of Diffusion-Based Generative Models"), Algorithm 2 with
S_churn = 0 (then t_hat_i = t_i and no noise is added, i.e. Algorithm 1), on the schedule of eq. 5:

    x_0 = t_0 * z
    for i = 0 .. N-1:
        d_i     = (x_i - D(x_i, t_i)) / t_i                          (line 7, the ODE derivative dx/dt)
        x_{i+1} = x_i + (t_{i+1} - t_i) d_i                          (line 8, Euler predictor)
        if t_{i+1} != 0:                                             (line 9; the last step stays Euler)
            d'_i    = (x_{i+1} - D(x_{i+1}, t_{i+1})) / t_{i+1}      (line 10)
            x_{i+1} = x_i + (t_{i+1} - t_i) (d_i + d'_i) / 2         (line 11, trapezoidal corrector)

N steps cost 2N - 1 denoiser evaluations (NFE); EDM's CIFAR-10 setting is N = 18 (NFE 35). :func:`heun_solve` is
the same loop started from a given state (the CTM teacher solver between two grid levels).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from .sigmas import RHO, SIGMA_MAX, SIGMA_MIN, karras_sigmas

__all__ = ["edm_sigmas", "ode_derivative", "euler_step", "heun_correct", "heun_solve", "sample_heun"]


def edm_sigmas(
    num_steps: int,
    sigma_min: float = SIGMA_MIN,
    sigma_max: float = SIGMA_MAX,
    rho: float = RHO,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """EDM's sampling schedule (eq. 5), **descending**, with t_N = 0 appended: N + 1 values for N = ``num_steps``.

    t_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho for i < N, t_N = 0.
    N = 1 is allowed and gives [sigma_max, 0] (a single Euler step, i.e. D(sigma_max z, sigma_max)), since eq. 5 is
    undefined there.
    """
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}.")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}.")
    if rho <= 0:
        raise ValueError(f"rho must be > 0, got {rho}.")
    if num_steps == 1:
        sigmas = torch.tensor([sigma_max], dtype=torch.float64)
    else:
        sigmas = karras_sigmas(num_steps, sigma_min, sigma_max, rho).flip(0)
    return torch.cat([sigmas, sigmas.new_zeros(1)]).to(dtype=dtype, device=device)


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


def heun_solve(
    denoiser: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigmas: Sequence[float] | torch.Tensor,
    extra_args: dict | None = None,
    callback: Callable[[dict], None] | None = None,
) -> torch.Tensor:
    """Integrate the probability-flow ODE from ``x`` at level sigmas[0] down the levels ``sigmas`` with EDM's Heun
    steps (Algorithm 2, lines 7-11, S_churn = 0): the deterministic solver of :func:`sample_heun`, also the CTM
    teacher solver (k Heun steps from sigma_n to sigma_{n+k} on the grid; no final Euler step there since
    sigma_{n+k} > 0). Gradients are not disabled here; wrap the call in ``torch.no_grad()`` for a frozen teacher.

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
    batch = x.shape[0]
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma.expand(batch), **extra_args)
        d = ode_derivative(x, denoised, sigma)
        x_next = euler_step(x, d, sigma, sigma_next)
        if sigma_next > 0:
            denoised_next = denoiser(x_next, sigma_next.expand(batch), **extra_args)
            d_next = ode_derivative(x_next, denoised_next, sigma_next)
            x_next = heun_correct(x, d, d_next, sigma, sigma_next)
        x = x_next
        if callback is not None:
            callback({"i": i, "sigma": sigma, "sigma_next": sigma_next, "x": x, "denoised": denoised})
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
    x = sigmas[0] * ``noise``, without gradients.

    Args:
        denoiser: D(x, sigma) with sigma given as a (B,) float64 tensor (e.g. :class:`EDMDenoiser`).
        noise: unit-variance starting noise.
        sigmas: strictly descending levels t_0 > ... > t_N, usually :func:`edm_sigmas` (ending in 0).
        extra_args, callback: as for :func:`heun_solve`.

    Returns the sample at sigmas[-1] (the generated image when sigmas ends in 0), with 2N - 1 denoiser calls when
    the schedule ends in 0.
    """
    sigmas = _check_sigmas(sigmas)
    x = noise * sigmas[0].to(device=noise.device, dtype=noise.dtype)
    return heun_solve(denoiser, x, sigmas, extra_args, callback)
