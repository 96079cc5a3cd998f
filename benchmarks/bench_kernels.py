"""Fused sampler kernels vs their PyTorch references: achieved memory bandwidth against the card's peak.

For each kernel and tensor size it times the Triton kernel and the PyTorch reference (the same math done as separate
eager ops). It reports GB/s computed from the *minimal* traffic of the fused kernel, so both columns are directly
comparable (the reference really moves more bytes, which is the point of fusing), the fraction of ``--peak-bw``, and
the speed-up.

Minimal traffic per element (e = state bytes, e_F = network-output bytes, e_o = network-input bytes):

* ``cm_step`` (CM Algorithm 1: read x, F, z; write next, denoised):   4e + e_F
* ``cm_step_last`` (last step, no noise: read x, F; write denoised):  2e + e_F
* ``cm_step_rng`` (in-kernel Philox noise; the reference includes torch.randn): 3e + e_F
* ``ctm_step`` (CTM gamma-sampling, Kim et al. 2024: read x, F, z; write next, G): 4e + e_F
* ``scale_input`` (c_in x cast to the network dtype: read x; write):  e + e_o

GPU (H200 peak HBM bandwidth 4.8e12 B/s by default):

    python benchmarks/bench_kernels.py --device cuda --peak-bw 4.8e12

CPU fallback (no Triton kernels there, so it times only the references; this checks that the script runs):

    python benchmarks/bench_kernels.py --device cpu --quick

With ``TRITON_INTERPRET=1`` on CPU the Triton column runs in the interpreter (a smoke test, the timings mean nothing).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Callable

import torch

from gensample.kernels import (
    ConsistencyStepCoefficients,
    CTMStepCoefficients,
    consistency_step_reference,
    ctm_gamma_step_reference,
    input_coefficient,
    scale_input_reference,
    triton_available,
)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def bench(fn: Callable[[], object], device: torch.device, iters: int, warmup: int = 3) -> float:
    """Median seconds per call: CUDA events on GPU, perf_counter on CPU."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cases(numel: int, device: torch.device, state: torch.dtype, net: torch.dtype, tk) -> dict[str, tuple]:
    """name -> (bytes moved by the fused kernel, reference fn, triton fn or None)."""
    g = torch.Generator(device=device).manual_seed(0)
    shape = (numel,)
    x = torch.randn(shape, generator=g, device=device, dtype=state)
    f = torch.randn(shape, generator=g, device=device, dtype=net)
    z = torch.randn(shape, generator=g, device=device, dtype=state)
    e, e_f = x.element_size(), f.element_size()
    cm = ConsistencyStepCoefficients.from_sigmas(2.0, 0.5)
    cm_last = ConsistencyStepCoefficients.from_sigmas(0.5, 0.002)
    ctm = CTMStepCoefficients.from_sigmas(2.0, 0.5, 0.5)
    c_in = input_coefficient(2.0)
    seed = torch.tensor([1234], dtype=torch.int64, device=device)
    have = tk is not None

    def ref_rng():
        noise = torch.randn(shape, device=device, dtype=state)
        return consistency_step_reference(f, x, cm, noise)

    return {
        "cm_step": (4 * e + e_f, lambda: consistency_step_reference(f, x, cm, z),
                    (lambda: tk.consistency_step_triton(f, x, cm, z)) if have else None),
        "cm_step_last": (2 * e + e_f, lambda: consistency_step_reference(f, x, cm_last, None),
                         (lambda: tk.consistency_step_triton(f, x, cm_last, None)) if have else None),
        "cm_step_rng": (3 * e + e_f, ref_rng,
                        (lambda: tk.consistency_step_triton(f, x, cm, rng_seed=seed)) if have else None),
        "ctm_step": (4 * e + e_f, lambda: ctm_gamma_step_reference(f, x, ctm, z),
                     (lambda: tk.ctm_gamma_step_triton(f, x, ctm, z)) if have else None),
        "scale_input": (e + torch.empty((), dtype=net).element_size(), lambda: scale_input_reference(x, c_in, net),
                        (lambda: tk.scale_input_triton(x, c_in, net)) if have else None),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (references only)")
    parser.add_argument("--peak-bw", type=float, default=4.8e12, help="peak memory bandwidth in B/s (H200: 4.8e12)")
    parser.add_argument("--numel", type=int, nargs="+", default=None,
                        help="elements per tensor; default: batch 1/16/256 of 3x64x64 and 2^26")
    parser.add_argument("--state-dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--net-dtype", choices=sorted(DTYPES), default=None,
                        help="network output/input dtype (default: the state dtype); try bfloat16")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--quick", action="store_true", help="two small sizes, 5 iterations")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available; use --device cpu")
    torch.set_num_threads(args.threads)
    state = DTYPES[args.state_dtype]
    net = DTYPES[args.net_dtype or args.state_dtype]
    if args.quick:
        sizes, iters = args.numel or [3 * 32 * 32, 16 * 3 * 32 * 32], 5
    else:
        sizes, iters = args.numel or [3 * 64 * 64, 16 * 3 * 64 * 64, 256 * 3 * 64 * 64, 2**26], args.iters

    tk = None
    interpreting = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if triton_available() and (device.type == "cuda" or interpreting):
        from gensample.kernels import triton_kernels as tk
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    mode = "no (references only)" if tk is None else ("interpreter (timings meaningless)" if interpreting else "yes")
    print(f"# device={name} triton={mode} state={state} net={net} peak={args.peak_bw / 1e9:.0f} GB/s "
          f"iters={iters}", flush=True)
    cols = ["kernel", "numel", "MB moved", "torch us", "torch GB/s", "triton us", "triton GB/s", "triton % peak",
            "speed-up"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    results = []
    with torch.no_grad():
        for numel in sizes:
            for kernel, (per_elem, ref, fused) in cases(numel, device, state, net, tk).items():
                nbytes = per_elem * numel
                t_ref = bench(ref, device, iters)
                t_tri = bench(fused, device, iters) if fused is not None else float("nan")
                row = dict(kernel=kernel, numel=numel, bytes=nbytes, torch_s=t_ref, triton_s=t_tri,
                           torch_gbps=nbytes / t_ref / 1e9, triton_gbps=nbytes / t_tri / 1e9,
                           triton_frac_peak=nbytes / t_tri / args.peak_bw, speedup=t_ref / t_tri)
                results.append(row)
                tri = ("n/a | n/a | n/a | n/a" if fused is None else
                       f"{t_tri * 1e6:.1f} | {row['triton_gbps']:.1f} | {row['triton_frac_peak']:.1%} | "
                       f"{row['speedup']:.2f}x")
                print(f"| {kernel} | {numel} | {nbytes / 1e6:.2f} | {t_ref * 1e6:.1f} | {row['torch_gbps']:.1f} | "
                      f"{tri} |", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": name, "peak_bw": args.peak_bw, "state": str(state), "net": str(net),
                       "rows": results}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
