"""``gensample demo``: the main job on the embedded digits in a few minutes on a CPU.

``--method ict`` (default):

1. load the shipped iCT pipeline (assets/pipelines/ict-digits) with ``from_pretrained``;
2. sample 1- and 2-step grids (PNG) and time them;
3. fine-tune it briefly with ``gensample train ict`` (the real training path: checkpoints, EMA, pipeline export);
4. report FID-digits of both, next to the floor and the Gaussian baseline, when gensample.metrics is available.

``--method lct``: the latent path (shipped sLCT model + its AutoencoderKL, assets/pipelines/slct-digits): sample 1-
and 2-step grids, decode, FID-digits of the decoded digits beside the floor and the VAE's own reconstruction FID.

``--method video``: motion guidance (shipped tiny AnimateDiff-style model, assets/pipelines/video-digits): a held-out
digit moving in ``--direction`` is the reference; videos are generated with and without motion-consistency
guidance for the same seeds, saved as GIFs and a strip PNG, and scored (motion fidelity, digits classifier).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._common import _positive_int
from .train_ict import cmd_train_ict
from .train_ict import parse_args as parse_train_ict_args

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

__all__ = ["register", "run_demo", "run_ict_demo", "run_lct_demo", "run_video_demo"]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Register ``demo`` on the top-level ``gensample`` parser."""
    demo = subparsers.add_parser("demo", help="the main job on the embedded digits, in a few minutes on a CPU")
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
    demo.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> dict:
    """Run ``gensample demo`` for ``--method``; returns the summary also written to OUTPUT/demo_summary.json."""
    method = getattr(args, "method", "ict")
    if method == "lct":
        return run_lct_demo(args)
    if method == "video":
        return run_video_demo(args)
    return run_ict_demo(args)


def _open_shipped(args: argparse.Namespace, asset: str, loading: str) -> tuple[Path, Path, float, Any]:
    """Step 1 of every demo: create ``--output``, load ``--pipeline`` (default: the shipped ``asset``) and print the
    ``[demo]`` line ``loading`` (a format with ``{source}``). Returns (output folder, source, start time, pipeline)."""
    from ..assets import asset_path
    from ..loading import load_pipeline

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    source = Path(args.pipeline) if args.pipeline else asset_path("pipelines", asset)
    t_start = time.time()
    print(loading.format(source=source))
    return out, source, t_start, load_pipeline(source)


def _fid_report(pipe: DiffusionPipeline, steps: tuple[int, ...], num_images: int, reference: str = "digits") -> dict:
    """{"N-step": FID-digits} of ``num_images`` samples (seed 0) for each step count."""
    from ..metrics.fid import fid as compute_fid

    results = {}
    for n in steps:
        r = compute_fid(pipe, reference, feature="digits", num_images=num_images, num_inference_steps=n, seed=0,
                        progress=True)
        results[f"{n}-step"] = round(float(r.fid), 2)
    return results


def _sample_grids(pipe: DiffusionPipeline, out: Path, prefix: str) -> dict:
    """64 digits with 1 and 2 steps (seed 0), saved as OUT/PREFIX-{n}step.png; {PREFIX_{n}step: grid, seconds}."""
    import torch

    from ..images import save_image_grid

    summary = {}
    for steps in (1, 2):
        t0 = time.time()
        images = pipe(batch_size=64, num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                      output_type="pt").images
        dt = time.time() - t0
        path = save_image_grid(images, out / f"{prefix}-{steps}step.png")
        summary[f"{prefix}_{steps}step"] = {"grid": str(path), "seconds": round(dt, 3)}
        print(f"[demo]   {steps}-step: {path} ({dt:.2f}s for 64 images)")
    return summary


def run_ict_demo(args: argparse.Namespace) -> dict:
    """The shipped iCT model: sample, fine-tune with ``train ict``, FID-digits (see the module docstring)."""
    out, source, t_start, pipe = _open_shipped(
        args, "ict-digits", "[demo] 1/4 loading {source} with ConsistencyPipeline.from_pretrained")
    summary: dict = {"pipeline": str(source)}

    print("[demo] 2/4 sampling 64 digits with 1 and 2 steps")
    summary.update(_sample_grids(pipe, out, "shipped"))

    print(f"[demo] 3/4 fine-tuning for {args.train_steps} steps with `gensample train ict`")
    run_dir = out / "finetune"
    argv = ["--data", "digits", "--init-from", str(source), "--max-steps", str(args.train_steps),
            "--batch-size", "64", "--learning-rate", "2e-5", "--s0", "1280", "--s1", "1280", "--ema-rate", "0.99",
            "--checkpoint-every", str(max(1, args.train_steps // 2)), "--output", str(run_dir), "--log-every", "10"]
    # printed as the equivalent command; run in-process through the command's own function (same flags, same path)
    print("[demo]   gensample train ict " + " ".join(argv))
    t0 = time.time()
    cmd_train_ict(parse_train_ict_args(argv))
    train_seconds = time.time() - t0
    summary["finetune"] = {"steps": args.train_steps, "seconds": round(train_seconds, 1),
                           "steps_per_second": round(args.train_steps / train_seconds, 2),
                           "pipeline": str(run_dir / "pipeline"), "samples": str(run_dir / "samples.png"),
                           "loss_curve": str(run_dir / "loss.png"), "checkpoints": str(run_dir / "checkpoints")}

    print("[demo] 4/4 FID-digits (embedded digits feature net; reference: train split)")
    fids = _fid_report(pipe, (1, 2), num_images=args.fid_num_images)
    summary["fid_digits_shipped"] = fids
    from ..metrics.fid import digits_baselines

    points = digits_baselines(gaussian_sizes=(args.fid_num_images,))
    summary["fid_digits_reference_points"] = {k: round(v.fid, 2) for k, v in points.items()}
    for k, v in fids.items():
        print(f"[demo]   shipped iCT {k}: FID-digits {v:.2f} (n={args.fid_num_images} vs digits train split)")
    for k, v in summary["fid_digits_reference_points"].items():
        print(f"[demo]   reference point, {k}: FID-digits {v:.2f}")
    summary["total_seconds"] = round(time.time() - t_start, 1)
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=1))
    print("[demo] done:\n" + json.dumps(summary, indent=1))
    return summary


def run_lct_demo(args: argparse.Namespace) -> dict:
    """The latent path on the shipped sLCT digits model (see the module docstring)."""
    import torch

    from ..data.digits import load_digits
    from ..metrics.fid import fid as compute_fid

    out, source, t_start, pipe = _open_shipped(
        args, "slct-digits", "[demo] 1/3 loading {source} (LatentConsistencyPipeline with its AutoencoderKL)")
    summary: dict = {"pipeline": str(source), "method": "lct"}
    print("[demo] 2/3 sampling 64 digits with 1 and 2 steps in latent space, decoded by the VAE")
    summary.update(_sample_grids(pipe, out, "slct"))
    print("[demo] 3/3 FID-digits of the decoded samples (reference: train split rendered at the VAE's size)")
    resolution = int(pipe.vae.config.sample_size or 32)
    reference = f"digits@{resolution}"  # the train digits rendered at the VAE's size, as its training data was
    fids = _fid_report(pipe, (1, 2), num_images=args.fid_num_images, reference=reference)
    real = load_digits("train", resolution=resolution)
    with torch.no_grad():
        posterior = pipe.vae.encode(real[: args.fid_num_images]).latent_dist
        recon = pipe.vae.decode(posterior.mean).sample.clamp(-1, 1)
    vae_fid = compute_fid((recon + 1) / 2, reference, feature="digits", progress=False)
    heldout = (load_digits("heldout", resolution=resolution) + 1) / 2
    points = {"floor (heldout vs train)": round(float(compute_fid(heldout, reference, progress=False).fid), 2)}
    summary.update(fid_digits=fids, fid_digits_vae_reconstruction=round(float(vae_fid.fid), 2),
                   fid_digits_reference_points=points, total_seconds=round(time.time() - t_start, 1))
    for k, v in fids.items():
        print(f"[demo]   sLCT {k}: FID-digits {v:.2f} (n={args.fid_num_images} vs {reference})")
    print(f"[demo]   VAE reconstructions of {args.fid_num_images} train digits: FID-digits {vae_fid.fid:.2f} "
          "(the latent models' floor)")
    for k, v in points.items():
        print(f"[demo]   reference point, {k}: FID-digits {v:.2f}")
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def run_video_demo(args: argparse.Namespace) -> dict:
    """Motion-consistency guidance on the shipped moving-digits video model (see the module docstring)."""
    from ..data.moving_digits import make_reference_video
    from ..video.evaluation import evaluate_guidance
    from ..video.guidance import MotionGuidanceConfig
    from ..video.io import save_gif, save_strip_png

    out, source, t_start, pipe = _open_shipped(
        args, "video-digits", "[demo] 1/3 loading {source} (MotionGuidedVideoPipeline around a UNetMotionModel)")
    reference = make_reference_video(args.direction, digit_index=3, split="heldout").videos[0]
    save_gif(reference, out / "reference.gif")
    seeds = range(args.video_num_seeds)
    guidance = MotionGuidanceConfig(weight=args.video_weight, guidance_fraction=args.video_guidance_fraction)
    weight = pipe.config.default_motion_weight if args.video_weight is None else args.video_weight
    settings = {
        "unguided": {},
        "guided": {"reference_video": reference, "init_noise": "random", "motion_guidance": guidance},
    }
    print(f"[demo] 2/3 {len(seeds)} seeds, {args.video_steps} DDIM steps, reference moving at "
          f"{args.direction:g} degrees; with and without motion guidance (weight {weight:g})")
    results = evaluate_guidance(pipe, reference, settings, seeds, num_inference_steps=args.video_steps)
    summary: dict = {"pipeline": str(source), "method": "video", "direction_degrees": args.direction,
                     "num_inference_steps": args.video_steps, "guidance": {**vars(guidance), "weight": weight}}
    rows = [reference]
    for name, r in results.items():
        videos = r.pop("videos")
        save_gif(videos[0], out / f"{name}.gif")
        rows.append(videos[0])
        summary[name] = r
        print(f"[demo]   {name}: motion cosine {r['mean_cosine']:+.3f} (s.e. {r['cosine_sem']:.3f}), endpoint error "
              f"{r['mean_endpoint_error_px']:.2f} px, digit confidence {r['confidence']:.3f}, identity kept "
              f"{r['identity']:.3f}")
    strip = save_strip_png(rows, out / "strip.png")
    print(f"[demo] 3/3 wrote {out}/reference.gif, unguided.gif, guided.gif and {strip} (rows: reference, "
          "unguided, guided)")
    summary["total_seconds"] = round(time.time() - t_start, 1)
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=1))
    return summary
