"""Argument checks shared by gensample's pipelines; each error names the argument and says what to pass instead.

Step-count bounds (:data:`MAX_INFERENCE_STEPS`, :func:`max_inference_steps`): a discrete-time consistency scheduler
(``ConsistencyScheduler``, diffusers' ``CMStochasticIterativeScheduler``) serves at most ``num_train_timesteps``
steps, its grid; the continuous-time samplers (EDM Heun, diffusers' EDM Euler / DPM-Solver++, CTM gamma and Heun)
have no grid, so they get a documented ceiling, :data:`MAX_INFERENCE_STEPS` = 10,000 steps (EDM Heun: 19,999 network
evaluations). Published EDM / CTM samplers use 1 to a few hundred steps and EDM's deterministic Heun has converged
long before 10,000; the bound exists so that a typo (``10**6``) fails at once instead of running for minutes (building
CTM's schedule alone costs about 1 ms per step on a CPU). Explicit ``sigmas`` obey the same length bound.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
from diffusers import CMStochasticIterativeScheduler

from gensample.schedulers import ConsistencyScheduler

__all__ = ["MAX_INFERENCE_STEPS", "OUTPUT_TYPES", "as_latents", "check_batch_size", "check_latents",
           "check_num_inference_steps", "check_sampling_inputs", "check_schedule_source", "check_sigmas",
           "check_timesteps", "max_inference_steps"]

#: the most steps (and explicit ``sigmas``) a continuous-time sampler is asked for; see the module docstring
MAX_INFERENCE_STEPS = 10_000


def check_batch_size(batch_size: Any) -> None:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")


def max_inference_steps(scheduler: Any) -> tuple[int, str]:
    """The most steps ``scheduler`` can serve and why: ``num_train_timesteps`` for the discrete consistency
    schedulers, else :data:`MAX_INFERENCE_STEPS`."""
    if isinstance(scheduler, (ConsistencyScheduler, CMStochasticIterativeScheduler)):
        n = int(scheduler.config.num_train_timesteps)
        return n, (f"{type(scheduler).__name__}'s `num_train_timesteps` ({n}), the grid the model was trained on; "
                   "pass explicit `sigmas` for a finer schedule")
    return MAX_INFERENCE_STEPS, (f"gensample's ceiling for continuous-time samplers ({MAX_INFERENCE_STEPS}; "
                                 "samplers converge in a few hundred steps at most)")


def check_num_inference_steps(num_inference_steps: Any, maximum: int | None = None, why: str = "") -> None:
    """An integer >= 1 (not a bool), and <= ``maximum`` when given (``why`` says where the bound comes from)."""
    if not isinstance(num_inference_steps, int) or isinstance(num_inference_steps, bool) or num_inference_steps < 1:
        raise ValueError(f"`num_inference_steps` must be an integer >= 1, got {num_inference_steps!r}.")
    if maximum is not None and num_inference_steps > maximum:
        raise ValueError(f"`num_inference_steps` ({num_inference_steps}) exceeds the {maximum} steps this pipeline's "
                         f"scheduler serves: {why or maximum}. Pass at most {maximum}.")


def _real_values(values: Any, name: str, example: str) -> list[float]:
    """``values`` (a sequence, a 1-d array or tensor of real numbers) as a list of floats, else a ValueError."""
    try:
        array = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    except (TypeError, ValueError) as e:
        raise ValueError(f"`{name}` must be a sequence of numbers, got {values!r} ({e}); e.g. {name}={example}.") \
            from None
    if not np.issubdtype(array.dtype, np.integer) and not np.issubdtype(array.dtype, np.floating) or array.ndim > 1:
        raise ValueError(f"`{name}` must be a flat sequence of real numbers, got {values!r}; e.g. {name}={example}.")
    return [float(v) for v in array.reshape(-1)]


def check_sigmas(sigmas: Any, maximum: int = MAX_INFERENCE_STEPS) -> None:
    """``sigmas``: 1 to ``maximum`` finite real numbers (their order and range are the scheduler's to check)."""
    example = "[80.0, 0.8]"
    values = _real_values(sigmas, "sigmas", example)
    if not values:
        raise ValueError(f"`sigmas` is empty; pass the descending noise levels, e.g. sigmas={example}.")
    bad = [v for v in values if not math.isfinite(v)]
    if bad:
        raise ValueError(f"`sigmas` must be finite noise levels, got {values[:8]}{' ...' if len(values) > 8 else ''} "
                         f"({len(bad)} NaN/inf); pass descending finite levels, e.g. sigmas={example}.")
    if len(values) > maximum:
        raise ValueError(f"`sigmas` holds {len(values)} levels, more than the {maximum} steps a pipeline samples "
                         f"(gensample's ceiling for continuous-time samplers); pass at most {maximum}.")


def check_timesteps(timesteps: Any) -> None:
    """``timesteps``: a non-empty sequence of finite integer grid indices (the scheduler checks their range)."""
    example = "[0, 22]"
    values = _real_values(timesteps, "timesteps", example)
    if not values:
        raise ValueError(f"`timesteps` is empty; pass grid indices, e.g. timesteps={example}.")
    if not all(math.isfinite(v) and v == int(v) for v in values):
        raise ValueError(f"`timesteps` must be integer grid indices (0 = sigma_max), got {values[:8]}; e.g. "
                         f"timesteps={example}, or pass `sigmas` for arbitrary noise levels.")


def check_schedule_source(num_inference_steps: Any, timesteps: Any, sigmas: Any, scheduler: Any = None) -> None:
    """At most one of ``timesteps`` / ``sigmas``, each well-formed; without them a valid ``num_inference_steps``,
    bounded by what ``scheduler`` serves (:func:`max_inference_steps`) when it is given."""
    if timesteps is not None and sigmas is not None:
        raise ValueError("Pass either `timesteps` or `sigmas`, not both.")
    if timesteps is not None:
        check_timesteps(timesteps)
    elif sigmas is not None:
        check_sigmas(sigmas)
    else:
        maximum, why = max_inference_steps(scheduler) if scheduler is not None else (None, "")
        check_num_inference_steps(num_inference_steps, maximum, why)


def check_latents(latents: Any, expected: tuple[int, ...]) -> None:
    """``latents``: a torch tensor or numpy array of real numbers of shape ``expected``, all finite."""
    if not isinstance(latents, (torch.Tensor, np.ndarray)):
        raise ValueError(f"`latents` must be a torch.Tensor (or a numpy array, converted) of shape {expected}, got "
                         f"{type(latents).__name__}; omit it to draw the noise from `generator`.")
    if isinstance(latents, torch.Tensor):
        is_real = not latents.is_complex() and latents.dtype != torch.bool
    else:
        is_real = np.issubdtype(latents.dtype, np.floating) or np.issubdtype(latents.dtype, np.integer)
    if not is_real:
        raise ValueError(f"`latents` must hold real unit-variance noise, got dtype {latents.dtype}; pass e.g. "
                         "torch.randn(...) or omit `latents`.")
    if tuple(latents.shape) != expected:
        raise ValueError(
            f"`latents` has shape {tuple(latents.shape)} but this model expects {expected} "
            "(batch_size, unet.config.in_channels, sample_size, sample_size); pass matching latents or omit them."
        )
    finite = bool(torch.isfinite(latents).all()) if isinstance(latents, torch.Tensor) \
        else bool(np.isfinite(latents).all())
    if not finite:
        raise ValueError("`latents` holds NaN or inf values; pass finite unit-variance noise (e.g. torch.randn) or "
                         "omit `latents` to draw it from `generator`.")


def as_latents(latents: Any) -> torch.Tensor | None:
    """``latents`` as a torch tensor (a numpy array is converted with ``torch.from_numpy``; None stays None)."""
    if isinstance(latents, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(latents))
    return latents


OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def check_sampling_inputs(pipe, batch_size: int, expected_latent_shape: tuple[int, ...], latents: Any,
                          generator, output_type: str, callback_on_step_end_tensor_inputs: Sequence[str] | None,
                          class_labels: Any, output_types: Sequence[str] = OUTPUT_TYPES) -> None:
    """Batch size, latents (type, shape, finiteness), generator list length, output type, callback tensor names and
    class labels."""
    check_batch_size(batch_size)
    if latents is not None:
        check_latents(latents, (batch_size, *expected_latent_shape))
    if isinstance(generator, list) and len(generator) != batch_size:
        raise ValueError(f"Got a list of {len(generator)} generators for batch_size {batch_size}; pass one per image.")
    if output_type not in output_types:
        quoted = [repr(t) for t in output_types]
        choices = ", ".join(quoted[:-1]) + " or " + quoted[-1]
        raise ValueError(f"`output_type` must be {choices}, got {output_type!r}.")
    if callback_on_step_end_tensor_inputs is not None:
        bad = [k for k in callback_on_step_end_tensor_inputs if k not in pipe._callback_tensor_inputs]
        if bad:
            raise ValueError(f"`callback_on_step_end_tensor_inputs` {bad} not in {pipe._callback_tensor_inputs}: "
                             f"{type(pipe).__name__} passes only those tensors to `callback_on_step_end`.")
    if class_labels is not None and pipe.unet.config.num_class_embeds is None:
        raise ValueError("`class_labels` given but this UNet is unconditional (num_class_embeds is None).")
