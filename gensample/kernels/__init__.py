"""Fused sampler-step kernels (Triton on CUDA) with PyTorch references, and their dispatch.

* :func:`consistency_step`: CM Algorithm 1 step, a drop-in for :func:`gensample.core.sampling.consistency_step`.
* :func:`ctm_gamma_step`: CTM gamma-sampling step (Kim et al., ICLR 2024), the step a CTM scheduler calls.
* :func:`scale_model_input`: c_in x fused with the cast to the network dtype.

Each takes ``backend="auto" | "triton" | "torch"``. Triton is optional: without it (or on CPU) everything runs
through the PyTorch references in :mod:`gensample.kernels.reference`. ``triton_kernels`` is imported only on demand.
"""
from .dispatch import (
    Backend,
    consistency_step,
    consistency_step_with_coefficients,
    ctm_gamma_step,
    ctm_gamma_step_with_coefficients,
    resolve_backend,
    scale_input_with_coefficient,
    scale_model_input,
    triton_available,
)
from .reference import (
    ConsistencyStepCoefficients,
    CTMStepCoefficients,
    consistency_step_reference,
    ctm_gamma_step_reference,
    ctm_jump_target,
    input_coefficient,
    scale_input_reference,
)

__all__ = [
    "Backend",
    "ConsistencyStepCoefficients",
    "CTMStepCoefficients",
    "consistency_step",
    "consistency_step_reference",
    "consistency_step_with_coefficients",
    "ctm_gamma_step",
    "ctm_gamma_step_reference",
    "ctm_gamma_step_with_coefficients",
    "ctm_jump_target",
    "input_coefficient",
    "resolve_backend",
    "scale_input_reference",
    "scale_input_with_coefficient",
    "scale_model_input",
    "triton_available",
]
