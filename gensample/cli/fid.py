"""``gensample fid`` and ``gensample fid-stats``: FID / KID of a pipeline or an image folder, and reference
statistics files (the work is in :mod:`gensample.metrics.fid`).

    gensample fid runs/ict/pipeline --data digits --num-images 2000 --num-inference-steps 1 2
    gensample fid --images samples/ --reference stats.npz          # or a folder of real images
    gensample fid-stats --data digits --output digits-train.npz    # or --data FOLDER
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..metrics.features import FEATURE_NAMES
from ._common import _positive_int

#: images a pipeline generates for ``gensample fid`` when --num-images is not given
DEFAULT_NUM_IMAGES = 2000


def _non_negative_int(value: str) -> int:
    v = int(value)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v

__all__ = ["register", "run_fid", "run_fid_stats"]


def _add_common(p: argparse.ArgumentParser) -> None:
    """The flags both commands share: the feature extractor, batching, seed, device."""
    p.add_argument("--feature", choices=FEATURE_NAMES, default="digits",
                   help="feature extractor: 'digits' (shipped 8x8-digits CNN, 64-d, 'FID-digits') or 'inception' "
                        "(FID Inception-v3 pool3, 2048-d; needs local weights, see --inception-weights)")
    p.add_argument("--inception-weights", type=Path, default=None,
                   help="pt_inception-2015-12-05-6726825d.pth (else $GENSAMPLE_INCEPTION_WEIGHTS, else the torch hub "
                        "cache checkpoints/ folder); never downloaded")
    p.add_argument("--batch-size", type=_positive_int, default=250, help="images per generation / feature batch")
    p.add_argument("--seed", type=int, default=0, help="image i is generated from seed + i; also seeds KID subsets")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Register ``fid`` and ``fid-stats`` (each sets ``func`` to its handler, which returns an exit code)."""
    p = subparsers.add_parser(
        "fid", help="FID / KID of a saved pipeline or an image folder",
        description="FID and KID (torchmetrics) of a pipeline's samples or a folder of images against the digits "
                    "train split, a folder, or a statistics file; prints the protocol (extractor, n real/gen, "
                    "reference statistics and their sha256).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("pipeline", nargs="?", type=Path, help="a saved pipeline folder (save_pretrained output)")
    p.add_argument("--images", type=Path, help="evaluate a folder of images (PNG, one size) instead of a pipeline")
    p.add_argument("--data", "--reference", dest="reference", default="digits", metavar="REF",
                   help="reference: 'digits' (train split), 'digits:heldout', a folder of images, or a stats .npz")
    p.add_argument("--num-images", type=_positive_int, default=None,
                   help=f"images to generate (>= 1; default {DEFAULT_NUM_IMAGES}) / to read from --images (default: "
                        "all)")
    p.add_argument("--num-inference-steps", type=_positive_int, nargs="+", default=[1],
                   help="one evaluation per step count")
    p.add_argument("--output-json", type=Path, default=None, help="also write the results and protocol as JSON")
    _add_common(p)
    p.set_defaults(func=run_fid)

    s = subparsers.add_parser(
        "fid-stats", help="write reference FID statistics (.npz with mu, sigma, metadata)",
        description="Feature statistics of a reference set, written deterministically (stable sha256).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    s.add_argument("--data", required=True, help="'digits' (train split), 'digits:heldout', or a folder of images")
    s.add_argument("--output", type=Path, required=True, help="statistics file to write (.npz)")
    s.add_argument("--kid-features", type=_non_negative_int, default=5000,
                   help="keep up to this many raw features in the file for KID (0: none, KID unavailable)")
    _add_common(s)
    s.set_defaults(func=run_fid_stats)


def _device(name: str | None) -> str:
    import torch

    return name or ("cuda" if torch.cuda.is_available() else "cpu")


def run_fid(args: argparse.Namespace) -> int:
    """Run ``gensample fid``: print each result and the shared protocol; returns 0."""
    from ..metrics.fid import FIDEvaluator

    if (args.pipeline is None) == (args.images is None):
        raise SystemExit("gensample fid: give either a PIPELINE folder or --images FOLDER (not both).")
    device = _device(args.device)
    num_images = DEFAULT_NUM_IMAGES if args.num_images is None else args.num_images
    evaluator = FIDEvaluator(args.reference, args.feature, num_images, args.num_inference_steps,
                             args.batch_size, args.seed, args.inception_weights, not args.no_progress, device)
    results = []
    if args.images is not None:
        results.append(evaluator.evaluate(args.images, args.num_images))
    else:
        from ..loading import load_pipeline

        pipeline = load_pipeline(args.pipeline).to(device)
        for steps in args.num_inference_steps:
            results.append(evaluator.evaluate(pipeline, num_images, steps))
    for r in results:
        print(r.summary())
    protocol = {k: v for k, v in results[0].protocol.items() if k not in ("num_inference_steps", "fid_scipy")}
    protocol["source"] = str(args.pipeline or args.images)
    print("protocol:")
    for k, v in protocol.items():
        print(f"  {k}: {v}")
    if args.output_json is not None:
        args.output_json.parent.mkdir(parents=True, exist_ok=True)
        args.output_json.write_text(json.dumps([r.to_dict() for r in results], indent=2) + "\n")
    return 0


def run_fid_stats(args: argparse.Namespace) -> int:
    """Run ``gensample fid-stats``: write the statistics file and print its sha256; returns 0."""
    from ..metrics.fid import FeatureStats, FIDEvaluator

    evaluator = FIDEvaluator(args.data, args.feature, batch_size=args.batch_size, seed=args.seed,
                             inception_weights=args.inception_weights, progress=not args.no_progress,
                             device=_device(args.device))
    stats = evaluator.reference_stats
    if isinstance(stats, FeatureStats) and stats.path is not None:
        raise SystemExit(f"gensample fid-stats: --data {args.data} already is a statistics file.")
    if stats.features is not None:
        stats.features = stats.features[:args.kid_features] if args.kid_features > 0 else None
    digest = stats.save(args.output)
    print(f"wrote {args.output}: {stats.num_images} images ({stats.source}), extractor {stats.extractor} "
          f"({stats.dims}-d), sha256 {digest}")
    return 0
