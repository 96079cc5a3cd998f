"""MotionGuidedVideoPipeline: training-free motion-guided video generation with the motion consistency loss
(Zhang et al. 2025, arXiv 2501.07563, Alg. 1) around a diffusers video UNet of the AnimateDiff family."""
from __future__ import annotations

import inspect
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, SchedulerMixin, UNet3DConditionModel, UNetMotionModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils import BaseOutput, logging
from diffusers.utils.torch_utils import randn_tensor
from diffusers.video_processor import VideoProcessor
from einops import rearrange

from gensample.video.guidance import (
    FeatureRecorder,
    MotionGuidanceConfig,
    auto_keypoints,
    motion_consistency_loss,
    motion_patterns,
    reference_trajectories,
)
from gensample.video.init_noise import INIT_NOISE_MODES, butterworth_low_pass, ddim_invert, lowfreq_mix

from .input_checks import check_num_inference_steps
from .pipeline_utils import write_loader

__all__ = ["MotionGuidedVideoPipeline", "MotionGuidedVideoPipelineOutput"]

logger = logging.get_logger(__name__)

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from diffusers import AnimateDiffPipeline
        >>> from gensample.pipelines.pipeline_motion_guided_video import MotionGuidedVideoPipeline
        >>> from gensample.video.guidance import MotionGuidanceConfig

        >>> base = AnimateDiffPipeline.from_pretrained("path/to/animatediff")  # a local folder
        >>> pipe = MotionGuidedVideoPipeline.from_pipe(base)
        >>> out = pipe("a cat walking on grass", reference_video="walk.gif", num_frames=16,
        ...            motion_guidance=MotionGuidanceConfig(weight=1e4, guidance_fraction=0.5),
        ...            generator=torch.Generator().manual_seed(0))
        >>> frames = out.frames[0]  # list of PIL images
        ```
"""


@dataclass
class MotionGuidedVideoPipelineOutput(BaseOutput):
    """frames: (batch) videos as lists of PIL images, an np array (B, F, H, W, C) or a tensor (B, F, C, H, W);
    motion_loss: L_c per guided step (mean over the batch); guidance_saved_bytes: the largest number of bytes that
    autograd saved for the backward pass of one guided step (the activation memory guidance costs).

    ``return_dict=False`` returns ``(frames,)`` only, as diffusers' ``AnimateDiffPipeline`` does; the two guidance
    statistics are available on this output (the default ``return_dict=True``)."""

    frames: Any
    motion_loss: list[float]
    guidance_saved_bytes: int


class MotionGuidedVideoPipeline(DiffusionPipeline):
    r"""Text-to-video (or unconditional video) generation that copies the motion of a reference video.

    Without ``reference_video`` the sampling loop is that of diffusers' ``AnimateDiffPipeline`` (same prompt
    encoding, noise, classifier-free guidance, scheduler steps and decoding), so the output equals the wrapped
    pipeline's bit for bit. With a reference (MCL, Zhang et al. 2025, Alg. 1):

    1. **Initial noise** from the reference (``init_noise``): DDIM inversion of its latent (the paper's choice),
       FreeInit low-frequency mixing of the noised reference with fresh noise, both, or plain noise.
    2. **Reference motion**: the inputs of the temporal-attention modules are recorded for the reference (noised to
       t' = 1 and passed through the UNet once, or DDIM-inverted to each guided timestep) and turned into soft
       keypoint trajectories (:mod:`gensample.video.guidance`).
    3. **Guided denoising**: on the first ``guidance_fraction`` of the steps the motion consistency loss L_c
       between the current latent's trajectories and the reference's is differentiated with respect to the latent,
       and the noise prediction is corrected, eps_hat = eps + sigma_t * grad L_c (sigma_t = ``weight``), before the
       usual scheduler step, which moves the latent along -grad L_c.

    The guidance forward pass stops after the last hooked module, so layers after it keep no activations; optional
    gradient checkpointing recomputes the blocks before it during the backward pass instead of storing them.

    Components:
        unet ([`UNetMotionModel`] or [`UNet3DConditionModel`]): the video denoiser (epsilon, v or sample
            prediction, as the scheduler's ``prediction_type`` says).
        scheduler: a diffusers scheduler with DDIM-style ``step`` (``DDIMScheduler`` for inversion).
        vae ([`AutoencoderKL`], *optional*): None for pixel-space models such as the embedded moving-digits one.
        text_encoder / tokenizer (CLIP, *optional*): None for unconditional models (such as the shipped
            ``video-digits``), which get zero prompt embeds. Without them a ``prompt`` / ``negative_prompt`` cannot be
            encoded and raises a ``ValueError`` before anything runs (it is never silently dropped): pass
            ``prompt_embeds`` (and ``negative_prompt_embeds`` for classifier-free guidance) instead, or load a
            text encoder and tokenizer.
        default_motion_weight (`float`, defaults to 1e4): sigma_t when the guidance config leaves ``weight`` unset
            (saved in model_index.json, so a model can ship the weight tuned for it).

    Loading: ``MotionGuidedVideoPipeline.from_pretrained(folder)`` or ``gensample.load_pipeline(folder)``; diffusers'
    generic ``DiffusionPipeline.from_pretrained(folder, custom_pipeline="gensample_pipeline",
    trust_remote_code=True)`` returns this class too, from the ``gensample_pipeline.py`` that ``save_pretrained``
    writes next to ``model_index.json`` (it only imports this class from gensample; see
    :mod:`gensample.pipelines.pipeline_utils`).
    """

    _optional_components = ["vae", "text_encoder", "tokenizer"]
    model_cpu_offload_seq = "text_encoder->unet->vae"
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(self, unet: Union[UNetMotionModel, UNet3DConditionModel], scheduler: SchedulerMixin,  # noqa: UP007
                 vae: Optional[AutoencoderKL] = None, text_encoder: Optional[torch.nn.Module] = None,  # noqa: UP007
                 tokenizer: Any = None, default_motion_weight: float = 1e4):
        # typing.Union/Optional, not `|`: diffusers' from_pipe checks component types through typing.Union
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer)
        # sigma_t used when MotionGuidanceConfig.weight is None: the paper's 1e4, or the value tuned for this model
        self.register_to_config(default_motion_weight=float(default_motion_weight))
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
        self.video_processor = VideoProcessor(do_resize=False, vae_scale_factor=self.vae_scale_factor)

    def save_config(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs: Any) -> None:
        """``model_index.json`` (diffusers) and the generic-loading file ``gensample_pipeline.py``."""
        write_loader(save_directory, type(self), dict(self.config))
        super().save_config(save_directory, push_to_hub=push_to_hub, **kwargs)

    # ------------------------------------------------------------------ call state (as in AnimateDiffPipeline)
    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def clip_skip(self) -> int | None:
        return self._clip_skip

    @property
    def do_classifier_free_guidance(self) -> bool:
        """``guidance_scale > 1``, as in AnimateDiffPipeline, when there is an unconditional branch to guide from:
        a text encoder (which encodes the negative prompt, "" by default) or ``negative_prompt_embeds``. Models
        without either (unconditional ones) skip classifier-free guidance whatever ``guidance_scale`` is."""
        return self._guidance_scale > 1 and self._has_negative_branch

    @property
    def cross_attention_kwargs(self) -> dict[str, Any] | None:
        return self._cross_attention_kwargs

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        """Set ``pipe._interrupt = True`` from ``callback_on_step_end`` to skip the remaining denoising steps."""
        return self._interrupt

    # ------------------------------------------------------------------ conditioning
    @property
    def _can_encode_text(self) -> bool:
        return self.text_encoder is not None and self.tokenizer is not None

    @property
    def _repeats_embeds_per_frame(self) -> bool:
        # UNetMotionModel takes one row of encoder states per frame (AnimateDiffPipeline repeats them);
        # UNet3DConditionModel repeats them itself.
        return isinstance(self.unet, UNetMotionModel)

    def encode_prompt(self, prompt, device, num_videos_per_prompt: int, do_classifier_free_guidance: bool,
                      negative_prompt=None, prompt_embeds=None, negative_prompt_embeds=None,
                      lora_scale: float | None = None, clip_skip: int | None = None):
        """AnimateDiff's (Stable Diffusion's) prompt encoding.

        Without a text encoder / tokenizer, ``prompt`` and ``negative_prompt`` raise a ``ValueError`` (pass
        ``prompt_embeds`` / ``negative_prompt_embeds`` instead); given embeds are used as they are, and with none the
        model is unconditional and gets zero embeds (1, 1, cross_attention_dim).
        """
        if self._can_encode_text:
            from diffusers import AnimateDiffPipeline

            return AnimateDiffPipeline.encode_prompt(self, prompt, device, num_videos_per_prompt,
                                                     do_classifier_free_guidance, negative_prompt, prompt_embeds,
                                                     negative_prompt_embeds, lora_scale, clip_skip)
        if prompt is not None or negative_prompt is not None:
            raise ValueError(self._no_text_encoder_message("prompt" if prompt is not None else "negative_prompt"))
        if prompt_embeds is None:
            prompt_embeds = torch.zeros(1, 1, self.unet.config.cross_attention_dim, device=device,
                                        dtype=self.unet.dtype)
        prompt_embeds = prompt_embeds.to(device=device, dtype=self.unet.dtype)
        prompt_embeds = prompt_embeds.repeat_interleave(num_videos_per_prompt, dim=0)
        if do_classifier_free_guidance:
            if negative_prompt_embeds is None:
                negative_prompt_embeds = torch.zeros_like(prompt_embeds)
            else:
                negative_prompt_embeds = negative_prompt_embeds.to(device=device, dtype=self.unet.dtype)
                negative_prompt_embeds = negative_prompt_embeds.repeat_interleave(num_videos_per_prompt, dim=0)
        return prompt_embeds, negative_prompt_embeds

    def _no_text_encoder_message(self, argument: str) -> str:
        missing = " and ".join(f"`{name}`" for name in ("text_encoder", "tokenizer") if getattr(self, name) is None)
        return (f"`{argument}` was given but this {type(self).__name__} has no text encoder to encode it ({missing} "
                "is None: an unconditional video model such as video-digits, or a pipeline loaded without one). "
                "Either drop `prompt` / `negative_prompt` for unconditional generation, pass `prompt_embeds` (and "
                "`negative_prompt_embeds` for classifier-free guidance) of shape (batch, seq, "
                f"{self.unet.config.cross_attention_dim}), or load a text encoder and tokenizer, e.g. "
                f"{type(self).__name__}.from_pretrained(path, text_encoder=..., tokenizer=...).")

    # ------------------------------------------------------------------ inputs
    def prepare_reference(self, reference_video, num_frames: int, height: int, width: int, device, dtype,
                          ) -> torch.Tensor:
        """The reference as a clean latent (1, C, F, h, w): frames loaded, checked, and VAE-encoded if there is a VAE.

        Accepts an animated GIF path, a list of PIL images, an array (F, H, W[, C]) or a tensor (F, C, H, W) in
        [-1, 1] (see :func:`gensample.video.io.load_video`).
        """
        from gensample.video.io import load_video

        frames = load_video(reference_video)  # (F, C, H, W) in [-1, 1]
        if frames.shape[0] != num_frames:
            raise ValueError(f"reference_video has {frames.shape[0]} frames but num_frames={num_frames}: pass "
                             f"num_frames={frames.shape[0]} or trim the reference to {num_frames} frames.")
        if tuple(frames.shape[-2:]) != (height, width):
            raise ValueError(f"reference_video frames are {frames.shape[-1]}x{frames.shape[-2]} (WxH) but the video "
                             f"is generated at {width}x{height}: resize the reference or pass height/width to match.")
        channels = self.vae.config.in_channels if self.vae is not None else self.unet.config.in_channels
        if frames.shape[1] != channels:
            if frames.shape[1] == 3 and channels == 1:
                frames = frames.mean(dim=1, keepdim=True)
            elif frames.shape[1] == 1 and channels == 3:
                frames = frames.expand(-1, 3, -1, -1)
            else:
                raise ValueError(f"reference_video has {frames.shape[1]} channels; this model takes {channels}.")
        frames = frames.to(device=device, dtype=dtype)
        if self.vae is not None:
            latent = self.vae.encode(frames.to(self.vae.dtype)).latent_dist.mean * self.vae.config.scaling_factor
            frames = latent.to(dtype)
        return rearrange(frames, "f c h w -> 1 c f h w")

    def check_inputs(self, num_frames: int, height: int, width: int, num_inference_steps: int, output_type: str,
                     init_noise: str, motion_guidance, reference_video, latents, batch_size: int, prompt=None,
                     negative_prompt=None, prompt_embeds=None, negative_prompt_embeds=None,
                     callback_on_step_end_tensor_inputs=None) -> None:
        if callback_on_step_end_tensor_inputs is not None:
            unknown = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
            if unknown:
                raise ValueError(f"`callback_on_step_end_tensor_inputs` has to be in {self._callback_tensor_inputs}, "
                                 f"but found {unknown}.")
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("Cannot forward both `prompt` and `prompt_embeds`: pass only one of the two.")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("Cannot forward both `negative_prompt` and `negative_prompt_embeds`: pass only one of "
                             "the two.")
        if prompt is not None and not isinstance(prompt, (str, list)):
            raise ValueError(f"`prompt` has to be of type `str` or `list` but is {type(prompt)}.")
        if not self._can_encode_text:
            if prompt is not None or negative_prompt is not None:
                raise ValueError(self._no_text_encoder_message("prompt" if prompt is not None else "negative_prompt"))
        elif prompt is None and prompt_embeds is None:
            raise ValueError("Provide either `prompt` or `prompt_embeds` (this pipeline has a text encoder; use "
                             "prompt=\"\" for an unconditional video).")
        if prompt_embeds is not None and negative_prompt_embeds is not None \
                and prompt_embeds.shape != negative_prompt_embeds.shape:
            raise ValueError("`prompt_embeds` and `negative_prompt_embeds` must have the same shape, got "
                             f"{tuple(prompt_embeds.shape)} and {tuple(negative_prompt_embeds.shape)}.")
        dim = self.unet.config.get("cross_attention_dim")
        for name, embeds in (("prompt_embeds", prompt_embeds), ("negative_prompt_embeds", negative_prompt_embeds)):
            if embeds is not None and (embeds.ndim != 3 or (isinstance(dim, int) and embeds.shape[-1] != dim)):
                raise ValueError(f"`{name}` must have shape (batch, seq, {dim}), got {tuple(embeds.shape)}.")
        check_num_inference_steps(num_inference_steps)
        if num_frames < 2:
            raise ValueError(f"`num_frames` must be >= 2 for a video, got {num_frames}.")
        capacity = self.unet.config.get("motion_max_seq_length")  # UNetMotionModel: its temporal position table
        if isinstance(capacity, int) and num_frames > capacity:
            source = " (the length of `reference_video`)" if reference_video is not None else ""
            raise ValueError(f"`num_frames` = {num_frames}{source} is more than this model takes: {capacity} frames "
                             "(unet.config.motion_max_seq_length, the length of its temporal position embeddings); "
                             f"trim the reference to at most {capacity} frames, or pass num_frames <= {capacity}.")
        if height % self.vae_scale_factor or width % self.vae_scale_factor:
            raise ValueError(f"`height` and `width` must be divisible by {self.vae_scale_factor}, got {height}x{width}.")
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"`output_type` must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}.")
        if init_noise not in INIT_NOISE_MODES:
            raise ValueError(f"`init_noise` must be one of {INIT_NOISE_MODES}, got {init_noise!r}.")
        if motion_guidance is not None and not isinstance(motion_guidance, MotionGuidanceConfig):
            raise ValueError("`motion_guidance` must be a gensample.video.guidance.MotionGuidanceConfig (or None for "
                             f"the defaults), got {type(motion_guidance).__name__}.")
        if reference_video is None and init_noise != "random":
            raise ValueError(f"init_noise={init_noise!r} needs a `reference_video`; without one use 'random'.")
        prediction = self.scheduler.config.get("prediction_type", "epsilon")
        if reference_video is not None and prediction not in ("epsilon", "v_prediction", "sample"):
            raise ValueError("motion guidance corrects an epsilon, v or sample prediction; this scheduler's "
                             f"prediction_type is {prediction!r}.")
        if latents is not None:
            expected = (batch_size, self.unet.config.in_channels, num_frames, height // self.vae_scale_factor,
                        width // self.vae_scale_factor)
            if tuple(latents.shape) != expected:
                raise ValueError(f"`latents` has shape {tuple(latents.shape)}, expected {expected} "
                                 "(batch, channels, frames, height, width).")

    # ------------------------------------------------------------------ decoding
    def decode_latents(self, latents: torch.Tensor, decode_chunk_size: int = 16) -> torch.Tensor:
        """(B, C, F, h, w) latents -> (B, C, F, H, W) float video in [-1, 1] (AnimateDiff's chunked decoding)."""
        if self.vae is None:
            return latents.float()
        latents = 1 / self.vae.config.scaling_factor * latents
        b = latents.shape[0]
        latents = rearrange(latents, "b c f h w -> (b f) c h w")
        video = torch.cat([self.vae.decode(latents[i:i + decode_chunk_size]).sample
                           for i in range(0, latents.shape[0], decode_chunk_size)])
        video = rearrange(video, "(b f) c h w -> b c f h w", b=b)
        return video.float()

    # ------------------------------------------------------------------ guidance
    def _unet_eps(self, latents, t, embeds, cross_attention_kwargs=None) -> torch.Tensor:
        return self.unet(latents, t, encoder_hidden_states=embeds, cross_attention_kwargs=cross_attention_kwargs
                         ).sample

    @torch.no_grad()
    def _reference_patterns(self, recorder: FeatureRecorder, config: MotionGuidanceConfig, latents, t, embeds,
                            keypoints, cross_attention_kwargs) -> tuple[dict, dict]:
        """The reference's anchor cells and soft trajectories from one truncated UNet pass at timestep t."""
        features = recorder.run(self.unet, self.scheduler.scale_model_input(latents, t), t,
                                encoder_hidden_states=embeds, cross_attention_kwargs=cross_attention_kwargs,
                                truncate=True)
        anchors = reference_trajectories(features, keypoints, config.local_range, config.logit_scale)
        return anchors, motion_patterns(features, anchors, config.local_range, config.logit_scale)

    def _motion_gradient(self, recorder: FeatureRecorder, config: MotionGuidanceConfig, latents, t, cond_embeds,
                         anchors, reference_patterns, cross_attention_kwargs) -> tuple[torch.Tensor, float, int]:
        """grad_z L_c at the current latent, L_c (batch mean) and the bytes autograd saved for the backward pass."""
        saved = [0]

        def pack(tensor):
            saved[0] += tensor.numel() * tensor.element_size()
            return tensor

        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            z = latents.detach().requires_grad_(True)
            model_input = self.scheduler.scale_model_input(z, t)
            features = recorder.run(self.unet, model_input, t, encoder_hidden_states=cond_embeds,
                                    cross_attention_kwargs=cross_attention_kwargs, truncate=config.truncate_forward)
            patterns = motion_patterns(features, anchors, config.local_range, config.logit_scale)
            loss = motion_consistency_loss(patterns, reference_patterns)
            (grad,) = torch.autograd.grad(loss.sum(), z)
        return grad, loss.mean().item(), saved[0]

    def correct_prediction(self, model_output: torch.Tensor, eps_shift: torch.Tensor, t) -> torch.Tensor:
        """Apply eps_hat = eps + shift (MCL's correction) to a model output of any prediction type.

        With x_t fixed, x_0 = (x_t - sqrt(1 - a) eps) / sqrt(a) and v = sqrt(a) eps - sqrt(1 - a) x_0
        = (eps - sqrt(1 - a) x_t) / sqrt(a), a = alpha_bar_t, so the same correction is v + shift / sqrt(a) for
        v-prediction and x_0 - sqrt(1 - a) / sqrt(a) * shift for sample prediction.
        """
        prediction = self.scheduler.config.get("prediction_type", "epsilon")
        if prediction == "epsilon":
            return model_output + eps_shift
        alpha_bar = self.scheduler.alphas_cumprod.to(model_output.device)[int(t)].to(model_output.dtype)
        if prediction == "v_prediction":
            return model_output + eps_shift / alpha_bar.sqrt()
        return model_output - ((1 - alpha_bar) / alpha_bar).sqrt() * eps_shift

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_videos_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        clip_skip: int | None = None,
        decode_chunk_size: int = 16,
        reference_video: Any = None,
        motion_guidance: MotionGuidanceConfig | None = None,
        init_noise: str | None = None,
        lowfreq_cutoff: float = 0.25,
        callback_on_step_end: Callable[["MotionGuidedVideoPipeline", int, int, dict], dict] | PipelineCallback
        | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ) -> MotionGuidedVideoPipelineOutput | tuple:
        r"""Generate videos, optionally copying the motion of ``reference_video``.

        Args:
            prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, guidance_scale, clip_skip,
            cross_attention_kwargs, num_videos_per_prompt, eta, generator, latents, decode_chunk_size: as in
                diffusers' ``AnimateDiffPipeline``. Without a text encoder (unconditional models such as the shipped
                video-digits) a ``prompt`` / ``negative_prompt`` raises a ``ValueError``: pass ``prompt_embeds``
                instead, or nothing for an unconditional video (zero embeds). Classifier-free guidance
                (``guidance_scale > 1``) needs an unconditional branch: a text encoder or ``negative_prompt_embeds``;
                without one it is skipped (with a warning when ``prompt_embeds`` were given).
            num_frames (`int`, *optional*): frames per video (default: the reference's length, else 16).
            height, width (`int`, *optional*): output size (default: the UNet's sample size times the VAE factor).
            num_inference_steps (`int`, defaults to 50): denoising steps (>= 1).
            reference_video (*optional*): GIF path, list of PIL frames, array (F, H, W[, C]) or tensor (F, C, H, W)
                in [-1, 1], with ``num_frames`` frames at ``height`` x ``width``. None disables motion guidance.
            motion_guidance ([`MotionGuidanceConfig`], *optional*): loss and guidance settings; defaults apply when a
                reference is given. Use ``MotionGuidanceConfig(weight=0)`` for initial-noise control only.
            init_noise (`str`, *optional*): "random", "ddim_inversion" (default with a reference, as in the paper),
                "lowfreq_mix" (FreeInit mixing of the reference noised to the first timestep with fresh noise) or
                "ddim_inversion+lowfreq_mix" (low frequencies of the inverted latent, high ones fresh).
            lowfreq_cutoff (`float`, defaults to 0.25): FreeInit's d_s = d_t of the Butterworth filter.
            output_type (`str`, defaults to "pil"): "pil", "np", "pt" or "latent".
            return_dict (`bool`, defaults to True): return a [`MotionGuidedVideoPipelineOutput`]; False returns
                ``(frames,)`` as AnimateDiffPipeline does (the motion loss and guidance memory are only on the
                output object).
            callback_on_step_end: called as ``fn(pipe, step, timestep, {name: tensor})`` after every step (or a
                diffusers ``PipelineCallback`` / ``MultiPipelineCallbacks``); may return replacement tensors. The
                pipeline's ``guidance_scale``, ``do_classifier_free_guidance``, ``num_timesteps``,
                ``cross_attention_kwargs`` and ``clip_skip`` are readable there, and setting ``pipe._interrupt = True``
                skips the remaining steps.
            callback_on_step_end_tensor_inputs (`list[str]`, defaults to ["latents"]): the tensors passed to the
                callback, from ``_callback_tensor_inputs`` (an unknown name raises a ``ValueError`` before anything
                runs).

        Returns:
            [`MotionGuidedVideoPipelineOutput`] (frames, the per-step motion loss and the guidance memory), or
            ``(frames,)`` when ``return_dict=False``.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        if reference_video is not None and num_frames is None:
            from gensample.video.io import load_video

            reference_video = load_video(reference_video)
            num_frames = reference_video.shape[0]
        num_frames = num_frames or 16
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        init_noise = init_noise or ("ddim_inversion" if reference_video is not None else "random")
        if prompt is not None and isinstance(prompt, str):
            batch_size = 1
        elif prompt is not None:
            batch_size = len(prompt)
        elif prompt_embeds is not None:
            batch_size = prompt_embeds.shape[0]
        else:
            batch_size = 1
        total = batch_size * num_videos_per_prompt
        self.check_inputs(num_frames, height, width, num_inference_steps, output_type, init_noise, motion_guidance,
                          reference_video, latents, total, prompt=prompt, negative_prompt=negative_prompt,
                          prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                          callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs)
        self._guidance_scale = guidance_scale
        self._clip_skip = clip_skip
        self._cross_attention_kwargs = cross_attention_kwargs
        self._interrupt = False
        self._has_negative_branch = self._can_encode_text or negative_prompt_embeds is not None
        if guidance_scale > 1 and not self._has_negative_branch and prompt_embeds is not None:
            logger.warning(f"guidance_scale={guidance_scale} is ignored: classifier-free guidance needs "
                           "`negative_prompt_embeds` (or a text encoder to encode the negative prompt); running "
                           "with `prompt_embeds` alone.")
        device = self._execution_device
        do_cfg = self.do_classifier_free_guidance

        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt, device, num_videos_per_prompt, do_cfg, negative_prompt, prompt_embeds, negative_prompt_embeds,
            lora_scale=(cross_attention_kwargs or {}).get("scale"), clip_skip=self.clip_skip)
        cond_embeds = prompt_embeds
        uncond_single = (negative_prompt_embeds if negative_prompt_embeds is not None else prompt_embeds)[:1]
        if do_cfg:
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])
        if self._repeats_embeds_per_frame:
            prompt_embeds = prompt_embeds.repeat_interleave(repeats=num_frames, dim=0)
            cond_embeds = cond_embeds.repeat_interleave(repeats=num_frames, dim=0)
            uncond_single = uncond_single.repeat_interleave(repeats=num_frames, dim=0)
        if not self._can_encode_text and negative_prompt_embeds is None:
            uncond_single = torch.zeros_like(uncond_single)

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        self._num_timesteps = len(timesteps)
        shape = (total, self.unet.config.in_channels, num_frames, height // self.vae_scale_factor,
                 width // self.vae_scale_factor)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=prompt_embeds.dtype)
        else:
            latents = latents.to(device)
        latents = latents * self.scheduler.init_noise_sigma
        extra_step_kwargs = {}
        step_params = set(inspect.signature(self.scheduler.step).parameters)
        if "eta" in step_params:
            extra_step_kwargs["eta"] = eta
        if "generator" in step_params:
            extra_step_kwargs["generator"] = generator

        # ---- reference: initial noise and motion patterns
        guided_steps, config, recorder = 0, None, None
        anchors = reference_patterns = None
        inverted: dict[int, torch.Tensor] = {}
        if reference_video is not None:
            config = motion_guidance or MotionGuidanceConfig()
            weight = self.config.default_motion_weight if config.weight is None else config.weight
            reference = self.prepare_reference(reference_video, num_frames, height, width, device,
                                               prompt_embeds.dtype)

            def eps_uncond(x, t):
                return self._unet_eps(self.scheduler.scale_model_input(x, t), t, uncond_single,
                                      cross_attention_kwargs)

            needs_inversion = init_noise.startswith("ddim_inversion") or config.reference_mode == "inverted"
            if needs_inversion:
                inverted = ddim_invert(eps_uncond, reference, self.scheduler, num_inference_steps,
                                       progress=lambda steps: self.progress_bar(steps))
            start = timesteps[0]
            if init_noise.startswith("ddim_inversion"):
                low = inverted[int(start)].expand(total, *reference.shape[1:])
            else:
                low = self.scheduler.add_noise(reference.expand_as(latents), latents, start.reshape(1))
            if init_noise == "ddim_inversion":
                latents = low.clone() * self.scheduler.init_noise_sigma
            elif "lowfreq_mix" in init_noise:
                fresh = randn_tensor(shape, generator=generator, device=device, dtype=latents.dtype)
                mask = butterworth_low_pass(num_frames, shape[3], shape[4], lowfreq_cutoff, lowfreq_cutoff)
                latents = lowfreq_mix(low, fresh * self.scheduler.init_noise_sigma, mask)

            modules = config.select_layers(self.unet)
            recorder = FeatureRecorder(modules)
            keypoints = config.keypoints or auto_keypoints(reference)
            guided_steps = math.floor(config.guidance_fraction * len(timesteps) + 0.5) if weight else 0
            if config.reference_mode == "noised" and guided_steps:
                t_ref = torch.tensor([config.reference_timestep], device=device)
                noise = randn_tensor(reference.shape, generator=generator if not isinstance(generator, list)
                                     else generator[0], device=device, dtype=reference.dtype)
                noised = self.scheduler.add_noise(reference, noise, t_ref)
                with recorder:
                    anchors, reference_patterns = self._reference_patterns(
                        recorder, config, noised, t_ref[0], uncond_single, keypoints, cross_attention_kwargs)

        # ---- denoising loop (AnimateDiffPipeline's, plus the guidance correction)
        motion_loss: list[float] = []
        peak_saved = 0
        was_checkpointing = getattr(self.unet, "is_gradient_checkpointing", False)
        try:
            if guided_steps and config.gradient_checkpointing and not was_checkpointing:
                self.unet.enable_gradient_checkpointing()
            if recorder is not None:
                recorder.__enter__()
            with self.progress_bar(total=len(timesteps)) as progress_bar:
                for i, t in enumerate(timesteps):
                    if self.interrupt:
                        continue
                    grad = None
                    if i < guided_steps:
                        if config.reference_mode == "inverted":
                            key = min(inverted, key=lambda k: abs(k - int(t)))
                            anchors, reference_patterns = self._reference_patterns(
                                recorder, config, inverted[key], t, uncond_single, keypoints, cross_attention_kwargs)
                        grad, loss, saved = self._motion_gradient(recorder, config, latents, t, cond_embeds, anchors,
                                                                  reference_patterns, cross_attention_kwargs)
                        motion_loss.append(loss)
                        peak_saved = max(peak_saved, saved)
                    latent_model_input = torch.cat([latents] * 2) if do_cfg else latents
                    latent_model_input = self.scheduler.scale_model_input(latent_model_input, t)
                    noise_pred = self._unet_eps(latent_model_input, t, prompt_embeds, cross_attention_kwargs)
                    if do_cfg:
                        noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
                        noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
                    if grad is not None:
                        noise_pred = self.correct_prediction(noise_pred, weight * grad, t)
                    latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs).prev_sample
                    if callback_on_step_end is not None:
                        tensors = {"latents": latents, "prompt_embeds": prompt_embeds,
                                   "negative_prompt_embeds": negative_prompt_embeds}
                        outputs = callback_on_step_end(self, i, t, {k: tensors[k]
                                                                    for k in callback_on_step_end_tensor_inputs})
                        latents = outputs.pop("latents", latents)
                        prompt_embeds = outputs.pop("prompt_embeds", prompt_embeds)
                        negative_prompt_embeds = outputs.pop("negative_prompt_embeds", negative_prompt_embeds)
                    progress_bar.update()
        finally:
            if recorder is not None:
                recorder.__exit__(None, None, None)
            if guided_steps and config.gradient_checkpointing and not was_checkpointing:
                self.unet.disable_gradient_checkpointing()

        if output_type == "latent":
            video = latents
        else:
            video = self.video_processor.postprocess_video(video=self.decode_latents(latents, decode_chunk_size),
                                                           output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (video,)
        return MotionGuidedVideoPipelineOutput(frames=video, motion_loss=motion_loss, guidance_saved_bytes=peak_saved)
