"""Control adapters for a frozen one-step generator (NCT, Luo et al. 2025, sec. 3.1: "a ControlNet for structural
controls"), and the base UNet's forward pass with the adapters' residuals added.

Two adapters, one contract ``adapter(sample, timestep, control, ...) -> (down_residuals, mid_residual)``:

* :class:`ZeroConvAdapter`, ours, for a diffusers ``UNet2DModel`` base (which has no residual inputs of its own): a
  trainable copy of the base's encoder half (``conv_in``, time embedding, ``down_blocks``, ``mid_block``, initialised
  from the base as ControlNet does). The control enters through a small conv stack whose last conv is
  zero-initialised, added after ``conv_in`` (ControlNet's "hint" path): an image control as it is (resized to the
  sample size), a class label as constant one-hot planes, the label also through an embedding added to the copy's time
  embedding (as a class-conditional UNet2DModel takes labels). Every skip tensor and the mid-block output leave
  through a 1x1 conv whose weight and bias are zero. At initialisation every residual is exactly zero, so the adapted UNet computes
  ``r + 0 = r`` at every skip: its output equals the base's bit for bit.
* diffusers' ``ControlNetModel`` for a ``UNet2DConditionModel`` base (:func:`controlnet_from_unet`), whose zero
  convolutions play the same role; the UNet takes its residuals as ``down_block_additional_residuals`` /
  ``mid_block_additional_residual``.

:class:`ControlledUNet` holds the base and any number of adapters and sums their residuals (several adapters trained
separately can be applied at once, NCT sec. 4, "combined at test time"; diffusers' MultiControlNet sums the same way).
:func:`unet2d_forward` is diffusers' ``UNet2DModel.forward`` (0.42) step for step, with the residuals added to the skip
tensors after the down pass and to the mid-block output, where diffusers' ControlNet pipelines add them.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin, UNet2DConditionModel, UNet2DModel
from diffusers.configuration_utils import register_to_config
from torch import nn

__all__ = ["CONTROL_TYPES", "ControlledUNet", "MultiAdapter", "ZeroConvAdapter", "adapter_residuals",
           "controlnet_from_unet", "unet2d_forward"]

#: the kinds of control an adapter takes: a class label (int) or an image-like tensor (C, h, w)
CONTROL_TYPES = ("class", "image")


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def _timesteps(timestep: torch.Tensor | float, sample: torch.Tensor) -> torch.Tensor:
    """The timestep broadcast to the batch, as ``UNet2DModel.forward`` does it."""
    t = timestep
    if not torch.is_tensor(t):
        t = torch.tensor([t], dtype=torch.long, device=sample.device)
    elif t.ndim == 0:
        t = t[None].to(sample.device)
    return t * torch.ones(sample.shape[0], dtype=t.dtype, device=t.device)


def _time_embedding(unet: UNet2DModel, timesteps: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor:
    emb = unet.time_embedding(unet.time_proj(timesteps).to(dtype=unet.dtype))
    if unet.class_embedding is not None:
        if class_labels is None:
            raise ValueError("class_labels should be provided when doing class conditioning")
        if unet.config.class_embed_type == "timestep":
            class_labels = unet.time_proj(class_labels)
        emb = emb + unet.class_embedding(class_labels).to(dtype=unet.dtype)
    elif class_labels is not None:
        raise ValueError("class_embedding needs to be initialized in order to use class conditioning")
    return emb


def unet2d_forward(unet: UNet2DModel, sample: torch.Tensor, timestep: torch.Tensor | float,
                   class_labels: torch.Tensor | None = None, down_residuals: Sequence[torch.Tensor] | None = None,
                   mid_residual: torch.Tensor | None = None) -> torch.Tensor:
    """``UNet2DModel.forward(sample, timestep, class_labels).sample`` with ``down_residuals`` added to the skip
    tensors (one per skip: ``conv_in``'s output, then each down block's) and ``mid_residual`` to the mid-block output.
    Without residuals it computes what ``unet(...)`` computes, operation for operation."""
    if unet.config.center_input_sample:
        sample = 2 * sample - 1.0
    timesteps = _timesteps(timestep, sample)
    emb = _time_embedding(unet, timesteps, class_labels)

    skip_sample = sample
    sample = unet.conv_in(sample)
    skips: tuple[torch.Tensor, ...] = (sample,)
    for block in unet.down_blocks:
        if hasattr(block, "skip_conv"):
            sample, res, skip_sample = block(hidden_states=sample, temb=emb, skip_sample=skip_sample)
        else:
            sample, res = block(hidden_states=sample, temb=emb)
        skips += res
    if down_residuals is not None:
        if len(down_residuals) != len(skips):
            raise ValueError(f"expected {len(skips)} down residuals (one per skip tensor), got {len(down_residuals)}.")
        skips = tuple(s + r for s, r in zip(skips, down_residuals))

    if unet.mid_block is not None:
        sample = unet.mid_block(sample, emb)
    if mid_residual is not None:
        sample = sample + mid_residual

    skip_sample = None
    for block in unet.up_blocks:
        res, skips = skips[-len(block.resnets):], skips[:-len(block.resnets)]
        if hasattr(block, "skip_conv"):
            sample, skip_sample = block(sample, res, emb, skip_sample)
        else:
            sample = block(sample, res, emb)
    sample = unet.conv_out(unet.conv_act(unet.conv_norm_out(sample)))
    if skip_sample is not None:
        sample += skip_sample
    if unet.config.time_embedding_type == "fourier":
        sample = sample / timesteps.reshape((sample.shape[0], *([1] * len(sample.shape[1:]))))
    return sample


class ZeroConvAdapter(ModelMixin, ConfigMixin):
    r"""ControlNet-style adapter for a ``UNet2DModel`` (see the module docstring); build it with :meth:`from_unet`.

    Parameters:
        unet_config (`dict`): the base UNet's config; the adapter's encoder is a ``UNet2DModel`` of this config
            (with ``dropout`` = ``encoder_dropout``) without its decoder.
        control_type (`str`): "class" (an int label per sample) or "image" (a tensor (C, h, w) per sample).
        num_classes (`int`, *optional*): labels 0..num_classes-1 (control_type "class").
        control_channels (`int`), control_size (`int`): C and h = w of an image control; it is resized to the UNet's
            sample size (nearest when upsampling, area when shrinking) before the conv stack.
        control_range (`list[float]`): the value range of an image control (e.g. [-1, 1] for a low-resolution image,
            [0, 1] for an edge map), used to convert PIL / uint8 inputs.
        conditioning_channels (`int`): width of the image-control conv stack.
        encoder_dropout (`float`): dropout of the trainable copy (0: the consistency target and student see the same
            network; NCT's target is the current adapter under stop-grad).
    """

    @register_to_config
    def __init__(self, unet_config: dict, control_type: str = "image", num_classes: int | None = None,
                 control_channels: int = 1, control_size: int | None = None, control_range: Sequence[float] = (-1, 1),
                 conditioning_channels: int = 16, encoder_dropout: float = 0.0):
        super().__init__()
        if control_type not in CONTROL_TYPES:
            raise ValueError(f"control_type must be one of {CONTROL_TYPES}, got {control_type!r}.")
        if control_type == "class" and (not isinstance(num_classes, int) or num_classes < 2):
            raise ValueError(f"a class control needs num_classes >= 2, got {num_classes!r}.")
        config = {k: v for k, v in dict(unet_config).items() if not k.startswith("_")}
        encoder = UNet2DModel.from_config({**config, "dropout": encoder_dropout})
        encoder.up_blocks = nn.ModuleList()  # the decoder is the frozen base's
        encoder.conv_norm_out = encoder.conv_act = encoder.conv_out = None
        self.encoder = encoder
        size = encoder.config.sample_size
        self.sample_size = (size, size) if isinstance(size, int) else tuple(size)
        first = encoder.config.block_out_channels[0]
        # the hint path (ControlNet's conditioning embedding): an image control, or a label as constant one-hot planes
        hint_channels = control_channels if control_type == "image" else num_classes
        self.control_embedding = nn.Sequential(
            nn.Conv2d(hint_channels, conditioning_channels, 3, padding=1), nn.SiLU(),
            nn.Conv2d(conditioning_channels, conditioning_channels, 3, padding=1), nn.SiLU(),
            _zero(nn.Conv2d(conditioning_channels, first, 3, padding=1)))
        # a label also enters the time embedding, as a class-conditional UNet2DModel takes it
        self.class_embedding = None if control_type == "image" else \
            nn.Embedding(num_classes, encoder.time_embedding.linear_2.out_features)
        with torch.no_grad():  # the skip tensors' channels, read off a dry run of the encoder (on its device: meta
            # while diffusers' from_pretrained builds the model without memory)
            device = encoder.conv_in.weight.device
            probe = torch.zeros(1, encoder.config.in_channels, *self.sample_size, device=device)
            labels = torch.zeros(1, dtype=torch.long, device=device) if encoder.class_embedding is not None else None
            skips, mid = self._encode(probe, torch.tensor([1.0], device=device), None, labels)
        self.down_zero_convs = nn.ModuleList(_zero(nn.Conv2d(s.shape[1], s.shape[1], 1)) for s in skips)
        self.mid_zero_conv = _zero(nn.Conv2d(mid.shape[1], mid.shape[1], 1))

    @classmethod
    def from_unet(cls, unet: UNet2DModel, control_type: str = "image", **kwargs: Any) -> ZeroConvAdapter:
        """An adapter for ``unet`` whose encoder starts as a copy of ``unet``'s (ControlNet's initialisation)."""
        if not isinstance(unet, UNet2DModel):
            raise ValueError(f"ZeroConvAdapter.from_unet takes a diffusers UNet2DModel, got {type(unet).__name__}; "
                             "for a UNet2DConditionModel use controlnet_from_unet (diffusers' ControlNetModel).")
        adapter = cls(dict(unet.config), control_type=control_type, **kwargs)
        own = adapter.encoder.state_dict()
        missing = adapter.encoder.load_state_dict({k: v for k, v in unet.state_dict().items() if k in own},
                                                  strict=False).missing_keys
        if missing:
            raise ValueError(f"the UNet's encoder does not match the adapter's (missing {missing[:4]}).")
        if adapter.device != unet.device or adapter.dtype != unet.dtype:
            adapter = adapter.to(device=unet.device, dtype=unet.dtype)
        return adapter

    # -- control inputs -------------------------------------------------------------------------------------------
    def control_shape(self) -> tuple[int, ...]:
        """The shape of one sample's control: () for a class label, (C, h, w) for an image."""
        if self.config.control_type == "class":
            return ()
        size = self.config.control_size or self.sample_size[0]
        return (self.config.control_channels, size, size)

    def check_control(self, control: Any, batch_size: int) -> None:
        """A ValueError naming ``control`` and what to pass, unless it fits this adapter and the batch."""
        cfg = self.config
        if cfg.control_type == "class":
            if not torch.is_tensor(control) or control.is_floating_point() or control.is_complex() \
                    or control.dtype == torch.bool or control.ndim != 1 or len(control) not in (1, batch_size):
                got = f"{control.dtype} {tuple(control.shape)}" if torch.is_tensor(control) else type(control).__name__
                raise ValueError(f"`control` of a class adapter must be integer labels of shape ({batch_size},) or "
                                 f"(1,) (or an int), got {got}; e.g. control=3.")
            if len(control) and (int(control.min()) < 0 or int(control.max()) >= cfg.num_classes):
                raise ValueError(f"`control` labels must lie in 0..{cfg.num_classes - 1}, got "
                                 f"{control.tolist()[:8]}.")
            return
        shape = self.control_shape()
        if not torch.is_tensor(control) or not control.is_floating_point() or control.ndim != 4 \
                or tuple(control.shape[1:]) != shape or len(control) not in (1, batch_size):
            got = f"{control.dtype} {tuple(control.shape)}" if torch.is_tensor(control) else type(control).__name__
            raise ValueError(f"`control` of this image adapter must be a float tensor of shape ({batch_size}, "
                             f"{', '.join(map(str, shape))}) or (1, {', '.join(map(str, shape))}) with values in "
                             f"{list(cfg.control_range)} (or a PIL image / array of size {shape[-1]}), got {got}.")
        if not torch.isfinite(control).all():
            raise ValueError("`control` holds NaN or inf values; pass a finite control image.")

    def _encode(self, sample: torch.Tensor, timestep, control: torch.Tensor | None,
                class_labels: torch.Tensor | None) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        enc = self.encoder
        if enc.config.center_input_sample:
            sample = 2 * sample - 1.0
        timesteps = _timesteps(timestep, sample)
        emb = _time_embedding(enc, timesteps, class_labels)
        if self.class_embedding is not None and control is not None:
            emb = emb + self.class_embedding(control.expand(sample.shape[0])).to(emb.dtype)
        h = enc.conv_in(sample)
        if control is not None:
            if self.class_embedding is not None:  # labels -> one-hot planes
                c = F.one_hot(control.expand(sample.shape[0]), self.config.num_classes).to(h.dtype)
                c = c[:, :, None, None].expand(-1, -1, *self.sample_size)
            else:
                c = control.to(h.dtype).expand(sample.shape[0], *control.shape[1:])
            if tuple(c.shape[-2:]) != self.sample_size:
                shrink = c.shape[-1] > self.sample_size[-1]
                c = F.interpolate(c, size=self.sample_size, mode="area" if shrink else "nearest")
            h = h + self.control_embedding(c)
        skips: tuple[torch.Tensor, ...] = (h,)
        for block in enc.down_blocks:
            h, res = block(hidden_states=h, temb=emb)
            skips += res
        if enc.mid_block is not None:
            h = enc.mid_block(h, emb)
        return skips, h

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float, control: torch.Tensor,
                class_labels: torch.Tensor | None = None, conditioning_scale: float = 1.0
                ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """(down residuals, mid residual) for the base's skip tensors, each times ``conditioning_scale``.
        ``sample`` and ``timestep`` are what the base UNet receives; ``class_labels`` are the base's own (a
        class-conditional base), not the control."""
        skips, mid = self._encode(sample, timestep, control, class_labels)
        down = tuple(conv(s) * conditioning_scale for conv, s in zip(self.down_zero_convs, skips))
        return down, self.mid_zero_conv(mid) * conditioning_scale


def controlnet_from_unet(unet: UNet2DConditionModel, control_channels: int = 3):
    """diffusers' ``ControlNetModel`` for ``unet`` (encoder copied from it, zero convolutions at zero), taking the
    control at the UNet's own (latent) resolution: one conditioning conv stage, no downsampling (diffusers' default
    stack expects images 8x the latent size)."""
    from diffusers import ControlNetModel

    if not isinstance(unet, UNet2DConditionModel):
        raise ValueError(f"controlnet_from_unet takes a diffusers UNet2DConditionModel, got {type(unet).__name__}; "
                         "for a UNet2DModel use ZeroConvAdapter.from_unet.")
    return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16,),
                                     conditioning_channels=control_channels).to(device=unet.device, dtype=unet.dtype)


def adapter_residuals(adapter: nn.Module, sample: torch.Tensor, timestep, control: torch.Tensor,
                      conditioning_scale: float = 1.0, class_labels: torch.Tensor | None = None,
                      encoder_hidden_states: torch.Tensor | None = None
                      ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """(down residuals, mid residual) of one adapter: a :class:`ZeroConvAdapter` or a diffusers ``ControlNetModel``
    (which also needs ``encoder_hidden_states``)."""
    if isinstance(adapter, ZeroConvAdapter):
        return adapter(sample, timestep, control, class_labels, conditioning_scale)
    down, mid = adapter(sample, timestep, encoder_hidden_states=encoder_hidden_states, controlnet_cond=control,
                        conditioning_scale=conditioning_scale, class_labels=class_labels, return_dict=False)
    return tuple(down), mid


class ControlledUNet(nn.Module):
    """The base UNet with adapters: ``forward(sample, timestep, controls=[...], scales=[...])`` sums the adapters'
    residuals (adapter i gets control i) and runs the base with them; with no controls it is the base alone."""

    def __init__(self, unet: nn.Module, adapters: Sequence[nn.Module] = ()):
        super().__init__()
        if not isinstance(unet, (UNet2DModel, UNet2DConditionModel)):
            raise ValueError(f"the base must be a diffusers UNet2DModel or UNet2DConditionModel, got "
                             f"{type(unet).__name__}.")
        self.unet = unet
        self.adapters = nn.ModuleList(adapters)

    def forward(self, sample: torch.Tensor, timestep, controls: Sequence[torch.Tensor | None] | None = None,
                scales: Sequence[float] | None = None, class_labels: torch.Tensor | None = None,
                encoder_hidden_states: torch.Tensor | None = None) -> torch.Tensor:
        down = mid = None
        controls = list(controls) if controls is not None else [None] * len(self.adapters)
        if len(controls) != len(self.adapters):
            raise ValueError(f"`controls` must hold one entry per adapter ({len(self.adapters)}), got "
                             f"{len(controls)}.")
        scales = [1.0] * len(self.adapters) if scales is None else list(scales)
        for adapter, control, scale in zip(self.adapters, controls, scales):
            if control is None or scale == 0:
                continue  # this adapter is off
            d, m = adapter_residuals(adapter, sample, timestep, control, scale, class_labels, encoder_hidden_states)
            down = d if down is None else tuple(a + b for a, b in zip(down, d))
            mid = m if mid is None else mid + m
        if isinstance(self.unet, UNet2DModel):
            return unet2d_forward(self.unet, sample, timestep, class_labels, down, mid)
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, class_labels=class_labels,
                         down_block_additional_residuals=down, mid_block_additional_residual=mid,
                         return_dict=False)[0]


class MultiAdapter(ModelMixin):
    """Several :class:`ZeroConvAdapter` s as one pipeline component (applied together, residuals summed). Saved as
    ``adapter_0/``, ``adapter_1/``, ... under the component folder; :meth:`from_pretrained` reads them back."""

    def __init__(self, adapters: Sequence[ZeroConvAdapter]):
        super().__init__()
        adapters = list(adapters)
        if not adapters or not all(isinstance(a, ZeroConvAdapter) for a in adapters):
            raise ValueError("MultiAdapter takes a non-empty list of ZeroConvAdapter.")
        self.adapters = nn.ModuleList(adapters)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        root = Path(save_directory)
        root.mkdir(parents=True, exist_ok=True)
        for i, adapter in enumerate(self.adapters):
            adapter.save_pretrained(root / f"adapter_{i}", **{k: v for k, v in kwargs.items()
                                                             if k in ("safe_serialization", "variant")})
        (root / "multi_adapter.json").write_text(json.dumps({"num_adapters": len(self.adapters)}))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> MultiAdapter:
        root = Path(pretrained_model_name_or_path)
        if kwargs.get("subfolder"):
            root = root / kwargs["subfolder"]
        meta = root / "multi_adapter.json"
        if not meta.is_file():
            raise FileNotFoundError(f"{root}: not a saved MultiAdapter (no multi_adapter.json).")
        n = json.loads(meta.read_text())["num_adapters"]
        dtype = kwargs.get("torch_dtype")
        adapters = [ZeroConvAdapter.from_pretrained(root / f"adapter_{i}") for i in range(n)]
        multi = cls(adapters)
        return multi.to(dtype=dtype) if dtype is not None else multi
