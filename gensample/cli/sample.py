"""``gensample sample``: a grid (and optionally one PNG per image) from a saved pipeline.

Images are generated batch by batch and never all held: each batch's PNGs (``--save-images``) are written as soon as
it is done, and only the first ``--grid-images`` images (default 256, a 16 x 16 grid) are kept for the grid. Image
``k`` is generated with its own generator seeded ``--seed + k`` (class-conditional models: its own label, from a
separate stream), as ``gensample fid`` generates, so the images do not depend on ``--batch-size`` and ``--seed 0``
and ``--seed 256`` share no image.
"""
from __future__ import annotations

import argparse
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._common import _positive_int

if TYPE_CHECKING:
    import torch
    from diffusers import DiffusionPipeline

__all__ = ["DEFAULT_GRID_IMAGES", "cmd_sample", "register", "sample_batches"]

#: images shown in the grid by default: the first 256 (16 x 16); --grid-images changes it
DEFAULT_GRID_IMAGES = 256
# torch.Generator.manual_seed takes integers in [-2**63, 2**64 - 1]
_SEED_RANGE = (-2 ** 63, 2 ** 64 - 1)


def _finite_float(value: str) -> float:
    v = float(value)
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {value}")
    return v


def register(subparsers: argparse._SubParsersAction) -> None:
    """Register ``sample`` on the top-level ``gensample`` parser."""
    sample = subparsers.add_parser("sample", help="sample a grid from a saved pipeline")
    sample.add_argument("pipeline", help="folder written by save_pretrained (e.g. runs/ict/pipeline)")
    sample.add_argument("--num-inference-steps", type=_positive_int, default=1)
    sample.add_argument("--sigmas", type=_finite_float, nargs="+", default=None,
                        help="explicit descending noise levels")
    sample.add_argument("--gamma", type=_finite_float, default=None,
                        help="CTM pipelines: gamma-sampling noise in [0, 1] (0 = deterministic jumps, 1 = CM "
                             "multistep; default: the pipeline's configured gamma)")
    sample.add_argument("--sampler", choices=["gamma", "heun"], default=None,
                        help="CTM pipelines: 'gamma' (default) or 'heun' (EDM Heun on g(x, t, t), NFE 2n - 1)")
    sample.add_argument("--guidance-scale", type=_finite_float, default=None,
                        help="classifier-free guidance scale w >= 0 of guided pipelines (EDM with num_classes, SCott; "
                             "default: the pipeline's own)")
    sample.add_argument("--class-label", type=int, default=None,
                        help="class of every image for class-conditional pipelines (default: a random class per "
                             "image)")
    sample.add_argument("--control", default=None,
                        help="NCT pipelines: the control of every image, a class label (e.g. 3) or an image file (e.g. "
                             "a 4x4 low-resolution PNG, or an edge map); default for class adapters: a random label "
                             "per image")
    sample.add_argument("--num-images", type=_positive_int, default=64)
    sample.add_argument("--batch-size", type=_positive_int, default=256,
                        help="images per pipeline call (does not change the images)")
    sample.add_argument("--seed", type=int, default=0, help="image k is generated from seed + k")
    sample.add_argument("--output", default="grid.png", help="the grid of the first --grid-images images")
    sample.add_argument("--grid-images", type=_positive_int, default=DEFAULT_GRID_IMAGES,
                        help=f"show the first N images in the grid (default {DEFAULT_GRID_IMAGES}; all of them go "
                             "to --save-images)")
    sample.add_argument("--save-images", default=None,
                        help="also write each image as PNG into this folder (NNNNNN.png = image k), batch by batch")
    sample.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    sample.set_defaults(func=cmd_sample)


def sample_batches(pipe: DiffusionPipeline, num_images: int, batch_size: int, seed: int, progress: bool = True,
                   **kwargs: Any) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(k, images)``: images k, k + 1, ... as NCHW float tensors in [0, 1] on the CPU, ``batch_size`` at a
    time; image k from its own generator ``seed + k`` (:func:`gensample.metrics.fid.per_image_inputs`). A tqdm bar
    counts images; the pipeline's own per-call bar is turned off. ValueError if a batch holds NaN or inf."""
    import torch
    from tqdm.auto import tqdm

    from ..metrics.fid import per_image_inputs

    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    with tqdm(total=num_images, unit="img", desc="sampling", disable=not progress) as bar:
        for start in range(0, num_images, batch_size):
            idx = range(start, min(start + batch_size, num_images))
            inputs = {**per_image_inputs(pipe, idx, seed), **kwargs}  # kwargs win (e.g. a fixed class_labels)
            images = pipe(batch_size=len(idx), output_type="pt", **inputs).images.cpu()
            if not torch.isfinite(images).all():
                raise ValueError(f"the pipeline produced NaN/inf values in images {idx.start}..{idx.stop - 1} "
                                 f"(--seed {seed}): its weights or scheduler config hold non-finite numbers, or the "
                                 "model diverged; check the pipeline folder (e.g. sample an earlier checkpoint).")
            yield start, images
            bar.update(len(idx))


def _save_pngs(images: torch.Tensor, folder: Path, start: int) -> None:
    from PIL import Image

    arr = (images.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    for i, a in enumerate(arr):
        Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).save(folder / f"{start + i:06d}.png")


def _guidance_kwargs(pipe: DiffusionPipeline, args: argparse.Namespace) -> dict[str, Any]:
    """``guidance_scale`` / ``class_labels`` from --guidance-scale / --class-label, checked against the pipeline."""
    import inspect

    out: dict[str, Any] = {}
    if args.guidance_scale is not None:
        if "guidance_scale" not in inspect.signature(pipe.__call__).parameters:
            raise ValueError(f"--guidance-scale applies to guided pipelines (EDMPipeline with num_classes, "
                             f"SCottPipeline); {args.pipeline} holds a {type(pipe).__name__}.")
        if args.guidance_scale < 0:
            raise ValueError(f"--guidance-scale must be >= 0 (1: no guidance), got {args.guidance_scale}.")
        out["guidance_scale"] = args.guidance_scale
    if args.class_label is not None:
        unet = getattr(pipe, "unet", None)
        embeds = getattr(getattr(unet, "config", None), "num_class_embeds", None)
        if embeds is None:
            raise ValueError(f"--class-label needs a class-conditional pipeline; {args.pipeline} is unconditional.")
        num_classes = getattr(pipe.config, "num_classes", None) or embeds
        if not 0 <= args.class_label < num_classes:
            raise ValueError(f"--class-label must be in [0, {num_classes - 1}] for {args.pipeline}, got "
                             f"{args.class_label}.")
        out["class_labels"] = args.class_label
    return out


def _control_kwargs(pipe: DiffusionPipeline, args: argparse.Namespace) -> dict[str, Any]:
    """``control`` from --control for an NCT pipeline: an integer label or an image file (read by the pipeline)."""
    if args.control is None:
        return {}
    from ..pipelines import NCTPipeline

    if not isinstance(pipe, NCTPipeline):
        raise ValueError(f"--control applies to NCT pipelines (gensample train nct); {args.pipeline} holds a "
                         f"{type(pipe).__name__}.")
    value = args.control.strip()
    if value.lstrip("-").isdigit():
        return {"control": int(value)}
    if not Path(value).is_file():
        raise ValueError(f"--control {value!r} is neither a class label (an integer) nor an image file.")
    from PIL import Image

    with Image.open(value) as image:
        return {"control": image.copy()}


def cmd_sample(args: argparse.Namespace) -> Path:
    """Run ``gensample sample``; returns the path of the grid."""
    import torch

    from ..images import save_image_grid
    from ..loading import load_pipeline

    last_seed = args.seed + args.num_images - 1
    if args.seed < _SEED_RANGE[0] or last_seed > _SEED_RANGE[1]:
        raise ValueError(f"--seed {args.seed}: image k uses seed + k, which must lie in [{_SEED_RANGE[0]}, "
                         f"{_SEED_RANGE[1]}] (torch generators); pass a smaller --seed.")
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
    kwargs.update(_guidance_kwargs(pipe, args))
    kwargs.update(_control_kwargs(pipe, args))
    folder = None
    if args.save_images:
        folder = Path(args.save_images)
        folder.mkdir(parents=True, exist_ok=True)
    grid_size = min(args.grid_images, args.num_images)
    grid: list[torch.Tensor] = []
    t0 = time.time()
    for start, images in sample_batches(pipe, args.num_images, args.batch_size, args.seed,
                                        progress=not args.no_progress, **kwargs):
        if start < grid_size:
            grid.append(images[:grid_size - start])
        if folder is not None:
            _save_pngs(images, folder, start)
    elapsed = time.time() - t0
    out = save_image_grid(torch.cat(grid), args.output)
    shown = f"all {args.num_images}" if grid_size == args.num_images else f"first {grid_size} of {args.num_images}"
    saved = f"; {args.num_images} PNGs in {folder}" if folder is not None else ""
    print(f"wrote {out} ({shown} images{saved}; {elapsed:.2f}s)")
    return out
