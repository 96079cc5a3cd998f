"""FID-digits of a consistency pipeline for several sampling schedules (how the shipped 2-step sigma was chosen).

    python scripts/sigma_sweep.py assets/pipelines/ict-digits --num-images 1000 --schedules 80 "80,0.8" "80,1.2"
"""
import argparse

import torch

from gensample import load_pipeline
from gensample.metrics.fid import fid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pipeline")
    parser.add_argument("--num-images", type=int, default=1000)
    parser.add_argument("--schedules", nargs="+", default=["80", "80,0.6", "80,0.8", "80,1.2", "80,1.6"],
                        help="comma-separated descending sigmas, one schedule per argument")
    args = parser.parse_args()
    pipe = load_pipeline(args.pipeline)
    pipe.set_progress_bar_config(disable=True)
    for schedule in args.schedules:
        sigmas = [float(s) for s in schedule.split(",")]
        generators = [torch.Generator().manual_seed(i) for i in range(args.num_images)]
        images = pipe(batch_size=args.num_images, sigmas=sigmas, generator=generators, output_type="pt").images
        print(f"sigmas {sigmas}: FID-digits (n={args.num_images}) {fid(images, 'digits', progress=False).fid:.2f}",
              flush=True)


if __name__ == "__main__":
    main()
