"""Image folders (any size; resized on the short side and centre-cropped) and the dataset switch used by the CLI."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


def _resize_center_crop(img: Image.Image, resolution: int) -> Image.Image:
    w, h = img.size
    scale = resolution / min(w, h)
    img = img.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - resolution) // 2, (h - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))


def load_image_folder(path: str | Path, resolution: int, channels: int = 3, progress: bool = True) -> torch.Tensor:
    """All images under ``path`` (recursively) as a float tensor (N, channels, resolution, resolution) in [-1, 1]."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"--data {path}: not a folder of images (or use --data digits for the embedded set).")
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"--data {path}: no images found (looked for {sorted(IMAGE_SUFFIXES)}).")
    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise ValueError(f"channels must be 1 or 3, got {channels}.")
    arrays = []
    for f in tqdm(files, desc="loading images", disable=not progress):
        try:
            with Image.open(f) as img:
                arrays.append(np.asarray(_resize_center_crop(img.convert(mode), resolution)))
        except (OSError, SyntaxError, ValueError) as e:  # UnidentifiedImageError, truncated or damaged files
            raise ValueError(f"--data {path}: {f} is not a readable image ({type(e).__name__}: {e}); remove or "
                             "replace it.") from None
    x = torch.from_numpy(np.stack(arrays)).float()
    x = x.unsqueeze(1) if channels == 1 else x.permute(0, 3, 1, 2)
    return x / 127.5 - 1.0


def image_dataset(data: str, resolution: int, channels: int | None = None, split: str = "train") -> torch.Tensor:
    """``data`` = "digits" (the embedded set) or a folder of images."""
    if data == "digits":
        if channels not in (None, 1):
            raise ValueError("the embedded digits are grayscale: use channels=1 (or omit it).")
        from .digits import load_digits

        return load_digits(split, resolution)
    return load_image_folder(data, resolution, channels or 3)
