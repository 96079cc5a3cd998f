"""LatentConsistencyPipeline: few-step sampling from a latent consistency model (sLCT, Dao et al. ICLR 2025) and
decoding with a diffusers AutoencoderKL.

Not diffusers' ``LatentConsistencyModelPipeline`` (LCM, a distilled text-to-image Stable Diffusion): this one is
unconditional, and its UNet is a consistency model f(x, sigma) trained directly in a VAE latent space normalised per
element (gensample.data.latents).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, ImagePipelineOutput, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor

from gensample.models.latent_normalizer import LatentNormalizer
from gensample.schedulers import ConsistencyScheduler
from .input_checks import check_batch_size, check_num_inference_steps, check_sampling_inputs

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from gensample.pipelines import LatentConsistencyPipeline

        >>> pipe = LatentConsistencyPipeline.from_pretrained("runs/lct/pipeline")
        >>> images = pipe(batch_size=16, num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images
        >>> latents = pipe(batch_size=16, output_type="latent").images  # normalised latents, not decoded
        ```
"""


class LatentConsistencyPipeline(DiffusionPipeline):
    r"""Few-step consistency sampling in a normalised VAE latent space, then decoding (CM Algorithm 1 in latents).

    Components:
        unet ([`UNet2DModel`] or `NsLNUNet2DModel`): the backbone F over normalised latents; receives c_in(sigma) x
            and c_noise(sigma) = 250 ln(sigma) (same parametrization as ``ConsistencyPipeline``).
        scheduler ([`ConsistencyScheduler`]): the noise levels and the consistency step (used exactly as
            ``ConsistencyPipeline`` uses it; training exports it with ``clip_denoised=False``).
        vae ([`AutoencoderKL`]): decodes raw latents to images in [-1, 1].
        normalizer ([`LatentNormalizer`]): per-element latent statistics; ``denormalize`` maps the sampled
            latents back to the VAE's latent space.
    """

    model_cpu_offload_seq = "unet->vae"
    _callback_tensor_inputs = ["latents", "denoised"]

    def __init__(self, unet: UNet2DModel, scheduler: ConsistencyScheduler, vae: AutoencoderKL,
                 normalizer: LatentNormalizer):
        super().__init__()
        if unet is not None and vae is not None and normalizer is not None:
            shape = tuple(normalizer.latent_shape)
            size = unet.config.sample_size
            hw = (size, size) if isinstance(size, int) else tuple(size)
            if unet.config.in_channels != shape[0] or hw != shape[1:] or vae.config.latent_channels != shape[0]:
                raise ValueError(
                    f"components disagree on the latent shape: unet {unet.config.in_channels}x{hw}, vae "
                    f"{vae.config.latent_channels} channels, normalizer {shape}.")
        self.register_modules(unet=unet, scheduler=scheduler, vae=vae, normalizer=normalizer)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        size = self.unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (self.unet.config.in_channels, h, w)

    def check_inputs(self, batch_size, num_inference_steps, timesteps, sigmas, latents, generator, output_type,
                     callback_on_step_end_tensor_inputs, class_labels):
        check_batch_size(batch_size)
        if timesteps is None and sigmas is None:
            check_num_inference_steps(num_inference_steps)
        if timesteps is not None and sigmas is not None:
            raise ValueError("Pass either `timesteps` or `sigmas`, not both.")
        check_sampling_inputs(self, batch_size, tuple(self.latent_shape), latents, generator, output_type,
                              ("pil", "np", "pt", "latent"), callback_on_step_end_tensor_inputs, class_labels)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> images in [0, 1] (NCHW): denormalize, ``vae.decode``, then (x / 2 + 0.5) clamped."""
        raw = self.normalizer.denormalize(latents.float())
        image = self.vae.decode(raw.to(device=self.vae.device, dtype=self.vae.dtype)).sample
        return (image.float() / 2 + 0.5).clamp(0, 1)

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
        callback_on_step_end: Callable[["LatentConsistencyPipeline", int, torch.Tensor, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
    ) -> ImagePipelineOutput | tuple:
        r"""Generate images (or latents).

        Args:
            batch_size (`int`, defaults to 1): number of images.
            num_inference_steps (`int`, defaults to 1): network evaluations; ignored if `timesteps`/`sigmas` given.
            timesteps (`list[int]`, *optional*): Karras-grid indices of the sampling levels (openai's `ts` without the
                final index), e.g. `[0, 440]` with the scheduler's `num_train_timesteps=641` (sLCT's 2-step `ts`).
            sigmas (`list[float]`, *optional*): explicit descending noise levels, e.g. `[80.0, 0.3693]`.
            generator (`torch.Generator` or list, *optional*): for reproducible noise (one per image if a list).
            latents (`torch.Tensor`, *optional*): unit-variance starting noise of shape (batch, C, h, w); scaled by
                sigma_max here.
            class_labels (*optional*): labels for a class-conditional UNet; drawn from `generator` if omitted.
            output_type (`str`, defaults to "pil"): "pil", "np" (NHWC float in [0, 1]), "pt" (NCHW in [0, 1]) or
                "latent" (the sampled normalised latents, NCHW, not decoded).
            return_dict (`bool`, defaults to True): return an [`ImagePipelineOutput`] rather than a tuple.
            callback_on_step_end (`Callable`, *optional*): `fn(pipe, i, t, callback_kwargs) -> dict` after each step;
                may return replacement tensors for `callback_on_step_end_tensor_inputs`.

        Returns:
            [`ImagePipelineOutput`] or `tuple` with the images (or latents).
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
        shape = (batch_size, *self.latent_shape)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        latents = latents.to(device=device, dtype=dtype) * self.scheduler.init_noise_sigma

        # 4. Class labels
        if self.unet.config.num_class_embeds is not None:
            if class_labels is None:
                gen = generator[0] if isinstance(generator, list) else generator
                class_labels = torch.randint(0, self.unet.config.num_class_embeds, (batch_size,), generator=gen)
            class_labels = torch.as_tensor(class_labels, device=device).reshape(-1).expand(batch_size)

        # 5. Consistency sampling in latent space
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

        # 6. After the last step latents == the final clean estimate: decode
        if output_type == "latent":
            image = latents
        else:
            image = self.decode_latents(latents)
            if output_type != "pt":
                image = image.cpu().permute(0, 2, 3, 1).float().numpy()
                if output_type == "pil":
                    image = self.numpy_to_pil(image)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)
