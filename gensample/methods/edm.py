"""EDM denoising score matching (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative
Models", sec. 5 and Table 1; NVlabs/edm ``training/loss.py::EDMLoss``): the diffusion teacher that CTM distills.

Per batch:
    sigma = exp(P_mean + P_std n),  n ~ N(0, 1)                  (log-normal training noise, P_mean=-1.2, P_std=1.2)
    lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2     (loss weight, Table 1)
    loss = mean[ lambda(sigma) (D(x_0 + sigma z, sigma) - x_0)^2 ]
with D the EDM-preconditioned denoiser (gensample.core.parametrization.EDMDenoiser). The mean runs over samples and
elements; NVlabs/edm sums over elements instead, which only rescales the loss (and the Adam step is
scale-invariant).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..core.losses import edm_denoising_loss, squared_l2
from ..core.parametrization import EDMDenoiser, per_sample
from ..core.sigmas import RHO, SIGMA_DATA, SIGMA_MAX, SIGMA_MIN
from .base import TrainingMethod

__all__ = ["EDMTraining"]


class EDMTraining(TrainingMethod):
    """Train a backbone as an EDM denoiser with the EDM loss; exports an ``EDMPipeline`` (Heun sampling).

    Args:
        backbone: the network F (a diffusers ``UNet2DModel``).
        p_mean, p_std: the log-normal training noise distribution (EDM: -1.2, 1.2).
        sigma_data: data standard deviation of the preconditioning (0.5 for data in [-1, 1]).
        sigma_min, sigma_max, rho: the Karras sampling schedule of the exported pipeline's scheduler.
    """

    method_name = "edm"

    def __init__(self, backbone: nn.Module, p_mean: float = -1.2, p_std: float = 1.2, sigma_data: float = SIGMA_DATA,
                 sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO):
        super().__init__()
        if p_std <= 0:
            raise ValueError(f"p_std must be > 0, got {p_std}.")
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}.")
        self.model = EDMDenoiser(backbone, sigma_data=sigma_data)
        self.p_mean, self.p_std = float(p_mean), float(p_std)
        self.sigma_data = float(sigma_data)
        self.sigma_min, self.sigma_max, self.rho = float(sigma_min), float(sigma_max), float(rho)

    def trainable_groups(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def ema_modules(self) -> dict[str, nn.Module]:
        return {"unet": self.model.backbone}

    def sample_sigmas(self, batch_size: int, device: torch.device | str | None = None) -> torch.Tensor:
        """sigma = exp(P_mean + P_std n), n ~ N(0, 1), one per sample (float64; global torch RNG)."""
        n = torch.randn(batch_size, dtype=torch.float64)
        return (self.p_mean + self.p_std * n).exp().to(device)

    def forward(self, x0: torch.Tensor, step: int, group: str = "model") -> dict[str, torch.Tensor]:
        sigma = self.sample_sigmas(x0.shape[0], x0.device)
        noise = torch.randn_like(x0)
        x_noisy = x0 + per_sample(sigma, x0).to(x0.dtype) * noise
        denoised = self.model(x_noisy, sigma)
        loss = edm_denoising_loss(denoised, x0, sigma, self.sigma_data).mean()
        return {"loss": loss, "mse": squared_l2(denoised.detach(), x0).mean()}

    def build_pipeline(self, eval_modules: dict[str, nn.Module]):
        from gensample.pipelines.pipeline_edm import EDMPipeline

        from ..schedulers.scheduling_edm_heun import EDMHeunScheduler

        scheduler = EDMHeunScheduler(sigma_min=self.sigma_min, sigma_max=self.sigma_max, sigma_data=self.sigma_data,
                                     rho=self.rho)
        return EDMPipeline(unet=eval_modules["unet"], scheduler=scheduler)

    def method_config(self) -> dict[str, Any]:
        return dict(p_mean=self.p_mean, p_std=self.p_std, sigma_data=self.sigma_data, sigma_min=self.sigma_min,
                    sigma_max=self.sigma_max, rho=self.rho)
