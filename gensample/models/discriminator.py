"""A small multi-scale discriminator, DiffAugment and the hinge GAN losses for CTM's GAN term (Kim et al., ICLR 2024,
sec. 3 "auxiliary GAN loss"; research code sony/ctm).

What CTM uses, and what this module offers instead:

* CTM: a StyleGAN-XL / Projected-GAN discriminator: two **frozen pretrained** backbones (DeiT-base distilled at 224,
  EfficientNet-lite0), random cross-scale projections (``F_RandomProj``) and a trainable ``MultiScaleD`` with four
  mini-discriminators, unconditional. Those weights cannot be downloaded here (offline, and far too large for 8x8
  digits), so :class:`Discriminator` is a small **trainable** convolutional network on the image itself, keeping
  the two structural traits that matter for the loss: several heads at different resolutions (the hinge losses
  average over heads, as CTM averages over its mini-discriminators), and spectrally normalised convolutions
  (as ``pg_modules`` uses for its heads).
* DiffAugment (Zhao et al. 2020, "Differentiable Augmentation for Data-Efficient GAN Training"), policy
  "color,translation,cutout" with translation ratio 0.125 and cutout ratio 0.2 as in CTM (``pg_modules/diffaug.py``),
  applied independently to real and fake images (``gan_different_augment=True``). :func:`diff_augment` is
  differentiable w.r.t. the image, so the generator receives gradients through it.
* Losses (``get_GAN_loss``): discriminator hinge ``mean(relu(1 + D(fake))) + mean(relu(1 - D(real)))`` and generator
  ``mean(-D(fake))``, each averaged over heads (:func:`hinge_d_loss`, :func:`hinge_g_loss`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm

__all__ = ["Discriminator", "diff_augment", "parse_augment_policy", "hinge_d_loss", "hinge_g_loss", "AUGMENT_POLICIES"]

AUGMENT_POLICIES = ("color", "translation", "cutout")


# ---------------------------------------------------------------------------------------------------------------------
# DiffAugment
# ---------------------------------------------------------------------------------------------------------------------
def _rand(shape: tuple[int, ...], x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(shape, generator=generator, dtype=x.dtype).to(x.device)


def _randint(low: int, high: int, shape: tuple[int, ...], x: torch.Tensor,
             generator: torch.Generator | None) -> torch.Tensor:
    return torch.randint(low, high, shape, generator=generator).to(x.device)


def augment_color(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """DiffAugment "color": brightness + U(-0.5, 0.5), saturation x U(0, 2) around the channel mean, contrast
    x U(0.5, 1.5) around the image mean (per sample). Saturation is the identity for one-channel images."""
    b = x.shape[0]
    x = x + (_rand((b, 1, 1, 1), x, generator) - 0.5)
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (_rand((b, 1, 1, 1), x, generator) * 2) + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (_rand((b, 1, 1, 1), x, generator) + 0.5) + mean


def augment_translation(x: torch.Tensor, ratio: float = 0.125,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """DiffAugment "translation": shift each image by an integer in [-r, r] pixels per axis, r = round(ratio * size),
    filling with zeros."""
    b, _, h, w = x.shape
    rh, rw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    if rh == 0 and rw == 0:
        return x
    dy = _randint(-rh, rh + 1, (b, 1, 1), x, generator)
    dx = _randint(-rw, rw + 1, (b, 1, 1), x, generator)
    rows = torch.arange(h, device=x.device).view(1, h, 1) - dy  # source row of each output pixel
    cols = torch.arange(w, device=x.device).view(1, 1, w) - dx
    valid = ((rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)).unsqueeze(1)
    batch = torch.arange(b, device=x.device).view(b, 1, 1)
    shifted = x.permute(0, 2, 3, 1)[batch, rows.clamp(0, h - 1), cols.clamp(0, w - 1)].permute(0, 3, 1, 2)
    return shifted * valid.to(x.dtype)


def augment_cutout(x: torch.Tensor, ratio: float = 0.2, generator: torch.Generator | None = None) -> torch.Tensor:
    """DiffAugment "cutout": zero one square of round(ratio * size) pixels per image at a random centre (it may be
    clipped by the border)."""
    b, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    if ch == 0 or cw == 0:
        return x
    cy = _randint(0, h + (1 - ch % 2), (b, 1, 1), x, generator)
    cx = _randint(0, w + (1 - cw % 2), (b, 1, 1), x, generator)
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    top, left = cy - ch // 2, cx - cw // 2
    inside = (rows >= top) & (rows < top + ch) & (cols >= left) & (cols < left + cw)
    return x * (~inside).unsqueeze(1).to(x.dtype)


def parse_augment_policy(policy: str) -> list[str]:
    """The names in a comma-separated DiffAugment policy ("" -> []); a ValueError names unknown entries."""
    names = [p.strip() for p in str(policy).split(",") if p.strip()]
    bad = [p for p in names if p not in AUGMENT_POLICIES]
    if bad:
        raise ValueError(f"unknown DiffAugment policy {bad}; choose from {AUGMENT_POLICIES} (comma-separated).")
    return names


def diff_augment(x: torch.Tensor, policy: str = "color,translation,cutout", translation_ratio: float = 0.125,
                 cutout_ratio: float = 0.2, generator: torch.Generator | None = None) -> torch.Tensor:
    """DiffAugment with a comma-separated ``policy`` from {"color", "translation", "cutout"} (CTM: all three,
    translation 0.125, cutout 0.2); "" returns ``x`` unchanged. Random numbers come from ``generator`` (default: the
    global torch RNG), drawn on the CPU and moved to ``x.device``."""
    for name in parse_augment_policy(policy):
        if name == "color":
            x = augment_color(x, generator)
        elif name == "translation":
            x = augment_translation(x, translation_ratio, generator)
        else:
            x = augment_cutout(x, cutout_ratio, generator)
    return x


# ---------------------------------------------------------------------------------------------------------------------
# Discriminator
# ---------------------------------------------------------------------------------------------------------------------
class Discriminator(nn.Module):
    """Multi-scale convolutional discriminator: a trunk of 3x3 convolutions (LeakyReLU 0.2) that halves the
    resolution ``num_scales - 1`` times, with a 3x3 one-channel head at every scale giving patch logits.

    Args:
        in_channels: image channels.
        base_channels: width at full resolution; doubled at every downsampling (capped at 8x).
        num_scales: number of heads / resolutions (each downsampling needs the side to stay >= 2).
        spectral_norm: spectrally normalise every convolution (Miyato et al. 2018), as Projected-GAN's heads do.

    ``forward(x)`` takes images in [-1, 1] of shape (B, in_channels, H, W) and returns a list of ``num_scales``
    logit tensors of shape (B, H_k * W_k) (one per head).
    """

    def __init__(self, in_channels: int = 1, base_channels: int = 32, num_scales: int = 2, spectral_norm: bool = True):
        super().__init__()
        if in_channels < 1 or base_channels < 1:
            raise ValueError(f"in_channels and base_channels must be >= 1, got {in_channels}, {base_channels}.")
        if num_scales < 1:
            raise ValueError(f"num_scales must be >= 1, got {num_scales}.")
        norm = _spectral_norm if spectral_norm else (lambda m: m)
        self.num_scales = num_scales
        self.config = dict(in_channels=in_channels, base_channels=base_channels, num_scales=num_scales,
                           spectral_norm=spectral_norm)
        self.stem = norm(nn.Conv2d(in_channels, base_channels, 3, padding=1))
        widths = [base_channels * min(2**k, 8) for k in range(num_scales)]
        self.blocks = nn.ModuleList(
            norm(nn.Conv2d(widths[k], widths[k + 1], 3, padding=1)) for k in range(num_scales - 1))
        self.heads = nn.ModuleList(norm(nn.Conv2d(w, 1, 3, padding=1)) for w in widths)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.dim() != 4 or x.shape[1] != self.config["in_channels"]:
            raise ValueError(f"expected images (B, {self.config['in_channels']}, H, W), got {tuple(x.shape)}.")
        if min(x.shape[-2:]) < 2 ** (self.num_scales - 1):
            raise ValueError(f"images of size {tuple(x.shape[-2:])} are too small for {self.num_scales} scales; "
                             "lower num_scales.")
        h = F.leaky_relu(self.stem(x), 0.2)
        logits = [self.heads[0](h).flatten(1)]
        for block, head in zip(self.blocks, self.heads[1:]):
            h = F.leaky_relu(block(F.avg_pool2d(h, 2)), 0.2)
            logits.append(head(h).flatten(1))
        return logits


def hinge_d_loss(logits_real: list[torch.Tensor], logits_fake: list[torch.Tensor]) -> torch.Tensor:
    """Discriminator hinge loss mean(relu(1 - D(real))) + mean(relu(1 + D(fake))), averaged over heads."""
    losses = [F.relu(1 - r).mean() + F.relu(1 + f).mean() for r, f in zip(logits_real, logits_fake)]
    return torch.stack(losses).mean()


def hinge_g_loss(logits_fake: list[torch.Tensor]) -> torch.Tensor:
    """Generator loss mean(-D(fake)), averaged over heads (CTM's non-saturating hinge generator loss)."""
    return torch.stack([-f.mean() for f in logits_fake]).mean()
