"""The ``gensample`` command: train / sample / demo (and fid / fid-stats once gensample.metrics provides them)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _positive_int(value: str) -> int:
    v = int(value)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _add_train_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="digits", help="'digits' (embedded set) or a folder of images")
    p.add_argument("--resolution", type=_positive_int, default=None, help="image size (default: 8 for digits, 32 else)")
    p.add_argument("--channels", type=int, default=None, help="1 or 3 for image folders (default 3)")
    p.add_argument("--model", default="digits", help="UNet preset (tiny, digits, cifar10, imagenet64) or a JSON config")
    p.add_argument("--dropout", type=float, default=None, help="override the preset's dropout")
    p.add_argument("--init-from", default=None, help="start from the UNet of a saved pipeline (fine-tuning)")
    p.add_argument("--output", required=True, help="run folder: checkpoints/, pipeline/, samples.png, loss.png")
    p.add_argument("--max-steps", type=_positive_int, default=1000)
    p.add_argument("--batch-size", type=_positive_int, default=64, help="per process and micro-batch")
    p.add_argument("--gradient-accumulation-steps", type=_positive_int, default=1)
    p.add_argument("--learning-rate", "--lr", type=float, default=2e-4)
    p.add_argument("--lr-warmup-steps", type=int, default=0)
    p.add_argument("--lr-schedule", choices=["constant", "cosine", "linear"], default="constant",
                   help="after warm-up: constant, or cosine/linear decay to --lr-final-fraction of the rate at "
                        "--max-steps")
    p.add_argument("--lr-final-fraction", type=float, default=0.0)
    p.add_argument("--lr-decay-steps", type=_positive_int, default=None,
                   help="steps the decay spans (default --max-steps; keep it fixed when training in legs)")
    p.add_argument("--max-grad-norm", type=float, default=None)
    p.add_argument("--ema-rate", type=float, default=0.999)
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--checkpoints-total-limit", type=int, default=3)
    p.add_argument("--sample-every", type=int, default=0)
    p.add_argument("--num-sample-images", type=_positive_int, default=64)
    p.add_argument("--log-every", type=_positive_int, default=10)
    p.add_argument("--report-to", default=None, help="accelerate tracker: tensorboard, wandb, ...")
    p.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue a stopped run: 'latest' (default) or a checkpoint-N folder")
    p.add_argument("--fid-every", type=int, default=0, help="log FID-digits of the EMA model every N steps")
    p.add_argument("--fid-num-images", type=_positive_int, default=500)
    p.add_argument("--cpu", action="store_true", help="force CPU even where a GPU exists")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gensample", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a model")
    train_sub = train.add_subparsers(dest="method", required=True)
    ict = train_sub.add_parser("ict", help="improved Consistency Training (Song & Dhariwal 2023)")
    _add_train_common(ict)
    ict.add_argument("--s0", type=int, default=10, help="initial discretization steps")
    ict.add_argument("--s1", type=int, default=1280, help="final discretization steps")
    ict.add_argument("--curriculum-steps", type=int, default=None, help="K of the curriculum (default: --max-steps)")
    ict.add_argument("--p-mean", type=float, default=-1.1)
    ict.add_argument("--p-std", type=float, default=2.0)
    ict.add_argument("--distance", default="pseudo_huber", choices=["pseudo_huber", "pseudo_huber_elementwise", "l2"])
    ict.add_argument("--sampling-sigmas", type=float, nargs="+", default=None,
                     help="tuned few-step schedule saved with the pipeline, e.g. 80 1.5")
    # Small-data defaults tuned on the embedded digits (benchmarks/RESULTS.md, "iCT tuning"); the cosine decay is
    # ours, not the paper's (constant rate): at 8000 steps it halves the 1-step FID-digits.
    ict.set_defaults(func=cmd_train_ict, model="digits-small", learning_rate=1e-3, lr_schedule="cosine")
    from .cli_edm import add_train_subparsers as add_edm_train_subparsers  # lazy: cli_edm imports from this module
    add_edm_train_subparsers(train_sub)
    from .cli_ctm import add_train_subparsers as add_ctm_train_subparsers  # lazy, as cli_edm
    add_ctm_train_subparsers(train_sub)
    from .cli_lct import add_train_subparsers as add_lct_train_subparsers  # lazy, as cli_edm
    add_lct_train_subparsers(train_sub)
    from .cli_video import add_train_subparsers as add_video_train_subparsers  # lazy, as cli_edm
    add_video_train_subparsers(train_sub)

    sample = sub.add_parser("sample", help="sample a grid from a saved pipeline")
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

    video = sub.add_parser("video", help="motion-guided video generation (MotionGuidedVideoPipeline): GIF + strip PNG")
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
    video.add_argument("--init-noise", choices=["random", "ddim_inversion", "lowfreq_mix", "ddim_inversion+lowfreq_mix"],
                       default="ddim_inversion", help="initial noise with a reference (paper: ddim_inversion)")
    video.add_argument("--no-guidance", action="store_true", help="initial-noise control only (weight 0)")
    video.add_argument("--seed", type=int, default=0)
    video.add_argument("--fps", type=float, default=4)
    video.add_argument("--cpu-threads", type=int, default=None)
    video.set_defaults(func=cmd_video)

    demo = sub.add_parser("demo", help="the main job on the embedded digits, in a few minutes on a CPU")
    demo.add_argument("--output", default="runs/demo")
    demo.add_argument("--train-steps", type=_positive_int, default=100)
    demo.add_argument("--pipeline", default=None, help="pipeline to start from (default: the shipped ict-digits)")
    demo.add_argument("--fid-num-images", type=_positive_int, default=1000)
    demo.add_argument("--method", choices=["ict", "lct", "video"], default="ict",
                      help="ict: shipped iCT + fine-tuning; lct: the latent (VAE) path; video: motion guidance")
    demo.add_argument("--direction", type=float, default=0.0,
                      help="video: direction of the reference's motion in degrees (0 = right, 90 = up)")
    demo.add_argument("--video-num-seeds", type=_positive_int, default=16, help="video: videos per setting")
    demo.add_argument("--video-steps", type=_positive_int, default=25, help="video: DDIM steps")
    demo.add_argument("--video-weight", type=float, default=None, help="video: guidance weight sigma_t "
                      "(default: the value tuned for the shipped model, benchmarks/RESULTS.md)")
    demo.add_argument("--video-guidance-fraction", type=float, default=0.5, help="video: fraction of guided steps")
    demo.set_defaults(func=cmd_demo)

    try:
        from .metrics import cli as metrics_cli
    except ImportError:
        metrics_cli = None
    if metrics_cli is not None and hasattr(metrics_cli, "add_subparsers"):
        metrics_cli.add_subparsers(sub)
    return parser


def _train_config(args, method_extra: dict):
    from .training.trainer import TrainConfig

    return TrainConfig(
        output_dir=args.output, max_steps=args.max_steps, batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps, learning_rate=args.learning_rate,
        lr_warmup_steps=args.lr_warmup_steps, lr_schedule=getattr(args, "lr_schedule", "constant"),
        lr_final_fraction=getattr(args, "lr_final_fraction", 0.0), lr_decay_steps=getattr(args, "lr_decay_steps", None),
        max_grad_norm=args.max_grad_norm, ema_rate=args.ema_rate,
        mixed_precision=args.mixed_precision, seed=args.seed, checkpoint_every=args.checkpoint_every,
        checkpoints_total_limit=args.checkpoints_total_limit, sample_every=args.sample_every,
        num_sample_images=args.num_sample_images, log_every=args.log_every, report_to=args.report_to, cpu=args.cpu,
        progress=not args.no_progress, extra=method_extra,
    )


def _load_data_and_unet(args):
    import torch
    from diffusers import UNet2DModel

    from .data import image_dataset
    from .models import build_unet

    resolution = args.resolution or (8 if args.data == "digits" else 32)
    channels = 1 if args.data == "digits" else (args.channels or 3)
    data = image_dataset(args.data, resolution, channels)
    if args.init_from:
        unet = UNet2DModel.from_pretrained(Path(args.init_from) / "unet" if (Path(args.init_from) / "unet").is_dir()
                                           else args.init_from)
        if unet.config.sample_size != resolution or unet.config.in_channels != channels:
            raise ValueError(f"--init-from {args.init_from} is a {unet.config.in_channels}x{unet.config.sample_size}"
                             f" model but the data is {channels}x{resolution}; pass a matching --resolution.")
    else:
        overrides = {} if args.dropout is None else {"dropout": args.dropout}
        unet = build_unet(args.model, sample_size=resolution, in_channels=channels, **overrides)
    torch.manual_seed(args.seed)
    return data, unet


def cmd_train_ict(args) -> dict:
    import torch

    from .methods import ImprovedConsistencyTraining
    from .training.trainer import Trainer

    if args.threads:
        torch.set_num_threads(args.threads)
    data, unet = _load_data_and_unet(args)
    method = ImprovedConsistencyTraining(
        unet, total_steps=args.curriculum_steps or args.max_steps, s0=args.s0, s1=args.s1, p_mean=args.p_mean,
        p_std=args.p_std, distance=args.distance, sampling_sigmas=args.sampling_sigmas)
    params = sum(p.numel() for p in unet.parameters())
    evaluate = None
    if args.fid_every:
        from .metrics.fid import FIDEvaluator

        fid_eval = FIDEvaluator(reference="digits" if args.data == "digits" else args.data, feature="digits",
                                num_images=args.fid_num_images, steps=(1, 2), progress=False)
        evaluate = fid_eval
    trainer = Trainer(method, data, _train_config(args, {"unet_parameters": params, "data": args.data}),
                      evaluate=evaluate, evaluate_every=args.fid_every)
    summary = trainer.train(resume=False if args.resume is None else (True if args.resume == "latest" else args.resume))
    if trainer.accelerator.is_main_process:
        print(json.dumps(summary, indent=1))
    return summary


def _sample_images(pipe, num_images: int, batch_size: int, seed: int, **kwargs):
    import torch

    chunks, done = [], 0
    while done < num_images:
        n = min(batch_size, num_images - done)
        g = torch.Generator().manual_seed(seed + done)
        chunks.append(pipe(batch_size=n, generator=g, output_type="pt", **kwargs).images)
        done += n
    return torch.cat(chunks)


def cmd_sample(args) -> Path:
    from .images import save_image_grid
    from .loading import load_pipeline

    pipe = load_pipeline(args.pipeline)
    kwargs = {"sigmas": args.sigmas} if args.sigmas else {"num_inference_steps": args.num_inference_steps}
    ctm_kwargs = {k: v for k, v in (("gamma", args.gamma), ("sampler", args.sampler)) if v is not None}
    if ctm_kwargs:
        from .pipelines.pipeline_ctm import CTMPipeline
        from .schedulers.scheduling_ctm import check_gamma

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


def cmd_video(args) -> dict:
    from .video.generate import run_video

    return run_video(args)


def cmd_demo(args) -> dict:
    from .demo import run_demo

    return run_demo(args)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        from .training.checkpoint import CheckpointError

        if isinstance(e, (ValueError, FileNotFoundError, CheckpointError)):
            print(f"gensample: error: {e}", file=sys.stderr)
            return 2
        raise
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
