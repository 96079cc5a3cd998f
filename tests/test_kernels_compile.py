"""The fused Triton kernels compiled for a real GPU target (sm_90) on a machine without a GPU.

Triton compiles ahead of time without a device, so these tests catch code-generation regressions that the CPU
interpreter (tests/test_kernels.py) cannot see: each kernel's global loads and stores must be 128-bit vectorised
(``ld.global.v4`` / ``st.global.v4`` in the PTX) and ptxas must report no register spills. The launch is captured from
the real launcher and specialised exactly as ``kernel[grid](...)`` would (benchmarks/compile_kernels.py).

Skipped without triton (optional, kept out of the main environment; CI installs it with
``pip install --target /tmp/gensample-triton triton`` and runs this file with that PYTHONPATH).
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _compile_kernels():
    path = ROOT / "benchmarks" / "compile_kernels.py"
    spec = importlib.util.spec_from_file_location("gensample_compile_kernels", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ck():
    pytest.importorskip("triton", reason="triton not installed (optional: pip install triton)")
    if _INTERPRETING:
        pytest.skip("TRITON_INTERPRET=1 replaces triton.jit, so nothing can be compiled in this process "
                    "(test_compile_tests_outside_the_interpreter runs these in a fresh process)")
    return _compile_kernels()


def _expected_128bit(ck, v) -> tuple[int, int]:
    """128-bit loads and stores per thread for variant ``v``: BLOCK / (32 num_warps) elements per thread and tensor."""
    from gensample.kernels import triton_kernels as tk

    per_thread = tk.BLOCK // (32 * tk.NUM_WARPS)
    size = {name: torch.empty((), dtype=dt).element_size() for name, dt in ck.DTYPES.items()}

    def chunks(dtype: str) -> int:
        return per_thread * size[dtype] // 16

    if v.kernel == "scale_input":
        return chunks(v.state), chunks(v.net)
    loads = chunks(v.state) + chunks(v.net) + (chunks(v.noise) if v.noise in ck.DTYPES else 0)
    stores = chunks(v.state) * (1 if v.noise == "none" else 2)
    return loads, stores


@pytest.mark.parametrize("kernel", ["consistency_step", "ctm_gamma_step", "scale_input"])
def test_sm90_vectorised_and_no_spills(ck, kernel):
    (v,) = [v for v in ck.quick_variants() if v.kernel == kernel]
    r = ck.compile_variant(v, 90)
    assert r.ok, r.error
    # The launch specialisation: 16-byte aligned pointers and n_elements divisible by 16 (tt.divisibility=16).
    assert r.signature.startswith("x_ptr:*") and r.signature.split(",")[0].endswith("/D"), r.signature
    assert "n_elements:i32/D" in r.signature, r.signature
    assert r.spill_st == 0 and r.spill_ld == 0, f"{v.label()}: {r.spill_st}/{r.spill_ld} bytes spilled"
    acc = r.tensor_accesses()
    assert set(acc["ld"]) == {128} and set(acc["st"]) == {128}, f"{v.label()}: not all 128-bit: {acc}"
    assert (acc["ld"][128], acc["st"][128]) == _expected_128bit(ck, v), f"{v.label()}: {acc}"
    # The SASS agrees: LDG.E.128 / STG.E.128 for every tensor access.
    assert r.sass["ld"][128] == acc["ld"][128] and r.sass["st"][128] == acc["st"][128], r.sass


def test_sm90_odd_size_vectorises_full_blocks(ck):
    """n not a multiple of 16: the full blocks still use 128-bit accesses (TAIL_SPLIT), only the last one is masked."""
    v = ck.Variant("consistency_step", "fp32", "fp32", "fp32", True, numel=3 * 1024 + 5)
    r = ck.compile_variant(v, 90)
    assert r.ok, r.error
    assert "n_elements:i32," in r.signature + ","  # not specialised on divisibility
    assert r.spill_st == 0 and r.spill_ld == 0
    loads, stores = _expected_128bit(ck, v)
    acc = r.tensor_accesses()
    assert acc["ld"][128] == loads and acc["st"][128] == stores, acc


def test_compile_tests_outside_the_interpreter():
    """Under TRITON_INTERPRET=1 the compile tests above skip; this runs them in a fresh process without it."""
    pytest.importorskip("triton", reason="triton not installed (optional: pip install triton)")
    if not _INTERPRETING:
        pytest.skip("not interpreting: the compile tests run in this process")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__)),
                           "-k", "sm90"], check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


_INTERPRETER_CHECK = r"""
import torch
from gensample.kernels import triton_kernels as tk
from gensample.kernels.reference import (ConsistencyStepCoefficients, CTMStepCoefficients, consistency_step_reference,
                                         ctm_gamma_step_reference, scale_input_reference)

def bits(t):
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)

g = torch.Generator().manual_seed(0)
n, full = 2 * tk.BLOCK + 5, 2 * tk.BLOCK
assert tk._tail_split(n) and not tk._tail_split(full)
cm, ctm = ConsistencyStepCoefficients.from_sigmas(2.0, 0.5), CTMStepCoefficients.from_sigmas(2.0, 0.5, 0.5)
for dtype in (torch.float32, torch.float16):  # bit-exact in the interpreter (its float32->bfloat16 cast truncates)
    x, f, z = (torch.randn(n, generator=g) * 2).to(dtype), torch.randn(n, generator=g).to(dtype), \
        torch.randn(n, generator=g).to(dtype)
    pairs = ((tk.consistency_step_triton(f, x, cm, z), consistency_step_reference(f, x, cm, z)),
             (tk.ctm_gamma_step_triton(f, x, ctm, z, True), ctm_gamma_step_reference(f, x, ctm, z, True)),
             ((tk.scale_input_triton(x, 0.3, torch.float16),), (scale_input_reference(x, 0.3, torch.float16),)))
    for got, want in pairs:
        for a, b in zip(got, want):
            assert torch.equal(bits(a), bits(b)), dtype
    # In-kernel RNG: the split launch (unmasked full blocks + masked tail) draws what the masked-only launch draws.
    for step, c in ((tk.consistency_step_triton, cm), (tk.ctm_gamma_step_triton, ctm)):
        split = step(f, x, c, rng_seed=3, rng_offset=16)
        masked = step(f[:full], x[:full], c, rng_seed=3, rng_offset=16)
        for a, b in zip(split, masked):
            assert torch.equal(bits(a[:full]), bits(b)), step.__name__
print("ok")
"""


def test_tail_split_bit_exact_under_interpreter():
    """The unmasked full-block path gives the same bits as the reference and as the masked path (CPU interpreter)."""
    pytest.importorskip("triton", reason="triton not installed (optional: pip install triton)")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _INTERPRETER_CHECK], check=False, cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-2000:] + proc.stderr[-4000:]
