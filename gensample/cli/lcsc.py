"""``gensample lcsc``: combine a run's saved weight snapshots by LCSC (linear combination of saved checkpoints, the
coefficients found by evolutionary search on FID; the work is in :mod:`gensample.lcsc`).

    gensample train ict --data digits --model digits-small --max-steps 4000 --snapshot-every 200 --output runs/ict
    gensample lcsc runs/ict --steps 1 2 --population 16 --iterations 10 --output runs/ict-lcsc
    gensample lcsc runs/ict --steps 1 2 --population 16 --iterations 20 --output runs/ict-lcsc --resume  # continue
    accelerate launch -m gensample.cli lcsc runs/ict ... --output runs/ict-lcsc   # fitness split over processes

Writes OUTPUT/pipeline (a pipeline folder of the run's type with the combined weights, written atomically),
OUTPUT/report.json (coefficients, search cost, training cost, FID of last / EMA / LCSC), OUTPUT/fitness.png (best
fitness per evaluation) and OUTPUT/search_state.json (what ``--resume`` continues from); prints FID of the last
snapshot, the run's EMA pipeline and the combination at each step count, on seeds disjoint from the search's.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ..metrics.features import FEATURE_NAMES
from ._common import _positive_int, _thread_count

__all__ = ["register", "run_lcsc"]

#: first seed of the final evaluation by default: far from the search's seed..seed+K-1
DEFAULT_EVAL_SEED = 1_000_000


def _finite_float(value: str) -> float:
    v = float(value)
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {value}")
    return v


def register(subparsers: argparse._SubParsersAction) -> None:
    """Register ``lcsc`` (``func`` = :func:`run_lcsc`)."""
    p = subparsers.add_parser(
        "lcsc", help="combine a run's weight snapshots by LCSC (evolutionary search on FID)",
        description="Search the coefficients a of theta_last + sum_i a_i (theta_i - theta_last) over the run's "
                    "snapshots (train with --snapshot-every N) by an evolutionary strategy whose fitness is the FID "
                    "of a small fixed-noise sample (mean over --steps), then write the combined pipeline and a report "
                    "comparing the last snapshot, the run's EMA and the combination on other seeds.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("run", type=Path, help="the training run folder (snapshots/, pipeline/, run_config.json)")
    p.add_argument("--output", type=Path, required=True,
                   help="folder for pipeline/, report.json, fitness.png, search_state.json")
    p.add_argument("--steps", type=_positive_int, nargs="+", default=[1, 2],
                   help="sampling step counts of the fitness (their mean FID) and of the report (EDM runs: Heun "
                        "steps n, NFE 2n - 1)")
    p.add_argument("--population", type=_positive_int, default=16, help="candidates kept per generation")
    p.add_argument("--iterations", type=int, default=10,
                   help="generations after the initial population (a larger value with --resume extends a search)")
    p.add_argument("--offspring", type=_positive_int, default=None,
                   help="children per generation (default population // 2)")
    p.add_argument("--mutation-scale", type=_finite_float, default=0.1,
                   help="standard deviation of a coefficient mutation")
    p.add_argument("--mutation-rate", type=_finite_float, default=0.3, help="probability a coefficient mutates")
    p.add_argument("--num-images", type=_positive_int, default=250,
                   help="K, samples per fitness evaluation (image i from seed --seed + i, fixed class labels)")
    p.add_argument("--seed", type=int, default=0, help="first sampling seed of the search; also seeds the search")
    p.add_argument("--eval-num-images", type=int, default=1000,
                   help="samples per FID of the final table (0: no table)")
    p.add_argument("--eval-steps", type=_positive_int, nargs="+", default=None,
                   help="step counts of the final table (default: --steps)")
    p.add_argument("--eval-seeds", type=int, nargs="+", default=[DEFAULT_EVAL_SEED],
                   help="first seeds of the final table's samples (one FID per seed; mean +- std); their ranges must "
                        "not overlap the search's")
    p.add_argument("--last-snapshots", type=_positive_int, default=None,
                   help="combine only the last N snapshots (default: all)")
    p.add_argument("--min-step", type=int, default=0, help="ignore snapshots before this training step")
    p.add_argument("--reference", default=None,
                   help="FID reference: 'digits' (train split; '@R' for R-px models), a stats .npz (gensample "
                        "fid-stats) or an image folder; default: the digits when the run trained on them")
    p.add_argument("--feature", choices=FEATURE_NAMES, default="digits",
                   help="'digits' (FID-digits) or 'inception' (needs --inception-weights)")
    p.add_argument("--inception-weights", type=Path, default=None, help="pt_inception-2015-12-05-6726825d.pth")
    p.add_argument("--guidance-scale", type=_finite_float, default=None,
                   help="classifier-free guidance scale for class-conditional guidance pipelines")
    p.add_argument("--batch-size", type=_positive_int, default=250, help="images per pipeline call")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--threads", type=_thread_count, default=None, help="torch CPU threads")
    p.add_argument("--resume", action="store_true", help="continue the search of OUTPUT/search_state.json")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=run_lcsc)


# ----------------------------------------------------------------------------------------------------------------
# Run folder


def _load_snapshots(run: Path, args: argparse.Namespace, method: str | None):
    from ..training.snapshots import list_snapshots, load_snapshot

    found = [(s, p) for s, p in list_snapshots(run) if s >= args.min_step]
    if args.last_snapshots is not None:
        found = found[-args.last_snapshots:]
    if len(found) < 2:
        raise ValueError(f"{run / 'snapshots'} holds {len(found)} usable snapshot(s) (--min-step {args.min_step}"
                         f"{'' if args.last_snapshots is None else f', --last-snapshots {args.last_snapshots}'}); "
                         "LCSC needs at least 2: train with `--snapshot-every N` (N well below --max-steps).")
    snapshots = []
    for step, path in found:
        tensors, meta = load_snapshot(path)
        if method is not None and meta.get("method") not in (None, method):
            raise ValueError(f"{path} is a snapshot of a {meta.get('method')!r} run, but {run} is a {method!r} run; "
                             "snapshots/ must hold this run's snapshots only.")
        snapshots.append(tensors)
    return [s for s, _ in found], [p for _, p in found], snapshots


def _default_reference(args: argparse.Namespace, info: dict, pipeline, fitness_kwargs: dict) -> str:
    if args.reference is not None:
        return args.reference
    if info.get("data") != "digits":
        raise ValueError(f"{args.run} did not train on the digits ({info.get('data')!r}): pass --reference STATS.npz "
                         "(`gensample fid-stats --feature inception --data FOLDER --output STATS.npz`) with "
                         "--feature inception --inception-weights FILE.")
    import torch

    from ..metrics.fid import digits_reference_for, per_image_inputs

    pipeline.set_progress_bar_config(disable=True)
    with torch.no_grad():  # one sample tells the output size (latent models decode to more pixels than they model)
        size = pipeline(batch_size=1, num_inference_steps=1, output_type="pt", **per_image_inputs(pipeline, [0]),
                        **fitness_kwargs).images.shape[-1]
    return digits_reference_for(size)


def _nfe(pipeline, steps: int) -> int:
    """Network evaluations of ``steps`` sampling steps: EDM's Heun sampler 2n - 1, the one-evaluation samplers n."""
    from gensample.schedulers.scheduling_edm_heun import EDMHeunScheduler

    if type(pipeline).__name__ == "EDMPipeline" and isinstance(pipeline.scheduler, EDMHeunScheduler):
        return 2 * steps - 1
    return steps


# ----------------------------------------------------------------------------------------------------------------
# Outputs


def _model_card(run: Path, report: dict[str, Any]) -> str:
    rows = "\n".join(f"| {r['steps']} | {r['nfe']} | {r['last']} | {r['ema']} | {r['lcsc']} |"
                     for r in report.get("table_text", []))
    steps = ", ".join(str(s) for s in report["snapshots"]["steps"])
    return f"""---
library_name: diffusers
tags:
- gensample
- lcsc
---

# LCSC combination of {run}

Weights theta = theta_last + sum_i a_i (theta_i - theta_last) over the raw-weight snapshots of the training run
`{run}` at steps {steps} (LCSC, Liu et al., ICLR 2025), the coefficients found by evolutionary search on FID
(`gensample lcsc`; coefficients, search cost and protocol in `../report.json`). Written by gensample
{report['gensample_version']}.

Command: `{report['command']}`

| steps | NFE | FID last | FID EMA | FID LCSC |
| --- | --- | --- | --- | --- |
{rows}

```python
import gensample
pipe = gensample.load_pipeline("{report['pipeline']}")
```
"""


def _write_pipeline(pipeline, output: Path, card: str) -> Path:
    """OUTPUT/pipeline written to a temporary folder, fsynced, then renamed into place (the previous one only then
    replaced)."""
    from ..training.checkpoint import _fsync_dir

    output.mkdir(parents=True, exist_ok=True)
    final = output / "pipeline"
    staging = Path(tempfile.mkdtemp(prefix=".tmp-pipeline-", dir=output))
    try:
        pipeline.save_pretrained(staging)
        (staging / "README.md").write_text(card.replace(str(staging), str(final)))
        for root, _, files in os.walk(staging):
            for name in files:
                with open(Path(root) / name, "rb") as f:
                    os.fsync(f.fileno())
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    previous = None
    if os.path.lexists(final):
        previous = output / f".replaced-pipeline-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
        os.replace(final, previous)
    os.replace(staging, final)
    _fsync_dir(output)
    if previous is not None and not previous.is_symlink() and (previous / "model_index.json").is_file():
        shutil.rmtree(previous, ignore_errors=True)
    return final


def _command_line() -> str:
    """The command as typed (``gensample lcsc ...``, ``python -m gensample.cli lcsc ...``)."""
    argv = list(sys.argv)
    if "lcsc" not in argv:  # called from Python (gensample.cli.main([...]))
        return "gensample lcsc (called from Python)"
    return "gensample " + " ".join(argv[argv.index("lcsc"):])


def _summary(values: list[float]) -> dict[str, Any]:
    import numpy as np

    v = np.asarray(values, dtype=np.float64)
    std = float(v.std(ddof=1)) if len(v) > 1 else 0.0
    return {"mean": float(v.mean()), "std": std, "values": [float(x) for x in v]}


def _fmt(entry: dict[str, Any]) -> str:
    return f"{entry['mean']:.3f}" + (f" ± {entry['std']:.3f}" if len(entry["values"]) > 1 else "")


# ----------------------------------------------------------------------------------------------------------------
# The command


def run_lcsc(args: argparse.Namespace) -> int:
    """Run ``gensample lcsc``: search, write OUTPUT/{pipeline, report.json, fitness.png, search_state.json}, print the
    FID table; returns 0."""
    import numpy as np
    import torch
    from accelerate import PartialState
    from tqdm.auto import tqdm

    from .. import __version__
    from ..images import plot_curve
    from ..lcsc import FIDFitness, apply_weights, combine, component_weights, search
    from ..loading import load_pipeline

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.iterations < 0:
        raise ValueError(f"--iterations must be >= 0, got {args.iterations}.")
    if args.eval_num_images < 0 or args.eval_num_images == 1:
        raise ValueError(f"--eval-num-images must be 0 (no table) or >= 2, got {args.eval_num_images}.")
    search_range = range(args.seed, args.seed + args.num_images)
    for s in args.eval_seeds:
        if args.eval_num_images and max(s, search_range.start) < min(s + args.eval_num_images, search_range.stop):
            raise ValueError(f"--eval-seeds {s} (seeds {s}..{s + args.eval_num_images - 1}) overlaps the search's "
                             f"seeds {search_range.start}..{search_range.stop - 1}: the final table must be measured "
                             f"on other samples; e.g. --eval-seeds {DEFAULT_EVAL_SEED}.")
    run, output = args.run, args.output
    if not (run / "pipeline" / "model_index.json").is_file():
        raise FileNotFoundError(f"{run} is not a finished training run (no pipeline/model_index.json); point at the "
                                "folder `gensample train ... --output` wrote.")
    state_path = output / "search_state.json"
    if state_path.exists() and not args.resume:
        raise ValueError(f"{output} already holds a search ({state_path}); pass --resume to continue it, or choose "
                         "another --output.")
    if args.resume and not state_path.exists():
        raise ValueError(f"--resume: {state_path} does not exist; start the search without --resume.")

    use_cpu = not torch.cuda.is_available() or (args.device or "").startswith("cpu")
    state = PartialState(cpu=use_cpu)
    main, distributed = state.is_main_process, state.num_processes > 1
    device = args.device or str(state.device)
    progress = main and not args.no_progress

    from ..training.run_info import run_info

    info = run_info(run)
    steps, paths, snapshots = _load_snapshots(run, args, info["method"])
    components = sorted({k.partition(".")[0] for k in snapshots[-1]})
    pipeline = load_pipeline(run / "pipeline").to(device)
    ema_weights = component_weights(pipeline, components)  # the run's exported EMA
    apply_weights(pipeline, snapshots[-1])  # fails early when the snapshots do not fit the pipeline
    pipeline_kwargs = {} if args.guidance_scale is None else {"guidance_scale": args.guidance_scale}
    reference = _default_reference(args, info, pipeline, pipeline_kwargs)
    fitness = FIDFitness(pipeline, reference, args.feature, args.steps, args.num_images, args.seed, args.batch_size,
                         args.inception_weights, distributed, pipeline_kwargs)
    context = {"run": str(run.resolve()), "steps": list(args.steps), "num_images": args.num_images,
               "reference": str(reference), "feature": args.feature, "guidance_scale": args.guidance_scale,
               "snapshot_steps": steps}
    names = [p.name for p in paths]
    result = search(snapshots, fitness, args.population, args.iterations, offspring=args.offspring,
                    mutation_rate=args.mutation_rate, mutation_scale=args.mutation_scale, seed=args.seed,
                    state_path=state_path, names=names, context=context, progress=progress, write_state=main)
    combined = combine(snapshots, result.alpha)
    t0 = time.perf_counter()
    models = (("last", snapshots[-1]), ("ema", ema_weights), ("lcsc", combined))
    # the search's own samples, per step count: how much of the gain is fitted to them shows against the table
    on_search = {name: {str(s): v for s, v in fitness.fids(weights).items()} for name, weights in models}
    ema_fitness = float(np.mean(list(on_search["ema"].values())))
    last_fitness = float(np.mean(list(on_search["last"].values())))

    eval_steps = args.eval_steps or args.steps
    table: dict[str, dict[int, list[float]]] = {"last": {}, "ema": {}, "lcsc": {}}
    if args.eval_num_images:
        bar = tqdm(total=len(models) * len(args.eval_seeds), desc="final FID (last, EMA, LCSC)", disable=not progress)
        for name, weights in models:
            apply_weights(pipeline, weights)
            for seed in args.eval_seeds:
                fids = fitness.fids(None, eval_steps, seed, args.eval_num_images)
                for s, v in fids.items():
                    table[name].setdefault(s, []).append(v)
                bar.update(1)
        bar.close()
    eval_seconds = time.perf_counter() - t0
    apply_weights(pipeline, combined)

    report: dict[str, Any] = {
        "gensample_version": __version__,
        "command": _command_line(),
        "run": str(run), "method": info["method"], "pipeline_class": type(pipeline).__name__,
        "pipeline": str(output / "pipeline"),
        "snapshots": {"steps": steps, "files": names},
        "coefficients": {
            "form": "theta_last + sum_i a_i (theta_i - theta_last) = sum_i alpha_i theta_i",
            "base_step": steps[-1],
            "a": {str(s): float(a) for s, a in zip(steps[:-1], result.coefficients)},
            "alpha": {str(s): float(a) for s, a in zip(steps, result.alpha)},
        },
        "search": {"fitness": f"mean FID-{args.feature} over steps {list(args.steps)}, {args.num_images} samples, "
                              f"seeds {args.seed}..{args.seed + args.num_images - 1}, reference {reference}",
                   "best_fitness": result.fitness, "fitness_last": last_fitness, "fitness_ema": ema_fitness,
                   "fid_on_search_samples": on_search,
                   "evaluations": result.evaluations, "skipped": result.skipped, "seconds": result.seconds,
                   "processes": state.num_processes, "settings": result.settings},
        "training": {"seconds": info["training_seconds"], "steps": info["training_steps"]},
        "evaluation": {"num_images": args.eval_num_images, "seeds": list(args.eval_seeds), "seconds": eval_seconds,
                       "reference": str(reference), "feature": args.feature,
                       "steps": list(eval_steps), "nfe": {str(s): _nfe(pipeline, s) for s in eval_steps},
                       "fid": {name: {str(s): _summary(v) for s, v in per.items()} for name, per in table.items()}},
    }
    fid = report["evaluation"]["fid"]
    report["table_text"] = [{"steps": s, "nfe": _nfe(pipeline, s), **{k: _fmt(fid[k][str(s)]) for k in fid}}
                            for s in eval_steps] if args.eval_num_images else []
    if main:
        _write_pipeline(pipeline, output, _model_card(run, report))
        xs, ys = result.best_so_far()
        plot_curve(xs, ys, output / "fitness.png", log_y=False,
                   title=f"LCSC: best fitness (mean FID-{args.feature}) by fitness evaluation")
        tmp = output / ".tmp-report.json"
        tmp.write_text(json.dumps(report, indent=2, allow_nan=True) + "\n")
        os.replace(tmp, output / "report.json")
        print(f"LCSC of {len(steps)} snapshots (steps {steps[0]}..{steps[-1]}) of {run}: best fitness "
              f"{result.fitness:.4f} (last {last_fitness:.4f}, EMA {ema_fitness:.4f}) after {result.evaluations} "
              f"evaluations, {result.seconds:.0f} s; training took {info['training_seconds'] or float('nan'):.0f} s")
        if report["table_text"]:
            seeds = ", ".join(str(s) for s in args.eval_seeds)
            print(f"FID-{args.feature} on {args.eval_num_images} samples per seed range (first seeds {seeds}; the "
                  f"search used {args.seed}..{args.seed + args.num_images - 1}):")
            print(f"{'steps':>5} {'NFE':>4} {'last':>18} {'EMA':>18} {'LCSC':>18}")
            for r in report["table_text"]:
                print(f"{r['steps']:>5} {r['nfe']:>4} {r['last']:>18} {r['ema']:>18} {r['lcsc']:>18}")
        print(f"wrote {output / 'pipeline'}, {output / 'report.json'}, {output / 'fitness.png'}")
    state.wait_for_everyone()
    return 0
