"""Evaluate class-conditional digit pipelines (SCott / CD students, the EDM teacher) as issue #14 asks:

* FID-digits of n generated images against the digits train split (mean +- std over sampling seeds);
* accuracy of the digits classifier on the requested labels (each image's label is drawn uniformly from 0..9 by
  ``gensample.metrics.fid.per_image_inputs``, as ``gensample fid`` / ``gensample sample`` do);
* precision / recall / density / coverage (k = 5) on the 64-d digits features against the train split
  (:mod:`gensample.metrics.precision_recall`).

Sampling seed s generates image i from ``torch.Generator().manual_seed(s * 1_000_000 + i)``, so seeds share no image.

    python scripts/scott_eval.py --pipeline cd=/work/runs/scott-cd/pipeline scott=/work/runs/scott-eta0.3/pipeline \\
        --teacher /work/runs/edm-cond/pipeline --guidance-scale 2 --steps 1 2 4 --output results.json
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

SEED_STRIDE = 1_000_000


def evaluate(pipe, steps: int, seed: int, num_images: int, guidance_scale: float, evaluator, classifier,
             real_features: torch.Tensor, k: int) -> dict[str, float]:
    from gensample.metrics.features import to_uint8
    from gensample.metrics.fid import generate_images, per_image_inputs
    from gensample.metrics.precision_recall import precision_recall_coverage

    base = seed * SEED_STRIDE
    indices = list(range(num_images))
    images = torch.cat(list(generate_images(pipe, indices, base, steps, batch_size=250, progress=False,
                                            guidance_scale=guidance_scale)))
    labels = per_image_inputs(pipe, indices, base)["class_labels"]
    feats = evaluator.extractor(images).double()
    fid = evaluator.evaluate_features(feats, steps).fid
    with torch.no_grad():
        pred = classifier(to_uint8(images).float() / 127.5 - 1.0).argmax(1)
    out = {"fid": fid, "accuracy": float((pred == labels).double().mean())}
    out.update(precision_recall_coverage(real_features, feats, k=k))
    return out


def summarise(rows: list[dict[str, float]]) -> dict[str, list[float]]:
    """{metric: [mean, std]} over seeds (std with n - 1)."""
    out = {}
    for key in rows[0]:
        values = torch.tensor([r[key] for r in rows], dtype=torch.float64)
        out[key] = [float(values.mean()), float(values.std()) if len(values) > 1 else 0.0]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pipeline", nargs="*", default=[], metavar="NAME=DIR", help="student pipelines")
    p.add_argument("--teacher", default=None, help="the EDM teacher's pipeline (evaluated at --teacher-steps)")
    p.add_argument("--teacher-steps", type=int, default=18, help="Heun steps of the teacher (18 = 35 NFE)")
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--guidance-scale", type=float, default=2.0)
    p.add_argument("--num-images", type=int, default=1000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--output", required=True, help="JSON file of the results")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from gensample.loading import load_pipeline
    from gensample.metrics.features import load_digits_classifier
    from gensample.metrics.fid import FIDEvaluator, digits_images

    evaluator = FIDEvaluator(reference="digits", feature="digits", num_images=args.num_images, progress=False)
    classifier = load_digits_classifier()
    real_features = evaluator.extractor(digits_images("train", 8)).double()  # uint8 images
    jobs = [(name, path, args.steps) for name, path in (item.split("=", 1) for item in args.pipeline)]
    if args.teacher:
        jobs.append(("teacher", args.teacher, [args.teacher_steps]))
    results = json.loads(Path(args.output).read_text()) if Path(args.output).is_file() else {}
    for name, path, steps_list in jobs:
        pipe = load_pipeline(path)
        for steps in steps_list:
            t0 = time.time()
            rows = [evaluate(pipe, steps, seed, args.num_images, args.guidance_scale, evaluator, classifier,
                             real_features, args.k) for seed in args.seeds]
            entry = {"pipeline": str(path), "steps": steps, "guidance_scale": args.guidance_scale,
                     "num_images": args.num_images, "seeds": args.seeds, "k": args.k, "per_seed": rows,
                     **summarise(rows), "seconds": time.time() - t0}
            results[f"{name}@{steps}"] = entry
            Path(args.output).write_text(json.dumps(results, indent=1))
            s = summarise(rows)
            print(f"{name:>14} {steps:>2} steps  FID {s['fid'][0]:6.2f} +- {s['fid'][1]:4.2f}  acc "
                  f"{s['accuracy'][0]:.3f}  prec {s['precision'][0]:.3f}  recall {s['recall'][0]:.3f}  "
                  f"cov {s['coverage'][0]:.3f}  ({entry['seconds']:.0f}s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
