"""Controllability and FID-digits of NCT pipelines on the digits (issue #15), next to the base and a
class-conditional model trained from scratch.

    python scripts/nct_eval.py --control class --base assets/pipelines/ict-digits \
        --runs full=/work/runs/nct-class-full/pipeline no-con=/work/runs/nct-class-nocon/pipeline \
        --reference-model ict-cond=/work/runs/nct-ict-cond/pipeline --num-images 1000 --seeds 0 10000 20000
    python scripts/nct_eval.py --control lowres --base assets/pipelines/ict-digits \
        --runs full=/work/runs/nct-lowres-full/pipeline
    python scripts/nct_eval.py --control class --step-cost 16 64   # seconds per step, NCT vs iCT from scratch

Protocol (per sampling seed s, images k = 0..n-1, noise of image k from torch.Generator().manual_seed(s + k); the
default seeds 0, 10000, 20000 share no image):

* class: the requested label of image k is k mod 10. Accuracy = the shipped digits classifier's argmax equals the
  request (chance 10%). The base (no control) and a class-conditional ConsistencyPipeline (``class_labels=``) are
  scored the same way.
* lowres / edges: the control of image k is h(x') of a base sample x' from the independent noise seed
  10**6 + s + k (so c follows the base's own distribution p(c)); error = RMS(h(x) - c) per image, averaged. The base
  row is the same error with the control ignored (what "no control" scores).
* FID-digits of the same n images against the digits train split (gensample.metrics.fid, 1-step).

Prints a markdown table (mean +- std over the seeds) and writes the raw numbers to ``--json``.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from gensample.pipelines import NCTPipeline

from gensample import load_pipeline
from gensample.controls import get_control
from gensample.metrics.fid import FIDEvaluator


def generate(pipe, n: int, seed: int, controls: torch.Tensor | None, batch_size: int = 250) -> torch.Tensor:
    """n images in [0, 1]; image k from its own generator seed + k, with control k (NCT) / class label k."""
    out = []
    for start in range(0, n, batch_size):
        idx = range(start, min(start + batch_size, n))
        gens = [torch.Generator().manual_seed(seed + k) for k in idx]
        kwargs = {}
        if isinstance(pipe, NCTPipeline):
            kwargs["control"] = controls[start:start + len(idx)]
        elif getattr(pipe.unet.config, "num_class_embeds", None) is not None:
            kwargs["class_labels"] = controls[start:start + len(idx)]
        out.append(pipe(batch_size=len(idx), generator=gens, output_type="pt", **kwargs).images.cpu())
    return torch.cat(out)


def requested_controls(control, base, n: int, seed: int) -> torch.Tensor:
    if control.kind == "class":
        return torch.arange(n) % control.num_classes
    x = generate(base, n, 10**6 + seed, None) * 2 - 1  # independent base samples -> c ~ p(c)
    return control(x)


def step_seconds(nct_batch: int, ict_batch: int, repeats: int = 10) -> dict[str, float]:
    """Seconds per optimizer step of NCT (class control, the shipped base) and of class-conditional iCT from scratch
    (digits-small), timed alternately in one process so that both see the same machine load."""
    from gensample.data.digits import load_digits
    from gensample.methods import ImprovedConsistencyTraining
    from gensample.methods.nct import NoiseConsistencyTraining
    from gensample.models import build_unet

    base = load_pipeline("assets/pipelines/ict-digits")
    nct = NoiseConsistencyTraining.from_base(base, get_control("class")).train()
    ict = ImprovedConsistencyTraining(build_unet("digits-small", sample_size=8, dropout=0.3, num_class_embeds=10),
                                      total_steps=1000).train()
    images, labels = load_digits("train", return_labels=True)
    opts = {"nct": torch.optim.Adam(nct.adapter.parameters()), "ict": torch.optim.Adam(ict.parameters())}
    batches = {"nct": torch.zeros(nct_batch, 1), "ict": (images[:ict_batch], labels[:ict_batch])}
    methods = {"nct": nct, "ict": ict}
    times = {"nct": [], "ict": []}
    for r in range(repeats + 1):
        for name, method in methods.items():
            t0 = time.perf_counter()
            method(batches[name], 500)["loss"].backward()
            opts[name].step()
            opts[name].zero_grad()
            method.after_optimizer_step(500)
            if r:  # the first round warms up
                times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(t)) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--control", required=True, choices=["class", "lowres", "edges"])
    parser.add_argument("--lowres-factor", type=int, default=2)
    parser.add_argument("--base", default="assets/pipelines/ict-digits")
    parser.add_argument("--runs", nargs="*", default=[], help="name=pipeline_folder of NCT pipelines")
    parser.add_argument("--reference-model", nargs="*", default=[],
                        help="name=folder of class-conditional ConsistencyPipelines (class control only)")
    parser.add_argument("--num-images", type=int, default=1000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 10000, 20000],
                        help="sampling seeds; image k of seed s uses s + k, so seeds closer than --num-images share "
                             "images")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    parser.add_argument("--step-cost", type=int, nargs=2, default=None, metavar=("NCT_BATCH", "ICT_BATCH"),
                        help="only time one NCT step and one class-conditional iCT step (see step_seconds)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.step_cost:
        cost = step_seconds(*args.step_cost)
        print(json.dumps({**cost, "ratio_nct_over_ict": cost["nct"] / cost["ict"]}))
        return

    control = get_control(args.control, **({"factor": args.lowres_factor} if args.control == "lowres" else
                                           {"sample": False} if args.control == "class" else {}))
    base = load_pipeline(args.base)
    models = {"base (no control)": base}
    for item in args.runs + args.reference_model:
        name, _, path = item.partition("=")
        models[name] = load_pipeline(path)
    for p in models.values():
        p.set_progress_bar_config(disable=True)
    evaluator = FIDEvaluator("digits", "digits", num_images=args.num_images, steps=(1,))
    results: dict[str, dict[str, list[float]]] = {name: {"error": [], "fid": [], "seconds": []} for name in models}
    for seed in args.seeds:
        c = requested_controls(control, base, args.num_images, seed)
        for name, pipe in models.items():
            t0 = time.time()
            images = generate(pipe, args.num_images, seed, c)
            results[name]["seconds"].append(time.time() - t0)
            results[name]["error"].append(float(control.error(images * 2 - 1, c).mean()))
            results[name]["fid"].append(evaluator.evaluate(images).fid)
            print(f"seed {seed} {name}: error {results[name]['error'][-1]:.4f} fid {results[name]['fid'][-1]:.2f}",
                  flush=True)

    what = "accuracy on requested classes" if control.kind == "class" else f"RMS(h(x) - c), {control.name}"
    print(f"\n| model | {what} | FID-digits (n = {args.num_images}) |\n|---|---|---|")
    for name, r in results.items():
        err = np.array(r["error"])
        value = 1 - err if control.kind == "class" else err
        scale, unit = (100, "%") if control.kind == "class" else (1, "")
        print(f"| {name} | {scale * value.mean():.1f}{unit} +- {scale * value.std():.1f} | "
              f"{np.mean(r['fid']):.2f} +- {np.std(r['fid']):.2f} |" if control.kind == "class" else
              f"| {name} | {value.mean():.4f} +- {value.std():.4f} | {np.mean(r['fid']):.2f} +- "
              f"{np.std(r['fid']):.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"control": control.config(), "num_images": args.num_images, "seeds": args.seeds,
                       "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
