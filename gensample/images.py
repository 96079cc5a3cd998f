"""Pictures a user looks at: sample grids and loss curves, as PNG (PIL only, no plotting dependency)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw


def image_grid(images: torch.Tensor, nrow: int | None = None, upscale: int | None = None, padding: int = 1) -> Image.Image:
    """Tile NCHW images in [0, 1] into one PIL image; tiny images (e.g. 8x8 digits) are upscaled with nearest."""
    if images.ndim != 4:
        raise ValueError(f"images must be NCHW, got shape {tuple(images.shape)}.")
    n, c, h, w = images.shape
    if n == 0:
        raise ValueError("images is empty; pass at least one image.")
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol = math.ceil(n / nrow)
    if upscale is None:
        upscale = max(1, 64 // max(h, w))
    H, W = h * upscale, w * upscale
    height, width = ncol * (H + padding) + padding, nrow * (W + padding) + padding
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and height * width > 2 * limit:
        raise ValueError(f"a grid of {n} images would be {width}x{height} px, larger than Pillow opens again "
                         f"({2 * limit} px, PIL.Image.MAX_IMAGE_PIXELS x 2); show fewer images (`gensample sample "
                         "--grid-images`) and write all of them with --save-images.")
    arr = (images.detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
    if c == 1:
        arr = np.repeat(arr, 3, axis=1)
    canvas = np.full((height, width, 3), 255, np.uint8)
    for k in range(n):
        r, q = divmod(k, nrow)
        tile = arr[k].transpose(1, 2, 0).repeat(upscale, 0).repeat(upscale, 1)
        y, x = padding + r * (H + padding), padding + q * (W + padding)
        canvas[y:y + H, x:x + W] = tile
    return Image.fromarray(canvas)


def save_image_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, nrow).save(path)
    return path


def plot_curve(steps: Sequence[float], values: Sequence[float], path: str | Path, title: str = "loss",
               log_y: bool = True, size: tuple[int, int] = (640, 400)) -> Path:
    """A line plot of (step, value) with a running mean, labelled axes and min/max ticks."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 70, 20, 30, 40
    draw.rectangle([left, top, w - right, h - bottom], outline="black")
    draw.text((left, 8), title + (" (log scale)" if log_y else ""), fill="black")
    steps = np.asarray(steps, dtype=np.float64)
    vals = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(vals) & ((vals > 0) if log_y else True)
    steps, vals = steps[ok], vals[ok]
    if len(vals) >= 2:
        y = np.log10(vals) if log_y else vals
        window = max(1, len(y) // 50)
        smooth = np.convolve(y, np.ones(window) / window, mode="valid")
        x0, x1 = steps.min(), max(steps.max(), steps.min() + 1)
        y0, y1 = y.min(), max(y.max(), y.min() + 1e-12)

        def to_px(xs, ys):
            px = left + (xs - x0) / (x1 - x0) * (w - left - right)
            py = h - bottom - (ys - y0) / (y1 - y0) * (h - top - bottom)
            return list(zip(px.tolist(), py.tolist()))

        draw.line(to_px(steps, y), fill=(170, 190, 230), width=1)
        draw.line(to_px(steps[window - 1:], smooth), fill=(20, 60, 200), width=2)
        fmt = (lambda v: f"{10 ** v:.3g}") if log_y else (lambda v: f"{v:.3g}")
        draw.text((4, top), fmt(y1), fill="black")
        draw.text((4, h - bottom - 10), fmt(y0), fill="black")
        draw.text((left, h - bottom + 6), f"{int(x0)}", fill="black")
        draw.text((w - right - 60, h - bottom + 6), f"step {int(x1)}", fill="black")
    img.save(path)
    return path
