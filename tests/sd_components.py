"""Tiny random Stable-Diffusion-like components built in code, for the text-to-image tests (nothing is downloaded).

* a ``UNet2DConditionModel`` on 4x8x8 latents with cross-attention to 8-d text states,
* an ``AutoencoderKL`` mapping 3x16x16 images to 4x8x8 latents (one downsampling),
* a ``CLIPTextModel`` (1 layer, hidden size 8) and a byte-level ``CLIPTokenizer`` built from a ``vocab.json`` and an
  empty ``merges.txt`` written here (every character is one token, so different prompts give different ids),
* the SD-1.5 training schedule (``scaled_linear`` betas 0.00085 .. 0.012, 1000 steps) with epsilon or v prediction,

and helpers that save them as a ``StableDiffusionPipeline`` folder and write a captioned image folder in the layout of
Hugging Face's ``imagefolder`` (``metadata.jsonl`` with ``file_name`` / ``text``).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

LATENT_SIZE = 8
IMAGE_SIZE = 16
TEXT_DIM = 8
MAX_TOKENS = 12


def _byte_characters() -> list[str]:
    """The 256 printable stand-ins of bytes that byte-level BPE tokenizers (GPT-2, CLIP) use."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), 256))
    codes, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def tiny_tokenizer(folder: str | Path):
    """A ``CLIPTokenizer`` with one token per character (no merges), written to ``folder`` and loaded from there."""
    import transformers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = _byte_characters()
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                                      model_max_length=MAX_TOKENS)


def tiny_text_encoder(vocab_size: int, seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    config = transformers.CLIPTextConfig(vocab_size=vocab_size, hidden_size=TEXT_DIM, intermediate_size=16,
                                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=MAX_TOKENS,
                                         bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1)
    return transformers.CLIPTextModel(config).eval()


def tiny_unet(seed: int = 0, time_cond_proj_dim: int | None = None):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_DIM, attention_head_dim=2, norm_num_groups=4, time_cond_proj_dim=time_cond_proj_dim,
    ).eval()


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=4, sample_size=IMAGE_SIZE).eval()


def sd_scheduler(prediction_type: str = "epsilon"):
    """The SD-1.5 training schedule (diffusers' DDPMScheduler with SD's betas)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         prediction_type=prediction_type, clip_sample=False, steps_offset=1)


def tiny_sd_pipeline(folder: str | Path, prediction_type: str = "epsilon", seed: int = 0):
    """A ``StableDiffusionPipeline`` of the tiny components (no safety checker); its tokenizer files go to
    ``folder/_tokenizer_src``."""
    from diffusers import StableDiffusionPipeline

    tokenizer = tiny_tokenizer(Path(folder) / "_tokenizer_src")
    pipe = StableDiffusionPipeline(
        vae=tiny_vae(seed + 1), text_encoder=tiny_text_encoder(len(tokenizer), seed + 2), tokenizer=tokenizer,
        unet=tiny_unet(seed), scheduler=sd_scheduler(prediction_type), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_sd_pipeline(folder: str | Path, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """Save :func:`tiny_sd_pipeline` to ``folder/teacher`` (a Stable-Diffusion-style teacher folder)."""
    out = Path(folder) / "teacher"
    tiny_sd_pipeline(folder, prediction_type, seed).save_pretrained(out)
    return out


def write_captioned_folder(folder: str | Path, captions: list[str], seed: int = 0) -> Path:
    """Random-coloured 16x16 RGB images with one caption each, as ``imagefolder`` data (``metadata.jsonl``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i, text in enumerate(captions):
        name = f"img_{i:03d}.png"
        base = rng.integers(0, 256, size=3)
        pixels = np.clip(base + rng.integers(-40, 41, size=(IMAGE_SIZE, IMAGE_SIZE, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / name)
        lines.append(json.dumps({"file_name": name, "text": text}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder
