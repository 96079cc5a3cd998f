"""CTMPipeline: sampling from a Consistency Trajectory Model (Kim et al., ICLR 2024) with gamma-sampling or with
score-based EDM Heun sampling through the student's denoiser g(x, t, t) (sony/ctm ``cm/sample_util.py``)."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from diffusers import ImagePipelineOutput
from diffusers.utils import replace_example_docstring

from gensample.core.parametrization import TrajectoryFunction, noise_conditioning
from gensample.core.sampling import check_gamma, heun_solve
from gensample.core.sigmas import edm_sigmas
from gensample.models.ctm_unet import CTMUNet2DModel
from gensample.schedulers.scheduling_ctm import CTMScheduler

from .input_checks import check_sampling_inputs, check_schedule_source
from .pipeline_utils import GensamplePipeline

__all__ = ["CTMPipeline"]

SAMPLERS = ("gamma", "heun")
#: callback_on_step_end(pipe, step, c_noise, tensors) -> replacement tensors
StepCallback = Callable[["CTMPipeline", int, torch.Tensor, dict], dict]

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from gensample.pipelines.pipeline_ctm import CTMPipeline

        >>> pipe = CTMPipeline.from_pretrained("runs/ctm/pipeline")
        >>> g = torch.Generator().manual_seed(0)
        >>> images = pipe(batch_size=16, num_inference_steps=1, generator=g).images  # NFE 1: G(x_T, T, sigma_min)
        >>> images = pipe(batch_size=16, num_inference_steps=4, gamma=0.3, generator=g).images  # gamma-sampling
        >>> images = pipe(batch_size=16, num_inference_steps=18, sampler="heun").images  # EDM Heun on g(x, t, t)
        ```
"""


class CTMPipeline(GensamplePipeline):
    r"""Image generation from a CTM trajectory function G(x, t, s) = (s/t) x + (1 - s/t) g(x, t, s),
    g = c_skip(t) x + c_out(t) F(c_in(t) x, c_noise(t), c_noise(s))
    (:class:`gensample.core.parametrization.TrajectoryFunction`).

    Two samplers (CTM sec. 4; sony/ctm ``cm/sample_util.py``):

    * ``sampler="gamma"`` (default): gamma-sampling with :class:`CTMScheduler`; n steps cost n network evaluations.
      gamma = 0 makes deterministic long jumps G(x, sigma_i, sigma_{i+1}), gamma = 1 is CM multistep sampling.
    * ``sampler="heun"``: score-based sampling, EDM's deterministic Heun sampler (Karras et al. 2022, Algorithm 2,
      S_churn = 0; :func:`gensample.core.sampling.heun_solve`) over the denoiser D(x, t) = g(x, t, t); n steps cost
      2n - 1 evaluations. ``gamma`` does not apply.

    Components:
        unet ([`CTMUNet2DModel`]): the backbone F(x, c_noise(t), s_timestep=c_noise(s)).
        scheduler ([`CTMScheduler`]): the sigma grid, gamma and the gamma-sampling step (no other scheduler serves
            the trajectory jump G(x, t, s)).
    """

    _scheduler_classes = (CTMScheduler,)

    def __init__(self, unet: CTMUNet2DModel, scheduler: CTMScheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @property
    def trajectory_function(self) -> TrajectoryFunction:
        """G(x, t, s) of this pipeline's UNet with the scheduler's sigma_data (the very function the samplers use)."""
        return TrajectoryFunction(self.unet, sigma_data=self.scheduler.config.sigma_data)

    def check_inputs(self, batch_size: int, num_inference_steps: int, timesteps: Sequence[int] | None,
                     sigmas: Sequence[float] | None, gamma: float | None, sampler: str, latents: torch.Tensor | None,
                     generator: torch.Generator | list[torch.Generator] | None, output_type: str,
                     callback_on_step_end_tensor_inputs: list[str] | None, class_labels: Any) -> None:
        """Raise a ValueError that says the fix for any invalid argument of :meth:`__call__`."""
        if sampler not in SAMPLERS:
            raise ValueError(f"`sampler` must be one of {SAMPLERS}, got {sampler!r}.")
        check_schedule_source(num_inference_steps, timesteps, sigmas, self.scheduler)
        if sampler == "heun":
            if gamma is not None:
                raise ValueError("`gamma` applies to sampler='gamma' only; sampler='heun' is deterministic. Drop "
                                 "`gamma` or use sampler='gamma'.")
            if timesteps is not None:
                raise ValueError("`timesteps` (grid indices) apply to sampler='gamma' only; pass `sigmas` or "
                                 "`num_inference_steps` for sampler='heun'.")
        elif gamma is not None:
            check_gamma(gamma)
        check_sampling_inputs(self, batch_size, self.latent_shape, latents, generator, output_type,
                              callback_on_step_end_tensor_inputs, class_labels)

    def _heun_sigmas(self, num_inference_steps: int, sigmas: Sequence[float] | None) -> torch.Tensor:
        """EDM's schedule ending in 0: eq. 5 on the scheduler's (sigma_min, sigma_max, rho), or ``sigmas`` + [0]."""
        cfg = self.scheduler.config
        if sigmas is None:
            return edm_sigmas(num_inference_steps, cfg.sigma_min, cfg.sigma_max, cfg.rho)
        levels = torch.as_tensor(sigmas, dtype=torch.float64).flatten()
        if len(levels) and levels[-1] == 0:
            levels = levels[:-1]
        if len(levels) == 0 or (levels[1:] >= levels[:-1]).any() or (levels <= 0).any() \
                or not torch.isfinite(levels).all():
            raise ValueError(f"`sigmas` must be non-empty, finite, strictly descending and > 0 (an optional final 0 "
                             f"aside), got {list(sigmas)}; e.g. sigmas=[80.0, 10.0, 1.0, 0.1].")
        return torch.cat([levels, levels.new_zeros(1)])

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        batch_size: int = 1,
        num_inference_steps: int = 1,
        timesteps: Sequence[int] | None = None,
        sigmas: Sequence[float] | None = None,
        gamma: float | None = None,
        sampler: str = "gamma",
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        class_labels: torch.Tensor | int | list[int] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: StepCallback | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
    ) -> ImagePipelineOutput | tuple:
        r"""Generate images.

        Args:
            batch_size (`int`, defaults to 1): number of images.
            num_inference_steps (`int`, defaults to 1): gamma-sampling jumps n (NFE n; the n + 1 point Karras grid
                from sigma_max to sigma_min), or Heun steps (NFE 2n - 1); ignored if `timesteps`/`sigmas` given.
            timesteps (`list[int]`, *optional*, gamma sampler only): indices into the scheduler's
                `num_train_timesteps`-point grid (0 = sigma_max), e.g. `[0, 9]` with N = 18.
            sigmas (`list[float]`, *optional*): explicit descending levels, e.g. `[80.0, 2.0]` (gamma: sigma_min is
                appended as the end point; heun: 0 is appended).
            gamma (`float`, *optional*): gamma-sampling noise in [0, 1]; None uses the scheduler's config gamma.
            sampler (`str`, defaults to "gamma"): "gamma" (CTM gamma-sampling) or "heun" (EDM Heun on g(x, t, t)).
            generator (`torch.Generator` or list, *optional*): for reproducible noise (one per image if a list).
            latents (`torch.Tensor`, *optional*): unit-variance starting noise; scaled by the first level here.
            class_labels (*optional*): labels for a class-conditional UNet; drawn from `generator` if omitted.
            output_type (`str`, defaults to "pil"): "pil", "np" (NHWC float in [0, 1]), "pt" (NCHW in [0, 1]) or
                "latent" (the final state, NCHW, not clamped or post-processed).
            return_dict (`bool`, defaults to True): return an [`ImagePipelineOutput`] rather than the tuple
                `(images,)`.
            callback_on_step_end (`Callable`, *optional*): `fn(pipe, i, t, callback_kwargs) -> dict` after each step
                (`t` is c_noise of the step's level); `callback_kwargs` holds the tensors named in
                `callback_on_step_end_tensor_inputs` ("latents": the state after the step, "denoised": G(x, t, s)
                for gamma, the denoiser output g(x, t, t) at the step's start for heun); a returned "latents"
                replaces the state.
            callback_on_step_end_tensor_inputs (`list[str]`, defaults to `["latents"]`): names from
                `_callback_tensor_inputs`.

        Examples:

        Returns:
            [`ImagePipelineOutput`] or `tuple` with the images (the final state clamped to [-1, 1], mapped to [0, 1]).
        """
        callback_on_step_end_tensor_inputs = self.callback_tensor_names(callback_on_step_end,
                                                                        callback_on_step_end_tensor_inputs)
        # 1. Check inputs
        self.check_inputs(batch_size, num_inference_steps, timesteps, sigmas, gamma, sampler, latents, generator,
                          output_type, callback_on_step_end_tensor_inputs, class_labels)

        if sampler == "gamma":
            # 2.-5. Noise levels and gamma, latents at sigma_0, class labels, gamma-sampling (F at (sigma_i, s_i),
            #       then CTMScheduler.step: jump + re-noise)
            latents = self.sample_latents(batch_size, num_inference_steps, timesteps, sigmas, generator, latents,
                                          class_labels, callback_on_step_end, callback_on_step_end_tensor_inputs,
                                          gamma=gamma)
        else:
            # 2. The Heun levels, ending in 0
            heun_sigmas = self._heun_sigmas(num_inference_steps, sigmas)
            # 3. Prepare latents at the first level
            device = self._execution_device
            latents = self.prepare_latents((batch_size, *self.latent_shape), self.unet.dtype, device, generator,
                                           latents, float(heun_sigmas[0]))
            # 4. Class labels
            class_labels = self.prepare_class_labels(batch_size, class_labels, generator, device)
            # 5. EDM Heun on g(x, t, t)
            latents = self._heun_loop(latents, heun_sigmas, class_labels, callback_on_step_end,
                                      callback_on_step_end_tensor_inputs)

        # 6. Post-process: the final state is the sample (at sigma_min for gamma, at 0 for heun)
        image = self.postprocess(latents, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)

    def unet_step_kwargs(self, i: int) -> dict:
        """Gamma-sampling evaluates F(c_in x, c_noise(sigma_i), s_timestep=c_noise(s_i)) at step ``i``."""
        return {"s_timestep": self.scheduler.s_timesteps[i]}

    def _heun_loop(self, latents: torch.Tensor, sigmas: torch.Tensor, class_labels: torch.Tensor | None,
                   callback: StepCallback | None, names: list[str]) -> torch.Tensor:
        """EDM Heun (Algorithm 2, S_churn = 0) over D(x, t) = g(x, t, t), one :func:`heun_solve` call per step so
        that a callback can replace the state between steps."""
        denoiser = self.trajectory_function.denoise
        extra_args = {"class_labels": class_labels} if class_labels is not None else {}
        seen: dict = {}
        self._num_timesteps = len(sigmas) - 1
        with self.progress_bar(total=self._num_timesteps) as progress_bar:
            for i in range(self._num_timesteps):
                latents = heun_solve(denoiser, latents, sigmas[i:i + 2], extra_args=extra_args,
                                     callback=seen.update)
                t = noise_conditioning(sigmas[i]).to(torch.float32)  # c_noise(sigma_i), as the gamma loop passes
                latents = self.run_callback(callback, i, t, names, latents=latents, denoised=seen["denoised"])
                progress_bar.update()
        return latents
