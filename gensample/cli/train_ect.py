"""``gensample train ect``: Easy Consistency Tuning (Geng et al., ICLR 2025) of a pretrained EDM denoiser into a
consistency model; the run folder's pipeline/ is a ConsistencyPipeline, like ``train ict``'s."""
from __future__ import annotations

import argparse

from ._common import (
    add_train_common,
    load_data_and_unet,
    load_labels,
    run_training,
    seed_everything,
    set_cpu_threads,
    train_config,
)

__all__ = ["add_arguments", "cmd_train_ect", "register"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``train ect`` (the common training flags, the ECT ones) and its defaults."""
    add_train_common(p)
    p.add_argument("--from-scratch", action="store_true",
                   help="allow a run without --init-from (ECT is meant to tune a pretrained EDM denoiser)")
    p.add_argument("--q", type=float, default=2.0, help="the gap t - r shrinks by q at every stage")
    p.add_argument("--num-stages", type=int, default=8, help="equal stages over --curriculum-steps")
    p.add_argument("--curriculum-steps", type=int, default=None,
                   help="steps the stages span (default: --max-steps; keep it fixed when training in legs)")
    p.add_argument("--mapping-k", type=float, default=8.0)
    p.add_argument("--mapping-b", type=float, default=1.0)
    p.add_argument("--p-mean", type=float, default=-1.1)
    p.add_argument("--p-std", type=float, default=2.0)
    p.add_argument("--distance", default="pseudo_huber", choices=["pseudo_huber", "pseudo_huber_elementwise", "l2"])
    p.add_argument("--sampling-sigmas", type=float, nargs="+", default=None,
                   help="tuned few-step schedule saved with the pipeline, e.g. 80 1.2")
    p.add_argument("--class-conditional", action="store_true",
                   help="train on the digits' labels (the --init-from UNet must have one embedding per class)")
    # Tuning from a trained denoiser: a tenth of iCT's from-scratch rate, decayed (our choice for the digits).
    p.set_defaults(model="digits-small", learning_rate=1e-4, lr_schedule="cosine")


def register(train_subparsers: argparse._SubParsersAction) -> None:
    """Register ``ect`` under ``gensample train``."""
    ect = train_subparsers.add_parser(
        "ect", help="Easy Consistency Tuning of an EDM denoiser (Geng et al. 2025)",
        description="Tune a pretrained EDM denoiser (--init-from RUN/pipeline of `gensample train edm`) into a "
                    "one/few-step consistency model with ECT's continuous-time schedule; the run folder's pipeline/ "
                    "is a ConsistencyPipeline.")
    add_arguments(ect)
    ect.set_defaults(func=cmd_train_ect)


def cmd_train_ect(args: argparse.Namespace) -> dict:
    """Run ``gensample train ect``; returns the Trainer's summary (also printed as JSON)."""
    from ..methods import EasyConsistencyTuning

    if not args.init_from and not args.from_scratch:
        raise ValueError("--init-from is missing: ECT tunes a pretrained diffusion model; pass --init-from "
                         "RUN/pipeline of `gensample train edm` (or --from-scratch to train from a fresh UNet).")
    set_cpu_threads(args)
    seed_everything(args.seed)
    labels, unet_overrides = None, {}
    if args.class_conditional:
        labels, num_classes = load_labels(args)
        unet_overrides["num_class_embeds"] = num_classes
    data, unet = load_data_and_unet(args, **unet_overrides)
    method = EasyConsistencyTuning(
        unet, total_steps=args.curriculum_steps or args.max_steps, q=args.q, num_stages=args.num_stages,
        mapping_k=args.mapping_k, mapping_b=args.mapping_b, p_mean=args.p_mean, p_std=args.p_std,
        distance=args.distance, sampling_sigmas=args.sampling_sigmas)
    params = sum(p.numel() for p in unet.parameters())
    config = train_config(args, {"unet_parameters": params, "data": args.data, "init_from": args.init_from})
    return run_training(args, method, data, config, fid_steps=(1, 2), labels=labels)
