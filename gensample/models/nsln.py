"""Non-scaling LayerNorm (NsLN) for diffusers UNets (sLCT, Dao et al. ICLR 2025, "non-scaling LayerNorm";
research code quandao10/LCT ``models/network_karras.py::NonScalingLayerNorm``, flags
``--block-norm-type non-scaling-layer-norm --last-norm-type non-scaling-layer-norm``).

Research-code behaviour (``NonScalingLayerNorm(nn.LayerNorm)``): a ``torch.nn.LayerNorm`` over the **whole
[C, H, W] of each sample** (``normalized_shape = [C, res, res]``) whose affine weight is initialised to 1 and frozen,
with a trainable, zero-initialised bias of that same per-element shape; it replaces GroupNorm in every UNet block
(norm0/norm1/norm2, the last of which is the attention pre-norm) and the output norm.

Here:

* :class:`NonScalingLayerNorm` has **no** scale parameter at all (a frozen all-ones weight is the identity), only the
  per-element trainable bias; ``y = (x - mean) / sqrt(var + eps) + bias`` with mean and (biased) variance over all
  non-batch dimensions of each sample, exactly ``F.layer_norm(x, x.shape[1:], weight=None, bias, eps)``.
* :func:`replace_group_norm` swaps every ``nn.GroupNorm`` of a diffusers ``UNet2DModel`` (ResNet norm1/norm2, the
  attention ``group_norm`` and ``conv_norm_out``) for an NsLN whose shape is the input shape that GroupNorm sees at
  the model's ``sample_size``, found by a shape-only forward pass on the ``meta`` device (no compute, no memory). An
  attention block normalises its (C, H*W) token matrix, as the research code's attention norm normalises [C, H, W].
  Because the bias is per element, a model with NsLN runs only at its configured ``sample_size``.
* :class:`NsLNUNet2DModel` is a ``UNet2DModel`` with a ``norm_type`` config entry ("nsln" or "group") that applies
  :func:`replace_group_norm` in ``__init__``, so ``save_pretrained`` / ``from_pretrained`` (which rebuild the model
  from its config before loading the weights) round-trip it.
"""
from __future__ import annotations

import inspect
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin, UNet2DModel
from torch import nn

from .unet import load_unet_config

__all__ = ["NonScalingLayerNorm", "replace_group_norm", "NsLNUNet2DModel", "build_nsln_unet", "NORM_TYPES"]

NORM_TYPES = ("nsln", "group")

# save_pretrained / from_pretrained come from these bases of UNet2DModel (checked at import time).
if not (issubclass(UNet2DModel, ModelMixin) and issubclass(UNet2DModel, ConfigMixin)):
    raise ImportError("this diffusers release's UNet2DModel is not a ModelMixin + ConfigMixin; NsLNUNet2DModel "
                      "needs both.")


class NonScalingLayerNorm(nn.Module):
    """LayerNorm over all non-batch dimensions without a scale: ``(x - mean) / sqrt(var + eps) + bias``.

    Args:
        normalized_shape: the per-sample shape, e.g. (C, H, W) (or (C, L) for attention tokens).
        eps: added to the variance (the replaced GroupNorm's eps; torch's LayerNorm default is 1e-5).
    """

    def __init__(self, normalized_shape: Sequence[int], eps: float = 1e-5, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        shape = tuple(int(s) for s in normalized_shape)
        if not shape or any(s < 1 for s in shape):
            raise ValueError(f"normalized_shape must be a non-empty tuple of positive sizes, got {normalized_shape}.")
        self.normalized_shape = shape
        self.eps = float(eps)
        self.bias = nn.Parameter(torch.zeros(shape, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.normalized_shape:
            raise ValueError(
                f"NonScalingLayerNorm built for per-sample shape {self.normalized_shape} got input {tuple(x.shape)}: "
                "a UNet with NsLN has a per-element bias and runs only at its configured sample_size.")
        return F.layer_norm(x, self.normalized_shape, None, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, scale=False"


def _unet_init_keys() -> set[str]:
    return set(inspect.signature(UNet2DModel.__init__).parameters) - {"self"}


def _sample_hw(sample_size: Any) -> tuple[int, int]:
    if sample_size is None:
        raise ValueError("replace_group_norm needs unet.config.sample_size (the NsLN shapes depend on it).")
    if isinstance(sample_size, int):
        return sample_size, sample_size
    h, w = sample_size
    return int(h), int(w)


def group_norm_input_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Per-sample input shape of every GroupNorm of ``UNet2DModel(**config)`` at its sample_size (module name ->
    shape), from a forward pass on the meta device (shapes only, nothing is computed or allocated)."""
    keys = _unet_init_keys()
    cfg = {k: v for k, v in dict(config).items() if k in keys}
    height, width = _sample_hw(cfg.get("sample_size"))
    with torch.device("meta"):
        probe = UNet2DModel(**cfg)
    shapes: dict[str, tuple[int, ...]] = {}
    calls: dict[str, int] = {}

    def hook(name):
        def record(module, inputs, output):
            calls[name] = calls.get(name, 0) + 1
            shapes[name] = tuple(inputs[0].shape[1:])
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in probe.named_modules() if isinstance(m, nn.GroupNorm)]
    try:
        sample = torch.zeros(1, probe.config.in_channels, height, width, device="meta")
        timestep = torch.zeros(1, device="meta")
        class_labels = None
        if probe.class_embedding is not None:
            class_labels = torch.zeros(1, dtype=torch.long, device="meta")
        with torch.no_grad():
            probe(sample, timestep, class_labels=class_labels)
    except Exception as e:  # a config whose forward cannot be traced this way
        raise ValueError(f"could not trace the GroupNorm shapes of this UNet2DModel config ({e}).") from e
    finally:
        for h in handles:
            h.remove()
    reused = sorted(n for n, c in calls.items() if c > 1)
    if reused:
        raise ValueError(f"GroupNorm modules {reused} are called more than once per forward; NsLN needs one shape "
                         "per module.")
    return shapes


def replace_group_norm(unet: UNet2DModel) -> int:
    """Replace every ``nn.GroupNorm`` of ``unet`` (in place) by a :class:`NonScalingLayerNorm` over the per-sample
    shape it normalises at ``unet.config.sample_size``; returns the number replaced.

    New biases start at zero (the research code's init) on the device/dtype of the replaced norm's parameters. Use
    :class:`NsLNUNet2DModel` for a model that must survive ``save_pretrained``/``from_pretrained``: a plain
    ``UNet2DModel`` rebuilt from its config would get GroupNorms back.
    """
    if not isinstance(unet, UNet2DModel):
        raise ValueError(f"replace_group_norm expects a diffusers UNet2DModel, got {type(unet).__name__}.")
    shapes = group_norm_input_shapes(unet.config)
    targets = [(n, m) for n, m in unet.named_modules() if isinstance(m, nn.GroupNorm)]
    missing = [n for n, _ in targets if n not in shapes]
    if missing:
        raise ValueError(f"GroupNorm modules {missing} were not reached by the tracing forward pass; cannot size "
                         "their NsLN.")
    for name, gn in targets:
        ref = gn.weight if gn.weight is not None else None
        norm = NonScalingLayerNorm(shapes[name], eps=gn.eps, device=None if ref is None else ref.device,
                                   dtype=None if ref is None else ref.dtype)
        parent_name, _, child = name.rpartition(".")
        parent = unet.get_submodule(parent_name) if parent_name else unet
        setattr(parent, child, norm)
    return len(targets)


class NsLNUNet2DModel(UNet2DModel):
    """``UNet2DModel`` whose GroupNorms are Non-scaling LayerNorms (``norm_type="nsln"``, the sLCT setting) or left as
    GroupNorms (``norm_type="group"``).

    Takes every ``UNet2DModel`` argument plus ``norm_type``; the config (``_class_name`` NsLNUNet2DModel) records
    ``norm_type``, so ``from_pretrained`` rebuilds the same modules before loading the weights.
    """

    def __init__(self, *args: Any, norm_type: str = "nsln", **kwargs: Any):
        if norm_type not in NORM_TYPES:
            raise ValueError(f"norm_type must be one of {NORM_TYPES}, got {norm_type!r}.")
        super().__init__(*args, **kwargs)
        self.register_to_config(norm_type=norm_type)
        if norm_type == "nsln":
            replace_group_norm(self)


# ConfigMixin reads the init keys with inspect.signature (from_config / from_pretrained): expose UNet2DModel's
# parameters plus norm_type, so a saved config is passed back in full.
_unet_sig = inspect.signature(UNet2DModel.__init__)
NsLNUNet2DModel.__init__.__signature__ = _unet_sig.replace(parameters=[
    *_unet_sig.parameters.values(),
    inspect.Parameter("norm_type", inspect.Parameter.KEYWORD_ONLY, default="nsln", annotation=str),
])


def build_nsln_unet(name_or_path: str = "digits", sample_size: int | None = None, in_channels: int | None = None,
                    norm_type: str = "nsln", **overrides: Any) -> NsLNUNet2DModel:
    """An :class:`NsLNUNet2DModel` from a :func:`gensample.models.unet.load_unet_config` preset or JSON config, with
    optional size/channel overrides (as :func:`gensample.models.build_unet`)."""
    config = {k: v for k, v in load_unet_config(name_or_path).items() if not k.startswith("_")}
    config.pop("norm_type", None)
    if sample_size is not None:
        config["sample_size"] = sample_size
    if in_channels is not None:
        config["in_channels"] = config["out_channels"] = in_channels
    config.setdefault("sample_size", 16)
    config.setdefault("in_channels", 1)
    config.setdefault("out_channels", config["in_channels"])
    config.update(overrides)
    return NsLNUNet2DModel(**config, norm_type=norm_type)
