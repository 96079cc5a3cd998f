"""``gensample train video-diffusion``: train the tiny AnimateDiff-style video UNet on moving digits (DDPM epsilon
loss) and save a ``MotionGuidedVideoPipeline`` for training-free motion guidance.

Its flags are its own (videos, not images: no --data/--model/--fid-every), but the run flags mean what they mean for
the image methods and it ends with the same training tail (``_common.run_training``).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ._common import (
    RESUME_HELP,
    _non_negative_int,
    _positive_int,
    run_training,
    seed_everything,
    set_cpu_threads,
    train_config,
)

__all__ = ["cmd_train_video_diffusion", "register"]


def register(train_subparsers: argparse._SubParsersAction) -> None:
    """Register ``video-diffusion`` under ``gensample train``."""
    p = train_subparsers.add_parser(
        "video-diffusion", help="tiny AnimateDiff-style video diffusion model on moving digits (DDPM)",
        description="Train a small diffusers UNetMotionModel with the DDPM epsilon loss on moving-digits videos "
                    "(gensample.data.moving_digits); the run folder's pipeline/ is a MotionGuidedVideoPipeline and "
                    "samples.png shows unguided DDIM samples, one video per row.")
    p.add_argument("--output", required=True, help="run folder: checkpoints/, pipeline/, samples.png, loss.png")
    p.add_argument("--max-steps", type=_positive_int, default=1500)
    p.add_argument("--batch-size", type=_positive_int, default=8, help="videos per process and micro-batch")
    p.add_argument("--gradient-accumulation-steps", type=_positive_int, default=1)
    p.add_argument("--learning-rate", "--lr", type=float, default=2e-3)
    p.add_argument("--lr-warmup-steps", type=int, default=50)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--ema-rate", type=float, default=0.995)
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no")
    p.add_argument("--seed", type=int, default=0)
    # data
    p.add_argument("--num-videos", type=_positive_int, default=4000, help="size of the generated training set")
    p.add_argument("--num-frames", type=_positive_int, default=8)
    p.add_argument("--speed", type=float, nargs=2, default=[1.5, 2.5], metavar=("LOW", "HIGH"), help="px/frame")
    p.add_argument("--directions", type=float, nargs="+", default=None,
                   help="allowed directions in degrees (0 = right, 90 = up); default: any angle")
    # model and schedule
    p.add_argument("--block-out-channels", type=_positive_int, nargs="+", default=None,
                   help="UNet channels per level (default: gensample.video.tiny_model.TINY_VIDEO_UNET_DEFAULTS)")
    p.add_argument("--temporal-layers", type=int, nargs="+", default=None,
                   help="motion-module transformer layers per level (0 = none at that level)")
    p.add_argument("--beta-schedule", choices=["squaredcos_cap_v2", "linear", "scaled_linear"],
                   default="squaredcos_cap_v2")
    p.add_argument("--num-train-timesteps", type=_positive_int, default=1000)
    p.add_argument("--prediction-type", choices=["epsilon", "v_prediction"], default="v_prediction",
                   help="what the UNet predicts (v: see gensample.methods.video_diffusion for why)")
    p.add_argument("--logsnr-shift", type=float, default=-2.0,
                   help="shift the schedule's log-SNR by this (negative = noisier; e.g. -2 ~ -log(8 frames))")
    # run
    p.add_argument("--checkpoint-every", type=_non_negative_int, default=250,
                   help="steps between checkpoints (0: only the final one)")
    p.add_argument("--checkpoints-total-limit", type=_non_negative_int, default=3,
                   help="valid checkpoints kept (0: all)")
    p.add_argument("--sample-every", type=_non_negative_int, default=0,
                   help="also write samples/step-N.png every N steps")
    p.add_argument("--num-sample-videos", dest="num_sample_images", type=_positive_int, default=8)
    p.add_argument("--sample-steps", type=_positive_int, default=25, help="DDIM steps of the sample strips")
    p.add_argument("--log-every", type=_positive_int, default=10)
    p.add_argument("--report-to", default=None, help="accelerate tracker: tensorboard, wandb, ...")
    p.add_argument("--resume", nargs="?", const="latest", default=None, help=RESUME_HELP)
    p.add_argument("--cpu", action="store_true", help="force CPU even where a GPU exists")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_train_video_diffusion)


def _video_trainer_class() -> type:
    """The Trainer with sample strips drawn by a plain DDIM loop (the pipeline's guided ``__call__`` is not needed to
    look at the unguided model). Built in a function so that the parser does not import torch and the Trainer."""
    import torch

    from ..methods.video_diffusion import _ddim_sample
    from ..training.trainer import Trainer
    from ..video.io import save_strip_png

    class VideoTrainer(Trainer):
        def save_samples(self, path: Path) -> Path:
            pipe = self.export_pipeline()
            g = torch.Generator().manual_seed(self.config.seed)
            videos = _ddim_sample(pipe.unet, pipe.scheduler, self.config.num_sample_images,
                                  self.config.extra["num_frames"], self.config.extra["sample_steps"], generator=g)
            return save_strip_png(list(videos), path)

    return VideoTrainer


def cmd_train_video_diffusion(args: argparse.Namespace) -> dict:
    """Run ``gensample train video-diffusion``; returns the Trainer's summary (also printed as JSON)."""
    import torch

    from ..data.moving_digits import make_moving_digits
    from ..methods.video_diffusion import VideoDiffusionTraining
    from ..video.tiny_model import tiny_video_unet

    set_cpu_threads(args)
    seed_everything(args.seed)  # before anything is built: same flags, same weights
    lo, hi = args.speed
    data = make_moving_digits(args.num_videos, split="train", num_frames=args.num_frames, speed=(lo, hi),
                              directions=args.directions, seed=args.seed).videos
    torch.manual_seed(args.seed)
    unet = tiny_video_unet(sample_size=data.shape[-1], in_channels=data.shape[2],
                           block_out_channels=tuple(args.block_out_channels) if args.block_out_channels else None,
                           temporal_layers=tuple(args.temporal_layers) if args.temporal_layers else None,
                           motion_max_seq_length=max(32, args.num_frames))
    method = VideoDiffusionTraining(unet, num_train_timesteps=args.num_train_timesteps,
                                    beta_schedule=args.beta_schedule, prediction_type=args.prediction_type,
                                    logsnr_shift=args.logsnr_shift)
    extra = {"unet_parameters": sum(p.numel() for p in unet.parameters()), "data": "moving-digits",
             "num_videos": args.num_videos, "num_frames": args.num_frames, "speed": [lo, hi],
             "directions": args.directions, "sample_steps": args.sample_steps}
    config = train_config(args, extra, sample_steps=(args.sample_steps,))
    # no fid_steps: a video model has no FID-digits hook
    return run_training(args, method, data, config, trainer_class=_video_trainer_class())
