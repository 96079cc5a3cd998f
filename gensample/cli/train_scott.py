"""``gensample train scott``: SCott, stochastic consistency distillation (Liu et al., AAAI 2025) of a saved teacher
pipeline into a few-step student that takes the guidance scale as an input.

Teachers: a (class-conditional) EDM pipeline of ``gensample train edm`` -> a :class:`SCottPipeline` (digits and other
pixel data); a diffusers text-to-image latent pipeline (Stable-Diffusion-like folder) ->
:mod:`gensample.methods.scott_text2image` builds the method, its data and its flags.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

from ._common import _positive_int, add_train_common, run_training, seed_everything, set_cpu_threads, train_config

if TYPE_CHECKING:
    from ..models.scott_student import SCottStudentUNet

__all__ = ["cmd_train_scott", "register", "is_text2image_folder"]


def _non_negative_float(value: str) -> float:
    v = float(value)
    if not (v >= 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {value}")
    return v


def _eta(value: str) -> float:
    v = float(value)
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"eta must lie in [0, 1] (0 = plain consistency distillation, 1 = DDPM's "
                                         f"ancestral step), got {value}")
    return v


def _target_ema(value: str) -> float | None:
    if value.lower() == "none":
        return None
    v = float(value)
    if not 0.0 <= v < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1) or 'none' (stop-gradient target), got {value}")
    return v


def is_text2image_folder(folder: Path) -> bool:
    """Whether ``folder/model_index.json`` names a text-to-image latent pipeline: a ``_class_name`` starting with
    "StableDiffusion", or unet + vae + text_encoder + tokenizer components."""
    index = json.loads((folder / "model_index.json").read_text())
    name = index.get("_class_name")
    name = name[-1] if isinstance(name, list) else name
    parts = all(isinstance(index.get(k), list) for k in ("unet", "vae", "text_encoder", "tokenizer"))
    return (isinstance(name, str) and name.startswith("StableDiffusion")) or parts


def register(train_subparsers: argparse._SubParsersAction) -> None:
    """Register ``scott`` under ``gensample train``."""
    from ..core.sampling import ER_SDE_NOISE_SCALES
    from ..core.losses import DISTANCES
    from ..methods.scott import ADV_WEIGHT_MODES, SOLVERS

    p = train_subparsers.add_parser(
        "scott", help="SCott (Liu et al. 2025): stochastic consistency distillation with guidance, optional GAN term",
        description="Distil a frozen teacher (a class-conditional EDM pipeline from `gensample train edm "
                    "--class-conditional`, or a diffusers text-to-image pipeline) into a consistency student that "
                    "takes the guidance scale w: the teacher's step t_n -> t_m is an SDE solve (stochastic DDIM or "
                    "ER-SDE) in --substeps sub-steps; --solver ode (or --eta 0) is plain consistency distillation. "
                    "The digits student is saved as a SCottPipeline (class_labels, guidance_scale).")
    add_train_common(p)
    p.add_argument("--teacher", required=True, help="the teacher's pipeline folder (e.g. runs/edm-cond/pipeline)")
    p.add_argument("--solver", choices=SOLVERS, default="ddim",
                   help="teacher step: stochastic DDIM (--eta), first-order ER-SDE (--phi) or the ODE (CD)")
    p.add_argument("--eta", type=_eta, default=0.3, help="stochastic DDIM's eta in [0, 1] (SCott sweeps 0-0.6)")
    p.add_argument("--phi", choices=sorted(ER_SDE_NOISE_SCALES), default="er-sde-5",
                   help="ER-SDE noise-scale function (Cui et al. 2023; 'ode' = DDIM, 'sde' = DDPM)")
    p.add_argument("--substeps", type=int, default=3, help="teacher sub-steps between t_n and t_m (SCott: 3)")
    p.add_argument("--num-sigmas", type=int, default=18,
                   help="points N of the Karras grid [0.002, 80] (the teacher's 18-step Heun schedule)")
    p.add_argument("--skip", type=int, default=1, help="t_m = sigma_{n - skip} (grid intervals per teacher solve)")
    p.add_argument("--guidance-range", type=_non_negative_float, nargs=2, default=None, metavar=("W_MIN", "W_MAX"),
                   help="w ~ U[W_MIN, W_MAX] per sample (default: 1 2 for a guidance teacher, 1 1 otherwise)")
    p.add_argument("--guidance-scale", type=_non_negative_float, default=None,
                   help="default w of the exported pipeline and the sample grids (default: middle of the range)")
    p.add_argument("--distance", choices=sorted(set(DISTANCES) - {"edm"}), default="pseudo_huber")
    p.add_argument("--huber-c", type=float, default=None, help="distance scale c (default 0.00054 sqrt(d))")
    p.add_argument("--target-ema", type=_target_ema, default=0.95,
                   help="rate of the EMA target network, or 'none' for the stop-gradient student (SCott/LCM: 0.95)")
    p.add_argument("--adv-weight", type=_non_negative_float, default=0.0,
                   help="lambda_adv of the adversarial term (SCott: 0.4; 0: off)")
    p.add_argument("--adv-weight-mode", choices=ADV_WEIGHT_MODES, default="fixed")
    p.add_argument("--discriminator", choices=["teacher-lora", "teacher-full", "standalone"], default="teacher-lora",
                   help="the teacher's encoder with LoRA (paper), the teacher's encoder trained in full, or a fresh "
                        "'tiny' encoder")
    p.add_argument("--lora-rank", type=_positive_int, default=8)
    p.add_argument("--adv-p-mean", type=float, default=-1.2, help="ln-mean of the discriminator's noise level")
    p.add_argument("--adv-p-std", type=float, default=1.2, help="ln-std of the discriminator's noise level")
    p.add_argument("--discriminator-lr", type=float, default=None, help="default: --lr")
    p.add_argument("--discriminator-betas", type=float, nargs=2, default=[0.5, 0.9], metavar=("B1", "B2"))
    p.add_argument("--sample-steps", type=_positive_int, nargs="+", default=[1, 2, 4],
                   help="consistency steps for the sample grids and --fid-every evaluations")
    try:  # the text-to-image flags, where that module provides them
        from ..methods import scott_text2image

        if hasattr(scott_text2image, "add_text2image_arguments"):
            scott_text2image.add_text2image_arguments(p)
    except ImportError:
        pass
    p.set_defaults(func=cmd_train_scott)


def _student(args: argparse.Namespace, teacher_unet) -> SCottStudentUNet:
    """The student backbone: from --init-from (a SCottPipeline folder or its unet/), else the teacher's weights."""
    from ..methods.scott import check_student_matches_teacher
    from ..models.scott_student import SCottStudentUNet

    if args.init_from:
        path = Path(args.init_from)
        path = path / "unet" if (path / "unet").is_dir() else path
        student = SCottStudentUNet.from_pretrained(path)
    else:
        from ..models.scott_student import init_from_teacher

        config = {k: v for k, v in dict(teacher_unet.config).items() if not k.startswith("_")}
        if args.dropout is not None:
            config["dropout"] = args.dropout
        student = SCottStudentUNet(**config)
        init_from_teacher(student, teacher_unet)
    check_student_matches_teacher(student, teacher_unet)
    if student.config.num_class_embeds != teacher_unet.config.num_class_embeds:
        raise ValueError(f"--init-from {args.init_from} has num_class_embeds={student.config.num_class_embeds} but "
                         f"the teacher {teacher_unet.config.num_class_embeds}; distil from the same teacher.")
    return student


def _discriminator(args: argparse.Namespace, teacher_unet):
    from ..models.scott_discriminator import SCottDiscriminator

    if args.discriminator == "standalone":
        c = teacher_unet.config
        return SCottDiscriminator.standalone("tiny", sample_size=c.sample_size, in_channels=c.in_channels,
                                             num_class_embeds=c.num_class_embeds)
    rank = args.lora_rank if args.discriminator == "teacher-lora" else None
    return SCottDiscriminator.from_teacher(teacher_unet, lora_rank=rank)


def cmd_train_scott(args: argparse.Namespace) -> dict:
    """Run ``gensample train scott``; returns the Trainer's summary (also printed as JSON)."""
    import torch

    set_cpu_threads(args)
    seed_everything(args.seed)  # before anything is built: same flags, same weights
    teacher_dir = Path(args.teacher)
    if not (teacher_dir / "model_index.json").is_file():
        raise ValueError(f"--teacher {args.teacher} is not a diffusion pipeline folder (no model_index.json); pass "
                         "the pipeline/ folder a `gensample train edm --class-conditional` run wrote (or a diffusers "
                         "text-to-image pipeline folder).")
    if args.substeps < 1:
        raise ValueError(f"--substeps must be >= 1 (the teacher's sub-steps between t_n and t_m; SCott: 3), got "
                         f"{args.substeps}.")
    if args.model != "digits":
        raise ValueError(f"--model {args.model} does not apply to `train scott`: the student copies the teacher's "
                         "architecture.")
    sample_steps = tuple(args.sample_steps)
    if is_text2image_folder(teacher_dir):
        from ..methods.scott_text2image import build_text2image_scott

        method, data, labels = build_text2image_scott(args, teacher_dir)
        config = train_config(args, {"teacher": str(args.teacher), "data": args.data}, sample_steps=sample_steps)
        return run_training(args, method, data, config, labels=labels)

    from ..core.sigmas import karras_sigmas
    from ..data import image_dataset
    from ..loading import load_pipeline
    from ..methods.scott import SCottDistillation, guided_teacher
    from ..pipelines.pipeline_edm import EDMPipeline

    pipe = load_pipeline(args.teacher)
    if not isinstance(pipe, EDMPipeline):
        raise ValueError(f"--teacher {args.teacher} holds a {type(pipe).__name__}; SCott distils an EDMPipeline "
                         "(`gensample train edm --class-conditional --label-dropout 0.1`) or a text-to-image "
                         "pipeline.")
    num_classes = pipe.config.get("num_classes")
    guidance_range = tuple(args.guidance_range) if args.guidance_range else ((1.0, 2.0) if num_classes else
                                                                              (1.0, 1.0))
    if num_classes is None and (guidance_range != (1.0, 1.0) or args.guidance_scale not in (None, 1.0)):
        raise ValueError(f"--guidance-range/--guidance-scale other than 1 need a classifier-free-guidance teacher; "
                         f"{args.teacher} is unconditional (no num_classes). Retrain it with `gensample train edm "
                         "--class-conditional --label-dropout 0.1`, or drop the flags.")
    cfg = pipe.unet.config
    resolution = args.resolution or cfg.sample_size
    channels = 1 if args.data == "digits" else (args.channels or cfg.in_channels)
    if (resolution, channels) != (cfg.sample_size, cfg.in_channels):
        raise ValueError(f"the teacher is a {cfg.in_channels}-channel {cfg.sample_size}x{cfg.sample_size} model but "
                         f"the data would be {channels}-channel {resolution}x{resolution}; match --resolution/"
                         "--channels to the teacher.")
    data, labels = image_dataset(args.data, resolution, channels), None
    if num_classes is not None:
        if args.data != "digits":
            raise ValueError(f"the teacher is class-conditional but --data {args.data} has no labels; distil it on "
                             "--data digits.")
        from ..data.digits import load_digits

        _, labels = load_digits("train", resolution, return_labels=True)
    torch.manual_seed(args.seed)
    student = _student(args, pipe.unet)
    discriminator = _discriminator(args, pipe.unet) if args.adv_weight > 0 else None
    sigma_min, sigma_max = pipe.scheduler.config.sigma_min, pipe.scheduler.config.sigma_max
    sigmas = karras_sigmas(args.num_sigmas, sigma_min, sigma_max)
    sigmas[0], sigmas[-1] = sigma_min, sigma_max  # the ramp's end points carry a last-bit rounding
    method = SCottDistillation(
        student, guided_teacher(pipe), sigmas, skip=args.skip, solver=args.solver, eta=args.eta,
        substeps=args.substeps, phi=args.phi, guidance_range=guidance_range, distance=args.distance,
        huber_c=args.huber_c, target_ema=args.target_ema, adv_weight=args.adv_weight, discriminator=discriminator,
        adv_weight_mode=args.adv_weight_mode, adv_p_mean=args.adv_p_mean, adv_p_std=args.adv_p_std,
        discriminator_lr=args.discriminator_lr, discriminator_betas=tuple(args.discriminator_betas),
        num_classes=num_classes, sigma_data=pipe.scheduler.config.sigma_data,
        sample_guidance_scale=args.guidance_scale)
    extra = {"unet_parameters": sum(p.numel() for p in student.parameters()), "data": args.data,
             "teacher": str(args.teacher), "init_from": args.init_from}
    config = train_config(args, extra, sample_steps=sample_steps)
    return run_training(args, method, data, config, fid_steps=sample_steps, labels=labels)
