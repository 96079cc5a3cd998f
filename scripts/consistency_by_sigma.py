"""Where along the noise scale does a consistency model stop being consistent? (issue #3's iCT-vs-EDM gap)

An exact consistency function maps every noisy digit x_sigma = x0 + sigma z to the clean end of its probability-flow
ODE trajectory, so the images f_theta(x_sigma, sigma) are distributed like the data at *every* sigma (CM paper,
eq. 4 and Thm. 1). This script reports, per sigma, the FID-digits of f_theta(x0 + sigma z, sigma) over N train
digits x0 (one z per digit, shared across sigmas). A flat low curve is a consistent model; the sigma where the curve
rises is where consistency is not learned, and 1-step sampling (sigma = 80) inherits everything above it.

    python scripts/consistency_by_sigma.py assets/pipelines/ict-digits runs/R2/pipeline --num-images 1000
"""
from __future__ import annotations

import argparse
import json

import torch

from gensample.data.digits import load_digits
from gensample.loading import load_pipeline
from gensample.metrics.fid import fid
from gensample.core.parametrization import ConsistencyFunction
DEFAULT_SIGMAS = (0.1, 0.3, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 40.0, 80.0)


@torch.no_grad()
def fid_by_sigma(pipe, x0: torch.Tensor, sigmas, seed: int = 0) -> dict[float, float]:
    config = pipe.scheduler.config
    f = ConsistencyFunction(pipe.unet, sigma_data=config.sigma_data, sigma_min=config.sigma_min).eval()
    z = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    result = {}
    for sigma in sigmas:
        x = f(x0 + sigma * z, torch.full((len(x0),), float(sigma), dtype=torch.float64)).clamp(-1, 1)
        result[float(sigma)] = fid((x + 1) / 2, "digits", progress=False).fid
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pipelines", nargs="+", help="saved ConsistencyPipeline folders (digits, 8x8)")
    parser.add_argument("--num-images", type=int, default=1000)
    parser.add_argument("--sigmas", type=float, nargs="+", default=list(DEFAULT_SIGMAS))
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    x0 = load_digits("train")[: args.num_images]
    results = {}
    for path in args.pipelines:
        pipe = load_pipeline(path)
        results[path] = fid_by_sigma(pipe, x0, args.sigmas)
        print(path + ": " + "  ".join(f"{s:g}: {v:.1f}" for s, v in results[path].items()), flush=True)
    if args.output:
        with open(args.output, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
