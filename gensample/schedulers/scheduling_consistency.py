"""ConsistencyScheduler: the multistep consistency sampler (CM paper, Algorithm 1) as a diffusers scheduler.

It follows diffusers' ``CMStochasticIterativeScheduler`` (listed in ``_compatibles``: the two read each other's
configs and give the same samples for the same UNet, latents and generator, see tests/test_scheduler.py), including
its timestep protocol (:mod:`gensample.schedulers.sigma_schedule`): ``timesteps`` are the model inputs
c_noise(sigma) = 250 ln(sigma), ``add_noise`` takes values of ``timesteps``, and ``scale_model_input`` / ``step``
locate their index from the timestep they are given, so a loop may start mid-schedule. Differences:

* ``step`` returns ``(prev_sample, denoised)``; diffusers computes ``denoised`` but drops it. The output also has
  ``pred_original_sample`` (= ``denoised``, the clean estimate), the name diffusers' DDIM/Euler outputs use.
* fresh noise is drawn only when the next level is above sigma_min. openai/consistency_models'
  ``stochastic_iterative_sampler`` and diffusers (for 2+ steps) also draw it on the last step and multiply it by zero,
  so samples are identical but a shared generator is one draw further along after their loops.
* ``set_timesteps`` also takes explicit ``sigmas``; ``timesteps`` (Karras grid indices, as openai's ``ts``) may be
  given in either order, and invalid values raise errors that say what to pass.
* a config may record a tuned schedule (``sampling_sigmas``), which diffusers' scheduler does not know (it drops the
  key with a warning): :meth:`ConsistencyScheduler.diffusers_timesteps` gives the diffusers equivalent where one
  exists.
* ``timesteps`` are float32 (diffusers: float64) and ``sigmas`` float64 (diffusers: float32).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from diffusers import ConfigMixin, SchedulerMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils.torch_utils import randn_tensor

from ..core.parametrization import noise_conditioning
from ..core.sigmas import default_sampling_sigmas, karras_ramp
from ..kernels import consistency_step
from .sigma_schedule import (
    DenoisingStepOutput,
    SigmaScheduleMixin,
    check_descending_sigmas,
    check_noise_constants,
    check_num_inference_steps,
    check_one_schedule_source,
    karras_grid_sigmas,
)

__all__ = ["ConsistencyScheduler", "ConsistencySchedulerOutput"]


@dataclass
class ConsistencySchedulerOutput(DenoisingStepOutput):
    """prev_sample: x at the next noise level (the final sample after the last step).
    denoised: the clean estimate f(x, sigma) of this step (also readable as ``pred_original_sample``)."""


class ConsistencyScheduler(SigmaScheduleMixin, SchedulerMixin, ConfigMixin):
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

    _compatibles = ["CMStochasticIterativeScheduler"]
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
        check_noise_constants(sigma_min, sigma_max, sigma_data, rho, num_train_timesteps)
        if sampling_sigmas is not None:
            check_descending_sigmas(sampling_sigmas, sigma_min, sigma_max, name="sampling_sigmas")
        self.init_noise_sigma = sigma_max
        self.num_inference_steps: int | None = None
        self.set_timesteps(1)

    # -- schedule -------------------------------------------------------------------------------------------------
    def _sampling_sigmas(self, num_inference_steps: int | None, timesteps: Sequence[int] | None,
                         sigmas: Sequence[float] | None) -> torch.Tensor:
        """The n descending sampling levels (float64) that ``set_timesteps`` with these arguments uses."""
        cfg = self.config
        source = check_one_schedule_source(num_inference_steps=num_inference_steps, timesteps=timesteps,
                                           sigmas=sigmas)
        if source == "num_inference_steps":
            n = check_num_inference_steps(num_inference_steps, maximum=cfg.num_train_timesteps)
            tuned = cfg.get("sampling_sigmas") if hasattr(cfg, "get") else None
            if tuned is not None and n <= len(tuned):
                return torch.tensor(tuned[:n], dtype=torch.float64)
            return default_sampling_sigmas(n, cfg.num_train_timesteps, cfg.sigma_min, cfg.sigma_max, cfg.rho)
        if source == "timesteps":
            return karras_grid_sigmas(timesteps, cfg.num_train_timesteps, cfg.sigma_min, cfg.sigma_max, cfg.rho)
        return check_descending_sigmas(sigmas, cfg.sigma_min, cfg.sigma_max)

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: Sequence[int] | None = None,
        sigmas: Sequence[float] | None = None,
    ) -> None:
        """Choose the sampling noise levels.

        Exactly one of: ``num_inference_steps`` (diffusers' rule: grid indices 0, N//n, 2N//n, ..., or the first n
        entries of the config's ``sampling_sigmas``), ``timesteps`` (indices into the N-point descending Karras grid,
        e.g. ``[0, 22]`` = openai's ``ts=0,22,39`` = diffusers' ``timesteps=[22, 0]``; order does not matter) or
        ``sigmas`` (noise levels, strictly descending, in (sigma_min, sigma_max]).

        Sets ``timesteps`` (the n model inputs c_noise(sigma_i), float32), ``sigmas`` (the n levels and the end point
        sigma_min, float64, CPU) and ``timestep_sigmas`` (the level of each entry of ``timesteps``).
        """
        sampling = self._sampling_sigmas(num_inference_steps, timesteps, sigmas)
        self.num_inference_steps = len(sampling)
        # sigmas holds one extra entry, sigma_min, so step i always has a sigma_next.
        self.sigmas = torch.cat([sampling, sampling.new_tensor([self.config.sigma_min])])
        self.timestep_sigmas = self.sigmas[:-1]
        self.timesteps = noise_conditioning(sampling).to(device=device, dtype=torch.float32)
        self._reset_step_index()

    def diffusers_timesteps(self, num_inference_steps: int) -> list[int]:
        """The ``timesteps=`` argument for diffusers' ``CMStochasticIterativeScheduler`` (built from this config)
        that samples at the levels ``set_timesteps(num_inference_steps)`` uses here: descending indices in
        [0, num_train_timesteps) of the Karras grid, e.g. ``[20, 0]`` for 2 steps on the default 40-point grid.

        Without a tuned ``sampling_sigmas`` this always exists (the same grid rule as diffusers'
        ``num_inference_steps``). A tuned level that is not a point of the N-point grid has no equivalent: diffusers'
        CM scheduler (0.42.1) takes no custom sigmas (``set_timesteps`` accepts only ``num_inference_steps`` or
        integer grid indices, cast to int64, and ``ConsistencyModelPipeline`` has no ``sigmas`` argument), so this
        raises a ``ValueError`` that names the nearest grid indices. Levels match up to float rounding (relative
        1e-9); diffusers then samples at float32 copies of them.
        """
        cfg = self.config
        sampling = self._sampling_sigmas(num_inference_steps, None, None)
        n_grid = cfg.num_train_timesteps
        grid = karras_ramp(torch.arange(n_grid, dtype=torch.float64) / (n_grid - 1), cfg.sigma_max, cfg.sigma_min,
                           cfg.rho)
        indices, missing = [], []
        for sigma in sampling.tolist():
            distance = (grid - sigma).abs()
            i = int(distance.argmin())
            if distance[i] <= 1e-9 * sigma:
                indices.append(i)
            else:
                below = int((grid > sigma).sum())  # first grid index under sigma
                near = [j for j in (below - 1, below) if 0 <= j < n_grid]
                missing.append(f"{sigma} (between index {near[0]}: {float(grid[near[0]]):.6g} and index "
                               f"{near[-1]}: {float(grid[near[-1]]):.6g})" if len(near) == 2 else f"{sigma}")
                indices.append(i)
        if missing:
            raise ValueError(
                f"the {len(sampling)}-step schedule {sampling.tolist()} has level(s) {', '.join(missing)} that are "
                f"not on the {n_grid}-point Karras grid, so diffusers' CMStochasticIterativeScheduler cannot sample "
                "it: its set_timesteps takes only `num_inference_steps` or integer grid indices `timesteps` (no "
                "custom sigmas), and ConsistencyModelPipeline has no `sigmas` argument. The nearest grid schedule is "
                f"timesteps={sorted(set(indices), reverse=True)} (sigmas "
                f"{[round(float(grid[i]), 6) for i in sorted(set(indices))]}); use gensample's ConsistencyPipeline "
                "for the tuned levels."
            )
        return sorted(indices, reverse=True)

    # -- the model interface --------------------------------------------------------------------------------------
    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor | None,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> ConsistencySchedulerOutput | tuple:
        """Algorithm 1, one step: denoised = c_skip x + c_out F (clamped), then re-noise to the next level.

        ``timestep``: a value of ``timesteps`` (it locates the step when none is in progress; None: the current
        step). Returns ``(prev_sample, denoised)`` (tuple or :class:`ConsistencySchedulerOutput`).
        """
        if model_output.shape != sample.shape:
            raise ValueError(f"model_output shape {tuple(model_output.shape)} != sample shape {tuple(sample.shape)}.")
        i = self._current_step_index(timestep)
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        noise = None
        if sigma_next > self.config.sigma_min:
            noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
            noise = noise * self.config.s_noise
        prev_sample, denoised = consistency_step(
            model_output, sample, sigma, sigma_next, noise, self.config.sigma_data, self.config.sigma_min,
            self.config.clip_denoised,
        )
        self._step_index = i + 1
        if not return_dict:
            return prev_sample, denoised
        return ConsistencySchedulerOutput(prev_sample=prev_sample, denoised=denoised)
