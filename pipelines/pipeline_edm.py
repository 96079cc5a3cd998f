"""EDMPipeline: deterministic EDM Heun sampling (Karras et al. 2022, Algorithm 2 with S_churn = 0) from an EDM
denoiser D(x, sigma) = c_skip x + c_out F(c_in x, c_noise), e.g. the teacher that CTM distills."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor

from gensample.schedulers.scheduling_edm_heun import EDMHeunScheduler
from .input_checks import check_batch_size, check_num_inference_steps, check_sampling_inputs

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from gensample.pipelines.pipeline_edm import EDMPipeline

        >>> pipe = EDMPipeline.from_pretrained("runs/edm/pipeline")
        >>> images = pipe(batch_size=16, num_inference_steps=18, generator=torch.Generator().manual_seed(0)).images
        >>> images = pipe(batch_size=16, sigmas=[80.0, 10.0, 1.0, 0.1]).images  # explicit 4-step schedule (NFE 7)
        ```
"""


class EDMPipeline(DiffusionPipeline):
    r"""Image generation with EDM's Heun sampler: ``num_inference_steps`` = N Heun steps cost 2N - 1 network
    evaluations (the last step, to sigma = 0, is a plain Euler step).

    Components:
        unet ([`UNet2DModel`]): the backbone F; receives c_in(sigma) x and c_noise(sigma) = 250 ln(sigma). A
            [`gensample.models.ctm_unet.CTMUNet2DModel`] works too and is then the CTM student's denoiser g(x, t, t).
        scheduler ([`EDMHeunScheduler`]): the noise levels, the EDM preconditioning and the Heun update.
    """

    model_cpu_offload_seq = "unet"
    _callback_tensor_inputs = ["latents", "denoised"]

    def __init__(self, unet: UNet2DModel, scheduler: EDMHeunScheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    def check_inputs(self, batch_size, num_inference_steps, sigmas, latents, generator, output_type,
                     callback_on_step_end_tensor_inputs, class_labels):
        check_batch_size(batch_size)
        if sigmas is None:
            check_num_inference_steps(num_inference_steps)
        cfg = self.unet.config
        check_sampling_inputs(self, batch_size, (cfg.in_channels, cfg.sample_size, cfg.sample_size), latents,
                              generator, output_type, ("pil", "np", "pt"), callback_on_step_end_tensor_inputs,
                              class_labels)

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        num_inference_steps: int = 18,
        sigmas: Sequence[float] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        class_labels: torch.Tensor | int | list[int] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[["EDMPipeline", int, torch.Tensor, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
    ) -> ImagePipelineOutput | tuple:
        r"""Generate images.

        Args:
            batch_size (`int`, defaults to 1): number of images.
            num_inference_steps (`int`, defaults to 18): Heun steps N on the scheduler's Karras schedule (NFE 2N - 1);
                ignored if `sigmas` is given.
            sigmas (`list[float]`, *optional*): explicit descending levels t_0 > ... > t_{N-1} > 0 (0 is appended).
            generator (`torch.Generator` or list, *optional*): for the starting noise (the sampler is deterministic).
            latents (`torch.Tensor`, *optional*): unit-variance starting noise; scaled by t_0 here.
            class_labels (*optional*): labels for a class-conditional UNet; drawn from `generator` if omitted.
            output_type (`str`, defaults to "pil"): "pil", "np" (NHWC float in [0, 1]) or "pt" (NCHW in [0, 1]).
            return_dict (`bool`, defaults to True): return an [`ImagePipelineOutput`] rather than a tuple.
            callback_on_step_end (`Callable`, *optional*): `fn(pipe, i, t, callback_kwargs) -> dict` after each of
                the 2N - 1 model evaluations (`i` counts evaluations; `pipe.scheduler.state_in_first_order` is True
                once a full Heun step is complete); may return replacement tensors for
                `callback_on_step_end_tensor_inputs`.

        Returns:
            [`ImagePipelineOutput`] or `tuple` with the images.
        """
        callback_on_step_end_tensor_inputs = list(callback_on_step_end_tensor_inputs)
        # 1. Check inputs
        self.check_inputs(batch_size, num_inference_steps, sigmas, latents, generator, output_type,
                          callback_on_step_end_tensor_inputs, class_labels)
        device = self._execution_device
        dtype = self.unet.dtype

        # 2. Set the noise levels
        if sigmas is not None:
            self.scheduler.set_timesteps(sigmas=sigmas, device=device)
        else:
            self.scheduler.set_timesteps(num_inference_steps, device=device)

        # 3. Prepare latents at t_0
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

        # 5. Heun loop: 2N - 1 model evaluations, alternating predictor / corrector
        with self.progress_bar(total=len(self.scheduler.timesteps)) as progress_bar:
            for i, t in enumerate(self.scheduler.timesteps):
                model_input = self.scheduler.scale_model_input(latents, t)
                model_output = self.unet(model_input, t, class_labels=class_labels, return_dict=False)[0]
                latents, denoised = self.scheduler.step(model_output, t, latents, return_dict=False)
                if callback_on_step_end is not None:
                    local_vars = {"latents": latents, "denoised": denoised}
                    callback_kwargs = {k: local_vars[k] for k in callback_on_step_end_tensor_inputs}
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs) or {}
                    latents = callback_outputs.pop("latents", latents)
                progress_bar.update()

        # 6. Post-process: after the last (Euler) step latents is the sample at sigma = 0
        image = (latents / 2 + 0.5).clamp(0, 1)
        if output_type != "pt":
            image = image.cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                image = self.numpy_to_pil(image)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)
