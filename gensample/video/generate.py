"""``gensample video``: generate videos with a MotionGuidedVideoPipeline, write an animated GIF per video and a strip
PNG (reference on top, results below)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

__all__ = ["run_video"]


def run_video(args) -> dict:
    """Load ``args.model``, read ``args.reference`` (GIF; or ``--direction`` for a moving-digit reference on the
    moving-digits model), generate, save. Returns a summary dict (also written next to the GIF as JSON)."""
    from gensample.loading import load_pipeline
    from gensample.video.guidance import MotionGuidanceConfig
    from gensample.video.io import load_video, save_gif, save_strip_png

    if args.reference is not None and args.direction is not None:
        raise ValueError("pass either --reference (a clip) or --direction (a moving-digit reference), not both.")
    if not 0.0 <= args.guidance_fraction <= 1.0:
        raise ValueError(f"--guidance-fraction must be in [0, 1], got {args.guidance_fraction}.")
    pipe = load_pipeline(args.model)
    if args.cpu_threads:
        torch.set_num_threads(args.cpu_threads)
    reference = None
    if args.reference is not None:
        reference = load_video(args.reference)
    elif args.direction is not None:
        from gensample.data.moving_digits import make_reference_video

        size = pipe.unet.config.sample_size * pipe.vae_scale_factor
        reference = make_reference_video(args.direction, digit_index=args.digit_index, split="heldout",
                                         num_frames=args.num_frames or 8, canvas=size).videos[0]
    guidance = None
    if reference is not None and not args.no_guidance:
        keypoints = [tuple(args.keypoint)] if args.keypoint else None
        guidance = MotionGuidanceConfig(weight=args.weight, guidance_fraction=args.guidance_fraction,
                                        keypoints=keypoints, local_range=args.local_range,
                                        reference_mode=args.reference_mode)
    elif reference is not None:
        guidance = MotionGuidanceConfig(weight=0.0)
    kwargs = {}
    if args.prompt is not None:
        kwargs["prompt"] = args.prompt
        kwargs["guidance_scale"] = args.guidance_scale
    generator = [torch.Generator().manual_seed(args.seed + i) for i in range(args.num_videos)]
    t0 = time.time()
    out = pipe(num_frames=args.num_frames or (reference.shape[0] if reference is not None else None),
               num_inference_steps=args.num_inference_steps, num_videos_per_prompt=args.num_videos,
               generator=generator, reference_video=reference, motion_guidance=guidance,
               init_noise=args.init_noise if reference is not None else None, output_type="pt", **kwargs)
    seconds = time.time() - t0
    videos = out.frames * 2 - 1  # (B, F, C, H, W) in [-1, 1]
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    gifs = []
    for i, video in enumerate(videos):
        path = output if len(videos) == 1 else output.with_name(f"{output.stem}-{i}{output.suffix or '.gif'}")
        gifs.append(str(save_gif(video, path, fps=args.fps)))
    rows = ([reference] if reference is not None else []) + list(videos)
    strip = save_strip_png(rows, output.with_name(f"{output.stem}-strip.png"))
    summary = {"model": str(args.model), "gifs": gifs, "strip": str(strip), "seconds": round(seconds, 2),
               "motion_loss": [round(v, 4) for v in out.motion_loss],
               "guidance_saved_bytes": out.guidance_saved_bytes}
    if reference is not None and reference.shape[1] == 1 and videos.shape[2] == 1:
        from gensample.video.motion_metrics import motion_fidelity

        fidelity = motion_fidelity(videos.cpu(), reference.cpu())
        summary["motion_cosine"] = round(fidelity["mean_cosine"], 4)
        summary["endpoint_error_px"] = round(fidelity["mean_endpoint_error"], 3)
    output.with_name(f"{output.stem}.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    return summary
