"""Ship a finished `gensample train ict` run as assets/pipelines/ict-digits (the model `gensample demo` loads).

    python scripts/ship_ict_digits.py runs/R32 --fid-json runs/fid/R32.json --run-name R32 \\
        --demo-fid 1=8.1 2=6.0 --heldout-fid 1=20.1 2=18.0

Copies the run's EMA pipeline (unet/, scheduler/, model_index.json, gensample_pipeline.py), writes the few-step
schedule that ``scripts/fid_seeds.py`` tuned on disjoint seeds into the scheduler config (``sampling_sigmas``),
records the run config with its command in training_run_config.json, and writes the model card: the schedule table
of the scheduler as saved, and the Evaluation section from the fid_seeds JSON (n images x 3 seed ranges, mean +- std).
Re-record the golden values afterwards (``python tests/golden_cases.py --write``): they follow the shipped weights.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET = REPO / "assets" / "pipelines" / "ict-digits"
COPIED = ("unet", "scheduler", "model_index.json", "gensample_pipeline.py")


def _pairs(values: list[str] | None, arg: str) -> dict[int, float]:
    out = {}
    for v in values or []:
        steps, _, fid = v.partition("=")
        try:
            out[int(steps)] = float(fid)
        except ValueError:
            raise SystemExit(f"{arg} takes STEPS=FID pairs such as 1=8.1, got {v!r}.") from None
    return out


def _sigmas(spec: str) -> list[float]:
    return [float(s) for s in spec.split(",")]


def evaluation_text(fid: dict, run_name: str, demo: dict[int, float], heldout: dict[int, float]) -> str:
    """The card's Evaluation section: the fid_seeds table, then the single-range n = 1000 figures, if given."""
    report, tuned = fid["report"], fid.get("tuned")
    n, ranges = fid["num_images"], fid["seed_ranges"]
    rows = ["| sampling | FID-digits vs train, mean +- std over the seed ranges | per range |", "| --- | --- | --- |"]
    for spec, r in report.items():
        label = ((f"{spec} step{'s' if spec != '1' else ''}"
                  + (", the Karras grid's own schedule (before tuning)" if tuned and spec != "1" else ""))
                 if spec.isdigit()
                 else f"{len(_sigmas(spec))} steps, sigmas ({spec.replace(',', ', ')})"
                 + (" (the saved schedule)" if spec == tuned else ""))
        rows.append(f"| {label} | **{r['mean']:.2f} +- {r['std']:.2f}** | "
                    + " / ".join(f"{v:.2f}" for v in r["values"]) + " |")
    tuning = ", ".join(f"({k.replace(',', ', ')}) {v:.2f}" for k, v in fid.get("tuning", {}).items())
    text = (f"FID-digits (the embedded 8x8-digits feature network) against the train split, {n} images per seed "
            f"range, {ranges} ranges (image i of range r from seed {n} r + i), as in benchmarks/RESULTS.md "
            f"(\"iCT vs EDM vs ECT with seed spreads\", run {run_name}):\n\n" + "\n".join(rows))
    if tuning:
        text += (f"\n\nThe 2-step schedule was chosen on {n} images from seed {fid.get('tune_seed')} (disjoint from "
                 f"the reported ones): {tuning}; it is saved in the scheduler config (`sampling_sigmas`).")
    if demo:
        text += ("\n\nAt n = 1000 (seeds 0..999, one generator per image; what `gensample demo` prints): "
                 + ", ".join(f"{s} step{'s' if s > 1 else ''} {v:.2f}" for s, v in sorted(demo.items()))
                 + (" against the train split; " + ", ".join(f"{v:.2f}" for _, v in sorted(heldout.items()))
                    + " against the 297 held-out digits" if heldout else "")
                 + ". FID at n = 1000 is biased upwards and varies by about +-4 between seed ranges.")
    text += ("\n\nReference points: real held-out digits vs train 17.85 (n = 297, the floor at that n), a Gaussian "
             "fit to the training pixels 400.36.")
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished `gensample train ict` output folder")
    parser.add_argument("--fid-json", type=Path, required=True, help="scripts/fid_seeds.py --output-json of the run")
    parser.add_argument("--run-name", required=True, help="the run's name in benchmarks/RESULTS.md")
    parser.add_argument("--demo-fid", nargs="*", help="STEPS=FID at n = 1000 (gensample demo), e.g. 1=8.1 2=6.0")
    parser.add_argument("--heldout-fid", nargs="*", help="STEPS=FID against the held-out digits (memorization_check)")
    parser.add_argument("--target", type=Path, default=TARGET, help="the folder to write (default: %(default)s)")
    parser.add_argument("--budget-note", default="one CPU thread, beside other runs",
                        help="where the wall time was measured")
    args = parser.parse_args(argv)

    from gensample import load_pipeline
    from gensample.training.model_card import model_card
    from gensample.training.run_info import run_info

    run, pipeline_dir = args.run, args.run / "pipeline"
    if not (pipeline_dir / "model_index.json").is_file():
        raise SystemExit(f"{pipeline_dir} has no model_index.json: pass a finished training run's output folder.")
    run_config = json.loads((run / "run_config.json").read_text())
    if run_config.get("method") != "ict":
        raise SystemExit(f"{run} is a {run_config.get('method')!r} run; ict-digits ships an iCT model.")
    fid = json.loads(args.fid_json.read_text())
    tuned = fid.get("tuned")
    if not tuned:
        raise SystemExit(f"{args.fid_json} has no tuned schedule: run fid_seeds.py with --tune.")

    target = args.target
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for name in COPIED:
        src = pipeline_dir / name
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, target / name)
    scheduler_file = target / "scheduler" / "scheduler_config.json"
    scheduler_config = json.loads(scheduler_file.read_text())
    scheduler_config["sampling_sigmas"] = _sigmas(tuned)
    scheduler_file.write_text(json.dumps(scheduler_config, indent=2, sort_keys=True) + "\n")

    train = run_config["train"]
    # the command as the run's own card recorded it (the process's command line)
    lines = [ln for ln in (pipeline_dir / "README.md").read_text().splitlines() if ln.startswith("- Command: `")]
    if not lines:
        raise SystemExit(f"{pipeline_dir / 'README.md'} records no command; was it written by `gensample train`?")
    command = lines[0][len("- Command: `"):].split("`")[0]
    shipped_config = {**run_config, "command": command,
                      "sampling_sigmas_note": f"2-step schedule {tuned} chosen by scripts/fid_seeds.py --tune on "
                                              f"{fid['num_images']} images from seed {fid.get('tune_seed')}"}
    (target / "training_run_config.json").write_text(json.dumps(shipped_config, indent=1) + "\n")

    pipe = load_pipeline(target)
    card = model_card(
        pipe, load_path='asset_path("pipelines", "ict-digits")',
        usage_imports=["from gensample.assets import asset_path"], method="ict", run_config=run_config,
        command=command,
        command_note=f"recorded in training_run_config.json; benchmarks/RESULTS.md run {args.run_name}",
        budget={"steps": train["max_steps"], "seconds": run_info(run)["training_seconds"], "device": args.budget_note},
        results=evaluation_text(fid, args.run_name, _pairs(args.demo_fid, "--demo-fid"),
                                _pairs(args.heldout_fid, "--heldout-fid")),
        sampling_steps=[1, 2], recommended_steps=2, data="digits", version_in_index=True, autogenerated_note=False)
    (target / "README.md").write_text(card)
    print(f"shipped {run} as {target} (2-step schedule {tuned}); now: python tests/golden_cases.py --write")


if __name__ == "__main__":
    main()
