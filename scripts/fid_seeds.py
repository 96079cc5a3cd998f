"""FID-digits with its spread over sampling seeds, and a few-step schedule tuned on images disjoint from the reported
ones (issue #17's protocol).

    python scripts/fid_seeds.py assets/pipelines/ict-digits --report 1 2 --tune "80,0.8" "80,1.2" "80,1.6" \
        --output-json runs/ict-fid.json

A sampling spec is either an integer (``num_inference_steps``: the pipeline's own schedule) or comma-separated
descending sigmas (``pipe(sigmas=...)``, consistency pipelines), optionally followed by ``:name=value`` pipeline
arguments, e.g. ``2:gamma=0.5`` for CTM's gamma-sampling. The reference is the train digits at the generated images'
size (``digits`` for 8 px, ``digits@32`` for the 32-px latent models), unless ``--reference`` names one. Each
``--report`` spec is scored on ``--seed-ranges`` (default 3 ranges of ``--num-images`` images: image i of range r uses
seed r * num_images + i), and the mean and sample standard deviation are printed. ``--tune`` specs are scored once
on seeds starting at ``--tune-seed`` (default 100000, disjoint from every reported range); the best is then reported
like the others as "tuned".
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from gensample import load_pipeline
from gensample.metrics.fid import digits_reference_for, fid


def parse_spec(spec: str) -> dict:
    """'2' -> {'num_inference_steps': 2}; '80,1.2' -> {'sigmas': [80.0, 1.2]}; '2:gamma=0.5' -> {..., 'gamma': 0.5}."""
    spec, *extras = spec.split(":")
    kwargs = {}
    for extra in extras:
        name, sep, value = extra.partition("=")
        if not sep or not name:
            raise SystemExit(f"sampling spec argument {extra!r}: write name=value, e.g. 2:gamma=0.5")
        try:
            kwargs[name] = float(value)
        except ValueError:
            raise SystemExit(f"sampling spec argument {extra!r}: the value must be a number") from None
    return {**_parse_schedule(spec), **kwargs}


def _parse_schedule(spec: str) -> dict:
    if "," not in spec:
        try:
            steps = int(spec)
        except ValueError:
            raise SystemExit(f"sampling spec {spec!r}: give an integer step count or comma-separated sigmas") from None
        if steps < 1:
            raise SystemExit(f"sampling spec {spec!r}: the step count must be >= 1")
        return {"num_inference_steps": steps}
    return {"sigmas": [float(s) for s in spec.split(",")]}


def score(pipe, spec: str, first_seed: int, num_images: int, batch_size: int = 500,
          reference: str | None = None) -> float:
    """FID-digits of ``num_images`` images, image i from seed first_seed + i, against ``reference`` (default: the
    train digits at the images' size)."""
    kwargs = parse_spec(spec)
    images = []
    for start in range(0, num_images, batch_size):
        stop = min(start + batch_size, num_images)
        generators = [torch.Generator().manual_seed(first_seed + i) for i in range(start, stop)]
        images.append(pipe(batch_size=stop - start, generator=generators, output_type="pt", **kwargs).images)
    images = torch.cat(images)
    return float(fid(images, reference or digits_reference_for(images.shape[-1]), progress=False).fid)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pipeline")
    parser.add_argument("--report", nargs="+", default=["1", "2"], help="sampling specs to report")
    parser.add_argument("--tune", nargs="*", default=[], help="candidate specs; the best on the tuning seeds is "
                                                              "reported as 'tuned'")
    parser.add_argument("--num-images", type=int, default=5000)
    parser.add_argument("--seed-ranges", type=int, default=3)
    parser.add_argument("--tune-seed", type=int, default=100000)
    parser.add_argument("--reference", default=None, help="FID reference (default: digits at the images' size)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output-json", type=Path, default=None)
    args = parser.parse_args()
    if args.tune_seed < args.seed_ranges * args.num_images:
        raise SystemExit("--tune-seed overlaps the reported seed ranges; pick one >= seed_ranges * num_images")
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.pipeline)
    pipe.set_progress_bar_config(disable=True)
    result = {"pipeline": args.pipeline, "num_images": args.num_images, "seed_ranges": args.seed_ranges,
              "tune_seed": args.tune_seed, "tuning": {}, "report": {}}
    report = list(args.report)
    if args.tune:
        for spec in args.tune:
            result["tuning"][spec] = score(pipe, spec, args.tune_seed, args.num_images, reference=args.reference)
            print(f"tune {spec}: {result['tuning'][spec]:.2f} (seeds {args.tune_seed}+)", flush=True)
        best = min(result["tuning"], key=result["tuning"].get)
        result["tuned"] = best
        report.append(best)
    for spec in report:
        values = [score(pipe, spec, r * args.num_images, args.num_images,
                        reference=args.reference) for r in range(args.seed_ranges)]
        mean = statistics.fmean(values)
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        result["report"][spec] = {"values": values, "mean": mean, "std": std}
        tag = " (tuned)" if spec == result.get("tuned") else ""
        print(f"{spec}{tag}: {mean:.2f} +- {std:.2f}  [{', '.join(f'{v:.2f}' for v in values)}]", flush=True)
    if args.output_json:
        args.output_json.parent.mkdir(parents=True, exist_ok=True)
        args.output_json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
