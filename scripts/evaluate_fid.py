"""FID/KID of a saved pipeline, on one process or many (``accelerate launch``), and the digits baselines.

    python scripts/evaluate_fid.py runs/ict/pipeline --num-images 2000 --num-inference-steps 1 2
    accelerate launch --num_processes 4 scripts/evaluate_fid.py runs/ict/pipeline --feature inception \
        --inception-weights pt_inception-2015-12-05-6726825d.pth --reference cifar10-train.npz --num-images 50000
    python scripts/evaluate_fid.py --baselines            # floor and pixel-Gaussian baseline, FID-digits
    # CPU-only machines (gloo): torchrun --nproc_per_node 2 scripts/evaluate_fid.py PIPELINE ...
    #                       or: accelerate launch --multi_gpu --num_processes 2 scripts/evaluate_fid.py PIPELINE ...

Generation is split across processes by seed ranges (``PartialState.split_between_processes`` over image indices;
image i always uses seed + i), features are gathered (``accelerate.utils.gather``) in index order and the main
process computes and prints FID/KID: the numbers equal a single-process run's.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState

from gensample.loading import load_pipeline
from gensample.metrics.fid import (
    FIDEvaluator,
    FIDResult,
    digits_baselines,
    digits_images,
    gather_features,
    generate_features,
    split_indices,
)


def init_state() -> PartialState:
    """The process group: GPUs when there are any, else CPU processes over gloo (``PartialState(cpu=True)``)."""
    use_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or not torch.cuda.is_available()
    return PartialState(cpu=use_cpu)


def evaluate_pipeline(args: argparse.Namespace) -> list[FIDResult]:
    """Each process generates its seed range; features are gathered; the main process computes FID/KID."""
    state = init_state()
    main = state.is_main_process
    pipeline = load_pipeline(args.pipeline).to(state.device)
    progress = main and not args.no_progress
    evaluator = FIDEvaluator(args.reference, args.feature, args.num_images, args.num_inference_steps,
                             args.batch_size, args.seed, args.inception_weights, progress=progress,
                             device=state.device, distributed=True)
    _ = evaluator.reference_stats  # digits / folders: reference features also split across processes and gathered
    results = []
    for steps in args.num_inference_steps:
        indices = split_indices(args.num_images)
        local = generate_features(pipeline, evaluator.extractor, indices, args.seed, steps, args.batch_size,
                                  progress=progress)
        features = gather_features(local, indices)  # (num_images, D), image-index order, on every process
        if main:
            r = evaluator.evaluate_features(features, steps, str(args.pipeline))
            r.protocol["processes"] = state.num_processes
            results.append(r)
        state.wait_for_everyone()
    return results


def run_baselines(args: argparse.Namespace) -> dict[str, FIDResult]:
    """Floor, pixel-Gaussian baselines, and the sampling noise of FID at n=297 (random train subsets, in-sample)."""
    results = digits_baselines(args.feature, args.gaussian_sizes, args.seed, args.inception_weights,
                               progress=not args.no_progress)
    evaluator = FIDEvaluator("digits", args.feature, seed=args.seed, inception_weights=args.inception_weights,
                             progress=False)
    train, n = digits_images("train"), len(digits_images("heldout"))
    g = torch.Generator().manual_seed(args.seed)
    for draw in range(args.subset_draws):
        subset = train[torch.randperm(len(train), generator=g)[:n]]
        results[f"train subset n={n} vs train (in-sample) #{draw}"] = evaluator.evaluate(subset)
    return results


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pipeline", nargs="?", type=Path, help="saved pipeline folder")
    p.add_argument("--baselines", action="store_true", help="compute the digits floor and Gaussian baseline")
    p.add_argument("--gaussian-sizes", type=int, nargs="+", default=[297, 2000])
    p.add_argument("--subset-draws", type=int, default=10, help="random train subsets for the FID noise level")
    p.add_argument("--reference", "--data", dest="reference", default="digits",
                   help="'digits' (train split), 'digits:heldout', a folder, or a stats .npz")
    p.add_argument("--feature", choices=("digits", "inception"), default="digits")
    p.add_argument("--inception-weights", type=Path, default=None)
    p.add_argument("--num-images", type=int, default=2000)
    p.add_argument("--num-inference-steps", type=int, nargs="+", default=[1])
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-json", type=Path, default=None)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.baselines == (args.pipeline is not None):
        p.error("give a PIPELINE folder or --baselines")

    if args.baselines:
        results = run_baselines(args)
        named = {k: r.to_dict() for k, r in results.items()}
        for name, r in results.items():
            print(f"{name:45s} FID-{args.feature} {r.fid:9.4f}  KID {r.kid_mean:12.4f} ± {r.kid_std:.4f}  "
                  f"(n_gen {r.protocol['n_gen']}, n_real {r.protocol['n_real']})")
        subsets = [r.fid for k, r in results.items() if "in-sample" in k]
        if subsets:
            print(f"{'train subsets (in-sample), mean ± std':45s} FID-{args.feature} {np.mean(subsets):9.4f} ± "
                  f"{np.std(subsets, ddof=1) if len(subsets) > 1 else 0.0:.4f} over {len(subsets)} draws")
        print(f"reference stats sha256 {next(iter(results.values())).protocol['stats_sha256']}")
    else:
        results = evaluate_pipeline(args)
        named = [r.to_dict() for r in results]
        for r in results:
            print(r)
    if args.output_json is not None and PartialState().is_main_process:
        args.output_json.parent.mkdir(parents=True, exist_ok=True)
        args.output_json.write_text(json.dumps(named, indent=2) + "\n")


if __name__ == "__main__":
    main()
