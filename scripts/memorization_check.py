"""Do the digits models memorise the 1,500 training digits? (issue #3's iCT-vs-EDM gap)

For each pipeline, generate N digits and report
  * FID-digits against the train split and against the held-out split (297 images);
  * the nearest-neighbour ratio in pixel space: for each sample, the L2 distance to its nearest training digit
    divided by the typical distance of a held-out digit to its nearest training digit (median). A model that copies
    training images has ratios well below 1; a model that generalises like the held-out data sits near 1;
  * the fraction of samples closer to a training digit than the 5th percentile of held-out->train distances.

    python scripts/memorization_check.py runs/EDM/pipeline:35 runs/D/pipeline:1 runs/D/pipeline:2 --num-images 1000

Each argument is PIPELINE[:STEPS] (EDM pipelines: STEPS = Heun steps counted as NFE = 2n - 1 by the pipeline's own
convention, see its docstring).
"""
from __future__ import annotations

import argparse
import json

import torch

from gensample.data.digits import load_digits
from gensample.loading import load_pipeline
from gensample.metrics.fid import fid, generate_images


def nearest_distances(x: torch.Tensor, bank: torch.Tensor, exclude_self: bool = False) -> torch.Tensor:
    d = torch.cdist(x.flatten(1).double(), bank.flatten(1).double())
    if exclude_self:
        d.fill_diagonal_(float("inf"))
    return d.min(dim=1).values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pipelines", nargs="+", help="PIPELINE[:STEPS]")
    parser.add_argument("--num-images", type=int, default=1000)
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    args = parser.parse_args()

    train = load_digits("train")
    heldout = load_digits("heldout")
    held_nn = nearest_distances(heldout, train)
    scale = held_nn.median()
    p5 = held_nn.quantile(0.05)
    train_nn = nearest_distances(train, train, exclude_self=True)
    results = {"heldout_to_train_median_l2": float(scale),
               "train_to_train_nn_ratio_median": float((train_nn / scale).median())}
    for spec in args.pipelines:
        path, _, steps = spec.partition(":")
        steps = int(steps or 1)
        pipe = load_pipeline(path)
        images = torch.cat(list(generate_images(pipe, range(args.num_images), num_inference_steps=steps,
                                                progress=False)))
        x = images.float() / 255 * 2 - 1
        if x.shape[-1] != 8:
            x = torch.nn.functional.interpolate(x, size=(8, 8), mode="bilinear", antialias=True)
        nn = nearest_distances(x, train)
        results[spec] = {
            "fid_vs_train": round(float(fid(images, "digits", progress=False).fid), 2),
            "fid_vs_heldout": round(float(fid(images, "digits:heldout", progress=False).fid), 2),
            "nn_ratio_median": round(float((nn / scale).median()), 3),
            "frac_closer_than_heldout_p5": round(float((nn < p5).double().mean()), 3),
        }
        print(spec, results[spec], flush=True)
    results["heldout_vs_train_fid"] = round(float(fid((heldout + 1) / 2, "digits", progress=False).fid), 2)
    print(json.dumps(results, indent=1))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
