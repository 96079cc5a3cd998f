"""CTMScheduler: CTM's gamma-sampling (Kim et al., ICLR 2024, "Consistency Trajectory Models", sec. 4 / Algorithm
"gamma-sampling"; sony/ctm ``cm/sample_util.py`` ``sample_exact``, ``sample_gamma_multistep``, ``sample_multistep``)
as a diffusers scheduler over the trajectory function G(x, t, s) of :mod:`gensample.core.parametrization`.

For sampling levels sigma_0 > sigma_1 > ... > sigma_{n-1} and sigma_n = sigma_min, step i is (``sample_gamma_multistep``)

    s_i    = sqrt(1 - gamma^2) (sigma_{i+1} - sigma_min) + sigma_min       (jump target; the model's 2nd time input)
    x~     = G(x, sigma_i, s_i) = (s_i/sigma_i) x + (1 - s_i/sigma_i) g(x, sigma_i, s_i)
    x      = x~ + sqrt(sigma_{i+1}^2 - s_i^2) z                            (no noise on the final step: s = sigma_min)

* gamma = 0 ("sample_exact"): s_i = sigma_{i+1}, deterministic long jumps along the ODE trajectory; no noise drawn.
* gamma = 1 ("cm_multistep"): s_i = sigma_min, i.e. CM multistep sampling (CM Algorithm 1) with G(x, t, sigma_min)
  as the consistency function; ``tests/test_ctm.py`` checks it reproduces :class:`ConsistencyScheduler` samples.
* the paper's Algorithm writes s = sqrt(1 - gamma^2) t_{n+1}; the code (and this scheduler) lerps towards sigma_min
  so that the last step still lands on sigma_min.

The step math is not re-derived here: :meth:`CTMScheduler.set_timesteps` takes each step's s and re-noise std from
:class:`gensample.kernels.CTMStepCoefficients` (float64, :func:`gensample.kernels.ctm_jump_target`), and
:meth:`CTMScheduler.step` calls :func:`gensample.kernels.ctm_gamma_step` (fused Triton kernel on CUDA, the PyTorch
reference elsewhere).

Usage (what :class:`gensample.pipelines.pipeline_ctm.CTMPipeline` does)::

    scheduler.set_timesteps(4, gamma=0.3)
    for i, t in enumerate(scheduler.timesteps):
        F = unet(scheduler.scale_model_input(x, t), t, s_timestep=scheduler.s_timesteps[i]).sample
        x, G = scheduler.step(F, t, x, generator=generator, return_dict=False)

The timestep protocol is diffusers' (:mod:`gensample.schedulers.sigma_schedule`): ``timesteps`` are the model
inputs c_noise(sigma_i) = 250 ln(sigma_i), ``add_noise`` takes values of ``timesteps``, and ``scale_model_input`` /
``step`` locate their index from the timestep they are given, so a loop may start mid-schedule (the model's second
input is then ``s_timesteps[scheduler.step_index]``, or :meth:`CTMScheduler.s_timestep` after
``scale_model_input``).

Differences from diffusers' ``CMStochasticIterativeScheduler`` (besides gamma): ``step`` returns
``(prev_sample, denoised)`` with ``denoised`` = G(x, t, s); ``set_timesteps(num_inference_steps=n)`` uses CTM's rule
(the n + 1 point Karras grid from sigma_max to sigma_min, sony/ctm ``karras_sample``) instead of sub-sampling a
training grid (pass ``timesteps`` for indices into the N-point grid).

``_compatibles`` is empty: no consistency-family scheduler can drive a CTM model or be driven by this one. diffusers'
``CMStochasticIterativeScheduler`` and :class:`ConsistencyScheduler` combine the network output with CM's boundary
scalings c_skip/c_out(sigma - sigma_min) and never pass the jump target s, while CTM's G(x, t, s) needs the
network evaluated at (t, s) and combined with EDM scalings and the s/t interpolation; conversely this scheduler
applied to a CM model would read its output as g(x, t, s). Even gamma = 1 (CM multistep sampling) needs a CTM model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from diffusers import ConfigMixin, SchedulerMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from ..core.parametrization import noise_conditioning
from ..core.sampling import check_gamma
from ..core.sigmas import karras_sigmas
from ..kernels import CTMStepCoefficients, ctm_gamma_step
from .sigma_schedule import (
    SigmaScheduleMixin,
    check_descending_sigmas,
    check_noise_constants,
    check_num_inference_steps,
    check_one_schedule_source,
    karras_grid_sigmas,
)

__all__ = ["CTMScheduler", "CTMSchedulerOutput", "check_gamma"]


@dataclass
class CTMSchedulerOutput(BaseOutput):
    """prev_sample: x at the next sampling level sigma_{i+1} (the final sample after the last step).
    denoised: G(x, sigma_i, s_i), the jump target before re-noising (at level s_i; = the clean estimate at
    sigma_min when gamma = 1 or on the last step).
    pred_original_sample: the clean estimate G(x, sigma_i, sigma_min) when this step jumps to s_i = sigma_min (then
    the same tensor as ``denoised``), None otherwise: at s_i > sigma_min the step has no clean estimate (it would
    take another network evaluation at s = sigma_min)."""

    prev_sample: torch.Tensor
    denoised: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


class CTMScheduler(SigmaScheduleMixin, SchedulerMixin, ConfigMixin):
    """CTM gamma-sampling on a Karras sigma grid.

    Args:
        num_train_timesteps (`int`, defaults to 18): points N of the descending Karras grid that ``timesteps``
            indices refer to (index 0 = sigma_max, N-1 = sigma_min); CTM's CIFAR-10 grid has N = 18.
        sigma_min (`float`, 0.002), sigma_max (`float`, 80.0), sigma_data (`float`, 0.5), rho (`float`, 7.0): EDM
            constants (the G parametrization uses EDM scalings with sigma_data).
        gamma (`float`, defaults to 0.0): the default gamma in [0, 1] (0 = deterministic long jumps, sony/ctm's
            default "exact" sampler; 1 = CM multistep); ``set_timesteps(..., gamma=...)`` overrides it per run.
        clip_denoised (`bool`, defaults to False): clamp g = c_skip x + c_out F to [-1, 1] before the jump (CTM
            clamps only the final output, which the pipeline does).
    """

    _compatibles: list[str] = []  # see the module docstring
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 18,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        sigma_data: float = 0.5,
        rho: float = 7.0,
        gamma: float = 0.0,
        clip_denoised: bool = False,
    ):
        check_noise_constants(sigma_min, sigma_max, sigma_data, rho, num_train_timesteps)
        check_gamma(gamma)
        self.num_inference_steps: int | None = None
        self.set_timesteps(1)

    @property
    def init_noise_sigma(self) -> float:
        """The first sampling level sigma_0: unit-variance latents are multiplied by it."""
        return float(self.sigmas[0])

    # -- schedule -------------------------------------------------------------------------------------------------
    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: Sequence[int] | None = None,
        sigmas: Sequence[float] | None = None,
        gamma: float | None = None,
    ) -> None:
        """Choose the sampling levels and gamma.

        Exactly one of:

        * ``num_inference_steps`` = n >= 1: CTM's schedule (sony/ctm ``karras_sample``): the n + 1 point Karras grid
          from sigma_max to sigma_min; the n jumps start at its first n points and the last lands on sigma_min
          (n = 1 is the one-step G(sigma_max z, sigma_max, sigma_min));
        * ``timesteps``: distinct indices into the ``num_train_timesteps``-point descending grid (0 = sigma_max),
          in any order, without the final index (sigma_min is the implicit end point);
        * ``sigmas``: explicit strictly descending levels in (sigma_min, sigma_max].

        ``gamma`` in [0, 1] (None: the config's ``gamma``). Sets ``timesteps`` (c_noise(sigma_i), float32),
        ``s_timesteps`` (c_noise(s_i), float32, the model's second time input), ``sigmas`` (n + 1 levels ending in
        sigma_min, float64) and ``jump_sigmas`` (the n jump targets s_i, float64).
        """
        cfg = self.config
        source = check_one_schedule_source(num_inference_steps=num_inference_steps, timesteps=timesteps,
                                           sigmas=sigmas)
        gamma = check_gamma(cfg.gamma if gamma is None else gamma)
        if source == "num_inference_steps":
            n = check_num_inference_steps(num_inference_steps)
            grid = karras_sigmas(n + 1, cfg.sigma_min, cfg.sigma_max, cfg.rho).flip(0)
            sampling = grid[:-1].clone()
        elif source == "timesteps":
            sampling = karras_grid_sigmas(timesteps, cfg.num_train_timesteps, cfg.sigma_min, cfg.sigma_max, cfg.rho)
        else:
            sampling = check_descending_sigmas(sigmas, cfg.sigma_min, cfg.sigma_max,
                                               hint=" (sigma_min is the implicit end point: leave it out; e.g. "
                                                    "sigmas=[80.0, 2.0] for two steps)")
        self.gamma = gamma
        self.num_inference_steps = len(sampling)
        #: n + 1 levels: the n sampling levels and the end point sigma_min (float64, CPU)
        self.sigmas = torch.cat([sampling, sampling.new_tensor([cfg.sigma_min])])
        #: the level of each entry of ``timesteps`` (the first n entries of ``sigmas``)
        self.timestep_sigmas = self.sigmas[:-1]
        #: per-step scalars of the jump and re-noise, from the kernels' float64 host computation
        self.step_coefficients: list[CTMStepCoefficients] = [
            CTMStepCoefficients.from_sigmas(self.sigmas[i], self.sigmas[i + 1], gamma, cfg.sigma_data, cfg.sigma_min)
            for i in range(self.num_inference_steps)
        ]
        #: the jump targets s_i = sqrt(1 - gamma^2)(sigma_{i+1} - sigma_min) + sigma_min (float64, CPU)
        self.jump_sigmas = torch.tensor([c.s for c in self.step_coefficients], dtype=torch.float64)
        self.timesteps = noise_conditioning(sampling).to(device=device, dtype=torch.float32)
        self.s_timesteps = noise_conditioning(self.jump_sigmas).to(device=device, dtype=torch.float32)
        self._reset_step_index()

    def jump_target(self, step_index: int | None = None) -> torch.Tensor:
        """s_i of step ``step_index`` (default: the current step) in sigma space, a float64 0-d tensor. The model is
        evaluated as F(c_in(sigma_i) x, c_noise(sigma_i), c_noise(s_i)); ``s_timesteps[i]`` holds c_noise(s_i)."""
        return self.jump_sigmas[self._check_step(step_index)]

    def s_timestep(self, step_index: int | None = None) -> torch.Tensor:
        """c_noise(s_i) = 250 ln(s_i) of step ``step_index`` (default: the current step): the value to pass as the
        model's ``s_timestep``."""
        return self.s_timesteps[self._check_step(step_index)]

    def _check_step(self, step_index: int | None) -> int:
        i = self._current_step_index() if step_index is None else int(step_index)
        if not 0 <= i < self.num_inference_steps:
            raise ValueError(f"step_index must be in [0, {self.num_inference_steps - 1}], got {step_index!r}.")
        return i

    # -- the model interface --------------------------------------------------------------------------------------
    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor | None,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
    ) -> CTMSchedulerOutput | tuple:
        """One gamma-sampling step: G(x, sigma_i, s_i) from the network output F = F(c_in x, c_noise(sigma_i),
        c_noise(s_i)), then re-noise to sigma_{i+1} with std sqrt(sigma_{i+1}^2 - s_i^2).

        Fresh noise is drawn from ``generator`` only when that std is > 0 (never for gamma = 0, never on the final
        step). ``timestep``: a value of ``timesteps`` (it locates the step when none is in progress; None: the
        current step). Returns ``(prev_sample, denoised)`` with denoised = G(x, sigma_i, s_i); the output object
        also carries ``pred_original_sample`` on steps that jump to sigma_min.
        """
        if model_output.shape != sample.shape:
            raise ValueError(f"model_output shape {tuple(model_output.shape)} != sample shape {tuple(sample.shape)}; "
                             "pass the network output for this very sample.")
        i = self._current_step_index(timestep)
        coefficients = self.step_coefficients[i]
        noise = None
        if coefficients.std > 0.0:
            noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
        prev_sample, denoised = ctm_gamma_step(
            model_output, sample, self.sigmas[i], self.sigmas[i + 1], self.gamma, noise, self.config.sigma_data,
            self.config.sigma_min, self.config.clip_denoised,
        )
        self._step_index = i + 1
        if not return_dict:
            return prev_sample, denoised
        clean = denoised if coefficients.s == self.config.sigma_min else None
        return CTMSchedulerOutput(prev_sample=prev_sample, denoised=denoised, pred_original_sample=clean)
