"""LatentNormalizer: the per-element latent statistics of sLCT as a diffusers model component, so that a latent
consistency pipeline saves and reloads them with ``save_pretrained`` / ``from_pretrained``.

sLCT (Dao et al. ICLR 2025; research code quandao10/LCT ``extract_stat.py`` and ``train_cm_latent.py``) stores
``z * scaling_factor`` (z = ``vae.encode(x).latent_dist.sample()``), and at train time uses

    x = (latent / scaling_factor - mean) / std * 0.5

with ``mean``, ``std`` **per-element** tensors of shape [C, h, w], not per-channel ones (``extract_stat.py``:
``torch.std_mean(z, dim=0)`` over the dataset); the result has std ~0.5 = sigma_data. Decoding:
``vae.decode(x * std / 0.5 + mean)``.

Conventions here (diffusers): a "scaled" latent is ``(z - shift_factor) * scaling_factor`` (``shift_factor`` None =
0, as for SD VAEs; SD3/Flux VAEs set it), ``z`` is the raw VAE latent that ``vae.decode`` takes, and the statistics
are those of ``z``. The scaling factor therefore cancels in the normalised latents, exactly as in the research code.
"""
from __future__ import annotations

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

__all__ = ["LatentNormalizer"]


class LatentNormalizer(ModelMixin, ConfigMixin):
    """Per-element normalisation ``x = (z - mean) / std * target_std`` and its inverse.

    Args:
        latent_channels, latent_height, latent_width: the latent shape [C, h, w] of ``mean`` and ``std``.
        scaling_factor, shift_factor: the VAE's (``vae.config``), to convert scaled latents (the cache format).
        target_std: the std of the normalised latents (sLCT: 0.5 = sigma_data).

    ``mean`` and ``std`` are buffers (saved in the model file); build a filled one with :meth:`from_statistics`.
    """

    @register_to_config
    def __init__(self, latent_channels: int = 4, latent_height: int = 32, latent_width: int = 32,
                 scaling_factor: float = 1.0, shift_factor: float | None = None, target_std: float = 0.5):
        super().__init__()
        if min(latent_channels, latent_height, latent_width) < 1:
            raise ValueError(f"latent shape must be positive, got {(latent_channels, latent_height, latent_width)}.")
        if not scaling_factor > 0 or not target_std > 0:
            raise ValueError(f"scaling_factor and target_std must be > 0, got {scaling_factor} and {target_std}.")
        shape = (latent_channels, latent_height, latent_width)
        self.register_buffer("mean", torch.zeros(shape))
        self.register_buffer("std", torch.ones(shape))

    @classmethod
    def from_statistics(cls, mean: torch.Tensor, std: torch.Tensor, scaling_factor: float = 1.0,
                        shift_factor: float | None = None, target_std: float = 0.5) -> "LatentNormalizer":
        """A normaliser holding ``mean`` and ``std`` (each [C, h, w], of raw VAE latents)."""
        if mean.ndim != 3 or mean.shape != std.shape:
            raise ValueError(f"mean and std must both have shape [C, h, w], got {tuple(mean.shape)} and "
                             f"{tuple(std.shape)}.")
        if not torch.isfinite(mean).all() or not torch.isfinite(std).all() or not (std > 0).all():
            raise ValueError("latent statistics must be finite with std > 0 everywhere.")
        c, h, w = mean.shape
        norm = cls(latent_channels=c, latent_height=h, latent_width=w, scaling_factor=float(scaling_factor),
                   shift_factor=None if shift_factor is None else float(shift_factor), target_std=float(target_std))
        norm.mean.copy_(mean.float())
        norm.std.copy_(std.float())
        return norm

    # -- shape checks ---------------------------------------------------------------------------------------------
    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.config.latent_channels, self.config.latent_height, self.config.latent_width)

    def _check(self, x: torch.Tensor) -> None:
        if tuple(x.shape[-3:]) != self.latent_shape:
            raise ValueError(f"latents of shape {tuple(x.shape)} do not match the normaliser's [C, h, w] = "
                             f"{self.latent_shape}.")

    # -- the maps -------------------------------------------------------------------------------------------------
    def normalize(self, latents: torch.Tensor) -> torch.Tensor:
        """Raw VAE latents z -> ``(z - mean) / std * target_std`` (the space the consistency model works in)."""
        self._check(latents)
        mean, std = self.mean.to(latents.device), self.std.to(latents.device)
        return ((latents.float() - mean) / std * self.config.target_std).to(latents.dtype)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> raw VAE latents ``x * std / target_std + mean`` (what ``vae.decode`` takes)."""
        self._check(x)
        mean, std = self.mean.to(x.device), self.std.to(x.device)
        return (x.float() * std / self.config.target_std + mean).to(x.dtype)

    def unscale(self, scaled: torch.Tensor) -> torch.Tensor:
        """Scaled latents (cache format) -> raw: ``scaled / scaling_factor + shift_factor``."""
        z = scaled / self.config.scaling_factor
        return z if self.config.shift_factor is None else z + self.config.shift_factor

    def scale(self, latents: torch.Tensor) -> torch.Tensor:
        """Raw latents -> scaled (diffusers convention): ``(z - shift_factor) * scaling_factor``."""
        z = latents if self.config.shift_factor is None else latents - self.config.shift_factor
        return z * self.config.scaling_factor

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        """Same as :meth:`normalize`."""
        return self.normalize(latents)
