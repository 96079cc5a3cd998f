"""EDMPipeline: deterministic EDM Heun sampling (Karras et al. 2022, Algorithm 2 with S_churn = 0) from an EDM
denoiser D(x, sigma) = c_skip x + c_out F(c_in x, c_noise), e.g. the teacher that CTM distills; diffusers' EDM
schedulers (Euler, DPM-Solver++) sample the same denoiser."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from diffusers import EDMDPMSolverMultistepScheduler, EDMEulerScheduler, ImagePipelineOutput, UNet2DModel
from diffusers.utils import replace_example_docstring

from gensample.core.parametrization import noise_conditioning
from gensample.models.ctm_unet import CTMUNet2DModel
from gensample.schedulers.scheduling_edm_heun import EDMHeunScheduler

from .input_checks import check_sampling_inputs, check_schedule_source
from .pipeline_utils import GensamplePipeline

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from diffusers import EDMEulerScheduler
        >>> from gensample.pipelines.pipeline_edm import EDMPipeline

        >>> pipe = EDMPipeline.from_pretrained("runs/edm/pipeline")
        >>> images = pipe(batch_size=16, num_inference_steps=18, generator=torch.Generator().manual_seed(0)).images
        >>> images = pipe(batch_size=16, sigmas=[80.0, 10.0, 1.0, 0.1]).images  # explicit 4-step schedule (NFE 7)
        >>> pipe.scheduler = EDMEulerScheduler.from_config(pipe.scheduler.config)  # first order, NFE = steps
        >>> images = pipe(batch_size=16, num_inference_steps=36).images
        ```
"""

#: the noise conditionings c_noise(sigma) a UNet may be trained on (the value it receives as its timestep):
#: "250_ln_sigma" = 1000 * 0.25 ln(sigma), openai/consistency_models' form and gensample's
#: (:func:`gensample.core.parametrization.noise_conditioning`); "0.25_ln_sigma" = NVlabs/edm's form, which diffusers'
#: EDM schedulers put in their ``timesteps`` (``precondition_noise``)
NOISE_CONDITIONINGS = ("250_ln_sigma", "0.25_ln_sigma")
#: the accepted schedulers and the noise conditioning each one puts in ``scheduler.timesteps``
SCHEDULER_NOISE_CONDITIONING = {
    EDMHeunScheduler: "250_ln_sigma",
    EDMEulerScheduler: "0.25_ln_sigma",
    EDMDPMSolverMultistepScheduler: "0.25_ln_sigma",
}


class EDMPipeline(GensamplePipeline):
    r"""Image generation from an EDM denoiser. With its own [`EDMHeunScheduler`] ``num_inference_steps`` = N Heun
    steps cost 2N - 1 network evaluations (the last step, to sigma = 0, is a plain Euler step); diffusers'
    [`EDMEulerScheduler`] (N evaluations) and [`EDMDPMSolverMultistepScheduler`] (DPM-Solver++, N evaluations) sample
    the same denoiser on the same Karras schedule.

    Components:
        unet ([`UNet2DModel`] or [`gensample.models.ctm_unet.CTMUNet2DModel`]): the backbone F; receives
            c_in(sigma) x and c_noise(sigma). A CTM student's UNet is then the denoiser g(x, t, t).
        scheduler ([`EDMHeunScheduler`], [`EDMEulerScheduler`] or [`EDMDPMSolverMultistepScheduler`]): the noise
            levels, the EDM preconditioning and the update.

    Config:
        noise_conditioning (`str`, defaults to "250_ln_sigma"): the c_noise the UNet was trained on,
            "250_ln_sigma" (gensample's UNets; folders saved without this key) or "0.25_ln_sigma" (NVlabs/edm's).
            When the scheduler's ``timesteps`` follow the other convention, the UNet gets c_noise of the scheduler's
            current sigma in its own convention: diffusers' EDM schedulers (0.25 ln sigma) serve a "250_ln_sigma"
            UNet that way. A "0.25_ln_sigma" UNet needs one of diffusers' EDM schedulers.
        num_classes (`int`, *optional*): K for a classifier-free-guidance model (``gensample train edm
            --class-conditional``): the UNet has K + 1 class embeddings and label K is the null label. Random labels
            are drawn from 0..K-1 and `guidance_scale` w gives F_null + w (F_c - F_null) (Ho & Salimans 2022, eq. 6;
            the same combination of the denoisers D, which are affine in F). None: no guidance.
    """

    _scheduler_classes = tuple(SCHEDULER_NOISE_CONDITIONING)

    def __init__(self, unet: UNet2DModel | CTMUNet2DModel,
                 scheduler: EDMHeunScheduler | EDMEulerScheduler | EDMDPMSolverMultistepScheduler,
                 noise_conditioning: str = "250_ln_sigma", num_classes: int | None = None):
        super().__init__()
        if noise_conditioning not in NOISE_CONDITIONINGS:
            raise ValueError(f"`noise_conditioning` must be one of {NOISE_CONDITIONINGS} (the c_noise the UNet was "
                             f"trained on), got {noise_conditioning!r}.")
        embeds = unet.config.num_class_embeds if unet is not None else None
        if num_classes is not None and embeds != int(num_classes) + 1:
            raise ValueError(f"`num_classes`={num_classes} needs a UNet with num_class_embeds={int(num_classes) + 1} "
                             f"(the last label is the null label of classifier-free guidance), got {embeds}.")
        self.register_to_config(noise_conditioning=noise_conditioning, num_classes=num_classes)
        self._guidance_scale = 1.0
        self.register_modules(unet=unet, scheduler=scheduler)

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale != 1.0

    def model_output(self, model_input: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor | None,
                     **kwargs) -> torch.Tensor:
        """F(x, c), or with guidance F_null + w (F_c - F_null) from one batched call on (c, null)."""
        if not self.do_classifier_free_guidance:
            return super().model_output(model_input, timestep, class_labels, **kwargs)
        null = torch.full_like(class_labels, self.config.num_classes)
        both = self.unet(torch.cat([model_input, model_input]), timestep, class_labels=torch.cat([class_labels, null]),
                         **kwargs, return_dict=False)[0]
        cond, uncond = both.chunk(2)
        return uncond + self._guidance_scale * (cond - uncond)

    def _scheduler_noise_conditioning(self, scheduler) -> str:
        return next(v for cls, v in SCHEDULER_NOISE_CONDITIONING.items() if isinstance(scheduler, cls))

    def check_scheduler(self, scheduler) -> None:
        """Accepted classes only; and a "0.25_ln_sigma" UNet only with a scheduler that feeds 0.25 ln(sigma)."""
        super().check_scheduler(scheduler)
        unet_convention = self.config.noise_conditioning
        if unet_convention != "250_ln_sigma" and self._scheduler_noise_conditioning(scheduler) != unet_convention:
            feeding = [c.__name__ for c, v in SCHEDULER_NOISE_CONDITIONING.items() if v == unet_convention]
            raise ValueError(f"This EDMPipeline's UNet takes noise_conditioning={unet_convention!r}, which "
                             f"{type(scheduler).__name__} does not feed; use one of {feeding}.")

    def unet_timestep(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` when the scheduler feeds the UNet's convention, else c_noise of the scheduler's current sigma (set by
        ``scale_model_input``) in the UNet's convention ("250_ln_sigma")."""
        if self._scheduler_noise_conditioning(self.scheduler) == self.config.noise_conditioning:
            return t
        sigma = self.scheduler.sigmas[self.scheduler.step_index]
        return noise_conditioning(sigma).to(device=t.device, dtype=torch.float32)

    def check_guidance_scale(self, guidance_scale: float) -> float:
        try:
            w = float(guidance_scale)
        except (TypeError, ValueError):
            raise ValueError(f"`guidance_scale` must be a number >= 0, got {guidance_scale!r}.") from None
        if not (w >= 0 and w < float("inf")):
            raise ValueError(f"`guidance_scale` must be a finite number >= 0, got {guidance_scale!r}.")
        if w != 1.0 and self.config.num_classes is None:
            raise ValueError(f"`guidance_scale`={guidance_scale} needs a classifier-free-guidance model (a pipeline "
                             "with `num_classes`, trained with `gensample train edm --class-conditional "
                             "--label-dropout p`); this one has no null label. Use guidance_scale=1.")
        return w

    def check_inputs(self, batch_size, num_inference_steps, sigmas, latents, generator, output_type,
                     callback_on_step_end_tensor_inputs, class_labels):
        check_schedule_source(num_inference_steps, None, sigmas, self.scheduler)
        if sigmas is not None and not isinstance(self.scheduler, EDMHeunScheduler):
            raise ValueError(
                f"`sigmas` (noise levels) need EDMHeunScheduler; {type(self.scheduler).__name__}.set_timesteps reads "
                "`sigmas` as positions in [0, 1] on its Karras ramp, not as noise levels. Pass `num_inference_steps`."
            )
        check_sampling_inputs(self, batch_size, self.latent_shape, latents, generator, output_type,
                              callback_on_step_end_tensor_inputs, class_labels)

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        batch_size: int = 1,
        num_inference_steps: int = 18,
        sigmas: Sequence[float] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        class_labels: torch.Tensor | int | list[int] | None = None,
        guidance_scale: float = 1.0,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[["EDMPipeline", int, torch.Tensor, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
    ) -> ImagePipelineOutput | tuple:
        r"""Generate images.

        Args:
            batch_size (`int`, defaults to 1): number of images.
            num_inference_steps (`int`, defaults to 18): steps N on the scheduler's Karras schedule (Heun: NFE
                2N - 1; diffusers' EDM schedulers: NFE N); ignored if `sigmas` is given.
            sigmas (`list[float]`, *optional*, [`EDMHeunScheduler`] only): explicit descending levels
                t_0 > ... > t_{N-1} > 0 (0 is appended).
            generator (`torch.Generator` or list, *optional*): for the starting noise (the sampler is deterministic).
            latents (`torch.Tensor`, *optional*): unit-variance starting noise; scaled by the scheduler's
                `init_noise_sigma` here (t_0 for Heun; diffusers' EDM schedulers use sqrt(sigma_max^2 + 1)).
            class_labels (*optional*): labels for a class-conditional UNet; drawn from `generator` if omitted.
            guidance_scale (`float`, defaults to 1.0): classifier-free guidance scale w >= 0 for a pipeline with
                `num_classes` in its config (1: the conditional model alone, one network call per evaluation;
                otherwise two).
            output_type (`str`, defaults to "pil"): "pil", "np" (NHWC float in [0, 1]), "pt" (NCHW in [0, 1]) or
                "latent" (the final state at sigma = 0, NCHW, not post-processed).
            return_dict (`bool`, defaults to True): return an [`ImagePipelineOutput`] rather than the tuple
                `(images,)`.
            callback_on_step_end (`Callable`, *optional*): `fn(pipe, i, t, callback_kwargs) -> dict` after each
                model evaluation (Heun: 2N - 1 of them, `i` counts evaluations and
                `pipe.scheduler.state_in_first_order` is True once a full Heun step is complete); `callback_kwargs`
                holds "latents" and/or "denoised" (D(x, sigma) at the evaluation; None with
                EDMDPMSolverMultistepScheduler) as named in `callback_on_step_end_tensor_inputs`; a returned
                "latents" replaces the state.
            callback_on_step_end_tensor_inputs (`list[str]`, defaults to `["latents"]`): names from
                `_callback_tensor_inputs`.

        Examples:

        Returns:
            [`ImagePipelineOutput`] or `tuple` with the images.
        """
        callback_on_step_end_tensor_inputs = self.callback_tensor_names(callback_on_step_end,
                                                                        callback_on_step_end_tensor_inputs)
        # 1. Check inputs
        self.check_inputs(batch_size, num_inference_steps, sigmas, latents, generator, output_type,
                          callback_on_step_end_tensor_inputs, class_labels)
        self._guidance_scale = self.check_guidance_scale(guidance_scale)

        # 2.-5. Noise levels, latents at t_0, class labels, sampling loop (Heun: 2N - 1 model evaluations,
        #       alternating predictor / corrector); the last step lands on sigma = 0
        latents = self.sample_latents(batch_size, num_inference_steps, None, sigmas, generator, latents,
                                      class_labels, callback_on_step_end, callback_on_step_end_tensor_inputs)

        # 6. Post-process
        image = self.postprocess(latents, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)
