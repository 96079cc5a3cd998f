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

import json
import time
from pathlib import Path

import torch

from .assets import asset_path
from .images import save_image_grid


def _fid_report(pipe, steps: tuple[int, ...], num_images: int, reference: str = "digits") -> dict:
    from .metrics.fid import fid as compute_fid

    results = {}
    for n in steps:
        r = compute_fid(pipe, reference, feature="digits", num_images=num_images, num_inference_steps=n, seed=0,
                           progress=True)
        results[f"{n}-step"] = round(float(r.fid), 2)
    return results


def _sample_grids(pipe, out: Path, prefix: str) -> dict:
    """64 digits with 1 and 2 steps (seed 0), saved as OUT/PREFIX-{n}step.png; {PREFIX_{n}step: grid, seconds}."""
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


def run_demo(args) -> dict:
    method = getattr(args, "method", "ict")
    if method == "lct":
        return run_lct_demo(args)
    if method == "video":
        return run_video_demo(args)
    return run_ict_demo(args)


def run_ict_demo(args) -> dict:
    from .cli import main as cli_main
    from .loading import load_pipeline

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    source = Path(args.pipeline) if args.pipeline else asset_path("pipelines", "ict-digits")
    t_start = time.time()
    print(f"[demo] 1/4 loading {source} with ConsistencyPipeline.from_pretrained")
    pipe = load_pipeline(source)
    summary: dict = {"pipeline": str(source)}

    print("[demo] 2/4 sampling 64 digits with 1 and 2 steps")
    summary.update(_sample_grids(pipe, out, "shipped"))

    print(f"[demo] 3/4 fine-tuning for {args.train_steps} steps with `gensample train ict`")
    run_dir = out / "finetune"
    argv = ["train", "ict", "--data", "digits", "--init-from", str(source), "--max-steps", str(args.train_steps),
            "--batch-size", "64", "--learning-rate", "2e-5", "--s0", "1280", "--s1", "1280", "--ema-rate", "0.99",
            "--checkpoint-every", str(max(1, args.train_steps // 2)), "--output", str(run_dir), "--log-every", "10"]
    print("[demo]   gensample " + " ".join(argv))
    t0 = time.time()
    code = cli_main(argv)
    if code != 0:
        raise RuntimeError(f"demo training failed with exit code {code}")
    train_seconds = time.time() - t0
    summary["finetune"] = {"steps": args.train_steps, "seconds": round(train_seconds, 1),
                           "steps_per_second": round(args.train_steps / train_seconds, 2),
                           "pipeline": str(run_dir / "pipeline"), "samples": str(run_dir / "samples.png"),
                           "loss_curve": str(run_dir / "loss.png"), "checkpoints": str(run_dir / "checkpoints")}

    print("[demo] 4/4 FID-digits (embedded digits feature net; reference: train split)")
    fids = _fid_report(pipe, (1, 2), num_images=args.fid_num_images)
    summary["fid_digits_shipped"] = fids
    from .metrics.fid import digits_baselines

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


def run_lct_demo(args) -> dict:
    """The latent path on the shipped sLCT digits model (see the module docstring)."""
    from .data.digits import load_digits
    from .loading import load_pipeline
    from .metrics.fid import fid as compute_fid

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    source = Path(args.pipeline) if args.pipeline else asset_path("pipelines", "slct-digits")
    t_start = time.time()
    print(f"[demo] 1/3 loading {source} (LatentConsistencyPipeline with its AutoencoderKL)")
    pipe = load_pipeline(source)
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


def run_video_demo(args) -> dict:
    """Motion-consistency guidance on the shipped moving-digits video model (see the module docstring)."""
    from .data.moving_digits import make_reference_video
    from .loading import load_pipeline
    from .video.evaluation import evaluate_guidance
    from .video.guidance import MotionGuidanceConfig
    from .video.io import save_gif, save_strip_png

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    source = Path(args.pipeline) if args.pipeline else asset_path("pipelines", "video-digits")
    t_start = time.time()
    print(f"[demo] 1/3 loading {source} (MotionGuidedVideoPipeline around a UNetMotionModel)")
    pipe = load_pipeline(source)
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
