"""Motion metrics for single-object videos: trajectories by centre of mass, and how well a generated video follows a
reference motion (cosine similarity of per-frame displacements, endpoint error), the two numbers the motion-guided
video demo reports. Coordinates are pixel indices: x = column, y = row (pointing down), as in
gensample.data.moving_digits."""
from __future__ import annotations

import torch

__all__ = ["DEFAULT_THRESHOLD", "centre_of_mass", "motion_fidelity"]

#: Default background threshold on the weight (x + 1) / 2: pixels darker than -0.6 count as background.
DEFAULT_THRESHOLD = 0.2


def centre_of_mass(frames: torch.Tensor, threshold: float = DEFAULT_THRESHOLD) -> torch.Tensor:
    """Intensity-weighted centre (x, y) of every frame of (..., F, 1, H, W) videos in [-1, 1] -> (..., F, 2).

    Weights: w = max((x + 1) / 2 - threshold, 0), i.e. brightness above a background floor. Without the floor a
    generated video's faint background noise (many pixels slightly above -1) pulls the centre towards the middle of
    the frame; ``threshold=0`` gives the plain centre of mass. A frame with no weight at all gets the frame centre
    ((W - 1) / 2, (H - 1) / 2).
    """
    if frames.ndim < 4 or frames.shape[-3] != 1:
        raise ValueError(f"frames must be (..., F, 1, H, W) single-channel videos, got shape {tuple(frames.shape)}; "
                         "convert colour videos to grey first.")
    if not 0 <= threshold < 1:
        raise ValueError(f"threshold must be in [0, 1) (a weight level on (x + 1) / 2), got {threshold}.")
    h, w = frames.shape[-2:]
    weight = ((frames[..., 0, :, :].float() + 1) / 2 - threshold).clamp(min=0)
    mass = weight.sum((-1, -2))
    xs = torch.arange(w, dtype=weight.dtype, device=weight.device)
    ys = torch.arange(h, dtype=weight.dtype, device=weight.device)
    safe = mass.clamp(min=1e-12)
    cx = (weight.sum(-2) * xs).sum(-1) / safe
    cy = (weight.sum(-1) * ys).sum(-1) / safe
    empty = mass <= 1e-12
    cx = torch.where(empty, torch.full_like(cx, (w - 1) / 2), cx)
    cy = torch.where(empty, torch.full_like(cy, (h - 1) / 2), cy)
    return torch.stack([cx, cy], -1)


def motion_fidelity(generated: torch.Tensor, reference: torch.Tensor, *, threshold: float = DEFAULT_THRESHOLD,
                    min_displacement: float = 0.25) -> dict:
    """How closely ``generated`` follows the motion of ``reference`` (videos (..., F, 1, H, W) in [-1, 1]; a single
    reference (F, 1, H, W) broadcasts over a batch of generated videos).

    With centres c_t (:func:`centre_of_mass`) and per-frame displacements d_t = c_{t+1} - c_t:
      * ``cosine``: mean over t of cos(d_t^gen, d_t^ref), over the frames whose reference displacement is at least
        ``min_displacement`` px (NaN for a video whose reference never moves that far); 1 = same direction every
        frame, -1 = opposite;
      * ``endpoint_error``: |(c_{F-1} - c_0)^gen - (c_{F-1} - c_0)^ref| in px, the error of the total displacement.
    Returns per-video tensors ``cosine`` and ``endpoint_error`` (shape ...) and their means over videos
    ``mean_cosine`` (NaNs skipped) and ``mean_endpoint_error`` as floats.
    """
    if generated.ndim < 4 or reference.ndim < 4:
        raise ValueError(f"generated and reference must be (..., F, 1, H, W) videos, got shapes "
                         f"{tuple(generated.shape)} and {tuple(reference.shape)}.")
    if generated.shape[-4] != reference.shape[-4]:
        raise ValueError(f"generated has {generated.shape[-4]} frames but reference has {reference.shape[-4]}; "
                         "compare videos of equal length.")
    if generated.shape[-4] < 2:
        raise ValueError("motion needs at least 2 frames.")
    if min_displacement < 0:
        raise ValueError(f"min_displacement must be >= 0 px, got {min_displacement}.")
    c_gen = centre_of_mass(generated, threshold).double()
    c_ref = centre_of_mass(reference, threshold).double().to(c_gen.device)
    c_gen, c_ref = torch.broadcast_tensors(c_gen, c_ref)
    d_gen, d_ref = c_gen.diff(dim=-2), c_ref.diff(dim=-2)
    n_gen, n_ref = d_gen.norm(dim=-1), d_ref.norm(dim=-1)
    cos = (d_gen * d_ref).sum(-1) / (n_gen * n_ref).clamp(min=1e-12)
    valid = (n_ref >= min_displacement) & (n_ref > 0)
    count = valid.sum(-1)
    cosine = torch.where(count > 0, (cos * valid).sum(-1) / count.clamp(min=1), torch.full_like(cos[..., 0], torch.nan))
    endpoint = ((c_gen[..., -1, :] - c_gen[..., 0, :]) - (c_ref[..., -1, :] - c_ref[..., 0, :])).norm(dim=-1)
    finite = cosine[~cosine.isnan()]
    return {
        "cosine": cosine.float(),
        "endpoint_error": endpoint.float(),
        "mean_cosine": float(finite.mean()) if finite.numel() else float("nan"),
        "mean_endpoint_error": float(endpoint.mean()),
    }
