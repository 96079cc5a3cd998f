"""``gensample train ctm``: distil a saved EDM pipeline (``gensample train edm``) into a Consistency Trajectory Model
(Kim et al., ICLR 2024) and save a CTMPipeline (gamma-sampling, or EDM Heun through g(x, t, t)).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from ._common import _positive_int, add_train_common, run_training, seed_everything, set_cpu_threads, train_config

if TYPE_CHECKING:
    from diffusers import UNet2DModel

    from ..models.ctm_unet import CTMUNet2DModel

__all__ = ["cmd_train_ctm", "register"]


def _gamma(value: str) -> float:
    """argparse type: a float in [0, 1]."""
    v = float(value)
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"gamma must lie in [0, 1], got {v}")
    return v


def register(train_subparsers: argparse._SubParsersAction) -> None:
    """Register ``ctm`` under ``gensample train``."""
    from ..methods.ctm import CTM_DISTANCES, TARGET_INNER

    ctm = train_subparsers.add_parser(
        "ctm", help="Consistency Trajectory Model (Kim et al. 2024): distil an EDM teacher, gamma-sampling",
        description="Distil a frozen EDM teacher into a CTM student G(x, t, s) initialised from it: CTM loss "
                    "(teacher Heun solver + EMA target network), DSM term with adaptive weight, optional GAN term "
                    "on alternate steps. The run folder's pipeline/ is a CTMPipeline. The student copies the "
                    "teacher's architecture, so --model does not apply (--dropout overrides its dropout).")
    add_train_common(ctm)
    ctm.add_argument("--teacher", required=True,
                     help="folder of the EDM pipeline to distil (e.g. runs/edm/pipeline from `gensample train edm`)")
    ctm.add_argument("--num-sigmas", type=int, default=18, help="N of the Karras time grid (CTM CIFAR-10: 18)")
    ctm.add_argument("--max-heun-steps", type=_positive_int, default=None,
                     help="K, the most teacher Heun steps per example (default N - 1)")
    ctm.add_argument("--heun-step-multiplier", type=float, default=1.0, help="p(k) proportional to k^this")
    ctm.add_argument("--target-ema", type=float, default=0.999, help="rate mu of the target network's EMA")
    ctm.add_argument("--target-inner", choices=TARGET_INNER, default="student",
                     help="weights of the target's inner jump x_u -> s: 'student' (stop-grad, CTM default) or "
                          "'target' (the EMA)")
    ctm.add_argument("--distance", choices=CTM_DISTANCES, default="pseudo_huber",
                     help="CTM distance (digits_features = frozen digits CNN; lpips = CTM's own, needs "
                          "--lpips-weights)")
    ctm.add_argument("--lpips-weights", nargs="+", default=None, metavar="PATH",
                     help="LPIPS weights for --distance lpips: the torchvision backbone (vgg16-397923af.pth or "
                          "alexnet-owt-7be5be79.pth) and the lpips package's lin file (vgg.pth or alex.pth), or one "
                          "combined .safetensors (gensample.metrics.lpips.save_lpips_weights); never downloaded")
    ctm.add_argument("--lpips-resize", type=int, default=224,
                     help="bilinear resize of LPIPS inputs (CTM: 224; 0 = none)")
    ctm.add_argument("--lpips-pooling", choices=["max", "avg"], default="max",
                     help="VGG pooling: max (LPIPS) or avg (sony/ctm's piq LPIPS(replace_pooling=True))")
    ctm.add_argument("--huber-c", type=float, default=None, help="pseudo-Huber c (default 0.00054 sqrt(d))")
    ctm.add_argument("--dsm-weight", type=float, default=1.0,
                     help="weight of the DSM term (0 disables it). The paper's 1 is the default; on the digits at "
                     "2,000 steps 0 was better at 1, 2 and 4 NFE and made 2/4 NFE beat 1 (benchmarks/RESULTS.md, "
                     "issue #17)")
    ctm.add_argument("--dsm-p-mean", type=float, default=-1.2, help="log-normal half of the DSM sigmas: mean")
    ctm.add_argument("--dsm-p-std", type=float, default=1.2, help="log-normal half of the DSM sigmas: std")
    ctm.add_argument("--gan", action="store_true", help="add the GAN term (discriminator on alternate steps)")
    ctm.add_argument("--gan-weight", type=float, default=1.0, help="weight of the GAN term")
    ctm.add_argument("--gan-start-step", type=int, default=0, help="first step of the GAN phase")
    ctm.add_argument("--gan-augment", default="color,translation,cutout",
                     help="DiffAugment policy for the discriminator ('' for none)")
    ctm.add_argument("--discriminator-lr", type=float, default=None,
                     help="the discriminator's learning rate (default: --learning-rate)")
    ctm.add_argument("--discriminator-betas", type=float, nargs=2, default=[0.5, 0.9], metavar=("B1", "B2"),
                     help="the discriminator's Adam betas (CTM: 0.5 0.9)")
    ctm.add_argument("--gamma", type=_gamma, default=0.0,
                     help="default gamma of the exported pipeline and the sample grids (0 = deterministic jumps)")
    ctm.add_argument("--sample-steps", type=_positive_int, nargs="+", default=[1, 2],
                     help="gamma-sampling steps for the sample grids and --fid-every evaluations")
    ctm.set_defaults(func=cmd_train_ctm)


def _student(args: argparse.Namespace, teacher_unet: UNet2DModel) -> CTMUNet2DModel:
    """The CTM backbone: from --init-from (a CTMPipeline folder or its unet/), else from the teacher's weights."""
    from ..models.ctm_unet import CTMUNet2DModel, init_from_teacher

    if args.init_from:
        path = Path(args.init_from)
        path = path / "unet" if (path / "unet").is_dir() else path
        student = CTMUNet2DModel.from_pretrained(path)
    else:
        config = {k: v for k, v in dict(teacher_unet.config).items() if not k.startswith("_")}
        if args.dropout is not None:
            config["dropout"] = args.dropout
        student = CTMUNet2DModel(**config)
        init_from_teacher(student, teacher_unet)
    tc, sc = teacher_unet.config, student.config
    if (sc.in_channels, sc.sample_size) != (tc.in_channels, tc.sample_size):
        raise ValueError(f"--init-from {args.init_from} is a {sc.in_channels}x{sc.sample_size} model but the teacher "
                         f"is {tc.in_channels}x{tc.sample_size}.")
    return student


def cmd_train_ctm(args: argparse.Namespace) -> dict:
    """Run ``gensample train ctm``; returns the Trainer's summary (also printed as JSON)."""
    import torch

    from ..data import image_dataset
    from ..loading import load_pipeline
    from ..methods.ctm import CTMTraining
    from ..pipelines.pipeline_edm import EDMPipeline

    set_cpu_threads(args)
    seed_everything(args.seed)  # before anything is built: same flags, same weights
    if args.model != "digits":
        raise ValueError(f"--model {args.model} does not apply to `train ctm`: the student copies the teacher's "
                         "architecture (use --dropout to change its dropout).")
    if args.distance == "lpips" and not args.lpips_weights:
        from ..metrics.lpips import lpips_weights_help

        raise ValueError(f"--distance lpips needs --lpips-weights. {lpips_weights_help()}")
    if args.lpips_weights and args.distance != "lpips":
        raise ValueError(f"--lpips-weights applies to --distance lpips only (got --distance {args.distance}).")
    if args.lpips_weights and len(args.lpips_weights) > 2:
        raise ValueError("--lpips-weights takes one combined file or two files (backbone, lin), got "
                         f"{len(args.lpips_weights)}.")
    lpips_weights = None
    if args.lpips_weights:
        lpips_weights = args.lpips_weights[0] if len(args.lpips_weights) == 1 else tuple(args.lpips_weights)
    teacher = load_pipeline(args.teacher)
    if not isinstance(teacher, EDMPipeline):
        raise ValueError(f"--teacher {args.teacher} holds a {type(teacher).__name__}; CTM distils an EDMPipeline "
                         "(train one with `gensample train edm`).")
    cfg = teacher.unet.config
    resolution = args.resolution or cfg.sample_size
    channels = 1 if args.data == "digits" else (args.channels or cfg.in_channels)
    if (resolution, channels) != (cfg.sample_size, cfg.in_channels):
        raise ValueError(f"the teacher is a {cfg.in_channels}-channel {cfg.sample_size}x{cfg.sample_size} model but "
                         f"the data would be {channels}-channel {resolution}x{resolution}; match --resolution/"
                         "--channels to the teacher.")
    data = image_dataset(args.data, resolution, channels)
    torch.manual_seed(args.seed)
    student = _student(args, teacher.unet)
    method = CTMTraining(
        teacher, student=student, num_sigmas=args.num_sigmas, max_heun_steps=args.max_heun_steps,
        heun_step_multiplier=args.heun_step_multiplier, target_ema=args.target_ema, target_inner=args.target_inner,
        distance=args.distance, huber_c=args.huber_c, lpips_weights=lpips_weights,
        lpips_resize=args.lpips_resize or None, lpips_pooling=args.lpips_pooling, dsm_weight=args.dsm_weight,
        dsm_p_mean=args.dsm_p_mean, dsm_p_std=args.dsm_p_std, gan=args.gan, gan_weight=args.gan_weight,
        gan_start_step=args.gan_start_step, gan_augment=args.gan_augment, discriminator_lr=args.discriminator_lr,
        discriminator_betas=tuple(args.discriminator_betas), sample_gamma=args.gamma, seed=args.seed,
    )
    params = sum(p.numel() for p in student.parameters())
    extra = {"unet_parameters": params, "data": args.data, "teacher": str(args.teacher),
             "init_from": args.init_from}
    if args.lpips_weights:
        extra["lpips_weights"] = [str(p) for p in args.lpips_weights]
    sample_steps = tuple(args.sample_steps)
    config = train_config(args, extra, sample_steps=sample_steps)
    return run_training(args, method, data, config, fid_steps=sample_steps)
