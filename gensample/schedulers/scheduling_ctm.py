"""CTMScheduler: CTM's gamma-sampling (Kim et al., ICLR 2024, "Consistency Trajectory Models", sec. 4 / Algorithm
"gamma-sampling"; sony/ctm ``cm/sample_util.py`` ``sample_exact``, ``sample_gamma_multistep``, ``sample_multistep``)
as a diffusers scheduler over the trajectory function G(x, t, s) of :mod:`gensample.core.parametrization`.

For sampling levels sigma_0 > sigma_1 > ... > sigma_{n-1} and sigma_n = sigma_min, step i is (reference sec. 1.7)

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

Differences from diffusers' ``CMStochasticIterativeScheduler`` (besides gamma): ``step`` returns
``(prev_sample, denoised)`` with ``denoised`` = G(x, t, s); ``set_timesteps(num_inference_steps=n)`` uses CTM's rule
(the n + 1 point Karras grid from sigma_max to sigma_min, sony/ctm ``karras_sample``) instead of sub-sampling a
training grid (pass ``timesteps`` for indices into the N-point grid); the step index is a counter reset by
``set_timesteps``.
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
from ..core.sigmas import karras_sigma_at_descending_index, karras_sigmas
from ..kernels import CTMStepCoefficients, ctm_gamma_step, scale_model_input

__all__ = ["CTMScheduler", "CTMSchedulerOutput", "check_gamma"]


@dataclass
class CTMSchedulerOutput(BaseOutput):
    """prev_sample: x at the next sampling level sigma_{i+1} (the final sample after the last step).
    denoised: G(x, sigma_i, s_i), the jump target before re-noising (at level s_i; = the clean estimate at
    sigma_min when gamma = 1 or on the last step)."""

    prev_sample: torch.Tensor
    denoised: torch.Tensor


class CTMScheduler(SchedulerMixin, ConfigMixin):
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
        if not isinstance(num_train_timesteps, int) or num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be an integer >= 2, got {num_train_timesteps!r}.")
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}.")
        if sigma_data <= 0 or rho <= 0:
            raise ValueError(f"sigma_data and rho must be > 0, got sigma_data={sigma_data}, rho={rho}.")
        check_gamma(gamma)
        self.num_inference_steps: int | None = None
        self._step_index: int | None = None
        self._begin_index: int | None = None
        self.set_timesteps(1)

    # -- state ----------------------------------------------------------------------------------------------------
    @property
    def step_index(self) -> int | None:
        """Steps taken since ``set_timesteps`` (None before the first ``scale_model_input`` / ``step``)."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start sampling at step ``begin_index`` of the schedule (e.g. for image-to-image)."""
        self._begin_index = begin_index

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
        given = [a is not None for a in (num_inference_steps, timesteps, sigmas)]
        if sum(given) != 1:
            raise ValueError("Pass exactly one of `num_inference_steps`, `timesteps` or `sigmas` to set_timesteps.")
        gamma = check_gamma(cfg.gamma if gamma is None else gamma)
        if num_inference_steps is not None:
            if not isinstance(num_inference_steps, int) or isinstance(num_inference_steps, bool) \
                    or num_inference_steps < 1:
                raise ValueError(f"`num_inference_steps` must be an integer >= 1, got {num_inference_steps!r}.")
            grid = karras_sigmas(num_inference_steps + 1, cfg.sigma_min, cfg.sigma_max, cfg.rho).flip(0)
            sampling = grid[:-1].clone()
        elif timesteps is not None:
            idx = sorted(int(t) for t in timesteps)
            if not idx or len(set(idx)) != len(idx) or idx[0] < 0 or idx[-1] >= cfg.num_train_timesteps - 1:
                raise ValueError(
                    f"`timesteps` must be distinct grid indices in [0, {cfg.num_train_timesteps - 2}] (index "
                    f"{cfg.num_train_timesteps - 1} is sigma_min, the implicit end point: leave it out), got "
                    f"{list(timesteps)}."
                )
            sampling = torch.tensor([karras_sigma_at_descending_index(i, cfg.num_train_timesteps, cfg.sigma_min, cfg.sigma_max,
                                                           cfg.rho) for i in idx], dtype=torch.float64)
        else:
            sampling = torch.as_tensor(sigmas, dtype=torch.float64).flatten()
            if len(sampling) == 0 or (sampling[1:] >= sampling[:-1]).any() or not torch.isfinite(sampling).all():
                raise ValueError(f"`sigmas` must be non-empty, finite and strictly descending, got {list(sigmas)}; "
                                 "e.g. sigmas=[80.0, 2.0] for two steps.")
            if sampling.min() <= cfg.sigma_min or sampling.max() > cfg.sigma_max:
                raise ValueError(
                    f"`sigmas` must lie in (sigma_min, sigma_max] = ({cfg.sigma_min}, {cfg.sigma_max}], got "
                    f"{sampling.tolist()} (sigma_min is the implicit end point: leave it out)."
                )
        self.gamma = gamma
        self.num_inference_steps = len(sampling)
        #: n + 1 levels: the n sampling levels and the end point sigma_min (float64, CPU)
        self.sigmas = torch.cat([sampling, sampling.new_tensor([cfg.sigma_min])])
        #: per-step scalars of the jump and re-noise, from the kernels' float64 host computation
        self.step_coefficients: list[CTMStepCoefficients] = [
            CTMStepCoefficients.from_sigmas(self.sigmas[i], self.sigmas[i + 1], gamma, cfg.sigma_data, cfg.sigma_min)
            for i in range(self.num_inference_steps)
        ]
        #: the jump targets s_i = sqrt(1 - gamma^2)(sigma_{i+1} - sigma_min) + sigma_min (float64, CPU)
        self.jump_sigmas = torch.tensor([c.s for c in self.step_coefficients], dtype=torch.float64)
        self.timesteps = noise_conditioning(sampling).to(device=device, dtype=torch.float32)
        self.s_timesteps = noise_conditioning(self.jump_sigmas).to(device=device, dtype=torch.float32)
        self._step_index = None
        self._begin_index = None

    def _index(self) -> int:
        if self._step_index is None:
            self._step_index = self._begin_index or 0
        if self._step_index >= self.num_inference_steps:
            raise ValueError(f"all {self.num_inference_steps} steps of the schedule are done; call set_timesteps() "
                             "to start a new sampling run.")
        return self._step_index

    def jump_target(self, step_index: int | None = None) -> torch.Tensor:
        """s_i of step ``step_index`` (default: the current step) in sigma space, a float64 0-d tensor. The model is
        evaluated as F(c_in(sigma_i) x, c_noise(sigma_i), c_noise(s_i)); ``s_timesteps[i]`` holds c_noise(s_i)."""
        i = self._index() if step_index is None else int(step_index)
        if not 0 <= i < self.num_inference_steps:
            raise ValueError(f"step_index must be in [0, {self.num_inference_steps - 1}], got {step_index!r}.")
        return self.jump_sigmas[i]

    def s_timestep(self, step_index: int | None = None) -> torch.Tensor:
        """c_noise(s_i) = 250 ln(s_i) of step ``step_index`` (default: the current step): the value to pass as the
        model's ``s_timestep``."""
        i = self._index() if step_index is None else int(step_index)
        if not 0 <= i < self.num_inference_steps:
            raise ValueError(f"step_index must be in [0, {self.num_inference_steps - 1}], got {step_index!r}.")
        return self.s_timesteps[i]

    # -- the model interface --------------------------------------------------------------------------------------
    def scale_model_input(self, sample: torch.Tensor, timestep: float | torch.Tensor | None = None) -> torch.Tensor:
        """c_in(sigma_i) x = x / sqrt(sigma_i^2 + sigma_data^2) for the current step."""
        return scale_model_input(sample, self.sigmas[self._index()], self.config.sigma_data)

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
        step). ``timestep`` is accepted for API compatibility; the position is a counter. Returns
        ``(prev_sample, denoised)`` with denoised = G(x, sigma_i, s_i).
        """
        i = self._index()
        if model_output.shape != sample.shape:
            raise ValueError(f"model_output shape {tuple(model_output.shape)} != sample shape {tuple(sample.shape)}; "
                             "pass the network output for this very sample.")
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
        return CTMSchedulerOutput(prev_sample=prev_sample, denoised=denoised)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor,
                  sigmas: torch.Tensor | float) -> torch.Tensor:
        """x_sigma = x_0 + sigma z for any sigma (scalar or one per sample)."""
        sigmas = torch.as_tensor(sigmas, device=original_samples.device, dtype=original_samples.dtype)
        if sigmas.ndim == 1:
            sigmas = sigmas.reshape(-1, *([1] * (original_samples.ndim - 1)))
        return original_samples + sigmas * noise

    def __len__(self) -> int:
        return self.config.num_train_timesteps

