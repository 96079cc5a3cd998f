"""EDM preconditioning: the denoiser D(x, sigma) around a backbone F (Karras et al. 2022, "Elucidating the Design
Space of Diffusion-Based Generative Models", Table 1, column "Ours", and eq. 7):

    D(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma))
    c_skip(sigma) = sigma_data^2 / (sigma^2 + sigma_data^2)
    c_out(sigma)  = sigma sigma_data / sqrt(sigma^2 + sigma_data^2)
    c_in(sigma)   = 1 / sqrt(sigma^2 + sigma_data^2)                        (gensample.parametrization.input_scaling)
    c_noise(sigma) = 1000 * 0.25 * ln(sigma)                         (gensample.parametrization.noise_conditioning)

c_noise deviates from EDM's 0.25 ln(sigma) by the factor 1000, exactly as the consistency parametrization does
(see gensample/parametrization.py): the same diffusers UNet2DModel (positional embedding tuned for timesteps in the
hundreds) then serves as EDM teacher, consistency model and CTM student, and a teacher's weights can initialise a
student unchanged.

This module will be merged into parametrization.py; it only adds what the consistency parametrization lacks.
"""
from __future__ import annotations

import torch
from torch import nn

from .parametrization import _as_tensor, _per_sample, input_scaling, noise_conditioning
from .sigmas import SIGMA_DATA

__all__ = ["edm_scalings", "EDMDenoiser"]


def edm_scalings(sigma, sigma_data: float = SIGMA_DATA) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip, c_out) of EDM's preconditioning (Karras et al. 2022, Table 1):
    c_skip = sigma_data^2 / (sigma^2 + sigma_data^2), c_out = sigma sigma_data / sqrt(sigma^2 + sigma_data^2).

    Unlike the consistency scalings there is no boundary condition at sigma_min: D(x, sigma) = x only at sigma = 0
    (c_skip(0) = 1, c_out(0) = 0); at sigma = sigma_data, c_skip = 1/2 and c_out = sigma_data / sqrt(2).
    ``sigma`` may be a float or a tensor of any shape; computed in the tensor's dtype (float64 for Python floats).
    """
    if sigma_data <= 0:
        raise ValueError(f"sigma_data must be > 0, got {sigma_data}.")
    sigma = _as_tensor(sigma)
    denom = sigma**2 + sigma_data**2
    return sigma_data**2 / denom, sigma * sigma_data / denom.sqrt()


class EDMDenoiser(nn.Module):
    """D(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma))  (EDM Table 1, eq. 7).

    ``backbone`` is any callable ``F(x, timestep, **kwargs)`` returning a tensor or an output with ``.sample``
    (diffusers ``UNet2DModel``; a :class:`gensample.models.ctm_unet.CTMUNet2DModel` called without ``s_timestep``
    is the CTM student's denoiser g(x, t, t)). ``sigma`` is a float, a 0-d tensor or one value per sample; the
    scalings are computed in float64 and cast to the input dtype. The ODE derivative of the probability-flow ODE is
    (x - D(x, sigma)) / sigma (EDM eq. 3 with s(t) = 1, sigma(t) = t).
    """

    def __init__(self, backbone: nn.Module, sigma_data: float = SIGMA_DATA):
        super().__init__()
        if sigma_data <= 0:
            raise ValueError(f"sigma_data must be > 0, got {sigma_data}.")
        self.backbone = backbone
        self.sigma_data = float(sigma_data)

    def backbone_output(self, x: torch.Tensor, sigma, **kwargs) -> torch.Tensor:
        """F(c_in(sigma) x, c_noise(sigma)): the raw network output (what EDMHeunScheduler.step expects)."""
        s = _per_sample(_as_tensor(sigma), x).to(torch.float64)
        if (s < 0).any():
            raise ValueError(f"sigma must be >= 0, got min {float(s.min())}.")
        c_in = input_scaling(s, self.sigma_data).to(x.dtype)
        t = noise_conditioning(s.flatten()).to(torch.float32)
        out = self.backbone(c_in * x, t, **kwargs)
        return out.sample if hasattr(out, "sample") else out

    def forward(self, x: torch.Tensor, sigma, **kwargs) -> torch.Tensor:
        s = _per_sample(_as_tensor(sigma), x).to(torch.float64)
        c_skip, c_out = edm_scalings(s, self.sigma_data)
        model_out = self.backbone_output(x, sigma, **kwargs)
        return c_skip.to(x.dtype) * x + c_out.to(x.dtype) * model_out
