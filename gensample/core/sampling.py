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

The SDE teacher steps of SCott (Liu et al., AAAI 2025, arXiv 2403.01505) are written in VE form at the end of the
module: stochastic DDIM with eta (:func:`stochastic_ddim_step`), the first-order ER-SDE solver with a noise-scale
function phi (:func:`er_sde_step`, :data:`ER_SDE_NOISE_SCALES`) and the h-substep solve between two levels
(:func:`sde_solve`).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from .parametrization import combine, consistency_scalings, per_sample
from .sigmas import RHO, SIGMA_DATA, SIGMA_MIN, karras_ramp

__all__ = [
    "renoise_std", "consistency_step", "ode_derivative", "euler_step", "heun_correct",
    "heun_step", "heun_solve", "sample_heun", "check_gamma", "ctm_jump_target",
    "check_eta", "ddim_noise_std", "stochastic_ddim_step", "ER_SDE_NOISE_SCALES", "er_sde_noise_scale", "er_sde_step",
    "substep_sigmas", "sde_solve",
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


# -- SDE teacher steps (SCott) ----------------------------------------------------------------------------------------
# Every step below is one member of the family of first-order Gaussian updates in VE form,
#     x' = D + r (x - D) + sqrt(sigma'^2 - r^2 sigma^2) xi,        xi ~ N(0, I),
# i.e. the clean estimate D = D(x, sigma), plus the estimated noise (x - D) scaled by r, plus fresh noise that brings
# the total noise variance back to sigma'^2 when D is the true x_0 (then x' ~ N(x_0, sigma'^2) exactly). r = sigma'/sigma
# is the deterministic DDIM / Euler step of the probability-flow ODE; r = sigma'^2/sigma^2 is DDPM's ancestral step.
def _gaussian_step(x: torch.Tensor, denoised: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor,
                   ratio: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
    """x' = D + r (x - D) + sqrt(sigma'^2 - r^2 sigma^2) xi with (B, 1, ..) float64 levels and ratio r."""
    variance = sigma_next**2 - ratio**2 * sigma**2
    # r = sigma'/sigma leaves a rounding residue instead of exactly 0: below 1e-12 sigma'^2 it is 0
    std = torch.where(variance > 1e-12 * sigma_next**2, variance.clamp(min=0.0).sqrt(), torch.zeros_like(variance))
    x_next = denoised + ratio.to(x.dtype) * (x - denoised)
    if bool((std > 0).any()):
        if noise is None:
            raise ValueError("this step adds fresh noise (std > 0) but `noise` is None; pass a standard normal tensor "
                             "shaped like x.")
        if noise.shape != x.shape:
            raise ValueError(f"`noise` must have x's shape {tuple(x.shape)}, got {tuple(noise.shape)}.")
        x_next = x_next + std.to(x.dtype) * noise
    return x_next


def _step_levels(x: torch.Tensor, sigma, sigma_next) -> tuple[torch.Tensor, torch.Tensor]:
    """sigma, sigma_next as float64 (B, 1, ..., 1) after checking sigma > 0 and 0 <= sigma_next <= sigma."""
    a = per_sample(torch.as_tensor(sigma, dtype=torch.float64), x).to(torch.float64)
    b = per_sample(torch.as_tensor(sigma_next, dtype=torch.float64), x).to(torch.float64)
    if not bool((a > 0).all()) or not bool(((b >= 0) & (b <= a)).all()):
        raise ValueError(f"an SDE step runs from sigma > 0 down to 0 <= sigma_next <= sigma, got sigma="
                         f"{a.flatten().tolist()[:4]}, sigma_next={b.flatten().tolist()[:4]}.")
    return a, b


def check_eta(eta) -> float:
    """DDIM's ``eta`` as a float in [0, 1], or a ValueError that names it."""
    try:
        value = float(eta)
    except (TypeError, ValueError):
        raise ValueError(f"`eta` must be a number in [0, 1] (0 = deterministic DDIM, 1 = DDPM), got {eta!r}.") from None
    if isinstance(eta, bool) or not 0.0 <= value <= 1.0:  # also NaN
        raise ValueError(f"`eta` must lie in [0, 1] (0 = deterministic DDIM, 1 = DDPM's ancestral step; above 1 the "
                         f"noise variance would exceed sigma_next^2), got {eta!r}.")
    return value


def ddim_noise_std(sigma, sigma_next, eta: float) -> torch.Tensor:
    """Std of DDIM's fresh noise in VE form: eta sigma' sqrt(sigma^2 - sigma'^2) / sigma (float64).

    DDIM (Song et al. 2021, eq. 16) in VP form has sigma_eta = eta sqrt((1 - a')/(1 - a)) sqrt(1 - a/a') with a, a'
    = alpha_bar at the two levels. With x_ve = x_vp / sqrt(a) and a = 1 / (1 + sigma^2) the noise std becomes
    sigma_eta / sqrt(a') = eta sigma' sqrt(sigma^2 - sigma'^2) / sigma.
    """
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    sigma_next = torch.as_tensor(sigma_next, dtype=torch.float64)
    return check_eta(eta) * sigma_next * (sigma**2 - sigma_next**2).clamp(min=0).sqrt() / sigma


def stochastic_ddim_step(x: torch.Tensor, sigma, sigma_next, denoised: torch.Tensor, eta: float,
                         noise: torch.Tensor | None) -> torch.Tensor:
    """One stochastic DDIM step from ``sigma`` to ``sigma_next`` in VE form (DDIM eq. 12 under x_ve = x_vp / sqrt(a)):

        s  = eta sigma' sqrt(sigma^2 - sigma'^2) / sigma                   (:func:`ddim_noise_std`)
        x' = D + sqrt(sigma'^2 - s^2) (x - D) / sigma + s xi

    eta = 0 is the deterministic DDIM step, equal to the Euler step of the probability-flow ODE,
    x + (sigma' - sigma)(x - D)/sigma; eta = 1 is DDPM's ancestral step. Levels are floats or one per sample (B,);
    ``noise`` (standard normal, x's shape) may be None when eta = 0 or sigma' = 0.
    """
    a, b = _step_levels(x, sigma, sigma_next)
    std = ddim_noise_std(a, b, eta)
    return _gaussian_step(x, denoised, a, b, (b**2 - std**2).clamp(min=0).sqrt() / a, noise)


#: ER-SDE noise-scale functions phi(sigma) (Cui et al. 2023, "Elucidating the solution space of extended
#: reverse-time SDEs", arXiv 2309.06169, sec. 4 / appendix A.8, the solutions named ODE, SDE and ER-SDE 1-5 there).
#: Valid phi make phi(sigma)/sigma non-decreasing, so the noise variance sigma'^2 - sigma^2 (phi'/phi)^2 is >= 0.
ER_SDE_NOISE_SCALES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "ode": lambda s: s,                                            # the probability-flow ODE (= DDIM, eta = 0)
    "sde": lambda s: s**2,                                         # the reverse-time SDE (= DDPM ancestral)
    "er-sde-1": lambda s: s * (torch.exp(-1.0 / s) + 10.0),
    "er-sde-2": lambda s: s**1.5,
    "er-sde-3": lambda s: s**2.5,
    "er-sde-4": lambda s: s**0.9 * torch.log10(1.0 + 100.0 * s**1.5),
    "er-sde-5": lambda s: s * (torch.exp(s**0.3) + 10.0),
}


def er_sde_noise_scale(phi: str | Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """The noise-scale function named ``phi`` in :data:`ER_SDE_NOISE_SCALES`, or ``phi`` itself if callable."""
    if callable(phi):
        return phi
    if phi not in ER_SDE_NOISE_SCALES:
        raise ValueError(f"unknown ER-SDE noise scale `phi`={phi!r}; choose one of {sorted(ER_SDE_NOISE_SCALES)} or "
                         "pass a callable phi(sigma).")
    return ER_SDE_NOISE_SCALES[phi]


def er_sde_step(x: torch.Tensor, sigma, sigma_next, denoised: torch.Tensor, noise: torch.Tensor | None,
                phi: str | Callable[[torch.Tensor], torch.Tensor] = "er-sde-5") -> torch.Tensor:
    """One first-order ER-SDE step (ER-SDE-Solver-1, Cui et al. 2023, VE form) from ``sigma`` to ``sigma_next``:

        r  = phi(sigma') / phi(sigma)
        x' = r x + (1 - r) D + sqrt(sigma'^2 - sigma^2 r^2) xi

    phi(sigma) = sigma gives the deterministic DDIM step (r = sigma'/sigma) and phi(sigma) = sigma^2 DDPM's ancestral
    step. ``phi``: a name in :data:`ER_SDE_NOISE_SCALES` (default "er-sde-5", phi = sigma (e^{sigma^0.3} + 10)) or a
    callable on float64 tensors. ``noise`` may be None when the fresh-noise variance is 0 (phi = "ode").
    """
    a, b = _step_levels(x, sigma, sigma_next)
    fn = er_sde_noise_scale(phi)
    ratio = torch.where(b > 0, fn(b.clamp(min=1e-300)) / fn(a), torch.zeros_like(b))  # phi(0) = 0 for every phi
    if not bool(((ratio >= 0) & (ratio * a <= b * (1 + 1e-12))).all()):
        raise ValueError("the noise scale phi must give 0 <= phi(sigma')/phi(sigma) <= sigma'/sigma (phi(sigma)/sigma "
                         "non-decreasing), or the fresh-noise variance sigma'^2 - sigma^2 r^2 is negative.")
    return _gaussian_step(x, denoised, a, b, ratio, noise)


def substep_sigmas(sigma_from, sigma_to, substeps: int, rho: float = RHO) -> torch.Tensor:
    """The ``substeps`` + 1 descending levels from ``sigma_from`` to ``sigma_to``, equally spaced in sigma^(1/rho)
    (the spacing of the Karras grid, :func:`gensample.core.sigmas.karras_ramp`), float64 of shape (substeps + 1,)
    + the levels' shape. Both ends are exact."""
    if not isinstance(substeps, int) or isinstance(substeps, bool) or substeps < 1:
        raise ValueError(f"`substeps` must be an integer >= 1 (the teacher's sub-steps between two grid levels), got "
                         f"{substeps!r}.")
    start = torch.as_tensor(sigma_from, dtype=torch.float64)
    end = torch.as_tensor(sigma_to, dtype=torch.float64)
    ramp = torch.arange(substeps + 1, dtype=torch.float64).reshape((-1,) + (1,) * max(start.ndim, end.ndim))
    levels = karras_ramp(ramp / substeps, start, end, rho)
    levels[0], levels[-1] = start, end
    return levels


def sde_solve(
    denoiser: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigma_from,
    sigma_to,
    substeps: int,
    step_fn: Callable[..., torch.Tensor],
    generator: torch.Generator | None = None,
    noise: Sequence[torch.Tensor] | None = None,
    deterministic: bool = False,
    rho: float = RHO,
    **kwargs,
) -> torch.Tensor:
    """SCott's teacher solve (Liu et al. 2025, sec. "sampling-process control"): the interval from ``sigma_from``
    down to ``sigma_to`` (floats or one level per sample, (B,)) split into ``substeps`` sub-steps
    (:func:`substep_sigmas`), each taken with ``step_fn``.

    Args:
        denoiser: D(x, sigma, **kwargs) with sigma a (B,) float64 tensor (e.g. a classifier-free-guided teacher).
        step_fn: ``step_fn(x, sigma, sigma_next, denoised, noise=...) -> x_next`` with (B,) levels, e.g.
            ``functools.partial(stochastic_ddim_step, eta=0.3)`` or ``functools.partial(er_sde_step, phi="er-sde-5")``.
        generator: for the fresh noise of each sub-step (drawn on the generator's device, then moved to x's).
        noise: ``substeps`` standard normal tensors shaped like x, used instead of drawing (tests).
        deterministic: draw no noise (the step must not need any: eta = 0, phi = "ode"); then the solve consumes no
            random numbers, so it equals the ODE teacher bit for bit.
        kwargs: passed to every denoiser call (``class_labels``, ``guidance_scale``, ...).

    Gradients are not disabled here; wrap the call in ``torch.no_grad()`` for a frozen teacher. Costs ``substeps``
    denoiser calls.
    """
    levels = substep_sigmas(sigma_from, sigma_to, substeps, rho).to(x.device)
    if noise is not None and len(noise) != substeps:
        raise ValueError(f"`noise` must hold one tensor per sub-step ({substeps}), got {len(noise)}.")
    batch = x.shape[0]
    for j in range(substeps):
        sigma, sigma_next = levels[j].expand(batch), levels[j + 1].expand(batch)
        denoised = denoiser(x, sigma, **kwargs)
        if deterministic:
            xi = None
        elif noise is not None:
            xi = noise[j]
        else:
            device = generator.device if generator is not None else x.device
            xi = torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)
        x = step_fn(x, sigma, sigma_next, denoised, noise=xi)
    return x
