"""Compile every fused Triton sampler kernel for real GPU targets without a GPU, inspect the result, predict speed.

Triton compiles ahead of time without a device. For each kernel variant that :mod:`gensample.kernels.dispatch` can
launch, this script calls the real launcher (``consistency_step_triton`` etc.) on ``meta`` tensors with the kernel
objects swapped for recorders, so it sees the exact arguments, constexprs and launch options (``num_warps``,
``enable_fp_fusion=False``) of a real launch. It then specialises them with the kernel's own Triton binder (the same
code path as ``kernel[grid](...)``: 16-byte aligned pointers and integers divisible by 16 get ``tt.divisibility=16``,
an int argument equal to 1 becomes a constexpr, and so on) and compiles them with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", 80|90, 32))`` into PTX and a cubin (triton's own ptxas).

From the artefacts it reports per variant: registers per thread, spill stores/loads, shared memory and stack
(``ptxas -v``, rerun on the PTX with the flags triton uses), and the global loads/stores by access width in the PTX
(128-bit = ``ld.global.v4.b32`` and the like) and in the SASS (``LDG.E.128`` / ``STG.E.128``).

Usage (triton kept outside the main environment, as CI does)::

    python -m pip install -q --target /tmp/gensample-triton triton
    PYTHONPATH=/tmp/gensample-triton python benchmarks/compile_kernels.py            # all variants, sm_80 + sm_90
    PYTHONPATH=/tmp/gensample-triton python benchmarks/compile_kernels.py --quick    # one variant per kernel
    python benchmarks/compile_kernels.py --roofline            # bytes per step and predicted times (no triton needed)
    python benchmarks/compile_kernels.py --compare benchmarks/out/kernels_fp32.json --peak-bw 4.8e12
                                                               # measured (bench_kernels.py) vs predicted

Exit status 1 if any variant fails to compile (or, with ``--check``, if a variant has a spill or a tensor access
that is not 128 bits wide).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
KERNELS = ("consistency_step", "ctm_gamma_step", "scale_input")
ARCHS = (80, 90)
# The canonical element count: batch 16 of a 3x64x64 latent (a multiple of 16, like every image/latent shape here).
NUMEL = 16 * 3 * 64 * 64


# ---------------------------------------------------------------------------------------------------------------------
# variants: what the dispatch can launch
# ---------------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Variant:
    """One launch configuration of a kernel.

    ``state``: the sampler state dtype (x, outputs); ``net``: the network dtype (model output F for the step kernels,
    the output for scale_input); ``noise``: "none" (std == 0, the last step), "rng" (``rng_seed=``, in-kernel Philox)
    or the dtype of the noise tensor; ``numel``: the element count (it decides the specialisation of n_elements).
    """

    kernel: str
    state: str
    net: str
    noise: str = "-"
    clip: bool | None = None
    numel: int = NUMEL

    @property
    def n_tag(self) -> str:
        if self.numel >= 2**31:
            return "n>=2^31 (i64)"
        return "n%16==0" if self.numel % 16 == 0 else "n%16!=0"

    def label(self) -> str:
        parts = [self.kernel, f"x={self.state}", ("F=" if self.kernel != "scale_input" else "out=") + self.net]
        if self.kernel != "scale_input":
            parts += [f"noise={self.noise}", f"clip={int(bool(self.clip))}"]
        if self.numel != NUMEL:
            parts.append(self.n_tag)
        return " ".join(parts)


def all_variants() -> list[Variant]:
    """Every dtype and constexpr combination the dispatch can launch, at an element count divisible by 16.

    The step kernels take a state dtype x (fp32/fp16/bf16), a model output F in any of the three (it is upcast in the
    kernel), CLIP (True/False) and NOISE: 0 (no noise), 1 (a noise tensor, of any of the three dtypes: the launcher
    does not cast it) or 2 (in-kernel RNG, seed from an int64 tensor). scale_input takes x and an output dtype.
    """
    out = []
    for kernel in ("consistency_step", "ctm_gamma_step"):
        for state in DTYPES:
            for net in DTYPES:
                for noise in ("none", *DTYPES, "rng"):
                    for clip in (False, True):
                        out.append(Variant(kernel, state, net, noise, clip))
    out += [Variant("scale_input", state, net) for state in DTYPES for net in DTYPES]
    return out


def edge_variants() -> list[Variant]:
    """Element counts that change the integer specialisation: not a multiple of 16 (an odd image size such as
    3x9x11) and >= 2^31 (n_elements becomes i64). Same-dtype noise tensor, per kernel and state dtype."""
    out = []
    for numel in (16 * 3 * 9 * 11 + 3, 2**31 + 16):
        for state in DTYPES:
            out.append(Variant("consistency_step", state, state, state, True, numel))
            out.append(Variant("ctm_gamma_step", state, state, state, False, numel))
            out.append(Variant("scale_input", state, state, numel=numel))
    return out


def quick_variants() -> list[Variant]:
    """One representative variant per kernel (what tests/test_kernels_compile.py compiles)."""
    return [
        Variant("consistency_step", "fp32", "fp32", "fp32", True),
        Variant("ctm_gamma_step", "bf16", "bf16", "rng", False),
        Variant("scale_input", "fp32", "bf16"),
    ]


# ---------------------------------------------------------------------------------------------------------------------
# capture the real launch, specialise it like triton's launcher, compile it
# ---------------------------------------------------------------------------------------------------------------------
_KERNEL_ATTRS = {"consistency_step": "_consistency_step_kernel", "ctm_gamma_step": "_ctm_gamma_step_kernel",
                 "scale_input": "_scale_input_kernel"}


class _Recorder:
    """Stands in for a @triton.jit kernel: ``kernel[grid](*args, **kwargs)`` records the call instead of running."""

    def __init__(self, fn, calls: list):
        self.fn, self.calls = fn, calls

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((self.fn, grid, args, kwargs))


def capture_launch(v: Variant):
    """(jit function, grid, args, kwargs) of the launch that the real launcher makes for ``v``, on meta tensors."""
    from gensample.kernels import triton_kernels as tk
    from gensample.kernels.reference import ConsistencyStepCoefficients, CTMStepCoefficients

    calls: list = []
    saved = {name: getattr(tk, name) for name in _KERNEL_ATTRS.values()}
    meta = torch.device("meta")
    x = torch.empty(v.numel, dtype=DTYPES[v.state], device=meta)
    try:
        for name, fn in saved.items():
            setattr(tk, name, _Recorder(fn, calls))
        if v.kernel == "scale_input":
            tk.scale_input_triton(x, 0.5, DTYPES[v.net])
        else:
            f = torch.empty(v.numel, dtype=DTYPES[v.net], device=meta)
            last = v.noise == "none"
            z = None if last or v.noise == "rng" else torch.empty(v.numel, dtype=DTYPES[v.noise], device=meta)
            seed = 1234 if v.noise == "rng" else None
            if v.kernel == "consistency_step":
                c = ConsistencyStepCoefficients.from_sigmas(2.0, 0.002 if last else 0.5)
                tk.consistency_step_triton(f, x, c, z, bool(v.clip), rng_seed=seed)
            else:
                c = CTMStepCoefficients.from_sigmas(2.0, 0.5, 0.0 if last else 0.5)
                tk.ctm_gamma_step_triton(f, x, c, z, bool(v.clip), rng_seed=seed)
    finally:
        for name, fn in saved.items():
            setattr(tk, name, fn)
    if len(calls) != 1:
        raise RuntimeError(f"{v.label()}: expected one kernel launch, saw {len(calls)}")
    return calls[0]


def specialise(fn, args, kwargs, target):
    """(ASTSource, options dict) exactly as ``JITFunction.run`` builds them for these arguments on ``target``."""
    from triton import knobs
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    kwargs = dict(kwargs)
    # JITFunction.run adds these before binding (those this triton version knows).
    kwargs["debug"] = kwargs.get("debug", getattr(fn, "debug", None)) or knobs.runtime.debug
    for key in ("instrumentation_mode", "fpsan_homomorphic_casts"):
        if hasattr(knobs.compilation, key):
            kwargs[key] = getattr(knobs.compilation, key)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return ASTSource(fn, signature, constexprs, attrs), options.__dict__, signature, attrs


def _nvidia_tool(name: str, arch: int) -> str:
    from triton.backends.nvidia import compiler as nv

    if name == "ptxas":
        return nv.get_ptxas(arch).path
    return str(Path(nv.get_ptxas(arch).path).with_name(name))


_PTX_ACCESS = re.compile(r"\b(ld|st)\.global((?:\.[A-Za-z0-9_:]+)*)")
_TYPE_BITS = re.compile(r"^[bsuf](8|16|32|64|128)$")
_PTX_LOC = re.compile(r"^\s*\.loc\s+(\d+)\s")
_PTX_FILE = re.compile(r'^\s*\.file\s+(\d+)\s+"([^"]+)"', re.MULTILINE)


def ptx_accesses(ptx: str, exclude_dir: str | None = None) -> dict[str, Counter]:
    """{"ld": Counter(bits per access), "st": ...} over the global loads/stores of the PTX (``.v4.b32`` -> 128).

    With ``exclude_dir`` (triton's package folder), the accesses whose nearest preceding ``.loc`` is in a file there
    are left out, which keeps the kernel's own ``tl.load``/``tl.store``: e.g. the table lookups of libdevice's sin/cos
    slow path that ``tl.randn`` brings in (``ld.global.nc.b32`` from ``__cudart_i2opi_f``, at triton's random.py)."""
    files = {int(i): os.path.realpath(f) for i, f in _PTX_FILE.findall(ptx)}
    out = {"ld": Counter(), "st": Counter()}
    current = None
    for line in ptx.splitlines():
        loc = _PTX_LOC.match(line)
        if loc:
            current = files.get(int(loc.group(1)))
            continue
        for op, mods in _PTX_ACCESS.findall(line):
            if exclude_dir is not None and current is not None and current.startswith(exclude_dir):
                continue
            vec, bits = 1, None
            for m in mods.split(".")[1:]:
                if m in ("v2", "v4", "v8"):
                    vec = int(m[1:])
                elif _TYPE_BITS.match(m):
                    bits = int(_TYPE_BITS.match(m).group(1))
            if bits is None:
                raise ValueError(f"unparsed PTX access {op}.global{mods}")
            out[op][vec * bits] += 1
    return out


def ptxas_stats(ptx: str, arch: int, fmad: bool) -> dict:
    """Registers, spills, shared memory and stack from ``ptxas -v`` (same binary and flags as triton's make_cubin)."""
    from triton.backends.nvidia.compiler import sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, "k.ptx")
        src.write_text(ptx)
        cmd = [_nvidia_tool("ptxas", arch), "-lineinfo", *([] if fmad else ["--fmad=false"]), "-v",
               "--regAllocOptLevel=2", f"--gpu-name={sm_arch_from_capability(arch)}", str(src), "-o",
               str(Path(tmp, "k.cubin"))]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr

    def grab(pattern: str) -> int:
        m = re.search(pattern, log)
        return int(m.group(1)) if m else 0

    return {"regs": grab(r"Used (\d+) registers"), "spill_st": grab(r"(\d+) bytes spill stores"),
            "spill_ld": grab(r"(\d+) bytes spill loads"), "smem": grab(r"(\d+) bytes smem"),
            "stack": grab(r"(\d+) bytes stack frame")}


def sass_accesses(cubin: bytes, arch: int) -> dict[str, Counter]:
    """{"ld": Counter(bits), "st": ...} over LDG/STG in the SASS of the cubin (LDG.E.128 -> 128, LDG.E -> 32)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(cubin)
        fh.flush()
        sass = subprocess.run([_nvidia_tool("cuobjdump", arch), "-sass", fh.name], capture_output=True, text=True,
                              check=True).stdout
    out = {"ld": Counter(), "st": Counter()}
    for op, mods in re.findall(r"\b(LDG|STG)((?:\.[A-Z0-9_]+)*)", sass):
        widths = [int(m.group(1)) for m in (re.fullmatch(r"[US]?(8|16|32|64|128)", x) for x in mods.split(".")) if m]
        out["ld" if op == "LDG" else "st"][(widths or [32])[0]] += 1
    return out


@dataclasses.dataclass
class Result:
    variant: Variant
    arch: int
    ok: bool
    seconds: float = 0.0
    error: str = ""
    signature: str = ""
    regs: int = 0
    spill_st: int = 0
    spill_ld: int = 0
    smem: int = 0
    triton_shared: int = 0
    stack: int = 0
    ptx: dict | None = None
    ptx_kernel: dict | None = None
    sass: dict | None = None
    ptx_text: str = ""

    def tensor_accesses(self) -> dict[str, Counter]:
        """Accesses to tensor data: the PTX accesses made by the kernel's own source lines, less the one scalar int64
        seed load (NOISE=2), which every thread makes to the same address (a broadcast, not a per-element stream)."""
        acc = {k: Counter(c) for k, c in self.ptx_kernel.items()}
        if self.variant.noise == "rng" and acc["ld"][64] > 0:
            acc["ld"][64] -= 1
            acc["ld"] += Counter()  # drop zero counts
        return acc

    def label_sig(self) -> str:
        return f"{self.variant.label()}: `{self.signature}`"

    def vectorised(self) -> bool:
        acc = self.tensor_accesses()
        return all(bits == 128 for op in ("ld", "st") for bits in acc[op])

    def as_json(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "ptx_text"}
        for key in ("ptx", "ptx_kernel", "sass"):  # {"ld": {bits: count}} (dataclasses.asdict mangles Counters)
            d[key] = None if d[key] is None else {op: dict(c) for op, c in d[key].items()}
        d["variant"] = dataclasses.asdict(self.variant) | {"label": self.variant.label()}
        return d


def compile_variant(v: Variant, arch: int, keep_ptx: bool = False) -> Result:
    import triton
    from triton.backends.compiler import GPUTarget

    t0 = time.perf_counter()
    try:
        fn, _grid, args, kwargs = capture_launch(v)
        src, options, signature, attrs = specialise(fn, args, kwargs, GPUTarget("cuda", arch, 32))
        kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
        ptx, cubin = kernel.asm["ptx"], kernel.asm["cubin"]
        stats = ptxas_stats(ptx, arch, bool(options.get("enable_fp_fusion", True)))
        res = Result(v, arch, True, signature=_describe_signature(signature, attrs, fn), ptx=ptx_accesses(ptx),
                     ptx_kernel=ptx_accesses(ptx, str(Path(triton.__file__).resolve().parent)),
                     sass=sass_accesses(cubin, arch), triton_shared=int(kernel.metadata.shared),
                     ptx_text=ptx if keep_ptx else "", **stats)
    except Exception as exc:  # report and go on: every failure is listed, then the exit status is 1
        res = Result(v, arch, False, error=f"{type(exc).__name__}: {exc}".strip()[:2000])
    res.seconds = time.perf_counter() - t0
    return res


def _compile_one(job: tuple[Variant, int, bool]) -> Result:
    return compile_variant(*job)


def compile_many(variants: list[Variant], arch: int, jobs: int, keep_ptx: bool = False):
    """compile_variant over ``variants``, in order, in ``jobs`` forked worker processes (1: in this process)."""
    work = [(v, arch, keep_ptx) for v in variants]
    if jobs <= 1:
        yield from map(_compile_one, work)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
        yield from pool.map(_compile_one, work, chunksize=2)


def _describe_signature(signature: dict, attrs: dict, fn) -> str:
    """'x_ptr:*fp32/D, n_elements:i32/D, ...' (D = tt.divisibility 16), constexprs omitted."""
    div = {fn.arg_names[k[0]] for k, v in attrs.items() if ["tt.divisibility", 16] in [list(a) for a in v]}
    return ", ".join(f"{k}:{t}{'/D' if k in div else ''}" for k, t in signature.items() if t != "constexpr")


# ---------------------------------------------------------------------------------------------------------------------
# reporting
# ---------------------------------------------------------------------------------------------------------------------
def _fmt_counts(c: Counter) -> str:
    return " ".join(f"{n}x{bits}b" for bits, n in sorted(c.items(), reverse=True)) or "-"


def _vector_verdict(r: Result) -> str:
    if r.vectorised():
        return "yes"
    if r.variant.numel % 16 and r.tensor_accesses()["ld"][128]:
        return "full blocks (the last, masked block: scalar)"
    return "**no**"


def table(results: list[Result]) -> str:
    cols = ["sm", "kernel", "x", "F/out", "noise", "clip", "n", "regs", "spill st/ld B", "smem B", "stack B",
            "PTX ld.global", "PTX st.global", "PTX ld, libdevice", "SASS LDG", "SASS STG", "tensor ld/st all 128-bit"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in results:
        v = r.variant
        head = [f"{r.arch}", v.kernel, v.state, v.net, v.noise, "-" if v.clip is None else str(int(v.clip)), v.n_tag]
        if not r.ok:
            lines.append("| " + " | ".join(head + ["FAILED: " + r.error.splitlines()[0][:80]] + [""] * 9) + " |")
            continue
        lines.append("| " + " | ".join(head + [
            str(r.regs), f"{r.spill_st}/{r.spill_ld}", str(max(r.smem, r.triton_shared)), str(r.stack),
            _fmt_counts(r.ptx_kernel["ld"]), _fmt_counts(r.ptx_kernel["st"]),
            _fmt_counts(Counter(r.ptx["ld"]) - Counter(r.ptx_kernel["ld"])), _fmt_counts(r.sass["ld"]),
            _fmt_counts(r.sass["st"]),
            _vector_verdict(r)]) + " |")
    return "\n".join(lines)


def summary(results: list[Result]) -> str:
    """Ranges per (arch, kernel, state dtype) over the variants: a compact version of the full table."""
    groups: dict[tuple, list[Result]] = {}
    for r in results:
        if r.ok and r.variant.numel == NUMEL:
            groups.setdefault((r.arch, r.variant.kernel, r.variant.state), []).append(r)
    cols = ["sm", "kernel", "x", "variants", "regs", "spills", "smem B", "128-bit ld / st per thread (PTX)",
            "non-128-bit tensor ld/st"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]

    def rng(vals):
        lo, hi = min(vals), max(vals)
        return str(lo) if lo == hi else f"{lo}-{hi}"

    for (arch, kernel, state), rs in sorted(groups.items()):
        acc = [r.tensor_accesses() for r in rs]
        narrow = sum(n for a in acc for op in ("ld", "st") for bits, n in a[op].items() if bits != 128)
        lines.append("| " + " | ".join([
            f"sm_{arch}", kernel, state, str(len(rs)), rng([r.regs for r in rs]),
            rng([r.spill_st + r.spill_ld for r in rs]), rng([max(r.smem, r.triton_shared) for r in rs]),
            f"{rng([a['ld'][128] for a in acc])} / {rng([a['st'][128] for a in acc])}", str(narrow)]) + " |")
    return "\n".join(lines)


def _tensor_counts(d: dict) -> dict[str, Counter]:
    """Tensor-data accesses of a JSON result (see Result.tensor_accesses): {"ld": Counter(bits), "st": ...}."""
    acc = {op: Counter({int(bits): n for bits, n in c.items()}) for op, c in d["ptx_kernel"].items()}
    if d["variant"]["noise"] == "rng" and acc["ld"][64] > 0:
        acc["ld"][64] -= 1
        acc["ld"] += Counter()
    return acc


def combined_markdown(by_arch: dict[int, list[dict]]) -> str:
    """The tables for benchmarks/RESULTS.md from the JSON results of several archs: ranges per kernel and state dtype,
    and the representative variants (network and noise in the state dtype; plus fp32 state with a bf16 network)."""
    archs = sorted(by_arch)
    index = {(a, d["variant"]["label"]): d for a in archs for d in by_arch[a] if d["ok"]}
    first = by_arch[archs[0]]

    def counts(d, op):
        c = _tensor_counts(d)[op]
        return " ".join(f"{n}x{bits}b" for bits, n in sorted(c.items(), reverse=True)) or "-"

    def rng(vals):
        lo, hi = min(vals), max(vals)
        return str(lo) if lo == hi else f"{lo}-{hi}"

    regs_cols = [f"regs sm_{a}" for a in archs]
    out = ["| kernel | x | variants | " + " | ".join(regs_cols) + " | spills | smem B | 128-bit ld / st per thread | "
           "narrower tensor ld/st |", "|" + "---|" * (7 + len(archs))]
    groups: dict[tuple, list[str]] = {}
    for d in first:
        v = d["variant"]
        if v["numel"] == NUMEL:
            groups.setdefault((v["kernel"], v["state"]), []).append(v["label"])
    for (kernel, state), labels in groups.items():
        ds = [index[(a, lab)] for a in archs for lab in labels if (a, lab) in index]
        acc = [_tensor_counts(d) for d in ds]
        narrow = sum(n for c in acc for op in ("ld", "st") for bits, n in c[op].items() if bits != 128)
        regs = [rng([index[(a, lab)]["regs"] for lab in labels if (a, lab) in index]) for a in archs]
        out.append(f"| {kernel} | {state} | {len(labels)} | " + " | ".join(regs) + " | "
                   f"{rng([d['spill_st'] + d['spill_ld'] for d in ds])} | "
                   f"{rng([max(d['smem'], d['triton_shared']) for d in ds])} | "
                   f"{rng([c['ld'][128] for c in acc])} / {rng([c['st'][128] for c in acc])} | {narrow} |")
    reps = []
    for kernel, clip in (("consistency_step", True), ("ctm_gamma_step", False)):
        for state in DTYPES:
            for noise in ("none", state, "rng"):
                reps.append(Variant(kernel, state, state, noise, clip))
        reps.append(Variant(kernel, "fp32", "bf16", "fp32", clip))
    reps += [Variant("scale_input", state, net) for state in DTYPES for net in DTYPES]
    reps += [v for v in edge_variants() if v.numel % 16]
    out += ["", "| kernel | x | F / out | noise | clip | n | " + " | ".join(regs_cols) + " | spills | smem B | "
            "PTX ld.global (tensor) | PTX st.global | SASS LDG.128 / STG.128 |", "|" + "---|" * (11 + len(archs))]
    for v in reps:
        ds = [index.get((a, v.label())) for a in archs]
        if any(d is None for d in ds):
            continue
        d = ds[-1]
        sass = {op: Counter({int(b): n for b, n in c.items()}) for op, c in d["sass"].items()}
        out.append(f"| {v.kernel} | {v.state} | {v.net} | {v.noise} | {'-' if v.clip is None else int(v.clip)} | "
                   f"{v.n_tag} | " + " | ".join(str(x["regs"]) for x in ds) + " | "
                   f"{d['spill_st'] + d['spill_ld']} | {max(d['smem'], d['triton_shared'])} | {counts(d, 'ld')} | "
                   f"{counts(d, 'st')} | {sass['ld'][128]} / {sass['st'][128]} |")
    keys = ("ptx_kernel", "sass", "smem", "triton_shared", "spill_st", "spill_ld", "stack")
    same = all(index.get((a, lab)) is None or index[(a, lab)][k] == index[(archs[-1], lab)][k]
               for a in archs for (_, lab) in index for k in keys if (archs[-1], lab) in index)
    out += ["", f"Spills, shared memory and the PTX/SASS access counts (shown for sm_{archs[-1]}) are "
            + ("the same on " if same else "NOT the same on ") + ", ".join(f"sm_{a}" for a in archs)
            + "; only the register counts differ."]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------------------------
# roofline: bytes per step, fused vs the unfused PyTorch sequence, and predicted times
# ---------------------------------------------------------------------------------------------------------------------
GPUS = {"A100 80GB SXM": 2.0e12, "H100 SXM": 3.35e12, "H200": 4.8e12}  # peak HBM bandwidth, B/s
# Instruction issue ceiling, thread-instructions/s: SMs x 4 schedulers x 32 lanes x boost clock (an upper bound:
# integer multiplies, which Philox is made of, issue at half that rate on these parts).
ISSUE = {"A100 80GB SXM": 108 * 128 * 1.41e9, "H100 SXM": 132 * 128 * 1.98e9, "H200": 132 * 128 * 1.98e9}
LAUNCH_S = 4e-6  # per kernel launch (eager PyTorch op or Triton launch from Python); 3-5 us is the usual range
# SASS instructions per element on the hot path (sm_90 cubin of the fp32 variants, 8 elements per thread; the
# never-taken Payne-Hanek branch of cosf left out): 17 with a noise tensor, 137 with in-kernel Philox + Box-Muller
# (libdevice logf/cosf in software, only the sqrt on the MUFU unit). Only the latter can be compute-bound.
INSTR_PER_ELEM = {"fused cm_step, in-kernel RNG": 137}
SHAPES = {"3x64x64": 3 * 64 * 64, "4x64x64": 4 * 64 * 64}
BATCHES = (1, 16, 256)
ROOF_KERNELS = ("cm_step", "cm_step_last", "cm_step_rng", "ctm_step", "scale_input")
STEP_TOTALS = ("sampling_step", "sampling_step_rng")


def kernel_ops(kernel: str, e: int, e_f: int, fused: bool, cast: bool | None = None) -> list[tuple[str, int, int]]:
    """The GPU kernels of one call and the bytes each moves per element: [(op, read bytes, written bytes)].

    Unfused = what the PyTorch reference (gensample/kernels/reference.py, i.e. core.sampling.consistency_step and the
    schedulers) launches: every elementwise op reads its tensor inputs and writes its output (the scalar coefficients
    are 0-dim CPU tensors, passed as kernel arguments). ``e``: state bytes, ``e_f``: network-dtype bytes.

    kernel: ``cm_step`` (noise tensor, clip: the CM default), ``cm_step_last`` (no noise, clip),
    ``cm_step_rng`` (the noise is drawn: torch.randn vs in-kernel Philox), ``ctm_step`` (noise tensor, no clip: the
    CTM default), ``scale_input`` (c_in x cast to the network dtype); and the non-network part of one whole sampling
    step: ``sampling_step`` (torch.randn noise + scale_input + cm_step) and ``sampling_step_rng`` (scale_input +
    cm_step with in-kernel noise; unfused, torch.randn). ``cast``: the network dtype differs from the state dtype
    (default: ``e_f != e``), so the unfused path launches casts.
    """
    cast = e_f != e if cast is None else cast
    if kernel == "sampling_step":
        return [("randn", 0, e)] + kernel_ops("scale_input", e, e_f, fused, cast) + \
            kernel_ops("cm_step", e, e_f, fused, cast)
    if kernel == "sampling_step_rng":
        return kernel_ops("scale_input", e, e_f, fused, cast) + kernel_ops("cm_step_rng", e, e_f, fused, cast)
    cast_f = [("F.to(state)", e_f, e)] if cast else []
    if kernel == "scale_input":
        if fused:
            return [("fused scale_input", e, e_f)]
        return [("c_in*x", e, e)] + ([("to(net dtype)", e, e_f)] if cast else [])
    if kernel.startswith("cm_step"):
        noisy, rng = kernel != "cm_step_last", kernel == "cm_step_rng"
        if fused:
            return [("fused cm_step" + (", in-kernel RNG" if rng else ""), e + e_f + (e if noisy and not rng else 0),
                     2 * e if noisy else e)]
        ops = cast_f + [("c_skip*x", e, e), ("c_out*F", e, e), ("add", 2 * e, e), ("clamp", e, e)]
        if noisy:
            ops = ([("randn", 0, e)] if rng else []) + ops + [("std*z", e, e), ("add", 2 * e, e)]
        return ops
    if kernel == "ctm_step":
        if fused:
            return [("fused ctm_step", 2 * e + e_f, 2 * e)]
        return cast_f + [("c_skip*x", e, e), ("c_out*F", e, e), ("add", 2 * e, e), ("(s/t)*x", e, e),
                         ("(1-s/t)*g", e, e), ("add", 2 * e, e), ("std*z", e, e), ("add", 2 * e, e)]
    raise ValueError(kernel)


def bytes_per_elem(kernel: str, e: int, e_f: int, fused: bool, cast: bool | None = None) -> tuple[int, int]:
    """(bytes moved per element, kernel launches) of one call."""
    ops = kernel_ops(kernel, e, e_f, fused, cast)
    return sum(r + w for _, r, w in ops), len(ops)


def predicted_seconds(kernel: str, numel: int, e: int, e_f: int, fused: bool, bw: float,
                      launch_s: float = LAUNCH_S, cast: bool | None = None, issue: float | None = None) -> float:
    """launches x launch overhead + per kernel max(bytes / bandwidth, instructions / issue rate): HBM at 100% of
    peak, no overlap of launches with work; the compute term only for the kernels in INSTR_PER_ELEM."""
    t = 0.0
    for op, r, w in kernel_ops(kernel, e, e_f, fused, cast):
        compute = numel * INSTR_PER_ELEM[op] / issue if issue and op in INSTR_PER_ELEM else 0.0
        t += launch_s + max((r + w) * numel / bw, compute)
    return t


def _cell(kernel: str, n: int, e: int, gpu: str, launch_s: float) -> str:
    bw, issue = GPUS[gpu], ISSUE[gpu]
    tf = predicted_seconds(kernel, n, e, e, True, bw, launch_s, issue=issue)
    tu = predicted_seconds(kernel, n, e, e, False, bw, launch_s, issue=issue)
    return f"{tf * 1e6:.1f} / {tu * 1e6:.1f} ({tu / tf:.1f}x)"


def roofline_markdown(launch_s: float = LAUNCH_S) -> str:
    out = [("Bytes per element and kernel launches per call (e = state bytes; the network output F in the state "
            "dtype unless stated):"), "",
           ("| kernel | fused B/elem fp32 | unfused B/elem fp32 | fused B/elem bf16 | unfused B/elem bf16 | "
            "fp32 state + bf16 F: fused / unfused | launches fused / unfused | unfused ops (fp32 state, bf16 F) |"),
           "|---|---|---|---|---|---|---|---|"]
    for k in ROOF_KERNELS + STEP_TOTALS:
        f32, u32 = bytes_per_elem(k, 4, 4, True), bytes_per_elem(k, 4, 4, False)
        f16, u16 = bytes_per_elem(k, 2, 2, True), bytes_per_elem(k, 2, 2, False)
        fm, um = bytes_per_elem(k, 4, 2, True), bytes_per_elem(k, 4, 2, False)
        ops = ", ".join(op for op, _, _ in kernel_ops(k, 4, 2, False))
        out.append(f"| {k} | {f32[0]} | {u32[0]} | {f16[0]} | {u16[0]} | {fm[0]} / {um[0]} | "
                   f"{f32[1]} / {u32[1]} ({fm[1]} / {um[1]} with bf16 F) | {ops} |")
    head = ["dtype", "latent", "batch"]
    out += ["", (f"Predicted time of the non-network part of one sampling step, us, fused / unfused PyTorch "
                 f"(speed-up): launches x {launch_s * 1e6:.0f} us + bytes at 100% of peak HBM bandwidth "
                 f"({', '.join(f'{g} {bw / 1e12:.2f} TB/s' for g, bw in GPUS.items())}), or for the in-kernel RNG "
                 f"the instruction-issue time if longer:"), ""]
    cols = head + ["MB fused / unfused"] + [f"{g}: {k}" for k in STEP_TOTALS for g in GPUS]
    out += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    rows = [(d, e, sname, per, b) for d, e in (("fp32", 4), ("bf16", 2)) for sname, per in SHAPES.items()
            for b in BATCHES]
    for d, e, sname, per, b in rows:
        n = b * per
        mb = f"{bytes_per_elem('sampling_step', e, e, True)[0] * n / 1e6:.2f} / " \
             f"{bytes_per_elem('sampling_step', e, e, False)[0] * n / 1e6:.2f}"
        out.append(f"| {d} | {sname} | {b} | {mb} | "
                   + " | ".join(_cell(k, n, e, g, launch_s) for k in STEP_TOTALS for g in GPUS) + " |")
    for g, bw in GPUS.items():
        out += ["", f"Per kernel on {g} ({bw / 1e12:.2f} TB/s), us, fused / unfused (speed-up):", ""]
        cols = head + list(ROOF_KERNELS)
        out += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for d, e, sname, per, b in rows:
            out.append(f"| {d} | {sname} | {b} | "
                       + " | ".join(_cell(k, b * per, e, g, launch_s) for k in ROOF_KERNELS) + " |")
    return "\n".join(out)


def compare_markdown(path: str, peak_bw: float | None, launch_s: float = LAUNCH_S) -> str:
    """Measured (bench_kernels.py --json) vs predicted per kernel and size, for the Triton kernel and the reference."""
    data = json.loads(Path(path).read_text())
    bw = peak_bw or float(data["peak_bw"])
    gpu = next((g for g in GPUS if g.split()[0] in str(data["device"])), "H200")
    issue = ISSUE[gpu]
    esize = {"torch.float32": 4, "torch.float16": 2, "torch.bfloat16": 2}
    e, e_f, cast = esize[data["state"]], esize[data["net"]], data["state"] != data["net"]
    cols = ["kernel", "numel", "triton us (measured / predicted)", "ratio", "torch us (measured / predicted)", "ratio"]
    out = [(f"Measured on {data['device']} vs predicted at {bw / 1e12:.2f} TB/s + {launch_s * 1e6:.0f} us/launch, "
            f"{gpu}'s issue rate for the in-kernel RNG (state {data['state']}, network {data['net']}). "
            "ratio = measured / predicted:"), "",
           "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in data["rows"]:
        k, n = row["kernel"], int(row["numel"])
        if k not in ROOF_KERNELS:
            out.append(f"| {k} | {n} | no prediction | | | |")
            continue
        # bench_kernels' scale_input casts to the network dtype; the step kernels read F in the network dtype.
        pt = predicted_seconds(k, n, e, e_f, True, bw, launch_s, cast, issue)
        pr = predicted_seconds(k, n, e, e_f, False, bw, launch_s, cast, issue)
        mt, mr = row.get("triton_s"), row["torch_s"]
        tri = (("n/a", "n/a") if mt is None or math.isnan(mt)
               else (f"{mt * 1e6:.1f} / {pt * 1e6:.1f}", f"{mt / pt:.2f}"))
        out.append(f"| {k} | {n} | {tri[0]} | {tri[1]} | {mr * 1e6:.1f} / {pr * 1e6:.1f} | {mr / pr:.2f} |")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), help="compute capabilities (80 90)")
    parser.add_argument("--quick", action="store_true", help="one variant per kernel only")
    parser.add_argument("--no-edge", action="store_true", help="skip the n%%16!=0 and n>=2^31 variants")
    parser.add_argument("--kernel", choices=KERNELS, nargs="+", default=None, help="only these kernels")
    parser.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1),
                        help="compile in this many processes (default: the CPU count, at most 8)")
    parser.add_argument("--check", action="store_true",
                        help="also exit 1 if a variant spills, or one at n%%16==0 has a tensor access narrower "
                             "than 128 bit")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "out"), help="where to write kernels_sm*.md/json")
    parser.add_argument("--dump-ptx", default=None, help="write each variant's PTX into this folder")
    parser.add_argument("--summarize", action="store_true",
                        help="only rebuild kernels_summary.md from the kernels_sm*.json already in --out (no triton)")
    parser.add_argument("--roofline", action="store_true", help="print the roofline prediction only (no triton)")
    parser.add_argument("--launch-us", type=float, default=LAUNCH_S * 1e6, help="launch overhead per kernel (us)")
    parser.add_argument("--compare", default=None, help="bench_kernels.py --json file: measured vs predicted")
    parser.add_argument("--peak-bw", type=float, default=None, help="bandwidth for --compare (default: the JSON's)")
    args = parser.parse_args(argv)
    launch_s = args.launch_us * 1e-6

    if args.roofline or args.compare:
        text = compare_markdown(args.compare, args.peak_bw, launch_s) if args.compare else roofline_markdown(launch_s)
        print(text)
        if args.roofline:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            Path(args.out, "roofline.md").write_text(text + "\n")
        return 0

    if args.summarize:
        by_arch = {a: json.loads(Path(args.out, f"kernels_sm{a}.json").read_text()) for a in args.arch}
        text = combined_markdown(by_arch)
        Path(args.out, "kernels_summary.md").write_text(text + "\n")
        print(text)
        return 0

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("unset TRITON_INTERPRET: the interpreter replaces triton.jit, so nothing can be compiled")
    try:
        import triton
    except Exception as exc:
        print(f"triton is not importable ({exc}); install it with "
              "`python -m pip install --target /tmp/gensample-triton triton` and set PYTHONPATH", file=sys.stderr)
        return 1

    variants = quick_variants() if args.quick else all_variants() + ([] if args.no_edge else edge_variants())
    if args.kernel:
        variants = [v for v in variants if v.kernel in args.kernel]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"# triton {triton.__version__}: {len(variants)} variants x sm_{'/sm_'.join(map(str, args.arch))}",
          flush=True)
    failed, unvectorised, spilled = [], [], []
    by_arch: dict[int, list[dict]] = {}
    for arch in args.arch:
        t0 = time.perf_counter()
        results = []
        for i, r in enumerate(compile_many(variants, arch, args.jobs, keep_ptx=bool(args.dump_ptx))):
            v = r.variant
            results.append(r)
            if args.dump_ptx and r.ok:
                Path(args.dump_ptx).mkdir(parents=True, exist_ok=True)
                name = re.sub(r"[^A-Za-z0-9_=.-]+", "_", v.label())
                Path(args.dump_ptx, f"sm{arch}_{name}.ptx").write_text(r.ptx_text)
            if not r.ok:
                failed.append(r)
                print(f"FAILED sm_{arch} {v.label()}: {r.error}", file=sys.stderr, flush=True)
            elif v.numel == NUMEL and not r.vectorised():
                unvectorised.append(r)
            if r.ok and r.spill_st + r.spill_ld:
                spilled.append(r)
            if (i + 1) % 25 == 0:
                print(f"  sm_{arch}: {i + 1}/{len(variants)} compiled ({time.perf_counter() - t0:.0f} s)", flush=True)
        full, short = table(results), summary(results)
        first: dict[tuple, str] = {}
        for r in results:
            if r.ok:
                first.setdefault((r.variant.kernel, r.variant.n_tag), r.label_sig())
        sigs = "\n".join(f"- {k} ({n}), e.g. {s}" for (k, n), s in first.items())
        aligned = all(p.endswith("/D") for r in results if r.ok for p in r.signature.split(", ") if ":*" in p)
        sigs += f"\n\nEvery pointer argument of every variant is specialised as 16-byte aligned: {aligned}."
        md = (f"## Triton {triton.__version__} kernels compiled for sm_{arch} (no GPU)\n\n"
              f"{len(results)} variants, {sum(r.ok for r in results)} compiled, "
              f"{time.perf_counter() - t0:.0f} s. Signatures as specialised for the launch "
              f"(D = tt.divisibility 16):\n\n"
              f"{sigs}\n\n### Summary\n\n{short}\n\n### All variants\n\n{full}\n")
        (out_dir / f"kernels_sm{arch}.md").write_text(md)
        by_arch[arch] = [r.as_json() for r in results]
        (out_dir / f"kernels_sm{arch}.json").write_text(json.dumps(by_arch[arch], indent=1))
        print(f"\n## sm_{arch}\n\n{short}\n\n{full}\n", flush=True)
        print(f"wrote {out_dir / f'kernels_sm{arch}.md'}", flush=True)

    if len(by_arch) > 1:
        text = combined_markdown(by_arch)
        (out_dir / "kernels_summary.md").write_text(text + "\n")
        print(f"wrote {out_dir / 'kernels_summary.md'}")
    for r in unvectorised:
        print(f"not 128-bit: sm_{r.arch} {r.variant.label()}: ld {_fmt_counts(r.ptx_kernel['ld'])}, "
              f"st {_fmt_counts(r.ptx_kernel['st'])}", file=sys.stderr)
    for r in spilled:
        print(f"spills: sm_{r.arch} {r.variant.label()}: {r.spill_st}/{r.spill_ld} B", file=sys.stderr)
    if failed:
        print(f"{len(failed)} variant(s) failed to compile", file=sys.stderr)
        return 1
    if args.check and (unvectorised or spilled):
        return 1
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
