"""End-to-end sampling time: our ConsistencyPipeline (standard and fast path) vs diffusers' ConsistencyModelPipeline.

All pipelines share one UNet (same weights) and take the same number of steps. Each pipeline call returns
``output_type="pt"`` images. For every (batch, steps) pair the script prints the median wall time of each pipeline,
the speed-up ratios over diffusers measured in this run, and the scheduler (non-UNet) overhead as a fraction of the
total: ``(pipeline time - UNet time) / pipeline time``, with the UNet calls of that very run timed by forward hooks
(CUDA events on GPU). CUDA-graph replays run no Python hooks; their overhead (marked ``*``) compares with
``unet_s``, steps x a separately timed eager UNet call. Pipelines run round-robin within each repeat, so load
drifts on a shared machine hit them alike. It also checks the outputs: the fast path must equal our standard
pipeline (bit for bit on CPU), and diffusers must agree up to float rounding.

CPU (default; a moderately sized 3-channel 32x32 UNet, since diffusers' check_inputs hard-codes 3 channels):

    OMP_NUM_THREADS=1 python benchmarks/bench_sampling.py --device cpu --threads 1 --repeats 3

GPU (the "cifar10" / "imagenet64" presets; adds CUDA-graph and bf16 fast paths):

    python benchmarks/bench_sampling.py --device cuda --preset cifar10 --batch-sizes 1 16 256 --steps 1 2 4

The UNet is randomly initialised: timing does not depend on the weights.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch


@dataclass
class Row:
    batch: int
    steps: int
    unet_s: float = 0.0  # steps x median time of a separately timed UNet call
    times: dict[str, float] = field(default_factory=dict)  # pipeline -> median seconds per call
    overhead: dict[str, float] = field(default_factory=dict)  # pipeline -> median non-UNet fraction of a call
    overhead_source: dict[str, str] = field(default_factory=dict)  # "in-run" (hooks) or "separate" (unet_s)
    max_abs_diff: dict[str, float] = field(default_factory=dict)  # vs our standard pipeline


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class UNetTimer:
    """Sums the time spent inside ``module``'s forward calls during a ``with`` block (forward hooks; CUDA events on
    GPU, so it adds no synchronisation). Calls replayed from a CUDA graph run no hooks: ``calls`` stays 0."""

    def __init__(self, module: torch.nn.Module, device: torch.device):
        self.module, self.cuda = module, device.type == "cuda"
        self.spans: list = []
        self.calls = 0

    def _pre(self, *_):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.spans.append([ev, None])
        else:
            self.spans.append([time.perf_counter(), None])

    def _post(self, *_):
        self.calls += 1
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.spans[-1][1] = ev
        else:
            self.spans[-1][1] = time.perf_counter()

    def __enter__(self) -> "UNetTimer":
        self.handles = [self.module.register_forward_pre_hook(self._pre),
                        self.module.register_forward_hook(self._post)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()

    def total(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return sum(a.elapsed_time(b) / 1e3 for a, b in self.spans)
        return sum(b - a for a, b in self.spans)


def timed(fn: Callable[[], object], repeats: int, device: torch.device) -> tuple[float, object]:
    """(median wall time over ``repeats`` device-synchronised calls of ``fn``, the last result)."""
    times, out = [], None
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def build_model(args: argparse.Namespace):
    from gensample.models import build_unet

    torch.manual_seed(0)
    if args.preset == "digits":  # CPU default: ~1.6M parameters, 3-channel 32x32 so diffusers accepts it
        unet = build_unet("digits", sample_size=32, in_channels=3)
    else:
        unet = build_unet(args.preset)
    if unet.config.in_channels != 3:
        raise ValueError(f"diffusers' ConsistencyModelPipeline only accepts 3-channel models; preset {args.preset!r} "
                         f"has {unet.config.in_channels}.")
    return unet.eval().to(args.device)


def fast_variants(device: torch.device, quick: bool) -> dict[str, dict]:
    """Fast-path configurations to time: the CPU fallback loop; on CUDA also eager vs CUDA graph and bf16."""
    if device.type != "cuda":
        return {"ours-fast": {}}
    variants = {
        "fast-eager": dict(cuda_graph=False, channels_last=False),
        "fast-graph": dict(cuda_graph=True, channels_last=False),
    }
    if not quick:
        variants["fast-graph-cl-bf16"] = dict(cuda_graph=True, channels_last=True, dtype=torch.bfloat16)
        variants["fast-graph-rng"] = dict(cuda_graph=True, channels_last=False, in_kernel_rng=True)
    return variants


def run(args: argparse.Namespace) -> list[Row]:
    import warnings

    from diffusers import CMStochasticIterativeScheduler, ConsistencyModelPipeline

    from gensample.pipelines import ConsistencyPipeline
    from gensample.pipelines.fast_sampling import FastSampler
    from gensample.schedulers import ConsistencyScheduler

    device = torch.device(args.device)
    unet = build_model(args)
    size = unet.config.sample_size
    n_params = sum(p.numel() for p in unet.parameters()) / 1e6
    print(f"# device={device} threads={torch.get_num_threads()} preset={args.preset} ({n_params:.2f}M params, "
          f"3x{size}x{size}) repeats={args.repeats} torch={torch.__version__}", flush=True)

    theirs = ConsistencyModelPipeline(unet=unet, scheduler=CMStochasticIterativeScheduler())
    ours = ConsistencyPipeline(unet=unet, scheduler=ConsistencyScheduler())
    for p in (theirs, ours):
        p.set_progress_bar_config(disable=True)
    samplers: dict[str, FastSampler] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the in_kernel_rng notice
        for name, options in fast_variants(device, args.quick).items():
            samplers[name] = FastSampler(ours, **options)

    def gen() -> torch.Generator:
        return torch.Generator(device="cpu").manual_seed(0)

    calls: dict[str, Callable[[int, int], torch.Tensor]] = {
        "diffusers": lambda b, n: theirs(batch_size=b, num_inference_steps=n, generator=gen(),
                                         output_type="pt").images,
        "ours": lambda b, n: ours(batch_size=b, num_inference_steps=n, generator=gen(), output_type="pt").images,
    }
    for name, sampler in samplers.items():
        calls[name] = (lambda s: lambda b, n: s(batch_size=b, num_inference_steps=n, generator=gen(),
                                                output_type="pt").images)(sampler)

    def timed_module(name: str) -> torch.nn.Module:
        """The module the pipeline really calls (a fast sampler may hold a cast or compiled copy)."""
        if name in samplers:
            samplers[name]._prepare()
            return samplers[name].net
        return unet

    rows = []
    with torch.no_grad():
        for batch in args.batch_sizes:
            x = torch.randn(batch, 3, size, size, device=device)
            t = torch.tensor(100.0, device=device)
            for fn in calls.values():  # warm-up (allocator, oneDNN / cuDNN, Triton compilation, graph capture)
                for n in (args.steps if device.type == "cuda" else args.steps[:1]):
                    fn(batch, n)
            unet_call, _ = timed(lambda: unet(x, t, return_dict=False), max(args.repeats, 3), device)
            for steps in args.steps:
                row = Row(batch, steps, unet_s=steps * unet_call)
                walls: dict[str, list[float]] = {name: [] for name in calls}
                fractions: dict[str, list[float]] = {name: [] for name in calls}
                outputs = {}
                for _ in range(args.repeats):  # round-robin, so load drifts hit every pipeline alike
                    for name, fn in calls.items():
                        with UNetTimer(timed_module(name), device) as timer:
                            wall, outputs[name] = timed(lambda: fn(batch, steps), 1, device)
                        walls[name].append(wall)
                        if timer.calls == steps:
                            fractions[name].append(max(0.0, 1 - timer.total() / wall))
                for name in calls:
                    row.times[name] = statistics.median(walls[name])
                    if fractions[name]:
                        row.overhead[name], row.overhead_source[name] = statistics.median(fractions[name]), "in-run"
                    else:  # CUDA-graph replay: no hooks run; compare with separately timed UNet calls
                        row.overhead[name] = max(0.0, 1 - row.unet_s / row.times[name])
                        row.overhead_source[name] = "separate"
                    if name != "ours":
                        row.max_abs_diff[name] = float((outputs[name].float() - outputs["ours"].float()).abs().max())
                rows.append(row)
                print_row(row, header=len(rows) == 1)
    return rows


def print_row(row: Row, header: bool = False) -> None:
    names = list(row.times)
    fast = [n for n in names if n not in ("diffusers", "ours")]
    if header:
        cols = ["batch", "steps", "unet_s"] + [f"{n}_s" for n in names] + ["diffusers/ours"] + \
            [f"diffusers/{n}" for n in fast] + ["overhead_diffusers", "overhead_ours"] + \
            [f"overhead_{n}" for n in fast] + ["maxdiff_diffusers"] + [f"maxdiff_{n}" for n in fast]
        print("| " + " | ".join(cols) + " |")
        print("|" + "---|" * len(cols))
    ratio = [row.times["diffusers"] / row.times[n] for n in ["ours"] + fast]
    overhead = [f"{row.overhead[n]:.1%}" + ("" if row.overhead_source[n] == "in-run" else "*")
                for n in ["diffusers", "ours"] + fast]
    vals = [str(row.batch), str(row.steps), f"{row.unet_s:.4f}"] + [f"{row.times[n]:.4f}" for n in names] + \
        [f"{r:.2f}x" for r in ratio] + overhead + \
        [f"{row.max_abs_diff[n]:.1e}" for n in ["diffusers"] + fast]
    print("| " + " | ".join(vals) + " |", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--preset", default=None,
                        help="UNet preset: digits (CPU default, 3x32x32), cifar10 (GPU default), imagenet64")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                        help="default: 1 64 on CPU, 1 16 256 on CUDA")
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per measurement (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    parser.add_argument("--quick", action="store_true", help="smallest run: batch 1 and 2, steps 1 2, 1 repeat")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    torch.set_num_threads(args.threads)
    gpu = args.device.startswith("cuda")
    args.preset = args.preset or ("cifar10" if gpu else "digits")
    if args.quick:
        args.batch_sizes = args.batch_sizes or [1, 2]
        args.steps, args.repeats = [1, 2], 1
    args.batch_sizes = args.batch_sizes or ([1, 16, 256] if gpu else [1, 64])
    rows = run(args)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": {k: v for k, v in vars(args).items()}, "rows": [asdict(r) for r in rows]}, fh,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
