"""``gensample train edm``: train an EDM denoiser (the diffusion teacher CTM distills) and save an EDMPipeline."""
from __future__ import annotations

import argparse

from ._common import (
    _positive_int,
    add_train_common,
    load_data_and_unet,
    load_labels,
    run_training,
    seed_everything,
    set_cpu_threads,
    train_config,
)

__all__ = ["cmd_train_edm", "register"]


def register(train_subparsers: argparse._SubParsersAction) -> None:
    """Register ``edm`` under ``gensample train``."""
    edm = train_subparsers.add_parser(
        "edm", help="EDM diffusion model (Karras et al. 2022): denoising score matching, Heun sampling",
        description="Train an EDM-preconditioned denoiser with the EDM loss; the run folder's pipeline/ is an "
                    "EDMPipeline (deterministic Heun sampler, NFE = 2 * steps - 1), usable as a CTM teacher.")
    add_train_common(edm)
    edm.add_argument("--p-mean", type=float, default=-1.2, help="mean of ln(sigma) during training (EDM: -1.2)")
    edm.add_argument("--p-std", type=float, default=1.2, help="std of ln(sigma) during training (EDM: 1.2)")
    edm.add_argument("--sigma-data", type=float, default=0.5, help="data std of the preconditioning")
    edm.add_argument("--class-conditional", action="store_true",
                     help="train on the digits' class labels (UNet with K + 1 class embeddings, label K = null) for "
                          "classifier-free guidance; the pipeline then takes class_labels and guidance_scale")
    edm.add_argument("--label-dropout", type=float, default=0.1,
                     help="with --class-conditional: probability of the null label per training sample (CFG)")
    edm.add_argument("--sample-steps", type=_positive_int, nargs="+", default=[18],
                     help="Heun steps for the sample grids and --fid-every evaluations (EDM CIFAR-10: 18, NFE 35)")
    edm.set_defaults(func=cmd_train_edm)


def cmd_train_edm(args: argparse.Namespace) -> dict:
    """Run ``gensample train edm``; returns the Trainer's summary (also printed as JSON)."""
    from ..methods.edm import EDMTraining

    set_cpu_threads(args)
    seed_everything(args.seed)  # before anything is built: same flags, same weights
    if args.p_std <= 0 or args.sigma_data <= 0:
        raise ValueError(f"--p-std and --sigma-data must be > 0, got {args.p_std} and {args.sigma_data}.")
    labels, num_classes = None, None
    if args.class_conditional:
        if not 0.0 <= args.label_dropout < 1.0:
            raise ValueError(f"--label-dropout must be in [0, 1), got {args.label_dropout}.")
        labels, num_classes = load_labels(args)
        data, unet = load_data_and_unet(args, num_class_embeds=num_classes + 1)
    else:
        data, unet = load_data_and_unet(args)
    method = EDMTraining(unet, p_mean=args.p_mean, p_std=args.p_std, sigma_data=args.sigma_data,
                         num_classes=num_classes, label_dropout=args.label_dropout if num_classes else 0.0)
    params = sum(p.numel() for p in unet.parameters())
    sample_steps = tuple(args.sample_steps)
    config = train_config(args, {"unet_parameters": params, "data": args.data}, sample_steps=sample_steps)
    return run_training(args, method, data, config, fid_steps=sample_steps, labels=labels)
