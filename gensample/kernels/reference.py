"""Plain PyTorch reference of every fused sampler kernel, and the host-side coefficients they take.

Each function here has a Triton twin in :mod:`gensample.kernels.triton_kernels` that does the same arithmetic, in the
same order and with the same roundings, in one pass over memory. These references are what runs on CPU (and on CUDA
without Triton), and what the Triton kernels are tested against.

The math lives once. Per-step scalars (c_skip, c_out, c_in, the re-noise std) are computed on the host in float64 by
:mod:`gensample.core.parametrization` and :mod:`gensample.core.sampling`, collected into the small frozen dataclasses below,
and handed to the kernels as plain numbers. The kernels never re-derive a formula. A scalar is rounded to the dtype of
the sampler state exactly as :func:`gensample.core.sampling.consistency_step` rounds it (``float64 tensor -> .to(dtype)``).
That is why :func:`consistency_step_reference` is bit-identical to ``consistency_step``.

Conventions shared by all kernels:

* ``sample`` (x) holds the sampler state and sets the state dtype. ``model_output`` (F) may be in a narrower network
  dtype and is upcast to the state dtype first. ``noise`` is in the state dtype.
* Every intermediate is rounded to the state dtype after each operation, as PyTorch eager does. With a float32 state
  the roundings are no-ops.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.parametrization import combine, consistency_scalings, input_scaling, trajectory_jump
from ..core.sampling import ctm_jump_target, renoise_std
from ..core.sigmas import SIGMA_DATA, SIGMA_MIN

__all__ = [
    "ConsistencyStepCoefficients",
    "CTMStepCoefficients",
    "ctm_jump_target",
    "consistency_step_reference",
    "ctm_gamma_step_reference",
    "scale_input_reference",
    "check_step_inputs",
    "input_coefficient",
]


def _f64(value) -> torch.Tensor:
    """A float64 0-dim tensor from a Python number or a one-element tensor (exact for both)."""
    t = torch.as_tensor(value, dtype=torch.float64)
    if t.numel() != 1:
        raise ValueError(f"expected a scalar noise level / coefficient, got a tensor of shape {tuple(t.shape)}; "
                         "the fused kernels take one sigma per step for the whole batch.")
    return t.reshape(()).cpu()


def _cast(coefficient: float, dtype: torch.dtype) -> torch.Tensor:
    """The host coefficient rounded to the state dtype, the same way ``consistency_step`` does (0-dim tensor)."""
    return torch.tensor(coefficient, dtype=torch.float64).to(dtype)


@dataclass(frozen=True)
class ConsistencyStepCoefficients:
    """Scalars of one multistep consistency step (CM paper, Song et al. 2023, Algorithm 1), in float64.

    ``denoised = c_skip x + c_out F`` with the boundary-condition scalings of :func:`consistency_scalings`.
    The step then re-noises with ``next = denoised + std z``, where ``std = sqrt(sigma_next^2 - sigma_min^2)``
    (:func:`renoise_std`). ``std == 0`` (the last step, which lands on sigma_min) means that no noise is added.
    """

    c_skip: float
    c_out: float
    std: float

    @classmethod
    def from_sigmas(cls, sigma, sigma_next, sigma_data: float = SIGMA_DATA,
                    sigma_min: float = SIGMA_MIN) -> "ConsistencyStepCoefficients":
        """Coefficients of the step from ``sigma`` to ``sigma_next``, with exactly the float64 values that
        :func:`gensample.core.sampling.consistency_step` computes."""
        sigma, sigma_next = _f64(sigma), _f64(sigma_next)
        if not torch.isfinite(sigma) or sigma <= 0:
            raise ValueError(f"`sigma` must be a finite positive noise level, got {float(sigma)}.")
        c_skip, c_out = consistency_scalings(sigma, sigma_data, sigma_min)
        return cls(float(c_skip), float(c_out), float(renoise_std(sigma_next, sigma_min)))


@dataclass(frozen=True)
class CTMStepCoefficients:
    """Scalars of one CTM gamma-sampling step (Kim et al., ICLR 2024, sec. 4 / sony/ctm ``sample_gamma_multistep``).

    With EDM scalings at t = sigma, ``g = c_skip x + c_out F`` (``c_skip = sd^2/(t^2+sd^2)``,
    ``c_out = t sd/sqrt(t^2+sd^2)``: :func:`consistency_scalings` with sigma_min = 0). The step jumps to
    ``G = jump_ratio x + (1 - jump_ratio) g`` with ``jump_ratio = s/t`` (CTM's Euler outer parametrization), and then
    re-noises with ``x_next = G + std z``, where ``std = sqrt(sigma_next^2 - s^2)``.
    ``jump_complement`` is 1 - s/t, computed once in float64.
    """

    c_skip: float
    c_out: float
    jump_ratio: float
    jump_complement: float
    std: float
    s: float

    @classmethod
    def from_sigmas(cls, sigma, sigma_next, gamma: float, sigma_data: float = SIGMA_DATA,
                    sigma_min: float = SIGMA_MIN) -> "CTMStepCoefficients":
        """Coefficients of the gamma step from t = ``sigma`` to ``sigma_next`` (s from :func:`ctm_jump_target`)."""
        t, sigma_next = _f64(sigma), _f64(sigma_next)
        if not torch.isfinite(t) or t <= 0:
            raise ValueError(f"`sigma` must be a finite positive noise level, got {float(t)}.")
        if sigma_next > t:
            raise ValueError(f"`sigma_next` ({float(sigma_next)}) must be <= `sigma` ({float(t)}): samplers go "
                             "from high to low noise.")
        s = ctm_jump_target(sigma_next, gamma, sigma_min)
        c_skip, c_out = consistency_scalings(t, sigma_data, 0.0)  # EDM scalings = boundary scalings at sigma_min 0
        ratio = s / t
        return cls(float(c_skip), float(c_out), float(ratio), float(1.0 - ratio), float(renoise_std(sigma_next, s)),
                   float(s))


def check_step_inputs(model_output: torch.Tensor, sample: torch.Tensor, noise: torch.Tensor | None) -> None:
    """Reject mismatched shapes/devices and non-float states with errors that say what to pass."""
    if not sample.is_floating_point():
        raise ValueError(f"`sample` must be a floating-point tensor, got dtype {sample.dtype}.")
    if model_output.shape != sample.shape:
        raise ValueError(f"`model_output` shape {tuple(model_output.shape)} != `sample` shape "
                         f"{tuple(sample.shape)}; pass the network output for this very sample.")
    if model_output.device != sample.device:
        raise ValueError(f"`model_output` is on {model_output.device} but `sample` is on {sample.device}; "
                         "move both to one device.")
    if noise is not None:
        if noise.shape != sample.shape:
            raise ValueError(f"`noise` shape {tuple(noise.shape)} != `sample` shape {tuple(sample.shape)}; draw "
                             "the noise with sample.shape.")
        if noise.device != sample.device:
            raise ValueError(f"`noise` is on {noise.device} but `sample` is on {sample.device}.")


def consistency_step_reference(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    coefficients: ConsistencyStepCoefficients,
    noise: torch.Tensor | None,
    clip_denoised: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One multistep consistency step (CM paper, Algorithm 1, lines 4-5), the reference for the fused kernel:

        denoised = c_skip x + c_out F          (clamped to [-1, 1] if ``clip_denoised``)
        next     = denoised + std z,           std = sqrt(sigma_next^2 - sigma_min^2)

    Returns ``(next, denoised)``. ``noise`` may be None when ``std == 0``, and then ``next is denoised``. The operation
    order and roundings are those of :func:`gensample.core.sampling.consistency_step`, so both give bit-identical results.
    """
    check_step_inputs(model_output, sample, noise)
    dtype = sample.dtype
    model_output = model_output.to(dtype)
    denoised = combine(sample, model_output, _f64(coefficients.c_skip), _f64(coefficients.c_out))
    if clip_denoised:
        denoised = denoised.clamp(-1, 1)
    if noise is None or coefficients.std == 0.0:
        return denoised, denoised
    return denoised + _cast(coefficients.std, dtype) * noise.to(dtype), denoised


def ctm_gamma_step_reference(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    coefficients: CTMStepCoefficients,
    noise: torch.Tensor | None,
    clip_denoised: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of CTM's gamma-sampling (Kim et al., "Consistency Trajectory Models", ICLR 2024, Algorithm /
    sony/ctm ``sample_gamma_multistep``), the reference for the fused kernel:

        g      = c_skip(t) x_t + c_out(t) F        EDM denoiser from the network output F at t = sigma
                                                   (clamped to [-1, 1] if ``clip_denoised``)
        G      = (s/t) x_t + (1 - s/t) g           G(x_t, t, s): jump from t to s = sqrt(1-gamma^2)(sigma_next -
                                                   sigma_min) + sigma_min along the trajectory
        x_next = G + sqrt(sigma_next^2 - s^2) z    re-noise from s up to sigma_next

    ``gamma = 1`` is CM multistep sampling (s = sigma_min, std = sqrt(sigma_next^2 - sigma_min^2)). ``gamma = 0`` makes
    deterministic jumps (s = sigma_next, no noise). ``G(x, t, t) = x`` exactly. Build ``coefficients`` with
    :meth:`CTMStepCoefficients.from_sigmas`. ``noise`` may be None when ``std == 0``.
    Returns ``(x_next, G)``.
    """
    check_step_inputs(model_output, sample, noise)
    dtype = sample.dtype
    model_output = model_output.to(dtype)
    g = combine(sample, model_output, _f64(coefficients.c_skip), _f64(coefficients.c_out))
    if clip_denoised:
        g = g.clamp(-1, 1)
    jumped = trajectory_jump(sample, g, _f64(coefficients.jump_ratio))
    if noise is None or coefficients.std == 0.0:
        return jumped, jumped
    return jumped + _cast(coefficients.std, dtype) * noise.to(dtype), jumped


def input_coefficient(sigma, sigma_data: float = SIGMA_DATA) -> float:
    """c_in(sigma) = 1/sqrt(sigma^2 + sigma_data^2) in float64 (:func:`gensample.core.parametrization.input_scaling`)."""
    return float(input_scaling(_f64(sigma), sigma_data))


def scale_input_reference(sample: torch.Tensor, c_in: float, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Network input ``(c_in x).to(out_dtype)``: the scheduler's ``scale_model_input`` fused with the cast to the
    network dtype. With ``out_dtype`` None or equal to ``sample.dtype`` this is bit-identical to
    ``ConsistencyScheduler.scale_model_input``."""
    if not sample.is_floating_point():
        raise ValueError(f"`sample` must be a floating-point tensor, got dtype {sample.dtype}.")
    scaled = sample * _cast(c_in, sample.dtype)
    return scaled if out_dtype is None else scaled.to(out_dtype)
