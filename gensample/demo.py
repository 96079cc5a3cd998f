"""``gensample demo``: the main job on the embedded digits in a few minutes on a CPU.

1. load the shipped iCT pipeline (assets/pipelines/ict-digits) with ``from_pretrained``;
2. sample 1- and 2-step grids (PNG) and time them;
3. fine-tune it briefly with ``gensample train ict`` (the real training path: checkpoints, EMA, pipeline export);
4. report FID-digits of both, next to the floor and the Gaussian baseline, when gensample.metrics is available.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .assets import asset_path
from .images import save_image_grid


def _fid_report(pipe, steps: tuple[int, ...], num_images: int) -> dict:
    from .metrics.fid import fid as compute_fid

    results = {}
    for n in steps:
        r = compute_fid(pipe, "digits", feature="digits", num_images=num_images, num_inference_steps=n, seed=0,
                           progress=True)
        results[f"{n}-step"] = round(float(r.fid), 2)
    return results


def run_demo(args) -> dict:
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
    for steps in (1, 2):
        t0 = time.time()
        images = pipe(batch_size=64, num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                      output_type="pt").images
        dt = time.time() - t0
        path = save_image_grid(images, out / f"shipped-{steps}step.png")
        summary[f"shipped_{steps}step"] = {"grid": str(path), "seconds": round(dt, 3)}
        print(f"[demo]   {steps}-step: {path} ({dt:.2f}s for 64 images)")

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
