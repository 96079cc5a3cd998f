"""ConsistencyPipeline: unconditional (or class-conditional) few-step sampling from a consistency model."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from diffusers import CMStochasticIterativeScheduler, ImagePipelineOutput, UNet2DModel
from diffusers.utils import replace_example_docstring

from gensample.schedulers import ConsistencyScheduler

from .fast_sampling import FastSamplingMixin
from .input_checks import check_sampling_inputs, check_schedule_source
from .pipeline_utils import GensamplePipeline, descending

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from gensample.pipelines import ConsistencyPipeline

        >>> pipe = ConsistencyPipeline.from_pretrained("assets/pipelines/ict-digits")
        >>> images = pipe(batch_size=16, num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images
        >>> images = pipe(batch_size=16, sigmas=[80.0, 0.8]).images  # explicit 2-step schedule
        ```
"""


class ConsistencyPipeline(GensamplePipeline, FastSamplingMixin):
    r"""Few-step sampling from a consistency model f(x, sigma) = c_skip x + c_out F(c_in x, c_noise) (CM, Algorithm 1).

    Components:
        unet ([`UNet2DModel`]): the backbone F; receives c_in(sigma) x and c_noise(sigma) = 250 ln(sigma).
        scheduler ([`ConsistencyScheduler`] or diffusers' [`CMStochasticIterativeScheduler`]): the noise levels and
            the consistency step. Both give the same samples on the grid schedules; only `ConsistencyScheduler`
            takes `sigmas` and reports the clean estimate `denoised` to callbacks (None with the diffusers one).
    """

    _scheduler_classes = (ConsistencyScheduler, CMStochasticIterativeScheduler)

    def __init__(self, unet: UNet2DModel, scheduler: ConsistencyScheduler | CMStochasticIterativeScheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    def check_inputs(self, batch_size, num_inference_steps, timesteps, sigmas, latents, generator, output_type,
                     callback_on_step_end_tensor_inputs, class_labels):
        check_schedule_source(num_inference_steps, timesteps, sigmas, self.scheduler)
        check_sampling_inputs(self, batch_size, self.latent_shape, latents, generator, output_type,
                              callback_on_step_end_tensor_inputs, class_labels)

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        batch_size: int = 1,
        num_inference_steps: int = 1,
        timesteps: Sequence[int] | None = None,
        sigmas: Sequence[float] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        class_labels: torch.Tensor | int | list[int] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[["ConsistencyPipeline", int, torch.Tensor, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
    ) -> ImagePipelineOutput | tuple:
        r"""Generate images.

        Args:
            batch_size (`int`, defaults to 1): number of images.
            num_inference_steps (`int`, defaults to 1): network evaluations; ignored if `timesteps`/`sigmas` given.
            timesteps (`list[int]`, *optional*): Karras-grid indices of the sampling levels (openai's `ts` without the
                final index) in any order, e.g. `[0, 22]` with the scheduler's `num_train_timesteps=40`; handed to
                the scheduler in descending order (diffusers' convention, `[22, 0]`).
            sigmas (`list[float]`, *optional*): explicit descending noise levels, e.g. `[80.0, 0.8]`
                (`ConsistencyScheduler` only).
            generator (`torch.Generator` or list, *optional*): for reproducible noise (one per image if a list).
            latents (`torch.Tensor`, *optional*): unit-variance starting noise; scaled by sigma_max here.
            class_labels (*optional*): labels for a class-conditional UNet; drawn from `generator` if omitted.
            output_type (`str`, defaults to "pil"): "pil", "np" (NHWC float in [0, 1]), "pt" (NCHW in [0, 1]) or
                "latent" (the final state in [-1, 1], NCHW, not post-processed).
            return_dict (`bool`, defaults to True): return an [`ImagePipelineOutput`] rather than the tuple
                `(images,)`.
            callback_on_step_end (`Callable`, *optional*): `fn(pipe, i, t, callback_kwargs) -> dict` after each step;
                `callback_kwargs` holds the tensors named in `callback_on_step_end_tensor_inputs` ("latents": the
                state after the step, "denoised": the step's clean estimate); a returned "latents" replaces the state.
            callback_on_step_end_tensor_inputs (`list[str]`, defaults to `["latents"]`): names from
                `_callback_tensor_inputs`.

        Examples:

        Returns:
            [`ImagePipelineOutput`] or `tuple` with the images.
        """
        callback_on_step_end_tensor_inputs = self.callback_tensor_names(callback_on_step_end,
                                                                        callback_on_step_end_tensor_inputs)
        # 1. Check inputs
        self.check_inputs(batch_size, num_inference_steps, timesteps, sigmas, latents, generator, output_type,
                          callback_on_step_end_tensor_inputs, class_labels)

        # 2.-5. Noise levels (grid indices handed over in descending order), latents at sigma_max, class labels,
        #       denoising loop; after the last step the latents are the final clean estimate
        latents = self.sample_latents(batch_size, num_inference_steps, descending(timesteps), sigmas, generator,
                                      latents, class_labels, callback_on_step_end, callback_on_step_end_tensor_inputs)

        # 6. Post-process
        image = self.postprocess(latents, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)
