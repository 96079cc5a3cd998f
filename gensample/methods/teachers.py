"""One adapter that presents any supported teacher as an EDM denoiser D(x, sigma) in VE sigma space
(x_sigma = x_0 + sigma z), which is what the teacher solvers and the distillation methods consume.

Supported (see :func:`as_denoiser`):

* gensample EDM models: an :class:`~gensample.pipelines.pipeline_edm.EDMPipeline`, an
  :class:`~gensample.core.parametrization.EDMDenoiser`, or a backbone with an ``EDMHeunScheduler``;
* a CTM :class:`~gensample.core.parametrization.TrajectoryFunction` (its denoiser g(x, t, t));
* a diffusers discrete VP model: a ``UNet2DModel`` (or any UNet called as ``unet(x, t, **kwargs)``) with the
  ``DDPMScheduler`` / ``DDIMScheduler`` (any scheduler with ``alphas_cumprod``) it was trained with, or a diffusers
  pipeline holding both (``DDPMPipeline``, ``DDIMPipeline``), for ``prediction_type`` "epsilon", "v_prediction"
  or "sample".

VP -> VE (Karras et al. 2022, Table 1, VP column and eq. 4 with s(t) = sqrt(alpha_bar)): a VP sample
x_vp = sqrt(alpha_bar) x_0 + sqrt(1 - alpha_bar) z is x_ve = x_vp / sqrt(alpha_bar) = x_0 + sigma z with
sigma = sqrt((1 - alpha_bar) / alpha_bar), i.e. alpha_bar = 1 / (1 + sigma^2). So for a VE input x at level sigma:

    x_vp = x sqrt(alpha_bar)                                  (the ve -> vp input scaling, "c_in")
    timestep = the discrete index whose sigma matches, interpolated linearly in ln(sigma) between neighbours
    epsilon:       D = x - sigma eps
    v_prediction:  D = sqrt(alpha_bar) x_vp - sqrt(1 - alpha_bar) v = alpha_bar x - sigma sqrt(alpha_bar) v
    sample:        D = network output

x_0 itself is the same in both parametrizations. On the discrete timesteps D equals the scheduler's own
``pred_original_sample`` (tests/test_edm.py checks it against ``DDIMScheduler.step`` and ``DDPMScheduler.step``).
Outside the trained range [sigma(t=0), sigma(t=T-1)] the timestep is clamped to the end of the schedule while the
scalings keep the true sigma (as k-diffusion's ``DiscreteSchedule`` does). Check :attr:`VPDenoiser.sigma_min` /
``sigma_max`` before choosing a distillation grid: a linear-beta DDPM spans about [0.01, 157], a Stable-Diffusion
schedule only about [0.029, 14.6], so EDM's [0.002, 80] leaves that range at both ends. The scheduler's
``clip_sample`` and ``thresholding`` are *not* applied: a teacher for distillation gives the raw x_0 estimate.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..core.parametrization import EDMDenoiser, TrajectoryFunction, as_float64, per_sample
from ..core.sigmas import vp_sigma_from_alpha_bar

__all__ = ["VPDenoiser", "as_denoiser"]

_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


class VPDenoiser(nn.Module):
    """D(x, sigma) of a discrete-time VP diffusion model (see the module docstring for the formulas).

    Args:
        unet: called as ``unet(x_vp, timesteps, **kwargs)`` with float timesteps of shape (B,); a diffusers output
            with ``.sample`` is unwrapped.
        alphas_cumprod: the training schedule alpha_bar_t, t = 0..T-1 (``scheduler.alphas_cumprod``).
        prediction_type: "epsilon", "v_prediction" or "sample" (``scheduler.config.prediction_type``).
        interpolate_timesteps: True (default) feeds the fractional index interpolated in ln(sigma); False rounds it
            to the nearest index (for networks with a learned, integer-only time embedding).
    """

    def __init__(self, unet: nn.Module, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon",
                 interpolate_timesteps: bool = True):
        super().__init__()
        if prediction_type not in _PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {_PREDICTION_TYPES}, got {prediction_type!r}.")
        alphas_cumprod = torch.as_tensor(alphas_cumprod).detach().to("cpu", torch.float64).flatten()
        if len(alphas_cumprod) < 2:
            raise ValueError("alphas_cumprod must hold at least two timesteps.")
        if not ((alphas_cumprod > 0) & (alphas_cumprod < 1)).all():
            raise ValueError(
                "alphas_cumprod must lie strictly in (0, 1); a zero-terminal-SNR schedule (alpha_bar_T = 0, infinite "
                "sigma) has no VE equivalent at t = T-1. Drop the last timestep or use rescale_betas_zero_snr=False."
            )
        log_sigmas = vp_sigma_from_alpha_bar(alphas_cumprod).log()
        if not (log_sigmas[1:] > log_sigmas[:-1]).all():
            raise ValueError("alphas_cumprod must be strictly decreasing (sigma increasing with t).")
        self.unet = unet
        self.prediction_type = prediction_type
        self.interpolate_timesteps = bool(interpolate_timesteps)
        self.register_buffer("alphas_cumprod", alphas_cumprod, persistent=False)
        self.register_buffer("log_sigmas", log_sigmas, persistent=False)

    @property
    def sigma_min(self) -> float:
        """sigma of timestep 0: below it the network is evaluated at t = 0."""
        return float(self.log_sigmas[0].exp())

    @property
    def sigma_max(self) -> float:
        """sigma of timestep T-1: above it the network is evaluated at t = T-1."""
        return float(self.log_sigmas[-1].exp())

    def sigma_to_timestep(self, sigma) -> torch.Tensor:
        """Fractional timestep index of each sigma: linear interpolation of the index in ln(sigma) between the two
        nearest discrete timesteps, clamped to [0, T-1]; exactly t at sigma = sigma(t). Returns float64."""
        sigma = as_float64(sigma).to(torch.float64)
        log_sigmas = self.log_sigmas.to(sigma.device)
        log_s = sigma.clamp(min=1e-300).log().clamp(log_sigmas[0], log_sigmas[-1])
        low = (torch.searchsorted(log_sigmas, log_s.contiguous(), right=True) - 1).clamp(0, len(log_sigmas) - 2)
        frac = (log_s - log_sigmas[low]) / (log_sigmas[low + 1] - log_sigmas[low])
        t = low.to(torch.float64) + frac
        return t if self.interpolate_timesteps else t.round()

    def forward(self, x: torch.Tensor, sigma, **kwargs: Any) -> torch.Tensor:
        s = per_sample(as_float64(sigma), x).to(torch.float64)
        if (s < 0).any():
            raise ValueError(f"sigma must be >= 0, got min {float(s.min())}.")
        alpha_bar = 1.0 / (1.0 + s**2)
        x_vp = x * alpha_bar.sqrt().to(x.dtype)
        timesteps = self.sigma_to_timestep(s.flatten()).to(torch.float32)
        out = self.unet(x_vp, timesteps, **kwargs)
        out = out.sample if hasattr(out, "sample") else out
        if self.prediction_type == "epsilon":
            return x - s.to(x.dtype) * out
        if self.prediction_type == "v_prediction":
            return alpha_bar.to(x.dtype) * x - (s * alpha_bar.sqrt()).to(x.dtype) * out
        return out


class _TrajectoryDenoiser(nn.Module):
    """g(x, sigma, sigma) of a CTM trajectory function: its denoiser (CTM sec. 3, DSM term)."""

    def __init__(self, trajectory_fn: nn.Module):
        super().__init__()
        self.trajectory_fn = trajectory_fn

    def forward(self, x: torch.Tensor, sigma, **kwargs: Any) -> torch.Tensor:
        return self.trajectory_fn.denoise(x, sigma, **kwargs)


def _from_backbone_and_scheduler(backbone: nn.Module, scheduler: Any, **kwargs: Any) -> nn.Module:
    from ..schedulers.scheduling_edm_heun import EDMHeunScheduler

    if isinstance(scheduler, EDMHeunScheduler):
        return EDMDenoiser(backbone, sigma_data=scheduler.config.sigma_data)
    if hasattr(scheduler, "alphas_cumprod"):
        prediction_type = getattr(scheduler.config, "prediction_type", "epsilon")
        return VPDenoiser(backbone, scheduler.alphas_cumprod, prediction_type, **kwargs)
    raise ValueError(
        f"cannot read a noise schedule from a {type(scheduler).__name__}: pass an EDMHeunScheduler for an EDM "
        "backbone or the discrete VP scheduler (DDPMScheduler, DDIMScheduler, ...) the UNet was trained with."
    )


def as_denoiser(obj: Any, scheduler: Any = None, **kwargs: Any) -> nn.Module:
    """Present ``obj`` as an EDM denoiser D(x, sigma) (an ``nn.Module``; sigma a float or one value per sample).

    Args:
        obj: an EDMDenoiser or VPDenoiser (returned as is), a CTM ``TrajectoryFunction`` (its g(x, t, t)), an
            ``EDMPipeline``, a pipeline with ``unet`` and a discrete VP ``scheduler`` (``DDPMPipeline``,
            ``DDIMPipeline``), or a bare backbone (``UNet2DModel``) together with ``scheduler``.
        scheduler: needed for a bare backbone: an ``EDMHeunScheduler`` (EDM preconditioning) or a
            ``DDPMScheduler`` / ``DDIMScheduler`` (VP adapter; ``prediction_type`` is read from its config).
        kwargs: passed to :class:`VPDenoiser` (``interpolate_timesteps``).
    """
    if isinstance(obj, (EDMDenoiser, VPDenoiser, _TrajectoryDenoiser)):
        if scheduler is not None:
            raise ValueError(f"{type(obj).__name__} is already a denoiser; do not pass a scheduler.")
        return obj
    if isinstance(obj, TrajectoryFunction):
        return _TrajectoryDenoiser(obj)
    if hasattr(obj, "unet") and hasattr(obj, "scheduler") and not isinstance(obj, nn.Module):
        if scheduler is not None:
            raise ValueError("the pipeline brings its own scheduler; do not pass `scheduler` as well.")
        return _from_backbone_and_scheduler(obj.unet, obj.scheduler, **kwargs)
    if isinstance(obj, nn.Module):
        if scheduler is None:
            raise ValueError(
                f"a bare {type(obj).__name__} has no noise schedule: pass scheduler=EDMHeunScheduler() for an EDM "
                "backbone or the DDPMScheduler/DDIMScheduler it was trained with for a VP (epsilon / v) model."
            )
        return _from_backbone_and_scheduler(obj, scheduler, **kwargs)
    raise ValueError(
        f"cannot use a {type(obj).__name__} as a teacher: pass an EDMPipeline, an EDMDenoiser, a TrajectoryFunction, "
        "a DDPM/DDIM pipeline, or a UNet together with its scheduler."
    )
