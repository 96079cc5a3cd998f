"""Measuring motion guidance on moving digits: motion fidelity against the reference and whether the frames still
look like digits (the embedded digits classifier on a crop around each frame's centre of mass)."""
from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.nn.functional as F
from einops import rearrange

from .motion_metrics import centre_of_mass, motion_fidelity

__all__ = ["digit_crops", "digit_scores", "evaluate_guidance"]


def digit_crops(videos: torch.Tensor, size: int = 12) -> torch.Tensor:
    """(N, F, 1, H, W) in [-1, 1] -> (N * F, 1, size, size): the window of ``size`` px centred on each frame's
    centre of mass (background padding outside the canvas)."""
    if videos.dim() != 5 or videos.shape[2] != 1:
        raise ValueError(f"videos must be (N, F, 1, H, W), got {tuple(videos.shape)}.")
    h, w = videos.shape[-2:]
    centres = rearrange(centre_of_mass(videos), "n f xy -> (n f) xy")
    frames = F.pad(rearrange(videos, "n f 1 h w -> (n f) 1 h w"), (size, size, size, size), value=-1.0)
    crops = []
    for frame, (cx, cy) in zip(frames, centres.tolist()):
        x0 = int(round(cx - (size - 1) / 2)) + size
        y0 = int(round(cy - (size - 1) / 2)) + size
        x0, y0 = min(max(x0, 0), w + size), min(max(y0, 0), h + size)
        crops.append(frame[:, y0:y0 + size, x0:x0 + size])
    return torch.stack(crops)


@torch.no_grad()
def digit_scores(videos: torch.Tensor, classifier=None) -> dict[str, float]:
    """``confidence``: mean max-softmax probability of the digits classifier on every frame's crop (real moving
    digits score near 1); ``identity``: fraction of frames classified as their video's majority class (a digit
    that changes identity mid-video scores low)."""
    from gensample.metrics.features import load_digits_classifier

    classifier = classifier or load_digits_classifier()
    probs = torch.softmax(classifier(digit_crops(videos.float().cpu())), dim=-1)
    probs = rearrange(probs, "(n f) k -> n f k", n=videos.shape[0])
    labels = probs.argmax(-1)
    majority = labels.mode(dim=1).values
    return {"confidence": float(probs.max(-1).values.mean()),
            "identity": float((labels == majority[:, None]).float().mean())}


def evaluate_guidance(pipe, reference: torch.Tensor, settings: dict[str, dict[str, Any]], seeds: Iterable[int],
                      num_inference_steps: int = 25, batch_size: int = 8, progress: bool = True) -> dict[str, dict]:
    """Run ``pipe`` (a MotionGuidedVideoPipeline on moving digits) once per setting over the same seeds and score
    motion fidelity (:func:`motion_fidelity`) and digit quality (:func:`digit_scores`).

    reference: (F, 1, H, W) in [-1, 1]. Each setting is a dict of extra ``pipe(...)`` arguments; a setting without
    ``reference_video`` is the unguided baseline (plain noise).
    """
    from tqdm.auto import tqdm

    seeds = list(seeds)
    num_frames = reference.shape[0]
    results = {}
    for name, kwargs in settings.items():
        videos = []
        for i in tqdm(range(0, len(seeds), batch_size), desc=name, disable=not progress):
            chunk = seeds[i:i + batch_size]
            generator = [torch.Generator().manual_seed(s) for s in chunk]
            latents = torch.stack([torch.randn((pipe.unet.config.in_channels, num_frames, *reference.shape[-2:]),
                                               generator=g) for g in generator])
            out = pipe(num_frames=num_frames, num_inference_steps=num_inference_steps, prompt_embeds=None,
                       latents=latents, generator=generator, output_type="pt", num_videos_per_prompt=len(chunk),
                       **kwargs)
            videos.append(out.frames * 2 - 1)  # (B, F, 1, H, W) in [-1, 1]
        videos = torch.cat(videos)
        fidelity = motion_fidelity(videos, reference)
        cos = fidelity["cosine"][~fidelity["cosine"].isnan()]
        sem = float(cos.std() / len(cos) ** 0.5) if len(cos) > 1 else float("nan")
        results[name] = {"mean_cosine": round(fidelity["mean_cosine"], 4), "cosine_sem": round(sem, 4),
                         "mean_endpoint_error_px": round(fidelity["mean_endpoint_error"], 3),
                         **{k: round(v, 4) for k, v in digit_scores(videos).items()},
                         "num_videos": len(seeds), "videos": videos}
    return results
