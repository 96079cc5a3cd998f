"""NCTPipeline: one-step sampling from a consistency model with NCT control adapters (Luo et al. 2025)."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from diffusers import CMStochasticIterativeScheduler, ImagePipelineOutput, UNet2DModel
from diffusers.utils import replace_example_docstring

from gensample.models.adapter import ControlledUNet, MultiAdapter, ZeroConvAdapter
from gensample.schedulers import ConsistencyScheduler

from .input_checks import check_sampling_inputs
from .pipeline_utils import GensamplePipeline, clean_estimate

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from gensample.pipelines import NCTPipeline

        >>> pipe = NCTPipeline.from_pretrained("runs/nct-class/pipeline")
        >>> images = pipe(batch_size=10, control=torch.arange(10), generator=torch.Generator().manual_seed(0)).images
        >>> images = pipe(batch_size=4, control=7).images  # one label for the whole batch
        ```
"""


def _as_control_tensor(control: Any, adapter: ZeroConvAdapter) -> torch.Tensor:
    """An int / list of ints / integer tensor for a class adapter; a tensor, numpy array or PIL image for an image
    adapter (PIL and uint8 values are read as [0, 1] and mapped onto the adapter's ``control_range``)."""
    cfg = adapter.config
    if cfg.control_type == "class":
        if isinstance(control, bool):
            raise ValueError(f"`control` of a class adapter must be integer labels, got {control!r}.")
        if isinstance(control, (int, np.integer)):
            return torch.tensor([int(control)])
        if isinstance(control, (list, tuple)) and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool)
                                                      for v in control):
            return torch.tensor([int(v) for v in control], dtype=torch.long)
        if isinstance(control, np.ndarray) and np.issubdtype(control.dtype, np.integer):
            return torch.from_numpy(control).long().reshape(-1)
        return control
    if hasattr(control, "convert") and hasattr(control, "size"):  # a PIL image
        mode = "L" if cfg.control_channels == 1 else "RGB"
        control = np.asarray(control.convert(mode))
    if isinstance(control, np.ndarray):
        if control.dtype == np.uint8:
            control = control.astype(np.float32) / 255.0
            lo, hi = cfg.control_range
            control = lo + (hi - lo) * control
        array = torch.from_numpy(np.ascontiguousarray(control)).float()
        if array.ndim == 2:
            array = array[None]
        elif array.ndim == 3 and array.shape[-1] in (1, 3) and array.shape[0] not in (1, 3):
            array = array.permute(2, 0, 1)  # HWC -> CHW
        return array[None] if array.ndim == 3 else array
    if torch.is_tensor(control) and control.ndim == 3:
        return control[None]
    return control


class NCTPipeline(GensamplePipeline):
    r"""One network evaluation of a consistency model f(x, sigma_max) whose UNet takes the residuals of one or more
    control adapters trained by Noise Consistency Training (`gensample train nct`).

    Components:
        unet ([`UNet2DModel`]): the frozen base (a ConsistencyPipeline's UNet, unchanged).
        scheduler ([`ConsistencyScheduler`] or [`CMStochasticIterativeScheduler`]): the base's scheduler (sigma_max,
            c_skip / c_out, the clamp).
        adapter ([`ZeroConvAdapter`] or [`MultiAdapter`]): the control adapter(s); with several, `control` is a
            list (one entry per adapter, None = that adapter off) and their residuals are summed.
    """

    _scheduler_classes = (ConsistencyScheduler, CMStochasticIterativeScheduler)

    def __init__(self, unet: UNet2DModel, scheduler: ConsistencyScheduler | CMStochasticIterativeScheduler,
                 adapter: ZeroConvAdapter | MultiAdapter):
        super().__init__()
        if not isinstance(adapter, (ZeroConvAdapter, MultiAdapter)):
            raise ValueError(f"adapter must be a ZeroConvAdapter or a MultiAdapter, got {type(adapter).__name__}.")
        self.register_modules(unet=unet, scheduler=scheduler, adapter=adapter)

    @property
    def adapters(self) -> list[ZeroConvAdapter]:
        return list(self.adapter.adapters) if isinstance(self.adapter, MultiAdapter) else [self.adapter]

    def prepare_controls(self, control: Any, batch_size: int, generator: Any, device: torch.device) -> list:
        """One checked control tensor (batch or 1 leading) per adapter, or None where that adapter is off. A class
        adapter without a control gets uniform labels drawn per image from its generator (after its noise)."""
        adapters = self.adapters
        if len(adapters) == 1:
            # one adapter: the control itself (a list of ints is a list of labels), or a one-entry list of it
            one_entry = isinstance(control, (list, tuple)) and len(control) == 1 and (
                control[0] is None or not isinstance(control[0], (int, np.integer)))
            controls = list(control) if one_entry else [control]
        else:
            controls = control if control is not None else [None] * len(adapters)
            if not isinstance(controls, (list, tuple)) or len(controls) != len(adapters):
                raise ValueError(f"`control` must be a list with one entry per adapter ({len(adapters)}; None turns "
                                 f"an adapter off), got {type(control).__name__}.")
        out = []
        for adapter, c in zip(adapters, controls):
            if c is None and len(adapters) > 1:
                out.append(None)  # this adapter is off
                continue
            if c is None:
                if adapter.config.control_type != "class":
                    raise ValueError("this pipeline's adapter takes an image control: pass `control=` (a tensor of "
                                     f"shape (batch, {', '.join(map(str, adapter.control_shape()))}), or a PIL image).")
                gens = generator if isinstance(generator, list) else [generator] * batch_size
                n = adapter.config.num_classes
                c = torch.cat([torch.randint(0, n, (1,), generator=g, device=g.device if g is not None else None)
                               for g in gens]).cpu()
            c = _as_control_tensor(c, adapter)
            adapter.check_control(c, batch_size)
            out.append(c.to(device))
        return out

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        batch_size: int = 1,
        control: Any = None,
        conditioning_scale: float | Sequence[float] = 1.0,
        num_inference_steps: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[[NCTPipeline, int, torch.Tensor, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
    ) -> ImagePipelineOutput | tuple:
        r"""Generate images that follow `control`, in one network evaluation.

        Args:
            batch_size (`int`, defaults to 1): number of images.
            control: class adapter: an int, a list of ints or an integer tensor (B,) / (1,) (None: uniform random
                labels); image adapter: a float tensor (B, C, h, w) / (C, h, w) in the adapter's `control_range`, a
                numpy array or a PIL image (uint8 / PIL values are read as [0, 1] and mapped to that range). Several
                adapters: a list, one entry per adapter (None = off).
            conditioning_scale (`float` or list): multiplies each adapter's residuals (0 = the base alone).
            num_inference_steps (`int`, defaults to 1): must be 1: NCT trains the one-step map f(z, c).
            generator (`torch.Generator` or list, *optional*): for reproducible noise (one per image if a list).
            latents (`torch.Tensor`, *optional*): unit-variance starting noise z (scaled by sigma_max here).
            output_type (`str`, defaults to "pil"): "pil", "np", "pt" or "latent" (as ConsistencyPipeline).
            return_dict (`bool`, defaults to True): return an [`ImagePipelineOutput`] rather than `(images,)`.
            callback_on_step_end, callback_on_step_end_tensor_inputs: as ConsistencyPipeline (one step).

        Examples:

        Returns:
            [`ImagePipelineOutput`] or `tuple` with the images.
        """
        names = self.callback_tensor_names(callback_on_step_end, callback_on_step_end_tensor_inputs)
        # 1. Check inputs
        if num_inference_steps != 1 or isinstance(num_inference_steps, bool):
            raise ValueError(f"`num_inference_steps` must be 1 for an NCT pipeline (the adapter is trained for the "
                             f"one-step map f(z, c)), got {num_inference_steps!r}.")
        check_sampling_inputs(self, batch_size, self.latent_shape, latents, generator, output_type, names, None)
        adapters = self.adapters
        scales = [conditioning_scale] * len(adapters) if isinstance(conditioning_scale, (int, float)) \
            else list(conditioning_scale)
        if len(scales) != len(adapters) or not all(isinstance(s, (int, float)) and np.isfinite(s) for s in scales):
            raise ValueError(f"`conditioning_scale` must be a finite number or a list of {len(adapters)} numbers, "
                             f"got {conditioning_scale!r}.")

        # 2. Noise level (sigma_max), latents z * sigma_max, controls
        device = self._execution_device
        self.retrieve_timesteps(device, 1)
        latents = self.prepare_latents((batch_size, *self.latent_shape), self.unet.dtype, device, generator, latents,
                                       self.scheduler.init_noise_sigma)
        controls = self.prepare_controls(control, batch_size, generator, device)

        # 3. One evaluation of the adapted UNet, the consistency step (c_skip x + c_out F, clamped)
        network = ControlledUNet(self.unet, adapters)
        t = self.scheduler.timesteps[0]
        self._num_timesteps = 1
        with self.progress_bar(total=1) as progress_bar:
            model_input = self.scheduler.scale_model_input(latents, t)
            model_output = network(model_input, self.unet_timestep(t), controls, scales)
            output = self.scheduler.step(model_output, t, latents, return_dict=True)
            latents = self.run_callback(callback_on_step_end, 0, t, names, latents=output.prev_sample,
                                        denoised=clean_estimate(output))
            progress_bar.update()

        # 4. Post-process
        image = self.postprocess(latents, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)
