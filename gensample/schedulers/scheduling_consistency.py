"""ConsistencyScheduler: the multistep consistency sampler (CM paper, Algorithm 1) as a diffusers scheduler.

Differences from diffusers' ``CMStochasticIterativeScheduler`` (same math otherwise; tests/test_scheduler.py shows
both give the same samples for the same UNet, latents and generator):

* ``step`` returns ``(prev_sample, denoised)``; diffusers computes ``denoised`` but drops it.
* fresh noise is drawn only when the next level is above sigma_min. openai/consistency_models'
  ``stochastic_iterative_sampler`` and diffusers (for 2+ steps) also draw it on the last step and multiply it by zero,
  so samples are identical but a shared generator is one draw further along after their loops.
* ``set_timesteps`` also takes explicit ``sigmas``; ``timesteps`` (Karras grid indices, as openai's ``ts``) may be
  given in either order, and invalid values raise errors that say what to pass.
* the step index is a counter reset by ``set_timesteps``, not a search by equality on float timesteps.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from diffusers import ConfigMixin, SchedulerMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from ..parametrization import noise_conditioning
from ..kernels import consistency_step, scale_model_input
from ..sampling import default_sampling_sigmas
from ..sigmas import karras_sigma_at_index


@dataclass
class ConsistencySchedulerOutput(BaseOutput):
    """prev_sample: x at the next noise level (the final sample after the last step).
    denoised: the clean estimate f(x, sigma) of this step."""

    prev_sample: torch.Tensor
    denoised: torch.Tensor


class ConsistencyScheduler(SchedulerMixin, ConfigMixin):
    """Multistep consistency sampling on the Karras sigma grid.

    Args:
        num_train_timesteps (`int`, defaults to 40): points N of the descending Karras grid that ``timesteps``
            indices refer to (index 0 = sigma_max, N-1 = sigma_min).
        sigma_min (`float`, defaults to 0.002), sigma_max (`float`, defaults to 80.0), sigma_data (`float`, 0.5),
        rho (`float`, 7.0): EDM constants.
        s_noise (`float`, defaults to 1.0): scale of the fresh noise (1.0 = Algorithm 1).
        clip_denoised (`bool`, defaults to True): clamp each clean estimate to [-1, 1].
        sampling_sigmas (`list[float]`, *optional*): a tuned schedule recorded with a model (e.g. `[80.0, 1.5]`, as
            iCT tunes its 2-step intermediate sigma). When set, `set_timesteps(num_inference_steps=n)` with
            n <= len(sampling_sigmas) uses its first n entries instead of the grid-index rule.
    """

    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 40,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        sigma_data: float = 0.5,
        rho: float = 7.0,
        s_noise: float = 1.0,
        clip_denoised: bool = True,
        sampling_sigmas: list[float] | None = None,
    ):
        if num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be >= 2, got {num_train_timesteps}.")
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}.")
        if sampling_sigmas is not None:
            ss = list(sampling_sigmas)
            if not ss or any(b >= a for a, b in zip(ss, ss[1:])) or ss[-1] <= sigma_min or ss[0] > sigma_max:
                raise ValueError(f"`sampling_sigmas` must be strictly descending in (sigma_min, sigma_max], got {ss}.")
        self.init_noise_sigma = sigma_max
        self.num_inference_steps: int | None = None
        self._step_index: int | None = None
        self._begin_index: int | None = None
        self.set_timesteps(1)

    @property
    def step_index(self) -> int | None:
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        self._begin_index = begin_index

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: Sequence[int] | None = None,
        sigmas: Sequence[float] | None = None,
    ) -> None:
        """Choose the sampling noise levels.

        Exactly one of: ``num_inference_steps`` (diffusers' rule: grid indices 0, N//n, 2N//n, ...), ``timesteps``
        (indices into the N-point descending Karras grid, e.g. ``[0, 22]`` = openai's ``ts=0,22,39``; order does not
        matter) or ``sigmas`` (noise levels, strictly descending, in (sigma_min, sigma_max]).
        """
        cfg = self.config
        given = [a is not None for a in (num_inference_steps, timesteps, sigmas)]
        if sum(given) != 1:
            raise ValueError("Pass exactly one of `num_inference_steps`, `timesteps` or `sigmas` to set_timesteps.")
        if num_inference_steps is not None:
            if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
                raise ValueError(f"`num_inference_steps` must be an integer >= 1, got {num_inference_steps!r}.")
            if num_inference_steps > cfg.num_train_timesteps:
                raise ValueError(
                    f"`num_inference_steps` ({num_inference_steps}) cannot exceed `num_train_timesteps` "
                    f"({cfg.num_train_timesteps}); pass explicit `sigmas` for a finer schedule."
                )
            tuned = cfg.get("sampling_sigmas") if hasattr(cfg, "get") else None
            if tuned is not None and num_inference_steps <= len(tuned):
                sampling = torch.tensor(tuned[:num_inference_steps], dtype=torch.float64)
            else:
                sampling = default_sampling_sigmas(num_inference_steps, cfg.num_train_timesteps, cfg.sigma_min,
                                                   cfg.sigma_max, cfg.rho)
        elif timesteps is not None:
            idx = sorted(int(t) for t in timesteps)
            if not idx or len(set(idx)) != len(idx) or idx[0] < 0 or idx[-1] >= cfg.num_train_timesteps - 1:
                raise ValueError(
                    f"`timesteps` must be distinct grid indices in [0, {cfg.num_train_timesteps - 2}] (index "
                    f"{cfg.num_train_timesteps - 1} is sigma_min, the implicit end point: leave it out), got "
                    f"{list(timesteps)}."
                )
            sampling = torch.tensor([karras_sigma_at_index(i, cfg.num_train_timesteps, cfg.sigma_min, cfg.sigma_max,
                                                           cfg.rho) for i in idx], dtype=torch.float64)
        else:
            sampling = torch.as_tensor(sigmas, dtype=torch.float64).flatten()
            if len(sampling) == 0 or (sampling[1:] >= sampling[:-1]).any():
                raise ValueError(f"`sigmas` must be non-empty and strictly descending, got {list(sigmas)}.")
            if sampling.min() <= cfg.sigma_min or sampling.max() > cfg.sigma_max:
                raise ValueError(
                    f"`sigmas` must lie in (sigma_min, sigma_max] = ({cfg.sigma_min}, {cfg.sigma_max}], got "
                    f"{sampling.tolist()}."
                )
        self.num_inference_steps = len(sampling)
        # sigmas holds one extra entry, sigma_min, so step i always has a sigma_next.
        self.sigmas = torch.cat([sampling, sampling.new_tensor([cfg.sigma_min])])
        self.timesteps = noise_conditioning(sampling).to(device=device, dtype=torch.float32)
        self._step_index = None
        self._begin_index = None

    def _sigma(self, offset: int = 0) -> torch.Tensor:
        if self._step_index is None:
            self._step_index = self._begin_index or 0
        return self.sigmas[self._step_index + offset]

    def scale_model_input(self, sample: torch.Tensor, timestep: float | torch.Tensor | None = None) -> torch.Tensor:
        """c_in(sigma) * x for the current step."""
        return scale_model_input(sample, self._sigma(), self.config.sigma_data)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor | None,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> ConsistencySchedulerOutput | tuple:
        """Algorithm 1, one step: denoised = c_skip x + c_out F (clamped), then re-noise to the next level."""
        if self._step_index is not None and self._step_index >= self.num_inference_steps:
            raise ValueError("step() called more times than there are timesteps; call set_timesteps() first.")
        if model_output.shape != sample.shape:
            raise ValueError(f"model_output shape {tuple(model_output.shape)} != sample shape {tuple(sample.shape)}.")
        sigma, sigma_next = self._sigma(), self._sigma(1)
        noise = None
        if sigma_next > self.config.sigma_min:
            noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
            noise = noise * self.config.s_noise
        prev_sample, denoised = consistency_step(
            model_output, sample, sigma, sigma_next, noise, self.config.sigma_data, self.config.sigma_min,
            self.config.clip_denoised,
        )
        self._step_index += 1
        if not return_dict:
            return prev_sample, denoised
        return ConsistencySchedulerOutput(prev_sample=prev_sample, denoised=denoised)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor | float) -> torch.Tensor:
        """x_sigma = x_0 + sigma z for any sigma (scalar or one per sample)."""
        sigmas = torch.as_tensor(sigmas, device=original_samples.device, dtype=original_samples.dtype)
        if sigmas.ndim == 1:
            sigmas = sigmas.reshape(-1, *([1] * (original_samples.ndim - 1)))
        return original_samples + sigmas * noise

    def __len__(self) -> int:
        return self.config.num_train_timesteps
