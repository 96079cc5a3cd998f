"""Motion consistency loss (Zhang et al. 2025, "Training-Free Motion-Guided Video Generation with Enhanced Temporal
Consistency Using Motion Consistency Loss", arXiv 2501.07563).

The motion of a video is summarised by *soft trajectories* of keypoints in the input features of the video UNet's
temporal-attention modules. For a keypoint p on anchor frame f with feature vector f_p, and a later frame i
within ``local_range`` frames of f,

    M_i(j, k) = softmax_{(j, k) over H x W}( logit_scale * cos(f_p, F_i[:, j, k]) )          (paper eq. for M_i)

and the loss between the generated video's patterns M' and the reference's M is

    L_c = sum_layers sum_points sum_f sum_{i=f+1}^{min(F-1, f+R)} || M'_i - M_i ||_2^2.

Choices where the paper (which has no public code) leaves room for interpretation:

* ``logit_scale`` multiplies the cosine (inverse temperature, default 10). The paper's tau = 10 read as a temperature,
  cos / tau, would keep every logit within [-0.1, 0.1] and every softmax nearly uniform, so tau is read as an
  inverse temperature, cos * tau.
* Anchor frames: the user's keypoint lives on frame 0. Its location on a later anchor frame f is the argmax of the
  reference's own M_f (from the latest anchor that reaches f), as the paper describes for anchors f > 1. The
  generated video is evaluated at the *reference's* anchor locations, so a generated object that sits elsewhere is
  pulled towards the reference's trajectory.
* With no keypoints given, one is chosen automatically: the position of frame 0 that differs most from the temporal
  median of the reference (the moving foreground); see :func:`auto_keypoints`.

:class:`FeatureRecorder` collects the features with forward pre-hooks that are removed on exit, and can stop the
forward pass once every hooked module has fired, so layers after the last guided one never run under autograd.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

__all__ = [
    "MotionGuidanceConfig",
    "FeatureRecorder",
    "temporal_attention_modules",
    "soft_trajectory",
    "reference_trajectories",
    "motion_patterns",
    "motion_consistency_loss",
    "auto_keypoints",
]


def temporal_attention_modules(unet: nn.Module) -> dict[str, nn.Module]:
    """Named temporal-attention modules of a diffusers video UNet, in registration order.

    ``UNetMotionModel`` (AnimateDiff): every ``AnimateDiffTransformer3D`` motion module. ``UNet3DConditionModel``
    (ModelScope/ZeroScope): every ``TransformerTemporalModel`` (``transformer_in`` and the ``temp_attentions``).
    """
    from diffusers.models.transformers.transformer_temporal import TransformerTemporalModel
    from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D

    found = {name: m for name, m in unet.named_modules()
             if isinstance(m, (AnimateDiffTransformer3D, TransformerTemporalModel))}
    if not found:
        raise ValueError(f"{type(unet).__name__} has no temporal-attention modules (AnimateDiffTransformer3D or "
                         "TransformerTemporalModel): motion guidance needs a video UNet such as UNetMotionModel.")
    return found


@dataclass
class MotionGuidanceConfig:
    """Settings of motion-consistency guidance (defaults: the paper's where it reports them, marked "paper" below).

    Args:
        layers: fnmatch patterns over module names selecting the temporal-attention modules whose inputs are
            compared (None: all of them, as in the paper). E.g. ``["down_blocks.*", "mid_block.*"]``.
        keypoints: (x, y) positions in [0, 1] on frame 0 of the reference (None: one automatic keypoint).
        local_range: R, how many later frames each anchor frame is compared with (paper: 8).
        logit_scale: inverse temperature of the soft trajectory (paper: tau = 10, read as cos * 10).
        weight: sigma_t in eps_hat = eps + sigma_t * grad L_c (paper: 1e4 for its model; None: the pipeline's
            ``default_motion_weight``, 1e4 unless the saved model records a value tuned for it).
        guidance_fraction: fraction of the denoising steps, from the first, that are guided (the paper does not
            say; MotionClone and DMT guide the first 40-60%).
        reference_mode: "noised" (the paper: the reference noised once to ``reference_timestep`` and passed through
            the UNet once; the same patterns guide every step) or "inverted" (patterns recomputed at each guided
            timestep from the DDIM-inverted reference at that timestep, as in DMT).
        reference_timestep: t' of the "noised" mode (paper: 1).
        truncate_forward: stop the guided forward pass after the last hooked module (saves memory and time).
        gradient_checkpointing: recompute UNet blocks in the backward pass instead of storing their activations.
    """

    layers: Sequence[str] | None = None
    keypoints: Sequence[tuple[float, float]] | None = None
    local_range: int = 8
    logit_scale: float = 10.0
    weight: float | None = None
    guidance_fraction: float = 0.5
    reference_mode: str = "noised"
    reference_timestep: int = 1
    truncate_forward: bool = True
    gradient_checkpointing: bool = False

    def __post_init__(self):
        if self.weight is not None and (self.weight < 0 or self.weight != self.weight):
            raise ValueError(f"weight must be >= 0 (0 turns the loss off), got {self.weight}.")
        if self.local_range < 1:
            raise ValueError(f"local_range must be >= 1 frame, got {self.local_range}.")
        if self.logit_scale <= 0:
            raise ValueError(f"logit_scale must be > 0, got {self.logit_scale}.")
        if not 0.0 <= self.guidance_fraction <= 1.0:
            raise ValueError(f"guidance_fraction must be in [0, 1] (fraction of guided steps), got "
                             f"{self.guidance_fraction}.")
        if self.reference_mode not in ("noised", "inverted"):
            raise ValueError(f"reference_mode must be 'noised' or 'inverted', got {self.reference_mode!r}.")
        if self.reference_timestep < 0:
            raise ValueError(f"reference_timestep must be >= 0, got {self.reference_timestep}.")
        if self.keypoints is not None:
            points = [tuple(p) for p in self.keypoints]
            if not points or any(len(p) != 2 or not all(0.0 <= c <= 1.0 for c in p) for p in points):
                raise ValueError("keypoints must be a non-empty list of (x, y) pairs in [0, 1] (fractions of the "
                                 f"frame width and height), got {self.keypoints!r}.")
            self.keypoints = points

    def select_layers(self, unet: nn.Module) -> dict[str, nn.Module]:
        modules = temporal_attention_modules(unet)
        if self.layers is None:
            return modules
        chosen = {n: m for n, m in modules.items() if any(fnmatch.fnmatch(n, p) for p in self.layers)}
        if not chosen:
            raise ValueError(f"layers={list(self.layers)} match no temporal-attention module; available: "
                             f"{list(modules)}.")
        return chosen


class _StopForward(Exception):
    pass


class FeatureRecorder:
    """Forward pre-hooks that record the input hidden states of chosen modules as (B, F, C, H, W) features.

    Use as a context manager; hooks are removed on exit, so the wrapped UNet is left unchanged. ``run`` calls the
    UNet and, with ``truncate=True``, aborts the forward pass as soon as every hooked module has received its input.
    """

    def __init__(self, modules: dict[str, nn.Module]):
        self.modules = modules
        self.features: dict[str, torch.Tensor] = {}
        self._handles: list = []
        self._truncate = False

    def _hook(self, name: str):
        def pre_hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            num_frames = kwargs.get("num_frames", args[4] if len(args) > 4 else 1)
            self.features[name] = rearrange(hidden, "(b f) c h w -> b f c h w", f=num_frames)
            if self._truncate and len(self.features) == len(self.modules):
                raise _StopForward
        return pre_hook

    def __enter__(self) -> "FeatureRecorder":
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_pre_hook(self._hook(name), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def run(self, unet: nn.Module, *args, truncate: bool = False, **kwargs) -> dict[str, torch.Tensor]:
        self.features, self._truncate = {}, truncate
        try:
            unet(*args, **kwargs)
        except _StopForward:
            pass
        finally:
            self._truncate = False
        missing = set(self.modules) - set(self.features)
        if missing:
            raise RuntimeError(f"modules {sorted(missing)} did not run in the UNet's forward pass.")
        return dict(self.features)


def _grid_index(point: tuple[float, float], height: int, width: int) -> int:
    """Flat index of the feature cell that contains the point (x, y) in [0, 1]."""
    x, y = point
    col = min(int(x * width), width - 1)
    row = min(int(y * height), height - 1)
    return row * width + col


def soft_trajectory(features: torch.Tensor, anchor_frame: int, anchor_index: torch.Tensor | int, frames: Sequence[int],
                    logit_scale: float) -> torch.Tensor:
    """M_i for i in ``frames``: softmax over the H x W cells of frame i of logit_scale * cos(f_p, F_i).

    features: (B, F, C, H, W); anchor_index: flat cell index of p on ``anchor_frame`` (int or (B,) tensor).
    Returns (B, len(frames), H * W).
    """
    b, _, c, h, w = features.shape
    flat = F.normalize(rearrange(features, "b f c h w -> b f c (h w)"), dim=2, eps=1e-8)
    index = torch.as_tensor(anchor_index, device=features.device).reshape(-1).expand(b)
    anchor = flat[torch.arange(b, device=features.device), anchor_frame, :, index]  # (B, C)
    cosine = torch.einsum("bc,bfcn->bfn", anchor, flat[:, list(frames)])
    return torch.softmax(logit_scale * cosine, dim=-1)


def _pairs(num_frames: int, local_range: int):
    """(anchor f, frames f+1..min(F-1, f+R)) for every anchor frame with at least one later frame."""
    return [(f, list(range(f + 1, min(num_frames - 1, f + local_range) + 1))) for f in range(num_frames - 1)]


@torch.no_grad()
def reference_trajectories(features: dict[str, torch.Tensor], keypoints: Sequence[tuple[float, float]],
                           local_range: int, logit_scale: float) -> dict[str, torch.Tensor]:
    """Anchor cell of every keypoint on every frame of the reference, per layer: {name: (P, F) long}.

    Frame 0 holds the keypoint itself; frame f > 0 the argmax of the reference's M_f computed from the latest
    anchor frame that reaches f (frame max(0, f - R)).
    """
    anchors = {}
    for name, feats in features.items():
        if feats.shape[0] != 1:
            raise ValueError(f"the reference must be one video, got a batch of {feats.shape[0]}.")
        _, num_frames, _, h, w = feats.shape
        cells = torch.empty(len(keypoints), num_frames, dtype=torch.long, device=feats.device)
        for p, point in enumerate(keypoints):
            cells[p, 0] = _grid_index(point, h, w)
            for f in range(1, num_frames):
                a = max(0, f - local_range)
                m = soft_trajectory(feats, a, cells[p, a], [f], logit_scale)
                cells[p, f] = m[0, 0].argmax()
        anchors[name] = cells
    return anchors


def motion_patterns(features: dict[str, torch.Tensor], anchors: dict[str, torch.Tensor], local_range: int,
                    logit_scale: float) -> dict[str, list[torch.Tensor]]:
    """All soft trajectories 𝓜 of a video at the given anchor cells: {name: [M for each (point, anchor f)]},
    each M of shape (B, len(frames f+1..f+R), H * W)."""
    patterns = {}
    for name, feats in features.items():
        num_frames = feats.shape[1]
        patterns[name] = [soft_trajectory(feats, f, anchors[name][p, f], frames, logit_scale)
                          for p in range(anchors[name].shape[0]) for f, frames in _pairs(num_frames, local_range)]
    return patterns


def motion_consistency_loss(generated: dict[str, list[torch.Tensor]], reference: dict[str, list[torch.Tensor]]
                            ) -> torch.Tensor:
    """L_c = sum over layers, points, anchors and frames of ||M'_i - M_i||^2, one value per generated video (B,).

    The reference patterns (batch 1) broadcast over the generated batch.
    """
    if set(generated) != set(reference):
        raise ValueError(f"generated and reference patterns come from different layers: {sorted(generated)} vs "
                         f"{sorted(reference)}.")
    total = None
    for name in generated:
        for m_gen, m_ref in zip(generated[name], reference[name], strict=True):
            term = (m_gen - m_ref).square().sum(dim=(1, 2))
            total = term if total is None else total + term
    return total


def auto_keypoints(reference: torch.Tensor, count: int = 1) -> list[tuple[float, float]]:
    """``count`` keypoints (x, y) in [0, 1] on frame 0: the cells that differ most from the temporal median.

    reference: (F, C, H, W) or (1, C, F, H, W) latents or pixels. The temporal median is the static background,
    so the largest deviation on frame 0 lies on the moving object. Points are cell centres.
    """
    if reference.dim() == 5:
        reference = rearrange(reference[0], "c f h w -> f c h w")
    if reference.dim() != 4 or reference.shape[0] < 2:
        raise ValueError(f"auto_keypoints needs a video (F, C, H, W) with F >= 2, got shape {tuple(reference.shape)}.")
    deviation = (reference[0] - reference.median(dim=0).values).abs().sum(dim=0)  # (H, W)
    h, w = deviation.shape
    top = deviation.flatten().topk(count).indices
    return [(((i % w).item() + 0.5) / w, ((i // w).item() + 0.5) / h) for i in top]
