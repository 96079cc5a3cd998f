"""The README's pictures of the shipped iCT model: a sample grid and the training loss curve.

    python scripts/readme_figures.py --pipeline assets/pipelines/ict-digits --train-log runs/R32/train_log.jsonl

Writes assets/readme/ict-digits-samples.png (1-step samples in the top two rows, 2-step samples of the same seeds in
the bottom two; image i from seed i) and, with --train-log, assets/readme/ict-digits-loss.png.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", default=str(REPO / "assets" / "pipelines" / "ict-digits"))
    parser.add_argument("--train-log", default=None, help="the run's train_log.jsonl (for the loss curve)")
    parser.add_argument("--output-dir", default=str(REPO / "assets" / "readme"))
    parser.add_argument("--per-row", type=int, default=16)
    args = parser.parse_args(argv)

    from gensample import load_pipeline
    from gensample.images import image_grid, plot_curve

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline(args.pipeline)
    pipe.set_progress_bar_config(disable=True)
    n = 2 * args.per_row
    rows = []
    for steps in (1, 2):
        # one generator per image, as in the FID protocol: image i is the same draw at 1 and 2 steps
        images = [pipe(batch_size=1, num_inference_steps=steps, generator=torch.Generator().manual_seed(i),
                       output_type="pt").images for i in range(n)]
        rows.append(torch.cat(images))
    grid = image_grid(torch.cat(rows), nrow=args.per_row)
    grid.save(out / "ict-digits-samples.png")
    print(f"wrote {out / 'ict-digits-samples.png'}")

    if args.train_log:
        records = [json.loads(line) for line in Path(args.train_log).read_text().splitlines() if line.strip()]
        records = [r for r in records if "loss" in r and "step" in r]
        if not records:
            raise ValueError(f"--train-log {args.train_log} has no records with 'step' and 'loss'.")
        plot_curve([r["step"] for r in records], [r["loss"] for r in records], out / "ict-digits-loss.png",
                   title="iCT training loss (shipped model)")
        print(f"wrote {out / 'ict-digits-loss.png'}")


if __name__ == "__main__":
    main()
