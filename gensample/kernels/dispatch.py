"""Pick the fused Triton kernel or the PyTorch reference for each sampler step.

``backend="auto"`` (the default) uses Triton when it can be imported, the tensors are on CUDA and the state dtype is
float32/float16/bfloat16. Otherwise it uses the PyTorch reference. ``backend="torch"`` always uses the reference.
``backend="triton"`` insists on Triton and raises a ValueError if it cannot run. It also runs CPU tensors under the
Triton interpreter (``TRITON_INTERPRET=1``), which is how the tests check the kernels without a GPU.

The functions that take sigmas are what schedulers call. They compute the step scalars once on the host, in float64,
with :mod:`gensample.core.parametrization` / :mod:`gensample.core.sampling`. ``*_with_coefficients`` take precomputed
coefficients (see :mod:`gensample.kernels.reference`), which is what the fast sampling loop uses.

Noise. By default the caller passes ``noise`` drawn from its own ``torch.Generator``. Both backends then give the
same samples as :func:`gensample.core.sampling.consistency_step` (bit-identical on CPU). If you ask for the fastest path
with ``rng_seed=`` instead, the Triton kernel draws z in-kernel with a counter-based Philox RNG at counters
``rng_offset + i``. That path is **not** bit-compatible with ``torch.randn``: it gives other (equally distributed)
noise. The PyTorch fallback of ``rng_seed`` draws from ``torch.Generator(device).manual_seed(seed + rng_offset)``,
which is deterministic but is again another stream.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from typing import Literal

import torch

from ..core.sigmas import SIGMA_DATA, SIGMA_MIN
from .reference import (
    ConsistencyStepCoefficients,
    CTMStepCoefficients,
    consistency_step_reference,
    ctm_gamma_step_reference,
    input_coefficient,
    scale_input_reference,
)

Backend = Literal["auto", "triton", "torch"]
_BACKENDS = ("auto", "triton", "torch")
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

__all__ = [
    "Backend",
    "triton_available",
    "resolve_backend",
    "consistency_step",
    "consistency_step_with_coefficients",
    "ctm_gamma_step",
    "ctm_gamma_step_with_coefficients",
    "scale_model_input",
    "scale_input_with_coefficient",
]


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when ``import triton`` works (checked once)."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # a broken install (e.g. no matching driver) counts as absent
        return False
    return True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend: Backend, *tensors: torch.Tensor | None, out_dtype: torch.dtype | None = None) -> str:
    """``"triton"`` or ``"torch"`` for these tensors (see the module docstring for the rule)."""
    if backend not in _BACKENDS:
        raise ValueError(f"`backend` must be one of {_BACKENDS}, got {backend!r}.")
    if backend == "torch":
        return "torch"
    present = [t for t in tensors if t is not None]
    dtypes_ok = all(t.dtype in _TRITON_DTYPES for t in present) and (out_dtype is None or out_dtype in _TRITON_DTYPES)
    on_cuda = all(t.is_cuda for t in present)
    if backend == "auto":
        return "triton" if (on_cuda and dtypes_ok and triton_available()) else "torch"
    if not triton_available():
        raise ValueError("backend='triton' but triton is not importable; `pip install triton` or use backend='auto'.")
    if not dtypes_ok:
        got = sorted({str(t.dtype) for t in present} | ({str(out_dtype)} if out_dtype is not None else set()))
        raise ValueError(f"backend='triton' supports float32/float16/bfloat16 tensors, got {got}; "
                         "use backend='torch'.")
    if not on_cuda and not _interpreting():
        raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter); "
                         "use backend='auto' to fall back to PyTorch on CPU.")
    return "triton"


def _triton():
    from . import triton_kernels

    return triton_kernels


def _reference_noise(sample: torch.Tensor, rng_seed: int | torch.Tensor, rng_offset: int) -> torch.Tensor:
    seed = int(rng_seed.item()) if torch.is_tensor(rng_seed) else int(rng_seed)
    gen = torch.Generator(device=sample.device).manual_seed((seed + int(rng_offset)) % (2**63))
    return torch.randn(sample.shape, generator=gen, device=sample.device, dtype=sample.dtype)


def consistency_step_with_coefficients(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    coefficients: ConsistencyStepCoefficients,
    noise: torch.Tensor | None = None,
    clip_denoised: bool = True,
    *,
    rng_seed: int | torch.Tensor | None = None,
    rng_offset: int = 0,
    backend: Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """CM Algorithm 1 step with precomputed coefficients; returns ``(next, denoised)``."""
    if noise is not None and rng_seed is not None:
        raise ValueError("pass either `noise` (bit-compatible with PyTorch) or `rng_seed` (in-kernel RNG), not both.")
    if resolve_backend(backend, model_output, noise, sample) == "triton":
        return _triton().consistency_step_triton(model_output, sample, coefficients, noise, clip_denoised,
                                                 rng_seed, rng_offset)
    if noise is None and rng_seed is not None and coefficients.std != 0.0:
        noise = _reference_noise(sample, rng_seed, rng_offset)
    return consistency_step_reference(model_output, sample, coefficients, noise, clip_denoised)


def consistency_step(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    sigma,
    sigma_next,
    noise: torch.Tensor | None = None,
    sigma_data: float = SIGMA_DATA,
    sigma_min: float = SIGMA_MIN,
    clip_denoised: bool = True,
    *,
    rng_seed: int | torch.Tensor | None = None,
    rng_offset: int = 0,
    backend: Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop-in for :func:`gensample.core.sampling.consistency_step` (CM paper, Algorithm 1), with the same arguments and
    results (bit-identical on the PyTorch path). Runs the fused Triton kernel on CUDA. Returns ``(next, denoised)``."""
    coefficients = ConsistencyStepCoefficients.from_sigmas(sigma, sigma_next, sigma_data, sigma_min)
    return consistency_step_with_coefficients(model_output, sample, coefficients, noise, clip_denoised,
                                              rng_seed=rng_seed, rng_offset=rng_offset, backend=backend)


def ctm_gamma_step_with_coefficients(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    coefficients: CTMStepCoefficients,
    noise: torch.Tensor | None = None,
    clip_denoised: bool = False,
    *,
    rng_seed: int | torch.Tensor | None = None,
    rng_offset: int = 0,
    backend: Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """CTM gamma-sampling step with precomputed coefficients; returns ``(x_next, G)``."""
    if noise is not None and rng_seed is not None:
        raise ValueError("pass either `noise` (bit-compatible with PyTorch) or `rng_seed` (in-kernel RNG), not both.")
    if resolve_backend(backend, model_output, noise, sample) == "triton":
        return _triton().ctm_gamma_step_triton(model_output, sample, coefficients, noise, clip_denoised,
                                               rng_seed, rng_offset)
    if noise is None and rng_seed is not None and coefficients.std != 0.0:
        noise = _reference_noise(sample, rng_seed, rng_offset)
    return ctm_gamma_step_reference(model_output, sample, coefficients, noise, clip_denoised)


def ctm_gamma_step(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    sigma,
    sigma_next,
    gamma: float,
    noise: torch.Tensor | None = None,
    sigma_data: float = SIGMA_DATA,
    sigma_min: float = SIGMA_MIN,
    clip_denoised: bool = False,
    *,
    rng_seed: int | torch.Tensor | None = None,
    rng_offset: int = 0,
    backend: Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of CTM's gamma-sampling (Kim et al., ICLR 2024) from t = ``sigma`` to ``sigma_next``. ``model_output``
    is the network output F at (t, s), with s = sqrt(1 - gamma^2)(sigma_next - sigma_min) + sigma_min
    (:func:`~gensample.kernels.reference.ctm_jump_target`; the model must be conditioned on that s).

    x_next = G(x, t, s) + sqrt(sigma_next^2 - s^2) z, with G = (s/t) x + (1 - s/t)(c_skip x + c_out F) (EDM scalings).
    ``noise`` may be None when gamma = 0 or sigma_next = sigma_min (no noise is added then). Returns ``(x_next, G)``.
    """
    coefficients = CTMStepCoefficients.from_sigmas(sigma, sigma_next, gamma, sigma_data, sigma_min)
    return ctm_gamma_step_with_coefficients(model_output, sample, coefficients, noise, clip_denoised,
                                            rng_seed=rng_seed, rng_offset=rng_offset, backend=backend)


def scale_input_with_coefficient(sample: torch.Tensor, c_in: float, out_dtype: torch.dtype | None = None, *,
                                 backend: Backend = "auto") -> torch.Tensor:
    """``(c_in x).to(out_dtype)`` in one pass (input scaling fused with the cast to the network dtype)."""
    if resolve_backend(backend, sample, out_dtype=out_dtype) == "triton":
        return _triton().scale_input_triton(sample, c_in, out_dtype)
    return scale_input_reference(sample, c_in, out_dtype)


def scale_model_input(sample: torch.Tensor, sigma, sigma_data: float = SIGMA_DATA,
                      out_dtype: torch.dtype | None = None, *, backend: Backend = "auto") -> torch.Tensor:
    """c_in(sigma) x cast to ``out_dtype``; the same as ``ConsistencyScheduler.scale_model_input`` when ``out_dtype``
    is None."""
    return scale_input_with_coefficient(sample, input_coefficient(sigma, sigma_data), out_dtype, backend=backend)
