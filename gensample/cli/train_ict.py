"""``gensample train ict``: improved Consistency Training (Song & Dhariwal 2023) of a UNet on images; the run folder's
pipeline/ is a ConsistencyPipeline.

:func:`cmd_train_ict` is a plain function of the parsed flags, so Python callers (the demo's fine-tuning step) run
the same training path as the command; :func:`parse_args` gives them those flags without the rest of the CLI.
"""
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

__all__ = ["add_arguments", "cmd_train_ict", "parse_args", "register"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``train ict`` (the common training flags, the iCT ones) and its defaults."""
    add_train_common(p)
    p.add_argument("--s0", type=int, default=10, help="initial discretization steps")
    p.add_argument("--s1", type=int, default=1280, help="final discretization steps")
    p.add_argument("--curriculum-steps", type=int, default=None, help="K of the curriculum (default: --max-steps)")
    p.add_argument("--p-mean", type=float, default=-1.1)
    p.add_argument("--p-std", type=float, default=2.0)
    p.add_argument("--distance", default="pseudo_huber", choices=["pseudo_huber", "pseudo_huber_elementwise", "l2"])
    p.add_argument("--sampling-sigmas", type=float, nargs="+", default=None,
                   help="tuned few-step schedule saved with the pipeline, e.g. 80 1.5")
    p.add_argument("--class-conditional", action="store_true",
                   help="train on the digits' labels (UNet with one class embedding per class, no null label); the "
                        "pipeline then takes class_labels")
    # Small-data defaults tuned on the embedded digits (benchmarks/RESULTS.md, "iCT tuning"); the cosine decay is
    # ours, not the paper's (constant rate): at 8000 steps it halves the 1-step FID-digits.
    p.set_defaults(model="digits-small", learning_rate=1e-3, lr_schedule="cosine")


def register(train_subparsers: argparse._SubParsersAction) -> None:
    """Register ``ict`` under ``gensample train``."""
    ict = train_subparsers.add_parser("ict", help="improved Consistency Training (Song & Dhariwal 2023)")
    add_arguments(ict)
    ict.set_defaults(func=cmd_train_ict)


def parse_args(argv: list[str]) -> argparse.Namespace:
    """``argv`` parsed exactly as ``gensample train ict ARGV`` would parse it."""
    parser = argparse.ArgumentParser(prog="gensample train ict")
    add_arguments(parser)
    return parser.parse_args(argv)


def cmd_train_ict(args: argparse.Namespace) -> dict:
    """Run ``gensample train ict``; returns the Trainer's summary (also printed as JSON)."""
    from ..methods import ImprovedConsistencyTraining

    set_cpu_threads(args)
    seed_everything(args.seed)  # before anything is built: same flags, same weights
    labels, unet_overrides = None, {}
    if getattr(args, "class_conditional", False):
        labels, num_classes = load_labels(args)
        unet_overrides["num_class_embeds"] = num_classes
    data, unet = load_data_and_unet(args, **unet_overrides)
    method = ImprovedConsistencyTraining(
        unet, total_steps=args.curriculum_steps or args.max_steps, s0=args.s0, s1=args.s1, p_mean=args.p_mean,
        p_std=args.p_std, distance=args.distance, sampling_sigmas=args.sampling_sigmas)
    params = sum(p.numel() for p in unet.parameters())
    config = train_config(args, {"unet_parameters": params, "data": args.data})
    return run_training(args, method, data, config, fid_steps=(1, 2), labels=labels)
