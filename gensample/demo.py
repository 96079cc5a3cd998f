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


def _fid_report(pipe, steps: tuple[int, ...], num_images: int) -> dict | None:
    try:
        from .metrics import fid as fid_module
    except ImportError:
        return None
    results = {}
    for n in steps:
        r = fid_module.fid(pipe, "digits", feature="digits", num_images=num_images, num_inference_steps=n, seed=0,
                           progress=True)
        results[f"{n}-step"] = float(r["fid"] if isinstance(r, dict) else r.fid)
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
    fids = _fid_report(pipe, (1, 2), num_images=1000)
    if fids is not None:
        summary["fid_digits_shipped"] = fids
        try:
            from .metrics.fid import baseline_report

            summary["fid_digits_reference_points"] = baseline_report()
        except (ImportError, AttributeError):
            pass
    else:
        print("[demo]   gensample.metrics not available: FID skipped")
    summary["total_seconds"] = round(time.time() - t_start, 1)
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=1))
    print("[demo] done:\n" + json.dumps(summary, indent=1))
    return summary
