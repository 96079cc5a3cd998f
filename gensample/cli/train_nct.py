"""``gensample train nct``: Noise Consistency Training (Luo et al. 2025) of a control adapter on a frozen one-step
generator (a ConsistencyPipeline folder); the run folder's pipeline/ is an NCTPipeline (base + adapter).

No training images are read: NCT draws z, makes x = f(z) with the base and c ~ p(c | x) with the control model. The
Trainer still iterates over a dataset, so it is given a constant tensor of ``--batch-size``-driving zeros
(:data:`DRIVER_SIZE` rows); only its batch size is used.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ._common import add_train_common, run_training, seed_everything, set_cpu_threads, train_config

__all__ = ["ABLATIONS", "DRIVER_SIZE", "add_arguments", "cmd_train_nct", "parse_args", "register"]

#: rows of the constant batch-size driver handed to the Trainer in place of images
DRIVER_SIZE = 1024
#: the paper's ablation (its Table of Canny results): which loss terms and which lambda update
ABLATIONS = ("full", "no-consistency", "no-boundary", "fixed-lambda")


def _positive_float(value: str) -> float:
    import math

    v = float(value)
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {value}")
    return v


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``train nct``: the common training flags (the data/model ones are unused) and NCT's own."""
    add_train_common(p)
    p.add_argument("--base", required=True,
                   help="the frozen one-step generator: a ConsistencyPipeline folder (e.g. assets/pipelines/ict-digits"
                        " or the pipeline/ of `gensample train ict`)")
    p.add_argument("--control", required=True, choices=["class", "lowres", "edges"],
                   help="the control model p(c|x): class (digits classifier), lowres (average pooling by "
                        "--lowres-factor, super-resolution) or edges (Sobel magnitude)")
    p.add_argument("--lowres-factor", type=int, default=2)
    p.add_argument("--class-argmax", action="store_true",
                   help="class control: c = argmax of the classifier instead of c ~ softmax")
    p.add_argument("--num-levels", type=int, default=4, help="N of the noise-space grid t_k = k/N")
    p.add_argument("--noise-schedule", choices=["sin", "linear"], default="sin",
                   help="sigma_t = sin(pi t / 2) or t (z_t = sqrt(1 - sigma_t^2) z + sigma_t eps)")
    p.add_argument("--distance", choices=["l2", "pseudo_huber"], default="l2",
                   help="l2: mean squared error per sample; pseudo_huber: iCT's, on the per-sample L2 norm")
    p.add_argument("--huber-c", type=float, default=None, help="pseudo-Huber c (default 0.00054 sqrt(dim))")
    p.add_argument("--xi", type=float, default=0.01,
                   help="margin of the boundary constraint L_bound <= xi (> 0; in units of --distance: 0.01 = an RMS "
                        "difference of 0.1 per pixel under l2)")
    p.add_argument("--dual-lr", type=float, default=0.1, help="eta_lambda of the dual step (0: fixed lambda)")
    p.add_argument("--lambda-init", type=float, default=1.0, help="lambda at step 0")
    p.add_argument("--consistency-weight", type=float, default=1.0, help="weight of L_con (0: no consistency loss)")
    p.add_argument("--ablation", choices=ABLATIONS, default="full",
                   help="no-consistency: --consistency-weight 0; no-boundary: lambda = 0 fixed; fixed-lambda: "
                        "--dual-lr 0 (lambda stays --lambda-init)")
    p.add_argument("--adam-betas", type=float, nargs=2, default=(0.9, 0.95), help="NCT App. B: (0.9, 0.95)")
    p.set_defaults(learning_rate=1e-3, batch_size=16, ema_rate=0.995, checkpoint_every=250)


def register(train_subparsers: argparse._SubParsersAction) -> None:
    """Register ``nct`` under ``gensample train``."""
    nct = train_subparsers.add_parser("nct", help="Noise Consistency Training: a control adapter for a one-step "
                                                  "generator (Luo et al. 2025)")
    add_arguments(nct)
    nct.set_defaults(func=cmd_train_nct)


def parse_args(argv: list[str]) -> argparse.Namespace:
    """``argv`` parsed exactly as ``gensample train nct ARGV`` would parse it."""
    parser = argparse.ArgumentParser(prog="gensample train nct")
    add_arguments(parser)
    return parser.parse_args(argv)


def method_settings(args: argparse.Namespace) -> dict:
    """NoiseConsistencyTraining's keyword arguments from the flags, ``--ablation`` applied."""
    settings = dict(num_levels=args.num_levels, noise_schedule=args.noise_schedule, distance=args.distance,
                    huber_c=args.huber_c, xi=args.xi, dual_lr=args.dual_lr, lambda_init=args.lambda_init,
                    consistency_weight=args.consistency_weight, adam_betas=tuple(args.adam_betas))
    if args.ablation == "no-consistency":
        settings["consistency_weight"] = 0.0
    elif args.ablation == "no-boundary":
        settings.update(lambda_init=0.0, dual_lr=0.0)
    elif args.ablation == "fixed-lambda":
        settings["dual_lr"] = 0.0
    return settings


def _trainer_class():
    """The Trainer with NCT's sample grid: row pairs of (control-free base, controlled) samples."""
    import torch

    from ..images import save_image_grid
    from ..training.trainer import Trainer

    class NCTTrainer(Trainer):
        def save_samples(self, path: Path) -> Path:
            """Class control: rows of labels 0..K-1 (one column per class). Image controls: rows alternating the
            base's samples x_b, their controls h(x_b) shown as images, and the controlled samples from fresh noise."""
            pipe = self.export_pipeline()
            pipe.set_progress_bar_config(disable=True)
            method = self.accelerator.unwrap_model(self.model)
            n, seed = self.config.num_sample_images, self.config.seed
            adapter = pipe.adapters[0]
            if adapter.config.control_type == "class":
                k = adapter.config.num_classes
                labels = torch.arange(n) % k
                images = pipe(batch_size=n, control=labels, generator=torch.Generator().manual_seed(seed),
                              output_type="pt").images
                return save_image_grid(images, path, nrow=k)
            with torch.no_grad():
                z = torch.randn(n, *pipe.latent_shape, generator=torch.Generator().manual_seed(seed + 1))
                x_b = method.generator(z.to(method.dual_lambda.device)).clamp(-1, 1)
                c = method.control(x_b)
            images = pipe(batch_size=n, control=c, generator=torch.Generator().manual_seed(seed),
                          output_type="pt").images.cpu()
            lo, hi = adapter.config.control_range
            shown = torch.nn.functional.interpolate((c.cpu() - lo) / (hi - lo), size=images.shape[-2:],
                                                    mode="nearest").clamp(0, 1)
            rows = torch.stack([(x_b.cpu() + 1) / 2, shown, images]).transpose(0, 1).reshape(-1, *images.shape[1:])
            return save_image_grid(rows, path, nrow=3 * max(1, round(n ** 0.5)))  # triples side by side

    return NCTTrainer


def cmd_train_nct(args: argparse.Namespace) -> dict:
    """Run ``gensample train nct``; returns the Trainer's summary (also printed as JSON)."""
    import torch

    from ..controls import get_control
    from ..loading import load_pipeline
    from ..methods.nct import NoiseConsistencyTraining

    set_cpu_threads(args)
    seed_everything(args.seed)
    if not Path(args.base).is_dir():
        raise FileNotFoundError(f"--base {args.base}: not a folder; pass a ConsistencyPipeline folder, e.g. "
                                "assets/pipelines/ict-digits.")
    base = load_pipeline(args.base)
    base.set_progress_bar_config(disable=True)
    kwargs = {"factor": args.lowres_factor} if args.control == "lowres" else \
        {"sample": not args.class_argmax} if args.control == "class" else {}
    control = get_control(args.control, **kwargs)
    method = NoiseConsistencyTraining.from_base(base, control, **method_settings(args))
    torch.manual_seed(args.seed)
    driver = torch.zeros(DRIVER_SIZE, 1)  # only its batch size is used: NCT reads no images
    params = sum(p.numel() for p in method.adapter.parameters())
    extra = {"adapter_parameters": params, "base": str(args.base), "control": control.config(),
             "ablation": args.ablation, "data": "none (NCT draws noise; the dataset only sets the batch size)"}
    config = train_config(args, extra, sample_steps=(1,))
    return run_training(args, method, driver, config, trainer_class=_trainer_class())
