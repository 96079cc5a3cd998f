"""FID-digits of a CTM pipeline for NFE x gamma (issue #4's table).

    python scripts/ctm_gamma_table.py runs/ctm/pipeline --num-images 500 --nfe 1 2 4 --gammas 0 0.5 1
"""
import argparse

import torch

from gensample import load_pipeline
from gensample.metrics.fid import fid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pipeline")
    parser.add_argument("--num-images", type=int, default=500)
    parser.add_argument("--nfe", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--gammas", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    args = parser.parse_args()
    pipe = load_pipeline(args.pipeline)
    pipe.set_progress_bar_config(disable=True)
    print("| NFE | " + " | ".join(f"gamma {g}" for g in args.gammas) + " |")
    print("|---|" + "---|" * len(args.gammas))
    for nfe in args.nfe:
        row = []
        for gamma in args.gammas:
            generators = [torch.Generator().manual_seed(i) for i in range(args.num_images)]
            images = pipe(batch_size=args.num_images, num_inference_steps=nfe, gamma=gamma, generator=generators,
                          output_type="pt").images
            row.append(f"{fid(images, 'digits', progress=False).fid:.2f}")
        print(f"| {nfe} | " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
