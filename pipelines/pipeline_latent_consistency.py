"""LatentConsistencyPipeline: few-step sampling from a latent consistency model (sLCT, Dao et al. ICLR 2025) and
decoding with a diffusers AutoencoderKL.

Not diffusers' ``LatentConsistencyModelPipeline`` (LCM, a distilled text-to-image Stable Diffusion): this one is
unconditional, and its UNet is a consistency model f(x, sigma) trained directly in a VAE latent space normalised per
element (gensample.data.latents).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from diffusers import AutoencoderKL, CMStochasticIterativeScheduler, ImagePipelineOutput, UNet2DModel
from diffusers.utils import replace_example_docstring

from gensample.models.latent_normalizer import LatentNormalizer
from gensample.models.nsln import NsLNUNet2DModel
from gensample.schedulers import ConsistencyScheduler

from .input_checks import check_sampling_inputs, check_schedule_source
from .pipeline_utils import GensamplePipeline, descending

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


class LatentConsistencyPipeline(GensamplePipeline):
    r"""Few-step consistency sampling in a normalised VAE latent space, then decoding (CM Algorithm 1 in latents).

    Components:
        unet ([`UNet2DModel`] or `NsLNUNet2DModel`): the backbone F over normalised latents; receives c_in(sigma) x
            and c_noise(sigma) = 250 ln(sigma) (same parametrization as ``ConsistencyPipeline``).
        scheduler ([`ConsistencyScheduler`] or diffusers' [`CMStochasticIterativeScheduler`]): the noise levels and
            the consistency step (used exactly as ``ConsistencyPipeline`` uses it; training exports it with
            ``clip_denoised=False``).
        vae ([`AutoencoderKL`]): decodes raw latents to images in [-1, 1].
        normalizer ([`LatentNormalizer`]): per-element latent statistics; ``denormalize`` maps the sampled
            latents back to the VAE's latent space.
    """

    model_cpu_offload_seq = "unet->vae"
    _scheduler_classes = (ConsistencyScheduler, CMStochasticIterativeScheduler)

    def __init__(self, unet: UNet2DModel | NsLNUNet2DModel,
                 scheduler: ConsistencyScheduler | CMStochasticIterativeScheduler,
                 vae: AutoencoderKL, normalizer: LatentNormalizer):
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

    def check_inputs(self, batch_size, num_inference_steps, timesteps, sigmas, latents, generator, output_type,
                     callback_on_step_end_tensor_inputs, class_labels):
        check_schedule_source(num_inference_steps, timesteps, sigmas, self.scheduler)
        check_sampling_inputs(self, batch_size, self.latent_shape, latents, generator, output_type,
                              callback_on_step_end_tensor_inputs, class_labels)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> images in [0, 1] (NCHW): denormalize, ``vae.decode``, then (x / 2 + 0.5) clamped."""
        raw = self.normalizer.denormalize(latents.float())
        image = self.vae.decode(raw.to(device=self.vae.device, dtype=self.vae.dtype)).sample
        return (image.float() / 2 + 0.5).clamp(0, 1)

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
        callback_on_step_end: Callable[["LatentConsistencyPipeline", int, torch.Tensor, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
    ) -> ImagePipelineOutput | tuple:
        r"""Generate images (or latents).

        Args:
            batch_size (`int`, defaults to 1): number of images.
            num_inference_steps (`int`, defaults to 1): network evaluations; ignored if `timesteps`/`sigmas` given.
            timesteps (`list[int]`, *optional*): Karras-grid indices of the sampling levels (openai's `ts` without the
                final index) in any order, e.g. `[0, 440]` with the scheduler's `num_train_timesteps=641` (sLCT's
                2-step `ts`); handed to the scheduler in descending order (diffusers' convention).
            sigmas (`list[float]`, *optional*): explicit descending noise levels, e.g. `[80.0, 0.3693]`
                (`ConsistencyScheduler` only).
            generator (`torch.Generator` or list, *optional*): for reproducible noise (one per image if a list).
            latents (`torch.Tensor`, *optional*): unit-variance starting noise of shape (batch, C, h, w); scaled by
                sigma_max here.
            class_labels (*optional*): labels for a class-conditional UNet; drawn from `generator` if omitted.
            output_type (`str`, defaults to "pil"): "pil", "np" (NHWC float in [0, 1]), "pt" (NCHW in [0, 1]) or
                "latent" (the sampled normalised latents, NCHW, not decoded).
            return_dict (`bool`, defaults to True): return an [`ImagePipelineOutput`] rather than the tuple
                `(images,)`.
            callback_on_step_end (`Callable`, *optional*): `fn(pipe, i, t, callback_kwargs) -> dict` after each step;
                `callback_kwargs` holds the tensors named in `callback_on_step_end_tensor_inputs` ("latents": the
                state after the step, "denoised": the step's clean estimate); a returned "latents" replaces the state.
            callback_on_step_end_tensor_inputs (`list[str]`, defaults to `["latents"]`): names from
                `_callback_tensor_inputs`.

        Examples:

        Returns:
            [`ImagePipelineOutput`] or `tuple` with the images (or latents).
        """
        callback_on_step_end_tensor_inputs = self.callback_tensor_names(callback_on_step_end,
                                                                        callback_on_step_end_tensor_inputs)
        # 1. Check inputs
        self.check_inputs(batch_size, num_inference_steps, timesteps, sigmas, latents, generator, output_type,
                          callback_on_step_end_tensor_inputs, class_labels)

        # 2.-5. Consistency sampling in latent space: noise levels (grid indices in descending order), latents at
        #       sigma_max, class labels, denoising loop; after the last step latents == the final clean estimate
        latents = self.sample_latents(batch_size, num_inference_steps, descending(timesteps), sigmas, generator,
                                      latents, class_labels, callback_on_step_end, callback_on_step_end_tensor_inputs)

        # 6. Decode (decode_latents maps to [0, 1] itself)
        image = latents if output_type == "latent" else self.decode_latents(latents)
        image = self.postprocess(image, output_type, denormalize=False)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)
