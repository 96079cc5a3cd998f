"""Consistency parametrization with the boundary condition f(x, sigma_min) = x.

The scalings are plain functions so that training (:class:`ConsistencyFunction`), the diffusers scheduler and the
kernels all evaluate the very same formulas (CM paper, Song et al. 2023, appendix C; iCT sec. 3):

    c_skip(s) = sigma_data^2 / ((s - sigma_min)^2 + sigma_data^2)
    c_out(s)  = (s - sigma_min) sigma_data / sqrt(s^2 + sigma_data^2)
    c_in(s)   = 1 / sqrt(s^2 + sigma_data^2)
    c_noise(s) = 1000 * 0.25 * ln(s + 1e-44)

Choice of c_noise: the openai/consistency_models (ADM) form, 1000 * 0.25 ln(sigma), rather than EDM's 0.25 ln(sigma),
because diffusers' UNet2DModel uses a positional time embedding tuned for timesteps in the hundreds, and because it is
exactly what diffusers' ``CMStochasticIterativeScheduler.sigma_to_t`` feeds the UNet, so our UNets also run under
diffusers' ``ConsistencyModelPipeline`` unchanged.
"""
from __future__ import annotations

import torch
from torch import nn

from .sigmas import SIGMA_DATA, SIGMA_MIN


def _as_tensor(sigma, like: torch.Tensor | None = None) -> torch.Tensor:
    if not torch.is_tensor(sigma):
        sigma = torch.tensor(sigma, dtype=torch.float64)
    return sigma


def consistency_scalings(sigma, sigma_data: float = SIGMA_DATA, sigma_min: float = SIGMA_MIN):
    """(c_skip, c_out) of the boundary-condition parametrization; c_skip(sigma_min) = 1, c_out(sigma_min) = 0."""
    sigma = _as_tensor(sigma)
    c_skip = sigma_data**2 / ((sigma - sigma_min) ** 2 + sigma_data**2)
    c_out = (sigma - sigma_min) * sigma_data / (sigma**2 + sigma_data**2).sqrt()
    return c_skip, c_out


def input_scaling(sigma, sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    """c_in(sigma) = 1 / sqrt(sigma^2 + sigma_data^2)."""
    sigma = _as_tensor(sigma)
    return 1.0 / (sigma**2 + sigma_data**2).sqrt()


def noise_conditioning(sigma) -> torch.Tensor:
    """c_noise(sigma) = 1000 * 0.25 * ln(sigma + 1e-44): the timestep value handed to the backbone."""
    sigma = _as_tensor(sigma)
    return 1000 * 0.25 * torch.log(sigma + 1e-44)


def _per_sample(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Broadcast a scalar or (B,) sigma against x of shape (B, ...)."""
    sigma = sigma.to(device=x.device)
    if sigma.ndim == 0:
        sigma = sigma.expand(x.shape[0])
    return sigma.reshape(-1, *([1] * (x.ndim - 1)))


class ConsistencyFunction(nn.Module):
    """f_theta(x, sigma) = c_skip(sigma) x + c_out(sigma) F_theta(c_in(sigma) x, c_noise(sigma)).

    ``backbone`` is any callable ``F(x, timestep) -> tensor`` or a diffusers model returning an output with ``.sample``
    (UNet2DModel). Scalings are computed in float64 and cast to the input dtype, so f(x, sigma_min) = x exactly
    when sigma is a Python float or a float64 tensor (a float32 0.002 is not exactly sigma_min).
    """

    def __init__(self, backbone: nn.Module, sigma_data: float = SIGMA_DATA, sigma_min: float = SIGMA_MIN):
        super().__init__()
        self.backbone = backbone
        self.sigma_data = sigma_data
        self.sigma_min = sigma_min

    def backbone_output(self, x: torch.Tensor, sigma: torch.Tensor, **kwargs) -> torch.Tensor:
        """F_theta(c_in x, c_noise): the raw network output the scheduler's ``step`` expects."""
        sigma = _as_tensor(sigma)
        s = _per_sample(sigma, x).to(torch.float64)
        c_in = input_scaling(s, self.sigma_data).to(x.dtype)
        t = noise_conditioning(s.flatten()).to(torch.float32)
        out = self.backbone(c_in * x, t, **kwargs)
        return out.sample if hasattr(out, "sample") else out

    def forward(self, x: torch.Tensor, sigma, **kwargs) -> torch.Tensor:
        sigma = _as_tensor(sigma)
        s = _per_sample(sigma, x).to(torch.float64)
        c_skip, c_out = consistency_scalings(s, self.sigma_data, self.sigma_min)
        model_out = self.backbone_output(x, sigma, **kwargs)
        return c_skip.to(x.dtype) * x + c_out.to(x.dtype) * model_out
