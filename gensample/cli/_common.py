"""What the ``gensample train <method>`` commands share: the common flags, the TrainConfig they map to, the data +
UNet loading of the pixel-space methods, and the one tail every training handler ends with (FID hook -> Trainer ->
resume -> printed summary).

Command modules import from here; this module imports only the library (lazily, so building the parser stays cheap).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from diffusers import UNet2DModel

    from ..methods.base import TrainingMethod
    from ..metrics.fid import FIDEvaluator
    from ..training.trainer import TrainConfig, Trainer

__all__ = ["RESUME_HELP", "_non_negative_int", "_positive_int", "add_train_common", "fid_evaluator",
           "load_data_and_unet", "resume_target", "run_training", "seed_everything", "set_cpu_threads", "train_config"]

#: the help of every training command's --resume
RESUME_HELP = ("continue a stopped run: 'latest' (the default when no value is given; the newest valid checkpoint, "
               "an error when there is none), 'auto' (the same, but start from step 0 when the run has no checkpoint "
               "yet), or a checkpoint-N / run folder")


# The leading underscore stays: argparse names the type in its errors ("invalid _positive_int value: 'x'").
def _positive_int(value: str) -> int:
    v = int(value)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _non_negative_int(value: str) -> int:
    v = int(value)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (0: off), got {v}")
    return v


def _thread_count(value: str) -> int:
    """``--threads``: torch CPU threads, an integer >= 1 (omit the flag for torch's default)."""
    v = int(value)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 (torch CPU threads; omit --threads for torch's default), "
                                         f"got {v}")
    return v


def add_train_common(p: argparse.ArgumentParser) -> None:
    """The flags of every image-model ``gensample train`` method (data, model, optimisation, run, FID hook)."""
    p.add_argument("--data", default="digits", help="'digits' (embedded set) or a folder of images")
    p.add_argument("--resolution", type=_positive_int, default=None,
                   help="image size (default: 8 for digits, 32 else)")
    p.add_argument("--channels", type=int, default=None, help="1 or 3 for image folders (default 3)")
    p.add_argument("--model", default="digits",
                   help="UNet preset (tiny, digits, cifar10, imagenet64) or a JSON config")
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
    p.add_argument("--checkpoint-every", type=_non_negative_int, default=500,
                   help="steps between checkpoints (0: only the final one)")
    p.add_argument("--checkpoints-total-limit", type=_non_negative_int, default=3,
                   help="valid checkpoints kept (0: all)")
    p.add_argument("--snapshot-every", type=_non_negative_int, default=0,
                   help="keep the raw weights every N steps in OUTPUT/snapshots/ (weights only, for `gensample lcsc`; "
                        "0: off)")
    p.add_argument("--sample-every", type=_non_negative_int, default=0)
    p.add_argument("--num-sample-images", type=_positive_int, default=64)
    p.add_argument("--log-every", type=_positive_int, default=10)
    p.add_argument("--report-to", default=None, help="accelerate tracker: tensorboard, wandb, ...")
    p.add_argument("--resume", nargs="?", const="latest", default=None, help=RESUME_HELP)
    p.add_argument("--fid-every", type=_non_negative_int, default=0,
                   help="log FID-digits of the EMA model every N steps")
    p.add_argument("--fid-num-images", type=_positive_int, default=500)
    p.add_argument("--cpu", action="store_true", help="force CPU even where a GPU exists")
    p.add_argument("--threads", type=_thread_count, default=None, help="torch CPU threads (>= 1)")
    p.add_argument("--no-progress", action="store_true")


def set_cpu_threads(args: argparse.Namespace) -> None:
    """Apply ``--threads`` first, so that data loading and model building already run with it."""
    if args.threads is not None and args.threads < 1:  # commands that declare --threads with type=int
        raise ValueError(f"--threads must be >= 1 (torch CPU threads; omit it for torch's default), got "
                         f"{args.threads}.")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy and Python's ``random`` with ``--seed``. Every ``train`` command calls it
    before it builds anything (data, networks), so that two runs with the same flags give the same weights."""
    import random

    import numpy as np
    import torch

    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def train_config(args: argparse.Namespace, extra: dict, **fields: Any) -> TrainConfig:
    """The TrainConfig of the parsed flags; ``extra`` is recorded in the run config, ``fields`` set the rest (e.g.
    ``sample_steps``)."""
    from ..training.trainer import TrainConfig

    # getattr: `train video-diffusion` has no --lr-schedule / --lr-final-fraction / --lr-decay-steps
    return TrainConfig(
        output_dir=args.output, max_steps=args.max_steps, batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps, learning_rate=args.learning_rate,
        lr_warmup_steps=args.lr_warmup_steps, lr_schedule=getattr(args, "lr_schedule", "constant"),
        lr_final_fraction=getattr(args, "lr_final_fraction", 0.0),
        lr_decay_steps=getattr(args, "lr_decay_steps", None),
        max_grad_norm=args.max_grad_norm, ema_rate=args.ema_rate,
        mixed_precision=args.mixed_precision, seed=args.seed, checkpoint_every=args.checkpoint_every,
        checkpoints_total_limit=args.checkpoints_total_limit, sample_every=args.sample_every,
        snapshot_every=getattr(args, "snapshot_every", 0),
        num_sample_images=args.num_sample_images, log_every=args.log_every, report_to=args.report_to, cpu=args.cpu,
        progress=not args.no_progress, extra=extra, **fields,
    )


def load_labels(args: argparse.Namespace) -> tuple[torch.Tensor, int]:
    """(labels, number of classes) of ``--data`` for a class-conditional run: the embedded digits' train-split labels
    (0..9, in the order of the images ``load_data_and_unet`` loads)."""
    if args.data != "digits":
        raise ValueError(f"class labels are only available for --data digits; {args.data!r} is an unlabelled image "
                         "folder. Train it unconditionally (drop --class-conditional).")
    from ..data.digits import load_digits

    _, labels = load_digits("train", args.resolution or 8, return_labels=True)
    return labels, int(labels.max()) + 1


def load_data_and_unet(args: argparse.Namespace, **unet_overrides: Any) -> tuple[torch.Tensor, UNet2DModel]:
    """The images of ``--data`` and a UNet for them: from ``--init-from``, else a fresh ``--model`` preset initialised
    from ``--seed`` (seeded right before it is built; ``unet_overrides`` go to the preset, e.g. num_class_embeds).
    Then seeds torch with ``--seed`` again, which the training method built next draws from."""
    import torch
    from diffusers import UNet2DModel

    from ..data import image_dataset
    from ..models import build_unet

    resolution = args.resolution or (8 if args.data == "digits" else 32)
    channels = 1 if args.data == "digits" else (args.channels or 3)
    data = image_dataset(args.data, resolution, channels)
    if args.init_from:
        # --dropout overrides the saved config (e.g. ECT tuning an EDM denoiser trained without dropout)
        override = {} if args.dropout is None else {"dropout": args.dropout}
        unet = UNet2DModel.from_pretrained(Path(args.init_from) / "unet" if (Path(args.init_from) / "unet").is_dir()
                                           else args.init_from, **override)
        if unet.config.sample_size != resolution or unet.config.in_channels != channels:
            raise ValueError(f"--init-from {args.init_from} is a {unet.config.in_channels}x{unet.config.sample_size}"
                             f" model but the data is {channels}x{resolution}; pass a matching --resolution.")
        for key, value in unet_overrides.items():
            if unet.config.get(key) != value:
                raise ValueError(f"--init-from {args.init_from} has {key}={unet.config.get(key)}, this run needs "
                                 f"{key}={value}.")
    else:
        overrides = dict(unet_overrides) if args.dropout is None else {**unet_overrides, "dropout": args.dropout}
        seed_everything(args.seed)
        unet = build_unet(args.model, sample_size=resolution, in_channels=channels, **overrides)
    torch.manual_seed(args.seed)
    return data, unet


def fid_evaluator(args: argparse.Namespace, steps: tuple[int, ...], reference: str | None = None
                  ) -> FIDEvaluator | None:
    """The ``--fid-every`` training hook (FID-digits of the EMA model at ``steps``), or None when it is off. The
    reference defaults to ``--data`` (the digits train split for 'digits')."""
    if not args.fid_every:
        return None
    from ..metrics.fid import FIDEvaluator

    if reference is None:
        reference = "digits" if args.data == "digits" else args.data
    return FIDEvaluator(reference=reference, feature="digits", num_images=args.fid_num_images, steps=tuple(steps),
                        progress=False)


def resume_target(args: argparse.Namespace) -> bool | str:
    """``--resume`` as Trainer.train takes it: False (fresh run), True (latest checkpoint; none is an error), "auto"
    (latest if there is one) or a checkpoint / run folder."""
    if args.resume is None:
        return False
    return True if args.resume == "latest" else ("auto" if args.resume == "auto" else args.resume)


def run_training(args: argparse.Namespace, method: TrainingMethod, data: torch.Tensor, config: TrainConfig, *,
                 fid_steps: tuple[int, ...] | None = None, fid_reference: str | None = None,
                 trainer_class: type[Trainer] | None = None, labels: torch.Tensor | None = None) -> dict:
    """The tail of every training command: attach the FID hook (when ``fid_steps`` is given and ``--fid-every`` is
    on), train (resuming per ``--resume``), print the summary as JSON on the main process, and return it. ``labels``
    (int64, one per image) make every batch the tuple ``(images, labels)``."""
    from ..training.trainer import Trainer

    evaluate = None if fid_steps is None else fid_evaluator(args, fid_steps, fid_reference)
    trainer = (trainer_class or Trainer)(method, data, config, evaluate=evaluate,
                                         evaluate_every=args.fid_every if evaluate is not None else 0, labels=labels)
    summary = trainer.train(resume=resume_target(args))
    if trainer.accelerator.is_main_process:
        print(json.dumps(summary, indent=1))
    return summary
