"""``gensample train edm``: train an EDM denoiser (the diffusion teacher CTM distills) and save an EDMPipeline.

Wired into ``gensample.cli.build_parser`` by ``add_train_subparsers(train_sub)``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json

from .cli import _add_train_common, _load_data_and_unet, _positive_int, _train_config

__all__ = ["add_train_subparsers", "cmd_train_edm"]


def add_train_subparsers(train_subparsers: argparse._SubParsersAction) -> None:
    """Register ``edm`` under ``gensample train``."""
    edm = train_subparsers.add_parser(
        "edm", help="EDM diffusion model (Karras et al. 2022): denoising score matching, Heun sampling",
        description="Train an EDM-preconditioned denoiser with the EDM loss; the run folder's pipeline/ is an "
                    "EDMPipeline (deterministic Heun sampler, NFE = 2 * steps - 1), usable as a CTM teacher.")
    _add_train_common(edm)
    edm.add_argument("--p-mean", type=float, default=-1.2, help="mean of ln(sigma) during training (EDM: -1.2)")
    edm.add_argument("--p-std", type=float, default=1.2, help="std of ln(sigma) during training (EDM: 1.2)")
    edm.add_argument("--sigma-data", type=float, default=0.5, help="data std of the preconditioning")
    edm.add_argument("--sample-steps", type=_positive_int, nargs="+", default=[18],
                     help="Heun steps for the sample grids and --fid-every evaluations (EDM CIFAR-10: 18, NFE 35)")
    edm.set_defaults(func=cmd_train_edm)


def cmd_train_edm(args) -> dict:
    import torch

    from .methods.edm import EDMTraining
    from .training.trainer import Trainer

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.p_std <= 0 or args.sigma_data <= 0:
        raise ValueError(f"--p-std and --sigma-data must be > 0, got {args.p_std} and {args.sigma_data}.")
    data, unet = _load_data_and_unet(args)
    method = EDMTraining(unet, p_mean=args.p_mean, p_std=args.p_std, sigma_data=args.sigma_data)
    params = sum(p.numel() for p in unet.parameters())
    config = dataclasses.replace(_train_config(args, {"unet_parameters": params, "data": args.data}),
                                 sample_steps=tuple(args.sample_steps))
    evaluate = None
    if args.fid_every:
        from .metrics.fid import FIDEvaluator

        evaluate = FIDEvaluator(reference="digits" if args.data == "digits" else args.data, feature="digits",
                                num_images=args.fid_num_images, steps=tuple(args.sample_steps), progress=False)
    trainer = Trainer(method, data, config, evaluate=evaluate, evaluate_every=args.fid_every)
    resume = False if args.resume is None else (True if args.resume == "latest" else args.resume)
    summary = trainer.train(resume=resume)
    if trainer.accelerator.is_main_process:
        print(json.dumps(summary, indent=1))
    return summary
