"""Argument checks shared by gensample's pipelines; each error says what to pass instead."""
from __future__ import annotations

from typing import Any, Sequence

import torch


def check_batch_size(batch_size: Any) -> None:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")


def check_num_inference_steps(num_inference_steps: Any) -> None:
    if not isinstance(num_inference_steps, int) or isinstance(num_inference_steps, bool) or num_inference_steps < 1:
        raise ValueError(f"`num_inference_steps` must be an integer >= 1, got {num_inference_steps!r}.")


def check_schedule_source(num_inference_steps: Any, timesteps: Any, sigmas: Any) -> None:
    """At most one of ``timesteps`` / ``sigmas``; without them a valid ``num_inference_steps``."""
    if timesteps is not None and sigmas is not None:
        raise ValueError("Pass either `timesteps` or `sigmas`, not both.")
    if timesteps is None and sigmas is None:
        check_num_inference_steps(num_inference_steps)


OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def check_sampling_inputs(pipe, batch_size: int, expected_latent_shape: tuple[int, ...], latents: torch.Tensor | None,
                          generator, output_type: str, callback_on_step_end_tensor_inputs: Sequence[str] | None,
                          class_labels: Any, output_types: Sequence[str] = OUTPUT_TYPES) -> None:
    """Batch size, latents shape, generator list length, output type, callback tensor names and class labels."""
    check_batch_size(batch_size)
    expected = (batch_size, *expected_latent_shape)
    if latents is not None and tuple(latents.shape) != expected:
        raise ValueError(
            f"`latents` has shape {tuple(latents.shape)} but this model expects {expected} "
            "(batch_size, unet.config.in_channels, sample_size, sample_size); pass matching latents or omit them."
        )
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
