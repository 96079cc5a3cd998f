"""``gensample sample``: a grid (and optionally one PNG per image) from a saved pipeline."""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._common import _positive_int

if TYPE_CHECKING:
    import torch
    from diffusers import DiffusionPipeline

__all__ = ["cmd_sample", "register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Register ``sample`` on the top-level ``gensample`` parser."""
    sample = subparsers.add_parser("sample", help="sample a grid from a saved pipeline")
    sample.add_argument("pipeline", help="folder written by save_pretrained (e.g. runs/ict/pipeline)")
    sample.add_argument("--num-inference-steps", type=_positive_int, default=1)
    sample.add_argument("--sigmas", type=float, nargs="+", default=None, help="explicit descending noise levels")
    sample.add_argument("--gamma", type=float, default=None,
                        help="CTM pipelines: gamma-sampling noise in [0, 1] (0 = deterministic jumps, 1 = CM "
                             "multistep; default: the pipeline's configured gamma)")
    sample.add_argument("--sampler", choices=["gamma", "heun"], default=None,
                        help="CTM pipelines: 'gamma' (default) or 'heun' (EDM Heun on g(x, t, t), NFE 2n - 1)")
    sample.add_argument("--num-images", type=_positive_int, default=64)
    sample.add_argument("--batch-size", type=_positive_int, default=256)
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--output", default="grid.png")
    sample.add_argument("--save-images", default=None, help="also write each image as PNG into this folder")
    sample.set_defaults(func=cmd_sample)


def _sample_images(pipe: DiffusionPipeline, num_images: int, batch_size: int, seed: int, **kwargs: Any
                   ) -> torch.Tensor:
    """``num_images`` images in batches of ``batch_size``; each batch is seeded with ``seed`` + the index of its first
    image, so the same flags give the same grid."""
    import torch

    chunks, done = [], 0
    while done < num_images:
        n = min(batch_size, num_images - done)
        g = torch.Generator().manual_seed(seed + done)
        chunks.append(pipe(batch_size=n, generator=g, output_type="pt", **kwargs).images)
        done += n
    return torch.cat(chunks)


def cmd_sample(args: argparse.Namespace) -> Path:
    """Run ``gensample sample``; returns the path of the grid."""
    from ..images import save_image_grid
    from ..loading import load_pipeline

    pipe = load_pipeline(args.pipeline)
    kwargs = {"sigmas": args.sigmas} if args.sigmas else {"num_inference_steps": args.num_inference_steps}
    ctm_kwargs = {k: v for k, v in (("gamma", args.gamma), ("sampler", args.sampler)) if v is not None}
    if ctm_kwargs:
        from ..pipelines.pipeline_ctm import CTMPipeline
        from ..schedulers.scheduling_ctm import check_gamma

        if not isinstance(pipe, CTMPipeline):
            raise ValueError(f"--gamma/--sampler apply to CTM pipelines only; {args.pipeline} holds a "
                             f"{type(pipe).__name__}.")
        if "gamma" in ctm_kwargs:
            check_gamma(ctm_kwargs["gamma"])
        kwargs.update(ctm_kwargs)
    t0 = time.time()
    images = _sample_images(pipe, args.num_images, args.batch_size, args.seed, **kwargs)
    elapsed = time.time() - t0
    out = save_image_grid(images, args.output)
    if args.save_images:
        from PIL import Image

        folder = Path(args.save_images)
        folder.mkdir(parents=True, exist_ok=True)
        arr = (images.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        for i, a in enumerate(arr):
            Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).save(folder / f"{i:06d}.png")
    print(f"wrote {out} ({args.num_images} images, {elapsed:.2f}s)")
    return out
