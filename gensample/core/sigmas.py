"""Noise grids, curricula and time sampling in sigma space (EDM conventions, x_sigma = x_0 + sigma z).

Direction convention: grids are **ascending** (sigma_1 = sigma_min < ... < sigma_N = sigma_max), as in the iCT paper,
unless the function's name says ``descending`` (the order samplers walk them, index 0 = sigma_max) or it is a
sampling schedule (:func:`edm_sigmas`, :func:`default_sampling_sigmas`), which samplers consume as is. Every Karras
grid is built by :func:`karras_ramp`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SIGMA_MIN = 0.002
SIGMA_MAX = 80.0
SIGMA_DATA = 0.5
RHO = 7.0

__all__ = [
    "SIGMA_MIN", "SIGMA_MAX", "SIGMA_DATA", "RHO", "karras_ramp", "karras_sigmas", "karras_sigmas_descending",
    "karras_sigma_at_descending_index", "default_sampling_sigmas", "edm_sigmas", "ict_num_sigmas",
    "lognormal_index_probabilities", "ict_loss_weighting", "vp_sigma_from_alpha_bar", "heun_step_probabilities",
    "CTMTimes", "sample_ctm_times", "sample_lognormal_sigmas", "ect_stage", "ect_pair_gap",
]


def karras_ramp(ramp, start: float, end: float, rho: float = RHO):
    """(start^(1/rho) + ramp (end^(1/rho) - start^(1/rho)))^rho for ``ramp`` in [0, 1] (Karras et al. 2022, eq. 5).

    The one place the Karras formula is written. ``ramp`` may be a float or a tensor; start < end gives an
    ascending grid, start > end the descending form of eq. 5 (each rounds exactly as written, so the two are not
    bitwise mirror images).
    """
    a, b = start ** (1 / rho), end ** (1 / rho)
    return (a + ramp * (b - a)) ** rho


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
    return karras_ramp(ramp, sigma_min, sigma_max, rho).to(dtype=dtype, device=device)


def karras_sigmas_descending(num_sigmas: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX,
                             rho: float = RHO, dtype: torch.dtype = torch.float64,
                             device: torch.device | str | None = None) -> torch.Tensor:
    """:func:`karras_sigmas` flipped (index 0 = sigma_max, N-1 = sigma_min): CTM's discrete grid (sony/ctm
    ``KarrasDenoiser.get_t``). N = 18 gives CIFAR-10's 80, 57.59, ..., 0.0075, 0.002."""
    return karras_sigmas(num_sigmas, sigma_min, sigma_max, rho, dtype=dtype).flip(0).to(device)


def karras_sigma_at_descending_index(index: float, num_sigmas: int, sigma_min: float = SIGMA_MIN,
                                     sigma_max: float = SIGMA_MAX, rho: float = RHO) -> float:
    """Sigma of index ``index`` on the *descending* grid of ``num_sigmas`` points (index 0 = sigma_max), the
    convention of openai/consistency_models' ``ts`` (e.g. ``ts=(0, 22, 39)`` with ``steps=40``)."""
    return karras_ramp(index / (num_sigmas - 1), sigma_max, sigma_min, rho)


def default_sampling_sigmas(num_inference_steps: int, num_train_timesteps: int, sigma_min: float = SIGMA_MIN,
                            sigma_max: float = SIGMA_MAX, rho: float = RHO) -> torch.Tensor:
    """The n sampling sigmas (descending) diffusers' CMStochasticIterativeScheduler picks for
    ``num_inference_steps`` = n: descending grid indices 0, r, 2r, ... with r = N // n on the N-point Karras grid."""
    step_ratio = num_train_timesteps // num_inference_steps
    return torch.tensor([karras_sigma_at_descending_index(i * step_ratio, num_train_timesteps, sigma_min, sigma_max,
                                                          rho) for i in range(num_inference_steps)],
                        dtype=torch.float64)


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
        sigmas = karras_sigmas_descending(num_steps, sigma_min, sigma_max, rho)
    return torch.cat([sigmas, sigmas.new_zeros(1)]).to(dtype=dtype, device=device)


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


def sample_lognormal_sigmas(batch_size: int, p_mean: float, p_std: float,
                            generator: torch.Generator | None = None) -> torch.Tensor:
    """sigma = exp(P_mean + P_std n), n ~ N(0, 1), one per sample, float64 on the CPU: EDM's training noise (Karras et
    al. 2022, sec. 5) and ECT's continuous t (Geng et al. 2025, sec. 3)."""
    n = torch.randn(batch_size, dtype=torch.float64, generator=generator)
    return (p_mean + p_std * n).exp()


# -- ECT's continuous-time pairs (Geng et al., ICLR 2025, "Consistency Models Made Easy") -----------------------------
def ect_stage(step: int, total_steps: int, num_stages: int = 8) -> int:
    """The curriculum stage at ``step``: ``num_stages`` equal stages over ``total_steps`` (ECT doubles the stage
    every ``double`` iterations, 8 stages over its CIFAR-10 run); the last stage holds from then on."""
    if total_steps < 1 or num_stages < 1:
        raise ValueError(f"need total_steps >= 1 and num_stages >= 1, got {total_steps}, {num_stages}.")
    return int(min(max(step, 0) * num_stages // total_steps, num_stages - 1))


def ect_pair_gap(t: torch.Tensor, stage: int, q: float = 2.0, k: float = 8.0, b: float = 1.0) -> torch.Tensor:
    """t - r of ECT's "sigmoid" mapping (locuslab/ect ``ECMLoss.t_to_r``):

        r = max(0, t (1 - q^-(stage+1) (1 + k sigmoid(-b t))))

    so the gap is t q^-(stage+1) (1 + k sigmoid(-b t)), capped at t (r = 0: the target is the clean image, the
    diffusion limit). Returned directly rather than as t - r, which cancels catastrophically once q^-(stage+1) is
    below float precision. float64 in, float64 out.
    """
    if q <= 1:
        raise ValueError(f"q must be > 1 (the gap shrinks by q per stage), got {q}.")
    t = t.to(torch.float64)
    gap = t * float(q) ** (-(stage + 1)) * (1 + k * torch.sigmoid(-b * t))
    return torch.minimum(gap, t)


def vp_sigma_from_alpha_bar(alpha_bar: torch.Tensor) -> torch.Tensor:
    """sigma = sqrt((1 - alpha_bar) / alpha_bar): the VE noise level of a discrete VP timestep."""
    return ((1 - alpha_bar) / alpha_bar).sqrt()


# -- CTM's (t, u, s) times (Kim et al., ICLR 2024) --------------------------------------------------------------------
def heun_step_probabilities(max_heun_steps: int, multiplier: float = 1.0) -> torch.Tensor:
    """p(k) proportional to k^multiplier for k = 1..K (CTM ``get_num_heun_step``, strategy 'weighted'; the default
    multiplier 1 gives p(k) = 2k / (K (K + 1))). Entry k-1 is p(k); float64."""
    if not isinstance(max_heun_steps, int) or max_heun_steps < 1:
        raise ValueError(f"max_heun_steps must be an integer >= 1, got {max_heun_steps!r}.")
    weights = torch.arange(1, max_heun_steps + 1, dtype=torch.float64) ** float(multiplier)
    return weights / weights.sum()


@dataclass
class CTMTimes:
    """One draw of CTM's times. Indices are on the descending grid :func:`karras_sigmas_descending`
    (0 = sigma_max), so t_index < u_index <= s_index and t > u >= s >= sigma_min.

    num_heun_steps: k, the teacher Heun steps from t to u (one value for the whole batch);
    t_index, u_index = t_index + k, s_index: (B,) int64; t, u, s: the matching sigmas, (B,) float64.
    """

    num_heun_steps: int
    t_index: torch.Tensor
    u_index: torch.Tensor
    s_index: torch.Tensor
    t: torch.Tensor
    u: torch.Tensor
    s: torch.Tensor


def sample_ctm_times(
    batch_size: int,
    num_sigmas: int = 18,
    max_heun_steps: int = 17,
    heun_step_multiplier: float = 1.0,
    num_heun_steps: int | None = None,
    sigma_min: float = SIGMA_MIN,
    sigma_max: float = SIGMA_MAX,
    rho: float = RHO,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> CTMTimes:
    """Draw (k, t, u, s) as the CTM loss does (sony/ctm ``ctm_losses``, ``get_num_heun_step``,
    ``UniformSampler.sample_t``, ``sample_s`` with strategy 'uniform'), on the N-point descending Karras grid:

    1. k in {1..K} with p(k) proportional to k^heun_step_multiplier, once per call (``num_heun_steps`` fixes it);
    2. per sample, n ~ Uniform{0, ..., N-1-k}: t = sigma_n, u = sigma_{n+k};
    3. per sample, m ~ Uniform{n+k, ..., N-1}: s = sigma_m (s = u is possible, s = sigma_min at m = N-1).

    CTM defaults: N = 18, K = 17 (CIFAR-10); N = 40, K = 39 (ImageNet-64). sony/ctm draws k once per global batch
    and broadcasts it to all ranks; to reproduce that under DDP pass a ``generator`` seeded identically on every rank
    (e.g. from the step) or pass ``num_heun_steps``. Random numbers come from ``generator`` on the CPU; the result
    is moved to ``device``.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}.")
    if not isinstance(num_sigmas, int) or num_sigmas < 2:
        raise ValueError(f"num_sigmas must be an integer >= 2, got {num_sigmas!r}.")
    if not isinstance(max_heun_steps, int) or not 1 <= max_heun_steps <= num_sigmas - 1:
        raise ValueError(f"max_heun_steps must be an integer in [1, num_sigmas - 1 = {num_sigmas - 1}] (a k-step "
                         f"Heun solve from t = sigma_n needs n + k <= N - 1), got {max_heun_steps!r}.")
    if num_heun_steps is None:
        probs = heun_step_probabilities(max_heun_steps, heun_step_multiplier)
        k = int(torch.multinomial(probs, 1, generator=generator)) + 1
    else:
        if not isinstance(num_heun_steps, int) or not 1 <= num_heun_steps <= max_heun_steps:
            raise ValueError(f"num_heun_steps must be an integer in [1, {max_heun_steps}], got {num_heun_steps!r}.")
        k = num_heun_steps
    n = torch.randint(0, num_sigmas - k, (batch_size,), generator=generator)
    count = num_sigmas - n - k  # number of admissible s indices, >= 1
    offset = (torch.rand(batch_size, generator=generator, dtype=torch.float64) * count).floor().long()
    m = n + k + torch.minimum(offset, count - 1)
    grid = karras_sigmas_descending(num_sigmas, sigma_min, sigma_max, rho)
    to = dict(device=device)
    return CTMTimes(num_heun_steps=k, t_index=n.to(**to), u_index=(n + k).to(**to), s_index=m.to(**to),
                    t=grid[n].to(**to), u=grid[n + k].to(**to), s=grid[m].to(**to))
