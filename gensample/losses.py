"""Distances between a student and a target prediction, each returning one value per sample (B,)."""
from __future__ import annotations

import math

import torch

from .losses_slct import cauchy, slct_cauchy_c  # noqa: F401  sLCT's Cauchy distance and its adaptive c


def pseudo_huber_constant(num_dims: int) -> float:
    """iCT's c = 0.00054 sqrt(d), d = C*H*W (Song & Dhariwal 2023, sec. 3.3; 3x32x32 -> 0.02993)."""
    return 0.00054 * math.sqrt(num_dims)


def pseudo_huber(x: torch.Tensor, y: torch.Tensor, c: float | None = None) -> torch.Tensor:
    """iCT pseudo-Huber on the per-sample L2 norm: d(x, y) = sqrt(||x - y||_2^2 + c^2) - c.

    ``c`` defaults to :func:`pseudo_huber_constant` of the per-sample dimension.
    """
    diff = (x - y).flatten(1).float()
    if c is None:
        c = pseudo_huber_constant(diff.shape[1])
    return (diff.square().sum(1) + c**2).sqrt() - c


def pseudo_huber_elementwise(x: torch.Tensor, y: torch.Tensor, c: float | None = None) -> torch.Tensor:
    """Element-wise pseudo-Huber, then the mean over elements: mean(sqrt((x - y)^2 + c^2) - c).

    Not the iCT loss: this is the variant of some public code (diffusers' research script, Kinyugo). Offered only
    under this name so it is never picked by accident.
    """
    diff = (x - y).flatten(1).float()
    if c is None:
        c = pseudo_huber_constant(diff.shape[1])
    return ((diff.square() + c**2).sqrt() - c).mean(1)


def squared_l2(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean squared error per sample (CM's ``l2``, mean over C, H, W)."""
    return (x - y).flatten(1).float().square().mean(1)


DISTANCES = {"pseudo_huber": pseudo_huber, "pseudo_huber_elementwise": pseudo_huber_elementwise, "l2": squared_l2,
             "cauchy": cauchy}


def get_distance(name: str):
    if name not in DISTANCES:
        raise ValueError(f"Unknown distance {name!r}; choose one of {sorted(DISTANCES)}.")
    return DISTANCES[name]
