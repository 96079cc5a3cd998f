"""EDMHeunScheduler: EDM's deterministic Heun sampler (Karras et al. 2022, Algorithm 2 with S_churn = 0) as a
diffusers scheduler over the raw backbone output F, with EDM preconditioning (Table 1) applied inside ``step``.

Like diffusers' ``HeunDiscreteScheduler`` it is a two-state machine with one ``timesteps`` entry per model
evaluation: ``timesteps`` = c_noise of t_0, t_1, t_1, t_2, t_2, ..., t_{N-1}, t_{N-1} (2N - 1 entries for N steps;
their levels are ``timestep_sigmas``, also called ``evaluation_sigmas``). Entry 2j is the predictor of Heun step j,
entry 2j + 1 its corrector, and ``step`` does

* the predictor (Algorithm 2, lines 7-8): d = (x - D(x, t_j)) / t_j, returns the Euler point x + (t_{j+1} - t_j) d;
* the corrector (lines 10-11), called with the Euler point: d' = (x' - D(x', t_{j+1})) / t_{j+1}, returns
  x_j + (t_{j+1} - t_j)(d + d') / 2 from the saved start point x_j.

The last step goes to t_N = 0 and has no corrector (line 9). ``state_in_first_order`` is True when the next ``step``
is a predictor. The update rules are the functions of :mod:`gensample.core.sampling`, so this scheduler and
:func:`gensample.core.sampling.sample_heun` cannot disagree.

Timestep protocol (diffusers', :mod:`gensample.schedulers.sigma_schedule`): ``scale_model_input`` / ``step`` locate
their evaluation from the timestep when none is in progress. A repeated value t_j (j >= 1) resolves, as in diffusers,
to its second entry 2j, the predictor of step j: a loop may start at ``timesteps[2 * j:]`` (diffusers:
``timesteps[t_start * scheduler.order:]``), and ``add_noise`` with ``timesteps[2 * j]`` noises to t_j. A run cannot
start at a corrector (``set_begin_index`` with an odd index raises on the first ``step``).

Differences from ``HeunDiscreteScheduler``: sigma-space EDM model (no discrete VP training schedule), the model is fed
``c_in(sigma) x`` and ``c_noise(sigma) = 250 ln(sigma)``; ``sigmas`` holds the N + 1 step levels t_0 .. t_N = 0
(diffusers: one entry per evaluation plus the final 0, here ``timestep_sigmas``); ``step`` also returns the denoised
estimate D (as ``denoised`` and ``pred_original_sample``).

``_compatibles`` lists diffusers' ``EDMEulerScheduler`` and ``EDMDPMSolverMultistepScheduler``: they read this
config and sample the same EDM denoiser (same c_in, c_skip, c_out with ``prediction_type="epsilon"``). One caveat:
their ``timesteps`` hold c_noise = 0.25 ln(sigma) (EDM's Table 1), 1/1000 of the 250 ln(sigma) gensample's EDM
models are trained on (diffusers' CM convention). :class:`gensample.pipelines.EDMPipeline` converts (it passes the UNet
c_noise of the scheduler's current sigma in the UNet's convention); a hand-written loop with one of those schedulers
must pass the UNet ``1000 * t`` (or :func:`gensample.core.parametrization.noise_conditioning` of the sigma).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from diffusers import ConfigMixin, SchedulerMixin
from diffusers.configuration_utils import register_to_config

from ..core.parametrization import edm_scalings, noise_conditioning
from ..core.sampling import euler_step, heun_correct, ode_derivative
from ..core.sigmas import edm_sigmas
from .sigma_schedule import (
    DenoisingStepOutput,
    SigmaScheduleMixin,
    check_descending_sigmas,
    check_noise_constants,
    check_num_inference_steps,
    check_one_schedule_source,
)

__all__ = ["EDMHeunScheduler", "EDMHeunSchedulerOutput"]


@dataclass
class EDMHeunSchedulerOutput(DenoisingStepOutput):
    """prev_sample: after a predictor call, the Euler point x' to evaluate the model at next; after a corrector call
    (or the final Euler step), the sample at t_{j+1}.
    denoised: D(x, sigma) = c_skip x + c_out F at the point and level of this model evaluation (also readable as
    ``pred_original_sample``, the name of diffusers' EDM scheduler outputs)."""


class EDMHeunScheduler(SigmaScheduleMixin, SchedulerMixin, ConfigMixin):
    """Deterministic EDM Heun sampling (Algorithm 2, S_churn = 0) on the Karras schedule (eq. 5) ending in 0.

    Args:
        sigma_min (`float`, defaults to 0.002), sigma_max (`float`, defaults to 80.0), rho (`float`, defaults to
            7.0): the schedule t_i of eq. 5 for ``set_timesteps(num_inference_steps)``.
        sigma_data (`float`, defaults to 0.5): the preconditioning constant of the model (Table 1).
    """

    _compatibles = ["EDMEulerScheduler", "EDMDPMSolverMultistepScheduler"]  # see the module docstring
    order = 2

    @register_to_config
    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, sigma_data: float = 0.5,
                 rho: float = 7.0):
        check_noise_constants(sigma_min, sigma_max, sigma_data, rho)
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
        source = check_one_schedule_source(num_inference_steps=num_inference_steps, sigmas=sigmas)
        if source == "num_inference_steps":
            full = edm_sigmas(check_num_inference_steps(num_inference_steps), cfg.sigma_min, cfg.sigma_max, cfg.rho)
        else:
            levels = torch.as_tensor(sigmas, dtype=torch.float64).flatten().cpu()
            if len(levels) and levels[-1] == 0:
                levels = levels[:-1]
            levels = check_descending_sigmas(levels, 0.0, hint=" (an optional final 0 aside; e.g. "
                                                               "sigmas=[80.0, 10.0, 1.0, 0.1])")
            full = torch.cat([levels, levels.new_zeros(1)])
        n = len(full) - 1
        self.num_inference_steps = n
        #: the N + 1 step levels t_0 > ... > t_N = 0 (float64, CPU)
        self.sigmas = full
        #: the level of every model evaluation: t_0, then t_1..t_{N-1} twice each (corrector of step j, predictor
        #: of step j + 1)
        self.evaluation_sigmas = torch.cat([full[:1], full[1:n].repeat_interleave(2)])
        self.timestep_sigmas = self.evaluation_sigmas
        self.timesteps = noise_conditioning(self.evaluation_sigmas).to(device=device, dtype=torch.float32)
        self._reset_step_index()
        self._derivative: torch.Tensor | None = None
        self._start_sample: torch.Tensor | None = None

    @property
    def init_noise_sigma(self) -> float:
        """The first level t_0: unit-variance latents are multiplied by it."""
        return float(self.sigmas[0])

    @property
    def state_in_first_order(self) -> bool:
        """True when the next ``step`` is a predictor (a new Heun step begins), False before a corrector."""
        return self._derivative is None

    def __len__(self) -> int:
        """The number of model evaluations of the current schedule, 2N - 1 (this continuous-time scheduler has no
        ``num_train_timesteps`` grid, the length of diffusers' schedulers)."""
        return len(self.timesteps)

    # -- the model interface --------------------------------------------------------------------------------------
    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor | None,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> EDMHeunSchedulerOutput | tuple:
        """One model evaluation's worth of Algorithm 2: a predictor (Euler) or corrector (trapezoidal) update.

        ``model_output`` is the raw F(c_in x, c_noise) at ``sample``; the denoised estimate is
        D = c_skip x + c_out F. ``timestep``: a value of ``timesteps`` (it locates the evaluation when none is in
        progress; None: the current one). ``generator`` is accepted so that a pipeline can pass the same arguments
        to every scheduler; this sampler draws no noise. Returns ``(prev_sample, denoised)``.
        """
        if model_output.shape != sample.shape:
            raise ValueError(f"model_output shape {tuple(model_output.shape)} != sample shape {tuple(sample.shape)}.")
        k = self._current_step_index(timestep)
        j, predictor = k // 2, k % 2 == 0
        if not predictor and self._derivative is None:
            raise ValueError(f"model evaluation {k} is the corrector of Heun step {j} and needs its predictor: start "
                             f"a run at an even index of `timesteps` (set_begin_index({k - 1}) or {k + 1}).")
        sigma_eval = self.evaluation_sigmas[k]
        c_skip, c_out = edm_scalings(sigma_eval, self.config.sigma_data)
        denoised = c_skip.to(sample.dtype) * sample + c_out.to(sample.dtype) * model_output
        sigma, sigma_next = self.sigmas[j], self.sigmas[j + 1]
        if predictor:  # lines 7-8
            d = ode_derivative(sample, denoised, sigma)
            prev_sample = euler_step(sample, d, sigma, sigma_next)
            # line 9: a corrector follows unless this step ends at t_N = 0
            self._derivative, self._start_sample = (d, sample) if sigma_next > 0 else (None, None)
        else:  # corrector, lines 10-11
            d_next = ode_derivative(sample, denoised, sigma_next)
            prev_sample = heun_correct(self._start_sample, self._derivative, d_next, sigma, sigma_next)
            self._derivative = self._start_sample = None
        self._step_index = k + 1
        if not return_dict:
            return prev_sample, denoised
        return EDMHeunSchedulerOutput(prev_sample=prev_sample, denoised=denoised)
