"""Triton kernels that fuse each sampler step into one pass over memory.

Every kernel mirrors a function of :mod:`gensample.kernels.reference`: same operation order, and a rounding to the
state dtype after each operation, as PyTorch eager does. Launches pass ``enable_fp_fusion=False``, so the GPU
compiler contracts no multiply-add into an FMA. With noise passed in as a tensor, the kernels therefore reproduce the
reference bit for bit (float32 and float16 states; bfloat16 too on GPU). Under ``TRITON_INTERPRET=1`` (the CPU
interpreter the tests use), float32 -> bfloat16 casts truncate instead of rounding to nearest even. That is an
interpreter limitation: a bfloat16 state can differ there by one bfloat16 ulp.

Memory traffic per element (e = bytes per element, e_F = bytes per network-output element):

* consistency / CTM step with noise tensor: read x, F, z; write next, denoised: ``4e + e_F``
* with in-kernel noise (``rng_seed``): ``3e + e_F``. No noise (last step): ``2e + e_F``
* input scaling: read x; write c_in x in the network dtype.

The in-kernel RNG is Triton's counter-based Philox (``tl.randn(seed, offset)``). It is fast and reproducible for a
given (seed, offset), but it is **not** bit-compatible with ``torch.randn(generator=...)``: samples differ from the
PyTorch path (while having the same distribution). The seed is read from a 1-element int64 device tensor, so a
captured CUDA graph can draw new noise on every replay.

This module imports triton at import time. Go through :mod:`gensample.kernels.dispatch`, which imports it only when
it is available.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import ConsistencyStepCoefficients, CTMStepCoefficients, _cast, check_step_inputs

__all__ = ["consistency_step_triton", "ctm_gamma_step_triton", "scale_input_triton", "SUPPORTED_DTYPES"]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BLOCK = 1024
NUM_WARPS = 4

# NOISE modes (constexpr): no noise, noise read from a tensor, noise drawn in-kernel.
_NO_NOISE, _TENSOR_NOISE, _KERNEL_NOISE = 0, 1, 2


@triton.jit
def _rnd(v, like):
    """Round a float32 value to the dtype of ``like`` and back (a no-op for float32 states)."""
    return v.to(like.dtype).to(tl.float32)


@triton.jit
def _clamp_unit(v):
    """clamp(v, -1, 1) that keeps NaN, like torch.clamp."""
    return tl.where(v < -1.0, -1.0, tl.where(v > 1.0, 1.0, v))


@triton.jit
def _load(ptr, offs, n_elements, MASKED: tl.constexpr):
    """``ptr[offs]``, masked to ``offs < n_elements`` only where a block may run past the end."""
    if MASKED:
        return tl.load(ptr + offs, mask=offs < n_elements, other=0.0)
    else:
        return tl.load(ptr + offs)


@triton.jit
def _store(ptr, offs, value, n_elements, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptr + offs, value, mask=offs < n_elements)
    else:
        tl.store(ptr + offs, value)


@triton.jit
def _renoise(d, x, z_ptr, seed_ptr, offs, n_elements, rng_offset, std, NOISE: tl.constexpr, MASKED: tl.constexpr):
    """d + std z, with z read from ``z_ptr`` or drawn by Philox at counter ``offs + rng_offset``."""
    if NOISE == 1:
        z = _load(z_ptr, offs, n_elements, MASKED).to(x.dtype).to(tl.float32)
    else:
        seed = tl.load(seed_ptr)
        z = tl.randn(seed, offs + rng_offset).to(x.dtype).to(tl.float32)
    return _rnd(d + _rnd(std * z, x), x)


# Vectorised (128-bit) loads and stores need a mask that is constant over each thread's 16-byte chunk. Triton proves
# that from ``n_elements`` being a multiple of 16 (a launch specialises integer arguments on that), so for every such
# size the masked body compiles to ld/st.global.v4. For other sizes (TAIL_SPLIT, decided by the launcher), the masked
# body would load scalars, so the full blocks run an unmasked copy of the body and only the last block the masked
# one. Both bodies do the same arithmetic on the same elements: the results are the same bits.
@triton.jit
def _consistency_body(x_ptr, f_ptr, z_ptr, seed_ptr, next_ptr, den_ptr, offs, n_elements, rng_offset,
                      c_skip, c_out, std, CLIP: tl.constexpr, NOISE: tl.constexpr, MASKED: tl.constexpr):
    x = _load(x_ptr, offs, n_elements, MASKED)
    f = _load(f_ptr, offs, n_elements, MASKED).to(x.dtype).to(tl.float32)
    xf = x.to(tl.float32)
    d = _rnd(_rnd(c_skip * xf, x) + _rnd(c_out * f, x), x)
    if CLIP:
        d = _clamp_unit(d)
    _store(den_ptr, offs, d.to(x.dtype), n_elements, MASKED)
    if NOISE != 0:
        nxt = _renoise(d, x, z_ptr, seed_ptr, offs, n_elements, rng_offset, std, NOISE, MASKED)
        _store(next_ptr, offs, nxt.to(x.dtype), n_elements, MASKED)


@triton.jit
def _consistency_step_kernel(x_ptr, f_ptr, z_ptr, seed_ptr, next_ptr, den_ptr, n_elements, rng_offset,
                             c_skip, c_out, std,
                             CLIP: tl.constexpr, NOISE: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                             TAIL_SPLIT: tl.constexpr = False):
    """CM Algorithm 1 step: den = clamp(c_skip x + c_out F); next = den + std z."""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    if TAIL_SPLIT:
        if (pid + 1) * BLOCK_SIZE <= n_elements:
            _consistency_body(x_ptr, f_ptr, z_ptr, seed_ptr, next_ptr, den_ptr, offs, n_elements, rng_offset,
                              c_skip, c_out, std, CLIP, NOISE, False)
        else:
            _consistency_body(x_ptr, f_ptr, z_ptr, seed_ptr, next_ptr, den_ptr, offs, n_elements, rng_offset,
                              c_skip, c_out, std, CLIP, NOISE, True)
    else:
        _consistency_body(x_ptr, f_ptr, z_ptr, seed_ptr, next_ptr, den_ptr, offs, n_elements, rng_offset,
                          c_skip, c_out, std, CLIP, NOISE, True)


@triton.jit
def _ctm_gamma_body(x_ptr, f_ptr, z_ptr, seed_ptr, next_ptr, jump_ptr, offs, n_elements, rng_offset,
                    c_skip, c_out, jump_ratio, jump_complement, std,
                    CLIP: tl.constexpr, NOISE: tl.constexpr, MASKED: tl.constexpr):
    x = _load(x_ptr, offs, n_elements, MASKED)
    f = _load(f_ptr, offs, n_elements, MASKED).to(x.dtype).to(tl.float32)
    xf = x.to(tl.float32)
    g = _rnd(_rnd(c_skip * xf, x) + _rnd(c_out * f, x), x)
    if CLIP:
        g = _clamp_unit(g)
    jumped = _rnd(_rnd(jump_ratio * xf, x) + _rnd(jump_complement * g, x), x)
    _store(jump_ptr, offs, jumped.to(x.dtype), n_elements, MASKED)
    if NOISE != 0:
        nxt = _renoise(jumped, x, z_ptr, seed_ptr, offs, n_elements, rng_offset, std, NOISE, MASKED)
        _store(next_ptr, offs, nxt.to(x.dtype), n_elements, MASKED)


@triton.jit
def _ctm_gamma_step_kernel(x_ptr, f_ptr, z_ptr, seed_ptr, next_ptr, jump_ptr, n_elements, rng_offset,
                           c_skip, c_out, jump_ratio, jump_complement, std,
                           CLIP: tl.constexpr, NOISE: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                           TAIL_SPLIT: tl.constexpr = False):
    """CTM gamma step: g = c_skip x + c_out F; G = (s/t) x + (1 - s/t) g; next = G + std z."""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    if TAIL_SPLIT:
        if (pid + 1) * BLOCK_SIZE <= n_elements:
            _ctm_gamma_body(x_ptr, f_ptr, z_ptr, seed_ptr, next_ptr, jump_ptr, offs, n_elements, rng_offset,
                            c_skip, c_out, jump_ratio, jump_complement, std, CLIP, NOISE, False)
        else:
            _ctm_gamma_body(x_ptr, f_ptr, z_ptr, seed_ptr, next_ptr, jump_ptr, offs, n_elements, rng_offset,
                            c_skip, c_out, jump_ratio, jump_complement, std, CLIP, NOISE, True)
    else:
        _ctm_gamma_body(x_ptr, f_ptr, z_ptr, seed_ptr, next_ptr, jump_ptr, offs, n_elements, rng_offset,
                        c_skip, c_out, jump_ratio, jump_complement, std, CLIP, NOISE, True)


@triton.jit
def _scale_input_body(x_ptr, out_ptr, offs, n_elements, c_in, MASKED: tl.constexpr):
    x = _load(x_ptr, offs, n_elements, MASKED)
    y = (c_in * x.to(tl.float32)).to(x.dtype)
    _store(out_ptr, offs, y.to(out_ptr.dtype.element_ty), n_elements, MASKED)


@triton.jit
def _scale_input_kernel(x_ptr, out_ptr, n_elements, c_in, BLOCK_SIZE: tl.constexpr,
                        TAIL_SPLIT: tl.constexpr = False):
    """out = (c_in x) rounded to the state dtype, then cast to the network dtype of ``out_ptr``."""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    if TAIL_SPLIT:
        if (pid + 1) * BLOCK_SIZE <= n_elements:
            _scale_input_body(x_ptr, out_ptr, offs, n_elements, c_in, False)
        else:
            _scale_input_body(x_ptr, out_ptr, offs, n_elements, c_in, True)
    else:
        _scale_input_body(x_ptr, out_ptr, offs, n_elements, c_in, True)


# ---------------------------------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------------------------------
def _same_layout(ref: torch.Tensor, *others: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """Tensors that one flat index can walk together. ``ref`` (the sampler state) keeps its layout if it is dense
    (contiguous or channels_last), and the others are brought to that layout (a no-op when they already have it)."""
    if ref.is_contiguous():
        fmt = torch.contiguous_format
    elif ref.ndim == 4 and ref.is_contiguous(memory_format=torch.channels_last):
        fmt = torch.channels_last
    else:
        ref, fmt = ref.contiguous(), torch.contiguous_format
    return (ref, *(t if t is None or t.is_contiguous(memory_format=fmt) else t.contiguous(memory_format=fmt)
                   for t in others))


def _tail_split(n: int) -> bool:
    """True when ``n`` is not a multiple of 16 (so a masked block could not use 128-bit accesses) and spans more than
    one block: the kernels then mask only their last block (see the comment above ``_consistency_body``). Every other
    size compiles to the single masked body, as before."""
    return n % 16 != 0 and n > BLOCK


def _check_dtype(sample: torch.Tensor) -> None:
    if sample.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"the Triton kernels take float32/float16/bfloat16 states, got {sample.dtype}; "
                         "use backend='torch' for other dtypes.")


def _seed_tensor(rng_seed: int | torch.Tensor, device: torch.device) -> torch.Tensor:
    if torch.is_tensor(rng_seed):
        if rng_seed.numel() != 1 or rng_seed.dtype != torch.int64 or rng_seed.device != device:
            raise ValueError(f"`rng_seed` as a tensor must be one int64 element on {device}, got "
                             f"{rng_seed.dtype} shape {tuple(rng_seed.shape)} on {rng_seed.device}.")
        return rng_seed
    return torch.tensor([int(rng_seed)], dtype=torch.int64, device=device)


def _noise_mode(noise: torch.Tensor | None, rng_seed, std: float) -> int:
    if std == 0.0 or (noise is None and rng_seed is None):
        return _NO_NOISE
    if noise is not None and rng_seed is not None:
        raise ValueError("pass either `noise` (bit-compatible with PyTorch) or `rng_seed` (in-kernel RNG), not both.")
    return _TENSOR_NOISE if noise is not None else _KERNEL_NOISE


def consistency_step_triton(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    coefficients: ConsistencyStepCoefficients,
    noise: torch.Tensor | None = None,
    clip_denoised: bool = True,
    rng_seed: int | torch.Tensor | None = None,
    rng_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused CM Algorithm 1 step, the twin of :func:`~gensample.kernels.reference.consistency_step_reference`.
    Returns ``(next, denoised)`` (the same tensor twice when no noise is added)."""
    check_step_inputs(model_output, sample, noise)
    _check_dtype(sample)
    mode = _noise_mode(noise, rng_seed, coefficients.std)
    sample, model_output, noise = _same_layout(sample, model_output, noise if mode == _TENSOR_NOISE else None)
    denoised = torch.empty_like(sample)
    nxt = torch.empty_like(sample) if mode != _NO_NOISE else denoised
    seed = _seed_tensor(rng_seed, sample.device) if mode == _KERNEL_NOISE else sample
    n = sample.numel()
    dt = sample.dtype
    _consistency_step_kernel[(triton.cdiv(n, BLOCK),)](
        sample, model_output, noise if noise is not None else sample, seed, nxt, denoised, n, int(rng_offset),
        float(_cast(coefficients.c_skip, dt)), float(_cast(coefficients.c_out, dt)),
        float(_cast(coefficients.std, dt)),
        CLIP=bool(clip_denoised), NOISE=mode, BLOCK_SIZE=BLOCK, TAIL_SPLIT=_tail_split(n), num_warps=NUM_WARPS,
        enable_fp_fusion=False,
    )
    return nxt, denoised


def ctm_gamma_step_triton(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    coefficients: CTMStepCoefficients,
    noise: torch.Tensor | None = None,
    clip_denoised: bool = False,
    rng_seed: int | torch.Tensor | None = None,
    rng_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused CTM gamma-sampling step, the twin of :func:`~gensample.kernels.reference.ctm_gamma_step_reference`.
    Returns ``(x_next, G)``."""
    check_step_inputs(model_output, sample, noise)
    _check_dtype(sample)
    mode = _noise_mode(noise, rng_seed, coefficients.std)
    sample, model_output, noise = _same_layout(sample, model_output, noise if mode == _TENSOR_NOISE else None)
    jumped = torch.empty_like(sample)
    nxt = torch.empty_like(sample) if mode != _NO_NOISE else jumped
    seed = _seed_tensor(rng_seed, sample.device) if mode == _KERNEL_NOISE else sample
    n = sample.numel()
    dt = sample.dtype
    _ctm_gamma_step_kernel[(triton.cdiv(n, BLOCK),)](
        sample, model_output, noise if noise is not None else sample, seed, nxt, jumped, n, int(rng_offset),
        float(_cast(coefficients.c_skip, dt)), float(_cast(coefficients.c_out, dt)),
        float(_cast(coefficients.jump_ratio, dt)), float(_cast(coefficients.jump_complement, dt)),
        float(_cast(coefficients.std, dt)),
        CLIP=bool(clip_denoised), NOISE=mode, BLOCK_SIZE=BLOCK, TAIL_SPLIT=_tail_split(n), num_warps=NUM_WARPS,
        enable_fp_fusion=False,
    )
    return nxt, jumped


def scale_input_triton(sample: torch.Tensor, c_in: float, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Fused ``(c_in x).to(out_dtype)``, the twin of :func:`~gensample.kernels.reference.scale_input_reference`."""
    _check_dtype(sample)
    out_dtype = sample.dtype if out_dtype is None else out_dtype
    if out_dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"`out_dtype` must be float32/float16/bfloat16 for the Triton kernel, got {out_dtype}.")
    (sample,) = _same_layout(sample)
    out = torch.empty_like(sample, dtype=out_dtype)
    n = sample.numel()
    _scale_input_kernel[(triton.cdiv(n, BLOCK),)](
        sample, out, n, float(_cast(c_in, sample.dtype)), BLOCK_SIZE=BLOCK, TAIL_SPLIT=_tail_split(n),
        num_warps=NUM_WARPS, enable_fp_fusion=False,
    )
    return out
