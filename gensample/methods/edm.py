"""EDM denoising score matching (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative
Models", sec. 5 and Table 1; NVlabs/edm ``training/loss.py::EDMLoss``): the diffusion teacher that CTM distills.

Per batch:
    sigma = exp(P_mean + P_std n),  n ~ N(0, 1)                  (log-normal training noise, P_mean=-1.2, P_std=1.2)
    lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2     (loss weight, Table 1)
    loss = mean[ lambda(sigma) (D(x_0 + sigma z, sigma) - x_0)^2 ]
with D the EDM-preconditioned denoiser (gensample.core.parametrization.EDMDenoiser). The mean runs over samples and
elements; NVlabs/edm sums over elements instead, which only rescales the loss (and the Adam step is
scale-invariant).

Class-conditional training for classifier-free guidance (Ho & Salimans 2022, "Classifier-Free Diffusion Guidance",
Algorithm 1): with ``num_classes = K`` the backbone has K + 1 class embeddings, label K being the "null"
(unconditional) label; each training label is replaced by K with probability ``label_dropout`` (CFG paper:
p_uncond 0.1-0.2), so one network learns D(x, sigma, c) and D(x, sigma, null). Sampling then uses
D_w = D(x, sigma, null) + w (D(x, sigma, c) - D(x, sigma, null)) (``EDMPipeline(guidance_scale=w)``).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..core.losses import edm_denoising_loss, squared_l2
from ..core.parametrization import EDMDenoiser, per_sample
from ..core.sigmas import RHO, SIGMA_DATA, SIGMA_MAX, SIGMA_MIN, sample_lognormal_sigmas
from .base import TrainingMethod

__all__ = ["EDMTraining"]


class EDMTraining(TrainingMethod):
    """Train a backbone as an EDM denoiser with the EDM loss; exports an ``EDMPipeline`` (Heun sampling).

    Args:
        backbone: the network F (a diffusers ``UNet2DModel``).
        p_mean, p_std: the log-normal training noise distribution (EDM: -1.2, 1.2).
        sigma_data: data standard deviation of the preconditioning (0.5 for data in [-1, 1]).
        sigma_min, sigma_max, rho: the Karras sampling schedule of the exported pipeline's scheduler.
        num_classes: K for a class-conditional denoiser (the backbone needs ``num_class_embeds = K + 1``; label K is
            the null label of classifier-free guidance); None: unconditional (batches are image tensors).
        label_dropout: probability of replacing a training label by the null label (CFG); 0 trains no
            unconditional model, so guidance scales other than 1 are then refused by the pipeline's users.
    """

    method_name = "edm"

    def __init__(self, backbone: nn.Module, p_mean: float = -1.2, p_std: float = 1.2, sigma_data: float = SIGMA_DATA,
                 sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO,
                 num_classes: int | None = None, label_dropout: float = 0.0):
        super().__init__()
        embeds = getattr(getattr(backbone, "config", None), "num_class_embeds", None)
        if num_classes is not None:
            if int(num_classes) < 1:
                raise ValueError(f"num_classes must be >= 1, got {num_classes}.")
            if embeds != int(num_classes) + 1:
                raise ValueError(f"a class-conditional EDM backbone for num_classes={num_classes} needs "
                                 f"num_class_embeds={int(num_classes) + 1} (the last label is the null label of "
                                 f"classifier-free guidance), got {embeds}; build it with "
                                 f"build_unet(..., num_class_embeds={int(num_classes) + 1}).")
        elif label_dropout:
            raise ValueError("label_dropout needs a class-conditional model: pass num_classes.")
        if not 0.0 <= label_dropout < 1.0:
            raise ValueError(f"label_dropout must be in [0, 1), got {label_dropout}.")
        self.num_classes = None if num_classes is None else int(num_classes)
        self.label_dropout = float(label_dropout)
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
        return sample_lognormal_sigmas(batch_size, self.p_mean, self.p_std).to(device)

    def training_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """``labels`` with each replaced by the null label K with probability ``label_dropout`` (global torch RNG)."""
        if self.label_dropout == 0.0:
            return labels
        drop = torch.rand(labels.shape[0], device=labels.device) < self.label_dropout
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def forward(self, batch, step: int, group: str = "model") -> dict[str, torch.Tensor]:
        if self.num_classes is None:
            if isinstance(batch, tuple):
                raise ValueError("an unconditional EDM model got labelled batches; pass num_classes for a "
                                 "class-conditional model, or train without labels.")
            x0, kwargs = batch, {}
        else:
            if not isinstance(batch, tuple):
                raise ValueError("a class-conditional EDM model needs labelled batches (Trainer(..., labels=...)).")
            x0, labels = batch
            if labels.min() < 0 or labels.max() >= self.num_classes:
                raise ValueError(f"training labels must be in [0, {self.num_classes - 1}], got "
                                 f"[{int(labels.min())}, {int(labels.max())}].")
            kwargs = {"class_labels": self.training_labels(labels)}
        sigma = self.sample_sigmas(x0.shape[0], x0.device)
        noise = torch.randn_like(x0)
        x_noisy = x0 + per_sample(sigma, x0).to(x0.dtype) * noise
        denoised = self.model(x_noisy, sigma, **kwargs)
        loss = edm_denoising_loss(denoised, x0, sigma, self.sigma_data).mean()
        return {"loss": loss, "mse": squared_l2(denoised.detach(), x0).mean()}

    def build_pipeline(self, eval_modules: dict[str, nn.Module]):
        from gensample.pipelines.pipeline_edm import EDMPipeline

        from ..schedulers.scheduling_edm_heun import EDMHeunScheduler

        scheduler = EDMHeunScheduler(sigma_min=self.sigma_min, sigma_max=self.sigma_max, sigma_data=self.sigma_data,
                                     rho=self.rho)
        return EDMPipeline(unet=eval_modules["unet"], scheduler=scheduler, num_classes=self.num_classes)

    def method_config(self) -> dict[str, Any]:
        config = dict(p_mean=self.p_mean, p_std=self.p_std, sigma_data=self.sigma_data, sigma_min=self.sigma_min,
                      sigma_max=self.sigma_max, rho=self.rho)
        if self.num_classes is not None:  # unconditional runs keep their old record (resume compatibility)
            config.update(num_classes=self.num_classes, label_dropout=self.label_dropout)
        return config
