"""Moving digits: short videos of one embedded digit gliding across a canvas with constant velocity.

In the spirit of Moving MNIST (Srivastava et al. 2015, "Unsupervised Learning of Video Representations using LSTMs"),
built from the embedded 8x8 digits (gensample.data.digits) so it needs no download. Each video: one digit, upscaled to
``sprite`` x ``sprite`` with bilinear interpolation, composited (pixel-wise max) on a -1 background of ``canvas`` x
``canvas``, moving by a constant velocity for ``num_frames`` frames and fully inside the canvas in every frame.

Conventions:
  * coordinates are pixel indices, x = column, y = row (y points down); pixel (i, j) sits at (x, y) = (j, i);
  * a direction of theta degrees is counter-clockwise as seen on screen: 0 = right, 90 = up, 180 = left, 270 = down,
    so the velocity is (dx, dy) = speed * (cos theta, -sin theta) px/frame;
  * sub-pixel positions are drawn by bilinear shifting, which moves the sprite's centre of mass by exactly the shift
    (weights (x + 1) / 2), so ``centres`` is the centre of mass of what is drawn.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .digits import load_digits

__all__ = ["COMPASS_DIRECTIONS", "MovingDigits", "make_moving_digits", "make_reference_video"]

#: The 8 compass directions in degrees (0 = right, 90 = up).
COMPASS_DIRECTIONS: tuple[float, ...] = (0.0, 45.0, 90.0, 135.0, 180.0, 225.0, 270.0, 315.0)


@dataclass
class MovingDigits:
    """A moving-digits video set.

    Attributes:
        videos: float (N, F, 1, H, W) in [-1, 1].
        labels: int64 (N,) digit classes.
        velocities: float (N, 2) as (dx, dy) px/frame, y pointing down.
        centres: float (N, F, 2) ground-truth sprite centres (x, y): centre of mass of the drawn sprite.
        directions: float (N,) motion directions in degrees (0 = right, 90 = up).
    """

    videos: torch.Tensor
    labels: torch.Tensor
    velocities: torch.Tensor
    centres: torch.Tensor
    directions: torch.Tensor

    def __len__(self) -> int:
        return self.videos.shape[0]


def _check_geometry(num_frames: int, canvas: int, sprite: int) -> None:
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}.")
    if sprite < 1 or canvas < sprite:
        raise ValueError(f"need 1 <= sprite <= canvas, got sprite={sprite}, canvas={canvas}; enlarge the canvas.")


def _sprites(split: str, sprite: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Digit sprites as intensities (N, sprite, sprite) in [0, 1] and their labels."""
    images, labels = load_digits(split, resolution=sprite, return_labels=True)
    return ((images[:, 0] + 1) / 2).clamp(0, 1), labels


def _velocity(direction_degrees: torch.Tensor, speed: torch.Tensor) -> torch.Tensor:
    theta = torch.deg2rad(direction_degrees.double())
    return torch.stack([speed.double() * torch.cos(theta), -speed.double() * torch.sin(theta)], -1)


def _start_range(velocity: torch.Tensor, num_frames: int, canvas: int, sprite: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per axis, the interval of top-left starts keeping the sprite inside [0, canvas - sprite] for all frames."""
    travel = velocity * (num_frames - 1)
    lo = (-travel).clamp(min=0)
    hi = (canvas - sprite) - travel.clamp(min=0)
    return lo, hi


def _render(intensity: torch.Tensor, top_left: torch.Tensor, canvas: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw sprites (N, S, S) in [0, 1] at sub-pixel top-left positions (N, F, 2) (x, y) on a -1 canvas.

    Bilinear shift: the sprite is padded by one zero row/column and pasted at floor(position) with the four bilinear
    weights of the fractional part. Returns videos (N, F, 1, canvas, canvas) in [-1, 1] and centres of mass (N, F, 2).
    """
    n, s, _ = intensity.shape
    f = top_left.shape[1]
    top_left = top_left.clamp(0, canvas - s)  # absorbs float round-off at the borders (e.g. 20 + 1e-15)
    base = top_left.floor()
    frac = (top_left - base).float()
    fx, fy = frac[..., 0, None, None], frac[..., 1, None, None]
    pad = torch.nn.functional.pad(intensity, (1, 1, 1, 1))[:, None]  # (N, 1, S + 2, S + 2), zero border
    # tile[i, j] = sum over the 4 neighbours of sprite[i - di, j - dj] * weight(di, dj); tile is (S + 1) square.
    tile = ((1 - fy) * (1 - fx) * pad[..., 1:, 1:] + (1 - fy) * fx * pad[..., 1:, :-1]
            + fy * (1 - fx) * pad[..., :-1, 1:] + fy * fx * pad[..., :-1, :-1])
    layer = torch.zeros(n, f, canvas + 1, canvas + 1)
    ar = torch.arange(s + 1)
    rows = base[..., 1].long()[..., None, None] + ar[:, None]
    cols = base[..., 0].long()[..., None, None] + ar[None, :]
    vid = torch.arange(n)[:, None, None, None]
    frm = torch.arange(f)[None, :, None, None]
    layer[vid, frm, rows, cols] = tile
    if layer[..., canvas, :].abs().max() > 0 or layer[..., :, canvas].abs().max() > 0:
        raise AssertionError("sprite left the canvas; the start range is wrong.")  # internal invariant
    layer = layer[..., :canvas, :canvas]
    videos = torch.maximum(torch.full_like(layer, -1.0), 2 * layer - 1).clamp(max=1.0).unsqueeze(2)
    # Centre of mass of the sprite in its own pixel indices, plus the shift (exact under bilinear shifting).
    ys, xs = torch.meshgrid(torch.arange(s, dtype=torch.float64), torch.arange(s, dtype=torch.float64), indexing="ij")
    w = intensity.double()
    mass = w.sum((1, 2))
    com = torch.stack([(w * xs).sum((1, 2)) / mass, (w * ys).sum((1, 2)) / mass], -1)  # (N, 2)
    centres = (com[:, None, :] + top_left.double()).float()
    return videos, centres


def _as_pair(value: float | Sequence[float], name: str) -> tuple[float, float]:
    if isinstance(value, (int, float)):
        lo = hi = float(value)
    else:
        if len(value) != 2:
            raise ValueError(f"{name} must be a number or a (low, high) pair, got {value!r}.")
        lo, hi = float(value[0]), float(value[1])
    if not 0 <= lo <= hi:
        raise ValueError(f"{name} must satisfy 0 <= low <= high, got {value!r}.")
    return lo, hi


def make_moving_digits(num_videos: int, *, split: str = "train", num_frames: int = 8, canvas: int = 32,
                       sprite: int = 12, speed: float | Sequence[float] = (1.5, 2.5),
                       directions: Sequence[float] | None = None, seed: int = 0,
                       generator: torch.Generator | None = None) -> MovingDigits:
    """``num_videos`` moving-digit videos, deterministic given ``seed`` (or ``generator``, which takes precedence).

    Per video: a digit drawn uniformly from ``split``; a direction uniform in [0, 360) degrees (``directions=None``)
    or uniform over the given list (e.g. :data:`COMPASS_DIRECTIONS`); a speed uniform in ``speed`` = (low, high)
    px/frame (or a fixed number); a start position uniform over those that keep the sprite inside the canvas in all
    ``num_frames`` frames.
    """
    if num_videos < 1:
        raise ValueError(f"num_videos must be >= 1, got {num_videos}.")
    _check_geometry(num_frames, canvas, sprite)
    lo_speed, hi_speed = _as_pair(speed, "speed")
    if hi_speed * (num_frames - 1) > canvas - sprite:
        raise ValueError(f"speed up to {hi_speed} px/frame over {num_frames} frames travels "
                         f"{hi_speed * (num_frames - 1):g} px but only {canvas - sprite} px fit between the sprite "
                         f"({sprite}) and the canvas ({canvas}); lower speed or num_frames, or enlarge the canvas.")
    if directions is not None and len(directions) == 0:
        raise ValueError("directions must be None (continuous angles) or a non-empty list of degrees.")
    g = generator if generator is not None else torch.Generator().manual_seed(seed)
    intensity, all_labels = _sprites(split, sprite)
    index = torch.randint(len(intensity), (num_videos,), generator=g)
    if directions is None:
        angle = torch.rand(num_videos, generator=g, dtype=torch.float64) * 360.0
    else:
        choices = torch.tensor([float(d) for d in directions], dtype=torch.float64)
        angle = choices[torch.randint(len(choices), (num_videos,), generator=g)]
    spd = lo_speed + (hi_speed - lo_speed) * torch.rand(num_videos, generator=g, dtype=torch.float64)
    velocity = _velocity(angle, spd)
    lo, hi = _start_range(velocity, num_frames, canvas, sprite)
    start = lo + (hi - lo).clamp(min=0) * torch.rand(num_videos, 2, generator=g, dtype=torch.float64)
    positions = start[:, None, :] + velocity[:, None, :] * torch.arange(num_frames, dtype=torch.float64)[:, None]
    videos, centres = _render(intensity[index], positions, canvas)
    return MovingDigits(videos=videos, labels=all_labels[index], velocities=velocity.float(), centres=centres,
                        directions=angle.float())


def make_reference_video(direction_degrees: float, *, digit_index: int = 0, speed: float = 2.0, split: str = "train",
                         num_frames: int = 8, canvas: int = 32, sprite: int = 12) -> MovingDigits:
    """One video (N = 1) of digit ``digit_index`` of ``split`` moving in ``direction_degrees`` (0 = right, 90 = up)
    at ``speed`` px/frame, its path centred on the canvas. ``.videos[0]`` is the (F, 1, H, W) video."""
    _check_geometry(num_frames, canvas, sprite)
    if not math.isfinite(direction_degrees):
        raise ValueError(f"direction_degrees must be a finite number, got {direction_degrees}.")
    if speed < 0:
        raise ValueError(f"speed must be >= 0 px/frame, got {speed}.")
    intensity, labels = _sprites(split, sprite)
    if not 0 <= digit_index < len(intensity):
        raise ValueError(f"digit_index must be in [0, {len(intensity)}) for split {split!r}, got {digit_index}.")
    velocity = _velocity(torch.tensor([float(direction_degrees)]), torch.tensor([float(speed)]))
    lo, hi = _start_range(velocity, num_frames, canvas, sprite)
    if (hi < lo - 1e-9).any():
        raise ValueError(f"speed {speed} px/frame over {num_frames} frames does not fit a {sprite}px sprite in a "
                         f"{canvas}px canvas; lower speed or num_frames.")
    travel = velocity * (num_frames - 1)
    start = (canvas - sprite) / 2 - travel / 2
    positions = start[:, None, :] + velocity[:, None, :] * torch.arange(num_frames, dtype=torch.float64)[:, None]
    videos, centres = _render(intensity[digit_index:digit_index + 1], positions, canvas)
    return MovingDigits(videos=videos, labels=labels[digit_index:digit_index + 1], velocities=velocity.float(),
                        centres=centres, directions=torch.tensor([float(direction_degrees)]))
