"""Noise grids and curricula in sigma space (EDM conventions, x_sigma = x_0 + sigma * z).

Direction convention: every function here returns grids in **ascending** order
(sigma_1 = sigma_min < ... < sigma_N = sigma_max), as in the iCT paper; samplers flip them.
"""
from __future__ import annotations

import math

import torch

SIGMA_MIN = 0.002
SIGMA_MAX = 80.0
SIGMA_DATA = 0.5
RHO = 7.0


def karras_sigmas(
    num_sigmas: int,
    sigma_min: float = SIGMA_MIN,
    sigma_max: float = SIGMA_MAX,
    rho: float = RHO,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Ascending Karras grid (Karras et al. 2022, eq. 5; iCT sec. 3):
    sigma_i = (sigma_min^(1/rho) + (i-1)/(N-1) (sigma_max^(1/rho) - sigma_min^(1/rho)))^rho, i = 1..N.
    """
    if num_sigmas < 2:
        raise ValueError(f"num_sigmas must be >= 2 to span [sigma_min, sigma_max], got {num_sigmas}.")
    ramp = torch.linspace(0, 1, num_sigmas, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (lo + ramp * (hi - lo)) ** rho
    return sigmas.to(dtype=dtype, device=device)


def karras_sigma_at_index(index: float, num_sigmas: int, sigma_min: float = SIGMA_MIN,
                          sigma_max: float = SIGMA_MAX, rho: float = RHO) -> float:
    """Sigma of integer index ``index`` on the *descending* grid of ``num_sigmas`` points (index 0 = sigma_max),
    the convention of openai/consistency_models' ``ts`` (e.g. ``ts=(0, 22, 39)`` with ``steps=40``)."""
    ramp = index / (num_sigmas - 1)
    return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def ict_num_sigmas(step: int, total_steps: int, s0: int = 10, s1: int = 1280) -> int:
    """iCT discretization curriculum N(k) (Song & Dhariwal 2023, eq. 7):
    N(k) = min(s0 * 2^floor(k / K'), s1) + 1, K' = floor(K / (log2 floor(s1/s0) + 1)).

    Guard for tiny K (K' would be 0, dividing by zero): K' is clamped to >= 1, so the curriculum then
    doubles every step until it reaches s1.
    """
    if s0 < 1 or s1 < s0:
        raise ValueError(f"need 1 <= s0 <= s1, got s0={s0}, s1={s1}.")
    if total_steps < 1:
        raise ValueError(f"total_steps (K) must be >= 1, got {total_steps}.")
    stage_len = max(1, math.floor(total_steps / (math.log2(math.floor(s1 / s0)) + 1)))
    return int(min(s0 * 2 ** (step // stage_len), s1) + 1)


def lognormal_index_probabilities(sigmas: torch.Tensor, p_mean: float = -1.1, p_std: float = 2.0) -> torch.Tensor:
    """Discretized lognormal over the N-1 adjacent pairs of an ascending grid (iCT eq. 10):
    p(i) proportional to erf((ln sigma_{i+1} - P_mean)/(sqrt(2) P_std)) - erf((ln sigma_i - P_mean)/(sqrt(2) P_std)).
    Returns a normalised float64 vector of length N-1; entry i is the pair (sigma_i, sigma_{i+1}), 0-based.
    """
    log_s = torch.log(sigmas.to(torch.float64))
    cdf = torch.erf((log_s - p_mean) / (math.sqrt(2.0) * p_std))
    weights = cdf[1:] - cdf[:-1]
    weights = weights.clamp_min(0)  # rounding can make far-tail differences slightly negative
    return weights / weights.sum()


def ict_loss_weighting(sigmas: torch.Tensor) -> torch.Tensor:
    """lambda(sigma_i) = 1 / (sigma_{i+1} - sigma_i) for each adjacent pair of an ascending grid (iCT sec. 3.3)."""
    return 1.0 / (sigmas[1:] - sigmas[:-1])


def vp_sigma_from_alpha_bar(alpha_bar: torch.Tensor) -> torch.Tensor:
    """sigma = sqrt((1 - alpha_bar) / alpha_bar): the VE noise level of a discrete VP timestep."""
    return ((1 - alpha_bar) / alpha_bar).sqrt()
