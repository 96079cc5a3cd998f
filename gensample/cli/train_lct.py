"""``gensample train lct`` (sLCT latent consistency training on any diffusers VAE) and ``gensample train vae`` (a
small AutoencoderKL for it); one module because ``train lct`` needs the VAE that ``train vae`` makes.

``train lct`` runs: images (``--data``) -> latent cache (encoded once with ``--vae``, resumable, in
``--latent-cache`` or ``OUTPUT/latent_cache``) -> per-element normalised latents -> :class:`LatentConsistencyTraining`
with every sLCT switch on by default -> a ``LatentConsistencyPipeline`` in ``OUTPUT/pipeline`` that decodes with the
VAE.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from ._common import _positive_int, add_train_common, run_training, seed_everything, set_cpu_threads, train_config

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, UNet2DModel

__all__ = ["cmd_train_lct", "cmd_train_vae", "register"]


def register(train_subparsers: argparse._SubParsersAction) -> None:
    """Register ``lct`` and ``vae`` under ``gensample train``."""
    lct = train_subparsers.add_parser(
        "lct", help="sLCT: latent consistency training with the Cauchy loss (Dao et al., ICLR 2025)",
        description="Encode --data once with the AutoencoderKL at --vae, normalise the latents per element, and "
                    "train a consistency model on them with sLCT's Cauchy loss, adaptive c, low-noise diffusion loss, "
                    "OT pairing, non-scaling LayerNorm and s1=640 (each can be switched off; all off = iCT in "
                    "latent space). The run folder's pipeline/ is a LatentConsistencyPipeline.")
    add_train_common(lct)
    lct.add_argument("--vae", required=True, help="AutoencoderKL folder (save_pretrained format, or a pipeline folder "
                                                  "with a vae/ subfolder), e.g. from 'gensample train vae'")
    lct.add_argument("--latent-cache", default=None, help="latent cache folder (default: OUTPUT/latent_cache)")
    lct.add_argument("--shard-size", type=_positive_int, default=1024, help="images per latent-cache shard")
    lct.add_argument("--encode-batch-size", type=_positive_int, default=64)
    lct.add_argument("--encode-mode", action="store_true",
                     help="cache the posterior mode instead of a posterior sample (sLCT: sample)")
    lct.add_argument("--s0", type=int, default=10, help="initial discretization steps")
    lct.add_argument("--s1", type=int, default=640, help="final discretization steps (sLCT: 640; iCT: 1280)")
    lct.add_argument("--curriculum-steps", type=int, default=None, help="K of the curriculum (default: --max-steps)")
    lct.add_argument("--p-mean", type=float, default=-1.1)
    lct.add_argument("--p-std", type=float, default=2.0)
    lct.add_argument("--no-cauchy", action="store_true",
                     help="iCT's pseudo-Huber distance instead of Cauchy (implies --no-adaptive-c)")
    lct.add_argument("--cauchy-c", type=float, default=None,
                     help="first-stage Cauchy c (default 0.00054*sqrt(C*h*w))")
    lct.add_argument("--no-adaptive-c", action="store_true",
                     help="keep the first-stage c for the whole run (no c(N) = exp(-1.15 ln(N-1) - 0.85))")
    lct.add_argument("--no-diffusion-loss", action="store_true", help="drop the low-noise diffusion loss")
    lct.add_argument("--diffusion-weight", type=float, default=5.0, help="weight of the diffusion loss (sLCT: 5)")
    lct.add_argument("--diffusion-rate", type=float, default=0.75,
                     help="diffusion loss on descending grid indices >= int(rate*N) (sLCT: 0.75)")
    lct.add_argument("--no-ot", action="store_true",
                     help="random instead of minibatch-OT noise/latent pairing (the paper pairs; on the 4x8x8 digit "
                     "latents at 2,500 steps dropping it improved full sLCT at 1 and 2 steps on 3 training seeds: "
                     "benchmarks/RESULTS.md, issue #17)")
    lct.add_argument("--no-nsln", action="store_true", help="keep GroupNorm instead of non-scaling LayerNorm")
    lct.add_argument("--sampling-sigmas", type=float, nargs="+", default=None,
                     help="tuned few-step schedule recorded in the pipeline's scheduler (sLCT's 2-step: 80 0.369315)")
    lct.add_argument("--sample-steps", type=_positive_int, nargs="+", default=[1, 2],
                     help="steps of the sample grids")
    lct.set_defaults(func=cmd_train_lct)

    vae = train_subparsers.add_parser(
        "vae", help="a small AutoencoderKL (f=4) for latent training on digits or small images",
        description="Train a diffusers AutoencoderKL (L1 + L2 reconstruction + small KL) and save it with "
                    "save_pretrained into --output; 32x32x1 digits -> 4x8x8 latents by default.")
    vae.add_argument("--data", default="digits", help="'digits' (embedded set, upscaled) or a folder of images")
    vae.add_argument("--resolution", type=_positive_int, default=32)
    vae.add_argument("--channels", type=int, default=None, help="1 or 3 for image folders (default 3)")
    vae.add_argument("--output", required=True, help="folder for the VAE (diffusers format)")
    vae.add_argument("--latent-channels", type=_positive_int, default=4)
    vae.add_argument("--block-out-channels", type=_positive_int, nargs="+", default=[16, 32, 32],
                     help="channels per level; len - 1 downsamplings (3 levels: f=4)")
    vae.add_argument("--layers-per-block", type=_positive_int, default=1)
    vae.add_argument("--norm-num-groups", type=_positive_int, default=8)
    vae.add_argument("--max-steps", type=_positive_int, default=500)
    vae.add_argument("--batch-size", type=_positive_int, default=32)
    vae.add_argument("--learning-rate", "--lr", type=float, default=1e-3)
    vae.add_argument("--kl-weight", type=float, default=1e-4)
    vae.add_argument("--scaling-factor", type=float, default=None, help="default: 1 / std of the training latents")
    vae.add_argument("--seed", type=int, default=0)
    vae.add_argument("--cpu", action="store_true", help="force CPU even where a GPU exists")
    vae.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    vae.add_argument("--no-progress", action="store_true")
    vae.set_defaults(func=cmd_train_vae)


def _load_vae(path: str) -> AutoencoderKL:
    """The frozen AutoencoderKL of ``--vae``: a save_pretrained folder, or a pipeline folder with vae/."""
    from diffusers import AutoencoderKL

    folder = Path(path)
    if (folder / "vae" / "config.json").is_file():
        folder = folder / "vae"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"--vae {path}: no AutoencoderKL there (expected a config.json written by "
                                "save_pretrained, or a pipeline folder with vae/).")
    return AutoencoderKL.from_pretrained(folder).eval().requires_grad_(False)


def _load_unet(args: argparse.Namespace, latent_shape: tuple[int, int, int]) -> UNet2DModel:
    """The latent-space UNet: from ``--init-from`` (plain or NsLN), else a fresh ``--model`` preset."""
    from diffusers import UNet2DModel

    from ..models.nsln import NsLNUNet2DModel, build_nsln_unet

    channels, height, width = latent_shape
    if height != width:
        raise ValueError(f"the latents are {height}x{width}; the UNet presets need square latents.")
    if args.init_from:
        folder = Path(args.init_from)
        folder = folder / "unet" if (folder / "unet").is_dir() else folder
        config = json.loads((folder / "config.json").read_text())
        cls = NsLNUNet2DModel if config.get("_class_name") == "NsLNUNet2DModel" else UNet2DModel
        unet = cls.from_pretrained(folder)
        if unet.config.sample_size != height or unet.config.in_channels != channels:
            raise ValueError(f"--init-from {args.init_from} is a {unet.config.in_channels}x{unet.config.sample_size}"
                             f" model but the latents are {latent_shape}.")
        return unet
    overrides = {} if args.dropout is None else {"dropout": args.dropout}
    return build_nsln_unet(args.model, sample_size=height, in_channels=channels,
                           norm_type="group" if args.no_nsln else "nsln", **overrides)


def cmd_train_lct(args: argparse.Namespace) -> dict:
    """Run ``gensample train lct``; returns the Trainer's summary (also printed as JSON)."""
    import torch
    from accelerate import PartialState

    from ..data import image_dataset
    from ..data.latents import build_latent_cache, load_latent_cache, load_latent_normalizer
    from ..methods.lct import LatentConsistencyTraining

    set_cpu_threads(args)
    seed_everything(args.seed)  # before anything is built: same flags, same weights
    if args.cauchy_c is not None and args.cauchy_c <= 0:
        raise ValueError(f"--cauchy-c must be > 0, got {args.cauchy_c}.")
    vae = _load_vae(args.vae)
    resolution = args.resolution or int(vae.config.sample_size or 32)
    channels = vae.config.in_channels
    if args.channels is not None and args.channels != channels:
        raise ValueError(f"--channels {args.channels} but the VAE at {args.vae} takes {channels}-channel images.")
    if args.data == "digits" and channels != 1:
        raise ValueError(f"the embedded digits are grayscale but the VAE at {args.vae} takes {channels} channels.")
    cache_dir = Path(args.latent_cache) if args.latent_cache else Path(args.output) / "latent_cache"

    # Encode once (main process; the others wait), then every process loads the cache.
    state = PartialState(cpu=args.cpu)
    if state.is_main_process:
        images = image_dataset(args.data, resolution, channels)
        build_latent_cache(vae.to(state.device), images, cache_dir, shard_size=args.shard_size,
                           batch_size=args.encode_batch_size, sample=not args.encode_mode, seed=args.seed,
                           progress=not args.no_progress)
        vae.to("cpu")
    state.wait_for_everyone()
    latents = load_latent_cache(cache_dir)
    normalizer = load_latent_normalizer(cache_dir)

    torch.manual_seed(args.seed)
    unet = _load_unet(args, tuple(latents.shape[1:]))
    cauchy = not args.no_cauchy
    method = LatentConsistencyTraining(
        unet, total_steps=args.curriculum_steps or args.max_steps, s0=args.s0, s1=args.s1, p_mean=args.p_mean,
        p_std=args.p_std, distance="cauchy" if cauchy else "pseudo_huber", cauchy_c=args.cauchy_c,
        adaptive_c=cauchy and not args.no_adaptive_c, use_diffusion_loss=not args.no_diffusion_loss,
        diffusion_weight=args.diffusion_weight, diffusion_rate=args.diffusion_rate, ot_pairing=not args.no_ot,
        sampling_sigmas=args.sampling_sigmas, vae=vae, normalizer=normalizer)
    params = sum(p.numel() for p in unet.parameters())
    extra = {"unet_parameters": params, "data": args.data, "vae": str(args.vae), "latent_cache": str(cache_dir),
             "latent_shape": list(latents.shape[1:]), "norm": "group" if args.no_nsln else "nsln"}
    sample_steps = tuple(args.sample_steps)
    config = train_config(args, extra, sample_steps=sample_steps)
    # the decoded samples are resized to the VAE's resolution: compare with the digits rendered at that size
    reference = f"digits@{resolution}" if args.data == "digits" else args.data
    return run_training(args, method, latents, config, fid_steps=sample_steps, fid_reference=reference)


def cmd_train_vae(args: argparse.Namespace) -> dict:
    """Run ``gensample train vae``; returns (and prints as JSON) where the VAE went and its latent shape."""
    import time

    import torch

    from ..data import image_dataset
    from ..training.vae import train_vae

    set_cpu_threads(args)
    seed_everything(args.seed)  # train_vae seeds again right before it builds the VAE
    if args.data == "digits" and args.channels not in (None, 1):
        raise ValueError("the embedded digits are grayscale: use --channels 1 (or omit it).")
    channels = 1 if args.data == "digits" else (args.channels or 3)
    images = image_dataset(args.data, args.resolution, channels)
    device = "cpu" if args.cpu or not torch.cuda.is_available() else "cuda"
    t0 = time.time()
    vae = train_vae(images, resolution=args.resolution, output_dir=args.output, latent_channels=args.latent_channels,
                    block_out_channels=tuple(args.block_out_channels), layers_per_block=args.layers_per_block,
                    norm_num_groups=args.norm_num_groups, max_steps=args.max_steps, batch_size=args.batch_size,
                    learning_rate=args.learning_rate, kl_weight=args.kl_weight, scaling_factor=args.scaling_factor,
                    seed=args.seed, device=device, progress=not args.no_progress)
    factor = 2 ** (len(args.block_out_channels) - 1)
    summary = {"vae": str(args.output), "seconds": time.time() - t0, "scaling_factor": vae.config.scaling_factor,
               "latent_shape": [args.latent_channels, args.resolution // factor, args.resolution // factor]}
    print(json.dumps(summary, indent=1))
    return summary
