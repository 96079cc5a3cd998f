"""ConsistencyPipeline: unconditional (or class-conditional) few-step sampling from a consistency model."""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor

from gensample.schedulers import ConsistencyScheduler

from .fast_sampling import FastSamplingMixin
from .input_checks import check_batch_size, check_num_inference_steps, check_sampling_inputs

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


class ConsistencyPipeline(DiffusionPipeline, FastSamplingMixin):
    r"""Few-step sampling from a consistency model f(x, sigma) = c_skip x + c_out F(c_in x, c_noise) (CM, Algorithm 1).

    Components:
        unet ([`UNet2DModel`]): the backbone F; receives c_in(sigma) x and c_noise(sigma) = 250 ln(sigma).
        scheduler ([`ConsistencyScheduler`]): the noise levels and the consistency step.
    """

    model_cpu_offload_seq = "unet"
    _callback_tensor_inputs = ["latents", "denoised"]

    def __init__(self, unet: UNet2DModel, scheduler: ConsistencyScheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    def check_inputs(self, batch_size, num_inference_steps, timesteps, sigmas, latents, generator, output_type,
                     callback_on_step_end_tensor_inputs, class_labels):
        check_batch_size(batch_size)
        if timesteps is None and sigmas is None:
            check_num_inference_steps(num_inference_steps)
        if timesteps is not None and sigmas is not None:
            raise ValueError("Pass either `timesteps` or `sigmas`, not both.")
        cfg = self.unet.config
        check_sampling_inputs(self, batch_size, (cfg.in_channels, cfg.sample_size, cfg.sample_size), latents,
                              generator, output_type, ("pil", "np", "pt"), callback_on_step_end_tensor_inputs,
                              class_labels)

    @torch.no_grad()
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
                final index), e.g. `[0, 22]` with the scheduler's `num_train_timesteps=40`.
            sigmas (`list[float]`, *optional*): explicit descending noise levels, e.g. `[80.0, 0.8]`.
            generator (`torch.Generator` or list, *optional*): for reproducible noise (one per image if a list).
            latents (`torch.Tensor`, *optional*): unit-variance starting noise; scaled by sigma_max here.
            class_labels (*optional*): labels for a class-conditional UNet; drawn from `generator` if omitted.
            output_type (`str`, defaults to "pil"): "pil", "np" (NHWC float in [0, 1]) or "pt" (NCHW in [0, 1]).
            return_dict (`bool`, defaults to True): return an [`ImagePipelineOutput`] rather than a tuple.
            callback_on_step_end (`Callable`, *optional*): `fn(pipe, i, t, callback_kwargs) -> dict` after each step;
                may return replacement tensors for `callback_on_step_end_tensor_inputs`.

        Returns:
            [`ImagePipelineOutput`] or `tuple` with the images.
        """
        callback_on_step_end_tensor_inputs = list(callback_on_step_end_tensor_inputs)
        # 1. Check inputs
        self.check_inputs(batch_size, num_inference_steps, timesteps, sigmas, latents, generator, output_type,
                          callback_on_step_end_tensor_inputs, class_labels)
        device = self._execution_device
        dtype = self.unet.dtype

        # 2. Set the noise levels
        if timesteps is not None:
            self.scheduler.set_timesteps(timesteps=timesteps, device=device)
        elif sigmas is not None:
            self.scheduler.set_timesteps(sigmas=sigmas, device=device)
        else:
            self.scheduler.set_timesteps(num_inference_steps, device=device)

        # 3. Prepare latents at sigma_max
        shape = (batch_size, self.unet.config.in_channels, self.unet.config.sample_size, self.unet.config.sample_size)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        latents = latents.to(device=device, dtype=dtype) * self.scheduler.init_noise_sigma

        # 4. Class labels
        if self.unet.config.num_class_embeds is not None:
            if class_labels is None:
                gen = generator[0] if isinstance(generator, list) else generator
                class_labels = torch.randint(0, self.unet.config.num_class_embeds, (batch_size,), generator=gen)
            class_labels = torch.as_tensor(class_labels, device=device).reshape(-1).expand(batch_size)

        # 5. Denoising loop
        denoised = latents
        with self.progress_bar(total=len(self.scheduler.timesteps)) as progress_bar:
            for i, t in enumerate(self.scheduler.timesteps):
                model_input = self.scheduler.scale_model_input(latents, t)
                model_output = self.unet(model_input, t, class_labels=class_labels, return_dict=False)[0]
                latents, denoised = self.scheduler.step(model_output, t, latents, generator=generator,
                                                        return_dict=False)
                if callback_on_step_end is not None:
                    local_vars = {"latents": latents, "denoised": denoised}
                    callback_kwargs = {k: local_vars[k] for k in callback_on_step_end_tensor_inputs}
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs) or {}
                    latents = callback_outputs.pop("latents", latents)
                progress_bar.update()

        # 6. Post-process: after the last step latents == the final clean estimate
        image = (latents / 2 + 0.5).clamp(0, 1)
        if output_type != "pt":
            image = image.cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                image = self.numpy_to_pil(image)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)
