"""EDMHeunScheduler: EDM's deterministic Heun sampler (Karras et al. 2022, Algorithm 2 with S_churn = 0) as a
diffusers scheduler over the raw backbone output F, with EDM preconditioning (Table 1) applied inside ``step``.

Like diffusers' ``HeunDiscreteScheduler`` it is a two-state machine: ``timesteps`` lists every model evaluation,
t_0, t_1, t_1, t_2, t_2, ..., t_{N-1}, t_{N-1} (2N - 1 entries for N steps), and ``step`` alternates between

* the predictor (Algorithm 2, lines 7-8): d = (x - D(x, t_i)) / t_i, returns the Euler point x + (t_{i+1} - t_i) d;
* the corrector (lines 10-11), called with the Euler point: d' = (x' - D(x', t_{i+1})) / t_{i+1}, returns
  x_i + (t_{i+1} - t_i)(d + d') / 2 from the saved start point x_i.

The last step goes to t_N = 0 and has no corrector (line 9). The update rules are the functions of
:mod:`gensample.sampling_edm`, so this scheduler and :func:`gensample.sampling_edm.sample_heun` cannot disagree.
Differences from ``HeunDiscreteScheduler``: sigma-space EDM model (no discrete VP training schedule), the model is
fed ``c_in(sigma) x`` and ``c_noise(sigma) = 250 ln(sigma)``, ``step`` also returns the denoised estimate, and the
state is a counter reset by ``set_timesteps`` rather than a search for float timesteps.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from diffusers import ConfigMixin, SchedulerMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput

from ..edm_parametrization import edm_scalings
from ..parametrization import input_scaling, noise_conditioning
from ..sampling_edm import edm_sigmas, euler_step, heun_correct, ode_derivative

__all__ = ["EDMHeunScheduler", "EDMHeunSchedulerOutput"]


@dataclass
class EDMHeunSchedulerOutput(BaseOutput):
    """prev_sample: after a predictor call, the Euler point x' to evaluate the model at next; after a corrector call
    (or the final Euler step), the sample at t_{i+1}.
    denoised: D(x, sigma) = c_skip x + c_out F at the point and level of this model evaluation."""

    prev_sample: torch.Tensor
    denoised: torch.Tensor


class EDMHeunScheduler(SchedulerMixin, ConfigMixin):
    """Deterministic EDM Heun sampling (Algorithm 2, S_churn = 0) on the Karras schedule (eq. 5) ending in 0.

    Args:
        sigma_min (`float`, defaults to 0.002), sigma_max (`float`, defaults to 80.0), rho (`float`, defaults to
            7.0): the schedule t_i of eq. 5 for ``set_timesteps(num_inference_steps)``.
        sigma_data (`float`, defaults to 0.5): the preconditioning constant of the model (Table 1).
    """

    order = 2

    @register_to_config
    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, sigma_data: float = 0.5,
                 rho: float = 7.0):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}.")
        if sigma_data <= 0 or rho <= 0:
            raise ValueError(f"sigma_data and rho must be > 0, got sigma_data={sigma_data}, rho={rho}.")
        self.num_inference_steps: int | None = None
        self.set_timesteps(18)

    # -- schedule -------------------------------------------------------------------------------------------------
    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        sigmas: Sequence[float] | None = None,
    ) -> None:
        """Choose the N Heun steps: either ``num_inference_steps`` = N on the Karras schedule of the config, or the
        levels ``sigmas`` t_0 > ... > t_{N-1} > 0 themselves (a trailing 0 may be included; t_N = 0 is appended
        otherwise). ``timesteps`` then holds the 2N - 1 noise conditionings c_noise of the model evaluations."""
        cfg = self.config
        if (num_inference_steps is None) == (sigmas is None):
            raise ValueError("Pass exactly one of `num_inference_steps` or `sigmas` to set_timesteps.")
        if num_inference_steps is not None:
            if not isinstance(num_inference_steps, int) or isinstance(num_inference_steps, bool) \
                    or num_inference_steps < 1:
                raise ValueError(f"`num_inference_steps` must be an integer >= 1, got {num_inference_steps!r}.")
            full = edm_sigmas(num_inference_steps, cfg.sigma_min, cfg.sigma_max, cfg.rho)
        else:
            levels = torch.as_tensor(sigmas, dtype=torch.float64).flatten()
            if len(levels) and levels[-1] == 0:
                levels = levels[:-1]
            if len(levels) == 0 or (levels[1:] >= levels[:-1]).any() or (levels <= 0).any():
                raise ValueError(
                    f"`sigmas` must be non-empty, strictly descending and > 0 (an optional final 0 aside), got "
                    f"{list(sigmas)}; e.g. sigmas=[80.0, 10.0, 1.0, 0.1]."
                )
            full = torch.cat([levels, levels.new_zeros(1)])
        n = len(full) - 1
        self.num_inference_steps = n
        #: the N + 1 step levels t_0 > ... > t_N = 0 (float64, CPU)
        self.sigmas = full
        #: the level of every model evaluation: t_0, then t_1..t_{N-1} twice each (corrector of step i, predictor
        #: of step i + 1)
        self.evaluation_sigmas = torch.cat([full[:1], full[1:n].repeat_interleave(2)])
        self.timesteps = noise_conditioning(self.evaluation_sigmas).to(device=device, dtype=torch.float32)
        self._step_index = 0
        self._heun_index = 0
        self._derivative: torch.Tensor | None = None
        self._start_sample: torch.Tensor | None = None

    @property
    def init_noise_sigma(self) -> float:
        """The first level t_0: unit-variance latents are multiplied by it."""
        return float(self.sigmas[0])

    @property
    def step_index(self) -> int:
        """Number of model evaluations consumed since ``set_timesteps``."""
        return self._step_index

    @property
    def state_in_first_order(self) -> bool:
        """True when the next ``step`` is a predictor (a new Heun step begins), False before a corrector."""
        return self._derivative is None

    def _current_sigma(self) -> torch.Tensor:
        if self._step_index >= len(self.evaluation_sigmas):
            raise ValueError(
                f"all {len(self.evaluation_sigmas)} model evaluations of the {self.num_inference_steps}-step schedule "
                "are done; call set_timesteps() to start a new sampling run."
            )
        return self.evaluation_sigmas[self._step_index]

    # -- the model interface --------------------------------------------------------------------------------------
    def scale_model_input(self, sample: torch.Tensor, timestep: float | torch.Tensor | None = None) -> torch.Tensor:
        """c_in(sigma) x at the level of the current model evaluation."""
        return sample * input_scaling(self._current_sigma(), self.config.sigma_data).to(sample.dtype)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor | None,
        sample: torch.Tensor,
        return_dict: bool = True,
    ) -> EDMHeunSchedulerOutput | tuple:
        """One model evaluation's worth of Algorithm 2: a predictor (Euler) or corrector (trapezoidal) update.

        ``model_output`` is the raw F(c_in x, c_noise) at ``sample``; the denoised estimate is
        D = c_skip x + c_out F. ``timestep`` is accepted for API compatibility; the position in the schedule is
        tracked by a counter.
        """
        sigma_eval = self._current_sigma()
        if model_output.shape != sample.shape:
            raise ValueError(f"model_output shape {tuple(model_output.shape)} != sample shape {tuple(sample.shape)}.")
        c_skip, c_out = edm_scalings(sigma_eval, self.config.sigma_data)
        denoised = c_skip.to(sample.dtype) * sample + c_out.to(sample.dtype) * model_output
        sigma, sigma_next = self.sigmas[self._heun_index], self.sigmas[self._heun_index + 1]
        if self._derivative is None:  # predictor, lines 7-8
            d = ode_derivative(sample, denoised, sigma)
            prev_sample = euler_step(sample, d, sigma, sigma_next)
            if sigma_next > 0:  # line 9: a corrector follows
                self._derivative, self._start_sample = d, sample
            else:
                self._heun_index += 1
        else:  # corrector, lines 10-11
            d_next = ode_derivative(sample, denoised, sigma_next)
            prev_sample = heun_correct(self._start_sample, self._derivative, d_next, sigma, sigma_next)
            self._derivative = self._start_sample = None
            self._heun_index += 1
        self._step_index += 1
        if not return_dict:
            return prev_sample, denoised
        return EDMHeunSchedulerOutput(prev_sample=prev_sample, denoised=denoised)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor,
                  sigmas: torch.Tensor | float) -> torch.Tensor:
        """x_sigma = x_0 + sigma z for any sigma (scalar or one per sample)."""
        sigmas = torch.as_tensor(sigmas, device=original_samples.device, dtype=original_samples.dtype)
        if sigmas.ndim == 1:
            sigmas = sigmas.reshape(-1, *([1] * (original_samples.ndim - 1)))
        return original_samples + sigmas * noise
