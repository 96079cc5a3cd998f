"""Video I/O: load a reference video from an animated GIF, PIL frames, a numpy array or a tensor, and write GIFs and
PNG strips to look at. Videos are float tensors (F, C, H, W) in [-1, 1] (the models' convention)."""
from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from PIL import Image, ImageSequence

__all__ = ["load_video", "save_gif", "save_strip_png", "video_to_uint8"]

_FRAME_MS_TAG = re.compile(rb"gensample frame_ms=(\d+)")


def _check_range(x: torch.Tensor, lo: float, hi: float, what: str) -> None:
    tol = 1e-3 * (hi - lo)
    if x.numel() and (x.min() < lo - tol or x.max() > hi + tol):
        raise ValueError(f"{what} has values in [{float(x.min()):.4g}, {float(x.max()):.4g}], outside the expected "
                         f"[{lo:g}, {hi:g}]; pass value_range=(low, high) to say what the values span.")


def _from_channels_last(arr: np.ndarray, what: str) -> torch.Tensor:
    """(F, H, W) or (F, H, W, C) -> (F, C, H, W)."""
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3, 4):
        raise ValueError(f"{what} must be (F, H, W) or (F, H, W, C) with C in 1, 3, 4; got shape {arr.shape}.")
    return rearrange(torch.from_numpy(np.ascontiguousarray(arr)), "f h w c -> f c h w")


def _gif_frames(path: Path) -> list[Image.Image]:
    """Frames of an animated GIF; repeats merged frames of GIFs written by :func:`save_gif`.

    Pillow folds identical consecutive frames into one with the summed duration; :func:`save_gif` records its frame
    duration in the GIF comment, so such frames are expanded back here.
    """
    try:
        im = Image.open(path)
    except (OSError, SyntaxError, ValueError) as e:  # UnidentifiedImageError: not an image Pillow reads
        raise ValueError(f"{path} is not a readable GIF or image ({type(e).__name__}: {e}); pass an animated GIF "
                         "(or frames as a list of PIL images / an array).") from None
    try:
        return _read_gif_frames(im)
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # a damaged or truncated file
        raise ValueError(f"{path}: cannot decode its frames ({type(e).__name__}: {e}); the file is damaged, pass "
                         "another GIF.") from None
    finally:
        im.close()


def _read_gif_frames(im: Image.Image) -> list[Image.Image]:
    """The frames of an opened image, merged frames of :func:`save_gif` repeated (see :func:`_gif_frames`)."""
    comment = im.info.get("comment", b"")
    tag = _FRAME_MS_TAG.search(comment if isinstance(comment, bytes) else str(comment).encode())
    frame_ms = int(tag.group(1)) if tag else None
    frames = []
    for frame in ImageSequence.Iterator(im):
        repeat = 1
        if frame_ms:
            repeat = max(1, round(frame.info.get("duration", frame_ms) / frame_ms))
        rgb = frame.convert("RGB")
        frames.extend([rgb] * repeat)
    return frames


def _pil_to_tensor(frames: Sequence[Image.Image], channels: int | None) -> torch.Tensor:
    sizes = {f.size for f in frames}
    if len(sizes) != 1:
        raise ValueError(f"all frames must have the same size, got {sorted(sizes)}.")
    arr = np.stack([np.asarray(f.convert("RGB"), dtype=np.uint8) for f in frames])  # (F, H, W, 3)
    if channels is None:
        grey = (arr[..., :1] == arr).all()
        channels = 1 if grey else 3
    return _from_channels_last(arr[..., :1] if channels == 1 else arr, "frames")


def load_video(video, *, value_range: tuple[float, float] | None = None, channels: int | None = None) -> torch.Tensor:
    """A video as a float tensor (F, C, H, W) in [-1, 1].

    Accepts:
      * a path (str / Path) to an animated GIF (or any image Pillow reads; one frame then);
      * a list of PIL images;
      * a numpy array (F, H, W) or (F, H, W, C), uint8 in [0, 255] or float in [0, 1] (diffusers' ``output_type="np"``);
      * a torch tensor (F, C, H, W) or (F, H, W), float in [-1, 1] (gensample's convention) or uint8 in [0, 255].
    ``value_range`` overrides the assumed (low, high) of the values. ``channels`` (1 or 3) converts; by default
    PIL/GIF input becomes 1 channel when every frame is grey, 3 otherwise, and arrays/tensors keep theirs (an alpha
    channel is dropped).
    """
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be None, 1 or 3, got {channels}.")
    default_range: tuple[float, float]
    if isinstance(video, (str, Path)):
        path = Path(video)
        if not path.is_file():
            raise FileNotFoundError(f"no video file at {path}; pass the path of an animated GIF.")
        frames = _gif_frames(path)
        x, default_range = _pil_to_tensor(frames, channels), (0.0, 255.0)
    elif isinstance(video, (list, tuple)):
        if len(video) == 0:
            raise ValueError("video is an empty list; pass at least one frame.")
        if not all(isinstance(f, Image.Image) for f in video):
            raise ValueError("a list video must hold PIL images; stack arrays into one (F, H, W[, C]) array instead.")
        x, default_range = _pil_to_tensor(video, channels), (0.0, 255.0)
    elif isinstance(video, np.ndarray):
        x = _from_channels_last(video, "a numpy video")
        default_range = (0.0, 255.0) if video.dtype == np.uint8 else (0.0, 1.0)
    elif isinstance(video, torch.Tensor):
        x = video.detach().cpu()
        if x.ndim == 3:
            x = x[:, None]
        if x.ndim != 4 or x.shape[1] not in (1, 3, 4):
            hint = " (index a batch with [0])" if x.ndim == 5 else ""
            raise ValueError(f"a tensor video must be (F, C, H, W) or (F, H, W) with C in 1, 3, 4; got shape "
                             f"{tuple(video.shape)}{hint}.")
        default_range = (0.0, 255.0) if x.dtype == torch.uint8 else (-1.0, 1.0)
    else:
        raise TypeError(f"cannot read a video from {type(video).__name__}; pass a GIF path, a list of PIL images, a "
                         "numpy array or a torch tensor.")
    if x.shape[0] == 0 or x.shape[-1] == 0 or x.shape[-2] == 0:
        raise ValueError(f"the video is empty (shape (F, C, H, W) = {tuple(x.shape)}); pass at least one frame.")
    if x.shape[1] == 4:
        x = x[:, :3]
    lo, hi = value_range if value_range is not None else default_range
    if not hi > lo:
        raise ValueError(f"value_range must be (low, high) with high > low, got {value_range}.")
    x = x.float()
    _check_range(x, lo, hi, "the video")
    x = ((x - lo) / (hi - lo) * 2 - 1).clamp(-1, 1)
    if channels == 1 and x.shape[1] == 3:
        x = (0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])  # ITU-R 601 luma, as PIL's "L"
    elif channels == 3 and x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.contiguous()


def video_to_uint8(frames: torch.Tensor) -> np.ndarray:
    """A float tensor (F, C, H, W) or (F, H, W) in [-1, 1] (clamped), or anything :func:`load_video` reads, as uint8
    (F, H, W, C) = round((x + 1) / 2 * 255)."""
    x = frames if isinstance(frames, torch.Tensor) and frames.is_floating_point() else load_video(frames)
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"frames must be (F, C, H, W) with C in 1, 3; got shape {tuple(x.shape)}.")
    if x.shape[0] == 0:
        raise ValueError("frames is empty; pass at least one frame.")
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) / 2 * 255).round().to(torch.uint8)
    return rearrange(x, "f c h w -> f h w c").numpy()


def save_gif(frames, path: str | Path, fps: float = 4) -> Path:
    """Write ``frames`` ((F, C, H, W) in [-1, 1], or anything :func:`load_video` reads) as a looping animated GIF.

    Grey videos are stored losslessly (256 grey levels); colour ones are quantised to a 256-colour palette by Pillow.
    """
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}.")
    arr = video_to_uint8(frames)
    images = [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in arr]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame_ms = max(10, round(1000 / fps))
    images[0].save(path, save_all=True, append_images=images[1:], duration=frame_ms, loop=0, optimize=False,
                   comment=f"gensample frame_ms={frame_ms}".encode())
    return path


def save_strip_png(rows_of_videos, path: str | Path, upscale: int = 4, padding: int = 1) -> Path:
    """A PNG with one row per video (e.g. reference on top, result below), frames left to right, each pixel
    ``upscale`` x ``upscale`` (nearest). ``rows_of_videos``: a list of videos (F, C, H, W) in [-1, 1] (or anything
    :func:`load_video` reads), or a tensor (R, F, C, H, W). Rows may differ in frame count; frames must share H, W."""
    if upscale < 1 or padding < 0:
        raise ValueError(f"need upscale >= 1 and padding >= 0, got {upscale} and {padding}.")
    if isinstance(rows_of_videos, torch.Tensor):
        if rows_of_videos.ndim != 5:
            raise ValueError(f"a tensor of rows must be (R, F, C, H, W), got shape {tuple(rows_of_videos.shape)}.")
        rows_of_videos = list(rows_of_videos)
    if len(rows_of_videos) == 0:
        raise ValueError("rows_of_videos is empty; pass at least one video.")
    rows = [video_to_uint8(v) for v in rows_of_videos]
    sizes = {r.shape[1:3] for r in rows}
    if len(sizes) != 1:
        raise ValueError(f"all videos must have the same frame size, got {sorted(sizes)}; resize them first.")
    h, w = rows[0].shape[1:3]
    hs, ws = h * upscale, w * upscale
    ncol = max(r.shape[0] for r in rows)
    canvas = np.full((len(rows) * (hs + padding) + padding, ncol * (ws + padding) + padding, 3), 255, np.uint8)
    for i, r in enumerate(rows):
        rgb = np.repeat(r, 3, axis=-1) if r.shape[-1] == 1 else r
        for j, frame in enumerate(rgb):
            y, x = padding + i * (hs + padding), padding + j * (ws + padding)
            canvas[y:y + hs, x:x + ws] = frame.repeat(upscale, 0).repeat(upscale, 1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas).save(path)
    return path
