"""``gensample video``: motion-guided video generation with a saved MotionGuidedVideoPipeline (GIF + strip PNG +
JSON summary); the work itself is :func:`gensample.video.generate.run_video`."""
from __future__ import annotations

import argparse

from ._common import _positive_int

__all__ = ["cmd_video", "register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Register ``video`` on the top-level ``gensample`` parser."""
    video = subparsers.add_parser("video", help="motion-guided video generation (MotionGuidedVideoPipeline): GIF + "
                                                "strip PNG")
    video.add_argument("--model", required=True, help="a saved MotionGuidedVideoPipeline folder (e.g. "
                       "runs/video/pipeline or assets/pipelines/video-digits)")
    video.add_argument("--reference", default=None, help="reference clip (animated GIF) whose motion is copied")
    video.add_argument("--direction", type=float, default=None,
                       help="moving-digits models: use a held-out digit moving in this direction (degrees) instead")
    video.add_argument("--digit-index", type=int, default=3, help="with --direction: which held-out digit")
    video.add_argument("--prompt", default=None, help="text prompt (models with a text encoder)")
    video.add_argument("--guidance-scale", type=float, default=7.5, help="classifier-free guidance scale")
    video.add_argument("--output", default="out.gif", help="GIF path; also writes OUTPUT-strip.png and OUTPUT.json")
    video.add_argument("--num-videos", type=_positive_int, default=1)
    video.add_argument("--num-frames", type=_positive_int, default=None, help="default: the reference's length")
    video.add_argument("--num-inference-steps", type=_positive_int, default=25)
    video.add_argument("--weight", type=float, default=None,
                       help="motion guidance weight sigma_t (paper: 1e4 for its model; default: the pipeline's "
                            "recommended value or 1e4)")
    video.add_argument("--guidance-fraction", type=float, default=0.5, help="fraction of steps guided, from the first")
    video.add_argument("--local-range", type=_positive_int, default=8)
    video.add_argument("--keypoint", type=float, nargs=2, default=None, metavar=("X", "Y"),
                       help="keypoint on frame 0 in [0, 1] (default: automatic, the moving foreground)")
    video.add_argument("--reference-mode", choices=["noised", "inverted"], default="noised")
    video.add_argument("--init-noise",
                       choices=["random", "ddim_inversion", "lowfreq_mix", "ddim_inversion+lowfreq_mix"],
                       default="ddim_inversion", help="initial noise with a reference (paper: ddim_inversion)")
    video.add_argument("--no-guidance", action="store_true", help="initial-noise control only (weight 0)")
    video.add_argument("--seed", type=int, default=0)
    video.add_argument("--fps", type=float, default=4)
    video.add_argument("--cpu-threads", type=int, default=None)
    video.set_defaults(func=cmd_video)


def cmd_video(args: argparse.Namespace) -> dict:
    """Run ``gensample video``; returns the summary that is also written next to the GIF."""
    from ..video.generate import run_video

    return run_video(args)
