"""SCott with a diffusers text-to-image latent teacher (Liu et al., "SCott: Accelerating Diffusion Models with
Stochastic Consistency Distillation", AAAI 2025, arXiv 2403.01505; the paper's setting: a Stable Diffusion teacher
and an LCM-style student), exported as diffusers' own ``LatentConsistencyModelPipeline``.

Everything in :class:`~gensample.methods.scott.SCottDistillation` runs in VE sigma space (x_sigma = x_0 + sigma z).
This module supplies the text-to-image pieces around it:

* **Teacher** (:class:`TextCFGTeacher`): the frozen ``UNet2DConditionModel`` with its discrete VP schedule (epsilon
  or v prediction), presented as D(x, sigma) by :func:`gensample.methods.teachers.as_denoiser`, with classifier-free
  guidance over the prompt's and the unconditional (empty or negative prompt) embeddings, in the Imagen form that
  diffusers' pipelines use: D_w = D(x, sigma, uncond) + w (D(x, sigma, cond) - D(x, sigma, uncond)); w = 1 is the
  conditional model alone (one pass). LCM (Luo et al. 2023, eq. 9) writes the same with w_LCM = w - 1.
* **Student** (:class:`LCMStudent`): a ``UNet2DConditionModel`` with ``time_cond_proj_dim`` that is exactly the
  network diffusers' ``LatentConsistencyModelPipeline`` runs. For a VE input (x, sigma) it takes the discrete
  timestep t whose sigma(t) = sqrt((1 - alpha_bar_t) / alpha_bar_t) is sigma, feeds x_vp = sqrt(alpha_bar_t) x,
  the guidance embedding of w - 1 (``get_guidance_scale_embedding`` of the LCM pipeline: VDM's sinusoidal embedding
  of 1000 (w - 1)) and the text states, and returns ``LCMScheduler.step``'s ``denoised``:

      x0_hat   = (x_vp - sqrt(1 - a_t) eps) / sqrt(a_t)      (epsilon; v: sqrt(a_t) x_vp - sqrt(1 - a_t) v)
      denoised = c_out(t) x0_hat + c_skip(t) x_vp,  c_skip = 0.25 / ((10 t)^2 + 0.25), c_out = 10 t / sqrt((10 t)^2
                 + 0.25)                                      (LCMScheduler's discrete boundary scalings,
                                                               timestep_scaling = 10, sigma_data = 0.5)

  in float32, in the scheduler's order of operations, so a sample of the exported pipeline equals the student's
  output bit for bit. Note LCM's boundary: c_skip multiplies the *VP* sample, so at t = 0 the student returns
  sqrt(alpha_bar_0) x (0.99957 x for SD's schedule), not x: LCM's convention, kept for the export's sake.
* **Grid** (:func:`lcm_timesteps`): LCM's skipping-step grid t = k j - 1 (k = T / ``original_inference_steps``,
  j = 1..S: 19, 39, ..., 999 for SD) plus t = 0, where LCM's target lands when t_n - k < 0 (``train_lcm_distill_sd``
  clamps it to 0). The distillation's ascending VE levels are sigma(t) on this grid, so ``skip = 1`` is LCM's
  t_m = t_n - k, and the exported ``LCMScheduler`` (same ``original_inference_steps``) samples on the trained levels
  (1 step: t = 999; 2: 999, 499; 4: 999, 759, 499, 259).
* **Data**: a folder of images with captions (``metadata.jsonl`` with ``file_name`` / ``text``, the layout of
  Hugging Face's ``imagefolder``), encoded once: VAE latents (posterior mode times ``scaling_factor``) and one text
  embedding per distinct caption; a batch's labels index that prompt table.

Choices where the paper and the reference notes are silent or [unverified] (ctm-scott-nct-lcsc-video.md sec. 2):

* the grid spacing: LCM's k = 20 (``original_inference_steps`` 50), not the "t_m = t_n - 24" of a digest (24 does
  not divide 1000, and the exported LCMScheduler must sample on the trained grid); ``--original-inference-steps``;
* the teacher's sub-step levels between two grid points fall between discrete timesteps: the VP adapter feeds the
  fractional timestep interpolated in ln(sigma) (SD's UNet takes float timesteps);
* the student's ``cond_proj`` starts at zero (the student is the teacher's conditional model at step 0; LCM leaves it
  random), and the unconditional branch is the empty prompt unless ``--negative-prompt`` is given (the student bakes
  it in: the LCM pipeline has no negative prompt);
* latents are the VAE posterior's mode (a deterministic cache; LCM's script samples the posterior each step);
* w ~ U[3, 15] by default (the LCM paper's [2, 14] in its w_LCM = w - 1 convention);
* the adversarial term's discriminator (:class:`TextConditionedDiscriminator`) is the teacher UNet's encoder half with
  cross-attention to the prompt, on the teacher's VP input at the fractional timestep of the noise level: LoRA on a
  frozen copy (the paper; needs peft), the copy trained in full, or a fresh small encoder (``--discriminator``).

The VAE, text encoder and tokenizer are not submodules (not trained, not checkpointed); the exported pipeline gets
copies of them.
"""
from __future__ import annotations

import argparse
import copy
import importlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.parametrization import as_float64, per_sample
from ..core.sigmas import vp_sigma_from_alpha_bar
from .scott import SCottDistillation
from .teachers import VPDenoiser, as_denoiser

__all__ = [
    "TEXT2IMAGE_COMPONENTS", "is_text2image_index", "load_text2image_teacher", "load_captioned_images",
    "encode_prompts", "lcm_timesteps", "guidance_scale_embedding", "lcm_boundary_scalings", "TextCFGTeacher",
    "LCMStudent", "student_unet_from_teacher", "lcm_scheduler_for", "TextConditionedDiscriminator",
    "text_discriminator", "TextToImageSCott", "add_text2image_arguments", "build_text2image_scott",
]

#: the components a Stable-Diffusion-style teacher folder must hold
TEXT2IMAGE_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
#: libraries a teacher folder's model_index.json may name (nothing else is imported from a folder's description)
_LIBRARIES = ("diffusers", "transformers")
#: w ~ U[3, 15] by default: the LCM paper's [2, 14] in its "w + 1" convention, here diffusers' guidance_scale
DEFAULT_GUIDANCE_RANGE = (3.0, 15.0)
#: the discriminators the CLI builds (``--discriminator``)
DISCRIMINATORS = ("teacher-lora", "teacher-full", "standalone")
#: LCMScheduler's boundary-condition constants (``get_scalings_for_boundary_condition_discrete``)
LCM_SIGMA_DATA = 0.5
LCM_TIMESTEP_SCALING = 10.0


# -- the teacher folder ------------------------------------------------------------------------------------------------
def is_text2image_index(index: dict) -> bool:
    """Whether a ``model_index.json`` describes a text-to-image latent pipeline: a ``_class_name`` starting with
    "StableDiffusion", or unet + vae + text_encoder + tokenizer components."""
    name = index.get("_class_name")
    name = name[-1] if isinstance(name, list) else name
    has_parts = all(isinstance(index.get(k), list) and index[k][0] is not None
                    for k in ("unet", "vae", "text_encoder", "tokenizer"))
    return (isinstance(name, str) and name.startswith("StableDiffusion")) or has_parts


def _read_index(folder: Path) -> dict:
    index_file = folder / "model_index.json"
    if not folder.is_dir() or not index_file.is_file():
        raise ValueError(
            f"--teacher {folder}: not a diffusion pipeline folder (no model_index.json). Pass the folder that a "
            "diffusers text-to-image pipeline was saved to (StableDiffusionPipeline.save_pretrained, or a downloaded "
            "Stable Diffusion snapshot holding unet/, vae/, text_encoder/, tokenizer/, scheduler/).")
    try:
        index = json.loads(index_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"--teacher {folder}: model_index.json is not valid JSON ({e}).") from None
    if not isinstance(index, dict):
        raise ValueError(f"--teacher {folder}: model_index.json is not a diffusers model index.")
    return index


def load_text2image_teacher(folder: str | Path) -> dict[str, Any]:
    """The five components of a Stable-Diffusion-style pipeline folder (:data:`TEXT2IMAGE_COMPONENTS`), each loaded
    with the diffusers / transformers class its ``model_index.json`` names (safety checker and feature extractor are
    not loaded). Raises ValueError naming the fix for a folder that is not such a pipeline."""
    folder = Path(folder)
    index = _read_index(folder)
    missing = [k for k in TEXT2IMAGE_COMPONENTS
               if not (isinstance(index.get(k), list) and len(index[k]) == 2 and index[k][0] is not None)]
    if missing:
        raise ValueError(
            f"--teacher {folder}: a {index.get('_class_name')!r} pipeline without {missing}; the text-to-image SCott "
            f"teacher needs {list(TEXT2IMAGE_COMPONENTS)} (a Stable-Diffusion-style pipeline: UNet2DConditionModel, "
            "AutoencoderKL, CLIP text encoder and tokenizer, and its training scheduler).")
    parts: dict[str, Any] = {}
    for name in TEXT2IMAGE_COMPONENTS:
        library, class_name = index[name]
        if library not in _LIBRARIES:
            raise ValueError(f"--teacher {folder}: component {name!r} comes from {library!r}; only classes of "
                             f"{list(_LIBRARIES)} are loaded.")
        cls = getattr(importlib.import_module(library), class_name, None)
        if cls is None:
            raise ValueError(f"--teacher {folder}: {library} has no class {class_name!r} (component {name!r}); "
                             "upgrade the library or fix model_index.json.")
        parts[name] = cls.from_pretrained(folder / name)
    unet, scheduler = parts["unet"], parts["scheduler"]
    if getattr(unet.config, "cross_attention_dim", None) is None:
        raise ValueError(f"--teacher {folder}: its unet ({type(unet).__name__}) has no cross-attention; the "
                         "text-to-image teacher must be a UNet2DConditionModel.")
    if not hasattr(scheduler, "alphas_cumprod"):
        raise ValueError(f"--teacher {folder}: its {type(scheduler).__name__} has no discrete VP schedule "
                         "(alphas_cumprod); save the pipeline with the DDPM/DDIM/PNDM-family scheduler it was "
                         "trained with.")
    for name in ("unet", "vae", "text_encoder"):
        parts[name].requires_grad_(False).eval()
    return parts


# -- data --------------------------------------------------------------------------------------------------------------
def load_captioned_images(folder: str | Path, resolution: int, progress: bool = True
                          ) -> tuple[torch.Tensor, list[str]]:
    """RGB images in [-1, 1], (N, 3, resolution, resolution) (resized on the short side, centre-cropped), and their
    captions, from ``folder/metadata.jsonl`` (one JSON object per line with "file_name" and "text", as Hugging
    Face's ``imagefolder``)."""
    import numpy as np
    from PIL import Image
    from tqdm.auto import tqdm

    from ..data.images import _resize_center_crop

    folder = Path(folder)
    meta = folder / "metadata.jsonl"
    if not meta.is_file():
        raise ValueError(f"--data {folder}: a text-to-image teacher needs captions: put a metadata.jsonl in the folder "
                         "with one line per image, {\"file_name\": \"0001.png\", \"text\": \"a caption\"} "
                         "(Hugging Face imagefolder layout).")
    arrays, captions = [], []
    lines = [ln for ln in meta.read_text().splitlines() if ln.strip()]
    for number, line in enumerate(tqdm(lines, desc="loading captioned images", disable=not progress), 1):
        try:
            record = json.loads(line)
            name, text = record["file_name"], record["text"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{meta}, line {number}: need a JSON object with \"file_name\" and \"text\" ({e}).") \
                from None
        if not isinstance(text, str):
            raise ValueError(f"{meta}, line {number}: \"text\" must be a string, got {type(text).__name__}.")
        path = folder / name
        try:
            with Image.open(path) as img:
                arrays.append(np.asarray(_resize_center_crop(img.convert("RGB"), resolution)))
        except (OSError, SyntaxError, ValueError) as e:
            raise ValueError(f"{meta}, line {number}: {path} is not a readable image ({type(e).__name__}: {e}).") \
                from None
        captions.append(text)
    if not arrays:
        raise ValueError(f"--data {folder}: metadata.jsonl lists no images.")
    images = torch.from_numpy(np.stack(arrays)).float().permute(0, 3, 1, 2) / 127.5 - 1.0
    return images, captions


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """Text-encoder states (P, L, D) of ``prompts`` as Stable Diffusion conditions on them: tokens padded to the
    tokenizer's ``model_max_length`` (truncated), the text encoder's last hidden state (``encode_prompt`` without
    clip_skip)."""
    device = next(text_encoder.parameters()).device
    out = []
    for start in range(0, len(prompts), batch_size):
        ids = tokenizer(list(prompts[start:start + batch_size]), padding="max_length",
                        max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
        mask = None
        if getattr(text_encoder.config, "use_attention_mask", False):
            mask = tokenizer(list(prompts[start:start + batch_size]), padding="max_length",
                             max_length=tokenizer.model_max_length, truncation=True,
                             return_tensors="pt").attention_mask.to(device)
        out.append(text_encoder(ids.to(device), attention_mask=mask)[0].float().cpu())
    return torch.cat(out)


# -- LCM's grid, guidance embedding and boundary scalings -----------------------------------------------------------
def lcm_timesteps(num_train_timesteps: int = 1000, original_inference_steps: int = 50) -> torch.Tensor:
    """LCM's skipping-step grid, ascending, with t = 0 below it: [0, k - 1, 2k - 1, ..., S k - 1] for
    k = T // S (``LCMScheduler.set_timesteps``' training grid; T = 1000, S = 50: 0, 19, 39, ..., 999)."""
    if not isinstance(original_inference_steps, int) or original_inference_steps < 1:
        raise ValueError(f"original_inference_steps must be an integer >= 1, got {original_inference_steps!r}.")
    k = num_train_timesteps // original_inference_steps
    if k < 1:
        raise ValueError(f"original_inference_steps ({original_inference_steps}) must not exceed the teacher's "
                         f"{num_train_timesteps} training timesteps.")
    grid = torch.arange(1, original_inference_steps + 1, dtype=torch.int64) * k - 1
    return torch.cat([torch.zeros(1, dtype=torch.int64), grid[grid > 0]])


def guidance_scale_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """VDM's sinusoidal embedding of 1000 w (Kingma et al. 2021, ``get_timestep_embedding``), (B, dim) float32:
    [sin(1000 w f_i), cos(1000 w f_i)], f_i = 10000^(-i / (dim/2 - 1)), i < dim/2, zero-padded for odd dim. The LCM
    pipeline embeds w = guidance_scale - 1 this way (``get_guidance_scale_embedding``)."""
    if w.ndim != 1:
        raise ValueError(f"w must be one value per sample, shape (B,), got {tuple(w.shape)}.")
    half = dim // 2
    if half < 2:
        raise ValueError(f"the guidance embedding needs time_cond_proj_dim >= 4, got {dim}.")
    step = torch.log(torch.tensor(10000.0)) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -step)
    angles = (w.float() * 1000.0)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    return nn.functional.pad(emb, (0, 1)) if dim % 2 else emb


def lcm_boundary_scalings(timesteps: torch.Tensor, timestep_scaling: float = LCM_TIMESTEP_SCALING,
                          sigma_data: float = LCM_SIGMA_DATA) -> tuple[torch.Tensor, torch.Tensor]:
    """LCMScheduler's discrete boundary scalings at integer ``timesteps``, float32: with u = timestep_scaling t,
    c_skip = sd^2 / (u^2 + sd^2) and c_out = u / sqrt(u^2 + sd^2) (c_skip(0) = 1, c_out(0) = 0). Unlike the CM
    paper's sigma-space c_out (:func:`gensample.core.parametrization.consistency_scalings`) there is no sd factor."""
    scaled = timesteps * timestep_scaling
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


# -- teacher and student ----------------------------------------------------------------------------------------------
def _guidance(guidance_scale, x: torch.Tensor) -> torch.Tensor:
    """w per sample as float64 (B,); None means 1."""
    if guidance_scale is None:
        return torch.ones(x.shape[0], dtype=torch.float64, device=x.device)
    w = as_float64(guidance_scale).to(device=x.device, dtype=torch.float64).reshape(-1)
    return w.expand(x.shape[0]) if w.numel() == 1 else w


class TextCFGTeacher(nn.Module):
    """D_w(x, sigma, c) = D(x, sigma, uncond) + w (D(x, sigma, c) - D(x, sigma, uncond)) of a VE denoiser over text
    states (see the module docstring).

    Args:
        denoiser: D(x, sigma, encoder_hidden_states=...) in VE space, e.g. ``as_denoiser(unet, scheduler)``.
        uncond_embeds: the unconditional text states (1, L, D) (the empty or a negative prompt); None: a teacher
            without an unconditional branch, which accepts only w = 1.
    """

    def __init__(self, denoiser: nn.Module, uncond_embeds: torch.Tensor | None):
        super().__init__()
        self.denoiser = denoiser
        if uncond_embeds is not None:
            if uncond_embeds.ndim == 2:
                uncond_embeds = uncond_embeds[None]
            if uncond_embeds.ndim != 3 or uncond_embeds.shape[0] != 1:
                raise ValueError(f"uncond_embeds must be one prompt's text states (1, L, D), got "
                                 f"{tuple(uncond_embeds.shape)}.")
            self.register_buffer("uncond_embeds", uncond_embeds.detach().clone(), persistent=False)
        else:
            self.uncond_embeds = None

    @property
    def has_unconditional(self) -> bool:
        return self.uncond_embeds is not None

    def forward(self, x: torch.Tensor, sigma, guidance_scale=None, *,
                encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        w = _guidance(guidance_scale, x)
        if bool((w == 1).all()):
            return self.denoiser(x, sigma, encoder_hidden_states=encoder_hidden_states)
        if self.uncond_embeds is None:
            raise ValueError("a guidance scale w != 1 needs the teacher's unconditional branch, but this teacher has no "
                             "unconditional embedding: build it with uncond_embeds (the empty prompt's text states) "
                             "or distil at w = 1 (guidance range 1 1).")
        batch = x.shape[0]
        s = per_sample(as_float64(sigma), x).to(torch.float64).flatten()
        uncond = self.uncond_embeds.to(encoder_hidden_states.dtype).expand(batch, -1, -1)
        if uncond.shape[1:] != encoder_hidden_states.shape[1:]:
            raise ValueError(f"the unconditional text states {tuple(uncond.shape[1:])} and the prompt's "
                             f"{tuple(encoder_hidden_states.shape[1:])} differ in shape; encode both with the same "
                             "tokenizer and text encoder.")
        # one batched pass over (uncond, cond)
        both = self.denoiser(torch.cat([x, x]), torch.cat([s, s]),
                             encoder_hidden_states=torch.cat([uncond, encoder_hidden_states]))
        d_uncond, d_cond = both[:batch], both[batch:]
        return d_uncond + per_sample(w, x).to(x.dtype) * (d_cond - d_uncond)


class LCMStudent(nn.Module):
    """The LCM student f_theta(x, sigma, w, c) in VE space around a ``UNet2DConditionModel`` with
    ``time_cond_proj_dim`` (see the module docstring for the formulas).

    Args:
        unet: the student network (its ``time_cond_proj_dim`` is the guidance embedding's width).
        alphas_cumprod: the VP schedule (the exported ``LCMScheduler``'s ``alphas_cumprod``, float32).
        prediction_type: "epsilon", "v_prediction" or "sample" (the teacher's; the export's scheduler uses it too).
        timestep_scaling: LCMScheduler's ``timestep_scaling`` (10).
    """

    def __init__(self, unet: nn.Module, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon",
                 timestep_scaling: float = LCM_TIMESTEP_SCALING):
        super().__init__()
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"prediction_type must be 'epsilon', 'v_prediction' or 'sample', got {prediction_type!r}.")
        if getattr(unet.config, "time_cond_proj_dim", None) is None:
            raise ValueError("the LCM student's UNet2DConditionModel needs time_cond_proj_dim (the guidance-scale "
                             "embedding); build it with student_unet_from_teacher(teacher_unet, 256).")
        self.unet = unet
        self.prediction_type = prediction_type
        self.timestep_scaling = float(timestep_scaling)
        alphas_cumprod = torch.as_tensor(alphas_cumprod).detach().to("cpu", torch.float32).flatten()
        self.register_buffer("alphas_cumprod", alphas_cumprod, persistent=False)
        self.register_buffer("log_sigmas", vp_sigma_from_alpha_bar(alphas_cumprod.double()).log(), persistent=False)

    @property
    def backbone(self) -> nn.Module:
        """The trained network (the name :class:`~gensample.methods.scott.SCottDistillation` uses for the exported
        and EMA'd module)."""
        return self.unet

    def timestep_for_sigma(self, sigma) -> torch.Tensor:
        """The integer timesteps (B,) whose VP sigma(t) equals ``sigma`` (to 1e-4 relative); a ValueError for a
        level that is not one of the schedule's (the student is a discrete-time LCM)."""
        s = as_float64(sigma).to(torch.float64).reshape(-1)
        log_sigmas = self.log_sigmas.to(s.device)
        log_s = s.clamp(min=1e-300).log()
        hi = torch.searchsorted(log_sigmas, log_s.contiguous()).clamp(1, len(log_sigmas) - 1)
        lo = hi - 1
        t = torch.where((log_s - log_sigmas[lo]).abs() <= (log_sigmas[hi] - log_s).abs(), lo, hi)
        off = (log_sigmas[t] - log_s).abs()
        if bool((off > 1e-4).any()):
            bad = float(s[off.argmax()])
            raise ValueError(f"sigma={bad:.6g} is not a level of the student's discrete schedule (nearest: "
                             f"{float(log_sigmas[t[off.argmax()]].exp()):.6g}); the LCM student takes the levels "
                             "sigma(t) of its VP timesteps, e.g. those of lcm_timesteps().")
        return t

    def guidance_embedding(self, guidance_scale, x: torch.Tensor) -> torch.Tensor:
        """The LCM pipeline's w-embedding: :func:`guidance_scale_embedding` of w - 1 (w - 1 formed in float64, then
        rounded to float32, as the pipeline's ``torch.tensor(guidance_scale - 1)``)."""
        w = _guidance(guidance_scale, x)
        emb = guidance_scale_embedding((w - 1).to(torch.float32).cpu(), self.unet.config.time_cond_proj_dim)
        return emb.to(device=x.device, dtype=x.dtype)

    def consistency_vp(self, sample: torch.Tensor, timesteps: torch.Tensor, guidance_scale=None, *,
                       encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        """``denoised`` of ``LCMScheduler.step`` for the VP ``sample`` at integer ``timesteps`` (B,): one UNet call,
        x0_hat from the prediction, then c_out x0_hat + c_skip sample (float32 scalings)."""
        t = timesteps.to(device=sample.device, dtype=torch.int64).reshape(-1).expand(sample.shape[0])
        model_output = self.unet(sample, t, timestep_cond=self.guidance_embedding(guidance_scale, sample),
                                 encoder_hidden_states=encoder_hidden_states).sample
        alpha_prod = per_sample(self.alphas_cumprod.to(sample.device)[t], sample)
        beta_prod = 1 - alpha_prod
        if self.prediction_type == "epsilon":
            x0 = (sample - beta_prod.sqrt() * model_output) / alpha_prod.sqrt()
        elif self.prediction_type == "v_prediction":
            x0 = alpha_prod.sqrt() * sample - beta_prod.sqrt() * model_output
        else:
            x0 = model_output
        c_skip, c_out = lcm_boundary_scalings(per_sample(t, sample), self.timestep_scaling)
        return c_out.to(sample.dtype) * x0 + c_skip.to(sample.dtype) * sample

    def forward(self, x: torch.Tensor, sigma, guidance_scale=None, *,
                encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        """f_theta(x, sigma, w, c) for a VE input: x_vp = sqrt(alpha_bar_t) x at the timestep of ``sigma``."""
        t = self.timestep_for_sigma(per_sample(as_float64(sigma), x).flatten()).to(x.device)
        sample = per_sample(self.alphas_cumprod.to(x.device)[t], x).sqrt().to(x.dtype) * x
        return self.consistency_vp(sample, t, guidance_scale, encoder_hidden_states=encoder_hidden_states)


def student_unet_from_teacher(teacher_unet: nn.Module, time_cond_proj_dim: int = 256) -> nn.Module:
    """A ``UNet2DConditionModel`` with the teacher's configuration plus ``time_cond_proj_dim``, holding the teacher's
    weights (LCM's initialisation) and a zero guidance projection ``time_embedding.cond_proj`` (so at step 0 it is
    the teacher's conditional network for every w; LCM leaves that layer random)."""
    from diffusers import UNet2DConditionModel

    if not isinstance(time_cond_proj_dim, int) or time_cond_proj_dim < 4:
        raise ValueError(f"time_cond_proj_dim must be an integer >= 4 (LCM: 256), got {time_cond_proj_dim!r}.")
    config = {k: v for k, v in dict(teacher_unet.config).items() if not k.startswith("_")}
    config["time_cond_proj_dim"] = time_cond_proj_dim
    student = UNet2DConditionModel(**config).to(teacher_unet.device)
    if student.dtype != teacher_unet.dtype:
        student = student.to(dtype=teacher_unet.dtype)
    result = student.load_state_dict(teacher_unet.state_dict(), strict=False)
    extra = [k for k in result.missing_keys if not k.startswith("time_embedding.cond_proj")]
    if result.unexpected_keys or extra:
        raise ValueError(f"the teacher's UNet does not load into the student (missing {extra[:5]}, unexpected "
                         f"{result.unexpected_keys[:5]}).")
    with torch.no_grad():
        student.time_embedding.cond_proj.weight.zero_()
    return student.train()


def lcm_scheduler_for(teacher_scheduler, original_inference_steps: int = 50,
                      timestep_scaling: float = LCM_TIMESTEP_SCALING):
    """diffusers' ``LCMScheduler`` on the teacher's training schedule (betas, T, prediction type) with LCM's
    ``original_inference_steps`` and ``timestep_scaling``; no clipping or thresholding of x0 (latents are not
    bounded). Raises ValueError if its ``alphas_cumprod`` differ from the teacher scheduler's."""
    import inspect

    from diffusers import LCMScheduler

    accepted = set(inspect.signature(LCMScheduler.__init__).parameters) - {"self"}
    config = {k: v for k, v in dict(teacher_scheduler.config).items() if k in accepted}
    config.update(original_inference_steps=int(original_inference_steps), timestep_scaling=float(timestep_scaling),
                  clip_sample=False, thresholding=False)
    scheduler = LCMScheduler(**config)
    if not torch.equal(scheduler.alphas_cumprod.float(), torch.as_tensor(teacher_scheduler.alphas_cumprod).float()):
        raise ValueError(f"LCMScheduler cannot reproduce the teacher's {type(teacher_scheduler).__name__} schedule "
                         "(alphas_cumprod differ); the exported pipeline would sample another diffusion.")
    return scheduler


# -- the adversarial term's discriminator -----------------------------------------------------------------------------
class TextConditionedDiscriminator(nn.Module):
    """D(x_s, sigma, encoder_hidden_states) -> [logits (B, h*w)]: the encoder half of a ``UNet2DConditionModel``
    (conv_in, time embedding, down blocks with cross-attention to the text, mid block) on the VP input
    sqrt(alpha_bar) x_s at the fractional timestep of sigma (the teacher's own input convention), then GroupNorm ->
    SiLU -> 1x1 conv: one logit per position of the lowest resolution. The text version of
    :class:`gensample.models.scott_discriminator.SCottDiscriminator` (SCott: conditioned on timestep and text).

    Args:
        unet: the ``UNet2DConditionModel`` whose encoder is used, taken as is (pass a copy to keep the original).
        alphas_cumprod: its VP schedule (sigma -> timestep).
        lora_rank: None: the encoder trains in full; r >= 1: it is frozen and LoRA adapters of rank r are trained
            on its convolutions and attention projections (the paper's choice; needs ``pip install peft``).
    """

    def __init__(self, unet: nn.Module, alphas_cumprod: torch.Tensor, lora_rank: int | None = None):
        super().__init__()
        cfg = unet.config
        unsupported = {k: getattr(cfg, k, None) for k in ("class_embed_type", "addition_embed_type",
                                                          "encoder_hid_dim", "num_class_embeds")
                       if getattr(cfg, k, None) is not None}
        if unsupported:
            raise ValueError(f"the text discriminator takes a plain Stable-Diffusion UNet (no class, added or "
                             f"projected text embeddings); this one sets {unsupported}. Use --discriminator "
                             "standalone.")
        self.lora_rank = None if lora_rank is None else int(lora_rank)
        self.encoder = nn.ModuleDict(dict(conv_in=unet.conv_in, time_proj=unet.time_proj,
                                          time_embedding=unet.time_embedding, down_blocks=unet.down_blocks))
        if unet.mid_block is not None:
            self.encoder["mid_block"] = unet.mid_block
        channels = cfg.block_out_channels[-1]
        self.head = nn.Sequential(nn.GroupNorm(cfg.norm_num_groups, channels), nn.SiLU(), nn.Conv2d(channels, 1, 1))
        self.schedule = VPDenoiser(nn.Identity(), alphas_cumprod)  # only its sigma -> timestep map is used
        if self.lora_rank is not None:
            if self.lora_rank < 1:
                raise ValueError(f"lora_rank must be >= 1 (None: train the encoder in full), got {lora_rank}.")
            try:
                from peft import LoraConfig, inject_adapter_in_model
            except ImportError:
                raise ValueError("a LoRA discriminator needs peft: `pip install peft`, or use --discriminator "
                                 "teacher-full / standalone.") from None
            from ..models.scott_discriminator import LORA_TARGET_MODULES

            self.encoder.requires_grad_(False)
            inject_adapter_in_model(LoraConfig(r=self.lora_rank, lora_alpha=self.lora_rank,
                                               target_modules=LORA_TARGET_MODULES, lora_dropout=0.0), self.encoder)
            for name, p in self.encoder.named_parameters():
                p.requires_grad_("lora_" in name)

    def forward(self, x: torch.Tensor, sigma, encoder_hidden_states: torch.Tensor) -> list[torch.Tensor]:
        s = per_sample(as_float64(sigma), x).to(torch.float64)
        enc = self.encoder
        t = self.schedule.sigma_to_timestep(s.flatten()).to(device=x.device, dtype=torch.float32)
        emb = enc["time_embedding"](enc["time_proj"](t).to(x.dtype))
        h = enc["conv_in"]((1.0 / (1.0 + s**2)).sqrt().to(x.dtype) * x)
        states = encoder_hidden_states.to(x.dtype)
        for block in enc["down_blocks"]:
            if getattr(block, "has_cross_attention", False):
                h = block(hidden_states=h, temb=emb, encoder_hidden_states=states)[0]
            else:
                h = block(hidden_states=h, temb=emb)[0]
        if "mid_block" in enc:
            mid = enc["mid_block"]
            h = mid(h, emb, encoder_hidden_states=states) if getattr(mid, "has_cross_attention", False) else mid(h, emb)
        return [self.head(h).flatten(1)]


def text_discriminator(kind: str, teacher_unet: nn.Module, alphas_cumprod: torch.Tensor,
                       lora_rank: int | None = 8) -> TextConditionedDiscriminator:
    """``kind`` = "teacher-lora" (a copy of the teacher's encoder, frozen, LoRA of ``lora_rank``: the paper),
    "teacher-full" (the copy trained in full) or "standalone" (a fresh small encoder: 32/64 channels, one
    cross-attention level)."""
    if kind not in DISCRIMINATORS:
        raise ValueError(f"discriminator must be one of {DISCRIMINATORS}, got {kind!r}.")
    if kind == "standalone":
        from diffusers import UNet2DConditionModel

        c = teacher_unet.config
        unet = UNet2DConditionModel(
            sample_size=c.sample_size, in_channels=c.in_channels, out_channels=c.in_channels, layers_per_block=1,
            block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=c.cross_attention_dim,
            attention_head_dim=8, norm_num_groups=8)
        return TextConditionedDiscriminator(unet, alphas_cumprod).to(teacher_unet.device)
    unet = copy.deepcopy(teacher_unet).requires_grad_(True).train()
    return TextConditionedDiscriminator(unet, alphas_cumprod, lora_rank if kind == "teacher-lora" else None)


# -- the method ---------------------------------------------------------------------------------------------------------
class TextToImageSCott(SCottDistillation):
    """SCott of a text-to-image latent teacher into an LCM student (see the module docstring); the batches are
    ``(latents, prompt indices)`` and the export is diffusers' ``LatentConsistencyModelPipeline``.

    Args:
        student: the :class:`LCMStudent`.
        teacher: the :class:`TextCFGTeacher`.
        sigmas: the ascending VE levels; default sigma(t) on :func:`lcm_timesteps` of ``scheduler``.
        prompt_embeds: the prompt table (P, L, D); a batch's labels index it.
        vae, text_encoder, tokenizer: the teacher's, copied into the exported pipeline.
        scheduler: the exported ``LCMScheduler`` (:func:`lcm_scheduler_for`).
        prompts: the P prompt strings (recorded in ``method_config`` only as their count).
        negative_prompt: the text of the teacher's unconditional branch (recorded).
        kwargs: :class:`~gensample.methods.scott.SCottDistillation`'s keyword arguments (skip, solver, eta,
            substeps, phi, guidance_range, distance, huber_c, target_ema, adv_weight, discriminator, ...).
    """

    def __init__(self, student: LCMStudent, teacher: TextCFGTeacher, sigmas: torch.Tensor | None = None, *,
                 prompt_embeds: torch.Tensor, vae: nn.Module, text_encoder: nn.Module, tokenizer: Any,
                 scheduler: Any, prompts: Sequence[str] | None = None, negative_prompt: str = "", **kwargs: Any):
        if not isinstance(student, LCMStudent):
            raise ValueError(f"student must be an LCMStudent, got {type(student).__name__}.")
        if not isinstance(teacher, TextCFGTeacher):
            raise ValueError(f"teacher must be a TextCFGTeacher, got {type(teacher).__name__}.")
        w_min, w_max = (float(v) for v in kwargs.get("guidance_range", (1.0, 1.0)))
        if (w_min, w_max) != (1.0, 1.0) and not teacher.has_unconditional:
            raise ValueError(f"guidance_range {(w_min, w_max)} needs the teacher's unconditional branch, but the "
                             "teacher has no unconditional embedding: build the TextCFGTeacher with uncond_embeds "
                             "(the empty prompt's text states; the CLI always encodes --negative-prompt), or use "
                             "--guidance-range 1 1.")
        teacher_unet = getattr(teacher.denoiser, "unet", None)
        self._check_shapes(student.unet, teacher_unet, vae, prompt_embeds)
        if teacher_unet is not None and hasattr(teacher.denoiser, "alphas_cumprod") and not torch.equal(
                teacher.denoiser.alphas_cumprod.float().cpu(), student.alphas_cumprod.cpu()):
            raise ValueError("the student's and the teacher's VP schedules (alphas_cumprod) differ; build the "
                             "student on lcm_scheduler_for(teacher_scheduler).alphas_cumprod.")
        if sigmas is None:
            grid = lcm_timesteps(int(scheduler.config.num_train_timesteps),
                                 int(scheduler.config.original_inference_steps))
            sigmas = vp_sigma_from_alpha_bar(torch.as_tensor(scheduler.alphas_cumprod).double()[grid])
        super().__init__(student, teacher, sigmas, **kwargs)
        if prompt_embeds.ndim != 3 or len(prompt_embeds) == 0:
            raise ValueError(f"prompt_embeds must be a non-empty table (P, L, D), got {tuple(prompt_embeds.shape)}.")
        self.register_buffer("prompt_embeds", prompt_embeds.detach().float().clone(), persistent=False)
        # not submodules: frozen, not checkpointed; the exported pipeline gets copies
        self._components = (vae, text_encoder, tokenizer)
        self._scheduler_config = dict(scheduler.config)
        self.num_prompts = len(prompt_embeds) if prompts is None else len(prompts)
        self.negative_prompt = negative_prompt

    @staticmethod
    def _check_shapes(student_unet: nn.Module, teacher_unet: nn.Module | None, vae: nn.Module,
                      prompt_embeds: torch.Tensor) -> None:
        s = student_unet.config
        if teacher_unet is not None:
            t = teacher_unet.config
            mine = (s.in_channels, s.out_channels, s.sample_size, s.cross_attention_dim)
            theirs = (t.in_channels, t.out_channels, t.sample_size, t.cross_attention_dim)
            if mine != theirs:
                raise ValueError(
                    f"the student UNet (in/out channels, sample size, text width {mine}) does not match the teacher's "
                    f"{theirs}: the student distils the teacher's latents. Build it from the teacher "
                    "(student_unet_from_teacher, the CLI's default) or pass an --init-from unet distilled from this "
                    "teacher.")
        if vae.config.latent_channels != s.in_channels:
            raise ValueError(f"the VAE has {vae.config.latent_channels} latent channels but the student UNet takes "
                             f"{s.in_channels}; use the teacher pipeline's own VAE.")
        if prompt_embeds.shape[-1] != s.cross_attention_dim:
            raise ValueError(f"the prompt embeddings are {prompt_embeds.shape[-1]}-d but the UNet attends to "
                             f"{s.cross_attention_dim}-d text states; encode the prompts with the teacher's text "
                             "encoder.")

    def unpack_batch(self, batch) -> tuple[torch.Tensor, dict]:
        """(latents, {"encoder_hidden_states": the text states of each sample's prompt})."""
        if not isinstance(batch, (tuple, list)):
            raise ValueError("text-to-image SCott needs labelled batches (latents, prompt indices): "
                             "Trainer(..., labels=...) with the labels build_text2image_scott returns.")
        latents, labels = batch
        if latents.shape[1] != self.student.unet.config.in_channels:
            raise ValueError(f"the latents have {latents.shape[1]} channels but the student takes "
                             f"{self.student.unet.config.in_channels}; encode the images with the teacher's VAE.")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= len(self.prompt_embeds)):
            raise ValueError(f"prompt indices must lie in [0, {len(self.prompt_embeds) - 1}], got "
                             f"[{int(labels.min())}, {int(labels.max())}].")
        return latents, {"encoder_hidden_states": self.prompt_embeds[labels.to(self.prompt_embeds.device)]}

    def ema_modules(self) -> dict[str, nn.Module]:
        return {"unet": self.student.unet}

    def build_pipeline(self, eval_modules: dict[str, nn.Module]):
        """diffusers' ``LatentConsistencyModelPipeline`` around the EMA UNet, copies of the teacher's VAE, text
        encoder and tokenizer, and the ``LCMScheduler`` (no safety checker)."""
        from diffusers import LatentConsistencyModelPipeline, LCMScheduler

        unet = eval_modules["unet"]
        device = next(unet.parameters()).device
        vae, text_encoder, tokenizer = self._components
        return LatentConsistencyModelPipeline(
            vae=copy.deepcopy(vae).eval().to(device), text_encoder=copy.deepcopy(text_encoder).eval().to(device),
            tokenizer=copy.deepcopy(tokenizer), unet=unet, scheduler=LCMScheduler.from_config(self._scheduler_config),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)

    @torch.no_grad()
    def sample_images(self, pipe, num_images: int, num_inference_steps: int,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """``num_images`` samples in [0, 1] (N, 3, H, W) of ``pipe`` (the exported pipeline) for the training prompts
        in turn, at the default guidance scale: the Trainer's sample grids."""
        index = torch.arange(num_images) % len(self.prompt_embeds)
        embeds = self.prompt_embeds[index.to(self.prompt_embeds.device)].to(pipe.device, pipe.unet.dtype)
        return pipe(prompt_embeds=embeds, num_inference_steps=num_inference_steps,
                    guidance_scale=self.sample_guidance_scale, generator=generator, output_type="pt").images

    def method_config(self) -> dict[str, Any]:
        cfg = self._scheduler_config
        return dict(super().method_config(), text2image=True, num_prompts=self.num_prompts,
                    negative_prompt=self.negative_prompt, prediction_type=self.student.prediction_type,
                    original_inference_steps=cfg.get("original_inference_steps"),
                    timestep_scaling=cfg.get("timestep_scaling"),
                    time_cond_proj_dim=self.student.unet.config.time_cond_proj_dim)


# -- CLI ----------------------------------------------------------------------------------------------------------------
def add_text2image_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``gensample train scott`` that only a text-to-image teacher uses."""
    g = parser.add_argument_group("text-to-image teacher (a Stable-Diffusion-style --teacher folder)")
    g.add_argument("--original-inference-steps", type=int, default=50,
                   help="LCM's skipping-step grid: S levels t = k j - 1, k = T / S (50: 19, 39, ..., 999), plus t = 0; "
                        "--skip counts these steps; recorded in the exported LCMScheduler")
    g.add_argument("--time-cond-proj-dim", type=int, default=256,
                   help="width of the student's guidance-scale embedding (UNet2DConditionModel time_cond_proj_dim)")
    g.add_argument("--timestep-scaling", type=float, default=LCM_TIMESTEP_SCALING,
                   help="LCMScheduler's timestep_scaling of the boundary scalings c_skip, c_out (LCM: 10)")
    g.add_argument("--negative-prompt", default="",
                   help="text of the teacher's unconditional branch (default: the empty prompt)")
    g.add_argument("--encode-batch-size", type=int, default=32, help="images per VAE encoder call")


def build_text2image_scott(args: argparse.Namespace, teacher_dir: str | Path
                           ) -> tuple[TextToImageSCott, torch.Tensor, torch.Tensor]:
    """(method, latents (N, C, h, w), prompt indices (N,) int64) for ``gensample train scott --teacher DIR`` with a
    text-to-image teacher folder and ``--data`` a captioned image folder. Reads the SCott flags of
    ``gensample train scott`` and the flags of :func:`add_text2image_arguments` (defaults where absent)."""
    from ..data.latents import encode_images

    def flag(name: str, default: Any = None) -> Any:
        value = getattr(args, name, None)
        return default if value is None else value

    parts = load_text2image_teacher(teacher_dir)
    unet, vae, text_encoder = parts["unet"], parts["vae"], parts["text_encoder"]
    tokenizer, teacher_scheduler = parts["tokenizer"], parts["scheduler"]
    data = flag("data", "digits")
    if data == "digits":
        raise ValueError("a text-to-image teacher needs captioned images: pass --data FOLDER holding the images and "
                         "a metadata.jsonl ({\"file_name\": ..., \"text\": ...} per line).")
    progress = not flag("no_progress", False)
    vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
    resolution = flag("resolution", unet.config.sample_size * vae_scale)
    images, captions = load_captioned_images(data, resolution, progress=progress)
    latents = encode_images(vae, images, batch_size=flag("encode_batch_size", 32), sample=False, progress=progress)
    down = 2 ** (len(unet.config.block_out_channels) - 1)
    if latents.shape[1] != unet.config.in_channels or latents.shape[-1] % down or latents.shape[-2] % down:
        raise ValueError(f"--resolution {resolution}: latents of shape {tuple(latents.shape[1:])} do not fit the "
                         f"teacher UNet ({unet.config.in_channels} channels, sides divisible by {down}); pick a "
                         f"resolution divisible by {vae_scale * down} (the teacher's own: "
                         f"{unet.config.sample_size * vae_scale}).")
    prompts = list(dict.fromkeys(captions))
    position = {p: i for i, p in enumerate(prompts)}
    labels = torch.tensor([position[c] for c in captions], dtype=torch.int64)
    prompt_embeds = encode_prompts(tokenizer, text_encoder, prompts)
    uncond_embeds = encode_prompts(tokenizer, text_encoder, [flag("negative_prompt", "")])

    timestep_scaling = float(flag("timestep_scaling", LCM_TIMESTEP_SCALING))
    scheduler = lcm_scheduler_for(teacher_scheduler, int(flag("original_inference_steps", 50)), timestep_scaling)
    if flag("init_from"):
        from diffusers import UNet2DConditionModel

        path = Path(args.init_from)
        student_unet = UNet2DConditionModel.from_pretrained(path / "unet" if (path / "unet").is_dir() else path)
    else:
        student_unet = student_unet_from_teacher(unet, int(flag("time_cond_proj_dim", 256)))
    prediction_type = teacher_scheduler.config.get("prediction_type", "epsilon")
    student = LCMStudent(student_unet, scheduler.alphas_cumprod, prediction_type, timestep_scaling)
    teacher = TextCFGTeacher(as_denoiser(unet, scheduler=teacher_scheduler), uncond_embeds)
    adv_weight = float(flag("adv_weight", 0.0))
    discriminator = None
    if adv_weight > 0:
        discriminator = text_discriminator(flag("discriminator", "teacher-lora"), unet, scheduler.alphas_cumprod,
                                           int(flag("lora_rank", 8)))
    guidance_range = tuple(float(w) for w in flag("guidance_range", DEFAULT_GUIDANCE_RANGE))
    method = TextToImageSCott(
        student, teacher, prompt_embeds=prompt_embeds, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        scheduler=scheduler, prompts=prompts, negative_prompt=flag("negative_prompt", ""),
        skip=int(flag("skip", 1)), solver=flag("solver", "ddim"), eta=float(flag("eta", 0.3)),
        substeps=int(flag("substeps", 3)), phi=flag("phi", "er-sde-5"), guidance_range=guidance_range,
        distance=flag("distance", "pseudo_huber"), huber_c=flag("huber_c"),
        target_ema=getattr(args, "target_ema", 0.95), adv_weight=adv_weight, discriminator=discriminator,
        adv_weight_mode=flag("adv_weight_mode", "fixed"), adv_p_mean=float(flag("adv_p_mean", -1.2)),
        adv_p_std=float(flag("adv_p_std", 1.2)), discriminator_lr=flag("discriminator_lr"),
        discriminator_betas=tuple(flag("discriminator_betas", (0.5, 0.9))),
        sample_guidance_scale=flag("guidance_scale"))
    return method, latents, labels
