"""SCottPipeline: few-step sampling from a SCott student f(x, sigma, w, c) (Liu et al., AAAI 2025), a guided
consistency model that takes the classifier-free guidance scale w as an input (LCM-style), multi-step through the
shared consistency scheduler (CM Algorithm 1: x_0 = f(x_tau, tau, w, c), then re-noise to the next level)."""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from diffusers import CMStochasticIterativeScheduler, ImagePipelineOutput
from diffusers.utils import replace_example_docstring

from gensample.models.scott_student import SCottStudentUNet
from gensample.schedulers import ConsistencyScheduler

from .pipeline_consistency import ConsistencyPipeline

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from gensample.pipelines import SCottPipeline

        >>> pipe = SCottPipeline.from_pretrained("runs/scott/pipeline")
        >>> images = pipe(batch_size=10, num_inference_steps=2, class_labels=list(range(10)), guidance_scale=2.0,
        ...               generator=torch.Generator().manual_seed(0)).images
        ```
"""


def check_guidance_scale(guidance_scale) -> float:
    """``guidance_scale`` as a finite float >= 0, or a ValueError naming it."""
    try:
        w = float(guidance_scale)
    except (TypeError, ValueError):
        raise ValueError(f"`guidance_scale` must be a number >= 0, got {guidance_scale!r}.") from None
    if isinstance(guidance_scale, bool) or not (w >= 0 and math.isfinite(w)):
        raise ValueError(f"`guidance_scale` must be a finite number >= 0 (1: no guidance), got {guidance_scale!r}.")
    return w


class SCottPipeline(ConsistencyPipeline):
    r"""Few-step sampling from a SCott student (a [`ConsistencyPipeline`] whose UNet also takes `guidance_scale`).

    Components:
        unet ([`SCottStudentUNet`]): the backbone F(c_in x, c_noise, c, w).
        scheduler ([`ConsistencyScheduler`] or diffusers' [`CMStochasticIterativeScheduler`]).

    Config:
        num_classes (`int`, *optional*): K of a class-conditional student (its UNet keeps the teacher's K + 1 class
            embeddings; label K, the teacher's null label, is never drawn). None: unconditional.
        guidance_scale (`float`, defaults to 1.0): the default w of `__call__` (the student was distilled for a range
            of w; the model card names it).
    """

    def __init__(self, unet: SCottStudentUNet, scheduler: ConsistencyScheduler | CMStochasticIterativeScheduler,
                 num_classes: int | None = None, guidance_scale: float = 1.0):
        super().__init__(unet=unet, scheduler=scheduler)
        embeds = unet.config.num_class_embeds if unet is not None else None
        if num_classes is not None and embeds not in (int(num_classes), int(num_classes) + 1):
            raise ValueError(f"`num_classes`={num_classes} needs a UNet with num_class_embeds {num_classes} or "
                             f"{int(num_classes) + 1} (with the teacher's null label), got {embeds}.")
        guidance_scale = check_guidance_scale(guidance_scale)
        self.register_to_config(num_classes=None if num_classes is None else int(num_classes),
                                guidance_scale=guidance_scale)
        self._guidance_scale = guidance_scale

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    def unet_step_kwargs(self, i: int) -> dict:
        """w for the UNet at every step."""
        return {"guidance_scale": torch.tensor(self._guidance_scale, device=self._execution_device)}

    def enable_fast_sampling(self, *args, **kwargs):
        raise NotImplementedError("fast sampling does not pass the guidance scale to the UNet; sample SCottPipeline "
                                  "with the standard loop.")

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
        guidance_scale: float | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[["SCottPipeline", int, torch.Tensor, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
    ) -> ImagePipelineOutput | tuple:
        r"""Generate images; the arguments are [`ConsistencyPipeline`]'s and:

        Args:
            class_labels (*optional*): labels in 0..K-1 for a class-conditional student; drawn from `generator` if
                omitted.
            guidance_scale (`float`, *optional*): w >= 0 handed to the student (default: the config's
                `guidance_scale`); one network call per step whatever w is.

        Examples:

        Returns:
            [`ImagePipelineOutput`] or `tuple` with the images.
        """
        w = self.config.guidance_scale if guidance_scale is None else guidance_scale
        self._guidance_scale = check_guidance_scale(w)
        if class_labels is not None and self.config.num_classes is not None:
            labels = torch.as_tensor(class_labels).reshape(-1)
            if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.config.num_classes):
                raise ValueError(f"`class_labels` must lie in [0, {self.config.num_classes - 1}], got "
                                 f"{labels.tolist()[:8]}.")
        try:
            return super().__call__(batch_size=batch_size, num_inference_steps=num_inference_steps,
                                    timesteps=timesteps, sigmas=sigmas, generator=generator, latents=latents,
                                    class_labels=class_labels, output_type=output_type, return_dict=return_dict,
                                    callback_on_step_end=callback_on_step_end,
                                    callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs)
        finally:
            self._guidance_scale = self.config.guidance_scale
